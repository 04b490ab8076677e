"""Toxicity scorers as reward specs, and `eval.py toxicity`.

The `classifier:` scorer on tiny randomly initialised sequence classifiers saved here equals transformers'
`pipeline("text-classification")` (softmax and multi-label sigmoid models, by-name and default labels); `profanity`
equals `profanity_check.predict_prob`; negation and scaling; a classifier named by hub id through the stand-in Hub;
`eval.py toxicity` end to end (its figures recomputed from the samples it wrote, the same bytes for the same seed);
and bad input as one line with nothing written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, pipeline

from rmcore.align.rewards import load_reward
from rmcore.align.toxicity import TOXICITY_METRICS
from rmcore.errors import ConfigError, UserError

import eval as eval_cli
from helpers.hub_server import HubServer

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["you are a stupid idiot", "have a nice day", "", "the weather is nice and the day is long " * 30,
         "shut up, you fool", "thank you"]
WORDS = sorted({w.strip(",") for t in TEXTS for w in t.split()}) + ["hate", "love"]


def tiny_classifier(out: Path, labels: dict[int, str], *, multi_label: bool = False, seed: int = 0) -> Path:
    """A 2-layer BERT classifier with random weights and a word-level vocabulary, saved as transformers saves it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), model_max_length=64)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128, num_labels=len(labels),
                        id2label=labels, label2id={v: k for k, v in labels.items()},
                        problem_type="multi_label_classification" if multi_label else None)
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifiers")
    return {"softmax": tiny_classifier(root / "softmax", {0: "nothate", 1: "hate"}),
            "multi": tiny_classifier(root / "multi", {0: "obscene", 1: "toxic", 2: "insult"}, multi_label=True,
                                     seed=1),
            "unnamed": tiny_classifier(root / "unnamed", {0: "LABEL_0", 1: "LABEL_1"}, seed=2)}


def pipeline_probability(model_dir: Path, label: str) -> list[float]:
    """transformers' own text-classification pipeline, every label's score, truncating as the scorer does."""
    pipe = pipeline("text-classification", model=str(model_dir), top_k=None, device="cpu")
    out = pipe(TEXTS, truncation=True, max_length=64)
    return [next(d["score"] for d in row if d["label"] == label) for row in out]


@pytest.mark.parametrize("kind, label, spec_label", [("softmax", "hate", None), ("softmax", "nothate", "nothate"),
                                                      ("multi", "toxic", None), ("multi", "insult", "insult"),
                                                      ("unnamed", "LABEL_1", None)])
def test_the_classifier_scorer_equals_transformers_pipeline(classifiers, kind, label, spec_label):
    spec = f"classifier:{classifiers[kind]}" + (f":{spec_label}" if spec_label else "")
    reward = load_reward(spec)
    got = reward(["ignored prompt"] * len(TEXTS), TEXTS)
    assert np.allclose(got, pipeline_probability(classifiers[kind], label), atol=1e-6, rtol=0)
    assert reward.truncated == 1  # the long text, cut to the tokenizer's 64 tokens


def test_negation_and_scaling_wrap_any_spec(classifiers):
    plain = load_reward(f"classifier:{classifiers['softmax']}")(["p"] * len(TEXTS), TEXTS)
    assert load_reward(f"-classifier:{classifiers['softmax']}")(["p"] * len(TEXTS), TEXTS) == [-x for x in plain]
    halved = load_reward(f"-0.5*classifier:{classifiers['softmax']}")(["p"] * len(TEXTS), TEXTS)
    assert np.allclose(halved, [-0.5 * x for x in plain], atol=1e-12)


def test_profanity_equals_profanity_check():
    from profanity_check import predict_prob
    got = load_reward("profanity")(["p"] * len(TEXTS), TEXTS)
    assert np.allclose(got, predict_prob(TEXTS), atol=0, rtol=0)
    assert load_reward("2*profanity")(["p"], ["damn it"]) == pytest.approx([2 * predict_prob(["damn it"])[0]])


def test_an_unknown_label_lists_the_models_labels(classifiers):
    with pytest.raises(ConfigError, match="no label 'toxic'; its labels: nothate, hate"):
        load_reward(f"classifier:{classifiers['softmax']}:toxic")


def test_a_model_that_is_not_a_sequence_classifier_is_refused(policy_dir):
    with pytest.raises(ConfigError, match="not a sequence classifier"):
        load_reward(f"classifier:{policy_dir}")


def test_a_classifier_by_hub_id_through_the_stand_in_hub(classifiers, tmp_path):
    hub = HubServer().start()
    try:
        files = {p.name: p.read_bytes() for p in classifiers["multi"].iterdir() if p.is_file()}
        hub.add("org/toxic-tiny", files)
        inputs = tmp_path / "texts.jsonl"
        inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS if t.strip()))
        env = {**{k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")},
               "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        proc = subprocess.run([sys.executable, "eval.py", "score", "--model", "classifier:org/toxic-tiny:insult",
                               "--input", inputs, "--output", tmp_path / "scores.jsonl"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        hub.stop()
    got = [json.loads(line)["reward"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    expected = [p for t, p in zip(TEXTS, pipeline_probability(classifiers["multi"], "insult")) if t.strip()]
    assert np.allclose(got, expected, atol=1e-6, rtol=0)
    snapshot = next((tmp_path / "hf" / "hub" / "models--org--toxic-tiny" / "snapshots").iterdir())
    assert (snapshot / "vocab.txt").is_file()  # a BERT tokenizer's file, fetched beside rmcore's own


# ------------------------------------------------------------------------------------------------ eval.py toxicity


def toxicity(argv, **env):
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "eval.py", "toxicity", *map(str, argv)], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def rtp_file(tmp_path_factory):
    """Five RealToxicityPrompts-shaped rows (two challenging), and one without prompt text."""
    rows = [{"filename": f"f{i}", "challenging": i % 2 == 0,
             "prompt": {"text": text, "toxicity": tox}, "continuation": {"text": "...", "toxicity": 0.1}}
            for i, (text, tox) in enumerate([("The man said that", 0.1), ("You are such a", 0.6),
                                             ("Human rights are", 0.05), ("What the hell is", 0.4),
                                             ("I think that you", 0.2)])]
    rows.append({"filename": "bad", "prompt": {"text": None}})
    path = tmp_path_factory.mktemp("rtp") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_toxicity_reports_the_figures_of_the_samples_it_wrote_and_repeats_them_for_a_seed(
        policy_dir, rtp_file, hh_file, tmp_path):
    common = ["--policy", policy_dir, "--policy", policy_dir, "--scorer", "profanity", "--k", 3,
              "--max-new-tokens", 6, "--resamples", 50]
    runs = []
    for name in ("a", "b"):
        proc = toxicity([*common, "--prompts", rtp_file, "--out", tmp_path / name])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((tmp_path / name / "toxicity.json").read_text())
    assert runs[0] == runs[1]  # deterministic for the seed
    r = json.loads(runs[0])
    assert r["prompts"] == 5 and r["dropped"]["read"] == 6 and \
        r["dropped"]["dropped"] == {"not a RealToxicityPrompts row (prompt.text)": 1} and r["settings"]["plain_prompts"]
    assert (tmp_path / "a" / "toxicity.md").read_text().count("Most toxic continuations") == 2
    assert (tmp_path / "a" / "toxicity.png").stat().st_size > 0
    from profanity_check import predict_prob
    for j, policy in enumerate(r["policies"]):
        texts = [c["text"] for s in r["samples"] for c in s[f"policy_{j}"]]
        scores = np.array([0.0 if not t.strip() else float(predict_prob([t])[0]) for t in texts]).reshape(5, 3)
        for name, metric in TOXICITY_METRICS.items():
            assert policy[name] == pytest.approx(metric(scores), abs=1e-9)
            assert policy[f"{name}_ci"][0] <= policy[name] + 1e-12
        assert policy["empty_continuations"] == sum(not t.strip() for t in texts)
    # the same policy, the same seed: the same continuations, so every paired difference and its CI is 0
    assert all(c[name]["difference"] == 0 and c[name]["ci"] == [0, 0]
               for c in r["comparisons"] for name in TOXICITY_METRICS)
    # a subset and a seeded sample of it (in this process: the CLI's path is the runs above)
    eval_cli.main(["toxicity", *map(str, [*common[:2], "--prompts", rtp_file, "--challenging", "--k", 2,
                                          "--max-new-tokens", 3, "--sample", 2, "--out", tmp_path / "c"])])
    assert json.loads((tmp_path / "c" / "toxicity.json").read_text())["prompts"] == 2
    # an rmcore prompt file: chat-formatted, as the loops render it
    eval_cli.main(["toxicity", *map(str, [*common[:2], "--prompts", f"{hh_file}[:3]", "--k", 2, "--max-new-tokens", 3,
                                          "--out", tmp_path / "d"])])
    assert not json.loads((tmp_path / "d" / "toxicity.json").read_text())["settings"]["plain_prompts"]


def test_a_sample_of_n_prompts_is_n_prompts_that_fit_with_the_longer_ones_met_skipped_and_counted(
        policy_dir, hh_file, tmp_path):
    from rmcore.align.compare import recorded_template
    from rmcore.data.formats import read_examples
    from rmcore.data.template import Template
    from rmcore.tokenizer import Tokenizer
    examples, _ = read_examples([f"{hh_file}[:12]"])
    tok = Tokenizer.from_pretrained(policy_dir)
    template = (recorded_template(policy_dir) or Template()).check(tok)
    lengths = {e.id: len(tok.encode(template.render(e.prompt), bos=True, specials=template.special_tokens))
               for e in examples}
    limit = sorted(lengths.values())[len(lengths) // 2]  # about half of the prompts fit
    fitting = {i for i, n in lengths.items() if n <= limit}
    assert 3 <= len(fitting) < len(lengths)
    eval_cli.main(["toxicity", *map(str, ["--policy", policy_dir, "--prompts", f"{hh_file}[:12]", "--k", 1,
                                          "--max-new-tokens", 2, "--resamples", 10, "--sample", 3,
                                          "--max-prompt-tokens", limit, "--out", tmp_path])])
    r = json.loads((tmp_path / "toxicity.json").read_text())
    ids = [s["id"] for s in r["samples"]]
    assert r["prompts"] == 3 and set(ids) <= fitting and ids == sorted(ids, key=list(lengths).index)
    skipped = r["dropped"]["dropped"].get(f"prompt longer than {limit} tokens for a policy", 0)
    assert skipped <= len(lengths) - len(fitting) and r["dropped"]["kept"] == 3
    assert f"a seeded random sample (seed 0) of 3 of the {len(lengths)} prompts read" in \
        (tmp_path / "toxicity.md").read_text()


def assert_one_line_failure(proc, out: Path, *phrases):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    for phrase in phrases:
        assert phrase in last, last
    assert not out.exists()  # nothing written half


def test_bad_toxicity_input_is_one_line_and_writes_nothing(policy_dir, rtp_file, classifiers, tmp_path, monkeypatch):
    """The first case as a user meets it (a process: its exit status, one stderr line, no traceback); the rest
    through eval.py's main in this process, each the UserError whose message that line would print."""
    out = tmp_path / "out"
    base = ["--policy", policy_dir, "--prompts", rtp_file, "--out", out, "--max-new-tokens", 2]
    assert_one_line_failure(toxicity([*base, "--k", 0]), out, "--k 0: expected >= 1")

    def refused(argv, *phrases, error=ConfigError):
        with pytest.raises(error) as raised:
            eval_cli.main(["toxicity", *map(str, argv)])
        for phrase in phrases:
            assert phrase in str(raised.value), str(raised.value)
        assert not out.exists()  # nothing written half

    refused([*base, "--sample", 0], "--sample 0: expected >= 1")
    refused([*base, "--k", 1, "--scorer", f"classifier:{classifiers['softmax']}:toxic"], "no label 'toxic'",
            "nothate, hate")
    refused([*base, "--k", 1, "--scorer", f"classifier:{policy_dir}"], "not a sequence classifier")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": {"text": "  "}}) + "\n")
    refused(["--policy", policy_dir, "--prompts", empty, "--out", out], "no prompts", error=UserError)
    # the extra not installed: profanity_check cannot be imported
    monkeypatch.setitem(sys.modules, "profanity_check", None)
    refused([*base, "--k", 1], "pip install -e '.[toxicity]'")
