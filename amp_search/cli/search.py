"""``amp-search search``: the Pareto front of speed versus accuracy."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from amp_search.cli._base import Subcommand, console, shown_command
from amp_search.cli.inspect import add_data_arguments
from amp_search.cli.worker import add_storage_retry
from amp_search.keys import BASELINES
from amp_search.search.sampler import DEFAULT_SAMPLER, SAMPLERS

__all__ = [
    "SearchCommand",
    "add_option_argument",
    "add_validation_arguments",
    "parse_options",
    "print_outcome",
]


def parse_options(
    values: list[str] | None, threads: int = 0, device: str = "cpu"
) -> dict[str, Any]:
    """``--option KEY=VALUE`` flags as a dict (values parsed as JSON where they are).

    On the CPU, ``--threads N`` (N > 0) becomes ONNX Runtime's ``intra_op_num_threads``
    unless an option sets it.
    """
    from amp_search.errors import UserInputError

    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserInputError(f"--option expects KEY=VALUE, got {item!r}.")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    if threads > 0 and device.startswith("cpu"):
        out.setdefault("intra_op_num_threads", threads)
    return out


def add_option_argument(parser: argparse.ArgumentParser) -> None:
    """``--option KEY=VALUE`` (repeatable), shared by search and refine."""
    parser.add_argument(
        "--option", action="append", metavar="KEY=VALUE",
        help="backend option, e.g. prefer_nhwc=1 or builder_optimization_level=0 (repeatable; "
        "recorded with results)",
    )  # fmt: skip


def add_validation_arguments(parser: argparse.ArgumentParser, *, holdout: bool = True) -> None:
    """``--validation-data`` (and ``--holdout-fraction``): data the search never optimizes on."""
    parser.add_argument(
        "--validation-data", metavar="PATH",
        help="a second data set (as --data) never searched on: every front point's deviation "
        "on it is measured too, and 'pick --max-deviation' checks that figure",
    )  # fmt: skip
    if holdout:
        parser.add_argument(
            "--holdout-fraction", type=float, default=0.0, metavar="F",
            help="without --validation-data: hold out the last ceil(F*n) of the n calibration "
            "batches as validation data, e.g. 0.25 (default 0: off)",
        )  # fmt: skip


class SearchCommand(Subcommand):
    """Search per-unit FP16/FP32 precisions for the Pareto front of latency vs. deviation.

    An Optuna study (persisted: rerunning the same command resumes it) treats each unit's
    precision as a decision variable. It is seeded with all-FP32, all-FP16 and a few
    assignments that keep the first units FP32 (with --sampler tpe|nsga2|random: the risk
    ladder of 'amp-search inspect'); the guided sampler then proposes the candidate of largest
    expected hypervolume improvement. Each candidate is rewritten, built and run on the
    calibration data; its deviation from strict FP32 and its latency are the two objectives.
    Results go to --out: front.json/.csv, pareto.png/.html and one folder per candidate.
    With --validation-data (or --holdout-fraction), every front point's deviation on data the
    search never optimized on is measured at the end; 'pick' checks that figure.
    Ctrl-C stops after the running trial; 'amp-search refine' then re-times the front.
    """

    name = "search"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: D102
        parser.add_argument("model", help="the ONNX model")
        add_data_arguments(parser)
        add_validation_arguments(parser)
        parser.add_argument("--backend", default="onnxruntime", help="onnxruntime | tensorrt")
        parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        add_option_argument(parser)
        parser.add_argument(
            "--n-trials", type=int, default=60,
            help="distinct candidates the study should hold (%(default)s); rerunning the "
            "same command resumes up to it",
        )  # fmt: skip
        parser.add_argument("--timeout", type=float, help="stop after this many seconds")
        parser.add_argument(
            "--max-deviation", type=float,
            help="accuracy budget: candidates above it are infeasible (an Optuna constraint)",
        )  # fmt: skip
        parser.add_argument(
            "--metric", default="rel_l2",
            help="rel_l2 (default), max_abs, mean_abs, cosine, top1, or file.py:function",
        )  # fmt: skip
        parser.add_argument(
            "--record-metric", action="append", default=[], metavar="NAME",
            help="also record this accuracy metric per trial (repeatable; each costs a pass "
            "over every output)",
        )  # fmt: skip
        parser.add_argument(
            "--latency", choices=("measured", "estimated"),
            help="measured by the backend, or a roofline estimate for --target "
            "(default: estimated on cpu, measured on cuda)",
        )  # fmt: skip
        parser.add_argument("--target", default="h100", help="GPU of the estimate: h100 | h200")
        parser.add_argument(
            "--timing-target", type=float, default=0.02,
            help="measured latency: time each candidate until its 95%% interval is within "
            "+-this (%(default)s)",
        )  # fmt: skip
        parser.add_argument(
            "--timing-max-s", type=float, default=8.0,
            help="measured latency: seconds of timing per candidate at most (%(default)s)",
        )  # fmt: skip
        parser.add_argument("--storage", help="Optuna storage URL (default sqlite in studies/); "
                            "${VAR} in it is read from the environment")  # fmt: skip
        parser.add_argument("--study", dest="study_name", help="study name (default: model)")
        parser.add_argument("--out", default=None, help="results folder (results/<model>)")
        parser.add_argument("--seed", type=int, default=0, help="sampler seed (%(default)s)")
        parser.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS,
                            help="how candidates are proposed (%(default)s)")  # fmt: skip
        parser.add_argument("--threshold", type=float, default=10000.0,
                            help="near-overflow threshold of the risk report")  # fmt: skip
        parser.add_argument(
            "--precisions", default="fp16", metavar="fp16,bf16",
            help="the formats a unit may take besides FP32: fp16 (default), bf16, or fp16,bf16 "
            "(BF16 keeps FP32's range where FP16 overflows; see the README)",
        )  # fmt: skip
        parser.add_argument(
            "--max-units", type=int,
            help="merge consecutive units into at most this many decision variables "
            "(keeps models with hundreds of layers searchable)",
        )  # fmt: skip
        parser.add_argument(
            "--keep-models", default="all", choices=("all", "front"),
            help="front: remove the model files of candidates beaten on both latency and "
            "deviation (a long search on a large model writes tens of GB otherwise) "
            "(%(default)s)",
        )  # fmt: skip
        add_storage_retry(parser)

    def run(self, args: argparse.Namespace) -> int:  # noqa: D102
        from amp_search.calibration import parse_shapes
        from amp_search.search import SearchConfig
        from amp_search.types import parse_precisions

        model = Path(args.model)
        config = SearchConfig(
            model=model,
            out=Path(args.out or f"results/{model.stem}"),
            data=Path(args.data) if args.data else None,
            synthetic=args.synthetic,
            shapes={k: list(v) for k, v in parse_shapes(args.shape).items()},
            backend=args.backend,
            device=args.device,
            options=parse_options(args.option, args.threads, args.device),
            n_trials=args.n_trials,
            timeout=args.timeout,
            max_deviation=args.max_deviation,
            metric=args.metric,
            latency=args.latency,
            target=args.target,
            timing_target=args.timing_target,
            timing_max_s=args.timing_max_s,
            storage=args.storage,
            study_name=args.study_name,
            seed=args.seed,
            sampler=args.sampler,
            threshold=args.threshold,
            precisions=tuple(p.value for p in parse_precisions(args.precisions)),
            max_units=args.max_units,
            record_metrics=tuple(args.record_metric),
            storage_retry_s=args.storage_retry,
            keep_models=args.keep_models,
            validation_data=Path(args.validation_data) if args.validation_data else None,
            holdout_fraction=args.holdout_fraction,
        )
        return run_with_progress(config, shown_command(sys.argv))


def run_with_progress(config: Any, command: str) -> int:
    """Runs a search with its progress shown, prints the outcome; returns the exit code.

    The last line says how it ended: ``search done: N trials (F failed) in S s; front of K
    points in OUT`` (``search failed: ...`` and exit code 1 when no trial gave a front and
    no --max-deviation explains an empty one), or, when Ctrl-C stopped it, how many trials
    ran, where the front so far is and how to resume (exit code 130, as for any interrupted
    command).
    """
    from amp_search.cli._progress import search_progress
    from amp_search.search import run_search

    t0 = time.perf_counter()
    with search_progress() as (lines, stage, trial):
        outcome = run_search(config, progress=trial, stage=stage)
    print_outcome(outcome)
    seconds = time.perf_counter() - t0
    if outcome.interrupted:
        lines.end(
            f"interrupted by Ctrl-C after {lines.trials} trial(s) in {seconds:.1f}s; the front "
            f"so far is in {outcome.out}; run the same command to resume: {command}"
        )
        return 130
    passed = bool(outcome.front) or config.max_deviation is not None
    k = len(outcome.front)
    lines.end(
        f"search {'done' if passed else 'failed'}: {outcome.n_trials} trials "
        f"({outcome.n_failed} failed) in {seconds:.0f} s; "
        + (f"front of {k} point{'' if k == 1 else 's'}" if passed else "no front")
        + f" in {outcome.out}"
    )
    return 0 if passed else 1


def baseline_lines(results: Any) -> list[tuple[str, str]]:
    """The uniform baselines: figures, and where they stand against the front, with why."""
    out = []
    for name in BASELINES:
        b = results.baselines.get(name)
        if not b:
            continue
        lat, dev = float(b["latency_ms"]), float(b["deviation"])
        if any(p.trial == b["trial"] or p.digest == b.get("digest") for p in results.front):
            where = "on the front"
        elif not b["feasible"]:
            where = (
                "infeasible: its outputs hold inf/NaN"
                if dev == float("inf")
                else "infeasible: over the --max-deviation budget"
            )
        else:
            better = [p for p in results.front if p.latency_ms <= lat and p.deviation <= dev]
            if better:
                p = min(better, key=lambda q: q.latency_ms)
                where = (
                    f"dominated by trial {p.trial} ({p.latency_ms:.4g} ms, deviation "
                    f"{p.deviation:.3g}): faster and at least as accurate"
                )
            else:
                where = "dominated"
        out.append((name, f"{lat:.4g} ms, deviation {dev:.3g} ({where})"))
    return out


def print_outcome(outcome: Any) -> None:
    """The front table and where the files are."""
    from amp_search.results.report import load_results

    con = console()
    results = load_results(outcome.out)
    results.render(con)
    for name, line in baseline_lines(results):
        con.print(f"{name}: {line}")
    con.print(
        f"{outcome.n_complete} complete, {outcome.n_failed} failed of {outcome.n_trials} trials"
        " in the study"
    )
    plot = outcome.out / "pareto.png"
    con.print(f"results: {outcome.out}  plot: {plot if plot.exists() else '(not drawn)'}")
    con.print(f"study: {outcome.study_name} in {outcome.storage} (opens in optuna-dashboard)")
    for note in outcome.notes:
        if note not in results.meta.get("notes", []):
            con.print(f"Note: {note}", style="dim")
