"""Data: preference pairs and SFT text from local files, the template, length filtering, block packing, batching.

    file spec ──read──> records ──parse (format)──> Example(prompt, chosen, rejected) in HH form
        ──template──> text ──tokenizer──> ids ──length filter (dropped, counted)──> PairDataset / BlockDataset
        ──ShardedSampler (disjoint per rank, resumable)──> collate_pairs / collate_blocks ──> model

Files are named by specs: `path`, or `path[a:b]` for records a..b-1 of the file (Python slice rules, indices
counted over the file's non-blank lines / rows, before anything is dropped). `.jsonl`, `.jsonl.gz` and `.json`
(one list of records) are read with the standard library, line by line; `.parquet` through pyarrow (the `parquet`
extra). `${RMCORE_DATA}` in a path is the shared data folder ($RMCORE_DATA, default ../shared/data).
Nothing is fetched from a hub: a dataset name instead of a path is an error saying how to download it.

Record formats (`DataConfig.format`, or detected from a file's first record when "auto"):
  hh            `chosen`, `rejected`: whole transcripts (HH-RLHF). Split at the last "\\n\\nAssistant:" into the
                shared prompt and the two responses. A pair whose prompts differ, whose responses are identical,
                or one of whose responses is empty is a property of the dataset, not a broken file: it is dropped
                and counted under that reason.
  pairs         `prompt`, `chosen`, `rejected` strings (TRL's standard format; Dahoas/full-hh-rlhf, whose extra
                `response` column is ignored), with an optional `margin`, or `score_chosen` / `score_rejected`
                from which margin = score_chosen - score_rejected. Text is used as written: prompt + response.
  conversation  `chosen`, `rejected` (and optionally `prompt`) as lists of {"role", "content"} messages; without a
                `prompt`, the messages the two share are the prompt and each side's rest is its response.
  comparison    `instruction`, `response-1`, `response-2`, `votes`: a list of annotator votes, each 1 or 2 (or
                "1"/"2", or {"value": 1|2, "status": ...} as labelling tools export them; only votes with status
                "submitted", or without a status, count). The majority decides; ties and records without a
                counted vote are dropped and counted.
  text          `text`: one document (SFT only).
Every format is turned into the HH form ("\\n\\nHuman: ...\\n\\nAssistant: ...") and then the ONE template function,
`Template.render`, writes the text the model sees; training, evaluation, scoring, RAFT and PPO all call it.

Bad input (invalid UTF-8, malformed JSON, a record that is not an object, a missing field, a wrong type, an empty
required string) raises DataError("path:line: what was expected"). With `skip_bad_lines` such records are skipped
and counted instead, and the report lists the first few errors.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from rmcore.errors import UserError

HUMAN = "\n\nHuman:"          # HH-RLHF's own markers: the canonical form every record is parsed into
ASSISTANT = "\n\nAssistant:"

Format = Literal["auto", "hh", "pairs", "conversation", "comparison", "text"]


class DataError(UserError, ValueError):
    """Input that does not fit: the message starts with `path:line:` and says what was expected."""


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)   # file specs, e.g. ["data/train.jsonl.gz", "data/test.jsonl.gz[:6275]"]
    eval: list[str] = field(default_factory=list)    # held-out file specs
    format: Format = "auto"
    human_tag: str = "###Human:"           # the template: "\n\nHuman:" is written as this (the recipe's value),
    assistant_tag: str = "###Assistant:"   # "\n\nAssistant:" as this,
    tag_separator: str = " "               # with this before each tag but one opening the text (see Template)
    template: Literal["tags", "chatml"] = "tags"   # tags: the three settings above; chatml: ChatML, as chat models
    system_prompt: str = ""                # chatml only: a system turn opening every text ("" = none)
    max_length: int = 512                  # RM: a pair with either sequence longer (tokens, BOS/EOS included) is dropped
    block_size: int = 1024                 # SFT: tokens per packed block
    sft_loss_on: Literal["all", "assistant", "response"] = "all"  # SFT loss on every token (recipe), on every
    #                                      assistant turn, or on the final response only (RAFT's kept samples)
    document_mask: bool = False            # SFT: attention stops at document boundaries (recipe: runs across them)
    group_by_length: bool = False          # batch pairs of similar length together to cut padding
    pack_pairs: bool = True                # rm: a micro-batch's sequences in one row, no padding (same math, faster)
    skip_bad_lines: bool = False           # skip (and count) malformed records instead of stopping


# ----------------------------------------------------------------------------------------------------------------
# The template


@dataclass(frozen=True)
class Template:
    """How an HH-form transcript is written for the model. Each "\n\nHuman:" / "\n\nAssistant:" marker becomes
    `separator + tag`, except at the very start of the text, where it is the tag alone; `prefix` opens every HH
    transcript (text without a marker is left as written).
    With strip_space, the one space HH puts after a marker is dropped. special_tokens: the tags are written in
    the tokenizer's special tokens (ChatML's <|im_start|>), which encoding then reads as those tokens.

    The recipe's values give the reference model card's form, "###Human: <question> ###Assistant: <answer>";
    human="\n\nHuman:", assistant="\n\nAssistant:", separator="" leave HH text as it is; Template.chatml() gives
    "<|im_start|>user\n<question><|im_end|>\n<|im_start|>assistant\n<answer>" + EOS (<|im_end|> in ChatML models)."""
    human: str = "###Human:"
    assistant: str = "###Assistant:"
    separator: str = " "
    strip_space: bool = False
    prefix: str = ""
    special_tokens: bool = False

    @classmethod
    def chatml(cls, system: str = "") -> "Template":
        """ChatML (SmolLM2, Qwen, ...): every turn is <|im_start|>role\n content <|im_end|>\n."""
        return cls("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", strip_space=True,
                   prefix=f"<|im_start|>system\n{system}<|im_end|>\n" if system else "", special_tokens=True)

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "Template":
        if cfg.template == "chatml":
            return cls.chatml(cfg.system_prompt)
        if cfg.system_prompt:
            raise DataError("data.system_prompt is set but data.template=tags has no system turn; use "
                            "data.template=chatml, or write the system text into the data")
        return cls(cfg.human_tag, cfg.assistant_tag, cfg.tag_separator)

    @classmethod
    def from_dict(cls, d: dict) -> "Template":
        """The template recorded in a model's config.json; exports made before `separator` existed used none."""
        return cls(d["human"], d["assistant"], d.get("separator", ""), d.get("strip_space", False),
                   d.get("prefix", ""), d.get("special_tokens", False))

    def apply(self, text: str) -> str:
        """Rewrite the HH markers: "\n\nHuman:" -> separator + human, "\n\nAssistant:" -> separator + assistant."""
        return "".join(piece for piece, _ in self._pieces(text))

    def invert(self, text: str) -> str:
        """Undo apply (exact for texts that did not already contain the tags)."""
        text = text[len(self.prefix):] if self.prefix and text.startswith(self.prefix) else text
        space = " " if self.strip_space else ""
        for tag, marker in ((self.human, HUMAN), (self.assistant, ASSISTANT)):
            if text.startswith(tag):
                text = marker + space + text[len(tag):]
            text = text.replace(self.separator + tag, marker + space)
        return text

    def render(self, prompt: str, response: str = "") -> str:
        """The text the model sees for a prompt (HH form) and a response: apply(prompt + response)."""
        return self.apply(prompt + response)

    def segments(self, prompt: str, response: str) -> list[tuple[str, bool]]:
        """render(prompt, response) cut into (text, is_assistant_content) pieces, in order, joining to the whole."""
        return self._pieces(prompt + response)

    def _pieces(self, hh_text: str) -> list[tuple[str, bool]]:
        # Split the HH form at every marker; content after an assistant marker is assistant content, and a
        # marker (with its separator) belongs to neither side.
        pieces, in_assistant, after_marker = [], False, False
        for part in re.split(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})", hh_text):
            if part in (HUMAN, ASSISTANT):
                in_assistant = part == ASSISTANT
                tag = self.assistant if in_assistant else self.human
                pieces.append((tag if not pieces else self.separator + tag, False))
                after_marker = True
                continue
            if after_marker and self.strip_space and part.startswith(" "):
                part = part[1:]
            if part:
                pieces.append((part, in_assistant))
            after_marker = False
        # the prefix opens a transcript; text without an HH marker (already templated, or plain) stays as written
        return [(self.prefix, False)] + pieces if self.prefix and has_hh_marker(hh_text) else pieces

    def check(self, tokenizer) -> "Template":
        """A template written in special tokens needs a tokenizer that has them; anything else would be read as
        plain characters and train the model on a format it was never given."""
        if self.special_tokens:
            have = {tokenizer.decode([i], skip_special_tokens=False) for i in tokenizer.special_ids}
            wanted = set(re.findall(r"<\|[^|<>]*\|>", self.human + self.assistant + self.separator + self.prefix))
            if wanted - have:
                raise DataError(f"the template is written in the special tokens {sorted(wanted)}, but the tokenizer "
                                f"lacks {sorted(wanted - have)} as special tokens (it has {sorted(have)}); use "
                                f"data.template=tags with this tokenizer, or a ChatML model's tokenizer")
        return self

    def to_dict(self) -> dict:
        return {"human": self.human, "assistant": self.assistant, "separator": self.separator,
                "strip_space": self.strip_space, "prefix": self.prefix, "special_tokens": self.special_tokens}


def has_hh_marker(text: str) -> bool:
    return HUMAN in text or ASSISTANT in text


# ----------------------------------------------------------------------------------------------------------------
# Reading files


@dataclass(frozen=True)
class FileSpec:
    path: str
    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, spec: str) -> "FileSpec":
        # ${RMCORE_DATA} lets shipped configs name the shared data folder wherever it is (default ../shared/data)
        spec = spec.replace("${RMCORE_DATA}", str(data_root())).strip()
        m = re.fullmatch(r"(.+?)\[(\d*):(\d*)\]", spec)
        if not m:
            if re.search(r"\[[^\]]*\]$", spec) and not Path(spec).exists():
                raise DataError(f"{spec}: bad slice {spec[spec.rindex('['):]!r}; expected [start:stop] with "
                                f"non-negative integers and no spaces, e.g. file.jsonl[:1000] or file.jsonl[1000:]")
            return cls(spec)
        a, b = (int(x) if x else None for x in m.group(2, 3))
        if a is not None and b is not None and a > b:
            raise DataError(f"{spec}: bad slice [{a}:{b}]: it is reversed (start after stop), so it selects no record")
        return cls(m.group(1), a, b)

    def __str__(self):
        if self.start is None and self.stop is None:
            return self.path
        return f"{self.path}[{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}]"


def data_root() -> Path:
    """The shared data folder: $RMCORE_DATA, default ../shared/data (relative to the working directory)."""
    return Path(os.environ.get("RMCORE_DATA", "../shared/data"))


# Files the tiny configs and the tests read from the shared data folder, and what they are.
SHIPPED_FILES = {
    "hh-rlhf/harmless-base/test.jsonl.gz": (
        "the HH-RLHF harmless-base test split (2,312 preference pairs, MIT licence) from Anthropic's public "
        "hh-rlhf repository, https://github.com/anthropics/hh-rlhf (file harmless-base/test.jsonl.gz)"),
}


def _missing_shared_file(path: Path) -> str | None:
    """For a missing file inside the shared data folder: what it is, where it is expected, how to provide it."""
    root = data_root()
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None
    what = SHIPPED_FILES.get(rel, "a file of the shared data folder")
    setting = (f"RMCORE_DATA={os.environ['RMCORE_DATA']}" if "RMCORE_DATA" in os.environ
               else f"RMCORE_DATA is unset, so the default {root} relative to the working directory {os.getcwd()}")
    return (f"{path}: no such file. It is {what}. The tiny configs and the tests read it from the shared data "
            f"folder ({setting}), expecting it at {root.resolve() / rel}. Put the file there, or set RMCORE_DATA "
            f"to the folder that holds {rel.split('/')[0]}/, e.g. RMCORE_DATA=/path/to/data python train.py ...")


_HUB_NAME = re.compile(r"(hf://|hf:|huggingface:)?[A-Za-z0-9][\w.-]*/[\w.-]+")
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def _check_path(spec: FileSpec) -> Path:
    path = Path(spec.path)
    if path.is_dir():
        raise DataError(f"{spec.path}: is a directory; expected a data file ({', '.join(_SUFFIXES)})")
    if path.is_file():
        if not spec.path.endswith(_SUFFIXES):
            raise DataError(f"{spec.path}: unsupported file type; expected one of {', '.join(_SUFFIXES)}")
        return path
    if _HUB_NAME.fullmatch(spec.path) and not spec.path.endswith(_SUFFIXES):
        name = spec.path.split(":", 1)[-1].lstrip("/")
        raise DataError(
            f"{spec.path!r} is not a file; it looks like a Hugging Face dataset name. rmcore reads local files only "
            f"and fetches nothing at run time: download the files first, e.g.\n"
            f"    huggingface-cli download --repo-type dataset {name} --local-dir data/{name.split('/')[-1]}\n"
            f"and pass their paths (.jsonl, .jsonl.gz, .json or .parquet), e.g. data.train=[data/.../train.jsonl.gz]"
        )
    raise DataError(_missing_shared_file(path) or f"{spec.path}: no such file")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(f, 1):
                yield n, line
    except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, or corrupt compressed data
        raise DataError(f"{path}: unreadable after line {n} ({type(e).__name__}: {e}); the file is corrupt or "
                        f"truncated (a .gz must be complete gzip data)") from None


def iter_records(spec: FileSpec | str, blank_lines: str = "skip") -> Iterator[tuple[str, object]]:
    """Yield (location "path:line", record or DataError) for the records of a spec, in file order.

    Errors in a record are yielded, not raised, so the caller decides between stopping and skipping (and
    counting); a file that cannot be read on (corrupt or truncated compression, a broken parquet) raises.
    blank_lines="error" makes a blank .jsonl line an error (where records are matched to outputs by position).
    """
    spec = FileSpec.parse(spec) if isinstance(spec, str) else spec
    path = _check_path(spec)
    start, stop = spec.start or 0, spec.stop
    if path.name.endswith(".parquet"):
        rows = _parquet_rows(path)
    elif path.name.endswith(".json"):
        rows = _json_rows(path)
    else:
        rows = _jsonl_rows(path, blank_lines)
    for index, (where, record) in enumerate(rows):
        if stop is not None and index >= stop:
            break
        if index >= start:
            yield f"{spec.path}:{where}", record


def _jsonl_rows(path: Path, blank_lines: str = "skip") -> Iterator[tuple[str, object]]:
    for n, raw in _lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield str(n), DataError(f"{path}:{n}: invalid UTF-8 at byte {e.start} of the line; expected UTF-8 text")
            continue
        if not text.strip():
            if blank_lines == "error":
                yield str(n), DataError(f"{path}:{n}: blank line; expected one JSON record per line (a skipped "
                                        f"line would shift every later index)")
            continue  # a blank line (often the last) is not a record
        try:
            yield str(n), json.loads(text)
        except json.JSONDecodeError as e:
            yield str(n), DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line")


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}; expected UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); expected a JSON list of records") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__} (for one record per line use .jsonl)")
    for i, record in enumerate(data):
        yield f"record {i}", record


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install 'rmcore[parquet]' (or pip install pyarrow)") from None
    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"row {row}", record
                row += 1
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise DataError(f"{path}: unreadable parquet after row {row} ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Parsing records into examples


@dataclass
class Example:
    id: str                      # "path:line" of the record it came from
    prompt: str                  # HH form, ends with "\n\nAssistant:" (or as written, for the pairs format)
    chosen: str                  # response text
    rejected: str | None = None  # None for SFT-only text
    margin: float | None = None


@dataclass
class Report:
    """What happened to every record of one split: read, kept, and dropped or skipped, by reason."""
    name: str
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # first few record ids per reason
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, where: str, n: int = 1):
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        ids = self.examples.setdefault(reason, [])
        if len(ids) < 3:
            ids.append(where)

    def summary(self) -> str:
        lines = [f"{self.name}: read {self.read:,} records, kept {self.kept:,}"]
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  dropped {n:,}: {reason} (e.g. {', '.join(self.examples.get(reason, []))})")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"name": self.name, "read": self.read, "kept": self.kept, "dropped": dict(self.dropped), "notes": list(self.notes)}


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


def detect_format(record: object, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if {"response-1", "response-2"} <= keys:
        return "comparison"
    if {"chosen", "rejected"} <= keys:
        if isinstance(record["chosen"], list):
            return "conversation"
        return "pairs" if "prompt" in keys else "hh"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{where}: cannot tell the record format from its fields {sorted(keys)}; expected chosen/rejected (hh), "
        f"prompt/chosen/rejected (pairs), chosen/rejected message lists (conversation), "
        f"instruction/response-1/response-2/votes (comparison) or text"
    )


def _field(record: dict, key: str, where: str, fmt: str, kind=str, nonempty: bool = True):
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (format {fmt}; the record has {sorted(record)})")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be {want}, got {type(value).__name__} (format {fmt})")
    if nonempty and isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        raise DataError(f"{where}: field {key!r} is empty; expected a non-empty {'text' if isinstance(value, str) else 'list'} (format {fmt})")
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
            raise DataError(f"{where}: {key}[{i}] must be an object with string fields 'role' and 'content', got {m!r:.80}")
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


def parse_record(record: object, fmt: str, where: str, report: Report) -> Example | None:
    """One record -> Example in HH form, or None when dropped (the reason is counted in report)."""
    if fmt == "text":
        return Example(where, "", _field(record, "text", where, fmt))
    if fmt == "hh":
        chosen, rejected = (_field(record, k, where, fmt) for k in ("chosen", "rejected"))
        prompt_c, resp_c = split_transcript(chosen)
        prompt_r, resp_r = split_transcript(rejected)
        if prompt_c != prompt_r:
            return report.drop("chosen and rejected transcripts have different prompts", where)
        if not prompt_c:
            return report.drop("no \\n\\nAssistant: turn in the transcript", where)
        example = Example(where, prompt_c, resp_c, resp_r)
    elif fmt == "pairs":
        prompt = _field(record, "prompt", where, fmt, nonempty=False)
        example = Example(where, prompt, _field(record, "chosen", where, fmt), _field(record, "rejected", where, fmt))
        if record.get("margin") is not None:
            example.margin = float(_field(record, "margin", where, fmt, (int, float)))
        elif record.get("score_chosen") is not None or record.get("score_rejected") is not None:
            sc, sr = (_field(record, k, where, fmt, (int, float)) for k in ("score_chosen", "score_rejected"))
            example.margin = float(sc - sr)
        if example.margin is not None and not math.isfinite(example.margin):
            raise DataError(f"{where}: the margin is {example.margin} (from `margin` or `score_chosen` - "
                            f"`score_rejected`); expected a finite number")
    elif fmt == "conversation":
        chosen = _messages(_field(record, "chosen", where, fmt, list), "chosen", where)
        rejected = _messages(_field(record, "rejected", where, fmt, list), "rejected", where)
        if "prompt" in record:
            prompt = _messages(_field(record, "prompt", where, fmt, list), "prompt", where)
        else:
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        for side, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs or msgs[0][0] != "assistant":
                raise DataError(f"{where}: the {side} response must start with an assistant message after the shared prompt")
        # The prompt ends with the assistant marker and each response is what follows it, as in the HH form.
        prompt_text = render_messages(prompt) + ASSISTANT
        strip = len(ASSISTANT)
        example = Example(where, prompt_text, render_messages(chosen)[strip:], render_messages(rejected)[strip:])
    elif fmt == "comparison":
        instruction = _field(record, "instruction", where, fmt)
        responses = [_field(record, k, where, fmt) for k in ("response-1", "response-2")]
        votes = [_vote(v) for v in _field(record, "votes", where, fmt, list, nonempty=False)]
        if -1 in votes:
            raise DataError(f"{where}: field 'votes' must hold votes for 1 or 2, got {record['votes']!r:.80}")
        ones, twos = votes.count(1), votes.count(2)
        if ones + twos == 0:
            return report.drop("no submitted vote", where)
        if ones == twos:
            return report.drop("tied votes", where)
        winner = 0 if ones > twos else 1
        example = Example(where, f"{HUMAN} {instruction}{ASSISTANT}", " " + responses[winner], " " + responses[1 - winner])
    else:
        raise DataError(f"{where}: unknown format {fmt!r}")

    if not example.chosen.strip() or not example.rejected.strip():
        return report.drop("empty response", where)
    if example.chosen == example.rejected:
        return report.drop("identical responses", where)
    return example


def read_examples(specs: list[str], fmt: str = "auto", skip_bad_lines: bool = False, name: str = "data",
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


# ----------------------------------------------------------------------------------------------------------------
# Preference pairs


@dataclass
class PairDataset:
    ids: list[str]
    chosen: list[np.ndarray]     # int32 token ids, BOS ... EOS
    rejected: list[np.ndarray]
    margin: np.ndarray           # float32 per pair; nan where the record gave none
    examples: list[Example] | None = None  # the texts, kept for evaluation

    def __len__(self):
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.array([max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected)], dtype=np.int64)


def tokenize_pairs(examples: list[Example], tokenizer, template: Template, max_length: int | None,
                   report: Report, keep_examples: bool = False, batch: int = 2048) -> PairDataset:
    """Render and tokenize both sides (BOS ... EOS); drop and count pairs with a side over max_length tokens."""
    ids, chosen, rejected, margin, kept = [], [], [], [], []
    too_long = f"longer than max_length={max_length} tokens"
    for i in range(0, len(examples), batch):
        part = examples[i:i + batch]
        texts = [template.render(e.prompt, e.chosen) for e in part] + [template.render(e.prompt, e.rejected) for e in part]
        tokens = tokenizer.encode_batch(texts, bos=True, eos=True, specials=template.special_tokens)
        for e, c, r in zip(part, tokens[:len(part)], tokens[len(part):]):
            if max_length is not None and max(len(c), len(r)) > max_length:
                report.drop(too_long, e.id)
                continue
            ids.append(e.id)
            chosen.append(np.asarray(c, dtype=np.int32))
            rejected.append(np.asarray(r, dtype=np.int32))
            margin.append(math.nan if e.margin is None else e.margin)
            kept.append(e)
    report.kept = len(ids)
    return PairDataset(ids, chosen, rejected, np.asarray(margin, dtype=np.float32), kept if keep_examples else None)


def load_pairs(specs: list[str], tokenizer, cfg: DataConfig, name: str, keep_examples: bool = False) -> tuple[PairDataset, Report]:
    examples, report = read_examples(specs, cfg.format, cfg.skip_bad_lines, name)
    if examples and examples[0].rejected is None:
        raise DataError(f"{examples[0].id}: a reward model needs pairs; this file holds single texts (format 'text')")
    return tokenize_pairs(examples, tokenizer, Template.from_config(cfg).check(tokenizer), cfg.max_length, report, keep_examples), report


def right_pad(seqs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences (lists or arrays) -> (input_ids, attention_mask), padded on the right to the longest."""
    width = max((len(s) for s in seqs), default=1)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, :len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        attention_mask[row, :len(s)] = 1
    return input_ids, attention_mask


def collate_pairs(data: PairDataset, indices: list[int], pad_id: int, packed: bool = False) -> dict:
    """2B sequences, chosen[0..B) then rejected[0..B): right-padded rows (input_ids, attention_mask), or with
    packed, one row of them end to end with no padding (input_ids (1, L), position_ids restarting at each,
    seq_lens); margin (B,) (0 where none)."""
    seqs = [data.chosen[i] for i in indices] + [data.rejected[i] for i in indices]
    if packed and seqs:
        lens = tuple(len(x) for x in seqs)
        rows = {"input_ids": torch.from_numpy(np.concatenate(seqs).astype(np.int64))[None],
                "position_ids": torch.cat([torch.arange(n) for n in lens])[None], "seq_lens": lens}
    else:
        input_ids, attention_mask = right_pad(seqs, pad_id)
        rows = {"input_ids": input_ids, "attention_mask": attention_mask}
    margin = torch.from_numpy(np.nan_to_num(data.margin[indices], nan=0.0)) if len(indices) else torch.zeros(0)
    return {**rows, "margin": margin.float(),
            "has_margin": bool(len(indices)) and not np.isnan(data.margin[indices]).all(),
            "ids": [data.ids[i] for i in indices]}


# ----------------------------------------------------------------------------------------------------------------
# Block-packed SFT


@dataclass
class BlockDataset:
    tokens: np.ndarray     # (n_blocks, block_size) int32
    loss_mask: np.ndarray  # (n_blocks, block_size) bool: tokens that are learned as targets
    doc_index: np.ndarray  # (n_blocks, block_size) int32: which document each token came from (global index)
    dropped_tail: int      # tokens of the last partial block, not trained on

    def __len__(self):
        return len(self.tokens)


def document_tokens(example: Example, tokenizer, template: Template, loss_on: str) -> tuple[list[int], list[bool]]:
    """BOS + render(prompt, chosen) + EOS, and which tokens the loss covers: all; assistant content (every
    assistant turn) + EOS; or the response (the final turn, what follows render(prompt)) + EOS."""
    text = template.render(example.prompt, example.chosen)
    if loss_on == "all":
        ids = tokenizer.encode(text, bos=True, eos=True, specials=template.special_tokens)
        return ids, [True] * len(ids)
    # Assistant-only: the same whole-text encoding; a token is learned when its first character lies in
    # assistant content.
    ids, starts = tokenizer.encode_with_starts(text, specials=template.special_tokens)
    is_assistant = np.zeros(len(text) + 1, dtype=bool)
    if loss_on == "response":
        is_assistant[len(template.render(example.prompt)):len(text)] = True
    else:
        at = 0
        for piece, assistant in template.segments(example.prompt, example.chosen):
            is_assistant[at:at + len(piece)] = assistant
            at += len(piece)
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    return bos + ids + [tokenizer.eos_id], [False] * len(bos) + is_assistant[starts].tolist() + [True]


def pack_blocks(docs: list[tuple[list[int], list[bool]]], block_size: int) -> BlockDataset:
    """Concatenate the documents (each already BOS ... EOS) and cut the stream into block_size blocks."""
    lengths = np.array([len(ids) for ids, _ in docs], dtype=np.int64)
    stream = np.fromiter((t for ids, _ in docs for t in ids), dtype=np.int32, count=int(lengths.sum()))
    mask = np.fromiter((m for _, ms in docs for m in ms), dtype=bool, count=int(lengths.sum()))
    doc_index = np.repeat(np.arange(len(docs), dtype=np.int32), lengths)
    n_blocks = len(stream) // block_size
    used = n_blocks * block_size
    shape = (n_blocks, block_size)
    return BlockDataset(stream[:used].reshape(shape), mask[:used].reshape(shape), doc_index[:used].reshape(shape),
                        dropped_tail=len(stream) - used)


def load_blocks(specs: list[str], tokenizer, cfg: DataConfig, name: str) -> tuple[BlockDataset, Report]:
    """SFT data: every record's prompt + chosen response, packed into blocks."""
    examples, report = read_examples(specs, cfg.format, cfg.skip_bad_lines, name)
    template = Template.from_config(cfg).check(tokenizer)
    docs = [document_tokens(e, tokenizer, template, cfg.sft_loss_on) for e in examples]
    blocks = pack_blocks(docs, cfg.block_size)
    total = sum(len(ids) for ids, _ in docs)
    report.notes.append(f"{total:,} tokens in {len(docs):,} documents -> {len(blocks):,} blocks of {cfg.block_size}; "
                        f"the last partial block's {blocks.dropped_tail:,} tokens are dropped")
    if docs and not len(blocks):
        raise DataError(f"{name}: the {total:,} tokens of its {len(docs):,} documents are fewer than one block "
                        f"(data.block_size={cfg.block_size}): no block to train on; nothing is trained or written")
    return blocks, report


def block_positions(doc_index: torch.Tensor) -> torch.Tensor:
    """position_ids restarting at 0 at every document start within each row of a (B, T) doc_index."""
    T = doc_index.shape[-1]
    pos = torch.arange(T).expand_as(doc_index)
    starts = document_starts(doc_index)
    starts[:, 0] = True
    # the position where the current document started, carried forward along the row
    start_pos = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=-1).values
    return pos - start_pos


def document_attn_mask(doc_index: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: query t may attend key s iff s <= t and both come from the same document."""
    T = doc_index.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = doc_index[:, :, None] == doc_index[:, None, :]
    return (same & causal)[:, None]


def collate_blocks(data: BlockDataset, indices: list[int], document_mask: bool) -> dict:
    """input_ids and loss_mask (B, T); with document_mask also per-document position_ids, a block-diagonal mask,
    and no document's first token as a target."""
    idx = np.asarray(indices, dtype=np.int64)
    batch = {"input_ids": torch.from_numpy(data.tokens[idx].astype(np.int64)),
             "loss_mask": torch.from_numpy(data.loss_mask[idx]),
             "ids": [f"block {i}" for i in indices]}
    if document_mask:
        doc = torch.from_numpy(data.doc_index[idx])
        batch["position_ids"] = block_positions(doc)
        batch["attn_mask"] = document_attn_mask(doc)
        batch["loss_mask"] = batch["loss_mask"] & ~document_starts(doc)
    return batch


def document_starts(doc_index: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: a token that begins a new document within its row (never column 0). With document masks such
    a token is not a target: the previous document's EOS cannot see it coming, so nothing crosses a boundary."""
    starts = torch.zeros_like(doc_index, dtype=torch.bool)
    starts[:, 1:] = doc_index[:, 1:] != doc_index[:, :-1]
    return starts


# ----------------------------------------------------------------------------------------------------------------
# Sampling: disjoint per-rank shards, deterministic from the seed, resumable


class ShardedSampler:
    """Yields this rank's micro-batches (lists of dataset indices) for one epoch at a time.

    Each epoch shuffles all indices with a generator seeded by (seed, epoch), cuts them into global batches of
    batch_size * world_size, and gives rank r the r-th slice of each: the ranks' shards are disjoint and together
    cover the whole split. The last global batch may be short; it is split as evenly as possible, so a rank may
    get a smaller (even empty) last batch — the losses divide by global counts, so the math is unaffected.
    With group_by_length, indices are sorted by length within windows of 64 global batches and the batches
    of a window are shuffled again: batches hold similar lengths, the order stays random.
    The position (epoch, batches taken) is saved with state_dict() and restored by load_state_dict().
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, lengths: np.ndarray | None = None, window: int = 64):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.lengths, self.window = seed, shuffle, lengths, window
        self.epoch, self.taken = 0, 0

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        g = self.batch_size * self.world_size
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.lengths is not None:
            rng = np.random.default_rng([self.seed, epoch, 1])
            batches = []
            for w in range(0, self.n, g * self.window):
                chunk = order[w:w + g * self.window]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                part = [chunk[i:i + g] for i in range(0, len(chunk), g)]
                batches += [part[i] for i in (rng.permutation(len(part)) if self.shuffle else range(len(part)))]
            return batches
        return [order[i:i + g] for i in range(0, self.n, g)]

    def __len__(self):
        return math.ceil(self.n / (self.batch_size * self.world_size))

    def _shard(self, batch: np.ndarray) -> list[int]:
        m = len(batch)
        lo, hi = self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size
        return batch[lo:hi].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch; the next iteration starts the next epoch."""
        batches = self.global_batches(self.epoch)
        while self.taken < len(batches):
            batch = self._shard(batches[self.taken])
            self.taken += 1
            yield batch
        self.epoch, self.taken = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict):
        for key in ("seed", "n", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data position: saved {key}={state[key]}, this run has {getattr(self, key)}")
        self.epoch, self.taken = state["epoch"], state["taken"]
