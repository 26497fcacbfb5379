"""Loading and saving ONNX models, external data included, with user-facing errors."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from amp_search._atomic import _FILE_MODE
from amp_search.errors import UserInputError

__all__ = ["PROTOBUF_LIMIT", "load_model", "model_to_bytes", "save_model"]

logger = logging.getLogger(__name__)

#: Models above this size are saved with external data (protobuf's 2 GiB limit, with margin).
PROTOBUF_LIMIT = 2**31 - 2**26


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Loads an ONNX model (with its external data) or raises :class:`UserInputError`.

    Args:
        path: The ``.onnx`` file.
    """
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"Model file not found: {p}. Check the path.")
    if p.stat().st_size == 0:
        raise UserInputError(f"Model file is empty: {p}. Re-export the model.")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(
            f"{p} is not a valid ONNX model (protobuf parse failed). "
            "Check that the file is complete and is an .onnx export.",
            notes=[str(exc)[:200]],
        ) from exc
    if not model.graph.node or model.ir_version <= 0 or not model.opset_import:
        raise UserInputError(
            f"{p} does not look like an ONNX model (no graph nodes, IR version or opset). "
            "Check that the file is an .onnx export."
        )
    if _uses_external_data(model):
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except (OSError, onnx.checker.ValidationError) as exc:
            raise UserInputError(
                f"External data of {p.name} is missing: {exc}. "
                "Keep the data files next to the model (paths are relative to it).",
            ) from exc
    return model


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def model_to_bytes(model: onnx.ModelProto) -> bytes:
    """Serializes a model below the protobuf limit; larger ones must be saved to a file."""
    data: bytes = model.SerializeToString()
    return data


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Saves a model atomically; models above 2 GiB get an external data file beside them.

    Args:
        model: The model to save.
        path: Destination ``.onnx`` path; the parent folder is created.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:
            data_name = p.name + ".data"
            onnx.save_model(
                model,
                tmp,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p
