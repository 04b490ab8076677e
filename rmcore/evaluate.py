"""Reward-model evaluation and scoring: the library behind eval.py.

    RewardScorer(model_dir).score(texts)            rewards for transcripts or (prompt, response) pairs
    rank_responses(scorer, prompt, responses)       best-of-n: candidates sorted by reward (RAFT uses it)
    evaluate_pairs(scorer, pairs)                   every figure of eval.py's report for one preference set
    generalization_table(results)                   trained-on rows x tested-on columns, accuracy in %

A scored text is exactly what training saw: BOS + Template.render(prompt, response) + EOS, with the template the
model was trained with (read from its config.json). Over-long inputs are an error, or (truncate="left") lose
their oldest tokens with a warning and a count. Reward normalisation statistics live in config.json too.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from rmcore.checkpoint import CheckpointError, load_pretrained
from rmcore.data import HUMAN, DataError, PairDataset, Template, right_pad
from rmcore.distributed import Dist
from rmcore.losses import pairwise_loss, preference_metrics
from rmcore.metrics import (
    accuracy_by_bucket, calibration, histogram, length_baselines, margin_quantiles, most_confident,
    quantile_edges, spearman,
)


class RewardScorer:
    """A reward model ready to score text: model, tokenizer, the training template, optional normalisation."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 batch_size: int = 16, max_length: int | None = None, truncate: str = "error", d: Dist | None = None):
        from rmcore.model import RewardModel
        from rmcore.tokenizer import Tokenizer

        self.dir = Path(model_dir)
        self.d = d or Dist(device=torch.device(device))
        self.model = load_pretrained(RewardModel, self.dir, dtype=dtype, device=self.d.device).eval()
        self.tokenizer = Tokenizer.from_pretrained(self.dir)
        self.config = json.loads((self.dir / "config.json").read_text())
        info = self.config.get("rmcore", {})
        if "template" in info:
            self.template, self.template_source = Template.from_dict(info["template"]).check(self.tokenizer), "config.json"
        else:  # a model rmcore did not train: the recipe's template, said out loud in every report
            self.template, self.template_source = Template(), "default (not recorded in config.json)"
        # default: the length limit the model was trained with, else its position limit
        self.max_length = max_length or info.get("max_length") or self.model.cfg.max_seq_len
        if self.max_length > self.model.cfg.max_seq_len:
            raise DataError(f"max_length={self.max_length} is above the model's position limit "
                            f"(max_position_embeddings={self.model.cfg.max_seq_len} in {self.dir}/config.json)")
        if truncate not in ("error", "left"):
            raise ValueError(f"truncate must be 'error' or 'left', got {truncate!r}")
        self.truncate, self.truncated = truncate, 0
        self.batch_size = batch_size

    # ---- text -> ids
    def text_of(self, item) -> str:
        """A transcript (str, HH or templated form) or a (prompt, response) pair -> the text the model sees."""
        if isinstance(item, str):
            return self.template.apply(item)
        prompt, response = item
        return self.template.render(prompt, response)

    def encode(self, items) -> list[list[int]]:
        seqs = self.tokenizer.encode_batch([self.text_of(x) for x in items], bos=True, eos=True,
                                           specials=self.template.special_tokens)
        out = []
        for i, ids in enumerate(seqs):
            if len(ids) > self.max_length:
                if self.truncate == "error":
                    raise DataError(f"input {i} has {len(ids)} tokens, more than max_length={self.max_length}; "
                                     f"pass truncate='left' (--truncate left) to drop its oldest tokens")
                keep = int(self.tokenizer.add_bos)  # keep BOS (where the model has one), drop the oldest turns' tokens
                ids = ids[:keep] + ids[len(ids) - self.max_length + keep:]
                self.truncated += 1
            out.append(ids)
        if self.truncated and self.truncate == "left":
            print(f"warning: {self.truncated} input(s) so far truncated from the left to {self.max_length} tokens",
                  file=sys.stderr)
        return out

    # ---- ids -> rewards
    @torch.no_grad()
    def score_ids(self, seqs: list, progress: bool = False) -> np.ndarray:
        """Rewards (float64) of token sequences, in input order. Batches are length-sorted (less padding); under
        torchrun each rank scores every world_size-th batch and the results are gathered."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mine = batches[self.d.rank::self.d.world_size]
        bar = None
        if progress and self.d.is_main:
            from tqdm import tqdm
            bar = tqdm(total=sum(len(seqs[i]) for b in mine for i in b), unit="tok", unit_scale=True, desc="scoring")
        found = {}
        for batch in mine:
            ids, mask = right_pad([seqs[i] for i in batch], self.tokenizer.pad_id)
            r = self.model(ids.to(self.d.device), attention_mask=mask.to(self.d.device),
                           right_padded=True).double().cpu().tolist()
            found.update(zip(batch, r))
            if bar is not None:
                bar.update(int(mask.sum()))
        if bar is not None:
            bar.close()
        if self.d.enabled:
            from rmcore.distributed import gather_objects
            found = dict(gather_objects(list(found.items())))
        rewards = np.array([found[i] for i in range(len(seqs))], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(rewards))
        if len(bad):
            raise CheckpointError(f"{self.dir}: non-finite reward for input(s) {bad[:10].tolist()} "
                                  f"({rewards[bad[0]]}); the model's weights or activations overflow")
        return rewards

    def score(self, items, normalize: bool = False, progress: bool = False) -> list[float]:
        """Rewards of transcripts or (prompt, response) pairs, in input order."""
        rewards = self.score_ids(self.encode(list(items)), progress)
        if normalize:
            stats = self.normalization()
            rewards = (rewards - stats["mean"]) / stats["std"]
        return rewards.tolist()

    def normalization(self) -> dict:
        stats = self.config.get("rmcore", {}).get("reward_normalization")
        if stats is None:
            raise CheckpointError(f"{self.dir}/config.json holds no reward normalisation statistics; "
                             f"compute them first: python eval.py normalize --model {self.dir} --data FILE")
        return stats


def rank_responses(scorer: RewardScorer, prompt: str, responses: list[str]) -> list[tuple[str, float]]:
    """Best-of-n: (response, reward) for every candidate, highest reward first (stable for equal rewards)."""
    rewards = scorer.score([(prompt, r) for r in responses])
    order = sorted(range(len(responses)), key=lambda i: -rewards[i])
    return [(responses[i], rewards[i]) for i in order]


def write_normalization(model_dir: str | Path, rewards: np.ndarray, data: list[str]) -> dict:
    """Store mean/std of reference rewards in config.json under rmcore.reward_normalization."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    stats = {"mean": float(np.mean(rewards)), "std": float(np.std(rewards)), "count": int(len(rewards)), "data": list(data)}
    if not stats["std"] > 0:
        raise ValueError(f"reward std over {len(rewards)} reference texts is {stats['std']}: cannot normalise")
    config.setdefault("rmcore", {})["reward_normalization"] = stats
    path.write_text(json.dumps(config, indent=2) + "\n")
    return stats


# ------------------------------------------------------------------------------------------------ evaluation
def turns(prompt: str) -> int:
    """Human turns in an HH-form prompt (1 for a prompt without markers)."""
    return max(1, prompt.count(HUMAN))


def excerpt(text: str, n: int = 200) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= n else "..." + text[-n:]


def response_lengths(pairs: PairDataset, tokenizer, template: Template) -> tuple[np.ndarray, np.ndarray]:
    """Response tokens of each side: the sequence ([BOS] ... EOS) minus BOS, EOS and the prompt's tokens."""
    prompt_len = np.array([len(tokenizer.encode(template.render(e.prompt), specials=template.special_tokens))
                           for e in pairs.examples], dtype=np.int64)
    ends = 1 + tokenizer.add_bos  # EOS, and BOS where the model adds one
    sides = (np.array([len(s) for s in seqs], dtype=np.int64) - ends - prompt_len for seqs in (pairs.chosen, pairs.rejected))
    return tuple(sides)


def evaluate_pairs(scorer: RewardScorer, pairs: PairDataset, show: int = 5, progress: bool = False) -> dict:
    """Every figure of the report for one preference set (pairs.examples must be kept)."""
    n = len(pairs)
    rewards = scorer.score_ids(pairs.chosen + pairs.rejected, progress)
    r_c, r_r = rewards[:n], rewards[n:]
    tc, tr = torch.from_numpy(r_c), torch.from_numpy(r_r)
    stats = preference_metrics(tc, tr) if n else {}
    ex = pairs.examples
    len_c, len_r = response_lengths(pairs, scorer.tokenizer, scorer.template)
    correct = (r_c > r_r).astype(float)
    mean_len = (len_c + len_r) / 2
    n_turns = np.array([turns(e.prompt) for e in ex])

    def pair_view(i):
        e = ex[i]
        return {"id": e.id, "r_chosen": r_c[i], "r_rejected": r_r[i], "prompt": excerpt(e.prompt),
                "chosen": excerpt(e.chosen), "rejected": excerpt(e.rejected)}

    report = {
        "pairs": n,
        "accuracy": stats.get("accuracy", math.nan),
        "ties": stats.get("ties", 0),
        "tie_rate": stats.get("tie_rate", math.nan),
        "loss": float(pairwise_loss(tc, tr, reduction="mean")) if n else math.nan,
        "rewards": {k: stats.get(k, math.nan) for k in
                    ("chosen_mean", "chosen_std", "rejected_mean", "rejected_std", "reward_mean", "reward_std")},
        "margin": {"mean": stats.get("margin", math.nan), "quantiles": {str(q): v for q, v in margin_quantiles(r_c, r_r).items()}},
        "calibration": calibration(r_c, r_r, n_bins=10),
        "length": {
            **length_baselines(len_c, len_r),
            "spearman_reward_length": spearman(np.concatenate([r_c, r_r]), np.concatenate([len_c, len_r])),
            "accuracy_by_length": accuracy_by_bucket(mean_len, correct, quantile_edges(mean_len, 4)) if n else [],
        },
        "accuracy_by_turns": accuracy_by_bucket(n_turns, correct, sorted({1, 2, 3, 4, max(5, int(n_turns.max(initial=1)) + 1)})) if n else [],
        "histograms": {"chosen": histogram(r_c, 20, *_range(rewards)), "rejected": histogram(r_r, 20, *_range(rewards))},
        "most_confidently_wrong": [pair_view(i) for i in most_confident(r_c, r_r, show, wrong=True)],
        "most_confidently_right": [pair_view(i) for i in most_confident(r_c, r_r, show, wrong=False)],
        "template": {**scorer.template.to_dict(), "source": scorer.template_source},
    }
    return report


def _range(values: np.ndarray) -> tuple[float, float]:
    if len(values) == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def generalization_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per model (trained on), one column per dataset (tested on), accuracy in %."""
    datasets = list(dict.fromkeys(d for per_model in results.values() for d in per_model))
    lines = ["| trained on \\ tested on | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for model, per_model in results.items():
        cells = [f"{100 * per_model[d]['accuracy']:.2f}" if d in per_model else "-" for d in datasets]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(results: dict[str, dict[str, dict]], drops: dict[str, dict]) -> str:
    """report.md: the generalization table, then per (model, dataset) the figures of report.json."""
    out = ["# Reward-model evaluation", "", "## Accuracy (%)", "", generalization_table(results)]
    for model, per_model in results.items():
        for data, r in per_model.items():
            out += [f"## {model} on {data}", ""]
            drop = drops.get(data, {})
            dropped = ", ".join(f"{v} {k}" for k, v in drop.get("dropped", {}).items()) or "none"
            out += [f"- pairs evaluated: {r['pairs']} (read {drop.get('read', '?')}; dropped: {dropped})",
                    f"- accuracy: {100 * r['accuracy']:.2f}% (ties: {r['ties']}, counted as wrong)",
                    f"- mean pairwise loss: {r['loss']:.4f}",
                    f"- rewards: chosen {r['rewards']['chosen_mean']:.4f} ± {r['rewards']['chosen_std']:.4f}, "
                    f"rejected {r['rewards']['rejected_mean']:.4f} ± {r['rewards']['rejected_std']:.4f}, "
                    f"all {r['rewards']['reward_mean']:.4f} ± {r['rewards']['reward_std']:.4f}",
                    f"- margin r_c - r_r: mean {r['margin']['mean']:.4f}; quantiles "
                    + ", ".join(f"{q}: {v:.4f}" for q, v in r["margin"]["quantiles"].items()),
                    f"- expected calibration error (10 bins): {r['calibration']['ece']:.4f}",
                    f"- length baselines: longer wins {100 * r['length']['longer_wins']:.2f}%, shorter wins "
                    f"{100 * r['length']['shorter_wins']:.2f}%; Spearman(reward, response length) "
                    f"{r['length']['spearman_reward_length']:.4f}",
                    f"- template: {r['template']['human']!r} / {r['template']['assistant']!r}, separator "
                    f"{r['template']['separator']!r} ({r['template']['source']})",
                    ""]
            out += ["| mean response tokens | pairs | accuracy (%) |", "|---|---|---|"]
            out += [f"| [{b['lo']:.0f}, {b['hi']:.0f}] | {b['count']} | {_pct(b['accuracy'])} |" for b in r["length"]["accuracy_by_length"]]
            out += ["", "| human turns | pairs | accuracy (%) |", "|---|---|---|"]
            out += [f"| {b['lo']:.0f}-{b['hi'] - 1:.0f} | {b['count']} | {_pct(b['accuracy'])} |" for b in r["accuracy_by_turns"]]
            for key, title in (("most_confidently_wrong", "Most confidently wrong"), ("most_confidently_right", "Most confidently right")):
                out += ["", f"### {title}", ""]
                for p in r[key]:
                    out += [f"- `{p['id']}` r_chosen {p['r_chosen']:.3f}, r_rejected {p['r_rejected']:.3f}",
                            f"  - prompt: {p['prompt']}", f"  - chosen: {p['chosen']}", f"  - rejected: {p['rejected']}"]
            out.append("")
    return "\n".join(out)


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def plot_report(report: dict, out_dir: Path, name: str) -> list[Path]:
    """PNG plots for one (model, dataset): reward histograms, reliability diagram, accuracy by length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for side in ("chosen", "rejected"):
        h = report["histograms"][side]
        ax.stairs(h["counts"], h["edges"], label=side)
    ax.set(xlabel="reward", ylabel="pairs", title=f"{name}: rewards")
    ax.legend()
    written.append(_save(fig, out_dir / f"{name}_rewards.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    bins = [b for b in report["calibration"]["bins"] if b["count"]]
    ax.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="perfect")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label="model")
    ax.set(xlabel="confidence sigmoid(|r_c - r_r|)", ylabel="accuracy", title=f"{name}: ECE {report['calibration']['ece']:.3f}")
    ax.legend()
    written.append(_save(fig, out_dir / f"{name}_reliability.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    buckets = [b for b in report["length"]["accuracy_by_length"] if b["count"]]
    ax.bar([f"{b['lo']:.0f}-{b['hi']:.0f}" for b in buckets], [b["accuracy"] for b in buckets])
    ax.axhline(0.5, color="k", ls="--", lw=1)
    ax.set(xlabel="mean response tokens", ylabel="accuracy", title=f"{name}: accuracy by length")
    written.append(_save(fig, out_dir / f"{name}_accuracy_by_length.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
