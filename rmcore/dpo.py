"""Direct preference optimisation: what train.py's `dpo` stage and eval.py's implicit reward share.

    pairs (response_mask) ──policy──> sequence log-probs (B,) per side ──┐
    pairs ──reference (a frozen copy | the policy, adapters off | precomputed once)──> log-probs ──┴─> PairLogps
        ──DPO_LOSSES[dpo.loss]──> loss per pair;  implicit_rewards ──> rewards/* metrics

A sequence's log-prob is the sum over its response tokens (EOS included, the prompt's excluded) of
log softmax(logits)[token], read from one forward pass over the pair's 2B sequences packed in one row.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rmcore.data.batching import collate_pairs
from rmcore.data.datasets import PairDataset
from rmcore.data.sampler import ShardedSampler
from rmcore.errors import ConfigError
from rmcore.generate import token_logprobs
from rmcore.losses import upcast
from rmcore.training.distributed import Dist, all_reduce_tensor
from rmcore.training.runtime import autocast

# ----------------------------------------------------------------------------------------------------------------
# The losses: the policy itself trained on pairs, against a frozen reference
#
# The inputs are sequence log-probs, each summed over one response's tokens (sequence_logps below), of
# the policy and of the reference, and the responses' token counts; every loss returns one term per pair and is
# reduced as above (the loop sums, then divides by the step's global pair count). TRL 1.16's DPOTrainer
# (sigmoid, robust, ipo, hinge) and CPOTrainer (simpo; sigmoid with label smoothing) compute the same terms:
# tests/formulas/test_dpo_losses.py runs their code on the same log-probs.


@dataclass
class PairLogps:
    """Per pair (B,): log-probs summed over each response's tokens, and its token count."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor     # the reference's (zeros for a reference-free loss)
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def logratio_margin(self) -> torch.Tensor:
        """Δ = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))."""
        return (upcast(self.chosen) - upcast(self.ref_chosen)) - (upcast(self.rejected) - upcast(self.ref_rejected))

    def mean_logratio_margin(self) -> torch.Tensor:
        """Δ per token: (log π(y_c) - log π_ref(y_c)) / |y_c| - (log π(y_r) - log π_ref(y_r)) / |y_r|."""
        per_token_c = (upcast(self.chosen) - upcast(self.ref_chosen)) / self.chosen_tokens.clamp(min=1)
        per_token_r = (upcast(self.rejected) - upcast(self.ref_rejected)) / self.rejected_tokens.clamp(min=1)
        return per_token_c - per_token_r


def _smoothed_logsigmoid_loss(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - ε) logσ(x) - ε logσ(-x): the label of the pair is flipped with probability ε."""
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def dpo_sigmoid_loss(lp: PairLogps, *, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -(1-ε) logσ(βΔ) - ε logσ(-βΔ); ε > 0 is conservative DPO (Mitchell 2023)."""
    return _smoothed_logsigmoid_loss(beta * lp.logratio_margin(), label_smoothing)


def dpo_robust_loss(lp: PairLogps, *, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label noise ε: (-(1-ε) logσ(βΔ) + ε logσ(-βΔ)) / (1-2ε)."""
    x = beta * lp.logratio_margin()
    return (-(1 - label_smoothing) * F.logsigmoid(x) + label_smoothing * F.logsigmoid(-x)) / (1 - 2 * label_smoothing)


def dpo_ipo_loss(lp: PairLogps, *, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17), log-ratios per response token as TRL and the authors: (Δ_tok - 1/(2β))^2."""
    # The paper's Δ is a sum over tokens, which makes the squared loss grow with length; TRL normalises by the
    # response length "confirmed with the IPO authors", and so does this.
    return (lp.mean_logratio_margin() - 1 / (2 * beta)).square()


def dpo_hinge_loss(lp: PairLogps, *, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """SLiC's calibration hinge (Zhao et al. 2023) on the log-ratios: max(0, 1 - βΔ)."""
    return torch.relu(1 - beta * lp.logratio_margin())


def simpo_loss(lp: PairLogps, *, beta: float, label_smoothing: float = 0.0, gamma: float = 0.5) -> torch.Tensor:
    """SimPO (Meng et al. 2024), no reference, per-token log-probs ā: -(1-ε) logσ(β(ā_c - ā_r) - γ) - ε logσ(-...)."""
    mean_c = upcast(lp.chosen) / lp.chosen_tokens.clamp(min=1)
    mean_r = upcast(lp.rejected) / lp.rejected_tokens.clamp(min=1)
    return _smoothed_logsigmoid_loss(beta * (mean_c - mean_r) - gamma, label_smoothing)


@dataclass(frozen=True)
class PreferenceObjective:
    loss: Callable[..., torch.Tensor]   # (PairLogps, *, beta, label_smoothing, gamma) -> per-pair loss
    uses_reference: bool                # False: the reference is never computed (its log-probs are zeros)


# dpo.loss names one of these (DpoConfig below); adding a loss is a function above and an entry here.
DPO_LOSSES = {
    "sigmoid": PreferenceObjective(dpo_sigmoid_loss, uses_reference=True),
    "robust": PreferenceObjective(dpo_robust_loss, uses_reference=True),
    "ipo": PreferenceObjective(dpo_ipo_loss, uses_reference=True),
    "hinge": PreferenceObjective(dpo_hinge_loss, uses_reference=True),
    "simpo": PreferenceObjective(simpo_loss, uses_reference=False),
}


def implicit_rewards(lp: PairLogps, *, beta: float, uses_reference: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_c, r_r), r = β (log π(y) - log π_ref(y)) (Rafailov et al.); reference-free (SimPO): r = β log π(y) / |y|."""
    # What TRL logs as rewards/chosen and rewards/rejected, for DPOTrainer and CPOTrainer respectively.
    if uses_reference:
        return (beta * (upcast(lp.chosen) - upcast(lp.ref_chosen)),
                beta * (upcast(lp.rejected) - upcast(lp.ref_rejected)))
    return (beta * upcast(lp.chosen) / lp.chosen_tokens.clamp(min=1),
            beta * upcast(lp.rejected) / lp.rejected_tokens.clamp(min=1))


# ----------------------------------------------------------------------------------------------------------------
# The stage's settings, log-probs and reference

@dataclasses.dataclass
class DpoConfig:
    """The `dpo` section of train.py's `dpo` stage. Each default says whose it is."""
    loss: Literal[tuple(DPO_LOSSES)] = "sigmoid"  # a name of rmcore.losses.DPO_LOSSES; TRL's default: sigmoid
    beta: float = 0.1                   # the KL strength β (DPO, IPO's τ, SimPO's β); TRL's DPO and CPO: 0.1
    label_smoothing: float = 0.0        # ε, the assumed share of flipped labels (sigmoid: cDPO; robust; simpo); TRL's
    simpo_gamma: float = 0.5            # SimPO's target margin γ; TRL's CPOTrainer default
    precompute_reference: bool = False  # reference log-probs computed once before training and stored with the run
                                        # (no second model in memory while training); TRL's default: off

    def check(self, source: str) -> None:
        if not self.beta > 0:
            raise ConfigError(f"{source}: dpo.beta={self.beta}; expected > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{source}: dpo.label_smoothing={self.label_smoothing}; expected 0 <= ε < 0.5 (at 0.5 "
                              f"a label says nothing)")
        if self.label_smoothing and self.loss in ("ipo", "hinge"):
            raise ConfigError(f"{source}: dpo.label_smoothing applies to sigmoid, robust and simpo, not {self.loss}")
        if self.simpo_gamma != DpoConfig.simpo_gamma and self.loss != "simpo":
            raise ConfigError(f"{source}: dpo.simpo_gamma applies to dpo.loss=simpo")

    @property
    def uses_reference(self) -> bool:
        return DPO_LOSSES[self.loss].uses_reference

    def loss_terms(self, lp: PairLogps) -> torch.Tensor:
        """The configured loss, one term per pair."""
        return DPO_LOSSES[self.loss].loss(lp, beta=self.beta, label_smoothing=self.label_smoothing,
                                          gamma=self.simpo_gamma)


def sequence_logps(model, batch: dict, dist: Dist, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs summed over each sequence's response tokens, response token counts), each (2B,): chosen[0..B)
    then rejected[0..B), from one forward pass (a packed row, or right-padded rows)."""
    input_ids = batch["input_ids"].to(dist.device)
    response = batch["response_mask"].to(dist.device)
    packed = "seq_lens" in batch
    with autocast(dist, bf16):
        if packed:
            logits = model(input_ids, position_ids=batch["position_ids"].to(dist.device), seq_lens=batch["seq_lens"])
        else:  # right padding needs no mask under the causal mask: no real token sees the padding after it
            logits = model(input_ids)
    # logits[:, t] predicts token t + 1; a sequence's first token is never a response token (response_start >= 1),
    # so in a packed row no sequence's log-prob reads the sequence before it
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:]) * response[:, 1:]
    if packed:
        owner = torch.repeat_interleave(torch.arange(len(batch["seq_lens"]), device=dist.device),
                                        torch.tensor(batch["seq_lens"], device=dist.device))[1:]
        n = len(batch["seq_lens"])
        sums = torch.zeros(n, device=dist.device).index_add(0, owner, logp[0])
        counts = torch.zeros(n, device=dist.device).index_add(0, owner, response[0, 1:].float())
        return sums, counts
    return logp.sum(-1), response[:, 1:].sum(-1).float()


def pair_logps(policy_logps: tuple[torch.Tensor, torch.Tensor],
               reference_logps: torch.Tensor | None) -> PairLogps:
    """PairLogps from sequence_logps' output (2B,) and the reference's (2B,) (None: reference-free, zeros)."""
    logps, counts = policy_logps
    reference = torch.zeros_like(logps) if reference_logps is None else reference_logps.to(logps.device)
    (c, r), (ref_c, ref_r), (n_c, n_r) = logps.chunk(2), reference.chunk(2), counts.chunk(2)
    return PairLogps(c, r, ref_c, ref_r, n_c, n_r)


@torch.no_grad()
def reference_table(model, pairs: PairDataset, *, dist: Dist, bf16: bool, micro_batch_size: int,
                    pad_id: int, packed: bool, progress: bool = False) -> torch.Tensor:
    """(n, 2) fp32 reference log-probs (chosen, rejected) of every pair, each rank computing its share in the same
    number of forward passes (as FSDP2 needs), summed over ranks."""
    was_training = model.training
    model.eval()
    table = torch.zeros(len(pairs), 2, dtype=torch.float32, device=dist.device)
    batches = ShardedSampler(len(pairs), micro_batch_size, rank=dist.rank, world_size=dist.world_size, shuffle=False)
    for idx in tqdm(batches, desc="reference log-probs", unit="batch", disable=not (progress and dist.is_main)):
        logps, _ = sequence_logps(model, collate_pairs(pairs, idx, pad_id, packed=packed), dist, bf16)
        if idx:
            table[idx] = torch.stack(logps.float().chunk(2), dim=1)
    model.train(was_training)
    return all_reduce_tensor(table).cpu()


def load_or_compute_reference(path: Path, model, pairs: PairDataset, *, dist: Dist, **settings) -> torch.Tensor:
    """The reference log-probs stored with the run at `path` (a resumed run reads what the first computed), or
    computed now and written there atomically."""
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["ids"] == pairs.ids:
            return saved["logps"]
    table = reference_table(model, pairs, dist=dist, **settings)
    if dist.is_main:
        tmp = path.with_name(path.name + ".partial")
        torch.save({"ids": pairs.ids, "logps": table}, tmp)
        os.replace(tmp, path)
    return table


def table_rows(table: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """(2B,) the stored reference log-probs of these pairs, in collate_pairs' order (chosen then rejected)."""
    rows = table[np.asarray(indices, dtype=np.int64)] if indices else torch.zeros(0, 2)
    return torch.cat([rows[:, 0], rows[:, 1]])
