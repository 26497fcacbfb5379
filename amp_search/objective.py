"""The objective interface of the search and the loader that finds objectives by name.

This module owns:

- :class:`EvalContext`, what one evaluated candidate offers an objective (the FP32 reference
  outputs, the candidate's outputs, its latency and its assignment);
- :class:`Objective`, the structural protocol every objective satisfies (user classes need
  not inherit from anything);
- :func:`load_metric`, which turns a user's spec into an objective: a built-in name found
  through the ``amp_search.objectives`` entry-point group (with a fallback table of the
  built-ins, imported lazily by module path), or ``path/to/file.py:name`` naming a class or a
  plain function ``fn(reference, output) -> float``;
- :func:`load_deviation_metric`, the same for the search's accuracy axis, which it holds to
  what that axis means: the metric reads the outputs, not the latency (speed is the other
  axis), and lower is better (``direction="minimize"``; a budget is an upper bound on it).

The core never imports the top-level ``objectives`` package at module level: built-ins are
referred to by ``"module:attr"`` strings and imported only when asked for.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from amp_search.errors import UserInputError
from amp_search.types import LatencyStats, PrecisionAssignment

__all__ = [
    "BUILTIN_OBJECTIVES",
    "ENTRY_POINT_GROUP",
    "EvalContext",
    "FunctionObjective",
    "Objective",
    "load_deviation_metric",
    "load_metric",
]

logger = logging.getLogger(__name__)

#: The entry-point group third parties (and the built-ins) register objectives in.
ENTRY_POINT_GROUP = "amp_search.objectives"

#: Built-in objectives by name, as ``"module:attr"`` strings (imported only when used). Used
#: when the entry points are not registered (e.g. running from a source tree); kept equal to
#: the ``[project.entry-points."amp_search.objectives"]`` table of pyproject.toml.
BUILTIN_OBJECTIVES: dict[str, str] = {
    "rel_l2": "objectives.accuracy:RelativeL2",
    "max_abs": "objectives.accuracy:MaxAbs",
    "mean_abs": "objectives.accuracy:MeanAbs",
    "cosine": "objectives.accuracy:CosineDistance",
    "top1": "objectives.accuracy:Top1Disagreement",
    "latency_ms": "objectives.latency:LatencyObjective",
}

_NEEDS_OUTPUTS = frozenset({"outputs"})
#: Everything an objective may ask for.
_KNOWN_NEEDS = frozenset({"outputs", "latency"})


@dataclass
class EvalContext:
    """What an objective may read about one evaluated candidate.

    Attributes:
        reference: The FP32 reference outputs, one ``{output name: array}`` per calibration
            batch.
        outputs: The candidate's outputs, one dict per batch, with the same keys and order of
            batches as ``reference``.
        latency: The candidate's latency, when it was timed or estimated.
        assignment: The precision assignment that produced the candidate.
        output_names: The model outputs to compare (all of them, in graph order); when empty,
            the keys of the first reference batch.
    """

    reference: list[dict[str, np.ndarray]] = field(default_factory=list)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    latency: LatencyStats | None = None
    assignment: PrecisionAssignment | None = None
    output_names: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        """The output names to compare: ``output_names``, else the reference's keys."""
        if self.output_names:
            return list(self.output_names)
        return list(self.reference[0]) if self.reference else []


@runtime_checkable
class Objective(Protocol):
    """One value the search optimizes, computed from an :class:`EvalContext`.

    Contract: :meth:`evaluate` is a pure function of the context (no state carried between
    candidates) and returns a float; an accuracy objective returns ``float("inf")`` for a
    candidate whose outputs are not finite, so such a candidate is never the best.

    Attributes:
        name: Short stable name, used as the Optuna objective name and in result files.
        direction: ``"minimize"`` or ``"maximize"``.
        needs: What :meth:`evaluate` reads: ``{"outputs"}`` (the candidate must be run on the
            calibration data) and/or ``{"latency"}`` (the candidate must be timed).
    """

    name: str
    direction: Literal["minimize", "maximize"]
    needs: frozenset[str]

    def evaluate(self, ctx: EvalContext) -> float:
        """The objective's value for the candidate described by ``ctx``."""
        ...


class FunctionObjective:
    """Wraps ``fn(reference, output) -> float`` into a minimized :class:`Objective`.

    ``fn`` is called once per model output and calibration batch, with the FP32 reference
    array and the candidate's array; the objective is the mean of those values. A candidate
    with non-finite outputs, or a non-finite value of ``fn``, scores ``float("inf")``.

    Args:
        fn: The per-array metric.
        name: Objective name; ``fn.__name__`` when omitted.
    """

    direction: Literal["minimize", "maximize"] = "minimize"
    needs: frozenset[str] = _NEEDS_OUTPUTS

    def __init__(
        self, fn: Callable[[np.ndarray, np.ndarray], float], name: str | None = None
    ) -> None:
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", "user_metric"))

    def evaluate(self, ctx: EvalContext) -> float:
        """Mean of ``fn`` over every (batch, output) pair."""
        if len(ctx.outputs) != len(ctx.reference):
            raise ValueError(
                f"{self.name}: {len(ctx.outputs)} candidate batches for "
                f"{len(ctx.reference)} reference batches."
            )
        values: list[float] = []
        for ref_batch, out_batch in zip(ctx.reference, ctx.outputs, strict=True):
            for name in ctx.names():
                out = np.asarray(out_batch[name])
                if out.dtype.kind in "fc" and not np.all(np.isfinite(out)):
                    return math.inf
                values.append(float(self.fn(np.asarray(ref_batch[name]), out)))
        if not values:
            raise ValueError(f"{self.name}: no outputs to compare.")
        mean = float(np.mean(values))
        return mean if math.isfinite(mean) else math.inf

    def __repr__(self) -> str:
        return f"FunctionObjective({self.name!r})"


def load_metric(spec: str) -> Objective:
    """Finds the objective a user names.

    Args:
        spec: A built-in or registered name (``"rel_l2"``, ``"max_abs"``, ``"mean_abs"``,
            ``"cosine"``, ``"top1"``, ``"latency_ms"``, or any name in the
            ``amp_search.objectives`` entry-point group), or ``path/to/file.py:name`` where
            ``name`` is a class (instantiated without arguments) or a plain function
            ``fn(reference, output) -> float`` (wrapped in :class:`FunctionObjective`).

    Returns:
        The objective.

    Raises:
        UserInputError: The name is unknown, the file is missing, fails to import or lacks
            the attribute, or the attribute is neither an objective class nor a function.
    """
    spec = spec.strip()
    path, sep, attr = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return _from_file(spec, Path(path), attr)
    if spec.endswith(".py"):
        raise UserInputError(
            f"Metric {spec!r} names a file but no object: expected path/to/file.py:name."
        )
    registered = _registered()
    if spec in registered:
        try:
            obj = registered[spec]()
        except Exception as exc:  # an entry point that fails to load is the user's plugin
            raise UserInputError(
                f"Loading objective {spec!r} failed with {_one_line(exc)}."
            ) from exc
        return _instantiate(obj, spec)
    if spec in BUILTIN_OBJECTIVES:
        return _instantiate(_import_ref(BUILTIN_OBJECTIVES[spec]), spec)
    known = ", ".join(sorted(set(registered) | set(BUILTIN_OBJECTIVES)))
    raise UserInputError(
        f"Unknown metric {spec!r}: expected one of {known}, or path/to/file.py:name."
    )


def load_deviation_metric(spec: str) -> Objective:
    """The objective of the search's accuracy axis (``--metric``).

    Raises:
        UserInputError: As :func:`load_metric`; or the objective reads the latency, or is
            maximized.
    """
    metric = load_metric(spec)
    if "latency" in metric.needs or "outputs" not in metric.needs:
        raise UserInputError(
            f"--metric {spec!r} does not measure the outputs (it needs "
            f"{', '.join(sorted(metric.needs)) or 'nothing'}): the search's accuracy axis "
            "takes a metric of the candidate's outputs against FP32 (rel_l2, max_abs, "
            "mean_abs, cosine, top1); latency is the other axis already."
        )
    if metric.direction != "minimize":
        raise UserInputError(
            f"--metric {spec!r} is maximized; the accuracy axis is a deviation, lower is "
            "better (a budget bounds it from above). Give a metric where 0 means identical to "
            "FP32, e.g. 1 - similarity."
        )
    return metric


def _registered() -> dict[str, Callable[[], Any]]:
    """Entry points of the objectives group, by name (loaded only when called)."""
    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # broken distribution metadata must not hide the built-ins
        logger.debug("Reading entry points of %s failed", ENTRY_POINT_GROUP, exc_info=True)
        return {}
    return {ep.name: ep.load for ep in eps}


def _import_ref(ref: str) -> Any:
    """Imports ``"module:attr"``."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _from_file(spec: str, path: Path, attr: str) -> Objective:
    if not attr:
        raise UserInputError(f"Metric {spec!r} names no object: expected path/to/file.py:name.")
    if not path.is_file():
        raise UserInputError(
            f"Metric file not found: {path} (from {spec!r}); expected an existing "
            "path/to/file.py:name."
        )
    resolved = path.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    module_name = f"_amp_search_metric_{resolved.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise UserInputError(f"Cannot import metric file {path}: not a Python source file.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise UserInputError(
            f"Importing metric file {path} failed with {_one_line(exc)}."
        ) from exc
    if not hasattr(module, attr):
        public = sorted(
            n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
        )
        defined = ", ".join(public) or "none"
        raise UserInputError(
            f"Metric file {path} has no attribute {attr!r}; expected a class or a function "
            f"fn(reference, output) -> float (callables it defines: {defined})."
        )
    return _instantiate(getattr(module, attr), spec)


def _instantiate(obj: Any, spec: str) -> Objective:
    """An objective from a class (called without arguments), a function, or an instance."""
    if inspect.isclass(obj):
        try:
            instance = obj()
        except Exception as exc:
            raise UserInputError(
                f"Creating objective {spec!r} failed with {_one_line(exc)}; an objective "
                "class must be constructible without arguments."
            ) from exc
    elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return FunctionObjective(obj)
    else:
        instance = obj
    if not isinstance(instance, Objective):
        missing = [
            a for a in ("name", "direction", "needs", "evaluate") if not hasattr(instance, a)
        ]
        raise UserInputError(
            f"{spec!r} is not an objective: it lacks {', '.join(missing) or 'nothing'}; "
            "expected a class with name, direction, needs and evaluate(ctx), or a function "
            "fn(reference, output) -> float."
        )
    if instance.direction not in ("minimize", "maximize"):
        raise UserInputError(
            f"Objective {spec!r} has direction {instance.direction!r}; expected 'minimize' or "
            "'maximize'."
        )
    unknown = set(instance.needs) - _KNOWN_NEEDS
    if unknown:
        raise UserInputError(
            f"Objective {spec!r} needs {', '.join(sorted(unknown))}, which a candidate does "
            f"not offer; expected a subset of {', '.join(sorted(_KNOWN_NEEDS))}."
        )
    return instance


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
