"""One GRPO/PPO update step at SmolLM2-135M, phase by phase, under each host-memory policy (run.host_memory).

    python bench/update_step.py                      # release, keep, glibc; each in its own process

A step as ppo.py's update takes it: 8 samples of 41 prompt + 47 response tokens (the mean lengths of
bench/grpo_vs_trl.py) as one packed row, the LM head at the response tokens, the fused log-prob and entropy, a
loss, the backward, clipping and fused AdamW (each policy's host-memory step at the end, as the Trainer does). Prints
the best of 3 timed steps per phase (ms), after one warm-up, and the process's peak RSS, with the fp32 matmul rate at
2048^3 measured in the same process and the step's work (6 N per token, N with the tied LM head once).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("release", "keep", "glibc")
PHASES = ("forward", "log-prob + entropy", "backward", "clip", "AdamW", "host memory")


def one_policy(model_dir: str, policy: str) -> dict:
    import torch

    from rmcore.align.rollouts import pack, response_logits
    from rmcore.interop.hf_checkpoint import load_pretrained
    from rmcore.lean_ops import token_logprobs_and_entropy
    from rmcore.model import CausalLM
    from rmcore.training.runtime import release_freed_memory, set_host_memory
    from rmcore.training.trainer import clip_grad_norm, make_optimizer
    set_host_memory(policy)
    torch.manual_seed(0)
    model = load_pretrained(CausalLM, model_dir)
    model.train()
    g = torch.Generator().manual_seed(0)
    batch = pack([torch.randint(3, 40000, (41,), generator=g).tolist() for _ in range(8)],
                 [torch.randint(3, 40000, (47,), generator=g).tolist() for _ in range(8)], pad_id=0)
    real = batch.response_mask.bool()
    optimizer = make_optimizer(model, lr=1e-6)

    def step() -> dict:
        times, t = {}, time.perf_counter()

        def lap(name):
            nonlocal t
            times[name] = time.perf_counter() - t
            t = time.perf_counter()
        logits = response_logits(model, batch, packed=True)
        lap("forward")
        logp, entropy = token_logprobs_and_entropy(logits, batch.responses[real])
        loss = -(logp.sum() + 0.01 * entropy.sum()) / real.sum()
        lap("log-prob + entropy")
        loss.backward()
        lap("backward")
        clip_grad_norm(model, 1.0)
        lap("clip")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lap("AdamW")
        if policy == "release":
            release_freed_memory()
        lap("host memory")
        return times

    step()
    steps = [step() for _ in range(3)]
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        rates.append(2 * 2048 ** 3 / (time.perf_counter() - t))
    n_params = sum(p.numel() for p in model.parameters())
    return {"ms": {k: 1e3 * min(s[k] for s in steps) for k in PHASES},
            "step_ms": 1e3 * min(sum(s.values()) for s in steps), "tokens": int(batch.attention_mask.sum()),
            "work": 6 * n_params * int(batch.attention_mask.sum()), "rate": max(rates),
            "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(one_policy(a.model, a.child)))
        return
    print("| run.host_memory | " + " | ".join(f"{k} (ms)" for k in PHASES)
          + " | step (ms) | utilisation | peak RSS (GB) |")
    print("|---" * (len(PHASES) + 4) + "|")
    for policy in a.policies:
        out = subprocess.run([sys.executable, __file__, "--model", a.model, "--child", policy], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {policy} | " + " | ".join(f"{r['ms'][k]:.0f}" for k in PHASES)
              + f" | {r['step_ms']:.0f} | {r['work'] / (r['step_ms'] / 1e3) / r['rate']:.0%} "
              f"(of {r['rate'] / 1e9:.0f} GFLOP/s) | {r['rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
