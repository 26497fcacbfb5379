"""Writes the real models and their calibration data into one folder for the GPU machine.

The device machine has no PyPI and no scikit-image; this runs here and the folder is carried
(``.gpu/models``, ignored by git). Batch sizes are what a user would deploy: 48 text crops for
the classifier and the recognizer, one 736x1472 page for the detector, 8 sentences for MiniLM,
8 pages of 800x608 for the layout detector. The two recurrent models have fixed-size batches,
so their ``.npz`` hold stacks of batches: 8 single text crops (64x320) for ddddocr's
recognizer, the 9 alsa-utils recordings (48 frames of 576 samples, zero states) for Silero VAD.
MiniLM's ONNX (90 MB) is split into parts below the carry limit. The layout detector's model
and its (compressed, 24 MB) ``.npz`` go to a folder of their own, ``<DIR>/../layout``: with
``<DIR>`` (42 MB) they would pass the 64 MiB carry limit, so carry that folder in its own call
and copy its two files next to the others' there. ddddocr's recognizer (54 MB) likewise goes
to ``<DIR>/../ddddocr``, a carry of its own.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_search.testing import realmodels  # noqa: E402

BATCH = {"ppocr_cls": 48, "ppocr_rec": 48, "ppocr_det": 1, "minilm": 8, "layout_picodet": 8,
         "ddddocr_rec": 8, "silero_vad": 9}  # fmt: skip
#: Models written to ``<DIR>/../<folder>`` instead of ``<DIR>`` (each a carry of its own).
OWN_FOLDER = {"layout_picodet": "layout", "ddddocr_rec": "ddddocr"}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu/models")
    out.mkdir(parents=True, exist_ok=True)
    for name, n in BATCH.items():
        src = realmodels.fetch(name)
        if name in OWN_FOLDER:
            folder = out.parent / OWN_FOLDER[name]
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{name}.npz", "wb") as handle:
                np.savez_compressed(handle, **realmodels.calibration(name, n))  # type: ignore[arg-type]
            shutil.copyfile(src, folder / f"{name}.onnx")
            print(name, "ready in", folder)
            continue
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
