"""Countermeasures to reward hacking, end to end: a gold judge that is only ever logged (raft.py, ppo.py), a
length-disentangled reward model (train.py's loss.length_head, ODIN) read head by head, and compare under two
judges. The ensembles: tests/formulas/test_ensembles.py and test_raft.py; ODIN's terms: tests/formulas/test_odin.py.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rmcore.data.datasets import tokenize_pairs
from rmcore.data.formats import read_examples
from rmcore.errors import ConfigError, DataError
from rmcore.eval.scorer import RewardScorer
from rmcore.losses import pairwise_loss

import eval as eval_cli
import ppo
import raft
import train
from helpers import rewards as helper_rewards
from helpers.runs import args, assert_same_weights, ppo_args, raft_args, records, torchrun, weights, without_times

GOLD_KEYS = ("gold_first", "gold_all", "gold_kept", "objective/gold_scores", "held_out_gold")


def without_gold(history):
    """A history without the gold judge's figures and the seconds each phase took."""
    return [{k: v for k, v in h.items() if k not in GOLD_KEYS} for h in without_times(history)]


@pytest.mark.parametrize("script", ["raft", "ppo"])
def test_a_gold_judge_of_random_noise_leaves_training_bit_identical(script, tmp_path, hh_file, policy_dir, rm_dir):
    """The gold judge draws from python's, numpy's and torch's global generators; the run must not notice."""
    def run(out, *extra):
        if script == "raft":
            return raft.main(raft_args(out, hh_file, policy_dir, "raft.iterations=2", *extra))
        return ppo.main(ppo_args(out, hh_file, policy_dir, rm_dir, "ppo.iterations=2", *extra))

    plain = run(tmp_path / "plain")
    judged = run(tmp_path / "judged", f"{script}.gold_reward=helpers.rewards:noise")
    key = "gold_first" if script == "raft" else "objective/gold_scores"
    assert all(key in h for h in judged) and not any(key in h for h in plain)
    assert without_gold(judged) == without_gold(plain)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "judged")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_gold_judge_scores_exactly_what_the_proxy_scored(tmp_path, hh_file, policy_dir):
    helper_rewards.SEEN["proxy"].clear()
    helper_rewards.SEEN["gold"].clear()
    history = raft.main(raft_args(tmp_path / "r", hh_file, policy_dir, "raft.iterations=2",
                                  "raft.reward=helpers.rewards:recorded_count_e",
                                  "raft.gold_reward=helpers.rewards:recorded_words"))
    proxy, gold = helper_rewards.SEEN["proxy"], helper_rewards.SEEN["gold"]
    assert [(p, r) for p, r, _ in proxy] == [(p, r) for p, r, _ in gold] and len(gold) == 2 * 16 * 4
    for it, h in enumerate(history):  # the logged gold figures are the judge's scores of that iteration's samples
        scores = [g for _, _, g in gold[it * 64:(it + 1) * 64]]
        assert h["gold_all"] == pytest.approx(np.mean(scores))
        assert h["gold_first"] == pytest.approx(np.mean(scores[::4]))
    assert (tmp_path / "r" / "raft_history.png").is_file()


def test_gold_judge_must_differ_from_the_reward(tmp_path, hh_file, policy_dir):
    with pytest.raises(ConfigError, match="gold judge"):
        raft.main(raft_args(tmp_path / "r", hh_file, policy_dir, "raft.gold_reward=helpers.rewards:count_e"))


@pytest.fixture(scope="module")
def odin_dir(hh_file, tok_dir, tmp_path_factory):
    """A length-disentangled reward model trained for 0 steps' worth of learning rate: the export is its start."""
    out = tmp_path_factory.mktemp("odin")
    train.main(args("rm", out, hh_file, tok_dir, "loss.length_head=true", "optim.lr=0", "optim.max_steps=1",
                    "optim.micro_batch_size=64", "data.eval=[]", "loss.length_coef=0.7", "loss.quality_coef=0.3",
                    "loss.orthogonality_coef=2.0"))
    return out


def test_length_head_step_logs_the_odin_terms_computed_by_hand(odin_dir, hh_file):
    """Step 1 sees every training pair in one micro-batch (Pearson is order-free), with the weights the export
    holds (lr 0): its logged terms must equal a brute-force recomputation from eval.py's per-head rewards."""
    scorer = RewardScorer(odin_dir / "export", head="quality", max_length=256)
    assert scorer.head_names == ("quality", "length")
    examples, report = read_examples([f"{hh_file}[:40]"], name="pairs")
    pairs = tokenize_pairs(examples, scorer.tokenizer, scorer.template, max_length=256, report=report,
                           response_starts=True)
    n = len(pairs)
    heads = scorer.head_rewards(pairs.chosen + pairs.rejected)
    lengths = np.array([len(s) - int(st) for seqs, col in ((pairs.chosen, 0), (pairs.rejected, 1))
                        for s, st in zip(seqs, pairs.response_starts[:, col])], dtype=float)
    total = heads.sum(-1)
    step1 = [r for r in records(odin_dir) if r.get("step") == 1 and "loss" in r][0]
    bt = float(pairwise_loss(torch.from_numpy(total[:n]), torch.from_numpy(total[n:])))
    head = load_file(str(odin_dir / "export" / "model.safetensors"))["score.weight"].double().numpy()
    assert step1["loss"] == pytest.approx(bt, rel=1e-4)
    assert step1["length_loss"] == pytest.approx(-0.7 * np.corrcoef(heads[:, 1], lengths)[0, 1], abs=1e-4)
    assert step1["quality_loss"] == pytest.approx(0.3 * abs(np.corrcoef(heads[:, 0], lengths)[0, 1]), abs=1e-4)
    assert step1["orthogonality_loss"] == pytest.approx(2.0 * abs(head[0] @ head[1]), rel=1e-4)
    assert step1["total_loss"] == pytest.approx(step1["loss"] + step1["length_loss"] + step1["quality_loss"]
                                                + step1["orthogonality_loss"], rel=1e-5)


def test_length_disentangled_model_loads_in_transformers_head_by_head(odin_dir):
    from transformers import AutoModelForSequenceClassification
    config = json.loads((odin_dir / "export" / "config.json").read_text())
    assert config["id2label"] == {"0": "quality", "1": "length"}
    hf = AutoModelForSequenceClassification.from_pretrained(odin_dir / "export").eval()
    scorer = RewardScorer(odin_dir / "export", head="quality")
    seqs = scorer.encode([("\n\nHuman: hi\n\nAssistant:", " hello there"), ("\n\nHuman: a\n\nAssistant:", " b")])
    ours = scorer.head_rewards(seqs)
    with torch.no_grad():
        theirs = np.stack([hf(torch.tensor([s])).logits[0].double().numpy() for s in seqs])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    for head, expected in (("quality", ours[:, 0]), ("length", ours[:, 1]), ("sum", ours.sum(-1))):
        np.testing.assert_allclose(RewardScorer(odin_dir / "export", head=head).score_ids(seqs), expected)


def test_eval_report_gives_spearman_per_head_and_one_head_models_have_no_length_head(odin_dir, rm_dir, hh_file,
                                                                                    tmp_path):
    out = eval_cli.main(["--model", str(odin_dir / "export"), "--data", f"{hh_file}[2200:2230]", "--out",
                         str(tmp_path / "e"), "--head", "sum"])
    [report] = next(iter(out.values())).values()
    by_head = report["length"]["spearman_by_head"]
    assert set(by_head) == {"quality", "length", "sum"}
    assert report["length"]["spearman_reward_length"] == pytest.approx(by_head["sum"])
    assert "by head" in (tmp_path / "e" / "report.md").read_text()
    with pytest.raises(DataError, match="head"):
        RewardScorer(rm_dir, head="length")


def test_two_process_length_head_training_matches_one_process(tmp_path, hh_file, tok_dir):
    """The orthogonality term's gradient reaches the FSDP2-sharded head exactly once (a large coefficient makes a
    doubled or lost gradient visible). The correlation terms are per micro-batch, as batch statistics are, so a
    different split of the step changes them: they are off here."""
    common = ("loss.length_head=true", "loss.length_coef=0", "loss.quality_coef=0", "loss.orthogonality_coef=5",
              "optim.max_steps=3", "data.eval=[]", "optim.grad_clip=0")
    one = torchrun(1, "train.py", args("rm", tmp_path / "one", hh_file, tok_dir, "optim.micro_batch_size=8", *common))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, "train.py", args("rm", tmp_path / "two", hh_file, tok_dir, "optim.micro_batch_size=4",
                                       "optim.grad_accum=1", *common))
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=2e-5)


def test_compare_reports_two_judges_and_repetition(tmp_path, hh_file, policy_dir, rm_dir, odin_dir):
    r = eval_cli.main(["compare", "--policy-a", str(policy_dir), "--policy-b", str(policy_dir), "--judge", str(rm_dir),
                       "--judge", str(odin_dir / "export"), "--prompts", f"{hh_file}[:4]", "--max-new-tokens", "8",
                       "--out", str(tmp_path / "c")])
    assert [j["judge"] for j in r["judges"]] == [str(rm_dir), str(odin_dir / "export")]
    assert r["wins"] == r["judges"][0]["wins"]
    quality = RewardScorer(odin_dir / "export", truncate="left").score([(s["prompt"], s["a"]) for s in r["samples"]])
    np.testing.assert_allclose([s["rewards_a"][1] for s in r["samples"]], quality, atol=1e-6)
    assert 0 <= r["repeated_4gram_rate_a"] <= 1
