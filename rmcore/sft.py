"""One SFT optimizer step, shared by train.py's `sft` stage and raft.py: masked next-token cross-entropy summed over
the step's micro-batches and divided by the step's global number of target tokens (all micro-batches, all ranks),
so gradient accumulation and the number of processes never change the math.

Batches come block-packed (rmcore.data.batching.collate_blocks) or one example per row (collate_documents);
either way a batch holds input_ids and loss_mask, and optionally position_ids / attn_mask (document masks).
"""
from __future__ import annotations

import torch

from rmcore.losses import count_targets, sft_loss, shift_targets
from rmcore.training.distributed import Dist, all_reduce_sum
from rmcore.training.runtime import autocast, set_grad_sync


def sft_sums(model, batch: dict, dist: Dist, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, target-token count) of one batch."""
    input_ids = batch["input_ids"].to(dist.device)
    targets, target_mask = shift_targets(input_ids, batch["loss_mask"].to(dist.device))
    # present with document masks only
    position_ids, attn_mask = (batch[k].to(dist.device) if k in batch else None for k in ("position_ids", "attn_mask"))
    with autocast(dist, bf16):
        logits = model(input_ids, position_ids=position_ids, attn_mask=attn_mask)
    return sft_loss(logits, targets, target_mask, reduction="sum"), count_targets(target_mask)


def step_targets(batches: list[dict], dist: Dist) -> float:
    """Target tokens of the whole step: every micro-batch, every rank (the loss's denominator)."""
    local = sum(float(shift_targets(b["input_ids"], b["loss_mask"])[1].sum()) for b in batches)
    return all_reduce_sum([local], dist.device)[0]


def sft_step(model, batches: list[dict], dist: Dist, bf16: bool) -> tuple[float, float]:
    """Forward and backward over one optimizer step's micro-batches; returns (summed loss, global target count).
    A step without any target token does nothing (the caller counts it)."""
    n_targets = step_targets(batches, dist)
    if n_targets == 0:
        return 0.0, n_targets
    loss_sum = torch.zeros((), device=dist.device)  # summed on the device: one host sync, after the last backward
    for i, batch in enumerate(batches):
        set_grad_sync(model, i == len(batches) - 1)
        loss, _ = sft_sums(model, batch, dist, bf16)
        (loss / n_targets * dist.world_size).backward()
        loss_sum += loss.detach().float()
    return float(loss_sum), n_targets

