"""rmcore's `rm` stage against TRL's RewardTrainer, as a new user would run each (defaults, no tuning).

    pip install -e '.[bench]'          # TRL 1.16 (never imported by rmcore)
    python bench/rm_vs_trl.py                          # 1,000 pairs, 3 alternations A B A B A B
    python bench/rm_vs_trl.py --pairs 300 --repeats 1  # a quick look

Both sides train the same weights (a random-initialised 5.3M-parameter LLaMA reward model saved by transformers,
with a byte-level BPE tokenizer trained here) on the same first N pairs of the shipped HH file, batch 8, max length
512 (longer pairs dropped on both sides), lr 3e-4 linear, 1 epoch, fp32 (bf16 too when the CPU has native bf16),
each run in its own process, both reading the raw HH text (rmcore's template set to HH's own tags). Printed per
run: real (non-padding) tokens/s over the training loop, padding fraction, peak RSS of the process, final training
loss (mean of the last 10 steps), held-out accuracy (records [1932:]); then the rmcore/TRL ratio of each pair of
runs and its median.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the file the repository ships, or under $RMCORE_DATA (as rmcore.data.files.data_root)
DATA = Path(os.environ.get("RMCORE_DATA") or REPO / "data") / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
HELD_OUT = "[1932:]"


def cpu_line() -> str:
    import torch
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (f"CPU: {name}, {os.cpu_count()} cores; AMX {torch.cpu._is_amx_tile_supported()}, AVX512-BF16 "
            f"{torch.cpu._is_avx512_bf16_supported()}; torch {torch.__version__}")


def native_bf16() -> bool:
    import torch
    return torch.cuda.is_available() or torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


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
    """(stdout, peak RSS in GB) of a child process, measured by /usr/bin/time."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return proc.stdout, rss_kb / 1e6


def run_rmcore(model_dir: Path, out: Path, pairs: int, precision: str) -> dict:
    run_dir = out / f"rmcore_{precision}_{time.time_ns()}"
    cmd = [sys.executable, "train.py", "run.stage=rm", f"run.init_from={model_dir}", f"run.out_dir={run_dir}",
           f"run.precision={precision}", "run.device=cpu", "run.export=false", "logging.progress=false",
           f"data.train=['{DATA}[:{pairs}]']", f"data.eval=['{DATA}{HELD_OUT}']", "data.max_length=512",
           "optim.lr=3e-4", "optim.schedule=linear", "optim.epochs=1", "optim.micro_batch_size=8",
           # the raw HH text, as TRL reads it: both sides tokenize identical strings
           r'data.human_tag="\n\nHuman:"', r'data.assistant_tag="\n\nAssistant:"', 'data.tag_separator=""']
    _, rss = timed(cmd)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "tokens_per_s" in r]
    final_eval = [r for r in records if "eval_acc" in r][-1]
    return {"tokens_per_s": steps[-1]["tokens_per_s"], "padding": statistics.mean(r["padding"] for r in steps),
            "rss_gb": rss, "loss": statistics.mean(r["loss"] for r in steps[-10:]), "acc": final_eval["eval_acc"]}


def run_trl(model_dir: Path, out: Path, pairs: int, precision: str) -> dict:
    stdout, rss = timed([sys.executable, __file__, "--trl-child", str(model_dir), str(out / f"trl_{time.time_ns()}"),
                         str(pairs), precision])
    return {**json.loads(stdout.strip().splitlines()[-1]), "rss_gb": rss}


def trl_child(model_dir: str, out: str, pairs: int, precision: str):
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
    args = RewardConfig(output_dir=out, per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=3e-4,
                        lr_scheduler_type="linear", num_train_epochs=1, max_length=512, report_to=[],
                        save_strategy="no", eval_strategy="no", logging_steps=10, use_cpu=True,
                        bf16=precision == "bf16", seed=0, disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=records(slice(0, pairs)),
                            eval_dataset=records(slice(1932, None)), processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    real = slots = 0
    for batch in trainer.get_train_dataloader():  # the same collator and batch size: its padding
        real += int(batch["attention_mask"].sum())
        slots += batch["attention_mask"].numel()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    acc = trainer.evaluate()["eval_accuracy"]
    print(json.dumps({"tokens_per_s": real / elapsed, "padding": 1 - real / slots, "loss": losses[-1], "acc": acc}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench/rm_vs_trl")
    p.add_argument("--trl-child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_child:
        model_dir, out, pairs, precision = a.trl_child
        return trl_child(model_dir, out, int(pairs), precision)
    print(cpu_line())
    out = Path(a.out)
    model_dir = build(out, a.pairs)
    for precision in ["fp32"] + (["bf16"] if native_bf16() else []):
        rows, ratios = [], []
        for i in range(a.repeats):
            mine, theirs = run_rmcore(model_dir, out, a.pairs, precision), run_trl(model_dir, out, a.pairs, precision)
            rows += [("rmcore", i + 1, mine), ("TRL", i + 1, theirs)]
            ratios.append(mine["tokens_per_s"] / theirs["tokens_per_s"])
        print(f"\n{precision}, {a.pairs} pairs, batch 8, max length 512, lr 3e-4 linear, 1 epoch")
        print("| side | run | real tokens/s | padding | peak RSS (GB) | final loss | held-out acc |")
        print("|---|---|---|---|---|---|---|")
        for side, i, r in rows:
            print(f"| {side} | {i} | {r['tokens_per_s']:.0f} | {r['padding']:.1%} | {r['rss_gb']:.2f} | "
                  f"{r['loss']:.4f} | {r['acc']:.2%} |")
        print(f"rmcore/TRL real tokens/s: {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
