"""``amp-search demo``: the whole workflow on the embedded default model, no GPU, no download."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from amp_search.cli._base import Subcommand, console

__all__ = ["DemoCommand"]


class DemoCommand(Subcommand):
    """Run a complete search on the embedded demo model (a small FP16-fragile CNN, CPU only).

    The model has an unnormalized convolution stack whose activations pass 65504 (all-FP16
    overflows to inf), a layer whose weights flush to zero in FP16, and layers FP16 handles
    fine. The demo writes it and its calibration data to --out, searches 40 trials with the
    ONNX Runtime CPU backend (accuracy) and the H100 roofline estimate (latency), prints the
    front, and draws pareto.png. Then try: amp-search pick OUT --max-deviation 0.01 --to m.onnx
    """

    name = "demo"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: D102
        parser.add_argument(
            "--out", default="results/demo", help="folder for the demo's files (%(default)s)"
        )
        parser.add_argument("--n-trials", type=int, default=40, help="trials (%(default)s)")

    def run(self, args: argparse.Namespace) -> int:  # noqa: D102
        import numpy as np

        from amp_search.cli.search import run_with_progress
        from amp_search.demo import build_demo_model, demo_data
        from amp_search.graph import save_model
        from amp_search.search import SearchConfig

        out = Path(args.out)
        model_path = save_model(build_demo_model(), out / "demo.onnx")
        data_path = out / "demo_data.npz"
        if not data_path.exists():
            np.savez(data_path, image=demo_data()["image"])
        console().print(f"demo model: {model_path}  calibration data: {data_path}")
        config = SearchConfig(
            model=model_path,
            out=out,
            data=data_path,
            n_trials=args.n_trials,
            storage=f"sqlite:///{(out / 'study.db').as_posix()}",
            study_name="amp-search-demo",
        )
        code = run_with_progress(config, " ".join(shlex.quote(a) for a in sys.argv))
        console().print(
            f"Next: amp-search pick {out} --max-deviation 0.01 --to {out / 'picked.onnx'}"
        )
        return code
