"""The human report's statistics against their definitions: Wilson's interval by brute force over p, Cohen's kappa
from the confusion matrix, Fleiss' kappa on Wikipedia's worked example."""
import random

import numpy as np
import pytest

from rmcore.eval.human_report import cohen_kappa, fleiss_kappa, tally, wilson_interval


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (30, 100), (84, 100), (10, 10), (1, 1)])
def test_wilson_interval_is_the_set_of_p_the_score_test_does_not_reject(k, n):
    """The interval = {p : |k/n - p| <= 1.96 sqrt(p (1 - p) / n)}, found on a grid of 10^6 points."""
    p = np.linspace(0, 1, 1_000_001)
    inside = p[np.abs(k / n - p) <= 1.96 * np.sqrt(p * (1 - p) / n)]
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(inside.min(), abs=2e-6) and hi == pytest.approx(inside.max(), abs=2e-6)


def test_cohen_kappa_from_the_confusion_matrix():
    rng = random.Random(0)
    for _ in range(50):
        x = [rng.choice("ab") if rng.random() < 0.8 else "tie" for _ in range(30)]
        y = [v if rng.random() < 0.6 else rng.choice(["a", "b", "tie"]) for v in x]
        cats = ["a", "b", "tie"]
        m = np.array([[sum(1 for u, v in zip(x, y) if (u, v) == (c, d)) for d in cats] for c in cats]) / len(x)
        p_o, p_e = np.trace(m), (m.sum(1) * m.sum(0)).sum()
        assert cohen_kappa(x, y) == pytest.approx((p_o - p_e) / (1 - p_e), abs=1e-12)
    assert cohen_kappa(list("abab"), list("abab")) == 1.0


def test_fleiss_kappa_on_wikipedias_example():
    """https://en.wikipedia.org/wiki/Fleiss%27_kappa: 10 subjects, 14 raters, 5 categories, kappa = 0.210."""
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(np.array(counts)) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_of_two_raters_by_pairs_of_agreement():
    """With 2 raters, P_i is 1 when they agree and 0 otherwise: P_bar is the agreement rate, P_e from the pooled
    marginals (Scott's pi)."""
    x, y = list("aabbtaabta"), list("abbbtaaata")
    counts = np.array([[(u == c) + (v == c) for c in "abt"] for u, v in zip(x, y)])
    p_bar = np.mean([u == v for u, v in zip(x, y)])
    pooled = np.array([(x + y).count(c) for c in "abt"]) / 20
    p_e = (pooled ** 2).sum()
    assert fleiss_kappa(counts) == pytest.approx((p_bar - p_e) / (1 - p_e), abs=1e-12)


def test_tally_counts_wins_ties_losses_and_leaves_skips_out():
    labels = ["a"] * 30 + ["tie"] * 54 + ["b"] * 16 + ["skip"] * 3
    t = tally(labels)
    assert (t["judged"], t["wins"], t["ties"], t["losses"], t["skipped"]) == (100, 30, 54, 16, 3)
    assert t["at_least_as_good"] == 0.84
    assert t["at_least_as_good_ci95"] == list(wilson_interval(84, 100))
