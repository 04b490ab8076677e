"""Each evaluation metric against hand-computed values on crafted arrays, and against brute-force loops."""
import math

import numpy as np
import pytest
import torch

from rmcore.eval.metrics import (
    accuracy_by_bucket,
    calibration,
    histogram,
    length_baselines,
    margin_quantiles,
    most_confident,
    quantile_edges,
    spearman,
)


def _logit(c):
    """The margin r_c - r_r whose sigmoid is c."""
    return math.log(c / (1.0 - c))


def _pairs_at(conf, n_right, n_wrong):
    """(r_chosen, r_rejected) lists: n_right pairs won and n_wrong pairs lost, every one with confidence conf."""
    m = _logit(conf)
    margins = [m] * n_right + [-m] * n_wrong
    return margins, [0.0] * len(margins)


# ---------------------------------------------------------------------------------------------------------------
# calibration


def test_calibration_perfectly_calibrated_set_has_zero_ece_for_any_binning():
    # Exact construction: at confidence c, 20 pairs of which exactly 20c are won. Each confidence level is
    # calibrated on its own, so any bin, which pools whole levels, has accuracy = mean confidence.
    rc, rr = [], []
    for c, n_right in [(0.55, 11), (0.65, 13), (0.75, 15), (0.85, 17), (0.95, 19)]:
        c_rc, c_rr = _pairs_at(c, n_right, 20 - n_right)
        rc += c_rc
        rr += c_rr
    for n_bins in (1, 3, 5, 10, 20):
        out = calibration(rc, rr, n_bins=n_bins)
        assert out["ece"] == pytest.approx(0.0, abs=1e-12)
        assert sum(b["count"] for b in out["bins"]) == 100
    # with 5 bins each level has its own bin: [0.5, 0.6) holds the 0.55 pairs, and so on
    bins = calibration(rc, rr, n_bins=5)["bins"]
    assert [b["count"] for b in bins] == [20] * 5
    assert [b["accuracy"] for b in bins] == pytest.approx([0.55, 0.65, 0.75, 0.85, 0.95], abs=1e-12)
    assert [b["confidence"] for b in bins] == pytest.approx([0.55, 0.65, 0.75, 0.85, 0.95], abs=1e-12)


def test_calibration_single_level_miscalibrated_is_gap():
    # All pairs at confidence c = 0.9, accuracy a = 0.6: ECE = |a - c| = 0.3 whatever the binning.
    rc, rr = _pairs_at(0.9, 6, 4)
    for n_bins in (1, 4, 10):
        assert calibration(rc, rr, n_bins=n_bins)["ece"] == pytest.approx(0.3, abs=1e-12)


def test_calibration_two_bin_example_by_hand():
    # Bin [0.6, 0.7): 4 pairs at conf 0.65, 1 won  -> acc 0.25, gap 0.40
    # Bin [0.9, 1.0]: 6 pairs at conf 0.95, 3 won  -> acc 0.50, gap 0.45
    # ECE = 4/10 * 0.40 + 6/10 * 0.45 = 0.16 + 0.27 = 0.43
    a_rc, a_rr = _pairs_at(0.65, 1, 3)
    b_rc, b_rr = _pairs_at(0.95, 3, 3)
    out = calibration(a_rc + b_rc, a_rr + b_rr, n_bins=5)
    assert out["ece"] == pytest.approx(0.43, abs=1e-12)
    bins = out["bins"]
    assert [b["lo"] for b in bins] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9], abs=1e-15)
    assert [b["hi"] for b in bins] == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0], abs=1e-15)
    assert [b["count"] for b in bins] == [0, 4, 0, 0, 6]
    assert bins[1]["accuracy"] == 0.25 and bins[1]["confidence"] == pytest.approx(0.65, abs=1e-12)
    assert bins[4]["accuracy"] == 0.5 and bins[4]["confidence"] == pytest.approx(0.95, abs=1e-12)
    for b in (0, 2, 3):
        assert bins[b]["accuracy"] is None and bins[b]["confidence"] is None


def test_calibration_matches_brute_force_loop():
    g = np.random.default_rng(0)
    rc, rr = (g.normal(size=200) * 2).tolist(), (g.normal(size=200) * 2).tolist()
    n_bins = 7
    sums = [[0, 0.0, 0.0] for _ in range(n_bins)]  # count, correct, confidence
    for c, r in zip(rc, rr):
        p = 1.0 / (1.0 + math.exp(-(c - r)))
        conf = max(p, 1.0 - p)
        b = min(int((conf - 0.5) / (0.5 / n_bins)), n_bins - 1)
        sums[b][0] += 1
        sums[b][1] += p > 0.5
        sums[b][2] += conf
    expected = sum(n / len(rc) * abs(k / n - s / n) for n, k, s in sums if n)
    out = calibration(rc, rr, n_bins=n_bins)
    assert out["ece"] == pytest.approx(expected, rel=1e-12)
    assert [b["count"] for b in out["bins"]] == [n for n, _, _ in sums]


def test_calibration_ties_all_right_all_wrong():
    # Ties: confidence 0.5, not correct, so a constant model is maximally miscalibrated in the first bin.
    out = calibration([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert out["ece"] == 0.5
    assert out["bins"][0] == {"lo": 0.5, "hi": 0.55, "count": 3, "accuracy": 0.0, "confidence": 0.5}
    # Margins this large give conf == 1.0 exactly, which belongs to the last (closed) bin.
    right = calibration([1000.0, 50.0], [0.0, 0.0])
    assert right["ece"] == 0.0 and right["bins"][-1]["count"] == 2 and right["bins"][-1]["accuracy"] == 1.0
    wrong = calibration([0.0, 0.0], [1000.0, 50.0])
    assert wrong["ece"] == 1.0 and wrong["bins"][-1]["accuracy"] == 0.0
    # All wrong at finite margins: accuracy 0 everywhere, so ECE is the mean confidence.
    rr = [0.5, 1.0, 2.0, 4.0]
    expected = sum(1.0 / (1.0 + math.exp(-m)) for m in rr) / len(rr)
    assert calibration([0.0] * 4, rr)["ece"] == pytest.approx(expected, rel=1e-12)


def test_calibration_inputs_and_errors():
    rc, rr = _pairs_at(0.9, 6, 4)
    from_torch = calibration(torch.tensor(rc, dtype=torch.bfloat16), torch.tensor(rr, dtype=torch.bfloat16))
    assert from_torch["ece"] == pytest.approx(0.3, abs=1e-2)  # bf16 rounds the margin, not the bookkeeping
    empty = calibration([], [])
    assert math.isnan(empty["ece"]) and all(b["count"] == 0 for b in empty["bins"])
    with pytest.raises(ValueError, match="differ in length"):
        calibration([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="nan"):
        calibration([float("nan")], [0.0])
    with pytest.raises(ValueError):
        calibration([1.0], [0.0], n_bins=0)


# ---------------------------------------------------------------------------------------------------------------
# spearman


def brute_spearman(x, y):
    """Pearson correlation of average ranks, ranks by an O(n^2) count: 1 + #smaller + (#equal - 1) / 2."""
    def ranks(a):
        return [1 + sum(b < v for b in a) + (sum(b == v for b in a) - 1) / 2 for v in a]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_spearman_known_values():
    x = [0.1, 0.5, 2.0, 3.0, 10.0]
    assert spearman(x, [v**3 for v in x]) == pytest.approx(1.0, abs=1e-15)  # any increasing map
    assert spearman(x, [-math.exp(v) for v in x]) == pytest.approx(-1.0, abs=1e-15)
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 4 / 120 = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8, abs=1e-15)
    # a tie: ranks of x are [1, 2.5, 2.5, 4]; cov 4.5, var 4.5 and 5, so rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(math.sqrt(0.9), abs=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_brute_force_with_ties(seed):
    g = np.random.default_rng(seed)
    x = g.integers(0, 6, size=40).astype(float).tolist()  # 40 values out of 6: ties everywhere
    y = (np.array(x) * 0.3 + g.integers(0, 4, size=40)).tolist()
    assert spearman(x, y) == pytest.approx(brute_spearman(x, y), abs=1e-12)
    z = g.normal(size=40).tolist()
    assert spearman(x, z) == pytest.approx(brute_spearman(x, z), abs=1e-12)


def test_spearman_degenerate_and_errors():
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))
    assert math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        spearman([1.0, float("nan")], [1.0, 2.0])


# ---------------------------------------------------------------------------------------------------------------
# length_baselines


def test_length_baselines_by_hand():
    # longer chosen in pairs 0 and 4, shorter in pair 1, equal in pairs 2 and 3
    out = length_baselines([10, 5, 7, 3, 8], [4, 9, 7, 3, 2])
    assert out == {"pairs": 5, "longer_wins": 0.4, "shorter_wins": 0.2, "length_ties": 0.4, "best_length_baseline": 0.4}
    out = length_baselines([1, 2, 3, 9], [5, 6, 7, 8])
    assert out["shorter_wins"] == 0.75 and out["longer_wins"] == 0.25 and out["best_length_baseline"] == 0.75


def test_length_baselines_all_longer_all_ties_empty():
    out = length_baselines([5, 6, 7], [1, 2, 3])
    assert (out["longer_wins"], out["shorter_wins"], out["length_ties"]) == (1.0, 0.0, 0.0)
    out = length_baselines([4, 4], [4, 4])
    assert (out["longer_wins"], out["shorter_wins"], out["length_ties"], out["best_length_baseline"]) == (0, 0, 1, 0)
    assert math.isnan(length_baselines([], [])["best_length_baseline"])
    with pytest.raises(ValueError):
        length_baselines([1, 2], [1])


# ---------------------------------------------------------------------------------------------------------------
# accuracy_by_bucket, quantile_edges


def test_accuracy_by_bucket_by_hand():
    values = [0, 1, 2, 5, 9, 10, 10, -1, 11]
    correct = [1, 0, 1, 1, 0, 1, 1, 1, 1]
    out = accuracy_by_bucket(values, correct, [0, 2, 3, 5, 10])
    assert out == [
        {"lo": 0.0, "hi": 2.0, "count": 2, "accuracy": 0.5},  # 0, 1
        {"lo": 2.0, "hi": 3.0, "count": 1, "accuracy": 1.0},  # 2
        {"lo": 3.0, "hi": 5.0, "count": 0, "accuracy": None},  # 5 is the next bucket's lower edge
        {"lo": 5.0, "hi": 10.0, "count": 4, "accuracy": 0.75},  # 5, 9, 10, 10: the last bucket is closed
    ]  # -1 and 11 lie outside the edges and are in no bucket
    # booleans (e.g. r_c > r_r from torch) work as well as 0/1
    all_wrong = accuracy_by_bucket(torch.tensor([1.0, 2.0]), torch.tensor([False, False]), [0, 5])
    assert all_wrong == [{"lo": 0.0, "hi": 5.0, "count": 2, "accuracy": 0.0}]
    with pytest.raises(ValueError):
        accuracy_by_bucket([1.0], [1], [3, 2])
    with pytest.raises(ValueError):
        accuracy_by_bucket([1.0], [1], [3])


def test_quantile_edges():
    assert quantile_edges([5, 1, 4, 2, 3], 4) == [1.0, 2.0, 3.0, 4.0, 5.0]
    # linear interpolation: quantile 0.5 of [1, 2, 3, 4] is 2.5
    assert quantile_edges([1, 2, 3, 4], 2) == [1.0, 2.5, 4.0]
    # repeated quantiles merge: [1, 1, 1, 1, 2] at 0, 1/4, ..., 1 is [1, 1, 1, 1, 2]
    assert quantile_edges([1, 1, 1, 1, 2], 4) == [1.0, 2.0]
    assert quantile_edges([7, 7, 7], 3) == [7.0, 7.0]
    with pytest.raises(ValueError):
        quantile_edges([], 3)


def test_quantile_edges_cover_every_pair():
    g = np.random.default_rng(1)
    lengths = g.integers(10, 400, size=101)
    correct = g.random(101) < 0.7
    buckets = accuracy_by_bucket(lengths, correct, quantile_edges(lengths, 4))
    assert sum(b["count"] for b in buckets) == 101
    assert sum(b["count"] * b["accuracy"] for b in buckets) == pytest.approx(correct.sum())
    # constant values: one closed bucket holding all of them
    assert accuracy_by_bucket([3, 3, 3], [1, 0, 1], quantile_edges([3, 3, 3], 5)) == [
        {"lo": 3.0, "hi": 3.0, "count": 3, "accuracy": pytest.approx(2 / 3)}
    ]


# ---------------------------------------------------------------------------------------------------------------
# most_confident


def test_most_confident_by_hand():
    rc = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    rr = [1.0, 3.0, -2.0, 3.0, 0.5, 0.0]
    # wrong pairs (r_r > r_c): 0 (by 1), 1 (by 3), 3 (by 3), 4 (by 0.5); 1 and 3 tie, lower index first
    assert most_confident(rc, rr, k=3) == [1, 3, 0]
    assert most_confident(rc, rr, k=10) == [1, 3, 0, 4]
    assert most_confident(rc, rr, k=0) == []
    # right pairs (r_c > r_r): only 2; the tie, pair 5, is in neither list
    assert most_confident(rc, rr, k=10, wrong=False) == [2]
    assert all(type(i) is int for i in most_confident(rc, rr, k=2))
    with pytest.raises(ValueError):
        most_confident(rc, rr, k=-1)


def test_most_confident_all_right_all_wrong():
    rc, rr = [3.0, 1.0, 2.0], [0.0, 0.0, 0.0]
    assert most_confident(rc, rr, k=5) == []
    assert most_confident(rc, rr, k=2, wrong=False) == [0, 2]
    assert most_confident(rr, rc, k=5) == [0, 2, 1]
    assert most_confident(rr, rc, k=5, wrong=False) == []


def test_most_confident_is_stable_for_many_ties():
    # Large enough that an unstable sort (numpy's default quicksort beyond 16 items) would reorder equal margins.
    rr = [1.0, 2.0] * 100
    assert most_confident([0.0] * 200, rr, k=100) == list(range(1, 200, 2))
    assert most_confident([0.0] * 200, rr, k=150) == list(range(1, 200, 2)) + list(range(0, 100, 2))


# ---------------------------------------------------------------------------------------------------------------
# histogram


def test_histogram_by_hand():
    out = histogram([0, 1, 2, 3, 4], 4)
    assert out == {"edges": [0.0, 1.0, 2.0, 3.0, 4.0], "counts": [1, 1, 1, 2], "below": 0, "above": 0}
    # values outside [lo, hi] are folded into the end bins, so counts still sum to len(values)
    out = histogram([-5, 0.5, 1.0, 1.5, 9], 2, lo=0, hi=2)
    assert out == {"edges": [0.0, 1.0, 2.0], "counts": [2, 3], "below": 1, "above": 1}
    # constant values: numpy's range [v - 0.5, v + 0.5]
    out = histogram([2.0, 2.0], 1)
    assert out["edges"] == [1.5, 2.5] and out["counts"] == [2]
    assert histogram([], 3)["counts"] == [0, 0, 0]
    with pytest.raises(ValueError):
        histogram([1.0], 2, lo=1, hi=1)
    with pytest.raises(ValueError):
        histogram([1.0, float("inf")], 2)


def test_histogram_matches_numpy():
    values = np.random.default_rng(2).normal(size=500)
    out = histogram(values, 13)
    counts, edges = np.histogram(values, bins=13)
    assert out["counts"] == counts.tolist()
    assert out["edges"] == pytest.approx(edges.tolist(), abs=1e-12)
    assert sum(out["counts"]) == 500


# ---------------------------------------------------------------------------------------------------------------
# margin_quantiles


def test_margin_quantiles_by_hand():
    # margins [2, 0, 4, 1, 3]; sorted [0, 1, 2, 3, 4], quantile q sits at position 4q, linearly interpolated
    out = margin_quantiles([3.0, 1.0, 4.0, 2.0, 3.5], [1.0, 1.0, 0.0, 1.0, 0.5])
    assert list(out) == [0.05, 0.25, 0.5, 0.75, 0.95]
    assert list(out.values()) == pytest.approx([0.2, 1.0, 2.0, 3.0, 3.8], abs=1e-12)
    out = margin_quantiles([1.0, 2.0, 3.0, 4.0], [0.0] * 4, qs=(0.0, 0.5, 1.0))
    assert out == {0.0: 1.0, 0.5: 2.5, 1.0: 4.0}
    assert all(math.isnan(v) for v in margin_quantiles([], []).values())
    with pytest.raises(ValueError):
        margin_quantiles([1.0], [0.0], qs=(1.5,))
