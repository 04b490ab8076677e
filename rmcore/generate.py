"""Batched sampling with a KV cache (gpt-fast style): prompts left-padded, one cache slot per column.

Prompts are left-padded so every row's next token lands in the same cache slot; `attention_mask` keeps the
padding out of attention and position ids count only real tokens, so a padded prompt generates exactly what it
would alone. A row stops at EOS or when its decoded response contains a stop string; everything after its stop is
padding (pad_id, never EOS).

Safe under FSDP2: every forward is a collective there, so all ranks take the same number of decoding steps — a
rank whose rows are all done keeps stepping (on padding) until every rank is done. Logits that are NaN or inf stop
every rank with one error (NonFiniteOutputs), never a sampler's traceback.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from rmcore.data.batching import pad
from rmcore.errors import NonFiniteOutputs
from rmcore.model import CausalLM, KVCache, default_position_ids


@contextmanager
def kv_cache(model: CausalLM, batch_size: int, max_len: int, dtype: torch.dtype, device):
    """Attach a fresh KV cache (in the compute dtype) to every attention layer for the duration of the block."""
    cfg = model.cfg
    for layer in model.model.layers:
        layer.self_attn.kv_cache = KVCache(batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, dtype=dtype,
                                           device=device)
    try:
        yield
    finally:
        for layer in model.model.layers:
            layer.self_attn.kv_cache = None


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from last-position logits (B, vocab); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = divided(logits.float(), temperature)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p; the most likely token always stays
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return draw(logits.softmax(-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row, index i with probability probs[i] (rows need not sum to 1): the inverse CDF at one
    uniform number per row. torch.multinomial draws one exponential number per vocabulary entry instead, a tenth
    of a decoding step's time at batch 16-64 on a CPU."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    # right=True: the first index whose cumulative mass exceeds u, so a zero-probability index is never drawn
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token]: the log-probability the sampler gave each token (temperature 0
    and 1 both mean the raw logits)."""
    logits = divided(logits.float(), temperature if temperature > 0 else 1.0)
    return torch.gather(logits.log_softmax(-1), -1, tokens[..., None]).squeeze(-1)


def divided(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature; at 1 the logits themselves (x / 1 is x exactly: a pass over B x vocab saved per step)."""
    return logits if temperature == 1 else logits / temperature


def cut_at_stop(text: str, stop_strings: tuple[str, ...] = ()) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found): the one place a response is cut, used by
    generation, scoring and training alike."""
    cuts = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


@dataclass
class Rollout:
    """Prompts and sampled responses, as a training step needs them.

    sequences (B, P + T): the left-padded prompts, then the responses right-padded with pad_id.
    attention_mask (B, P + T): 1 on real tokens (prompt, and response up to and including its stop).
    response_mask (B, T): 1 on response tokens up to and including the token that stopped the row.
    logprobs (B, T) or None: log-prob of each sampled token under logits / temperature; 0 on padding.
    stopped (B,): the row ended at EOS or a stop string (False: cut at max_new_tokens).
    """
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None
    stopped: torch.Tensor
    prompt_width: int

    def responses(self) -> list[list[int]]:
        """Each row's response tokens, up to and including its stop."""
        rows = self.sequences[:, self.prompt_width:].tolist()
        return [r[:n] for r, n in zip(rows, self.response_mask.sum(-1).tolist())]


@torch.no_grad()
def rollout(model: CausalLM, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
            temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
            generator: torch.Generator | None = None, with_logprobs: bool = False,
            stop_strings: tuple[str, ...] = (), tokenizer=None, dtype: torch.dtype | None = None,
            compile_decoding: bool = False) -> Rollout:
    """Sample a response for every prompt (token lists). dtype: the compute dtype, that of the KV cache (default:
    autocast's when autocast is on, else the weights'; under FSDP2 mixed precision pass it, the sharded weights
    stay fp32). stop_strings need the tokenizer to read the responses. compile_decoding: run the decoding step through
    torch.compile (compiled_decode_step), one process only."""
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the responses")
    if compile_decoding and torch_dist.is_initialized():
        raise ValueError("a compiled decoding step is not supported under torch.distributed (FSDP2's per-block "
                         "hooks run inside it and are untested there); sample without compile")
    step = compiled_decode_step() if compile_decoding else decode_step
    device = model.lm_head.weight.device
    if dtype is None:
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else model.lm_head.weight.dtype)
    input_ids, attention_mask = pad(prompts, pad_id, side="left", device=device)
    B, P = input_ids.shape
    mask = torch.cat([attention_mask, torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)], 1)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device) if with_logprobs else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    responses = [[] for _ in range(B)]  # host copies of the rows' tokens, read by the stop-string check
    was_training = model.training
    model.eval()
    steps = 0
    # each distinct prompt is prefilled once: the K samples of a prompt share its cache rows and last logits
    index_of, firsts, source = {}, [], []  # distinct prompt -> its index; each one's first row; each row's index
    for row, p in enumerate(prompts):
        if tuple(p) not in index_of:
            index_of[tuple(p)] = len(firsts)
            firsts.append(row)
        source.append(index_of[tuple(p)])
    firsts, source = torch.tensor(firsts, device=device), torch.tensor(source, device=device)
    with kv_cache(model, len(firsts), P + max_new_tokens, dtype, device):
        # prefill: the whole prompt at slots 0..P-1
        logits = model(input_ids[firsts], attention_mask=mask[firsts, :P],
                       position_ids=default_position_ids(attention_mask[firsts]),
                       cache_slots=torch.arange(P, device=device), keep_last=1)[:, -1]
        if len(firsts) < B:
            logits = logits[source]
            for layer in model.model.layers:
                cache = layer.self_attn.kv_cache
                cache.k, cache.v = cache.k[source], cache.v[source]
        position = attention_mask.sum(-1)  # next position of each row = its number of real tokens
        for t in range(max_new_tokens):
            _check_finite(logits, ~done, t, device)
            token = sample_next(logits, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            out[:, t] = token
            mask[:, P + t] = (~done).long()
            if logprobs is not None:
                logprobs[:, t] = torch.where(done, 0.0, token_logprobs(logits, token, temperature))
            ended = ~done & (token == eos_id)
            if stop_strings:
                hits = []
                for row, (tok, live) in enumerate(zip(token.tolist(), (~done & ~ended).tolist())):
                    responses[row].append(tok)
                    if live and cut_at_stop(tokenizer.decode(responses[row]), stop_strings)[1]:
                        hits.append(row)
                if hits:
                    ended[hits] = True
            stopped |= ended
            done |= ended
            steps = t + 1
            if t == max_new_tokens - 1 or _all_ranks_done(bool(done.all()), device):
                break
            # eager: attend over the filled columns only (the cache is read from memory every step: at batch 32 it
            # is ~a quarter of the weights' bytes); compiled: over the whole cache, one shape for every step
            seen = mask if compile_decoding else mask[:, :P + t + 1]
            logits = step(model, token[:, None], seen, position[:, None], torch.tensor([P + t], device=device))
            position = position + 1
    model.train(was_training)
    response_mask = mask[:, P:].clone()
    response_mask[:, steps:] = 0
    return Rollout(sequences=torch.cat([input_ids, out], 1), attention_mask=mask, response_mask=response_mask,
                   logprobs=logprobs, stopped=stopped, prompt_width=P)


def decode_step(model: CausalLM, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor,
                slot: torch.Tensor) -> torch.Tensor:
    """Logits (B, vocab) of one new token per row (token, position: (B, 1)) written at cache column slot (1,),
    attending over the cache columns `mask` (B, columns) covers. The whole cache works too: the causal mask hides
    the columns after slot, and every step then has the same shapes (one compiled graph serves them all)."""
    return model(token, attention_mask=mask, position_ids=position, cache_slots=slot)[:, -1]


@functools.cache
def compiled_decode_step():
    """decode_step through torch.compile, built once per process. It fuses the ~45 small operations per layer
    (norms, RoPE, cache writes, SiLU, residuals) between the matrix products: bench/README.md, generation, has the
    speed and the first call's compile time. One graph serves every batch size > 1 and cache length, so a loop
    whose prompt widths change from batch to batch does not recompile: dynamic=True, and the KV cache (buffers,
    which dynamo otherwise takes as fixed in shape like the weights) sized per call too."""
    compiled = torch.compile(decode_step, dynamic=True)

    def step(*args):
        with torch._dynamo.config.patch(force_parameter_static_shapes=False):
            return compiled(*args)

    return step


def _check_finite(logits: torch.Tensor, live: torch.Tensor, t: int, device):
    """NonFiniteOutputs on every rank when any rank's live rows have NaN or inf logits (sampling would
    fail on one rank only, with a traceback, and leave the others waiting in the next collective). A row whose sum
    is finite has no NaN or inf, so only the rest are checked entry by entry: one read of the logits a step, where
    isfinite().all() writes a mask and reads it again (4 ms a step at batch 64, Zen 4)."""
    suspect = ~torch.isfinite(logits.sum(-1)) & live
    bad = int((~torch.isfinite(logits[suspect]).all(-1)).sum()) if bool(suspect.any()) else 0
    if torch_dist.is_initialized():
        flag = torch.tensor([bad], device=device)
        torch_dist.all_reduce(flag)
        bad = int(flag)
    if bad:
        raise NonFiniteOutputs(f"the model's logits are NaN or inf for {bad} row(s) at new token {t + 1}: its weights "
                               f"are broken (a run that skipped non-finite steps?), nothing can be sampled from them")


def _all_ranks_done(local_done: bool, device) -> bool:
    """True when every rank's rows are done; one tiny collective per decoding step under torchrun."""
    if not torch_dist.is_initialized():
        return local_done
    flag = torch.tensor([0 if local_done else 1], device=device)
    torch_dist.all_reduce(flag)
    return int(flag) == 0


def generate(model: CausalLM, prompts: list[list[int]], **settings) -> list[list[int]]:
    """The new tokens of each row, ending at its EOS (included) or stop, or after max_new_tokens; `settings` are
    rollout's (max_new_tokens, eos_id, pad_id, temperature, ...)."""
    return rollout(model, prompts, **settings).responses()
