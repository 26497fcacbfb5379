"""The subcommand base class and the helpers subcommands share (console, model loading)."""

from __future__ import annotations

import abc
import argparse
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["Subcommand", "console"]


def console(stderr: bool = False) -> Console:
    """A rich console (stdout for results, stderr for progress)."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160  # rich's 80 columns fold tables in logs/pipes
    # markup=False: names, reasons and paths may hold "[...]" that rich would eat as tags.
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width, markup=False)


class Subcommand(abc.ABC):
    """One ``amp-search`` subcommand; its class docstring is its help text."""

    name: ClassVar[str]

    @abc.abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declares the subcommand's flags."""

    @abc.abstractmethod
    def run(self, args: argparse.Namespace) -> int:
        """Runs it; returns the exit code."""
