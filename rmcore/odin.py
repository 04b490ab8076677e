"""A length-disentangled reward model (ODIN, Chen et al. 2024, arXiv 2402.07319): the loss terms.

The model has two value heads on one trunk (RewardModel with reward_heads=2): a quality head r_Q and a length head
r_L. Training (train.py's rm stage with loss.length_head) minimises

    pairwise_loss(r_Q + r_L on chosen, r_Q + r_L on rejected)
      + length_coef * length_correlation_loss(r_L, lengths)          # the length head takes the length signal
      + quality_coef * quality_decorrelation_loss(r_Q, lengths)      # the quality head keeps none of it
      + orthogonality_coef * head_orthogonality_loss(w_Q, w_L)       # and the two read different directions

over each micro-batch's 2B responses (chosen and rejected together), `lengths` their response tokens. The
alignment loops and eval.py then read r_Q alone (raft/ppo.reward_head, eval.py --head). As losses.py's functions:
pure functions of tensors, math in fp32 (fp64 stays fp64).
"""
from __future__ import annotations

import torch

from rmcore.losses import upcast

# a batch whose rewards or lengths are all equal has no correlation to speak of: the denominator's floor keeps the
# term (and its gradient) at 0 there instead of 0/0
_EPS = 1e-12


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over a batch: sum(xc * yc) / sqrt(sum(xc^2) * sum(yc^2)), xc = x - mean(x)."""
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"pearson needs two 1-D tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = upcast(x), upcast(y).to(upcast(x).dtype)
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / torch.sqrt(xc.square().sum() * yc.square().sum() + _EPS)


def length_correlation_loss(r_length: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """ODIN's length term: -pearson(r_L, response length)."""
    return -pearson(r_length, lengths)


def quality_decorrelation_loss(r_quality: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """ODIN's quality term: |pearson(r_Q, response length)|."""
    return pearson(r_quality, lengths).abs()


def head_orthogonality_loss(w_quality: torch.Tensor, w_length: torch.Tensor) -> torch.Tensor:
    """ODIN's orthogonality term: |w_Q . w_L|, the heads' weight vectors (dim,)."""
    if w_quality.shape != w_length.shape or w_quality.dim() != 1:
        raise ValueError(f"head weights must be two vectors of one length, got {tuple(w_quality.shape)} and "
                         f"{tuple(w_length.shape)}")
    return (upcast(w_quality) * upcast(w_length)).sum().abs()
