"""Shared test fixtures. The shipped data is found through one setting, RMCORE_DATA (default the repository's data/).

Module-scoped fixtures (a tokenizer, a tiny policy, a tiny reward model) are made once per test module that asks.
Helpers that are not fixtures: tests/helpers/.
"""
import gzip
import json
import os
from pathlib import Path

import pytest

from rmcore.data.tokenizer_training import train_tokenizer

import train
from helpers.runs import args

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("RMCORE_DATA") or REPO / "data").resolve()  # as rmcore.data.files.data_root
HH_TEST = DATA_DIR / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


@pytest.fixture(scope="session")
def hh_file() -> Path:
    """The genuine HH-RLHF harmless-base test file; a missing file fails the test, it never skips."""
    if not HH_TEST.is_file():
        pytest.fail(f"shipped data not found at {HH_TEST}; it ships in the repository's data/ (or set RMCORE_DATA to "
                    f"the folder holding hh-rlhf/)")
    return HH_TEST


@pytest.fixture(scope="module")
def tok_dir(hh_file, tmp_path_factory):
    """A 500-piece SentencePiece tokenizer trained on 300 chosen transcripts."""
    with gzip.open(hh_file, "rt") as f:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(300), f)]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, out, vocab_size=500)
    return str(out)


@pytest.fixture(scope="module")
def policy_dir(hh_file, tok_dir, tmp_path_factory):
    """A tiny policy: a fresh 2-layer LLaMA after a few SFT steps on HH text (it writes letters, not sense)."""
    out = tmp_path_factory.mktemp("policy")
    train.main(args("sft", out, hh_file, tok_dir, "optim.max_steps=20", "optim.lr=3e-3", "run.eval_every=0",
                    "data.eval=[]"))
    return out / "export"


@pytest.fixture(scope="module")
def rm_dir(hh_file, tok_dir, tmp_path_factory):
    """A tiny reward model with the policy's tokenizer: PPO's critic starts from it."""
    out = tmp_path_factory.mktemp("rm")
    train.main(args("rm", out, hh_file, tok_dir, "optim.max_steps=3", "run.eval_every=0", "data.eval=[]"))
    return out / "export"


# Tests that write non-finite weights by hand (never through training) to check what reads them.
HAND_WRITTEN_NON_FINITE = ("test_a_nan_reward_is_an_erro",)


def non_finite_tensors(root: Path, skip=()) -> list[str]:
    """'file:tensor' for every non-finite tensor in the safetensors files and DCP checkpoints (model part) below
    root; files a test corrupted on purpose (unreadable) and paths containing a `skip` string are passed over."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    bad = []
    for f in Path(root).rglob("*.safetensors"):
        if any(name in str(f) for name in skip):
            continue
        try:
            tensors = load_file(str(f))
        except Exception:
            continue
        bad += [f"{f}:{k}" for k, t in tensors.items() if not torch.isfinite(t).all()]
    for ckpt in {p.parent for p in Path(root).rglob(".metadata")}:
        try:
            meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
            state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
                     if k.startswith("model.") and hasattr(v, "size")}
            dcp.load(state, checkpoint_id=str(ckpt))
        except BaseException:  # DCP's CheckpointException is a BaseException
            continue
        bad += [f"{ckpt}:{k}" for k, t in state.items() if not torch.isfinite(t).all()]
    return bad


@pytest.fixture(scope="session", autouse=True)
def nothing_written_is_non_finite(tmp_path_factory):
    """After the whole session: every export (safetensors) and every checkpoint (DCP) that any test wrote is finite."""
    yield
    bad = non_finite_tensors(tmp_path_factory.getbasetemp(), skip=HAND_WRITTEN_NON_FINITE)
    assert not bad, f"non-finite weights written: {bad[:10]}"
