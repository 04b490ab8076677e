"""Evaluation metrics for a reward model on preference pairs, and on rankings of K responses (the last section:
pairwise accuracy over ordered pairs, best-of-K), as small pure functions of 1-D arrays.

Conventions shared by all functions in this file:

- Inputs are 1-D sequences of numbers: Python lists, numpy arrays or (CPU or GPU) torch tensors. Everything is
  converted to a float64 numpy array first, so bf16 rewards and integer lengths are compared exactly.
- In every pair the chosen response is the preferred one (the label is always 1). A pair is "correct" when
  r_chosen > r_rejected; a tie is not correct, as in losses.metrics_from_sums.
- Outputs are plain Python numbers, lists and dicts, ready for json.dump in a report. A statistic over zero
  items is nan (or None inside a per-bin/per-bucket dict), never an exception.
- Nothing here reads a config or touches a model; training-time metrics (accuracy, margin, reward mean/std,
  summable across ranks) live in losses.py.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _as_1d(x, name: str) -> np.ndarray:
    """x as a 1-D float64 numpy array; torch tensors are detached and copied to the host."""
    if hasattr(x, "detach"):  # a torch tensor, recognised without importing torch
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _as_pairs(a, b, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) as 1-D float64 arrays of one length."""
    a, b = _as_1d(a, name_a), _as_1d(b, name_b)
    # Equal lengths are required, not broadcastable ones: a length-1 array would silently pair with every item.
    if a.shape != b.shape:
        raise ValueError(f"{name_a} ({a.shape[0]} items) and {name_b} ({b.shape[0]} items) differ in length")
    return a, b


def _margins(r_chosen, r_rejected) -> np.ndarray:
    """r_c - r_r per pair, refusing nan."""
    rc, rr = _as_pairs(r_chosen, r_rejected, "r_chosen", "r_rejected")
    d = rc - rr
    # A nan reward (a diverged model, inf - inf) has no side; letting it through would hide it in a bin or a tie.
    if np.isnan(d).any():
        raise ValueError(f"{int(np.isnan(d).sum())} pair(s) have a nan reward margin")
    return d


def _bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index b with edges[b] <= v < edges[b+1], the last bin closed: v == edges[-1] gets len(edges) - 2."""
    # Found by comparing with the edges themselves (not by (v - lo) / width), so an item on an edge always lands
    # in the bin that the reported edges say it does. Out-of-range values get -1 or len(edges) - 1.
    idx = np.searchsorted(edges, values, side="right") - 1
    idx[values == edges[-1]] = len(edges) - 2
    return idx


# ----------------------------------------------------------------------------------------------------------------
# Calibration


def calibration(r_chosen, r_rejected, n_bins: int = 10) -> dict:
    """ECE = sum_b (n_b / N) * |acc_b - conf_b|, conf = max(p, 1 - p), p = sigmoid(r_c - r_r), bins on [0.5, 1]."""
    # p is the Bradley-Terry probability that chosen is preferred. Since the label is always 1, binning p itself is
    # degenerate (every bin's accuracy is 1), so calibration is measured on the side the model predicts: its
    # confidence max(p, 1 - p) = sigmoid(|r_c - r_r|) against whether that side is the chosen one (p > 0.5). This
    # is the usual top-label ECE of a binary classifier. A tie (p == 0.5) predicts neither side: its confidence
    # is 0.5 and it counts as not correct, like a tie in the accuracy of losses.py, so a constant model scores
    # ECE 0.5 rather than looking perfectly calibrated.
    #
    # Bins are n_bins equal-width intervals [lo, hi) on [0.5, 1.0]; the last one is closed, so conf == 1.0
    # (any |margin| above ~37 in float64) counts in it.
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    d = _margins(r_chosen, r_rejected)
    conf = 1.0 / (1.0 + np.exp(-np.abs(d)))  # exp of a non-positive number: never overflows
    correct = d > 0
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    idx = _bin_index(conf, edges)
    n = d.shape[0]
    bins, ece = [], 0.0
    for b in range(n_bins):
        in_bin = idx == b
        count = int(in_bin.sum())
        acc = float(correct[in_bin].mean()) if count else None
        mean_conf = float(conf[in_bin].mean()) if count else None
        if count:
            ece += count / n * abs(acc - mean_conf)
        lo, hi = float(edges[b]), float(edges[b + 1])
        bins.append({"lo": lo, "hi": hi, "count": count, "accuracy": acc, "confidence": mean_conf})
    return {"ece": ece if n > 0 else math.nan, "bins": bins}


# ----------------------------------------------------------------------------------------------------------------
# Rank correlation


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks of a, tied values all getting the mean of the ranks they span."""
    order = np.argsort(a, kind="stable")
    s = a[order]
    new_run = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new_run)  # first sorted position of each run of equal values
    ends = np.r_[starts[1:], len(a)]  # one past its last
    run_of = np.cumsum(new_run) - 1  # which run each sorted position belongs to
    # A run over sorted positions start..end-1 holds ranks start+1..end, whose mean is (start + 1 + end) / 2.
    ranks = np.empty(len(a))
    ranks[order] = ((starts + 1 + ends) / 2)[run_of]
    return ranks


def spearman(x, y) -> float:
    """Spearman rho = Pearson correlation of the average ranks of x and of y."""
    x, y = _as_pairs(x, y, "x", "y")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("spearman is undefined with nan values")
    # Zero variance is checked on the inputs, not on the float ranks, so the answer does not hang on rounding.
    if len(x) < 2 or (x == x[0]).all() or (y == y[0]).all():
        return math.nan
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    rho = float((rx * ry).sum() / math.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return min(1.0, max(-1.0, rho))  # rounding can step just outside [-1, 1] for a perfect (anti-)monotone pair


# ----------------------------------------------------------------------------------------------------------------
# Baselines, buckets, error analysis


def length_baselines(len_chosen, len_rejected) -> dict:
    """longer_wins = mean(l_c > l_r), shorter_wins = mean(l_c < l_r), length_ties = mean(l_c == l_r), best = max."""
    # The accuracy a reward model gets for free by reading length alone; a model that does not beat
    # best_length_baseline has not shown it learned anything else. Ties are wins for neither rule.
    lc, lr = _as_pairs(len_chosen, len_rejected, "len_chosen", "len_rejected")
    n = lc.shape[0]
    if n == 0:
        nan = math.nan
        return {"pairs": 0, "longer_wins": nan, "shorter_wins": nan, "length_ties": nan, "best_length_baseline": nan}
    longer, shorter = float((lc > lr).mean()), float((lc < lr).mean())
    return {
        "pairs": n,
        "longer_wins": longer,
        "shorter_wins": shorter,
        "length_ties": float((lc == lr).mean()),
        "best_length_baseline": max(longer, shorter),
    }


def quantile_edges(values, n_buckets: int) -> list[float]:
    """Unique values of quantile(values, [0, 1/n, ..., 1]) (linear interpolation): edges for accuracy_by_bucket."""
    # Repeated quantiles (many equal lengths, say) are merged, so there may be fewer than n_buckets buckets;
    # every bucket is then non-empty in principle. Constant values give [v, v]: one closed bucket holding all.
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    v = _as_1d(values, "values")
    if v.shape[0] == 0 or np.isnan(v).any():
        raise ValueError("quantile_edges needs at least one value and no nan")
    edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, n_buckets + 1)))
    if len(edges) == 1:
        edges = np.r_[edges, edges]
    return edges.tolist()


def accuracy_by_bucket(values, correct, edges: Sequence[float]) -> list[dict]:
    """Per bucket [e_i, e_i+1) (the last closed): count and accuracy = mean(correct) over pairs with value in it."""
    # values is any per-pair number (response length, number of turns, margin); correct is the per-pair outcome
    # (bool or 0/1, e.g. r_c > r_r). Pairs whose value lies outside [e_0, e_k] (or is nan) are in no bucket, so
    # counts sum to less than the number of pairs: fixed edges such as [0, 256, 512, 1024] then just leave the
    # longest pairs out instead of failing.
    v, c = _as_pairs(values, correct, "values", "correct")
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2 or np.isnan(e).any() or (np.diff(e) < 0).any():
        raise ValueError(f"edges must be a non-decreasing list of at least 2 numbers, got {list(edges)}")
    idx = _bin_index(v, e)
    out = []
    for b in range(len(e) - 1):
        in_b = idx == b
        count = int(in_b.sum())
        acc = float(c[in_b].mean()) if count else None
        out.append({"lo": float(e[b]), "hi": float(e[b + 1]), "count": count, "accuracy": acc})
    return out


def most_confident(r_chosen, r_rejected, k: int, wrong: bool = True) -> list[int]:
    """Indices of the k largest r_r - r_c among pairs with r_r > r_c (wrong=True), or of r_c - r_r with r_c > r_r."""
    # The pairs to read first when looking for label noise (confidently wrong) or for what the model learned
    # (confidently right). Ties are neither. Equal margins keep index order, so the list is reproducible.
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    d = _margins(r_chosen, r_rejected)
    score = -d if wrong else d
    order = np.argsort(-score, kind="stable")
    order = order[score[order] > 0]
    return [int(i) for i in order[:k]]


# ----------------------------------------------------------------------------------------------------------------
# Distributions, for report tables and plots


def histogram(values, n_bins: int, lo: float | None = None, hi: float | None = None) -> dict:
    """counts[b] = #(edges[b] <= v < edges[b+1]) (last bin closed), edges = linspace(lo, hi, n_bins + 1)."""
    # lo and hi default to min and max of values. Values outside [lo, hi] are counted in the first or last bin,
    # so counts always sum to len(values); "below" and "above" say how many were folded in that way. Constant
    # values (and the empty input) get the range numpy uses: [v - 0.5, v + 0.5], and [0, 1].
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    v = _as_1d(values, "values")
    if not np.isfinite(v).all():
        raise ValueError("histogram values must be finite")
    if lo is None or hi is None:
        lo_d, hi_d = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
        if lo is None and hi is None and lo_d == hi_d:
            lo_d, hi_d = lo_d - 0.5, hi_d + 0.5
        lo = lo_d if lo is None else lo
        hi = hi_d if hi is None else hi
    if not lo < hi:
        raise ValueError(f"histogram needs lo < hi, got lo={lo}, hi={hi}")
    edges = np.linspace(lo, hi, n_bins + 1)
    idx = np.clip(_bin_index(v, edges), 0, n_bins - 1)
    return {
        "edges": edges.tolist(),
        "counts": np.bincount(idx, minlength=n_bins).tolist(),
        "below": int((v < lo).sum()),
        "above": int((v > hi).sum()),
    }


def margin_quantiles(r_chosen, r_rejected, qs: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict:
    """{q: quantile(r_c - r_r, q)} with linear interpolation between order statistics (numpy's default)."""
    qs = [float(q) for q in qs]
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles must lie in [0, 1], got {qs}")
    d = _margins(r_chosen, r_rejected)
    if d.shape[0] == 0:
        return {q: math.nan for q in qs}
    return {q: float(x) for q, x in zip(qs, np.quantile(d, qs))}


# ----------------------------------------------------------------------------------------------------------------
# Rankings of K responses to one prompt
#
# rewards and scores are 1-D over every response of every prompt, each prompt's responses together, in the order of
# group_sizes (one K per prompt); scores are the data's ranking, higher better, equal scores tied (no preference).


def _rankings(rewards, scores, group_sizes) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rewards, scores) of each prompt, refusing nan and group sizes that do not cover the inputs."""
    r, s = _as_pairs(rewards, scores, "rewards", "scores")
    sizes = np.asarray(group_sizes, dtype=np.int64).reshape(-1)
    if (sizes < 1).any() or int(sizes.sum()) != len(r):
        raise ValueError(f"group sizes {sizes.tolist()[:10]} must be >= 1 and add up to the {len(r)} responses")
    if np.isnan(r).any() or np.isnan(s).any():
        raise ValueError("rankings with a nan reward or score have no order")
    if not len(sizes):  # np.split would make one empty prompt of no prompt
        return []
    bounds = np.cumsum(sizes)[:-1]
    return list(zip(np.split(r, bounds), np.split(s, bounds)))


def ranking_accuracy(rewards, scores, group_sizes) -> dict:
    """accuracy = #(r_i > r_j) / #pairs over every prompt's ordered pairs (s_i > s_j); a reward tie is wrong."""
    # Pairs are pooled over prompts (a prompt of K responses brings K(K-1)/2 of them when untied); pairs tied in the
    # data state no preference and are counted apart (tied_pairs), never scored.
    pairs = wins = ties = tied = 0
    for r, s in _rankings(rewards, scores, group_sizes):
        above = s[:, None] > s[None, :]
        diff = r[:, None] - r[None, :]
        pairs += int(above.sum())
        wins += int((above & (diff > 0)).sum())
        ties += int((above & (diff == 0)).sum())
        tied += int(np.triu(s[:, None] == s[None, :], 1).sum())
    return {"pairs": pairs, "wins": wins, "ties": ties, "accuracy": wins / pairs if pairs else math.nan,
            "tied_pairs": tied}


def best_of_k(rewards, scores, group_sizes) -> dict:
    """accuracy = mean over prompts of [max reward of the best-scored > every other reward]; chance = mean(m / K)."""
    # RewardBench 2 (Malik et al. 2025) scores a prompt right when its one correct response out of 4 gets the
    # strictly highest reward (chance 1/4). With m responses tied for best any of them may win, and a random
    # reward does so with probability m / K: `chance` is that, averaged over the prompts. A prompt whose responses
    # all tie has no wrong answer to beat and counts as a miss (the data drops such prompts).
    hits, chance, n = 0, 0.0, 0
    for r, s in _rankings(rewards, scores, group_sizes):
        top = s == s.max()
        n += 1
        chance += top.sum() / len(s)
        hits += bool((~top).any() and r[top].max() > r[~top].max())
    return {"prompts": n, "hits": hits, "accuracy": hits / n if n else math.nan,
            "chance": chance / n if n else math.nan}
