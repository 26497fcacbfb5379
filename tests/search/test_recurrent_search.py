"""The search end to end on real Conv+LSTM models, their LSTM among the units (issue 12).

Silero VAD (Conv STFT + Conv encoder + LSTM, recorded speech) and ddddocr's text recognizer
(Conv/SiLU backbone + bidirectional LSTM + Gemm, page crops; it declares its output rank 2
and returns rank 3), searched on ONNX Runtime CPU with the latency estimated: every trial
completes (every candidate loads and runs), the LSTM is a parameter that some evaluated
candidate sets to FP16, nothing is left unsearched, and each candidate model on disk passes
``check_model(full_check=True)``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from optuna.trial import TrialState

from amp_search.search import SearchConfig, run_search

CASES = [
    pytest.param("silero_vad", 4, 10, id="silero_vad"),
    pytest.param("ddddocr_rec", 2, 6, id="ddddocr_rec"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "n_batches", "n_trials"), CASES)
def test_search_of_a_real_lstm_model(name, n_batches, n_trials, real_model, tmp_path):
    path, feeds = real_model(name, n_batches)
    data = tmp_path / f"{name}.npz"
    np.savez(data, **feeds)
    out = tmp_path / "out"
    outcome = run_search(SearchConfig(
        model=path, out=out, data=data, n_trials=n_trials, storage=":memory:",
        study_name=name, latency="estimated", target="h200", seed=0,
        options={"intra_op_num_threads": 1},
    ))  # fmt: skip

    trials = outcome.study.trials
    assert outcome.n_failed == 0 and not outcome.interrupted
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(trials)
    assert outcome.n_complete >= n_trials

    run = json.loads((out / "run.json").read_text())
    lstm = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node
            if n.op_type == "LSTM"]  # fmt: skip
    assert len(lstm) == 1 and lstm[0] in run["units"]
    assert json.loads((out / "inspect.json").read_text())["not_searched"] == []
    fp16_lstm = [t for t in trials if t.params.get(lstm[0]) == "fp16"]
    assert fp16_lstm, "no evaluated candidate put the LSTM in FP16"
    assert all(math.isfinite(t.values[1]) for t in fp16_lstm)  # finite outputs, a deviation

    candidates = sorted((out / "candidates").glob("*/model.onnx"))
    assert len(candidates) >= 3  # all-FP32, all-FP16 and searched ones
    for candidate in candidates:
        model = onnx.load(str(candidate))
        onnx.checker.check_model(model, full_check=True)
