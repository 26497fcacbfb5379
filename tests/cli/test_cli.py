"""The CLI: help for every subcommand, exit codes, one-line errors, inspect and demo output."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from amp_search.cli import SUBCOMMANDS, main

BLOCK_OPTIONAL = (
    "import sys\n"
    "for m in ('tensorrt', 'tensorrt_rtx', 'cuda', 'onnxruntime_gpu', 'matplotlib', 'plotly'):\n"
    "    sys.modules[m] = None\n"
    "from amp_search.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)

#: A successful search's last line, up to its results folder.
_DONE = r"search done: \d+ trials \(0 failed\) in \d+ s; front of \d+ points? in "


def _cli(*args: str, block: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs the CLI in a subprocess, by default with the optional packages blocked."""
    code = (
        BLOCK_OPTIONAL
        if block
        else "import sys\nfrom amp_search.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("sub", [c.name for c in SUBCOMMANDS])
def test_help_works_without_optional_packages(sub):
    r = _cli(sub, "--help")
    assert r.returncode == 0, r.stderr
    assert sub in r.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.slow
def test_inspect_demo_model_flags_overflow_and_writes_json(
    demo_model_path, demo_data_path, tmp_path
):
    out = tmp_path / "r.json"
    r = _cli("inspect", str(demo_model_path), "--data", str(demo_data_path), "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "amp4/Conv" in r.stdout and "overflows FP16" in r.stdout
    assert "accuracy estimate" in r.stdout  # the CPU caveat is printed
    report = json.loads(out.read_text())
    first = report["units_by_risk"][0]
    assert first["unit"] == "amp4/Conv" and first["risk"] == "critical"
    assert report["units"] == len(report["units_by_risk"]) == 12
    tiny = next(u for u in report["units_by_risk"] if u["unit"] == "tiny/Conv")
    assert tiny["weight_flush_to_zero"] > 0


def test_inspect_refuses_an_unknown_precision_in_one_line(demo_model_path, demo_data_path):
    r = _cli("inspect", str(demo_model_path), "--data", str(demo_data_path),
             "--precisions", "fp8")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "amp-search inspect: error: --precisions must be fp16, bf16 or fp16,bf16 "
        "(either order), got 'fp8'."
    )


def test_search_refuses_an_unknown_precision_in_one_line(
    demo_model_path, demo_data_path, tmp_path
):
    r = _cli("search", str(demo_model_path), "--data", str(demo_data_path), "--out",
             str(tmp_path / "o"), "--precisions", "fp16,int8")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "amp-search search: error: --precisions must be fp16, bf16 or fp16,bf16 "
        "(either order), got 'fp16,int8'."
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_inspect_precisions_fp16_bf16_adds_the_bf16_column_and_rescue(demo_data_path, tmp_path):
    """On the demo at opset 22 (BF16 Conv): a BF16 column, the rescue line, JSON keys."""
    import onnx
    from onnx import version_converter

    from amp_search.demo import build_demo_model

    model, out = tmp_path / "demo22.onnx", tmp_path / "r.json"
    onnx.save(version_converter.convert_version(build_demo_model(), 22), model)
    r = _cli("inspect", str(model), "--data", str(demo_data_path), "--precisions", "bf16,fp16",
             "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "BF16 rel.L2" in r.stdout and "amp4/Conv: BF16 rescues the FP16 overflow" in r.stdout
    report = json.loads(out.read_text())
    assert report["precisions"] == ["fp16", "bf16"] and report["bf16_rescued"] == ["amp4/Conv"]
    assert all(u["bf16"]["nonfinite"] == 0 for u in report["units_by_risk"])


@pytest.mark.parametrize(
    ("make", "code", "match"),
    [
        (lambda p: p.write_bytes(b"\x00junk" * 100), 2, "not a valid ONNX model"),
        (lambda p: None, 2, "not found"),
    ],
)
def test_bad_model_gives_one_line_and_exit_code(tmp_path, demo_data_path, make, code, match):
    model = tmp_path / "m.onnx"
    make(model)
    r = _cli("inspect", str(model), "--data", str(demo_data_path))
    assert r.returncode == code
    assert match in r.stderr
    assert "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("amp-search")]) == 1


def test_bad_data_gives_one_line_exit_2(tmp_path, demo_model_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((1, 3, 64, 64), np.float32))
    r = _cli("inspect", str(demo_model_path), "--data", str(bad))
    assert r.returncode == 2
    assert "Name each array after a model input" in r.stderr
    assert "Traceback" not in r.stderr


def test_debug_shows_the_traceback(tmp_path, demo_model_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((1, 3, 64, 64), np.float64))
    r = _cli("inspect", str(demo_model_path), "--data", str(bad), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_backends_lists_both_and_says_why_tensorrt_is_missing():
    r = _cli("backends")
    assert r.returncode == 0, r.stderr
    assert "onnxruntime" in r.stdout and "available" in r.stdout
    assert "tensorrt" in r.stdout and "amp-search[tensorrt]" in r.stdout


@pytest.mark.slow
def test_demo_then_report_then_pick(tmp_path):
    out = tmp_path / "demo"
    r = _cli("demo", "--out", str(out), "--n-trials", "12", block=False)
    assert r.returncode == 0, r.stderr
    assert re.search(_DONE + re.escape(str(out)) + "$", r.stdout, re.M)  # then 'Next: ...'
    assert "all-fp16" in r.stdout and "infeasible" in r.stdout  # it overflows: said why
    for name in ("demo.onnx", "front.json", "front.csv", "pareto.png"):
        assert (out / name).is_file(), name
    r = _cli("report", str(out), block=False)
    assert r.returncode == 0, r.stderr
    assert "Pareto front" in r.stdout and "pareto.png" in r.stdout
    r = _cli("pick", str(out), "--max-deviation", "0.01", "--to", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    assert "FP32 fallback set" in r.stdout and "amp4/Conv" in r.stdout  # overflow stays FP32
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.precision.json").is_file()
    r = _cli("pick", str(out), "--max-deviation", "1e-30", "--to", str(tmp_path / "n.onnx"))
    assert r.returncode == 0  # all-FP32 (deviation 0) always meets a budget
    # Its fallback set is every unit: counted, not listed (the names are in the files).
    assert "FP32 fallback set (12 of 12 units): all 12 units (all FP32)" in r.stdout
    assert "amp4/Conv" not in r.stdout
    names = json.loads((tmp_path / "n.precision.json").read_text())["fp32_fallback"]
    assert len(names) == 12
    for budget in ("-1", "0"):  # refused as search refuses it: one line, exit 2
        r = _cli("pick", str(out), "--max-deviation", budget, "--to", str(tmp_path / "b.onnx"))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert (
            r.stderr.strip()
            == f"amp-search pick: error: --max-deviation must be positive, got {budget}."
        )
        assert not (tmp_path / "b.onnx").exists()
    r = _cli("pick", str(tmp_path / "nowhere"), "--trial", "3", "--to", str(tmp_path / "x"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_search_keep_models_front_then_pick(tmp_path, demo_model_path, demo_data_path):
    out, log = tmp_path / "out", tmp_path / "search.log"
    r = _cli("search", str(demo_model_path), "--data", str(demo_data_path), "--n-trials", "14",
             "--keep-models", "front", "--out", str(out),
             "--storage", str(tmp_path / "s.journal"), "--log-file", str(log))  # fmt: skip
    assert r.returncode == 0, r.stderr
    # Piped: progress as plain lines on stdout and in the log file, first and last trial
    # always; --n-trials 14 ran 14 trials, seeds included.
    lines = [ln for ln in r.stdout.splitlines() if re.match(r"\[ *[\d.]+s\] ", ln)]
    assert any(" profile: " in ln for ln in lines)
    trials = [ln for ln in lines if " trial #" in ln]
    assert "1/14 candidates" in trials[0] and "14/14 candidates, front " in trials[-1]
    assert "14 complete, 0 failed of 14 trials in the study" in r.stdout
    text = log.read_text()
    assert all(ln in text for ln in lines)
    end = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(_DONE + re.escape(str(out)), end) and end in text
    assert end.startswith("search done: 14 trials (0 failed) in ")
    folders = list((out / "candidates").iterdir())
    assert 0 < len(list((out / "candidates").glob("*/model.onnx"))) < len(folders)
    r = _cli("pick", str(out), "--max-deviation", "0.01", "--to", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.onnx").is_file()


def test_threads_become_the_cpu_thread_option_only_on_the_cpu():
    from amp_search.cli.search import parse_options

    assert parse_options(["prefer_nhwc=1"], 4, "cuda:1") == {"prefer_nhwc": 1}
    assert parse_options(None, 4, "cpu") == {"intra_op_num_threads": 4}
    assert parse_options(["intra_op_num_threads=2"], 4, "cpu") == {"intra_op_num_threads": 2}
    assert parse_options(["level=all"], 0, "cpu") == {"level": "all"}


@pytest.mark.slow
def test_a_search_stopped_by_its_inputs_leaves_no_empty_results_folder(
    tmp_path, demo_model_path, demo_data_path
):
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((1, 3, 64, 64), np.float32))
    for model, data, match in (
        (tmp_path / "missing.onnx", demo_data_path, "not found"),
        (demo_model_path, bad, "Name each array"),
    ):
        out = tmp_path / "new" / "out"
        r = _cli("search", str(model), "--data", str(data), "--out", str(out),
                 "--storage", str(tmp_path / "s.journal"))  # fmt: skip
        assert r.returncode == 2 and match in r.stderr, r.stderr
        assert not (tmp_path / "new").exists()  # neither the folder nor the parent it made
    # A folder that was there before stays, empty or not.
    (tmp_path / "mine").mkdir()
    r = _cli("search", str(tmp_path / "missing.onnx"), "--data", str(demo_data_path),
             "--out", str(tmp_path / "mine"))  # fmt: skip
    assert r.returncode == 2 and (tmp_path / "mine").is_dir()


def test_a_log_file_that_cannot_be_written_is_one_line(tmp_path, demo_model_path):
    r = _cli("inspect", str(demo_model_path), "--synthetic",
             "--log-file", str(tmp_path / "missing" / "x.log"))  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("amp-search inspect: error: --log-file: Cannot write ")
    assert len(r.stderr.strip().splitlines()) == 1
