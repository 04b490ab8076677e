"""Batched sampling with a KV cache (gpt-fast style): prompts left-padded, one cache slot per column.

Prompts are left-padded so every row's next token lands in the same cache slot; `attention_mask` keeps the
padding out of attention and position ids count only real tokens, so a padded prompt generates exactly what it
would alone. Rows stop at EOS independently; after its EOS a row emits pad_id.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from rmcore.model import CausalLM, KVCache, default_position_ids


@contextmanager
def kv_cache(model: CausalLM, batch_size: int, max_len: int):
    """Attach a fresh KV cache to every attention layer for the duration of the block."""
    cfg, dtype = model.cfg, model.lm_head.weight.dtype
    device = model.lm_head.weight.device
    for layer in model.model.layers:
        layer.self_attn.kv_cache = KVCache(batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, dtype, device)
    try:
        yield
    finally:
        for layer in model.model.layers:
            layer.self_attn.kv_cache = None


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask), padded on the left to the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from last-position logits (B, vocab); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p; the most likely token always stays
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: CausalLM, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Sample continuations of token-id prompts; returns the new tokens of each row, ending at its EOS
    (included) or after max_new_tokens."""
    device = model.lm_head.weight.device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    B, P = input_ids.shape
    total = P + max_new_tokens
    mask = torch.cat([attention_mask, torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)], 1)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    with kv_cache(model, B, total):
        # prefill: the whole prompt at slots 0..P-1
        slots = torch.arange(P, device=device)
        logits = model(input_ids, attention_mask=mask, position_ids=default_position_ids(attention_mask),
                       cache_slots=slots)[:, -1]
        position = attention_mask.sum(-1)  # next position of each row = its number of real tokens
        for t in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            out[:, t] = token
            mask[:, P + t] = (~done).long()
            done |= token == eos_id
            if done.all() or t == max_new_tokens - 1:
                break
            slot = torch.tensor([P + t], device=device)
            logits = model(token[:, None], attention_mask=mask, position_ids=position[:, None],
                           cache_slots=slot)[:, -1]
            position = position + 1
    model.train(was_training)
    result = []
    for row, finished in zip(out.tolist(), done.tolist()):
        result.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return result
