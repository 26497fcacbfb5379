"""The ``amp-search`` command line: ``main(argv) -> exit code`` and one class per subcommand.

``main`` is the only place that configures logging. It turns an
:class:`~amp_search.errors.AmpSearchError` into one line on stderr (plus ``Note:`` lines) and
the exit code of its class (:mod:`amp_search.errors`; the README's table); ``--debug`` shows
the traceback instead. A full disk is one line and exit code 2 wherever it shows (a results
file, the study database), like any other place the user's paths cannot be written. Ctrl-C
exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from amp_search._atomic import disk_full_message, os_error_message
from amp_search.cli._base import Subcommand
from amp_search.cli.backends import BackendsCommand
from amp_search.cli.demo import DemoCommand
from amp_search.cli.inspect import InspectCommand
from amp_search.cli.refine import RefineCommand
from amp_search.cli.report import PickCommand, ReportCommand
from amp_search.cli.search import SearchCommand
from amp_search.cli.worker import WorkerCommand
from amp_search.errors import AmpSearchError, UserInputError

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS: list[type[Subcommand]] = [
    SearchCommand,
    WorkerCommand,
    InspectCommand,
    ReportCommand,
    RefineCommand,
    PickCommand,
    DemoCommand,
    BackendsCommand,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from amp_search import __version__

    parser = argparse.ArgumentParser(
        prog="amp-search",
        description="Search-based FP16 mixed precision for ONNX models headed for TensorRT.",
    )
    parser.add_argument("--version", action="version", version=f"amp-search {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    common.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    common.add_argument("--log-file", help="also write the log to this file")
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cls in SUBCOMMANDS:
        cmd = cls()
        doc = (cls.__doc__ or "").strip()
        sub = subs.add_parser(
            cls.name,
            parents=[common],
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_arguments(sub)
        sub.set_defaults(_command=cmd)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    """The console gets -v/-q's level; --log-file gets INFO at least (progress lines too)."""
    from amp_search.cli._progress import PROGRESS_LOGGER

    level = max(logging.DEBUG, logging.WARNING - 10 * getattr(args, "verbose", 0)
                + 10 * getattr(args, "quiet", 0))  # fmt: skip
    try:
        from rich.logging import RichHandler

        from amp_search.cli._base import console

        # Logs go to stderr, beside the progress bar; stdout holds only results.
        con: logging.Handler = RichHandler(console=console(stderr=True), show_time=False,
                                           show_path=False, markup=False)  # fmt: skip
        con.setFormatter(logging.Formatter("%(message)s"))
    except ImportError:
        con = logging.StreamHandler()
        con.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    con.setLevel(level)
    # Progress lines are on the console already (the bar, or plain lines on stdout).
    con.addFilter(lambda record: record.name != PROGRESS_LOGGER)
    handlers = [con]
    if getattr(args, "log_file", None):
        try:
            fh = logging.FileHandler(args.log_file)
        except OSError as exc:
            raise UserInputError(f"--log-file: {os_error_message(args.log_file, exc)}") from exc
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        fh.setLevel(min(level, logging.INFO))
        handlers.append(fh)
    logging.basicConfig(level=min(h.level for h in handlers), handlers=handlers, force=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 2
    try:
        _configure_logging(args)
        return int(args._command.run(args))
    except AmpSearchError as exc:
        if args.debug:
            raise
        full = disk_full_message(exc)  # says more than a wrapping storage error does
        text = full if full and "No space left" not in str(exc) else exc
        print(f"amp-search {args.command}: error: {text}", file=sys.stderr)
        return UserInputError.exit_code if full else exc.exit_code
    except Exception as exc:  # a full disk where no helper translated the error
        full = disk_full_message(exc)
        if full is None or args.debug:
            raise
        print(f"amp-search {args.command}: error: {full}", file=sys.stderr)
        return UserInputError.exit_code
    except KeyboardInterrupt:
        print(f"amp-search {args.command}: interrupted", file=sys.stderr)
        return 130
