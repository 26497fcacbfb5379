"""The real models load and behave as the real models they are, on realistic inputs.

These tests fetch from PyPI on first use (into ``AMP_SEARCH_MODEL_CACHE`` or the user cache)
and build MiniLM's ONNX from its weights; later runs reuse the cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from amp_search.calibration import model_inputs
from amp_search.errors import UserInputError
from amp_search.testing import realmodels

DEFAULT_N = {"ppocr_cls": 6, "ppocr_det": 1, "ppocr_rec": 6, "minilm": 8, "layout_picodet": 2,
             "ddddocr_rec": 6, "silero_vad": 4}  # fmt: skip


def _calibration(name: str, n: int | None = None) -> dict[str, np.ndarray]:
    """:func:`realmodels.calibration`, skipping where alsa-utils' recordings cannot be had."""
    try:
        return realmodels.calibration(name, n)
    except UserInputError as exc:
        if "alsa-utils" in str(exc):
            pytest.skip(str(exc))
        raise


def _run(name: str, n: int | None = None) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    feeds = _calibration(name, n)
    sess = ort.InferenceSession(str(realmodels.fetch(name)), providers=["CPUExecutionProvider"])
    return feeds, sess.run(None, feeds)


def _offline(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Points the cache at ``cache`` and makes any pip download fail (no index, no links)."""
    empty = cache.parent / "no-links"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("AMP_SEARCH_MODEL_CACHE", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


@pytest.mark.parametrize("name", realmodels.MODEL_NAMES)
def test_fetch_gives_a_valid_model_matching_its_calibration_data(name):
    path = realmodels.fetch(name)
    assert path.is_file()
    assert path.parent == realmodels.cache_dir()
    assert realmodels.fetch(name) == path  # cached: no second download
    model = onnx.load(path)
    onnx.checker.check_model(model)
    feeds = _calibration(name)
    specs = model_inputs(model)
    assert sorted(feeds) == sorted(s.name for s in specs)
    stacked = name in realmodels.STACKED  # one more leading axis: a stack of batches
    for spec in specs:
        assert feeds[spec.name].dtype == spec.dtype
        assert feeds[spec.name].ndim == spec.rank + stacked
        fixed = [(k, d) for k, d in enumerate(spec.shape) if isinstance(d, int)]
        assert all(feeds[spec.name].shape[k + stacked] == d for k, d in fixed)
        assert feeds[spec.name].shape[0] == DEFAULT_N[name]
        assert np.isfinite(feeds[spec.name]).all()


def test_ocr_inputs_are_named_x_with_paddle_shapes():
    assert realmodels.calibration("ppocr_det")["x"].shape == (1, 3, 736, 1472)
    assert realmodels.calibration("ppocr_rec")["x"].shape == (6, 3, 48, 320)
    assert realmodels.calibration("ppocr_cls", 10)["x"].shape == (10, 3, 48, 192)
    assert realmodels.calibration("ppocr_det", 2)["x"].shape == (2, 3, 736, 1472)


def test_calibration_is_deterministic_and_not_noise():
    a = realmodels.calibration("ppocr_cls")["x"]
    b = realmodels.calibration("ppocr_cls")["x"]
    np.testing.assert_array_equal(a, b)
    assert a.min() >= -1.0 and a.max() <= 1.0  # (x/255 - 0.5)/0.5
    np.testing.assert_array_equal(a[:, 0], a[:, 1])  # a grey page stacked to RGB
    assert all(float(crop.std()) > 0.1 for crop in a)  # dark ink on light paper
    assert len({crop.tobytes() for crop in a}) == len(a)  # six different crops


def test_detector_finds_text_on_the_page():
    _, (prob,) = _run("ppocr_det")
    assert prob.shape == (1, 1, 736, 1472)
    text = prob[0, 0] > 0.3
    assert 0.02 < float(text.mean()) < 0.5
    rows = text.mean(axis=1)
    assert rows[:40].mean() < 0.01  # the blank top margin of the page
    assert rows[60:120].mean() > 0.1  # the heading "Region-based segmentation"
    lines = np.flatnonzero(np.diff((rows > 0.05).astype(int)) == 1)
    assert len(lines) >= 5  # separate text lines, separated by empty rows


def test_recognizer_reads_the_words_on_the_page():
    _, (probs,) = _run("ppocr_rec")
    steps = probs.argmax(-1)
    assert all(int((line != 0).sum()) >= 3 for line in steps)  # 0 is the CTC blank
    texts = realmodels.ctc_decode(probs)
    assert all(sum(c.isascii() and c.isalpha() for c in t) >= 3 for t in texts), texts
    expected = {"Region-based", "Let us first", "background.", "unambiguously"}
    assert len(expected & set(texts)) >= 3, texts


def test_classifier_sees_the_rotated_lines():
    _, (probs,) = _run("ppocr_cls")
    assert probs.argmax(-1).tolist() == [0, 1, 0, 1, 0, 1]


def test_text_encoder_puts_paraphrases_closer_than_unrelated_sentences():
    feeds, (hidden, emb) = _run("minilm")
    assert hidden.shape == (8, 32, 384)
    assert (feeds["attention_mask"].sum(1) < 32).all()  # nothing truncated
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    cos = emb @ emb.T
    pairs = set(realmodels.PARAPHRASE_PAIRS)
    assert cos[0, 1] > 0.5 and cos[2, 3] > 0.5  # the two paraphrase pairs
    unrelated = [cos[i, j] for i in range(8) for j in range(i + 1, 8) if (i, j) not in pairs]
    assert max(unrelated) < 0.3
    assert min(cos[i, j] for i, j in pairs) > max(unrelated)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


def test_layout_detector_finds_heading_text_and_figure() -> None:
    feeds, outs = _run("layout_picodet", 5)
    assert feeds["image"].shape == (5, 3, 800, 608)
    assert [o.shape[1:] for o in outs] == [
        *[(a, 10) for a in (7600, 1900, 475, 130)],
        *[(a, 32) for a in (7600, 1900, 475, 130)],
    ]
    assert all(np.isfinite(o).all() for o in outs)
    assert all(o.min() >= 0.0 and o.max() <= 1.0 for o in outs[:4])  # sigmoid class scores
    found = realmodels.layout_decode(outs)
    # Image 0: the book page on a portrait sheet (input rows ~25-328), the cat photo below it
    # (sheet x 57-327, y 230-410, i.e. this box in the 608x800 input).
    figure_box = (57 * 608 / 384, 230 * 800 / 505, 327 * 608 / 384, 410 * 800 / 505)
    best: dict[str, tuple[float, tuple[float, float, float, float]]] = {}
    for label, score, box in found[0]:
        best.setdefault(label, (score, box))
    assert {"text", "figure"} <= set(best) and {"header", "title"} & set(best), found[0]
    assert best["text"][0] > 0.8
    _, (_, top, _, bottom) = best["text"]
    assert top >= 25 and bottom < figure_box[1]  # the paragraph, above the figure
    assert _iou(best["figure"][1], figure_box) > 0.5
    # Image 1: the same page without a figure; image 4: a photograph, all of it a figure.
    assert "figure" not in {label for label, _, _ in found[1]}
    assert found[1][0][0] == "text" and found[1][0][1] > 0.8
    label, score, box = found[4][0]
    assert label == "figure" and score > 0.9 and _iou(box, (0, 0, 608, 800)) > 0.8


def test_layout_detector_has_a_free_batch() -> None:
    model = onnx.load(realmodels.fetch("layout_picodet"), load_external_data=False)
    (inp,) = model.graph.input
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [
        "N",
        3,
        800,
        608,
    ]
    feeds, batch = _run("layout_picodet", 3)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for i in range(3):
        single = sess.run(None, {"image": feeds["image"][i : i + 1]})
        for got, want in zip(batch, single, strict=True):
            np.testing.assert_allclose(got[i : i + 1], want, rtol=1e-5, atol=1e-5)


def test_minilm_graph_looks_like_a_torch_opset14_export():
    model = onnx.load(realmodels.fetch("minilm"), load_external_data=False)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 14)]
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert "/encoder/layer.0/attention/self/query/MatMul" in names
    assert "/encoder/layer.5/output/LayerNorm/Pow" in names
    ops = {n.op_type for n in model.graph.node}
    assert {"Pow", "ReduceMean", "Sqrt", "Erf", "Softmax"} <= ops
    assert "LayerNormalization" not in ops  # decomposed, as opset 14 exports are
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "sentence_embedding"]


def test_write_npz_round_trips(tmp_path):
    path = realmodels.write_npz("minilm", tmp_path / "sub" / "minilm.npz", n=3)
    assert path == tmp_path / "sub" / "minilm.npz"
    with np.load(path) as data:
        got = {k: data[k] for k in data.files}
    want = realmodels.calibration("minilm", 3)
    assert sorted(got) == ["attention_mask", "input_ids", "token_type_ids"]
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)
        assert got[key].dtype == np.int64


def test_bad_requests_are_user_errors():
    with pytest.raises(UserInputError, match="ppocr_cls"):
        realmodels.fetch("resnet")
    with pytest.raises(UserInputError, match="n=0"):
        realmodels.calibration("ppocr_rec", 0)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AMP_SEARCH_MODEL_CACHE", str(tmp_path))
    assert realmodels.cache_dir() == tmp_path
    monkeypatch.delenv("AMP_SEARCH_MODEL_CACHE")
    assert realmodels.cache_dir() == Path.home() / ".cache" / "amp-search" / "models"


def test_offline_cache_with_the_file_is_used_without_download(monkeypatch, tmp_path):
    src = realmodels.fetch("ppocr_cls")
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(src, cache / src.name)
    _offline(monkeypatch, cache)
    assert realmodels.fetch("ppocr_cls") == cache / src.name


def test_download_failure_says_what_to_do(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path / "cache")
    with pytest.raises(UserInputError, match="AMP_SEARCH_MODEL_CACHE") as err:
        realmodels.fetch("ppocr_det")
    assert "\n" not in err.value.message
    assert not (tmp_path / "cache" / "ch_PP-OCRv4_det_infer.onnx").exists()


def test_parallel_fetches_share_one_cache(monkeypatch, tmp_path):
    realmodels.fetch("ppocr_rec")
    wheels = realmodels.cache_dir() / "wheels"
    (wheel,) = wheels.glob("rapidocr_onnxruntime-1.4.4-*.whl")
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copyfile(wheel, cache / "wheels" / wheel.name)
    _offline(monkeypatch, cache)
    code = (
        "from amp_search.testing import realmodels\n"
        "print(realmodels.fetch('ppocr_rec'), realmodels.fetch('ppocr_cls'))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out for out, _ in outs}) == 1
    onnx.checker.check_model(onnx.load(cache / "ch_PP-OCRv4_rec_infer.onnx"))
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def _stacked_run(name: str, n: int | None = None) -> tuple[dict[str, np.ndarray], list[list]]:
    """Runs each batch of a stacked calibration set; returns the feeds and per-batch outputs."""
    feeds = _calibration(name, n)
    sess = ort.InferenceSession(str(realmodels.fetch(name)), providers=["CPUExecutionProvider"])
    count = len(next(iter(feeds.values())))
    return feeds, [sess.run(None, {k: v[b] for k, v in feeds.items()}) for b in range(count)]


def test_ddddocr_reads_the_words_on_the_page():
    feeds, outs = _stacked_run("ddddocr_rec")
    x = feeds["input1"]
    assert x.shape == (6, 1, 1, 64, 320) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0  # x / 255, as ddddocr feeds it
    assert (x[:, 0, 0, :, -1].std(axis=-1) < 1e-6).any()  # a short crop padded with paper
    assert len({b.tobytes() for b in x}) == 6
    assert all(o[0].shape == (40, 1, 8210) for o in outs)  # declared [1, seqlen]: stale
    texts = [realmodels.ddddocr_decode(o[0]) for o in outs]
    assert texts[0] == "Region-based", texts
    expected = {"Region-based", "background", "uhambiguously", "the markers"}
    assert len(expected & set(texts)) >= 3, texts


def test_silero_vad_hears_the_voices_and_not_the_noise():
    feeds, outs = _stacked_run("silero_vad")
    assert feeds["input"].shape == (4, 48, 576)
    assert feeds["h"].shape == feeds["c"].shape == (4, 1, 1, 128) and not feeds["h"].any()
    frames = feeds["input"]
    # Each frame starts with the previous frame's last 64 samples (zeros for the first).
    np.testing.assert_array_equal(frames[:, 1:, :64], frames[:, :-1, -64:])
    assert not frames[:, 0, :64].any()
    assert 0.05 < float(np.abs(frames).max()) <= 1.0
    speech = [int((o[0] > 0.5).sum()) for o in outs]
    # Batches 0, 1, 3: a voice saying "Front Center", "Front Left", "Front Right" (two words
    # each: two runs of speech frames); batch 2: alsa-utils' noise recording, no voice.
    assert speech[2] == 0, speech
    for b in (0, 1, 3):
        assert speech[b] >= 15, speech
        runs = np.flatnonzero(np.diff((outs[b][0] > 0.5).astype(int)) == 1)
        assert len(runs) >= 2, (b, outs[b][0].round(2))
    assert all(o[1].shape == o[2].shape == (1, 1, 128) for o in outs)  # hn, cn


def test_speech_without_apt_is_a_one_line_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("AMP_SEARCH_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # no apt-get, no dpkg-deb
    monkeypatch.setattr(realmodels, "_ALSA_SOUNDS", "nonexistent/sounds/alsa")  # not installed
    with pytest.raises(UserInputError, match="alsa-utils") as err:
        realmodels.calibration("silero_vad", 1)
    assert "\n" not in err.value.message and "apt-get" in err.value.message
    assert not (tmp_path / "cache" / "alsa").exists()
