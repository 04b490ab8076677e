"""PNG plots: the evaluation report's (eval.py) and an alignment run's history (raft.py, ppo.py). matplotlib is
optional (the `plots` extra): nothing else imports it.
"""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend: no display needed)."""
    import matplotlib  # optional (the `plots` extra): imported only when a plot is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_report(report: dict, out_dir: Path, name: str) -> list[Path]:
    """PNG plots for one (model, dataset): reward histograms, reliability diagram, accuracy by length (a ranked
    set: the rewards of its best-scored and of its other responses)."""
    plt = pyplot()
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for side, h in report["histograms"].items():  # chosen and rejected, or best-scored and lower-scored
        ax.stairs(h["counts"], h["edges"], label=side)
    ranked = report.get("kind") == "ranked"
    ax.set(xlabel="reward", ylabel="responses" if ranked else "pairs", title=f"{name}: rewards")
    ax.legend()
    written.append(_save(fig, out_dir / f"{name}_rewards.png"))
    if ranked:
        return written

    fig, ax = plt.subplots(figsize=(5, 5))
    bins = [b for b in report["calibration"]["bins"] if b["count"]]
    ax.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="perfect")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label="model")
    ax.set(xlabel="confidence sigmoid(|r_c - r_r|)", ylabel="accuracy",
           title=f"{name}: ECE {report['calibration']['ece']:.3f}")
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
    pyplot().close(fig)
    return path


def plot_history(history: list[dict], panels: dict[str, list[str]], path: Path, *,
                 against: dict[str, str] | None = None):
    """One panel per title, each key of it a line against the iteration, or against the key `against` names for
    that title (e.g. rewards against the KL to the start), over the records that hold both."""
    plt = pyplot()
    against = against or {}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items()):
        x = against.get(title, "iteration")
        for key in keys:
            held = [h for h in history if key in h and x in h]
            if held:
                ax.plot([h[x] for h in held], [h[key] for h in held], marker="o", label=key)
        ax.set_xlabel("iteration (figures of the policy before its update)" if x == "iteration" else x)
        ax.set_title(title)
        ax.legend(fontsize=7)
    _save(fig, path)
