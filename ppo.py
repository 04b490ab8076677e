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
     forward pass over the whole sequences, the same pass training takes (the LM head at the response tokens
     only; on a CPU each micro-batch's samples run end to end in one row, each prompt once). Not done where the
     math does not read it: the reference with beta 0; the separate pass for the old log-probs when one optimizer
     step follows each rollout and the advantages do not read them (TRL's shortcut), or when the sampler's own
     log-probs stand in for it (ppo.old_logprobs; by default in fp32, where they equal the pass's to ~1e-5);
  2. score the text, minus ppo.missing_eos_penalty for a response cut at the length limit, clipped (ppo.score_clip);
     a gold judge (ppo.gold_reward) and a toxicity scorer (ppo.toxicity), if any, score the same responses for the
     log only (objective/gold_scores, objective/toxicity);
  3. per-token rewards: the score at the last real token, and -beta * kl_t (k1 or k3) on every token when the KL
     is in the reward (ppo.kl_in); beta fixed or adaptive;
  4. advantages from ppo.advantage, a name of rmcore.rl.ADVANTAGE_ESTIMATORS: gae (critic), rloo or grpo (K
     samples per prompt, no critic), whitened as ppo.whiten_advantages says; every statistic over all ranks;
  5. optim.epochs passes over shuffled minibatches (optim.micro_batch_size x optim.grad_accum samples per rank;
     ppo.minibatch_order: every sample shuffled, or the prompts with each one's K samples kept together),
     one AdamW step each: the clipped policy loss aggregated by ppo.loss_aggregation (plus beta * k3 when the KL
     is in the loss), the clipped value loss and the entropy bonus as means over real tokens;
  6. log (TRL's metric names, and the seconds each phase took: time/*), export the policy (every
     ppo.export_every iterations), checkpoint models, optimizer, beta and the iteration (every ppo.save_every).
The held-out reward (greedy answers to data.eval's prompts) is measured before each iteration's update, so it
describes the same policy as the rollout's scores, and after the last one (held_out_reward_final).
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rmcore.align.iteration import AlignRun, Clock, align_main
from rmcore.align.rollouts import (
    EPOCH_ORDERS,
    Packed,
    at_responses,
    pack,
    response_logits,
    response_logprobs,
    response_values,
    response_values_of,
)
from rmcore.align.selection import distinct_n, repeated_ngram_rate
from rmcore.config.sections import PpoConfig, PpoTrainConfig
from rmcore.errors import ConfigError
from rmcore.interop.hub import resolve_model
from rmcore.lean_ops import token_logprobs_and_entropy
from rmcore.model import CausalLM, RewardModel
from rmcore.rl import (
    LOSS_AGGREGATIONS,
    adaptive_beta,
    advantages_and_returns,
    explained_variance,
    kl_k1,
    kl_k3,
    policy_objective,
    shape_scores,
    value_loss_terms,
)
from rmcore.serving.reward_client import is_url
from rmcore.tokenizer import Tokenizer
from rmcore.training.distributed import Dist, all_reduce_sum, all_reduce_tensor, gather_objects
from rmcore.training.launch import run_script
from rmcore.training.runtime import autocast, build_model, reference_model, set_grad_sync
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
    logp_ref: torch.Tensor | None  # None without a reference model (beta 0)
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
    kl_in, whiten = ppo_cfg.kl_placement(), ppo_cfg.advantage_whitening()
    with_reference = needs_reference(ppo_cfg)
    policy, reference = run.build_policy(with_reference=with_reference)
    critic = None
    if ppo_cfg.estimator().needs_critic:
        source, new_head = critic_source(cfg, tok)
        critic = build_model(RewardModel, dist, init_from=source, bf16=cfg.run.bf16, seed=cfg.run.seed,
                             new_head=new_head, activation_checkpointing=cfg.model.activation_checkpointing,
                             lora=cfg.model.lora)
    model = ActorCritic(policy, critic)
    n = run.prompts_per_rank * ppo_cfg.k
    minibatch = optim.micro_batch_size * optim.grad_accum
    old_source = old_logprobs_source(cfg, samples_per_rank=n, has_critic=critic is not None)
    old_from_update = old_source == "update"
    trainer = Trainer(cfg, dist, model, total_steps=ppo_cfg.iterations * optim.epochs * math.ceil(n / minibatch))
    resumed = trainer.resumed or {}
    first, history, beta = resumed.get("iteration", 0), resumed.get("history", []), resumed.get("beta", ppo_cfg.beta)
    step = trainer.start_step
    trainer.log.print(f"trained: the policy{' + a critic from ' + source if critic is not None else ''}; {n} samples "
                      f"per rank per iteration, {math.ceil(n / minibatch)} minibatches x {optim.epochs} epochs; "
                      f"{ppo_cfg.advantage} advantages whitened: {whiten}, KL in the {kl_in}, policy loss "
                      f"{ppo_cfg.loss_aggregation} with a {ppo_cfg.importance_ratio} ratio")
    for it in range(first, ppo_cfg.iterations):
        clock = Clock()
        stats = {"iteration": it + 1, **run.held_out_reward(policy, iteration=it)}  # the policy that samples next
        clock.lap("held_out")
        # 1. rollout, and one forward pass of each model over it
        samples = run.sample(policy, iteration=it, with_logprobs=old_source == "sampler")
        clock.lap("sample")
        batch = pack([run.prompts.ids[i] for i in samples.prompt_index], samples.tokens, tok.pad_id, dist.device)
        mask = batch.response_mask
        with autocast(dist, cfg.run.bf16):
            if old_source == "update":
                logp_old = torch.zeros_like(mask)  # filled in by the update
            elif old_source == "sampler":
                logp_old = at_responses(torch.cat(samples.logprobs).to(dist.device), batch)
            else:
                logp_old = response_logprobs(policy, batch, ppo_cfg.temperature, optim.micro_batch_size)
            logp_ref = None
            if with_reference:
                with reference_model(policy, reference) as ref:
                    logp_ref = response_logprobs(ref, batch, ppo_cfg.temperature, optim.micro_batch_size)
            values_old = (response_values_of(critic, batch, optim.micro_batch_size) if critic is not None
                          else torch.zeros_like(mask))
        clock.lap("forward")
        # 2. score
        ended = torch.tensor(samples.stopped, device=dist.device)
        raw_scores = torch.tensor(run.score(samples.prompts, samples.responses, iteration=it), device=dist.device)
        logged = {"objective/gold_scores": run.gold_scores(samples.prompts, samples.responses, iteration=it),
                  "objective/toxicity": run.toxicity_scores(samples.prompts, samples.responses, iteration=it)}
        scores = shape_scores(raw_scores, ended, ppo_cfg.missing_eos_penalty, ppo_cfg.score_clip)
        clock.lap("score")
        # 3. per-token rewards and 4. advantages, with statistics over every rank; the KL of the rollout (zero
        # without a reference; with old log-probs from the update, measured after it: the reward does not read it)
        kl_of = kl_k1 if ppo_cfg.kl_estimator == "k1" else kl_k3
        measured_now = logp_ref is not None and not old_from_update
        kl = kl_of(logp_old, logp_ref) * mask if measured_now else torch.zeros_like(mask)
        advantages, returns = advantages_and_returns(
            scores, kl, values_old, mask, estimator=ppo_cfg.advantage, beta=beta, kl_in=kl_in,
            whiten_rewards=ppo_cfg.whiten_rewards, whiten=whiten, k=ppo_cfg.k, gamma=ppo_cfg.gamma, lam=ppo_cfg.lam,
            scale_rewards=ppo_cfg.scale_rewards == "group", reduce_sum=all_reduce_tensor)
        exp = Experience(batch=batch, logp_old=logp_old, logp_ref=logp_ref, values_old=values_old,
                         advantages=advantages, returns=returns)
        # 5. epochs of shuffled minibatches (ppo.minibatch_order), one optimizer step each
        model.train()
        per_minibatch, ratio_means = [], []
        for epoch in range(optim.epochs):
            order = EPOCH_ORDERS[ppo_cfg.minibatch_order](
                samples.prompt_index, np.random.default_rng([cfg.run.seed, it, epoch, dist.rank]))
            for start in range(0, n, minibatch):
                rows = order[start:start + minibatch]
                tokens, sequences = all_reduce_sum([float(mask[rows].sum()), len(rows)], dist.device)
                sums = ppo_minibatch(model, exp, rows, tokens=tokens, sequences=sequences, ppo_cfg=ppo_cfg,
                                     beta_in_loss=beta if kl_in == "loss" and with_reference else None, dist=dist,
                                     bf16=cfg.run.bf16, micro_batch_size=optim.micro_batch_size,
                                     old_from_update=old_from_update)
                ratio_means += sums.pop("ratio_means")
                metrics = token_means(sums, dist)
                # Trainer logs sum over ranks / count: the loss terms are already means, so they go in times count
                losses = {k: sums[k] * tokens for k in LOSS_TERMS if k != "loss/kl" or kl_in == "loss"}
                record = trainer.step(step, losses=losses, count=tokens, metrics={"iteration": it + 1, **metrics},
                                      tokens=int(sums["tokens"]), ids=[f"sample {int(r)}" for r in rows])
                per_minibatch.append(record)
                step += 1
        clock.lap("update")
        if old_from_update and logp_ref is not None:
            kl = kl_of(logp_old, logp_ref) * mask
        # 6. figures, beta, log, export, checkpoint
        stats.update(rollout_stats(exp, raw_scores=raw_scores, scores=scores, ended=ended, kl=kl, logged=logged,
                                   beta_in_reward=beta if kl_in == "reward" else 0.0, has_critic=critic is not None,
                                   eos_id=tok.eos_id, dist=dist))
        every_response = gather_objects(samples.tokens)
        stats.update(beta=beta, distinct_2=distinct_n(every_response, 2),
                     repeated_4gram_rate=repeated_ngram_rate(every_response, 4),
                     **update_stats(per_minibatch, gather_objects(ratio_means)), **clock.times)
        if ppo_cfg.adaptive_kl and with_reference:  # Ziegler et al.: after each rollout, n = the samples it held
            beta = adaptive_beta(beta, stats["objective/kl"], ppo_cfg.kl_target, stats["samples"], ppo_cfg.kl_horizon)
        history.append(stats)
        run.end_iteration(trainer, policy, iteration=it, step=step, history=history, extra_state={"beta": beta},
                          plot_panels={"score": ["objective/scores", "objective/rlhf_reward", "held_out_reward",
                                                 "held_out_gold"],
                                       "KL to the reference (per response)": ["objective/kl_k1", "objective/kl_k3"],
                                       "proxy and gold score against the KL": ["objective/scores_raw",
                                                                               "objective/gold_scores"],
                                       "response tokens": ["response_length"],
                                       "toxicity of the responses": ["objective/toxicity"],
                                       "toxicity against the KL": ["objective/toxicity"]},
                          plot_against={"proxy and gold score against the KL": "objective/kl_k1",
                                        "toxicity against the KL": "objective/kl_k1"})
    trainer.export_and_close(tok, policy)
    return history


def needs_reference(ppo_cfg: PpoConfig) -> bool:
    """A reference model is built and run only when the KL term has weight: with beta 0 (fixed or adaptive, which
    stays 0) nothing reads its log-probs, and the KL is not logged."""
    return ppo_cfg.beta > 0


def old_logprobs_source(cfg: PpoTrainConfig, *, samples_per_rank: int, has_critic: bool) -> str:
    """Where the rollout's old log-probs come from. `update`: the update's own (detached; ratio exactly 1, as TRL's
    GRPO takes them) when one optimizer step follows each rollout and nothing before the update reads them: no
    critic (its advantages) and no KL in the reward. Otherwise ppo.old_logprobs: `sampler`, the log-probs each token
    was drawn with (no pass of their own), or `forward`, a forward pass over the rollout (TRL's); auto: the sampler
    in fp32, where the two agree to ~1e-5 (tests/test_generate.py), the pass in bf16, where decoding one token at
    a time rounds differently from a whole-sequence forward."""
    optim, ppo_cfg = cfg.optim, cfg.ppo
    one_step = optim.epochs == 1 and samples_per_rank <= optim.micro_batch_size * optim.grad_accum
    if one_step and not has_critic and ppo_cfg.kl_placement() != "reward":
        return "update"
    if ppo_cfg.old_logprobs == "auto":
        return "forward" if cfg.run.bf16 else "sampler"
    return ppo_cfg.old_logprobs


LOSS_TERMS = ("loss/policy", "loss/kl", "loss/value")
TOKEN_COUNTS = {"policy/clipfrac": "clipped", "val/clipfrac": "value_clipped", "policy/approxkl": "approxkl",
                "policy/entropy": "entropy", "policy/ratio": "ratio"}  # a metric: the token count it is a mean of


def ppo_minibatch(model: ActorCritic, exp: Experience, rows: torch.Tensor, *, tokens: float, sequences: float,
                  ppo_cfg: PpoConfig, beta_in_loss: float | None, dist: Dist, bf16: bool,
                  micro_batch_size: int, old_from_update: bool = False) -> dict:
    """Forward and backward over one minibatch, micro-batch by micro-batch. The policy loss is weighted by
    ppo.loss_aggregation (rmcore.rl.LOSS_AGGREGATIONS) from the minibatch's real tokens and responses on all ranks
    (tokens, sequences), plus beta_in_loss * its k3 KL when the KL is in the loss; the value loss and entropy are
    means over the same tokens: micro-batching and the number of ranks never change the loss. old_from_update: the
    rollout's old log-probs are this forward's, detached (written into exp.logp_old). Returns this rank's
    share of each loss term (the sum over ranks is the minibatch's), sums for token means, and each micro-batch's
    mean ratio."""
    aggregate = LOSS_AGGREGATIONS[ppo_cfg.loss_aggregation]
    sums = dict.fromkeys((*LOSS_TERMS, *TOKEN_COUNTS.values(), "tokens"), 0.0)
    ratio_means = []
    micro = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    for j, r in enumerate(micro):
        model.set_requires_gradient_sync(j == len(micro) - 1)
        b = exp.batch.rows(r)
        m = b.response_mask
        real = m.bool()
        with autocast(dist, bf16):
            logits = response_logits(model.policy, b)  # (n, vocab): the real response tokens only
            values = response_values(model.critic, b) if model.critic is not None else None
        # under logits / temperature, the distribution the samples came from: rmcore.generate.token_logprobs and
        # rmcore.rl.token_entropy in one pass over the vocabulary
        logp, ent = token_logprobs_and_entropy(logits, b.responses[real], ppo_cfg.temperature)
        logp, ent = at_responses(logp, b), at_responses(ent, b)
        if old_from_update:
            exp.logp_old[r] = logp.detach()
        weights = aggregate(m, tokens=tokens, sequences=sequences, max_len=ppo_cfg.max_new_tokens)
        pg, kl, clipped = policy_objective(logp, exp.logp_old[r], exp.advantages[r], m, weights, clip=ppo_cfg.clip,
                                           sequence_ratio=ppo_cfg.importance_ratio == "sequence",
                                           logp_ref=exp.logp_ref[r] if beta_in_loss is not None else None)
        loss = pg + (beta_in_loss or 0.0) * kl - ppo_cfg.entropy_coef * ent.sum() / tokens
        vl, vclipped = torch.zeros(()), torch.zeros(())
        if values is not None:
            vl, vclipped = value_loss_terms(values, exp.values_old[r], exp.returns[r], m, ppo_cfg.clip_value)
            loss = loss + ppo_cfg.value_coef * vl.sum() / tokens
        (loss * dist.world_size).backward()  # FSDP averages gradients over ranks; each rank holds its share
        with torch.no_grad():
            log_ratio = torch.where(real, logp - exp.logp_old[r], 0)
            ratio = torch.where(real, log_ratio.exp(), 0)
            n_tok = float(m.sum())
            for key, value in (("loss/policy", float(pg)), ("loss/kl", float(kl)),
                               ("loss/value", float(vl.sum()) / tokens), ("clipped", float(clipped.sum())),
                               ("value_clipped", float(vclipped.sum())), ("entropy", float(ent.sum())),
                               ("approxkl", float((0.5 * log_ratio ** 2).sum())), ("ratio", float(ratio.sum())),
                               ("tokens", n_tok)):
                sums[key] += value
            ratio_means.append(float(ratio.sum()) / max(n_tok, 1.0))
    return {**sums, "ratio_means": ratio_means}


def token_means(sums: dict[str, float], dist: Dist) -> dict[str, float]:
    """A minibatch's token means over every rank (TOKEN_COUNTS), under TRL's names where TRL has one."""
    keys = [*TOKEN_COUNTS.values(), "tokens"]
    totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], dist.device)))
    return {name: totals[key] / max(totals["tokens"], 1.0) for name, key in TOKEN_COUNTS.items()}


def update_stats(per_minibatch: list[dict], ratio_means: list[float]) -> dict[str, float]:
    """The iteration's update figures as TRL logs them: each minibatch figure averaged over the minibatches
    (`_avg`), val/ratio the mean and val/ratio_var the (unbiased) variance of the micro-batches' mean ratios over
    every rank (TRL's means also count padding positions, where its ratio is 1; ours are over real tokens)."""
    keys = [*LOSS_TERMS, *(k for k in TOKEN_COUNTS if k != "policy/ratio")]
    out = {f"{k}_avg": float(np.mean([r[k] for r in per_minibatch])) for k in keys if k in per_minibatch[0]}
    out["val/ratio"] = float(np.mean(ratio_means))
    out["val/ratio_var"] = float(np.var(ratio_means, ddof=1)) if len(ratio_means) > 1 else 0.0
    return out


def rollout_stats(exp: Experience, *, raw_scores: torch.Tensor, scores: torch.Tensor, ended: torch.Tensor,
                  kl: torch.Tensor, logged: dict[str, list[float] | None], beta_in_reward: float, has_critic: bool,
                  eos_id: int, dist: Dist) -> dict:
    """The rollout's figures over every rank: per-response sums averaged over responses (TRL's objective/*; the
    non-score reward is the KL penalty inside the reward, 0 when the KL is in the loss; `logged`: the gold judge's and
    the toxicity scorer's scores of the same responses, where there are), the critic's explained variance over real
    tokens, length and how responses ended."""
    batch, logp_old, logp_ref = exp.batch, exp.logp_old, exp.logp_ref
    mask = batch.response_mask
    lengths = mask.sum(-1)
    last = batch.responses.gather(1, (lengths.long() - 1).clamp(min=0)[:, None])[:, 0]
    kl_sums = {} if logp_ref is None else {  # no reference model (beta 0): no KL measured
        "objective/kl": kl.sum(-1), "objective/kl_k1": (kl_k1(logp_old, logp_ref) * mask).sum(-1),
        "objective/kl_k3": (kl_k3(logp_old, logp_ref) * mask).sum(-1)}
    per_response = {
        "objective/scores": scores, "objective/scores_raw": raw_scores, **kl_sums,
        "objective/entropy": (-logp_old * mask).sum(-1),  # TRL's: minus the sampled tokens' log-probs, summed
        "objective/non_score_reward": (-beta_in_reward * kl).sum(-1), "response_length": lengths,
        "no_eos_fraction": (~ended).float(), "val/num_eos_tokens": (last == eos_id).float(),
        **{name: torch.tensor(values) for name, values in logged.items() if values is not None},
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
    stats["samples"] = int(n)
    return stats


def critic_source(cfg: PpoTrainConfig, tok: Tokenizer) -> tuple[str, bool]:
    """(directory the critic starts from, whether its value head is fresh). It reads the policy's token ids, so
    its tokenizer must be the policy's: a mismatch stops here rather than being misread for a whole run."""
    ppo_cfg = cfg.ppo
    if ppo_cfg.critic == "policy":
        return cfg.run.init_from, True
    if ppo_cfg.critic == "reward" and isinstance(ppo_cfg.reward, list):
        raise ConfigError(f"ppo.critic=reward starts the critic from the reward model, and ppo.reward is an ensemble "
                          f"{ppo_cfg.reward}: name one directory as ppo.critic, or ppo.critic=policy")
    path = ppo_cfg.reward if ppo_cfg.critic == "reward" else ppo_cfg.critic
    if is_url(path):
        raise ConfigError(f"ppo.critic={ppo_cfg.critic}: a critic starts from a reward model's weights, and {path} is "
                          f"a reward server: name the model's directory as ppo.critic, or ppo.critic=policy")
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
