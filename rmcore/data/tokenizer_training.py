"""Training a tokenizer on the data: a LLaMA-style SentencePiece BPE (the default) or a byte-level BPE, with
<unk>=0, <s>=1, </s>=2, <pad>=3. train.py's `tokenizer` stage calls `train_tokenizer`; the command trains one on
files directly:

    python -m rmcore.data.tokenizer_training train --input data.jsonl.gz --out tok/ [--vocab-size 8000] [--kind bpe]
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, pre_tokenizers

from rmcore.interop.tokenizer_json import special_tokens_template
from rmcore.tokenizer import Tokenizer

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3 in every tokenizer trained here


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
        tok = Tokenizer.from_sentencepiece(spm.SentencePieceProcessor(model_proto=model.getvalue()), {},
                                          "the trained model")
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
        hf.post_processor = special_tokens_template(("<s>", hf.token_to_id("<s>")))
        tok = Tokenizer.from_tokenizers(hf, {}, "the trained model")
    else:
        raise ValueError(f"kind must be 'sentencepiece' or 'bpe', got {kind!r}")
    tok.save_pretrained(out_dir)
    return Tokenizer.from_pretrained(out_dir)


def iter_texts(paths) -> Iterator[str]:
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
    parser = argparse.ArgumentParser(prog="python -m rmcore.data.tokenizer_training", description="Train a tokenizer.")
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
    tok = train_tokenizer(counted(iter_texts(args.input)), args.out, args.vocab_size, args.kind)
    print(f"read {len(args.input)} file(s): {', '.join(args.input)}")
    print(f"     {stats['texts']:,} texts, {stats['chars']:,} characters")
    print(f"wrote {args.kind} tokenizer to {args.out} ({', '.join(sorted(os.listdir(args.out)))}) "
          f"in {time.time() - t0:.1f}s: {tok}")


if __name__ == "__main__":
    sys.exit(main())
