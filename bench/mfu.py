"""Model FLOPs utilisation of rmcore's RM and SFT training steps, against the machine's own matmul peak.

    python bench/mfu.py                                   # tiny, 25m, 100m on CPU; fp32, and bf16 when native
    python bench/mfu.py --sizes tiny --steps 5            # a quick look
    python bench/mfu.py --compile                         # the same with torch.compile per transformer block
    torchrun --nproc_per_node=1 bench/mfu.py --sizes 1b --precision bf16   # one GPU, FSDP2, bf16

MFU = model FLOPs of the steps / their wall time / peak, where
  model FLOPs per token = 6 x N + 6 x n_layers x T x dim
  N: the parameters that take part in matmuls (every Linear: the blocks, plus the LM head for SFT or the value head
     for the RM; not the embedding lookup or the norms); 6 = forward 2 + backward 4 per parameter per token;
  6 x n_layers x T x dim: the attention scores and the weighted sum (2 x 2 x T x dim per token per layer forward
     over all positions, halved because the mask is causal, x3 for the backward), T the length of each sequence;
  peak: torch.matmul of two large square matrices in the same dtype, measured in the same run on the same device.
A step is the real one: forward, backward, global-norm clip and AdamW step; SFT on (B, T) blocks with rmcore's
sft_step, RM on B pairs of T-token sequences packed into one row as train.py's default does (data.pack_pairs),
reward at each sequence's last token and the pairwise loss. Random tokens: the speed does not depend on them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rmcore.losses import pairwise_loss  # noqa: E402
from rmcore.model import CausalLM, ModelConfig, RewardModel  # noqa: E402
from rmcore.sft import sft_step  # noqa: E402
from rmcore.training.distributed import init_distributed, shutdown  # noqa: E402
from rmcore.training.runtime import autocast, build_model  # noqa: E402
from rmcore.training.trainer import clip_grad_norm, make_optimizer  # noqa: E402

# name: (model shape, sequences per step B, tokens per sequence T)
SIZES = {
    "tiny": (dict(vocab_size=4000, dim=256, n_layers=4, n_heads=4, ffn_dim=688), 16, 256),  # configs/tiny*.yaml
    "25m": (dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, ffn_dim=1376), 8, 256),
    "100m": (dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, tie_embeddings=True),
             4, 256),  # SmolLM2-135M's shape
    "1b": (dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632), 8, 2048),  # TinyLlama
}


def cpu_line(threads: int) -> str:
    name = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
    return (f"CPU: {name}, {threads} threads; AMX {torch.cpu._is_amx_tile_supported()}, AVX512-BF16 "
            f"{torch.cpu._is_avx512_bf16_supported()}; torch {torch.__version__}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n: int, seconds: float = 2.0) -> float:
    """FLOP/s of torch.matmul on two n x n matrices: the best of repeated timed runs."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, page faults
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def matmul_params(model, stage: str) -> int:
    """Parameters that take part in matmuls: every Linear weight, plus the LM head when it is the tied embedding."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.cfg
    if stage == "sft" and cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.dim
    return n


def step_fn(stage: str, model, d, bf16: bool, B: int, T: int):
    """One training step's forward and backward, on random tokens; returns the step's loss tensor."""
    vocab = model.cfg.vocab_size
    if stage == "sft":
        ids = torch.randint(3, vocab, (B, T))
        batch = {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
        return lambda: sft_step(model, [batch], d, bf16)[0]
    ids = torch.randint(3, vocab, (1, 2 * B * T), device=d.device)
    position_ids = torch.arange(T, device=d.device).repeat(2 * B)[None]

    def rm_step():
        with autocast(d, bf16):
            r = model(ids, position_ids=position_ids, seq_lens=(T,) * (2 * B))
        r_chosen, r_rejected = r.float().chunk(2)
        loss = pairwise_loss(r_chosen, r_rejected)
        loss.backward()
        return loss.detach()
    return rm_step


def measure(size: str, stage: str, precision: str, steps: int, d, compile_blocks: bool = False) -> dict:
    shape, B, T = SIZES[size]
    bf16 = precision == "bf16"
    cfg = ModelConfig(**shape, max_seq_len=T)
    model = build_model(CausalLM if stage == "sft" else RewardModel, d, architecture=cfg, bf16=bf16, seed=0).train()
    if compile_blocks:  # torch.compile per transformer block (torchtitan's granularity); compile time not timed
        for block in model.model.layers:
            block.compile()
    optimizer = make_optimizer(model, lr=1e-5)
    step = step_fn(stage, model, d, bf16, B, T)

    def full_step():
        loss = step()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    full_step()  # warm-up: allocations, optimizer state
    sync(d.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        full_step()
    sync(d.device)
    elapsed = (time.perf_counter() - t0) / steps
    n = matmul_params(model, stage)  # a DTensor's numel is its full size: per-rank FLOPs over one device's peak
    tokens = (2 * B if stage == "rm" else B) * T
    flops = tokens * (6 * n + 6 * cfg.n_layers * T * cfg.dim)
    return {"N": n, "tokens": tokens, "step_s": elapsed, "tokens_per_s": tokens / elapsed,
            "flops_per_s": flops / elapsed}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "25m", "100m"], choices=list(SIZES))
    p.add_argument("--stages", nargs="+", default=["rm", "sft"], choices=["rm", "sft"])
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="default: fp32, and bf16 too when the device has native bf16")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    a = p.parse_args()
    d = init_distributed("auto")
    on_gpu = d.device.type == "cuda"
    native_bf16 = on_gpu or torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    precisions = a.precision or (["fp32", "bf16"] if native_bf16 else ["fp32"])
    machine = f"GPU: {torch.cuda.get_device_name()} x{d.world_size}" if on_gpu else cpu_line(torch.get_num_threads())
    rows = []
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = matmul_peak(d.device, dtype, 8192 if on_gpu else 2048)
        for size in a.sizes:
            for stage in a.stages:
                r = measure(size, stage, precision, a.steps, d, a.compile)
                rows.append((precision, size, stage, r, peak))
                if d.is_main:
                    print(f"{precision} {size} {stage}: {r['tokens_per_s']:.0f} tokens/s, "
                          f"{r['flops_per_s'] / 1e9:.1f} GFLOP/s, MFU {r['flops_per_s'] / peak:.1%}", flush=True)
    if d.is_main:
        print(f"\n{machine}; {a.steps} timed steps after 1 warm-up{'; blocks compiled' if a.compile else ''}")
        print("| precision | size | stage | N (matmul params) | B x T | tokens/s | model GFLOP/s | "
              "matmul peak GFLOP/s | MFU |")
        print("|---|---|---|---|---|---|---|---|---|")
        for precision, size, stage, r, peak in rows:
            _, B, T = SIZES[size]
            print(f"| {precision} | {size} | {stage} | {r['N'] / 1e6:.1f}M | {2 * B if stage == 'rm' else B} x {T} | "
                  f"{r['tokens_per_s']:.0f} | {r['flops_per_s'] / 1e9:.1f} | {peak / 1e9:.1f} | "
                  f"{r['flops_per_s'] / peak:.1%} |")
    shutdown()


if __name__ == "__main__":
    main()
