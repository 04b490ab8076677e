"""The iteration cycle raft.py and ppo.py share. `AlignRun` holds what every iteration reads (the config, the
process group, the tokenizer, the template and stop strings, the prompt pools, the reward and the gold judge); its
methods are the steps both loops take: build the policy, sample an iteration, score it, the held-out reward, and
the end of an iteration (log, export, checkpoint, plot, the halt that resume tests use). What happens between
sampling and the end is each script's own algorithm.

The gold judge (Gao et al. 2023, "Scaling laws for reward model overoptimization"): the reward a loop optimises is
a proxy; a second reward (`gold_reward`, trained on more or other data, or a larger model) scores the same samples,
and its score beside the proxy's, against the KL to the start, shows when the proxy is being hacked. It is only
ever logged: `gold_scores` returns numbers the loops put in their statistics and nowhere else, and it runs with
every random state saved and restored, so even a judge that draws random numbers cannot change the run.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rmcore.align.rewards import EnsembleReward, RewardFn, checked_rewards, load_ensemble, load_reward
from rmcore.align.rollouts import PromptPool, Samples, default_stop_strings, load_prompts, sample
from rmcore.config.loader import parse_cli
from rmcore.config.sections import AlignConfig, TrainConfig, load_stages
from rmcore.data.records import require_data
from rmcore.data.template import Template
from rmcore.errors import NonFiniteOutputs
from rmcore.eval.plots import plot_history
from rmcore.model import CausalLM
from rmcore.tokenizer import Tokenizer
from rmcore.training.checkpoints import export_pretrained, run_record
from rmcore.training.distributed import Dist, all_reduce_sum, init_distributed, say
from rmcore.training.launch import setup
from rmcore.training.run_dir import RunLock
from rmcore.training.runtime import autocast, build_model, compute_dtype, frozen
from rmcore.training.trainer import Trainer


def align_main(argv: list[str], *, name: str, config_class: type, loop):
    """The main of raft.py and ppo.py (name): the config from the command line (checked by its sections), the run
    directory's lock, then the script's loop(cfg)."""
    path, overrides = parse_cli(argv, f"{name}.py")
    [cfg] = load_stages(path, overrides, config_class)
    cfg.run.stage = name
    with RunLock(cfg.run.out_dir, init_distributed(cfg.run.device)):
        return loop(cfg)


@dataclass
class AlignRun:
    """What every iteration of an alignment run reads. `name` (raft or ppo) is the config section and the prefix
    of the logged figures."""
    cfg: TrainConfig              # the whole config: RaftTrainConfig or PpoTrainConfig
    name: str
    dist: Dist
    tokenizer: Tokenizer
    template: Template
    stop_strings: tuple[str, ...]
    prompts: PromptPool
    held_out: PromptPool | None   # data.eval's prompts, answered greedily before each update and after the last
    reward: RewardFn
    gold: RewardFn | None         # the gold judge: logged beside the reward, never optimised
    toxicity: RewardFn | None     # a toxicity scorer: its mean on the samples logged, never optimised
    # an ensemble's member std summed over this rank's samples of the iteration, and their count
    disagreement: list = field(default_factory=lambda: [0.0, 0])

    @classmethod
    def start(cls, cfg, name: str) -> AlignRun:
        """Process group, run directory and tokenizer (launch.setup), then the prompt pools (prompts longer than
        max_prompt_tokens dropped and counted) and the reward, loaded (its normalisation checked) before any
        sampling."""
        dist, tokenizer = setup(cfg)
        section: AlignConfig = getattr(cfg, name)
        template = cfg.data.build_template().check(tokenizer)
        stops = tuple(section.stop_strings) if section.stop_strings is not None else default_stop_strings(template)

        def pool(specs: list[str], what: str) -> PromptPool:
            prompts = load_prompts(specs, tokenizer, template, max_tokens=section.max_prompt_tokens,
                                   name=f"{name} {what}", fmt=cfg.data.format, skip_bad_lines=cfg.data.skip_bad_lines)
            say(dist, prompts.report.summary())
            return prompts

        prompts = pool(cfg.data.train, "prompts")
        require_data(len(prompts), prompts.report, cfg.data.train, f"data.train ({name} prompts)", "prompts")
        held_out = pool(cfg.data.eval, "held-out prompts") if cfg.data.eval and section.eval_prompts else None
        http = {"timeout": section.reward_timeout, "retries": section.reward_retries}
        if isinstance(section.reward, list):
            reward = load_ensemble(section.reward, dist.device, aggregation=section.reward_aggregation,
                                   lam=section.reward_lambda, normalize=section.reward_normalize,
                                   head=section.reward_head, **http)
        else:
            reward = load_reward(section.reward, dist.device, normalize=section.reward_normalize,
                                 head=section.reward_head, **http)
        gold = load_reward(section.gold_reward, dist.device, **http) if section.gold_reward else None
        toxicity = load_reward(section.toxicity, dist.device, **http) if section.toxicity else None
        return cls(cfg=cfg, name=name, dist=dist, tokenizer=tokenizer, template=template, stop_strings=stops,
                   prompts=prompts, held_out=held_out, reward=reward, gold=gold, toxicity=toxicity)

    @property
    def section(self) -> AlignConfig:
        """The script's own section: cfg.raft or cfg.ppo."""
        return getattr(self.cfg, self.name)

    @property
    def prompts_per_rank(self) -> int:
        """Equal shares of an iteration's prompts: every rank runs the same forwards."""
        return math.ceil(self.section.prompts_per_iter / self.dist.world_size)

    def build_policy(self, *, with_reference: bool = True):
        """(policy, reference): the policy to train (run.init_from) and the KL reference it starts from. With LoRA
        the reference is the policy itself with its adapters off (no second copy of the weights), so it is None
        here; otherwise a frozen copy (None when with_reference is False: nothing reads it). Read reference
        log-probs through `reference_model`."""
        cfg = self.cfg
        policy = build_model(CausalLM, self.dist, init_from=cfg.run.init_from, bf16=cfg.run.bf16, seed=cfg.run.seed,
                             activation_checkpointing=cfg.model.activation_checkpointing, lora=cfg.model.lora)
        if cfg.model.lora.enabled or not with_reference:
            return policy, None
        reference = build_model(CausalLM, self.dist, init_from=cfg.run.init_from, bf16=cfg.run.bf16, seed=cfg.run.seed)
        return policy, frozen(reference)

    def sample(self, policy, *, iteration: int, with_logprobs: bool) -> Samples:
        """This rank's share of the iteration's prompts, K samples each. The generator is seeded by (seed,
        iteration, rank), so a resumed iteration samples exactly what the interrupted one did."""
        cfg, section, dist = self.cfg, self.section, self.dist
        generator = torch.Generator(device=dist.device).manual_seed(cfg.run.seed * 1_000_003 + iteration * 1_009
                                                                    + dist.rank)
        per_rank = self.prompts_per_rank
        indices = self.prompts.draw(per_rank * dist.world_size, cfg.run.seed, iteration,
                                    order=section.prompt_order)[dist.rank::dist.world_size]
        try:
            with autocast(dist, cfg.run.bf16):
                return sample(policy, self.prompts, indices, tokenizer=self.tokenizer, k=section.k,
                              max_new_tokens=section.max_new_tokens, batch_size=section.generation_batch_size,
                              temperature=section.temperature, top_k=section.top_k, top_p=section.top_p,
                              stop_strings=self.stop_strings, generator=generator, with_logprobs=with_logprobs,
                              progress=dist.is_main and cfg.logging.progress, dtype=compute_dtype(cfg.run.bf16),
                              compile_decoding=section.compile_decoding)
        except NonFiniteOutputs as e:
            raise NonFiniteOutputs(f"{self.name} iteration {iteration + 1}, sampling: {e}") from None

    def score(self, prompts: list[str], responses: list[str], *, iteration: int, what: str = "samples") -> list[float]:
        """The reward of each (prompt, response), checked (one finite number each); a reward that fails is one
        error naming the reward, the iteration and `what` was being scored."""
        source = f"{self.name}.reward={self.section.reward} (iteration {iteration + 1}, {what})"
        rewards = checked_rewards(self.reward, prompts, responses, source=source)
        if isinstance(self.reward, EnsembleReward) and what == "samples":  # the members' std, for the iteration's log
            self.disagreement = [float(self.reward.disagreement.sum()), len(responses)]
        return rewards

    def gold_scores(self, prompts: list[str], responses: list[str], *, iteration: int,
                    what: str = "samples") -> list[float] | None:
        """The gold judge's score of each (prompt, response), checked as the reward's are; None without a judge.
        Call it on exactly what the reward scored, and put the result in the statistics only."""
        return self._logged_only(self.gold, "gold_reward", prompts, responses, iteration=iteration, what=what)

    def toxicity_scores(self, prompts: list[str], responses: list[str], *, iteration: int) -> list[float] | None:
        """The toxicity scorer's score of each sample, as gold_scores: for the statistics only; None without one."""
        return self._logged_only(self.toxicity, "toxicity", prompts, responses, iteration=iteration, what="samples")

    def _logged_only(self, judge: RewardFn | None, setting: str, prompts: list[str], responses: list[str], *,
                     iteration: int, what: str) -> list[float] | None:
        """judge(prompts, responses) checked, with every random state as it was before (a run with a judge is
        bit-identical to one without); None without a judge."""
        if judge is None:
            return None
        source = f"{self.name}.{setting}={getattr(self.section, setting)} (iteration {iteration + 1}, {what})"
        with random_states_kept(self.dist.device):
            return checked_rewards(judge, prompts, responses, source=source)

    def held_out_reward(self, policy, *, iteration: int) -> dict[str, float]:
        """{"held_out_reward": mean reward of greedy responses to the first eval_prompts held-out prompts, and
        "held_out_gold" with a gold judge}, of the policy as it is now ({} without held-out prompts). Every rank
        generates all of them: greedy is deterministic, and every rank runs the same forwards."""
        if self.held_out is None:
            return {}
        section = self.section
        indices = list(range(min(section.eval_prompts, len(self.held_out))))
        try:
            with autocast(self.dist, self.cfg.run.bf16):
                out = sample(policy, self.held_out, indices, tokenizer=self.tokenizer,
                             max_new_tokens=section.max_new_tokens, batch_size=section.generation_batch_size,
                             temperature=0.0, stop_strings=self.stop_strings, dtype=compute_dtype(self.cfg.run.bf16),
                             compile_decoding=section.compile_decoding)
        except NonFiniteOutputs as e:
            raise NonFiniteOutputs(f"{self.name} iteration {iteration + 1}, held-out prompts: {e}") from None
        rewards = self.score(out.prompts, out.responses, iteration=iteration, what="held-out prompts")
        gold = self.gold_scores(out.prompts, out.responses, iteration=iteration, what="held-out prompts")
        return {"held_out_reward": float(np.mean(rewards)), **({"held_out_gold": float(np.mean(gold))} if gold else {})}

    def end_iteration(self, trainer: Trainer, policy, *, iteration: int, step: int, history: list[dict],
                      extra_state: dict, plot_panels: dict[str, list[str]], plot_against: dict[str, str]):
        """Refuse a broken policy (Trainer.check_exportable), measure the held-out reward after the last update
        (held_out_reward_final), log the iteration's figures (history[-1]) under `name/`, export the policy every
        export_every iterations, checkpoint (with `extra_state`, the loop's own) every save_every iterations (the
        last iteration always), log the seconds that took (time/save), write name_history.json and a plot of
        `plot_panels` ({title: [keys]}, against the iteration or the key plot_against names for a title), and halt
        when asked (halt_after_iteration)."""
        cfg, section, name, out, stats = self.cfg, self.section, self.name, Path(self.cfg.run.out_dir), history[-1]
        trainer.ckpt.poll()  # a background checkpoint of an earlier iteration becomes resumable once written
        trainer.check_exportable(policy, f"the policy after {name} iteration {iteration + 1}")
        if isinstance(self.reward, EnsembleReward):  # the members' std over the iteration's samples, all ranks
            total, count = all_reduce_sum(self.disagreement, self.dist.device)
            stats["reward_disagreement"] = total / max(count, 1)
        done, last = iteration + 1, section.iterations
        if done == last:
            stats.update({f"{k}_final": v for k, v in self.held_out_reward(policy, iteration=iteration).items()})
        trainer.log.log(step, {k if "/" in k else f"{name}/{k}": v for k, v in stats.items()}, advance=False)
        trainer.log.print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
        t0 = time.perf_counter()
        if done % section.export_every == 0 or done == last:
            export_pretrained(policy, out / "iterations" / f"iteration_{done:04d}", self.dist,
                              tokenizer=self.tokenizer, extra_config=run_record(cfg), base=cfg.run.init_from,
                              lora=cfg.model.lora)
        if done % section.save_every == 0 or done == last:
            trainer.save(step, {"iteration": done, "history": history, **extra_state},
                         background=section.save_in_background and done < last)
        # logged after the checkpoint that holds the history, so a resumed run's history lacks it for that iteration
        stats["time/save"] = time.perf_counter() - t0
        trainer.log.log(step, {"time/save": stats["time/save"]}, advance=False)
        if self.dist.is_main:
            for old in sorted((out / "iterations").glob("iteration_*"))[:-section.keep_exports]:
                shutil.rmtree(old, ignore_errors=True)
            (out / f"{name}_history.json").write_text(json.dumps(history, indent=2) + "\n")
            plot_history(history, plot_panels, out / f"{name}_history.png", against=plot_against)
        if section.halt_after_iteration is not None and section.halt_after_iteration <= done < last:
            trainer.log.print(f"halting after iteration {done} ({name}.halt_after_iteration)")
            trainer.ckpt.wait()
            trainer.log.close()
            raise SystemExit(0)


class Clock:
    """Seconds spent in each phase of an iteration, as the log's time/<phase>: lap(phase) ends the phase running
    since the last lap (or the clock's start)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, phase: str):
        now = time.perf_counter()
        key = f"time/{phase}"
        self.times[key] = self.times.get(key, 0.0) + now - self.last
        self.last = now


@contextmanager
def random_states_kept(device: torch.device):
    """Python's, numpy's and torch's random states (CPU, and the device's) as they were before the block."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(np_state)
