"""Models and datasets named by their Hugging Face Hub ids, as every user of TRL or transformers names them.

    resolve_model("openlm-research/open_llama_3b")            -> the snapshot folder in the HF cache
    resolve_model("org/name@v1.0")                             -> the same at a branch, tag or commit
    resolve_data("hf://datasets/Anthropic/hh-rlhf/helpful-base/train.jsonl.gz")   -> [(its hf:// name, local file)]

A local directory always wins: `runs/tiny/rm/export` or a folder named like an id is read as it is. Otherwise the id
is fetched with huggingface_hub's `snapshot_download` into the standard cache (`$HF_HOME/hub`), with its progress
bars: for a model only the files rmcore reads (config, weights, tokenizer and adapter files), for a dataset only the
files the path or glob names. `HF_HUB_OFFLINE=1`, `HF_HOME`, `HF_TOKEN` and `HF_ENDPOINT` are huggingface_hub's
own. huggingface_hub records which files a snapshot holds, so a snapshot whose download was interrupted is never
read as complete. Every failure is a HubError naming the id and what to do.

Each id resolved in a process is remembered with its commit hash (`hub_revisions`), which exports record.
"""
from __future__ import annotations

import re
from pathlib import Path

import httpx2
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from rmcore.errors import HubError

# org/name, optionally @revision (a branch, tag or commit hash)
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
# hf://datasets/org/name[@revision]/path-or-glob, the fsspec convention of pandas, polars and DuckDB
HF_DATASET = re.compile(r"hf://datasets/(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-]+))?"
                        r"/(?P<path>.+)")

# What rmcore reads of a model repository (interop/hf_checkpoint.py, tokenizer.py)
MODEL_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
               "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]

# What transformers reads of a text classifier (rmcore/align/classifiers.py): the tokenizers of BERT, RoBERTa and
# sentencepiece models besides rmcore's own files
CLASSIFIER_FILES = MODEL_FILES + ["vocab.txt", "vocab.json", "merges.txt", "*.model", "added_tokens.json"]

_resolved: dict[str, str] = {}  # id as written -> commit hash, for every id resolved in this process
_folders: dict[tuple, Path] = {}  # (repo, revision, kind, patterns) -> snapshot folder: one resolution per process


def is_hub_id(spec) -> bool:
    """Whether `spec` has the shape of a model id (org/name[@revision]); a local directory of that name still wins."""
    return HUB_ID.fullmatch(str(spec)) is not None


def resolve_model(spec, files: list[str] = MODEL_FILES) -> Path:
    """A local path (directory or file) as it is; otherwise a hub id, downloaded (`files`: by default those rmcore
    reads) into the HF cache, whose snapshot folder is returned. Anything else is returned as a path, for the caller
    to report."""
    path = Path(spec)
    if path.exists():
        return path
    match = HUB_ID.fullmatch(str(spec))
    if match is None:
        return path
    return _snapshot(str(spec), match["repo"], match["revision"], "model", files)


def resolve_data(spec: str) -> list[tuple[str, Path]]:
    """(hf:// name, local path) of each file an `hf://datasets/org/name[@revision]/path-or-glob` spec names, in name
    order."""
    match = HF_DATASET.fullmatch(spec)
    if match is None:
        raise HubError(f"{spec}: expected hf://datasets/<org>/<name>[@revision]/<path or glob>, e.g. "
                       f"hf://datasets/Anthropic/hh-rlhf/helpful-base/train.jsonl.gz")
    folder = _snapshot(spec, match["repo"], match["revision"], "dataset", [match["path"]])
    files = sorted(p for p in folder.glob(match["path"]) if p.is_file())
    if not files:
        raise HubError(f"{spec}: no file of the dataset repository {match['repo']} matches {match['path']!r}")
    prefix = spec[:len(spec) - len(match["path"])]  # hf://datasets/org/name[@revision]/
    return [(prefix + p.relative_to(folder).as_posix(), p) for p in files]


def hub_revisions(specs) -> dict[str, str]:
    """{id as written: commit hash} of those of `specs` this process resolved as hub ids (for an export's
    config.json: the exact models a run started from)."""
    return {spec: _resolved[spec] for spec in specs if spec in _resolved}


def _snapshot(spec: str, repo: str, revision: str | None, repo_type: str, patterns: list[str]) -> Path:
    """snapshot_download, once per process (every model of a run then reads the same commit), with its failures as
    one-line HubErrors naming the id."""
    key = (repo, revision, repo_type, tuple(patterns))
    if key in _folders:
        _resolved[spec] = _folders[key].name
        return _folders[key]
    kind = "dataset" if repo_type == "dataset" else "model"
    cache = constants.HF_HUB_CACHE
    try:
        folder = Path(snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=patterns))
    except IncompleteSnapshotError as e:
        raise HubError(f"{spec}: the cached snapshot {e.snapshot_path} is incomplete (an interrupted download) and "
                       f"the Hub cannot be reached to finish it; run again online") from None
    except GatedRepoError:
        raise HubError(f"{spec}: {repo} is a gated {kind} repository: accept its terms on its Hub page, then set "
                       f"HF_TOKEN (or run `hf auth login`) to a token of that account") from None
    except RepositoryNotFoundError:
        raise HubError(f"{spec}: no {kind} repository {repo} on {constants.ENDPOINT} (or it is private: set HF_TOKEN "
                       f"to a token that can read it); a local directory of that name does not exist either") from None
    except RevisionNotFoundError:
        raise HubError(f"{spec}: the {kind} repository {repo} has no revision {revision!r} (a branch, tag or commit "
                       f"hash)") from None
    except RemoteEntryNotFoundError as e:
        raise HubError(f"{spec}: a file of {repo} listed by the Hub could not be fetched ({e.server_message or e})") \
            from None
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{spec}: not a local directory, and not in the Hugging Face cache ({cache}); "
                           f"HF_HUB_OFFLINE=1 forbids downloading it: run once without HF_HUB_OFFLINE, or point "
                           f"HF_HOME at a cache that holds it") from None
        raise HubError(f"{spec}: not a local directory, not in the Hugging Face cache ({cache}), and the Hub "
                       f"({constants.ENDPOINT}) cannot be reached: {_cause(e)}") from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
        raise HubError(f"{spec}: the download from {constants.ENDPOINT} failed ({type(e).__name__}: {_cause(e)}); "
                       f"run again to resume it (finished files stay in {cache})") from None
    _folders[key] = folder
    _resolved[spec] = folder.name  # snapshots/<commit hash>
    return folder


def _cause(error: BaseException) -> str:
    """The first line of an error's message, and of its cause's."""
    parts = [str(e).strip().splitlines()[0] for e in (error, error.__cause__) if e is not None and str(e).strip()]
    return "; ".join(dict.fromkeys(parts))[:300]
