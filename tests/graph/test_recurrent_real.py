"""Real recurrent models: their LSTM is a unit, and switching it to FP16 gives a valid model.

ddddocr's text recognizer (Conv/SiLU backbone, bidirectional LSTM of 512, Gemm over 8,210
characters; batch fixed to 1) and Silero VAD's sequence model (Conv STFT, Conv encoder, LSTM
of 128 whose state ``h``/``c`` are graph inputs and outputs), on their realistic inputs (page
crops, recorded speech). The all-FP16 rewrite and the rewrite with only the LSTM in FP16 pass
``check_model(full_check=True)``, run on ONNX Runtime CPU with finite outputs close to FP32,
and still read the same words / hear the same speech.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from amp_search.graph import MixedPrecisionRewriter, reconcile_shapes, sanitize
from amp_search.graph.io import load_model
from amp_search.testing import realmodels
from amp_search.types import PrecisionAssignment

# FP32 vs FP16 relative L2 seen on ONNX Runtime 1.31 CPU (graph optimizations off, FP16
# storage emulated at node boundaries): silero_vad all-FP16 1.3e-2, LSTM only 3.2e-4;
# ddddocr_rec all-FP16 2.3e-3, LSTM only 3.5e-4. Bounds leave about 4x room.
CASES = [
    pytest.param("silero_vad", 5e-2, 2e-3, id="silero_vad"),
    pytest.param("ddddocr_rec", 1e-2, 2e-3, id="ddddocr_rec", marks=pytest.mark.slow),
]


def _batches(feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(feeds.values())))
    return [{k: v[b] for k, v in feeds.items()} for b in range(n)]


def _run(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [sess.run(None, b) for b in batches]


def _rel_l2(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """The worst output's relative L2 over all batches (the search's default metric)."""
    worst = 0.0
    for k in range(len(ref[0])):
        r = np.concatenate([b[k].ravel() for b in ref]).astype(np.float64)
        g = np.concatenate([b[k].ravel() for b in got]).astype(np.float64)
        worst = max(worst, float(np.linalg.norm(g - r) / np.linalg.norm(r)))
    return worst


@pytest.mark.parametrize(("name", "all_fp16_bound", "lstm_bound"), CASES)
def test_lstm_unit_switches_to_fp16_validly(name, all_fp16_bound, lstm_bound, real_model):
    path, feeds = real_model(name)
    assert name in realmodels.STACKED  # feeds are a stack of batches
    batches = _batches(feeds)
    model = sanitize(load_model(path))
    ref = _run(model, batches)
    # ddddocr declares its output [1, seqlen] and returns [T, 1, C]: reconcile as the search does.
    sess_outputs = {o.name: r.shape for o, r in zip(model.graph.output, ref[0], strict=True)}
    reconcile_shapes(model, sess_outputs)

    rw = MixedPrecisionRewriter(model)
    names = [u.name for u in rw.units]
    (lstm,) = [u for u in rw.units if "LSTM" in u.op_types]
    assert lstm.op_types[0] == "LSTM"  # its own unit, named by the LSTM node
    lstm_node = next(n for n in model.graph.node if n.op_type == "LSTM")
    assert lstm.name == lstm_node.name
    assert set(lstm_node.input[1:4]) <= set(lstm.weights)  # W, R, B switch with it

    results = {}
    for label, assignment in (
        ("all", rw.all_fp16()),
        ("lstm", PrecisionAssignment.with_fp16(names, [lstm.name])),
    ):
        out, report = rw.apply(assignment)
        assert lstm.name in report.fp16_nodes
        onnx.checker.check_model(out, full_check=True)
        switched = next(n for n in out.graph.node if n.name == lstm.name)
        inits = {i.name: i.data_type for i in out.graph.initializer}
        for w in switched.input[1:4]:  # FP16 weights, not FP32 ones behind a Cast
            assert inits[w] == onnx.TensorProto.FLOAT16, (label, w)
        got = _run(out, batches)
        assert all(np.isfinite(g).all() for b in got for g in b), label
        assert [g.dtype for g in got[0]] == [r.dtype for r in ref[0]]
        assert [g.shape for g in got[0]] == [r.shape for r in ref[0]]
        results[label] = (got, _rel_l2(ref, got))

    dev_all, dev_lstm = results["all"][1], results["lstm"][1]
    assert 0 < dev_all < all_fp16_bound
    assert 0 < dev_lstm < lstm_bound
    assert dev_lstm < dev_all  # one unit in FP16 moves the output less than all of them

    if name == "ddddocr_rec":  # still reads the same words
        want = [realmodels.ddddocr_decode(b[0]) for b in ref]
        for label, (got, _) in results.items():
            assert [realmodels.ddddocr_decode(b[0]) for b in got] == want, label
    else:  # still hears speech in the same frames (probability > 0.5, at most one flips)
        for label, (got, _) in results.items():
            for r, g in zip(ref, got, strict=True):
                assert int(((r[0] > 0.5) != (g[0] > 0.5)).sum()) <= 1, label
