"""ChatML, the template of chat models such as SmolLM2-Instruct: rendered as the model's own Jinja chat template
renders it (through transformers), tokenized with its special tokens as transformers tokenizes it, assistant-only
SFT masks, and the small recipe's reward-model export scored the same by eval.py and transformers' pipeline."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rmcore.data.datasets import document_tokens
from rmcore.data.formats import read_examples
from rmcore.data.template import ASSISTANT, HUMAN, Template
from rmcore.errors import DataError
from rmcore.interop.gguf import convert, resolve_gguf
from rmcore.tokenizer import Tokenizer

import eval as eval_cli
import train

REPO = Path(__file__).resolve().parents[2]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory):
    return convert(resolve_gguf("smollm2"), tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def tok(smollm_dir):
    return Tokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="module")
def hf_tok(smollm_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="module")
def examples(hh_file):
    return read_examples([f"{hh_file}[:40]"])[0]


def messages(hh_text: str) -> list[dict]:
    """HH form -> chat messages, written independently of Template: each marker starts a turn, its one space dropped."""
    parts = re.split(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})", hh_text)
    out = []
    for marker, content in zip(parts[1::2], parts[2::2]):
        out.append({"role": "user" if marker == HUMAN else "assistant", "content": content.removeprefix(" ")})
    return out


def test_chatml_renders_as_the_models_own_chat_template(examples, hf_tok):
    t = Template.chatml(SMOLLM_SYSTEM)
    assert hf_tok.chat_template  # the converted directory carries the GGUF's template
    for e in examples:
        conversation = messages(e.prompt + e.chosen)
        # the model's template closes the last turn with "<|im_end|>\n"; rmcore appends EOS (= <|im_end|>) instead
        assert t.render(e.prompt, e.chosen) + "<|im_end|>\n" == hf_tok.apply_chat_template(conversation, tokenize=False)
        assert t.render(e.prompt) == hf_tok.apply_chat_template(conversation[:-1], tokenize=False,
                                                                add_generation_prompt=True)
        assert t.invert(t.render(e.prompt, e.chosen)) == e.prompt + e.chosen


def test_chatml_ids_equal_transformers(examples, tok, hf_tok):
    """BOS (none for SmolLM2) + rendered text + EOS, with the template's special tokens read as tokens, equals
    transformers' ids of the chat template's text minus its final newline."""
    t = Template.chatml(SMOLLM_SYSTEM)
    for e in examples:
        ours = tok.encode(t.render(e.prompt, e.chosen), bos=True, eos=True, specials=True)
        text = hf_tok.apply_chat_template(messages(e.prompt + e.chosen), tokenize=False)
        theirs = hf_tok(text, add_special_tokens=False).input_ids
        assert ours == theirs[:-1] and hf_tok.decode(theirs[-1:]) == "\n"
        assert ours.count(tok.eos_id) == len(messages(e.prompt + e.chosen)) + 1  # every turn and the system closed


def test_special_strings_are_text_unless_asked(tok, smollm_dir):
    from transformers import AutoTokenizer
    text = "a <|im_start|>user\nhi<|im_end|> b<|endoftext|>c"
    split = AutoTokenizer.from_pretrained(smollm_dir, split_special_tokens=True)
    matched = AutoTokenizer.from_pretrained(smollm_dir, split_special_tokens=False)
    assert tok.encode(text) == split(text, add_special_tokens=False).input_ids
    assert tok.encode(text, specials=True) == matched(text, add_special_tokens=False).input_ids
    assert tok.encode(text) != tok.encode(text, specials=True)
    ids, starts = tok.encode_with_starts(text, specials=True)
    assert ids == tok.encode(text, specials=True)
    assert [text[s:s + 12] for s, i in zip(starts, ids) if i == 1] == ["<|im_start|>"]


def test_assistant_only_mask_covers_assistant_content_and_eos(examples, tok):
    t = Template.chatml(SMOLLM_SYSTEM)
    for e in examples[:10]:
        ids, mask = document_tokens(e, tok, t, "assistant")
        learned = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        turns = [m["content"] for m in messages(e.prompt + e.chosen) if m["role"] == "assistant"]
        assert learned == "".join(turns) + "<|im_end|>"
        assert ids == tok.encode(t.render(e.prompt, e.chosen), bos=True, eos=True, specials=True)


def test_template_in_special_tokens_needs_a_tokenizer_that_has_them(tok):
    Template.chatml().check(tok)
    with pytest.raises(DataError, match=r"lacks \['<\|turn\|>'\]"):
        Template("<|turn|>user\n", "<|turn|>model\n", "\n", special_tokens=True).check(tok)


def test_small_recipe_rm_export_scores_the_same_in_transformers(smollm_dir, hh_file, tmp_path):
    """configs/small.yaml, cut to one optimizer step, exported: eval.py score on HH-form and ChatML-form texts and
    transformers' pipeline on the ChatML text give the same rewards."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
    out = tmp_path / "rm"
    train.main(["--config", str(REPO / "configs/small.yaml"), f"run.init_from={smollm_dir}", f"run.out_dir={out}",
                f"data.train=['{hh_file}[:8]']", "data.max_length=160", "optim.max_steps=1",
                "optim.micro_batch_size=4", "run.precision=fp32", "logging.progress=false"])
    export = out / "export"
    recorded = json.loads((export / "config.json").read_text())["rmcore"]["template"]
    assert recorded == Template.chatml(SMOLLM_SYSTEM).to_dict()
    examples = read_examples([f"{hh_file}[100:104]"])[0]
    hh = [e.prompt + e.chosen for e in examples]
    chatml = [Template.chatml(SMOLLM_SYSTEM).apply(x) for x in hh]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": x}) + "\n" for x in hh + chatml))
    eval_cli.main(["score", "--model", str(export), "--input", str(inp), "--output", str(tmp_path / "out.jsonl"),
                   "--max-length", "512"])
    ours = np.array([json.loads(x)["reward"] for x in (tmp_path / "out.jsonl").read_text().splitlines()])
    assert np.array_equal(ours[:4], ours[4:])  # HH form is rendered into the recorded template
    hf_tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()
    pipe = pipeline("text-classification", model=model, tokenizer=hf_tok, function_to_apply="none")
    piped = np.array([r["score"] for r in pipe(chatml, batch_size=4)])
    assert np.allclose(piped, ours[4:], atol=1e-4), (piped, ours[4:])
    assert len(set(np.round(ours[4:], 4))) == 4  # four different rewards: the head is read where it should be
