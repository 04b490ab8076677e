"""Rollouts, as raft.py, ppo.py and eval.py compare take them: the prompt pool, K samples per prompt, and the
samples packed into one batch and scored by a model in a single forward pass (log-probs, values).

A sample's response text is what the policy wrote after the rendered prompt, cut at its stop (EOS or a stop
string, rmcore.generate.cut_at_stop): the same text is scored by the reward and trained on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from rmcore.data.batching import pad
from rmcore.data.formats import read_examples
from rmcore.data.records import Report
from rmcore.data.template import HUMAN, Template
from rmcore.generate import cut_at_stop, rollout, token_logprobs
from rmcore.model import default_position_ids


@dataclass
class PromptPool:
    """Prompts (HH form) and their token ids as the policy sees them (rendered, with BOS where the model adds it)."""
    prompts: list[str]
    ids: list[list[int]]
    report: Report

    def __len__(self):
        return len(self.prompts)

    def draw(self, n: int, seed: int, iteration: int, order: str = "redraw") -> list[int]:
        """n prompt indices for one iteration. redraw: a fresh permutation per iteration (seeded), cycled when
        n > pool; pass: iteration i takes the next n of a stream of passes through the pool, each pass a new
        permutation, so no prompt comes back before the whole pool has been drawn."""
        if order == "redraw":
            return np.resize(np.random.default_rng([seed, iteration]).permutation(len(self)), n).tolist()
        out, position = [], iteration * n
        while len(out) < n:
            epoch, offset = divmod(position, len(self))
            permutation = np.random.default_rng([seed, epoch, 1]).permutation(len(self))
            taken = permutation[offset:offset + n - len(out)].tolist()
            out += taken
            position += len(taken)
        return out


def load_prompts(specs: list[str], tokenizer, template: Template, *, max_tokens: int, name: str, fmt: str = "auto",
                 skip_bad_lines: bool = False) -> PromptPool:
    """The prompt of every record (any training format), in file order; prompts whose rendered ids exceed
    max_tokens are dropped and counted, like every other drop."""
    examples, report = read_examples(specs, fmt=fmt, skip_bad_lines=skip_bad_lines, name=name)
    template.check(tokenizer)
    prompts, ids = [], []
    for e in examples:
        tokens = tokenizer.encode(template.render(e.prompt), bos=True, specials=template.special_tokens)
        if len(tokens) > max_tokens:
            report.drop(f"prompt longer than {max_tokens} tokens", e.id)
            continue
        prompts.append(e.prompt)
        ids.append(tokens)
    report.kept = len(prompts)
    return PromptPool(prompts, ids, report)


def default_stop_strings(template: Template) -> tuple[str, ...]:
    """A response ends where the next human turn would begin: the template's human tag, and HH's own marker.
    (A tag written in special tokens never shows in decoded text; EOS ends those responses.)"""
    tags = [] if template.special_tokens else [template.human.strip()]
    return tuple(dict.fromkeys([*tags, HUMAN.strip()]))


@dataclass
class Samples:
    """K responses for each of a rank's prompts, flattened prompt-major: sample j of prompt i is row i * K + j."""
    prompt_index: list[int] = field(default_factory=list)       # index into the pool, per sample
    prompts: list[str] = field(default_factory=list)            # HH-form prompt, per sample
    responses: list[str] = field(default_factory=list)          # response text cut at its stop
    tokens: list[list[int]] = field(default_factory=list)       # response token ids, up to and including the stop
    stopped: list[bool] = field(default_factory=list)           # ended at EOS / a stop string (False: cut at the limit)
    logprobs: list[torch.Tensor] = field(default_factory=list)  # per-token log-probs, when asked for


def shuffled_samples(prompt_index: list[int], rng: np.random.Generator) -> torch.Tensor:
    """Every sample in a random order (TRL's minibatches)."""
    return torch.from_numpy(rng.permutation(len(prompt_index)))


def shuffled_prompts(prompt_index: list[int], rng: np.random.Generator) -> torch.Tensor:
    """The prompts in a random order, each prompt's samples together in rollout order: minibatches of whole groups,
    whose packed rows (packed_row) run each prompt once for all of its samples."""
    groups: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompt_index):
        groups.setdefault(prompt, []).append(row)
    members = list(groups.values())
    return torch.tensor([row for g in rng.permutation(len(members)) for row in members[g]], dtype=torch.long)


# ppo.minibatch_order: one epoch's order of a rank's samples, cut into minibatches in that order
EPOCH_ORDERS = {"samples": shuffled_samples, "prompts": shuffled_prompts}


def sample(model, pool: PromptPool, indices: list[int], *, tokenizer, k: int = 1, max_new_tokens: int,
           batch_size: int, temperature: float, top_k: int = 0, top_p: float = 1.0, stop_strings: tuple[str, ...] = (),
           generator: torch.Generator | None = None, with_logprobs: bool = False, progress: bool = False,
           dtype: torch.dtype | None = None, compile_decoding: bool = False) -> Samples:
    """K samples for each prompt of the pool at `indices`, batch_size rows at a time (temperature 0: greedy);
    progress: a bar with new tokens/s and ETA. dtype: the compute dtype (rmcore.training.runtime.compute_dtype),
    which the KV cache takes. compile_decoding: rmcore.generate.rollout's."""
    rows = [i for i in indices for _ in range(k)]
    out = Samples()
    bar = None
    if progress:
        bar = tqdm(total=len(rows), unit="sample", desc="sampling", dynamic_ncols=True, leave=False)
    new_tokens, t0 = 0, time.perf_counter()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        r = rollout(model, [pool.ids[i] for i in chunk], max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                    pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k or None, top_p=top_p,
                    generator=generator, with_logprobs=with_logprobs, stop_strings=stop_strings, tokenizer=tokenizer,
                    dtype=dtype, compile_decoding=compile_decoding)
        for row, (i, toks) in enumerate(zip(chunk, r.responses())):
            text, _ = cut_at_stop(tokenizer.decode(toks), stop_strings)
            out.prompt_index.append(i)
            out.prompts.append(pool.prompts[i])
            out.responses.append(text)
            out.tokens.append(toks)
            out.stopped.append(bool(r.stopped[row]))
            if with_logprobs:
                out.logprobs.append(r.logprobs[row, :len(toks)].cpu())
        if bar is not None:
            new_tokens += int(r.response_mask.sum())
            bar.update(len(chunk))
            bar.set_postfix(new_tokens_per_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
    if bar is not None:
        bar.close()
    return out


# ------------------------------------------------------------------------------------------------ packed and scored
@dataclass
class Packed:
    """Samples as one batch, in a rollout's layout (rmcore.generate): prompts left-padded to one width P, then the
    responses right-padded to T. response_mask (B, T) is 1 on each response's tokens, its stop included."""
    input_ids: torch.Tensor       # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    position_ids: torch.Tensor    # (B, P + T): counting real tokens only, so padding shifts nothing
    response_mask: torch.Tensor   # (B, T) float
    prompt_width: int

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width:]

    def rows(self, index) -> "Packed":
        return Packed(self.input_ids[index], self.attention_mask[index], self.position_ids[index],
                      self.response_mask[index], self.prompt_width)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device=None) -> Packed:
    """Prompt and response token lists -> one Packed batch."""
    p_ids, p_mask = pad(prompts, pad_id, side="left")
    r_ids, r_mask = pad(responses, pad_id)
    ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
    return Packed(ids.to(device), mask.to(device), default_position_ids(mask).to(device),
                  r_mask.float().to(device), p_ids.shape[1])


@dataclass
class PackedRow:
    """A Packed batch's samples end to end in one row (B = 1), no padding: each distinct prompt once, then each
    response continuing its prompt at the positions after it (rmcore.model.Packing), so the K samples of a prompt
    run it once. predicting (n,): the column whose logits predict each real response token, in response_mask's
    order; a prompt's last column predicts the first token of every response continuing it."""
    input_ids: torch.Tensor     # (1, L)
    position_ids: torch.Tensor  # (1, L)
    seq_lens: tuple[int, ...]
    continues: tuple[int, ...]
    predicting: torch.Tensor    # (n,)


def packed_row(batch: Packed) -> PackedRow:
    """The rows of `batch` as one PackedRow (prompts told apart by their real token ids)."""
    P = batch.prompt_width
    ids, prompt_mask = batch.input_ids.tolist(), batch.attention_mask[:, :P].tolist()
    lengths = batch.response_mask.sum(1).long().tolist()
    prompt_segment = {}  # prompt ids -> (its segment, its last column)
    tokens, positions, seq_lens, continues, predicting = [], [], [], [], []
    for row, n in enumerate(lengths):
        prompt = tuple(t for t, real in zip(ids[row][:P], prompt_mask[row]) if real)
        if prompt not in prompt_segment:
            tokens += prompt
            positions += range(len(prompt))
            prompt_segment[prompt] = (len(seq_lens), len(tokens) - 1)
            seq_lens.append(len(prompt)), continues.append(-1)
        if n == 0:
            continue
        segment, last = prompt_segment[prompt]
        predicting += [last, *range(len(tokens), len(tokens) + n - 1)]
        tokens += ids[row][P:P + n]
        positions += range(len(prompt), len(prompt) + n)
        seq_lens.append(n), continues.append(segment)
    device = batch.input_ids.device
    return PackedRow(torch.tensor([tokens], device=device), torch.tensor([positions], device=device),
                     tuple(seq_lens), tuple(continues), torch.tensor(predicting, dtype=torch.long, device=device))


def response_logits(model, batch: Packed, *, packed: bool | None = None) -> torch.Tensor:
    """(n, vocab): the logits that predicted each real response token, row by row (response_mask's order); the
    head runs on those positions only, not on the prompt's or the padding's. packed: run the rows as one PackedRow
    (no padding, each prompt once); None = on a CPU, where attention per sequence costs nothing next to the padding
    it saves, and not on a GPU, where one attention call over the padded batch beats one per sequence."""
    if packed is None:
        packed = batch.input_ids.device.type == "cpu"
    if packed:
        row = packed_row(batch)
        return model(row.input_ids, position_ids=row.position_ids, seq_lens=row.seq_lens, continues=row.continues,
                     logits_at=row.predicting)
    at = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    at[:, batch.prompt_width - 1:-1] = batch.response_mask.bool()
    return model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, logits_at=at)


def at_responses(values: torch.Tensor, batch: Packed) -> torch.Tensor:
    """(B, T) holding values (n,), one per real response token in response_mask's order, and 0 on padding."""
    real = batch.response_mask.bool()
    return torch.zeros(real.shape, dtype=values.dtype, device=values.device).masked_scatter(real, values)


def response_values(critic, batch: Packed) -> torch.Tensor:
    """(B, T): the critic's value of the state before each response token (the position that predicts it)."""
    values = critic(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    every_token=True)
    return values[:, batch.prompt_width - 1:-1]


@torch.no_grad()
def score_in_chunks(model, batch: Packed, batch_size: int, per_token) -> torch.Tensor:
    """(B, T) per_token(model, rows) in eval mode, batch_size rows per forward (the same number of forwards on
    every rank when the row counts agree, as FSDP2 needs), 0 on padding."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, batch.input_ids.shape[0], batch_size):
        rows = batch.rows(slice(start, start + batch_size))
        out.append(per_token(model, rows).float() * rows.response_mask)
    model.train(was_training)
    return torch.cat(out)


def response_logprobs(model, batch: Packed, temperature: float, batch_size: int) -> torch.Tensor:
    """(B, T) log-probs (logits / temperature) of the response tokens as one forward pass scores them."""
    return score_in_chunks(model, batch, batch_size, lambda m, b: at_responses(
        token_logprobs(response_logits(m, b), b.responses[b.response_mask.bool()], temperature), b))


def response_values_of(critic, batch: Packed, batch_size: int) -> torch.Tensor:
    """(B, T) the critic's values of the response positions."""
    return score_in_chunks(critic, batch, batch_size, response_values)
