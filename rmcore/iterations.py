"""The iteration cycle raft.py and ppo.py share: what a run needs before its first iteration (prompts, stops,
reward), one iteration's samples, the held-out reward, and the end of an iteration (log, export, checkpoint, plot,
the halt that resume tests use). What happens between sampling and the end is each script's own algorithm.
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rmcore.config import ConfigError, load_stages, parse_cli
from rmcore.distributed import init_distributed
from rmcore.align import PromptPool, Samples, default_stop_strings, load_prompts, sample
from rmcore.data import Template, require_data
from rmcore.lora import adapters_disabled
from rmcore.loop import Trainer, autocast, build_model, compute_dtype, frozen
from rmcore.model import CausalLM
from rmcore.rewards import RewardFn, checked_rewards, load_reward
from rmcore.rundir import RunLock, export_pretrained
from rmcore.runner import bf16, export_config, say


def align_main(argv: list[str], name: str, cls, loop):
    """The main of raft.py and ppo.py (name): config from the command line, the checks every such run needs, the
    run directory's lock, then the script's loop."""
    path, overrides = parse_cli(argv, f"{name}.py")
    [cfg] = load_stages(path, overrides, cls)
    cfg.run.stage = name
    if not getattr(cfg, name).reward:
        raise ConfigError(f"{name}.reward is not set: a reward model directory, or module:function")
    if cfg.run.init_from is None:
        raise ConfigError(f"run.init_from is not set: {name} starts from a policy (an SFT export)")
    if cfg.run.save_every:
        raise ConfigError(f"run.save_every does not apply to {name}.py: it checkpoints after every iteration")
    d = init_distributed(cfg.run.device)
    with RunLock(cfg.run.out_dir, d):
        return loop(cfg)


@dataclass
class Setting:
    """A run's fixed ingredients: the template, the stop strings, the prompt pools and the reward."""
    template: Template
    stops: tuple[str, ...]
    pool: PromptPool
    held_out: PromptPool | None
    reward: RewardFn


def prepare(cfg, ac, d, tok, name: str) -> Setting:
    """ac: the script's AlignConfig section (cfg.raft, cfg.ppo). Prompts longer than ac.max_prompt_tokens are
    dropped and counted; the reward is loaded (and its normalisation checked) before any sampling."""
    template = Template.from_config(cfg.data).check(tok)
    stops = tuple(ac.stop_strings) if ac.stop_strings is not None else default_stop_strings(template)
    pool = load_prompts(cfg.data.train, tok, template, ac.max_prompt_tokens, f"{name} prompts", cfg.data.format,
                        cfg.data.skip_bad_lines)
    say(d, pool.report.summary())
    require_data(len(pool), pool.report, cfg.data.train, f"data.train ({name} prompts)", "prompts")
    held_out = None
    if cfg.data.eval and ac.eval_prompts:
        held_out = load_prompts(cfg.data.eval, tok, template, ac.max_prompt_tokens, f"{name} held-out prompts",
                                cfg.data.format, cfg.data.skip_bad_lines)
        say(d, held_out.report.summary())
    reward = load_reward(ac.reward, d.device, normalize=ac.reward_normalize)
    return Setting(template, stops, pool, held_out, reward)


def sample_iteration(policy, s: Setting, ac, cfg, d, tok, it: int, per_rank: int, with_logprobs: bool) -> Samples:
    """This rank's share of iteration `it`'s prompts, K samples each. The generator is seeded by (seed, iteration,
    rank), so a resumed iteration samples exactly what the interrupted one did."""
    g = torch.Generator(device=d.device).manual_seed(cfg.run.seed * 1_000_003 + it * 1_009 + d.rank)
    indices = s.pool.draw(per_rank * d.world_size, cfg.run.seed, it)[d.rank::d.world_size]
    with autocast(d, bf16(cfg)):
        return sample(policy, s.pool, indices, ac.k, tok, ac.max_new_tokens, ac.generation_batch_size,
                      ac.temperature, ac.top_k, ac.top_p, s.stops, g, with_logprobs=with_logprobs,
                      progress=d.is_main and cfg.logging.progress, dtype=compute_dtype(bf16(cfg)))


def held_out_reward(policy, s: Setting, ac, cfg, d, tok) -> float:
    """Mean reward of greedy responses to the first ac.eval_prompts held-out prompts (every rank generates all
    of them: greedy is deterministic, and every rank runs the same forwards)."""
    indices = list(range(min(ac.eval_prompts, len(s.held_out))))
    with autocast(d, bf16(cfg)):
        out = sample(policy, s.held_out, indices, 1, tok, ac.max_new_tokens, ac.generation_batch_size, 0.0, 0, 1.0,
                     s.stops, None, dtype=compute_dtype(bf16(cfg)))
    return float(np.mean(checked_rewards(s.reward, out.prompts, out.responses)))


def build_policy(cfg, d):
    """(policy, reference): the policy to train (run.init_from) and the KL reference it starts from. With LoRA the
    reference is the policy itself with its adapters off (no second copy of the weights), so it is None here;
    otherwise a frozen copy. Read reference log-probs through `reference_model`."""
    policy = build_model(CausalLM, d, cfg.run.init_from, None, bf16(cfg), cfg.run.seed,
                         activation_checkpointing=cfg.model.activation_checkpointing, lora=cfg.model.lora)
    if cfg.model.lora.enabled:
        return policy, None
    return policy, frozen(build_model(CausalLM, d, cfg.run.init_from, None, bf16(cfg), cfg.run.seed))


@contextmanager
def reference_model(policy, reference):
    """The model that gives the reference log-probs: `reference`, or the policy with its LoRA adapters off."""
    if reference is not None:
        yield reference
    else:
        with adapters_disabled(policy):
            yield policy


def end_iteration(trainer: Trainer, policy, cfg, ac, tok, it: int, step: int, history: list[dict], extra: dict,
                  name: str, panels: dict[str, list[str]]):
    """Log the iteration's figures (history[-1]) under `name/`, export the policy, checkpoint (with `extra`, the
    loop's own state), write name_history.json and a plot of `panels` ({title: [keys]}), and halt when asked."""
    d, out, stats = trainer.d, Path(cfg.run.out_dir), history[-1]
    trainer.log.log(step, {k if "/" in k else f"{name}/{k}": v for k, v in stats.items()}, advance=False)
    trainer.log.print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
    export_pretrained(policy, out / "iterations" / f"iteration_{it + 1:04d}", d, tok, export_config(cfg),
                      cfg.run.init_from)
    trainer.save(step, {"iteration": it + 1, "history": history, **extra})
    if d.is_main:
        for old in sorted((out / "iterations").glob("iteration_*"))[:-ac.keep_exports]:
            shutil.rmtree(old, ignore_errors=True)
        (out / f"{name}_history.json").write_text(json.dumps(history, indent=2) + "\n")
        plot_history(history, panels, out / f"{name}_history.png")
    if ac.halt_after_iteration is not None and it + 1 >= ac.halt_after_iteration and it + 1 < ac.iterations:
        trainer.log.print(f"halting after iteration {it + 1} ({name}.halt_after_iteration)")
        trainer.log.close()
        raise SystemExit(0)


def plot_history(history: list[dict], panels: dict[str, list[str]], path: Path):
    """One panel per title, each key of it a line against the iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    its = [h["iteration"] for h in history]
    for ax, (title, keys) in zip(axes[0], panels.items()):
        for key in keys:
            if key in history[0]:
                ax.plot(its, [h[key] for h in history], marker="o", label=key)
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
