"""Rankings of K responses end to end: configs/tiny_ranking.yaml trains the tiny reward model on rankings made from
the shipped pairs (tests/helpers/ranked.py), gradient accumulation leaves the math unchanged, and eval.py reports
pairwise and best-of-K accuracy that a brute-force loop over the model's own rewards reproduces."""
import json

import numpy as np
import pytest

from rmcore.data.template import Template
from rmcore.errors import ConfigError
from rmcore.eval.scorer import RewardScorer
from rmcore.tokenizer import Tokenizer

import eval as eval_cli
import train
from helpers.ranked import rankings_from_pairs
from helpers.runs import MODEL, REPO, assert_same_weights, losses, records, torchrun


def short(records, tok_dir, max_length=256):
    """The rankings with no text over data.max_length tokens, so that the brute force below scores exactly the
    responses eval.py keeps."""
    tok, template = Tokenizer.from_pretrained(tok_dir), Template()
    return [r for r in records
            if all(len(tok.encode(template.render(r["prompt"], x), bos=True, eos=True)) <= max_length
                   for x in r["responses"])]


@pytest.fixture(scope="module")
def ranked_files(hh_file, tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranked")
    held_out = short(rankings_from_pairs(f"{hh_file}[1932:]", seed=1), tok_dir)[:24]
    files = []
    for name, rows in (("train.jsonl", rankings_from_pairs(f"{hh_file}[:40]")), ("eval.jsonl", held_out)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(out / name)
    return files


def ranking_args(out, tok_dir, files, *extra):
    """train.py's command line: the shipped tiny ranking config, made tiny, fp32, on the test's files."""
    train_file, eval_file = files
    return ["--config", str(REPO / "configs" / "tiny_ranking.yaml"), f"run.out_dir={out}", "run.init_from=null",
            f"run.tokenizer={tok_dir}", "run.precision=fp32", "logging.progress=false", "optim.lr=1e-3",
            "optim.warmup_ratio=0", "optim.grad_clip=0", f"data.train=['{train_file}']", f"data.eval=['{eval_file}']",
            "data.max_length=256", *MODEL, *extra]


def brute_force_figures(scorer, rows):
    """(ordered pairs, wins, best-of-K hits) with plain loops over the records as written, each response scored
    alone by the model (a tie in the rewards is a loss)."""
    pairs = wins = hits = 0
    for row in rows:
        if "scores" in row:
            score = row["scores"]
        else:  # the place of each response in the best-first ranking, an inner list a tie
            score = [0.0] * len(row["responses"])
            for place, entry in enumerate(row["ranking"]):
                for i in entry if isinstance(entry, list) else [entry]:
                    score[i] = -place
        reward = scorer.score([(row["prompt"], x) for x in row["responses"]])
        k = len(reward)
        for i in range(k):
            for j in range(k):
                if score[i] > score[j]:
                    pairs += 1
                    wins += reward[i] > reward[j]
        top = [i for i in range(k) if score[i] == max(score)]
        best_top = max(reward[i] for i in top)
        hits += all(best_top > reward[j] for j in range(k) if j not in top)
    return pairs, wins, hits


def test_a_ranked_run_trains_and_eval_reports_best_of_k(tmp_path, tok_dir, ranked_files, hh_file, capsys):
    out = tmp_path / "rank"
    train.main(ranking_args(out, tok_dir, ranked_files, "optim.max_steps=5", "loss.ranking=plackett_luce"))
    steps = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) and 0 <= r["acc"] <= 1 and 0 <= r["best_of_k"] <= 1 for r in steps)
    final = [r for r in records(out) if "eval_best_of_k" in r][-1]
    assert final["eval_prompts"] == 24 and final["eval_pairs"] > 2 * 24
    assert "rankings:" in capsys.readouterr().out  # the data report: prompts, pairs, ties

    eval_cli.main(["--model", str(out / "export"), "--data", str(ranked_files[1]), "--data", f"{hh_file}[2200:2230]",
                   "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["results"]["rank"]
    r = report[str(ranked_files[1])]
    assert r["kind"] == "ranked" and r["prompts"] == 24 and "accuracy" in report[f"{hh_file}[2200:2230]"]
    rows = [json.loads(x) for x in ranked_files[1].read_text().splitlines()]
    pairs, wins, hits = brute_force_figures(RewardScorer(out / "export"), rows)
    assert (r["pairs"], r["accuracy"], r["best_of_k"]) == (pairs, pytest.approx(wins / pairs), pytest.approx(hits / 24))
    # the held-out figures of training are the same numbers
    assert (final["eval_acc"], final["eval_best_of_k"]) == (pytest.approx(r["accuracy"]), pytest.approx(r["best_of_k"]))
    assert final["eval_loss"] == pytest.approx(r["loss"]["plackett_luce"], rel=1e-4)
    assert f"(best-of-K {100 * r['best_of_k']:.2f})" in printed and "best-of-K" in printed
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "- best-of-K accuracy:" in md and "| K | prompts |" in md and "- accuracy:" in md  # both kinds of set


def test_ranked_accumulation_equals_one_big_batch(tmp_path, tok_dir, ranked_files):
    big = ranking_args(tmp_path / "big", tok_dir, ranked_files, "optim.micro_batch_size=4", "optim.grad_accum=1",
                       "optim.max_steps=3", "run.eval_every=0", "data.eval=[]")
    small = ranking_args(tmp_path / "small", tok_dir, ranked_files, "optim.micro_batch_size=2", "optim.grad_accum=2",
                         "optim.max_steps=3", "run.eval_every=0", "data.eval=[]", "data.group_by_length=false")
    train.main([*big, "data.group_by_length=false"])
    train.main(small)
    lb, ls = losses(tmp_path / "big"), losses(tmp_path / "small")
    assert len(lb) == 3 and all(abs(lb[s] - ls[s]) < 1e-6 for s in lb) and lb[1] != lb[3]
    assert_same_weights(tmp_path / "big", tmp_path / "small", atol=1e-4)


def test_pair_settings_on_rankings_are_errors(tmp_path, tok_dir, ranked_files):
    for setting in ("loss.margin=true", "loss.center_coef=0.01", "data.pack_pairs=false"):
        with pytest.raises(ConfigError, match=f"^{setting.split('=')[0]}.*applies to pairs"):
            train.main(ranking_args(tmp_path / "bad", tok_dir, ranked_files, setting))
    assert not (tmp_path / "bad" / "config.yaml").exists()  # stopped before anything was written


def test_two_processes_match_one(tmp_path, tok_dir, ranked_files):
    # The denominator is the step's prompts over both ranks; each rank's micro-batch holds half of them.
    common = ["optim.max_steps=3", "run.eval_every=0", "data.group_by_length=false"]
    one = torchrun(1, "train.py", ranking_args(tmp_path / "one", tok_dir, ranked_files, "optim.micro_batch_size=4",
                                               *common))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, "train.py", ranking_args(tmp_path / "two", tok_dir, ranked_files, "optim.micro_batch_size=2",
                                               *common))
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == 3 and all(abs(l1[s] - l2[s]) < 1e-5 for s in l1), (l1, l2)
    e1, e2 = ([r for r in records(tmp_path / run) if "eval_loss" in r][-1] for run in ("one", "two"))
    assert e1["eval_prompts"] == e2["eval_prompts"] == 24 and abs(e1["eval_loss"] - e2["eval_loss"]) < 1e-5
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-4)
