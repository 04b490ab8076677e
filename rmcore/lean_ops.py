"""Two layers of the model, and the policy loss's per-token log-prob and entropy, written as autograd Functions that
keep less for the backward than autograd would.

Autograd keeps every intermediate a backward formula reads: RMSNorm its input and its normalised output, SwiGLU the
gate, its SiLU and the up projection. These keep only what the backward cannot cheaply recompute, and recompute the
rest from it (elementwise work, no matmul): at SmolLM2-135M's shape 23% fewer numbers kept per token (1.412 -> 1.087
MB over its 30 layers in fp32; bench/README.md, the reward-model stage's memory). The log-prob and entropy of a
49,152-entry vocabulary take one pass over the logits each way instead of autograd's two log-softmaxes, exp, product
and their backwards (rmcore.rl's token_logprobs and token_entropy are the formulas). The forwards compute what the
plain formulas compute; the backwards are hand-derived gradients, checked against finite differences in
tests/test_lean_ops.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or in its own dtype when that is wider (float64: what a gradient check runs in)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class RMSNormFunction(torch.autograd.Function):
    """y = w * (x / sqrt(mean(x^2) + eps)), normalised in fp32, scaled in x's dtype; keeps x and 1/sqrt(...)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        normed = wide(x) * rstd
        grad_normed = wide(grad_y) * wide(weight)
        # d/dx of x * rstd: rstd * (g - normed * mean(g * normed)), the mean over the normalised dimension
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        grad_weight = (wide(grad_y) * wide(normed.to(x.dtype))).reshape(-1, weight.shape[-1]).sum(0)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * x / sqrt(mean(x^2) + eps) (RMSNormFunction)."""
    if not needs_backward(x, weight):  # sampling, scoring: the same ops without the Function's per-call overhead
        return rms_norm_forward(x, weight, eps)[0]
    return RMSNormFunction.apply(x, weight, eps)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): rstd = 1 / sqrt(mean(x^2) + eps) in fp32, y = w * (x * rstd) cast to x's dtype before the scale."""
    x32 = wide(x)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


class SwiGLUFunction(torch.autograd.Function):
    """y = silu(gate) * up; keeps gate and up, recomputes silu(gate) in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_y):
        gate, up = ctx.saved_tensors
        # d/dgate = dy * up * silu'(gate), by the kernel autograd itself uses for silu; d/dup = dy * silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad_y * up, gate)
        return grad_gate, grad_y * F.silu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y = silu(gate) * up (SwiGLUFunction)."""
    if not needs_backward(gate, up):
        return F.silu(gate) * up
    return SwiGLUFunction.apply(gate, up)


def needs_backward(*inputs: torch.Tensor) -> bool:
    """Whether autograd will record an op on these inputs. Where it will not (no_grad, frozen weights and inputs),
    the Functions above would keep nothing, and going through autograd.Function costs 4-11 us a call on a CPU (Zen 4,
    one token's row): ~0.6 ms of a ~45-50 ms decoding step at batch 1 (SmolLM2-135M, bf16)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


class TokenLogprobEntropyFunction(torch.autograd.Function):
    """Per row of z = logits / temperature, with log p = z - lse(z): log p_y and H = -sum_v p_v log p_v; keeps the
    logits, lse and H (two numbers per row), and recomputes log p in the backward."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature: float):
        z = wide(logits) / temperature
        lse = torch.logsumexp(z, -1)
        logp_all = z.sub_(lse[..., None])
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        ctx.save_for_backward(logits, tokens, lse, entropy)
        ctx.temperature = temperature
        return logp_all.gather(-1, tokens[..., None]).squeeze(-1), entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, tokens, lse, entropy = ctx.saved_tensors
        logp_all = (wide(logits) / ctx.temperature).sub_(lse[..., None])
        p = logp_all.exp()
        # d log p_y / dz = onehot(y) - p;  dH / dz = -p * (log p + H)
        grad = logp_all.add_(entropy[..., None]).mul_(grad_entropy[..., None]).add_(grad_logp[..., None]).mul_(p).neg_()
        grad.scatter_add_(-1, tokens[..., None], grad_logp[..., None])
        return grad.div_(ctx.temperature).to(logits.dtype), None, None


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(z)[token], -sum_v p_v log p_v) with z = logits / temperature, in fp32 (TokenLogprobEntropyFunction;
    temperature 0 means the raw logits, as rmcore.generate.token_logprobs)."""
    return TokenLogprobEntropyFunction.apply(logits, tokens, temperature if temperature > 0 else 1.0)
