"""The embedded default model for ``amp-search demo``: small, generated, and FP16-fragile.

A CNN built deterministically with ``onnx.helper`` (no download), shaped like the failures
users meet in the field:

- an unnormalized stack of convolutions whose activations grow past 65504, so the all-FP16
  model overflows to inf (stacks of convolutions with no normalization);
- a convolution whose weights sit in the FP16 subnormal range and partly flush to zero,
  rescaled afterwards ("Subnormal FP16 values detected");
- ordinary, well-scaled layers that FP16 handles fine, so a mixed answer exists that keeps
  only the few fragile units FP32.

Its calibration data is a deterministic set of smooth synthetic "images" (a realistic stand-in
that needs no download); the real-model tests and benchmarks use the models in
``amp_search.testing.realmodels``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["DEMO_INPUT", "build_demo_model", "demo_data"]

DEMO_INPUT = "image"
_SIZE = 64
_C = 32  # channels: wide enough that FP16 math, not kernel launches, decides the latency


def _conv(
    rng: np.random.Generator, name: str, cin: int, cout: int, gain: float
) -> tuple[np.ndarray, np.ndarray]:
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    w *= gain * np.sqrt(2.0 / (cin * 9))
    b = (0.05 * rng.standard_normal(cout)).astype(np.float32)
    return w, b


def build_demo_model(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """The demo model: input ``image`` float32 [N, 3, 64, 64], output ``logits`` [N, 10].

    ``opset``: 17 (the default), or 22, where ONNX types Conv ``bfloat16`` (a model that a
    search with ``--precisions fp16,bf16`` may put in BF16).
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def add_init(name: str, value: np.ndarray | np.floating | float) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def conv(name: str, x: str, cin: int, cout: int, gain: float, *, relu: bool = True,
             stride: int = 1) -> str:  # fmt: skip
        w, b = _conv(rng, name, cin, cout, gain)
        out = f"{name}/out"
        nodes.append(
            helper.make_node(
                "Conv", [x, add_init(f"{name}.weight", w), add_init(f"{name}.bias", b)],
                [out if not relu else f"{name}/conv"], name=f"{name}/Conv",
                pads=[1, 1, 1, 1], strides=[stride, stride],
            )
        )  # fmt: skip
        if relu:
            nodes.append(helper.make_node("Relu", [f"{name}/conv"], [out], name=f"{name}/Relu"))
        return out

    # Stem: well scaled.
    x = conv("stem", DEMO_INPUT, 3, _C, 1.0)
    x = conv("block1", x, _C, _C, 1.0)
    # Unnormalized stack: each layer amplifies ~8x; the last ones pass 65504 in FP32.
    for i in range(5):
        x = conv(f"amp{i}", x, _C, _C, 7.5, stride=2 if i in (1, 3) else 1)
    # Bring the range back down, as a later normalization or scale would.
    nodes.append(
        helper.make_node(
            "Mul", [x, add_init("rescale.scale", np.float32(1e-4))], ["rescale/out"],
            name="rescale/Mul",
        )
    )  # fmt: skip
    x = "rescale/out"
    # Tiny weights: subnormal in FP16, a share flushes to zero; compensated by a big scale.
    w, b = _conv(rng, "tiny", _C, _C, 1.0)
    w *= 1e-5
    nodes.append(
        helper.make_node(
            "Conv", [x, add_init("tiny.weight", w), add_init("tiny.bias", b * 1e-5)],
            ["tiny/conv"], name="tiny/Conv", pads=[1, 1, 1, 1],
        )
    )  # fmt: skip
    nodes.append(
        helper.make_node(
            "Mul", ["tiny/conv", add_init("tiny.scale", np.float32(5e4))], ["tiny/out"],
            name="tiny/Mul",
        )
    )  # fmt: skip
    x = conv("head1", "tiny/out", _C, 2 * _C, 1.0)
    x = conv("head2", x, 2 * _C, 2 * _C, 1.0)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool/out"], name="pool/GAP"))
    nodes.append(
        helper.make_node("Flatten", ["pool/out"], ["flat/out"], name="flat/Flatten", axis=1)
    )
    fc_w = (rng.standard_normal((2 * _C, 10)) * np.sqrt(1.0 / (2 * _C))).astype(np.float32)
    nodes.append(
        helper.make_node(
            "Gemm", ["flat/out", add_init("fc.weight", fc_w), add_init("fc.bias", np.zeros(10))],
            ["logits"], name="fc/Gemm",
        )
    )  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "amp_search_demo",
        [helper.make_tensor_value_info(DEMO_INPUT, TensorProto.FLOAT, ["N", 3, _SIZE, _SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="amp-search-demo"
    )
    model.ir_version = 8 if opset <= 17 else 10
    onnx.checker.check_model(model, full_check=True)
    return model


def demo_data(n_batches: int = 4, batch: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    """Calibration data: a stack of ``n_batches`` batches of smooth synthetic images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float32) / _SIZE
    imgs = np.empty((n_batches * batch, 3, _SIZE, _SIZE), dtype=np.float32)
    for i in range(imgs.shape[0]):
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        base = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        for c in range(3):
            imgs[i, c] = base * rng.uniform(0.5, 1.5) + rng.uniform(-0.5, 0.5)
    imgs += 0.05 * rng.standard_normal(imgs.shape).astype(np.float32)
    return {DEMO_INPUT: imgs.reshape(n_batches, batch, 3, _SIZE, _SIZE)}
