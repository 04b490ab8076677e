"""eval.py and rmcore.evaluate: scoring parity (API, CLI, direct forward), order, truncation, normalisation,
best-of-n, length baselines on the real file, and the report of the tiny chain's model."""
import json
import re

import numpy as np
import pytest
import torch

from rmcore.data.datasets import DataConfig, load_pairs
from rmcore.data.formats import read_examples
from rmcore.data.template import Template
from rmcore.data.tokenizer_training import train_tokenizer
from rmcore.eval.metrics import quantile_edges
from rmcore.eval.report import evaluate_pairs, response_lengths
from rmcore.eval.scorer import RewardScorer, rank_responses
from rmcore.interop.hf_checkpoint import load_pretrained, save_pretrained
from rmcore.model import ModelConfig, RewardModel

import eval as eval_cli
import train

TEMPLATE = Template("<H>", "<A>")  # not the default, so a scorer that ignored config.json would be caught


@pytest.fixture(scope="module")
def model_dir(hh_file, tmp_path_factory):
    import gzip
    with gzip.open(hh_file, "rt") as f:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(300), f)]
    out = tmp_path_factory.mktemp("rm")
    tok = train_tokenizer(texts, out, vocab_size=500)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=256, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    model = RewardModel(cfg)
    model.init_weights()
    save_pretrained(model, out, extra_config={"rmcore": {"template": TEMPLATE.to_dict(), "max_length": 256}})
    return out


def direct(model_dir, items):
    """One sequence at a time, no padding: BOS + template.render + EOS through the model's forward."""
    from rmcore.tokenizer import Tokenizer
    model = load_pretrained(RewardModel, model_dir).eval()
    tok = Tokenizer.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for item in items:
            text = TEMPLATE.apply(item) if isinstance(item, str) else TEMPLATE.render(*item)
            out.append(float(model(torch.tensor([tok.encode(text, bos=True, eos=True)]))[0]))
    return out


ITEMS = [
    ("\n\nHuman: hi\n\nAssistant:", " hello there, how can I help you today?"),
    "\n\nHuman: what is two plus two?\n\nAssistant: four",
    ("\n\nHuman: tell me a long story\n\nAssistant:", " once upon a time " * 12),
    ("\n\nHuman: ok\n\nAssistant:", " ok"),
    "\n\nHuman: and again\n\nAssistant: sure thing",
]


def test_api_cli_and_direct_forward_agree_in_input_order(model_dir, tmp_path):
    expected = direct(model_dir, ITEMS)
    api = RewardScorer(model_dir, batch_size=2).score(ITEMS)  # length-sorted batches of 2, padded
    assert np.allclose(api, expected, atol=1e-5)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": x} if isinstance(x, str) else {"prompt": x[0], "response": x[1]}) + "\n"
                           for x in ITEMS))
    eval_cli.main(["score", "--model", str(model_dir), "--input", str(inp), "--output", str(tmp_path / "out.jsonl"),
                   "--batch-size", "2"])
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(ITEMS)))
    assert np.allclose([r["reward"] for r in rows], expected, atol=1e-5)
    # a transcript and its (prompt, response) split score the same: one template function
    assert np.isclose(api[1],
                      RewardScorer(model_dir).score([("\n\nHuman: what is two plus two?\n\nAssistant:", " four")])[0],
                      atol=1e-5)


def test_overlong_input_is_an_error_or_truncated_from_the_left(model_dir):
    long = ("\n\nHuman: " + "tell me more " * 200 + "\n\nAssistant:", " no")
    with pytest.raises(ValueError, match="more than max_length=64"):
        RewardScorer(model_dir, max_length=64).score([long])
    scorer = RewardScorer(model_dir, max_length=64, truncate="left")
    got = scorer.score([long, ITEMS[3]])
    assert scorer.truncated == 1
    ids = scorer.tokenizer.encode(TEMPLATE.render(*long), bos=True, eos=True)
    kept = [ids[0]] + ids[-63:]
    with torch.no_grad():
        want = float(scorer.model(torch.tensor([kept]))[0])
    assert np.isclose(got[0], want, atol=1e-5) and np.isclose(got[1], direct(model_dir, [ITEMS[3]])[0], atol=1e-5)


def test_normalize_stores_statistics_and_score_applies_them(model_dir, hh_file, tmp_path):
    import shutil
    local = tmp_path / "m"
    shutil.copytree(model_dir, local)
    with pytest.raises(ValueError, match="no reward normalisation statistics"):
        RewardScorer(local).score(ITEMS, normalize=True)
    raw = eval_cli.main(["normalize", "--model", str(local), "--data", f"{hh_file}[:30]"])
    examples, _ = read_examples([f"{hh_file}[:30]"])
    scorer = RewardScorer(local)
    kept = [e for e in examples
            if len(scorer.tokenizer.encode(TEMPLATE.render(e.prompt, e.chosen), bos=True, eos=True)) <= 256]
    assert 0 < len(kept) < len(examples)  # some are over the model's max_length and dropped, as in training
    assert np.allclose(raw, direct(local, [(e.prompt, e.chosen) for e in kept]), atol=1e-5)
    stats = json.loads((local / "config.json").read_text())["rmcore"]["reward_normalization"]
    assert (np.isclose(stats["mean"], np.mean(raw)) and np.isclose(stats["std"], np.std(raw))
            and stats["count"] == len(kept))
    normed = RewardScorer(local).score(ITEMS, normalize=True)
    assert np.allclose(normed, (np.array(direct(local, ITEMS)) - stats["mean"]) / stats["std"], atol=1e-4)


def test_best_of_n_ranks_by_reward(model_dir):
    scorer = RewardScorer(model_dir)
    prompt = "\n\nHuman: hi\n\nAssistant:"
    responses = [" hello", " go away", " hi! how are you?", " ...", " hello"]
    ranked = rank_responses(scorer, prompt, responses)
    singles = direct(model_dir, [(prompt, r) for r in responses])
    assert [r for r, _ in ranked] == [responses[i] for i in sorted(range(5), key=lambda i: -singles[i])]
    assert np.allclose([s for _, s in ranked], sorted(singles, reverse=True), atol=1e-5)


def test_length_baselines_on_the_real_file_match_an_independent_count(model_dir, hh_file):
    scorer = RewardScorer(model_dir)
    pairs, _ = load_pairs([f"{hh_file}[:300]"], scorer.tokenizer,
                          DataConfig(max_length=256, human_tag="<H>", assistant_tag="<A>"), "x", keep_examples=True)
    report = evaluate_pairs(scorer, pairs)
    longer = shorter = ties = 0
    for e in pairs.examples:  # response length = tokens of the whole sequence (the prompt is shared)
        lc = len(scorer.tokenizer.encode(TEMPLATE.render(e.prompt, e.chosen)))
        lr = len(scorer.tokenizer.encode(TEMPLATE.render(e.prompt, e.rejected)))
        longer, shorter, ties = longer + (lc > lr), shorter + (lc < lr), ties + (lc == lr)
    n = len(pairs)
    assert report["length"]["longer_wins"] == longer / n and report["length"]["shorter_wins"] == shorter / n
    # response lengths are the response's own tokens: no BOS, no EOS, no prompt
    prompt_len = np.array([len(scorer.tokenizer.encode(TEMPLATE.render(e.prompt))) for e in pairs.examples])
    lc, lr = response_lengths(pairs, scorer.tokenizer, scorer.template)
    assert (lc == [len(scorer.tokenizer.encode(TEMPLATE.render(e.prompt, e.chosen)))
                   for e in pairs.examples] - prompt_len).all()
    assert (lr == [len(scorer.tokenizer.encode(TEMPLATE.render(e.prompt, e.rejected)))
                   for e in pairs.examples] - prompt_len).all()
    edges = ([b["lo"] for b in report["length"]["accuracy_by_length"]]
             + [report["length"]["accuracy_by_length"][-1]["hi"]])
    assert edges == quantile_edges((lc + lr) / 2, 4)
    assert longer + shorter + ties == n and report["pairs"] == n
    # and the accuracy is the brute-force count of strict wins
    r = direct(model_dir,
               [(e.prompt, e.chosen) for e in pairs.examples] + [(e.prompt, e.rejected) for e in pairs.examples])
    assert np.isclose(report["accuracy"], np.mean(np.array(r[:n]) > np.array(r[n:])))


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory):
    """The README's main job, configs/tiny.yaml (tokenizer -> SFT -> RM on the shipped file), cut short; its run dir."""
    from pathlib import Path

    from conftest import DATA_DIR
    repo = Path(train.__file__).resolve().parent
    root = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RMCORE_DATA", str(DATA_DIR))
        mp.chdir(root)
        train.main(["--config", str(repo / "configs" / "tiny.yaml"), "optim.max_steps=3", "run.eval_every=0",
                    "logging.progress=false", "model.n_layers=2", "run.tokenizer_vocab_size=1000"])
    return root / "runs" / "tiny"


def test_eval_on_the_tiny_chain_export(tiny_chain, tmp_path, monkeypatch):
    from conftest import DATA_DIR
    monkeypatch.setenv("RMCORE_DATA", str(DATA_DIR))
    monkeypatch.chdir(tmp_path)
    export = tiny_chain / "rm" / "export"
    data = ["${RMCORE_DATA}/hh-rlhf/harmless-base/test.jsonl.gz[1932:2032]",
            "${RMCORE_DATA}/hh-rlhf/harmless-base/test.jsonl.gz[2032:]"]
    # the SFT export has no value head: evaluating it must fail loudly, not score with a random head
    with pytest.raises(Exception, match="score.weight"):
        eval_cli.main(["--model", str(tiny_chain / "sft" / "export"), "--data", data[0], "--out", "ev0"])
    results = eval_cli.main(["--model", str(export), "--data", data[0], "--data", data[1], "--out", "ev"])
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    md = (tmp_path / "ev" / "report.md").read_text()
    assert sorted(p.name for p in (tmp_path / "ev").glob("*.png")) == sorted(
        f"rm_data{i}_{k}.png" for i in (0, 1) for k in ("rewards", "reliability", "accuracy_by_length"))
    row = re.search(r"^\| rm \| (.+) \|$", md, re.M).group(1).split(" | ")
    for cell, spec in zip(row, data):
        r = report["results"]["rm"][spec]
        assert cell == f"{100 * r['accuracy']:.2f}" and results["rm"][spec]["accuracy"] == r["accuracy"]
        assert (f"mean pairwise loss: {r['loss']:.4f}" in md
                and f"expected calibration error (10 bins): {r['calibration']['ece']:.4f}" in md)
        assert (r["template"]["source"] == "config.json"
                and r["pairs"] + sum(report["data"][spec]["dropped"].values()) == report["data"][spec]["read"])
        assert r["template"]["separator"] == " "  # the card's form, recorded at export


# raw strings in the reference model card's form, of different lengths: one padded batch
CARD_STYLE = [
    "###Human: hi ###Assistant: hello",
    "###Human: What is two plus two? ###Assistant: Four.",
    "###Human: Can you help me convert fractions to decimals? ###Assistant: Sure. Divide the top by the bottom: "
    "1/2 is 0.5, 3/4 is 0.75. ###Human: And 1/3? ###Assistant: About 0.333, the 3 repeats forever.",
    "###Human: ok ###Assistant: ok",
    "###Human: Tell me a story. ###Assistant: " + "Once upon a time there was a tiny reward model. " * 6,
    "###Human: Why is the sky blue? ###Assistant: Sunlight scatters off air molecules, blue light the most.",
]


def test_tiny_chain_export_scores_the_same_in_transformers(tiny_chain, tmp_path):
    """pipeline("text-classification") and AutoModelForSequenceClassification with the export's own tokenizer, on raw
    strings, give eval.py score's rewards: the export's tokenizer appends the EOS the reward is read at."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
    export = tiny_chain / "rm" / "export"
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in CARD_STYLE))
    eval_cli.main(["score", "--model", str(export), "--input", str(inp), "--output", str(tmp_path / "out.jsonl")])
    ours = np.array([json.loads(x)["reward"] for x in (tmp_path / "out.jsonl").read_text().splitlines()])

    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()
    batch = tok(CARD_STYLE, padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(-1).unique().numel() == len(CARD_STYLE)  # all lengths differ: real padding
    assert (batch["input_ids"][torch.arange(len(CARD_STYLE)), batch["attention_mask"].sum(-1) - 1]
            == tok.eos_token_id).all()
    with torch.no_grad():
        auto = model(**batch).logits[:, 0].numpy()
    assert np.allclose(auto, ours, atol=1e-4), (auto, ours)
    pipe = pipeline("text-classification", model=model, tokenizer=tok, function_to_apply="none")
    piped = np.array([r["score"] for r in pipe(CARD_STYLE, batch_size=len(CARD_STYLE))])
    assert np.allclose(piped, ours, atol=1e-4), (piped, ours)
    # the SFT export's tokenizer stays BOS-only, so generation prompts do not end in EOS
    sft_tok = AutoTokenizer.from_pretrained(tiny_chain / "sft" / "export")
    assert sft_tok("###Human: hi").input_ids[-1] != sft_tok.eos_token_id


def test_score_under_torchrun_equals_one_process(model_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": x if isinstance(x, str) else x[0] + x[1]}) + "\n" for x in ITEMS * 3))
    repo = Path(eval_cli.__file__).resolve().parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(repo / "eval.py"),
           "score", "--model", str(model_dir), "--input", str(inp), "--output", str(tmp_path / "two.jsonl"),
           "--batch-size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(x)["reward"] for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert np.allclose(two, direct(model_dir, ITEMS * 3), atol=1e-5)


def test_wandb_disabled_never_imports_it(tmp_path, hh_file, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would now raise ImportError
    tok = tmp_path / "tok"
    import gzip
    with gzip.open(hh_file, "rt") as f:
        train_tokenizer([json.loads(line)["chosen"] for _, line in zip(range(200), f)], tok, vocab_size=400)
    from helpers.runs import args as train_args
    train.main(train_args("rm", tmp_path / "run", hh_file, str(tok), "optim.max_steps=1", "logging.wandb=disabled"))
    assert (tmp_path / "run" / "export" / "config.json").is_file()


def test_readme_python_example_gives_one_reward_three_ways(tiny_chain, monkeypatch):
    """The README's Python block, run as written against the tiny chain's export: API, by hand, transformers."""
    from pathlib import Path
    readme = (Path(train.__file__).resolve().parent / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tiny_chain.parent.parent)  # the README's paths are runs/tiny/...
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["text"].startswith("###Human: ") and " ###Assistant: " in scope["text"]
    assert abs(scope["reward"] - scope["reward_by_hand"]) < 1e-5
    assert abs(scope["reward"] - scope["reward_in_transformers"]) < 1e-4
