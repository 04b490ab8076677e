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

Sections: reward-model losses and metrics, K-way rankings (reward models on K ranked responses: all pairs,
Plackett-Luce), supervised fine-tuning (next-token) losses, then direct preference optimisation (DPO and its
family). The losses of policy optimisation (PPO's clipped surrogate and value loss, the KL penalty) are in
rmcore/rl.py.
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


def upcast(x: torch.Tensor) -> torch.Tensor:
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
    diff = upcast(r_chosen) - upcast(r_rejected)
    if margin is not None:
        # Llama 2 (Touvron et al. 2023, sec. 3.2.2): a pair rated "significantly better" must be won by at least m,
        # so the sigmoid is shifted right by m. m is a per-pair tensor or one number for all pairs.
        margin = upcast(margin) if isinstance(margin, torch.Tensor) else margin
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
    total = upcast(r_chosen) + upcast(r_rejected)
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
# K-way rankings: a reward model trained on K >= 2 responses to one prompt, ranked or scored
#
# Inputs, for a micro-batch of B prompts holding N responses in all: `rewards` (N,), each prompt's responses
# together, prompt after prompt; `group_sizes`, the B numbers K_b (a tuple of ints, K_1 + ... + K_B = N); and
# `scores` (N,), the data's ranking as one number per response, higher better, equal numbers tied
# (rmcore/data/ranked.py). The losses are per PROMPT: reduction="sum" adds the prompts' losses and the loop divides
# by the step's global number of prompts, as it divides the pairwise loss by the number of pairs. With K = 2 (no
# tie) both losses are pairwise_loss, bit for bit: the same operations on the same numbers.


def _by_prompt(values: torch.Tensor, group_sizes, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K_max) with prompt b's K_b values in row b and `fill` after them, and the (B, K_max) mask of real ones."""
    sizes = torch.as_tensor(group_sizes, dtype=torch.long).reshape(-1).cpu()
    if values.dim() != 1 or int(sizes.sum()) != values.numel() or bool((sizes < 1).any()):
        raise ValueError(f"expected 1-D values split into groups of >= 1: {tuple(values.shape)} values, group sizes "
                         f"{sizes.tolist()}")
    n_groups, width = len(sizes), int(sizes.max()) if len(sizes) else 0
    row = torch.repeat_interleave(torch.arange(n_groups), sizes)
    col = torch.arange(values.numel()) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    row, col = row.to(values.device), col.to(values.device)
    out = values.new_full((n_groups, width), fill).index_put((row, col), values)
    valid = torch.zeros(n_groups, width, dtype=torch.bool, device=values.device).index_put(
        (row, col), torch.ones_like(row, dtype=torch.bool))
    return out, valid


def _check_ranking(rewards: torch.Tensor, scores: torch.Tensor) -> None:
    """Raise unless rewards and scores are matching 1-D floating point tensors."""
    if rewards.shape != scores.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and scores {tuple(scores.shape)} must be 1-D of one length")
    if not rewards.is_floating_point():
        raise TypeError("rewards must be a floating point tensor")


def all_pairs_loss(rewards: torch.Tensor, scores: torch.Tensor, group_sizes, reduction: Reduction = "mean"):
    """Per prompt: the mean over its ordered pairs (s_i > s_j) of -logsigmoid(r_i - r_j) (InstructGPT)."""
    # Ouyang et al. 2022 (InstructGPT), sec. 3.5: the loss is -1/C(K,2) * E[log sigmoid(r(x, y_w) - r(x, y_l))]
    # over the K(K-1)/2 comparisons of a prompt, all taken from ONE forward pass of its K responses (one batch
    # element per prompt, which they found to overfit less than shuffling the comparisons as separate pairs).
    # Tied pairs state no preference: they are not pairs here, and the mean is over the prompt's untied pairs.
    _check_ranking(rewards, scores)
    r, valid = _by_prompt(upcast(rewards), group_sizes, 0.0)
    s, _ = _by_prompt(scores, group_sizes, 0.0)
    above = valid[:, :, None] & valid[:, None, :] & (s[:, :, None] > s[:, None, :])  # (B, K, K): i ranked above j
    per_pair = torch.where(above, -F.logsigmoid(r[:, :, None] - r[:, None, :]), torch.zeros_like(r[:, :, None]))
    # clamp: a prompt with no ordered pair (all tied; the data drops such prompts) contributes 0, not 0/0
    per_prompt = per_pair.sum((1, 2)) / above.sum((1, 2)).clamp(min=1)
    return _reduce(per_prompt, reduction)


def plackett_luce_loss(rewards: torch.Tensor, scores: torch.Tensor, group_sizes, reduction: Reduction = "mean"):
    """Per prompt: -sum_i [r_i - logsumexp_{j: s_j <= s_i} r_j], the ranking's Plackett-Luce NLL (ties: Breslow)."""
    # Plackett-Luce (Plackett 1975, Luce 1959) with weights exp(r): a ranking is drawn by picking the best response
    # with probability softmax(r), then the best of the rest, and so on; its likelihood is prod_k exp(r_pi(k)) /
    # sum_{j ranked at or below k} exp(r_j), over K-1 choices (the last is certain). Zhu, Jiao & Jordan 2023
    # (Principled RLHF from pairwise or K-wise comparisons) fit reward models with its maximum likelihood. Ties
    # follow Breslow (1974): the members of a tie group share one denominator, the sum over the group and every
    # response below it, so a tie contributes a factor per member and states no order within the group. A last
    # group of m > 1 tied responses thus adds -sum_i r_i + m logsumexp_group r, least (m log m) when they are equal.
    #
    # Computed as -logsigmoid(r_i - logsumexp_{j != i, s_j <= s_i} r_j), the same number: with one competitor left
    # this is pairwise_loss's own operation on the same values (K = 2 gives it bit for bit), and a response with
    # no competitor (the sole worst one) has the factor 1, an exact 0, without a logsumexp of nothing (-inf) whose
    # gradient would be NaN.
    _check_ranking(rewards, scores)
    r, valid = _by_prompt(upcast(rewards), group_sizes, 0.0)
    s, _ = _by_prompt(scores, group_sizes, 0.0)
    width = r.shape[1]
    others = ~torch.eye(width, dtype=torch.bool, device=r.device)
    rivals = valid[:, :, None] & valid[:, None, :] & (s[:, None, :] <= s[:, :, None]) & others  # (B, i, j)
    has_rival = rivals.any(-1)
    # Rows without a rival get zeros (a finite logsumexp, whose result the where below discards).
    rival_r = torch.where(rivals, r[:, None, :].expand_as(rivals), torch.full_like(rivals, -math.inf, dtype=r.dtype))
    rival_r = torch.where(has_rival[:, :, None], rival_r, torch.zeros_like(rival_r))
    per_response = torch.where(has_rival, -F.logsigmoid(r - torch.logsumexp(rival_r, -1)), torch.zeros_like(r))
    return _reduce(per_response.sum(-1), reduction)


# The losses loss.ranking names: each maps (rewards, scores, group_sizes, reduction) to per-prompt losses.
RANKING_LOSSES = {
    "all_pairs": all_pairs_loss,
    "plackett_luce": plackett_luce_loss,
}

# Additive statistics of rankings: summed across micro-batches and ranks, then ranking_metrics_from_sums.
RANKING_SUM_KEYS = ("prompts", "pairs", "wins", "ties", "best_of_k")


@torch.no_grad()
def ranking_sums(rewards: torch.Tensor, scores: torch.Tensor, group_sizes) -> dict[str, torch.Tensor]:
    """prompts; ordered pairs (s_i > s_j), wins r_i > r_j and ties r_i == r_j among them; best_of_k = #prompts whose
    best-scored responses' top reward beats every other response's strictly."""
    # 0-d fp64 tensors on the rewards' device, so a loop adds them up without a host sync per micro-batch.
    _check_ranking(rewards, scores)
    r, valid = _by_prompt(rewards.detach().double(), group_sizes, 0.0)
    if not r.numel():  # an empty micro-batch (a rank's share of a short last batch)
        return {key: r.new_zeros(()) for key in RANKING_SUM_KEYS}
    s, _ = _by_prompt(scores.double(), group_sizes, -math.inf)
    above = valid[:, :, None] & valid[:, None, :] & (s[:, :, None] > s[:, None, :])
    top = valid & (s == s.max(-1, keepdim=True).values)
    rest = valid & ~top
    # A tie in the rewards is no win (as in preference_sums); RewardBench 2's best-of-4 asks the same of the top.
    neg_inf = torch.full_like(r, -math.inf)
    best_top = torch.where(top, r, neg_inf).max(-1).values
    best_rest = torch.where(rest, r, neg_inf).max(-1).values
    diff = r[:, :, None] - r[:, None, :]
    return {"prompts": torch.tensor(float(len(r)), dtype=torch.float64, device=r.device),
            "pairs": above.sum().double(), "wins": (above & (diff > 0)).sum().double(),
            "ties": (above & (diff == 0)).sum().double(),
            "best_of_k": (rest.any(-1) & (best_top > best_rest)).sum().double()}


def ranking_metrics_from_sums(sums: dict) -> dict[str, float]:
    """acc = wins / pairs (a reward tie is an error), tie_rate = ties / pairs, best_of_k = hits / prompts."""
    pairs, prompts = float(sums["pairs"]), float(sums["prompts"])
    nan = float("nan")
    return {"acc": float(sums["wins"]) / pairs if pairs else nan,
            "tie_rate": float(sums["ties"]) / pairs if pairs else nan,
            "best_of_k": float(sums["best_of_k"]) / prompts if prompts else nan}


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
    per_token = F.cross_entropy(upcast(logits).reshape(-1, vocab), safe_targets.reshape(-1), reduction="none")
    per_token = torch.where(mask.reshape(-1), per_token, torch.zeros_like(per_token)).reshape(targets.shape)
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        # clamp: a call without any real target gives 0, not 0/0.
        return per_token.sum() / count_targets(mask).clamp(min=1)
    if reduction == "none":
        return per_token
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

