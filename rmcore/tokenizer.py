"""
Tokenizer: one small wrapper over a SentencePiece `tokenizer.model` (LLaMA / OpenLLaMA format) or a
HuggingFace `tokenizers` `tokenizer.json`, plus training of either kind and a command to do it:

    python -m rmcore.tokenizer train --input data.jsonl.gz --out tok/ [--vocab-size 8000] [--kind sentencepiece|bpe]

Text is always text: strings such as "</s>" inside a transcript are tokenized as characters, never as the
special token, in both backends; BOS/EOS only ever come from the `bos` / `eos` flags.
"""

import argparse
import gzip
import io
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors

from rmcore.errors import UserError

SP_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # later files override earlier, as in transformers
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3 in every tokenizer trained here

# Touches leading, repeated and trailing spaces, newlines, digits, non-ASCII and a literal special token: the
# cases where a converted SentencePiece model could disagree with the original.
_PROBE = "  Hi  there,\n\n  I'm 12345 years old.   \té ’ ほん 👍🏾 \uf04a a literal </s> and <s>\n "


class TokenizerError(UserError, ValueError):
    """A tokenizer directory that is missing its files or names special tokens it does not have."""


class Tokenizer:
    """
    Encode/decode with ids bos_id, eos_id, pad_id and vocab_size, backed by SentencePiece or `tokenizers`.

    from_pretrained(dir) reads tokenizer.model if present (the original LLaMA format, encoded exactly as
    SentencePiece does), else tokenizer.json. bos/eos/pad are taken, in order of preference, from
    tokenizer_config.json / special_tokens_map.json (special_tokens_map wins), then from the model itself.

    PAD is never EOS. Padding with EOS makes loss masks and "last non-pad token" lookups (where a reward model
    reads its score) silently drop or misplace the real EOS, so a setup where PAD == EOS is refused. For a
    SentencePiece model without a pad piece (OpenLLaMA: unk=0, bos=1, eos=2, no pad) pad comes from the config
    files if they name one, else it is unk (id 0), as OpenLLaMA's HF config sets pad_token_id=0; with byte
    fallback a real text never encodes to unk, so it stays unambiguous. Tokenizers trained here have a real
    <pad> (id 3).
    """

    def __init__(self, backend, bos_id: int, eos_id: int, pad_id: int, add_bos: bool = True):
        self.backend = backend  # spm.SentencePieceProcessor or tokenizers.Tokenizer
        self.is_sp = isinstance(backend, spm.SentencePieceProcessor)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = add_bos  # the model's convention: encode(bos=True) adds BOS only where it is True
        self.chat_template = None  # the model's own Jinja chat template, carried into exports for transformers users
        if self.is_sp:
            self.vocab_size = backend.vocab_size()
            self.unk_id = backend.unk_id()
            special = [i for i in range(self.vocab_size) if backend.is_control(i) or backend.is_unknown(i)]
        else:
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            unk = getattr(backend.model, "unk_token", None)
            self.unk_id = backend.token_to_id(unk) if unk else None
            special = [i for i, t in backend.get_added_tokens_decoder().items() if t.special]
            # A tokenizer.json may carry truncation/padding settings; ours never truncates or pads.
            backend.no_truncation()
            backend.no_padding()
            backend.encode_special_tokens = True  # text is text (see module docstring)
        self.special_ids = set(special) | {bos_id, eos_id, pad_id}
        self._special_pattern = None  # built on first use by _encode_specials
        if pad_id == eos_id:
            # Modern checkpoints (SmolLM2, Qwen, ...) name EOS as their pad token. Padding with EOS misplaces loss
            # masks and reward read-outs, so another existing special token pads instead, said once.
            others = sorted(self.special_ids - {bos_id, eos_id})
            if not others:
                raise TokenizerError(
                    f"pad id {pad_id} equals eos id {eos_id} ({self._piece(eos_id)!r}) and the vocabulary has no other "
                    f"special token to pad with; name a distinct pad_token in tokenizer_config.json")
            self.pad_id = others[0]
            print(f"tokenizer: the pad token is EOS {self._piece(eos_id)!r}; padding with {self._piece(self.pad_id)!r} "
                  f"(id {self.pad_id}) instead, so EOS stays a real token", flush=True)

    # -------------------------------------------------------------------------------------------------------
    # loading and saving

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        d = path.parent if path.is_file() else path
        names = _special_token_names(d)
        sp_file = path if path.is_file() and path.name != HF_FILE else d / SP_FILE
        hf_file = path if path.is_file() and path.name == HF_FILE else d / HF_FILE
        if sp_file.is_file():
            sp = spm.SentencePieceProcessor()
            try:
                sp.load(str(sp_file))
            except (RuntimeError, OSError) as e:
                raise TokenizerError(f"{sp_file} is not a SentencePiece model: {e}") from e
            tok = cls._from_sp(sp, names, sp_file)
            tok.chat_template = names.get("chat_template")
            return tok
        if hf_file.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(hf_file))
            except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
                raise TokenizerError(f"{hf_file}: not a valid tokenizer.json ({str(e)[:200]})") from None
            tok = cls._from_hf(backend, names, hf_file)
            tok.chat_template = names.get("chat_template")
            return tok
        raise TokenizerError(
            f"no tokenizer in {d}: looked for {SP_FILE} (SentencePiece) and {HF_FILE} (HF tokenizers)"
        )

    @classmethod
    def _from_sp(cls, sp: spm.SentencePieceProcessor, names: dict, where) -> "Tokenizer":
        def piece_id(key, default):
            if key not in names:
                return default
            i = sp.piece_to_id(names[key])
            if sp.id_to_piece(i) != names[key]:  # piece_to_id maps unknown strings to unk
                raise TokenizerError(f"{key} {names[key]!r} named in the config files is not a piece of {where}")
            return i

        bos, eos = piece_id("bos_token", sp.bos_id()), piece_id("eos_token", sp.eos_id())
        if bos < 0 or eos < 0:
            raise TokenizerError(f"{where} has no bos/eos piece; name bos_token and eos_token in tokenizer_config.json")
        pad = piece_id("pad_token", sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id())
        return cls(sp, bos, eos, pad, names.get("add_bos_token", True))

    @classmethod
    def _from_hf(cls, tok: tokenizers.Tokenizer, names: dict, where) -> "Tokenizer":
        unk = getattr(tok.model, "unk_token", None)

        def token_id(key, default):
            name = names.get(key, default)
            i = tok.token_to_id(name) if name is not None else None
            if i is None:
                raise TokenizerError(f"{key} {name!r} is not in {where}; name it in tokenizer_config.json")
            return i

        pad_default = "<pad>" if tok.token_to_id("<pad>") is not None else unk
        return cls(tok, token_id("bos_token", "<s>"), token_id("eos_token", "</s>"), token_id("pad_token", pad_default),
                   names.get("add_bos_token", True))

    def save_pretrained(self, path: str | Path, add_eos: bool = False, split_special_tokens: bool = True) -> None:
        """Write the model plus the config files that transformers' AutoTokenizer needs to rebuild it exactly.

        add_eos: transformers' tokenizer(text) then gives BOS + text + EOS, the sequences a reward model is trained
        and scored on (its reward is read at the EOS); a causal LM's tokenizer adds BOS only, for generation.
        split_special_tokens: tokenizer(text) reads "<|im_start|>" as characters, as encode(text) does; False for
        a model trained on a template written in special tokens, as encode(text, specials=True) reads it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.is_sp:
            (path / SP_FILE).write_bytes(self.backend.serialized_model_proto())
            # transformers can only convert a tokenizer.model through protobuf, and its LlamaTokenizer pipeline
            # drops SentencePiece's dummy prefix before a leading space. Writing our own exact conversion next to
            # the .model avoids both; it is checked against SentencePiece before it is trusted.
            hf = _sp_to_hf(self.backend, self._piece(self.bos_id))
            if hf.encode(_PROBE, add_special_tokens=False).ids == self.backend.encode(_PROBE):
                hf.post_processor = self._post_processor(add_eos)
                hf.save(str(path / HF_FILE))
            else:
                warnings.warn(f"a {HF_FILE} converted from this {SP_FILE} does not reproduce it (not a LLaMA-style "
                              f"BPE model?), so only {SP_FILE} was written: transformers will convert it itself, "
                              f"which needs protobuf and may not match SentencePiece", stacklevel=2)
        else:
            hf = tokenizers.Tokenizer.from_str(self.backend.to_str())  # a copy: our own encoder stays as it is
            hf.post_processor = self._post_processor(add_eos)
            hf.save(str(path / HF_FILE))
        tokens = {"bos_token": self._piece(self.bos_id), "eos_token": self._piece(self.eos_id),
                  "pad_token": self._piece(self.pad_id)}
        if self.unk_id is not None:
            tokens["unk_token"] = self._piece(self.unk_id)
        has_hf_file = (path / HF_FILE).is_file()
        config = {
            # the generic fast class loads tokenizer.json as written; LlamaTokenizer would rebuild its own pipeline
            "tokenizer_class": "PreTrainedTokenizerFast" if has_hf_file else "LlamaTokenizer",
            **tokens,
            "add_bos_token": self.add_bos,  # tok(text) starts with BOS as encode(text, bos=True) does
            "add_eos_token": add_eos,
            "split_special_tokens": split_special_tokens,
            "clean_up_tokenization_spaces": False,
            **({"chat_template": self.chat_template} if self.chat_template else {}),
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (path / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2, ensure_ascii=False) + "\n")

    def _post_processor(self, add_eos: bool):
        bos, eos = (self._piece(self.bos_id), self.bos_id), (self._piece(self.eos_id), self.eos_id)
        return _special_template(bos if self.add_bos else None, eos if add_eos else None)

    # -------------------------------------------------------------------------------------------------------
    # encoding and decoding

    def encode(self, text: str, bos: bool = False, eos: bool = False, specials: bool = False) -> list[int]:
        """Token ids of text; bos=True adds BOS where the model's convention does (add_bos), eos=True adds EOS.
        specials=True reads special-token strings in the text as those tokens (as transformers does by default):
        for templates written in special tokens (ChatML), never for plain text."""
        return self.encode_batch([text], bos, eos, specials)[0]

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False,
                     specials: bool = False) -> list[list[int]]:
        texts = list(texts)
        if specials:
            batch = [self._encode_specials(t)[0] for t in texts]
        elif self.is_sp:
            batch = self.backend.encode(texts)  # multi-threaded in C++
        else:
            batch = [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [[self.bos_id] * (bos and self.add_bos) + ids + [self.eos_id] * eos for ids in batch]

    def encode_with_starts(self, text: str, specials: bool = False) -> tuple[list[int], list[int]]:
        """encode(text) and, for each token, the index in text of the first character it covers."""
        # Used to mark which tokens of a whole-text encoding belong to which part of the text (assistant-only
        # SFT loss) without encoding the parts separately, which would change the tokens at every boundary.
        if specials:
            return self._encode_specials(text)
        if not self.is_sp:
            enc = self.backend.encode(text, add_special_tokens=False)
            return enc.ids, [start for start, _ in enc.offsets]
        ids = self.backend.encode(text)
        # SentencePiece pieces spell the text with "▁" for spaces and <0xNN> for fallback bytes, after an
        # optional dummy-prefix space: rebuild the bytes and read each piece's start off them.
        spelled, starts = bytearray(), []
        for piece in self.backend.id_to_piece(ids):
            starts.append(len(spelled))
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                spelled.append(int(piece[3:5], 16))
            else:
                spelled += piece.replace("\u2581", " ").encode("utf-8")
        raw = text.encode("utf-8")
        prefix = len(spelled) - len(raw)
        if prefix not in (0, 1) or bytes(spelled[prefix:]) != raw:
            raise ValueError(
                "this SentencePiece model normalises text (its pieces do not spell the input), so token offsets "
                "are unknown; train with normalization_rule_name=identity (as LLaMA's is) or use a tokenizer.json"
            )
        char_at_byte = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))] + [len(text)]
        return ids, [char_at_byte[max(s - prefix, 0)] for s in starts]

    def _encode_specials(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, start of each token) with every special-token string in text read as that token and the text
        between them encoded on its own, as transformers' tokenizers do with split_special_tokens=False."""
        if self._special_pattern is None:
            names = sorted({self._piece(i) for i in self.special_ids}, key=len, reverse=True)
            self._special_pattern = re.compile("|".join(map(re.escape, names)))
        ids, starts, at = [], [], 0
        for m in [*self._special_pattern.finditer(text), None]:
            end = m.start() if m else len(text)
            if end > at:
                part_ids, part_starts = self.encode_with_starts(text[at:end])
                ids += part_ids
                starts += [at + s for s in part_starts]
            if m:
                ids.append(self.backend.piece_to_id(m.group()) if self.is_sp else self.backend.token_to_id(m.group()))
                starts.append(m.start())
                at = m.end()
        return ids, starts

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if skip_special_tokens:
            return self._decode_text([i for i in ids if i not in self.special_ids])
        # Specials appear as their piece and the text between them decodes as it would on its own, so
        # decode([bos] + encode(t) + [eos], False) == "<s>" + t + "</s>".
        out, run = [], []
        for i in ids + [None]:
            if i is None or i in self.special_ids:
                out.append(self._decode_text(run))
                run = []
                if i is not None:
                    out.append(self._piece(i))
            else:
                run.append(i)
        return "".join(out)

    def _decode_text(self, ids: list[int]) -> str:
        return self.backend.decode(ids) if self.is_sp else self.backend.decode(ids, skip_special_tokens=False)

    def _piece(self, i: int) -> str:
        return self.backend.id_to_piece(i) if self.is_sp else self.backend.id_to_token(i)

    def same_ids(self, other: "Tokenizer") -> bool:
        """Whether every id means the same token here and in `other` (so a model can read the other's ids)."""
        return ((self.vocab_size, self.bos_id, self.eos_id, self.pad_id) ==
                (other.vocab_size, other.bos_id, other.eos_id, other.pad_id) and
                all(self._piece(i) == other._piece(i) for i in range(self.vocab_size)))

    def __setstate__(self, state):  # DataLoader workers get a pickled copy
        self.__dict__.update(state)
        if not self.is_sp:
            self.backend.encode_special_tokens = True  # tokenizers' own pickle drops this flag

    def __repr__(self):
        kind = "sentencepiece" if self.is_sp else "tokenizers"
        ids = f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}"
        return f"Tokenizer({kind}, vocab_size={self.vocab_size}, {ids})"


def _special_token_names(d: Path) -> dict:
    names = {}
    for f in CONFIG_FILES:
        if (d / f).is_file():
            try:
                config = json.loads((d / f).read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{d / f}: malformed JSON ({e})") from None
            for key, value in config.items():
                if key in ("bos_token", "eos_token", "pad_token") and value is not None:
                    names[key] = value["content"] if isinstance(value, dict) else value
                if key == "add_bos_token" and isinstance(value, bool):
                    names[key] = value
                if key == "chat_template" and isinstance(value, str):
                    names[key] = value
    return names


def _sp_to_hf(sp: spm.SentencePieceProcessor, bos: str) -> tokenizers.Tokenizer:
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
    tok.post_processor = _special_template((bos, vocab[bos]))
    tok.encode_special_tokens = True
    return tok


def _special_template(bos: tuple[str, int] | None, eos: tuple[str, int] | None = None):
    """What transformers' tokenizer(text) adds around a text: BOS and/or EOS, each where given."""
    start, start_b = (f"{bos[0]}:0 ", f" {bos[0]}:1") if bos else ("", "")
    end, end_b = (f" {eos[0]}:0", f" {eos[0]}:1") if eos else ("", "")
    return processors.TemplateProcessing(single=f"{start}$A:0{end}", pair=f"{start}$A:0{end}{start_b} $B:1{end_b}",
                                         special_tokens=[t for t in (bos, eos) if t])


# -----------------------------------------------------------------------------------------------------------
# training


def train_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 8000, kind: str = "sentencepiece") -> Tokenizer:
    """Train a tokenizer with <unk>=0, <s>=1, </s>=2, <pad>=3, save it to out_dir and return it loaded from there."""
    if kind == "sentencepiece":
        # SentencePiece wants sentences: it skips inputs over max_sentence_length (4192 bytes), which whole
        # multi-turn transcripts often are, so it is fed lines. A newline is then never a piece and becomes the
        # byte <0x0A>, as in LLaMA. It holds every sentence in memory and its BPE merge loop scales with the
        # data, so a big corpus is cut to a shuffled sample of 2M lines: plenty for an 8k-32k vocab, and memory
        # and time stay bounded (the 4.6k HH test transcripts, ~25k lines, take ~0.2 s on 2 cores).
        lines = (line for text in texts for line in text.split("\n") if line.strip())
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
            input_sentence_size=2_000_000, shuffle_input_sentence=True,
            # LLaMA's settings, so that decode(encode(t)) == t for any text:
            byte_fallback=True,  # characters outside the vocab become UTF-8 bytes, never <unk>
            normalization_rule_name="identity", remove_extra_whitespaces=False,  # no NFKC, keep every space
            add_dummy_prefix=True, allow_whitespace_only_pieces=True, split_digits=True,
            character_coverage=0.99995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
            num_threads=os.cpu_count() or 1, minloglevel=2,
        )
        tok = Tokenizer._from_sp(spm.SentencePieceProcessor(model_proto=model.getvalue()), {}, "the trained model")
    elif kind == "bpe":
        # Byte-level BPE in the GPT-2 style: every byte is in the base alphabet, so nothing is ever unknown.
        hf = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train_from_iterator(texts, trainer)
        hf.post_processor = _special_template(("<s>", hf.token_to_id("<s>")))
        tok = Tokenizer._from_hf(hf, {}, "the trained model")
    else:
        raise ValueError(f"kind must be 'sentencepiece' or 'bpe', got {kind!r}")
    tok.save_pretrained(out_dir)
    return Tokenizer.from_pretrained(out_dir)


def _iter_texts(paths) -> Iterator[str]:
    """.txt: one text per line. .jsonl / .jsonl.gz: every string value in each record (HH: chosen, rejected)."""
    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, (list, dict)):
            for v in x.values() if isinstance(x, dict) else x:
                yield from strings(v)

    for p in map(str, paths):
        with (gzip.open(p, "rt", encoding="utf-8") if p.endswith(".gz") else open(p, encoding="utf-8")) as f:
            for line in f:
                if p.endswith((".jsonl", ".jsonl.gz")):
                    if line.strip():
                        yield from strings(json.loads(line))
                elif line.rstrip("\n"):
                    yield line.rstrip("\n")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rmcore.tokenizer", description="Train a tokenizer.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a tokenizer on .txt / .jsonl / .jsonl.gz files")
    train.add_argument("--input", nargs="+", required=True, help=".txt (one text per line) or .jsonl[.gz] files")
    train.add_argument("--out", required=True, help="directory to write the tokenizer to")
    train.add_argument("--vocab-size", type=int, default=8000)
    train.add_argument("--kind", choices=["sentencepiece", "bpe"], default="sentencepiece")
    args = parser.parse_args(argv)

    for p in args.input:
        if not Path(p).is_file():
            parser.error(f"input file not found: {p}")
    stats = {"texts": 0, "chars": 0}

    def counted(texts):
        for t in texts:
            stats["texts"] += 1
            stats["chars"] += len(t)
            yield t

    t0 = time.time()
    tok = train_tokenizer(counted(_iter_texts(args.input)), args.out, args.vocab_size, args.kind)
    print(f"read {len(args.input)} file(s): {', '.join(args.input)}")
    print(f"     {stats['texts']:,} texts, {stats['chars']:,} characters")
    print(f"wrote {args.kind} tokenizer to {args.out} ({', '.join(sorted(os.listdir(args.out)))}) "
          f"in {time.time() - t0:.1f}s: {tok}")


if __name__ == "__main__":
    sys.exit(main())
