"""Loading and saving ONNX models, external data included, with user-facing errors.

Protobuf cannot serialize a message over 2 GiB, and the upb runtime refuses even to size one
(``ByteSize()`` raises). Models above :data:`PROTOBUF_LIMIT` are therefore sized with
:func:`exceeds_protobuf_limit`, saved with their weights in an external data file, and
serialized for hashing in chunks (:func:`model_to_bytes`). Nothing here mutates the model it
is given (``onnx.save_model`` with external data would clear its weights).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import numpy_helper

from amp_search._atomic import _FILE_MODE, os_error_message
from amp_search.errors import UserInputError

__all__ = [
    "PROTOBUF_LIMIT",
    "copy_without_initializers",
    "exceeds_protobuf_limit",
    "load_model",
    "model_to_bytes",
    "save_model",
    "serialize_within_limit",
    "tensor_nbytes",
    "typed_skeleton",
    "within_protobuf_limit",
]

logger = logging.getLogger(__name__)

#: Models above this size are saved with external data (protobuf's 2 GiB limit, with margin).
PROTOBUF_LIMIT = 2**31 - 2**26
#: Initializers of at least this many bytes go to the external data file of a large model.
_EXTERNAL_THRESHOLD = 1024
#: An initializer as its name and values: written from the array, no TensorProto copy made.
NamedArray = tuple[str, np.ndarray]


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
            f"{p} is not a valid ONNX model (protobuf parse failed: the file is truncated, "
            "corrupt or not ONNX). Check that the file is complete and is an .onnx export."
        ) from exc
    if not model.graph.node or model.ir_version <= 0 or not model.opset_import:
        raise UserInputError(
            f"{p} is not a complete ONNX model (no graph nodes, IR version or opset). Check "
            "that the file is complete and is an .onnx export."
        )
    external = [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in external:
        _check_external_data(p, t)
    if external:
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise UserInputError(
                f"External data of {p.name} could not be read ({str(exc).splitlines()[0]}). "
                "Keep the complete data files next to the model (paths are relative to it)."
            ) from exc
    return model


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))


def _check_external_data(model_path: Path, tensor: onnx.TensorProto) -> None:
    """Says which external data file is missing or short, before onnx reads it."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    name = model_path.name
    if not location or os.path.isabs(location):
        raise UserInputError(
            f"{name} stores tensor {tensor.name!r} in external data at {location!r}; it must "
            "be a path relative to the model's folder. Re-save the model with relative "
            "external data (onnx.save_model(..., save_as_external_data=True))."
        )
    data = model_path.parent / location
    if not data.is_file():
        raise UserInputError(
            f"External data file {location!r} of {name} is missing (tensor {tensor.name!r} "
            f"is stored there; looked in {model_path.parent}). Copy it next to the model."
        )
    try:
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
    except ValueError:
        return  # onnx reports malformed offsets itself
    size = data.stat().st_size
    if end > size:
        raise UserInputError(
            f"External data file {location!r} of {name} is truncated: tensor {tensor.name!r} "
            f"needs {end} bytes, the file has {size}. Copy the complete file again."
        )


def exceeds_protobuf_limit(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too large to serialize as one protobuf message.

    The initializers' sizes are counted from their shapes first: sizing a large message
    with ``ByteSize()`` costs a full serialization before upb refuses it.
    """
    if _inline_weight_bytes(model) > PROTOBUF_LIMIT:
        return True
    try:
        return bool(model.ByteSize() > PROTOBUF_LIMIT)
    except (EncodeError, ValueError):  # upb refuses to size a message over 2 GiB
        return True


def serialize_within_limit(model: onnx.ModelProto) -> bytes | None:
    """The model's serialization, or None when it is over :data:`PROTOBUF_LIMIT`.

    One serialization instead of :func:`exceeds_protobuf_limit`'s ``ByteSize()`` (a full
    sizing pass) followed by one.
    """
    if _inline_weight_bytes(model) > PROTOBUF_LIMIT:
        return None
    try:
        data = model.SerializeToString()
    except (EncodeError, ValueError):  # upb refuses a message over 2 GiB
        return None
    return data if len(data) <= PROTOBUF_LIMIT else None


def within_protobuf_limit(nbytes: int) -> bool:
    """Whether ``nbytes`` of weights fit one protobuf message (:data:`PROTOBUF_LIMIT`)."""
    return nbytes <= PROTOBUF_LIMIT


def _inline_weight_bytes(model: onnx.ModelProto) -> int:
    """The initializers' sizes from their shapes (no serialization)."""
    return sum(
        tensor_nbytes(t)
        for t in model.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL and t.data_type in _ITEMSIZE
    )


def _itemsizes() -> dict[int, int]:
    sizes = {}
    for dt in onnx.TensorProto.DataType.values():
        if dt == onnx.TensorProto.STRING:
            continue
        try:
            sizes[dt] = onnx.helper.tensor_dtype_to_np_dtype(dt).itemsize
        except (KeyError, TypeError, ValueError):
            continue  # UNDEFINED
    return sizes


_ITEMSIZE = _itemsizes()


def model_to_bytes(model: onnx.ModelProto) -> bytes:
    """The model's protobuf serialization, also for models over the protobuf limit.

    A large model is encoded in chunks: the model without initializers, then a second
    ``graph`` field holding only the initializers (protobuf merges repeated message fields),
    so no whole-model message is ever serialized. The bytes identify the model (its digest);
    only readers without the 2 GiB limit can parse them back.
    """
    if not exceeds_protobuf_limit(model):
        data: bytes = model.SerializeToString()
        return data
    from amp_search.graph.precision import _field, _field_header

    skeleton = copy_without_initializers(model)
    body = []
    for t in model.graph.initializer:
        try:
            body.append(_field(5, t.SerializeToString()))
        except (EncodeError, ValueError) as exc:
            raise UserInputError(
                f"Initializer {t.name!r} alone is over 2 GiB, which protobuf cannot encode. "
                "Split it into smaller tensors."
            ) from exc
    header = _field_header(7, sum(len(b) for b in body))
    return b"".join([skeleton.SerializeToString(), header, *body])


def copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose graph has no initializers (weights are never copied)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    return out


def typed_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each large initializer declared as a typed graph input instead.

    Enough for shape inference to give every tensor its element type (small initializers,
    such as Reshape targets, stay for data propagation) without serializing the weights:
    seconds per GiB, and impossible over 2 GiB.
    """
    out = copy_without_initializers(model)
    inputs = {i.name for i in out.graph.input}
    for t in model.graph.initializer:
        if tensor_nbytes(t) < _EXTERNAL_THRESHOLD:
            out.graph.initializer.append(t)
        elif t.name not in inputs:
            out.graph.input.append(
                onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            )
    return out


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """A tensor's size in bytes from its shape and type (its data is not read)."""
    return int(math.prod(t.dims)) * _ITEMSIZE.get(t.data_type, 8)


def _copy_fields(src: object, dst: object, skip: str) -> None:
    for fd, value in src.ListFields():  # type: ignore[attr-defined]
        if fd.name == skip:
            continue
        target = getattr(dst, fd.name)
        if hasattr(value, "extend"):  # a repeated field
            target.extend(value)
        elif fd.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    initializers: Iterable[onnx.TensorProto | NamedArray] | None = None,
) -> Path:
    """Saves a model atomically; models above 2 GiB get an external data file beside them.

    The large-model branch writes ``<name>.data`` (every initializer of 1 KiB or more) and a
    model file that refers to it; ``model`` itself is not modified.

    Args:
        model: The model to save.
        path: Destination ``.onnx`` path; the parent folder is created.
        initializers: Written in place of ``model``'s own, always with external data, one at
            a time as they come (made as they are written, the weights are never held
            whole): TensorProtos, or ``(name, array)`` pairs.

    Raises:
        UserInputError: The folder cannot be written (permissions, disk full, read-only).
    """
    p = Path(path)
    tmps: list[str] = []
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        tmps.append(tmp)
        os.close(fd)
        if initializers is not None or exceeds_protobuf_limit(model):
            data_name = p.name + ".data"
            fd, data_tmp = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=p.parent)
            tmps.append(data_tmp)
            with os.fdopen(fd, "wb") as f:
                skeleton = _externalize(model, f, data_name, initializers)
                f.flush()
                os.fsync(f.fileno())
            with open(tmp, "wb") as f:
                f.write(skeleton.SerializeToString())
            os.chmod(data_tmp, _FILE_MODE)
            os.replace(data_tmp, p.parent / data_name)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, p)
    except OSError as exc:
        raise UserInputError(os_error_message(p, exc)) from exc
    finally:
        for t in tmps:
            if os.path.exists(t):
                os.unlink(t)
    return p


def _externalize(
    model: onnx.ModelProto,
    f: object,
    data_name: str,
    initializers: Iterable[onnx.TensorProto | NamedArray] | None = None,
) -> onnx.ModelProto:
    """Writes the large initializers to ``f``; returns the model referring to them.

    ``initializers`` are written instead of ``model``'s own (see :func:`save_model`).
    """
    out = copy_without_initializers(model)
    offset = 0
    for item in model.graph.initializer if initializers is None else initializers:
        t, raw = _with_bytes(item)
        if raw is None or len(raw) < _EXTERNAL_THRESHOLD:
            out.graph.initializer.append(t)
            continue
        ref = out.graph.initializer.add()
        _copy_fields(t, ref, skip="raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            ref.ClearField(field)
        ref.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(offset)),
                           ("length", str(len(raw)))):  # fmt: skip
            entry = ref.external_data.add()
            entry.key, entry.value = key, value
        f.write(raw)  # type: ignore[attr-defined]
        offset += len(raw)
    return out


def _with_bytes(
    item: onnx.TensorProto | NamedArray,
) -> tuple[onnx.TensorProto, bytes | memoryview | None]:
    """An initializer and its data's little-endian bytes (None: strings).

    A ``(name, array)`` pair becomes a TensorProto only when small (kept inline); a large
    one gets a header without data, and its bytes are the array's own memory, not a copy.
    """
    if isinstance(item, onnx.TensorProto):
        raw = item.raw_data if item.HasField("raw_data") else None
        if raw is None and item.data_type != onnx.TensorProto.STRING:  # typed fields: re-encode
            raw = numpy_helper.from_array(numpy_helper.to_array(item)).raw_data
        return item, raw
    name, values = item
    if values.nbytes < _EXTERNAL_THRESHOLD:
        return numpy_helper.from_array(values, name), None
    values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    header = onnx.TensorProto(
        name=name,
        data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype),
        dims=values.shape,
    )
    return header, values.reshape(-1).view(np.uint8).data
