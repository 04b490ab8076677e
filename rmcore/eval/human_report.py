"""eval.py label --report: what people said about A vs B, how much they agree, and how often a reward model agrees.

Counted from A's side, as `eval.py compare` counts: a judgment preferring a is a win, b a loss, tie a tie; skips are
counted apart and left out of every rate. "At least as good" = (wins + ties) / judged. Each rate has a 95% Wilson
interval; per annotator and pooled over all judgments. With several annotators: Cohen's kappa per pair (items both
judged) and Fleiss' kappa (items every annotator judged), over the labels a / b / tie. With a judge (a reward
model): its verdict per item is the answer it rewards more, and its accuracy is the share of people's non-tie
judgments it agrees with.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from rmcore.eval.plots import pyplot

LABELS = ("a", "b", "tie")


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of k successes in n: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n)))


def cohen_kappa(x: list, y: list) -> float:
    """Cohen's kappa of two raters' labels: (p_o - p_e) / (1 - p_e), p_e = sum_c p_x(c) p_y(c)."""
    n = len(x)
    cats = sorted(set(x) | set(y))
    p_o = sum(a == b for a, b in zip(x, y)) / n
    p_e = sum((x.count(c) / n) * (y.count(c) / n) for c in cats)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of an (items, categories) count matrix, n raters per item: (P_bar - P_e) / (1 - P_e)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=1)[0]
    p_j = counts.sum(axis=0) / counts.sum()
    p_i = ((counts * counts).sum(axis=1) - n) / (n * (n - 1))
    p_bar, p_e = p_i.mean(), (p_j * p_j).sum()
    return 1.0 if p_e == 1 else float((p_bar - p_e) / (1 - p_e))


def tally(labels: list[str]) -> dict:
    """Wins, ties, losses of A over the non-skip labels, with rates and 95% Wilson intervals."""
    judged = [x for x in labels if x in LABELS]
    n, wins, ties = len(judged), judged.count("a"), judged.count("tie")
    out = {"judged": n, "skipped": len(labels) - n, "wins": wins, "ties": ties, "losses": judged.count("b")}
    for name, k in (("win_rate", wins), ("tie_rate", ties), ("at_least_as_good", wins + ties)):
        out[name] = k / n if n else float("nan")
        out[name + "_ci95"] = list(wilson_interval(k, n))
    return out


def human_report(task, judge_prefers: dict[int, str] | None = None, judge: str | None = None) -> dict:
    """The report of a LabelTask; judge_prefers: item index -> "a" or "b" (the answer the judge rewards more)."""
    by_annotator: dict[str, dict[int, str]] = {}
    for j in task.judgments:
        by_annotator.setdefault(j["annotator"], {})[j["item"]] = j["preferred"]
    annotators = sorted(by_annotator)
    r = {"source": task.source, "names": task.names, "items": len(task.items),
         "pooled": tally([j["preferred"] for j in task.judgments]),
         "annotators": {a: tally(list(by_annotator[a].values())) for a in annotators}}
    if len(annotators) >= 2:
        r["cohen_kappa"] = {}
        for x, y in itertools.combinations(annotators, 2):
            both = [i for i in by_annotator[x] if i in by_annotator[y] and
                    by_annotator[x][i] in LABELS and by_annotator[y][i] in LABELS]
            if both:
                r["cohen_kappa"][f"{x} vs {y}"] = {"items": len(both), "kappa": cohen_kappa(
                    [by_annotator[x][i] for i in both], [by_annotator[y][i] for i in both])}
        common = [i for i in range(len(task.items)) if all(by_annotator[a].get(i) in LABELS for a in annotators)]
        if common:
            counts = np.array([[sum(by_annotator[a][i] == c for a in annotators) for c in LABELS] for i in common])
            r["fleiss_kappa"] = {"items": len(common), "raters": len(annotators), "kappa": fleiss_kappa(counts)}
    if judge_prefers is not None:
        def accuracy(pairs):
            agree = sum(judge_prefers[i] == p for i, p in pairs)
            return {"judgments": len(pairs), "agree": agree, "accuracy": agree / len(pairs) if pairs else float("nan"),
                    "accuracy_ci95": list(wilson_interval(agree, len(pairs)))}
        decided = [(j["annotator"], j["item"], j["preferred"]) for j in task.judgments if j["preferred"] in ("a", "b")]
        r["judge"] = {"model": judge, "pooled": accuracy([(i, p) for _, i, p in decided]),
                      "annotators": {a: accuracy([(i, p) for b, i, p in decided if b == a]) for a in annotators}}
    return r


def _line(name: str, t: dict) -> str:
    if not t["judged"]:
        return f"| {name} | 0 | — | — | — | — | {t['skipped']} |"
    lo, hi = t["at_least_as_good_ci95"]
    wlo, whi = t["win_rate_ci95"]
    return (f"| {name} | {t['judged']} | {t['wins']} ({t['win_rate']:.1%}, 95% CI {wlo:.1%}–{whi:.1%}) | {t['ties']} "
            f"| {t['losses']} | {t['wins'] + t['ties']} of {t['judged']} ({t['at_least_as_good']:.1%}, 95% CI "
            f"{lo:.1%}–{hi:.1%}) | {t['skipped']} |")


def human_markdown(r: dict) -> str:
    p = r["pooled"]
    lines = ["# Human judgments", "",
             f"- A: `{r['names']['a']}`; B: `{r['names']['b']}`; {r['items']} items from `{r['source']}`",
             f"- pooled: A was at least as good as B in {p['wins'] + p['ties']} of {p['judged']} judgments "
             f"({p['wins']} wins, {p['ties']} ties); {p['skipped']} skipped", "",
             "| annotator | judged | A wins | ties | A loses | A at least as good | skipped |",
             "|---|---|---|---|---|---|---|",
             *[_line(a, t) for a, t in r["annotators"].items()], _line("**pooled**", p)]
    if "cohen_kappa" in r:
        lines += ["", "Agreement between annotators (labels a / b / tie):", ""]
        lines += [f"- Cohen's kappa {k}: {v['kappa']:.3f} over {v['items']} items" for k, v in r["cohen_kappa"].items()]
        if "fleiss_kappa" in r:
            f = r["fleiss_kappa"]
            lines.append(f"- Fleiss' kappa: {f['kappa']:.3f} over {f['items']} items judged by all {f['raters']}")
    if "judge" in r:
        j = r["judge"]
        lines += ["", f"Reward model `{j['model']}` against people (its accuracy on their non-tie judgments):", ""]
        for name, a in [*j["annotators"].items(), ("pooled", j["pooled"])]:
            if a["judgments"]:
                lo, hi = a["accuracy_ci95"]
                lines.append(f"- {name}: agrees on {a['agree']} of {a['judgments']} ({a['accuracy']:.1%}, 95% CI "
                             f"{lo:.1%}–{hi:.1%})")
    return "\n".join(lines)


def plot_human_report(r: dict, path: Path):
    """Stacked bars of wins / ties / losses per annotator and pooled, with the at-least-as-good interval."""
    plt = pyplot()
    rows = [*r["annotators"].items(), ("pooled", r["pooled"])]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    for y, (name, t) in enumerate(rows):
        n = max(t["judged"], 1)
        left = 0.0
        for key, color in (("wins", "#2a9d8f"), ("ties", "#bbbbbb"), ("losses", "#e76f51")):
            ax.barh(y, t[key] / n, left=left, color=color, label=key if y == 0 else None)
            left += t[key] / n
        if t["judged"]:
            lo, hi = t["at_least_as_good_ci95"]
            ax.plot([lo, hi], [y, y], color="black", lw=1.5)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of judgments (black: 95% CI of A at least as good)")
    ax.set_title(f"A = {Path(r['names']['a']).parent.name or r['names']['a']} vs "
                 f"B = {Path(r['names']['b']).parent.name or r['names']['b']}")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_human_report(r: dict, folder: Path) -> list[Path]:
    paths = [folder / "human_report.json", folder / "human_report.md", folder / "human_report.png"]
    paths[0].write_text(json.dumps(r, indent=2) + "\n")
    paths[1].write_text(human_markdown(r) + "\n")
    plot_human_report(r, paths[2])
    return paths
