"""Builds a strongly typed TensorRT engine from a mixed-precision ONNX and reads what it got.

:func:`build_engine` parses the ONNX with ``OnnxParser`` into a *strongly typed* network (every
tensor's type comes from the ONNX graph; no ``BuilderFlag.FP16``, no layer precisions, which is
also the only mode TensorRT 11 and TensorRT-RTX have), adds an optimization profile for dynamic
inputs, shares one timing cache file per device and TensorRT version across builds, and asks for
``ProfilingVerbosity.DETAILED`` so the engine inspector can say which precision each fused layer
actually runs in (the runner lowers the execution context's NVTX verbosity again before timing).
:func:`layer_precisions` reads that inspector JSON (the 10.x and 11.x schemas).

``BuilderFlag.TF32`` is on by default in TensorRT ("Enabled by default", NvInfer.h, 10.x-11.x):
the builder clears it unless option ``tf32`` is 1, so FP32 layers (and the all-FP32 baseline)
compute in FP32, not TF32.

The build path works with ``tensorrt`` (10.x, 11.x) or ``tensorrt_rtx`` (TensorRT-RTX, the
TensorRT 11 API): option ``module`` picks one, ``"auto"`` prefers ``tensorrt``. Neither is
imported until a function here is called.

API references (NVIDIA TensorRT Python API docs, "Core" pages, 10.x unless noted; the same names
are in TensorRT 11.x and TensorRT-RTX 1.x): Builder, IBuilderConfig, ITimingCache, OnnxParser,
Runtime, ICudaEngine, EngineInspector; the engine-inspector JSON schema from the developer guide's
"Engine Inspector" section and "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x".
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amp_search._atomic import write_bytes_atomic
from amp_search._optional import require
from amp_search.errors import BackendUnavailableError, CandidateBuildError, UserInputError

__all__ = [
    "DEFAULT_OPTIONS",
    "FLAG_OPTIONS",
    "MODULES",
    "BuiltEngine",
    "build_engine",
    "check_flag",
    "import_trt",
    "layer_precisions",
    "make_logger",
]

logger = logging.getLogger(__name__)

#: The Python modules that can build: TensorRT and TensorRT-RTX (same strongly typed API).
MODULES = ("tensorrt", "tensorrt_rtx")

#: Build and run options of the TensorRT backend, with their defaults.
DEFAULT_OPTIONS: dict[str, Any] = {
    # "auto" (tensorrt if importable, else tensorrt_rtx), "tensorrt" or "tensorrt_rtx".
    "module": "auto",
    # 0..5; TensorRT's default is 3. A search may build at 1 or 2 and rebuild its front at the
    # default: lower levels build faster and may pick slower tactics. Level 0 takes the first
    # tactic that runs and ignores the timing cache: its timings say little about level 3.
    "builder_optimization_level": 3,
    # 1: let FP32 layers use TF32 (BuilderFlag.TF32, on by default in TensorRT); 0 (default)
    # clears the flag, so "FP32" means FP32, as use_tf32=0 does for ONNX Runtime.
    "tf32": 0,
    # Workspace memory pool limit in MiB (None: TensorRT's default, the device's memory).
    "workspace_mb": None,
    # {input: shape}: min = opt = max for dynamic inputs (the calibration batch's shape).
    "shapes": None,
    # {input: shape} per bound of the optimization profile; override "shapes" per input.
    "min_shapes": None,
    "opt_shapes": None,
    "max_shapes": None,
    # 1: load the shared timing cache before a build and merge this build's entries back.
    "timing_cache": 1,
    # Folder of the shared timing cache files (None: the user cache folder). Not part of the
    # candidate's identity: where a cache lives changes nothing about the engine.
    "timing_cache_dir": None,
    # Runner: 1 captures one inference into a CUDA graph and replays it for timing (as the
    # engine should then be deployed; removes launch overhead and most run-to-run noise). A
    # capture that fails falls back to plain enqueues, with the reason recorded.
    "cuda_graph": 1,
}

_MAX_OPT_LEVEL = 5
#: The 0/1 options (bools and "0"/"1" are taken too, and stored as ints).
FLAG_OPTIONS = ("tf32", "timing_cache", "cuda_graph")


@dataclass(frozen=True)
class BuiltEngine:
    """What one build produced.

    Attributes:
        engine: The serialized engine (plan) bytes.
        build_time_s: Seconds spent parsing and building (not inspecting).
        layer_info: The engine inspector's JSON text, or None when it could not be read.
        module: ``"tensorrt"`` or ``"tensorrt_rtx"``.
        version: The module's ``__version__``.
        parser_errors: Errors the ONNX parser reported (empty after a successful parse).
        warnings: Warnings and errors TensorRT logged during the build.
        layer_info_error: Why ``layer_info`` is None (e.g. TensorRT-RTX cannot deserialize on
            this GPU), or None.
        timing_cache_path: The shared timing cache file used, or None.
        settings: The builder settings actually applied (for the record).
    """

    engine: bytes
    build_time_s: float
    layer_info: str | None
    module: str
    version: str
    parser_errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    layer_info_error: str | None = None
    timing_cache_path: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def import_trt(module: str = "auto") -> tuple[types.ModuleType, str]:
    """Imports the TensorRT module to build with.

    Args:
        module: ``"auto"`` (``tensorrt`` if it imports, else ``tensorrt_rtx``), ``"tensorrt"``
            or ``"tensorrt_rtx"``.

    Returns:
        The module and its name.

    Raises:
        UserInputError: ``module`` is none of the above.
        BackendUnavailableError: The module (or, for ``"auto"``, both) cannot be imported.
    """
    if module not in ("auto", *MODULES):
        raise UserInputError(
            f"TensorRT option module must be 'auto', 'tensorrt' or 'tensorrt_rtx', got {module!r}."
        )
    names = MODULES if module == "auto" else (module,)
    failures: list[str] = []
    for name in names:
        try:
            return require(name, extra="tensorrt", what="The TensorRT backend"), name
        except BackendUnavailableError as exc:
            failures.extend(exc.notes or [str(exc)])
    raise BackendUnavailableError(
        f"The TensorRT backend needs the '{names[0]}' package"
        + (" (or 'tensorrt_rtx')" if module == "auto" else "")
        + ". Install with: pip install 'amp-search[tensorrt]'",
        notes=failures,
    )


def make_logger(trt: types.ModuleType) -> Any:
    """A ``trt.ILogger`` that forwards to :mod:`logging` and keeps warnings and errors.

    The logger must outlive every TensorRT object created with it (TensorRT's ILogger docs), so
    callers keep a reference for as long as they hold the builder, runtime or engine.
    """

    class _CollectingLogger(trt.ILogger):  # type: ignore[misc,name-defined]
        # Subclassing ILogger needs the explicit base __init__ (Python API docs, "Logger").
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []
            self.quiet = False  # True: an expected failure may follow; forward at DEBUG only

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)  # INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4
            if level <= 2:
                self.messages.append(msg)
            py_level = {0: logging.ERROR, 1: logging.ERROR, 2: logging.WARNING}.get(
                level, logging.DEBUG
            )
            if self.quiet:
                py_level = logging.DEBUG
            if level <= 3 and logger.isEnabledFor(py_level):
                logger.log(py_level, "TensorRT: %s", msg)

        def errors(self) -> list[str]:
            return list(self.messages)

    return _CollectingLogger()


def check_flag(name: str, value: Any) -> int:
    """A 0/1 option as an int (``True``/``False`` and ``"0"``/``"1"`` also accepted).

    Raises:
        UserInputError: ``value`` is anything else.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | str) and str(value).strip() in ("0", "1"):
        return int(str(value).strip())
    raise UserInputError(f"TensorRT option {name} must be 0 or 1, got {value!r}.")


def _one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (TensorRT messages may span several), cut at ``limit``."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _major(version: str) -> int:
    match = re.match(r"\d+", version)
    return int(match.group()) if match else 0


def _network_flags(trt: types.ModuleType, module: str, version: str) -> int:
    """Creation flags for a strongly typed network, by enum (never a literal bit)."""
    if module == "tensorrt" and _major(version) >= 11:
        # TensorRT 11: strongly typed is the only mode; the flag is deprecated and ignored
        # (11.0 Python API docs, "Builder": NetworkDefinitionCreationFlag.STRONGLY_TYPED).
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # 10.x: 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED) (10.x Python API docs,
    # "Builder"); EXPLICIT_BATCH is ignored since 10.0 and not set.
    return 1 << int(flag) if flag is not None else 0


def _parser_errors(parser: Any) -> list[str]:
    """Every error of ``OnnxParser`` as one line (``num_errors``/``get_error``, ParserError)."""
    out: list[str] = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)

        def part(attr: str, err: Any = err) -> Any:
            fn = getattr(err, attr, None)  # node_name/node_operator exist from 10.0 on
            try:
                return fn() if callable(fn) else None
            except Exception:  # a missing detail must not hide the error itself
                return None

        desc = str(part("desc") or "no description")
        name, op, node = part("node_name"), part("node_operator"), part("node")
        if name:
            where = f"node {name!r}" + (f" ({op})" if op else "")
        elif isinstance(node, int) and node >= 0:
            where = f"node #{node}" + (f" ({op})" if op else "")
        else:
            where = "model"
        code = part("code")
        text = f"{where}: {desc}" + (f" [{getattr(code, 'name', code)}]" if code else "")
        out.append(_one_line(text))
    return out


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError) as exc:
        raise UserInputError(
            f"TensorRT option {what} must be a list of ints, got {value!r}."
        ) from exc
    if any(d < 0 for d in shape):
        raise UserInputError(f"TensorRT option {what} must be concrete (no -1), got {shape}.")
    return shape


def _profile_shapes(
    inputs: Sequence[tuple[str, tuple[int, ...]]], opts: Mapping[str, Any]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) for every dynamic input, from ``shapes`` and ``min/opt/max_shapes``."""
    keys = ("min_shapes", "opt_shapes", "max_shapes")
    shapes: Mapping[str, Any] = opts.get("shapes") or {}
    bounds: list[Mapping[str, Any]] = [opts.get(k) or {} for k in keys]
    known = {name for name, _ in inputs}
    for key, given in zip(("shapes", *keys), (shapes, *bounds), strict=True):
        unknown = set(given) - known
        if unknown:
            raise UserInputError(
                f"TensorRT option {key} names unknown input(s) {sorted(unknown)}; "
                f"the model's inputs are {sorted(known)}."
            )
    out = {}
    for name, dims in inputs:
        if all(d >= 0 for d in dims):
            continue
        base = shapes.get(name)
        opt = bounds[1].get(name, base)
        if opt is None:
            raise UserInputError(
                f"Input {name!r} has dynamic shape {list(dims)}: TensorRT needs its shape. Give "
                f"options shapes={{{name!r}: [...]}} (the calibration batch's shape) or "
                "min_shapes/opt_shapes/max_shapes."
            )
        lo, mid, hi = (
            _as_shape(b.get(name, opt), f"{key}[{name!r}]")
            for b, key in zip(bounds, keys, strict=True)
        )
        _check_profile(name, dims, lo, mid, hi)
        out[name] = (lo, mid, hi)
    return out


def _check_profile(
    name: str,
    dims: tuple[int, ...],
    lo: tuple[int, ...],
    mid: tuple[int, ...],
    hi: tuple[int, ...],
) -> None:
    """Raises UserInputError unless min/opt/max suit the input, as ``set_shape`` requires.

    TensorRT's conditions (Python API, "IOptimizationProfile.set_shape"): equal ranks, matching
    the input's; ``0 <= min[i] <= opt[i] <= max[i]``; static dimensions equal everywhere.
    """
    given = {"min": lo, "opt": mid, "max": hi}
    ranks = {key: len(shape) for key, shape in given.items()}
    if set(ranks.values()) != {len(dims)}:
        raise UserInputError(
            f"TensorRT profile shapes for input {name!r} must all have its rank {len(dims)} "
            f"(declared {list(dims)}), got "
            + ", ".join(f"{key} {list(shape)}" for key, shape in given.items())
            + "; fix options shapes/min_shapes/opt_shapes/max_shapes."
        )
    for key, shape in given.items():
        if any(d >= 0 and d != s for d, s in zip(dims, shape, strict=True)):
            raise UserInputError(
                f"Shape {list(shape)} given as {key} for input {name!r} does not fit its "
                f"declared shape {list(dims)} (-1 is dynamic); change only its -1 dimensions."
            )
    for i, (a, b, c) in enumerate(zip(lo, mid, hi, strict=True)):
        if not a <= b <= c:
            raise UserInputError(
                f"TensorRT profile for input {name!r} needs min <= opt <= max in every "
                f"dimension, got min {list(lo)}, opt {list(mid)}, max {list(hi)} (dimension "
                f"{i}: {a}, {b}, {c}); fix options min_shapes/opt_shapes/max_shapes."
            )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An advisory lock beside ``path`` (POSIX ``flock``), so concurrent builds merge in turn."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic replace alone (a concurrent merge may be lost)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _load_timing_cache(config: Any, path: Path) -> bool:
    """Attaches the shared timing cache (empty if the file is new); True if one was loaded."""
    if not hasattr(config, "create_timing_cache"):
        return False
    data = b""
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            logger.warning("Could not read the TensorRT timing cache %s: %s", path, exc)
    cache = None
    if data:
        try:  # IBuilderConfig.create_timing_cache(serialized) (10.x "IBuilderConfig")
            cache = config.create_timing_cache(data)
        except Exception as exc:  # corrupt or from another version: start a new one
            logger.warning("Ignoring the TensorRT timing cache %s: %s", path, exc)
    loaded = cache is not None
    if cache is None:
        cache = config.create_timing_cache(b"")
    # ignore_mismatch=False: a cache from another device or version is rejected, not mixed in.
    if not config.set_timing_cache(cache, ignore_mismatch=False) and loaded:
        logger.warning("TensorRT rejected the timing cache %s; building without it.", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        loaded = False
    return loaded


def _save_timing_cache(config: Any, path: Path) -> None:
    """Merges this build's timing entries into the shared file, written atomically."""
    try:
        with _file_lock(path):
            cache = config.get_timing_cache()
            if cache is None:
                return
            if path.is_file():  # another build may have written it since ours started
                other = config.create_timing_cache(path.read_bytes())
                # ITimingCache.combine(input_cache, ignore_mismatch) (10.x "ITimingCache")
                if other is not None and not cache.combine(other, False):
                    logger.debug("TensorRT skipped merging %s (version/device mismatch)", path)
            write_bytes_atomic(path, bytes(cache.serialize()))
    except Exception as exc:  # the cache only speeds builds up: never fail a build over it
        logger.warning("Could not update the TensorRT timing cache %s: %s", path, exc)


def _configure(trt: types.ModuleType, config: Any, opts: Mapping[str, Any]) -> dict[str, Any]:
    """Applies the options to ``config``; returns what was actually set."""
    applied: dict[str, Any] = {}
    level = opts.get("builder_optimization_level")
    if level is not None:
        with contextlib.suppress(TypeError, ValueError):
            level = int(level)  # "3" from a command line
        if not isinstance(level, int) or not 0 <= level <= _MAX_OPT_LEVEL:
            raise UserInputError(
                f"TensorRT option builder_optimization_level must be an int 0..{_MAX_OPT_LEVEL}, "
                f"got {level!r}."
            )
        if hasattr(config, "builder_optimization_level"):  # IBuilderConfig property, 8.6+
            config.builder_optimization_level = level
            applied["builder_optimization_level"] = level
        else:
            applied["builder_optimization_level"] = "not supported by this module"
    workspace = opts.get("workspace_mb")
    if workspace is not None:
        if not isinstance(workspace, int | float) or workspace <= 0:
            raise UserInputError(
                f"TensorRT option workspace_mb must be a positive number, got {workspace!r}."
            )
        # set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes) (10.x "IBuilderConfig")
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace * 2**20))
        applied["workspace_mb"] = workspace
    # BuilderFlag.TF32 is set by default (NvInfer.h: "Enabled by default"; 10.0-11.x): clear it
    # unless asked, with IBuilderConfig.clear_flag/set_flag (10.x/11.x "IBuilderConfig").
    tf32 = check_flag("tf32", opts.get("tf32", 0))
    flag = getattr(getattr(trt, "BuilderFlag", None), "TF32", None)
    if flag is not None:
        (config.set_flag if tf32 else config.clear_flag)(flag)
        applied["tf32"] = bool(config.get_flag(flag))
    else:
        applied["tf32"] = "not supported by this module"
    # DETAILED: the inspector reports each layer's tensors and formats (10.x "EngineInspector").
    verbosity = getattr(getattr(trt, "ProfilingVerbosity", None), "DETAILED", None)
    if verbosity is not None and hasattr(config, "profiling_verbosity"):
        config.profiling_verbosity = verbosity
        applied["profiling_verbosity"] = "DETAILED"
    return applied


def _inspect(trt: types.ModuleType, log: Any, engine: bytes) -> tuple[str | None, str | None]:
    """The engine inspector's JSON, or None and why (deserializing needs a supported GPU).

    TensorRT-RTX builds for GPUs it cannot run on here (an H100/H200: "The engine cannot run on
    this GPU, which has compute capability 9.0"), so a failure is reported, not logged as an
    error.
    """
    seen = len(log.messages)
    log.quiet = True
    try:
        runtime = trt.Runtime(log)
        cuda_engine = runtime.deserialize_cuda_engine(engine)  # None on failure (logged)
        if cuda_engine is None:
            reason = "; ".join(log.messages[seen:][-3:]) or "no reason logged"
            return None, f"the engine could not be deserialized here: {reason}"
        # ICudaEngine.create_engine_inspector() + EngineInspector.get_engine_information(
        # LayerInformationFormat.JSON) (developer guide, "Engine Inspector", 10.x and 11.x).
        inspector = cuda_engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        del inspector, cuda_engine, runtime
        return str(text), None
    except Exception as exc:  # layer info is a report; the engine itself is fine
        return None, f"the engine inspector failed: {exc}"
    finally:
        log.quiet = False
        del log.messages[seen:]  # the build's warnings stay the build's


def build_engine(
    onnx_path: str | Path,
    *,
    options: Mapping[str, Any],
    timing_cache_path: str | Path | None,
) -> BuiltEngine:
    """Builds a strongly typed engine from a mixed-precision ONNX file.

    Args:
        onnx_path: The ONNX file (external data is read relative to it).
        options: TensorRT options (see :data:`DEFAULT_OPTIONS`; missing ones take defaults).
        timing_cache_path: The shared timing cache file (loaded if it exists, merged and
            written back atomically after the build), or None for no cache.

    Returns:
        The engine bytes, build time, inspector JSON and what was used.

    Raises:
        BackendUnavailableError: No TensorRT module can be imported.
        UserInputError: Invalid options, or a dynamic input without a shape.
        CandidateBuildError: The parser rejected the model or TensorRT could not build it; the
            message is one line, every parser/builder error follows as a note.
    """
    path = Path(onnx_path)
    opts = {**DEFAULT_OPTIONS, **options}
    trt, module = import_trt(str(opts["module"]))
    version = str(getattr(trt, "__version__", "unknown"))
    log = make_logger(trt)
    cache_path = Path(timing_cache_path) if timing_cache_path and opts["timing_cache"] else None
    if module == "tensorrt_rtx":
        # TensorRT-RTX: "Timing cache operations are no-ops" since 1.2 (its ITimingCache and
        # IBuilderConfig.create_timing_cache docstrings); it tunes at run time instead.
        cache_path = None

    t0 = time.perf_counter()
    builder = trt.Builder(log)
    network = builder.create_network(_network_flags(trt, module, version))
    parser = trt.OnnxParser(network, log)
    parsed = bool(parser.parse_from_file(str(path)))  # reads external data beside the file
    errors = _parser_errors(parser)
    if not parsed or errors:
        errors = errors or [_one_line(m) for m in log.errors()] or ["the parser gave no reason"]
        raise CandidateBuildError(
            f"TensorRT's ONNX parser ({module} {version}) rejected {path.name} with "
            f"{len(errors)} error(s), first: {errors[0]}. Check the op's support in this "
            "TensorRT version, or keep the unit FP32.",
            notes=errors,
        )

    config = builder.create_builder_config()
    settings = _configure(trt, config, opts)
    inputs = []
    for i in range(network.num_inputs):  # INetworkDefinition.num_inputs / get_input(i)
        tensor = network.get_input(i)
        inputs.append((str(tensor.name), tuple(int(d) for d in tensor.shape)))
    profile_shapes = _profile_shapes(inputs, opts)
    if profile_shapes:
        # Builder.create_optimization_profile + IOptimizationProfile.set_shape(name, min, opt,
        # max) + IBuilderConfig.add_optimization_profile (10.x "IOptimizationProfile").
        # add_optimization_profile returns the profile's index, or -1 if it is not valid.
        profile = builder.create_optimization_profile()
        shown = {k: [list(s) for s in v] for k, v in profile_shapes.items()}
        try:
            for name, (lo, mid, hi) in profile_shapes.items():
                profile.set_shape(name, lo, mid, hi)  # raises on inconsistent shapes
            index = int(config.add_optimization_profile(profile))
        except (RuntimeError, ValueError) as exc:
            index, logged = -1, [_one_line(str(exc)), *log.errors()[-3:]]
        else:
            logged = log.errors()[-3:]
        if index < 0:
            raise CandidateBuildError(
                f"TensorRT ({module} {version}) rejected the optimization profile (min, opt, max "
                f"per input) {shown} for {path.name}; give shapes the model accepts with "
                "options shapes/min_shapes/opt_shapes/max_shapes.",
                notes=logged,
            )
        settings["profile"] = shown
    settings["timing_cache_loaded"] = False
    if cache_path is not None:
        try:
            settings["timing_cache_loaded"] = _load_timing_cache(config, cache_path)
        except Exception as exc:  # the cache only speeds builds up: never fail a build over it
            logger.warning("Building without the TensorRT timing cache %s: %s", cache_path, exc)

    plan = builder.build_serialized_network(network, config)  # IHostMemory, None on failure
    if plan is None:
        logged = log.errors() or ["TensorRT logged no error"]
        raise CandidateBuildError(
            f"TensorRT ({module} {version}) could not build an engine from {path.name}: "
            f"{_one_line(logged[-1])}. See the notes; a unit whose FP16 kernel is missing "
            "must stay FP32.",
            notes=logged,
        )
    engine = bytes(plan)  # IHostMemory exposes the buffer protocol
    build_time = time.perf_counter() - t0
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    del plan, parser, network, config, builder

    layer_info, info_error = _inspect(trt, log, engine)
    if info_error:
        logger.info("No layer information for %s: %s", path.name, info_error)
    return BuiltEngine(
        engine=engine,
        build_time_s=build_time,
        layer_info=layer_info,
        module=module,
        version=version,
        warnings=tuple(log.errors()),
        layer_info_error=info_error,
        timing_cache_path=cache_path,
        settings=settings,
    )


# --- engine inspector JSON -------------------------------------------------------------------

_FLOAT_PRECISIONS = frozenset({"fp32", "fp16", "bf16", "fp8", "fp4"})
# Words in "Format/Datatype" strings ("Row major linear FP16 format", "Channel major FP32 format
# where channel % 4 == 0", "Thirty-two wide channel vectorized row major Int8 format") and in the
# 11.x "Datatype"/"DataType" values ("Half", "Float", "FP16", "kHALF", "DataType.HALF").
_DTYPE_WORDS = {
    "fp32": "fp32", "float": "fp32", "float32": "fp32", "kfloat": "fp32",
    "fp16": "fp16", "half": "fp16", "float16": "fp16", "khalf": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "kbf16": "bf16",
    "fp8": "fp8", "kfp8": "fp8", "e4m3": "fp8", "float8": "fp8",
    "fp4": "fp4", "kfp4": "fp4",
    "int8": "int8", "kint8": "int8", "int4": "int4", "kint4": "int4",
    "int32": "int32", "kint32": "int32", "int64": "int64", "kint64": "int64",
    "uint8": "uint8", "kuint8": "uint8", "bool": "bool", "kbool": "bool",
}  # fmt: skip
_TENSOR_TYPE_KEYS = ("Format/Datatype", "Datatype", "DataType", "Precision", "Format")
_LAYER_TYPE_KEYS = ("Precision", "precision", "ComputePrecision")


def _dtype_of(text: Any) -> str | None:
    """The precision named in a format/type string, or None."""
    if not isinstance(text, str):
        return None
    for word in re.findall(r"[A-Za-z]+[0-9]*", text):
        found = _DTYPE_WORDS.get(word.lower())
        if found:
            return found
    return None


def _tensor_dtype(tensor: Any) -> str | None:
    if isinstance(tensor, str):
        return _dtype_of(tensor)
    if not isinstance(tensor, Mapping):
        return None
    for key in _TENSOR_TYPE_KEYS:  # 10.x "Format/Datatype"; 11.x "Format" + "Datatype"
        found = _dtype_of(tensor.get(key))
        if found:
            return found
    return None


def _layer_precision(layer: Mapping[str, Any]) -> str:
    """A layer's precision: an explicit key if any, else its first float input's type.

    A fused layer's inputs carry the type its kernel computes in (TREx uses the first input's
    type the same way); its outputs may already be cast for the next layer. A layer without
    float inputs (a Cast from int, a constant) takes its first float output's type.
    """
    for key in _LAYER_TYPE_KEYS:
        found = _dtype_of(layer.get(key))
        if found:
            return found
    ins = [_tensor_dtype(t) for t in _tensors(layer, "Inputs")]
    outs = [_tensor_dtype(t) for t in _tensors(layer, "Outputs")]
    for group in (ins, outs):
        for dtype in group:
            if dtype in _FLOAT_PRECISIONS:
                return dtype
    for dtype in (*ins, *outs):
        if dtype:
            return dtype
    return "unknown"


def _tensors(layer: Mapping[str, Any], key: str) -> list[Any]:
    value = layer.get(key)
    if value is None:
        value = layer.get(key.lower())
    if isinstance(value, Mapping):
        return [value]
    return list(value) if isinstance(value, list | tuple) else []


def _layers(doc: Any) -> list[Any]:
    if isinstance(doc, Mapping):
        if "Layers" in doc:
            value = doc["Layers"]
            return list(value) if isinstance(value, list | tuple) else []
        if "Name" in doc or "LayerName" in doc:  # get_layer_information: one layer
            return [doc]
        return []
    return list(doc) if isinstance(doc, list | tuple) else []


def _inspector_json(source: Any) -> Any:
    """Parsed inspector JSON from text, a parsed document, an ICudaEngine or an inspector."""
    if isinstance(source, bytes | bytearray):
        source = source.decode()
    if isinstance(source, str):
        try:
            return json.loads(source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Not engine-inspector JSON: {exc}") from exc
    if isinstance(source, Mapping | list | tuple):
        return source
    inspector = source
    if hasattr(source, "create_engine_inspector"):  # an ICudaEngine
        inspector = source.create_engine_inspector()
    if hasattr(inspector, "get_engine_information"):
        trt = importlib.import_module(type(inspector).__module__.split(".")[0])
        return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    raise TypeError(
        f"layer_precisions needs inspector JSON, an ICudaEngine or an EngineInspector, "
        f"got {type(source).__name__}"
    )


def layer_precisions(engine_or_inspector_json: Any) -> dict[str, str]:
    """Each engine layer's precision from the engine inspector's JSON.

    Reads both schemas: TensorRT 10.x (``{"Layers": [{"Name", "Inputs": [{"Format/Datatype":
    "Row major linear FP16 format", ...}], "Outputs", ...}], "Bindings": [...]}``) and 11.x,
    where tensors carry ``"Format"`` and ``"Datatype"`` apart and ``"I/O Tensors"`` replaces
    ``"Bindings"``; a layer-level ``"Precision"`` key wins where present. Without
    ``ProfilingVerbosity.DETAILED`` layers are bare name strings: their precision is
    ``"unknown"``.

    Args:
        engine_or_inspector_json: The JSON text (or bytes, or the parsed document), one layer's
            JSON from ``get_layer_information``, an ``ICudaEngine`` or an ``EngineInspector``.

    Returns:
        Layer name -> ``"fp32"``, ``"fp16"``, ``"bf16"``, ``"fp8"``, ``"int8"``, ``"int32"``,
        ``"int64"``, ``"bool"``, ... or ``"unknown"``, in engine order. The fp32/fp16 values
        match :class:`amp_search.types.Precision`. A repeated layer name gets ``_2``, ``_3``...
        (as TREx does).
    """
    doc = _inspector_json(engine_or_inspector_json)
    out: dict[str, str] = {}
    for i, layer in enumerate(_layers(doc)):
        if isinstance(layer, str):
            name, precision = layer, "unknown"
        elif isinstance(layer, Mapping):
            name = str(layer.get("Name") or layer.get("LayerName") or f"layer_{i}")
            precision = _layer_precision(layer)
        else:
            continue
        unique, n = name, 1
        while unique in out:
            n += 1
            unique = f"{name}_{n}"
        out[unique] = precision
    return out
