"""Built-in objectives, the Objective protocol, and load_metric (names and user files)."""

from __future__ import annotations

import math
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

from amp_search.errors import UserInputError
from amp_search.objective import (
    BUILTIN_OBJECTIVES,
    ENTRY_POINT_GROUP,
    EvalContext,
    FunctionObjective,
    Objective,
    load_deviation_metric,
    load_metric,
)
from amp_search.types import LatencyStats
from objectives import (
    CosineDistance,
    LatencyObjective,
    MaxAbs,
    MeanAbs,
    RelativeL2,
    Top1Disagreement,
)


def ctx(ref: list[dict[str, np.ndarray]], out: list[dict[str, np.ndarray]]) -> EvalContext:
    return EvalContext(reference=ref, outputs=out, latency=None, assignment=None, output_names=[])


def one(ref: list[float], out: list[float]) -> EvalContext:
    return ctx([{"y": np.array(ref, np.float32)}], [{"y": np.array(out, np.float32)}])


# --- each built-in on hand-computed arrays -------------------------------------------------


def test_rel_l2_by_hand():
    # ref = [3, 4] (norm 5), diff = [0, 1] (norm 1) -> 0.2
    assert RelativeL2().evaluate(one([3, 4], [3, 5])) == pytest.approx(0.2)
    assert RelativeL2().evaluate(one([3, 4], [3, 4])) == 0.0


def test_rel_l2_is_float64():
    # float32 would lose a 1e-9 relative difference entirely
    ref = np.full(1000, 1.0, np.float64)
    out = ref + 1e-9
    c = ctx([{"y": ref}], [{"y": out}])
    assert RelativeL2().evaluate(c) == pytest.approx(1e-9, rel=1e-3)


def test_rel_l2_zero_reference_falls_back_to_absolute():
    assert RelativeL2().evaluate(one([0, 0], [3, 4])) == pytest.approx(5.0)


def test_max_abs_and_mean_abs_by_hand():
    c = one([1, 2, 3, 4], [1.5, 2, 1, 4])  # |diff| = [0.5, 0, 2, 0]
    assert MaxAbs().evaluate(c) == pytest.approx(2.0)
    assert MeanAbs().evaluate(c) == pytest.approx(2.5 / 4)


def test_cosine_by_hand():
    assert CosineDistance().evaluate(one([1, 0], [0, 1])) == pytest.approx(1.0)
    assert CosineDistance().evaluate(one([1, 0], [-1, 0])) == pytest.approx(2.0)
    assert CosineDistance().evaluate(one([1, 1], [2, 2])) == pytest.approx(0.0, abs=1e-12)
    # cos 45 degrees
    assert CosineDistance().evaluate(one([1, 0], [1, 1])) == pytest.approx(1 - math.sqrt(0.5))
    assert CosineDistance().evaluate(one([0, 0], [0, 0])) == 0.0


def test_top1_on_classifier_logits():
    ref = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
    out = np.array([[0.2, 0.8, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 4.0], [3.0, 1.0, 2.0]])
    c = ctx([{"logits": ref}], [{"logits": out}])
    assert Top1Disagreement().evaluate(c) == pytest.approx(0.5)  # rows 1 and 3 flip
    # Leading axes are rows: [2 batches, 2 tokens, vocab]
    c3 = ctx([{"logits": ref.reshape(2, 2, 3)}], [{"logits": out.reshape(2, 2, 3)}])
    assert Top1Disagreement().evaluate(c3) == pytest.approx(0.5)


# --- aggregation ------------------------------------------------------------------------


def test_batches_are_concatenated_not_averaged():
    # batch 0: ref [3, 4], out [3, 4]   (no error)
    # batch 1: ref [0, 1], out [0, 2]   (rel error 1.0 on its own)
    # all: ||[0,0,0,1]|| / ||[3,4,0,1]|| = 1 / sqrt(26); a mean of per-batch values is 0.5
    ref = [{"y": np.array([3.0, 4.0])}, {"y": np.array([0.0, 1.0])}]
    out = [{"y": np.array([3.0, 4.0])}, {"y": np.array([0.0, 2.0])}]
    assert RelativeL2().evaluate(ctx(ref, out)) == pytest.approx(1 / math.sqrt(26))
    assert MaxAbs().evaluate(ctx(ref, out)) == pytest.approx(1.0)
    assert MeanAbs().evaluate(ctx(ref, out)) == pytest.approx(0.25)


def test_top1_counts_rows_over_all_batches():
    ref = [{"p": np.eye(3)}, {"p": np.eye(3)}]
    out = [{"p": np.eye(3)}, {"p": np.eye(3)[[1, 0, 2]]}]  # 2 of 6 rows differ
    assert Top1Disagreement().evaluate(ctx(ref, out)) == pytest.approx(2 / 6)


def test_multi_output_models_score_the_worst_output():
    ref = [{"a": np.array([1.0, 0.0]), "b": np.array([10.0, 0.0])}]
    out = [{"a": np.array([1.1, 0.0]), "b": np.array([10.0, 5.0])}]
    c = ctx(ref, out)
    assert RelativeL2().evaluate(c) == pytest.approx(0.5)  # b: 5/10 beats a: 0.1/1
    assert MaxAbs().evaluate(c) == pytest.approx(5.0)
    c.output_names = ["a"]
    assert RelativeL2().evaluate(c) == pytest.approx(0.1)


# --- non-finite outputs -----------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("metric", [RelativeL2, MaxAbs, MeanAbs, CosineDistance, Top1Disagreement])
def test_non_finite_outputs_score_inf(metric, bad):
    ref = [{"y": np.ones((2, 3))}, {"y": np.ones((2, 3))}]
    out = [{"y": np.ones((2, 3))}, {"y": np.ones((2, 3))}]
    out[1]["y"][1, 2] = bad  # only in the last batch
    assert metric().evaluate(ctx(ref, out)) == math.inf


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="shape"):
        RelativeL2().evaluate(ctx([{"y": np.ones(3)}], [{"y": np.ones(4)}]))
    with pytest.raises(ValueError, match="batches"):
        RelativeL2().evaluate(ctx([{"y": np.ones(3)}] * 2, [{"y": np.ones(3)}]))


# --- latency ------------------------------------------------------------------------------


def test_latency_objective_reads_the_median():
    stats = LatencyStats(1.5, 2.0, 1.6, 1.2, 10, 3, "estimated:h100")
    c = EvalContext(reference=[], outputs=[], latency=stats, assignment=None, output_names=[])
    obj = LatencyObjective()
    assert (obj.name, obj.direction, obj.needs) == ("latency_ms", "minimize", {"latency"})
    assert obj.evaluate(c) == 1.5
    with pytest.raises(ValueError, match="latency"):
        obj.evaluate(one([1.0], [1.0]))


def test_builtins_satisfy_the_protocol():
    for cls in (RelativeL2, MaxAbs, MeanAbs, CosineDistance, Top1Disagreement):
        obj = cls()
        assert isinstance(obj, Objective)
        assert obj.direction == "minimize"
        assert obj.needs == frozenset({"outputs"})
    names = [c().name for c in (RelativeL2, MaxAbs, MeanAbs, CosineDistance, Top1Disagreement)]
    assert names == ["rel_l2", "max_abs", "mean_abs", "cosine", "top1"]


# --- load_metric ---------------------------------------------------------------------------


def test_load_metric_builtin_names():
    rel = load_metric("rel_l2")
    assert isinstance(rel, RelativeL2)
    for name in ("rel_l2", "max_abs", "mean_abs", "cosine", "top1", "latency_ms"):
        assert load_metric(name).name == name


def test_entry_points_match_the_fallback_table():
    registered = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert registered == BUILTIN_OBJECTIVES


def test_fallback_table_resolves_without_entry_points():
    from amp_search.objective import _import_ref, _instantiate

    for name, ref in BUILTIN_OBJECTIVES.items():
        assert _instantiate(_import_ref(ref), name).name == name


def test_user_function_metric(tmp_path: Path):
    path = tmp_path / "my_metric.py"
    path.write_text(
        "import numpy as np\n"
        "def worst_ratio(reference, output):\n"
        "    return float(np.max(np.abs(output - reference)) / np.max(np.abs(reference)))\n"
    )
    obj = load_metric(f"{path}:worst_ratio")
    assert isinstance(obj, FunctionObjective)
    assert (obj.name, obj.direction, obj.needs) == ("worst_ratio", "minimize", {"outputs"})
    # Applied per output and batch, then averaged: batch 0 -> 0.5, batch 1 -> 0.0
    ref = [{"y": np.array([2.0, 1.0])}, {"y": np.array([4.0, 4.0])}]
    out = [{"y": np.array([2.0, 2.0])}, {"y": np.array([4.0, 4.0])}]
    assert obj.evaluate(ctx(ref, out)) == pytest.approx(0.25)
    out[1]["y"][0] = np.nan
    assert obj.evaluate(ctx(ref, out)) == math.inf


def test_user_class_metric(tmp_path: Path):
    path = tmp_path / "cls_metric.py"
    path.write_text(
        "from dataclasses import dataclass, field\n"
        "import numpy as np\n"
        "@dataclass\n"
        "class SumDiff:\n"
        "    name: str = 'sum_diff'\n"
        "    direction: str = 'minimize'\n"
        "    needs: frozenset = field(default_factory=lambda: frozenset({'outputs'}))\n"
        "    def evaluate(self, ctx):\n"
        "        return float(sum(np.abs(o['y'] - r['y']).sum()\n"
        "                         for r, o in zip(ctx.reference, ctx.outputs)))\n"
    )
    obj = load_metric(f"{path}:SumDiff")
    assert isinstance(obj, Objective)
    assert obj.name == "sum_diff"
    assert obj.evaluate(one([1, 2], [2, 4])) == pytest.approx(3.0)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UserInputError) as info:
        load_metric("l2_rel")
    msg = str(info.value)
    assert "\n" not in msg
    assert "'l2_rel'" in msg
    for name in ("rel_l2", "max_abs", "mean_abs", "cosine", "top1", "latency_ms"):
        assert name in msg


def test_missing_file(tmp_path: Path):
    missing = tmp_path / "nope.py"
    with pytest.raises(UserInputError, match="not found") as info:
        load_metric(f"{missing}:fn")
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_attribute(tmp_path: Path):
    path = tmp_path / "m.py"
    path.write_text("def other(reference, output):\n    return 0.0\n")
    with pytest.raises(UserInputError, match="no attribute 'fn'") as info:
        load_metric(f"{path}:fn")
    assert "other" in str(info.value)  # says what the file does define
    assert "\n" not in str(info.value)


def test_file_raising_on_import(tmp_path: Path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('no GPU here\\nsecond line')\n")
    with pytest.raises(UserInputError, match="RuntimeError: no GPU here second line") as info:
        load_metric(f"{path}:fn")
    assert "\n" not in str(info.value)


def test_object_that_is_not_an_objective(tmp_path: Path):
    path = tmp_path / "half.py"
    path.write_text("class Half:\n    name = 'half'\n")
    with pytest.raises(UserInputError, match="not an objective"):
        load_metric(f"{path}:Half")


# --- the accuracy axis holds its metric to what the axis means ------------------------------


def test_the_deviation_metric_refuses_latency_and_maximized_metrics(tmp_path: Path):
    assert load_deviation_metric("rel_l2").name == "rel_l2"
    with pytest.raises(UserInputError, match="does not measure the outputs") as info:
        load_deviation_metric("latency_ms")
    assert "latency is the other axis" in str(info.value) and "\n" not in str(info.value)
    path = tmp_path / "similarity.py"
    path.write_text(
        "class Similarity:\n"
        "    name = 'similarity'\n"
        "    direction = 'maximize'\n"
        "    needs = frozenset({'outputs'})\n"
        "    def evaluate(self, ctx):\n"
        "        return 1.0\n"
        "class Psychic:\n"
        "    name = 'psychic'\n"
        "    direction = 'minimize'\n"
        "    needs = frozenset({'outputs', 'intent'})\n"
        "    def evaluate(self, ctx):\n"
        "        return 0.0\n"
    )
    assert load_metric(f"{path}:Similarity").direction == "maximize"  # fine to record
    with pytest.raises(UserInputError, match="is maximized"):
        load_deviation_metric(f"{path}:Similarity")
    with pytest.raises(UserInputError, match="needs intent, which a candidate does not offer"):
        load_metric(f"{path}:Psychic")
