"""One SFT optimizer step, shared by train.py's `sft` stage and raft.py: masked next-token cross-entropy summed over
the step's micro-batches and divided by the step's global number of target tokens (all micro-batches, all ranks),
so gradient accumulation and the number of processes never change the math.

Batches come block-packed (rmcore.data.collate_blocks) or one example per row (collate_documents); either way a
batch holds input_ids and loss_mask, and optionally position_ids / attn_mask (document masks).
"""
from __future__ import annotations

import numpy as np
import torch

from rmcore.data import right_pad
from rmcore.distributed import Dist, all_reduce_sum
from rmcore.loop import autocast, set_grad_sync
from rmcore.losses import count_targets, sft_loss, shift_targets


def _to(x, d: Dist):
    return None if x is None else x.to(d.device)


def sft_sums(model, batch: dict, d: Dist, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, target-token count) of one batch."""
    input_ids = batch["input_ids"].to(d.device)
    targets, target_mask = shift_targets(input_ids, batch["loss_mask"].to(d.device))
    with autocast(d, bf16):
        logits = model(input_ids, position_ids=_to(batch.get("position_ids"), d), attn_mask=_to(batch.get("attn_mask"), d))
    return sft_loss(logits, targets, target_mask, reduction="sum"), count_targets(target_mask)


def step_targets(batches: list[dict], d: Dist) -> float:
    """Target tokens of the whole step: every micro-batch, every rank (the loss's denominator)."""
    local = sum(float(shift_targets(b["input_ids"], b["loss_mask"])[1].sum()) for b in batches)
    return all_reduce_sum([local], d.device)[0]


def sft_step(model, batches: list[dict], d: Dist, bf16: bool) -> tuple[float, float]:
    """Forward and backward over one optimizer step's micro-batches; returns (summed loss, global target count).
    A step without any target token does nothing (the caller counts it)."""
    n_targets = step_targets(batches, d)
    if n_targets == 0:
        return 0.0, n_targets
    loss_sum = torch.zeros((), device=d.device)  # summed on the device: one host sync per step, after the last backward
    for i, batch in enumerate(batches):
        set_grad_sync(model, i == len(batches) - 1)
        loss, _ = sft_sums(model, batch, d, bf16)
        (loss / n_targets * d.world_size).backward()
        loss_sum += loss.detach().float()
    return float(loss_sum), n_targets


def collate_documents(docs: list[tuple[list[int], list[bool]]], indices: list[int], pad_id: int) -> dict:
    """One document per row, right-padded: input_ids and loss_mask (False on padding). Right padding needs no
    attention mask: under the causal mask no real token sees the padding after it."""
    rows = [docs[i] for i in indices]
    input_ids, real = right_pad([ids for ids, _ in rows], pad_id)
    loss_mask = torch.zeros_like(real, dtype=torch.bool)
    for r, (_, mask) in enumerate(rows):
        loss_mask[r, :len(mask)] = torch.from_numpy(np.asarray(mask, dtype=bool))
    return {"input_ids": input_ids, "loss_mask": loss_mask, "ids": [f"sample {i}" for i in indices]}
