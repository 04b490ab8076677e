"""Scoring text with a reward model: the library behind eval.py's `score` and `normalize` and the reward interface.

    RewardScorer(model_dir).score(texts)            rewards for transcripts or (prompt, response) pairs
    ImplicitRewardScorer(policy_dir, reference_dir)  a DPO policy read as a reward model, β log π/π_ref
    rank_responses(scorer, prompt, responses)       best-of-n: candidates sorted by reward
    write_normalization(model_dir, rewards, data)   reward mean/std stored in the model's config.json

A scored text is exactly what training saw: BOS + Template.render(prompt, response) + EOS, with the template the
model was trained with (read from its config.json). Over-long inputs are an error, or (truncate="left") lose
their oldest tokens with a warning and a count. Reward normalisation statistics live in config.json too.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rmcore.data.batching import collate_pairs, pad
from rmcore.data.datasets import PairDataset
from rmcore.data.template import Template
from rmcore.dpo import sequence_logps
from rmcore.errors import CheckpointError, DataError
from rmcore.interop.hf_checkpoint import load_pretrained, read_hf_config
from rmcore.interop.hub import resolve_model
from rmcore.model import REWARD_HEAD_NAMES, CausalLM, RewardModel
from rmcore.tokenizer import Tokenizer
from rmcore.training.distributed import Dist, gather_objects

# what a scorer reads of a length-disentangled reward model (ODIN): its quality head (what alignment optimises), its
# length head, or their sum (what its pairwise loss trained); a one-head model's reward for quality and sum alike
READ_HEADS = ("quality", "length", "sum")


class RewardScorer:
    """A reward model ready to score text: model, tokenizer, the training template, optional normalisation."""

    def __init__(self, model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 batch_size: int = 16, max_length: int | None = None, truncate: str = "error",
                 dist: Dist | None = None, head: str = "quality"):
        """dist: the process group under torchrun (each rank scores a share of the batches); default: one process
        on `device`. head: what a length-disentangled model's reward is (READ_HEADS: quality, length, or their sum);
        a one-head model's reward is its head, and it has no length head."""
        self.dir = resolve_model(model_dir)  # a local directory, or a hub id fetched into the HF cache
        self.dist = dist or Dist(device=torch.device(device))
        self.model = load_pretrained(RewardModel, self.dir, dtype=dtype, device=self.dist.device).eval()
        self.tokenizer = Tokenizer.from_pretrained(self.dir)
        self.config = read_hf_config(self.dir)
        info = self.config.get("rmcore", {})
        self.template, self.template_source = recorded_template(info, self.tokenizer)
        self.head_names = REWARD_HEAD_NAMES[self.model.cfg.reward_heads]
        if head not in READ_HEADS or (head == "length" and len(self.head_names) == 1):
            raise DataError(f"head={head!r}: {self.dir} has the head(s) {list(self.head_names)}; expected "
                            f"{' or '.join(READ_HEADS if len(self.head_names) > 1 else ('quality', 'sum'))}")
        self.head = head
        self.description = {"kind": "reward model", **({"head": head} if len(self.head_names) > 1 else {})}
        # default: the length limit the model was trained with, else its position limit
        self.max_length = max_length or info.get("max_length") or self.model.cfg.max_seq_len
        if self.max_length > self.model.cfg.max_seq_len:
            raise DataError(f"max_length={self.max_length} is above the model's position limit "
                            f"(max_position_embeddings={self.model.cfg.max_seq_len} in {self.dir}/config.json)")
        if truncate not in ("error", "left"):
            raise ValueError(f"truncate must be 'error' or 'left', got {truncate!r}")
        self.truncate, self.truncated = truncate, 0
        self.batch_size = batch_size

    # ---- text -> ids
    def text_of(self, item) -> str:
        """A transcript (str, HH or templated form) or a (prompt, response) pair -> the text the model sees."""
        if isinstance(item, str):
            return self.template.apply(item)
        prompt, response = item
        return self.template.render(prompt, response)

    def encode(self, items) -> list[list[int]]:
        seqs = self.tokenizer.encode_batch([self.text_of(x) for x in items], bos=True, eos=True,
                                           specials=self.template.special_tokens)
        out = []
        for i, ids in enumerate(seqs):
            if len(ids) > self.max_length:
                if self.truncate == "error":
                    raise DataError(f"input {i} has {len(ids)} tokens, more than max_length={self.max_length}; "
                                     f"pass truncate='left' (--truncate left) to drop its oldest tokens")
                keep = int(self.tokenizer.add_bos)  # keep BOS (where the model has one), drop the oldest turns' tokens
                ids = ids[:keep] + ids[len(ids) - self.max_length + keep:]
                self.truncated += 1
            out.append(ids)
        if self.truncated and self.truncate == "left":
            print(f"warning: {self.truncated} input(s) so far truncated from the left to {self.max_length} tokens",
                  file=sys.stderr)
        return out

    # ---- ids -> rewards
    def score_ids(self, seqs: list, progress: bool = False) -> np.ndarray:
        """Rewards (float64) of token sequences, in input order: the head this scorer reads."""
        return self.read_head(self.head_rewards(seqs, progress))

    def read_head(self, heads: np.ndarray) -> np.ndarray:
        """(N,) rewards from each head's (N, heads): the one asked for, or their sum."""
        if self.head == "sum" or len(self.head_names) == 1:
            return heads.sum(-1)
        return heads[:, self.head_names.index(self.head)]

    @torch.no_grad()
    def head_rewards(self, seqs: list, progress: bool = False) -> np.ndarray:
        """Each head's reward (float64, (N, heads)) of token sequences, in input order. Batches are length-sorted
        (less padding); under torchrun each rank scores every world_size-th batch and the results are gathered."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mine = batches[self.dist.rank::self.dist.world_size]
        bar = None
        if progress and self.dist.is_main:
            bar = tqdm(total=sum(len(seqs[i]) for b in mine for i in b), unit="tok", unit_scale=True, desc="scoring")
        found = {}
        for batch in mine:
            ids, mask = pad([seqs[i] for i in batch], self.tokenizer.pad_id)
            r = self.model(ids.to(self.dist.device), attention_mask=mask.to(self.dist.device),
                           right_padded=True, per_head=True).double().cpu().tolist()
            found.update(zip(batch, r))
            if bar is not None:
                bar.update(int(mask.sum()))
        if bar is not None:
            bar.close()
        if self.dist.enabled:
            found = dict(gather_objects(list(found.items())))
        rewards = np.array([found[i] for i in range(len(seqs))], dtype=np.float64).reshape(len(seqs), -1)
        bad = np.flatnonzero(~np.isfinite(rewards).all(-1))
        if len(bad):
            raise CheckpointError(f"{self.dir}: non-finite reward for input(s) {bad[:10].tolist()} "
                                  f"({rewards[bad[0]].tolist()}); the model's weights or activations overflow")
        return rewards

    def pair_rewards(self, pairs: PairDataset, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(r_chosen, r_rejected) of every pair."""
        rewards = self.score_ids(pairs.chosen + pairs.rejected, progress)
        return rewards[:len(pairs)], rewards[len(pairs):]

    def score(self, items, normalize: bool = False, progress: bool = False) -> list[float]:
        """Rewards of transcripts or (prompt, response) pairs, in input order."""
        rewards = self.score_ids(self.encode(list(items)), progress)
        if normalize:
            stats = self.normalization()
            rewards = (rewards - stats["mean"]) / stats["std"]
        return rewards.tolist()

    def normalization(self) -> dict:
        stats = self.config.get("rmcore", {}).get("reward_normalization")
        if stats is None:
            raise CheckpointError(f"{self.dir}/config.json holds no reward normalisation statistics; "
                             f"compute them first: python eval.py normalize --model {self.dir} --data FILE")
        return stats


def recorded_template(info: dict, tokenizer) -> tuple[Template, str]:
    """(the template a model was trained with, where it came from): config.json's record, else the recipe's."""
    if "template" in info:
        return Template.from_dict(info["template"]).check(tokenizer), "config.json"
    # a model rmcore did not train: the recipe's template, said out loud in every report
    return Template(), "default (not recorded in config.json)"


class ImplicitRewardScorer:
    """A policy trained by DPO read as the reward model it implies (Rafailov et al. 2023):
    r(x, y) = β (log π(y|x) - log π_ref(y|x)), the log-probs summed over the response's tokens. Pairs must be
    tokenized with response_starts. β: the argument, else the policy's recorded dpo.beta, else 0.1 (TRL's)."""

    def __init__(self, model_dir: str | Path, reference_dir: str | Path, *, beta: float | None = None,
                 batch_size: int = 16, dist: Dist | None = None):
        self.dir, self.reference_dir = resolve_model(model_dir), resolve_model(reference_dir)
        self.dist = dist or Dist(device=torch.device("cpu"))
        self.tokenizer = Tokenizer.from_pretrained(self.dir)
        if not self.tokenizer.same_ids(Tokenizer.from_pretrained(self.reference_dir)):
            raise CheckpointError(f"--reference {reference_dir}: its tokenizer is not the policy's ({model_dir}); "
                                  f"log-prob ratios need the same tokens")
        self.config = read_hf_config(self.dir)
        info = self.config.get("rmcore", {})
        self.template, self.template_source = recorded_template(info, self.tokenizer)
        self.policy, self.reference = (load_pretrained(CausalLM, d, device=self.dist.device).eval()
                                       for d in (self.dir, self.reference_dir))
        self.max_length = info.get("max_length") or self.policy.cfg.max_seq_len
        recorded = info.get("dpo", {}).get("beta")
        self.beta = beta if beta is not None else recorded if recorded is not None else 0.1
        self.batch_size = batch_size
        self.description = {"kind": "implicit", "beta": self.beta, "reference": str(reference_dir)}

    @torch.no_grad()
    def pair_rewards(self, pairs: PairDataset, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(r_chosen, r_rejected) of every pair; under torchrun each rank scores every world_size-th batch."""
        if pairs.response_starts is None:
            raise ValueError("implicit rewards need pairs tokenized with response_starts=True")
        lengths = pairs.lengths()
        order = sorted(range(len(pairs)), key=lambda i: int(lengths[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mine = batches[self.dist.rank::self.dist.world_size]
        found = {}
        for batch in tqdm(mine, desc="implicit rewards", unit="batch", disable=not (progress and self.dist.is_main)):
            collated = collate_pairs(pairs, batch, self.tokenizer.pad_id, packed=True)
            logps = [sequence_logps(m, collated, self.dist, bf16=False)[0].double() for m in (self.policy,
                                                                                          self.reference)]
            r_c, r_r = (self.beta * (logps[0] - logps[1])).cpu().chunk(2)
            found.update(zip(batch, zip(r_c.tolist(), r_r.tolist())))
        if self.dist.enabled:
            found = dict(gather_objects(list(found.items())))
        rewards = np.array([found[i] for i in range(len(pairs))], dtype=np.float64).reshape(-1, 2)
        return rewards[:, 0], rewards[:, 1]


def rank_responses(scorer: RewardScorer, prompt: str, responses: list[str]) -> list[tuple[str, float]]:
    """Best-of-n: (response, reward) for every candidate, highest reward first (stable for equal rewards)."""
    rewards = scorer.score([(prompt, r) for r in responses])
    order = sorted(range(len(responses)), key=lambda i: -rewards[i])
    return [(responses[i], rewards[i]) for i in order]


def write_normalization(model_dir: str | Path, rewards: np.ndarray, data: list[str]) -> dict:
    """Store mean/std of reference rewards in config.json under rmcore.reward_normalization."""
    path = Path(model_dir) / "config.json"
    config = read_hf_config(Path(model_dir))
    stats = {"mean": float(np.mean(rewards)), "std": float(np.std(rewards)), "count": int(len(rewards)),
             "data": list(data)}
    if not stats["std"] > 0:
        raise ValueError(f"reward std over {len(rewards)} reference texts is {stats['std']}: cannot normalise")
    config.setdefault("rmcore", {})["reward_normalization"] = stats
    path.write_text(json.dumps(config, indent=2) + "\n")
    return stats
