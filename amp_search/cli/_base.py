"""The subcommand base class and the helpers subcommands share (console, command line)."""

from __future__ import annotations

import abc
import argparse
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import Console

__all__ = ["Subcommand", "console", "shown_command"]


def console(stderr: bool = False) -> Console:
    """A rich console (stdout for results, stderr for progress)."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160  # rich's 80 columns fold tables in logs/pipes
    # markup=False: names, reasons and paths may hold "[...]" that rich would eat as tags.
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width, markup=False)


def shown_command(argv: Sequence[str]) -> str:
    """The command line as typed, quoted for a shell, with any storage password hidden."""
    import shlex

    from amp_search.search.study import redact_storage

    shown = []
    for arg in argv:
        flag, eq, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        shown.append(shlex.quote(flag + eq + redact_storage(value)))
    return " ".join(shown)


class Subcommand(abc.ABC):
    """One ``amp-search`` subcommand; its class docstring is its help text."""

    name: ClassVar[str]

    @abc.abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declares the subcommand's flags."""

    @abc.abstractmethod
    def run(self, args: argparse.Namespace) -> int:
        """Runs it; returns the exit code."""
