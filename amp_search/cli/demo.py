"""``amp-search demo``: the whole workflow on the embedded default model, no GPU, no download."""

from __future__ import annotations

import argparse
from pathlib import Path

from amp_search.cli._base import Subcommand, console
from amp_search.cli._progress import stage_progress

__all__ = ["DemoCommand"]


class DemoCommand(Subcommand):
    """Run amp-search on its embedded demo model (a small FP16-fragile CNN, CPU only).

    Writes the model and its calibration data to --out, then prints the FP16 risk report:
    the unnormalized convolution stack that overflows FP16, the layer with weights that
    flush to zero, and the layers FP16 handles fine.
    """

    name = "demo"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: D102
        parser.add_argument(
            "--out", default="results/demo", help="folder for the demo's files (%(default)s)"
        )

    def run(self, args: argparse.Namespace) -> int:  # noqa: D102
        import numpy as np

        from amp_search.demo import build_demo_model, demo_data
        from amp_search.graph import save_model
        from amp_search.profiling.report import inspect_model

        out = Path(args.out)
        model_path = save_model(build_demo_model(), out / "demo.onnx")
        data_path = out / "demo_data.npz"
        np.savez(data_path, **demo_data())
        con = console()
        con.print(f"demo model: {model_path}  calibration data: {data_path}")
        with stage_progress() as progress:
            report = inspect_model(model_path, data_path, progress=progress)
        report.render(con, top=0)
        json_path = report.write_json(out / "inspect.json")
        con.print(f"report written to {json_path}")
        return 0
