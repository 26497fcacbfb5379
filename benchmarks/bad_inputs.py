"""Every bad input of ``amp_search.testing.badinputs`` through the CLI: what the user sees.

Usage: python benchmarks/bad_inputs.py [--skip-large] [--only NAME ...]
           [--out benchmarks/results/bad_inputs.md]

Runs each case's ``amp-search`` command as a subprocess in a scratch folder and writes a
Markdown table: the input, the command, the exit code, the exact line the user reads, and
whether it is one line without a traceback as expected. The large case builds a model with
2.06 GiB of weights in external data (about 3 minutes and 11 GiB of memory on 2 cores; its
peak memory is recorded); the disk cases need unprivileged user namespaces (``unshare``).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_search.testing.badinputs import CASES, has_userns, run_case  # noqa: E402


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bad_inputs.md"))
    parser.add_argument("--skip-large", action="store_true", help="skip the >2 GiB model")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run")
    args = parser.parse_args()

    rows: list[str] = []
    failures = 0
    userns = has_userns()
    with tempfile.TemporaryDirectory(prefix="amp-bad-inputs-") as tmp:
        for case in CASES:
            if args.only and case.name not in args.only:
                continue
            if case.slow and args.skip_large:
                continue
            if case.needs == "userns" and not userns:
                rows.append(f"| {case.name}: {_cell(case.what)} | (skipped: no user namespaces) "
                            "| | | |")  # fmt: skip
                continue
            t0 = time.perf_counter()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            r = run_case(case, Path(tmp) / case.name, timeout=1800)
            seconds = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            output = r.stdout + r.stderr
            text = (r.errors[0] if r.errors else r.stdout).lower()
            ok = (
                r.exit_code == case.exit_code
                and "Traceback" not in output
                and len(r.errors) == (1 if case.expect_error else 0)
                and all(k.lower() in text for k in case.keywords)
            )
            failures += not ok
            verdict = ("one line" if case.expect_error else "works") if ok else "**NO**"
            if not ok and case.known_failure:
                verdict += f" (known: {case.known_failure})"
                failures -= 1
            if case.slow and peak > before:
                verdict += f" ({seconds:.0f} s, peak RSS {peak / 2**20:.1f} GiB)"
            message = r.message
            if not ok and not r.errors:  # a traceback: its last line is what the user reads
                tail = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:]
                message = " ".join(tail) or message
            rows.append(
                f"| {case.name}: {_cell(case.what)} | `{_cell(r.command)}` | {r.exit_code} | "
                f"{_cell(message)} | {verdict} |"
            )
            print(f"{case.name:26s} exit {r.exit_code}  {'ok' if ok else 'NOT OK'}  "
                  f"{seconds:5.1f} s  {r.message[:90]}", flush=True)  # fmt: skip
    header = [
        "# Bad inputs through the CLI",
        "",
        f"`python benchmarks/bad_inputs.py` on {date.today().isoformat()}, "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}. "
        "Each row is a real `amp-search` subprocess on real files (cases in "
        "`amp_search/testing/badinputs.py`, tested by `tests/cli/test_bad_input.py`). "
        "Paths are shown relative to the case's scratch folder; `mnt/` is a tmpfs mounted "
        "in a user namespace (read-only, or a few hundred KiB that fill up). For cases that "
        "work, the message column holds the line that says so.",
        "",
        "| input | command | exit | message the user sees | as expected |",
        "| --- | --- | --- | --- | --- |",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*header, *rows]) + "\n")
    print(f"wrote {out}; {failures} case(s) not as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
