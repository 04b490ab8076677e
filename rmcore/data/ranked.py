"""Rankings of K responses to one prompt: read, tokenized, length-filtered and packed into micro-batches.

    ranked record ──parse (a ranked FORMATS entry)──> Example(prompt, responses, scores)
        ──template──> K texts ──tokenizer──> K id sequences ──length filter (responses removed, counted)──>
        RankedDataset ──collate_ranked──> one packed row per micro-batch, each prompt's responses together

A response longer than data.max_length is removed from its ranking (counted in Report.removed); a ranking left with
fewer than 2 responses, or with all of them tied, is dropped (counted in Report.dropped). Pairs read beside
rankings (another file of the same split) become rankings of 2: chosen above rejected.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from rmcore.data.batching import pad
from rmcore.data.datasets import DataConfig
from rmcore.data.files import iter_records
from rmcore.data.formats import FORMATS, detect_format, read_examples
from rmcore.data.ranked_formats import ranking_problem
from rmcore.data.records import Example, Report
from rmcore.data.template import Template
from rmcore.errors import DataError


def is_ranked(specs: list[str], fmt: str = "auto") -> bool:
    """Whether any of the files holds rankings: `fmt` is a ranked format, or (auto) one file's first record is."""
    if fmt != "auto":
        return fmt in FORMATS and FORMATS[fmt].ranked
    for spec in specs:
        for where, record in iter_records(spec):
            if isinstance(record, dict):  # the first readable record decides, as read_examples detects
                try:
                    if FORMATS[detect_format(record, where)].ranked:
                        return True
                except DataError:  # read_examples reports it (or skips it) with its line
                    continue
                break
    return False


def as_ranking(example: Example) -> tuple[list[str], list[float]]:
    """(responses, scores) of a ranking, or of a pair: [chosen, rejected] scored [1, 0]."""
    if example.responses is not None:
        return example.responses, example.scores
    if example.rejected is None:
        raise DataError(f"{example.id}: a ranking needs K >= 2 responses to one prompt; this record holds a single "
                        f"text (format 'text')")
    return [example.chosen, example.rejected], [1.0, 0.0]


@dataclass
class RankedDataset:
    ids: list[str]
    seqs: list[list[np.ndarray]]   # per prompt, its responses' int32 token ids (BOS ... EOS), in record order
    scores: list[np.ndarray]       # per prompt, (K,) float64, higher better; equal scores tie
    examples: list[Example] | None = None  # the texts (only the responses kept), for evaluation

    def __len__(self):
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        """Tokens of each prompt's K sequences together: the length of its part of a packed row."""
        return np.array([sum(len(s) for s in group) for group in self.seqs], dtype=np.int64)

    def stats(self) -> dict:
        """prompts, responses, K min/max, ordered pairs (i scored above j), tied pairs and prompts holding a tie."""
        tied = [int(np.triu(s[:, None] == s[None, :], 1).sum()) for s in self.scores]
        ks = [len(s) for s in self.scores]
        return {"prompts": len(self), "responses": sum(ks), "k_min": min(ks, default=0), "k_max": max(ks, default=0),
                "pairs": sum(int((s[:, None] > s[None, :]).sum()) for s in self.scores),
                "tied_pairs": sum(tied), "prompts_with_ties": sum(t > 0 for t in tied)}


def tokenize_ranked(examples: list[Example], tokenizer, template: Template, *, max_length: int | None,
                    report: Report, keep_examples: bool = False, batch: int = 512) -> RankedDataset:
    """Render and tokenize every response (BOS ... EOS); remove (and count) responses over max_length tokens, then
    drop (and count) rankings left with fewer than 2 responses or all tied."""
    ids, seqs, scores, kept = [], [], [], []
    too_long = f"longer than max_length={max_length} tokens"
    for i in range(0, len(examples), batch):
        part = [(e, *as_ranking(e)) for e in examples[i:i + batch]]
        texts = [template.render(e.prompt, r) for e, responses, _ in part for r in responses]
        tokens = iter(tokenizer.encode_batch(texts, bos=True, eos=True, specials=template.special_tokens))
        for e, responses, group_scores in part:
            group = [(r, s, next(tokens)) for r, s in zip(responses, group_scores)]
            fits = [g for g in group if max_length is None or len(g[2]) <= max_length]
            if len(fits) < len(group):
                report.remove(too_long, e.id, len(group) - len(fits))
            problem = ranking_problem([s for _, s, _ in fits])
            if problem:
                report.drop(f"{problem} within max_length={max_length} tokens", e.id)
                continue
            ids.append(e.id)
            seqs.append([np.asarray(t, dtype=np.int32) for _, _, t in fits])
            scores.append(np.array([s for _, s, _ in fits], dtype=np.float64))
            if keep_examples:
                kept.append(dataclasses.replace(e, responses=[r for r, _, _ in fits], scores=scores[-1].tolist()))
    report.kept = len(ids)
    data = RankedDataset(ids, seqs, scores, kept if keep_examples else None)
    s = data.stats()
    if s["prompts"]:
        report.notes.append(f"rankings: {s['prompts']:,} prompts, {s['responses']:,} responses (K {s['k_min']} to "
                            f"{s['k_max']}), {s['pairs']:,} ordered pairs; {s['tied_pairs']:,} tied pairs in "
                            f"{s['prompts_with_ties']:,} prompts (no pair of all_pairs or of the accuracy; "
                            f"Breslow's shared denominator in plackett_luce)")
    return data


def load_ranked(specs: list[str], tokenizer, cfg: DataConfig, name: str,
                keep_examples: bool = False) -> tuple[RankedDataset, Report]:
    """Rankings: every record read, rendered, tokenized and length-filtered (removals and drops counted)."""
    examples, report = read_examples(specs, fmt=cfg.format, skip_bad_lines=cfg.skip_bad_lines, name=name)
    data = tokenize_ranked(examples, tokenizer, cfg.build_template().check(tokenizer), max_length=cfg.max_length,
                           report=report, keep_examples=keep_examples)
    return data, report


def collate_ranked(data: RankedDataset, indices: list[int], pad_id: int) -> dict:
    """The prompts' responses end to end in one row with no padding, each prompt's K together, in record order
    (input_ids (1, L), position_ids restarting at 0 at each sequence, seq_lens); scores (N,) and group_sizes (B,)
    say which response is ranked above which. An empty micro-batch (a rank's share of a short last batch) is an
    empty padded batch (input_ids (0, 1), attention_mask), which every rank still runs forward."""
    seqs = [s for i in indices for s in data.seqs[i]]
    if seqs:
        lens = tuple(len(x) for x in seqs)
        rows = {"input_ids": torch.from_numpy(np.concatenate(seqs).astype(np.int64))[None],
                "position_ids": torch.cat([torch.arange(n) for n in lens])[None], "seq_lens": lens}
    else:
        input_ids, attention_mask = pad([], pad_id)
        rows = {"input_ids": input_ids, "attention_mask": attention_mask}
    scores = np.concatenate([data.scores[i] for i in indices]) if len(indices) else np.zeros(0)
    return {**rows, "scores": torch.from_numpy(scores), "group_sizes": tuple(len(data.seqs[i]) for i in indices),
            "ids": [data.ids[i] for i in indices]}
