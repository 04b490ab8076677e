"""PPO / RLOO / GRPO math against brute-force loops over plain Python numbers."""
import math

import torch

from rmcore.rl import (
    adaptive_beta,
    entropy,
    gae,
    grpo_advantages,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    token_rewards,
    value_loss,
)

g = torch.Generator().manual_seed(0)
B, T = 3, 6
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float64)


def rand(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_gae_equals_the_recursion_written_out():
    r, v = rand(B, T), rand(B, T)
    adv, ret = gae(r, v, MASK, gamma=0.9, lam=0.8)
    for b in range(B):
        n = int(MASK[b].sum())
        for t in range(n):
            # A_t = sum_l (gamma lam)^l delta_{t+l}, with V beyond the last real token = 0
            want = 0.0
            for j in range(t, n):
                nxt = float(v[b, j + 1]) if j + 1 < n else 0.0
                delta = float(r[b, j]) + 0.9 * nxt - float(v[b, j])
                want += (0.9 * 0.8) ** (j - t) * delta
            assert math.isclose(float(adv[b, t]), want, rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(float(ret[b, t]), want + float(v[b, t]), rel_tol=1e-9, abs_tol=1e-12)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_score_lands_on_the_last_real_token_only():
    score, kl = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), rand(B, T)
    r = token_rewards(score, kl, MASK, beta=0.1)
    for b in range(B):
        n = int(MASK[b].sum())
        for t in range(T):
            want = (-0.1 * float(kl[b, t]) if t < n else 0.0) + (float(score[b]) if t == n - 1 else 0.0)
            assert math.isclose(float(r[b, t]), want, abs_tol=1e-12)


def test_kl_estimators():
    lp, lr = rand(B, T), rand(B, T)
    assert torch.equal(kl_k1(lp, lr), lp - lr)
    k3 = kl_k3(lp, lr)
    assert (k3 >= 0).all()
    assert math.isclose(float(k3[0, 0]), math.exp(float(lr[0, 0] - lp[0, 0])) - 1 - float(lr[0, 0] - lp[0, 0]),
                        rel_tol=1e-12)
    # both estimate KL(p || q) for samples x ~ p: check on a small categorical, exactly in expectation
    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    kl = float((p * (p / q).log()).sum())
    for est in (kl_k1, kl_k3):
        assert math.isclose(float((p * est(p.log(), q.log())).sum()), kl, rel_tol=1e-12)


def test_rloo_and_grpo_by_hand():
    s = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    rloo = rloo_advantages(s, 3)
    assert torch.allclose(rloo, torch.tensor([1 - 3.0, 2 - 2.5, 4 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0],
                                             dtype=torch.float64))
    grpo = grpo_advantages(s, 3, eps=0.0)
    for i in range(6):
        grp = [float(x) for x in s[(i // 3) * 3:(i // 3) * 3 + 3]]
        mean = sum(grp) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / 2)
        assert math.isclose(float(grpo[i]), (float(s[i]) - mean) / std, rel_tol=1e-12)


def test_clipped_losses_by_brute_force():
    lp, lo, adv, v, vo, ret = (rand(B, T) for _ in range(6))
    n = MASK.sum()
    want_pi = want_v = 0.0
    for b in range(B):
        for t in range(T):
            if MASK[b, t]:
                rho = math.exp(float(lp[b, t] - lo[b, t]))
                a = float(adv[b, t])
                want_pi += max(-a * rho, -a * min(max(rho, 0.8), 1.2))
                vc = float(vo[b, t]) + min(max(float(v[b, t] - vo[b, t]), -0.2), 0.2)
                want_v += 0.5 * max((float(v[b, t] - ret[b, t])) ** 2, (vc - float(ret[b, t])) ** 2)
    assert math.isclose(float(policy_loss(lp, lo, adv, MASK, 0.2)[0]), want_pi / float(n), rel_tol=1e-9)
    assert math.isclose(float(value_loss(v, vo, ret, MASK, 0.2)[0]), want_v / float(n), rel_tol=1e-9)


def test_whitening_entropy_and_adaptive_beta():
    x = rand(B, T)
    w = masked_whiten(x, MASK)
    real = w[MASK.bool()]
    assert abs(float(real.mean())) < 1e-9 and abs(float((real ** 2).mean()) - 1) < 1e-6
    assert (w[~MASK.bool()] == 0).all()
    kept = masked_whiten(x, MASK, shift_mean=False)[MASK.bool()]
    assert math.isclose(float(kept.mean()), float(x[MASK.bool()].mean()), rel_tol=1e-9)
    logits = rand(B, T, 5)
    p = logits.softmax(-1)
    want = sum(float(-(p[b, t] * p[b, t].log()).sum())
               for b in range(B) for t in range(T) if MASK[b, t]) / float(MASK.sum())
    assert math.isclose(float(entropy(logits, MASK)), want, rel_tol=1e-6)  # computed in fp32, as for bf16 logits
    assert math.isclose(adaptive_beta(0.1, 12.0, 6.0, 100, 10000), 0.1 * (1 + 0.2 * 100 / 10000))
    assert math.isclose(adaptive_beta(0.1, 5.4, 6.0, 100, 10000), 0.1 * (1 - 0.1 * 100 / 10000))


# ------------------------------------------------------------------------------------------------ the list
def test_gae_limits_and_padding_values():
    r, v = rand(B, T), rand(B, T)
    gamma = 0.9
    _, ret = gae(r, v, MASK, gamma=gamma, lam=1.0)
    adv0, _ = gae(r, v, MASK, gamma=gamma, lam=0.0)
    for b in range(B):
        n = int(MASK[b].sum())
        for t in range(n):
            to_go = sum(gamma ** (j - t) * float(r[b, j]) for j in range(t, n))  # discounted reward-to-go
            assert math.isclose(float(ret[b, t]), to_go, rel_tol=1e-9, abs_tol=1e-12)
            nxt = float(v[b, t + 1]) if t + 1 < n else 0.0
            assert math.isclose(float(adv0[b, t]), float(r[b, t]) + gamma * nxt - float(v[b, t]), rel_tol=1e-9,
                                abs_tol=1e-12)
    noisy = torch.where(MASK.bool(), v, rand(B, T) * 100)
    for lam in (0.0, 0.95, 1.0):
        a1, r1 = gae(r, v, MASK, gamma=gamma, lam=lam)
        a2, r2 = gae(r, noisy, MASK, gamma=gamma, lam=lam)
        assert torch.equal(a1, a2) and torch.equal(r1, r2)


def test_policy_and_value_loss_at_ratio_one_and_where_clipped():
    lp, adv, v, ret = rand(B, T), rand(B, T), rand(B, T), rand(B, T)
    loss, clipfrac = policy_loss(lp, lp.clone(), adv, MASK, 0.2)
    assert math.isclose(float(loss), float(masked_mean(-adv, MASK)), rel_tol=1e-12)  # = the unclipped loss
    assert float(clipfrac) == 0.0
    # tokens pushed outside the clip range in the direction the advantage favours: no gradient there
    old = lp.detach().clone()
    # rho = e^0.5 > 1.2 where A > 0, < 0.8 where A < 0
    new = (old + torch.where(adv > 0, 0.5, -0.5)).requires_grad_(True)
    loss, clipfrac = policy_loss(new, old, adv, MASK, 0.2)
    loss.backward()
    assert float(clipfrac) == 1.0
    assert (new.grad == 0).all()
    # inside the range the gradient is -A rho / n
    inside = (old + 0.05).requires_grad_(True)
    policy_loss(inside, old, adv, MASK, 0.2)[0].backward()
    want = -adv * torch.exp(torch.tensor(0.05, dtype=torch.float64)) * MASK / MASK.sum()
    assert torch.allclose(inside.grad, want, rtol=1e-9, atol=1e-12)
    vl, vclip = value_loss(v, v.clone(), ret, MASK, 0.2)
    assert math.isclose(float(vl), float(0.5 * masked_mean((v - ret) ** 2, MASK)), rel_tol=1e-12)
    assert float(vclip) == 0.0


def test_k3_and_the_non_score_reward():
    lp, lr = rand(B, T), rand(B, T)
    assert (kl_k3(lp, lr) >= 0).all()
    assert torch.equal(kl_k3(lp, lp.clone()), torch.zeros(B, T, dtype=torch.float64))
    assert (kl_k3(lp, lp + 1e-3) > 0).all()
    score, kl = rand(B), kl_k1(lp, lr)
    r = token_rewards(score, kl, MASK, beta=0.07)
    non_score = token_rewards(torch.zeros(B, dtype=torch.float64), kl, MASK, beta=0.07)
    assert math.isclose(float(non_score.sum()), float(-0.07 * (kl * MASK).sum()), rel_tol=1e-12)
    landed = (r - non_score) != 0
    assert landed.sum(-1).tolist() == [1, 1, 1]
    # row 0 runs to the length limit (no EOS, no padding): the score is on its last token all the same
    assert [int(landed[b].nonzero()) for b in range(B)] == [T - 1, 2, 0]


def test_padding_never_changes_a_loss():
    lp, lo, adv, v, vo, ret = (rand(B, T) for _ in range(6))
    logits = rand(B, T, 7)
    pad = ~MASK.bool()
    noise = lambda x: torch.where(pad, x + rand(*x.shape) * 1e3, x)  # noqa: E731
    assert torch.equal(policy_loss(lp, lo, adv, MASK)[0], policy_loss(noise(lp), lo, adv, MASK)[0])
    assert torch.equal(value_loss(v, vo, ret, MASK)[0], value_loss(noise(v), vo, ret, MASK)[0])
    assert torch.equal(entropy(logits, MASK), entropy(torch.where(pad[..., None], logits * 50, logits), MASK))
    assert torch.equal(masked_whiten(adv, MASK), masked_whiten(noise(adv), MASK))


def test_group_advantages_by_brute_force_and_identical_rewards():
    k = 4
    s = rand(5 * k)
    rloo, grpo = rloo_advantages(s, k), grpo_advantages(s, k, eps=1e-4)
    for i in range(len(s)):
        group = [float(x) for x in s[(i // k) * k:(i // k) * k + k]]
        others = [x for j, x in enumerate(group) if (i // k) * k + j != i]
        assert math.isclose(float(rloo[i]), float(s[i]) - sum(others) / (k - 1), rel_tol=1e-9)
        mean = sum(group) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))
        assert math.isclose(float(grpo[i]), (float(s[i]) - mean) / (std + 1e-4), rel_tol=1e-9)
    same = torch.full((2 * k,), 3.7, dtype=torch.float64)
    assert (rloo_advantages(same, k) == 0).all() and (grpo_advantages(same, k) == 0).all()


def test_adaptive_beta_direction_and_bounds():
    beta = 0.1
    for kl, direction in ((30.0, 1), (6.0, 0), (0.0, -1), (5.0, -1), (7.0, 1)):
        new = adaptive_beta(beta, kl, 6.0, 512, 10000)
        assert (new > beta) - (new < beta) == direction
        assert beta * (1 - 0.2 * 512 / 10000) - 1e-15 <= new <= beta * (1 + 0.2 * 512 / 10000) + 1e-15
    b = beta
    for _ in range(1000):  # far above target for long: beta grows geometrically, never faster than the bound
        b = adaptive_beta(b, 1e6, 6.0, 512, 10000)
    assert math.isclose(b, beta * (1 + 0.2 * 512 / 10000) ** 1000, rel_tol=1e-9)
