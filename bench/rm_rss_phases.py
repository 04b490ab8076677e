"""Where the `rm` stage's peak memory happens in a real run: the rmcore side of `bench/rm_vs_trl.py --size 135m`
(train.py, the same command line), its resident set sampled every 50 ms and each sample put in the phase the run
was in, read from the records metrics.jsonl has by then.

    python bench/rm_rss_phases.py                                   # the default run (data.share_prompt=true)
    python bench/rm_rss_phases.py --variant "no shared prompt" data.share_prompt=false
    python bench/rm_rss_phases.py --variant "mmap over 1 MB" --env MALLOC_MMAP_THRESHOLD_=1048576

Phases: `load + step 1` (reading the weights and data, building the optimizer, the first step: AdamW's moments are
made there), `steps 2..n` (the rest of the training steps), `eval` (the held-out pass after the last step), `after`
(writing the checkpoint, until the process ends). Printed per phase: the largest RSS seen in it (GB); for the whole
process, the peak from wait4 (which a 50-ms sampler can miss), the real tokens/s and the shared-prompt share.
Run `python bench/rm_vs_trl.py --size 135m` once first: it writes the reward model's directory this reads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from rm_vs_trl import cpu_line, rmcore_command  # noqa: E402

PHASES = ("load + step 1", "steps 2..n", "eval", "after")


def phase_of(steps_logged: int, eval_logged: bool, steps: int) -> str:
    """The phase a run was in, given how many step records and whether the eval record metrics.jsonl held, and the
    run's number of steps."""
    if steps_logged == 0:
        return PHASES[0]
    if steps_logged < steps:
        return PHASES[1]
    return PHASES[3] if eval_logged else PHASES[2]


def rss_gb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1e6


def measure(cmd: list[str], run_dir: Path, env: dict) -> dict:
    """Per-phase peak RSS (GB) of one run, its wait4 peak, its real tokens/s and shared-prompt share."""
    metrics = run_dir / "metrics.jsonl"
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    samples = []  # (step records, eval record seen, RSS): phases are assigned once the run's step count is known
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps the child itself: its rusage holds the peak
        if pid:
            break
        text = metrics.read_text() if metrics.is_file() else ""
        try:
            samples.append((text.count('"tokens_per_s"'), '"eval_acc"' in text, rss_gb(proc.pid)))
        except (FileNotFoundError, StopIteration):  # exiting: /proc no longer shows its memory
            pass
        time.sleep(0.05)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train.py failed:\n{''.join(err)[-3000:]}")
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"tokens_per_s"' in line]
    peaks = dict.fromkeys(PHASES, 0.0)
    for logged, evaluated, rss in samples:
        phase = phase_of(logged, evaluated, len(steps))
        peaks[phase] = max(peaks[phase], rss)
    return {"phases": peaks, "peak": usage.ru_maxrss / 1e6, "tokens_per_s": steps[-1]["tokens_per_s"],
            "shared": sum(r.get("shared_prompt", 0.0) for r in steps) / len(steps)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/bench/rm_vs_trl/model_135m")
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--held-out", type=int, default=64)
    p.add_argument("--variant", default="default", help="the name printed for this run")
    p.add_argument("--env", nargs="*", default=[], help="KEY=VALUE environment settings of the run")
    p.add_argument("--out", default="runs/bench/rm_rss_phases")
    p.add_argument("overrides", nargs="*", help="train.py overrides")
    a = p.parse_args()
    if not (Path(a.model) / "config.json").is_file():
        raise SystemExit(f"{a.model}: not found; run python bench/rm_vs_trl.py --size 135m first")
    print(cpu_line())
    run_dir = Path(a.out) / f"run_{time.time_ns()}"
    cmd = rmcore_command(Path(a.model), run_dir, a.pairs, "fp32", f"[1932:{1932 + a.held_out}]", 1e-5, a.overrides)
    result = measure(cmd, run_dir, dict(kv.split("=", 1) for kv in a.env))
    print(f"\nfp32, {a.pairs} pairs, batch 8, {a.held_out} held out; {a.variant}: "
          f"{' '.join(a.env + a.overrides) or 'defaults'}")
    print("| variant | " + " | ".join(f"{ph} (GB)" for ph in PHASES)
          + " | peak RSS (GB) | real tokens/s | shared prompt |")
    print("|---|" + "---|" * (len(PHASES) + 3))
    print(f"| {a.variant} | " + " | ".join(f"{result['phases'][ph]:.2f}" for ph in PHASES)
          + f" | {result['peak']:.2f} | {result['tokens_per_s']:.0f} | {result['shared']:.1%} |")


if __name__ == "__main__":
    main()
