"""``amp-search worker``: one more worker on a search that is already running."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amp_search.cli._base import Subcommand, shown_command

__all__ = ["WorkerCommand"]


class WorkerCommand(Subcommand):
    """Join a running search: evaluate candidates of an existing study, one worker per GPU.

    The study holds the search's settings (model, data, backend, metric, results folder),
    written by the 'amp-search search' that created it, so a worker needs only the storage
    and the study name. Start one per GPU with --device cuda:N (or CUDA_VISIBLE_DEVICES). The
    storage must be shared by every worker: a PostgreSQL/MySQL URL across hosts, or a
    .journal file or SQLite database on one host. Workers on one host share the results
    folder, and a candidate one of them evaluated is never built again by another. The study
    records its storage with the password hidden: each worker gives its own --storage, where
    ${VAR} is read from the environment ('postgresql://amp:${AMP_DB_PASSWORD}@db/amp').
    """

    name = "worker"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: D102
        parser.add_argument("--storage", required=True,
                            help="the search's Optuna storage URL or .journal path; ${VAR} "
                            "in it is read from the environment")  # fmt: skip
        parser.add_argument("--study", dest="study_name", required=True, help="study name")
        parser.add_argument("--device", help="device of this worker, e.g. cuda:1 (default: "
                            "the search's)")  # fmt: skip
        parser.add_argument("--out", help="results folder (default: the search's; give "
                            "another one on a host that cannot see it)")  # fmt: skip
        parser.add_argument("--n-trials", type=int,
                            help="distinct candidates the study should hold (default: the "
                            "search's)")  # fmt: skip
        parser.add_argument("--timeout", type=float, help="stop after this many seconds")
        parser.add_argument("--seed", type=int, help="sampler seed (default: from the pid)")
        add_storage_retry(parser)

    def run(self, args: argparse.Namespace) -> int:  # noqa: D102
        from amp_search.cli.search import run_with_progress
        from amp_search.errors import UserInputError
        from amp_search.keys import CONFIG_ATTR
        from amp_search.search import SearchConfig
        from amp_search.search.study import open_or_create_study

        study, _ = open_or_create_study(args.storage, args.study_name, must_exist=True)
        saved = study.user_attrs.get(CONFIG_ATTR)
        if not isinstance(saved, dict):
            raise UserInputError(
                f"Study {args.study_name!r} holds no amp-search settings (it was not created by "
                "'amp-search search'). Start the search with 'amp-search search' first."
            )
        config = SearchConfig.from_json(
            saved,
            storage=args.storage,
            study_name=args.study_name,
            device=args.device,
            out=Path(args.out) if args.out else None,
            n_trials=args.n_trials,
            timeout=args.timeout,
            storage_retry_s=args.storage_retry,
        )
        config.seed = args.seed
        config.join = True
        return run_with_progress(config, shown_command(sys.argv))


def add_storage_retry(parser: argparse.ArgumentParser) -> None:
    """``--storage-retry``: shared by search and worker."""
    parser.add_argument(
        "--storage-retry", type=float, default=120.0, metavar="SECONDS",
        help="keep retrying this long when the study storage stops answering, then exit "
        "(finished trials are kept) (%(default)s)",
    )  # fmt: skip
