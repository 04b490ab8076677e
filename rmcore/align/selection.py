"""Which samples RAFT learns from: the rules that leave degenerate samples out, best-of-K selection (per prompt or
over the whole batch), and a diversity statistic of the samples.
"""
from __future__ import annotations

import math

import numpy as np

from rmcore.data.template import ASSISTANT, HUMAN, Template

DISCARD_RULES = ("empty", "truncated", "tag")


def discard_reason(response: str, stopped: bool, template: Template, rules: tuple[str, ...]) -> str | None:
    """Why a sample is left out of ranking, or None: `empty` (no text), `truncated` (cut at the length limit
    before its stop), `tag` (it writes a turn marker of the template or of HH)."""
    if "empty" in rules and not response.strip():
        return "empty"
    if "truncated" in rules and not stopped:
        return "truncated"
    if "tag" in rules:
        tags = [t.strip() for t in (template.human, template.assistant, HUMAN, ASSISTANT) if t.strip()]
        if any(t in response for t in tags):
            return "tag"
    return None


# ------------------------------------------------------------------------------------------------ statistics
def distinct_n(token_lists: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of the samples (Li et al. 2016); 0 when there is none."""
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(token_lists: list[list[int]], n: int = 4) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same response, over all the samples' n-grams; 0 when
    there is none. Distinct-n across samples misses a response that loops on itself ("50 words. 50 words. ...")."""
    repeats = total = 0
    for t in token_lists:
        grams = [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
        repeats += len(grams) - len(set(grams))
        total += len(grams)
    return repeats / total if total else 0.0


# ------------------------------------------------------------------------------------------------ selection
def select_local(rewards: np.ndarray, k: int, valid: np.ndarray) -> list[int]:
    """Best of each prompt's K samples (rows i*K .. i*K+K-1) among the valid ones; ties go to the first sample.
    A prompt with no valid sample keeps nothing."""
    kept = []
    for start in range(0, len(rewards), k):
        r = np.where(valid[start:start + k], rewards[start:start + k], -np.inf)
        if np.isfinite(r).any():
            kept.append(start + int(np.argmax(r)))  # argmax returns the first maximum
    return kept


def select_global(rewards: np.ndarray, k: int, valid: np.ndarray, keep_fraction: float | None = None) -> list[int]:
    """The top valid samples of the whole batch (N samples), highest reward first, equal rewards in row order:
    floor(N / K) of them, or floor(N * keep_fraction) (at least 1) when keep_fraction is given (LMFlow's alpha)."""
    n_keep = len(rewards) // k if keep_fraction is None else max(1, math.floor(len(rewards) * keep_fraction))
    order = sorted(np.flatnonzero(valid).tolist(), key=lambda i: (-rewards[i], i))
    return order[:n_keep]
