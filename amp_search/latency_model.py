"""A deterministic roofline estimate of a mixed-precision model's GPU latency.

This module owns the GPU figures (:data:`TARGETS`), the cost constants, and
:class:`LatencyEstimator`, which prices a mixed-precision ONNX model (as produced by
:class:`amp_search.graph.MixedPrecisionRewriter`) on a target GPU without running it. It is
what the search uses for speed when no GPU backend is available; every figure it gives is
labelled ``estimated:<target>`` (see :attr:`LatencyEstimator.source`), never passed off as a
measurement.

The model, per kernel: ``max(flops / (peak * COMPUTE_EFFICIENCY), bytes / (bandwidth *
MEMORY_EFFICIENCY)) + KERNEL_OVERHEAD_US``, summed over kernels, where

- a node whose first float output (else input) is FP16 runs at the FP16 rate and moves
  2-byte float elements; other nodes run at the FP32 rate chosen by ``fp32_math`` (TF32
  tensor cores by default, as TensorRT does) with 4-byte elements;
- Conv/ConvTranspose/MatMul/Gemm/Einsum/Attention use the tensor-core peak, everything else
  the non-tensor (vector) peak;
- pure data-movement nodes that TensorRT turns into views (Reshape, Squeeze, Unsqueeze,
  Flatten, Identity, Shape, ...) and shape computations cost nothing;
- a pointwise node that follows a compute node (or a chain already fused into one) as the
  only reader of its output, at the same precision, is fused into it: no kernel overhead and
  no round trip of the intermediate tensor through memory;
- an inserted Cast (``amp_cast/...``) moves its elements in and out (6 bytes each) at memory
  bandwidth, plus the kernel overhead unless it is the only reader of a tensor produced by
  a kernel, in which case it is fused into that kernel's epilogue (TensorRT's pointwise
  fusion of Cast layers) and pays only the bytes.

All per-model work (shape inference with the concrete input shapes, FLOPs, bytes, fusion
candidates) happens once in the constructor; :meth:`LatencyEstimator.estimate` reads one name
and one tensor name per node of the mixed model and does the rest with numpy (about 3.5 ms for
1000 nodes plus 500 Casts, 0.15 ms for the demo model).

Calibration: the kernel overhead and the fused-Cast rule were checked against a measurement
on an H200 (torch 2.11, cuDNN, CUDA graphs): a tiny Cast kernel costs 1.1-1.2 us, and the demo
CNN at batch 8 (channels-last) ran 12% faster in FP16 with its two boundary Casts than in
TF32. Charging every Cast a full kernel made all-FP16 look slower than all-FP32 there.

Limits: a roofline ignores kernel selection. Small convolutions run far below it in practice
(the same measurement: ~14 us for a 16-channel 3x3 convolution on an 8x16x48x48 input, against
a roofline of about 2 us), so absolute figures are optimistic; the estimate is meant to rank
candidates (what FP16 saves in bytes and FLOPs against what its Casts cost), not to replace a
measurement.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from amp_search.errors import UserInputError
from amp_search.graph._index import subgraphs
from amp_search.graph.op_types import infer_shapes
from amp_search.graph.precision import CAST_PREFIX, CAST_SUFFIX, LOW_PRECISION_SUFFIX
from amp_search.graph.units import COMPUTE_OPS, POINTWISE_OPS
from amp_search.types import LatencyStats

if TYPE_CHECKING:
    from amp_search.graph.precision import MixedPrecisionRewriter
    from amp_search.types import PrecisionAssignment

__all__ = [
    "COMPUTE_EFFICIENCY",
    "KERNEL_OVERHEAD_US",
    "MEMORY_EFFICIENCY",
    "TARGETS",
    "GpuSpec",
    "LatencyBreakdown",
    "LatencyEstimator",
    "NodeCost",
    "node_flops",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSpec:
    """Peak figures of one GPU (dense, i.e. without 2:4 structured sparsity).

    Attributes:
        name: Target name (``"h100"``, ``"h200"``).
        fp32_tflops: FP32 on CUDA cores (non-tensor), TFLOP/s.
        tf32_tensor_tflops: TF32 on tensor cores, dense, TFLOP/s.
        fp16_tensor_tflops: FP16 on tensor cores with FP32 accumulate, dense, TFLOP/s.
        fp16_vector_tflops: FP16 on CUDA cores (non-tensor; twice the FP32 rate), TFLOP/s.
        memory_tbps: Peak DRAM bandwidth, TB/s (10^12 bytes per second).
        reference: Where the figures come from.
    """

    name: str
    fp32_tflops: float
    tf32_tensor_tflops: float
    fp16_tensor_tflops: float
    fp16_vector_tflops: float
    memory_tbps: float
    reference: str


# Figures, checked against these sources:
# - NVIDIA H100 SXM5 datasheet figures as reproduced at
#   https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html : FP32 67 TFLOPS, TF32 Tensor
#   989 TFLOPS and FP16 Tensor 1,979 TFLOPS "shown with sparsity; specifications 1/2 lower
#   without sparsity" (so 494.7 and 989.4 dense), HBM3 3,350 GB/s.
# - Per-type peaks of the H100 SXM5 at https://glennklockwood.com/garden/processors/h100 :
#   FP32 66.9, FP16 vector (non-tensor) 133.8, FP16 matrix 989.4 dense / 1978.9 sparse,
#   TF32 494.7 dense / 989.4 sparse.
# - H200: same GH100 die and compute as the H100 SXM5 with 141 GB of HBM3e at 4.8 TB/s
#   (https://openmetal.io/resources/blog/how-the-h200-is-built-for-memory-bound-ai-workloads/ ,
#   and https://acecloud.ai/blog/hbm3e-nvidia-h200-ai-training-inference/ citing NVIDIA's spec
#   sheet: "141 GB of HBM3e memory and up to 4.8 TB/s", H100 SXM "80 GB ... 3.35 TB/s").
TARGETS: dict[str, GpuSpec] = {
    "h100": GpuSpec(
        name="h100",
        fp32_tflops=66.9,
        tf32_tensor_tflops=494.7,
        fp16_tensor_tflops=989.4,
        fp16_vector_tflops=133.8,
        memory_tbps=3.35,
        reference="NVIDIA H100 SXM5 datasheet (dense figures; HBM3 3.35 TB/s)",
    ),
    "h200": GpuSpec(
        name="h200",
        fp32_tflops=66.9,
        tf32_tensor_tflops=494.7,
        fp16_tensor_tflops=989.4,
        fp16_vector_tflops=133.8,
        memory_tbps=4.8,
        reference="NVIDIA H200 SXM datasheet (H100 compute; HBM3e 4.8 TB/s)",
    ),
}

#: Fixed cost of one kernel, in microseconds: launch, ramp-up and tail. Measured: an
#: 80-element Cast kernel replayed in a CUDA graph took 1.1-1.2 us per kernel on an H200
#: (torch 2.11, CUDA 13), so 1 us of it is overhead rather than work.
KERNEL_OVERHEAD_US = 1.0
#: Fraction of the peak FLOP rate a kernel reaches (well-shaped GEMMs reach 0.6-0.8).
COMPUTE_EFFICIENCY = 0.6
#: Fraction of the peak DRAM bandwidth a streaming kernel reaches.
MEMORY_EFFICIENCY = 0.8

# The rewriter's naming contract (graph/precision.py): a low-precision tensor is
# ``<name>__fp16`` or ``<name>__bf16``; an inserted Cast ``amp_cast/<source>/to_<type>``. BF16
# is priced as FP16: every target here has BF16 Tensor Cores at FP16's rate.
_LOW_SUFFIXES = tuple(LOW_PRECISION_SUFFIX.values())
_CAST_PREFIX = CAST_PREFIX
_CAST_SUFFIXES = tuple(CAST_SUFFIX.values())
assert len({len(x) for x in _LOW_SUFFIXES}) == 1 and len({len(x) for x in _CAST_SUFFIXES}) == 1
_CAST_BYTES_PER_ELEM = 6  # 4 in + 2 out, or 2 in + 4 out

#: Ops that run on tensor cores.
_MATRIX_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "Attention",
                         "LSTM", "GRU", "RNN", "MultiHeadAttention", "GroupQueryAttention",
                         "FusedMatMul", "TransposeMatMul", "FusedConv", "FusedGemm"})  # fmt: skip
_RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
#: Pure data movement that TensorRT turns into views or evaluates at build time: free.
_VIEW_OPS = frozenset(
    {
        "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size",
        "Constant", "Dropout", "Optional", "OptionalGetElement",
    }
)  # fmt: skip
#: A node with no float tensors whose outputs are this small is a shape computation: free.
_SHAPE_COMPUTE_MAX_ELEMS = 64
#: Nodes whose output can start a fused chain.
_FUSION_ROOTS = COMPUTE_OPS | _MATRIX_OPS

#: FLOPs per output element, by op (default 1).
_FLOPS_PER_OUTPUT: dict[str, float] = {
    **dict.fromkeys(
        ("Div", "Sqrt", "Reciprocal", "HardSigmoid", "BatchNormalization", "Resize",
         "Upsample"), 2.0,
    ),
    **dict.fromkeys(("HardSwish", "Softsign"), 3.0),
    **dict.fromkeys(
        ("Exp", "Log", "Pow", "Sigmoid", "Tanh", "Erf", "Elu", "Selu", "Celu", "Softplus",
         "Sin", "Cos"), 4.0,
    ),
    **dict.fromkeys(("Gelu", "Mish", "Swish", "Softmax", "LogSoftmax", "Hardmax",
                     "QuickGelu"), 5.0),
    **dict.fromkeys(
        ("LayerNormalization", "InstanceNormalization", "GroupNormalization",
         "RMSNormalization", "MeanVarianceNormalization", "LpNormalization", "LRN"), 8.0,
    ),
    # ONNX Runtime's fused ops (com.microsoft): the pointwise work they fold together.
    "BiasAdd": 2.0, "RotaryEmbedding": 3.0, "SimplifiedLayerNormalization": 6.0,
    **dict.fromkeys(("BiasGelu", "BiasSplitGelu"), 6.0),
    "FastGelu": 8.0,  # bias add and the tanh approximation
    # a layer norm plus the residual (and bias) adds; the embedding's gathers are free
    **dict.fromkeys(("SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
                     "EmbedLayerNormalization"), 10.0),
}  # fmt: skip
#: Softmax over the attention scores, FLOPs per score.
_SOFTMAX_FLOPS = 5.0
#: Reductions cost this many FLOPs per *input* element.
_FLOPS_PER_INPUT: dict[str, float] = {
    **dict.fromkeys(
        ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
         "GlobalAveragePool", "GlobalMaxPool", "ArgMax", "ArgMin", "CumSum"), 1.0,
    ),
    **dict.fromkeys(("ReduceSumSquare", "ReduceL2", "GlobalLpPool"), 2.0),
    **dict.fromkeys(("ReduceLogSum", "ReduceLogSumExp"), 4.0),
}  # fmt: skip
_POOL_OPS = frozenset({"AveragePool", "MaxPool", "LpPool"})

_ELEM_SIZE: dict[int, int] = {
    TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2,
    TensorProto.DOUBLE: 8, TensorProto.INT64: 8, TensorProto.UINT64: 8,
    TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT16: 2, TensorProto.UINT16: 2,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.BOOL: 1,
    TensorProto.COMPLEX64: 8, TensorProto.COMPLEX128: 16,
}  # fmt: skip
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                          TensorProto.DOUBLE})  # fmt: skip


@dataclass(frozen=True)
class NodeCost:
    """What the constructor worked out for one node of the (all-FP32) model.

    Attributes:
        name: Node name.
        op_type: Op type.
        flops: Floating-point operations (multiply and add counted apart).
        matrix: Whether it runs on tensor cores.
        float_elems: Elements of its FP32 inputs and outputs (weights included): they move
            4 bytes each in FP32, 2 in FP16.
        fixed_bytes: Bytes of its other (integer, non-FP32) inputs and outputs.
        free: Whether it costs nothing (a view or a shape computation).
        fuse_parent: Position of the node it fuses into (a compute node or a pointwise node
            already fused), or -1.
        chain_elems: Elements of the intermediate tensor a fusion keeps out of memory.
    """

    name: str
    op_type: str
    flops: float
    matrix: bool
    float_elems: int
    fixed_bytes: int
    free: bool
    fuse_parent: int = -1
    chain_elems: int = 0


@dataclass(frozen=True)
class LatencyBreakdown:
    """One estimate and what it is made of.

    Attributes:
        total_ms: The estimate, in milliseconds.
        kernels: Kernels launched (fused groups and unfused Casts).
        fp16_nodes: Priced nodes that run in FP16.
        fp32_nodes: Priced nodes that run in FP32.
        casts: Inserted Casts (``amp_cast/...``).
        fused_casts: Those fused into the kernel that produces their input.
        cast_ms: What the Casts cost, in milliseconds (included in ``total_ms``).
        source: ``"estimated:<target>"``.
    """

    total_ms: float
    kernels: int
    fp16_nodes: int
    fp32_nodes: int
    casts: int
    fused_casts: int
    cast_ms: float
    source: str


class LatencyEstimator:
    """Prices mixed-precision variants of one model on one GPU (see the module docstring).

    Life cycle: build once per (model, input shapes, target); then call :meth:`estimate` on
    every mixed model the rewriter makes from that model. Matching is by node name (the
    rewriter keeps them); the Casts it inserts (``amp_cast/...``) are priced as Casts.

    Args:
        model: The sanitized all-FP32 model (:func:`amp_search.graph.sanitize`); not modified.
        input_shapes: Concrete shape of every graph input, e.g. ``{"image": (8, 3, 48, 48)}``.
        target: Key of :data:`TARGETS` (``"h100"`` or ``"h200"``).
        fp32_math: How FP32 nodes use tensor cores: ``"tf32"`` (TensorRT's default) or
            ``"fp32"`` (TF32 disabled: CUDA cores only).

    ``known_shapes`` (tensor -> shape observed in a profiling run) fills in shapes that
    shape inference cannot know (Reshapes to runtime-computed shapes).

    Raises:
        UserInputError: Unknown target or math mode, missing or mismatched input shapes, or
            shape inference failing with those shapes.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        input_shapes: Mapping[str, tuple[int, ...]],
        target: str = "h100",
        fp32_math: Literal["tf32", "fp32"] = "tf32",
        known_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        if target not in TARGETS:
            raise UserInputError(
                f"Unknown latency target {target!r}: expected one of {', '.join(TARGETS)}."
            )
        if fp32_math not in ("tf32", "fp32"):
            raise UserInputError(f"fp32_math must be 'tf32' or 'fp32', got {fp32_math!r}.")
        self.target = target
        self.spec = TARGETS[target]
        self.fp32_math = fp32_math
        self.input_shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
        types, self._numel, unknown = _sized_types(model, self.input_shapes, known_shapes)
        self.unknown_shapes: tuple[str, ...] = tuple(sorted(unknown))
        if unknown:
            logger.warning(
                "Latency estimate: the size of %d tensor(s) (e.g. %s) could not be worked "
                "out from the input shapes, so the work on them is left out and the estimate "
                "may read low (--latency measured times the real model).", len(unknown),
                unknown[0],
            )  # fmt: skip
        self._flops_by_node: dict[str, float] = {}
        self._costs, self._probe = _node_costs(model, types, self._numel, self._flops_by_node)
        self._pos = {c.name: i for i, c in enumerate(self._costs)}
        if len(self._pos) != len(self._costs):
            raise UserInputError(
                "Node names are not unique; sanitize the model first (amp_search.graph.sanitize)."
            )
        self._cast_info = _cast_info(model, self._costs, self._numel)
        self._prepare_rates()

    @property
    def source(self) -> str:
        """The label of every figure this estimator gives: ``estimated:<target>``."""
        return f"estimated:{self.target}"

    @property
    def costs(self) -> tuple[NodeCost, ...]:
        """Per-node costs of the all-FP32 model, in graph order."""
        return tuple(self._costs)

    def flops(self, node_name: str) -> float:
        """FLOPs of node ``node_name`` (multiply and add counted apart)."""
        return self._costs[self._pos[node_name]].flops

    def flops_by_node(self) -> dict[str, float]:
        """FLOPs of every node by name, subgraph bodies included (as :func:`node_flops`)."""
        return dict(self._flops_by_node)

    def _prepare_rates(self) -> None:
        """Per node and precision: compute seconds, bytes, and bytes when fused (arrays)."""
        spec = self.spec
        costs = self._costs
        n = len(costs)
        peak32_matrix = spec.tf32_tensor_tflops if self.fp32_math == "tf32" else spec.fp32_tflops
        self._bw = spec.memory_tbps * 1e12 * MEMORY_EFFICIENCY  # bytes/s
        self._overhead_s = KERNEL_OVERHEAD_US * 1e-6
        matrix = np.array([c.matrix for c in costs], dtype=bool)
        flops = np.array([c.flops for c in costs], dtype=np.float64)
        float_elems = np.array([c.float_elems for c in costs], dtype=np.float64)
        fixed = np.array([c.fixed_bytes for c in costs], dtype=np.float64)
        chain = np.array([c.chain_elems for c in costs], dtype=np.float64)
        eff = COMPUTE_EFFICIENCY * 1e12
        self._c32 = flops / (np.where(matrix, peak32_matrix, spec.fp32_tflops) * eff)
        self._c16 = flops / (
            np.where(matrix, spec.fp16_tensor_tflops, spec.fp16_vector_tflops) * eff
        )
        self._b32 = float_elems * 4.0 + fixed
        self._b16 = float_elems * 2.0 + fixed
        # Fused: the intermediate tensor is neither written by the parent nor read back.
        self._fb32 = np.maximum(0.0, self._b32 - 8.0 * chain)
        self._fb16 = np.maximum(0.0, self._b16 - 4.0 * chain)
        self._idx = np.arange(n)
        parent = np.array([c.fuse_parent for c in costs], dtype=np.int64)
        self._has_parent = parent >= 0
        self._parent = np.where(self._has_parent, parent, self._idx)
        self._active = ~np.array([c.free for c in costs], dtype=bool)
        self._free = [c.free for c in costs]

    def estimate(self, model: onnx.ModelProto) -> float:
        """The estimated latency of ``model``, in milliseconds (labelled :attr:`source`).

        Args:
            model: The estimator's model, or a mixed-precision model the rewriter made from
                it (same node names, plus ``amp_cast/...`` Casts).

        Raises:
            ValueError: A node of ``model`` is neither one of the estimator's model nor an
                inserted Cast.
        """
        return self.estimate_details(model).total_ms

    def estimate_details(self, model: onnx.ModelProto) -> LatencyBreakdown:
        """Like :meth:`estimate`, with the counts behind the figure.

        Three steps: :meth:`_read_mixed` (which nodes run FP16, which Casts were inserted),
        :meth:`_cast_seconds` (the Casts' traffic and kernels) and :meth:`_kernel_seconds`
        (fusion groups at one precision, each a roofline kernel).
        """
        fp16, cast_src = self._read_mixed(model)
        cast_s, fused_casts = self._cast_seconds(cast_src, fp16)
        h = np.frombuffer(bytes(fp16), dtype=np.uint8).astype(bool)
        kernel_s, n_kernels = self._kernel_seconds(h)
        total_s = kernel_s + n_kernels * self._overhead_s + cast_s
        active = self._active
        n16 = int(np.count_nonzero(h & active))
        return LatencyBreakdown(
            total_ms=total_s * 1e3,
            kernels=n_kernels + len(cast_src) - fused_casts,
            fp16_nodes=n16,
            fp32_nodes=int(np.count_nonzero(active)) - n16,
            casts=len(cast_src),
            fused_casts=fused_casts,
            cast_ms=cast_s * 1e3,
            source=self.source,
        )

    def _read_mixed(self, model: onnx.ModelProto) -> tuple[bytearray, list[str]]:
        """Per node of the estimator's model, 1 if it runs FP16; the inserted Casts' sources."""
        pos = self._pos
        probes = self._probe
        n = len(self._costs)
        # One pass over the mixed model: which nodes run in FP16 or BF16 (one name read per
        # node, by the rewriter's ``<name>__fp16``/``__bf16`` convention), and the Casts.
        cast_src: list[str] = []
        fp16 = bytearray(n)
        matched = 0
        for node in model.graph.node:
            name = node.name
            i = pos.get(name, -1)
            if i < 0:
                if not name.startswith(_CAST_PREFIX):
                    raise ValueError(
                        f"Node {name!r} ({node.op_type}) is not in the model this estimator "
                        "was built for; estimate only models the rewriter made from it."
                    )
                # amp_cast/<source>/to_fp16|to_fp32 names its source: no proto read needed.
                if name.endswith(_CAST_SUFFIXES):
                    cast_src.append(name[len(_CAST_PREFIX) : -len(_CAST_SUFFIXES[0])])
                else:
                    cast_src.append(node.input[0])
                continue
            matched += 1
            k = probes[i]
            if k is not None and (node.output[k] if k >= 0 else node.input[~k]).endswith(
                _LOW_SUFFIXES
            ):
                fp16[i] = 1
        if matched != n:
            raise ValueError(
                f"The model has {matched} of the {n} nodes this estimator was built for; "
                "estimate only models the rewriter made from it."
            )
        return fp16, cast_src

    def _cast_seconds(self, cast_src: list[str], fp16: bytearray) -> tuple[float, int]:
        """Seconds of the Casts, and how many fuse into their producer."""
        bw = self._bw
        overhead = self._overhead_s
        # Casts: bytes in and out, plus a kernel unless fused into their producer.
        cast_s = 0.0
        fused_casts = 0
        cast_info = self._cast_info
        per_elem = _CAST_BYTES_PER_ELEM / bw
        n_suffix = len(_LOW_SUFFIXES[0])
        for src in cast_src:
            # A Cast to FP32 reads the FP16 tensor, which FP16 readers (Shape/Size included)
            # read too; a Cast to FP16 reads the FP32 tensor, which FP32 readers and a graph
            # output read too. It fuses into the producing kernel when it is alone: every
            # original reader is on its far side (``side``).
            if src.endswith(_LOW_SUFFIXES):
                info = cast_info.get(src[:-n_suffix])
                side = 0
            else:
                info = cast_info.get(src)
                side = 1
            if info is None:
                cast_s += overhead
                continue
            elems, readers, is_output = info
            cast_s += elems * per_elem
            if readers is not None and not (side and is_output):
                for r in readers:
                    if fp16[r] != side:
                        break
                else:
                    fused_casts += 1
                    continue
            cast_s += overhead
        return cast_s, fused_casts

    def _kernel_seconds(self, h: np.ndarray) -> tuple[float, int]:
        """Seconds of the kernels (launch overheads apart) and their count.

        ``h`` is True for the nodes that run FP16. A node joins its fusion parent's group when
        both run at one precision; a group costs the larger of its compute and its traffic.
        """
        n = len(self._costs)
        bw = self._bw
        fused = self._has_parent & (h[self._parent] == h)
        root = np.where(fused, self._parent, self._idx)
        while True:
            up = root[root]
            if np.array_equal(up, root):
                break
            root = up
        active = self._active
        compute = np.where(h, self._c16, self._c32)[active]
        nbytes = np.where(
            fused, np.where(h, self._fb16, self._fb32), np.where(h, self._b16, self._b32)
        )[active]
        group_compute = np.bincount(root[active], weights=compute, minlength=n)
        group_bytes = np.bincount(root[active], weights=nbytes, minlength=n)
        heads = active & ~fused
        kernel_s = np.maximum(group_compute[heads], group_bytes[heads] / bw)
        n_kernels = int(np.count_nonzero(heads))
        return float(kernel_s.sum()), n_kernels

    def estimate_assignment(
        self, rewriter: MixedPrecisionRewriter, assignment: PrecisionAssignment
    ) -> float:
        """Rewrites the model's graph for ``assignment`` with ``rewriter``; its estimate (ms).

        Only the graph is read: the rewrite is made without its weights.
        """
        model, _ = rewriter.apply_skeleton(assignment)
        return self.estimate(model)

    def stats(self, model: onnx.ModelProto) -> LatencyStats:
        """The estimate as :class:`LatencyStats` (one deterministic "run", source labelled)."""
        ms = self.estimate(model)
        return LatencyStats(
            median_ms=ms, p90_ms=ms, mean_ms=ms, min_ms=ms, n_runs=1, n_warmup=0,
            source=self.source, samples_ms=(ms,),
        )  # fmt: skip


def node_flops(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]],
    known_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, float]:
    """FLOPs of every node of ``model`` by name, as the estimator counts them.

    Nodes inside If/Loop/Scan bodies are listed too, each with the work of every run of its
    body: times a Loop's trip count where it is a constant (else once), times a Scan's
    sequence length. The node that owns a body counts all of its body's work (an If both
    branches: an upper bound). Work on tensors whose size is unknown counts 0.

    Args:
        model: The sanitized model.
        input_shapes: Concrete shape of every graph input.
        known_shapes: Tensor -> shape observed in a profiling run.
    """
    types, numel, _ = _sized_types(
        model, {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}, known_shapes
    )
    out: dict[str, float] = {}
    _node_costs(model, types, numel, out)
    return out


# ---------------------------------------------------------------------------------------
# Constructor helpers


def _sized_types(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]],
    known_shapes: Mapping[str, tuple[int, ...]] | None,
) -> tuple[dict[str, tuple[int, tuple[int, ...] | None]], dict[str, int], list[str]]:
    """(name -> (elem type, shape)), (name -> elements), main-graph tensors of unknown size."""
    types = _infer_types(model, input_shapes)
    for name, seen in (known_shapes or {}).items():  # observed in a profiling run
        if name in types and types[name][1] is None:
            types[name] = (types[name][0], tuple(int(d) for d in seen))
    main = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    numel: dict[str, int] = {}
    unknown: list[str] = []
    for name, (_, shape) in types.items():
        if shape is not None:
            numel[name] = math.prod(shape)
        elif name in main:
            unknown.append(name)
    return types, numel, unknown


def _infer_types(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """Runs shape inference once with concrete input shapes: name -> (elem type, shape)."""
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in init_names]
    missing = [i.name for i in graph_inputs if i.name not in input_shapes]
    if missing:
        raise UserInputError(
            f"Latency estimate needs the shape of every model input; missing: "
            f"{', '.join(missing)} (got {', '.join(input_shapes) or 'none'})."
        )
    extra = sorted(set(input_shapes) - {i.name for i in graph_inputs})
    if extra:
        raise UserInputError(
            f"Input shapes name {', '.join(extra)}, which the model does not take; its inputs "
            f"are {', '.join(i.name for i in graph_inputs)}."
        )
    g = onnx.GraphProto()
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    for vi in graph_inputs:
        new = onnx.ValueInfoProto()
        new.CopyFrom(vi)
        shape = input_shapes[vi.name]
        tt = new.type.tensor_type
        if tt.HasField("shape"):
            declared = tt.shape.dim
            if len(declared) != len(shape):
                raise UserInputError(
                    f"Input {vi.name!r} has rank {len(declared)}; got shape {shape}."
                )
            for d, v in zip(declared, shape, strict=True):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != v:
                    raise UserInputError(
                        f"Input {vi.name!r} has static shape "
                        f"{[x.dim_value or x.dim_param for x in declared]}; got {shape}."
                    )
        tt.ClearField("shape")
        tt.shape.SetInParent()
        for v in shape:
            tt.shape.dim.add().dim_value = v
        g.input.append(new)
    for out in model.graph.output:
        new = onnx.ValueInfoProto()
        new.name = out.name
        if out.type.HasField("tensor_type"):
            new.type.tensor_type.elem_type = out.type.tensor_type.elem_type
        else:
            new.type.CopyFrom(out.type)
        g.output.append(new)
    # Weights enter as typed inputs (no data copied); small constants stay, so data
    # propagation can read shape tensors.
    types: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    for t in model.graph.initializer:
        types[t.name] = (t.data_type, tuple(int(d) for d in t.dims))
        if math.prod(t.dims) <= _SHAPE_COMPUTE_MAX_ELEMS:
            g.initializer.append(t)
        else:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.CopyFrom(g)
    try:
        inferred = infer_shapes(m, data_prop=True)  # ONNX Runtime's fused ops typed too
    except Exception as exc:
        raise UserInputError(
            f"Shape inference with input shapes {input_shapes} failed: "
            f"{' '.join(str(exc).split())[:300]}"
        ) from exc
    for g in _graphs(inferred.graph):  # the main graph, then subgraph bodies (for FLOPs)
        for t in g.initializer:
            types.setdefault(t.name, (t.data_type, tuple(int(d) for d in t.dims)))
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.name in types or not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            dims: tuple[int, ...] | None = None
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                dims = tuple(int(d.dim_value) for d in tt.shape.dim)
            types[vi.name] = (tt.elem_type, dims)
    return types


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every subgraph nested in it, outermost first."""
    out = [graph]
    for node in graph.node:
        for body in subgraphs(node):
            out.extend(_graphs(body))
    return out


def _node_costs(
    model: onnx.ModelProto,
    types: dict[str, tuple[int, tuple[int, ...] | None]],
    numel: dict[str, int],
    flops_by_node: dict[str, float] | None = None,
) -> tuple[list[NodeCost], list[int | None]]:
    """Per node: its cost, and which tensor tells its precision in a mixed model.

    The probe is the position ``k`` of the node's first FP32 output, else ``~k`` for its
    first FP32 input, else None (a node with no FP32 tensor never changes precision).
    ``flops_by_node``, when given, receives every node's FLOPs, subgraph bodies included.
    """
    consts = {
        t.name: numpy_helper.to_array(t)
        for g in _graphs(model.graph)
        for t in g.initializer
        if math.prod(t.dims) <= 1 and t.data_type in (TensorProto.INT64, TensorProto.INT32)
    }
    graph = model.graph
    producer: dict[str, int] = {}
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producer[out] = i
        for x in node.input:
            if x:
                readers.setdefault(x, set()).add(i)
    graph_outputs = {o.name for o in graph.output}
    initializers = {t.name for t in graph.initializer}

    def shape(name: str) -> tuple[int, ...] | None:
        return types.get(name, (0, None))[1]

    costs: list[NodeCost] = []
    in_chain: list[bool] = []
    probes: list[int | None] = []
    for i, node in enumerate(graph.node):
        ins = [x for x in node.input if x]
        outs = [x for x in node.output if x]
        float_elems = 0
        fixed = 0
        has_float = False
        for x in (*ins, *outs):
            et = types.get(x, (0, None))[0]
            has_float |= et in _FLOAT_TYPES
            if et == TensorProto.FLOAT:
                float_elems += numel.get(x, 0)
            else:
                fixed += numel.get(x, 0) * _ELEM_SIZE.get(et, 4)
        free = node.op_type in _VIEW_OPS or (
            not has_float and sum(numel.get(x, 0) for x in outs) <= _SHAPE_COMPUTE_MAX_ELEMS
        )
        probe: int | None = None
        for k, x in enumerate(node.output):
            if x and types.get(x, (0, None))[0] == TensorProto.FLOAT:
                probe = k
                break
        else:
            for k, x in enumerate(node.input):
                if x and types.get(x, (0, None))[0] == TensorProto.FLOAT:
                    probe = ~k
                    break
        probes.append(probe)
        if subgraphs(node):  # an If/Loop/Scan does its body's work
            flops = _body_flops(node, types, numel, consts, flops_by_node)
            free = free and not flops
        else:
            flops = 0.0 if free else _flops(node, shape, numel)
        if flops_by_node is not None:
            flops_by_node[node.name] = flops
        fuse_parent = -1
        chain_elems = 0
        if not free and node.op_type in POINTWISE_OPS:
            for x in ins:
                if x in initializers:
                    continue
                p = producer.get(x)
                if (
                    p is not None
                    and in_chain[p]
                    and readers.get(x) == {i}
                    and x not in graph_outputs
                ):
                    fuse_parent = p
                    chain_elems = numel.get(x, 0)
                    break
        in_chain.append(not free and (node.op_type in _FUSION_ROOTS or fuse_parent >= 0))
        costs.append(
            NodeCost(
                name=node.name,
                op_type=node.op_type,
                flops=flops,
                matrix=node.op_type in _MATRIX_OPS,
                float_elems=float_elems,
                fixed_bytes=fixed,
                free=free,
                fuse_parent=fuse_parent,
                chain_elems=chain_elems,
            )
        )
    return costs, probes


def _cast_info(
    model: onnx.ModelProto, costs: list[NodeCost], numel: dict[str, int]
) -> dict[str, tuple[int, tuple[int, ...] | None, bool]]:
    """Per tensor a Cast may read: (elements, readers if a kernel produces it, graph output)."""
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(model.graph.node):
        for x in node.input:
            if x and i not in readers.setdefault(x, []):
                readers[x].append(i)
    outputs = {o.name for o in model.graph.output}
    info: dict[str, tuple[int, tuple[int, ...] | None, bool]] = {}
    for vi in model.graph.input:
        info[vi.name] = (numel.get(vi.name, 0), None, vi.name in outputs)
    for i, node in enumerate(model.graph.node):
        for out in node.output:
            if out:
                fusable = None if costs[i].free else tuple(readers.get(out, ()))
                info[out] = (numel.get(out, 0), fusable, out in outputs)
    return info


def _body_flops(
    node: onnx.NodeProto,
    types: dict[str, tuple[int, tuple[int, ...] | None]],
    numel: dict[str, int],
    consts: Mapping[str, np.ndarray],
    out: dict[str, float] | None,
    scale: float = 1.0,
) -> float:
    """The work of a node's subgraphs (every run of them), recorded per body node in ``out``.

    Views and nodes without a float tensor (shape computations) cost nothing, as in the main
    graph.
    """

    def shape(name: str) -> tuple[int, ...] | None:
        return types.get(name, (0, None))[1]

    runs = scale
    if node.op_type == "Loop" and node.input and node.input[0] in consts:
        runs *= max(int(consts[node.input[0]].reshape(-1)[0]), 0)
    elif node.op_type == "Scan":
        n_scan = _attr(node, "num_scan_inputs", 1)
        axes = [a.ints for a in node.attribute if a.name == "scan_input_axes"]
        axis = int(axes[0][0]) if axes and axes[0] else 0
        first = shape(node.input[len(node.input) - n_scan]) if len(node.input) >= n_scan else None
        if first:
            runs *= first[axis]
    total = 0.0
    for body in subgraphs(node):
        for inner in body.node:
            if subgraphs(inner):
                f = _body_flops(inner, types, numel, consts, out, runs)
            elif inner.op_type in _VIEW_OPS or not any(
                types.get(x, (0, None))[0] in _FLOAT_TYPES for x in inner.output if x
            ):
                f = 0.0
            else:
                f = runs * _flops(inner, shape, numel)
            if out is not None:
                out[inner.name] = f
            total += f
    return total


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _flops(
    node: onnx.NodeProto,
    shape: Callable[[str], tuple[int, ...] | None],
    numel: dict[str, int],
) -> float:
    """FLOPs of one node (best effort where shapes are unknown)."""
    op = node.op_type
    ins = list(node.input)
    out_numel = float(sum(numel.get(x, 0) for x in node.output if x))
    if op in ("Conv", "FusedConv") and len(ins) >= 2:
        w = shape(ins[1])
        if w is not None:  # 2 * N * Cout * prod(out spatial) * Cin/group * prod(kernel)
            return 2.0 * numel.get(node.output[0], 0) * math.prod(w[1:])
    elif op == "ConvTranspose" and len(ins) >= 2:
        w = shape(ins[1])
        if w is not None:  # 2 * N * Cin * prod(in spatial) * Cout/group * prod(kernel)
            return 2.0 * numel.get(ins[0], 0) * math.prod(w[1:])
    elif op == "MatMul" and len(ins) >= 2:
        a = shape(ins[0])
        if a:  # 2 * prod(batch) * M * N * K
            return 2.0 * numel.get(node.output[0], 0) * a[-1]
    elif op in ("Gemm", "FusedGemm") and len(ins) >= 2:
        a = shape(ins[0])
        if a is not None and len(a) == 2:
            k = a[0] if _attr(node, "transA", 0) else a[1]
            return 2.0 * numel.get(node.output[0], 0) * k
    elif op == "Einsum":
        value = _einsum_flops(node, shape)
        if value is not None:
            return value
        return 2.0 * out_numel
    elif node.domain == "com.microsoft" and op in _FUSED_ATTENTION:
        value = _fused_attention_flops(node, shape, numel)
        if value is not None:
            return value
    elif op in ("FusedMatMul", "TransposeMatMul") and len(ins) >= 2:
        a = shape(ins[0])
        if a and len(a) >= 2:  # MatMul's count, the contracted axis as transA says
            k = a[-2] if _attr(node, "transA", 0) else a[-1]
            return 2.0 * numel.get(node.output[0], 0) * k
    elif op == "Attention" and len(ins) >= 2:
        q, kv = shape(ins[0]), shape(ins[1])
        if q and kv and len(kv) >= 2:  # Q K^T and P V: 2 matmuls of 2 * numel(Q) * Skv
            return 4.0 * numel.get(ins[0], 0) * kv[-2]
    elif op in _RECURRENT_OPS and len(ins) >= 3:
        x, w, r = shape(ins[0]), shape(ins[1]), shape(ins[2])
        if x and w and r and len(x) == 3:  # every step: gates x (input + hidden), both GEMMs
            return 2.0 * x[0] * x[1] * (math.prod(w) + math.prod(r))
    elif op in _FLOPS_PER_INPUT:
        return _FLOPS_PER_INPUT[op] * numel.get(ins[0], 0) if ins else 0.0
    elif op in _POOL_OPS:
        kernel = [a.ints for a in node.attribute if a.name == "kernel_shape"]
        return out_numel * (math.prod(kernel[0]) if kernel else 1)
    return _FLOPS_PER_OUTPUT.get(op, 1.0) * out_numel


_FUSED_ATTENTION = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})


def _fused_attention_flops(
    node: onnx.NodeProto,
    shape: Callable[[str], tuple[int, ...] | None],
    numel: dict[str, int],
) -> float | None:
    """FLOPs of ONNX Runtime's fused attention ops.

    ``4 * B * S * L * H`` (Q K^T and P V) plus the softmax over ``B * heads * S * L`` scores,
    plus the QKV projection that Attention folds in. ``H`` is the output's hidden size, ``S``
    the query length and ``L`` the key length (the key's, else past + S: Attention's past
    state, GroupQueryAttention's cache buffer).
    """
    op = node.op_type
    ins = list(node.input)

    def given(k: int) -> tuple[int, ...] | None:
        return shape(ins[k]) if len(ins) > k and ins[k] else None

    out = shape(node.output[0])
    if not out or len(out) != 3:
        return None
    b, s, hidden = out
    heads = _attr(node, "num_heads", 1)
    length = s
    projection = 0.0
    if op == "Attention":
        x, w, past = given(0), given(1), given(4)
        if x is None or w is None or len(w) != 2:
            return None
        projection = 2.0 * math.prod(x) * w[1]
        if past is not None and len(past) == 5:  # [2, B, heads, past, head_size]
            length = s + past[3]
    elif op == "MultiHeadAttention":
        key, past = given(1), given(6)
        if key is not None and len(key) == 3:
            length = key[1]
        elif key is not None and len(key) == 4:  # [B, heads, L, head_size]
            length = key[2]
        if past is not None and len(past) == 4:
            length += past[2]
    else:  # GroupQueryAttention
        past = given(3)
        if past is not None and len(past) == 4:  # [B, kv_heads, buffer, head_size]
            length = max(s, past[2])
    return projection + 4.0 * b * s * length * hidden + _SOFTMAX_FLOPS * b * heads * s * length


def _einsum_flops(
    node: onnx.NodeProto, shape: Callable[[str], tuple[int, ...] | None]
) -> float | None:
    """``2 * prod(size of every index)`` for a contraction (``prod`` for one operand)."""
    eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
    lhs = eq.replace(" ", "").split("->")[0]
    terms = lhs.split(",")
    operands = [x for x in node.input if x]
    if len(terms) != len(operands):
        return None
    sizes: dict[str, int] = {}
    ellipsis = 1
    for term, name in zip(terms, operands, strict=True):
        s = shape(name)
        if s is None:
            return None
        letters = re.findall(r"[A-Za-z]", term)
        if "..." in term:
            n_ell = len(s) - len(letters)
            head = term.index("...")
            n_before = len(re.findall(r"[A-Za-z]", term[:head]))
            ellipsis = max(ellipsis, math.prod(s[n_before : n_before + n_ell]))
            dims = list(s[:n_before]) + list(s[n_before + n_ell :])
        else:
            dims = list(s)
        if len(dims) != len(letters):
            return None
        for letter, d in zip(letters, dims, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), d)
    total = float(math.prod(sizes.values()) * ellipsis)
    return 2.0 * total if len(terms) > 1 else total
