"""Reward hacking, measured (Gao et al. 2023's protocol): one RAFT budget, three rewards, one gold judge.

    python bench/reward_hacking.py --preset tiny    # after the tiny chain: python train.py --config configs/tiny.yaml
    python bench/reward_hacking.py --preset small   # SmolLM2-135M, the small recipe (runs/small/rm/export is the gold)

The proxy reward models are trained on one third of the training pairs ([:640]); the gold judge is the recipe's own
reward model, trained on all 1,932 (more data: the proxy is the weaker model, as in Gao et al.). Three RAFT runs with
the same prompts, seed and budget (the preset's raft config) differ only in the reward they optimise:

    plain     the proxy (ensemble member seed 1)
    ensemble  3 proxies that differ only in seed (configs/sweeps/<preset>_ensemble.yaml), mean - 1.0 * std
    odin      a length-disentangled proxy (loss.length_head, seed 1), its quality head

and all three log the gold judge's score of their samples beside their own (raft.gold_reward). Steps already done
(an export or a history on disk) are skipped, so an interrupted run continues. The table (results.md) gives each
method's first and last iteration: proxy reward, gold reward (first sample of each prompt, the unbiased estimate),
KL to the start, response tokens, distinct-2, repeated 4-grams; then `eval.py compare` of each countermeasure
against plain on held-out prompts under both judges, with three side-by-side samples.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "tiny": {"rm": "configs/tiny_rm.yaml", "raft": "configs/tiny_raft.yaml", "gold": "runs/tiny/rm/export",
             "raft_overrides": ["raft.iterations=6"], "compare_prompts": 32, "max_new_tokens": 48},
    "small": {"rm": "configs/small.yaml", "raft": "configs/small_raft.yaml", "gold": "runs/small/rm/export",
              "raft_overrides": ["raft.iterations=4"], "compare_prompts": 16, "max_new_tokens": 64},
}
PROXY_DATA = "data.train=['${RMCORE_DATA}/hh-rlhf/harmless-base/test.jsonl.gz[:640]']"  # as the ensemble sweeps
HH = "${RMCORE_DATA}/hh-rlhf/harmless-base/test.jsonl.gz"  # records [1932:] are held out


def run(cmd: list[str], log: Path) -> float:
    """cmd from the repository root, its output to log; the wall time in seconds."""
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    with open(log, "w") as f:
        status = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if status:
        sys.exit(f"failed ({status}): see {log}")
    return time.time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--out", help="default runs/<preset>/hacking")
    args = parser.parse_args(argv)
    preset, py = PRESETS[args.preset], sys.executable
    out = Path(args.out or f"runs/{args.preset}/hacking")
    out.mkdir(parents=True, exist_ok=True)
    walls = json.loads((out / "wall_times.json").read_text()) if (out / "wall_times.json").exists() else {}

    def step(name: str, done: Path, cmd: list[str]):
        if not (REPO / done).exists():
            walls[name] = run(cmd, out / f"{name}.log")
            (out / "wall_times.json").write_text(json.dumps(walls, indent=2))

    members = [out / "members" / f"run.seed={s}" / "export" for s in (1, 2, 3)]
    sweep = f"configs/sweeps/{args.preset}_ensemble.yaml"
    step("ensemble_members", members[-1], [py, "-m", "rmcore.config.sweep", sweep, "--out", str(out / "members")])
    odin = out / "odin_rm"
    step("odin_rm", odin / "export", [py, "train.py", "--config", preset["rm"], PROXY_DATA, "run.seed=1",
                                      "loss.length_head=true", f"run.out_dir={odin}", "logging.progress=false"])
    rewards = {"plain": [f"raft.reward={members[0]}"],
               "ensemble": [f"raft.reward={json.dumps([str(m) for m in members])}",
                            "raft.reward_aggregation=mean_minus_std", "raft.reward_lambda=1.0"],
               "odin": [f"raft.reward={odin / 'export'}", "raft.reward_head=quality"]}
    for method, reward in rewards.items():
        step(f"raft_{method}", out / f"raft_{method}" / "raft_history.json",
             [py, "raft.py", "--config", preset["raft"], *preset["raft_overrides"], *reward,
              f"raft.gold_reward={preset['gold']}", f"run.out_dir={out / f'raft_{method}'}",
              "logging.progress=false"])
    for method in ("ensemble", "odin"):
        step(f"compare_{method}", out / f"compare_{method}" / "compare.json",
             [py, "eval.py", "compare", "--policy-a", str(out / f"raft_{method}" / "export"),
              "--policy-b", str(out / "raft_plain" / "export"), "--judge", str(members[0]), "--judge", preset["gold"],
              "--prompts", f"{HH}[1932:{1932 + preset['compare_prompts']}]", "--temperature", "0",
              "--max-new-tokens", str(preset["max_new_tokens"]), "--out", str(out / f"compare_{method}")])
    table = results_table(out, walls, args.preset)
    (out / "results.md").write_text(table + "\n")
    print(table)


def results_table(out: Path, walls: dict, preset: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    lines = [f"Reward hacking, preset {preset}; CPU: {cpu}; wall times (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()), "",
             "| method | iteration | proxy reward | gold reward | KL to start | response tokens | distinct-2 | "
             "repeated 4-grams | held-out gold (greedy) |", "|---|---|---|---|---|---|---|---|---|"]
    for method in ("plain", "ensemble", "odin"):
        history = json.loads((out / f"raft_{method}" / "raft_history.json").read_text())
        for h in (history[0], history[-1]):
            lines.append(f"| {method} | {h['iteration']} | {h['reward_first']:.3f} | {h['gold_first']:.3f} | "
                         f"{h['kl_start_all']:.2f} | {h['response_tokens']:.1f} | {h['distinct_2']:.3f} | "
                         f"{h['repeated_4gram_rate']:.3f} | {h.get('held_out_gold', float('nan')):.3f} |")
        lines[-1] = lines[-1][:-1] + f"(final {history[-1].get('held_out_gold_final', float('nan')):.3f}) |"
    for method in ("ensemble", "odin"):
        r = json.loads((out / f"compare_{method}" / "compare.json").read_text())
        lines += ["", f"{method} (A) vs plain (B), greedy, {r['prompts']} held-out prompts: "
                  + "; ".join(f"judge {j['judge']}: A wins {j['wins']}, ties {j['ties']}, losses {j['losses']} "
                              f"(mean A {j['mean_reward_a']:.3f}, B {j['mean_reward_b']:.3f})" for j in r["judges"])
                  + f"; tokens A {r['mean_tokens_a']:.1f}, B {r['mean_tokens_b']:.1f}; distinct-2 A "
                  f"{r['distinct_2_a']:.3f}, B {r['distinct_2_b']:.3f}; repeated 4-grams A "
                  f"{r['repeated_4gram_rate_a']:.3f}, B {r['repeated_4gram_rate_b']:.3f}"]
    ens, odin = (json.loads((out / f"compare_{m}" / "compare.json").read_text())["samples"]
                 for m in ("ensemble", "odin"))
    lines += ["", "Three held-out prompts, greedy answers (proxy / gold reward):"]
    for e, o in list(zip(ens, odin))[:3]:
        lines += ["", f"- prompt: {e['prompt'][-200:]!r}",
                  f"  - plain ({e['rewards_b'][0]:.2f} / {e['rewards_b'][1]:.2f}): {e['b'][:240]!r}",
                  f"  - ensemble ({e['rewards_a'][0]:.2f} / {e['rewards_a'][1]:.2f}): {e['a'][:240]!r}",
                  f"  - odin ({o['rewards_a'][0]:.2f} / {o['rewards_a'][1]:.2f}): {o['a'][:240]!r}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
