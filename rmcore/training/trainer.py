"""The step cycle every training loop shares (train.py's `sft` and `rm`, raft.py, ppo.py): the Trainer, with AdamW,
the learning-rate schedule, gradient clipping, the NaN guard, periodic evaluation and checkpoints, resume, logging
and the final export. The loops themselves stay readable top to bottom and call it.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from rmcore.config.loader import config_to_dict
from rmcore.errors import NonFiniteLoss, NonFiniteOutputs
from rmcore.lora import parameter_counts
from rmcore.training.checkpoints import (
    Checkpointer,
    check_outputs_finite,
    export_pretrained,
    run_identity,
    run_record,
)
from rmcore.training.distributed import Dist, all_reduce_sum, gather_objects
from rmcore.training.logger import Logger
from rmcore.training.run_dir import trim_metrics
from rmcore.training.runtime import release_freed_memory


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """ceil(warmup_ratio * total_steps), as HF's TrainingArguments.get_warmup_steps."""
    return math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, *, total_steps: int, peak_lr: float, warmup_steps: int = 0, schedule: str = "linear",
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


def make_optimizer(model, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW; weight decay on matrices only (norm gains are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the global gradient norm (across FSDP shards); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


class Trainer:
    """The bookkeeping around a stage's forward/backward, shared by train.py's `sft` and `rm`, raft.py and ppo.py:
    optimizer and lr schedule, the data position, gradient-accumulation steps, clipping, the NaN guard,
    periodic evaluation and checkpoints, resume, logging and the final export. The loss itself stays in the loop.

        for step, micro_batches in trainer.steps():      # one optimizer step's micro-batches (index lists)
            ... forward, loss / global count * world_size, backward, per micro-batch ...
            trainer.step(step, losses={"loss": loss_sum}, count=count, metrics=..., tokens=..., ids=...)
    """

    def __init__(self, cfg, dist: Dist, model, *, sampler=None, evaluate=None, total_steps: int | None = None):
        """sampler: the static data's position (saved and restored), from which the step count follows; a loop
        whose data is made on the fly (RAFT, PPO) passes no sampler and its own total_steps, keeps its position
        in the `extra_state` it gives save(), and reads it back from `resumed` (trainer.json of the checkpoint)."""
        self.cfg, self.dist, self.model, self.sampler, self.evaluate = cfg, dist, model, sampler, evaluate
        optim = cfg.optim
        self.out = Path(cfg.run.out_dir)
        if total_steps is None:
            per_epoch = math.ceil(len(sampler) / optim.grad_accum)
            total_steps = per_epoch * optim.epochs
            total_steps = total_steps if optim.max_steps is None else min(optim.max_steps, total_steps)
        self.total_steps = total_steps
        self.warmup = warmup_steps(optim.warmup_ratio, self.total_steps)
        self.reset_optimizer()
        self.ckpt = Checkpointer(self.out, dist, cfg.run.keep)
        self.identity = run_identity(cfg, dist.world_size)
        self.start_step, self.skipped, self.in_a_row, self.empty = 0, 0, 0, 0
        found, state = self.ckpt.load_latest(cfg.run.resume, model, self.optimizer, self.identity)
        self.resumed = state if found is not None else None
        if found is not None:
            self.start_step, self.skipped, self.empty = state["step"], state.get("skipped", 0), state.get("empty", 0)
            if sampler is not None:
                sampler.load_state_dict(state["sampler"])
        if dist.is_main:
            dropped = trim_metrics(self.out / "metrics.jsonl", self.start_step)
            if dropped:
                print(f"metrics.jsonl: {dropped} record(s) after step {self.start_step} removed (an interrupted "
                      f"run's; they are logged again as the run redoes those steps)", flush=True)
        self.log = Logger(self.out, dist, total_steps=self.total_steps, config=config_to_dict(cfg),
                          settings=cfg.logging, start_step=self.start_step)
        if found is not None:
            self.log.print(f"resumed from {found} at step {self.start_step}")
        trainable, total = parameter_counts(model)
        lora = cfg.model.lora
        how = f" (LoRA r {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.target_modules)})" if lora.enabled else ""
        self.log.print(f"parameters: {trainable:,} trainable of {total:,} ({trainable / max(total, 1):.2%}){how}")
        self.last_ckpt = found
        self.steps_done = self.start_step

    def reset_optimizer(self):
        """A fresh AdamW over the model's trainable parameters, with the `optim` settings."""
        optim = self.cfg.optim
        self.optimizer = make_optimizer(self.model, lr=optim.lr, weight_decay=optim.weight_decay,
                                        betas=tuple(optim.betas), eps=optim.eps)

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
        return all_reduce_sum([local], self.dist.device)[0]

    def step(self, step: int, *, losses: dict[str, float], count: float, metrics: dict, tokens: int, ids: list[str]):
        """After the micro-batches' backward passes: NaN guard, clip, lr, optimizer step, log, eval, checkpoint.

        losses ({name: summed loss}), tokens and ids (of the step's records) are this rank's; count is the step's
        global denominator (global_count), by which every summed loss is divided for the log. A step whose count
        is 0 (no target token in any of its micro-batches) has no gradient: it is counted in `empty_steps`.
        Returns the record logged for the step (the losses as means over all ranks, the metrics, lr, ...)."""
        cfg = self.cfg
        names = list(losses)
        *totals, tokens = all_reduce_sum([*losses.values(), tokens], self.dist.device)
        means = {k: v / count for k, v in zip(names, totals)} if count else {}  # an empty step logs no loss
        lr = lr_at(step, total_steps=self.total_steps, peak_lr=cfg.optim.lr, warmup_steps=self.warmup,
                   schedule=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio)
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
                shown = ", ".join(f"{k} {v}" for k, v in means.items())
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
        if cfg.run.host_memory == "release" and self.dist.device.type == "cpu":
            release_freed_memory()
        self.steps_done = step + 1
        position = {"epoch": self.sampler.epoch} if self.sampler is not None else {}
        record = {**means, **metrics, "lr": lr, **grad, "skipped_steps": self.skipped, "empty_steps": self.empty,
                  **position}
        self.log.log(step + 1, record, tokens=int(tokens))
        if self.in_a_row >= cfg.run.max_skips_in_a_row:
            self.log.close()
            raise NonFiniteLoss(f"stopped: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                                f"(run.max_skips_in_a_row={cfg.run.max_skips_in_a_row}), the last at step {step + 1}. "
                                f"Last good checkpoint: {self.last_ckpt or 'none'}")
        done = step + 1
        every = cfg.run.eval_every
        if self.evaluate is not None and every and done % every == 0 and done < self.total_steps:
            self.log.log(done, {f"eval_{k}": v for k, v in self.evaluate().items()}, advance=False)
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < self.total_steps:
            self.save(done)
        if cfg.run.halt_at_step is not None and done >= cfg.run.halt_at_step:
            self.log.print(f"halting after step {done} (run.halt_at_step)")
            self.log.close()
            raise SystemExit(0)
        return record

    def save(self, step: int, extra_state: dict | None = None, *, background: bool = False):
        """An atomic checkpoint: model, optimizer, RNG, counters, and the sampler's position or the loop's own
        `extra_state` (RAFT's and PPO's iteration, history, ...); background: written while the caller goes on
        (Checkpointer.save)."""
        position = {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}
        self.last_ckpt = self.ckpt.save(self.model, self.optimizer, step,
                                        {**position, **(extra_state or {}), "skipped": self.skipped,
                                         "empty": self.empty, "identity": self.identity}, background=background)

    def check_exportable(self, model, what: str):
        """Stop (one line, nothing written) rather than save a model that skipped more than
        run.max_skipped_fraction of its steps, or whose outputs are not finite (check_outputs_finite)."""
        limit = self.cfg.run.max_skipped_fraction
        if self.skipped > limit * max(self.steps_done, 1):
            self.log.close()
            raise NonFiniteLoss(f"not saving {what}: {self.skipped} of its {self.steps_done} steps were skipped for a "
                                f"non-finite loss or gradient (run.max_skipped_fraction={limit:g}); lower optim.lr or "
                                f"look at the skipped steps' records in the log")
        try:
            check_outputs_finite(model, self.dist, what)
        except NonFiniteOutputs:
            self.log.close()
            raise

    def finish(self, tokenizer) -> dict:
        """train.py's end of a stage: final evaluation, final checkpoint, then export_and_close; returns the final
        evaluation metrics."""
        final = {}
        if self.evaluate is not None:
            final = self.evaluate()
            if self.start_step < self.total_steps:  # a finished run re-run logs nothing twice
                self.log.log(self.total_steps, {f"eval_{k}": v for k, v in final.items()}, advance=False)
        if self.start_step < self.total_steps:
            self.check_exportable(self.model, "the trained model")
            self.save(self.total_steps)
        else:
            self.log.print(f"nothing to train: the run was already complete at step {self.total_steps}")
        self.export_and_close(tokenizer)
        return final

    def export_and_close(self, tokenizer, model=None):
        """The end of every run: a background checkpoint finished, `model` (default: the trained module) exported
        to out_dir/export (run.export), what was skipped said, the log closed."""
        self.ckpt.wait()
        if self.cfg.run.export:
            self.check_exportable(model or self.model, f"export to {self.out / 'export'}")
            export_pretrained(model or self.model, self.out / "export", self.dist, tokenizer=tokenizer,
                              extra_config=run_record(self.cfg), base=self.cfg.run.init_from, lora=self.cfg.model.lora)
            self.log.print(f"exported {self.out / 'export'}")
        if self.skipped:
            self.log.print(f"{self.skipped} step(s) skipped for non-finite loss")
        if self.empty:
            self.log.print(f"{self.empty} step(s) had no target token and changed nothing")
        self.log.close()
