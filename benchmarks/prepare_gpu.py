"""Writes the real models and their calibration data into one folder for the GPU machine.

The device machine has no PyPI and no scikit-image; this runs here and the folder is carried
(``.gpu/models``, ignored by git). Batch sizes are what a user would deploy: 48 text crops for
the classifier and the recognizer, one 736x1472 page for the detector, 8 sentences for MiniLM.
MiniLM's ONNX (90 MB) is split into parts below the carry limit.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_search.testing import realmodels  # noqa: E402

BATCH = {"ppocr_cls": 48, "ppocr_rec": 48, "ppocr_det": 1, "minilm": 8}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu/models")
    out.mkdir(parents=True, exist_ok=True)
    for name, n in BATCH.items():
        src = realmodels.fetch(name)
        realmodels.write_npz(name, out / f"{name}.npz", n)
        if name == "minilm":
            data = src.read_bytes()
            half = len(data) // 2
            for i, part in enumerate((data[:half], data[half:])):
                part_dir = out.parent / f"minilm{i}"
                part_dir.mkdir(parents=True, exist_ok=True)
                (part_dir / f"minilm.onnx.part{i}").write_bytes(part)
        else:
            shutil.copyfile(src, out / f"{name}.onnx")
        print(name, "ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
