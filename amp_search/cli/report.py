"""``amp-search report`` and ``amp-search pick``: read a results directory back."""

from __future__ import annotations

import argparse

from amp_search.cli._base import Subcommand, console

__all__ = ["PickCommand", "ReportCommand", "add_study_storage"]


def add_study_storage(parser: argparse.ArgumentParser) -> None:
    """``--storage``: where report and refine reopen the search's study."""
    parser.add_argument(
        "--storage",
        help="the search's storage URL (default: the one front.json records; give it where "
        "that one's password is hidden)",
    )


#: Unit names 'pick' prints of a fallback set (the rest are counted; all are in the files).
FALLBACK_NAMES = 8


class ReportCommand(Subcommand):
    """Print the Pareto front of a results directory and redraw pareto.png / pareto.html."""

    name = "report"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: D102
        parser.add_argument("results", help="a search's --out folder")
        parser.add_argument("--no-plots", action="store_true", help="only print the table")
        add_study_storage(parser)

    def run(self, args: argparse.Namespace) -> int:  # noqa: D102
        from amp_search.results.refined import is_current, load_refinement
        from amp_search.results.report import load_results

        results = load_results(args.results)
        con = console()
        results.render(con)
        refinement = load_refinement(results.store.root)
        if refinement is not None:
            from amp_search.cli.refine import render

            render(refinement, con)
            if not is_current(refinement, results):
                con.print("refined.json is older than the front: run 'amp-search refine' again.")
        if not args.no_plots:
            import optuna

            from amp_search.results.plots import draw_plots
            from amp_search.search.study import _storage

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            meta = results.meta
            storage = _storage(args.storage or meta["storage"])
            study = optuna.load_study(study_name=meta["study"], storage=storage)
            for path in draw_plots(results.store, study, results.front, meta):
                con.print(f"wrote {path}")
        return 0


class PickCommand(Subcommand):
    """Copy the fastest candidate within a deviation budget (or a given trial) out.

    Prints its latency, deviation and FP32 fallback set: the units kept in FP32. Where the
    front was measured on validation data (search --validation-data / --holdout-fraction),
    that deviation decides: a faster point within the budget on the calibration data but over
    it on the validation data is refused, with both figures.
    """

    name = "pick"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: D102
        parser.add_argument("results", help="a search's --out folder")
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--max-deviation", type=float, help="accuracy budget")
        group.add_argument("--trial", type=int, help="a front point's trial number")
        parser.add_argument("--to", required=True, help="destination folder or .onnx path")
        figures = parser.add_mutually_exclusive_group()
        figures.add_argument(
            "--search-figures", action="store_true",
            help="rank by the search's own figures even where 'amp-search refine' measured again",
        )  # fmt: skip
        figures.add_argument(
            "--refined", action="store_true",
            help="rank by refined.json even when it was measured on the CPU",
        )  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:  # noqa: D102
        from amp_search.results.refined import is_current, load_refinement
        from amp_search.results.report import Results, choose, copy_candidate, load_results
        from amp_search.results.validation import refusal, unmeasured_note, validation_label

        results = load_results(args.results)
        con = console()
        ranked = results
        refinement = None if args.search_figures else load_refinement(results.store.root)
        covered = None if refinement is None else refinement.meta.get("max_deviation")
        budget = args.max_deviation
        on_cpu = refinement is not None and str(refinement.meta.get("device")).startswith("cpu")
        if on_cpu and not args.refined:
            con.print(
                "refined.json was measured on the CPU, where FP16 timings say nothing about a "
                "GPU: ranking by the search's figures (--refined uses it anyway)."
            )
        elif refinement is not None and not is_current(refinement, results):
            con.print(
                "refined.json is older than the front (the search went on): ranking by the "
                "search's figures; run 'amp-search refine' again to use refined ones."
            )
        elif covered is not None and budget is not None and budget > covered:
            con.print(
                f"refined.json covers front points within {covered:g} only: ranking by the "
                f"search's figures; run 'amp-search refine --max-deviation {budget:g}'"
                " to refine the rest."
            )
        elif refinement is not None:
            if args.trial is not None:  # a trial off the refined set keeps its search figures
                refined = {p.trial: p for p in refinement.points}
                front = [refined.get(p.trial, p) for p in results.front]
            else:
                front = refinement.front
            ranked = Results(results.store, {**results.meta, **refinement.meta}, front)
            con.print(f"ranking by refined figures ({refinement.meta['latency_source']} on "
                      f"{refinement.meta['device']}, {refinement.meta['refined']})")  # fmt: skip
        unmeasured = unmeasured_note(ranked.front, ranked.meta)
        if unmeasured:
            con.print(unmeasured)
        choice = choose(ranked, max_deviation=budget, trial=args.trial)
        point = choice.point
        written = copy_candidate(results, point, args.to)
        for p in choice.refused:  # faster, within on the calibration data, over on validation
            con.print(refusal(p, budget, ranked.meta))
        if point is not choice.fastest:
            f = choice.fastest
            con.print(
                f"trial {f.trial} ({f.latency_text(' ms')}) is the fastest within the budget, "
                f"but not distinguishable from trial {point.trial} "
                f"({point.latency_text(' ms')}): their 95% "
                "latency intervals overlap, so the more accurate one is picked (--trial "
                f"{f.trial} takes the other)."
            )
        v = point.validation_deviation
        con.print(
            f"picked trial {point.trial}: {point.latency_text(' ms')} ({point.latency_source}), "
            f"deviation {point.deviation:.3g} ({point.metric})"
            + ("" if v is None else f", {v:.3g} on {validation_label(ranked.meta)}")
        )
        execution = point.metrics.get("execution") or {}
        if "cuda_graph" in execution:
            con.print(
                "timed with CUDA-graph replay: deploy it with CUDA graphs (ONNX Runtime: "
                "enable_cuda_graph=1 with IO binding) to get this speed"
                if execution["cuda_graph"]
                else f"timed without a CUDA graph ({execution.get('cuda_graph_reason', '')})"
            )
        full = next((p for p in written if p.name.endswith("precision.json")), None)
        short = FALLBACK_NAMES < len(point.fp32_units) < point.n_units  # names left out
        con.print(
            f"FP32 fallback set ({len(point.fp32_units)} of {point.n_units} units): "
            + point.fallback_text(FALLBACK_NAMES)
            + (f" (every name in {full})" if short and full is not None else "")
        )
        if point.bf16_units:
            con.print(
                f"BF16 set ({len(point.bf16_units)} of {point.n_units} units): "
                + point.bf16_text(FALLBACK_NAMES)
                + "; the other units run FP16"
            )
        for path in written:
            con.print(f"wrote {path}")
        return 0
