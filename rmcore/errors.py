"""Errors a user causes, and how the entry points report them: one clear message, no traceback.

Missing or malformed data, a bad config, missing model or tokenizer files: each is raised as one of the UserError
subclasses below, whose message says what was expected and where. The scripts (train.py, eval.py, raft.py, ppo.py)
run their main under `user_errors()`, which prints `error: <message>` to stderr and exits with status 2.
`RMCORE_TRACEBACK=1` re-raises instead, for debugging. Anything else, a bug, keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager


class UserError(Exception):
    """An input the user controls does not fit; the message alone says what to change."""


class ConfigError(UserError, ValueError):
    """A config file, override or command line that does not fit the config dataclasses."""


class DataError(UserError, ValueError):
    """Input that does not fit: the message starts with `path:line:` and says what was expected."""


class TokenizerError(UserError, ValueError):
    """A tokenizer directory that is missing its files or names special tokens it does not have."""


class CheckpointError(UserError, ValueError):
    """A model directory or training checkpoint that is missing files or does not match the model."""


class HubError(UserError):
    """A model or dataset named by a Hugging Face Hub id that cannot be found, reached or fully downloaded."""


class RunDirError(UserError):
    """The run directory is in use, or holds another run."""


class NonFiniteWeights(UserError):
    """Weights hold NaN or inf: nothing is written from them."""


class NonFiniteLoss(UserError):
    """A NaN or inf loss or gradient norm, with where it happened and where to restart from."""


class NonFiniteOutputs(UserError):
    """A model whose outputs (logits, rewards) hold NaN or inf, though its weights may all be finite."""


class RewardError(UserError, ValueError):
    """A reward function that raised, or returned anything but one finite number per response."""


class WandbUnavailable(UserError):
    """logging.wandb=online without credentials or without the network."""


def check_at_least(section, minimum: float, names: tuple[str, ...], *, prefix: str, source: str) -> None:
    """Each named field of `section` must be >= minimum; None (where a field allows it) means "no limit". For the
    checks a section runs on its own values, which the types allow but a run cannot use."""
    for name in names:
        value = getattr(section, name)
        if value is not None and not value >= minimum:
            raise ConfigError(f"{source}: {prefix}.{name}={value!r}; expected >= {minimum}")


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
