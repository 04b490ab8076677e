"""Batching: datasets into the tensors a forward pass takes, padded (one `pad` helper, either side) or packed.

Pairs: 2B sequences per micro-batch, chosen then rejected, right-padded or packed end to end in one row. SFT:
blocks (with per-document positions and masks when documents must not see each other), or one document per row.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from rmcore.data.datasets import BlockDataset, PairDataset


def pad(seqs, pad_id: int, *, side: Literal["right", "left"] = "right",
        device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences (lists or arrays) -> (input_ids, attention_mask) (B, longest), padded with pad_id on the
    right (training, scoring) or on the left (prompts to generate from: every row's next token in one column)."""
    width = max((len(s) for s in seqs), default=1)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        columns = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        input_ids[row, columns] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        attention_mask[row, columns] = 1
    return input_ids.to(device), attention_mask.to(device)


def collate_pairs(data: PairDataset, indices: list[int], pad_id: int, *, packed: bool = False,
                  share_prompt: bool = False) -> dict:
    """2B sequences, chosen[0..B) then rejected[0..B): right-padded rows (input_ids, attention_mask), or with
    packed, one row of them end to end with no padding (input_ids (1, L), position_ids restarting at each,
    seq_lens); margin (B,) (0 where none); tokens: the 2B sequences' token count; with the dataset's
    response_starts, response_lengths (2B,): the response tokens per sequence, EOS included, and (without
    share_prompt) response_mask (the rows' shape): those tokens.
    share_prompt (packed only): the tokens a pair's two sequences begin with in common (its prompt, all but the last
    token at most) run once, as their own segment, which both responses continue (seq_lens, continues: see
    rmcore.model.Packing); the row holds the prompts, then the chosen responses, then the rejected ones."""
    seqs = [data.chosen[i] for i in indices] + [data.rejected[i] for i in indices]
    response = None
    if data.response_starts is not None:  # DPO, ODIN: which tokens are the responses', in the same 2B order
        starts = data.response_starts[indices].T.reshape(-1) if len(indices) else []
        response = [np.arange(len(s)) >= start for s, start in zip(seqs, starts)]
    if packed and share_prompt and seqs:
        rows = shared_prompt_row(seqs[:len(indices)], seqs[len(indices):])
    elif packed and seqs:
        lens = tuple(len(x) for x in seqs)
        rows = {"input_ids": torch.from_numpy(np.concatenate(seqs).astype(np.int64))[None],
                "position_ids": torch.cat([torch.arange(n) for n in lens])[None], "seq_lens": lens}
    else:
        input_ids, attention_mask = pad(seqs, pad_id)
        rows = {"input_ids": input_ids, "attention_mask": attention_mask}
    if response is not None:
        if not share_prompt:
            rows["response_mask"] = (torch.from_numpy(np.concatenate(response))[None] if packed and seqs
                                     else pad(response, 0)[0].bool())
        rows["response_lengths"] = torch.tensor([int(r.sum()) for r in response], dtype=torch.float32)
    margin = torch.from_numpy(np.nan_to_num(data.margin[indices], nan=0.0)) if len(indices) else torch.zeros(0)
    return {**rows, "margin": margin.float(), "tokens": sum(len(x) for x in seqs),
            "has_margin": bool(len(indices)) and not np.isnan(data.margin[indices]).all(),
            "ids": [data.ids[i] for i in indices]}


def common_prefix_length(a, b) -> int:
    """How many tokens a and b begin with in common, leaving each at least its last token."""
    n = min(len(a), len(b)) - 1
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else max(n, 0)


def shared_prompt_row(chosen: list, rejected: list) -> dict:
    """One packed row: each pair's common prompt once (pairs with none have no prompt segment), then the chosen
    responses, then the rejected ones, each continuing its pair's prompt at the positions after it."""
    shared = [common_prefix_length(c, r) for c, r in zip(chosen, rejected)]
    prompt_segment = {}  # pair -> index of its prompt segment
    segments, positions, continues = [], [], []
    for pair, (c, n) in enumerate(zip(chosen, shared)):
        if n:
            prompt_segment[pair] = len(segments)
            segments.append(c[:n]), positions.append(np.arange(n)), continues.append(-1)
    for side in (chosen, rejected):
        for pair, (seq, n) in enumerate(zip(side, shared)):
            segments.append(seq[n:]), positions.append(np.arange(n, len(seq)))
            continues.append(prompt_segment.get(pair, -1))
    return {"input_ids": torch.from_numpy(np.concatenate(segments).astype(np.int64))[None],
            "position_ids": torch.from_numpy(np.concatenate(positions).astype(np.int64))[None],
            "seq_lens": tuple(len(s) for s in segments), "continues": tuple(continues)}


def block_positions(doc_index: torch.Tensor) -> torch.Tensor:
    """position_ids restarting at 0 at every document start within each row of a (B, T) doc_index."""
    T = doc_index.shape[-1]
    pos = torch.arange(T).expand_as(doc_index)
    starts = document_starts(doc_index)
    starts[:, 0] = True
    # the position where the current document started, carried forward along the row
    start_pos = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=-1).values
    return pos - start_pos


def document_attn_mask(doc_index: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: query t may attend key s iff s <= t and both come from the same document."""
    T = doc_index.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = doc_index[:, :, None] == doc_index[:, None, :]
    return (same & causal)[:, None]


def collate_blocks(data: BlockDataset, indices: list[int], document_mask: bool) -> dict:
    """input_ids and loss_mask (B, T); with document_mask also per-document position_ids, a block-diagonal mask,
    and no document's first token as a target."""
    idx = np.asarray(indices, dtype=np.int64)
    batch = {"input_ids": torch.from_numpy(data.tokens[idx].astype(np.int64)),
             "loss_mask": torch.from_numpy(data.loss_mask[idx]),
             "ids": [f"block {i}" for i in indices]}
    if document_mask:
        doc = torch.from_numpy(data.doc_index[idx])
        batch["position_ids"] = block_positions(doc)
        batch["attn_mask"] = document_attn_mask(doc)
        batch["loss_mask"] = batch["loss_mask"] & ~document_starts(doc)
    return batch


def document_starts(doc_index: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: a token that begins a new document within its row (never column 0). With document masks such
    a token is not a target: the previous document's EOS cannot see it coming, so nothing crosses a boundary."""
    starts = torch.zeros_like(doc_index, dtype=torch.bool)
    starts[:, 1:] = doc_index[:, 1:] != doc_index[:, :-1]
    return starts


def collate_documents(docs: list[tuple[list[int], list[bool]]], indices: list[int], pad_id: int) -> dict:
    """One document per row, right-padded: input_ids and loss_mask (False on padding). Right padding needs no
    attention mask: under the causal mask no real token sees the padding after it."""
    rows = [docs[i] for i in indices]
    input_ids, real = pad([ids for ids, _ in rows], pad_id)
    loss_mask = torch.zeros_like(real, dtype=torch.bool)
    for r, (_, mask) in enumerate(rows):
        loss_mask[r, :len(mask)] = torch.from_numpy(np.asarray(mask, dtype=bool))
    return {"input_ids": input_ids, "loss_mask": loss_mask, "ids": [f"sample {i}" for i in indices]}
