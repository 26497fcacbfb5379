"""Optional packages stay optional: every module imports without them; the set is pinned."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import amp_search

OPTIONAL = ("tensorrt", "tensorrt_rtx", "cuda", "onnxruntime_gpu", "matplotlib", "plotly")


def _all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(amp_search.__path__, prefix="amp_search."))


def test_every_module_imports_with_optional_packages_blocked():
    code = (
        "import importlib, sys\n"
        f"for m in {OPTIONAL!r}:\n"
        "    sys.modules[m] = None\n"
        f"for name in {_all_modules()!r}:\n"
        "    if name.startswith('amp_search.testing'):\n"
        "        continue  # test support may need pytest\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_importing_amp_search_pulls_in_nothing_heavy():
    code = (
        "import sys, amp_search, amp_search.cli\n"
        "heavy = [m for m in ('onnxruntime', 'tensorrt', 'tensorrt_rtx', 'cuda', 'matplotlib',\n"
        "         'plotly', 'optuna') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
