"""Tokenizer tests on the shipped HH-RLHF file, checked against sentencepiece, tokenizers and transformers directly."""
import gzip
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers

from rmcore.data.tokenizer_training import iter_texts, train_tokenizer
from rmcore.errors import TokenizerError
from rmcore.tokenizer import Tokenizer

# Edges where SentencePiece and a converted HF tokenizer have been known to part ways.
EDGE_TEXTS = ["", " ", "  leading spaces", "trailing  \n", "a\tb\r\nc", "12345 + 0.5", "literal </s> and <s> <pad>",
              "é ’ ほん 👍🏾 \uf04a", "\n\nHuman: hi\n\nAssistant:  two  spaces"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hh_texts(hh_file):
    # read independently of rmcore's iter_texts, so the CLI test can compare against it
    with gzip.open(hh_file, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2312
    return [r[k] for r in records for k in ("chosen", "rejected")]


@pytest.fixture(scope="module")
def sp_dir(hh_texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    train_tokenizer(hh_texts, out, vocab_size=4000)
    return out


@pytest.fixture(scope="module")
def sp_tok(sp_dir):
    return Tokenizer.from_pretrained(sp_dir)


@pytest.fixture(scope="module")
def bpe_dir(hh_texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    train_tokenizer(hh_texts, out, vocab_size=4000, kind="bpe")
    return out


def test_sentencepiece_round_trips_every_transcript(sp_tok, hh_texts):
    assert sp_tok.is_sp and sp_tok.vocab_size == 4000
    ids = sp_tok.encode_batch(hh_texts)
    bad = [t for t, x in zip(hh_texts, ids) if sp_tok.decode(x) != t]
    assert not bad, f"{len(bad)} transcripts do not round-trip, e.g. {bad[0][:200]!r}"
    assert all(sp_tok.decode(sp_tok.encode(t)) == t for t in EDGE_TEXTS)
    assert sp_tok.unk_id not in {i for x in ids for i in x}  # byte fallback: nothing is ever unknown
    # a real vocabulary, not bytes: chat text compresses to well under one token per 3 characters
    assert sum(map(len, ids)) < sum(map(len, hh_texts)) / 3


def test_sentencepiece_model_is_llama_style(sp_dir):
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size()) if not sp.is_byte(i)]
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]  # digits are split
    assert sp.encode("\n", out_type=str) == ["▁", "<0x0A>"]
    assert sp.encode("a  b", out_type=str)[-2:] == ["▁", "▁b"]  # no whitespace collapsing


def test_sentencepiece_ids_match_sentencepiece_library(sp_dir, sp_tok, hh_texts):
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    texts = hh_texts[::3] + EDGE_TEXTS
    assert [sp_tok.encode(t) for t in texts] == [sp.encode(t) for t in texts]
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (sp.bos_id(), sp.eos_id(), sp.pad_id())


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_transformers_autotokenizer_matches(kind, sp_tok, bpe_dir, hh_texts, tmp_path):
    from transformers import AutoTokenizer

    tok = sp_tok if kind == "sentencepiece" else Tokenizer.from_pretrained(bpe_dir)
    tok.save_pretrained(tmp_path)
    expected = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    expected |= {"tokenizer.model"} if kind == "sentencepiece" else set()
    assert {p.name for p in tmp_path.iterdir()} == expected
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    texts = hh_texts[::5] + EDGE_TEXTS
    # transformers adds BOS by default, as the LLaMA tokenizers do; literal "</s>" in text stays text
    assert hf(texts)["input_ids"] == tok.encode_batch(texts, bos=True)
    assert [hf.encode(t, add_special_tokens=False) for t in EDGE_TEXTS] == [tok.encode(t) for t in EDGE_TEXTS]
    assert [hf.decode(tok.encode(t, True, True), skip_special_tokens=True) for t in texts] == texts
    # and the saved directory loads back into the same tokenizer
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert again.vocab_size == tok.vocab_size


def test_bpe_tokenizer_json(bpe_dir, hh_texts):
    tok = Tokenizer.from_pretrained(bpe_dir)
    assert not tok.is_sp and not (bpe_dir / "tokenizer.model").exists()
    ref = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    assert [ref.token_to_id(s) for s in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 4000)
    ids = tok.encode_batch(hh_texts)
    assert ids == [e.ids for e in ref.encode_batch(hh_texts, add_special_tokens=False)]
    assert [tok.decode(x) for x in ids] == hh_texts
    assert all(tok.decode(tok.encode(t)) == t for t in EDGE_TEXTS)


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_special_tokens_flags_batch_and_decode(kind, sp_tok, bpe_dir, hh_texts):
    tok = sp_tok if kind == "sentencepiece" else Tokenizer.from_pretrained(bpe_dir)
    assert tok.pad_id != tok.eos_id and len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    texts = hh_texts[:50] + EDGE_TEXTS
    for t in texts:
        ids = tok.encode(t)
        assert tok.encode(t, bos=True) == [tok.bos_id] + ids
        assert tok.encode(t, eos=True) == ids + [tok.eos_id]
        assert tok.encode(t, bos=True, eos=True) == [tok.bos_id] + ids + [tok.eos_id]
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == t
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id], skip_special_tokens=False) == f"<s>{t}</s>"
    # a literal special token inside text is text, never the special id
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(tok.encode("x </s> <s> <pad> y"))
    for flags in [(False, False), (True, False), (False, True), (True, True)]:
        batch = tok.encode_batch(texts, *flags)
        assert batch == [tok.encode(t, *flags) for t in texts]
    longest = max(hh_texts, key=len)  # never truncates
    assert len(tok.encode(longest)) == len(tok.encode_batch([longest])[0]) > 1000
    clone = pickle.loads(pickle.dumps(tok))  # as DataLoader workers receive it
    assert clone.encode_batch(texts, True, True) == tok.encode_batch(texts, True, True)
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor(tok.encode(texts[0], bos=True))) == texts[0]


@pytest.fixture(scope="module")
def no_pad_dir(hh_texts, tmp_path_factory):
    # an OpenLLaMA-style model: unk=0, bos=1, eos=2 and no pad piece, trained with sentencepiece directly
    out = tmp_path_factory.mktemp("nopad")
    lines = [line for t in hh_texts[:1000] for line in t.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "tokenizer"),
                                   model_type="bpe", vocab_size=1000, byte_fallback=True, pad_id=-1, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    return out


def test_model_without_pad_uses_unk(no_pad_dir, hh_texts, tmp_path):
    assert spm.SentencePieceProcessor(model_file=str(no_pad_dir / "tokenizer.model")).pad_id() == -1
    tok = Tokenizer.from_pretrained(no_pad_dir)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
    assert tok.decode(tok.encode(hh_texts[0], eos=True) + [tok.pad_id] * 3) == hh_texts[0]
    # transformers agrees after save_pretrained: pad is <unk>, id 0
    from transformers import AutoTokenizer
    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.pad_token, hf.pad_token_id, hf.eos_token_id) == ("<unk>", 0, 2)
    assert hf.encode(hh_texts[0]) == tok.encode(hh_texts[0], bos=True)


def test_config_names_special_tokens(no_pad_dir, tmp_path, capsys):
    (tmp_path / "tokenizer.model").write_bytes((no_pad_dir / "tokenizer.model").read_bytes())
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"pad_token": {"content": "<s>"}, "eos_token": "</s>"}))
    assert Tokenizer.from_pretrained(tmp_path).pad_id == 1
    config.write_text(json.dumps({"pad_token": "</s>"}))  # PAD = EOS, as modern checkpoints ship it
    assert Tokenizer.from_pretrained(tmp_path).pad_id == 0  # another existing special pads instead, said once
    assert "padding with '<unk>' (id 0) instead" in capsys.readouterr().out
    config.write_text(json.dumps({"pad_token": "<nope>"}))
    with pytest.raises(ValueError, match="<nope>"):
        Tokenizer.from_pretrained(tmp_path)
    # special_tokens_map.json overrides tokenizer_config.json, as in transformers
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<unk>"}))
    assert Tokenizer.from_pretrained(tmp_path).pad_id == 0


def test_missing_tokenizer_names_dir_and_files(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError) as e:  # a UserError: the scripts print it without a traceback
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer.model" in str(e.value) and "tokenizer.json" in str(e.value)


def test_iter_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one line\n\ntwo  line \n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"chosen": "c", "rejected": "r", "n": 3, "turns": [{"text": "t"}]}) + "\n\n")
    assert list(iter_texts([tmp_path / "a.txt", tmp_path / "b.jsonl.gz"])) == ["one line", "two  line ", "c", "r", "t"]
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(["x"], tmp_path / "out", kind="wordpiece")


def test_cli_trains_a_loadable_tokenizer(hh_file, hh_texts, sp_dir, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "rmcore.data.tokenizer_training", "train", "--input", str(hh_file), "--out", str(out),
           "--vocab-size", "4000"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"{len(hh_texts):,} texts, {sum(map(len, hh_texts)):,} characters" in res.stdout
    assert str(out) in res.stdout
    tok = Tokenizer.from_pretrained(out)
    assert tok.vocab_size == 4000 and all(tok.decode(tok.encode(t)) == t for t in hh_texts[:200])
    # the CLI reads the same texts as the fixture, and SentencePiece training is deterministic
    assert (out / "tokenizer.model").read_bytes() == (sp_dir / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_encode_with_starts_locates_every_token(kind, sp_tok, bpe_dir, hh_texts):
    """Each token's start offset is where its text begins: cutting the text at the starts of a token run and
    re-encoding that span reproduces the run's ids (checked on whole transcripts and non-ASCII text)."""
    tok = sp_tok if kind == "sentencepiece" else Tokenizer.from_pretrained(bpe_dir)
    for text in hh_texts[:20] + ["naïve café ☕ 😀 ok", "###Human: hi###Assistant: hé"]:
        ids, starts = tok.encode_with_starts(text)
        assert ids == tok.encode(text) and starts[0] == 0 and starts == sorted(starts) and starts[-1] < len(text)
        for cut in (len(ids) // 3, len(ids) // 2):
            # a cut between two tokens: the text after the cut's offset, encoded alone, begins with
            # the same characters the remaining tokens spell
            assert tok.decode(ids[cut:]).strip() == text[starts[cut]:].strip()
