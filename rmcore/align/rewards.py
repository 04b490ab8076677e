"""Rewards as an interface: `reward(prompts, responses) -> list[float]`, one float per (prompt, response).

Prompts are in HH form ("\\n\\nHuman: ...\\n\\nAssistant:"), responses are plain text already cut at their stop
(rmcore.generate.cut_at_stop). Two implementations, chosen by one config string:
  - a directory or a Hugging Face Hub id (org/name[@revision]): a reward model held in memory (RewardScorer: the
    template, BOS/EOS and length limit recorded in its config.json; with normalize, the statistics stored by
    `eval.py normalize`);
  - "module:function": any Python callable with that signature (rule-based or verifiable rewards, test rewards).
Under torchrun each rank scores its own samples: no collective is involved.
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Callable

import torch

from rmcore.errors import ConfigError
from rmcore.eval.scorer import RewardScorer
from rmcore.interop.hub import is_hub_id
from rmcore.training.distributed import Dist

RewardFn = Callable[[list[str], list[str]], list[float]]


class ModelReward:
    """A reward model scoring (prompt, response) pairs exactly as eval.py scores them."""

    def __init__(self, model_dir: str | Path, device, *, dtype: torch.dtype | None = None, normalize: bool = False,
                 batch_size: int = 16):
        # truncate="left": a long conversation keeps its latest turns, as a policy's context does
        self.scorer = RewardScorer(model_dir, dtype=dtype, batch_size=batch_size, truncate="left",
                                   dist=Dist(device=torch.device(device)))
        self.normalize = normalize
        if normalize:
            self.scorer.normalization()  # missing statistics fail here, at start, not after the first rollout

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.scorer.score(list(zip(prompts, responses)), normalize=self.normalize)


def load_reward(spec: str, device="cpu", *, dtype: torch.dtype | None = None, normalize: bool = False) -> RewardFn:
    """A reward model directory or hub id, or "module:function" naming a callable (prompts, responses) -> rewards."""
    if Path(spec).is_dir() or is_hub_id(spec):
        return ModelReward(spec, device, dtype=dtype, normalize=normalize)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"reward {spec!r}: expected a reward model directory, a hub id (org/name) or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward {spec!r}: cannot import it ({e})") from None
    if normalize:
        raise ConfigError(f"reward {spec!r}: normalize applies to a reward model's stored statistics, not to a "
                          f"function")
    return fn


def checked_rewards(reward: RewardFn, prompts: list[str], responses: list[str]) -> list[float]:
    """reward(prompts, responses), checked: one finite float per response."""
    out = [float(r) for r in reward(prompts, responses)]
    if len(out) != len(responses):
        raise ValueError(f"the reward function returned {len(out)} rewards for {len(responses)} responses")
    bad = [i for i, r in enumerate(out) if not math.isfinite(r)]
    if bad:
        raise ValueError(f"non-finite reward {out[bad[0]]} for response {bad[0]}: {responses[bad[0]][:200]!r}")
    return out
