"""Exit codes: one per error class, the same as the README's table says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from amp_search import errors

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_codes() -> dict[str, int]:
    """Error class -> exit code, from the README's table."""
    text = README.read_text()
    table = text[text.index("## Errors and exit codes") :]
    out: dict[str, int] = {}
    for code, classes in re.findall(r"^\| (\d+) \|[^|]*\|([^|]*)\|$", table, re.M):
        for name in re.findall(r"`(\w+)`", classes):
            out[name] = int(code)
    return out


def test_every_error_class_has_the_code_the_readme_gives():
    classes = {
        name: cls
        for name in errors.__all__
        if isinstance(cls := getattr(errors, name), type)
        and issubclass(cls, errors.AmpSearchError)
    }
    assert _readme_codes() == {name: cls.exit_code for name, cls in classes.items()}
    # Distinct kinds of failure, distinct codes (a build and a run of the model are one kind).
    kinds = {cls.exit_code for name, cls in classes.items() if name != "CandidateRunError"}
    assert len(kinds) == len(classes) - 1


@pytest.mark.slow
def test_a_device_this_machine_lacks_exits_3_and_an_unknown_one_2(
    tmp_path, demo_model_path, demo_data_path
):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA EP: --device cuda works here")

    def search(device: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "amp_search", "search", str(demo_model_path), "--data",
             str(demo_data_path), "--device", device, "--out", str(tmp_path / device),
             "--storage", str(tmp_path / "s.journal")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    for device in ("cuda", "cuda:1"):
        r = search(device)
        assert r.returncode == 3, r.stderr
        assert f"cannot use device '{device}' here" in r.stderr and "Traceback" not in r.stderr
    for device in ("tpu", "cuda:x", "cpu:0"):
        r = search(device)
        assert r.returncode == 2, r.stderr
        assert f"Unknown device '{device}'" in r.stderr and "Traceback" not in r.stderr
