"""Data files: specs naming them, the shared data folder, and readers that yield one record at a time.

Files are named by specs: `path`, or `path[a:b]` for records a..b-1 of the file (Python slice rules, indices
counted over the file's non-blank lines / rows, before anything is dropped). `.jsonl`, `.jsonl.gz` and `.json`
(one list of records) are read with the standard library, line by line; `.parquet` through pyarrow (the `parquet`
extra). `${RMCORE_DATA}` in a path is the shared data folder ($RMCORE_DATA, default ../shared/data).
Nothing is fetched from a hub: a dataset name instead of a path is an error saying how to download it.

Bad input (invalid UTF-8, malformed JSON) is yielded as a DataError("path:line: what was expected") in the record's
place, so the caller decides between stopping and skipping; a file that cannot be read on raises.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rmcore.errors import DataError


@dataclass(frozen=True)
class FileSpec:
    path: str
    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, spec: str) -> FileSpec:
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
            yield str(n), DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno}); expected one JSON "
                                    f"object per line")


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}; expected UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); expected a JSON list of "
                        f"records") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__} (for one record per line "
                        f"use .jsonl)")
    for i, record in enumerate(data):
        yield f"record {i}", record


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq  # optional (the `parquet` extra): only .parquet files need it
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install 'rmcore[parquet]' (or pip install "
                        f"pyarrow)") from None
    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"row {row}", record
                row += 1
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise DataError(f"{path}: unreadable parquet after row {row} ({type(e).__name__}: {e})") from None
