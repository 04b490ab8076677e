"""Rewards as an interface: `reward(prompts, responses) -> list[float]`, one float per (prompt, response).

Prompts are in HH form ("\\n\\nHuman: ...\\n\\nAssistant:"), responses are plain text already cut at their stop
(rmcore.generate.cut_at_stop). Two implementations, chosen by one config string:
  - a directory or a Hugging Face Hub id (org/name[@revision]): a reward model held in memory (RewardScorer: the
    template, BOS/EOS and length limit recorded in its config.json; with normalize, the statistics stored by
    `eval.py normalize`);
  - "module:function": any Python callable with that signature (rule-based or verifiable rewards, test rewards);
  - "http://host:port": a reward model served by `eval.py serve` (rmcore/serving/reward_client.py), with a timeout
    and retries;
  - "classifier:<model>[:<label>]" and "profanity": a text classifier's probability of toxicity
    (rmcore/align/classifiers.py);
any of them negated or scaled ("-profanity", "0.5*classifier:unitary/toxic-bert": minimise toxicity in one line);
and several of them as one ensemble (EnsembleReward: mean, min, or mean - lam * std of the members).
Under torchrun each rank scores its own samples: no collective is involved.
"""
from __future__ import annotations

import importlib
import math
import re
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rmcore.align.classifiers import ProfanityReward, classifier_from_spec
from rmcore.errors import ConfigError, RewardError
from rmcore.eval.scorer import RewardScorer
from rmcore.interop.hub import is_hub_id
from rmcore.serving.reward_client import HTTPReward, is_url
from rmcore.training.distributed import Dist

RewardFn = Callable[[list[str], list[str]], list[float]]


class ModelReward:
    """A reward model scoring (prompt, response) pairs exactly as eval.py scores them."""

    def __init__(self, model_dir: str | Path, device, *, dtype: torch.dtype | None = None, normalize: bool = False,
                 batch_size: int = 16, head: str = "quality"):
        # truncate="left": a long conversation keeps its latest turns, as a policy's context does
        self.scorer = RewardScorer(model_dir, dtype=dtype, batch_size=batch_size, truncate="left",
                                   dist=Dist(device=torch.device(device)), head=head)
        self.normalize = normalize
        if normalize:
            self.scorer.normalization()  # missing statistics fail here, at start, not after the first rollout

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.scorer.score(list(zip(prompts, responses)), normalize=self.normalize)


class ScaledReward:
    """scale * another reward ("-SPEC": scale -1), the inner reward checked as any reward is."""

    def __init__(self, inner: RewardFn, scale: float, spec: str):
        self.inner, self.scale, self.spec = inner, scale, spec

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.scale * r for r in checked_rewards(self.inner, prompts, responses, source=self.spec)]


# "-SPEC", "SCALE*SPEC" or "-SCALE*SPEC" around any other spec
SCALED = re.compile(r"(?P<sign>-)?(?:(?P<scale>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\*)?(?P<inner>.+)")


def load_reward(spec: str, device="cpu", *, dtype: torch.dtype | None = None, normalize: bool = False,
                head: str = "quality", timeout: float = 60.0, retries: int = 3) -> RewardFn:
    """A reward model directory or hub id (head: what a length-disentangled one's reward is), a reward server's URL
    (timeout in seconds per request, retries after the first try), a text classifier (classifier:<model>[:<label>],
    profanity), or "module:function" naming a callable (prompts, responses) -> rewards; "-" or "SCALE*" in front
    scales any of them."""
    scaled = SCALED.fullmatch(spec)
    if (scaled["sign"] or scaled["scale"]) and not Path(spec).exists():
        scale = (-1.0 if scaled["sign"] else 1.0) * float(scaled["scale"] or 1.0)
        inner = load_reward(scaled["inner"], device, dtype=dtype, normalize=normalize, head=head, timeout=timeout,
                            retries=retries)
        return ScaledReward(inner, scale, spec)
    if spec == "profanity" or spec.startswith("classifier:"):
        if normalize:
            raise ConfigError(f"reward {spec!r}: normalize applies to a reward model's stored statistics, not to a "
                              f"classifier's probability")
        return ProfanityReward() if spec == "profanity" else classifier_from_spec(spec, device)
    if is_url(spec):
        return HTTPReward(spec, timeout=timeout, retries=retries, head=head, normalize=normalize)
    # a path that is not there goes to the model loader too, which says "no such directory" in its own words
    if Path(spec).is_dir() or is_hub_id(spec) or ("/" in spec and ":" not in spec):
        return ModelReward(spec, device, dtype=dtype, normalize=normalize, head=head)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"reward {spec!r}: expected a reward model directory, a hub id (org/name), a reward "
                          f"server's http://host:port, classifier:<model>[:<label>], profanity or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward {spec!r}: cannot import it ({e})") from None
    if normalize:
        raise ConfigError(f"reward {spec!r}: normalize applies to a reward model's stored statistics, not to a "
                          f"function")
    return fn


# ----------------------------------------------------------------------------------------------------------------
# Reward-model ensembles (Coste et al. 2024; Eisenstein et al. 2023): M members score every response, and a
# conservative aggregate of their (M, N) rewards is what the loop optimises. Each aggregation is a pure function.


def ensemble_mean(rewards: np.ndarray, *, lam: float = 0.0) -> np.ndarray:
    """Mean over members: (1/M) sum_m r_m."""
    return rewards.mean(axis=0)


def ensemble_min(rewards: np.ndarray, *, lam: float = 0.0) -> np.ndarray:
    """Worst case over members: min_m r_m (Coste et al.'s WCO)."""
    return rewards.min(axis=0)


def ensemble_uncertainty_penalised(rewards: np.ndarray, *, lam: float = 1.0) -> np.ndarray:
    """Mean minus lam times the members' population std: mean_m r_m - lam * std_m r_m (Coste et al.'s UWO)."""
    return rewards.mean(axis=0) - lam * rewards.std(axis=0)


ENSEMBLE_AGGREGATIONS = {"mean": ensemble_mean, "min": ensemble_min, "mean_minus_std": ensemble_uncertainty_penalised}


class EnsembleReward:
    """Several rewards as one: each member scores every response (checked as any reward is), the aggregation
    combines them, and `disagreement` keeps the members' std per response of the last call, for logging."""

    def __init__(self, members: list[RewardFn], names: list[str], *, aggregation: str = "mean", lam: float = 1.0):
        if len(members) < 2:
            raise ConfigError(f"a reward ensemble needs at least 2 members, got {len(members)}: {names}")
        if aggregation not in ENSEMBLE_AGGREGATIONS:
            raise ConfigError(f"ensemble aggregation {aggregation!r}; known: {', '.join(ENSEMBLE_AGGREGATIONS)}")
        if lam < 0:
            raise ConfigError(f"ensemble lam={lam}: a negative penalty rewards disagreement; expected >= 0")
        self.members, self.names, self.aggregation, self.lam = members, names, aggregation, lam
        self.disagreement = np.zeros(0)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        rewards = np.array([checked_rewards(m, prompts, responses, source=f"ensemble member {name}")
                            for m, name in zip(self.members, self.names)], dtype=np.float64)
        self.disagreement = rewards.std(axis=0)
        return ENSEMBLE_AGGREGATIONS[self.aggregation](rewards, lam=self.lam).tolist()


def load_ensemble(specs: list[str], device="cpu", *, aggregation: str = "mean", lam: float = 1.0,
                  **load) -> EnsembleReward:
    """An EnsembleReward of reward specs (directories, hub ids, URLs, module:function), each loaded by load_reward
    with the keyword arguments `load`."""
    return EnsembleReward([load_reward(s, device, **load) for s in specs],
                          list(specs), aggregation=aggregation, lam=lam)


def checked_rewards(reward: RewardFn, prompts: list[str], responses: list[str], *,
                    source: str = "the reward") -> list[float]:
    """reward(prompts, responses), checked: one finite number per response. Anything else, or an exception inside
    the reward, is one RewardError naming `source` (e.g. "ppo.reward=mod:fn, iteration 3") and what came back."""
    try:
        out = reward(prompts, responses)
    except RewardError:  # already one line that names its source (a reward server's URL)
        raise
    except Exception as e:  # the user's code: say where it failed, in one line
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise RewardError(f"{source} raised {type(e).__name__}: {e} (at {frame.filename}:{frame.lineno}) while "
                          f"scoring {len(responses)} responses") from None
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise RewardError(f"{source} returned {_show(out)}; expected a list of {len(responses)} numbers, one per "
                          f"response")
    if len(out) != len(responses):
        raise RewardError(f"{source} returned {len(out)} rewards for {len(responses)} responses")
    values = []
    for i, r in enumerate(out):
        if isinstance(r, (str, bytes)) or (isinstance(r, torch.Tensor) and r.numel() != 1):
            raise RewardError(f"{source} returned {_show(r)} for response {i}; expected a number")
        try:
            value = float(r)
        except (TypeError, ValueError):
            raise RewardError(f"{source} returned {_show(r)} for response {i}; expected a number") from None
        if not math.isfinite(value):
            raise RewardError(f"{source} returned a non-finite reward {value} for response {i}: "
                              f"{responses[i][:200]!r}")
        values.append(value)
    return values


def _show(value) -> str:
    """A returned value as an error message shows it: its repr (cut short) and type."""
    text = repr(value)
    return f"{text[:80]}{'...' if len(text) > 80 else ''} ({type(value).__name__})"
