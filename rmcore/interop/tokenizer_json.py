"""A SentencePiece model written as an HF `tokenizer.json`, token for token.

transformers can only convert a `tokenizer.model` through protobuf, and its LlamaTokenizer pipeline drops
SentencePiece's dummy prefix before a leading space. rmcore writes its own exact conversion next to the .model
instead (Tokenizer.save_pretrained), trusted only after `exact_conversion` has checked it against SentencePiece.
"""
from __future__ import annotations

import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, decoders, normalizers, processors

# Touches leading, repeated and trailing spaces, newlines, digits, non-ASCII and a literal special token: the
# cases where a converted SentencePiece model could disagree with the original.
PROBE = "  Hi  there,\n\n  I'm 12345 years old.   \té ’ ほん 👍🏾 \uf04a a literal </s> and <s>\n "


def exact_conversion(sp: spm.SentencePieceProcessor, bos: str) -> tokenizers.Tokenizer | None:
    """sentencepiece_to_tokenizers(sp, bos) if it encodes PROBE exactly as SentencePiece does, else None (not a
    LLaMA-style BPE model)."""
    hf = sentencepiece_to_tokenizers(sp, bos)
    return hf if hf.encode(PROBE, add_special_tokens=False).ids == sp.encode(PROBE) else None


def sentencepiece_to_tokenizers(sp: spm.SentencePieceProcessor, bos: str) -> tokenizers.Tokenizer:
    """A `tokenizers` BPE that reproduces a LLaMA-style (BPE, byte-fallback, identity) SentencePiece model."""
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    normal = [i for i in range(n) if not (i in special or sp.is_byte(i) or sp.is_unused(i))]
    pieces = {sp.id_to_piece(i) for i in normal}
    # SentencePiece BPE repeatedly merges the adjacent pair whose concatenation scores highest, so every split
    # of every piece is a merge, ranked by the score of the piece it makes.
    merges = []
    for i in sorted(normal, key=lambda i: -sp.get_score(i)):
        p = sp.id_to_piece(i)
        splits = [(p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in pieces and p[k:] in pieces]
        merges += sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    unk = sp.id_to_piece(sp.unk_id())
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # Prepend on the whole text, unlike Metaspace, also prefixes a text that already starts with a space.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    tok.post_processor = special_tokens_template((bos, vocab[bos]))
    tok.encode_special_tokens = True
    return tok


def special_tokens_template(bos: tuple[str, int] | None, eos: tuple[str, int] | None = None):
    """What transformers' tokenizer(text) adds around a text: BOS and/or EOS, each where given."""
    start, start_b = (f"{bos[0]}:0 ", f" {bos[0]}:1") if bos else ("", "")
    end, end_b = (f" {eos[0]}:0", f" {eos[0]}:1") if eos else ("", "")
    return processors.TemplateProcessing(single=f"{start}$A:0{end}", pair=f"{start}$A:0{end}{start_b} $B:1{end_b}",
                                         special_tokens=[t for t in (bos, eos) if t])
