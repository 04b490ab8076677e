"""rmcore's `rm` stage against TRL's RewardTrainer, as a new user would run each (defaults, no tuning).

    pip install -e '.[bench]'          # TRL 1.16 (never imported by rmcore)
    python bench/rm_vs_trl.py                          # 1,000 pairs, 3 alternations A B A B A B
    python bench/rm_vs_trl.py --pairs 300 --repeats 1  # a quick look
    python bench/rm_vs_trl.py --size 135m --pairs 200  # SmolLM2-135M-Instruct's weights (models/, as the README)

Both sides train the same weights (a random-initialised 5.3M-parameter LLaMA reward model saved by transformers,
with a byte-level BPE tokenizer trained here) on the same first N pairs of the shipped HH file, batch 8, max length
512 (longer pairs dropped on both sides), lr 3e-4 linear, 1 epoch, fp32 (bf16 too when the CPU has native bf16),
each run in its own process, both reading the raw HH text (rmcore's template set to HH's own tags). Printed per
run: real (non-padding) tokens/s over the training loop (the tokens of the pairs' sequences; rmcore runs the first
tokens a pair's two sequences share once, `data.share_prompt`, and the shared-prompt column is the share of tokens
that saved), padding fraction, peak RSS of the process, final training loss (mean of the last 10 steps), held-out
accuracy (records [1932:]); then the rmcore/TRL ratio of each pair of runs and its median.

--size 135m: the trunk is SmolLM2-135M-Instruct's (the HF directory `python -m rmcore.interop.gguf convert --gguf
smollm2` writes) with its tokenizer, and a fresh value head drawn once (seed 0) and saved with it, so both sides start
from the same directory; the held-out set is the first --held-out pairs of records [1932:]. Utilisation = 6 x N x
tokens run per second (real tokens, a shared prompt once) / the fp32 matmul rate (2048^3, measured before the runs),
N = the reward model's parameters.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the file the repository ships, or under $RMCORE_DATA (as rmcore.data.files.data_root)
DATA = Path(os.environ.get("RMCORE_DATA") or REPO / "data") / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
HELD_OUT = "[1932:]"
DEVICE = os.environ.get("RMCORE_BENCH_DEVICE", "cpu")  # cuda: both sides on the GPU (children read it too)


def cpu_line() -> str:
    import torch
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (f"CPU: {name}, {os.cpu_count()} cores; AMX {torch.cpu._is_amx_tile_supported()}, AVX512-BF16 "
            f"{torch.cpu._is_avx512_bf16_supported()}; torch {torch.__version__}")


def native_bf16() -> bool:
    import torch
    return torch.cuda.is_available() or torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def build_135m(out: Path, source: Path) -> tuple[Path, int]:
    """SmolLM2-135M-Instruct's trunk and tokenizer with a fresh value head (seed 0), saved by transformers; and N."""
    import shutil

    import torch
    from transformers import LlamaForSequenceClassification
    model_dir = out / "model_135m"
    if not (source / "config.json").is_file():
        raise SystemExit(f"{source}: not found; convert it first: python -m rmcore.interop.gguf convert --gguf smollm2 "
                         f"--out {source}")
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    # the embedding is a lookup, not a matmul: N counts the rest (the reward model has no LM head)
    n = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    if not (model_dir / "config.json").is_file():
        model.save_pretrained(model_dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (source / name).is_file():
                shutil.copy(source / name, model_dir / name)
    print(f"model: N = {n / 1e6:.1f}M matmul parameters (SmolLM2-135M-Instruct's trunk without its embedding, a "
          f"fresh value head)")
    return model_dir, n


def matmul_rate() -> float:
    """fp32 GFLOP/s of an n x n torch.matmul on DEVICE (n = 2048 on a CPU, 8192 on a GPU), the best of 5 after a
    warm-up."""
    import torch
    n = 8192 if DEVICE == "cuda" else 2048
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    a @ b
    best = float("inf")
    for _ in range(5):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def build(out: Path, pairs: int) -> Path:
    """The tokenizer and the transformers-saved model both sides start from."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rmcore.data.tokenizer_training import train_tokenizer
    model_dir = out / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    with gzip.open(DATA, "rt") as f:
        texts = [t for _, line in zip(range(pairs), f) for t in json.loads(line).values()]
    tok = train_tokenizer(texts, model_dir, vocab_size=8000, kind="bpe")
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, num_labels=1,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir, add_eos=True)  # transformers' tokenizer(text) appends EOS, as rmcore trains on
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e6:.2f}M parameters ({n - model.model.embed_tokens.weight.numel():,} non-embedding), "
          f"vocabulary {tok.vocab_size}")
    return model_dir


def timed(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """(stdout, peak RSS in GB) of a child process: its own maximum resident set size, from wait4's rusage (Linux
    reports it in kB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return stdout, usage.ru_maxrss / 1e6


def rmcore_command(model_dir: Path, run_dir: Path, pairs: int, precision: str, held_out: str, lr: float,
                   extra: list[str]) -> list[str]:
    """The train.py command line of the rmcore side."""
    return [sys.executable, "train.py", "run.stage=rm", f"run.init_from={model_dir}", f"run.out_dir={run_dir}",
            f"run.precision={precision}", f"run.device={DEVICE}", "run.export=false", "logging.progress=false",
            f"data.train=['{DATA}[:{pairs}]']", f"data.eval=['{DATA}{held_out}']", "data.max_length=512",
            f"optim.lr={lr}", "optim.schedule=linear", "optim.epochs=1", "optim.micro_batch_size=8",
            # the raw HH text, as TRL reads it: both sides tokenize identical strings
            r'data.human_tag="\n\nHuman:"', r'data.assistant_tag="\n\nAssistant:"', 'data.tag_separator=""', *extra]


def run_rmcore(model_dir: Path, out: Path, pairs: int, precision: str, held_out: str, lr: float,
               extra: list[str]) -> dict:
    run_dir = out / f"rmcore_{precision}_{time.time_ns()}"
    _, rss = timed(rmcore_command(model_dir, run_dir, pairs, precision, held_out, lr, extra))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "tokens_per_s" in r]
    final_eval = [r for r in records if "eval_acc" in r][-1]
    return {"tokens_per_s": steps[-1]["tokens_per_s"], "padding": statistics.mean(r["padding"] for r in steps),
            "shared": statistics.mean(r.get("shared_prompt", 0.0) for r in steps),
            "rss_gb": rss, "loss": statistics.mean(r["loss"] for r in steps[-10:]), "acc": final_eval["eval_acc"]}


def run_trl(model_dir: Path, out: Path, pairs: int, precision: str, held_out: str, lr: float) -> dict:
    stdout, rss = timed([sys.executable, __file__, "--trl-child", str(model_dir), str(out / f"trl_{time.time_ns()}"),
                         str(pairs), precision, held_out, str(lr)])
    return {**json.loads(stdout.strip().splitlines()[-1]), "rss_gb": rss}


def trl_child(model_dir: str, out: str, pairs: int, precision: str, held_out: str, lr: float):
    """TRL's RewardTrainer with its defaults, the shared settings set; prints one JSON line."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    def records(sl: slice) -> Dataset:
        with gzip.open(DATA, "rt") as f:
            rows = [json.loads(line) for line in f][sl]
        return Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    args = RewardConfig(output_dir=out, per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=lr,
                        lr_scheduler_type="linear", num_train_epochs=1, max_length=512, report_to=[],
                        save_strategy="no", eval_strategy="no", logging_steps=10, use_cpu=DEVICE == "cpu",
                        bf16=precision == "bf16", seed=0, disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=records(slice(0, pairs)),
                            eval_dataset=records(slice(*(int(x) if x else None for x in held_out[1:-1].split(":")))),
                            processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    real = slots = 0
    for batch in trainer.get_train_dataloader():  # the same collator and batch size: its padding
        real += int(batch["attention_mask"].sum())
        slots += batch["attention_mask"].numel()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    acc = trainer.evaluate()["eval_accuracy"]
    print(json.dumps({"tokens_per_s": real / elapsed, "padding": 1 - real / slots, "shared": 0.0,
                      "loss": losses[-1] if losses else float("nan"), "acc": acc}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "135m"], default="tiny")
    p.add_argument("--pairs", type=int, default=None, help="training pairs (default: 1000 tiny, 200 135m)")
    p.add_argument("--held-out", type=int, default=None, help="held-out pairs from record 1932 (default: all 380)")
    p.add_argument("--lr", type=float, default=None, help="default: 3e-4 tiny, 1e-5 135m")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="default: fp32, and bf16 too when the CPU has native bf16")
    p.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"), help="--size 135m's source")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench/rm_vs_trl")
    p.add_argument("--rmcore-args", nargs="*", default=[], help="extra train.py overrides (ablations)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    p.add_argument("--trl-child", nargs=6, help=argparse.SUPPRESS)
    a = p.parse_args()
    if not a.trl_child:
        global DEVICE
        DEVICE = os.environ["RMCORE_BENCH_DEVICE"] = a.device  # the TRL child reads it back
    if a.trl_child:
        model_dir, out, pairs, precision, held_out, lr = a.trl_child
        return trl_child(model_dir, out, int(pairs), precision, held_out, float(lr))
    print(cpu_line())
    out = Path(a.out)
    pairs = a.pairs or (200 if a.size == "135m" else 1000)
    lr = a.lr or (1e-5 if a.size == "135m" else 3e-4)
    held_out = f"[1932:{1932 + a.held_out}]" if a.held_out else HELD_OUT
    if a.size == "135m":
        model_dir, n_params = build_135m(out, Path(a.model))
    else:
        model_dir, n_params = build(out, pairs), None
    rate = matmul_rate()
    print(f"fp32 matmul rate ({DEVICE}): {rate:.1f} GFLOP/s")
    for precision in a.precision or ["fp32"] + (["bf16"] if native_bf16() else []):
        rows, ratios = [], []
        for i in range(a.repeats):
            mine = run_rmcore(model_dir, out, pairs, precision, held_out, lr, a.rmcore_args)
            theirs = run_trl(model_dir, out, pairs, precision, held_out, lr)
            rows += [("rmcore", i + 1, mine), ("TRL", i + 1, theirs)]
            ratios.append(mine["tokens_per_s"] / theirs["tokens_per_s"])
            print(f"{precision} alternation {i + 1}: rmcore {mine['tokens_per_s']:.0f} real tokens/s at "
                  f"{mine['rss_gb']:.2f} GB, TRL {theirs['tokens_per_s']:.0f} at {theirs['rss_gb']:.2f} GB "
                  f"(ratio {ratios[-1]:.2f})", flush=True)
        print(f"\n{precision}, {pairs} pairs, batch 8, max length 512, lr {lr:g} linear, 1 epoch, held-out "
              f"{held_out}{', rmcore ' + ' '.join(a.rmcore_args) if a.rmcore_args else ''}")
        print("| side | run | real tokens/s | padding | shared prompt | peak RSS (GB) | final loss | held-out acc | "
              "utilisation |")
        print("|---|---|---|---|---|---|---|---|---|")
        for side, i, r in rows:
            # the work done: a shared prompt's tokens run once, so they count once
            run = r["tokens_per_s"] * (1 - r["shared"])
            used = f"{6 * n_params * run / (rate * 1e9):.0%}" if n_params and precision == "fp32" else "-"
            print(f"| {side} | {i} | {r['tokens_per_s']:.0f} | {r['padding']:.1%} | {r['shared']:.1%} | "
                  f"{r['rss_gb']:.2f} | {r['loss']:.4f} | {r['acc']:.2%} | {used} |")
        print(f"rmcore/TRL real tokens/s: {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
