"""Bad inputs, each run through the real CLI: what the user sees, and what they should see.

Every :class:`BadInput` builds its files in a folder of its own (tiny ``onnx.helper`` models,
the embedded demo model, ``.npz`` data) and names the ``amp-search`` command to run on them.
Most must fail with exactly one ``amp-search <cmd>: error:`` line holding the case's key
words, a non-zero exit code and no traceback; the rest (``expect_error=False``) must work.
``tests/cli/test_bad_input.py`` runs them, and ``benchmarks/bad_inputs.py`` tabulates what
each prints.

Cases marked ``needs="userns"`` mount a tiny (or read-only) tmpfs in a user namespace
(``unshare --user --map-root-user --mount``): a real full disk, without root. They are
skipped where unprivileged user namespaces are off. The one marked ``slow`` builds a model
over 2 GiB.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "CASES",
    "BadInput",
    "CaseRun",
    "build_control_flow_model",
    "build_large_model",
    "error_lines",
    "has_userns",
    "run_case",
]

#: Bytes of weights in the large-model case: over protobuf's 2 GiB (2**31) with margin.
LARGE_MODEL_BYTES = 2**31 + 2**26

_PREFIX = re.compile(r"^amp-search \w+: error: ")
#: How a successful search's last line starts (``search done: N trials ... in OUT``).
DONE = "search done"


@dataclass(frozen=True)
class BadInput:
    """One case.

    Attributes:
        name: Short id (test id, table row).
        what: The input, in words.
        setup: Builds the files in a folder; returns the ``amp-search`` arguments.
        exit_code: The exit code expected.
        keywords: Words the output must hold (the error line, or stdout for cases that
            work), compared case-insensitively.
        expect_error: Whether the command must fail with one error line.
        needs: ``"userns"`` when it mounts a tmpfs (see the module docstring).
        mount: ``(size, read_only)`` of the tmpfs mounted on ``<folder>/mnt``.
        slow: Builds something large.
        known_failure: Why it does not behave yet (tests expect it to fail, strictly).
    """

    name: str
    what: str
    setup: Callable[[Path], list[str]]
    exit_code: int
    keywords: tuple[str, ...]
    expect_error: bool = True
    needs: str | None = None
    mount: tuple[str, bool] | None = None
    slow: bool = False
    known_failure: str | None = None


@dataclass
class CaseRun:
    """What one case printed."""

    case: BadInput
    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str
    folder: Path
    errors: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        """The command as a user types it, paths relative to the case folder."""
        args = [a.replace(str(self.folder) + os.sep, "") for a in self.argv]
        return "amp-search " + " ".join(shlex.quote(a) for a in args)

    @property
    def message(self) -> str:
        """The line the user reads: the error line, or the last Note/``search done`` line."""
        if self.errors:
            return self.errors[0].replace(str(self.folder) + os.sep, "")
        lines = [ln.strip() for ln in self.stdout.splitlines() if ln.strip()]
        key = self.case.keywords[0] if self.case.keywords else ""
        keep = [ln for ln in lines if ln.startswith("Note: No candidate")]
        keep += [_head(ln) for ln in lines if key in ln or ln.startswith(DONE)]
        text = " / ".join(dict.fromkeys(keep)) if keep else (lines[-1] if lines else "")
        return text.replace(str(self.folder) + os.sep, "")


def _head(line: str) -> str:
    """A line as tabulated: a search's summary line as its fixed head (no timing, no path)."""
    return DONE if line.startswith(DONE + ":") else line.split(" | ")[0]


def error_lines(text: str) -> list[str]:
    """The ``amp-search <cmd>: error: ...`` lines of ``text``."""
    return [ln for ln in text.splitlines() if _PREFIX.match(ln)]


@functools.cache
def has_userns() -> bool:
    """Whether this process can mount a tmpfs in a new user namespace."""
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d" && umount "$d"'
    try:
        r = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe],
            capture_output=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def run_case(case: BadInput, folder: Path, timeout: float | None = None) -> CaseRun:
    """Builds the case in ``folder`` and runs its command (cwd ``folder``).

    ``timeout`` guards against a hang, it is no speed target: 600 s, and 1800 s for the slow
    cases (a search over 2 GiB of weights writes and reads them for every candidate; on a
    loaded 2-core machine it took close to 600 s).
    """
    if timeout is None:
        timeout = 1800 if case.slow else 600
    folder.mkdir(parents=True, exist_ok=True)
    argv = case.setup(folder)
    cmd = [sys.executable, "-m", "amp_search", *argv]
    if case.mount is not None:
        size, read_only = case.mount
        mnt = folder / "mnt"
        mnt.mkdir(exist_ok=True)
        opts = f"size={size}" + (",ro" if read_only else "")
        script = f"mount -t tmpfs -o {opts} tmpfs {shlex.quote(str(mnt))} && exec " + " ".join(
            shlex.quote(c) for c in cmd
        )
        cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
    env = {**os.environ, "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=timeout, env=env)
    return CaseRun(
        case=case, argv=argv, exit_code=r.returncode, stdout=r.stdout, stderr=r.stderr,
        folder=folder, errors=error_lines(r.stderr) + error_lines(r.stdout),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Models and data


def _demo(folder: Path) -> tuple[Path, Path]:
    import onnx

    from amp_search.demo import build_demo_model, demo_data

    model, data = folder / "demo.onnx", folder / "demo.npz"
    if not model.exists():
        onnx.save(build_demo_model(), model)
        np.savez(data, image=demo_data(n_batches=2, batch=2)["image"])
    return model, data


def _tiny(opset: int, elem_type: int | None = None, ir_version: int = 8) -> object:
    """A one-node model: ``x`` -> Relu (float) or Neg (int64) -> ``y``."""
    import onnx
    from onnx import TensorProto, helper

    et = TensorProto.FLOAT if elem_type is None else elem_type
    op = "Relu" if et == TensorProto.FLOAT else "Neg"
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], name="op")], "tiny",
        [helper.make_tensor_value_info("x", et, [1, 4])],
        [helper.make_tensor_value_info("y", et, [1, 4])],
    )  # fmt: skip
    return onnx.helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def build_control_flow_model() -> object:
    """A model whose If and Loop bodies hold float MatMuls reading an outer weight.

    ``x[1, 8]`` -> MatMul/Relu -> If (then: MatMul with the outer ``W2``; else: Relu) ->
    Loop x3 (body: MatMul with the outer ``W``, Tanh) -> MatMul -> ``y``.
    """
    import onnx
    from onnx import TensorProto as T
    from onnx import helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    w = nh.from_array((0.3 * rng.standard_normal((8, 8))).astype(np.float32), "W")
    w2 = nh.from_array((0.3 * rng.standard_normal((8, 8))).astype(np.float32), "W2")
    vi = helper.make_tensor_value_info
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W2"], ["t_out"], name="then_mm")], "then", [],
        [vi("t_out", T.FLOAT, [1, 8])],
    )  # fmt: skip
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["e_out"], name="else_relu")], "else", [],
        [vi("e_out", T.FLOAT, [1, 8])],
    )  # fmt: skip
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["c_in", "W"], ["mm"], name="body_mm"),
            helper.make_node("Tanh", ["mm"], ["c_out"], name="body_tanh"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [vi("i", T.INT64, []), vi("cond_in", T.BOOL, []), vi("c_in", T.FLOAT, [1, 8])],
        [vi("cond_out", T.BOOL, []), vi("c_out", T.FLOAT, [1, 8])],
    )

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=name, value=nh.from_array(value))

    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h0"], name="pre_mm"),
        helper.make_node("Relu", ["h0"], ["h"], name="pre_relu"),
        helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
        const("zero", np.array(0, np.float32)),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node(
            "If", ["cond"], ["hi"], name="branch", then_branch=then_g, else_branch=else_g
        ),  # fmt: skip
        const("trip", np.array(3, np.int64)),
        const("true", np.array(True)),
        helper.make_node("Loop", ["trip", "true", "hi"], ["lo"], name="loop", body=body),
        helper.make_node("MatMul", ["lo", "W2"], ["y"], name="post_mm"),
    ]
    graph = helper.make_graph(
        nodes, "control_flow", [vi("x", T.FLOAT, [1, 8])], [vi("y", T.FLOAT, [1, 8])],
        [w, w2],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def build_large_model(folder: Path, total_bytes: int = LARGE_MODEL_BYTES) -> tuple[Path, Path]:
    """``large.onnx`` with ``total_bytes`` of weights in ``large.onnx.data``, and its data.

    ``x[N, 4096]`` -> MatMul ``W1[4096, n]`` -> Relu -> MatMul ``W2[n, 4096]`` -> ``y``. The
    weights are written straight to the external data file (the model is never held in
    memory whole); their values are a small random block tiled, scaled to keep activations
    in range. Returns the model and an ``.npz`` with two batches.
    """
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    k = 4096
    n = -(-total_bytes // (2 * k * 4))
    model_path, data_path = folder / "large.onnx", folder / "large.npz"
    data_name = "large.onnx.data"
    rng = np.random.default_rng(0)
    inits = []
    offset = 0
    with open(folder / data_name, "wb") as f:
        for name, (rows, cols) in (("W1", (k, n)), ("W2", (n, k))):
            block = (rng.standard_normal((256, cols)) / np.sqrt(rows)).astype(np.float32)
            data = block.tobytes()
            for r0 in range(0, rows, 256):
                f.write(data[: min(256, rows - r0) * cols * 4])
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[rows, cols])
            t.data_location = TensorProto.EXTERNAL
            length = rows * cols * 4
            for key, value in (("location", data_name), ("offset", str(offset)),
                               ("length", str(length))):  # fmt: skip
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += length
            inits.append(t)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
        ],
        "large", [vi("x", TensorProto.FLOAT, ["batch", k])],
        [vi("y", TensorProto.FLOAT, ["batch", k])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, model_path)
    np.savez(data_path, x=rng.standard_normal((2, 1, k)).astype(np.float32))
    return model_path, data_path


def _save(model: object, path: Path) -> Path:
    import onnx

    onnx.save(model, path)  # type: ignore[arg-type]
    return path


# ---------------------------------------------------------------------------------------
# Case set-ups: each returns the amp-search arguments (paths inside the folder).


def _search(folder: Path, model: Path, data: Path, *extra: str, out: Path | None = None,
            n_trials: int = 3) -> list[str]:  # fmt: skip
    storage = f"sqlite:///{folder / 'study.db'}"
    return ["search", str(model), "--data", str(data), "--out", str(out or folder / "out"),
            "--storage", storage, "--n-trials", str(n_trials), *extra]  # fmt: skip


def _truncated(folder: Path) -> list[str]:
    model, data = _demo(folder)
    blob = model.read_bytes()
    (folder / "truncated.onnx").write_bytes(blob[: len(blob) // 2])
    return ["inspect", str(folder / "truncated.onnx"), "--data", str(data)]


def _random_bytes(folder: Path) -> list[str]:
    _, data = _demo(folder)
    (folder / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    return ["inspect", str(folder / "random.onnx"), "--data", str(data)]


def _external(folder: Path) -> tuple[Path, Path, Path]:
    import onnx

    from amp_search.demo import build_demo_model

    _, data = _demo(folder)
    sub = folder / "external"
    sub.mkdir(exist_ok=True)
    path = sub / "model.onnx"
    onnx.save_model(build_demo_model(), path, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=0)  # fmt: skip
    return path, sub / "model.onnx.data", data


def _external_missing(folder: Path) -> list[str]:
    path, weights, data = _external(folder)
    weights.unlink()
    return ["inspect", str(path), "--data", str(data)]


def _external_truncated(folder: Path) -> list[str]:
    path, weights, data = _external(folder)
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    return ["inspect", str(path), "--data", str(data)]


def _opset(version: int) -> Callable[[Path], list[str]]:
    def setup(folder: Path) -> list[str]:
        path = _save(_tiny(version), folder / f"opset{version}.onnx")
        return ["inspect", str(path), "--synthetic"]

    return setup


def _newest_ir(folder: Path) -> list[str]:
    import onnx

    # What onnx.helper.make_model writes by default (IR 14 with onnx 1.23; ORT 1.2x/1.3x
    # read up to 13 at most).
    model = _save(_tiny(17, ir_version=onnx.IR_VERSION), folder / "new_ir.onnx")
    return ["inspect", str(model), "--synthetic"]


def _no_float(folder: Path) -> list[str]:
    from onnx import TensorProto

    path = _save(_tiny(17, TensorProto.INT64), folder / "int64.onnx")
    np.savez(folder / "int64.npz", x=np.arange(4, dtype=np.int64).reshape(1, 4))
    return _search(folder, path, folder / "int64.npz")


def _control_flow(folder: Path) -> list[str]:
    path = _save(build_control_flow_model(), folder / "control_flow.onnx")
    rng = np.random.default_rng(1)
    np.savez(folder / "cf.npz", x=rng.standard_normal((3, 1, 8)).astype(np.float32))
    return _search(folder, path, folder / "cf.npz", n_trials=8)


def _data(
    make: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> Callable[[Path], list[str]]:
    def setup(folder: Path) -> list[str]:
        from amp_search.demo import demo_data

        model, _ = _demo(folder)
        bad = folder / "bad.npz"
        np.savez(bad, **make(demo_data(n_batches=2, batch=2)))  # type: ignore[arg-type]
        return ["inspect", str(model), "--data", str(bad)]

    return setup


def _with_nan(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = d["image"].copy()
    x[0, 0, 0, 3, 5] = np.nan
    return {"image": x}


def _empty_folder(folder: Path) -> list[str]:
    model, _ = _demo(folder)
    (folder / "calib").mkdir(exist_ok=True)
    return ["inspect", str(model), "--data", str(folder / "calib")]


def _not_npz(folder: Path) -> list[str]:
    model, _ = _demo(folder)
    (folder / "calib.npz").write_text("image,1,2,3\n")
    return ["inspect", str(model), "--data", str(folder / "calib.npz")]


_FLOOR_METRIC = '''\
import numpy as np


def floored(reference, output):
    """Max abs error plus 1: no candidate, not even all-FP32, gets under 1."""
    return 1.0 + float(np.max(np.abs(output.astype(np.float64) - reference)))
'''


def _unmet_budget(folder: Path) -> list[str]:
    model, data = _demo(folder)
    (folder / "metric.py").write_text(_FLOOR_METRIC)
    return _search(folder, model, data, "--metric", f"{folder / 'metric.py'}:floored",
                   "--max-deviation", "0.5")  # fmt: skip


def _flag(*extra: str) -> Callable[[Path], list[str]]:
    def setup(folder: Path) -> list[str]:
        model, data = _demo(folder)
        return _search(folder, model, data, *extra)

    return setup


def _validation(make: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                *extra: str) -> Callable[[Path], list[str]]:  # fmt: skip
    """A search whose --validation-data is the demo data passed through ``make``."""

    def setup(folder: Path) -> list[str]:
        from amp_search.demo import demo_data

        model, data = _demo(folder)
        bad = folder / "val.npz"
        np.savez(bad, **make(demo_data(n_batches=2, batch=2, seed=5)))  # type: ignore[arg-type]
        return _search(folder, model, data, "--validation-data", str(bad), *extra)

    return setup


def _one_batch(folder: Path) -> list[str]:
    """--holdout-fraction on a single calibration batch: nothing left to search on."""
    from amp_search.demo import demo_data

    model, _ = _demo(folder)
    one = folder / "one.npz"
    np.savez(one, image=demo_data(n_batches=1, batch=2)["image"][0])
    return _search(folder, model, one, "--holdout-fraction", "0.25")


def _out_under_file(folder: Path) -> list[str]:
    model, data = _demo(folder)
    (folder / "taken").write_text("a file\n")
    return _search(folder, model, data, out=folder / "taken" / "out")


def _out_is_file(folder: Path) -> list[str]:
    model, data = _demo(folder)
    (folder / "taken").write_text("a file\n")
    return _search(folder, model, data, out=folder / "taken")


def _json_under_file(folder: Path) -> list[str]:
    model, data = _demo(folder)
    (folder / "taken").write_text("a file\n")
    return ["inspect", str(model), "--data", str(data), "--json",
            str(folder / "taken" / "report.json")]  # fmt: skip


def _out_on(mounted: str) -> Callable[[Path], list[str]]:
    def setup(folder: Path) -> list[str]:
        model, data = _demo(folder)
        return _search(folder, model, data, out=folder / "mnt" / mounted, n_trials=12)

    return setup


def _storage_on_full_disk(folder: Path) -> list[str]:
    model, data = _demo(folder)
    args = _search(folder, model, data, n_trials=30)
    args[args.index("--storage") + 1] = f"sqlite:///{folder / 'mnt' / 'study.db'}"
    return args


def _large(folder: Path) -> list[str]:
    model, data = build_large_model(folder / "large")
    return ["inspect", str(model), "--data", str(data)]


def _large_search(folder: Path) -> list[str]:
    model, data = build_large_model(folder / "large")
    return _search(folder, model, data, n_trials=2)


CASES: tuple[BadInput, ...] = (
    BadInput("truncated_onnx", "ONNX file cut in half", _truncated, 2,
             ("not a valid ONNX model", "truncated", "Check that the file is complete")),
    BadInput("random_bytes_onnx", "4 KiB of random bytes named .onnx", _random_bytes, 2,
             ("not a valid ONNX model", "Check that the file is complete")),
    BadInput("external_data_missing", "external data file deleted", _external_missing, 2,
             ("External data file", "missing", "Copy it next to the model")),
    BadInput("external_data_truncated", "external data file cut in half",
             _external_truncated, 2, ("External data file", "truncated", "Copy the complete")),
    BadInput("opset_too_old", "opset 5 model", _opset(5), 2,
             ("Unsupported opset 5", "7 to 23", "a newer opset")),
    BadInput("opset_too_new", "opset 30 model", _opset(30), 2,
             ("Unsupported opset 30", "7 to 23", "an older opset")),
    BadInput("ir_version_newest", "IR version onnx writes by default (newer than ORT reads)",
             _newest_ir, 0, ("units by risk",), expect_error=False),
    BadInput("no_float_tensors", "int64-only model", _no_float, 2,
             ("no float computation", "nothing to search")),
    BadInput("control_flow", "If and Loop with float MatMuls in their bodies",
             _control_flow, 0, (DONE,), expect_error=False),
    BadInput("data_wrong_names", "calibration array named 'pixels', input is 'image'",
             _data(lambda d: {"pixels": d["image"]}), 2,
             ("do not match the model inputs", "missing ['image']", "Name each array")),
    BadInput("data_wrong_shape", "calibration images 32 px wide, model fixes 64",
             _data(lambda d: {"image": d["image"][..., :32]}), 2,
             ("size 32 on axis 3", "fixes it at 64", "Resize the data")),
    BadInput("data_wrong_rank", "calibration array of rank 2",
             _data(lambda d: {"image": d["image"].reshape(4, -1)}), 2,
             ("has shape [4, 12288]", "Give one batch of rank 4")),
    BadInput("data_wrong_dtype", "float64 calibration data, model takes float32",
             _data(lambda d: {"image": d["image"].astype(np.float64)}), 2,
             ("is float64", "astype(np.float32)")),
    BadInput("data_nan", "a NaN in the calibration data", _data(_with_nan), 2,
             ("1 NaN/Inf", "Clean the calibration data")),
    BadInput("data_empty_folder", "--data names an empty folder", _empty_folder, 2,
             ("holds no .npz files",)),
    BadInput("data_not_npz", "--data names a text file", _not_npz, 2,
             ("Cannot read calibration file", "numpy.savez")),
    BadInput("validation_wrong_names", "validation array named 'pixels', input is 'image'",
             _validation(lambda d: {"pixels": d["image"]}), 2,
             ("--validation-data: val.npz", "missing ['image']", "Name each array")),
    BadInput("validation_wrong_shape", "validation images 32 px wide, model fixes 64",
             _validation(lambda d: {"image": d["image"][..., :32]}), 2,
             ("--validation-data: val.npz", "size 32 on axis 3", "fixes it at 64")),
    BadInput("validation_wrong_dtype", "float64 validation data, model takes float32",
             _validation(lambda d: {"image": d["image"].astype(np.float64)}), 2,
             ("--validation-data: val.npz", "is float64", "astype(np.float32)")),
    BadInput("validation_nan", "a NaN in the validation data", _validation(_with_nan), 2,
             ("--validation-data: val.npz", "1 NaN/Inf")),
    BadInput("validation_and_holdout", "--validation-data and --holdout-fraction together",
             _validation(lambda d: d, "--holdout-fraction", "0.25"), 2,
             ("either --validation-data or --holdout-fraction",)),
    BadInput("holdout_fraction_one", "--holdout-fraction 1", _flag("--holdout-fraction", "1"),
             2, ("--holdout-fraction must be in (0, 1)", "got 1")),
    BadInput("holdout_one_batch", "--holdout-fraction 0.25 of a single calibration batch",
             _one_batch, 2, ("holds out 1 of the 1 calibration batch", "leaving none",
             "--validation-data")),
    BadInput("max_deviation_unmet", "--max-deviation no candidate meets", _unmet_budget, 0,
             ("No candidate met --max-deviation 0.5", "front is empty"), expect_error=False),
    BadInput("unknown_backend", "--backend nope", _flag("--backend", "nope"), 2,
             ("Unknown backend 'nope'", "onnxruntime")),
    BadInput("unknown_metric", "--metric nope", _flag("--metric", "nope"), 2,
             ("Unknown metric 'nope'", "rel_l2")),
    BadInput("latency_as_metric", "--metric latency_ms", _flag("--metric", "latency_ms"), 2,
             ("--metric 'latency_ms' does not measure the outputs",)),
    BadInput("timing_target_zero", "--latency measured --timing-target 0",
             _flag("--latency", "measured", "--timing-target", "0"), 2,
             ("--timing-target must be in (0, 1)",)),
    BadInput("unknown_device", "--device tpu", _flag("--device", "tpu"), 2,
             ("Unknown device 'tpu'", "cpu, cuda or cuda:N")),
    BadInput("out_under_file", "--out below a regular file", _out_under_file, 2,
             ("not writable", "Pass --out")),
    BadInput("out_is_file", "--out names a regular file", _out_is_file, 2,
             ("not writable", "Pass --out")),
    BadInput("json_under_file", "inspect --json below a regular file", _json_under_file, 2,
             ("is a file, not a folder",)),
    BadInput("out_read_only", "--out on a read-only file system", _out_on("out"), 2,
             ("Read-only file system", "Pass --out"), needs="userns", mount=("1m", True)),
    BadInput("out_disk_full", "--out on a 2 MiB disk that fills mid-search", _out_on("out"),
             2, ("No space left on device", "Free space", "resumes"), needs="userns",
             mount=("2m", False)),
    BadInput("storage_disk_full", "--storage on a 600 KiB disk that fills mid-search",
             _storage_on_full_disk, 2, ("database cannot grow", "disk is full",
             "finished trials are kept"), needs="userns", mount=("600k", False)),
    BadInput("large_model", "model with 2.06 GiB of weights in external data", _large, 0,
             ("units by risk",), expect_error=False, slow=True),
    BadInput("large_model_search", "search on that model", _large_search, 0, (DONE,),
             expect_error=False, slow=True),
)  # fmt: skip
