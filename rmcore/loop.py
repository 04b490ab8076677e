"""What every training loop shares: model construction (plain or FSDP2), AdamW, the learning-rate schedule,
bf16 autocast, gradient clipping, sharded checkpoints that resume exactly, and logging.

The loops themselves (train.py's `sft` and `rm`, raft.py, ppo.py) stay readable top to bottom and call these.
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from rmcore.checkpoint import load_pretrained, read_hf_config
from rmcore.distributed import Dist, all_reduce_sum, apply_fsdp, gather_objects
from rmcore.config import ConfigError, config_to_dict
from rmcore.errors import UserError
from rmcore.lora import LoraConfig, apply_lora, parameter_counts
from rmcore.rundir import Checkpointer, export_pretrained, run_identity, trim_metrics

# one process saving a DCP checkpoint without a process group is a supported, intended case here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


# ------------------------------------------------------------------------------------------------ precision
def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` multiplies bf16 matrices natively, why)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'does not support'} bf16"
    if torch.cpu._is_amx_tile_supported():
        return True, "this CPU has AMX tiles (native bf16 matmuls)"
    if torch.cpu._is_avx512_bf16_supported():
        return True, "this CPU has AVX512-BF16 (native bf16 matmuls)"
    return False, "this CPU has neither AMX nor AVX512-BF16, so bf16 matmuls are emulated"


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(bf16 | fp32, a one-line reason). auto: bf16 where the device has native bf16, else fp32. An explicit bf16
    on a CPU without native bf16 is honoured, with a warning that measures how much slower its matmuls are."""
    native, why = native_bf16(device)
    if requested == "auto":
        return ("bf16" if native else "fp32"), f"precision=auto: {why} -> {'bf16' if native else 'fp32'}"
    if requested == "bf16" and not native:
        warnings.warn(f"precision=bf16 although {why}: a bf16 matmul measured here is {bf16_slowdown():.0f}x "
                      f"slower than fp32; precision=auto would pick fp32", stacklevel=2)
    return requested, f"precision={requested} (asked for; {why})"


def bf16_slowdown(n: int = 256, reps: int = 3) -> float:
    """Time of an n^3 bf16 matmul over an fp32 one on this CPU (best of `reps`)."""
    def best(dtype):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)
    best(torch.float32)  # warm-up
    return best(torch.bfloat16) / best(torch.float32)


# ------------------------------------------------------------------------------------------------ schedule
def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """ceil(warmup_ratio * total_steps), as HF's TrainingArguments.get_warmup_steps."""
    return math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0, schedule: str = "linear",
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): peak * step / warmup_steps while step < warmup_steps,
    then linear or cosine decay to min_lr_ratio * peak at `total_steps`. With min_lr_ratio=0 this is exactly HF's
    get_linear_schedule_with_warmup / get_cosine_schedule_with_warmup, step 0 of a warmup included (lr 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * step / warmup_steps
    if schedule == "constant":
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    floor = peak_lr * min_lr_ratio
    if schedule == "linear":
        return floor + (peak_lr - floor) * (1.0 - progress)
    if schedule == "cosine":
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; expected linear, cosine or constant")


# ------------------------------------------------------------------------------------------------ seeds, model
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cls, d: Dist, init_from: str | None, model_cfg=None, bf16: bool = False, seed: int = 0,
                new_head: bool = False, activation_checkpointing: bool = False, lora: LoraConfig | None = None):
    """The model to train, on d.device. One process: the module itself. N processes: built on the meta device,
    sharded with FSDP2, materialised empty, then filled from rank 0's full weights (the HF checkpoint, or a
    seeded fresh init), so N processes start from exactly the weights one process would.
    activation_checkpointing and lora are ways to train, not part of the weights: they apply to a loaded model
    too. With lora.enabled, the trunk is frozen and LoRA adapters (seeded by `seed`) are what trains."""
    lora = lora if lora is not None and lora.enabled else None
    if lora and lora.export == "adapter" and not init_from:
        raise ConfigError("model.lora.export=adapter writes an adapter over run.init_from, and none is set")
    model = _build_model(cls, d, init_from, model_cfg, bf16, seed, new_head, lora)
    model.cfg.activation_checkpointing = activation_checkpointing  # the blocks read the model's own cfg
    model.cfg.lora = lora or LoraConfig()  # the export reads it
    return model


def _build_model(cls, d: Dist, init_from, model_cfg, bf16: bool, seed: int, new_head: bool, lora):

    def full_model():
        if init_from:
            m = load_pretrained(cls, init_from, new_head=new_head)
        else:
            torch.manual_seed(seed)
            m = cls(model_cfg)
            m.init_weights()
        return apply_lora(m, lora, seed) if lora else m

    if not d.enabled:
        return full_model().to(d.device)

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from rmcore.model import ModelConfig

    cfg = ModelConfig.from_hf(read_hf_config(Path(init_from))) if init_from else model_cfg
    with torch.device("meta"):
        model = cls(cfg)
    if lora:
        apply_lora(model, lora, seed)
    apply_fsdp(model, d.mesh, bf16)
    model.to_empty(device=d.device)
    model.model.reset_buffers(device=d.device)
    full = full_model().state_dict() if d.is_main else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def frozen(model):
    """A model that is only read (a reference policy, a reward): eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW; weight decay on matrices only (norm gains are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def autocast(d: Dist, bf16: bool):
    """bf16 autocast for the single-process path (FSDP2's MixedPrecisionPolicy does it for N processes).
    On CPU too: bf16 matmuls run ~6x faster than fp32 on AMX machines."""
    if bf16 and not d.enabled:
        return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16)
    return nullcontext()


def compute_dtype(bf16: bool) -> torch.dtype:
    """The dtype activations are computed in (by autocast on one process, by FSDP2's policy on many): what a
    KV cache must hold."""
    return torch.bfloat16 if bf16 else torch.float32


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the global gradient norm (across FSDP shards); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def set_grad_sync(model, sync: bool):
    """Skip FSDP2's gradient reduce-scatter on all but the last micro-batch of an accumulation step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


# ------------------------------------------------------------------------------------------------ logging
class WandbUnavailable(UserError):
    """logging.wandb=online without credentials or without the network."""


def wandb_login(mode: str):
    """logging.wandb=online needs an API key and the network: checked (key verified with the server) when the run
    starts, so a missing login never surfaces after hours of training. offline and disabled need neither."""
    if mode != "online":
        return
    import wandb
    try:
        wandb.login(verify=True, timeout=30)
    except Exception as e:  # wandb raises UsageError (no key), AuthenticationError (bad key or no network), ...
        raise WandbUnavailable(
            f"logging.wandb=online, but W&B is not usable: {type(e).__name__}: {e}\n  log in first (`wandb login`, or "
            f"set WANDB_API_KEY), or log offline (logging.wandb=offline) and upload later with `wandb sync`") from None


class Logger:
    """Rank 0 writes metrics.jsonl, shows a progress bar (loss, accuracy, lr, tokens/s, ETA) and, when enabled,
    logs to W&B. wandb=disabled never imports wandb; offline never touches the network."""

    def __init__(self, out_dir: Path, d: Dist, total_steps: int, config: dict, wandb_mode: str = "disabled",
                 project: str = "rmcore", run_name: str | None = None, progress: bool = True, start_step: int = 0):
        self.d = d
        self.file = None
        self.bar = None
        self.wandb = None
        self.tokens = 0
        self.t0 = time.perf_counter()
        if not d.is_main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a")
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")
        if wandb_mode != "disabled":
            import wandb
            wandb_login(wandb_mode)
            self.wandb = wandb.init(project=project, name=run_name, config=config, mode=wandb_mode,
                                    dir=str(out_dir), resume="allow")

    def log(self, step: int, metrics: dict, tokens: int = 0, advance: bool = True):
        if not self.d.is_main:
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
            shown = {k: v for k, v in record.items() if k in ("loss", "acc", "eval_loss", "eval_acc", "lr", "tokens_per_s")}
            self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in shown.items()})

    def print(self, *args):
        if self.d.is_main:
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


# ------------------------------------------------------------------------------------------------ the step cycle
class NonFiniteLoss(UserError):
    """A NaN or inf loss or gradient norm, with where it happened and where to restart from."""


class Trainer:
    """The bookkeeping around a stage's forward/backward, shared by train.py's `sft` and `rm`, raft.py and ppo.py:
    optimizer and lr schedule, the data position, gradient-accumulation steps, clipping, the NaN guard,
    periodic evaluation and checkpoints, resume, logging and the final export. The loss itself stays in the loop.

        for step, micro_batches in trainer.steps():      # one optimizer step's micro-batches (index lists)
            ... forward, loss / global count * world_size, backward, per micro-batch ...
            trainer.step(step, {"loss": loss_sum}, count, metrics, tokens, ids)
    """

    def __init__(self, cfg, d: Dist, model, sampler=None, evaluate=None, total_steps: int | None = None):
        """sampler: the static data's position (saved and restored), from which the step count follows; a loop
        whose data is made on the fly (RAFT, PPO) passes no sampler and its own total_steps, keeps its position
        in the `extra` state it gives save(), and reads it back from `resumed` (trainer.json of the checkpoint)."""
        self.cfg, self.d, self.model, self.sampler, self.evaluate = cfg, d, model, sampler, evaluate
        o = cfg.optim
        self.out = Path(cfg.run.out_dir)
        if total_steps is None:
            per_epoch = math.ceil(len(sampler) / o.grad_accum)
            total_steps = per_epoch * o.epochs if o.max_steps is None else min(o.max_steps, per_epoch * o.epochs)
        self.total_steps = total_steps
        self.warmup = warmup_steps(o.warmup_ratio, self.total_steps)
        self.optimizer = make_optimizer(model, o.lr, o.weight_decay, tuple(o.betas), o.eps)
        self.ckpt = Checkpointer(self.out, d, cfg.run.keep)
        self.identity = run_identity(cfg, d.world_size)
        self.start_step, self.skipped, self.in_a_row, self.empty = 0, 0, 0, 0
        found, state = self.ckpt.load_latest(cfg.run.resume, model, self.optimizer, self.identity)
        self.resumed = state if found is not None else None
        if found is not None:
            self.start_step, self.skipped, self.empty = state["step"], state.get("skipped", 0), state.get("empty", 0)
            if sampler is not None:
                sampler.load_state_dict(state["sampler"])
        if d.is_main:
            dropped = trim_metrics(self.out / "metrics.jsonl", self.start_step)
            if dropped:
                print(f"metrics.jsonl: {dropped} record(s) after step {self.start_step} removed (an interrupted "
                      f"run's; they are logged again as the run redoes those steps)", flush=True)
        lg = cfg.logging
        self.log = Logger(self.out, d, self.total_steps, config_to_dict(cfg), lg.wandb, lg.project, lg.run_name,
                          lg.progress, self.start_step)
        if found is not None:
            self.log.print(f"resumed from {found} at step {self.start_step}")
        trainable, total = parameter_counts(model)
        lora = cfg.model.lora
        how = f" (LoRA r {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.target_modules)})" if lora.enabled else ""
        self.log.print(f"parameters: {trainable:,} trainable of {total:,} ({trainable / max(total, 1):.2%}){how}")
        self.last_ckpt = found

    def steps(self):
        """(step, [micro-batch index lists]) from the saved data position on; an epoch's last step may be short."""
        step, ga = self.start_step, self.cfg.optim.grad_accum
        while step < self.total_steps:
            pending = []
            for batch in self.sampler:  # the rest of the current epoch
                pending.append(batch)
                if len(pending) == ga:
                    yield step, pending
                    step, pending = step + 1, []
                    if step >= self.total_steps:
                        return
            if pending:
                yield step, pending
                step += 1

    def global_count(self, local: float) -> float:
        """The step's number of pairs / target tokens over all ranks: the losses' denominator."""
        return all_reduce_sum([local], self.d.device)[0]

    def step(self, step: int, loss_sums: dict[str, float], count: float, metrics: dict, tokens: int, ids: list[str]):
        """After the micro-batches' backward passes: NaN guard, clip, lr, optimizer step, log, eval, checkpoint.

        loss_sums ({name: summed loss}), tokens and ids are this rank's; count is the step's global denominator
        (global_count), by which every summed loss is divided for the log. A step whose count is 0 (no target
        token in any of its micro-batches) has no gradient: it is counted in `empty_steps`, not taken."""
        cfg, d = self.cfg, self.d
        names = list(loss_sums)
        *totals, tokens = all_reduce_sum([*loss_sums.values(), tokens], d.device)
        losses = {k: v / count for k, v in zip(names, totals)} if count else {}  # an empty step logs no loss
        lr = lr_at(step, self.total_steps, cfg.optim.lr, self.warmup, cfg.optim.schedule, cfg.optim.min_lr_ratio)
        grad = {}
        if count == 0:
            self.empty += 1
            self.log.print(f"step {step}: no target token in the whole step, nothing to learn "
                           f"({self.empty} such step(s) so far)")
        else:
            grad_norm = clip_grad_norm(self.model, cfg.optim.grad_clip)
            grad = {"grad_norm": grad_norm}
            if all(map(math.isfinite, totals)) and math.isfinite(grad_norm):
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
                self.in_a_row = 0
            else:
                all_ids = gather_objects(ids)
                shown = ", ".join(f"{k} {v}" for k, v in losses.items())
                # step + 1: the number metrics.jsonl gives this step
                where = (f"non-finite loss ({shown}) or gradient norm ({grad_norm}) at step {step + 1}; records in "
                         f"the step: {', '.join(all_ids[:20])}{' ...' if len(all_ids) > 20 else ''}")
                if cfg.run.on_nonfinite == "stop":
                    self.log.close()
                    raise NonFiniteLoss(f"{where}. Last good checkpoint: {self.last_ckpt or 'none'} "
                                        f"(resume with run.resume=auto, or set run.on_nonfinite=skip)")
                self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
                self.log.print(f"skipped: {where} ({self.skipped} skipped so far)")
        self.optimizer.zero_grad(set_to_none=True)
        position = {"epoch": self.sampler.epoch} if self.sampler is not None else {}
        self.log.log(step + 1, {**losses, **metrics, "lr": lr, **grad, "skipped_steps": self.skipped,
                                "empty_steps": self.empty, **position}, tokens=int(tokens))
        if self.in_a_row >= cfg.run.max_skips_in_a_row:
            self.log.close()
            raise NonFiniteLoss(f"stopped: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                                f"(run.max_skips_in_a_row={cfg.run.max_skips_in_a_row}), the last at step {step + 1}. "
                                f"Last good checkpoint: {self.last_ckpt or 'none'}")
        done = step + 1
        if self.evaluate is not None and cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < self.total_steps:
            self.log.log(done, {f"eval_{k}": v for k, v in self.evaluate().items()}, advance=False)
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < self.total_steps:
            self.save(done)
        if cfg.run.halt_at_step is not None and done >= cfg.run.halt_at_step:
            self.log.print(f"halting after step {done} (run.halt_at_step)")
            self.log.close()
            raise SystemExit(0)

    def save(self, step: int, extra: dict | None = None):
        """An atomic checkpoint: model, optimizer, RNG, counters, the sampler's position or the loop's `extra`."""
        position = {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}
        self.last_ckpt = self.ckpt.save(self.model, self.optimizer, step,
                                        {**position, **(extra or {}), "skipped": self.skipped,
                                         "empty": self.empty, "identity": self.identity})

    def finish(self, tokenizer, extra_config: dict) -> dict:
        """Final evaluation, final checkpoint, HF export; returns the final evaluation metrics."""
        final = {}
        if self.evaluate is not None:
            final = self.evaluate()
            if self.start_step < self.total_steps:  # a finished run re-run logs nothing twice
                self.log.log(self.total_steps, {f"eval_{k}": v for k, v in final.items()}, advance=False)
        if self.start_step < self.total_steps:
            self.save(self.total_steps)
        else:
            self.log.print(f"nothing to train: the run was already complete at step {self.total_steps}")
        if self.cfg.run.export:
            export_pretrained(self.model, self.out / "export", self.d, tokenizer, extra_config, self.cfg.run.init_from)
            self.log.print(f"exported {self.out / 'export'}")
        if self.skipped:
            self.log.print(f"{self.skipped} step(s) skipped for non-finite loss")
        if self.empty:
            self.log.print(f"{self.empty} step(s) had no target token and changed nothing")
        self.log.close()
        return final
