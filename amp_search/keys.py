"""The names amp-search stores in an Optuna study, in one place.

A study outlives the process that made it (workers join it, a rerun resumes it, optuna-dashboard
opens it), so what is written into it is a format: these names are that format.

Study user attributes hold the search's settings, the resident reference's level, the guided
sampler's prior and the seeding mark. Trial user attributes hold the trial's record (figures,
digest, fallback set), its seed label, the parameters of a seed, its owner and the reason it
failed. Seeds are labelled by the baselines they are.
"""

from __future__ import annotations

__all__ = [
    "ALL_BF16",
    "ALL_FP16",
    "ALL_FP32",
    "BASELINES",
    "BF16_RESCUE",
    "CONFIG_ATTR",
    "ERROR_ATTR",
    "GUIDE_ATTR",
    "OWNER_ATTR",
    "RECORD_ATTR",
    "REFERENCE_ATTR",
    "SEEDED_ATTR",
    "SEED_ATTR",
    "SEED_PARAMS_ATTR",
]

# --- study user attributes ------------------------------------------------------------------
#: The search settings, for workers that join the study and for reruns.
CONFIG_ATTR = "amp_search:config"
#: The resident all-FP32 reference's level (one latency scale for every worker).
REFERENCE_ATTR = "amp_search:reference_ms"
#: The guided sampler's prior (units, edges, per-unit figures).
GUIDE_ATTR = "amp_search:guide"
#: True once every seed is enqueued, else how many are (a --n-trials below the seed count).
SEEDED_ATTR = "amp_search:seeded"

# --- trial user attributes ------------------------------------------------------------------
#: The trial's figures (one dict: one storage write), as :class:`amp_search.record.TrialRecord`.
RECORD_ATTR = "amp_search"
#: A seed trial's label (one of :data:`BASELINES`, or a ladder step).
SEED_ATTR = "seed"
#: A seed trial's parameters.
SEED_PARAMS_ATTR = "seed_params"
#: The host and process that run the trial (dead-worker recovery).
OWNER_ATTR = "amp_search:owner"
#: Why the trial failed, in one line.
ERROR_ATTR = "error"

# --- seed labels ----------------------------------------------------------------------------
ALL_FP32 = "all-fp32"
ALL_FP16 = "all-fp16"
#: With BF16 (``--precisions fp16,bf16``): every unit that admits BF16 in BF16, the rest FP32.
ALL_BF16 = "all-bf16"
#: The uniform assignments, seeded first (all-BF16 where BF16 is searched): shown beside the
#: front, kept and refined with it.
BASELINES = (ALL_FP32, ALL_FP16, ALL_BF16)
#: With BF16: all FP16, with the units FP16 breaks in BF16 instead of FP32.
BF16_RESCUE = "fp16-bf16-rescue"
