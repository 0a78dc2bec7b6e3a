"""Clinical metrics against hand-counted values."""

from __future__ import annotations

import numpy as np
import pytest

from edgedx.errors import ConfigError, DataError
from edgedx.metrics import choose_threshold, evaluate


class TestBinary:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])

    def test_counts_at_threshold(self):
        """At 0.5: TP 3, FN 1, TN 3, FP 1."""
        m = evaluate(self.y, self.p, 0.5, resamples=200)
        assert m["confusion_matrix"] == [[3, 1], [1, 3]]
        assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"], m["accuracy"]) == (0.75, 0.75, 0.75, 0.75, 0.75)
        assert m["auc"] == pytest.approx(15 / 16)  # only (pos 0.4, neg 0.6) of 16 pairs is misordered
        lo, hi = m["auc_ci95"]
        assert lo <= m["auc"] <= hi and hi - lo > 0.05

    def test_youden_threshold(self):
        assert choose_threshold(self.y, self.p) in (0.4, 0.7)

    def test_sensitivity_target(self):
        """The highest threshold that still catches every positive is 0.4."""
        assert choose_threshold(self.y, self.p, policy="sensitivity", target_sensitivity=1.0) == 0.4

    def test_errors(self):
        with pytest.raises(ConfigError, match="target sensitivity"):
            choose_threshold(self.y, self.p, policy="sensitivity")
        with pytest.raises(DataError, match="single class"):
            choose_threshold(np.zeros(4), np.ones(4))
        with pytest.raises(DataError, match="3 labels but 2 predictions"):
            evaluate(np.zeros(3), np.ones(2), 0.5)


def test_multiclass_macro():
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.6, 0.2, 0.2]])
    m = evaluate(y, probs, resamples=50)
    assert m["accuracy"] == 0.75 and m["confusion_matrix"][2] == [1, 0, 1]
    assert m["sensitivity"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert "threshold" not in m


def test_proportion_ci_is_wilsons():
    from edgedx.metrics import proportion_ci

    def wilson(k, n, z=1.959964):  # the closed form
        p = k / n
        centre, half = p + z**2 / (2 * n), z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
        return (centre - half) / (1 + z**2 / n), (centre + half) / (1 + z**2 / n)

    for k, n in ((7, 90), (28, 360), (0, 360)):
        assert proportion_ci(k, n) == pytest.approx(wilson(k, n), abs=1e-6)
    lo, hi = proportion_ci(0, 360)  # no flips among 360 cases: still up to about 1%
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.010 < hi < 0.011
    assert all(np.isnan(proportion_ci(0, 0)))


def test_chance_auc_bound():
    """0.5 + 3 null standard errors, from the rarest class; random scores stay below it."""
    from edgedx.metrics import auc, chance_auc_bound

    y = np.r_[np.zeros(260, int), np.ones(100, int)]
    assert chance_auc_bound(y) == pytest.approx(0.5 + 3 * np.sqrt(361 / (12 * 100 * 260)))
    assert chance_auc_bound(np.r_[y, 2 * np.ones(10, int)]) > chance_auc_bound(y)  # a rare third class widens it
    assert chance_auc_bound(np.stack([y, np.roll(y, 7)], axis=1)) == pytest.approx(chance_auc_bound(y))
    assert chance_auc_bound(np.zeros(5, int)) == 1.0  # one class: no AUC to leave chance with
    rng = np.random.default_rng(0)
    assert max(auc(y, rng.random(len(y))) for _ in range(200)) < chance_auc_bound(y)


@pytest.mark.parametrize("labels", [(0, 1), (2, 5)])
def test_bootstrap_auc_ci_ranks_every_resample_as_roc_auc_score_does(monkeypatch, labels):
    """The rank-based AUC of each resample equals scikit-learn's, ties, small blocks and all."""
    from sklearn.metrics import roc_auc_score

    from edgedx import metrics

    rng = np.random.default_rng(3)
    y = np.where(rng.random(60) < 0.3, labels[1], labels[0])
    scores = np.round(rng.random(60), 1)  # ten distinct values: many ties
    monkeypatch.setattr(metrics, "_RESAMPLE_BLOCK_ELEMENTS", 60 * 7)  # several blocks and a remainder
    expected, draws = [], np.random.default_rng(11)
    while len(expected) < 50:
        idx = draws.integers(0, 60, 60)
        if np.unique(y[idx]).size == 2:
            expected.append(roc_auc_score(y[idx] == labels[1], scores[idx]))
    lo, hi = metrics.bootstrap_auc_ci(y, scores, resamples=50, seed=11)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(expected, [2.5, 97.5])), abs=1e-12)
    assert lo < roc_auc_score(y == labels[1], scores) < hi
