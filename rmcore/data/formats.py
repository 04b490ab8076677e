"""Record formats: one parser function per format, in the FORMATS registry, turning a record into an Example
(rmcore/data/records.py) in HH form, which the template then writes as the model sees it.

`data.format` names one, or "auto" detects it from each file's first record (FORMATS in order, the first whose
`matches` says yes). Adding a format is one parser function, one FORMATS entry and its test. A record the dataset
itself makes unusable (two prompts that differ, an empty or identical response, tied votes) is dropped and counted
under its reason; a malformed record (a missing field, a wrong type, an empty required string) is a
DataError("path:line: what was expected"), or with `skip_bad_lines` skipped and counted, the report listing the
first few errors. The ranked formats' parsers (`ranked=True`) are in rmcore/data/ranked_formats.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from rmcore.data.files import iter_records
from rmcore.data.ranked_formats import parse_ranked, parse_ultrafeedback, parse_ultrafeedback_fine_grained
from rmcore.data.records import Example, Report, checked_field, checked_messages, render_messages, split_transcript
from rmcore.data.template import ASSISTANT, HUMAN
from rmcore.errors import DataError


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
    chosen, rejected = (checked_field(record, k, where, "hh") for k in ("chosen", "rejected"))
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
    prompt = checked_field(record, "prompt", where, "pairs", nonempty=False)
    chosen, rejected = (checked_field(record, k, where, "pairs") for k in ("chosen", "rejected"))
    example = Example(where, prompt, chosen, rejected)
    if record.get("margin") is not None:
        example.margin = float(checked_field(record, "margin", where, "pairs", kind=(int, float)))
    elif record.get("score_chosen") is not None or record.get("score_rejected") is not None:
        sc, sr = (checked_field(record, k, where, "pairs", kind=(int, float))
                  for k in ("score_chosen", "score_rejected"))
        example.margin = float(sc - sr)
    if example.margin is not None and not math.isfinite(example.margin):
        raise DataError(f"{where}: the margin is {example.margin} (from `margin` or `score_chosen` - "
                        f"`score_rejected`); expected a finite number")
    return example


def parse_conversation(record: dict, where: str, report: Report) -> Example | None:
    """`chosen`, `rejected` (and optionally `prompt`) as lists of {"role", "content"} messages; without a `prompt`,
    the messages the two share are the prompt and each side's rest is its response."""
    chosen = checked_messages(checked_field(record, "chosen", where, "conversation", kind=list), "chosen", where)
    rejected = checked_messages(checked_field(record, "rejected", where, "conversation", kind=list), "rejected", where)
    if "prompt" in record:
        prompt = checked_messages(checked_field(record, "prompt", where, "conversation", kind=list), "prompt", where)
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
    instruction = checked_field(record, "instruction", where, "comparison")
    responses = [checked_field(record, k, where, "comparison") for k in ("response-1", "response-2")]
    votes = [_vote(v) for v in checked_field(record, "votes", where, "comparison", kind=list, nonempty=False)]
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


def parse_text(record: dict, where: str, report: Report) -> Example | None:
    """`text`: one document (SFT only)."""
    return Example(where, "", checked_field(record, "text", where, "text"))


def parse_realtoxicityprompts(record: dict, where: str, report: Report, *,
                              above: float | None = None) -> Example | None:
    """RealToxicityPrompts: `prompt.text`, the start of a sentence, as the human turn (prompts only: RL loops)."""
    prompt = checked_field(record, "prompt", where, "realtoxicityprompts", kind=dict)
    text = checked_field(prompt, "text", where, "realtoxicityprompts")
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
