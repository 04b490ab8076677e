"""Launching a run: the entry point of every script (`run_script`), and what each training script does before its
loop (`setup`, `load_splits`). train.py, raft.py and ppo.py call these; none of them imports another script.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rmcore.config.loader import save_config
from rmcore.config.sections import TrainConfig
from rmcore.data.records import require_data
from rmcore.errors import ConfigError, user_errors
from rmcore.interop.hf_checkpoint import read_hf_config
from rmcore.interop.hub import resolve_model
from rmcore.tokenizer import Tokenizer
from rmcore.training.distributed import Dist, init_distributed, say, shutdown
from rmcore.training.run_dir import prepare_run_dir
from rmcore.training.runtime import resolve_precision, seed_everything, set_host_memory


def run_script(main, argv: list[str]):
    """A script's entry point: bad data, config or model files give one message and no traceback; a
    SystemExit(0) (run.halt_at_step, halt_after_iteration) ends a run early but cleanly; then the process group is
    shut down (after an error torchrun tears it down itself)."""
    try:
        with user_errors():
            main(argv)
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    shutdown()


def setup(cfg: TrainConfig) -> tuple[Dist, Tokenizer]:
    """Process group, seeds, precision, host memory policy (CPU), checkpoint writing, run directory with the
    resolved config, tokenizer."""
    dist = init_distributed(cfg.run.device)
    if dist.device.type == "cpu":
        set_host_memory(cfg.run.host_memory)
    # DCP writes every tensor through torch.save, whose CRC32 of each record costs ~1 s per GB of checkpoint on a
    # CPU, and torch.load never checks it (tests/training/test_trainer.py)
    torch.serialization.set_crc32_options(False)
    seed_everything(cfg.run.seed)
    cfg.run.precision, why = resolve_precision(cfg.run.precision, dist.device)
    say(dist, why)
    prepare_run_dir(cfg, dist)  # a checkpoint of another run is never resumed; resume=never moves the old run aside
    if dist.is_main:
        save_config(cfg, str(Path(cfg.run.out_dir) / "config.yaml"))
    if not cfg.data.train:
        raise ConfigError("data.train is empty: name the training file(s), e.g. "
                          "\"data.train=['pairs.jsonl.gz[:1000]']\"")
    tok_dir = cfg.run.tokenizer or cfg.run.init_from
    if tok_dir is None:
        raise ConfigError("run.tokenizer is not set and there is no run.init_from to take the tokenizer from")
    return dist, Tokenizer.from_pretrained(tok_dir)


def load_splits(load, cfg: TrainConfig, tokenizer: Tokenizer, dist: Dist, unit: str):
    """(train, held-out or None) through a loader such as load_blocks or load_pairs; what each dropped is printed.
    A split that comes out empty stops the run, saying why."""
    splits = []
    for name, specs in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        data = None
        if specs:
            data, report = load(specs, tokenizer, cfg.data, f"{cfg.run.stage} {name}")
            say(dist, report.summary())
            require_data(len(data), report, specs, f"data.{name} ({cfg.run.stage})", unit)
        splits.append(data)
    return splits


def has_value_head(path: str) -> bool:
    """Whether the HF directory `path` holds a reward model (else a causal LM, whose value head starts fresh)."""
    config = read_hf_config(resolve_model(path))
    return "LlamaForSequenceClassification" in config.get("architectures", [])
