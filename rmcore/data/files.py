"""Data files: specs naming them, the data folder, and readers that yield one record at a time.

Files are named by specs: `path`, or `path[a:b]` for records a..b-1 (Python slice rules, indices counted over the
non-blank lines / rows, before anything is dropped). A path may be a file of a dataset repository on the Hugging
Face Hub, `hf://datasets/<org>/<name>[@revision]/<path or glob>`, fetched into the HF cache (rmcore/interop/hub.py);
a glob's files are read in name order as one stream, which the slice then cuts. `.jsonl`, `.jsonl.gz` and `.json`
(one list of records) are read with the standard library, line by line; `.parquet` through pyarrow (the `parquet`
extra). `${RMCORE_DATA}` in a path is the data folder: $RMCORE_DATA, default the repository's own `data/`, which
ships the HH-RLHF harmless-base test split.

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
from rmcore.interop.hub import resolve_data


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


# The repository's data/ folder, beside the package (a source checkout or an editable install)
REPO_DATA = Path(__file__).resolve().parents[2] / "data"


def data_root() -> Path:
    """The data folder `${RMCORE_DATA}` names: $RMCORE_DATA, default the repository's data/."""
    return Path(os.environ.get("RMCORE_DATA") or REPO_DATA)


# Files of the data folder that the shipped configs and the tests read, and what they are.
SHIPPED_FILES = {
    "hh-rlhf/harmless-base/test.jsonl.gz": (
        "the HH-RLHF harmless-base test split (2,312 preference pairs, MIT licence) from Anthropic's public "
        "hh-rlhf repository, https://github.com/anthropics/hh-rlhf (file harmless-base/test.jsonl.gz), which the "
        "repository ships as data/hh-rlhf/harmless-base/test.jsonl.gz"),
}


def _missing_shared_file(path: Path) -> str | None:
    """For a missing file inside the data folder: what it is, where it is expected, how to provide it."""
    root = data_root()
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None
    what = SHIPPED_FILES.get(rel, "a file of the data folder")
    setting = (f"RMCORE_DATA={os.environ['RMCORE_DATA']}" if os.environ.get("RMCORE_DATA")
               else f"RMCORE_DATA is unset, so the repository's own {root}")
    return (f"{path}: no such file. It is {what}. The shipped configs and the tests read it from the data folder "
            f"({setting}), expecting it at {root.resolve() / rel}. Put the file there, or set RMCORE_DATA to the "
            f"folder that holds {rel.split('/')[0]}/, e.g. RMCORE_DATA=/path/to/data python train.py ...")


_DATASET_NAME = re.compile(r"(hf:|huggingface:)?[A-Za-z0-9][\w.-]*/[\w.-]+")
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def local_files(spec: FileSpec) -> list[tuple[str, Path]]:
    """(name, local path) of each file a spec names, in reading order: one local file (named as the spec names
    it), or the files of an hf://datasets/... spec, downloaded (each named by its own hf:// path)."""
    if spec.path.startswith("hf://"):
        files = resolve_data(spec.path)
        bad = [name for name, _ in files if not name.endswith(_SUFFIXES)]
        if bad:
            raise DataError(f"{spec.path}: unsupported file type ({', '.join(bad[:3])}); expected one of "
                            f"{', '.join(_SUFFIXES)}")
        return files
    path = Path(spec.path)
    if path.is_dir():
        raise DataError(f"{spec.path}: is a directory; expected a data file ({', '.join(_SUFFIXES)})")
    if path.is_file():
        if not spec.path.endswith(_SUFFIXES):
            raise DataError(f"{spec.path}: unsupported file type; expected one of {', '.join(_SUFFIXES)}")
        return [(spec.path, path)]
    if _DATASET_NAME.fullmatch(spec.path) and not spec.path.endswith(_SUFFIXES):
        name = spec.path.split(":", 1)[-1].lstrip("/")
        raise DataError(
            f"{spec.path!r} is not a file; it looks like a Hugging Face dataset name. Name the file(s) of the dataset "
            f"repository to read, e.g. hf://datasets/{name}/<path>.jsonl.gz or hf://datasets/{name}/data/*.parquet "
            f"(.jsonl, .jsonl.gz, .json or .parquet, optionally sliced with [a:b])")
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
    files = local_files(spec)
    start, stop = spec.start or 0, spec.stop
    for index, (where, record) in enumerate(_rows(files, blank_lines)):
        if stop is not None and index >= stop:
            break
        if index >= start:
            yield where, record


def _rows(files: list[tuple[str, Path]], blank_lines: str) -> Iterator[tuple[str, object]]:
    """("name:line", record) of every file in turn, as one stream."""
    for name, path in files:
        if path.name.endswith(".parquet"):
            rows = _parquet_rows(path)
        elif path.name.endswith(".json"):
            rows = _json_rows(path)
        else:
            rows = _jsonl_rows(path, blank_lines)
        for where, record in rows:
            yield f"{name}:{where}", record


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
