"""The math of policy-gradient RLHF (PPO, RLOO, GRPO), one pure function per formula.

Shapes: per-token tensors are (B, T) over response positions, with `mask` (B, T) 1 on real response tokens;
per-sample tensors are (B,). Samples of one prompt are consecutive rows in groups of K (RLOO, GRPO).

ADVANTAGE_ESTIMATORS at the end is what `ppo.advantage` names: adding an estimator is one function, one entry
there and its test; ppo.py and the config's allowed values read the registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over real tokens only; with shift_mean=False the mean is added back."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask.bool(), out if shift_mean else out + mean, 0)


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


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean) / (std + eps) within each prompt's K rewards (Shao et al. 2024; sample std)."""
    r = scores.view(-1, k)
    centered = (r[:, :, None] - r[:, None, :]).mean(-1)  # r_i - mean, exactly 0 when the K rewards are equal
    return (centered / (r.std(-1, keepdim=True) + eps)).reshape(-1)


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over real tokens of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(logp - logp_old); the
    fraction of real tokens where the clipped term is the larger)."""
    rho = torch.exp(torch.where(mask.bool(), logp - logp_old, 0))  # padding: rho = 1, whatever its logits
    unclipped, clipped = -advantages * rho, -advantages * rho.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(0.5 * mean over real tokens of max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2); the fraction of real
    tokens where the clipped term is the larger)."""
    values = torch.where(mask.bool(), values, values_old)
    clipped = values_old + (values - values_old).clamp(-clip, clip)
    unclipped_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2
    return (0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask),
            masked_mean((clipped_sq > unclipped_sq).float(), mask))


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over real tokens of -sum_v p_v log p_v."""
    logp = logits.float().log_softmax(-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


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
                 lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the critic's values (gae above); returns = A + V are the critic's targets."""
    return gae(rewards, values, mask, gamma, lam)


def _per_sample(group_advantages, rewards: torch.Tensor, mask: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # one advantage per sample from its whole reward (score - beta * sum kl), on each of its tokens; no critic
    return group_advantages(rewards.sum(-1), k)[:, None] * mask, torch.zeros_like(mask)


def rloo_estimate(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, k: int, gamma: float,
                  lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO's advantage of each sample's summed reward (rloo_advantages), on each of its tokens."""
    return _per_sample(rloo_advantages, rewards, mask, k)


def grpo_estimate(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, k: int, gamma: float,
                  lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's advantage of each sample's summed reward (grpo_advantages), on each of its tokens."""
    return _per_sample(grpo_advantages, rewards, mask, k)


@dataclass(frozen=True)
class AdvantageEstimator:
    estimate: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (rewards, values, mask, *, k, gamma, lam)
    needs_critic: bool  # reads a critic's values, which ppo.py then builds and trains
    per_group: bool     # compares the K samples of each prompt, so ppo.k must be >= 2


ADVANTAGE_ESTIMATORS = {
    "gae": AdvantageEstimator(gae_estimate, needs_critic=True, per_group=False),
    "rloo": AdvantageEstimator(rloo_estimate, needs_critic=False, per_group=True),
    "grpo": AdvantageEstimator(grpo_estimate, needs_critic=False, per_group=True),
}
