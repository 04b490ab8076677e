"""Errors a user causes, and how the entry points report them: one clear message, no traceback.

Missing or malformed data, a bad config, missing model or tokenizer files: each is raised as a subclass of
UserError (DataError, ConfigError, CheckpointError, ...) whose message says what was expected and where. The
scripts (train.py, eval.py, raft.py, ppo.py) run their main under `user_errors()`, which prints `error: <message>`
to stderr and exits with status 2. `RMCORE_TRACEBACK=1` re-raises instead, for debugging. Anything else, a bug,
keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager


class UserError(Exception):
    """An input the user controls does not fit; the message alone says what to change."""


@contextmanager
def user_errors():
    try:
        yield
    except UserError as e:
        if os.environ.get("RMCORE_TRACEBACK"):
            raise
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
