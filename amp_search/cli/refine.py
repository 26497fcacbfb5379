"""``amp-search refine``: the front rebuilt with final options and timed again, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amp_search.cli._base import Subcommand, console

if TYPE_CHECKING:
    from amp_search.calibration import CalibrationData
    from amp_search.results.refined import Refinement
    from amp_search.results.report import Results
    from amp_search.search.validation import ValidationSet

__all__ = ["RefineCommand"]


class RefineCommand(Subcommand):
    """Rebuild the front (within the budget), all-FP32 and all-FP16, and measure them again.

    Each is built on --device with the final options (TensorRT: builder optimization level
    back to its default unless --option sets it), its deviation measured there against the
    strict FP32 reference, and all are timed in interleaved rounds so drift hits them alike.
    Writes refined.json into the results folder; 'amp-search pick' then prefers these figures.
    A search run on the CPU with estimated latency can be refined on the GPU machine. Each
    point's deviation on validation data is measured too: --validation-data, else the
    search's own (its --validation-data file, or its held-out batches) when refining on the
    search's calibration data.
    """

    name = "refine"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: D102
        from amp_search.cli.inspect import add_data_arguments
        from amp_search.cli.report import add_study_storage
        from amp_search.cli.search import add_option_argument, add_validation_arguments

        parser.add_argument("results", help="a search's --out folder")
        add_data_arguments(parser)
        add_validation_arguments(parser, holdout=False)
        parser.add_argument("--device", help="where to measure (default: the search's device)")
        add_study_storage(parser)
        add_option_argument(parser)
        parser.add_argument(
            "--compare", action="append", default=[], metavar="MODEL.onnx",
            help="another model with the same inputs and outputs (the one in production, "
            "another tool's answer) measured alike, for comparison (repeatable)",
        )  # fmt: skip
        for flag, default, what in (
            ("--pairs", 20, "timing windows per candidate, each paired with all-FP32's"),
            ("--rounds", 5, "interleaved rounds the windows are split over"),
        ):
            parser.add_argument(flag, type=int, default=default, help=f"{what} (%(default)s)")
        parser.add_argument(
            "--target", type=float, default=0.02,
            help="then more windows where a 95%% interval is wider than +-this (%(default)s)",
        )  # fmt: skip
        parser.add_argument(
            "--max-deviation", type=float,
            help="refine front points within this budget only (default: the search's budget, "
            "else the whole front)",
        )  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:  # noqa: D102
        from amp_search.cli._progress import stage_progress
        from amp_search.cli.search import parse_options
        from amp_search.results.report import load_results
        from amp_search.search.refine import refine_front

        results = load_results(args.results)
        data, validation = _calibration(results, args)
        device = args.device or str(results.meta.get("device", "cpu"))
        options = parse_options(args.option, args.threads, device)
        with stage_progress() as stage:
            refinement = refine_front(
                results, data=data, device=device, options=options,
                pairs=args.pairs, rounds=args.rounds, target=args.target,
                max_deviation=args.max_deviation, compare=args.compare, progress=stage,
                validation=validation,
            )  # fmt: skip
        con = console()
        render(refinement, con)
        con.print(f"wrote {results.store.root / 'refined.json'}")
        return 0


def _calibration(
    results: Results, args: argparse.Namespace
) -> tuple[CalibrationData, ValidationSet | None]:
    """--data/--synthetic as given, else the search's own (from its study, split as it was).

    The validation data: --validation-data, else the search's own where the calibration data
    is the search's too (its --validation-data file, or the batches it held out).
    """
    from amp_search.calibration import load_calibration, model_inputs, parse_shapes
    from amp_search.errors import UserInputError
    from amp_search.graph import load_model, sanitize
    from amp_search.search.validation import prepare_validation

    data, synthetic, shapes = args.data, args.synthetic, parse_shapes(args.shape)
    validation, holdout = args.validation_data, 0.0
    if data is None and not synthetic:
        saved = _search_config(results, args.storage)
        data, synthetic = saved.get("data"), bool(saved.get("synthetic"))
        shapes = {k: tuple(v) for k, v in (saved.get("shapes") or {}).items()}
        if data is None and not synthetic:
            raise UserInputError(
                "The search's calibration data is not recorded in its study, or the study did "
                "not open: pass --data (or --storage where front.json hides its password)."
            )
        holdout = float(saved.get("holdout_fraction") or 0.0)  # split as the search split it
        if validation is None and saved.get("validation_data"):
            validation = saved["validation_data"]
            if not Path(validation).exists():
                raise UserInputError(
                    f"The search's validation data {validation} is not there any more: pass "
                    "--validation-data (refined.json records which data each figure came from)."
                )
    model = sanitize(load_model(str(results.meta.get("model"))))
    inputs = model_inputs(model)
    calibration = load_calibration(data, inputs, synthetic=synthetic, shapes=shapes)
    if holdout:
        calibration, held = prepare_validation(calibration, inputs, None, holdout)
        if validation is None:
            return calibration, held
    return prepare_validation(calibration, inputs, validation)


def _search_config(results: Results, storage: str | None) -> dict[str, Any]:
    import optuna

    from amp_search.keys import CONFIG_ATTR
    from amp_search.search.study import _storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    meta = results.meta
    try:
        study = optuna.load_study(study_name=meta["study"],
                                  storage=_storage(storage or meta["storage"]))  # fmt: skip
    except Exception:  # a moved or deleted study: the caller asks for --data
        return {}
    return dict(study.user_attrs.get(CONFIG_ATTR) or {})


def render(refinement: Refinement, con: Any) -> None:
    """Prints every refined point, fastest first, and the fastest within the budget."""
    from rich.table import Table

    from amp_search.results.refined import summarize

    m = refinement.meta
    t = m["timing"]
    ref = m.get("reference") or {}
    graph = (ref.get("execution") or {}).get("cuda_graph")
    table = Table(
        title=f"Refined on {m['backend']} ({m['device']}): {t.get('pairs')} windows each in "
        f"{t['rounds']} interleaved rounds, paired with all-FP32, {t['timer']}"
        + ("" if graph is None else f", CUDA graph {'on' if graph else 'off'}"),
        title_justify="left",
    )
    validated = any(p.validation_deviation is not None
                    for p in [*refinement.points, *refinement.compared])  # fmt: skip
    for col in ("point", "latency ms (95% interval)", "search ms", "deviation", "search dev.",
                *(("validation dev.",) if validated else ()), "FP32 units", "vs all-FP32",
                "front"):  # fmt: skip
        table.add_column(col)
    on_front = {p.digest for p in refinement.front}
    for p in [*refinement.points, *refinement.compared]:
        mx = p.metrics
        compared = "path" in mx
        speed = p.speedup()
        table.add_row(
            refinement.label(p),
            p.latency_text(),
            "-" if compared else f"{float(mx['search_latency_ms']):.4g}",
            f"{p.deviation:.3g}",
            "-" if compared else f"{float(mx['search_deviation']):.3g}",
            *((_figure(p.validation_deviation),) if validated else ()),
            "-" if compared else f"{p.n_fp32}/{p.n_units}",
            "-" if speed is None else f"{speed[0]:.2f}x [{speed[1]:.2f}, {speed[2]:.2f}]",
            "compared"
            if compared
            else "yes"
            if p.digest in on_front
            else "infeasible"
            if not p.feasible
            else "",
        )
    con.print(table)
    con.print(f"latency: {m['latency_source']}; deviation: {m['metric']} vs strict FP32")
    if validated:
        from amp_search.results.validation import validation_label

        con.print(f"validation dev.: on {validation_label(m)}, never searched on; a budget is "
                  "checked against it")  # fmt: skip
    for line in summarize(refinement, m.get("max_deviation")):
        con.print(line)
    for f in refinement.failed:
        con.print(f"{f['label']} failed here: {f['error']}")
    for note in m.get("notes", []):
        con.print(f"Note: {note}", style="dim")


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
