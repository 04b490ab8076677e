"""rmcore/lean_ops.py: each hand-written backward against finite differences (gradcheck, float64), and forward and
backward against autograd through the plain formulas in fp32 and bf16 (the dtypes a run uses)."""
import pytest
import torch
import torch.nn.functional as F

from rmcore.generate import token_logprobs
from rmcore.lean_ops import RMSNormFunction, SwiGLUFunction, rms_norm, swiglu, token_logprobs_and_entropy
from rmcore.rl import token_entropy


def plain_rms_norm(x, weight, eps):
    x32 = x.float() if x.dtype != torch.float64 else x
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def plain_swiglu(gate, up):
    return F.silu(gate) * up


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a, w, 1e-5), (x, weight))
    gate, up = (torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(swiglu, (gate, up))


@pytest.mark.parametrize("dtype,weight_dtype,tol", [(torch.float32, torch.float32, 1e-5),
                                                    (torch.bfloat16, torch.float32, 2e-2),
                                                    (torch.bfloat16, torch.bfloat16, 2e-2)])
def test_same_outputs_and_gradients_as_autograd_of_the_plain_formulas(dtype, weight_dtype, tol):
    """The forward is the same computation (equal bit for bit); the gradients agree to the dtype's rounding."""
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(4, 5, 16, generator=g) * 3 for _ in range(3)]
    w = torch.randn(16, generator=g)
    grad_y = torch.randn(4, 5, 16, generator=g)
    for lean, plain, inputs in ((rms_norm, plain_rms_norm, lambda: (base[0].to(dtype), w.to(weight_dtype))),
                                (swiglu, plain_swiglu, lambda: (base[1].to(dtype), base[2].to(dtype)))):
        results = []
        for f in (lean, plain):
            args = [t.clone().requires_grad_() for t in inputs()]
            y = f(*args, 1e-5) if f in (rms_norm, plain_rms_norm) else f(*args)
            y.backward(grad_y.to(y.dtype))
            results.append((y.detach(), [a.grad for a in args]))
        (y_lean, grads_lean), (y_plain, grads_plain) = results
        assert torch.equal(y_lean, y_plain)
        for a, b in zip(grads_lean, grads_plain):
            assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_autograd_the_same_outputs_as_the_functions(dtype):
    """Under no_grad (sampling, scoring) rms_norm and swiglu skip autograd.Function; their outputs stay bit-identical
    to the Functions' forwards, and with autograd on they still build the Functions' graph."""
    g = torch.Generator().manual_seed(4)
    x, gate, up = (torch.randn(3, 7, 16, generator=g).to(dtype) for _ in range(3))
    w = torch.randn(16, generator=g).to(dtype)
    with torch.no_grad():
        fast = rms_norm(x, w, 1e-5), swiglu(gate, up)
    assert fast[0].grad_fn is None and fast[1].grad_fn is None
    assert torch.equal(fast[0], RMSNormFunction.apply(x, w, 1e-5))
    assert torch.equal(fast[1], SwiGLUFunction.apply(gate, up))
    tracked = rms_norm(x, w.clone().requires_grad_(), 1e-5), swiglu(gate.clone().requires_grad_(), up)
    assert type(tracked[0].grad_fn).__name__ == "RMSNormFunctionBackward"
    assert type(tracked[1].grad_fn).__name__ == "SwiGLUFunctionBackward"
    assert torch.equal(tracked[0].detach(), fast[0]) and torch.equal(tracked[1].detach(), fast[1])


def test_logprob_and_entropy_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 11, dtype=torch.float64, generator=g, requires_grad=True)
    tokens = torch.randint(0, 11, (5,), generator=g)
    weights = torch.randn(2, 5, dtype=torch.float64, generator=g)  # both outputs feed the checked sum

    def f(z):
        logp, ent = token_logprobs_and_entropy(z, tokens, temperature=0.7)
        return (weights[0] * logp + weights[1] * ent).sum()
    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_logprob_and_entropy_match_the_plain_formulas_and_their_autograd(dtype, tol):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 300, generator=g) * 4
    tokens = torch.randint(0, 300, (6,), generator=g)
    weights = torch.randn(2, 6, generator=g)
    results = []
    for lean in (True, False):
        logits = base.to(dtype).requires_grad_()
        if lean:
            logp, ent = token_logprobs_and_entropy(logits, tokens, temperature=0.7)
        else:
            logp, ent = token_logprobs(logits, tokens, 0.7), token_entropy(logits.float() / 0.7)
        (weights[0] * logp + weights[1] * ent).sum().backward()
        results.append((logp, ent, logits.grad.float()))
    for lean, plain in zip(*results):
        assert torch.allclose(lean, plain, atol=tol, rtol=tol)
