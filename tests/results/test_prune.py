"""--keep-models front on a real search of the demo model: what is removed, what still works."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from amp_search.errors import UserInputError
from amp_search.record import TrialRecord
from amp_search.results.prune import dominated_digests
from amp_search.results.report import copy_candidate, load_results, pick_point
from amp_search.search import SearchConfig, run_search


def _config(tmp_path, model, data, **kw):
    base = dict(
        model=model, out=tmp_path / "out", data=data, n_trials=14, latency="measured", seed=0,
        storage=str(tmp_path / "study.journal"), study_name="p", keep_models="front",
    )  # fmt: skip
    base.update(kw)
    return SearchConfig(**base)


@pytest.mark.slow
def test_front_keeps_the_models_anyone_would_pick(tmp_path, demo_model_path, demo_data_path):
    outcome = run_search(_config(tmp_path, demo_model_path, demo_data_path))
    study = outcome.study
    dominated = dominated_digests(study)
    folders = {p.name: p for p in (outcome.out / "candidates").iterdir()}
    assert dominated and set(folders) - dominated  # some pruned, some kept
    for digest, folder in folders.items():
        files = {p.name for p in folder.iterdir()}
        if digest in dominated:
            assert files == {"precision.json"}, files  # what it was, nothing else
        else:
            assert {"model.onnx", "precision.json", "metrics.json"} <= files, files
    results = load_results(outcome.out)
    kept = [p.digest for p in results.front]
    kept += [b["digest"] for b in results.baselines.values()]  # both seeds, whatever they scored
    assert all((folders[d] / "model.onnx").is_file() for d in kept)
    point = pick_point(results, max_deviation=1e-3)
    assert copy_candidate(results, point, tmp_path / "picked")[0].stat().st_size > 0

    # Resumed, a pruned assignment proposed again is answered from its trial: not rebuilt,
    # and its folder stays pruned.
    beaten = next(t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if TrialRecord.from_trial(t).digest in dominated)  # fmt: skip
    study.enqueue_trial(dict(beaten.params))
    again = run_search(_config(tmp_path, demo_model_path, demo_data_path))
    last = again.study.get_trials(deepcopy=False)[-1]
    assert last.params == beaten.params and last.user_attrs.get("duplicate") is True
    assert TrialRecord.from_trial(last).cached is True and last.values == beaten.values
    folder = outcome.out / "candidates" / TrialRecord.from_trial(beaten).digest
    assert {p.name for p in folder.iterdir()} == {"precision.json"}


@pytest.mark.slow
def test_all_keeps_every_model_and_a_bad_choice_is_refused(
    tmp_path, demo_model_path, demo_data_path
):
    outcome = run_search(_config(tmp_path, demo_model_path, demo_data_path, n_trials=8,
                                 keep_models="all"))  # fmt: skip
    folders = list((outcome.out / "candidates").iterdir())
    assert folders and all((f / "model.onnx").is_file() for f in folders)
    with pytest.raises(UserInputError, match="--keep-models must be one of all, front"):
        run_search(_config(tmp_path / "b", demo_model_path, demo_data_path, keep_models="best"))
