"""Record formats: one parser function per format, in the FORMATS registry, turning a record into an Example in HH
form ("\\n\\nHuman: ...\\n\\nAssistant: ..."), which the template then writes as the model sees it.

`data.format` names one, or "auto" detects it from each file's first record (FORMATS in order, the first whose
`matches` says yes). Adding a format is one parser function, one FORMATS entry and its test. A record the dataset
itself makes unusable (two prompts that differ, an empty or identical response, tied votes) is dropped and counted
under its reason; a malformed record (a missing field, a wrong type, an empty required string) is a
DataError("path:line: what was expected"), or with `skip_bad_lines` skipped and counted, the report listing the
first few errors.

The ranked formats (`ranked=True`: ranked, ultrafeedback, ultrafeedback_fine_grained) give rankings of K >= 2
responses to one prompt: an Example with `responses` and `scores` (higher better, equal scores tie), read by
rmcore/data/ranked.py. An empty or repeated response is removed from its ranking and counted (`Report.removed`);
a ranking left with fewer than 2 responses, or with all of them tied, is dropped and counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from rmcore.data.files import FileSpec, iter_records
from rmcore.data.template import ASSISTANT, HUMAN
from rmcore.errors import DataError


@dataclass
class Example:
    id: str                      # "path:line" of the record it came from
    prompt: str                  # HH form, ends with "\n\nAssistant:" (or as written, for the pairs format)
    chosen: str                  # response text (a ranking's: its first best-scored response, what SFT reads)
    rejected: str | None = None  # None for SFT-only text and for rankings
    margin: float | None = None
    responses: list[str] | None = None  # a ranking of K >= 2 responses (the ranked formats), in record order
    scores: list[float] | None = None   # one per response, higher better; equal scores tie


@dataclass
class Report:
    """What happened to every record of one split: read, kept, and dropped or skipped, by reason."""
    name: str
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # first few record ids per reason
    notes: list[str] = field(default_factory=list)
    # Responses taken out of a ranking whose record is kept (rankings only), by reason: counted apart from
    # `dropped`, which counts whole records, so that read = kept + dropped still holds.
    removed: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, where: str, n: int = 1):
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        ids = self.examples.setdefault(reason, [])
        if len(ids) < 3:
            ids.append(where)

    def remove(self, reason: str, where: str, n: int = 1):
        """Count n responses removed from the ranking of record `where` (the record itself may still be kept)."""
        self.removed[reason] = self.removed.get(reason, 0) + n
        ids = self.examples.setdefault(reason, [])
        if len(ids) < 3 and where not in ids:
            ids.append(where)

    def summary(self) -> str:
        lines = [f"{self.name}: read {self.read:,} records, kept {self.kept:,}"]
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  dropped {n:,}: {reason} (e.g. {', '.join(self.examples.get(reason, []))})")
        for reason, n in sorted(self.removed.items(), key=lambda kv: -kv[1]):
            lines.append(f"  removed {n:,} response(s) from their rankings: {reason} "
                         f"(e.g. {', '.join(self.examples.get(reason, []))})")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {"name": self.name, "read": self.read, "kept": self.kept, "dropped": dict(self.dropped),
               "notes": list(self.notes)}
        return {**out, "removed": dict(self.removed)} if self.removed else out


def require_data(count: int, report: Report, specs: list[str], what: str, unit: str = "examples"):
    """Stop, saying why, when a split came out empty: an empty file, a slice past its end, every record dropped."""
    if count:
        return
    if report.read == 0:
        reasons = []
        for spec in map(FileSpec.parse, specs):
            total = sum(1 for _ in iter_records(FileSpec(spec.path)))
            if total == 0:
                reasons.append(f"{spec.path} holds no records (an empty file)")
            else:
                reasons.append(f"{spec} selects no record: the file has {total:,} records (indices 0..{total - 1})")
        why = "; ".join(reasons)
    elif report.kept == 0:
        why = f"all {report.read:,} records read were dropped: " + "; ".join(
            f"{n:,} {reason}" for reason, n in sorted(report.dropped.items(), key=lambda kv: -kv[1]))
    else:
        why = f"{report.kept:,} records were kept, but they make no {unit}"
    raise DataError(f"{what}: no {unit} ({why}); nothing is trained or written")


def _field(record: dict, key: str, where: str, fmt: str, *, kind=str, nonempty: bool = True):
    """record[key], checked: present, of type `kind`, and (nonempty) not an empty string or list."""
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (format {fmt}; the record has {sorted(record)})")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be {want}, got {type(value).__name__} (format {fmt})")
    if nonempty and isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        kind_name = "text" if isinstance(value, str) else "list"
        raise DataError(f"{where}: field {key!r} is empty; expected a non-empty {kind_name} (format {fmt})")
    return value


def split_transcript(text: str) -> tuple[str, str]:
    """HH transcript -> (prompt up to and including the last "\\n\\nAssistant:", the final response)."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        return "", text
    return text[: i + len(ASSISTANT)], text[i + len(ASSISTANT):]


def _messages(value: list, key: str, where: str) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] must be an object with string fields 'role' and 'content', "
                            f"got {m!r:.80}")
        if m["role"] not in ("system", "user", "human", "assistant"):
            raise DataError(f"{where}: {key}[{i}] has role {m['role']!r}; expected system, user or assistant")
        out.append((m["role"], m["content"]))
    return out


def render_messages(messages: list[tuple[str, str]]) -> str:
    """Messages in HH form: user -> "\\n\\nHuman: text", assistant -> "\\n\\nAssistant: text", system text first."""
    out = []
    for role, content in messages:
        if role == "system":
            out.append(content)
        else:
            out.append(f"{HUMAN if role in ('user', 'human') else ASSISTANT} {content}")
    return "".join(out)


def _vote(v) -> int | None:
    if isinstance(v, dict):
        if v.get("status", "submitted") != "submitted":
            return None
        v = v.get("value")
    if isinstance(v, str) and v.strip() in ("1", "2"):
        return int(v)
    if isinstance(v, int) and not isinstance(v, bool) and v in (1, 2):
        return v
    return -1  # a vote that is neither 1 nor 2: bad input


# ----------------------------------------------------------------------------------------------------------------
# The formats: each parser takes (record, "path:line", report) and returns an Example, or None when it drops it


def parse_hh(record: dict, where: str, report: Report) -> Example | None:
    """`chosen`, `rejected`: whole transcripts (HH-RLHF), split at the last "\\n\\nAssistant:" into the shared prompt
    and the two responses. Two transcripts whose prompts differ are dropped and counted."""
    chosen, rejected = (_field(record, k, where, "hh") for k in ("chosen", "rejected"))
    prompt_c, resp_c = split_transcript(chosen)
    prompt_r, resp_r = split_transcript(rejected)
    if prompt_c != prompt_r:
        return report.drop("chosen and rejected transcripts have different prompts", where)
    if not prompt_c:
        return report.drop("no \\n\\nAssistant: turn in the transcript", where)
    return Example(where, prompt_c, resp_c, resp_r)


def parse_pairs(record: dict, where: str, report: Report) -> Example | None:
    """`prompt`, `chosen`, `rejected` strings (TRL's standard format; Dahoas/full-hh-rlhf, whose extra `response`
    column is ignored), with an optional `margin`, or `score_chosen` / `score_rejected` from which margin =
    score_chosen - score_rejected. Text is used as written: prompt + response."""
    prompt = _field(record, "prompt", where, "pairs", nonempty=False)
    chosen, rejected = (_field(record, k, where, "pairs") for k in ("chosen", "rejected"))
    example = Example(where, prompt, chosen, rejected)
    if record.get("margin") is not None:
        example.margin = float(_field(record, "margin", where, "pairs", kind=(int, float)))
    elif record.get("score_chosen") is not None or record.get("score_rejected") is not None:
        sc, sr = (_field(record, k, where, "pairs", kind=(int, float)) for k in ("score_chosen", "score_rejected"))
        example.margin = float(sc - sr)
    if example.margin is not None and not math.isfinite(example.margin):
        raise DataError(f"{where}: the margin is {example.margin} (from `margin` or `score_chosen` - "
                        f"`score_rejected`); expected a finite number")
    return example


def parse_conversation(record: dict, where: str, report: Report) -> Example | None:
    """`chosen`, `rejected` (and optionally `prompt`) as lists of {"role", "content"} messages; without a `prompt`,
    the messages the two share are the prompt and each side's rest is its response."""
    chosen = _messages(_field(record, "chosen", where, "conversation", kind=list), "chosen", where)
    rejected = _messages(_field(record, "rejected", where, "conversation", kind=list), "rejected", where)
    if "prompt" in record:
        prompt = _messages(_field(record, "prompt", where, "conversation", kind=list), "prompt", where)
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs or msgs[0][0] != "assistant":
            raise DataError(f"{where}: the {side} response must start with an assistant message after the shared "
                            f"prompt")
    # The prompt ends with the assistant marker and each response is what follows it, as in the HH form.
    prompt_text = render_messages(prompt) + ASSISTANT
    strip = len(ASSISTANT)
    return Example(where, prompt_text, render_messages(chosen)[strip:], render_messages(rejected)[strip:])


def parse_comparison(record: dict, where: str, report: Report) -> Example | None:
    """`instruction`, `response-1`, `response-2`, `votes`: a list of annotator votes, each 1 or 2 (or "1"/"2", or
    {"value": 1|2, "status": ...} as labelling tools export them; only votes with status "submitted", or without a
    status, count). The majority decides; ties and records without a counted vote are dropped and counted. An
    instruction that is already an HH transcript (starts with Human:, ends with Assistant:, as eval.py label writes
    a multi-turn prompt) is the prompt as it is."""
    instruction = _field(record, "instruction", where, "comparison")
    responses = [_field(record, k, where, "comparison") for k in ("response-1", "response-2")]
    votes = [_vote(v) for v in _field(record, "votes", where, "comparison", kind=list, nonempty=False)]
    if -1 in votes:
        raise DataError(f"{where}: field 'votes' must hold votes for 1 or 2, got {record['votes']!r:.80}")
    ones, twos = votes.count(1), votes.count(2)
    if ones + twos == 0:
        return report.drop("no submitted vote", where)
    if ones == twos:
        return report.drop("tied votes", where)
    winner = 0 if ones > twos else 1
    is_transcript = instruction.startswith(HUMAN) and instruction.endswith(ASSISTANT)
    prompt = instruction if is_transcript else f"{HUMAN} {instruction}{ASSISTANT}"
    return Example(where, prompt, " " + responses[winner], " " + responses[1 - winner])


# Rankings of K responses. Whichever way a record states its ranking, it is kept as one score per response (higher
# better, equal scores tie). What the dataset itself makes unusable is taken out and counted: an empty response,
# a repeated one, a record left with fewer than 2 responses or with every response tied.


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
    prompt = _field(record, "prompt", where, "ranked", nonempty=False)
    responses = _field(record, "responses", where, "ranked", kind=list)
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
        scores = _scores_of_ranking(_field(record, "ranking", where, "ranked", kind=list), len(responses), where)
    else:
        scores = _field(record, "scores", where, "ranked", kind=list)
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
    instruction = _field(record, "instruction", where, fmt)
    completions = _field(record, "completions", where, fmt, kind=list, nonempty=False)
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


def parse_text(record: dict, where: str, report: Report) -> Example | None:
    """`text`: one document (SFT only)."""
    return Example(where, "", _field(record, "text", where, "text"))


def parse_realtoxicityprompts(record: dict, where: str, report: Report, *,
                              above: float | None = None) -> Example | None:
    """RealToxicityPrompts: `prompt.text`, the start of a sentence, as the human turn (prompts only: RL loops)."""
    prompt = _field(record, "prompt", where, "realtoxicityprompts", kind=dict)
    text = _field(prompt, "text", where, "realtoxicityprompts")
    if above is not None and not (prompt.get("toxicity") or 0) > above:  # a missing score is not above
        return report.drop(f"prompt toxicity not above {above}", where)
    return Example(where, render_messages([("user", text)]) + ASSISTANT, "")


def parse_toxic_realtoxicityprompts(record: dict, where: str, report: Report) -> Example | None:
    """RealToxicityPrompts rows whose prompt toxicity is above 0.3 (TRL's detoxification example's filter)."""
    return parse_realtoxicityprompts(record, where, report, above=0.3)


@dataclass(frozen=True)
class RecordFormat:
    parse: Callable[[dict, str, Report], Example | None]
    fields: str                      # how a message names its fields
    matches: Callable[[dict], bool]  # whether a record looks like this format (auto detection)
    ranked: bool = False             # records are rankings of K responses (Example.responses), not pairs


# Detection tries the formats in this order: the first that matches a file's first record reads the whole file.
FORMATS = {
    "comparison": RecordFormat(parse_comparison, "instruction/response-1/response-2/votes",
                               lambda r: {"response-1", "response-2"} <= r.keys()),
    "ranked": RecordFormat(parse_ranked, "prompt/responses/ranking or scores",
                           lambda r: {"prompt", "responses"} <= r.keys(), ranked=True),
    "ultrafeedback": RecordFormat(parse_ultrafeedback, "instruction/completions with overall_score",
                                  lambda r: {"instruction", "completions"} <= r.keys(), ranked=True),
    "ultrafeedback_fine_grained": RecordFormat(parse_ultrafeedback_fine_grained,
                                               "instruction/completions with fine-grained_score",
                                               lambda r: False, ranked=True),
    "conversation": RecordFormat(parse_conversation, "chosen/rejected message lists",
                                 lambda r: {"chosen", "rejected"} <= r.keys() and isinstance(r["chosen"], list)),
    "pairs": RecordFormat(parse_pairs, "prompt/chosen/rejected",
                          lambda r: {"prompt", "chosen", "rejected"} <= r.keys()),
    "hh": RecordFormat(parse_hh, "chosen/rejected", lambda r: {"chosen", "rejected"} <= r.keys()),
    "text": RecordFormat(parse_text, "text", lambda r: "text" in r),
    "realtoxicityprompts": RecordFormat(parse_realtoxicityprompts, "prompt.text",
                                        lambda r: isinstance(r.get("prompt"), dict) and "text" in r["prompt"]),
    "realtoxicityprompts_toxic": RecordFormat(parse_toxic_realtoxicityprompts, "prompt.text with prompt.toxicity > 0.3",
                                              lambda r: False),
}


def detect_format(record: object, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, fmt in FORMATS.items():
        if fmt.matches(record):
            return name
    expected = ", ".join(f"{fmt.fields} ({name})" for name, fmt in FORMATS.items())
    raise DataError(f"{where}: cannot tell the record format from its fields {sorted(record)}; expected {expected}")


def parse_record(record: object, fmt: str, where: str, report: Report) -> Example | None:
    """One record -> Example in HH form, or None when dropped (the reason is counted in report)."""
    if fmt not in FORMATS:
        raise DataError(f"{where}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    example = FORMATS[fmt].parse(record, where, report)
    if example is None or example.rejected is None:  # dropped, or a single text (SFT)
        return example
    if not example.chosen.strip() or not example.rejected.strip():
        return report.drop("empty response", where)
    if example.chosen == example.rejected:
        return report.drop("identical responses", where)
    return example


def read_examples(specs: list[str], *, fmt: str = "auto", skip_bad_lines: bool = False, name: str = "data",
                  report: Report | None = None) -> tuple[list[Example], Report]:
    """Read and parse every record of the specs, in order. Dropped pairs and skipped records are counted."""
    report = report or Report(name)
    out = []
    for spec in specs:
        file_fmt = None if fmt == "auto" else fmt
        for where, record in iter_records(spec):
            report.read += 1
            try:
                if isinstance(record, DataError):
                    raise record
                if file_fmt is None:
                    file_fmt = detect_format(record, where)
                example = parse_record(record, file_fmt, where, report)
            except DataError as e:
                if not skip_bad_lines:
                    raise
                report.drop("bad record skipped", where)
                if len(report.notes) < 5:
                    report.notes.append(f"skipped: {e}")
                continue
            if example is not None:
                out.append(example)
    report.kept = len(out)
    return out, report
