"""Bad input through the real CLI: one error line that says what to do, exit code, no traceback.

The cases live in :mod:`amp_search.testing.badinputs` (``benchmarks/bad_inputs.py`` tabulates
the same cases). Each runs ``python -m amp_search`` in a subprocess on real files; the
disk-full and read-only cases mount a tmpfs in a user namespace and are skipped where that
is not allowed. The large-model paths (external data, the protobuf limit) are tested on the
demo model with the limit lowered, and once for real over 2 GiB under ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from amp_search.graph import io as graph_io
from amp_search.testing import badinputs
from amp_search.testing.badinputs import CASES, BadInput, run_case


def _params() -> list[object]:
    out = []
    for case in CASES:
        marks = []
        if case.slow:
            marks.append(pytest.mark.slow)
        if case.needs == "userns":
            marks.append(
                pytest.mark.skipif(
                    not badinputs.has_userns(),
                    reason="needs unprivileged user namespaces to mount a tmpfs",
                )
            )
        if case.known_failure:
            marks.append(pytest.mark.xfail(strict=True, reason=case.known_failure))
        out.append(pytest.param(case, id=case.name, marks=marks))
    return out


def _available_memory() -> int:
    """MemAvailable (free plus reclaimable page cache), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _room_for_large_model() -> bool:
    free_mem = _available_memory()
    import tempfile

    free_disk = shutil.disk_usage(tempfile.gettempdir()).free
    return free_mem > 14 * 2**30 and free_disk > 6 * 2**30


@pytest.mark.parametrize("case", _params())
def test_case_through_the_cli(case: BadInput, tmp_path: Path) -> None:
    # Checked when the case runs, not at collection: memory is what the earlier tests left.
    if case.slow and not _room_for_large_model():
        pytest.skip("the >2 GiB model needs 14 GiB of free memory and 6 GiB of disk")
    r = run_case(case, tmp_path)
    output = r.stdout + r.stderr
    assert "Traceback" not in output, output[-3000:]
    assert r.exit_code == case.exit_code, output[-3000:]
    if case.expect_error:
        assert len(r.errors) == 1, output[-3000:]
        (line,) = r.errors
        # The message is that one line: no Note: lines under it (log warnings may precede it).
        after = r.stderr.split(line, 1)[1]
        assert after.strip() == "", after
        assert "Note:" not in r.stderr, r.stderr[-2000:]
        text = line
    else:
        assert r.errors == [], r.errors
        text = r.stdout
    for word in case.keywords:
        assert word.lower() in text.lower(), (word, text[-2000:])


# Cases whose "works" needs more than an exit code -----------------------------------------


def _case(name: str) -> BadInput:
    return next(c for c in CASES if c.name == name)


@pytest.mark.slow
def test_control_flow_bodies_pass_through_unchanged(tmp_path: Path) -> None:
    r = run_case(_case("control_flow"), tmp_path)
    assert r.exit_code == 0, r.stderr[-3000:]
    from amp_search.graph import load_model, sanitize

    sanitized = sanitize(load_model(tmp_path / "control_flow.onnx"))
    original = {n.name: n for n in sanitized.graph.node}
    units = json.loads((tmp_path / "out" / "run.json").read_text())["units"]
    assert units and not {"then_mm", "body_mm", "else_relu", "body_tanh"} & set(units)
    candidates = sorted((tmp_path / "out" / "candidates").glob("*/model.onnx"))
    assert len(candidates) >= 4  # 3 units: several distinct assignments
    fp16_seen = False
    for path in candidates:
        model = onnx.load(path)
        nodes = {n.name: n for n in model.graph.node}
        for name in ("branch", "loop"):
            assert list(nodes[name].attribute) == list(original[name].attribute), path
        fp16_seen |= any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert fp16_seen  # the outer graph was really rewritten


@pytest.mark.slow
def test_unmet_budget_still_writes_the_front(tmp_path: Path) -> None:
    r = run_case(_case("max_deviation_unmet"), tmp_path)
    assert r.exit_code == 0, r.stderr[-3000:]
    front = json.loads((tmp_path / "out" / "front.json").read_text())
    text = json.dumps(front)
    assert "0.5" in text  # the budget is recorded with the (empty) front
    assert "No candidate met --max-deviation 0.5" in r.stdout
    con = sqlite3.connect(tmp_path / "study.db")
    done = con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    assert done >= 3  # every trial ran and was kept, all infeasible


@pytest.mark.skipif(not badinputs.has_userns(), reason="needs user namespaces for a tmpfs")
@pytest.mark.slow
def test_disk_full_keeps_finished_trials_and_a_rerun_resumes(tmp_path: Path) -> None:
    case = _case("out_disk_full")
    r = run_case(case, tmp_path)
    assert r.exit_code == 2 and len(r.errors) == 1, r.stderr[-3000:]
    con = sqlite3.connect(tmp_path / "study.db")
    done = con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    con.close()
    assert done >= 1  # trials finished before the disk filled are in the study
    # The same search with room to write resumes the study instead of starting over.
    args = case.setup(tmp_path)
    args[args.index("--out") + 1] = str(tmp_path / "roomy")
    again = subprocess.run(
        [sys.executable, "-m", "amp_search", *args], cwd=tmp_path, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    con = sqlite3.connect(tmp_path / "study.db")
    assert con.execute("select count(distinct study_id) from trials").fetchone()[0] == 1
    now = con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    assert now > done


# The protobuf-limit paths on a small model ------------------------------------------------

_LOW_LIMIT = (
    "import sys\n"
    "import amp_search.graph.io as io\n"
    "import amp_search.search.evaluate as ev\n"
    "io.PROTOBUF_LIMIT = ev.PROTOBUF_LIMIT = 200_000\n"
    "from amp_search.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _search(tmp_path: Path, model: Path, data: Path, tag: str, low: bool) -> Path:
    out = tmp_path / tag
    args = ["search", str(model), "--data", str(data), "--out", str(out), "--n-trials", "4",
            "--storage", f"sqlite:///{tmp_path / tag}.db"]  # fmt: skip
    cmd = [sys.executable, "-c", _LOW_LIMIT, *args] if low else [
        sys.executable, "-m", "amp_search", *args]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return out


@pytest.mark.slow
def test_external_data_model_searches_like_an_inline_one(tmp_path: Path) -> None:
    """External data in, the >2 GiB branches on (limit lowered to 200 kB): same front."""
    from amp_search.demo import build_demo_model, demo_data

    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(build_demo_model(), ext / "demo.onnx", save_as_external_data=True,
                    location="demo.onnx.data", size_threshold=0)  # fmt: skip
    np.savez(tmp_path / "d.npz", image=demo_data(n_batches=2, batch=2)["image"])
    inline = tmp_path / "demo.onnx"
    onnx.save(build_demo_model(), inline)
    big = _search(tmp_path, ext / "demo.onnx", tmp_path / "d.npz", "big", low=True)
    small = _search(tmp_path, inline, tmp_path / "d.npz", "small", low=False)
    # The big-model branch wrote candidates with their weights in external data...
    datas = list((big / "candidates").glob("*/model.onnx.data"))
    assert datas and not list((small / "candidates").glob("*/model.onnx.data"))
    assert not list(big.rglob(".emulated-*"))  # the emulation twin was cleaned up
    # ...and scored each candidate exactly as the inline model's search did.
    common = [
        (m, big / "candidates" / m.parent.name / "metrics.json")
        for m in (small / "candidates").glob("*/metrics.json")
    ]
    common = [(a, b) for a, b in common if b.exists()]
    assert len(common) >= 3  # the seeds (all-FP32, all-FP16, the risk ladder) at least
    for a_path, b_path in common:
        a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
        assert a["deviation"] == b["deviation"] and a["latency"] == b["latency"]


def test_save_model_over_the_limit_keeps_its_input(monkeypatch, tmp_path: Path) -> None:
    from amp_search.demo import build_demo_model

    monkeypatch.setattr(graph_io, "PROTOBUF_LIMIT", 100_000)
    model = build_demo_model()
    before = model.SerializeToString()
    path = graph_io.save_model(model, tmp_path / "m.onnx")
    assert model.SerializeToString() == before  # onnx.save_model would clear the weights
    assert (tmp_path / "m.onnx.data").stat().st_size > 100_000
    back = graph_io.load_model(path)
    for a, b in zip(model.graph.initializer, back.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    # Chunked serialization parses back to the same model.
    assert onnx.ModelProto.FromString(graph_io.model_to_bytes(model)) == model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_atomic_write_to_a_full_device_is_one_line(tmp_path: Path) -> None:
    """ENOSPC from a real device (/dev/full), through the message every write uses."""
    from amp_search._atomic import os_error_message

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    try:
        with open("/dev/full", "wb") as f:
            f.write(b"x")
            f.flush()
    except OSError as exc:
        msg = os_error_message(tmp_path / "front.json", exc)
    else:
        pytest.fail("/dev/full accepted a write")
    assert "\n" not in msg and "No space left on device" in msg and "Free space" in msg
