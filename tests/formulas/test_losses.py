"""Each loss against an independent brute-force loop, plus gradchecks and the properties the training loop relies on."""
import math

import pytest
import torch

from rmcore.losses import (
    PREFERENCE_SUM_KEYS,
    centering_loss,
    count_targets,
    metrics_from_sums,
    pairwise_loss,
    preference_metrics,
    preference_sums,
    sft_loss,
    shift_targets,
)


def _rewards(n=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=dtype) * 2, torch.randn(n, generator=g, dtype=dtype) * 2


def brute_pairwise(rc, rr, margin=None):
    """Per-pair -log(1 / (1 + exp(-(c - r - m)))) with math, one pair at a time."""
    out = []
    for i, (c, r) in enumerate(zip(rc.tolist(), rr.tolist())):
        m = 0.0 if margin is None else (margin[i] if isinstance(margin, list) else margin)
        out.append(-math.log(1.0 / (1.0 + math.exp(-(c - r - m)))))
    return out


# ---------------------------------------------------------------------------------------------------------------
# pairwise_loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pairwise_matches_brute_force(reduction):
    rc, rr = _rewards()
    expected = brute_pairwise(rc, rr)
    got = pairwise_loss(rc, rr, reduction=reduction)
    if reduction == "mean":
        assert got.item() == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    elif reduction == "sum":
        assert got.item() == pytest.approx(sum(expected), rel=1e-12)
    else:
        assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_pairwise_with_per_pair_margin_matches_brute_force():
    rc, rr = _rewards()
    margin = [0.0, 1.0, 3.0, 0.5, 0.0, 2.0, 1.0]
    got = pairwise_loss(rc, rr, margin=torch.tensor(margin, dtype=torch.float64), reduction="none")
    assert got.tolist() == pytest.approx(brute_pairwise(rc, rr, margin), rel=1e-12)
    # A scalar margin is the same margin for every pair.
    got_scalar = pairwise_loss(rc, rr, margin=0.7, reduction="sum")
    assert got_scalar.item() == pytest.approx(sum(brute_pairwise(rc, rr, 0.7)), rel=1e-12)


def test_pairwise_margin_equals_shifted_chosen_reward():
    rc, rr = _rewards(seed=1)
    m = torch.rand(rc.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 3
    with_margin = pairwise_loss(rc, rr, margin=m, reduction="none")
    shifted = pairwise_loss(rc - m, rr, reduction="none")
    torch.testing.assert_close(with_margin, shifted, rtol=0, atol=1e-14)
    # and a positive margin makes every pair's loss strictly larger
    assert (with_margin > pairwise_loss(rc, rr, reduction="none")).all()


def test_pairwise_is_stable_for_large_margins_and_bf16():
    rc = torch.tensor([1000.0, -1000.0])
    rr = torch.tensor([-1000.0, 1000.0])
    loss = pairwise_loss(rc, rr, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[0].item() == 0.0 and loss[1].item() == pytest.approx(2000.0)
    # bf16 in, fp32 math out
    out = pairwise_loss(rc.bfloat16(), rr.bfloat16())
    assert out.dtype == torch.float32


def test_pairwise_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        pairwise_loss(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError, match="margin"):
        pairwise_loss(torch.zeros(4), torch.zeros(4), margin=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="reduction"):
        pairwise_loss(torch.zeros(4), torch.zeros(4), reduction="avg")


def test_pairwise_gradcheck_without_and_with_margin():
    rc, rr = _rewards(n=5, seed=2)
    rc.requires_grad_(True)
    rr.requires_grad_(True)
    m = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, r: pairwise_loss(c, r), (rc, rr))
    assert torch.autograd.gradcheck(lambda c, r, mm: pairwise_loss(c, r, margin=mm, reduction="sum"), (rc, rr, m))


def test_pairwise_gradient_is_minus_sigmoid_of_minus_diff():
    # d/dr_c of -logsigmoid(d) is -sigmoid(-d) = -(1 - sigmoid(d)): pushes r_c up, r_r down, harder when wrong.
    rc, rr = _rewards(n=4, seed=3)
    rc.requires_grad_(True)
    rr.requires_grad_(True)
    pairwise_loss(rc, rr, reduction="sum").backward()
    d = (rc - rr).detach().tolist()
    assert rc.grad.tolist() == pytest.approx([-1 / (1 + math.exp(x)) for x in d], rel=1e-12)
    assert rr.grad.tolist() == pytest.approx([1 / (1 + math.exp(x)) for x in d], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# centering_loss


def test_centering_matches_brute_force():
    rc, rr = _rewards(seed=4)
    coef = 0.01
    terms = [coef * (c + r) ** 2 for c, r in zip(rc.tolist(), rr.tolist())]
    assert centering_loss(rc, rr, coef).item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert centering_loss(rc, rr, coef, reduction="sum").item() == pytest.approx(sum(terms), rel=1e-12)
    assert centering_loss(rc, rr, coef, reduction="none").tolist() == pytest.approx(terms, rel=1e-12)


def test_centering_is_invariant_to_the_pairwise_objective():
    # Adding c to r_c and subtracting c from r_r changes r_c - r_r but not r_c + r_r.
    rc, rr = _rewards(seed=5)
    torch.testing.assert_close(centering_loss(rc + 1.5, rr - 1.5, 0.1), centering_loss(rc, rr, 0.1))
    assert not torch.allclose(pairwise_loss(rc + 1.5, rr - 1.5), pairwise_loss(rc, rr))


def test_centering_gradcheck():
    rc, rr = _rewards(n=5, seed=6)
    rc.requires_grad_(True)
    rr.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c, r: centering_loss(c, r, 0.3), (rc, rr))


def test_centering_gradient_pushes_pair_sum_toward_zero():
    rc = torch.tensor([3.0, -2.0, 0.5, -0.25, 4.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([1.0, -1.0, 0.25, -3.0, -1.0], dtype=torch.float64, requires_grad=True)
    s = (rc + rr).detach()
    centering_loss(rc, rr, coef=0.5, reduction="sum").backward()
    assert torch.equal(torch.sign(rc.grad), torch.sign(s))
    assert torch.equal(torch.sign(rr.grad), torch.sign(s))
    lr = 0.1
    with torch.no_grad():
        new_s = (rc - lr * rc.grad) + (rr - lr * rr.grad)
    assert (new_s.abs() < s.abs()).all()
    # The margin r_c - r_r is untouched by the centering step (both rewards move by the same amount).
    torch.testing.assert_close(rc.grad, rr.grad)


def test_centering_rejects_negative_coefficient():
    with pytest.raises(ValueError, match="coefficient"):
        centering_loss(torch.zeros(2), torch.zeros(2), -0.01)


# ---------------------------------------------------------------------------------------------------------------
# preference_metrics


def test_metrics_hand_computed():
    rc = torch.tensor([2.0, 1.0, 0.5, -1.0])
    rr = torch.tensor([1.0, 1.0, 1.5, -3.0])
    m = preference_metrics(rc, rr)
    assert (m["pairs"], m["wins"], m["ties"]) == (4, 2, 1)
    assert all(isinstance(m[k], int) for k in ("pairs", "wins", "ties"))
    assert m["accuracy"] == 0.5  # the tie (1.0 vs 1.0) is not a win
    assert m["tie_rate"] == 0.25
    assert m["margin"] == pytest.approx((1.0 + 0.0 - 1.0 + 2.0) / 4)
    assert m["chosen_mean"] == pytest.approx(0.625)
    assert m["rejected_mean"] == pytest.approx(0.125)
    assert m["reward_mean"] == pytest.approx(0.375)
    # population stds, by hand
    assert m["chosen_std"] == pytest.approx(math.sqrt(((2 - 0.625) ** 2 + 0.375**2 + 0.125**2 + 1.625**2) / 4))
    assert m["rejected_std"] == pytest.approx(math.sqrt((0.875**2 * 2 + 1.375**2 + 3.125**2) / 4))
    all_r = [2.0, 1.0, 0.5, -1.0, 1.0, 1.0, 1.5, -3.0]
    assert m["reward_std"] == pytest.approx(math.sqrt(sum((x - 0.375) ** 2 for x in all_r) / 8))
    assert all(type(v) in (int, float) for v in m.values())


def test_metrics_all_right_all_wrong_all_tied():
    a = torch.tensor([1.0, 2.0, 3.0])
    right = preference_metrics(a + 1, a)
    assert (right["accuracy"], right["tie_rate"], right["wins"]) == (1.0, 0.0, 3)
    assert right["margin"] == pytest.approx(1.0)
    wrong = preference_metrics(a, a + 1)
    assert (wrong["accuracy"], wrong["tie_rate"], wrong["wins"]) == (0.0, 0.0, 0)
    assert wrong["margin"] == pytest.approx(-1.0)
    # A constant reward model: every pair tied, accuracy 0 (not 0.5), zero spread.
    const = preference_metrics(torch.full((5,), 0.3), torch.full((5,), 0.3))
    assert (const["accuracy"], const["tie_rate"], const["ties"]) == (0.0, 1.0, 5)
    assert const["chosen_std"] == pytest.approx(0.0, abs=1e-7) and const["reward_std"] == pytest.approx(0.0, abs=1e-7)


def test_metrics_ties_are_exact_in_bf16():
    # 1.0 and 1.001 round to the same bf16 value: the model really output a tie.
    rc = torch.tensor([1.0, 2.0]).bfloat16()
    rr = torch.tensor([1.001, 1.0]).bfloat16()
    m = preference_metrics(rc, rr)
    assert (m["wins"], m["ties"]) == (1, 1)


def test_metrics_sum_across_batches_exactly():
    rc, rr = _rewards(n=11, seed=7, dtype=torch.float32)
    rr[3] = rc[3]  # one tie
    parts = [preference_sums(rc[:4], rr[:4]), preference_sums(rc[4:], rr[4:])]
    totals = {k: sum(p[k] for p in parts) for k in PREFERENCE_SUM_KEYS}
    merged = metrics_from_sums(totals)
    whole = preference_metrics(rc, rr)
    assert (merged["pairs"], merged["wins"], merged["ties"]) == (whole["pairs"], whole["wins"], whole["ties"])
    for key in ("accuracy", "tie_rate", "margin", "chosen_mean", "chosen_std", "reward_mean", "reward_std"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-12)
    # and the std agrees with torch's population std
    assert whole["reward_std"] == pytest.approx(torch.cat([rc, rr]).double().std(unbiased=False).item(), rel=1e-9)


def test_metrics_of_nothing_are_nan():
    m = preference_metrics(torch.zeros(0), torch.zeros(0))
    assert m["pairs"] == 0 and math.isnan(m["accuracy"])


# ---------------------------------------------------------------------------------------------------------------
# sft_loss


def brute_ce(logits, targets, mask):
    """Sum over unmasked (b, t) of logsumexp(logits[b, t]) - logits[b, t, targets[b, t]], with math."""
    total = 0.0
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            row = logits[b, t].tolist()
            lse = math.log(sum(math.exp(x) for x in row))
            total += lse - row[targets[b][t]]
    return total


def _sft_batch(B=3, T=6, V=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[0, 0] = True
    return logits, targets, mask


def test_sft_sum_and_mean_match_brute_force():
    logits, targets, mask = _sft_batch()
    expected = brute_ce(logits, targets.tolist(), mask.tolist())
    n = int(mask.sum())
    assert sft_loss(logits, targets, mask).item() == pytest.approx(expected, rel=1e-12)
    assert sft_loss(logits, targets, mask, reduction="mean").item() == pytest.approx(expected / n, rel=1e-12)
    per_token = sft_loss(logits, targets, mask, reduction="none")
    assert per_token.shape == targets.shape
    assert (per_token[~mask] == 0).all()
    assert per_token.sum().item() == pytest.approx(expected, rel=1e-12)


def test_sft_ignores_whatever_sits_under_the_mask():
    logits, targets, mask = _sft_batch(seed=1)
    junk = targets.clone()
    junk[~mask] = -100  # padding ids, out of range for the vocabulary
    torch.testing.assert_close(sft_loss(logits, junk, mask), sft_loss(logits, targets, mask))
    # an int 0/1 mask means the same as a bool one
    torch.testing.assert_close(sft_loss(logits, targets, mask.long()), sft_loss(logits, targets, mask))


def test_sft_bf16_logits_are_computed_in_fp32():
    logits, targets, mask = _sft_batch(seed=2, dtype=torch.float32)
    out = sft_loss(logits.bfloat16(), targets, mask)
    assert out.dtype == torch.float32
    reference = brute_ce(logits.bfloat16().double(), targets.tolist(), mask.tolist())
    assert out.item() == pytest.approx(reference, rel=1e-5)


def test_sft_gradcheck():
    logits, targets, mask = _sft_batch(B=2, T=3, V=5, seed=3)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sft_loss(x, targets, mask), (logits,))
    assert torch.autograd.gradcheck(lambda x: sft_loss(x, targets, mask, reduction="mean"), (logits,))


def test_sft_masked_positions_get_zero_gradient():
    logits, targets, mask = _sft_batch(seed=4)
    logits.requires_grad_(True)
    sft_loss(logits, targets, mask).backward()
    assert (logits.grad[~mask] == 0).all()
    assert (logits.grad[mask].abs().sum(-1) > 0).all()


def test_sft_micro_batches_divided_by_global_count_equal_full_batch_mean():
    # Micro-batches with very different numbers of real tokens: a per-micro-batch mean would weigh them wrongly.
    logits, targets, mask = _sft_batch(B=4, T=8, seed=5)
    mask[0] = True
    mask[1] = False
    mask[1, 7] = True
    mask[2, :3] = False
    splits = [(0, 1), (1, 2), (2, 4)]
    n_global = sum(count_targets(mask[a:b]) for a, b in splits)
    accumulated = sum(sft_loss(logits[a:b], targets[a:b], mask[a:b]) / n_global for a, b in splits)
    full_mean = sft_loss(logits, targets, mask, reduction="mean")
    torch.testing.assert_close(accumulated, full_mean, rtol=1e-12, atol=0)
    mean_of_means = sum(sft_loss(logits[a:b], targets[a:b], mask[a:b], reduction="mean") for a, b in splits) / 3
    assert abs(mean_of_means.item() - full_mean.item()) > 1e-3  # the thing the contract avoids


def test_count_targets():
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    n = count_targets(mask)
    assert n.dtype == torch.int64 and n.item() == 3
    assert count_targets(mask.bool()).item() == 3


def test_shift_targets_aligns_ids_and_mask():
    input_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])  # tokens to learn (responses); row 2 ends in padding
    targets, target_mask = shift_targets(input_ids, loss_mask)
    assert targets[:, :-1].tolist() == [[6, 7, 8], [10, 11, 0]]
    assert target_mask.tolist() == [[False, True, True, False], [True, True, False, False]]
    # so position t of the model's output is scored against token t+1 exactly when token t+1 is to be learned
    logits, _, _ = _sft_batch(B=2, T=4, V=12, seed=6)
    brute = brute_ce(logits, targets.tolist(), target_mask.tolist())
    assert sft_loss(logits, targets, target_mask).item() == pytest.approx(brute, rel=1e-12)


def test_sft_rejects_misaligned_shapes():
    logits, targets, mask = _sft_batch()
    with pytest.raises(ValueError, match="logits"):
        sft_loss(logits[:, :-1], targets, mask)
