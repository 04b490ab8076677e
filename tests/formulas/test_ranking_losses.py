"""K-way rankings: the two losses and the metrics against brute-force loops, K = 2 against the pairwise loss bit for
bit, gradchecks, and one micro-batch of 4 prompts against two of 2 on a real model."""
import itertools
import math
import typing

import numpy as np
import pytest
import torch

from rmcore.config.sections import LossConfig
from rmcore.data.ranked import RankedDataset, collate_ranked
from rmcore.eval.metrics import best_of_k, ranking_accuracy
from rmcore.losses import (
    RANKING_LOSSES,
    all_pairs_loss,
    pairwise_loss,
    plackett_luce_loss,
    ranking_metrics_from_sums,
    ranking_sums,
)
from rmcore.model import ModelConfig, RewardModel

# Four prompts: K = 3 (no tie), 4 (a tie in the middle), 2, 5 (a tie at the top and one at the bottom)
SIZES = (3, 4, 2, 5)
SCORES = [2, 0, 1] + [3, 1, 1, 0] + [0, 5] + [4, 4, 2, 1, 1]


def _rewards(n=sum(SIZES), seed=0, dtype=torch.float64):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2


def _split(values, sizes=SIZES):
    values, out, at = list(values), [], 0
    for k in sizes:
        out.append(values[at:at + k])
        at += k
    return out


def brute_all_pairs(rewards, scores, sizes=SIZES):
    """Per prompt: the mean of -log(1 / (1 + exp(-(r_i - r_j)))) over its pairs with s_i > s_j, with math."""
    out = []
    for r, s in zip(_split(rewards.tolist(), sizes), _split(scores, sizes)):
        terms = [-math.log(1.0 / (1.0 + math.exp(-(r[i] - r[j])))) for i in range(len(r)) for j in range(len(r))
                 if s[i] > s[j]]
        out.append(sum(terms) / len(terms))
    return out


def brute_plackett_luce(rewards, scores, sizes=SIZES):
    """Per prompt: the ranking's factors one at a time, best score level first; each member i of a level (a tie
    group, Breslow) adds -(r_i - log sum_{j at or below the level} exp r_j)."""
    out = []
    for r, s in zip(_split(rewards.tolist(), sizes), _split(scores, sizes)):
        nll = 0.0
        for level in sorted(set(s), reverse=True):
            log_denominator = math.log(sum(math.exp(r[j]) for j in range(len(r)) if s[j] <= level))
            for i in range(len(r)):
                if s[i] == level:
                    nll -= r[i] - log_denominator
        out.append(nll)
    return out


def _args(rewards, scores=SCORES, sizes=SIZES):
    return rewards, torch.tensor(scores, dtype=torch.float64), sizes


# ----------------------------------------------------------------------------------------------------------------
# The losses


@pytest.mark.parametrize("name,brute", [("all_pairs", brute_all_pairs), ("plackett_luce", brute_plackett_luce)])
def test_ranking_losses_match_brute_force(name, brute):
    r = _rewards()
    expected = brute(r, SCORES)
    loss = RANKING_LOSSES[name]
    assert loss(*_args(r), reduction="none").tolist() == pytest.approx(expected, rel=1e-12)
    assert loss(*_args(r), reduction="sum").item() == pytest.approx(sum(expected), rel=1e-12)
    assert loss(*_args(r), reduction="mean").item() == pytest.approx(sum(expected) / len(SIZES), rel=1e-12)


def test_plackett_luce_is_a_distribution_over_rankings():
    # Without ties exp(-NLL) is the probability of one ordering; over all K! orderings they add up to 1.
    r = _rewards(5, seed=3)
    total = 0.0
    for order in itertools.permutations(range(5)):
        scores = [0.0] * 5
        for place, i in enumerate(order):
            scores[i] = float(5 - place)
        total += math.exp(-plackett_luce_loss(*_args(r, scores, (5,)), reduction="sum").item())
    assert total == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["all_pairs", "plackett_luce"])
def test_two_responses_are_the_pairwise_loss_bit_for_bit(name, dtype):
    rc, rr = _rewards(50, seed=1, dtype=dtype), _rewards(50, seed=2, dtype=dtype)
    r = torch.stack([rc, rr], 1).reshape(-1)  # chosen then rejected, prompt after prompt
    got = RANKING_LOSSES[name](r, torch.tensor([1.0, 0.0]).repeat(50), (2,) * 50, reduction="none")
    assert torch.equal(got, pairwise_loss(rc, rr, reduction="none"))
    # and in the other order (the rejected response first in its record) too
    got = RANKING_LOSSES[name](torch.stack([rr, rc], 1).reshape(-1), torch.tensor([0.0, 3.0]).repeat(50), (2,) * 50,
                               reduction="none")
    assert torch.equal(got, pairwise_loss(rc, rr, reduction="none"))


@pytest.mark.parametrize("name", ["all_pairs", "plackett_luce"])
def test_ranking_losses_gradcheck(name):
    r = _rewards().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: RANKING_LOSSES[name](*_args(x), reduction="sum"), (r,))
    assert torch.autograd.gradcheck(lambda x: RANKING_LOSSES[name](*_args(x), reduction="none"), (r,))


@pytest.mark.parametrize("name", ["all_pairs", "plackett_luce"])
def test_order_of_the_responses_within_a_prompt_does_not_matter(name):
    r, s = _rewards(), torch.tensor(SCORES, dtype=torch.float64)
    perm = torch.cat([torch.randperm(k, generator=torch.Generator().manual_seed(k)) + at
                      for k, at in zip(SIZES, np.cumsum((0,) + SIZES[:-1]).tolist())])
    a = RANKING_LOSSES[name](r, s, SIZES, reduction="none")
    b = RANKING_LOSSES[name](r[perm], s[perm], SIZES, reduction="none")
    assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_empty_micro_batch_gives_zero_with_a_gradient_path():
    r = torch.zeros(0, requires_grad=True)
    for loss in RANKING_LOSSES.values():
        value = loss(r, torch.zeros(0), (), reduction="sum")
        value.backward()
        assert value.item() == 0.0 and r.grad is not None
    assert {k: float(v) for k, v in ranking_sums(r, torch.zeros(0), ()).items()} == dict.fromkeys(
        ("prompts", "pairs", "wins", "ties", "best_of_k"), 0.0)


def test_bad_group_sizes_are_refused():
    with pytest.raises(ValueError, match="group sizes"):
        all_pairs_loss(*_args(_rewards(), sizes=(3, 4, 2, 4)))
    with pytest.raises(ValueError, match="1-D of one length"):
        plackett_luce_loss(_rewards(), torch.zeros(3), (3,))


def test_loss_config_names_every_ranking_loss():
    annotation = typing.get_type_hints(LossConfig)["ranking"]
    assert set(typing.get_args(annotation)) == set(RANKING_LOSSES) and LossConfig().ranking == "all_pairs"


@pytest.mark.parametrize("name", ["all_pairs", "plackett_luce"])
def test_one_micro_batch_of_4_prompts_equals_two_of_2(name):
    # The normalisation contract on a real model: each prompt's loss summed, divided by the step's 4 prompts,
    # whether the 4 run in one packed row or in two micro-batches whose gradients accumulate.
    torch.manual_seed(0)
    model = RewardModel(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=64))
    model.init_weights()
    rng = np.random.default_rng(0)
    seqs = [[rng.integers(3, 64, size=rng.integers(4, 12)).astype(np.int32) for _ in range(k)] for k in SIZES]
    data = RankedDataset([f"p{i}" for i in range(4)], seqs, [np.array(s, float) for s in _split(SCORES)])
    loss = RANKING_LOSSES[name]

    def grads(micro_batches):
        model.zero_grad()
        for idx in micro_batches:
            b = collate_ranked(data, idx, pad_id=0)
            r = model(b["input_ids"], position_ids=b["position_ids"], seq_lens=b["seq_lens"])
            (loss(r, b["scores"], b["group_sizes"], reduction="sum") / 4).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    one, two = grads([[0, 1, 2, 3]]), grads([[0, 1], [2, 3]])
    # different packed shapes sum in a different order: fp32 rounding, not a different gradient
    assert all(torch.allclose(one[n], two[n], atol=1e-6, rtol=1e-4) for n in one)
    assert max(g.abs().max().item() for g in one.values()) > 1e-3  # a real gradient, not two zeros


# ----------------------------------------------------------------------------------------------------------------
# The metrics: training-time sums (losses.py) and evaluation (eval/metrics.py)


def brute_counts(rewards, scores, sizes=SIZES):
    """(ordered pairs, wins, reward ties, tied pairs in the data, best-of-K hits, chance) with plain loops."""
    pairs = wins = ties = tied = hits = 0
    chance = 0.0
    for r, s in zip(_split(rewards, sizes), _split(scores, sizes)):
        k = len(r)
        for i in range(k):
            for j in range(k):
                if s[i] > s[j]:
                    pairs += 1
                    wins += r[i] > r[j]
                    ties += r[i] == r[j]
                elif i < j and s[i] == s[j]:
                    tied += 1
        best = [i for i in range(k) if s[i] == max(s)]
        rest = [j for j in range(k) if j not in best]
        hits += all(max(r[i] for i in best) > r[j] for j in rest)
        chance += len(best) / k
    return pairs, wins, ties, tied, hits, chance / len(sizes)


# rewards with ties: between a higher- and a lower-scored response (an error), and at the top of a prompt
TIED_REWARDS = [1.0, 0.5, 1.0] + [2.0, 0.0, 0.0, -1.0] + [0.3, 0.2] + [1.5, 0.7, 1.5, 0.1, 0.1]


@pytest.mark.parametrize("rewards", [TIED_REWARDS, _rewards().tolist()])
def test_metrics_match_brute_force(rewards):
    pairs, wins, ties, tied, hits, chance = brute_counts(rewards, SCORES)
    acc = ranking_accuracy(rewards, SCORES, SIZES)
    assert (acc["pairs"], acc["wins"], acc["ties"], acc["tied_pairs"]) == (pairs, wins, ties, tied)
    assert acc["accuracy"] == pytest.approx(wins / pairs, rel=1e-15)
    best = best_of_k(rewards, SCORES, SIZES)
    assert (best["prompts"], best["hits"]) == (4, hits)
    assert best["chance"] == pytest.approx(chance, rel=1e-15)
    sums = {k: float(v) for k, v in ranking_sums(*_args(torch.tensor(rewards))).items()}
    assert sums == {"prompts": 4, "pairs": pairs, "wins": wins, "ties": ties, "best_of_k": hits}
    assert ranking_metrics_from_sums(sums) == pytest.approx({"acc": wins / pairs, "tie_rate": ties / pairs,
                                                             "best_of_k": hits / 4})


def test_reward_ties_are_errors_and_best_of_k_needs_a_strict_top():
    # every reward equal: no pair won, no prompt's top strictly highest; chance is 1/K (m/K with m tied at the top)
    flat = [0.0] * sum(SIZES)
    assert ranking_accuracy(flat, SCORES, SIZES)["accuracy"] == 0.0
    best = best_of_k(flat, SCORES, SIZES)
    assert best["accuracy"] == 0.0 and best["chance"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 2 + 2 / 5) / 4)
    # the data's order itself wins everything
    perfect = ranking_accuracy(SCORES, SCORES, SIZES)
    assert perfect["accuracy"] == 1.0 and best_of_k(SCORES, SCORES, SIZES)["accuracy"] == 1.0
    assert math.isnan(ranking_accuracy([], [], [])["accuracy"]) and math.isnan(best_of_k([], [], [])["accuracy"])
