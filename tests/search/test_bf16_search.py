"""A search with BF16 beside FP16 (``--precisions fp16,bf16``): space, seeds, sampler, results."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from amp_search.cli import main
from amp_search.demo import build_demo_model, demo_data
from amp_search.errors import UserInputError
from amp_search.keys import ALL_BF16, BF16_RESCUE, SEED_ATTR
from amp_search.search import SearchConfig, run_search
from amp_search.search._guided.candidates import (
    BF16,
    FP16,
    binary_features,
    candidates,
    clip_rows,
)
from amp_search.search._guided.gp import prior_feature
from amp_search.search._guided.latency import LatencySurrogate
from amp_search.search.seeds import seed_params
from amp_search.search.space import SearchSpace
from amp_search.types import Precision, parse_precisions


@pytest.fixture(scope="module")
def demo22(tmp_path_factory):
    """The demo model at opset 22 (ONNX types Conv bfloat16 from there) and its data."""
    root = tmp_path_factory.mktemp("demo22")
    onnx.save(build_demo_model(opset=22), root / "demo22.onnx")
    np.savez(root / "cal.npz", **demo_data())
    return root / "demo22.onnx", root / "cal.npz"


@pytest.fixture(scope="module")
def searched(demo22, tmp_path_factory):
    model, data = demo22
    root = tmp_path_factory.mktemp("bf16search")
    config = SearchConfig(model=model, data=data, out=root / "out", n_trials=24,
                          storage=f"sqlite:///{root / 's.db'}",
                          precisions=("fp16", "bf16"))  # fmt: skip
    return config, run_search(config)


def test_parse_precisions():
    assert parse_precisions("bf16, FP16") == (Precision.FP16, Precision.BF16)
    assert parse_precisions("bf16") == (Precision.BF16,)
    for bad in ("fp8", "", "fp16,int8"):
        with pytest.raises(UserInputError, match="--precisions must be fp16, bf16 or fp16,bf16"):
            parse_precisions(bad)


def test_space_offers_bf16_where_fp16_cannot_go():
    default = SearchSpace(["a", "b", "c"], locked=["b"])
    assert default.free == ["a", "c"] and default.choices("a") == ("fp32", "fp16")
    assert not default.three_way
    space = SearchSpace(["a", "b", "c"], precisions=(Precision.FP16, Precision.BF16),
                        no_fp16=["b"], bf16_units=["a", "b"])  # fmt: skip
    # b's weights overflow FP16: BF16 (FP32's range) is still open to it; c's ops are not
    # typed bfloat16 at the model's opset.
    assert [space.choices(u) for u in "abc"] == [
        ("fp32", "fp16", "bf16"),
        ("fp32", "bf16"),
        ("fp32", "fp16"),
    ]
    assert space.free == ["a", "b", "c"] and space.three_way
    assert space.params(["a", "b", "c"]) == {"a": "fp16", "b": "fp32", "c": "fp16"}
    assert space.params([], bf16=["a", "b", "c"]) == {"a": "bf16", "b": "bf16", "c": "fp32"}
    a = space.assignment({"a": "bf16", "b": "bf16", "c": "fp16"})
    assert a.bf16_units == {"a", "b"} and a.fp16_units == {"c"}
    bf16_only = SearchSpace(["a", "b"], precisions=(Precision.BF16,), bf16_units=["a"])
    assert bf16_only.free == ["a"] and bf16_only.locked == ["b"]


def test_seeds_add_all_bf16_and_the_rescue():
    space = SearchSpace(["a", "b", "c", "d"], precisions=(Precision.FP16, Precision.BF16),
                        no_fp16=["d"])  # fmt: skip
    seeds = dict(seed_params(space, ["b", "a", "c", "d"], critical=["b"], prefixes=(1, 2)))
    assert seeds[ALL_BF16] == {u: "bf16" for u in "abcd"}
    # all FP16, with the unit FP16 overflows (b, critical) and the one whose weights overflow
    # it (d) in BF16 instead of FP32
    assert seeds[BF16_RESCUE] == {"a": "fp16", "b": "bf16", "c": "fp16", "d": "bf16"}
    fp16_only = dict(seed_params(SearchSpace(list("abcd")), ["a"], critical=["b"]))
    assert ALL_BF16 not in fp16_only and BF16_RESCUE not in fp16_only


def test_ternary_candidates_hold_only_what_units_admit():
    allowed = [(0, 1, 2), (0, 2), (0, 1), (0, 1, 2)]
    rng = np.random.default_rng(0)
    every = candidates(4, np.zeros((0, 4), np.uint8), [(0, 1)], rng, allowed=allowed)
    assert len(every) == 3 * 2 * 2 * 3  # enumerated: every admitted assignment once
    for i, codes in enumerate(allowed):
        assert set(every[:, i]) == set(codes)
    taken = {every[5].tobytes()}
    assert len(candidates(4, every[:1], [], rng, taken, allowed=allowed)) == 35
    # beyond the enumeration: a pool, still only admitted codes
    many = [(0, 1, 2)] * 10 + [(0, 1)] * 10
    front = clip_rows(np.full((2, 20), BF16, np.uint8), many)
    pool = candidates(20, front, [(k, k + 1) for k in range(19)], rng, allowed=many)
    assert len(pool) > 100 and not (pool[:, 10:] == BF16).any()
    assert (pool[:, :10] == BF16).any() and (pool == FP16).any()
    assert (clip_rows(np.array([[1, 2]], np.uint8), [(0, 2), (0, 1)]) == [[2, 1]]).all()


def test_three_way_latency_model_is_exact_on_an_additive_price():
    rng = np.random.default_rng(1)
    n, edges = 5, [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4)]
    saving, bf_extra = rng.uniform(0.1, 1, n), rng.uniform(-0.1, 0.1, n)
    cast, mix = rng.uniform(0.05, 0.2, len(edges)), rng.uniform(0.05, 0.2, len(edges))

    def price(r):
        low, bf = (r > 0).astype(float), (r == BF16).astype(float)
        out = 10 - low @ saving + bf @ bf_extra
        for k, (a, b) in enumerate(edges):
            out += cast[k] * (low[:, a] != low[:, b]) + mix[k] * (low[:, a] * low[:, b]) * (
                bf[:, a] != bf[:, b]
            )
        return out

    model = LatencySurrogate(n, edges, three_way=True)
    design = model.design()
    assert len(design) <= 3 + 2 * n + 2 * len(edges)
    model.fit(design, price(design))
    rows = rng.integers(0, 3, (200, n)).astype(np.uint8)
    assert model.predict(rows) == pytest.approx(price(rows), abs=1e-9)
    # 0/1 rows: the FP32/FP16 model's features, unchanged
    binary = LatencySurrogate(n, edges)
    assert binary.features(rows.clip(0, 1)).shape[1] == 1 + n + len(edges)


def test_prior_and_features_of_bf16_rows():
    rows = np.array([[0, 1, 2], [2, 2, 2], [1, 1, 0]], np.uint8)
    got = prior_feature(rows, [1e-3, 2e-3, 3e-3], [8e-3, 16e-3, 24e-3])
    want = np.log10([np.hypot(2e-3, 24e-3), np.sqrt(8e-3**2 + 16e-3**2 + 24e-3**2),
                     np.hypot(1e-3, 2e-3)])  # fmt: skip
    assert got == pytest.approx(want, rel=1e-5)
    # 0/1 rows without BF16 errors: the FP16 proxy it always was
    assert prior_feature(rows[2:], [1e-3, 2e-3, 3e-3])[0] == pytest.approx(want[2], rel=1e-5)
    # FP32 -> FP16 and FP16 -> BF16 are one step, FP32 -> BF16 two
    f = binary_features(np.array([[0], [1], [2]], np.uint8))
    assert f.tolist() == [[0, 0], [1, 0], [1, 1]]


@pytest.mark.slow
def test_three_way_search_on_the_demo_finds_bf16_on_its_front(searched, capsys):
    config, outcome = searched
    trials = outcome.study.get_trials(deepcopy=False)
    seeds = {t.user_attrs.get(SEED_ATTR): t for t in trials}
    assert ALL_BF16 in seeds and BF16_RESCUE in seeds
    # the all-FP16 demo overflows (inf), the all-BF16 one does not: BF16 keeps FP32's range
    assert seeds["all-fp16"].values[1] == float("inf")
    assert 0 < seeds[ALL_BF16].values[1] < 1e-2
    bf16_points = [p for p in outcome.front if p.bf16_units]
    assert bf16_points, "no point of the front runs BF16"
    fastest = min(outcome.front, key=lambda p: p.latency_ms)
    assert fastest.bf16_units  # nothing FP32/FP16-only is as fast within a finite deviation
    run = json.loads((config.out / "run.json").read_text())
    assert run["precisions"] == ["fp16", "bf16"]
    for p in bf16_points:
        folder = config.out / "candidates" / p.digest
        units = json.loads((folder / "precision.json").read_text())["units"]
        assert sorted(u for u, v in units.items() if v == "bf16") == sorted(p.bf16_units)
        assert sorted(u for u, v in units.items() if v == "fp32") == sorted(p.fp32_units)
        model = onnx.load(str(folder / "model.onnx"))
        onnx.checker.check_model(model, full_check=True)
        elem = {i.data_type for i in model.graph.initializer}
        assert onnx.TensorProto.BFLOAT16 in elem
        # (ONNX Runtime CPU has no BF16 Conv kernel: the search scored it on its FP32 twin
        # with BF16 storage emulated, graph/emulate.py)
    front = json.loads((config.out / "front.json").read_text())["front"]
    assert any(row["bf16_units"] for row in front)
    assert main(["report", str(config.out), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "BF16 set" in out and "the BF16 set runs BF16" in " ".join(out.split())
    assert main(["pick", str(config.out), "--trial", str(bf16_points[0].trial),
                 "--to", str(config.out.parent / "picked.onnx")]) == 0  # fmt: skip
    assert f"BF16 set ({len(bf16_points[0].bf16_units)} of" in " ".join(
        capsys.readouterr().out.split()
    )
    # all-BF16 is a baseline: refined beside all-FP32 and all-FP16 with its BF16 set
    assert main(["refine", str(config.out), "--device", "cpu", "--pairs", "2",
                 "--rounds", "1"]) == 0  # fmt: skip
    refined = json.loads((config.out / "refined.json").read_text())["points"]
    labels = {p["metrics"].get("label"): p for p in refined}
    assert {"all-fp32", "all-fp16", ALL_BF16} <= set(labels)
    assert len(labels[ALL_BF16]["bf16_units"]) == 12


@pytest.mark.slow
def test_a_rerun_with_other_precisions_is_refused(searched, capsys):
    config, _ = searched
    code = main(["search", str(config.model), "--data", str(config.data), "--n-trials", "2",
                 "--out", str(config.out), "--storage", str(config.storage)])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "different precisions" in err and "Traceback" not in err


@pytest.mark.slow
def test_bf16_withheld_by_the_opset_is_said_or_refused(demo_model_path, demo_data_path, tmp_path):
    # opset 12: Cast has no bfloat16 (13), so no unit admits BF16; BF16 alone is refused
    onnx.save(build_demo_model(opset=12), tmp_path / "demo12.onnx")
    config = SearchConfig(model=tmp_path / "demo12.onnx", data=demo_data_path,
                          out=tmp_path / "o", n_trials=2, precisions=("bf16",),
                          storage=f"sqlite:///{tmp_path / 's.db'}")  # fmt: skip
    with pytest.raises(UserInputError, match="no unit admits BF16 at opset 12"):
        run_search(config)
    # opset 17: Gemm admits it, Conv (22) and GlobalAveragePool (22) do not
    config.model, config.out = demo_model_path, tmp_path / "o2"
    config.precisions = ("fp16", "bf16")
    outcome = run_search(config)
    assert any(n.startswith("BF16 withheld from 11 of 12 units: opset 17")
               for n in outcome.notes)  # fmt: skip
