"""``--keep-models front``: remove the files of candidates no one would pick.

Every candidate keeps its ONNX (and engine) by default: 50-80 MB each for MiniLM, so a long
search fills a disk. Once a completed trial is beaten on both latency and deviation by another
completed trial with finite outputs, it stays beaten as the study grows: no budget picks it and
``refine`` does not rebuild it. Its folder then keeps only ``precision.json`` (what it was);
the study keeps its figures, and a re-proposal of it is answered from its trial, not rebuilt.

Kept: the non-dominated points among finite trials (whatever ``--max-deviation`` says, so a
later pick with another budget still finds its model), the all-FP32/all-FP16 seeds (the
baselines ``refine`` and the plots compare with), and anything not completed.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from amp_search.keys import BASELINES, SEED_ATTR
from amp_search.results.pareto import nondominated_points, point_from_trial

if TYPE_CHECKING:
    import optuna

    from amp_search.results.store import ResultsStore

__all__ = ["KEEP_MODELS", "KEPT_FILES", "dominated_digests", "prune_dominated"]

logger = logging.getLogger(__name__)

#: Choices of ``--keep-models``.
KEEP_MODELS = ("all", "front")
#: What a pruned candidate's folder keeps.
KEPT_FILES = frozenset({"precision.json", ".claim"})


def dominated_digests(study: optuna.Study) -> set[str]:
    """Digests of completed candidates that no budget would pick (see the module docstring)."""
    from optuna.trial import TrialState

    points, seeds = [], set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        p = point_from_trial(t)
        if p is None or not p.digest:
            continue
        points.append(p)
        if t.user_attrs.get(SEED_ATTR) in BASELINES:
            seeds.add(p.digest)
    finite = [p for p in points if math.isfinite(p.deviation)]
    keep = {p.digest for p in nondominated_points(finite)} | seeds
    return {p.digest for p in points} - keep


def prune_dominated(store: ResultsStore, study: optuna.Study, done: set[str]) -> int:
    """Removes the files of dominated candidates (those in ``done`` are skipped, then added).

    Returns how many candidate folders were pruned now.
    """
    pruned = 0
    for digest in sorted(dominated_digests(study) - done):
        folder = store.candidate_dir(digest)
        removed = False
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name in KEPT_FILES or not path.is_file():
                    continue
                try:
                    path.unlink()
                    removed = True
                except FileNotFoundError:
                    continue
                except OSError as exc:  # pruning is best effort: the search goes on
                    logger.warning("Could not remove %s: %s", path, exc.strerror or exc)
        done.add(digest)
        pruned += removed
    return pruned
