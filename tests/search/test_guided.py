"""The guided sampler: its guide, its numerics, and a guided search on the demo model."""

from __future__ import annotations

import json
import math

import numpy as np
import optuna
import pytest

from amp_search.graph import MixedPrecisionRewriter, find_units, sanitize
from amp_search.keys import GUIDE_ATTR, SEEDED_ATTR
from amp_search.profiling.ranges import UnitDeviation
from amp_search.profiling.sensitivity import UnitRisk
from amp_search.search import SearchConfig, run_search
from amp_search.search._guided.acquisition import expected_hvi, nondominated
from amp_search.search._guided.candidates import all_rows
from amp_search.search._guided.guide import build_guide, load_guide, own_errors
from amp_search.search._guided.latency import LatencySurrogate
from amp_search.search.guided import GuidedSampler, propose
from amp_search.search.sampler import make_tpe
from amp_search.search.seeds import PREFIXES, enqueue_seeds, seed_params
from amp_search.search.space import SearchSpace


def _risk(name, feeders, rel_l2, nonfinite=0):
    from amp_search.graph.units import Unit

    unit = Unit(name=name, nodes=(name,), op_types=("Conv",), outputs=(f"{name}/y",),
                weights=(), feeders=tuple(feeders))  # fmt: skip
    dev = UnitDeviation(unit=name, rel_l2=rel_l2, nonfinite=nonfinite, numel=10)
    return UnitRisk(unit=unit, deviation=dev)


def test_own_error_is_what_a_unit_adds_to_its_inputs():
    risks = [
        _risk("a", [], 3e-3),
        _risk("b", ["a"], 5e-3),  # adds sqrt(5^2 - 3^2) = 4e-3
        _risk("c", ["b"], 4e-3),  # the error shrank: adds nothing
        _risk("d", ["c"], math.inf, nonfinite=3),  # breaks here
        _risk("e", ["d"], math.inf, nonfinite=3),  # inherits inf: unknown, 0
    ]
    got = own_errors(risks, ["a", "b", "c", "d", "e"])
    assert got == pytest.approx([3e-3, 4e-3, 0.0, 1.0, 0.0])
    assert own_errors([UnitRisk(unit=r.unit) for r in risks], ["a"]) is None


def test_latency_model_is_the_estimator_on_the_demo_model(demo_data_path):
    from amp_search.calibration import load_calibration, model_inputs
    from amp_search.demo import build_demo_model
    from amp_search.latency_model import LatencyEstimator
    from amp_search.types import PrecisionAssignment

    model = sanitize(build_demo_model())
    units = find_units(model)
    data = load_calibration(demo_data_path, model_inputs(model))
    shapes = {k: tuple(v.shape) for k, v in data.first().items()}
    estimator = LatencyEstimator(model, shapes, target="h100")
    rewriter = MixedPrecisionRewriter(model, units)
    space = SearchSpace([u.name for u in units])
    risks = [UnitRisk(unit=u) for u in units]
    calls = []

    def estimate(a: PrecisionAssignment) -> float:
        calls.append(a)
        return estimator.estimate_assignment(rewriter, a)

    guide = build_guide(space, risks, estimate)
    n, edges = len(units), [tuple(e) for e in guide["edges"]]
    assert len(calls) <= 2 + n + len(edges)  # none, all, each unit, each fed pair
    assert guide["unit_error"] is None  # no FP16 pass in these risks
    model_ = LatencySurrogate(n, edges, guide["latency"]["coef"])
    rng = np.random.default_rng(0)
    rows = (rng.random((25, n)) < rng.random((25, 1))).astype(np.uint8)
    for row in rows:
        a = PrecisionAssignment.with_fp16(
            space.free, [u for u, b in zip(space.free, row, strict=True) if b]
        )
        want = estimator.estimate_assignment(rewriter, a)
        assert model_.predict(row[None])[0] == pytest.approx(want, rel=1e-9)


@pytest.mark.slow
def test_expected_hvi_matches_sampling():
    rng = np.random.default_rng(1)
    front = nondominated([(1.0, -2.0), (2.0, -3.0), (3.0, -5.0), (2.5, -2.5)])
    ref, floor = (4.0, -1.0), -6.0
    x = np.array([0.5, 1.5, 2.2, 3.5, 4.5])
    mu = np.array([-1.5, -3.5, -2.0, -5.5, -3.0])
    sd = np.array([0.5, 1.0, 0.3, 0.8, 1.0])
    got = expected_hvi(x, mu, sd, front, ref, floor)

    def improvement(px: float, py: float) -> float:
        py = max(py, floor)
        total = 0.0
        levels = np.linspace(py, ref[1], 2001)
        for lo, hi in zip(levels[:-1], levels[1:], strict=True):
            t = 0.5 * (lo + hi)
            bound = min([p[0] for p in front if p[1] <= t] + [ref[0]])
            total += max(0.0, bound - px) * (hi - lo)
        return total

    for k in range(len(x)):
        ys = rng.normal(mu[k], sd[k], 400)
        mc = np.mean([improvement(x[k], y) for y in ys])
        assert got[k] == pytest.approx(mc, rel=0.15, abs=2e-3)
    assert got[4] == 0.0  # past the reference point: nothing to gain


def test_propose_never_repeats_and_follows_the_latency_model():
    units = ["a", "b", "c", "d"]
    guide = {"version": 1, "units": units, "edges": [[0, 1], [1, 2], [2, 3]],
             "unit_error": [1e-3, 1e-4, 1e-4, 1e-3],
             "latency": {"coef": [10.0, -2.0, -2.0, -2.0, -2.0, 0.1, 0.1, 0.1]}}  # fmt: skip
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.set_user_attr(GUIDE_ATTR, guide)
    model = LatencySurrogate(4, [(0, 1), (1, 2), (2, 3)], guide["latency"]["coef"])
    dist = {u: optuna.distributions.CategoricalDistribution(("fp32", "fp16")) for u in units}
    rng = np.random.default_rng(0)

    def deviation(row: np.ndarray) -> float:
        e = np.array(guide["unit_error"])
        return float(np.sqrt((row * e**2).sum()))

    seen = set()
    for k in range(16):
        row = propose(guide, study.get_trials(deepcopy=False), -1, rng)
        if k < 16 - 1:
            assert row is not None
        if row is None:
            break
        assert row.tobytes() not in seen
        seen.add(row.tobytes())
        params = {u: ("fp16" if b else "fp32") for u, b in zip(units, row, strict=True)}
        values = [float(model.predict(row[None])[0]), deviation(row)]
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dist,
                                                  values=values))  # fmt: skip
    assert len(seen) == 16 and all_rows(4).shape[0] == 16
    # Exhausted: nothing left to propose.
    assert propose(guide, study.get_trials(deepcopy=False), -1, rng) is None


def test_without_a_guide_the_guided_sampler_is_tpe():
    # Past TPE's 10 random startup trials (whose sequence is RandomSampler(seed)'s), a study
    # without a guide gets exactly what --sampler tpe proposes, and not random rows.
    cost = {f"u{i}": (1.0 + i, 10.0 ** -(i + 2)) for i in range(5)}  # FP16 saves, FP16 costs

    def objective(trial):
        fp16 = [u for u in cost if trial.suggest_categorical(u, ("fp32", "fp16")) == "fp16"]
        return 20.0 - sum(cost[u][0] for u in fp16), sum(cost[u][1] for u in fp16)

    def proposals(sampler):
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        study.optimize(objective, n_trials=16)
        assert load_guide(study) is None
        return [t.params for t in study.trials]

    guided = proposals(GuidedSampler(0))
    assert guided == proposals(make_tpe(0))
    random = proposals(optuna.samplers.RandomSampler(seed=0))
    assert guided[:10] == random[:10]
    assert guided[10:] != random[10:]


@pytest.mark.slow
def test_guided_search_on_the_demo_model(tmp_path, demo_model_path, demo_data_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    config = SearchConfig(
        model=demo_model_path, out=tmp_path / "out", data=demo_data_path, n_trials=18,
        storage=storage, study_name="g", latency="estimated", seed=0, sampler="guided",
    )  # fmt: skip
    outcome = run_search(config)
    study = optuna.load_study(study_name="g", storage=storage)
    assert study.user_attrs[SEEDED_ATTR] is True
    guide = study.user_attrs[GUIDE_ATTR]
    assert guide["latency"]["max_fit_error_ms"] < 1e-9  # the demo is a chain: exact
    assert guide["unit_error"][guide["units"].index("amp4/Conv")] == 1.0  # its FP16 is inf
    seeded = [t for t in study.trials if "seed" in t.user_attrs]
    labels = [t.user_attrs["seed"] for t in seeded]
    assert labels == ["all-fp32", "all-fp16", "all-fp16-safe"] + [
        f"prefix-{k}" for k in PREFIXES
    ]  # once each
    # Every seed but all-FP16 keeps the overflowing unit FP32; the prefix sweep holds
    # points the risk ladder does not (it keeps the first units FP32, the ladder the riskiest).
    assert all(
        t.params["amp4/Conv"] == "fp32" for t in seeded if t.user_attrs["seed"] != "all-fp16"
    )
    report = json.loads((outcome.out / "inspect.json").read_text())
    order = [r["unit"] for r in report["units_by_risk"]]
    ladder = {tuple(sorted(p.items())) for _, p in seed_params(SearchSpace(guide["units"]), order)}
    sweep = {tuple(sorted(t.params.items())) for t in seeded if "prefix" in t.user_attrs["seed"]}
    assert len(sweep - ladder) >= 4
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    keys = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(keys)) == len(keys) == outcome.n_complete >= 18  # never a repeat
    # The proposals keep amp4 FP32 (its FP16 gave inf) and are neither seeds nor ladder rungs.
    proposed = [t for t in done if "seed" not in t.user_attrs]
    assert len(proposed) >= 10
    assert not {tuple(sorted(t.params.items())) for t in proposed} & ladder
    assert sum(t.params["amp4/Conv"] == "fp32" for t in proposed) >= len(proposed) - 1
    assert all("amp4/Conv" in p.fp32_units for p in outcome.front)
    assert len(outcome.front) >= 5
    # Resuming the study neither seeds it again nor repeats an assignment.
    run_search(SearchConfig(**{**config.__dict__, "n_trials": 21}))
    study = optuna.load_study(study_name="g", storage=storage)
    assert sum("seed" in t.user_attrs for t in study.trials) == len(labels)
    done = [tuple(sorted(t.params.items())) for t in study.trials if t.state.name == "COMPLETE"]
    assert len(set(done)) == len(done) >= 21


def test_seeds_are_enqueued_once(tmp_path):
    space = SearchSpace(["a", "b", "c", "d"])
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=GuidedSampler(0))
    risks = [_risk(u, [], 1e-3) for u in space.units]
    assert enqueue_seeds(study, space, ["d", "c", "b", "a"], risks=risks) == 5  # prefix 1-3
    assert enqueue_seeds(study, space, ["d", "c", "b", "a"], risks=risks) == 0
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 5
    assert study.user_attrs[GUIDE_ATTR]["latency"] is None  # no estimator: learnt from trials
    tpe = optuna.create_study(directions=["minimize", "minimize"])
    assert enqueue_seeds(tpe, space, ["d", "c", "b", "a"], risks=risks) == 4  # full ladder
    assert GUIDE_ATTR not in tpe.user_attrs


def test_seeds_count_toward_the_target_and_a_larger_one_enqueues_the_rest():
    space = SearchSpace(["a", "b", "c", "d"])
    risks = [_risk(u, [], 1e-3) for u in space.units]
    order = ["d", "c", "b", "a"]
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=GuidedSampler(0))
    labels = [label for label, _ in seed_params(space, order, prefixes=PREFIXES)]
    # Not the creator: a study nobody seeded is left to the run that made it.
    assert enqueue_seeds(study, space, order, risks=risks, limit=2, resume=True) == 0
    assert enqueue_seeds(study, space, order, risks=risks, limit=2) == 2
    assert study.user_attrs[SEEDED_ATTR] == 2 and GUIDE_ATTR in study.user_attrs

    def waiting():
        return [t.user_attrs["seed"] for t in study.get_trials(
            states=(optuna.trial.TrialState.WAITING,))]  # fmt: skip

    assert waiting() == labels[:2]  # in their order: all-FP32, all-FP16
    assert enqueue_seeds(study, space, order, risks=risks, limit=2, resume=True) == 0
    assert enqueue_seeds(study, space, order, risks=risks, limit=4, resume=True) == 2
    assert enqueue_seeds(study, space, order, risks=risks, limit=60, resume=True) == 1
    assert waiting() == labels == ["all-fp32", "all-fp16", "prefix-1", "prefix-2", "prefix-3"]
    assert study.user_attrs[SEEDED_ATTR] is True
    assert enqueue_seeds(study, space, order, risks=risks, limit=60, resume=True) == 0


@pytest.mark.slow
def test_n_trials_counts_the_seeds_and_a_resume_runs_up_to_the_new_target(
    tmp_path, demo_model_path, demo_data_path
):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    config = SearchConfig(
        model=demo_model_path, out=tmp_path / "out", data=demo_data_path, n_trials=3,
        storage=storage, study_name="n", latency="estimated", seed=0,
    )  # fmt: skip
    counts = []
    outcome = run_search(config, progress=lambda ev: counts.append(ev["done"]))
    assert outcome.n_trials == outcome.n_complete == 3 and counts == [1, 2, 3]
    study = optuna.load_study(study_name="n", storage=storage)
    assert [t.user_attrs.get("seed") for t in study.trials] == [
        "all-fp32", "all-fp16", "all-fp16-safe"
    ]  # the first seeds, in their order  # fmt: skip
    # Resumed with a larger target: the rest of the seeds first, then the sampler's own.
    outcome = run_search(SearchConfig(**{**config.__dict__, "n_trials": 12}))
    study = optuna.load_study(study_name="n", storage=storage)
    assert outcome.n_trials == outcome.n_complete == len(study.trials) == 12
    seeds = [t.user_attrs.get("seed") for t in study.trials if "seed" in t.user_attrs]
    assert seeds == ["all-fp32", "all-fp16", "all-fp16-safe"] + [f"prefix-{k}" for k in PREFIXES]
    # The same command again: the study holds its target; nothing more runs.
    assert run_search(SearchConfig(**{**config.__dict__, "n_trials": 12})).n_trials == 12


@pytest.mark.slow
def test_guided_search_with_measured_latency(tmp_path, demo_model_path, demo_data_path):
    """The GPU default (measured latency) has no estimator: the latency model learns from the
    trials, and the sampler still proposes new assignments past the seeds."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    config = SearchConfig(
        model=demo_model_path, out=tmp_path / "out", data=demo_data_path, n_trials=14,
        storage=storage, study_name="m", latency="measured", timing_max_s=0.5, seed=1,
    )  # fmt: skip
    assert config.sampler == "guided"  # the default
    outcome = run_search(config)
    study = optuna.load_study(study_name="m", storage=storage)
    assert study.user_attrs[GUIDE_ATTR]["latency"] is None
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    keys = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(keys)) == len(keys) == outcome.n_complete >= 14
    assert sum("seed" not in t.user_attrs for t in done) >= 4
    assert outcome.front
    # The search evaluates the sampler's proposal while Optuna writes the parameters: the
    # proposal (trial.relative_params, all units at once) is what the suggestions return.
    from amp_search.search.space import SearchSpace

    study = optuna.load_study(study_name="m", storage=storage, sampler=GuidedSampler(seed=3))
    space = SearchSpace(study.user_attrs[GUIDE_ATTR]["units"])
    for _ in range(3):
        trial = study.ask()
        early = space.proposed(trial)
        assert early is not None and early == space.suggest(trial)
        assert early.digest() not in {space.assignment(t.params).digest() for t in done}
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


@pytest.mark.slow
def test_an_enqueued_trial_is_evaluated_as_enqueued(
    tmp_path, demo_model_path, demo_data_path, caplog
):
    """A trial someone enqueued (fixed parameters, no seed label) differs from the sampler's
    proposal, which the search starts evaluating early: the enqueued assignment still wins."""
    from amp_search.record import TrialRecord
    from amp_search.search.space import SearchSpace

    storage = f"sqlite:///{tmp_path / 's.db'}"
    config = SearchConfig(
        model=demo_model_path, out=tmp_path / "out", data=demo_data_path, n_trials=12,
        storage=storage, study_name="e", latency="estimated", seed=0,
    )  # fmt: skip
    run_search(config)
    study = optuna.load_study(study_name="e", storage=storage)
    space = SearchSpace(study.user_attrs[GUIDE_ATTR]["units"])
    want = space.params([u for u in space.free if u not in ("amp4/Conv", "tiny/Conv", "fc/Gemm")])
    assert space.assignment(want).digest() not in {
        TrialRecord.from_trial(t).digest for t in study.trials if t.state.name == "COMPLETE"
    }
    study.enqueue_trial(want)
    with caplog.at_level("DEBUG", logger="amp_search.search._optimize"):
        run_search(SearchConfig(**{**config.__dict__, "n_trials": 13}))
    assert "differ from the sampler's proposal" in caplog.text  # the early guess was wrong
    study = optuna.load_study(study_name="e", storage=storage)
    (trial,) = [t for t in study.trials if t.params == want]
    assert trial.state.name == "COMPLETE"
    assert TrialRecord.from_trial(trial).digest == space.assignment(want).digest()
    metrics = json.loads(
        (tmp_path / "out" / "candidates" / space.assignment(want).digest() / "metrics.json")
        .read_text()
    )  # fmt: skip
    assert trial.values[1] == pytest.approx(metrics["deviation"])


def test_trials_since_front_moved_counts_trials_that_left_the_front_alone():
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from amp_search.search.guided import trials_since_front_moved

    dist = {"u": CategoricalDistribution(("fp32", "fp16"))}

    def t(number, lat, dev, infeasible=False):
        attrs = {"constraints:finite_outputs": 1.0 if infeasible else 0.0}
        trial = create_trial(
            params={"u": "fp32"}, distributions=dist, values=[lat, dev], system_attrs=attrs
        )
        trial.number = number
        return trial

    assert trials_since_front_moved([]) == 0
    trials = [t(0, 1.0, 0.0), t(1, 0.5, 1e-2), t(2, 0.6, 2e-2), t(3, 0.7, math.inf)]
    assert trials_since_front_moved(trials) == 2  # dominated, then non-finite
    trials.append(t(4, 0.55, 1e-3, infeasible=True))  # would join, but is infeasible
    assert trials_since_front_moved(trials) == 3
    trials.append(t(5, 0.8, 1e-4))  # joins between the two ends
    assert trials_since_front_moved(trials) == 0
