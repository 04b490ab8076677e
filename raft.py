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

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from rmcore.align import (
    default_stop_strings, discard_reason, distinct_n, load_prompts, response_logprobs, sample, select_global,
    select_local,
)
from rmcore.config import ConfigError, RaftTrainConfig, load_stages, parse_cli
from rmcore.data import Example, ShardedSampler, Template, document_tokens, require_data
from rmcore.distributed import gather_objects, init_distributed, shutdown
from rmcore.errors import user_errors
from rmcore.loop import Trainer, autocast, build_model, compute_dtype, make_optimizer
from rmcore.model import CausalLM
from rmcore.rewards import checked_rewards, load_reward
from rmcore.rundir import RunLock, export_pretrained
from rmcore.runner import bf16, export_config, say, setup
from rmcore.sft import collate_documents, sft_step


def main(argv: list[str]) -> list[dict]:
    path, overrides = parse_cli(argv, "raft.py")
    [cfg] = load_stages(path, overrides, RaftTrainConfig)
    cfg.run.stage = "raft"
    d = init_distributed(cfg.run.device)
    with RunLock(cfg.run.out_dir, d):
        return raft(cfg)


def raft(cfg: RaftTrainConfig) -> list[dict]:
    rc, o = cfg.raft, cfg.optim
    if not rc.reward:
        raise ConfigError("raft.reward is not set: a reward model directory, or module:function")
    if cfg.run.init_from is None:
        raise ConfigError("run.init_from is not set: RAFT starts from a policy (an SFT export)")
    if cfg.run.save_every:
        raise ConfigError("run.save_every does not apply to raft.py: it checkpoints after every iteration")
    d, tok = setup(cfg)
    template = Template.from_config(cfg.data).check(tok)
    stops = tuple(rc.stop_strings) if rc.stop_strings is not None else default_stop_strings(template)
    pool = load_prompts(cfg.data.train, tok, template, rc.max_prompt_tokens, "raft prompts", cfg.data.format,
                        cfg.data.skip_bad_lines)
    say(d, pool.report.summary())
    require_data(len(pool), pool.report, cfg.data.train, "data.train (raft prompts)", "prompts")
    held_out = None
    if cfg.data.eval and rc.eval_prompts:
        held_out = load_prompts(cfg.data.eval, tok, template, rc.max_prompt_tokens, "raft held-out prompts",
                                cfg.data.format, cfg.data.skip_bad_lines)
        say(d, held_out.report.summary())
    policy = build_model(CausalLM, d, cfg.run.init_from, None, bf16(cfg), cfg.run.seed,
                         activation_checkpointing=cfg.model.activation_checkpointing)
    start = build_model(CausalLM, d, cfg.run.init_from, None, bf16(cfg), cfg.run.seed).eval()  # for KL, frozen
    start.requires_grad_(False)
    reward = load_reward(rc.reward, d.device, normalize=rc.reward_normalize)
    per_rank = math.ceil(rc.prompts_per_iter / d.world_size)  # equal shares: every rank runs the same forwards
    # the lr schedule spans the most steps the iterations can take (every prompt keeps a sample)
    steps_per_iter = math.ceil(math.ceil(per_rank / o.micro_batch_size) / o.grad_accum) * o.epochs
    trainer = Trainer(cfg, d, policy, total_steps=steps_per_iter * rc.iterations)
    first = trainer.resumed["iteration"] if trainer.resumed else 0
    history = trainer.resumed.get("history", []) if trainer.resumed else []
    step = trainer.start_step
    out = Path(cfg.run.out_dir)
    for it in range(first, rc.iterations):
        # 1. sample: a generator seeded by (seed, iteration, rank), so a resumed iteration samples the same
        g = torch.Generator(device=d.device).manual_seed(cfg.run.seed * 1_000_003 + it * 1_009 + d.rank)
        indices = pool.draw(per_rank * d.world_size, cfg.run.seed, it)[d.rank::d.world_size]
        with autocast(d, bf16(cfg)):
            samples = sample(policy, pool, indices, rc.k, tok, rc.max_new_tokens, rc.generation_batch_size,
                             rc.temperature, rc.top_k, rc.top_p, stops, g, with_logprobs=True,
                             progress=d.is_main and cfg.logging.progress, dtype=compute_dtype(bf16(cfg)))
        # 2. score, 3. discard and select
        rewards = np.array(checked_rewards(reward, samples.prompts, samples.responses))
        reasons = [discard_reason(r, s, template, tuple(rc.discard)) for r, s in zip(samples.responses, samples.stopped)]
        valid = np.array([x is None for x in reasons])
        if rc.selection == "local":
            kept = select_local(rewards, rc.k, valid)
        else:  # the top 1/K of every rank's samples together; this rank keeps its own among them
            everyone = gather_objects([(d.rank, i, float(r), bool(v)) for i, (r, v) in enumerate(zip(rewards, valid))])
            top = select_global(np.array([x[2] for x in everyone]), rc.k, np.array([x[3] for x in everyone]))
            kept = sorted(everyone[j][1] for j in top if everyone[j][0] == d.rank)
        with autocast(d, bf16(cfg)):  # KL(policy || start) on the samples, k1 estimate summed over each response
            ref = response_logprobs(start, [pool.ids[i] for i in samples.prompt_index], samples.tokens,
                                    rc.temperature, rc.generation_batch_size, tok.pad_id)
        kl = [float((a - b).sum()) for a, b in zip(samples.logprobs, ref)]
        kept_rows = set(kept)
        stats = iteration_stats(gather_objects([
            {"first": j % rc.k == 0, "reward": float(rewards[j]), "kept": j in kept_rows, "reason": reasons[j],
             "tokens": samples.tokens[j], "stopped": samples.stopped[j], "kl": kl[j]} for j in range(len(rewards))]))
        # 4. fine-tune on every rank's kept pairs
        pairs = gather_objects([(samples.prompts[j], samples.responses[j]) for j in kept])
        docs = [document_tokens(Example(f"iteration {it + 1} sample {n}", p, r), tok, template, cfg.data.sft_loss_on)
                for n, (p, r) in enumerate(pairs)]
        if rc.reset_optimizer:
            trainer.optimizer = make_optimizer(policy, o.lr, o.weight_decay, tuple(o.betas), o.eps)
        policy.train()
        sampler = ShardedSampler(len(docs), o.micro_batch_size, d.rank, d.world_size, seed=cfg.run.seed + it)
        for _ in range(o.epochs if docs else 0):
            batches = list(sampler)
            for s in range(0, len(batches), o.grad_accum):
                micro = [collate_documents(docs, idx, tok.pad_id) for idx in batches[s:s + o.grad_accum]]
                loss_sum, n_targets = sft_step(policy, micro, d, bf16(cfg))
                trainer.step(step, {"loss": loss_sum}, n_targets, {"iteration": it + 1},
                             sum(int(b["loss_mask"].sum()) for b in micro), [i for b in micro for i in b["ids"]])
                step += 1
        # 5. held-out reward, log, export, checkpoint
        if held_out is not None:
            stats["eval_reward"] = held_out_reward(policy, held_out, rc, tok, stops, reward, d, bf16(cfg))
        stats["iteration"] = it + 1
        history.append(stats)
        trainer.log.log(step, {f"raft/{k}": v for k, v in stats.items()}, advance=False)
        trainer.log.print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
        export_pretrained(policy, out / "iterations" / f"iteration_{it + 1:04d}", d, tok, export_config(cfg))
        trainer.save(step, {"iteration": it + 1, "history": history})
        if d.is_main:
            for old in sorted((out / "iterations").glob("iteration_*"))[:-rc.keep_exports]:
                shutil.rmtree(old, ignore_errors=True)
            (out / "raft_history.json").write_text(json.dumps(history, indent=2) + "\n")
            plot_history(history, out / "raft_reward.png")
        if rc.halt_after_iteration is not None and it + 1 >= rc.halt_after_iteration and it + 1 < rc.iterations:
            trainer.log.print(f"halting after iteration {it + 1} (raft.halt_after_iteration)")
            trainer.log.close()
            raise SystemExit(0)
    if cfg.run.export:
        export_pretrained(policy, out / "export", d, tok, export_config(cfg))
        trainer.log.print(f"exported {out / 'export'}")
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


def held_out_reward(policy, held_out, rc, tok, stops, reward, d, bf16_on: bool) -> float:
    """Mean reward of greedy responses to the first raft.eval_prompts held-out prompts (every rank generates all
    of them: greedy is deterministic, and every rank runs the same forwards)."""
    indices = list(range(min(rc.eval_prompts, len(held_out))))
    with autocast(d, bf16_on):
        s = sample(policy, held_out, indices, 1, tok, rc.max_new_tokens, rc.generation_batch_size, 0.0, 0, 1.0,
                   stops, None, dtype=compute_dtype(bf16_on))
    return float(np.mean(checked_rewards(reward, s.prompts, s.responses)))


def plot_history(history: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    its = [h["iteration"] for h in history]
    for key in ("reward_first", "reward_kept", "eval_reward"):
        if key in history[0]:
            ax.plot(its, [h[key] for h in history], marker="o", label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    try:
        with user_errors():
            main(sys.argv[1:])
    except SystemExit as stop:  # raft.halt_after_iteration ends a run early but cleanly
        if stop.code not in (0, None):
            raise
    shutdown()
