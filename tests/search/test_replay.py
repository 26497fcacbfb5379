"""The samplers replayed on recorded tables of real models (``amp_search/testing/replay.py``).

The tables are data (``benchmarks/tables/``, from ``benchmarks/tables.py``): the search's own
deterministic objectives for every assignment of a real model grouped to 12 units, or every
answer some real searches got on a model with more units than the guided sampler enumerates.
Replaying needs no model run while the sampler proposes what was recorded: seconds.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from amp_search.keys import ALL_FP16, ALL_FP32
from amp_search.search._guided.candidates import ENUMERATE_MAX_UNITS
from amp_search.testing.replay import ModelEvaluator, Table, replay, seed_trials

TABLES = Path(__file__).resolve().parents[2] / "benchmarks" / "tables"
#: Exhaustive tables (12 units) and the guided sampler's least hypervolume ratio after 60
#: evaluations (issue 13's target is 0.98 on every table).
EXHAUSTIVE = {"ppocr_cls": 0.98, "ppocr_det": 0.98, "ppocr_rec": 0.98, "minilm": 0.98}
#: Where the default does not meet the target yet (issue 13 stays open): what it holds now, so
#: that a change that makes it worse fails; below the target the test reports an xfail, and
#: it passes once a change meets the target. The recognizer: the points that fill a gap in its
#: front (units 0, 2 and 5 FP32, an interaction the first trials do not show) are found after
#: about 100 evaluations, once the GP weighs each unit (0.93 at 60, 0.98 at 120;
#: benchmarks/RESULTS.md); no sampler measured reaches 0.98 there at 60.
NOT_YET = {"ppocr_rec": 0.925}
#: The recorded answers of the ungrouped classifier (99 units: the candidate-pool path).
RECORDED = "ppocr_cls-ungrouped"


def _table(name: str, how: str = "") -> Table:
    path = TABLES / f"{name}.json.gz"
    if not path.is_file():
        pytest.skip(
            f"no table {path.name}: python benchmarks/tables.py {how or '--model ' + name}"
        )
    return Table.load(path)


def _toy_table() -> Table:
    """Four units in a chain: FP16 saves latency per unit, unit 0 carries most of the error."""
    units = ["a", "b", "c", "d"]
    table = Table.exhaustive("toy", units)
    for m in range(16):
        bits = [m >> i & 1 for i in range(4)]
        table.latency[m] = (
            1.0 - 0.1 * sum(bits) + 0.02 * sum(bits[i] != bits[i + 1] for i in range(3))
        )
        table.deviation[m] = 0.0 if m == 0 else 1e-3 * bits[0] + 1e-5 * sum(bits[1:])
    table.deviation[0b1111] = math.inf  # all-FP16 breaks
    table.context = {
        "guide": {
            "version": 1,
            "units": units,
            "edges": [[0, 1], [1, 2], [2, 3]],
            "unit_error": [1e-3, 1e-5, 1e-5, 1e-5],
            "latency": None,
        },
        "risk_order": ["a", "b", "c", "d"],
        "critical": [],
        "locked": [],
    }
    return table


def test_table_file_round_trip(tmp_path):
    table = _toy_table()
    table.meta = {"note": "x"}
    back = Table.load(table.save(tmp_path / "toy.json.gz"))
    assert back.units == table.units and back.is_exhaustive and back.complete
    np.testing.assert_array_equal(back.latency, table.latency)
    np.testing.assert_array_equal(back.deviation, table.deviation)
    assert back.context == table.context and back.meta == {"note": "x"}
    assert back.lookup(0b1111) == (table.latency[15], math.inf)
    # A recorded (sparse) table keeps its masks.
    sparse = Table("toy", ["a"] * 20, np.zeros(0, dtype=object), np.zeros(0), np.zeros(0))
    sparse.row(0)
    sparse.add(1 << 19, 0.5, 1e-3)
    again = Table.load(sparse.save(tmp_path / "sparse.json.gz"))
    assert not again.is_exhaustive and again.lookup(1 << 19) == (0.5, 1e-3)
    assert again.lookup(1) is None


@pytest.mark.parametrize("sampler", ["guided", "tpe", "nsga2", "random"])
def test_replay_is_the_search_loop(sampler):
    table = _toy_table()
    r = replay(table, sampler, budget=10, seed=0)
    seeds = seed_trials(table, sampler)
    # The seeds come first, in the search's order; then distinct evaluations up to the budget.
    assert [table.fp32_units(m) for m in r.masks[: len(seeds)]] == [
        sorted(u for u, p in params.items() if p == "fp32") for _, params in seeds
    ]
    assert seeds[0][0] == ALL_FP32 and seeds[1][0] == ALL_FP16
    assert len(r.masks) == len(set(r.masks)) == 10 and r.trials >= 10 and not r.misses
    assert r.values == [table.lookup(m) for m in r.masks]
    space = table.space()
    curve = r.curve(space)
    assert curve == sorted(curve) and 0 < curve[-1] <= 1.0 + 1e-12
    # Deterministic for a given seed.
    assert replay(table, sampler, budget=10, seed=0).masks == r.masks


def test_replay_asks_for_what_the_table_lacks():
    table = _toy_table()
    keep = [0, 0b1111, 0b0001, 0b0011]
    sparse = Table("toy", table.units, np.array(keep, dtype=object), table.latency[keep],
                   table.deviation[keep], table.context)  # fmt: skip
    with pytest.raises(KeyError, match="not in the toy table"):
        replay(sparse, "random", budget=8, seed=0)
    asked: list[int] = []

    def evaluate(mask: int) -> tuple[float, float]:
        asked.append(mask)
        return table.lookup(mask)  # type: ignore[return-value]

    r = replay(sparse, "random", budget=8, seed=0, evaluate=evaluate)
    assert r.misses == asked and set(asked).isdisjoint(keep) and len(r.masks) == 8


@pytest.mark.parametrize("model", sorted(EXHAUSTIVE))
def test_guided_sampler_on_an_exhaustive_table(model):
    """Issue 13's bar on a real model's whole space: the default sampler after 60 evaluations."""
    table = _table(model)
    assert table.is_exhaustive and table.complete and len(table.units) == 12
    r = replay(table, "guided", budget=60, seed=0)
    assert not r.misses and len(r.masks) == 60
    ratio = r.ratio(table.space())
    assert ratio >= NOT_YET.get(model, EXHAUSTIVE[model]), f"{model}: {ratio:.4f} after 60"
    if model in NOT_YET and ratio < EXHAUSTIVE[model]:
        pytest.xfail(f"issue 13: {model} at {ratio:.4f} after 60, target {EXHAUSTIVE[model]}")


@pytest.mark.slow
def test_guided_sampler_keeps_rising_on_the_recognizer():
    """Issue 13's "no plateau": on the recognizer the default flattened at 0.944 from its 30th
    evaluation to its 250th; with a relevance weight per unit it passes 0.98 by 250 (~20 s)."""
    table = _table("ppocr_rec")
    r = replay(table, "guided", budget=250, seed=0)
    curve = r.curve(table.space())
    assert curve[-1] >= 0.98, f"ppocr_rec: {curve[-1]:.4f} after 250"
    assert curve[-1] > curve[59] + 0.03


def test_guided_sampler_beyond_enumeration():
    """More units than the guided sampler enumerates (its candidate pool and its TPE share):
    the ungrouped classifier's recorded answers, against the best front that every recorded
    search together found (issue 13: at least 0.95 of it after 120 evaluations).

    A proposal the recording lacks (the sampler changed) is evaluated for real with the same
    objectives (the classifier takes ~0.2 s an assignment) and reported: record again with
    ``python benchmarks/tables.py --record --model ppocr_cls --units 0 --budgets guided:120``.
    """
    table = _table(RECORDED, "--record --model ppocr_cls --units 0")
    assert len(table.units) > ENUMERATE_MAX_UNITS
    evaluator: list[ModelEvaluator] = []

    def evaluate(mask: int) -> tuple[float, float]:
        if not evaluator:
            import tempfile

            evaluator.append(
                ModelEvaluator.from_real_model("ppocr_cls", None, Path(tempfile.mkdtemp()))
            )
            assert evaluator[0].names == table.units, "the model's units changed: record again"
        return evaluator[0].evaluate(mask)

    r = replay(table, "guided", budget=BEYOND_BUDGET, seed=0, evaluate=evaluate)
    if r.misses:
        warnings.warn(
            f"{len(r.misses)} of {BEYOND_BUDGET} proposals were not recorded and were evaluated "
            "for real (the guided sampler changed): record again with python "
            "benchmarks/tables.py --record --model ppocr_cls --units 0 --budgets guided:120",
            stacklevel=1,
        )
    ratio = r.ratio(table.space())
    assert ratio >= BEYOND_MIN_RATIO, f"hypervolume ratio {ratio:.4f} of the best known front"


#: Evaluations, and the least share of the best-known front after them (issue 13's target).
BEYOND_BUDGET = 120
BEYOND_MIN_RATIO = 0.95


def test_a_locked_unit_is_outside_the_table_space():
    table = _toy_table()
    table.context["locked"] = ["a"]
    table.context["guide"] = None  # the guide has no locked unit: TPE stands in
    table.latency[1::2] = np.nan  # rows with "a" FP16 need no computing
    table.deviation[1::2] = np.nan
    assert table.complete and table.reachable.sum() == 8
    space = table.space()
    assert all(not m & 1 for m in space.front_idx)
    r = replay(table, "tpe", budget=8, seed=0)
    assert sorted(r.masks) == list(range(0, 16, 2))
