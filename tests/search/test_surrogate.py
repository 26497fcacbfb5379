"""The guided sampler's Gaussian process (:class:`DeviationGP`) on data of a known structure.

Deviations are generated from functions written out here, independently of the code: an
additive per-unit effect on log10 deviation (each unit in FP16 multiplies the deviation by a
fixed factor), and the root sum of squares of per-unit errors that :func:`prior_feature`
assumes. The GP must reproduce its training targets, be sure near them and unsure far from
them, order unseen assignments as the known function does, and, given the prior feature,
extrapolate to assignments unlike any it was trained on.
"""

from __future__ import annotations

import numpy as np
import pytest

from amp_search.search._guided.candidates import all_rows
from amp_search.search._guided.gp import MIN_VARIANCE, DeviationGP, prior_feature

N_LOCAL = 6  # units the training rows vary; the other N_FAR units stay FP32 in training
N_FAR = 6
#: log10 deviation added by each of the first units in FP16 (distinct, so rows are ordered).
EFFECT = np.array([1.2, 0.9, 0.7, 0.5, 0.35, 0.2])
#: ... and by each of the units that are FP32 in every training row.
FAR_EFFECT = 0.3
BASE = -5.0
NOISE = 0.01  # decades


def _additive(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    return BASE + x[:, :N_LOCAL] @ EFFECT + FAR_EFFECT * x[:, N_LOCAL:].sum(axis=1)


def _local_rows() -> np.ndarray:
    """Every nonzero assignment of the first units, the others FP32 (63 rows)."""
    head = all_rows(N_LOCAL)[1:]
    return np.hstack([head, np.zeros((head.shape[0], N_FAR), np.uint8)])


@pytest.fixture(scope="module")
def additive_fit():
    rng = np.random.default_rng(0)
    rows = _local_rows()
    order = rng.permutation(rows.shape[0])
    train, held = rows[order[:40]], rows[order[40:]]
    y = _additive(train) + rng.normal(0.0, NOISE, train.shape[0])
    return DeviationGP(train, y), train, y, held


def test_predictions_at_trained_rows_are_the_targets(additive_fit):
    gp, train, y, _ = additive_fit
    mu, sd = gp.predict(train)
    assert mu.shape == sd.shape == (train.shape[0],)
    # Within 5 noise sd of what was observed and of the noise-free function.
    assert np.abs(mu - y).max() < 5 * NOISE
    assert np.abs(mu - _additive(train)).max() < 5 * NOISE
    assert sd.max() < 0.1


def test_uncertainty_grows_away_from_the_training_rows(additive_fit):
    gp, train, _, held = additive_fit
    _, sd_train = gp.predict(train)
    _, sd_held = gp.predict(held)  # one or two flips from trained rows
    # The units that never ran FP16 in training, now all FP16: at least N_FAR flips from
    # every trained row.
    far = held.copy()
    far[:, N_LOCAL:] = 1
    _, sd_far = gp.predict(far)
    assert sd_held.max() < sd_far.min()
    assert sd_train.max() * 5 < sd_far.min()
    # Far from the data, the prior variance (at least its floor) is all that is left.
    assert sd_far.min() > 0.9 * np.sqrt(MIN_VARIANCE)


def test_unseen_rows_are_ranked_as_the_known_function_ranks_them(additive_fit):
    gp, _, _, held = additive_fit
    mu, _ = gp.predict(held)
    truth = _additive(held)
    assert np.abs(mu - truth).max() < 0.15
    # Every pair whose true values differ by more than the prediction error is in order.
    pairs = [(i, j) for i in range(len(held)) for j in range(len(held))
             if truth[i] + 0.3 < truth[j]]  # fmt: skip
    assert len(pairs) > 100
    wrong = [(i, j) for i, j in pairs if not mu[i] < mu[j]]
    assert wrong == []
    # The most and least accurate unseen rows are the ones the function says.
    assert np.argmin(mu) == np.argmin(truth)
    assert np.argmax(mu) == np.argmax(truth)


def test_the_prior_feature_carries_predictions_to_unseen_units():
    # Deviation as the root sum of squares of per-unit errors, times a little noise: the
    # model prior_feature assumes. Training never puts the last units in FP16.
    rng = np.random.default_rng(1)
    errors = np.array([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2])

    def log_dev(rows: np.ndarray) -> np.ndarray:
        return np.log10(np.sqrt(rows.astype(np.float64) @ errors**2))

    local = _local_rows()
    train = local[rng.permutation(local.shape[0])[:30]]
    y = log_dev(train) + rng.normal(0.0, 0.02, train.shape[0])
    far = local[rng.permutation(local.shape[0])[:12]].copy()
    far[:, N_LOCAL:] = (rng.random((far.shape[0], N_FAR)) < 0.7).astype(np.uint8)
    far = far[far[:, N_LOCAL:].sum(axis=1) >= 2]
    assert far.shape[0] >= 5

    # The feature is log10 of the root sum of squares itself (plus a floor of 1e-6 of the
    # largest error, which keeps the all-FP32 row finite).
    assert prior_feature(train, errors) == pytest.approx(log_dev(train), abs=1e-3)
    guided = DeviationGP(train, y, prior_feature(train, errors))
    mu, _ = guided.predict(far, prior_feature(far, errors))
    assert np.abs(mu - log_dev(far)).max() < 0.1
    # A constant mean cannot know what the unseen units do: it is far off there.
    plain = DeviationGP(train, y)
    mu_plain, _ = plain.predict(far)
    assert np.abs(mu_plain - log_dev(far)).max() > 5 * np.abs(mu - log_dev(far)).max()


def test_relevance_weights_find_the_units_that_matter():
    # Two units interact (their FP16 error cancels when both are FP16: exclusive or), six add a
    # little each: one length scale for all units cannot tell them apart, a weight per unit can
    rng = np.random.default_rng(0)
    rows = all_rows(8)

    def log_dev(r: np.ndarray) -> np.ndarray:
        x = r.astype(np.float64)
        return -3.0 + 1.0 * np.logical_xor(x[:, 0], x[:, 1]) + 0.05 * x[:, 2:].sum(axis=1)

    order = rng.permutation(rows.shape[0])
    train, held = rows[order[:60]], rows[order[60:]]
    y = log_dev(train) + rng.normal(0.0, 0.01, train.shape[0])
    plain = DeviationGP(train, y)
    ard = DeviationGP(train, y, relevance=True)
    assert len(set(plain.weights)) == 1  # without relevance: one length scale
    assert min(ard.weights[:2]) > 10 * max(ard.weights[2:])

    def rmse(gp: DeviationGP) -> float:
        return float(np.sqrt(np.mean((gp.predict(held)[0] - log_dev(held)) ** 2)))

    assert rmse(ard) < 0.3 * rmse(plain)
