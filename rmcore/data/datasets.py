"""Datasets: records read, rendered by the template, tokenized and filtered into what a stage trains on.

    file spec ──read──> records ──parse (format)──> Example(prompt, chosen, rejected) in HH form
        ──template──> text ──tokenizer──> ids ──length filter (dropped, counted)──> PairDataset / BlockDataset

`DataConfig` is the config's `data` section: which files, their format, the template, and the length and packing
settings the loaders here read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from rmcore.data.formats import FORMATS, read_examples
from rmcore.data.records import Example, Report
from rmcore.data.template import Template
from rmcore.errors import DataError, check_at_least

RecordFormatName = Literal[("auto", *FORMATS)]


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)   # file specs, e.g. ["train.jsonl.gz", "test.jsonl.gz[:6275]"]
    eval: list[str] = field(default_factory=list)    # held-out file specs
    format: RecordFormatName = "auto"  # a FORMATS name (rmcore/data/formats.py), or auto: detected per file
    human_tag: str = "###Human:"           # the template: "\n\nHuman:" is written as this (the recipe's value),
    assistant_tag: str = "###Assistant:"   # "\n\nAssistant:" as this,
    tag_separator: str = " "               # with this before each tag but one opening the text (see Template)
    template: Literal["tags", "chatml"] = "tags"   # tags: the three settings above; chatml: ChatML, as chat models
    system_prompt: str = ""                # chatml only: a system turn opening every text ("" = none)
    max_length: int = 512                  # RM: a pair with a side longer (tokens, BOS/EOS included) is dropped
    block_size: int = 1024                 # SFT: tokens per packed block
    sft_loss_on: Literal["all", "assistant", "response"] = "all"  # SFT loss on every token (recipe), on every
    #                                      assistant turn, or on the final response only (RAFT's kept samples)
    document_mask: bool = False            # SFT: attention stops at document boundaries (recipe: runs across them)
    group_by_length: bool = False          # batch pairs of similar length together to cut padding
    pack_pairs: bool = True                # rm: a micro-batch's sequences in one row, no padding (same math, faster)
    share_prompt: bool = True              # rm, packed: a pair's common first tokens run once (same math, less work)
    skip_bad_lines: bool = False           # skip (and count) malformed records instead of stopping

    def check(self, source: str) -> None:
        check_at_least(self, 1, ("block_size", "max_length"), prefix="data", source=source)

    def build_template(self) -> Template:
        """The Template these settings describe."""
        if self.template == "chatml":
            return Template.chatml(self.system_prompt)
        if self.system_prompt:
            raise DataError("data.system_prompt is set but data.template=tags has no system turn; use "
                            "data.template=chatml, or write the system text into the data")
        return Template(self.human_tag, self.assistant_tag, self.tag_separator)


# ----------------------------------------------------------------------------------------------------------------
# Preference pairs


@dataclass
class PairDataset:
    ids: list[str]
    chosen: list[np.ndarray]     # int32 token ids, BOS ... EOS
    rejected: list[np.ndarray]
    margin: np.ndarray           # float32 per pair; nan where the record gave none
    examples: list[Example] | None = None  # the texts, kept for evaluation
    response_starts: np.ndarray | None = None  # (n, 2) int32: index of each side's first response token (DPO)

    def __len__(self):
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.array([max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected)], dtype=np.int64)


def response_start(example: Example, response: str, tokenizer, template: Template) -> int:
    """Index of the first response token in BOS + render(prompt, response) + EOS: the first token whose text
    starts at or after the rendered prompt's end (a token spanning the boundary counts as prompt). Never 0: a
    response token needs a token before it that predicts it."""
    # One whole-text encoding, as training tokenizes it; encoding the prompt alone would change the tokens at the
    # boundary.
    prompt_chars = len(template.render(example.prompt))
    _, starts = tokenizer.encode_with_starts(template.render(example.prompt, response),
                                             specials=template.special_tokens)
    return max(int(tokenizer.add_bos) + sum(1 for s in starts if s < prompt_chars), 1)


def tokenize_pairs(examples: list[Example], tokenizer, template: Template, *, max_length: int | None,
                   report: Report, keep_examples: bool = False, response_starts: bool = False,
                   batch: int = 2048) -> PairDataset:
    """Render and tokenize both sides (BOS ... EOS); drop and count pairs with a side over max_length tokens.
    response_starts: also find where each side's response begins (what DPO's log-probs sum over)."""
    ids, chosen, rejected, margin, kept = [], [], [], [], []
    too_long = f"longer than max_length={max_length} tokens"
    for i in range(0, len(examples), batch):
        part = examples[i:i + batch]
        texts = [template.render(e.prompt, e.chosen) for e in part] + [template.render(e.prompt, e.rejected)
                                                                       for e in part]
        tokens = tokenizer.encode_batch(texts, bos=True, eos=True, specials=template.special_tokens)
        for e, c, r in zip(part, tokens[:len(part)], tokens[len(part):]):
            if max_length is not None and max(len(c), len(r)) > max_length:
                report.drop(too_long, e.id)
                continue
            ids.append(e.id)
            chosen.append(np.asarray(c, dtype=np.int32))
            rejected.append(np.asarray(r, dtype=np.int32))
            margin.append(math.nan if e.margin is None else e.margin)
            kept.append(e)
    report.kept = len(ids)
    starts = None
    if response_starts:
        starts = np.array([[response_start(e, e.chosen, tokenizer, template),
                            response_start(e, e.rejected, tokenizer, template)] for e in kept],
                          dtype=np.int32).reshape(-1, 2)
    return PairDataset(ids, chosen, rejected, np.asarray(margin, dtype=np.float32), kept if keep_examples else None,
                       starts)


def load_pairs(specs: list[str], tokenizer, cfg: DataConfig, name: str, *, keep_examples: bool = False,
               response_starts: bool = False) -> tuple[PairDataset, Report]:
    """Preference pairs: every record read, rendered, tokenized and length-filtered (drops counted in the report)."""
    examples, report = read_examples(specs, fmt=cfg.format, skip_bad_lines=cfg.skip_bad_lines, name=name)
    single = next((e for e in examples if e.rejected is None), None)
    if single is not None and single.responses is not None:  # rmcore/data/ranked.py reads rankings
        raise DataError(f"{single.id}: pairs are needed here, and this record is a ranking of K responses; the rm "
                        f"stage trains on rankings when data.train holds them, and eval.py evaluates them")
    if single is not None:
        raise DataError(f"{single.id}: a reward model needs pairs; this file holds single texts (format 'text')")
    pairs = tokenize_pairs(examples, tokenizer, cfg.build_template().check(tokenizer), max_length=cfg.max_length,
                           report=report, keep_examples=keep_examples, response_starts=response_starts)
    return pairs, report


# ----------------------------------------------------------------------------------------------------------------
# Block-packed SFT


@dataclass
class BlockDataset:
    tokens: np.ndarray     # (n_blocks, block_size) int32
    loss_mask: np.ndarray  # (n_blocks, block_size) bool: tokens that are learned as targets
    doc_index: np.ndarray  # (n_blocks, block_size) int32: which document each token came from (global index)
    dropped_tail: int      # tokens of the last partial block, not trained on

    def __len__(self):
        return len(self.tokens)


def document_tokens(example: Example, tokenizer, template: Template, loss_on: str) -> tuple[list[int], list[bool]]:
    """BOS + render(prompt, chosen) + EOS, and which tokens the loss covers: all; assistant content (every
    assistant turn) + EOS; or the response (the final turn, what follows render(prompt)) + EOS."""
    text = template.render(example.prompt, example.chosen)
    if loss_on == "all":
        ids = tokenizer.encode(text, bos=True, eos=True, specials=template.special_tokens)
        return ids, [True] * len(ids)
    # Assistant-only: the same whole-text encoding; a token is learned when its first character lies in
    # assistant content.
    ids, starts = tokenizer.encode_with_starts(text, specials=template.special_tokens)
    is_assistant = np.zeros(len(text) + 1, dtype=bool)
    if loss_on == "response":
        is_assistant[len(template.render(example.prompt)):len(text)] = True
    else:
        at = 0
        for piece, assistant in template.segments(example.prompt, example.chosen):
            is_assistant[at:at + len(piece)] = assistant
            at += len(piece)
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    return bos + ids + [tokenizer.eos_id], [False] * len(bos) + is_assistant[starts].tolist() + [True]


def pack_blocks(docs: list[tuple[list[int], list[bool]]], block_size: int) -> BlockDataset:
    """Concatenate the documents (each already BOS ... EOS) and cut the stream into block_size blocks."""
    lengths = np.array([len(ids) for ids, _ in docs], dtype=np.int64)
    stream = np.fromiter((t for ids, _ in docs for t in ids), dtype=np.int32, count=int(lengths.sum()))
    mask = np.fromiter((m for _, ms in docs for m in ms), dtype=bool, count=int(lengths.sum()))
    doc_index = np.repeat(np.arange(len(docs), dtype=np.int32), lengths)
    n_blocks = len(stream) // block_size
    used = n_blocks * block_size
    shape = (n_blocks, block_size)
    return BlockDataset(stream[:used].reshape(shape), mask[:used].reshape(shape), doc_index[:used].reshape(shape),
                        dropped_tail=len(stream) - used)


def load_blocks(specs: list[str], tokenizer, cfg: DataConfig, name: str) -> tuple[BlockDataset, Report]:
    """SFT data: every record's prompt + chosen response, packed into blocks."""
    examples, report = read_examples(specs, fmt=cfg.format, skip_bad_lines=cfg.skip_bad_lines, name=name)
    template = cfg.build_template().check(tokenizer)
    docs = [document_tokens(e, tokenizer, template, cfg.sft_loss_on) for e in examples]
    blocks = pack_blocks(docs, cfg.block_size)
    total = sum(len(ids) for ids, _ in docs)
    report.notes.append(f"{total:,} tokens in {len(docs):,} documents -> {len(blocks):,} blocks of {cfg.block_size}; "
                        f"the last partial block's {blocks.dropped_tail:,} tokens are dropped")
    if docs and not len(blocks):
        raise DataError(f"{name}: the {total:,} tokens of its {len(docs):,} documents are fewer than one block "
                        f"(data.block_size={cfg.block_size}): no block to train on; nothing is trained or written")
    return blocks, report
