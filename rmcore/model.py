"""The model: an OpenLLaMA-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) and two heads.

Module names follow HF LLaMA (`model.layers.0.self_attn.q_proj`, ...) so a checkpoint's keys are this file's
parameter names; `rmcore/interop/hf_checkpoint.py` holds the explicit map and the checks.

    Transformer    token ids -> final hidden states (B, T, dim)
    CausalLM       Transformer + lm_head          -> logits (B, T, vocab)
    RewardModel    Transformer + score (dim -> 1) -> one reward per sequence (B,), read at the last real token;
                   a length-disentangled one (ODIN) has two heads (dim -> 2): quality and length

Masks: `attention_mask` (B, T) is 1 on real tokens and 0 on padding, on either side. `position_ids` default to
the count of real tokens before each position, so left padding gets the same positions as no padding. A boolean
`attn_mask` (B, 1, T, S), True = may attend, replaces the causal+padding mask (block-diagonal masks for packed
documents). A `KVCache` per layer makes generation incremental (see `rmcore/generate.py`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rmcore.lean_ops import rms_norm, swiglu

# a reward model's heads by count, in column order of `score`: one reward, or ODIN's (Chen et al. 2024) quality and
# length heads, whose sum is what the pairwise loss trains and whose quality head alone is what alignment reads
REWARD_HEAD_NAMES = {1: ("reward",), 2: ("quality", "length")}


@dataclass
class ModelConfig:
    """The architecture: what config.json records. How a model is trained (LoRA, activation checkpointing) is the
    training config's `model` section (rmcore.config.sections.ModelSection), never part of the weights."""
    vocab_size: int = 32000
    dim: int = 3200
    n_layers: int = 26
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (multi-head); fewer = grouped-query attention
    ffn_dim: int = 8640
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # token ids travel with the model so a saved directory is self-describing
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    # a reward model's value heads: 1, or 2 for a length-disentangled one (ODIN: REWARD_HEAD_NAMES); HF's num_labels
    reward_heads: int = 1

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.reward_heads not in REWARD_HEAD_NAMES:
            raise ValueError(f"reward_heads={self.reward_heads}: expected one of {sorted(REWARD_HEAD_NAMES)}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim} must divide by n_heads {self.n_heads}, "
                             f"and n_heads by n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# ---------------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 and scale in the input dtype, as HF LLaMA does (bit-level parity in bf16); the
        # backward keeps x and the scale only (rmcore/lean_ops.py)
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    even = torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32)
    return 1.0 / (cfg.rope_theta ** (even / cfg.head_dim))


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, head_dim) for arbitrary per-row positions (left padding, packed documents)."""
    angles = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # HF convention: the two halves of the head share a frequency
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, head_dim); rotate the pair (x[i], x[i + head_dim/2]) -- HF's rotate_half, not interleaved
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache(nn.Module):
    """Preallocated keys and values for one layer; slot s of every row holds the token at column s (gpt-fast)."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, *, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # under autocast RoPE leaves k in fp32; the cache keeps the compute dtype
        self.k[:, :, slots] = k.to(self.k.dtype)
        self.v[:, :, slots] = v.to(self.v.dtype)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, attn_mask, *, cache_slots=None, packing=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(cache_slots, k, v)
            if attn_mask is not None:  # attend over the columns the mask covers (a prefill: the prompt's only)
                k, v = k[:, :, :attn_mask.shape[-1]], v[:, :, :attn_mask.shape[-1]]
        gqa = self.n_kv_heads != self.n_heads
        if T == 1 and self.kv_cache is not None and x.device.type == "cpu" and q.dtype == torch.bfloat16:
            y = one_query_attention(q, k, v, attn_mask)
        elif packing is not None:  # packed segments: causal within each, plus its shared prompt's (Packing)
            y = packed_attention(q, k, v, packing, gqa=gqa)
        else:  # attn_mask None means "plain causal, no padding": SDPA then picks its fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                               enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def one_query_attention(q, k, v, attn_mask=None):
    """softmax(q k^T / sqrt(d), masked) v for one query per row (a decoding step), query heads grouped over their
    key head by a reshape, scores and softmax in fp32, probabilities in v's dtype as HF's eager attention. On a CPU
    in bf16, torch's SDPA takes 3-4x as long for one query (bench/README.md, generation)."""
    B, H, _, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    scores = (q.reshape(B, kv_heads, H // kv_heads, D) @ k.transpose(-1, -2)).float() * D ** -0.5
    if attn_mask is not None:  # (B, 1, 1, S) True = may attend
        scores = scores.masked_fill(~attn_mask.view(B, 1, 1, S), float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).reshape(B, H, 1, D)


@dataclass(frozen=True)
class Packing:
    """One row of segments end to end: segment i holds `lengths[i]` tokens and continues the segments `prefixes[i]`
    (their indices, first to last; empty: it starts a sequence). A segment attends causally to itself and fully to its
    prefixes, so sequences sharing a prompt hold it once. `masks[i]`: the bool mask of a segment with prefixes
    (queries x prefix and own keys), None for one without."""
    lengths: tuple[int, ...]
    prefixes: tuple[tuple[int, ...], ...]
    masks: tuple[torch.Tensor | None, ...]

    @classmethod
    def build(cls, seq_lens: tuple[int, ...], continues: tuple[int, ...] | None = None, device=None) -> Packing:
        """seq_lens: each segment's tokens in row order; continues[i]: the segment that segment i continues, or -1
        (None: every segment starts a sequence)."""
        continues = continues or (-1,) * len(seq_lens)
        if len(continues) != len(seq_lens):
            raise ValueError(f"continues has {len(continues)} entries for {len(seq_lens)} segments")
        prefixes, masks = [], []
        for i, n in enumerate(seq_lens):
            chain, j = [], continues[i]
            while j != -1:
                if j == i or len(chain) == len(seq_lens):
                    raise ValueError(f"continues={continues}: segment {i}'s prefixes form a loop")
                chain.insert(0, j)
                j = continues[j]
            before = sum(seq_lens[j] for j in chain)
            prefixes.append(tuple(chain))
            # query t of the segment sees every prefix key and its own keys up to t
            masks.append(torch.ones(n, before + n, dtype=torch.bool, device=device).tril(before) if chain else None)
        return cls(tuple(seq_lens), tuple(prefixes), tuple(masks))


def sequence_ends(seq_lens: tuple[int, ...], continues: tuple[int, ...] | None = None) -> list[int]:
    """The last column of each sequence in a packed row: that of each segment no other continues, in row order."""
    continued = set(continues or ())
    ends = torch.tensor(seq_lens, dtype=torch.long).cumsum(0).tolist()
    return [end - 1 for i, end in enumerate(ends) if i not in continued]


def packed_attention(q, k, v, packing: Packing, *, gqa: bool):
    """SDPA per segment of a packed row (B = 1): its queries over its prefixes' keys and its own, causal within."""
    # one split of each tensor into its segments, not a slice per segment: a slice's backward writes a zero tensor
    # the size of the whole row, per segment and layer (~5% of a reward-model run at 135M, bench/README.md)
    qs, ks, vs = (t.split(packing.lengths, 2) for t in (q, k, v))
    out = []
    for i, (chain, mask) in enumerate(zip(packing.prefixes, packing.masks)):
        keys, values = ks[i], vs[i]
        if chain:
            keys = torch.cat([ks[j] for j in chain] + [keys], 2)
            values = torch.cat([vs[j] for j in chain] + [values], 2)
        out.append(F.scaled_dot_product_attention(qs[i], keys, values, attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=gqa))
    return torch.cat(out, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # its backward keeps gate and up only


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, *, cache_slots=None, packing=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache_slots=cache_slots, packing=packing)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------------- trunk
def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position = number of real tokens before this one, so a left-padded row counts from 0 at its first token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padding_attn_mask(attention_mask: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """(B, 1, Tq, S) bool: query at slot i sees real keys at slots <= i; every query also sees itself, so a
    padding row is never fully masked (SDPA would return NaN there); padding outputs are never read."""
    S = attention_mask.shape[-1]
    key_slots = torch.arange(S, device=attention_mask.device)
    causal = query_slots[:, None] >= key_slots[None, :]  # (Tq, S)
    mask = causal[None] & attention_mask.bool()[:, None, :]  # (B, Tq, S)
    mask = mask | (query_slots[:, None] == key_slots[None, :])[None]
    return mask[:, None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.activation_checkpointing = False  # recompute each block in backward: memory for compute (a way to train)

    def forward(self, input_ids, attention_mask=None, *, position_ids=None, attn_mask=None, cache_slots=None,
                seq_lens=None, continues=None):
        """Final hidden states (B, T, dim). With a KV cache, `cache_slots` (T,) are the cache columns written.
        seq_lens: one row holding several sequences end to end (lengths summing to T, position_ids restarting at
        each): attention stays within each sequence, so no padding and no mask are needed. continues (one entry per
        seq_lens entry): segment i continues segment continues[i] (-1: none), whose tokens are its prompt, shared
        with the other segments that continue it; position_ids then go on from the prompt's (Packing)."""
        if position_ids is None:
            position_ids = (default_position_ids(attention_mask) if attention_mask is not None
                            else torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids))
        if attn_mask is None and attention_mask is not None:
            slots = (cache_slots if cache_slots is not None
                     else torch.arange(input_ids.shape[1], device=input_ids.device))
            attn_mask = padding_attn_mask(attention_mask, slots)
        packing = Packing.build(seq_lens, continues, device=input_ids.device) if seq_lens is not None else None
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, attn_mask, cache_slots=cache_slots, packing=packing,
                               use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cache_slots=cache_slots, packing=packing)
        return self.norm(x)

    @torch.no_grad()
    def reset_buffers(self, device=None):
        """Recompute non-persistent buffers, which a meta-device build leaves empty."""
        self.inv_freq = rope_inv_freq(self.cfg, device=device or self.embed_tokens.weight.device)


def init_linear(module: nn.Linear, std: float):
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class _Pretrained(nn.Module):
    """What both heads share: weight init. HF-format loading and saving: rmcore.interop.hf_checkpoint's
    load_pretrained / save_pretrained (that module imports this one, never the other way round)."""

    hf_architecture: str

    def init_weights(self, std: float = 0.02):
        # HF LLaMA's init (normal 0.02, norms 1) so a fresh rmcore model and a fresh HF model are alike
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module, std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.model.reset_buffers()


class CausalLM(_Pretrained):
    hf_architecture = "LlamaForCausalLM"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, *, position_ids=None, attn_mask=None, cache_slots=None,
                keep_last: int | None = None, logits_at: torch.Tensor | None = None,
                seq_lens: tuple[int, ...] | None = None, continues: tuple[int, ...] | None = None):
        """Logits (B, T, vocab); with keep_last, those of the last keep_last positions only; with logits_at, those of
        the positions it names, (n, vocab): a (B, T) bool mask (row-major order) or (n,) indices into the flattened
        B x T positions (repeats allowed). The head (vocab x dim per token) over positions nobody reads is wasted
        work. seq_lens, continues: one packed row of several sequences (Transformer.forward)."""
        h = self.model(input_ids, attention_mask, position_ids=position_ids, attn_mask=attn_mask,
                       cache_slots=cache_slots, seq_lens=seq_lens, continues=continues)
        if logits_at is not None:
            return self.lm_head(h.flatten(0, 1)[logits_at.flatten()])
        return self.lm_head(h if keep_last is None else h[:, -keep_last:])


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token of each row: the largest index with mask 1, whatever the padding side.
    Computed from the mask, never from token ids, so PAD == EOS cannot move it."""
    T = attention_mask.shape[-1]
    cols = torch.arange(T, device=attention_mask.device)
    return torch.where(attention_mask.bool(), cols, -1).amax(-1)


class RewardModel(_Pretrained):
    """Trunk + value head. The reward of a sequence is the head applied to the hidden state of its last real
    token: with right padding that is column len-1, with left padding column T-1; both are found from
    `attention_mask`. Without a mask every row is taken as unpadded (column T-1).

    The head has no bias: a constant added to every reward cancels in r_chosen - r_rejected, so it would get
    no gradient from the pairwise loss, and HF's LlamaForSequenceClassification (`score.weight`) has none.
    """

    hf_architecture = "LlamaForSequenceClassification"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Transformer(cfg)
        self.score = nn.Linear(cfg.dim, cfg.reward_heads, bias=False)

    def init_weights(self, std: float = 0.02):
        super().init_weights(std)
        self.init_head()

    def init_head(self):
        init_linear(self.score, 1.0 / math.sqrt(self.cfg.dim + 1))

    def forward(self, input_ids, attention_mask=None, *, position_ids=None, attn_mask=None, every_token: bool = False,
                right_padded: bool = False, seq_lens: tuple[int, ...] | None = None,
                continues: tuple[int, ...] | None = None, per_head: bool = False):
        """Rewards (B,), fp32 whatever the trunk's precision: the sum of the heads (one head: its reward); with
        per_head, each head's (B, reward_heads). With every_token, the sum at every position (B, T): the values a PPO
        critic reads. right_padded: the caller's promise that every row is its real tokens then
        padding; the trunk then runs plain causal attention (exact: no real token sees a later position) with no
        (B, 1, T, T) mask, and the last real token is read at sum(mask) - 1 without a host-device sync.
        seq_lens (and continues): one packed row of several sequences (Transformer.forward); one reward per sequence,
        read at the last token of each segment that no other continues, in row order."""
        h = self.model(input_ids, None if right_padded else attention_mask, position_ids=position_ids,
                       attn_mask=attn_mask, seq_lens=seq_lens, continues=continues)
        if every_token:
            last = h
        elif seq_lens is not None:
            last = h[0, sequence_ends(seq_lens, continues)]
        elif attention_mask is None:
            last = h[:, -1]
        elif right_padded:
            last = h[torch.arange(h.shape[0], device=h.device), attention_mask.sum(-1) - 1]
        else:
            index = last_real_index(attention_mask)
            if bool((index < 0).any()):
                rows = (index < 0).nonzero().flatten().tolist()
                raise ValueError(f"row(s) {rows[:10]} of the batch have no real token (attention_mask all 0): "
                                 "there is no last token to read a reward from")
            last = h[torch.arange(h.shape[0], device=h.device), index]
        # The head runs in fp32 even under bf16 autocast: bf16 keeps 8 significant bits, so nearby rewards would
        # round to the same value and count as ties. FSDP2 gives `score` its own fp32 unit (apply_fsdp), and
        # load_pretrained keeps the head's weight fp32 when the trunk is loaded in bf16.
        with torch.autocast(device_type=h.device.type, enabled=False):
            reward = self.score(last.to(self.score.weight.dtype)).float()
        # [..., 0] of a fresh (..., 1) tensor would be a view; FSDP2 cannot hook a view's backward safely
        return reward if per_head else reward.sum(-1)
