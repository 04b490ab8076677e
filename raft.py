"""RAFT: reward-ranked fine-tuning (Dong et al. 2023, arXiv 2304.06767).

    python raft.py --config configs/tiny_raft.yaml                          # on the tiny chain's exports, CPU
    torchrun --nproc_per_node=2 raft.py --config configs/tiny_raft.yaml     # sampling split across ranks, FSDP2

Each iteration, top to bottom in `raft` below:
  1. draw raft.prompts_per_iter prompts (each rank an equal share) and sample raft.k responses per prompt with the
     current policy, each cut at its stop (EOS or a stop string);
  2. score every sample with the reward: a reward model directory or a Python function (rmcore/rewards.py);
  3. leave degenerate samples out (empty, cut at the length limit, writing a turn marker: counted by reason) and
     keep the best of each prompt's K (selection=local) or the top 1/K of all samples (selection=global);
  4. gather every rank's kept (prompt, response) pairs and fine-tune the policy on them for optim.epochs epochs,
     with the SFT step train.py uses (loss on the response tokens by default, data.sft_loss_on);
  5. log the iteration, export the policy, checkpoint: a killed run resumes after its last completed iteration.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from rmcore.align import discard_reason, distinct_n, pack, response_logprobs, select_global, select_local
from rmcore.config import RaftTrainConfig
from rmcore.data import Example, ShardedSampler, document_tokens
from rmcore.distributed import gather_objects
from rmcore.iterations import (
    align_main, build_policy, end_iteration, held_out_reward, prepare, reference_model, sample_iteration,
)
from rmcore.loop import Trainer, autocast, make_optimizer
from rmcore.rewards import checked_rewards
from rmcore.rundir import export_pretrained
from rmcore.runner import bf16, export_config, run_script, setup
from rmcore.sft import collate_documents, sft_step


def main(argv: list[str]) -> list[dict]:
    return align_main(argv, "raft", RaftTrainConfig, raft)


def raft(cfg: RaftTrainConfig) -> list[dict]:
    rc, o = cfg.raft, cfg.optim
    d, tok = setup(cfg)
    s = prepare(cfg, rc, d, tok, "raft")
    policy, start = build_policy(cfg, d)  # start: the KL reference
    per_rank = math.ceil(rc.prompts_per_iter / d.world_size)  # equal shares: every rank runs the same forwards
    # the lr schedule spans the most steps the iterations can take (every prompt keeps a sample)
    steps_per_iter = math.ceil(math.ceil(per_rank / o.micro_batch_size) / o.grad_accum) * o.epochs
    trainer = Trainer(cfg, d, policy, total_steps=steps_per_iter * rc.iterations)
    first = trainer.resumed["iteration"] if trainer.resumed else 0
    history = trainer.resumed.get("history", []) if trainer.resumed else []
    step = trainer.start_step
    for it in range(first, rc.iterations):
        # 1. sample
        samples = sample_iteration(policy, s, rc, cfg, d, tok, it, per_rank, with_logprobs=True)
        # 2. score, 3. discard and select
        rewards = np.array(checked_rewards(s.reward, samples.prompts, samples.responses))
        reasons = [discard_reason(r, st, s.template, tuple(rc.discard)) for r, st in zip(samples.responses, samples.stopped)]
        valid = np.array([x is None for x in reasons])
        if rc.selection == "local":
            kept = select_local(rewards, rc.k, valid)
        else:  # the top 1/K of every rank's samples together; this rank keeps its own among them
            everyone = gather_objects([(d.rank, i, float(r), bool(v)) for i, (r, v) in enumerate(zip(rewards, valid))])
            top = select_global(np.array([x[2] for x in everyone]), rc.k, np.array([x[3] for x in everyone]))
            kept = sorted(everyone[j][1] for j in top if everyone[j][0] == d.rank)
        with autocast(d, bf16(cfg)):  # KL(policy || start) on the samples, k1 estimate summed over each response
            packed = pack([s.pool.ids[i] for i in samples.prompt_index], samples.tokens, tok.pad_id, d.device)
            with reference_model(policy, start) as reference:
                ref = response_logprobs(reference, packed, rc.temperature, rc.generation_batch_size)
        kl = [float((lp - ref[j, :len(lp)].cpu()).sum()) for j, lp in enumerate(samples.logprobs)]
        kept_rows = set(kept)
        stats = iteration_stats(gather_objects([
            {"first": j % rc.k == 0, "reward": float(rewards[j]), "kept": j in kept_rows, "reason": reasons[j],
             "tokens": samples.tokens[j], "stopped": samples.stopped[j], "kl": kl[j]} for j in range(len(rewards))]))
        # 4. fine-tune on every rank's kept pairs
        pairs = gather_objects([(samples.prompts[j], samples.responses[j]) for j in kept])
        docs = [document_tokens(Example(f"iteration {it + 1} sample {n}", p, r), tok, s.template, cfg.data.sft_loss_on)
                for n, (p, r) in enumerate(pairs)]
        if rc.reset_optimizer:
            trainer.optimizer = make_optimizer(policy, o.lr, o.weight_decay, tuple(o.betas), o.eps)
        policy.train()
        sampler = ShardedSampler(len(docs), o.micro_batch_size, d.rank, d.world_size, seed=cfg.run.seed + it)
        for _ in range(o.epochs if docs else 0):
            batches = list(sampler)
            for b in range(0, len(batches), o.grad_accum):
                micro = [collate_documents(docs, idx, tok.pad_id) for idx in batches[b:b + o.grad_accum]]
                loss_sum, n_targets = sft_step(policy, micro, d, bf16(cfg))
                trainer.step(step, {"loss": loss_sum}, n_targets, {"iteration": it + 1},
                             sum(int(m["loss_mask"].sum()) for m in micro), [i for m in micro for i in m["ids"]])
                step += 1
        # 5. held-out reward, log, export, checkpoint
        if s.held_out is not None:
            stats["eval_reward"] = held_out_reward(policy, s, rc, cfg, d, tok)
        stats["iteration"] = it + 1
        history.append(stats)
        end_iteration(trainer, policy, cfg, rc, tok, it, step, history, {}, "raft",
                      {"reward": ["reward_first", "reward_kept", "eval_reward"]})
    if cfg.run.export:
        export_pretrained(policy, Path(cfg.run.out_dir) / "export", d, tok, export_config(cfg), cfg.run.init_from)
        trainer.log.print(f"exported {Path(cfg.run.out_dir) / 'export'}")
    trainer.log.close()
    return history


def iteration_stats(rows: list[dict]) -> dict:
    """One iteration's figures from every rank's samples: rewards (first sample per prompt: an unbiased estimate of
    the policy; all; kept), length, diversity, what was discarded and why, KL to the starting policy."""
    def mean(xs):
        xs = list(xs)
        return float(np.mean(xs)) if xs else float("nan")

    kept = [r for r in rows if r["kept"]]
    stats = {"reward_first": mean(r["reward"] for r in rows if r["first"]), "reward_all": mean(r["reward"] for r in rows),
             "reward_kept": mean(r["reward"] for r in kept), "samples": len(rows), "kept": len(kept),
             "response_tokens": mean(len(r["tokens"]) for r in rows),
             "distinct_1": distinct_n([r["tokens"] for r in rows], 1), "distinct_2": distinct_n([r["tokens"] for r in rows], 2),
             "truncated_fraction": mean(not r["stopped"] for r in rows),
             "kl_start_all": mean(r["kl"] for r in rows), "kl_start_kept": mean(r["kl"] for r in kept)}
    for reason in ("empty", "truncated", "tag"):
        stats[f"discarded_{reason}"] = sum(r["reason"] == reason for r in rows)
    return stats


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
