"""Progress of long CLI work: a rich bar on a terminal, plain lines in a log or a pipe.

On a terminal the bar is drawn on stderr. Run in the background or piped to a log, a bar
would show nothing until the work ends, so progress is printed as plain lines on stdout
instead (a line per finished trial at most every :data:`EVERY_S` seconds; failures, stage
changes, the first and the last trial always). Either way every line also goes to
``--log-file``: it is logged at INFO on :data:`PROGRESS_LOGGER`, which the CLI keeps off the
console handler.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["EVERY_S", "PROGRESS_LOGGER", "ProgressLines", "search_progress", "stage_progress"]

#: The logger of progress lines (the log file gets them; the console shows bar or lines).
PROGRESS_LOGGER = "amp_search.cli.progress"
#: Seconds between two progress lines at least (failures and the last trial aside).
EVERY_S = 2.0

logger = logging.getLogger(PROGRESS_LOGGER)


def on_terminal() -> bool:
    """Whether stdout and stderr are both a terminal (where a live bar shows)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class ProgressLines:
    """Progress as plain lines: printed on stdout (``plain``) and logged for ``--log-file``.

    Attributes:
        trials: Trials this process has finished (complete or failed).
    """

    def __init__(self, *, plain: bool, every_s: float = EVERY_S) -> None:
        """Starts the clock.

        Args:
            plain: Print the lines on stdout (no bar shows them).
            every_s: Seconds between two routine lines at least.
        """
        self.plain = plain
        self.every_s = every_s
        self.trials = 0
        self._t0 = time.perf_counter()
        self._last = -math.inf
        self._stages: set[str] = set()

    def say(self, text: str, *, always: bool = True) -> None:
        """One line (skipped when not ``always`` and the last one is under every_s old)."""
        now = time.perf_counter()
        if not always and now - self._last < self.every_s:
            return
        self._last = now
        line = f"[{now - self._t0:7.1f}s] {text}"
        if self.plain:
            print(line, flush=True)
        logger.info("%s", line)

    def stage(self, name: str, done: int, total: int) -> None:
        """A preparation stage (profiling...): ``stage: done/total``."""
        first = name not in self._stages
        self._stages.add(name)
        self.say(f"{name}: {done}/{total or '?'}", always=first or done >= total)

    def trial(self, ev: dict[str, Any]) -> None:
        """A finished trial (the event ``run_search`` passes to its ``progress``)."""
        self.trials += 1
        total = ev.get("total")
        done = f"{ev['done']}/{total}" if total else str(ev["done"])
        best = ev.get("best_latency")
        text = (
            f"trial #{ev['trial']} {str(ev['state']).lower()}: {done} candidates, "
            f"front {ev['front']}" + (f", fastest within budget {best:.4g} ms" if best else "")
        )
        failed = ev["state"] == "FAIL"
        if failed:
            text += f"; failed: {(ev.get('error') or '').splitlines()[0][:200]}"
        last = bool(total and ev["done"] >= total)
        self.say(text, always=failed or last or self.trials == 1)

    def end(self, text: str) -> None:
        """The command's last line: on stdout (with the results) and in the log file."""
        from amp_search.cli._base import console

        console().print(text, soft_wrap=True)  # one line, however long the command
        logger.info("%s", text)


@contextlib.contextmanager
def stage_progress() -> Iterator[Callable[[str, int, int], None]]:
    """Yields a ``(stage, done, total)`` callback: a bar on a terminal, else plain lines."""
    lines = ProgressLines(plain=not on_terminal())
    if lines.plain:
        yield lines.stage
        return
    with _bar(transient=True) as bar:
        yield _staged(bar, lines)


@contextlib.contextmanager
def search_progress() -> Iterator[tuple[ProgressLines, Callable[[str, int, int], None],
                                        Callable[[dict[str, Any]], None]]]:  # fmt: skip
    """Yields (lines, stage, trial) for ``run_search``; ``lines`` counts the trials.

    On a terminal, a bar of trials with the front's size and its fastest point; else plain
    lines.
    """
    lines = ProgressLines(plain=not on_terminal())
    if lines.plain:
        yield lines, lines.stage, lines.trial
        return
    with _bar(transient=False) as bar:
        task: list[Any] = []

        def trial(ev: dict[str, Any]) -> None:
            lines.trial(ev)
            if not task:
                task.append(bar.add_task("trials", total=ev["total"], info=""))
            best = ev["best_latency"]
            info = f"front {ev['front']}" + (f", fastest {best:.4g} ms" if best else "")
            if ev["state"] == "FAIL":
                info += f"; trial {ev['trial']} failed: {(ev.get('error') or '')[:60]}"
            bar.update(task[0], completed=ev["done"], info=info)

        yield lines, _staged(bar, lines), trial


def _bar(*, transient: bool) -> Any:
    """A rich progress bar on stderr (description, bar, n/N, elapsed, info)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from amp_search.cli._base import console

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
        console=console(stderr=True), transient=transient,
    )  # fmt: skip


def _staged(bar: Any, lines: ProgressLines) -> Callable[[str, int, int], None]:
    """A ``(stage, done, total)`` callback that drives ``bar`` and logs through ``lines``."""
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        lines.stage(stage, done, total)
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total or None, info="")
        bar.update(tasks[stage], completed=done, total=total or None)

    return update
