"""The run's log: metrics.jsonl, a progress bar (loss, accuracy or DPO's reward accuracy and margin, lr, tokens/s,
ETA) and W&B, all on rank 0."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from rmcore.config.sections import LoggingConfig
from rmcore.errors import WandbUnavailable
from rmcore.training.distributed import Dist


def wandb_login(mode: str):
    """logging.wandb=online needs an API key and the network: checked (key verified with the server) when the run
    starts, so a missing login never surfaces after hours of training. offline and disabled need neither."""
    if mode != "online":
        return
    import wandb  # optional (the `wandb` extra): logging.wandb=disabled never imports it
    try:
        wandb.login(verify=True, timeout=30)
    except Exception as e:  # wandb raises UsageError (no key), AuthenticationError (bad key or no network), ...
        raise WandbUnavailable(
            f"logging.wandb=online, but W&B is not usable: {type(e).__name__}: {e}\n  log in first (`wandb login`, or "
            f"set WANDB_API_KEY), or log offline (logging.wandb=offline) and upload later with `wandb sync`") from None


class Logger:
    """Rank 0 writes metrics.jsonl, shows a progress bar (loss, accuracy, lr, tokens/s, ETA) and, when enabled,
    logs to W&B. wandb=disabled never imports wandb; offline never touches the network."""

    def __init__(self, out_dir: Path, dist: Dist, *, total_steps: int, config: dict, settings: LoggingConfig,
                 start_step: int = 0):
        """config: the run's resolved config (W&B's run config); settings: its `logging` section."""
        self.dist = dist
        self.file = None
        self.bar = None
        self.wandb = None
        self.tokens = 0
        self.t0 = time.perf_counter()
        if not dist.is_main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a")
        if settings.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")
        if settings.wandb != "disabled":
            import wandb  # optional (the `wandb` extra), imported only when W&B logging is on
            wandb_login(settings.wandb)
            self.wandb = wandb.init(project=settings.project, name=settings.run_name, config=config,
                                    mode=settings.wandb, dir=str(out_dir), resume="allow")

    def log(self, step: int, metrics: dict, tokens: int = 0, advance: bool = True):
        if not self.dist.is_main:
            return
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        record = {"step": step, **metrics}
        if tokens:
            record["tokens_per_s"] = self.tokens / max(elapsed, 1e-9)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if self.bar is not None:
            if advance:
                self.bar.update(1)
            shown = {k: v for k, v in record.items()
                     if k in ("loss", "acc", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_acc",
                              "eval_rewards/accuracies", "lr", "tokens_per_s")}
            self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in shown.items()})

    def print(self, *args):
        if self.dist.is_main:
            msg = " ".join(str(a) for a in args)
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
