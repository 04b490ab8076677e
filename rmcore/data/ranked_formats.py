"""The ranked record formats: rankings of K >= 2 responses to one prompt (ranked, ultrafeedback,
ultrafeedback_fine_grained in the FORMATS registry of rmcore/data/formats.py).

Whichever way a record states its ranking, it is kept as one score per response (higher better, equal scores tie):
an Example with `responses` and `scores`, read by rmcore/data/ranked.py. What the dataset itself makes unusable is
taken out and counted: an empty or repeated response is removed from its ranking (`Report.removed`); a record left
with fewer than 2 responses, or with every response tied, is dropped (`Report.dropped`).
"""
from __future__ import annotations

import math

from rmcore.data.records import Example, Report, checked_field
from rmcore.data.template import ASSISTANT, HUMAN
from rmcore.errors import DataError


def ranking_problem(scores: list[float]) -> str | None:
    """Why a ranking cannot be learned from (fewer than 2 responses, or all tied: no ordered pair); else None."""
    if len(scores) < 2:
        return "fewer than 2 responses"
    if min(scores) == max(scores):
        return "all responses tied"
    return None


def _ranking(where: str, prompt: str, responses: list[str], scores: list[float], report: Report) -> Example | None:
    """The Example of a ranking, empty and repeated responses removed (counted); None (dropped, counted) when it has
    fewer than 2 responses left or they all tie."""
    keep = [i for i, r in enumerate(responses) if r.strip()]
    if len(keep) < len(responses):
        report.remove("empty response", where, len(responses) - len(keep))
    copies = {}
    for i in keep:
        copies.setdefault(responses[i], []).append(i)
    keep = []
    for idx in copies.values():
        # One text cannot be ranked above itself: copies that agree are one response, copies that disagree say
        # nothing about it.
        if len({scores[i] for i in idx}) > 1:
            report.remove("the same response twice with different scores (every copy removed)", where, len(idx))
            continue
        keep.append(idx[0])
        if len(idx) > 1:
            report.remove("the same response twice with one score (one copy kept)", where, len(idx) - 1)
    keep.sort()
    responses, scores = [responses[i] for i in keep], [scores[i] for i in keep]
    problem = ranking_problem(scores)
    if problem:
        return report.drop(problem, where)
    return Example(where, prompt, responses[scores.index(max(scores))], responses=responses, scores=scores)


def _scores_of_ranking(ranking: list, k: int, where: str) -> list[float]:
    """Score len(ranking) - p for the response(s) at place p of a best-first ranking of K indices (a list: a tie)."""
    scores: list[float | None] = [None] * k
    for place, entry in enumerate(ranking):
        tied = entry if isinstance(entry, list) else [entry]
        if not tied:
            raise DataError(f"{where}: ranking[{place}] is an empty list; expected a response index or a list of "
                            f"tied indices (format ranked)")
        for i in tied:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < k:
                raise DataError(f"{where}: ranking[{place}] holds {i!r}; expected indices of `responses`, 0 to "
                                f"{k - 1}, best first (format ranked)")
            if scores[i] is not None:
                raise DataError(f"{where}: ranking names response {i} twice; expected each index 0 to {k - 1} "
                                f"exactly once (format ranked)")
            scores[i] = float(len(ranking) - place)
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        raise DataError(f"{where}: ranking leaves out response(s) {missing}; expected each index 0 to {k - 1} exactly "
                        f"once (format ranked)")
    return scores


def parse_ranked(record: dict, where: str, report: Report) -> Example | None:
    """`prompt` (used as written: prompt + response, as in the pairs format), `responses` (K >= 2 strings), and
    either `ranking`: the responses' 0-based indices, best first, each exactly once, an inner list a tie
    ([2, [0, 3], 1]: 2 best, then 0 and 3 tied, then 1), or `scores`: one number per response, higher better,
    equal numbers tied."""
    prompt = checked_field(record, "prompt", where, "ranked", nonempty=False)
    responses = checked_field(record, "responses", where, "ranked", kind=list)
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(f"{where}: responses[{i}] must be str, got {type(r).__name__} (format ranked)")
    # null counts as absent, as in the pairs format: a parquet file holds every column in every row
    ranking, scores = record.get("ranking"), record.get("scores")
    if (ranking is None) == (scores is None):
        raise DataError(f"{where}: expected one of 'ranking' (response indices, best first) and 'scores' (one number "
                        f"per response, higher better), got {'both' if ranking is not None else 'neither'} "
                        f"(format ranked)")
    if ranking is not None:
        scores = _scores_of_ranking(checked_field(record, "ranking", where, "ranked", kind=list), len(responses), where)
    else:
        scores = checked_field(record, "scores", where, "ranked", kind=list)
        for i, s in enumerate(scores):
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
                raise DataError(f"{where}: scores[{i}] is {s!r}; expected a finite number (format ranked)")
        if len(scores) != len(responses):
            raise DataError(f"{where}: {len(scores)} scores for {len(responses)} responses; expected one score per "
                            f"response (format ranked)")
        scores = [float(s) for s in scores]
    return _ranking(where, prompt, responses, scores, report)


def _parse_completions(record: dict, where: str, report: Report, fmt: str, score_key: str) -> Example | None:
    """UltraFeedback's record: `instruction` and `completions`, each {"response": text, score_key: number, ...}."""
    instruction = checked_field(record, "instruction", where, fmt)
    completions = checked_field(record, "completions", where, fmt, kind=list, nonempty=False)
    responses, scores = [], []
    for i, c in enumerate(completions):
        if not isinstance(c, dict) or not isinstance(c.get("response"), str):
            raise DataError(f"{where}: completions[{i}] must be an object with a string 'response', got {c!r:.80} "
                            f"(format {fmt})")
        score = c.get(score_key)
        # The dataset leaves some completions unrated (null, NaN, "N/A"): each is taken out of its ranking, counted.
        if score is None or score == "N/A" or (isinstance(score, float) and math.isnan(score)):
            report.remove(f"no {score_key}", where)
            continue
        if not isinstance(score, (int, float)) or isinstance(score, bool) or math.isinf(score):
            raise DataError(f"{where}: completions[{i}].{score_key} is {score!r}; expected a number (null, NaN or "
                            f"'N/A' for none) (format {fmt})")
        responses.append(" " + c["response"])
        scores.append(float(score))
    return _ranking(where, f"{HUMAN} {instruction}{ASSISTANT}", responses, scores, report)


def parse_ultrafeedback(record: dict, where: str, report: Report) -> Example | None:
    """UltraFeedback (openbmb/UltraFeedback): `instruction`, `completions` [{"response", "overall_score"}, ...]
    ranked by overall_score (the GPT-4 critique's one rating, 1 to 10), higher better. Other fields (models,
    annotations, critique, principle, custom_system_prompt) are not read."""
    return _parse_completions(record, where, report, "ultrafeedback", "overall_score")


def parse_ultrafeedback_fine_grained(record: dict, where: str, report: Report) -> Example | None:
    """UltraFeedback ranked by each completion's `fine-grained_score` (the mean of its four aspect ratings:
    helpfulness, honesty, instruction following, truthfulness). Named with data.format; never auto-detected."""
    return _parse_completions(record, where, report, "ultrafeedback_fine_grained", "fine-grained_score")
