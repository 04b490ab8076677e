"""Where the reward-model stage's memory goes, at SmolLM2-135M's size: one process per setting, each timing a few
real training steps (packed micro-batches, pairwise loss, clip, AdamW) and reporting its peak RSS.

    python bench/rm_memory.py                         # micro-batches of 8 and 2 pairs, activation checkpointing off/on
    python bench/rm_memory.py --settings 8:off --steps 2   # one setting, a quick look

Each setting `pairs_per_micro_batch:checkpointing` trains 8 pairs per optimizer step (grad_accum = 8 / pairs), so
every setting takes the same optimizer steps; the pairs are the shipped HH file's first 8 x (steps + 1), their real
lengths (SmolLM2's tokenizer, raw HH text, at most 512 tokens), their tokens random (speed and memory do not depend
on them). Printed per setting: what lives through the whole run, the weights and AdamW's two moments (12 bytes per
parameter in fp32; the gradients' 4 more exist from the backward to the step, while activations are being freed);
the tensors autograd keeps for the backward of the largest micro-batch (a saved-tensors hook: each storage once, no
weight), that micro-batch's token count and the bytes per token; peak RSS of the process (wait4); real tokens/s over
the timed steps. At the end of the largest forward the process holds the first two: peak RSS ~ their sum.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from rm_vs_trl import DATA, cpu_line, timed  # noqa: E402


def pair_lengths(model_dir: str, n: int) -> list[tuple[int, int]]:
    """(chosen, rejected) token counts of the first n HH pairs with both at most 512 tokens, BOS and EOS counted."""
    from rmcore.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(model_dir)
    out = []
    with gzip.open(DATA, "rt") as f:
        for line in f:
            r = json.loads(line)
            lengths = tuple(len(tok.encode(r[k])) + 2 for k in ("chosen", "rejected"))
            if max(lengths) <= 512:
                out.append(lengths)
            if len(out) == n:
                return out
    return out


def child(model_dir: str, pairs: int, checkpointing: bool, steps: int):
    import torch

    from rmcore.interop.hf_checkpoint import load_pretrained
    from rmcore.losses import pairwise_loss
    from rmcore.model import RewardModel
    from rmcore.training.trainer import clip_grad_norm, make_optimizer
    model = load_pretrained(RewardModel, model_dir).train()
    model.model.activation_checkpointing = checkpointing
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, lr=1e-5)
    lengths = pair_lengths(model_dir, 8 * (steps + 1))
    g = torch.Generator().manual_seed(0)
    # storages, not tensors: views share one; the weights a linear keeps for its backward are not activations
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    most = {"saved": 0}  # the largest micro-batch's

    def pack(group):
        seq_lens = tuple(c for c, _ in group) + tuple(r for _, r in group)
        ids = torch.randint(3, model.cfg.vocab_size, (1, sum(seq_lens)), generator=g)
        positions = torch.cat([torch.arange(n) for n in seq_lens])[None]
        return ids, positions, seq_lens

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def micro_step(group):
        ids, positions, seq_lens = pack(group)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            r = model(ids, position_ids=positions, seq_lens=seq_lens)
        most["saved"] = max(most["saved"], sum(saved.values()))
        loss = pairwise_loss(r[:len(group)], r[len(group):]) * len(group) / 8
        loss.backward()
        return sum(seq_lens)

    tokens, largest, t0 = 0, 0, None
    for step in range(steps + 1):  # the first step is a warm-up
        if step == 1:
            t0, tokens = time.perf_counter(), 0
        batch = lengths[8 * step:8 * step + 8]
        for i in range(0, 8, pairs):
            n = micro_step(batch[i:i + pairs])
            tokens, largest = tokens + n, max(largest, n)
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"params": n_params, "saved_mb": most["saved"] / 1e6, "largest": largest,
                      "tokens_per_s": tokens / elapsed}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/bench/rm_vs_trl/model_135m",
                   help="a reward model directory (bench/rm_vs_trl.py --size 135m writes this one)")
    p.add_argument("--settings", nargs="+", default=["8:off", "2:off", "8:on", "2:on"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        pairs, checkpointing, steps = a.child
        return child(a.model, int(pairs), checkpointing == "on", int(steps))
    print(cpu_line())
    print(f"{a.model}: fp32, 8 pairs per optimizer step, {a.steps} timed steps after a warm-up")
    print("| pairs per micro-batch | activation checkpointing | largest micro-batch (tokens) | weights + AdamW (MB) "
          "| saved for backward, largest micro-batch (MB) | per token (MB) | peak RSS (MB) | real tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in a.settings:
        pairs, checkpointing = setting.split(":")
        stdout, rss_gb = timed([sys.executable, __file__, "--model", a.model, "--child", pairs, checkpointing,
                                str(a.steps)])
        r = json.loads(stdout.strip().splitlines()[-1])
        print(f"| {pairs} | {checkpointing} | {r['largest']} | {12 * r['params'] / 1e6:.0f} | {r['saved_mb']:.0f} | "
              f"{r['saved_mb'] / r['largest']:.3f} | {rss_gb * 1e3:.0f} | {r['tokens_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
