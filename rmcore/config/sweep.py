"""Run a W&B sweep definition locally, one run after another, without any W&B server; print a results table.

    python -m rmcore.config.sweep configs/sweeps/centering.yaml [key=value ...] [--out runs/sweeps/centering]

The grid is the product of every parameter's `values` (or single `value`); the base config is the one after
`--config` in the sweep's `command`. Extra key=value overrides apply to every run. Each run writes its own
run.out_dir under --out; results.md and results.json collect the final held-out metrics of all runs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

from rmcore.config.loader import load_yaml_file


def grid(sweep: dict) -> list[dict]:
    """Every combination of the sweep's parameter values, in file order."""
    if sweep.get("method", "grid") != "grid":
        raise SystemExit(f"the local runner runs grids only; this sweep's method is {sweep['method']!r}")
    names, choices = [], []
    for name, spec in sweep["parameters"].items():
        names.append(name)
        choices.append(spec["values"] if "values" in spec else [spec["value"]])
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def base_config(sweep: dict) -> str:
    command = [str(c) for c in sweep.get("command", [])]
    if "--config" not in command:
        raise SystemExit("the sweep's command names no --config: the local runner needs a base config")
    return command[command.index("--config") + 1]


def final_metrics(out_dir: Path) -> dict:
    """The last training loss and the last held-out evaluation of a run's metrics.jsonl."""
    found = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            found["train_loss"] = rec["loss"]
        found.update({k: v for k, v in rec.items() if k.startswith("eval_")})
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rmcore.config.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run")
    parser.add_argument("--out", help="folder for the runs (default runs/sweeps/<sweep name>)")
    args = parser.parse_intermixed_args(argv)
    sweep = load_yaml_file(args.sweep)
    out = Path(args.out or Path("runs/sweeps") / Path(args.sweep).stem)
    config = base_config(sweep)
    rows = []
    combos = grid(sweep)
    # a run is named by the parameters that vary (a fixed `value` is the same for all and would only lengthen it)
    varying = [k for k in (combos[0] if combos else {}) if len({json.dumps(c[k]) for c in combos}) > 1]
    for values in combos:
        name = ",".join(f"{k}={v}" for k, v in values.items() if k in varying or not varying)
        run_dir = out / name.replace("/", "_")
        cmd = [sys.executable, "train.py", "--config", config, *args.overrides,
               *(f"{k}={json.dumps(v)}" for k, v in values.items()),
               f"run.out_dir={run_dir}", "logging.wandb=disabled", "logging.progress=false"]
        print(f"[{len(rows) + 1}] {' '.join(cmd[1:])}", flush=True)
        status = subprocess.run(cmd).returncode
        rows.append({"run": name, "status": "ok" if status == 0 else f"failed ({status})",
                     **(final_metrics(run_dir) if status == 0 else {})})
    table = ["| run | status | eval acc (%) | eval loss | train loss |", "|---|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r['eval_acc']:.2f}" if "eval_acc" in r else "-"
        loss = f"{r['eval_loss']:.4f}" if "eval_loss" in r else "-"
        train = f"{r['train_loss']:.4f}" if "train_loss" in r else "-"
        table.append(f"| {r['run']} | {r['status']} | {acc} | {loss} | {train} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return rows


if __name__ == "__main__":
    main()
