"""Train a tokenizer, an SFT model, a reward model, or a policy directly on preference pairs (DPO).

    python train.py --config configs/tiny.yaml                       # the tiny chain: tokenizer -> SFT -> RM, on CPU
    python train.py --config configs/tiny_rm.yaml optim.lr=1e-4      # one stage, any field overridden as key=value
    torchrun --nproc_per_node=8 train.py --config configs/open_llama_3b_rm.yaml   # FSDP2 over 8 GPUs

Each stage is one function below, readable top to bottom: data, model, then the loop. The RM loss is spelled out
here from the pure functions in rmcore/losses.py, as is DPO's (its log-probs and reference come from
rmcore/dpo.py); the SFT step is rmcore/sft.py's, which raft.py shares.
rmcore.training.trainer.Trainer does the bookkeeping every loop shares.

The loss of an optimizer step is the sum of per-pair (or per-token) losses divided by the number of pairs (or
target tokens) in the whole step, over all micro-batches and all ranks; each micro-batch's part is multiplied by
world_size because FSDP averages gradients over ranks. Gradient accumulation and the number of processes
therefore never change the math.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import numpy as np
import torch

from rmcore.config.loader import parse_cli
from rmcore.config.sections import TrainConfig, load_stages
from rmcore.data.batching import collate_blocks, collate_pairs
from rmcore.data.datasets import load_blocks, load_pairs
from rmcore.data.formats import read_examples
from rmcore.data.ranked import collate_ranked, is_ranked, load_ranked
from rmcore.data.records import require_data
from rmcore.data.sampler import ShardedSampler
from rmcore.data.tokenizer_training import train_tokenizer
from rmcore.dpo import implicit_rewards, load_or_compute_reference, pair_logps, sequence_logps, table_rows
from rmcore.errors import ConfigError
from rmcore.losses import (
    PREFERENCE_SUM_KEYS,
    RANKING_LOSSES,
    RANKING_SUM_KEYS,
    centering_loss,
    metrics_from_sums,
    pairwise_loss,
    preference_sums,
    ranking_metrics_from_sums,
    ranking_sums,
)
from rmcore.model import CausalLM, RewardModel
from rmcore.odin import head_orthogonality_loss, length_correlation_loss, quality_decorrelation_loss
from rmcore.sft import sft_step, sft_sums
from rmcore.training.distributed import all_reduce_sum, barrier, init_distributed, say
from rmcore.training.launch import has_value_head, load_splits, run_script, setup
from rmcore.training.run_dir import RunLock
from rmcore.training.runtime import autocast, build_model, frozen, reference_model, set_grad_sync
from rmcore.training.trainer import Trainer


def main(argv: list[str]) -> dict:
    path, overrides = parse_cli(argv, "train.py")
    result = {}
    for cfg in load_stages(path, overrides):
        with RunLock(cfg.run.out_dir, init_distributed(cfg.run.device)):  # one run per out_dir; a second one stops here
            if cfg.run.stage in ("raft", "ppo"):
                raise ConfigError(f"run.stage={cfg.run.stage} is run by {cfg.run.stage}.py: "
                                  f"python {cfg.run.stage}.py --config ...")
            result = {"tokenizer": tokenizer_stage, "sft": sft, "rm": rm, "dpo": dpo}[cfg.run.stage](cfg)
    return result


# ------------------------------------------------------------------------------------------------ stages
def tokenizer_stage(cfg: TrainConfig) -> dict:
    """Train a SentencePiece tokenizer on the training texts, as the model will see them (templated)."""
    dist = init_distributed(cfg.run.device)
    out = Path(cfg.run.out_dir)
    if dist.is_main:
        examples, report = read_examples(cfg.data.train, fmt=cfg.data.format, skip_bad_lines=cfg.data.skip_bad_lines,
                                         name="tokenizer data")
        print(report.summary())
        require_data(len(examples), report, cfg.data.train, "data.train (tokenizer)", "texts")
        template = cfg.data.build_template()
        texts = [template.render(e.prompt, r) for e in examples for r in (e.responses or (e.chosen, e.rejected))
                 if r is not None]
        tok = train_tokenizer(texts, out, cfg.run.tokenizer_vocab_size)
        print(f"trained {tok} on {len(texts):,} texts -> {out}")
    barrier()
    return {}


def sft(cfg: TrainConfig) -> dict:
    """Supervised fine-tuning on block-packed text: masked next-token cross-entropy."""
    dist, tok = setup(cfg)
    train, held_out = load_splits(load_blocks, cfg, tok, dist, "blocks")
    model = build_model(CausalLM, dist, init_from=cfg.run.init_from, architecture=cfg.model.architecture(tok),
                        bf16=cfg.run.bf16, seed=cfg.run.seed,
                        activation_checkpointing=cfg.model.activation_checkpointing, lora=cfg.model.lora)
    shard = {"rank": dist.rank, "world_size": dist.world_size}  # this rank's share of every split
    sampler = ShardedSampler(len(train), cfg.optim.micro_batch_size, **shard, seed=cfg.run.seed)

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        loss_sum = count = 0.0
        for idx in ShardedSampler(len(held_out), cfg.optim.micro_batch_size, **shard, shuffle=False):
            loss, n = sft_sums(model, collate_blocks(held_out, idx, cfg.data.document_mask), dist, cfg.run.bf16)
            loss_sum, count = loss_sum + float(loss), count + float(n)
        model.train()
        loss_sum, count = all_reduce_sum([loss_sum, count], dist.device)
        return {"loss": loss_sum / max(count, 1), "tokens": int(count)}

    trainer = Trainer(cfg, dist, model, sampler=sampler, evaluate=evaluate if held_out is not None else None)
    model.train()
    for step, micro_batches in trainer.steps():
        batches = [collate_blocks(train, idx, cfg.data.document_mask) for idx in micro_batches]
        loss_sum, n_targets = sft_step(model, batches, dist, cfg.run.bf16)
        trainer.step(step, losses={"loss": loss_sum}, count=n_targets, metrics={},
                     tokens=sum(b["input_ids"].numel() for b in batches), ids=[i for b in batches for i in b["ids"]])
    return trainer.finish(tok)


def build_reward_model(cfg: TrainConfig, dist, tok) -> RewardModel:
    """The reward model to train: run.init_from (a causal LM gets a fresh value head, said once) or a fresh init;
    with loss.length_head, two heads (quality, length)."""
    new_head = cfg.run.init_from is not None and not has_value_head(cfg.run.init_from)
    heads = 2 if cfg.loss.length_head else 1
    if new_head:
        say(dist, f"{cfg.run.init_from} has no value head (a causal LM): starting {heads} fresh, std 1/sqrt(dim+1)")
    return build_model(RewardModel, dist, init_from=cfg.run.init_from,
                       architecture=dataclasses.replace(cfg.model.architecture(tok), reward_heads=heads),
                       bf16=cfg.run.bf16, seed=cfg.run.seed, new_head=new_head, reward_heads=heads,
                       activation_checkpointing=cfg.model.activation_checkpointing, lora=cfg.model.lora)


def rm(cfg: TrainConfig) -> dict:
    """Reward model: Bradley-Terry pairwise loss (+ optional margin, + optional centering) on chosen/rejected pairs;
    with loss.length_head, on the sum of a quality and a length head, + ODIN's terms (rmcore/odin.py)."""
    if is_ranked(cfg.data.train, cfg.data.format):  # K responses per prompt: loss.ranking, in ranked_rm below
        return ranked_rm(cfg)
    dist, tok = setup(cfg)
    odin = cfg.loss.length_head
    # ODIN's terms correlate rewards with response lengths: find where each response starts
    train, held_out = load_splits(functools.partial(load_pairs, response_starts=odin), cfg, tok, dist, "pairs")
    if cfg.loss.margin and np.isnan(train.margin).all():
        raise ConfigError("loss.margin=true, but no training pair carries a margin (a `margin` or `score_chosen`/"
                         "`score_rejected` field): the run would be a no-margin run under a margin label")
    model = build_reward_model(cfg, dist, tok)
    shard = {"rank": dist.rank, "world_size": dist.world_size}  # this rank's share of every split
    lengths = train.lengths() if cfg.data.group_by_length else None
    sampler = ShardedSampler(len(train), cfg.optim.micro_batch_size, **shard, seed=cfg.run.seed, lengths=lengths)

    def rewards(batch):
        """(r_chosen, r_rejected), each (B,), from one forward pass over the 2B rows, and each head's (2B, heads)
        (chosen rows, then rejected) with loss.length_head, else None."""
        with autocast(dist, cfg.run.bf16):
            if "seq_lens" in batch:  # packed: one row, no padding (with a shared prompt: continues)
                heads = model(batch["input_ids"].to(dist.device), position_ids=batch["position_ids"].to(dist.device),
                              seq_lens=batch["seq_lens"], continues=batch.get("continues"), per_head=True)
            else:  # collate_pairs pads on the right
                heads = model(batch["input_ids"].to(dist.device),
                              attention_mask=batch["attention_mask"].to(dist.device), right_padded=True, per_head=True)
        r = heads.float().sum(-1)
        return (*(r.chunk(2) if len(r) else (r, r)), heads.float() if odin else None)

    def pair_losses(r_chosen, r_rejected, batch, heads=None) -> dict:
        """Each term summed over the batch's pairs. `loss` is always the plain Bradley-Terry -logsigmoid(r_c - r_r),
        comparable across runs; `margin_loss` -logsigmoid(r_c - r_r - m) and `center_loss` coef * (r_c + r_r)^2
        when enabled; with heads (loss.length_head), ODIN's `length_loss` and `quality_loss`, each a micro-batch
        correlation times the batch's pairs (so the step's division makes them pair-weighted means); `total_loss`,
        what is optimised: the pairwise term (with margin if enabled) + the others."""
        terms = {"loss": pairwise_loss(r_chosen, r_rejected, reduction="sum")}
        if cfg.loss.margin:
            terms["margin_loss"] = pairwise_loss(r_chosen, r_rejected, batch["margin"].to(dist.device), reduction="sum")
        if cfg.loss.center_coef:
            terms["center_loss"] = centering_loss(r_chosen, r_rejected, cfg.loss.center_coef, reduction="sum")
        if heads is not None and len(r_chosen) > 1:
            lengths, pairs = batch["response_lengths"].to(dist.device), len(r_chosen)
            terms["length_loss"] = cfg.loss.length_coef * length_correlation_loss(heads[:, 1], lengths) * pairs
            terms["quality_loss"] = cfg.loss.quality_coef * quality_decorrelation_loss(heads[:, 0], lengths) * pairs
        elif heads is not None:  # one pair's two lengths correlate +-1: no signal; every rank still logs the keys
            terms["length_loss"] = terms["quality_loss"] = heads.sum() * 0.0
        terms["total_loss"] = (terms.get("margin_loss", terms["loss"]) + terms.get("center_loss", 0.0)
                               + terms.get("length_loss", 0.0) + terms.get("quality_loss", 0.0))
        return terms

    def orthogonality_step(n_pairs: int) -> dict:
        """ODIN's |w_Q . w_L| once per optimizer step, backward included: every rank computes it on the full head
        weights (all-gathered under FSDP2, whose backward hands each rank its own shard's gradient, unaveraged), so
        it enters the gradient once. Its value as a logged sum: a share of value * n_pairs per rank."""
        weight = model.score.weight
        weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        term = cfg.loss.orthogonality_coef * head_orthogonality_loss(weight[0], weight[1])
        term.backward()
        share = term.detach() * n_pairs / dist.world_size
        return {"orthogonality_loss": share, "total_loss": share}

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        sums, loss_sums = dict.fromkeys(PREFERENCE_SUM_KEYS, 0.0), {}
        for idx in ShardedSampler(len(held_out), cfg.optim.micro_batch_size, **shard, shuffle=False):
            batch = collate_pairs(held_out, idx, tok.pad_id, packed=cfg.data.pack_pairs,
                                  share_prompt=cfg.data.share_prompt)
            r_chosen, r_rejected, heads = rewards(batch)
            for k, v in preference_sums(r_chosen, r_rejected).items():
                sums[k] += v
            for k, v in pair_losses(r_chosen, r_rejected, batch, heads).items():
                loss_sums[k] = loss_sums.get(k, 0.0) + float(v)
        model.train()
        totals = dict(zip(sums, all_reduce_sum(list(sums.values()), dist.device)))
        loss_sums = dict(zip(loss_sums, all_reduce_sum(list(loss_sums.values()), dist.device)))
        metrics = metrics_from_sums(totals)
        return {**{k: v / max(totals["pairs"], 1) for k, v in loss_sums.items()}, "acc": metrics["accuracy"],
                **{k: metrics[k] for k in ("pairs", "ties", "tie_rate", "margin", "chosen_mean", "rejected_mean",
                                           "reward_mean", "reward_std")}}

    trainer = Trainer(cfg, dist, model, sampler=sampler, evaluate=evaluate if held_out is not None else None)
    model.train()
    for step, micro_batches in trainer.steps():
        batches = [collate_pairs(train, idx, tok.pad_id, packed=cfg.data.pack_pairs, share_prompt=cfg.data.share_prompt)
                   for idx in micro_batches]
        n_pairs = trainer.global_count(sum(len(b["ids"]) for b in batches))  # the denominator: pairs in the whole step
        sums = {}  # summed on the device: one host sync per step, after the last backward
        for i, batch in enumerate(batches):
            set_grad_sync(model, i == len(batches) - 1)
            r_chosen, r_rejected, heads = rewards(batch)
            terms = pair_losses(r_chosen, r_rejected, batch, heads)
            (terms["total_loss"] / n_pairs * dist.world_size).backward()
            terms = {**terms, "wins": (r_chosen > r_rejected).sum(), "ties": (r_chosen == r_rejected).sum()}
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        if odin:
            for k, v in orthogonality_step(n_pairs).items():
                sums[k] = sums.get(k, 0.0) + v.float()
        sums = dict(zip(sums, torch.stack(list(sums.values())).tolist()))
        wins, ties = all_reduce_sum([sums.pop("wins"), sums.pop("ties")], dist.device)
        tokens = sum(b["tokens"] for b in batches)  # the pairs' sequences' tokens, however many columns ran
        columns = sum(b["input_ids"].numel() for b in batches)
        # this rank's share of pad slots, and of sequence tokens a shared prompt saved (not run twice)
        padding, shared = (max(1 - tokens / max(columns, 1), 0.0), max(1 - columns / max(tokens, 1), 0.0))
        trainer.step(step, losses=sums, count=n_pairs, metrics={"acc": wins / n_pairs, "ties": int(ties),
                                                                 "padding": padding, "shared_prompt": shared},
                     tokens=tokens, ids=[i for b in batches for i in b["ids"]])
    return trainer.finish(tok)


def ranked_rm(cfg: TrainConfig) -> dict:
    """Reward model on rankings of K responses per prompt (rm hands over when data.train holds a ranked format):
    loss.ranking (all_pairs or plackett_luce), each prompt's loss summed and divided by the step's global number of
    prompts; a micro-batch's responses run in one packed row, each prompt's K together."""
    for setting, given in (("loss.margin", cfg.loss.margin), ("loss.center_coef", cfg.loss.center_coef),
                           ("loss.length_head", cfg.loss.length_head),
                           ("data.pack_pairs=false", not cfg.data.pack_pairs)):
        if given:  # said, not ignored: each is a setting of the pairwise loss or of pair batches
            raise ConfigError(f"{setting} applies to pairs, and data.train holds rankings of K responses (trained "
                              f"with loss.ranking={cfg.loss.ranking}, always packed): remove it")
    dist, tok = setup(cfg)
    train, held_out = load_splits(load_ranked, cfg, tok, dist, "rankings")
    model = build_reward_model(cfg, dist, tok)
    shard = {"rank": dist.rank, "world_size": dist.world_size}  # this rank's share of every split
    lengths = train.lengths() if cfg.data.group_by_length else None
    sampler = ShardedSampler(len(train), cfg.optim.micro_batch_size, **shard, seed=cfg.run.seed, lengths=lengths)
    ranking_loss = RANKING_LOSSES[cfg.loss.ranking]

    def ranking_terms(batch) -> dict:
        """The micro-batch's summed ranking loss and its RANKING_SUM_KEYS counts, from one forward pass."""
        with autocast(dist, cfg.run.bf16):
            if "seq_lens" in batch:  # packed: one row, no padding
                r = model(batch["input_ids"].to(dist.device), position_ids=batch["position_ids"].to(dist.device),
                          seq_lens=batch["seq_lens"])
            else:  # an empty micro-batch: every rank still runs the forward pass that FSDP's collectives expect
                r = model(batch["input_ids"].to(dist.device), attention_mask=batch["attention_mask"].to(dist.device),
                          right_padded=True)
        scores, sizes = batch["scores"].to(dist.device), batch["group_sizes"]
        return {"loss": ranking_loss(r.float(), scores, sizes, reduction="sum"), **ranking_sums(r, scores, sizes)}

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        sums = dict.fromkeys(("loss", *RANKING_SUM_KEYS), 0.0)
        for idx in ShardedSampler(len(held_out), cfg.optim.micro_batch_size, **shard, shuffle=False):
            for k, v in ranking_terms(collate_ranked(held_out, idx, tok.pad_id)).items():
                sums[k] += float(v)
        model.train()
        totals = dict(zip(sums, all_reduce_sum(list(sums.values()), dist.device)))
        return {"loss": totals["loss"] / max(totals["prompts"], 1), **ranking_metrics_from_sums(totals),
                **{k: int(totals[k]) for k in ("prompts", "pairs", "ties")}}

    trainer = Trainer(cfg, dist, model, sampler=sampler, evaluate=evaluate if held_out is not None else None)
    model.train()
    for step, micro_batches in trainer.steps():
        batches = [collate_ranked(train, idx, tok.pad_id) for idx in micro_batches]
        n_prompts = trainer.global_count(sum(len(b["ids"]) for b in batches))  # the denominator: the step's prompts
        sums = {}  # summed on the device: one host sync per step, after the last backward
        for i, batch in enumerate(batches):
            set_grad_sync(model, i == len(batches) - 1)
            terms = ranking_terms(batch)
            (terms["loss"] / n_prompts * dist.world_size).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double()
        sums = dict(zip(sums, torch.stack(list(sums.values())).tolist()))
        loss_sum = sums.pop("loss")  # the trainer sums it over ranks; the counts are summed here
        totals = dict(zip(sums, all_reduce_sum(list(sums.values()), dist.device)))
        trainer.step(step, losses={"loss": loss_sum}, count=n_prompts, metrics=ranking_metrics_from_sums(totals),
                     tokens=sum(b["input_ids"].numel() for b in batches), ids=[i for b in batches for i in b["ids"]])
    return trainer.finish(tok)


def dpo(cfg: TrainConfig) -> dict:
    """Direct preference optimisation: the policy (run.init_from) trained on chosen/rejected pairs against its
    start, with the loss dpo.loss (rmcore.dpo.DPO_LOSSES) of the pair's response log-probs."""
    dist, tok = setup(cfg)
    load = functools.partial(load_pairs, response_starts=True)  # log-probs sum over the response tokens only
    train, held_out = load_splits(load, cfg, tok, dist, "pairs")
    build = functools.partial(build_model, CausalLM, dist, init_from=cfg.run.init_from, bf16=cfg.run.bf16,
                              seed=cfg.run.seed)
    policy = build(activation_checkpointing=cfg.model.activation_checkpointing, lora=cfg.model.lora)
    settings = {"dist": dist, "bf16": cfg.run.bf16, "micro_batch_size": cfg.optim.micro_batch_size,
                "pad_id": tok.pad_id, "packed": cfg.data.pack_pairs, "progress": cfg.logging.progress}
    # The reference: none (a reference-free loss), log-probs computed once now by the policy before its first
    # step (and stored with the run, so a resumed run reads them), the policy with its LoRA adapters off, or a
    # frozen copy of the start. All give the same numbers (tests/end_to_end/test_dpo.py).
    reference, tables = None, {}
    if cfg.dpo.uses_reference and cfg.dpo.precompute_reference:
        with reference_model(policy, None if cfg.model.lora.enabled else policy) as ref:
            for name, pairs in (("train", train), ("eval", held_out)):
                if pairs is not None:
                    path = Path(cfg.run.out_dir) / f"reference_logps_{name}.pt"
                    tables[name] = load_or_compute_reference(path, ref, pairs, **settings)
    elif cfg.dpo.uses_reference and not cfg.model.lora.enabled:
        reference = frozen(build())
    shard = {"rank": dist.rank, "world_size": dist.world_size}  # this rank's share of every split
    lengths = train.lengths() if cfg.data.group_by_length else None
    sampler = ShardedSampler(len(train), cfg.optim.micro_batch_size, **shard, seed=cfg.run.seed, lengths=lengths)

    def batch_logps(pairs, idx, split):
        """(policy PairLogps, the collated batch) of the pairs idx of a split."""
        batch = collate_pairs(pairs, idx, tok.pad_id, packed=cfg.data.pack_pairs)
        ref_logps = None
        if split in tables:
            ref_logps = table_rows(tables[split], idx)
        elif cfg.dpo.uses_reference:
            with torch.no_grad(), reference_model(policy, reference) as ref:
                ref_logps = sequence_logps(ref, batch, dist, cfg.run.bf16)[0]
        return pair_logps(sequence_logps(policy, batch, dist, cfg.run.bf16), ref_logps)

    def pair_sums(lp) -> dict:
        """Each summed over the batch's pairs, under TRL's names (the loop divides by the global pair count): the
        loss, the implicit rewards β log π/π_ref of each side and their margin, the policy's log-probs, and wins
        (r_c > r_r, a tie is not a win) for rewards/accuracies."""
        r_c, r_r = implicit_rewards(lp, beta=cfg.dpo.beta, uses_reference=cfg.dpo.uses_reference)
        return {"loss": cfg.dpo.loss_terms(lp).sum(), "rewards/chosen": r_c.detach().sum(),
                "rewards/rejected": r_r.detach().sum(), "rewards/margins": (r_c - r_r).detach().sum(),
                "rewards/accuracies": (r_c > r_r).sum().float(), "logps/chosen": lp.chosen.detach().sum(),
                "logps/rejected": lp.rejected.detach().sum()}

    @torch.no_grad()
    def evaluate() -> dict:
        policy.eval()
        sums = {}
        for idx in ShardedSampler(len(held_out), cfg.optim.micro_batch_size, **shard, shuffle=False):
            for k, v in pair_sums(batch_logps(held_out, idx, "eval")).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        policy.train()
        totals = dict(zip(sums, all_reduce_sum(list(sums.values()), dist.device)))
        return {k: v / len(held_out) for k, v in totals.items()} | {"pairs": len(held_out)}

    trainer = Trainer(cfg, dist, policy, sampler=sampler, evaluate=evaluate if held_out is not None else None)
    policy.train()
    for step, micro_batches in trainer.steps():
        n_pairs = trainer.global_count(sum(len(idx) for idx in micro_batches))  # the denominator of the step
        sums = {}  # summed on the device: one host sync per step, after the last backward
        for i, idx in enumerate(micro_batches):
            set_grad_sync(policy, i == len(micro_batches) - 1)
            terms = pair_sums(batch_logps(train, idx, "train"))
            (terms["loss"] / n_pairs * dist.world_size).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        sums = dict(zip(sums, torch.stack(list(sums.values())).tolist()))
        tokens = sum(len(train.chosen[i]) + len(train.rejected[i]) for idx in micro_batches for i in idx)
        # every entry of `losses` is a sum over pairs that the trainer all-reduces and divides by n_pairs: the
        # loss, and the means TRL logs under these names
        trainer.step(step, losses=sums, count=n_pairs, metrics={}, tokens=tokens,
                     ids=[train.ids[i] for idx in micro_batches for i in idx])
    return trainer.finish(tok)


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
