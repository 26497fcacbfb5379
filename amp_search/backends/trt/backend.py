"""The TensorRT backend: builds the mixed-precision ONNX strongly typed, runs it with CUDA.

Options (see :data:`amp_search.backends.trt.builder.DEFAULT_OPTIONS`; all but
``timing_cache_dir`` are part of the candidate's identity): ``module`` (``auto``/``tensorrt``/
``tensorrt_rtx``), ``builder_optimization_level`` (0..5, default 3), ``workspace_mb``,
``shapes`` / ``min_shapes`` / ``opt_shapes`` / ``max_shapes`` for dynamic inputs,
``tf32`` (0/1, default 0: FP32 layers do not use TF32), ``timing_cache`` (0/1) and
``timing_cache_dir``, ``cuda_graph`` (0/1, default 1, runner; a graph that cannot be captured
falls back to plain enqueues, recorded in ``Candidate.info["runner"]``).

A build writes ``engine.plan`` and the inspector's ``layers.json`` next to the ONNX file (one
folder per candidate), and records each engine layer's precision in
``Candidate.info["layer_precisions"]``. All builds on one GPU with one TensorRT version share
one timing cache file, ``<cache>/amp-search/tensorrt/<module>-<version>-<gpu>.timing-cache``.

TensorRT-RTX (``tensorrt_rtx``) builds with the same API but runs only on the GPUs it supports:
on an H100/H200 its candidates build (and report layer precisions where it can) but cannot be
opened.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amp_search._atomic import write_bytes_atomic
from amp_search._optional import is_importable
from amp_search.backends.base import Backend, BuildConfig, Candidate, Runner, gpu_name
from amp_search.backends.trt.builder import (
    DEFAULT_OPTIONS,
    FLAG_OPTIONS,
    MODULES,
    BuiltEngine,
    build_engine,
    check_flag,
    import_trt,
    layer_precisions,
)
from amp_search.backends.trt.runner import TensorRTRunner
from amp_search.errors import CandidateBuildError, UserInputError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TensorRTBackend", "default_cache_dir"]

logger = logging.getLogger(__name__)

ENGINE_FILE = "engine.plan"
LAYERS_FILE = "layers.json"
#: Options that say where things live, not what the engine is: left out of the identity.
_NOT_IDENTITY = frozenset({"timing_cache_dir"})


def default_cache_dir() -> Path:
    """The folder of the shared timing caches.

    ``$AMP_SEARCH_CACHE_DIR/tensorrt`` if set, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)
    ``/amp-search/tensorrt``.
    """
    root = os.environ.get("AMP_SEARCH_CACHE_DIR")
    if root:
        return Path(root) / "tensorrt"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "amp-search" / "tensorrt"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


class TensorRTBackend(Backend):
    """TensorRT 10.x/11.x (or TensorRT-RTX to build): strongly typed engines from the ONNX."""

    name = "tensorrt"
    requires = ("tensorrt",)
    extra = "tensorrt"
    #: Search at a lower level (``--option builder_optimization_level=1`` or ``2``), refine at the
    #: default. Not 0: it takes the first tactic that runs and ignores the timing cache.
    refine_defaults = ("builder_optimization_level",)
    timer_name = "cuda events"

    @classmethod
    def is_available(cls) -> bool:
        """Whether ``tensorrt`` or ``tensorrt_rtx`` can be imported (nothing is imported)."""
        return any(is_importable(m) for m in MODULES)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why the backend cannot be used here, or None."""
        if cls.is_available():
            return None
        return (
            "neither 'tensorrt' nor 'tensorrt_rtx' is importable; install with: "
            f"pip install 'amp-search[{cls.extra}]' (TensorRT 10.x or 11.x, and cuda-python "
            "to run engines)"
        )

    def devices(self) -> list[str]:  # noqa: D102
        return ["cuda"]

    def options_for_data(
        self, options: Mapping[str, Any], feeds: Mapping[str, np.ndarray]
    ) -> dict[str, Any]:
        """Without ``shapes``, engines are built for the calibration batch's (min=opt=max)."""
        out = dict(options)
        if not out.get("shapes"):
            out["shapes"] = {k: list(v.shape) for k, v in feeds.items()}
        return out

    def resolve_options(self, config: BuildConfig) -> dict[str, Any]:
        """The configuration's options completed with the defaults (and checked)."""
        if config.device_type != "cuda":
            raise UserInputError(
                f"The TensorRT backend builds for CUDA devices only, got device "
                f"{config.device!r}; use --device cuda (or cuda:N)."
            )
        unknown = set(config.options) - set(DEFAULT_OPTIONS)
        if unknown:
            raise UserInputError(
                f"Unknown tensorrt option(s) {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}."
            )
        opts = {**DEFAULT_OPTIONS, **config.options}
        if opts["module"] not in ("auto", *MODULES):
            raise UserInputError(
                "TensorRT option module must be 'auto', 'tensorrt' or 'tensorrt_rtx', "
                f"got {opts['module']!r}."
            )
        for key in FLAG_OPTIONS:  # as ints, so tf32=True and tf32=1 are one identity
            opts[key] = check_flag(key, opts[key])
        return opts

    def _module(self, opts: dict[str, Any]) -> tuple[str, str]:
        """The module that will build (auto resolved) and its version."""
        trt, name = import_trt(str(opts["module"]))
        return name, str(getattr(trt, "__version__", "unknown"))

    def identity(self, config: BuildConfig) -> dict[str, Any]:  # noqa: D102
        opts = self.resolve_options(config)
        module, version = self._module(opts)
        return {
            "backend": self.name,
            "module": module,
            module: version,
            "device": config.device,
            "gpu": gpu_name(config.device_id),
            "options": {
                k: v for k, v in {**opts, "module": module}.items() if k not in _NOT_IDENTITY
            },
        }

    def timing_cache_path(self, config: BuildConfig) -> Path | None:
        """The shared timing cache file for this device and TensorRT version.

        None when ``timing_cache`` is 0, and with TensorRT-RTX (its timing cache is a no-op).
        """
        opts = self.resolve_options(config)
        if not int(opts["timing_cache"]):
            return None
        module, version = self._module(opts)
        if module == "tensorrt_rtx":
            return None
        folder = Path(opts["timing_cache_dir"]) if opts["timing_cache_dir"] else None
        folder = folder or default_cache_dir()
        gpu = _slug(gpu_name(config.device_id))
        return folder / f"{module}-{_slug(version)}-{gpu}.timing-cache"

    def _build(self, model_path: Path, config: BuildConfig) -> Candidate:
        opts = self.resolve_options(config)
        identity = self.identity(config)
        _select_device(config.device_id)
        built = build_engine(
            model_path,
            options={**opts, "module": identity["module"]},
            timing_cache_path=self.timing_cache_path(config),
        )
        engine_path = write_bytes_atomic(model_path.with_name(ENGINE_FILE), built.engine)
        artifacts = {"engine": engine_path}
        precisions: dict[str, str] = {}
        layers_path = None
        if built.layer_info is not None:
            layers_path = write_bytes_atomic(
                model_path.with_name(LAYERS_FILE), built.layer_info.encode()
            )
            artifacts["layer_info"] = layers_path
            try:
                precisions = layer_precisions(built.layer_info)
            except (ValueError, TypeError) as exc:  # a report, never a failed build
                logger.warning("Could not read the engine's layer information: %s", exc)
        return Candidate(
            backend=self.name,
            model_path=model_path,
            config=config,
            identity=identity,
            build_time_s=built.build_time_s,
            artifacts=artifacts,
            info={
                "module": built.module,
                "version": built.version,
                "options": identity["options"],
                "settings": built.settings,
                "layer_precisions": precisions,
                "layer_info": str(layers_path) if layers_path else None,
                "layer_info_error": built.layer_info_error,
                "timing_cache": str(built.timing_cache_path) if built.timing_cache_path else None,
                "warnings": list(built.warnings[-20:]),
            },
            handle=built,
        )

    def _open(self, candidate: Candidate) -> Runner:
        built = candidate.handle if isinstance(candidate.handle, BuiltEngine) else None
        if built is not None:
            engine = built.engine
        else:
            path = candidate.artifacts.get("engine")
            if path is None or not Path(path).is_file():
                raise CandidateBuildError(
                    f"Candidate {candidate.model_path} has no engine file; build it first."
                )
            engine = Path(path).read_bytes()
        opts = {**DEFAULT_OPTIONS, **candidate.identity.get("options", {})}
        module = str(candidate.info.get("module") or candidate.identity.get("module") or "auto")
        inputs, outputs = _io_names(candidate.model_path)
        return TensorRTRunner(
            engine,
            input_names=inputs,
            output_names=outputs,
            module="tensorrt" if module == "auto" else module,
            device_id=candidate.config.device_id,
            cuda_graph=bool(check_flag("cuda_graph", opts["cuda_graph"])),
            info=candidate.info.setdefault("runner", {}),
        )


def _io_names(model_path: Path) -> tuple[list[str], list[str]]:
    """The ONNX graph's input and output names (TensorRT keeps them), read without weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    return inputs, [o.name for o in model.graph.output]


def _select_device(device_id: int) -> None:
    """Makes the configured GPU current in this thread: the builder tunes on the current one.

    The search builds in a worker thread, and a new thread starts on device 0. Without
    cuda-python (TensorRT-RTX's build-only path) the builder keeps its default device.
    """
    if not (is_importable("cuda.bindings") or is_importable("cuda.cudart")):
        return
    from amp_search.backends.trt import _cuda

    _cuda.set_device(device_id)
