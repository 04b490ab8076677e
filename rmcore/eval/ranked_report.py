"""The evaluation report of eval.py for rankings of K responses (a ranked file): pairwise accuracy over every
prompt's ordered pairs and best-of-K accuracy, as RewardBench 2 reports them, beside the ranking losses, the length
baselines, the figures by K and the most confidently wrong rankings. report.py's markdown_report writes its section.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from rmcore.data.formats import read_examples
from rmcore.data.ranked import RankedDataset, tokenize_ranked
from rmcore.data.records import require_data
from rmcore.errors import UserError
from rmcore.eval.metrics import best_of_k, histogram, ranking_accuracy
from rmcore.losses import RANKING_LOSSES
from rmcore.training.distributed import say


def _short(text: str, n: int = 160) -> str:
    """text on one line, its last n characters (where a prompt's latest turn is)."""
    text = " ".join(text.split())
    return text if len(text) <= n else "..." + text[-n:]


def _figures(rewards: np.ndarray, scores: np.ndarray, sizes: list[int]) -> dict:
    """Pairwise accuracy and best-of-K of one set of prompts."""
    pairs, best = ranking_accuracy(rewards, scores, sizes), best_of_k(rewards, scores, sizes)
    return {"prompts": best["prompts"], "pairs": pairs["pairs"], "accuracy": pairs["accuracy"],
            "ties": pairs["ties"], "best_of_k": best["accuracy"], "best_of_k_chance": best["chance"]}


def evaluate_ranked(scorer, data: RankedDataset, show: int = 5, progress: bool = False) -> dict:
    """Every figure of the report for one set of rankings (data.examples must be kept)."""
    sizes = [len(g) for g in data.seqs]
    rewards = scorer.score_ids([s for group in data.seqs for s in group], progress)
    scores = np.concatenate(data.scores) if sizes else np.zeros(0)
    # Within a prompt the responses share its tokens, so sequence lengths order them as response lengths do.
    lengths = np.array([len(s) for group in data.seqs for s in group], dtype=np.float64)
    figures = _figures(rewards, scores, sizes)
    pairs = ranking_accuracy(rewards, scores, sizes)
    r, s = torch.from_numpy(rewards), torch.from_numpy(scores)
    starts = np.cumsum([0] + sizes)
    groups = [(rewards[a:b], scores[a:b]) for a, b in zip(starts[:-1], starts[1:])]
    # A ranking's most confident error: its most negative r_i - r_j over pairs with s_i > s_j.
    worst = [min((gr[i] - gr[j] for i in range(len(gs)) for j in range(len(gs)) if gs[i] > gs[j]), default=0.0)
             for gr, gs in groups]
    top = np.concatenate([gs == gs.max() for _, gs in groups]) if groups else np.zeros(0, dtype=bool)
    lo, hi = (float(rewards.min()), float(rewards.max())) if len(rewards) else (0.0, 1.0)
    lo, hi = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)

    def ranking_view(b: int) -> dict:
        e, (gr, gs) = data.examples[b], groups[b]
        order = np.lexsort((-gr, -gs))  # best-scored first, then by reward
        return {"id": e.id, "prompt": _short(e.prompt), "worst_margin": float(worst[b]),
                "responses": [{"score": float(gs[i]), "reward": float(gr[i]), "text": _short(e.responses[i])}
                              for i in order]}

    return {
        "kind": "ranked",
        "reward": getattr(scorer, "description", {"kind": "reward model"}),
        **figures,
        "responses": len(rewards),
        "k": {str(k): sizes.count(k) for k in sorted(set(sizes))},
        "tie_rate": pairs["ties"] / pairs["pairs"] if pairs["pairs"] else math.nan,
        "data_ties": {"tied_pairs": pairs["tied_pairs"], "prompts_with_ties": data.stats()["prompts_with_ties"]},
        "loss": {name: float(loss(r, s, sizes, reduction="mean")) if sizes else math.nan
                 for name, loss in RANKING_LOSSES.items()},
        "rewards": {"mean": float(rewards.mean()) if len(rewards) else math.nan,
                    "std": float(rewards.std()) if len(rewards) else math.nan},
        "length": {"longer_wins": ranking_accuracy(lengths, scores, sizes)["accuracy"],
                   "shorter_wins": ranking_accuracy(-lengths, scores, sizes)["accuracy"],
                   "longest_is_best": best_of_k(lengths, scores, sizes)["accuracy"]},
        "by_k": {str(k): _figures(np.concatenate([g[0] for g, n in zip(groups, sizes) if n == k]),
                                  np.concatenate([g[1] for g, n in zip(groups, sizes) if n == k]),
                                  [k] * sizes.count(k)) for k in sorted(set(sizes))},
        "histograms": {"best-scored": histogram(rewards[top], 20, lo, hi),
                       "lower-scored": histogram(rewards[~top], 20, lo, hi)},
        "most_confidently_wrong": [ranking_view(int(b)) for b in np.argsort(worst, kind="stable")[:show]
                                   if worst[b] < 0],
        "template": {**scorer.template.to_dict(), "source": scorer.template_source},
    }


def evaluate_ranked_file(scorer, spec: str, *, fmt: str, skip_bad_lines: bool, max_length: int | None, show: int,
                         dist) -> tuple[dict, dict]:
    """(the report of one ranked file, what its reading dropped): eval.py's evaluate for a file of rankings."""
    if not hasattr(scorer, "score_ids"):  # a DPO policy's implicit reward reads pairs only
        raise UserError(f"--data {spec} holds rankings of K responses; they are evaluated with a reward model "
                        f"(--model without --reference)")
    examples, report = read_examples([spec], fmt=fmt, skip_bad_lines=skip_bad_lines, name=spec)
    data = tokenize_ranked(examples, scorer.tokenizer, scorer.template, max_length=max_length, report=report,
                           keep_examples=True)
    say(dist, report.summary())
    require_data(len(data), report, [spec], f"--data {spec}", "rankings to evaluate")
    r = evaluate_ranked(scorer, data, show, progress=True)
    return r, report.to_dict()


def ranked_line(name: str, spec: str, r: dict) -> str:
    """The one line eval.py prints for a ranked set."""
    return (f"{name} on {spec}: pairwise accuracy {100 * r['accuracy']:.2f}% over {r['pairs']} ordered pairs of "
            f"{r['prompts']} prompts (reward ties {r['ties']}), best-of-K {100 * r['best_of_k']:.2f}% (chance "
            f"{100 * r['best_of_k_chance']:.2f}%), all_pairs loss {r['loss']['all_pairs']:.4f}, plackett_luce loss "
            f"{r['loss']['plackett_luce']:.4f}")


def best_of_k_cell(r: dict) -> str:
    """What a ranked set adds to its accuracy cell in the generalization table: " (best-of-K xx.xx)"; "" for pairs."""
    return f" (best-of-K {100 * r['best_of_k']:.2f})" if r.get("kind") == "ranked" else ""


def ranked_markdown(r: dict, drop: dict) -> list[str]:
    """report.md's lines for one (model, ranked set), after its heading."""
    dropped = ", ".join(f"{v} {k}" for k, v in drop.get("dropped", {}).items()) or "none"
    removed = ", ".join(f"{v} {k}" for k, v in drop.get("removed", {}).items()) or "none"
    ks = ", ".join(f"K={k}: {n}" for k, n in r["k"].items())
    out = [f"- rankings evaluated: {r['prompts']} prompts, {r['responses']} responses ({ks}); read "
           f"{drop.get('read', '?')}; dropped: {dropped}; responses removed: {removed}",
           f"- pairwise accuracy: {100 * r['accuracy']:.2f}% over {r['pairs']} ordered pairs (reward ties: "
           f"{r['ties']}, counted as wrong; {r['data_ties']['tied_pairs']} pairs tied in the data, not scored)",
           f"- best-of-K accuracy: {100 * r['best_of_k']:.2f}% (the best-scored response gets the strictly highest "
           f"reward; chance {100 * r['best_of_k_chance']:.2f}%)",
           f"- mean loss per prompt: all_pairs {r['loss']['all_pairs']:.4f}, plackett_luce "
           f"{r['loss']['plackett_luce']:.4f}",
           f"- rewards: mean {r['rewards']['mean']:.4f} ± {r['rewards']['std']:.4f}",
           f"- length baselines (pairwise): longer wins {100 * r['length']['longer_wins']:.2f}%, shorter wins "
           f"{100 * r['length']['shorter_wins']:.2f}%; the longest response is best-scored in "
           f"{100 * r['length']['longest_is_best']:.2f}% of prompts",
           f"- template: {r['template']['human']!r} / {r['template']['assistant']!r}, separator "
           f"{r['template']['separator']!r} ({r['template']['source']})",
           "", "| K | prompts | ordered pairs | pairwise accuracy (%) | best-of-K (%) | chance (%) |",
           "|---|---|---|---|---|---|"]
    out += [f"| {k} | {f['prompts']} | {f['pairs']} | {100 * f['accuracy']:.2f} | {100 * f['best_of_k']:.2f} | "
            f"{100 * f['best_of_k_chance']:.2f} |" for k, f in r["by_k"].items()]
    out += ["", "### Most confidently wrong rankings (most negative r_i - r_j with i scored above j)", ""]
    for v in r["most_confidently_wrong"]:
        out += [f"- `{v['id']}` worst margin {v['worst_margin']:.3f}; prompt: {v['prompt']}"]
        out += [f"  - score {x['score']:g}, reward {x['reward']:.3f}: {x['text']}" for x in v["responses"]]
    return out + [""]
