"""``amp-search backends``: which backends and devices work here, and why not."""

from __future__ import annotations

import argparse

from amp_search.cli._base import Subcommand, console

__all__ = ["BackendsCommand"]


class BackendsCommand(Subcommand):
    """List the backends, the devices each can use here, and why a backend is unavailable."""

    name = "backends"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: D102
        pass

    def run(self, args: argparse.Namespace) -> int:  # noqa: D102
        from rich.table import Table

        from amp_search.backends import available_backends, get_backend
        from amp_search.errors import AmpSearchError

        table = Table(title="amp-search backends", title_justify="left")
        table.add_column("backend")
        table.add_column("status")
        table.add_column("devices / reason", overflow="fold")
        for name, reason in available_backends().items():
            if reason:
                table.add_row(name, "unavailable", reason, style="dim")
                continue
            try:
                devices = ", ".join(get_backend(name).devices())
            except AmpSearchError as exc:
                table.add_row(name, "unavailable", str(exc), style="dim")
                continue
            table.add_row(name, "available", devices)
        console().print(table)
        return 0
