"""The config sections train.py, raft.py and ppo.py read, each with the checks of its own values.

    TrainConfig            run | model | data | optim | loss | dpo | logging  (train.py: tokenizer, sft, rm, dpo)
    RaftTrainConfig        TrainConfig + raft                                 (raft.py)
    PpoTrainConfig         TrainConfig + ppo                                  (ppo.py)

`data` is rmcore.data.datasets.DataConfig, `model.lora` rmcore.lora.LoraConfig and `dpo` rmcore.dpo.DpoConfig,
beside the code that reads them; `model` is the architecture (rmcore.model.ModelConfig) plus how it is trained.
`load_stages` builds the configs of a command line (one, or each file of a chain) and runs every check before
anything is written: a value the types allow but a run cannot use (a zero size, a negative rate, a warmup ratio
above 1) is a ConfigError naming the key.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

from rmcore.config.loader import load_config, load_yaml_file
from rmcore.data.datasets import DataConfig
from rmcore.dpo import DpoConfig
from rmcore.errors import ConfigError, check_at_least
from rmcore.lora import LoraConfig
from rmcore.model import ModelConfig
from rmcore.rl import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, AdvantageEstimator

AdvantageName = Literal[tuple(ADVANTAGE_ESTIMATORS)]
LossAggregationName = Literal[tuple(LOSS_AGGREGATIONS)]


@dataclasses.dataclass
class RunConfig:
    stage: Literal["tokenizer", "sft", "rm", "dpo", "raft", "ppo"] = "rm"  # raft, ppo: raft.py's, ppo.py's runs
    out_dir: str = "runs/default"       # config.yaml, metrics.jsonl, checkpoints/, export/ go here
    init_from: str | None = None        # an HF-format directory (open_llama_3b, an SFT export); None = fresh init
    tokenizer: str | None = None        # tokenizer directory; default: init_from
    tokenizer_vocab_size: int = 8000    # stage tokenizer: vocabulary of the tokenizer it trains
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the device has native bf16, else fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = 0                 # optimizer steps between evaluations; 0 = at the end only
    save_every: int = 0                 # optimizer steps between checkpoints; 0 = none before the end
    keep: int = 2                       # checkpoints kept on disk
    resume: str = "auto"                # auto (latest complete checkpoint, if any) | never | a checkpoint path
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss stops the run, or its batch is skipped and counted
    max_skips_in_a_row: int = 10        # with skip: this many non-finite steps in a row stop the run
    max_skipped_fraction: float = 0.25  # with skip: no export (and a stop) once more than this share of the run's
                                        # steps were skipped: what it learned is not what was asked for
    halt_at_step: int | None = None     # stop after this step as if killed (resume tests and debugging)
    export: bool = True                 # write out_dir/export (HF format + tokenizer) at the end
    host_memory: Literal["release", "keep", "glibc"] = "release"  # CPU, glibc: what freed memory does
                                        # (rmcore.training.runtime.HOST_MEMORY_POLICIES; measured in bench/README.md)

    @property
    def bf16(self) -> bool:
        """Whether the run computes in bf16 (once launch.setup has resolved precision=auto)."""
        return self.precision == "bf16"

    def check(self, source: str) -> None:
        check_at_least(self, 1, ("keep", "max_skips_in_a_row", "tokenizer_vocab_size"), prefix="run", source=source)
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigError(f"{source}: run.max_skipped_fraction={self.max_skipped_fraction}; expected 0 to 1")
        check_at_least(self, 0, ("eval_every", "save_every"), prefix="run", source=source)


@dataclasses.dataclass
class ModelSection(ModelConfig):
    """The `model` section: the architecture of a fresh init (ModelConfig's fields; a loaded model brings its own
    config.json) and how any model is trained, which is never part of its weights."""
    activation_checkpointing: bool = False  # recompute each block in backward: memory for compute
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    def architecture(self, tokenizer) -> ModelConfig:
        """A fresh init's ModelConfig, with the tokenizer's vocabulary and special ids (the two must agree)."""
        shape = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{**shape, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                              "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id})

    def check(self, source: str) -> None:
        check_at_least(self, 0, ("dim", "n_layers"), prefix="model", source=source)
        self.lora.check(source)


@dataclasses.dataclass
class OptimConfig:
    lr: float = 5e-6
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.0           # fraction of the steps spent warming up linearly
    min_lr_ratio: float = 0.0           # decay ends at min_lr_ratio * lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0              # max global grad norm; 0 = no clipping
    epochs: int = 1
    micro_batch_size: int = 8           # per process: pairs (rm) or blocks (sft) per forward
    grad_accum: int = 1                 # micro-batches per optimizer step
    max_steps: int | None = None        # stop early after this many optimizer steps

    def check(self, source: str) -> None:
        check_at_least(self, 1, ("micro_batch_size", "grad_accum", "epochs", "max_steps"), prefix="optim",
                       source=source)
        check_at_least(self, 0, ("lr", "warmup_ratio", "weight_decay", "grad_clip"), prefix="optim", source=source)
        if self.warmup_ratio > 1:
            raise ConfigError(f"{source}: optim.warmup_ratio={self.warmup_ratio}; expected a fraction in [0, 1]")


@dataclasses.dataclass
class LossConfig:
    margin: bool = False                # subtract the data's per-pair margin (Llama 2)
    center_coef: float = 0.0            # reward centering (Eisenstein et al. 2023); TRL recommends 0.01
    # rankings of K responses (a ranked data format): rmcore.losses.RANKING_LOSSES, all_pairs (InstructGPT: the
    # mean Bradley-Terry loss over each prompt's ordered pairs) or plackett_luce (the ranking's likelihood)
    ranking: Literal["all_pairs", "plackett_luce"] = "all_pairs"
    # a length-disentangled reward model (ODIN, Chen et al. 2024; rmcore/odin.py): quality and length heads, the
    # pairwise loss on their sum, plus these terms over each micro-batch's responses; alignment reads quality only
    length_head: bool = False
    length_coef: float = 1.0            # -pearson(r_length, response tokens)
    quality_coef: float = 1.0           # |pearson(r_quality, response tokens)|
    orthogonality_coef: float = 1.0     # |w_quality . w_length|, once per optimizer step

    def check(self, source: str) -> None:
        check_at_least(self, 0, ("center_coef", "length_coef", "quality_coef", "orthogonality_coef"), prefix="loss",
                       source=source)


@dataclasses.dataclass
class LoggingConfig:
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "rmcore"
    run_name: str | None = None
    progress: bool = True               # progress bar on rank 0


@dataclasses.dataclass
class TrainConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)   # rm
    dpo: DpoConfig = dataclasses.field(default_factory=DpoConfig)      # dpo
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def check(self, source: str) -> None:
        """Every section's own checks; `source` (a file, or the command line) opens each message."""
        for section in (self.run, self.model, self.data, self.optim, self.loss, self.dpo):
            section.check(source)
        if self.run.stage == "dpo" and self.run.init_from is None:
            raise ConfigError(f"{source}: run.init_from is not set: DPO trains a policy from its start (an SFT "
                              f"export), which is also its reference")


# ----------------------------------------------------------------------------------------------------------------
# raft.py and ppo.py


@dataclasses.dataclass
class AlignConfig:
    """What raft.py and ppo.py share: the reward, the iterations, the prompts and how responses are sampled."""
    reward: str | list[str] = ""        # a reward model directory or hub id, a reward server's http://host:port
                                        # (eval.py serve), or module:function (prompts, responses) -> rewards;
                                        # a list of them: an ensemble (Coste et al. 2024), combined by
    reward_aggregation: Literal["mean", "min", "mean_minus_std"] = "mean"  # the members' mean, worst case, or
    reward_lambda: float = 1.0          # mean - reward_lambda * std (uncertainty-penalised)
    reward_normalize: bool = False      # apply the statistics `eval.py normalize` stored with the reward model
    reward_head: Literal["quality", "sum"] = "quality"  # of a length-disentangled reward model (ODIN): its quality
                                        # head alone, or quality + length (what its pairwise loss trained)
    gold_reward: str = ""               # a gold judge (Gao et al. 2023), any reward spec: it scores the same samples
                                        # and held-out answers as the reward, logged beside it as gold_*, and never
                                        # enters the loss or the selection; "" = none
    toxicity: str = ""                  # a toxicity scorer (profanity, classifier:<model>[:<label>]): its mean on
                                        # each iteration's samples is logged (RAFT toxicity_*, PPO
                                        # objective/toxicity) and plotted beside reward and KL; like a gold judge it
                                        # never enters the loss or the selection (to train against it, make it the
                                        # reward: reward: -profanity); "" = none
    reward_timeout: float = 60.0        # seconds a reward server (http://...) has for one request before it is
    reward_retries: int = 3             # asked again, this many times (backing off 1, 2, 4 s), then the run stops
    iterations: int = 3
    prompts_per_iter: int = 2048        # across all ranks
    prompt_order: Literal["redraw", "pass"] = "redraw"  # a fresh shuffle of the pool every iteration, or passes
                                        # through the pool, each in a new shuffle (no prompt twice within a pass)
    k: int = 8                          # samples per prompt
    max_prompt_tokens: int = 256        # longer prompts are dropped from the pool and counted
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0                      # 0 = off
    top_p: float = 1.0
    stop_strings: list[str] | None = None  # None: the template's human tag and HH's "Human:" (EOS always stops)
    generation_batch_size: int = 16     # rows sampled at once per rank
    compile_decoding: bool = False      # sample through a torch.compile'd decoding step (one process only): the
                                        # same tokens at 1.15-1.45x the tokens/s on a CPU (bench/README.md,
                                        # generation), after a compile of 45-60 s per graph (seconds once cached)
    eval_prompts: int = 16              # prompts of data.eval answered greedily before each iteration's update and
                                        # after the last one (held_out_reward, held_out_reward_final); 0 = none
    save_every: int = 1                 # iterations between checkpoints (a killed run resumes from the last one);
                                        # the last iteration is always checkpointed
    export_every: int = 1               # iterations between policy exports (out_dir/iterations/); the last one
                                        # is always exported (out_dir/export)
    save_in_background: bool = False    # write checkpoints while the next iteration runs (DCP's async_save): the
                                        # iteration waits only for the copy of the state; costs that copy's memory
    keep_exports: int = 2               # per-iteration policy exports kept on disk
    halt_after_iteration: int | None = None  # stop as if killed after this iteration (resume tests)

    def check(self, source: str, name: str) -> None:
        """name: the section's name, raft or ppo."""
        check_at_least(self, 1, ("iterations", "prompts_per_iter", "k", "max_prompt_tokens", "max_new_tokens",
                                 "generation_batch_size", "keep_exports", "save_every", "export_every"), prefix=name,
                       source=source)
        check_at_least(self, 0, ("top_k", "eval_prompts"), prefix=name, source=source)
        if not self.temperature > 0:
            raise ConfigError(f"{source}: {name}.temperature={self.temperature}: the loop samples from the policy; "
                              f"expected > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{source}: {name}.top_p={self.top_p}: nucleus sampling keeps the tokens whose "
                              f"probability mass reaches top_p; expected 0 < top_p <= 1 (1 = off)")
        if not self.reward:
            raise ConfigError(f"{name}.reward is not set: a reward model directory or hub id, a reward server's "
                              f"http://host:port, or module:function")
        if isinstance(self.reward, list) and len(self.reward) < 2:
            raise ConfigError(f"{source}: {name}.reward={self.reward}: an ensemble needs at least 2 members (one "
                              f"reward is written without brackets)")
        check_at_least(self, 0, ("reward_lambda", "reward_retries"), prefix=name, source=source)
        if not self.reward_timeout > 0:
            raise ConfigError(f"{source}: {name}.reward_timeout={self.reward_timeout}: expected > 0 seconds")
        if self.gold_reward and self.gold_reward in self.reward_specs():
            raise ConfigError(f"{source}: {name}.gold_reward={self.gold_reward!r} is also the reward the loop "
                              f"optimises: a gold judge measures what the proxy misses only if it is another model")

    def reward_specs(self) -> list[str]:
        """Every reward spec named: one, or an ensemble's members."""
        return list(self.reward) if isinstance(self.reward, list) else [self.reward]


def check_alignment_run(cfg: TrainConfig, section: AlignConfig, source: str, name: str) -> None:
    """What raft.py and ppo.py need of the rest of the config: a policy to start from, and no step-based saving
    (they checkpoint after iterations: raft.save_every, ppo.save_every)."""
    section.check(source, name)
    if cfg.run.init_from is None:
        raise ConfigError(f"run.init_from is not set: {name} starts from a policy (an SFT export)")
    if cfg.run.save_every:
        raise ConfigError(f"run.save_every does not apply to {name}.py: it checkpoints after iterations; set "
                          f"{name}.save_every (iterations between checkpoints)")


@dataclasses.dataclass
class RaftConfig(AlignConfig):
    """raft.py: reward-ranked fine-tuning (Dong et al. 2023). The policy is run.init_from; its training set is
    remade every iteration from its own samples, fine-tuned on with the `optim` settings (optim.epochs is the number
    of epochs per iteration) and data.sft_loss_on (default here: `response`, the kept response's tokens).

    Where LMFlow's RaftAligner (the authors' code) differs, and how to get its behaviour:
      - it trains on the whole text, prompt included: data.sft_loss_on=all (ours: the response, which is what the
        reward ranked; the prompt's tokens are the dataset's, not the policy's);
      - it samples one response per prompt and keeps the top alpha of them: raft.k=1, raft.selection=global,
        raft.keep_fraction=alpha (ours: K per prompt and the best of each prompt's K, the paper's local ranking);
      - it draws each iteration's prompts at random with replacement: raft.prompt_order=redraw is the same up to
        repeats within an iteration; raft.prompt_order=pass walks once through a shuffled pool instead;
      - it has no discard rules: raft.discard=[] (ours leave empty, truncated and turn-writing samples out of the
        ranking, in both selection modes)."""
    selection: Literal["local", "global"] = "local"  # best of each prompt's K, or the top keep_fraction of the batch
    keep_fraction: float | None = None  # global selection: the share of samples kept (None: 1/K, one per prompt)
    discard: list[Literal["empty", "truncated", "tag"]] = dataclasses.field(
        default_factory=lambda: ["empty", "truncated", "tag"])  # samples left out of ranking, each reason counted
    reset_optimizer: bool = False       # a fresh AdamW state each iteration (the reference keeps it)
    max_empty_iterations: int = 2       # stop after this many iterations in a row that keep no sample

    def check(self, source: str, name: str = "raft") -> None:
        super().check(source, name)
        check_at_least(self, 1, ("max_empty_iterations",), prefix=name, source=source)
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"{source}: raft.keep_fraction={self.keep_fraction}; expected 0 < keep_fraction <= 1")
        if self.keep_fraction is not None and self.selection != "global":
            raise ConfigError(f"{source}: raft.keep_fraction applies to raft.selection=global (local keeps the best "
                              f"of each prompt's K)")


@dataclasses.dataclass
class RaftTrainConfig(TrainConfig):
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(sft_loss_on="response"))
    raft: RaftConfig = dataclasses.field(default_factory=RaftConfig)

    def check(self, source: str) -> None:
        super().check(source)
        check_alignment_run(self, self.raft, source, "raft")


@dataclasses.dataclass
class PpoConfig(AlignConfig):
    """ppo.py: PPO (and the critic-free RLOO / GRPO) on the policy run.init_from. Each iteration samples
    prompts_per_iter x k responses; optim.epochs passes of shuffled minibatches of optim.micro_batch_size x
    optim.grad_accum samples per rank follow, one optimizer step each. Each default says whose it is: TRL's
    PPOConfig (1.16, or its RLOO/GRPO configs), a paper's, or ours. "default" picks the estimator's paper
    (rmcore.rl.ADVANTAGE_ESTIMATORS): gae as TRL's PPO, rloo as its paper and TRL's RLOO, grpo as its paper."""
    k: int = 1                          # samples per prompt (rloo and grpo need >= 2); TRL's PPO: 1
    prompts_per_iter: int = 64          # ours (TRL's batch is per_device_train_batch_size x accumulation x devices)
    advantage: AdvantageName = "gae"    # a name of rmcore.rl.ADVANTAGE_ESTIMATORS; TRL's PPO: gae
    critic: str = "reward"              # gae: `reward` (a copy of the reward model, as TRL), `policy` (the policy's
                                        # trunk + a fresh value head) or a reward-model directory or hub id
    kl_in: Literal["default", "reward", "loss"] = "default"  # where the KL penalty goes: -beta * kl_t in the
                                        # per-token rewards (Ziegler et al.; RLOO) or beta * k3_t added to the
                                        # per-token loss (GRPO, Shao et al. 2024); default: the estimator's paper
    kl_estimator: Literal["k1", "k3"] = "k1"  # the KL in the reward; TRL's (the loss form is always k3, as GRPO)
    beta: float = 0.05                  # KL coefficient (its start, when adaptive); TRL's PPO and RLOO
    adaptive_kl: bool = False           # Ziegler et al.'s controller towards kl_target; TRL: off
    kl_target: float = 6.0              # Ziegler et al.'s
    kl_horizon: int = 10000             # Ziegler et al.'s
    missing_eos_penalty: float | None = None  # subtracted from the score of a response cut at max_new_tokens; TRL's
    score_clip: float | None = None     # scores clipped to [-score_clip, score_clip]; ours (off)
    whiten_rewards: bool = False        # per-token rewards whitened over real tokens, mean shifted back; TRL's
    whiten_advantages: Literal["default", "tokens", "samples", "none"] = "default"  # over every rank's real tokens
                                        # (TRL's PPO), over samples (one advantage per response), or not at all
                                        # (RLOO and GRPO as published); default: the estimator's paper
    scale_rewards: Literal["group", "none"] = "group"  # grpo: divide by the group's std (GRPO; TRL's default) or
                                        # not (Dr. GRPO, Liu et al. 2025)
    loss_aggregation: LossAggregationName = "token_mean"  # rmcore.rl.LOSS_AGGREGATIONS: token_mean (DAPO; TRL's
                                        # default), sequence_mean (the GRPO paper's), constant (Dr. GRPO)
    importance_ratio: Literal["token", "sequence"] = "token"  # one ratio per token (PPO), or one per response,
                                        # exp(sum logp - sum logp_old), clipped per response (TRL's RLOO)
    old_logprobs: Literal["auto", "sampler", "forward"] = "auto"  # the rollout's log-probs for the ratio: the
                                        # sampler's, or a forward pass's (TRL's); auto: sampler in fp32, forward in
                                        # bf16 (ppo.old_logprobs_source)
    minibatch_order: Literal["samples", "prompts"] = "samples"  # each epoch (rmcore.align.rollouts.EPOCH_ORDERS):
                                        # every sample shuffled (TRL's), or the prompts shuffled and each one's K
                                        # samples kept together (ours): a minibatch of whole groups runs each
                                        # prompt once on a CPU, where its rows are packed
    gamma: float = 1.0                  # TRL's
    lam: float = 0.95                   # TRL's
    clip: float = 0.2                   # policy ratio clip; TRL's
    clip_value: float = 0.2             # value clip around the rollout's values; TRL's
    value_coef: float = 0.1             # TRL's
    entropy_coef: float = 0.0           # TRL's PPO has no entropy bonus

    def estimator(self) -> AdvantageEstimator:
        return ADVANTAGE_ESTIMATORS[self.advantage]

    def kl_placement(self) -> str:
        """reward or loss: kl_in, or the estimator's paper's."""
        return self.estimator().kl_in if self.kl_in == "default" else self.kl_in

    def advantage_whitening(self) -> str:
        """tokens, samples or none: whiten_advantages, or the estimator's paper's."""
        return self.estimator().whiten if self.whiten_advantages == "default" else self.whiten_advantages

    def check(self, source: str, name: str = "ppo") -> None:
        super().check(source, name)
        check_at_least(self, 1, ("kl_target", "kl_horizon"), prefix=name, source=source)
        check_at_least(self, 0, ("beta", "missing_eos_penalty", "score_clip", "gamma", "lam", "clip", "clip_value",
                                 "value_coef", "entropy_coef"), prefix=name, source=source)
        if self.estimator().per_group and self.k < 2:
            raise ConfigError(f"ppo.advantage={self.advantage} compares the K samples of a prompt: ppo.k={self.k}, "
                              f"expected >= 2")
        if self.scale_rewards != "group" and self.advantage != "grpo":
            raise ConfigError(f"{source}: ppo.scale_rewards={self.scale_rewards} applies to ppo.advantage=grpo")
        if self.whiten_advantages == "samples" and not self.estimator().per_group:
            raise ConfigError(f"{source}: ppo.whiten_advantages=samples needs one advantage per response (rloo, grpo); "
                              f"{self.advantage}'s differ per token")
        if self.importance_ratio == "sequence" and (self.kl_placement() == "loss" or self.estimator().needs_critic):
            raise ConfigError(f"{source}: ppo.importance_ratio=sequence (TRL's RLOO) needs one advantage per response "
                              f"and the KL in the reward: use it with rloo or grpo and ppo.kl_in=reward")


@dataclasses.dataclass
class PpoTrainConfig(TrainConfig):
    # LoRA without dropout: the update must read the log-probs the rollout read
    model: ModelSection = dataclasses.field(default_factory=lambda: ModelSection(lora=LoraConfig(dropout=0.0)))
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(epochs=4, lr=1e-6, schedule="constant"))
    ppo: PpoConfig = dataclasses.field(default_factory=PpoConfig)

    def check(self, source: str) -> None:
        super().check(source)
        check_alignment_run(self, self.ppo, source, "ppo")
        if self.model.lora.enabled and self.model.lora.dropout:
            raise ConfigError(f"model.lora.dropout={self.model.lora.dropout}: PPO's update must read the log-probs "
                              "the rollout read (no dropout, Huang et al. 2024); set model.lora.dropout=0")


def load_stages(path: str | None, overrides: list[str] | tuple[str, ...] = (), cls: type = TrainConfig) -> list:
    """The configs to run, each checked: one, or each file of a chain (`chain: [a.yaml, b.yaml]`, paths relative to
    the chain file), every one with the same command-line overrides."""
    if path is not None:
        data = load_yaml_file(path) or {}
        if isinstance(data, dict) and "chain" in data:
            if set(data) != {"chain"} or not isinstance(data["chain"], list):
                raise ConfigError(f"{path}: a chain file holds only `chain: [stage.yaml, ...]`")
            here = os.path.dirname(path)
            stages = [load_config(cls, os.path.join(here, p), overrides) for p in data["chain"]]
            for cfg, p in zip(stages, data["chain"]):
                cfg.check(os.path.join(here, p))
            return stages
    cfg = load_config(cls, path, overrides)
    cfg.check(path or "the command line")
    return [cfg]
