"""The published variants of GRPO and RLOO (rmcore/rl.py: advantages_and_returns, the whitening modes, the loss
aggregations, GRPO's KL in the loss, the sequence-level ratio) against brute-force loops over plain Python numbers,
the paper defaults of the config, and the same advantages on 2 ranks as on 1."""
import json
import math

import pytest
import torch

from rmcore.config.sections import PpoConfig
from rmcore.rl import (
    ADVANTAGE_ESTIMATORS,
    LOSS_AGGREGATIONS,
    advantages_and_returns,
    grpo_advantages,
    policy_objective,
)

from helpers.runs import torchrun

g = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def lengths_mask(lengths, width=None):
    width = width or max(lengths)
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths], dtype=torch.float64)


def defaults(advantage: str, k: int = 2, **overrides) -> dict:
    """advantages_and_returns' settings for `advantage` under PpoConfig's defaults (the paper's)."""
    cfg = PpoConfig(advantage=advantage, k=k, **overrides)
    return dict(estimator=advantage, beta=cfg.beta, kl_in=cfg.kl_placement(), whiten_rewards=cfg.whiten_rewards,
                whiten=cfg.advantage_whitening(), k=k, gamma=cfg.gamma, lam=cfg.lam,
                scale_rewards=cfg.scale_rewards == "group")


def test_paper_defaults_of_each_estimator():
    assert (PpoConfig(advantage="grpo", k=2).kl_placement(), PpoConfig(advantage="grpo", k=2).advantage_whitening()) \
        == ("loss", "none")
    assert (PpoConfig(advantage="rloo", k=2).kl_placement(), PpoConfig(advantage="rloo", k=2).advantage_whitening()) \
        == ("reward", "none")
    assert (PpoConfig().kl_placement(), PpoConfig().advantage_whitening()) == ("reward", "tokens")  # TRL's PPO
    old = PpoConfig(advantage="grpo", k=2, kl_in="reward", whiten_advantages="tokens")  # the old behaviour: options
    assert (old.kl_placement(), old.advantage_whitening()) == ("reward", "tokens")


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_an_equal_score_group_has_exactly_zero_advantages_whatever_the_lengths(advantage):
    """The issue's case: 2 prompts x K=2, lengths 3, 8, 2, 7; the first prompt's two samples score the same. Under
    the defaults both get 0 on every token: no token whitening (it shifts them by the length-weighted mean). GRPO's
    KL is in the loss, so any KL leaves them at 0; RLOO's is in the reward, as its paper has it, so its test takes
    equal rewards (KL 0: the policy still equals the reference)."""
    mask = lengths_mask([3, 8, 2, 7])
    scores = torch.tensor([1.5, 1.5, -0.3, 0.9], dtype=torch.float64)
    kl = rand(4, 8).abs() * mask if advantage == "grpo" else torch.zeros_like(mask)
    adv, _ = advantages_and_returns(scores, kl, torch.zeros_like(mask), mask, **defaults(advantage))
    assert (adv[:2] == 0).all()
    assert (adv[2:] != 0).sum() == 9  # the other group's real tokens
    if advantage == "grpo":  # the numbers: (r - mean) / (sample std + 1e-4)
        a = 0.6 / (math.sqrt(0.72) + 1e-4)  # |r - mean| = 0.6, sample std sqrt(2 * 0.36)
        assert torch.allclose(adv[2:, 0], torch.tensor([-a, a], dtype=torch.float64), rtol=1e-12)
        first = advantages_and_returns(scores, 0 * kl, torch.zeros_like(mask), mask,
                                       **dict(defaults(advantage), kl_in="reward", whiten="tokens"))[0][:, 0]
        assert torch.allclose(first, torch.tensor([-0.402, -0.402, -2.008, 1.205], dtype=torch.float64), atol=1e-3)
    old = dict(defaults(advantage), kl_in="reward", whiten="tokens")  # the old defaults, still an option
    before = advantages_and_returns(scores, kl, torch.zeros_like(mask), mask, **old)[0]
    assert (before[:2][mask[:2].bool()] != 0).all()


def test_dr_grpo_does_not_divide_by_the_group_std():
    s = rand(12)
    assert torch.allclose(grpo_advantages(s, 4, scale=False), s - s.view(3, 4).mean(-1).repeat_interleave(4))


def test_whitening_over_samples_weighs_every_response_the_same():
    mask = lengths_mask([1, 9, 4, 4, 2, 6])
    scores = rand(6)
    adv, _ = advantages_and_returns(scores, torch.zeros_like(mask), torch.zeros_like(mask), mask,
                                    **dict(defaults("rloo"), whiten="samples"))
    a = [float(x) for x in (scores.view(3, 2) - scores.view(3, 2).flip(-1)).reshape(-1)]  # RLOO with K=2
    mean = sum(a) / 6
    std = math.sqrt(sum((x - mean) ** 2 for x in a) / 6 + 1e-8)
    for i in range(6):
        row = adv[i][mask[i].bool()]
        assert torch.allclose(row, torch.full_like(row, (a[i] - mean) / std), rtol=1e-9)
        assert (adv[i][~mask[i].bool()] == 0).all()


def brute_force_loss(lp, lo, lr, adv, mask, *, aggregation, clip, beta, max_len, sequence_ratio=False):
    """The per-response formulas, written out: l_it = max(-A rho, -A clip(rho)) + beta k3 (per token, or the
    sequence ratio's one term per response), then aggregated."""
    responses = []
    for i in range(lp.shape[0]):
        ts = [t for t in range(lp.shape[1]) if mask[i, t]]
        kl = [math.exp(float(lr[i, t] - lp[i, t])) - float(lr[i, t] - lp[i, t]) - 1 for t in ts]
        if sequence_ratio:
            rho = math.exp(sum(float(lp[i, t] - lo[i, t]) for t in ts))
            a = float(adv[i, ts[0]])
            surrogate = [max(-a * rho, -a * min(max(rho, 1 - clip), 1 + clip))] * len(ts)  # one term, every token
        else:
            surrogate = []
            for t in ts:
                rho, a = math.exp(float(lp[i, t] - lo[i, t])), float(adv[i, t])
                surrogate.append(max(-a * rho, -a * min(max(rho, 1 - clip), 1 + clip)))
        responses.append([s + beta * k for s, k in zip(surrogate, kl)])
    if aggregation == "token_mean":
        return sum(map(sum, responses)) / sum(map(len, responses))
    if aggregation == "sequence_mean":
        return sum(sum(r) / len(r) for r in responses) / len(responses)
    assert aggregation == "constant"
    return sum(map(sum, responses)) / (max_len * len(responses))


@pytest.mark.parametrize("aggregation", sorted(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("beta", [0.0, 0.04])  # 0.04: GRPO's KL in the loss
def test_each_loss_aggregation_and_the_kl_in_the_loss_by_brute_force(aggregation, beta):
    mask = lengths_mask([5, 1, 3, 5], width=6)
    lp, lo, lr = rand(4, 6) * 0.3 - 2, rand(4, 6) * 0.3 - 2, rand(4, 6) * 0.3 - 2
    adv = rand(4, 6) * mask
    weights = LOSS_AGGREGATIONS[aggregation](mask, tokens=float(mask.sum()), sequences=4.0, max_len=6)
    surrogate, kl, _ = policy_objective(lp, lo, adv, mask, weights, clip=0.2, logp_ref=lr)
    want = brute_force_loss(lp, lo, lr, adv, mask, aggregation=aggregation, clip=0.2, beta=beta, max_len=6)
    assert math.isclose(float(surrogate + beta * kl), want, rel_tol=1e-9)
    # micro-batches with the minibatch's counts add up to the minibatch's loss, whatever the split
    parts = [policy_objective(lp[r], lo[r], adv[r], mask[r], weights[r], clip=0.2, logp_ref=lr[r])
             for r in (slice(0, 1), slice(1, 4))]
    assert math.isclose(sum(float(s + beta * k) for s, k, _ in parts), want, rel_tol=1e-9)


@pytest.mark.parametrize("aggregation", sorted(LOSS_AGGREGATIONS))
def test_the_sequence_ratio_by_brute_force(aggregation):
    mask = lengths_mask([4, 2, 6, 1], width=6)
    lp, lo = rand(4, 6) * 0.1 - 2, rand(4, 6) * 0.1 - 2
    adv = rand(4)[:, None] * mask  # one advantage per response, on each of its tokens
    weights = LOSS_AGGREGATIONS[aggregation](mask, tokens=float(mask.sum()), sequences=4.0, max_len=6)
    surrogate, _, clipped = policy_objective(lp, lo, adv, mask, weights, clip=0.2, sequence_ratio=True)
    want = brute_force_loss(lp, lo, lp, adv, mask, aggregation=aggregation, clip=0.2, beta=0.0, max_len=6,
                            sequence_ratio=True)
    assert math.isclose(float(surrogate), want, rel_tol=1e-9)
    assert ((clipped == 0) | (clipped == 1)).all() and (clipped * (1 - mask) == 0).all()


def test_two_ranks_compute_the_advantages_of_one(tmp_path):
    """Every estimator with every whitening (and whitened rewards) on 2 ranks, each holding half the prompts (a
    prompt's K samples on one rank), equals one process holding all of them."""
    cases = [dict(defaults(name, k=2), whiten=whiten, whiten_rewards=wr)
             for name in sorted(ADVANTAGE_ESTIMATORS) for whiten in ("tokens", "samples", "none")
             for wr in (False, True) if not (whiten == "samples" and name == "gae")]
    mask = lengths_mask([3, 8, 2, 7, 5, 1, 6, 4], width=8)
    data = {"mask": mask.tolist(), "scores": rand(8).tolist(), "kl": (rand(8, 8) * mask).tolist(),
            "values": (rand(8, 8) * mask).tolist(), "cases": cases}
    (tmp_path / "in.json").write_text(json.dumps(data))
    proc = torchrun(2, "tests/helpers/rank_advantages.py", [tmp_path / "in.json", tmp_path / "out"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = {k: torch.tensor(data[k], dtype=torch.float64) for k in ("mask", "scores", "kl", "values")}
    for n, case in enumerate(cases):
        one = advantages_and_returns(t["scores"], t["kl"], t["values"], t["mask"], **case)
        two = [json.loads((tmp_path / f"out.rank{r}.json").read_text())[n] for r in (0, 1)]
        for j, what in enumerate(("advantages", "returns")):
            got = torch.tensor(two[0][j] + two[1][j], dtype=torch.float64)
            assert torch.allclose(got, one[j], atol=1e-6, rtol=0), (case, what)
    assert any(c["whiten"] == "tokens" for c in cases)  # a statistic over the whole batch is among them
