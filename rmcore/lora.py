"""LoRA (Hu et al. 2021) as PEFT does it, file-compatible with PEFT.

A target Linear computes  y = W x + (alpha / r) * B A dropout(x),  W frozen, A (r, in) Kaiming-uniform like PEFT's
default, B (out, r) zero, so step 0 is exactly the base model. The trunk is frozen, only A and B train, and a reward
model's value head trains fully (PEFT's modules_to_save=["score"]). Turning the adapters off gives the base model
back: PPO's and RAFT's reference policy without a second copy of the weights.

Files: `merged_state_dict` folds each update into its W (a plain HF checkpoint); `peft_state_dict` and
`peft_adapter_config` write PEFT's adapter layout (adapter_model.safetensors keys `base_model.model.<module>.lora_A.
weight`, the head as `base_model.model.score.weight`; adapter_config.json), which `peft.PeftModel.from_pretrained`
reads over the transformers base model, and `merge_adapter` reads back into a plain rmcore model.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from rmcore.errors import check_at_least

PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 8          # TRL's reward-modeling guide: r 8, alpha 32, dropout 0.1
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train_head: bool = True  # a reward model's value head trains fully (PEFT: modules_to_save=["score"])
    export: Literal["merged", "adapter"] = "merged"  # a plain HF checkpoint, or PEFT's adapter files over init_from

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)

    def check(self, source: str) -> None:
        check_at_least(self, 1, ("rank",), prefix="model.lora", source=source)


class LoraLinear(nn.Linear):
    """An nn.Linear (no bias) with a low-rank update. `weight` keeps its name, so base checkpoints load unchanged."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, dropout: float,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # p=0 dropout still copies x
        self.scaling = alpha / rank
        self.adapter_enabled = True

    def reset_adapter(self, generator: torch.Generator | None = None):
        """PEFT's default init: A Kaiming-uniform (a = sqrt(5)), B zero."""
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_ with a=sqrt(5) on an (r, in) matrix
        with torch.no_grad():
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()

    def forward(self, x):
        y = F.linear(x, self.weight)
        if not self.adapter_enabled:
            return y
        a = self.lora_A(self.lora_dropout(x))
        # y + scaling * a B^T as one addmm: one (tokens, out) tensor where `y + self.lora_B(a) * scaling` makes three
        return torch.addmm(y.flatten(0, -2), a.flatten(0, -2), self.lora_B.weight.t(), alpha=self.scaling).view_as(y)


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int = 0) -> nn.Module:
    """Swap the target Linears of every block for LoraLinears (sharing their weights), freeze everything else but
    the value head when cfg.train_head. Works on the meta device (FSDP2 builds there); the adapters of a real model
    are initialised from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    found = set()
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, old in list(parent.named_children()):
                if name not in cfg.target_modules or not isinstance(old, nn.Linear):
                    continue
                new = LoraLinear(old.in_features, old.out_features, rank=cfg.rank, alpha=cfg.alpha,
                                 dropout=cfg.dropout, device=old.weight.device, dtype=old.weight.dtype)
                new.weight = old.weight
                if not old.weight.is_meta:
                    new.reset_adapter(generator)
                setattr(parent, name, new)
                found.add(name)
    missing = set(cfg.target_modules) - found
    if missing:
        raise ValueError(f"model.lora.target_modules: no module named {sorted(missing)} in the blocks "
                         f"(LLaMA's are q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name or (cfg.train_head and name.startswith("score.")))
    return model


def lora_modules(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model for the duration of the block (a reference policy without a second copy of the weights)."""
    modules = lora_modules(model)
    for m in modules:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.adapter_enabled = True


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a DTensor counts its full size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ files
def merged_state_dict(state_dict: dict, scaling: float) -> dict:
    """W + scaling * B @ A for each adapted weight, the adapter keys dropped: a plain HF checkpoint's tensors."""
    out = {k: v for k, v in state_dict.items() if ".lora_A." not in k and ".lora_B." not in k}
    for key in state_dict:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            a, b = state_dict[key].float(), state_dict[f"{module}.lora_B.weight"].float()
            w = state_dict[f"{module}.weight"]
            out[f"{module}.weight"] = (w.float() + scaling * b @ a).to(w.dtype)
    return out


def peft_state_dict(state_dict: dict, with_head: bool) -> dict:
    """The adapter in PEFT's file keys: base_model.model.<module>.lora_{A,B}.weight, and the head when it trained."""
    return {PEFT_PREFIX + k: v for k, v in state_dict.items()
            if ".lora_A." in k or ".lora_B." in k or (with_head and k.startswith("score."))}


def peft_adapter_config(cfg: LoraConfig, base: str, task_type: str) -> dict:
    """adapter_config.json as PEFT writes it for LoRA (the fields its loader reads; the rest take PEFT's defaults)."""
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base, "r": cfg.rank,
        "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.target_modules),
        "modules_to_save": ["score"] if task_type == "SEQ_CLS" and cfg.train_head else None, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def merge_adapter(state_dict: dict, adapter: dict, adapter_config: dict, source: str = "adapter") -> dict:
    """A base model's tensors with a PEFT LoRA adapter folded in (and its saved head, if any)."""
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type {adapter_config.get('peft_type')!r}, only LORA adapters are read")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if adapter_config.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ValueError(f"{source}: per-module rank_pattern/alpha_pattern is not supported")
    scaling = adapter_config["lora_alpha"] / adapter_config["r"]
    ours = {}
    for key, t in adapter.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{source}: adapter key {key!r} does not start with {PEFT_PREFIX!r}")
        ours[key.removeprefix(PEFT_PREFIX).replace(".modules_to_save.", ".")] = t
    unknown = [k for k in ours if ".lora_" not in k and k not in state_dict]
    if unknown:
        raise ValueError(f"{source}: adapter keys {unknown[:5]} match no base-model weight")
    missing = [k for k in ours if k.endswith(".lora_A.weight") and k.replace(".lora_A.", ".") not in state_dict]
    if missing:
        raise ValueError(f"{source}: adapted modules {missing[:5]} are not in the base model")
    return merged_state_dict({**state_dict, **ours}, scaling)
