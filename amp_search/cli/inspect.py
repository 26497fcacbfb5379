"""``amp-search inspect``: the per-unit FP16 (and BF16) risk report."""

from __future__ import annotations

import argparse

from amp_search.cli._base import Subcommand, console
from amp_search.cli._progress import stage_progress
from amp_search.profiling.sensitivity import DEFAULT_THRESHOLD

__all__ = ["InspectCommand", "add_data_arguments"]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` / ``--synthetic``, shared by subcommands that run the model."""
    parser.add_argument(
        "--data",
        metavar="PATH",
        help=".npz with arrays named after the model inputs, or a folder of .npz files "
        "(an array of the input's rank is one batch; one extra leading axis stacks batches)",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="use random inputs instead of --data (a warning: ranges will not be realistic)",
    )
    parser.add_argument(
        "--shape", action="append", default=[], metavar="NAME:1x3x640x640",
        help="with --synthetic: the size of an input with dynamic axes (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime CPU threads (0: its default)"
    )


class InspectCommand(Subcommand):
    """Per-unit FP16 risk report: ranges, underflow, overflow and measured FP16 deviation.

    One FP32 pass over the calibration data with every tensor exposed (max |x|, FP16
    subnormal / flush-to-zero fractions, overflow, NaN/Inf), then one pass of the all-FP16
    model comparing each unit's outputs with FP32 (relative L2, fraction more than 10% off).
    With --precisions fp16,bf16 an all-BF16 pass too: each unit's BF16 deviation beside the
    FP16 one ("withheld" where the model's opset has no bfloat16 for its ops), and the units
    where BF16 stays finite while FP16 overflows are named. Units are listed riskiest first.
    Batches run one at a time, so memory stays bounded by one batch's activations.
    """

    name = "inspect"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: D102
        parser.add_argument("model", help="the ONNX model")
        add_data_arguments(parser)
        parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
        parser.add_argument(
            "--threshold",
            type=float,
            default=DEFAULT_THRESHOLD,
            help="|x| above which an activation counts as near overflow (default %(default)g)",
        )
        parser.add_argument(
            "--top", type=int, default=30, help="rows to print (0: all; --json has all)"
        )
        parser.add_argument(
            "--no-cache",
            action="store_true",
            help="profile again even where an earlier run on the same model and data is cached",
        )
        parser.add_argument(
            "--precisions",
            default="fp16",
            metavar="fp16[,bf16]",
            help="low precisions to measure, each by an all-low pass: fp16 (default), bf16 or "
            "fp16,bf16 (BF16 deviation column, and the units where BF16 rescues FP16)",
        )
        parser.add_argument(
            "--no-fp16-pass",
            action="store_true",
            help="skip the all-FP16 pass (ranges only; faster)",
        )

    def run(self, args: argparse.Namespace) -> int:  # noqa: D102
        from amp_search._atomic import check_writable
        from amp_search.calibration import parse_shapes
        from amp_search.profiling.inspection import inspect_model
        from amp_search.types import parse_precisions

        precisions = parse_precisions(args.precisions)
        if args.json:
            check_writable(args.json)  # before the profile, not after it
        with stage_progress() as progress:
            report = inspect_model(
                args.model,
                args.data,
                synthetic=args.synthetic,
                shapes=parse_shapes(args.shape),
                threshold=args.threshold,
                fp16_pass=not args.no_fp16_pass,
                threads=args.threads,
                progress=progress,
                cache=not args.no_cache,
                precisions=precisions,
            )
        report.render(console(), top=args.top)
        if report.extra.get("cached_profile"):
            console().print("Profile reused from an earlier run on the same model and data "
                            "(--no-cache profiles again).")  # fmt: skip
        if args.json:
            path = report.write_json(args.json)
            console().print(f"JSON report written to {path}")
        return 0
