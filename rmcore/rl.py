"""The math of policy-gradient RLHF (PPO, RLOO, GRPO), one pure function per formula.

Shapes: per-token tensors are (B, T) over response positions, with `mask` (B, T) 1 on real response tokens;
per-sample tensors are (B,). Samples of one prompt are consecutive rows in groups of K (RLOO, GRPO).

The registries at the end are what the config names: ADVANTAGE_ESTIMATORS (`ppo.advantage`), ADVANTAGE_WHITENING
(`ppo.whiten_advantages`) and LOSS_AGGREGATIONS (`ppo.loss_aggregation`). Adding a variant is one function, one
entry and its test; ppo.py and the config's allowed values read the registries.

Statistics over the whole batch (whitening) take `reduce_sum`, a function summing a tensor over the ranks (the
identity on one process), so N ranks compute what one rank computes on the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch


def kl_k1(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k1 = logp - logp_ref per token (unbiased for KL(pi || ref) under samples from pi; may be negative)."""
    return logp - logp_ref


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 = (exp(l) - 1) - l with l = logp_ref - logp (Schulman's estimator: never negative)."""
    log_ratio = logp_ref - logp
    return torch.expm1(log_ratio) - log_ratio


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum of x over real tokens / their number (what padding holds, even inf or NaN, never enters)."""
    return torch.where(mask.bool(), x, 0).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over real tokens only (of every rank, summed by reduce_sum); with shift_mean=False
    the mean is added back."""
    total = reduce_sum or (lambda t: t)
    real = mask.bool()
    count = total(mask.sum()).clamp(min=1)
    mean = total(torch.where(real, x, 0).sum()) / count
    var = total(torch.where(real, (x - mean) ** 2, 0).sum()) / count
    out = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(real, out if shift_mean else out + mean, 0)


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float | None = None,
                 clip: float | None = None) -> torch.Tensor:
    """score - missing_eos_penalty where the response did not end (cut at the length limit), then clipped to
    [-clip, clip]; None leaves either step out."""
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ended.bool()).to(scores.dtype)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -beta * kl_t on every response token, plus the score at the last real token (the EOS) only."""
    rewards = -beta * kl * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()  # the last real position of each row
    return rewards + score[:, None] * last


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1} over response tokens; returns
    (advantages, returns = A + V), both 0 on padding."""
    T = rewards.shape[-1]
    values, rewards = values * mask, rewards * mask
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = next_adv
    return adv, (adv + values) * mask


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = r_i - mean of the other K-1 rewards of the same prompt (Ahmadian et al. 2024)."""
    r = scores.view(-1, k)
    # written as a mean of differences r_i - r_j: exactly 0 when the K rewards are equal
    return ((r[:, :, None] - r[:, None, :]).sum(-1) / (k - 1)).reshape(-1)


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean) / (std + eps) within each prompt's K rewards (Shao et al. 2024; sample std); with
    scale=False A_i = r_i - mean (Dr. GRPO, Liu et al. 2025: no division by the group's std)."""
    r = scores.view(-1, k)
    centered = (r[:, :, None] - r[:, None, :]).mean(-1)  # r_i - mean, exactly 0 when the K rewards are equal
    return (centered / (r.std(-1, keepdim=True) + eps) if scale else centered).reshape(-1)


def policy_loss_terms(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) per token, rho = exp(logp - logp_old); 1 where the clipped term
    is the larger), both 0 on padding."""
    real = mask.bool()
    rho = torch.exp(torch.where(real, logp - logp_old, 0))  # padding: rho = 1, whatever its logits
    unclipped, clipped = -advantages * rho, -advantages * rho.clamp(1 - clip, 1 + clip)
    return torch.where(real, torch.maximum(unclipped, clipped), 0), ((clipped > unclipped) & real).float()


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over real tokens of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(logp - logp_old); the
    fraction of real tokens where the clipped term is the larger)."""
    terms, clipped = policy_loss_terms(logp, logp_old, advantages, mask, clip)
    return masked_mean(terms, mask), masked_mean(clipped, mask)


def sequence_policy_loss_terms(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                               mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)) per response, rho_i = exp(sum_t logp - sum_t logp_old),
    as TRL's RLOO; 1 where the clipped term is the larger), both (B,); advantages (B,) per response."""
    log_ratio = torch.where(mask.bool(), logp - logp_old, 0).sum(-1)
    rho = torch.exp(log_ratio)
    unclipped, clipped = -advantages * rho, -advantages * rho.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def value_loss_terms(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                     clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) per token; 1 where the clipped term is the
    larger), both 0 on padding."""
    real = mask.bool()
    values = torch.where(real, values, values_old)
    clipped = values_old + (values - values_old).clamp(-clip, clip)
    unclipped_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2
    return (torch.where(real, 0.5 * torch.maximum(unclipped_sq, clipped_sq), 0),
            ((clipped_sq > unclipped_sq) & real).float())


def value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(0.5 * mean over real tokens of max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2); the fraction of real
    tokens where the clipped term is the larger)."""
    terms, clipped = value_loss_terms(values, values_old, returns, mask, clip)
    return masked_mean(terms, mask), masked_mean(clipped, mask)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log p_v per position."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over real tokens of -sum_v p_v log p_v."""
    return masked_mean(token_entropy(logits), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over real tokens (1: the critic predicts the returns; <= 0: no better than their
    mean)."""
    def var(x):
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return 1 - var(returns - values) / var(returns).clamp(min=1e-12)


def adaptive_beta(beta: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Ziegler et al.: e = clip(KL / target - 1, -0.2, 0.2); beta * (1 + e * n / horizon)."""
    e = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + e * n_steps / horizon)


# ----------------------------------------------------------------------------------------------------------------
# Advantage estimators: per-token rewards (B, T) -> (advantages, returns), both (B, T) and 0 on padding


def gae_estimate(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, k: int, gamma: float,
                 lam: float, scale_rewards: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the critic's values (gae above); returns = A + V are the critic's targets."""
    return gae(rewards, values, mask, gamma, lam)


def rloo_estimate(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, k: int, gamma: float,
                  lam: float, scale_rewards: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO's advantage of each sample's summed reward (rloo_advantages), on each of its tokens; no critic."""
    return rloo_advantages(rewards.sum(-1), k)[:, None] * mask, torch.zeros_like(mask)


def grpo_estimate(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, k: int, gamma: float,
                  lam: float, scale_rewards: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's advantage of each sample's summed reward (grpo_advantages, scaled by the group's std or not), on each
    of its tokens; no critic."""
    return grpo_advantages(rewards.sum(-1), k, scale=scale_rewards)[:, None] * mask, torch.zeros_like(mask)


@dataclass(frozen=True)
class AdvantageEstimator:
    estimate: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (rewards, values, mask, *, k, gamma, lam, ...)
    needs_critic: bool  # reads a critic's values, which ppo.py then builds and trains
    per_group: bool     # compares the K samples of each prompt, so ppo.k must be >= 2
    kl_in: Literal["reward", "loss"]  # where its paper puts the KL penalty (ppo.kl_in=default)
    whiten: Literal["tokens", "samples", "none"]  # how its paper normalises advantages (ppo.whiten_advantages=default)


ADVANTAGE_ESTIMATORS = {
    # Ziegler et al. 2019 / Ouyang et al. 2022, as TRL's PPOTrainer: KL in the reward, advantages whitened over tokens
    "gae": AdvantageEstimator(gae_estimate, needs_critic=True, per_group=False, kl_in="reward", whiten="tokens"),
    # Ahmadian et al. 2024, as TRL's RLOOTrainer: KL in the reward, advantages as they come (normalize_advantages=False)
    "rloo": AdvantageEstimator(rloo_estimate, needs_critic=False, per_group=True, kl_in="reward", whiten="none"),
    # Shao et al. 2024: advantages from the scores alone, a per-token k3 KL in the loss, no further normalisation
    "grpo": AdvantageEstimator(grpo_estimate, needs_critic=False, per_group=True, kl_in="loss", whiten="none"),
}


# ----------------------------------------------------------------------------------------------------------------
# Advantage whitening (ppo.whiten_advantages): advantages (B, T) -> advantages (B, T), statistics over every rank


def whiten_over_tokens(advantages: torch.Tensor, mask: torch.Tensor, *, reduce_sum=None) -> torch.Tensor:
    """(A_it - mean) / std over every real token (TRL's PPO): a response weighs as much as it has tokens."""
    return masked_whiten(advantages, mask, reduce_sum=reduce_sum)


def whiten_over_samples(advantages: torch.Tensor, mask: torch.Tensor, *, reduce_sum=None) -> torch.Tensor:
    """(a_i - mean) / std over responses, a_i = a response's advantage (the mean over its tokens; group estimators
    give every token the same): every response weighs the same, whatever its length."""
    lengths = mask.sum(-1)
    per_sample = torch.where(mask.bool(), advantages, 0).sum(-1) / lengths.clamp(min=1)
    has_tokens = (lengths > 0).to(advantages.dtype)
    return masked_whiten(per_sample[:, None], has_tokens[:, None], reduce_sum=reduce_sum) * mask


def no_whitening(advantages: torch.Tensor, mask: torch.Tensor, *, reduce_sum=None) -> torch.Tensor:
    """A as estimated (RLOO and GRPO as published)."""
    return advantages


ADVANTAGE_WHITENING = {"tokens": whiten_over_tokens, "samples": whiten_over_samples, "none": no_whitening}


def advantages_and_returns(scores: torch.Tensor, kl: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
                           estimator: str, beta: float, kl_in: str, whiten_rewards: bool, whiten: str, k: int,
                           gamma: float, lam: float, scale_rewards: bool,
                           reduce_sum=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3 and 4 of a PPO iteration: per-token rewards (the score at the last real token, and -beta * kl_t on
    every token when kl_in == "reward"; with kl_in == "loss" the KL is the loss's, not the reward's), whitened with
    the mean kept when whiten_rewards, then the estimator's (advantages, returns), the advantages whitened as
    `whiten` names (ADVANTAGE_WHITENING). reduce_sum sums over ranks: the result is the same on N ranks as on one."""
    rewards = token_rewards(scores, kl, mask, beta if kl_in == "reward" else 0.0)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, reduce_sum=reduce_sum)
    advantages, returns = ADVANTAGE_ESTIMATORS[estimator].estimate(rewards, values, mask, k=k, gamma=gamma, lam=lam,
                                                                   scale_rewards=scale_rewards)
    return ADVANTAGE_WHITENING[whiten](advantages, mask, reduce_sum=reduce_sum), returns


# ----------------------------------------------------------------------------------------------------------------
# Loss aggregations: how per-token losses l_it of a minibatch become one number, sum_it w_it l_it. The counts are the
# minibatch's over every micro-batch and rank, so micro-batching and the number of ranks never change the loss.


def token_mean_weights(mask: torch.Tensor, *, tokens: float, sequences: float, max_len: int) -> torch.Tensor:
    """w_it = 1 / (real tokens of the minibatch): every token weighs the same (DAPO; TRL's default, loss_type=dapo)."""
    return mask / tokens


def sequence_mean_weights(mask: torch.Tensor, *, tokens: float, sequences: float, max_len: int) -> torch.Tensor:
    """w_it = 1 / (|o_i| * responses of the minibatch): the mean over each response's tokens, then over responses
    (the GRPO paper's)."""
    return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * sequences)


def constant_weights(mask: torch.Tensor, *, tokens: float, sequences: float, max_len: int) -> torch.Tensor:
    """w_it = 1 / (max_new_tokens * responses of the minibatch): a sum over tokens by a fixed constant (Dr. GRPO)."""
    return mask / (max_len * sequences)


LOSS_AGGREGATIONS = {
    "token_mean": token_mean_weights,
    "sequence_mean": sequence_mean_weights,
    "constant": constant_weights,
}


def policy_objective(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     weights: torch.Tensor, *, clip: float, sequence_ratio: bool = False,
                     logp_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum_it w_it max(-A rho, -A clip(rho)), sum_it w_it k3(logp, logp_ref) or 0, the clipped indicator per
    token): the clipped surrogate per token (rho per token), or per response (sequence_ratio: rho_i over the whole
    response, its term weighing sum_t w_it), and the KL term GRPO adds to the loss (logp_ref given; the caller
    multiplies it by beta)."""
    if sequence_ratio:
        per_response = torch.where(mask.bool(), advantages, 0).sum(-1) / mask.sum(-1).clamp(min=1)
        terms, clipped = sequence_policy_loss_terms(logp, logp_old, per_response, mask, clip)
        surrogate, clipped = (weights.sum(-1) * terms).sum(), clipped[:, None] * mask
    else:
        terms, clipped = policy_loss_terms(logp, logp_old, advantages, mask, clip)
        surrogate = (weights * terms).sum()
    kl = torch.zeros((), device=logp.device)
    if logp_ref is not None:
        kl = (weights * torch.where(mask.bool(), kl_k3(logp, logp_ref), 0)).sum()
    return surrogate, kl, clipped
