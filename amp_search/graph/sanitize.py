"""Sanitizing a loaded model before anything keys on it.

The sequence (each step an onnx-ir pass, or a check with pre/post-conditions):

1. :class:`CheckOpsetPass` refuses IR versions and default-domain opsets outside the
   supported range, with a message saying what to do.
2. onnx-ir's ``NameFixPass`` gives every node a unique, stable name (``<OpType>`` with a
   counter for unnamed ones; Paddle exports leave most nodes unnamed). Stable means the same
   model always gets the same names, so Optuna parameters keyed on them survive resuming.
3. onnx-ir's ``LiftConstantsToInitializersPass`` turns ``Constant`` nodes into initializers,
   so weights that arrive through Constants are converted (or kept FP32) with their unit.
4. :func:`name_dynamic_dims` gives every unnamed dynamic dimension of a graph input or
   output its own name. Paddle exports write ``-1`` or ``"?"`` for every dynamic axis;
   TensorRT reads equal names as equal sizes, so a ``[N, 3, ?, ?]`` input with H != W could
   not be built.
5. The IR version is lowered to :data:`MAX_IR_VERSION` where it is newer (``onnx>=1.23``
   writes IR 14 by default, which ONNX Runtime 1.2x/1.3x refuses; no opset up to
   :data:`MAX_OPSET` needs more).
6. Declared shapes that ONNX shape inference contradicts (a stale ``value_info`` of the
   wrong rank, a graph output declared rank 3 that the graph makes rank 2) are dropped, with
   a warning: left in place, they stop inference there and every tensor after them loses its
   element type (and the search its units).
7. ONNX shape inference, so every tensor has an element type; for ONNX Runtime's fused ops
   (which ONNX does not know) completed by :func:`amp_search.graph.op_types.infer_shapes`.

Once the model has run in FP32 on the calibration data, :func:`reconcile_shapes` relaxes or
drops the declared shapes that run contradicts (a graph output declared rank 2 that comes out
rank 3; a stale ``value_info`` left by a converter): ONNX Runtime CPU only warns about them,
but its CUDA EP refuses to bind such an output, so a candidate must never carry them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, NameFixPass

from amp_search.errors import UserInputError
from amp_search.graph._index import subgraphs
from amp_search.graph.io import exceeds_protobuf_limit, typed_skeleton
from amp_search.graph.op_types import infer_shapes, op_typing

__all__ = [
    "MAX_IR_VERSION",
    "MAX_OPSET",
    "MIN_OPSET",
    "CheckOpsetPass",
    "default_opset",
    "sanitize",
]

logger = logging.getLogger(__name__)

#: Oldest default-domain opset accepted (Cast with an integer ``to`` exists from opset 6).
MIN_OPSET = 7
#: Newest default-domain opset accepted: what the installed ONNX Runtime 1.2x/1.3x runs.
MAX_OPSET = 23
#: The IR version of ONNX 1.18, the release that introduced opset 23.
MAX_IR_VERSION = 11


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise UserInputError(
        "The model imports no default-domain (ai.onnx) opset. Re-export it with a standard "
        f"opset between {MIN_OPSET} and {MAX_OPSET}."
    )


class CheckOpsetPass(ir.passes.PassBase):
    """Refuses models whose IR version or opset the toolchain cannot handle."""

    @property
    def in_place(self) -> bool:  # noqa: D102
        return True

    @property
    def changes_input(self) -> bool:  # noqa: D102
        return False

    def call(self, model: ir.Model) -> ir.passes.PassResult:  # noqa: D102
        version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if version is None:
            raise UserInputError(
                "The model imports no default-domain (ai.onnx) opset. Re-export it with a "
                f"standard opset between {MIN_OPSET} and {MAX_OPSET}."
            )
        if not MIN_OPSET <= version <= MAX_OPSET:
            hint = "an older" if version > MAX_OPSET else "a newer"
            raise UserInputError(
                f"Unsupported opset {version}: amp-search handles ai.onnx opsets "
                f"{MIN_OPSET} to {MAX_OPSET}. Re-export with {hint} opset, or convert "
                "with onnx.version_converter.convert_version(model, 17)."
            )
        return ir.passes.PassResult(model, modified=False)


class _OpTypeNames:
    """Names unnamed nodes after their op type (``Conv``, ``Conv_1``, ...)."""

    def generate_node_name(self, node: ir.Node) -> str:
        return node.name or node.op_type

    def generate_value_name(self, value: ir.Value) -> str:
        return value.name or "v"


def name_dynamic_dims(model: onnx.ModelProto) -> None:
    """Names each anonymous dynamic dim (``-1``, ``0``, ``"?"``, empty) of graph IO, in place."""
    for vi in [*model.graph.input, *model.graph.output]:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            anonymous = d.HasField("dim_value") and d.dim_value <= 0
            anonymous |= d.HasField("dim_param") and d.dim_param in ("?", "")
            anonymous |= not d.HasField("dim_value") and not d.HasField("dim_param")
            if anonymous:
                d.dim_param = "batch" if k == 0 else f"{vi.name}_dim{k}"


def reconcile_shapes(model: onnx.ModelProto, observed: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Relaxes or drops, in place, declared shapes an FP32 run contradicts; one entry per change.

    A graph output keeps its element type and gets the rank that ran, every size a dimension
    of its own (``<output>_dim<k>``: ``onnx.checker`` wants a shape on each graph output); a
    ``value_info`` entry is removed. A declared shape contradicts the run when its rank
    differs from the tensor's or one of its fixed sizes does.

    Args:
        model: The sanitized model.
        observed: Tensor name -> shape seen in the run (the first calibration batch).
    """

    def contradicted(vi: onnx.ValueInfoProto) -> str | None:
        t = vi.type.tensor_type
        seen = observed.get(vi.name)
        if seen is None or not vi.type.HasField("tensor_type") or not t.HasField("shape"):
            return None
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in t.shape.dim]  # fmt: skip
        clash = len(dims) != len(seen) or any(
            isinstance(d, int) and d != n for d, n in zip(dims, seen, strict=False)
        )
        if not clash:
            return None
        shown = ", ".join(map(str, dims))
        return f"{vi.name} (declared [{shown}], ran {list(seen)})"

    changes: list[str] = []
    for out in model.graph.output:
        found = contradicted(out)
        if found:
            # Relaxed, not dropped: the checker wants a shape on every graph output, so it
            # gets the rank that ran, each size a dimension of its own name.
            rank = len(observed[out.name])
            shape = out.type.tensor_type.shape
            del shape.dim[:]
            for k in range(rank):
                shape.dim.add().dim_param = f"{out.name}_dim{k}"
            changes.append(found)
    keep = []
    for vi in model.graph.value_info:
        found = contradicted(vi)
        if found:
            changes.append(found)
        else:
            keep.append(vi)
    if len(keep) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
    return changes


def sanitize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Returns a sanitized copy of ``model`` (the input is not modified).

    Raises:
        UserInputError: Unsupported IR version or opset, or a model shape inference rejects.
    """
    if model.ir_version > onnx.IR_VERSION:
        raise UserInputError(
            f"Unsupported ONNX IR version {model.ir_version}: this onnx package reads up to "
            f"{onnx.IR_VERSION}. Upgrade onnx, or re-export with an older exporter."
        )
    try:
        irm = ir.from_proto(model)
    except Exception as exc:  # onnx-ir raises several types on malformed protos
        raise UserInputError(
            f"The model could not be read as an ONNX graph: {exc}. Run "
            "onnx.checker.check_model on it and re-export.",
        ) from exc
    passes = ir.passes.Sequential(
        CheckOpsetPass(),
        NameFixPass(name_generator=_OpTypeNames()),
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
    )
    try:
        irm = passes(irm).model
    except ir.passes.PassError as exc:  # onnx-ir wraps what a pass raises
        cause = exc.__cause__
        if isinstance(cause, UserInputError):
            raise cause from None
        raise UserInputError(
            f"The model could not be sanitized: {cause or exc}. Run "
            "onnx.checker.check_model on it and re-export."
        ) from exc
    out = ir.to_proto(irm)
    _release_weights(irm)
    name_dynamic_dims(out)
    if out.ir_version > MAX_IR_VERSION:
        logger.debug("IR version %d lowered to %d", out.ir_version, MAX_IR_VERSION)
        out.ir_version = MAX_IR_VERSION
    conflict = _declared_shape_conflict(out)
    if conflict:
        logger.warning(
            "The model's declared shapes contradict ONNX shape inference (%s); its value_info "
            "and output shapes were dropped and inferred again.", conflict,
        )  # fmt: skip
        del out.graph.value_info[:]
        for o in out.graph.output:
            o.type.tensor_type.ClearField("shape")
    opset = default_opset(out)
    fused = any(op_typing(n.op_type, n.domain, opset) for n in out.graph.node)
    try:
        if not fused and not exceeds_protobuf_limit(out):
            out = onnx.shape_inference.infer_shapes(out, strict_mode=False, data_prop=True)
        else:  # over 2 GiB, or inferred again per fused op: on the weightless skeleton
            typed = infer_shapes(typed_skeleton(out), data_prop=True)
            declared = {vi.name for vi in out.graph.value_info}
            out.graph.value_info.extend(
                vi for vi in typed.graph.value_info if vi.name not in declared
            )
            for mine, found in zip(out.graph.output, typed.graph.output, strict=True):
                if found.type.HasField("tensor_type"):
                    mine.type.CopyFrom(found.type)
            for node, inferred in zip(out.graph.node, typed.graph.node, strict=True):
                if subgraphs(node):
                    node.CopyFrom(inferred)  # its bodies, with their inferred types
    except Exception as exc:  # onnx raises InferenceError and others
        logger.warning("ONNX shape inference failed (%s); element types may be missing", exc)
    return out


def _release_weights(model: ir.Model) -> None:
    """Drops the IR model's hold on the input's weights, now copied into the output.

    Its graphs are reference cycles, freed only by the cyclic garbage collector, whenever
    that runs; until then their initializers kept the whole input model alive (a second copy
    of the weights, 2 GiB for a 2 GiB model).
    """
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            value.const_value = None


def _declared_shape_conflict(model: onnx.ModelProto) -> str | None:
    """The first line of strict shape inference's complaint about a declared shape, if any."""
    try:
        onnx.shape_inference.infer_shapes(typed_skeleton(model), strict_mode=True)
    except Exception as exc:  # InferenceError, or a checker error on odd models
        text = str(exc)
        if "existing shape" in text or "differ" in text:
            lines = [ln.strip() for ln in text.splitlines() if "differ" in ln or "existing" in ln]
            return (lines[0] if lines else text.splitlines()[0])[:300]
    return None
