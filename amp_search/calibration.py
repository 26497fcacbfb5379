"""Calibration data: loading, validating against the model's inputs, and batching.

Accepted forms:

- an ``.npz`` file whose arrays are named after the model inputs;
- a folder of such files (read in name order, one file in memory at a time);
- ``synthetic`` data (explicit only, with a warning: random inputs say little about range).

An array whose rank equals the input's rank is one batch, fed as is (not every model is batch
first: a sequence model may take ``[T, F]``); an array with one extra leading axis is a stack
of batches. Fixed dimensions in the model are checked; dynamic ones take what comes. Peak
memory is one file's arrays plus what a single batch needs, whatever the number of files.
"""

from __future__ import annotations

import copy
import logging
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from amp_search.errors import UserInputError

__all__ = ["CalibrationData", "InputSpec", "load_calibration", "model_inputs", "parse_shapes"]

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and shape (ints fixed, strings/None dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def rank(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def describe(self) -> str:
        """``name: float32[N, 3, 48, 192]``."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs excluded)."""
    inits = {i.name for i in model.graph.initializer}
    specs: list[InputSpec] = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UserInputError(
                f"Model input {vi.name!r} is not a tensor; amp-search handles tensor inputs only."
            )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            else:
                shape.append(d.dim_param or None)
        specs.append(InputSpec(vi.name, dtype, tuple(shape)))
    return specs


class CalibrationData:
    """Batches of model inputs, validated on construction, loaded lazily on iteration.

    :meth:`subset` gives a run of its batches as data of their own (a holdout split), without
    reading the files again.
    """

    def __init__(
        self,
        inputs: list[InputSpec],
        files: list[Path] | None = None,
        synthetic: list[Batch] | None = None,
    ) -> None:
        self.inputs = inputs
        self.files = files or []
        self._synthetic = synthetic
        self.n_batches = len(synthetic) if synthetic is not None else 0
        #: Batches per file, in order.
        self._counts: list[int] = []
        for f in self.files:
            arrays = _read_npz(f)
            n = _validate(arrays, inputs, f)
            self._counts.append(n)
            self.n_batches += n
        #: The batches this data holds, ``[start, stop)`` of all of them (see :meth:`subset`).
        self.batches = (0, self.n_batches)
        self._total = self.n_batches

    @property
    def is_synthetic(self) -> bool:
        """Whether the data is random (``--synthetic``)."""
        return self._synthetic is not None

    @property
    def source(self) -> str:
        """Where the batches come from: the file's name, ``N files`` or ``synthetic``."""
        if self.is_synthetic:
            return "synthetic"
        return self.files[0].name if len(self.files) == 1 else f"{len(self.files)} files"

    def describe(self) -> str:
        """One line: where the data comes from and how much."""
        part = ""
        if self.batches != (0, self._total):
            part = f" (batches {self.batches[0]}..{self.batches[1] - 1} of {self._total})"
        if self.is_synthetic:
            return f"{self.n_batches} synthetic batch(es) (random data){part}"
        return f"{self.n_batches} batch(es) from {self.source}{part}"

    def subset(self, start: int, stop: int) -> CalibrationData:
        """Batches ``start..stop-1`` (in order, counted over every file) as data of their own."""
        if not 0 <= start < stop <= self._total:
            raise ValueError(f"batches [{start}, {stop}) out of [0, {self._total})")
        out = copy.copy(self)
        out.batches = (start, stop)
        out.n_batches = stop - start
        return out

    def __iter__(self) -> Iterator[Batch]:
        start, stop = self.batches
        if self._synthetic is not None:
            yield from self._synthetic[start:stop]
            return
        offset = 0
        for f, count in zip(self.files, self._counts, strict=True):
            first, offset = offset, offset + count
            if offset <= start:
                continue  # a file wholly before the subset is not read
            if first >= stop:
                return
            arrays = _read_npz(f)
            stacked = {spec.name: arrays[spec.name].ndim == spec.rank + 1 for spec in self.inputs}
            n = _validate(arrays, self.inputs, f)
            for b in range(max(0, start - first), min(n, stop - first)):
                yield {
                    s.name: (arrays[s.name][b] if stacked[s.name] else arrays[s.name])
                    for s in self.inputs
                }

    def first(self) -> Batch:
        """The first batch."""
        return next(iter(self))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")  # an empty .npz has no entry
        if not is_zip:
            raise ValueError("not an .npz (zip) archive")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise UserInputError(
            f"Cannot read calibration file {path}: {reason}. Save it with "
            "numpy.savez(path, **{input_name: array})."
        ) from exc
    if not arrays:
        raise UserInputError(
            f"Calibration file {path} holds no arrays. Save one array per model input "
            "with numpy.savez(path, **{input_name: array})."
        )
    return arrays


def _validate(arrays: dict[str, np.ndarray], inputs: list[InputSpec], path: Path) -> int:
    """Checks one file's arrays against the model inputs; returns its number of batches."""
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in arrays]
    extra = [n for n in arrays if n not in names]
    if missing or extra:
        raise UserInputError(
            f"{path.name}: arrays {sorted(arrays)} do not match the model inputs {names}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {extra})" if extra else "")
            + ". Name each array after a model input."
        )
    counts: set[int] = set()
    for spec in inputs:
        a = arrays[spec.name]
        if a.dtype != spec.dtype:
            raise UserInputError(
                f"{path.name}: array {spec.name!r} is {a.dtype}, the model input is "
                f"{spec.dtype}. Convert it with arr.astype(np.{spec.dtype.name})."
            )
        if a.ndim == spec.rank:
            batch_shape, n = a.shape, 1
        elif a.ndim == spec.rank + 1:
            batch_shape, n = a.shape[1:], a.shape[0]
        else:
            raise UserInputError(
                f"{path.name}: array {spec.name!r} has shape {list(a.shape)}, the model input "
                f"is {spec.describe()}. Give one batch of rank {spec.rank}, or a stack of "
                f"batches of rank {spec.rank + 1}."
            )
        for axis, (want, got) in enumerate(zip(spec.shape, batch_shape, strict=True)):
            if isinstance(want, int) and want != got:
                if _fits(spec, _channels_first(batch_shape)):
                    raise UserInputError(
                        _channels_last_message(path, spec, a.shape, stacked=a.ndim > spec.rank)
                    )
                raise UserInputError(
                    f"{path.name}: array {spec.name!r} has size {got} on axis {axis}, the model "
                    f"input {spec.describe()} fixes it at {want}. Resize the data to match."
                )
        if a.size == 0:
            raise UserInputError(f"{path.name}: array {spec.name!r} is empty. Give real data.")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            bad = int(np.count_nonzero(~np.isfinite(a)))
            raise UserInputError(
                f"{path.name}: array {spec.name!r} holds {bad} NaN/Inf value(s). "
                "Clean the calibration data (np.nan_to_num or drop those samples)."
            )
        counts.add(n)
    if len(counts) > 1:
        raise UserInputError(
            f"{path.name}: the arrays stack different numbers of batches {sorted(counts)}. "
            "Give every input the same leading size."
        )
    return counts.pop()


def _channels_first(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """An image batch's shape N,H,W,C as N,C,H,W (None unless of rank 4)."""
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else None


def _fits(spec: InputSpec, shape: tuple[int, ...] | None) -> bool:
    """Whether ``shape`` has every size ``spec`` fixes."""
    return shape is not None and all(
        not isinstance(want, int) or want == got
        for want, got in zip(spec.shape, shape, strict=True)
    )


def _channels_last_message(
    path: Path, spec: InputSpec, shape: tuple[int, ...], *, stacked: bool
) -> str:
    """The data is N,H,W,C (channels last) where the model takes N,C,H,W: say how to fix it."""
    how = "x.transpose(0, 1, 4, 2, 3) for a stack of batches" if stacked else (
        "x.transpose(0, 3, 1, 2)")  # fmt: skip
    return (
        f"{path.name}: array {spec.name!r} has shape {list(shape)}, channels last (N,H,W,C); "
        f"the model input {spec.describe()} takes channels first. Transpose it to N,C,H,W "
        f"(e.g. {how})."
    )


def parse_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["x:1x3x640x640", ...]`` (``--shape``, repeatable) as ``{"x": (1, 3, 640, 640)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 1:
            raise UserInputError(
                f"--shape {spec!r}: expected NAME:DxDx... with positive sizes, e.g. "
                "--shape x:1x3x640x640."
            )
        shapes[name] = shape
    return shapes


def _synthetic_shape(spec: InputSpec, given: tuple[int, ...] | None) -> list[int]:
    """The shape random data takes for ``spec``: ``given``, or the declared one.

    A dynamic leading (batch) axis becomes 1; any other dynamic axis needs ``--shape``, since
    a size guessed wrong (an image side of 1) fails inside the model, far from its cause.
    """
    if given is not None:
        fixed = [(k, d, g) for k, (d, g) in enumerate(zip(spec.shape, given, strict=False))
                 if isinstance(d, int) and d != g]  # fmt: skip
        if len(given) != spec.rank or fixed:
            raise UserInputError(
                f"--shape {spec.name}:{'x'.join(map(str, given))} does not fit input "
                f"{spec.describe()}; keep its rank and its fixed sizes."
            )
        return list(given)
    dynamic = [(k, d) for k, d in enumerate(spec.shape) if not isinstance(d, int) and k > 0]
    if dynamic:
        named = ", ".join(f"axis {k} ({d or '?'})" for k, d in dynamic)
        example = "x".join(str(d) if isinstance(d, int) else "1" if k == 0 else "S"
                           for k, d in enumerate(spec.shape))  # fmt: skip
        raise UserInputError(
            f"--synthetic cannot guess the dynamic sizes of input {spec.describe()}: {named}. "
            f"Give them with --shape {spec.name}:{example} (S: a size), or pass --data."
        )
    return [d if isinstance(d, int) else 1 for d in spec.shape]


def _synthetic_batches(
    inputs: list[InputSpec], n: int, seed: int, shapes: Mapping[str, tuple[int, ...]]
) -> list[Batch]:
    unknown = sorted(set(shapes) - {spec.name for spec in inputs})
    if unknown:
        raise UserInputError(
            f"--shape names {unknown}, which are no inputs of the model "
            f"({', '.join(spec.name for spec in inputs)})."
        )
    sized = [(spec, _synthetic_shape(spec, shapes.get(spec.name))) for spec in inputs]
    rng = np.random.default_rng(seed)
    batches: list[Batch] = []
    for _ in range(n):
        batch: Batch = {}
        for spec, shape in sized:
            if np.issubdtype(spec.dtype, np.floating):
                batch[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype == np.bool_:
                batch[spec.name] = np.ones(shape, dtype=np.bool_)
            else:
                batch[spec.name] = rng.integers(0, 100, size=shape).astype(spec.dtype)
        batches.append(batch)
    return batches


def load_calibration(
    data: str | os.PathLike[str] | None,
    inputs: list[InputSpec],
    *,
    synthetic: bool = False,
    n_synthetic: int = 4,
    seed: int = 0,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> CalibrationData:
    """Loads and validates calibration data for a model with ``inputs``.

    Args:
        data: An ``.npz`` file or a folder of them; None only with ``synthetic``.
        inputs: The model's inputs (:func:`model_inputs`).
        synthetic: Use random data instead (a warning is logged).
        n_synthetic: Number of synthetic batches.
        seed: Seed of the synthetic data.
        shapes: Sizes of synthetic inputs with dynamic axes (``--shape``), by input name.
    """
    if shapes and not synthetic:
        raise UserInputError("--shape sizes synthetic data only: pass it with --synthetic.")
    if synthetic:
        if data is not None:
            raise UserInputError("Give either --data or --synthetic, not both.")
        logger.warning(
            "Using SYNTHETIC random calibration data: ranges and deviations will not reflect "
            "real inputs. Pass --data with real samples for results you can ship."
        )
        batches = _synthetic_batches(inputs, n_synthetic, seed, shapes or {})
        return CalibrationData(inputs, synthetic=batches)
    if data is None:
        raise UserInputError(
            "No calibration data: pass --data FILE.npz (or a folder of .npz files) with arrays "
            "named after the model inputs, or --synthetic to use random data."
        )
    p = Path(data)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise UserInputError(
                f"Calibration folder {p} holds no .npz files. Put one .npz per batch (or "
                "stack) there, arrays named after the model inputs."
            )
    elif p.is_file():
        files = [p]
    else:
        raise UserInputError(f"Calibration data not found: {p}. Check the --data path.")
    return CalibrationData(inputs, files=files)
