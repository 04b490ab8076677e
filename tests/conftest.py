"""Shared test fixtures. The shipped data is found through one setting, RMCORE_DATA (default ../shared/data)."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("RMCORE_DATA", REPO.parent / "shared" / "data")).resolve()
HH_TEST = DATA_DIR / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


@pytest.fixture(scope="session")
def hh_file() -> Path:
    """The genuine HH-RLHF harmless-base test file; a missing file fails the test, it never skips."""
    if not HH_TEST.is_file():
        pytest.fail(f"shipped data not found at {HH_TEST}; set RMCORE_DATA to the folder holding hh-rlhf/")
    return HH_TEST
