"""What LoRA saves: step time and peak memory of the reward-model training step, full fine-tuning against LoRA.

    python bench/lora.py                      # tiny and 100m (SmolLM2-135M's shape), fp32
    python bench/lora.py --sizes tiny --steps 3

Each configuration runs in its own process (peak RSS is per process): the model is built, then one warm-up and
--steps timed RM steps (forward, backward, clip, AdamW) of bench/mfu.py on random tokens. LoRA: r 8, alpha 32,
dropout 0.1 on every attention and MLP projection, the value head trained fully (TRL's reward-modeling guide);
lora-p0: the same without dropout (each adapter's dropout keeps its own copy of its input for the backward pass).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mfu import SIZES, cpu_line, step_fn  # noqa: E402

from rmcore.lora import LoraConfig, parameter_counts  # noqa: E402
from rmcore.model import ModelConfig, RewardModel  # noqa: E402
from rmcore.training.distributed import Dist  # noqa: E402
from rmcore.training.runtime import build_model  # noqa: E402
from rmcore.training.trainer import clip_grad_norm, make_optimizer  # noqa: E402


def child(size: str, mode: str, steps: int):
    shape, B, T = SIZES[size]
    lora = {"full": None, "lora": LoraConfig(enabled=True), "lora-p0": LoraConfig(enabled=True, dropout=0.0)}[mode]
    d = Dist()
    model = build_model(RewardModel, d, architecture=ModelConfig(**shape, max_seq_len=T), lora=lora).train()
    optimizer = make_optimizer(model, lr=1e-5)
    step = step_fn("rm", model, d, False, B, T)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step is the warm-up (allocations, optimizer state)
            times.append(time.perf_counter() - t0)
    trainable, total = parameter_counts(model)
    print(json.dumps({"step_s": sorted(times)[len(times) // 2], "rss_gb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1e6, "trainable": trainable, "total": total, "tokens": 2 * B * T}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "100m"], choices=list(SIZES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(*a.child, a.steps)
    print(cpu_line(torch.get_num_threads()))
    rows = []
    for size in a.sizes:
        for mode in ("full", "lora", "lora-p0"):
            proc = subprocess.run([sys.executable, __file__, "--child", size, mode, "--steps", str(a.steps)],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((size, mode, r))
            print(f"{size} {mode}: {r['step_s']:.3f} s/step, peak RSS {r['rss_gb']:.2f} GB", flush=True)
    print(f"\nRM step, fp32, median of {a.steps} steps after a warm-up; each configuration in its own process")
    print("| size | training | trainable / total params | B x T (tokens) | s/step | tokens/s | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|")
    for size, mode, r in rows:
        print(f"| {size} | {mode} | {r['trainable'] / 1e6:.2f}M / {r['total'] / 1e6:.1f}M | {r['tokens']} | "
              f"{r['step_s']:.3f} | {r['tokens'] / r['step_s']:.0f} | {r['rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
