"""The backend interfaces: a :class:`Backend` builds candidates, a :class:`Runner` runs them.

Life cycle (Polygraphy's loader/runner split)::

    backend = get_backend("onnxruntime")
    candidate = backend.build(model_path, BuildConfig(device="cpu"))   # expensive, cacheable
    with backend.open(candidate) as runner:                            # device touched here
        outputs = runner.infer(feeds)                                  # dict name -> array
        runner.bind(feeds); stats = timing.measure(runner.run_once, source=runner.source,
                                                   timer=runner.timer())

Contracts:

- ``build`` reads a mixed-precision ONNX file and returns a :class:`Candidate`; failures
  raise :class:`~amp_search.errors.CandidateBuildError` with the backend's reason.
- A runner touches the device only inside ``with``; ``infer`` returns float32 (or the
  model's own output type) numpy arrays; failures raise
  :class:`~amp_search.errors.CandidateRunError`.
- ``run_once`` runs the inputs last given to ``bind`` and synchronizes before returning;
  backends never time themselves (see :mod:`amp_search.timing`).
- ``identity`` is everything besides the model bytes that makes two candidates differ
  (library versions, device, options); it is part of the cache key.
- ``low_precision_gaps`` names the nodes the device has no FP16 kernel for; the search keeps
  them FP32 in every candidate (a node sent to the CPU costs more than FP16 gains).
  ``bf16_gaps`` does the same for BF16 (``--precisions ...,bf16``): the search offers BF16 to
  no unit holding such a node.
"""

from __future__ import annotations

import abc
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from amp_search._optional import is_importable as _findable
from amp_search.errors import BackendUnavailableError, CandidateRunError, UserInputError

if TYPE_CHECKING:
    from amp_search.graph.precision import MixedPrecisionRewriter

__all__ = ["Backend", "BuildConfig", "Candidate", "Runner", "gpu_name"]


@dataclass(frozen=True)
class BuildConfig:
    """How to build a candidate.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
        options: Backend options (e.g. CUDA EP ``prefer_nhwc``); recorded with the result.
    """

    device: str = "cpu"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind, sep, index = self.device.partition(":")
        if kind not in ("cpu", "cuda") or (sep and (kind == "cpu" or not index.isdigit())):
            raise UserInputError(
                f"Unknown device {self.device!r}: expected cpu, cuda or cuda:N (N a GPU index)."
            )

    @property
    def device_type(self) -> str:
        """``"cpu"`` or ``"cuda"``."""
        return self.device.split(":", 1)[0]

    @property
    def device_id(self) -> int:
        """The CUDA ordinal (0 unless ``cuda:N``)."""
        _, _, n = self.device.partition(":")
        return int(n) if n else 0


@dataclass
class Candidate:
    """A built candidate.

    Attributes:
        backend: Backend name.
        model_path: The mixed-precision ONNX it was built from.
        config: The build configuration.
        identity: What besides the model identifies it (versions, device, options).
        build_time_s: Seconds the build took.
        artifacts: Files the build produced (e.g. ``{"engine": Path}``).
        info: Backend facts worth recording (providers used, layer precisions, ...).
    """

    backend: str
    model_path: Path
    config: BuildConfig
    identity: dict[str, Any]
    build_time_s: float = 0.0
    artifacts: dict[str, Path] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    handle: Any = field(default=None, repr=False)


class Runner(abc.ABC):
    """Runs one candidate; a context manager that holds device resources while open."""

    #: Label for latency figures, e.g. ``"measured:onnxruntime-cpu"``.
    source: str = "measured"

    def __init__(self) -> None:
        self._active = False
        #: How timed runs execute, recorded with the figure and shown by ``pick`` (how the
        #: model should then be deployed): ``{"cuda_graph": bool, "cuda_graph_reason": str}``
        #: on a GPU; set by ``bind``.
        self.execution: dict[str, Any] = {}

    def __enter__(self) -> Runner:
        self._activate()
        self._active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._active = False
        self._deactivate()

    def _check_active(self) -> None:
        if not self._active:
            raise RuntimeError(f"{type(self).__name__} used outside its 'with' block")

    @property
    @abc.abstractmethod
    def input_names(self) -> list[str]:
        """Names of the model's inputs."""

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]:
        """Names of the model's outputs."""

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs one batch and returns every output by name."""
        self._check_active()
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise UserInputError(
                f"Calibration data lacks model input(s) {missing}; give arrays named "
                f"{self.input_names}."
            )
        try:
            return self._infer(feeds)
        except (UserInputError, CandidateRunError):
            raise
        except Exception as exc:
            raise CandidateRunError(
                f"{type(self).__name__} failed to run the candidate: {exc}"
            ) from exc

    def bind(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Fixes the inputs ``run_once`` runs (placing them on the device if needed)."""
        self._check_active()
        try:
            self._bind(feeds)
        except (UserInputError, CandidateRunError):
            raise
        except Exception as exc:
            raise CandidateRunError(
                f"{type(self).__name__} failed to bind the candidate's inputs: {exc}"
            ) from exc

    def run_once(self) -> None:
        """One synchronous inference on the bound inputs (used by :mod:`amp_search.timing`)."""
        self._run_once()

    def timer(self) -> Callable[[Callable[[], None]], float] | None:
        """The device-side timer for :func:`amp_search.timing.measure` (None: wall clock)."""
        return None

    def _activate(self) -> None:  # noqa: B027 - optional hook
        """Acquires device resources."""

    def _deactivate(self) -> None:  # noqa: B027 - optional hook
        """Releases device resources."""

    @abc.abstractmethod
    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _bind(self, feeds: Mapping[str, np.ndarray]) -> None: ...

    @abc.abstractmethod
    def _run_once(self) -> None: ...


class Backend(abc.ABC):
    """Builds and opens candidates from mixed-precision ONNX files."""

    name: ClassVar[str]
    #: Import names this backend needs.
    requires: ClassVar[tuple[str, ...]] = ()
    #: The amp-search extra that installs them.
    extra: ClassVar[str] = ""
    #: Options that trade engine speed for build time (a search may lower them): ``amp-search
    #: refine`` rebuilds the front with their defaults unless they are given again.
    refine_defaults: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`build` takes the model's bytes (so its file can be written meanwhile).
    builds_from_memory: ClassVar[bool] = False
    #: What times a run (recorded with refined figures).
    timer_name: ClassVar[str] = "wall clock"

    @classmethod
    def is_available(cls) -> bool:
        """Whether the required modules can be imported (nothing is imported)."""
        return all(_findable(m) for m in cls.requires)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why the backend cannot be used here, or None."""
        missing = [m for m in cls.requires if not _findable(m)]
        if not missing:
            return None
        return (
            f"missing module(s) {', '.join(missing)}; install with: "
            f"pip install 'amp-search[{cls.extra}]'"
        )

    def devices(self) -> list[str]:
        """Devices this backend can build for on this machine."""
        return ["cpu"]

    def device_hint(self, device: str) -> str:
        """What would make ``device`` usable when :meth:`devices` lacks it (a sentence, or '')."""
        return ""

    def options_for_data(
        self, options: Mapping[str, Any], feeds: Mapping[str, np.ndarray]
    ) -> dict[str, Any]:
        """``options`` completed from one calibration batch (default: unchanged)."""
        return dict(options)

    def build(
        self,
        model_path: str | os.PathLike[str],
        config: BuildConfig,
        *,
        model_bytes: Sequence[bytes] | None = None,
    ) -> Candidate:
        """Builds a candidate from a mixed-precision ONNX file.

        Args:
            model_path: The ONNX file (the candidate's path, artifacts go beside it).
            config: Device and backend options.
            model_bytes: The file's content in chunks (joined, they are the file), when the
                caller has it in memory; the file may still be being written. Only for
                backends with ``builds_from_memory``. Joining them is the backend's part, in
                place of reading the file.
        """
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"Backend '{self.name}' is unavailable: {reason}")
        path = Path(model_path)
        if model_bytes is not None:
            if not self.builds_from_memory:
                raise ValueError(f"backend {self.name!r} builds from files only")
            return self._build_from_memory(path, config, model_bytes)
        if not path.is_file():
            raise UserInputError(f"Model file not found: {path}")
        return self._build(path, config)

    def release(self, candidate: Candidate) -> None:
        """Frees what the built candidate holds (a session, an engine) now.

        Opening it again rebuilds or reloads it from its files.
        """
        candidate.handle = None

    def open(self, candidate: Candidate) -> Runner:
        """A runner for ``candidate`` (enter it with ``with``)."""
        if candidate.backend != self.name:
            raise ValueError(f"candidate of backend {candidate.backend!r} given to {self.name!r}")
        return self._open(candidate)

    @abc.abstractmethod
    def identity(self, config: BuildConfig) -> dict[str, Any]:
        """Versions, device and options that identify candidates built with ``config``."""

    def low_precision_gaps(
        self,
        rewriter: MixedPrecisionRewriter,
        feeds: Mapping[str, np.ndarray],
        config: BuildConfig,
    ) -> dict[str, str]:
        """Nodes of ``rewriter``'s all-FP16 model that ``config``'s device cannot run in FP16.

        Returns node name -> a one-line reason; the search keeps them FP32 in every
        candidate. ``feeds`` is one calibration batch, for backends that find out by running.
        Default: none (a strongly typed builder takes FP16 wherever it takes FP32).
        """
        return {}

    def bf16_gaps(
        self,
        rewriter: MixedPrecisionRewriter,
        feeds: Mapping[str, np.ndarray],
        config: BuildConfig,
    ) -> dict[str, str]:
        """Nodes of ``rewriter``'s BF16 units that ``config``'s device cannot run in BF16.

        Returns node name -> a one-line reason; the search offers BF16 to no unit holding
        one. Default: none (a strongly typed builder takes BF16 wherever its layers do, and a
        candidate it cannot build fails as a trial).
        """
        return {}

    @abc.abstractmethod
    def _build(self, model_path: Path, config: BuildConfig) -> Candidate: ...

    def _build_from_memory(
        self, model_path: Path, config: BuildConfig, model_bytes: Sequence[bytes]
    ) -> Candidate:
        """Backends with ``builds_from_memory`` build from ``model_bytes`` here."""
        raise NotImplementedError

    @abc.abstractmethod
    def _open(self, candidate: Candidate) -> Runner: ...


@functools.lru_cache(maxsize=16)  # nvidia-smi once per device
def gpu_name(device_id: int) -> str:
    """The GPU's name via nvidia-smi (part of a GPU candidate's identity), or 'unknown'."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", f"--id={device_id}"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
