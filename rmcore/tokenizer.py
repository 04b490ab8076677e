"""Tokenizer: one small wrapper over a SentencePiece `tokenizer.model` (LLaMA / OpenLLaMA format) or a
HuggingFace `tokenizers` `tokenizer.json`. Training one: rmcore/data/tokenizer_training.py.

Text is always text: strings such as "</s>" inside a transcript are tokenized as characters, never as the
special token, in both backends; BOS/EOS only ever come from the `bos` / `eos` flags.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import sentencepiece as spm
import tokenizers

from rmcore.errors import TokenizerError
from rmcore.interop.hub import resolve_model
from rmcore.interop.tokenizer_json import exact_conversion, special_tokens_template

SP_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # later files override earlier, as in transformers


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
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """A model directory's tokenizer, a tokenizer file, or a Hugging Face Hub id's (org/name[@revision])."""
        path = resolve_model(path)
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
            tok = cls.from_sentencepiece(sp, names, sp_file)
            tok.chat_template = names.get("chat_template")
            return tok
        if hf_file.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(hf_file))
            except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
                raise TokenizerError(f"{hf_file}: not a valid tokenizer.json ({str(e)[:200]})") from None
            tok = cls.from_tokenizers(backend, names, hf_file)
            tok.chat_template = names.get("chat_template")
            return tok
        raise TokenizerError(
            f"no tokenizer in {d}: looked for {SP_FILE} (SentencePiece) and {HF_FILE} (HF tokenizers)"
        )

    @classmethod
    def from_sentencepiece(cls, sp: spm.SentencePieceProcessor, names: dict, where) -> Tokenizer:
        """A loaded SentencePiece model; `names` (bos_token, eos_token, pad_token, add_bos_token) as the config
        files give them, `where` for messages."""
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
    def from_tokenizers(cls, tok: tokenizers.Tokenizer, names: dict, where) -> Tokenizer:
        """A loaded `tokenizers` backend; names and where as in from_sentencepiece."""
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
            # our own exact tokenizer.json beside the .model (rmcore/interop/tokenizer_json.py says why)
            hf = exact_conversion(self.backend, self._piece(self.bos_id))
            if hf is not None:
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
        return special_tokens_template(bos if self.add_bos else None, eos if add_eos else None)

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

    def same_ids(self, other: Tokenizer) -> bool:
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
