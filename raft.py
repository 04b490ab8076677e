"""RAFT: reward-ranked fine-tuning (Dong et al. 2023, arXiv 2304.06767).

    python raft.py --config configs/tiny_raft.yaml                          # on the tiny chain's exports, CPU
    torchrun --nproc_per_node=2 raft.py --config configs/tiny_raft.yaml     # sampling split across ranks, FSDP2

Each iteration, top to bottom in `raft` below:
  1. draw raft.prompts_per_iter prompts (each rank an equal share) and sample raft.k responses per prompt with the
     current policy, each cut at its stop (EOS or a stop string);
  2. score every sample with the reward: a reward model directory or a Python function (rmcore/align/rewards.py),
     or an ensemble of them; a gold judge (raft.gold_reward) and a toxicity scorer (raft.toxicity), if any, score
     the same samples for the log only;
  3. leave degenerate samples out (empty, cut at the length limit, writing a turn marker: counted by reason) and
     keep the best of each prompt's K (selection=local) or the top 1/K (raft.keep_fraction) of all samples
     (selection=global); an iteration that keeps none is a warning, raft.max_empty_iterations in a row a stop;
  4. gather every rank's kept (prompt, response) pairs and fine-tune the policy on them for optim.epochs epochs,
     with the SFT step train.py uses (loss on the response tokens by default, data.sft_loss_on);
  5. log the iteration (with the seconds each phase took: time/*), export the policy (every raft.export_every
     iterations) and checkpoint (every raft.save_every): a killed run resumes after its last checkpoint, exactly.
The held-out reward (greedy answers to data.eval's prompts) is measured before each iteration's update, as the
samples' rewards are, and after the last one (held_out_reward_final). Where this differs from LMFlow's RAFT, and
the settings that give LMFlow's behaviour: RaftConfig's docstring (rmcore/config/sections.py).
"""
from __future__ import annotations

import math
import sys
import warnings

import numpy as np

from rmcore.align.iteration import AlignRun, Clock, align_main
from rmcore.align.rollouts import pack, response_logprobs
from rmcore.align.selection import discard_reason, distinct_n, repeated_ngram_rate, select_global, select_local
from rmcore.config.sections import RaftTrainConfig
from rmcore.data.batching import collate_documents
from rmcore.data.datasets import document_tokens
from rmcore.data.records import Example
from rmcore.data.sampler import ShardedSampler
from rmcore.errors import UserError
from rmcore.sft import sft_step
from rmcore.training.distributed import gather_objects
from rmcore.training.launch import run_script
from rmcore.training.runtime import autocast, reference_model
from rmcore.training.trainer import Trainer


def main(argv: list[str]) -> list[dict]:
    return align_main(argv, name="raft", config_class=RaftTrainConfig, loop=raft)


def raft(cfg: RaftTrainConfig) -> list[dict]:
    run = AlignRun.start(cfg, "raft")
    dist, tok, k = run.dist, run.tokenizer, cfg.raft.k
    policy, start = run.build_policy()  # start: the KL reference
    # the lr schedule spans the most steps the iterations can take (every prompt keeps a sample)
    steps_per_iter = math.ceil(math.ceil(run.prompts_per_rank / cfg.optim.micro_batch_size) / cfg.optim.grad_accum)
    trainer = Trainer(cfg, dist, policy, total_steps=steps_per_iter * cfg.optim.epochs * cfg.raft.iterations)
    first = trainer.resumed["iteration"] if trainer.resumed else 0
    history = trainer.resumed.get("history", []) if trainer.resumed else []
    step = trainer.start_step
    for it in range(first, cfg.raft.iterations):
        clock = Clock()
        held_out = run.held_out_reward(policy, iteration=it)  # the policy that samples next, before its update
        clock.lap("held_out")
        # 1. sample
        samples = run.sample(policy, iteration=it, with_logprobs=True)
        clock.lap("sample")
        # 2. score, 3. discard and select
        rewards = np.array(run.score(samples.prompts, samples.responses, iteration=it))
        gold = run.gold_scores(samples.prompts, samples.responses, iteration=it)  # logged only
        toxicity = run.toxicity_scores(samples.prompts, samples.responses, iteration=it)  # logged only
        reasons = [discard_reason(r, stopped, run.template, tuple(cfg.raft.discard))
                   for r, stopped in zip(samples.responses, samples.stopped)]
        valid = np.array([x is None for x in reasons])
        if cfg.raft.selection == "local":
            kept = select_local(rewards, k, valid)
        else:  # the top 1/K of every rank's samples together; this rank keeps its own among them
            everyone = gather_objects([(dist.rank, i, float(r), bool(v))
                                       for i, (r, v) in enumerate(zip(rewards, valid))])
            top = select_global(np.array([x[2] for x in everyone]), k, np.array([x[3] for x in everyone]),
                                keep_fraction=cfg.raft.keep_fraction)
            kept = sorted(everyone[j][1] for j in top if everyone[j][0] == dist.rank)
        clock.lap("score")
        with autocast(dist, cfg.run.bf16):  # KL(policy || start) on the samples, k1 estimate summed over each response
            packed = pack([run.prompts.ids[i] for i in samples.prompt_index], samples.tokens, tok.pad_id, dist.device)
            with reference_model(policy, start) as reference:
                ref = response_logprobs(reference, packed, cfg.raft.temperature, cfg.raft.generation_batch_size)
        kl = [float((lp - ref[j, :len(lp)].cpu()).sum()) for j, lp in enumerate(samples.logprobs)]
        clock.lap("forward")
        kept_rows = set(kept)
        stats = iteration_stats(gather_objects([
            {"first": j % k == 0, "reward": float(rewards[j]), "kept": j in kept_rows, "reason": reasons[j],
             "tokens": samples.tokens[j], "stopped": samples.stopped[j], "kl": kl[j],
             "gold": gold[j] if gold else None, "toxicity": toxicity[j] if toxicity else None}
            for j in range(len(rewards))]))
        check_kept(stats, history, cfg, log=trainer.log)
        # 4. fine-tune on every rank's kept pairs
        pairs = gather_objects([(samples.prompts[j], samples.responses[j]) for j in kept])
        docs = [document_tokens(Example(f"iteration {it + 1} sample {n}", p, r), tok, run.template,
                                cfg.data.sft_loss_on) for n, (p, r) in enumerate(pairs)]
        if cfg.raft.reset_optimizer:
            trainer.reset_optimizer()
        policy.train()
        sampler = ShardedSampler(len(docs), cfg.optim.micro_batch_size, rank=dist.rank, world_size=dist.world_size,
                                 seed=cfg.run.seed + it)
        for _ in range(cfg.optim.epochs if docs else 0):
            batches = list(sampler)
            for b in range(0, len(batches), cfg.optim.grad_accum):
                micro = [collate_documents(docs, idx, tok.pad_id) for idx in batches[b:b + cfg.optim.grad_accum]]
                loss_sum, n_targets = sft_step(policy, micro, dist, cfg.run.bf16)
                trainer.step(step, losses={"loss": loss_sum}, count=n_targets, metrics={"iteration": it + 1},
                             tokens=sum(int(m["loss_mask"].sum()) for m in micro),
                             ids=[i for m in micro for i in m["ids"]])
                step += 1
        clock.lap("update")
        # 5. log, export, checkpoint
        history.append({"iteration": it + 1, **held_out, **stats, **clock.times})
        run.end_iteration(trainer, policy, iteration=it, step=step, history=history, extra_state={},
                          plot_panels={"reward": ["reward_first", "reward_kept", "held_out_reward", "held_out_gold"],
                                       "proxy and gold reward against the KL to the start": ["reward_first",
                                                                                              "gold_first"],
                                       "toxicity of the samples": ["toxicity_all", "toxicity_kept"],
                                       "toxicity against the KL to the start": ["toxicity_all"]},
                          plot_against={"proxy and gold reward against the KL to the start": "kl_start_all",
                                        "toxicity against the KL to the start": "kl_start_all"})
    trainer.export_and_close(tok)
    return history


def check_kept(stats: dict, history: list[dict], cfg: RaftTrainConfig, *, log):
    """An iteration whose discard rules kept no sample trains on nothing: say so with the counts, every time, and
    stop after raft.max_empty_iterations such iterations in a row (the settings, not the policy, are at fault)."""
    if stats["kept"]:
        return
    reasons = ", ".join(f"{stats[f'discarded_{r}']} {r}" for r in ("empty", "truncated", "tag")
                        if stats[f"discarded_{r}"])
    in_a_row = 1 + next((i for i, h in enumerate(reversed(history)) if h["kept"]), len(history))
    text = (f"raft: no sample kept this iteration: {stats['samples']} samples, discarded {reasons or 'none'} "
            f"(raft.discard={cfg.raft.discard}, raft.max_new_tokens={cfg.raft.max_new_tokens}); {in_a_row} such "
            f"iteration(s) in a row")
    log.print(text)
    warnings.warn(text, stacklevel=2)
    if in_a_row >= cfg.raft.max_empty_iterations:
        log.close()
        raise UserError(f"{text}: stopping (raft.max_empty_iterations={cfg.raft.max_empty_iterations}). Raise "
                        f"raft.max_new_tokens if samples are truncated, or loosen raft.discard")


def iteration_stats(rows: list[dict]) -> dict:
    """One iteration's figures from every rank's samples: rewards (first sample per prompt: an unbiased estimate of
    the policy; all; kept), the gold judge's and the toxicity scorer's of the same samples, length, diversity, what
    was discarded and why, KL to the starting policy."""
    def mean(xs):
        xs = list(xs)
        return float(np.mean(xs)) if xs else float("nan")

    kept = [r for r in rows if r["kept"]]
    stats = {"reward_first": mean(r["reward"] for r in rows if r["first"]),
             "reward_all": mean(r["reward"] for r in rows),
             "reward_kept": mean(r["reward"] for r in kept), "samples": len(rows), "kept": len(kept),
             "response_tokens": mean(len(r["tokens"]) for r in rows),
             "distinct_1": distinct_n([r["tokens"] for r in rows], 1),
             "distinct_2": distinct_n([r["tokens"] for r in rows], 2),
             "repeated_4gram_rate": repeated_ngram_rate([r["tokens"] for r in rows], 4),
             "truncated_fraction": mean(not r["stopped"] for r in rows),
             "kl_start_all": mean(r["kl"] for r in rows), "kl_start_kept": mean(r["kl"] for r in kept)}
    if rows and rows[0]["gold"] is not None:
        stats.update({"gold_first": mean(r["gold"] for r in rows if r["first"]),
                      "gold_all": mean(r["gold"] for r in rows), "gold_kept": mean(r["gold"] for r in kept)})
    if rows and rows[0]["toxicity"] is not None:
        stats.update({"toxicity_all": mean(r["toxicity"] for r in rows),
                      "toxicity_kept": mean(r["toxicity"] for r in kept)})
    for reason in ("empty", "truncated", "tag"):
        stats[f"discarded_{reason}"] = sum(r["reason"] == reason for r in rows)
    return stats


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
