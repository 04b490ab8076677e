"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022) with the details of "The N implementation
details of RLHF with PPO" (Huang et al. 2024), and the critic-free RLOO (Ahmadian et al. 2024) and GRPO (Shao et
al. 2024) on the same loop (ppo.advantage). The math is rmcore/rl.py's, one pure function per formula.

    python ppo.py --config configs/tiny_ppo.yaml                          # on the tiny chain's exports, CPU
    torchrun --nproc_per_node=2 ppo.py --config configs/tiny_ppo.yaml     # prompts split across ranks, FSDP2

Models: the policy (run.init_from, trained), a frozen copy of it (the reference of the KL term), the reward (a
reward model directory or a Python function, reading text: its tokenizer may differ) and, for gae, a critic reading
the policy's token ids (so its tokenizer must be the policy's), trained with the policy as one module. LLaMA has no
dropout, so nothing differs between sampling, scoring and training forwards.

Each iteration, top to bottom in `ppo` below:
  1. rollout: ppo.prompts_per_iter prompts (each rank an equal share), ppo.k samples each at ppo.temperature, each
     cut at its stop; prompts left-padded, everything after the stop is padding. The log-probs of the sampled
     tokens under the policy and the reference (logits / temperature), and the critic's values, come from one
     forward pass over the whole sequences, the same pass training takes;
  2. score the text, minus ppo.missing_eos_penalty for a response cut at the length limit, clipped (ppo.score_clip);
  3. per-token rewards -beta * kl_t (k1 or k3), the score added at the last real token; beta fixed or adaptive;
  4. advantages from ppo.advantage, a name of rmcore.rl.ADVANTAGE_ESTIMATORS: gae (critic), rloo or grpo (K
     samples per prompt, no critic); whitened over real tokens;
  5. optim.epochs passes over shuffled minibatches (optim.micro_batch_size x optim.grad_accum samples per rank),
     one AdamW step each: clipped policy loss, clipped value loss, entropy bonus, all means over real tokens;
  6. log (TRL's metric names), export the policy, checkpoint models, optimizer, beta and the iteration.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rmcore.align.iteration import AlignRun, align_main, reference_model
from rmcore.align.rewards import checked_rewards
from rmcore.align.rollouts import Packed, pack, response_logits, response_logprobs, response_values, response_values_of
from rmcore.config.sections import PpoConfig, PpoTrainConfig
from rmcore.errors import ConfigError
from rmcore.generate import token_logprobs
from rmcore.interop.hub import resolve_model
from rmcore.model import CausalLM, RewardModel
from rmcore.rl import (
    ADVANTAGE_ESTIMATORS,
    adaptive_beta,
    entropy,
    explained_variance,
    kl_k1,
    kl_k3,
    masked_whiten,
    policy_loss,
    shape_scores,
    token_rewards,
    value_loss,
)
from rmcore.tokenizer import Tokenizer
from rmcore.training.distributed import Dist, all_reduce_sum, gather_objects
from rmcore.training.launch import run_script
from rmcore.training.runtime import autocast, build_model, set_grad_sync
from rmcore.training.trainer import Trainer


def main(argv: list[str]) -> list[dict]:
    return align_main(argv, name="ppo", config_class=PpoTrainConfig, loop=ppo)


class ActorCritic(nn.Module):
    """The trained models as one module: one AdamW over both, one gradient clip, one checkpoint (TRL's
    PolicyAndValueWrapper does the same). The critic is None for estimators without one (rloo, grpo)."""

    def __init__(self, policy: CausalLM, critic: RewardModel | None):
        super().__init__()
        self.policy, self.critic = policy, critic

    def set_requires_gradient_sync(self, sync: bool):
        for m in (self.policy, self.critic):
            if m is not None:
                set_grad_sync(m, sync)


@dataclass
class Experience:
    """One iteration's rollout as training reads it; every tensor (B, T) over response positions."""
    batch: Packed
    logp_old: torch.Tensor
    logp_ref: torch.Tensor
    values_old: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def ppo(cfg: PpoTrainConfig) -> list[dict]:
    ppo_cfg, optim = cfg.ppo, cfg.optim
    run = AlignRun.start(cfg, "ppo")
    dist, tok = run.dist, run.tokenizer
    if ppo_cfg.top_k or ppo_cfg.top_p < 1:
        warnings.warn(f"ppo.top_k={ppo_cfg.top_k}, ppo.top_p={ppo_cfg.top_p}: the samples do not come from the "
                      "policy's distribution (logits / temperature) that the log-probs assume, so the KL estimate and "
                      "the importance ratios are biased; top_k=0, top_p=1 keep them exact", stacklevel=2)
    estimator = ADVANTAGE_ESTIMATORS[ppo_cfg.advantage]
    policy, reference = run.build_policy()
    critic = None
    if estimator.needs_critic:
        source, new_head = critic_source(cfg, tok)
        critic = build_model(RewardModel, dist, init_from=source, bf16=cfg.run.bf16, seed=cfg.run.seed,
                             new_head=new_head, activation_checkpointing=cfg.model.activation_checkpointing,
                             lora=cfg.model.lora)
    model = ActorCritic(policy, critic)
    n = run.prompts_per_rank * ppo_cfg.k
    minibatch = optim.micro_batch_size * optim.grad_accum
    trainer = Trainer(cfg, dist, model, total_steps=ppo_cfg.iterations * optim.epochs * math.ceil(n / minibatch))
    resumed = trainer.resumed or {}
    first, history, beta = resumed.get("iteration", 0), resumed.get("history", []), resumed.get("beta", ppo_cfg.beta)
    step = trainer.start_step
    trainer.log.print(f"trained: the policy{' + a critic from ' + source if critic is not None else ''}; {n} samples "
                      f"per rank per iteration, {math.ceil(n / minibatch)} minibatches x {optim.epochs} epochs")
    for it in range(first, ppo_cfg.iterations):
        # 1. rollout, and one forward pass of each model over it
        samples = run.sample(policy, iteration=it, with_logprobs=False)
        batch = pack([run.prompts.ids[i] for i in samples.prompt_index], samples.tokens, tok.pad_id, dist.device)
        mask = batch.response_mask
        with autocast(dist, cfg.run.bf16):
            logp_old = response_logprobs(policy, batch, ppo_cfg.temperature, optim.micro_batch_size)
            with reference_model(policy, reference) as ref:
                logp_ref = response_logprobs(ref, batch, ppo_cfg.temperature, optim.micro_batch_size)
            values_old = (response_values_of(critic, batch, optim.micro_batch_size) if critic is not None
                          else torch.zeros_like(mask))
        # 2. score
        ended = torch.tensor(samples.stopped, device=dist.device)
        raw_scores = torch.tensor(checked_rewards(run.reward, samples.prompts, samples.responses), device=dist.device)
        scores = shape_scores(raw_scores, ended, ppo_cfg.missing_eos_penalty, ppo_cfg.score_clip)
        # 3. per-token rewards
        kl = (kl_k1 if ppo_cfg.kl_estimator == "k1" else kl_k3)(logp_old, logp_ref) * mask
        rewards = token_rewards(scores, kl, mask, beta)
        if ppo_cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        # 4. advantages
        advantages, returns = estimator.estimate(rewards, values_old, mask, k=ppo_cfg.k, gamma=ppo_cfg.gamma,
                                                 lam=ppo_cfg.lam)
        if ppo_cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        exp = Experience(batch=batch, logp_old=logp_old, logp_ref=logp_ref, values_old=values_old,
                         advantages=advantages, returns=returns)
        # 5. epochs of shuffled minibatches, one optimizer step each
        model.train()
        totals: dict[str, float] = {}
        for epoch in range(optim.epochs):
            order = torch.from_numpy(np.random.default_rng([cfg.run.seed, it, epoch, dist.rank]).permutation(n))
            for start in range(0, n, minibatch):
                rows = order[start:start + minibatch]
                count = trainer.global_count(float(mask[rows].sum()))
                sums = ppo_minibatch(model, exp, rows, count=count, ppo_cfg=ppo_cfg, dist=dist, bf16=cfg.run.bf16,
                                     micro_batch_size=optim.micro_batch_size)
                trainer.step(step, losses={"loss/policy": sums["policy"], "loss/value": sums["value"]}, count=count,
                             metrics={"iteration": it + 1, **minibatch_metrics(sums, dist)},
                             tokens=int(sums["tokens"]), ids=[f"sample {int(r)}" for r in rows])
                for k, v in sums.items():
                    totals[k] = totals.get(k, 0.0) + v
                step += 1
        # 6. figures, beta, held-out reward, log, export, checkpoint
        stats = {"iteration": it + 1,
                 **rollout_stats(exp, raw_scores=raw_scores, scores=scores, ended=ended, kl=kl, beta=beta,
                                 has_critic=critic is not None, eos_id=tok.eos_id, dist=dist),
                 **minibatch_metrics(totals, dist, suffix="_avg")}
        if ppo_cfg.adaptive_kl:  # Ziegler et al.: after each rollout, with n = the samples it held
            beta = adaptive_beta(beta, stats["objective/kl"], ppo_cfg.kl_target, stats["samples"], ppo_cfg.kl_horizon)
        if run.held_out is not None:
            stats["eval_reward"] = run.held_out_reward(policy)
        history.append(stats)
        run.end_iteration(trainer, policy, iteration=it, step=step, history=history, extra_state={"beta": beta},
                          plot_panels={"score": ["objective/scores", "objective/rlhf_reward", "eval_reward"],
                                       "KL to the reference (per response)": ["objective/kl_k1", "objective/kl_k3"],
                                       "response tokens": ["response_length"]})
    trainer.export_and_close(tok, policy)
    return history


def ppo_minibatch(model: ActorCritic, exp: Experience, rows: torch.Tensor, *, count: float, ppo_cfg: PpoConfig,
                  dist: Dist, bf16: bool, micro_batch_size: int) -> dict[str, float]:
    """Forward and backward over one minibatch, micro-batch by micro-batch; every loss is a mean over the
    minibatch's real tokens on all ranks (count), so micro-batching and the number of ranks never change it.
    Returns token-weighted sums for the log."""
    sums = dict.fromkeys(("policy", "value", "entropy", "clipfrac", "value_clipfrac", "approxkl", "ratio",
                          "ratio_sq", "tokens"), 0.0)
    micro = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    for j, r in enumerate(micro):
        model.set_requires_gradient_sync(j == len(micro) - 1)
        b = exp.batch.rows(r)
        m = b.response_mask
        with autocast(dist, bf16):
            logits = response_logits(model.policy, b)
            values = response_values(model.critic, b) if model.critic is not None else None
        logits = logits.float() / ppo_cfg.temperature  # the distribution the samples came from
        logp = token_logprobs(logits, b.responses)
        pg, clipfrac = policy_loss(logp, exp.logp_old[r], exp.advantages[r], m, ppo_cfg.clip)
        ent = entropy(logits, m)
        loss = pg - ppo_cfg.entropy_coef * ent
        vl = vclip = torch.zeros(())
        if values is not None:
            vl, vclip = value_loss(values, exp.values_old[r], exp.returns[r], m, ppo_cfg.clip_value)
            loss = loss + ppo_cfg.value_coef * vl
        n_tok = float(m.sum())
        (loss * (n_tok / count * dist.world_size)).backward()
        with torch.no_grad():
            log_ratio = torch.where(m.bool(), logp - exp.logp_old[r], 0)
            ratio = log_ratio.exp() * m
            for k, v in (("policy", pg), ("value", vl), ("entropy", ent), ("clipfrac", clipfrac),
                         ("value_clipfrac", vclip)):
                sums[k] += float(v) * n_tok
            sums["approxkl"] += float((0.5 * log_ratio ** 2).sum())
            sums["ratio"] += float(ratio.sum())
            sums["ratio_sq"] += float((ratio ** 2).sum())
            sums["tokens"] += n_tok
    return sums


def minibatch_metrics(sums: dict[str, float], dist: Dist, suffix: str = "") -> dict[str, float]:
    """Token means over every rank of ppo_minibatch's sums, under TRL's names (val/ratio_var: the variance of the
    per-token ratio)."""
    keys = list(sums)
    totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], dist.device)))
    n = max(totals["tokens"], 1.0)
    ratio = totals["ratio"] / n
    return {f"policy/approxkl{suffix}": totals["approxkl"] / n, f"policy/clipfrac{suffix}": totals["clipfrac"] / n,
            f"policy/entropy{suffix}": totals["entropy"] / n, f"loss/policy{suffix}": totals["policy"] / n,
            f"loss/value{suffix}": totals["value"] / n, f"val/clipfrac{suffix}": totals["value_clipfrac"] / n,
            "val/ratio": ratio, "val/ratio_var": totals["ratio_sq"] / n - ratio ** 2}


def rollout_stats(exp: Experience, *, raw_scores: torch.Tensor, scores: torch.Tensor, ended: torch.Tensor,
                  kl: torch.Tensor, beta: float, has_critic: bool, eos_id: int, dist: Dist) -> dict:
    """The rollout's figures over every rank: per-response sums averaged over responses (TRL's objective/*),
    the critic's explained variance over real tokens, length and how responses ended."""
    batch, logp_old, logp_ref = exp.batch, exp.logp_old, exp.logp_ref
    mask = batch.response_mask
    lengths = mask.sum(-1)
    last = batch.responses.gather(1, (lengths.long() - 1).clamp(min=0)[:, None])[:, 0]
    per_response = {
        "objective/scores": scores, "objective/scores_raw": raw_scores, "objective/kl": kl.sum(-1),
        "objective/kl_k1": (kl_k1(logp_old, logp_ref) * mask).sum(-1),
        "objective/kl_k3": (kl_k3(logp_old, logp_ref) * mask).sum(-1),
        "objective/entropy": (-logp_old * mask).sum(-1),  # TRL's: minus the sampled tokens' log-probs, summed
        "objective/non_score_reward": (-beta * kl).sum(-1), "response_length": lengths,
        "no_eos_fraction": (~ended).float(), "val/num_eos_tokens": (last == eos_id).float(),
    }
    keys = list(per_response)
    sums = all_reduce_sum([float(per_response[k].sum()) for k in keys] + [len(scores)], dist.device)
    n = sums[-1]
    stats = {k: v / n for k, v in zip(keys, sums)}
    stats["val/num_eos_tokens"] *= n  # a count, as TRL logs it
    stats["objective/rlhf_reward"] = stats["objective/scores"] + stats["objective/non_score_reward"]
    if has_critic:  # over every rank's real tokens
        real = mask.bool()
        values, returns = (torch.cat(gather_objects([x[real].cpu()])) for x in (exp.values_old, exp.returns))
        stats["val/explained_variance"] = float(explained_variance(values, returns, torch.ones_like(returns)))
    stats.update({"beta": beta, "samples": int(n)})
    return stats


def critic_source(cfg: PpoTrainConfig, tok: Tokenizer) -> tuple[str, bool]:
    """(directory the critic starts from, whether its value head is fresh). It reads the policy's token ids, so
    its tokenizer must be the policy's: a mismatch stops here rather than being misread for a whole run."""
    ppo_cfg = cfg.ppo
    if ppo_cfg.critic == "policy":
        return cfg.run.init_from, True
    path = ppo_cfg.reward if ppo_cfg.critic == "reward" else ppo_cfg.critic
    if not (resolve_model(path) / "config.json").is_file():
        raise ConfigError(f"ppo.critic={ppo_cfg.critic}: {path} is not a reward model directory; advantage=gae needs "
                          "a critic (ppo.critic=policy starts one from the policy's trunk with a fresh value head)")
    if not Tokenizer.from_pretrained(path).same_ids(tok):
        raise ConfigError(f"the critic {path} has another tokenizer than the policy {cfg.run.init_from}: it reads "
                          "the policy's token ids, so the ids must mean the same tokens (ppo.critic=policy starts a "
                          "critic from the policy's trunk)")
    return path, False


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
