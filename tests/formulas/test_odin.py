"""ODIN's loss terms (rmcore/odin.py) against numpy and brute-force loops, with gradient checks."""
import math

import numpy as np
import pytest
import torch

from rmcore.odin import (
    head_orthogonality_loss,
    length_correlation_loss,
    pearson,
    quality_decorrelation_loss,
)


def brute_pearson(x, y):
    """Pearson correlation written out term by term."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    vx = sum((a - mx) ** 2 for a in x)
    vy = sum((b - my) ** 2 for b in y)
    return cov / math.sqrt(vx * vy)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pearson_matches_numpy_and_a_loop(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=17), rng.integers(3, 90, size=17).astype(float)
    got = float(pearson(torch.from_numpy(x), torch.from_numpy(y)))
    assert got == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert got == pytest.approx(brute_pearson(x.tolist(), y.tolist()), abs=1e-12)


def test_length_terms_are_the_signed_and_absolute_correlations():
    rng = np.random.default_rng(3)
    lengths = rng.integers(5, 60, size=12).astype(float)
    r_length = 0.1 * lengths + rng.normal(size=12)       # correlates positively
    r_quality = -0.05 * lengths + rng.normal(size=12)    # correlates negatively
    rho_l = brute_pearson(r_length.tolist(), lengths.tolist())
    rho_q = brute_pearson(r_quality.tolist(), lengths.tolist())
    assert rho_l > 0 > rho_q
    t = torch.from_numpy
    assert float(length_correlation_loss(t(r_length), t(lengths))) == pytest.approx(-rho_l, abs=1e-12)
    assert float(quality_decorrelation_loss(t(r_quality), t(lengths))) == pytest.approx(abs(rho_q), abs=1e-12)


def test_orthogonality_is_the_absolute_dot_product():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=9), rng.normal(size=9)
    expected = abs(sum(x * y for x, y in zip(a.tolist(), b.tolist())))
    got = float(head_orthogonality_loss(torch.from_numpy(a), torch.from_numpy(b)))
    assert got == pytest.approx(expected, abs=1e-12)
    assert float(head_orthogonality_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))) == 0.0


def test_constant_lengths_give_zero_not_nan():
    """A batch whose responses all have one length carries no correlation: the term and its gradient are 0."""
    r = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    loss = quality_decorrelation_loss(r, torch.full((3,), 7.0))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(r.grad, torch.zeros(3))


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(5)
    lengths = torch.from_numpy(rng.integers(5, 60, size=8).astype(float))
    r = torch.from_numpy(rng.normal(size=8)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: length_correlation_loss(x, lengths), (r,))
    assert torch.autograd.gradcheck(lambda x: quality_decorrelation_loss(x, lengths), (r,))
    w = torch.from_numpy(rng.normal(size=(2, 6))).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: head_orthogonality_loss(x[0], x[1]), (w,))


def test_bf16_inputs_are_computed_in_fp32():
    x = torch.tensor([1.0, 2.0, 3.5, 4.0]).bfloat16()
    y = torch.tensor([10.0, 20.0, 25.0, 41.0])
    assert pearson(x, y).dtype == torch.float32


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="1-D"):
        pearson(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="vectors"):
        head_orthogonality_loss(torch.zeros(3), torch.zeros(2, 3))
