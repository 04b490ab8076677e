"""What a record becomes, and the checks every record format shares.

An Example is one record in HH form ("\\n\\nHuman: ...\\n\\nAssistant: ..."): a prompt and its response(s).
A Report counts what happened to every record of a split (read, kept, dropped or skipped by reason) so that
nothing is lost silently; `require_data` stops with the reason when a split comes out empty. The parsers of
rmcore/data/formats.py and rmcore/data/ranked_formats.py read fields through `checked_field`, so a malformed record
is a DataError("path:line: what was expected").
"""
from __future__ import annotations

from dataclasses import dataclass, field

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


def checked_field(record: dict, key: str, where: str, fmt: str, *, kind=str, nonempty: bool = True):
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


def checked_messages(value: list, key: str, where: str) -> list[tuple[str, str]]:
    """record[key]'s {"role", "content"} messages as (role, content), checked: string fields, a known role."""
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
