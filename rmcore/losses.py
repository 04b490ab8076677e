"""Every training objective of rmcore, as small pure functions of tensors.

Conventions shared by all functions in this file:

- Math runs in fp32 even when the model runs in bf16/fp16: inputs are upcast first (fp64 stays fp64, which the
  gradcheck tests rely on). Log-sigmoid and log-softmax of bf16 values lose exactly the small differences the
  gradient lives in.
- `reduction="sum"` is what the training loops use. One optimizer step may be split over several micro-batches
  (gradient accumulation) and several data-parallel ranks; the loop divides every summed loss by the GLOBAL count
  (pairs, or target tokens) of the whole step, so the loss scale never depends on how the step was split.
  `"mean"` divides by this call's own count (handy for evaluation and tests); `"none"` returns the per-pair or
  per-token terms.
- Nothing here reads a config or touches a model: callers pass tensors and coefficients.

Sections: reward-model losses and metrics, then supervised fine-tuning (next-token) losses. The losses of policy
optimisation (PPO's clipped surrogate and value loss, the KL penalty) are in rmcore/rl.py.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum", "none"]


def _reduce(per_item: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """mean(x) | sum(x) | x, according to `reduction`."""
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 if it is fp16/bf16, else x unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_pairs(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> None:
    """Raise unless r_chosen and r_rejected are matching per-pair reward tensors."""
    # Equal shapes are required, not just broadcastable ones: (N, 1) against (N,) would silently broadcast to an
    # (N, N) matrix of every chosen against every rejected reward, and the loss would still look plausible.
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ in shape")
    if not (r_chosen.is_floating_point() and r_rejected.is_floating_point()):
        raise TypeError("rewards must be floating point tensors")


# ----------------------------------------------------------------------------------------------------------------
# Reward model: pairwise (Bradley-Terry) loss, reward centering, preference metrics


def pairwise_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Bradley-Terry loss per pair: -logsigmoid(r_c - r_r - m), m = 0 without a margin."""
    _check_pairs(r_chosen, r_rejected)
    diff = _upcast(r_chosen) - _upcast(r_rejected)
    if margin is not None:
        # Llama 2 (Touvron et al. 2023, sec. 3.2.2): a pair rated "significantly better" must be won by at least m,
        # so the sigmoid is shifted right by m. m is a per-pair tensor or one number for all pairs.
        margin = _upcast(margin) if isinstance(margin, torch.Tensor) else margin
        shifted = diff - margin
        if shifted.shape != diff.shape:
            raise ValueError(f"margin of shape {tuple(margin.shape)} does not fit rewards of shape {tuple(diff.shape)}")
        diff = shifted
    # logsigmoid(x) = -log(1 + exp(-x)) evaluated without overflow for large |x|; never write log(sigmoid(x)).
    return _reduce(-F.logsigmoid(diff), reduction)


def centering_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    coef: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Reward centering (Eisenstein et al. 2023) per pair: coef * (r_c + r_r)^2."""
    # The Bradley-Terry loss only sees r_c - r_r, so a constant added to every reward is free; this term pins the
    # mean reward of each pair, (r_c + r_r) / 2, at zero, which keeps rewards comparable across checkpoints and
    # across prompts when they are later fed to PPO. Its gradient is 2 * coef * (r_c + r_r) for both rewards.
    #
    # TRL (huggingface/trl, trl/trainer/reward_trainer.py, RewardTrainer.compute_loss) computes
    #     loss += self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    # on top of the mean pairwise loss, with center_rewards_coefficient documented as "proposed by
    # https://huggingface.co/papers/2312.09244, Eq. 2. Recommended value: 0.01". reduction="mean" here is that
    # formula exactly, per micro-batch. The difference is in how micro-batches combine: TRL takes the mean inside
    # each micro-batch and the HF Trainer then averages micro-batches (divides by gradient_accumulation_steps), so
    # pairs in a smaller micro-batch weigh more; with reduction="sum" divided by the global pair count, as the
    # rmcore loop does, every pair weighs the same. The two agree when all micro-batches hold the same number of
    # pairs. Like TRL, the term is added to the pairwise loss by the caller: total = pairwise + centering.
    _check_pairs(r_chosen, r_rejected)
    if coef < 0:
        raise ValueError(f"centering coefficient must be >= 0 (a negative one pushes rewards apart), got {coef}")
    total = _upcast(r_chosen) + _upcast(r_rejected)
    return _reduce(coef * total.square(), reduction)


# Additive statistics: a loop sums these across batches and ranks exactly, then calls metrics_from_sums once.
PREFERENCE_SUM_KEYS = (
    "pairs",
    "wins",
    "ties",
    "margin_sum",
    "chosen_sum",
    "chosen_sq_sum",
    "rejected_sum",
    "rejected_sq_sum",
)


@torch.no_grad()
def preference_sums(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, int | float]:
    """pairs, wins = #(r_c > r_r), ties = #(r_c == r_r), and sums of r_c - r_r, r_c, r_c^2, r_r, r_r^2."""
    _check_pairs(r_chosen, r_rejected)
    # fp64 so that sums of squares stay exact enough for the std below; bf16 -> fp64 is lossless, so ties seen
    # here are exactly the ties of the model's own output.
    rc = r_chosen.detach().reshape(-1).double()
    rr = r_rejected.detach().reshape(-1).double()
    stats = torch.stack(
        [
            (rc > rr).sum().double(),
            (rc == rr).sum().double(),
            (rc - rr).sum(),
            rc.sum(),
            rc.square().sum(),
            rr.sum(),
            rr.square().sum(),
        ]
    ).tolist()  # one device-to-host copy for all of them
    wins, ties, margin_sum, chosen_sum, chosen_sq_sum, rejected_sum, rejected_sq_sum = stats
    return {
        "pairs": rc.numel(),
        "wins": int(wins),
        "ties": int(ties),
        "margin_sum": margin_sum,
        "chosen_sum": chosen_sum,
        "chosen_sq_sum": chosen_sq_sum,
        "rejected_sum": rejected_sum,
        "rejected_sq_sum": rejected_sq_sum,
    }


def _std_from_sums(total: float, sq_total: float, n: int) -> float:
    """Population std: sqrt(max(E[x^2] - E[x]^2, 0))."""
    # Clamped because rounding can make the difference slightly negative when all values are equal.
    return math.sqrt(max(sq_total / n - (total / n) ** 2, 0.0))


def metrics_from_sums(sums: dict[str, int | float]) -> dict[str, int | float]:
    """accuracy = wins/pairs, tie_rate = ties/pairs, margin = margin_sum/pairs, reward means and population stds."""
    n = int(sums["pairs"])
    out = {key: sums[key] for key in PREFERENCE_SUM_KEYS}
    if n == 0:
        nan = float("nan")
        out.update(accuracy=nan, tie_rate=nan, margin=nan)
        out.update(chosen_mean=nan, chosen_std=nan, rejected_mean=nan, rejected_std=nan, reward_mean=nan,
                   reward_std=nan)
        return out
    # A tie is not a win: a model that outputs a constant scores accuracy 0, not 0.5, and tie_rate says why.
    out["accuracy"] = sums["wins"] / n
    out["tie_rate"] = sums["ties"] / n
    out["margin"] = sums["margin_sum"] / n
    out["chosen_mean"] = sums["chosen_sum"] / n
    out["chosen_std"] = _std_from_sums(sums["chosen_sum"], sums["chosen_sq_sum"], n)
    out["rejected_mean"] = sums["rejected_sum"] / n
    out["rejected_std"] = _std_from_sums(sums["rejected_sum"], sums["rejected_sq_sum"], n)
    all_sum = sums["chosen_sum"] + sums["rejected_sum"]
    out["reward_mean"] = all_sum / (2 * n)
    out["reward_std"] = _std_from_sums(all_sum, sums["chosen_sq_sum"] + sums["rejected_sq_sum"], 2 * n)
    return out


def preference_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, int | float]:
    """metrics_from_sums(preference_sums(r_c, r_r)): accuracy (ties lose), tie_rate, margin, reward mean/std."""
    # Keys: the additive PREFERENCE_SUM_KEYS (pairs, wins, ties are ints) plus accuracy, tie_rate, margin,
    # chosen_mean/std, rejected_mean/std, reward_mean/std (floats; stds are population stds, ddof=0, so that
    # they can be rebuilt exactly from summed statistics). To aggregate over batches or ranks, sum the
    # PREFERENCE_SUM_KEYS entries (or all-reduce them as one tensor) and call metrics_from_sums on the totals.
    return metrics_from_sums(preference_sums(r_chosen, r_rejected))


# ----------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning: masked next-token cross-entropy
#
# Who shifts: the CALLER. sft_loss compares logits[:, t] with targets[:, t], exactly like nanoGPT's (x, y) pairs
# and F.cross_entropy; it never shifts, so a batch that is already shifted cannot be shifted twice. The shift lives
# in one helper, shift_targets, that the data pipeline or the loop calls once.
#
# Normalisation contract: sft_loss returns the SUM of token losses over real target tokens. For one optimizer
# step made of micro-batches i on ranks w, the loop computes N = sum over i and w of count_targets(mask_i)
# (an all-reduce of the local counts) and backpropagates sft_loss(logits_i, targets_i, mask_i) / N for every
# micro-batch. The accumulated gradient is then the gradient of the mean over all real target tokens of the
# step, whatever the split. DDP and FSDP AVERAGE gradients over the W ranks, so a loop relying on them
# multiplies each micro-batch loss by W to undo that division.


def shift_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """targets[:, t] = input_ids[:, t+1], target_mask[:, t] = loss_mask[:, t+1]; the last position has no target."""
    # loss_mask marks the tokens to be LEARNED (e.g. the response tokens of a prompt/response pair), so a token
    # counts when it is the target, and the mask moves left together with the ids. Keeping the length T (rather
    # than slicing to T-1) lets the model run on input_ids unchanged; the unused last position is masked out.
    if input_ids.shape != loss_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")
    targets = torch.zeros_like(input_ids)
    targets[..., :-1] = input_ids[..., 1:]
    target_mask = torch.zeros_like(loss_mask, dtype=torch.bool)
    target_mask[..., :-1] = loss_mask[..., 1:].bool()
    return targets, target_mask


def count_targets(loss_mask: torch.Tensor) -> torch.Tensor:
    """Number of real target tokens: sum(loss_mask != 0), an int64 scalar tensor."""
    # A tensor, not a Python int: no host sync, and the loop can all-reduce it across ranks before dividing.
    return (loss_mask != 0).sum(dtype=torch.int64)


def sft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    reduction: Reduction = "sum",
) -> torch.Tensor:
    """Masked cross-entropy: sum over positions t with loss_mask[t] of -log softmax(logits[t])[targets[t]]."""
    # Shapes: logits (..., T, V), targets and loss_mask (..., T), already aligned (see shift_targets).
    # reduction="sum" (default) returns the sum to be divided by the global target count (contract above);
    # "mean" divides by count_targets(loss_mask) of this call; "none" returns per-position losses, 0 where masked.
    if targets.shape != logits.shape[:-1] or loss_mask.shape != targets.shape:
        raise ValueError(
            f"expected logits (..., V) with targets and loss_mask of shape logits.shape[:-1]; got logits "
            f"{tuple(logits.shape)}, targets {tuple(targets.shape)}, loss_mask {tuple(loss_mask.shape)}"
        )
    mask = loss_mask != 0
    vocab = logits.shape[-1]
    # Masked positions may hold any id (padding, -100, ...); replace them by a valid one so that cross_entropy
    # never indexes out of range, and zero their loss below.
    safe_targets = targets.masked_fill(~mask, 0)
    # The whole logits tensor is upcast rather than gathering the real positions first: gathering by a boolean
    # mask has a data-dependent shape, which forces a host sync and breaks torch.compile graphs.
    per_token = F.cross_entropy(_upcast(logits).reshape(-1, vocab), safe_targets.reshape(-1), reduction="none")
    per_token = torch.where(mask.reshape(-1), per_token, torch.zeros_like(per_token)).reshape(targets.shape)
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        # clamp: a call without any real target gives 0, not 0/0.
        return per_token.sum() / count_targets(mask).clamp(min=1)
    if reduction == "none":
        return per_token
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
