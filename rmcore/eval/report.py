"""The evaluation report of eval.py: every figure for one (model, preference set), the generalization table
across models and sets, and report.md.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from rmcore.data.datasets import PairDataset
from rmcore.data.template import HUMAN, Template
from rmcore.eval.metrics import (
    accuracy_by_bucket,
    calibration,
    histogram,
    length_baselines,
    margin_quantiles,
    most_confident,
    quantile_edges,
    spearman,
)
from rmcore.eval.ranked_report import best_of_k_cell, ranked_markdown
from rmcore.eval.scorer import ImplicitRewardScorer, RewardScorer
from rmcore.losses import pairwise_loss, preference_metrics


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
    sides = (np.array([len(s) for s in seqs], dtype=np.int64) - ends - prompt_len
             for seqs in (pairs.chosen, pairs.rejected))
    return tuple(sides)


def evaluate_pairs(scorer: RewardScorer | ImplicitRewardScorer, pairs: PairDataset, show: int = 5,
                   progress: bool = False) -> dict:
    """Every figure of the report for one preference set (pairs.examples must be kept), under a reward model or a
    DPO policy's implicit reward."""
    n = len(pairs)
    by_head = None  # a length-disentangled reward model: each head's rewards, chosen rows then rejected
    if len(getattr(scorer, "head_names", ())) > 1:
        by_head = scorer.head_rewards(pairs.chosen + pairs.rejected, progress)
        r_c, r_r = scorer.read_head(by_head[:n]), scorer.read_head(by_head[n:])
    else:
        r_c, r_r = scorer.pair_rewards(pairs, progress)
    rewards = np.concatenate([r_c, r_r])
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
        "reward": scorer.description,  # a reward model's, or a DPO policy's implicit reward
        "pairs": n,
        "accuracy": stats.get("accuracy", math.nan),
        "ties": stats.get("ties", 0),
        "tie_rate": stats.get("tie_rate", math.nan),
        "loss": float(pairwise_loss(tc, tr, reduction="mean")) if n else math.nan,
        "rewards": {k: stats.get(k, math.nan) for k in
                    ("chosen_mean", "chosen_std", "rejected_mean", "rejected_std", "reward_mean", "reward_std")},
        "margin": {"mean": stats.get("margin", math.nan),
                   "quantiles": {str(q): v for q, v in margin_quantiles(r_c, r_r).items()}},
        "calibration": calibration(r_c, r_r, n_bins=10),
        "length": {
            **length_baselines(len_c, len_r),
            "spearman_reward_length": spearman(np.concatenate([r_c, r_r]), np.concatenate([len_c, len_r])),
            **({"spearman_by_head": {name: spearman(values, np.concatenate([len_c, len_r])) for name, values in
                                     [*zip(scorer.head_names, by_head.T), ("sum", by_head.sum(-1))]}}
               if by_head is not None else {}),
            "accuracy_by_length": accuracy_by_bucket(mean_len, correct, quantile_edges(mean_len, 4)) if n else [],
        },
        "accuracy_by_turns": (accuracy_by_bucket(n_turns, correct,
                                                 sorted({1, 2, 3, 4, max(5, int(n_turns.max(initial=1)) + 1)}))
                              if n else []),
        "histograms": {"chosen": histogram(r_c, 20, *_range(rewards)),
                       "rejected": histogram(r_r, 20, *_range(rewards))},
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
    """Markdown: one row per model (trained on), one column per dataset (tested on), accuracy in % (a ranked set:
    pairwise accuracy over its ordered pairs, then best-of-K)."""
    datasets = list(dict.fromkeys(d for per_model in results.values() for d in per_model))
    lines = ["| trained on \\ tested on | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for model, per_model in results.items():
        cells = [f"{100 * per_model[d]['accuracy']:.2f}{best_of_k_cell(per_model[d])}" if d in per_model else "-"
                 for d in datasets]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(results: dict[str, dict[str, dict]], drops: dict[str, dict]) -> str:
    """report.md: the generalization table, then per (model, dataset) the figures of report.json."""
    out = ["# Reward-model evaluation", "", "## Accuracy (%)", "", generalization_table(results)]
    for model, per_model in results.items():
        for data, r in per_model.items():
            out += [f"## {model} on {data}", ""]
            if r.get("kind") == "ranked":  # rankings of K responses: their own figures (ranked_report.py)
                out += ranked_markdown(r, drops.get(data, {}))
                continue
            drop = drops.get(data, {})
            dropped = ", ".join(f"{v} {k}" for k, v in drop.get("dropped", {}).items()) or "none"
            reward = r.get("reward", {})
            if reward.get("kind") == "implicit":
                out += [f"- reward: implicit, β (log π(y|x) - log π_ref(y|x)) with β = {reward['beta']:g}, "
                        f"reference {reward['reference']}"]
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
                    f"{r['length']['spearman_reward_length']:.4f}"
                    + ("; by head: " + ", ".join(f"{h} {v:.4f}" for h, v in r["length"]["spearman_by_head"].items())
                       + f" (the reward read: {reward['head']})" if "spearman_by_head" in r["length"] else ""),
                    f"- template: {r['template']['human']!r} / {r['template']['assistant']!r}, separator "
                    f"{r['template']['separator']!r} ({r['template']['source']})",
                    ""]
            out += ["| mean response tokens | pairs | accuracy (%) |", "|---|---|---|"]
            out += [f"| [{b['lo']:.0f}, {b['hi']:.0f}] | {b['count']} | {_pct(b['accuracy'])} |"
                    for b in r["length"]["accuracy_by_length"]]
            out += ["", "| human turns | pairs | accuracy (%) |", "|---|---|---|"]
            out += [f"| {b['lo']:.0f}-{b['hi'] - 1:.0f} | {b['count']} | {_pct(b['accuracy'])} |"
                    for b in r["accuracy_by_turns"]]
            for key, title in (("most_confidently_wrong", "Most confidently wrong"),
                               ("most_confidently_right", "Most confidently right")):
                out += ["", f"### {title}", ""]
                for p in r[key]:
                    out += [f"- `{p['id']}` r_chosen {p['r_chosen']:.3f}, r_rejected {p['r_rejected']:.3f}",
                            f"  - prompt: {p['prompt']}", f"  - chosen: {p['chosen']}",
                            f"  - rejected: {p['rejected']}"]
            out.append("")
    return "\n".join(out)


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f}"
