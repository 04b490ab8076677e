"""What every training script does around its loop: start the run, load its data, describe its model and export.

train.py, raft.py and ppo.py call these; none of them imports another script.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rmcore.config import ConfigError, TrainConfig, save_config
from rmcore.data import Template, require_data
from rmcore.distributed import Dist, init_distributed
from rmcore.loop import resolve_precision, seed_everything
from rmcore.rundir import prepare_run_dir
from rmcore.tokenizer import Tokenizer


def setup(cfg: TrainConfig) -> tuple[Dist, Tokenizer]:
    """Process group, seeds, precision, run directory with the resolved config, tokenizer."""
    d = init_distributed(cfg.run.device)
    seed_everything(cfg.run.seed)
    cfg.run.precision, why = resolve_precision(cfg.run.precision, d.device)
    say(d, why)
    prepare_run_dir(cfg, d)  # a checkpoint of another run is never resumed; resume=never moves the old run aside
    if d.is_main:
        save_config(cfg, str(Path(cfg.run.out_dir) / "config.yaml"))
    if not cfg.data.train:
        raise ConfigError("data.train is empty: name the training file(s), e.g. \"data.train=['pairs.jsonl.gz[:1000]']\"")
    tok_dir = cfg.run.tokenizer or cfg.run.init_from
    if tok_dir is None:
        raise ConfigError("run.tokenizer is not set and there is no run.init_from to take the tokenizer from")
    return d, Tokenizer.from_pretrained(tok_dir)


def load_splits(load, cfg: TrainConfig, tok: Tokenizer, d: Dist, unit: str):
    """(train, held-out or None) through a loader such as load_blocks or load_pairs; what each dropped is printed.
    A split that comes out empty stops the run, saying why."""
    splits = []
    for name, specs in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        data = None
        if specs:
            data, report = load(specs, tok, cfg.data, f"{cfg.run.stage} {name}")
            say(d, report.summary())
            require_data(len(data), report, specs, f"data.{name} ({cfg.run.stage})", unit)
        splits.append(data)
    return splits


def model_config(cfg: TrainConfig, tok: Tokenizer):
    """cfg.model with the tokenizer's vocabulary and special ids (a fresh init must agree with its tokenizer)."""
    return dataclasses.replace(cfg.model, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)


def has_value_head(path: str) -> bool:
    config = json.loads((Path(path) / "config.json").read_text())
    return "LlamaForSequenceClassification" in config.get("architectures", [])


def export_config(cfg: TrainConfig) -> dict:
    """Recorded in the exported config.json, so evaluation and scoring apply the template the model was trained with."""
    return {"rmcore": {"stage": cfg.run.stage, "template": Template.from_config(cfg.data).to_dict(),
                       "max_length": cfg.data.max_length, "train_data": list(cfg.data.train)}}


def bf16(cfg: TrainConfig) -> bool:
    return cfg.run.precision == "bf16"


def run_script(main, argv: list[str]):
    """A training script's entry point: bad data, config or model files give one message and no traceback; a
    SystemExit(0) (run.halt_at_step, halt_after_iteration) ends a run early but cleanly; then the process group is
    shut down (after an error torchrun tears it down itself)."""
    from rmcore.distributed import shutdown
    from rmcore.errors import user_errors
    try:
        with user_errors():
            main(argv)
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    shutdown()


def say(d: Dist, text: str):
    """Print on rank 0 only."""
    if d.is_main:
        print(text, flush=True)
