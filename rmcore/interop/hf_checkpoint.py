"""Checkpoints in HF LLaMA format: config.json + model.safetensors, sharded safetensors with an index, or
pytorch_model.bin (sharded or not). What rmcore saves, transformers loads as LlamaForCausalLM or
LlamaForSequenceClassification, and the other way round.

Loading builds the model on the meta device and assigns the checkpoint's tensors shard by shard, so a model
is never materialised twice (a random init followed by a copy) and peak memory is the model plus one shard.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rmcore.errors import CheckpointError, HubError
from rmcore.interop.hub import resolve_model
from rmcore.lora import LoraConfig, merge_adapter, merged_state_dict, peft_adapter_config, peft_state_dict
from rmcore.model import REWARD_HEAD_NAMES, ModelConfig, RewardModel

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names

# Old LLaMA .bin checkpoints (open_llama_3b among them) store each layer's RoPE table; rmcore recomputes it.
IGNORED_CHECKPOINT_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_to_rmcore_key(key: str) -> str:
    """The key map. rmcore's modules carry HF LLaMA's names (model.layers.N.self_attn.q_proj.weight, lm_head.weight,
    score.weight), so the map is the identity; it stays a function so another naming is a one-line change."""
    return key


def rmcore_to_hf_key(key: str) -> str:
    return key


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """The architecture an HF LLaMA config.json describes; what rmcore cannot run is an error naming source."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r}, expected 'llama'")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported, "
                         "only the default (unscaled) RoPE")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        raise ValueError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported")
    pad = hf.get("pad_token_id")
    eos = hf.get("eos_token_id", 2)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        bos_id=hf.get("bos_token_id", 1),
        eos_id=eos[0] if isinstance(eos, list) else eos,
        # OpenLLaMA ships no pad token; unk (0) is its HF pad and is distinct from EOS
        pad_id=0 if pad is None else pad,
        # HF keeps a classifier's label count as id2label; a causal LM's labels mean nothing
        reward_heads=(len(hf.get("id2label") or {0: ""})
                      if RewardModel.hf_architecture in hf.get("architectures", []) else 1),
    )

def config_to_hf(cfg: ModelConfig, architecture: str) -> dict:
    """The HF LLaMA config.json of an architecture, for `architecture` (LlamaForCausalLM, ...)."""
    return {
        "architectures": [architecture],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "pad_token_id": cfg.pad_id,
    }


def read_hf_config(path: Path) -> dict:
    """config.json of an HF-format directory; every reader of a model's config comes here, so a folder without one
    is reported the same way everywhere."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such directory (expected an HF-format model directory or a hub id)")
        files = sorted(p.name for p in path.iterdir())
        raise CheckpointError(f"{path}: an incomplete export: no config.json (holds {', '.join(files[:6]) or 'nothing'}"
                              f"{' ...' if len(files) > 6 else ''}); a write that was interrupted, or not an HF-format "
                              f"model directory")
    try:
        return json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: malformed JSON ({e}); expected an HF model config") from None


def adapter_base(adapter_dir: Path) -> Path:
    """The base model directory an adapter directory names (adapter_config.json's base_model_name_or_path), checked
    here so that a base that moved is reported with where its path came from."""
    base = read_adapter(adapter_dir)[0]["base_model_name_or_path"]
    where = f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path={base!r}"
    try:
        path = resolve_model(base)
    except HubError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if not path.is_dir():
        raise CheckpointError(f"{where} is not a directory (moved or deleted?) nor a hub id: point it at the base "
                              f"model the adapter was trained on")
    try:
        read_hf_config(path)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return path


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files, in the order its format prefers: safetensors before .bin."""
    for index_name, single_name in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        if (path / index_name).is_file():
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
        if (path / single_name).is_file():
            return [path / single_name]
    raise CheckpointError(f"{path}: no weights found; looked for {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE}, "
                          f"{BIN_INDEX}")


def iter_shard(file: Path):
    """(key, tensor) pairs of one weight file, one tensor in memory at a time for safetensors."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            yield from torch.load(file, map_location="cpu", mmap=True, weights_only=True).items()
    except Exception as e:  # safetensors' SafetensorError, pickle/zip errors: a corrupt or truncated file
        raise CheckpointError(f"{file}: unreadable weights ({type(e).__name__}: {str(e)[:200]}); the file is "
                              f"corrupt or truncated") from None


def load_pretrained(cls, path, *, dtype: torch.dtype | None = None, device="cpu", new_head: bool = False,
                    adapter: str | Path | None = None, reward_heads: int | None = None):
    """Build `cls` (CausalLM or RewardModel) from an HF-format directory.

    path: an HF-format directory, or a Hugging Face Hub id (org/name[@revision], rmcore/interop/hub.py).
    dtype: parameter dtype (default float32, the training master precision). For a RewardModel, a checkpoint
    without `score.weight` is an error unless `new_head=True`, which starts a fresh value head (std 1/sqrt(dim+1))
    and ignores the checkpoint's lm_head -- the SFT-model-to-reward-model step, said out loud.
    reward_heads: a RewardModel's head count (2: length-disentangled): what a new head gets, what a loaded head must
    have (an error otherwise); None: the checkpoint's.
    adapter: a PEFT LoRA adapter directory (PEFT's or rmcore's) folded into the weights, with its saved head. A
    `path` that is itself an adapter directory loads its base_model_name_or_path with it.
    """

    path = resolve_model(path)  # a local directory, or a hub id fetched into the HF cache
    if adapter is None and (path / ADAPTER_CONFIG).is_file():
        adapter, path = path, adapter_base(path)
    if adapter is not None:
        adapter_cfg, adapter_tensors = read_adapter(Path(adapter))
        has_head = any(k.endswith("score.weight") for k in adapter_tensors)
        model = load_pretrained(cls, path, dtype=dtype, device=device,
                                new_head=new_head or (cls is RewardModel and has_head), reward_heads=reward_heads)
        try:
            merged = merge_adapter(model.state_dict(), adapter_tensors, adapter_cfg, str(adapter))
        except ValueError as e:
            raise CheckpointError(f"{e} (base model {path})") from None
        model.load_state_dict({k: v.to(device) for k, v in merged.items()}, strict=True)
        return model
    cfg = with_reward_heads(config_from_hf(read_hf_config(path), source=str(path / "config.json")), cls,
                            reward_heads, new_head=new_head, source=str(path))
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = cls(cfg)
    expected = dict(model.state_dict(keep_vars=True))
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)  # shares model.embed_tokens.weight
    optional = set()
    if isinstance(model, RewardModel) and new_head:
        optional.add("score.weight")

    loaded, unexpected, mismatched = set(), [], []
    for file in weight_files(path):
        shard = {}
        for hf_key, tensor in iter_shard(file):
            key = hf_to_rmcore_key(hf_key)
            if key not in expected:
                if IGNORED_CHECKPOINT_KEYS.fullmatch(hf_key) or (cfg.tie_embeddings and key == "lm_head.weight"):
                    continue
                if new_head and key == "lm_head.weight":
                    continue
                unexpected.append(hf_key)
                continue
            if tuple(tensor.shape) != tuple(expected[key].shape):
                mismatched.append(f"{hf_key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key].shape)}")
                continue
            # the value head stays fp32 whatever dtype the trunk is loaded in (RewardModel.forward says why)
            shard[key] = tensor.to(device=device, dtype=torch.float32 if key == "score.weight" and dtype else dtype)
        model.load_state_dict(shard, strict=False, assign=True)
        loaded.update(shard)
        del shard

    missing = sorted(set(expected) - loaded - optional)
    if missing or unexpected or mismatched:
        hint = ""
        if "score.weight" in missing:
            hint = ("\n  (no value head in this checkpoint: to start a reward model from a language model, "
                    "pass new_head=True)")
        raise CheckpointError(f"{path}: checkpoint does not match {cls.__name__}\n"
                              f"  missing keys: {missing}\n  unexpected keys: {sorted(unexpected)}\n"
                              f"  shape mismatches: {mismatched}{hint}")
    if cfg.tie_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.reset_buffers(device=torch.device(device))
    if isinstance(model, RewardModel) and "score.weight" not in loaded:
        model.score.to_empty(device=device)
        model.score.float()
        model.init_head()
    return model


def with_reward_heads(cfg: ModelConfig, cls, reward_heads: int | None, *, new_head: bool, source: str) -> ModelConfig:
    """cfg with a new value head's count; a loaded head's count checked against the one asked for."""
    if reward_heads is None or cls is not RewardModel or reward_heads == cfg.reward_heads:
        return cfg
    if new_head:
        return dataclasses.replace(cfg, reward_heads=reward_heads)
    raise CheckpointError(f"{source}: a reward model with {cfg.reward_heads} value head(s), and {reward_heads} were "
                          f"asked for (2 = quality and length, loss.length_head): start from a model without a value "
                          f"head, or set loss.length_head to match")


def save_pretrained(model, path, *, state_dict: dict | None = None, max_shard_bytes: int = 5 * 2**30,
                    safe_serialization: bool = True, dtype: torch.dtype | None = None,
                    extra_config: dict | None = None):
    """Write config.json and the weights in HF layout, sharded (with an index) above `max_shard_bytes`.

    state_dict: full (unsharded) tensors to write instead of the model's own -- what an FSDP run gathers.
    extra_config: more config.json fields (e.g. reward normalisation statistics); transformers keeps them.
    """

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state_dict = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for key, t in state_dict.items():
        if cfg.tie_embeddings and key == "lm_head.weight":
            continue  # tied to the embedding; safetensors refuses shared storage and HF re-ties on load
        t = t.detach().to("cpu")
        tensors[rmcore_to_hf_key(key)] = (t.to(dtype) if dtype and t.is_floating_point() else t).contiguous()

    hf = hf_config(model, next(iter(tensors.values())).dtype, extra_config)

    shards, current, size = [], {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)

    ext = "safetensors" if safe_serialization else "bin"
    prefix = "model" if safe_serialization else "pytorch_model"
    remove_weights(path)
    names = ([f"{prefix}.{ext}"] if len(shards) == 1 else
             [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        if safe_serialization:
            save_file(shard, str(path / name), metadata={"format": "pt"})
        else:
            torch.save(shard, path / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
        (path / (SAFE_INDEX if safe_serialization else BIN_INDEX)).write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(hf, indent=2))


def hf_config(model, dtype: torch.dtype, extra_config: dict | None = None) -> dict:
    hf = config_to_hf(model.cfg, model.hf_architecture)
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    if isinstance(model, RewardModel):
        # HF's default name for one label; a length-disentangled model's heads by name
        names = REWARD_HEAD_NAMES[model.cfg.reward_heads] if model.cfg.reward_heads > 1 else ("LABEL_0",)
        hf.update(num_labels=len(names), id2label={str(i): n for i, n in enumerate(names)},
                  label2id={n: i for i, n in enumerate(names)})
    hf.update(extra_config or {})
    return hf


def remove_weights(path: Path):
    """A previous export's weights (shards, index, adapter) would be picked up by a loader."""
    for stale in list(path.glob("model*.safetensors")) + list(path.glob("pytorch_model*.bin")) + \
            [path / SAFE_INDEX, path / BIN_INDEX, path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS]:
        stale.unlink(missing_ok=True)


def save_merged(model, path, state_dict: dict, lora: LoraConfig, extra_config: dict | None = None):
    """A LoRA-trained model as a plain HF checkpoint: each update folded into its weight."""
    save_pretrained(model, path, state_dict=merged_state_dict(state_dict, lora.alpha / lora.rank),
                    extra_config=extra_config)


def save_adapter(model, path, state_dict: dict, *, lora: LoraConfig, base: str | Path,
                 extra_config: dict | None = None):
    """The adapter in PEFT's layout over `base` (what peft.PeftModel.from_pretrained reads: task SEQ_CLS with the
    head under modules_to_save, or CAUSAL_LM), plus config.json (the architecture and rmcore's record of the run)
    for rmcore's readers."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_weights(path)
    task = "SEQ_CLS" if isinstance(model, RewardModel) else "CAUSAL_LM"
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in
               peft_state_dict(state_dict, with_head=task == "SEQ_CLS" and lora.train_head).items()}
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    # a local base is recorded by its absolute path; a hub id (org/name) as it is, as PEFT records it
    base_name = str(Path(base).resolve()) if Path(base).exists() else str(base)
    config = peft_adapter_config(lora, base_name, task)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    (path / "config.json").write_text(json.dumps(hf_config(model, torch.float32, extra_config), indent=2))


def read_adapter(path: Path) -> tuple[dict, dict]:
    """(adapter_config.json, adapter tensors) of a PEFT adapter directory."""
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: not a readable adapter config ({e})") from None
    files = [path / ADAPTER_WEIGHTS] if (path / ADAPTER_WEIGHTS).is_file() else [path / "adapter_model.bin"]
    if not files[0].is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS} (or adapter_model.bin) next to {ADAPTER_CONFIG}")
    if "base_model_name_or_path" not in config:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path, the model the adapter applies to")
    return config, dict(iter_shard(files[0]))

