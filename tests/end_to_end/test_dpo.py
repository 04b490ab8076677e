"""train.py's dpo stage end to end on the shipped data with a tiny policy: the three references give the same run,
LoRA starts at margin 0, accumulation and 2 FSDP2 processes change nothing, a kill resumes exactly, and eval.py's
implicit reward agrees with the training loop's."""
import json

import pytest

import eval as eval_script
import train
from helpers.runs import args, assert_same_weights, losses, records, torchrun


def dpo_args(out, hh_file, tok_dir, policy_dir, *extra):
    return args("dpo", out, hh_file, tok_dir, f"run.init_from={policy_dir}", "optim.max_steps=3",
                "optim.micro_batch_size=4", "optim.grad_accum=2", "run.eval_every=2", *extra)


def metric_rows(out):
    """step -> the step's record without timing, and the eval records, from metrics.jsonl."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(out)]


@pytest.mark.parametrize("lora", [False, True])
def test_the_reference_modes_give_the_same_run(lora, tmp_path, hh_file, tok_dir, policy_dir):
    """A frozen copy (or, with LoRA, the policy with its adapters off) and log-probs precomputed once: the same
    losses, metrics and weights."""
    extra = ["model.lora.enabled=true", "model.lora.dropout=0"] if lora else []
    train.main(dpo_args(tmp_path / "live", hh_file, tok_dir, policy_dir, *extra))
    train.main(dpo_args(tmp_path / "pre", hh_file, tok_dir, policy_dir, *extra, "dpo.precompute_reference=true"))
    live, pre = metric_rows(tmp_path / "live"), metric_rows(tmp_path / "pre")
    assert len(live) == 5 and [r.keys() for r in live] == [r.keys() for r in pre]  # 3 steps, 2 evals
    for a, b in zip(live, pre):
        for key in a:
            assert abs(a[key] - b[key]) < 1e-6, (key, a[key], b[key])
    assert (tmp_path / "pre" / "reference_logps_train.pt").is_file()
    assert not (tmp_path / "live" / "reference_logps_train.pt").exists()
    assert_same_weights(tmp_path / "live", tmp_path / "pre", atol=1e-6)
    assert live[-2]["rewards/margins"] != 0  # step 3: the policy moved away from its reference


def test_lora_dpo_starts_at_margin_zero(tmp_path, hh_file, tok_dir, policy_dir):
    train.main(dpo_args(tmp_path / "lora", hh_file, tok_dir, policy_dir, "model.lora.enabled=true"))
    first = records(tmp_path / "lora")[0]
    # adapters start as B = 0: the policy is its reference, exactly, so every implicit reward is 0
    assert first["rewards/margins"] == 0 and first["rewards/chosen"] == 0 and first["rewards/accuracies"] == 0
    assert abs(first["loss"] - 0.6931471805599453) < 1e-7  # -log sigmoid(0)


def test_accumulation_equals_one_big_batch(tmp_path, hh_file, tok_dir, policy_dir):
    train.main(dpo_args(tmp_path / "big", hh_file, tok_dir, policy_dir, "optim.micro_batch_size=8",
                        "optim.grad_accum=1", "dpo.loss=ipo"))
    train.main(dpo_args(tmp_path / "small", hh_file, tok_dir, policy_dir, "optim.micro_batch_size=2",
                        "optim.grad_accum=4", "dpo.loss=ipo"))
    big, small = losses(tmp_path / "big"), losses(tmp_path / "small")
    assert len(big) == 3 and all(abs(big[s] - small[s]) < 1e-5 * max(1, abs(big[s])) for s in big), (big, small)
    assert big[1] != big[3]


def test_dpo_resumes_exactly_after_a_kill(tmp_path, hh_file, tok_dir, policy_dir):
    common = ["optim.max_steps=5", "optim.epochs=2", "run.save_every=2", "dpo.precompute_reference=true",
              "run.eval_every=0"]
    train.main(dpo_args(tmp_path / "full", hh_file, tok_dir, policy_dir, *common))
    with pytest.raises(SystemExit):  # killed after step 3: the last checkpoint is step 2
        train.main(dpo_args(tmp_path / "cut", hh_file, tok_dir, policy_dir, *common, "run.halt_at_step=3"))
    table = tmp_path / "cut" / "reference_logps_train.pt"
    before = table.stat().st_mtime_ns
    train.main(dpo_args(tmp_path / "cut", hh_file, tok_dir, policy_dir, *common))
    assert table.stat().st_mtime_ns == before  # the resumed run read the stored reference, it did not recompute
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "cut")
    assert_same_weights(tmp_path / "full", tmp_path / "cut", atol=0)


def test_two_process_fsdp_matches_one_process(tmp_path, hh_file, tok_dir, policy_dir):
    common = ["optim.grad_accum=1", "optim.epochs=2", "optim.max_steps=3"]
    one = torchrun(1, "train.py", dpo_args(tmp_path / "one", hh_file, tok_dir, policy_dir,
                                           "optim.micro_batch_size=8", *common))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, "train.py", dpo_args(tmp_path / "two", hh_file, tok_dir, policy_dir,
                                           "optim.micro_batch_size=4", *common))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    assert len(a) == 5 and [r.keys() for r in a] == [r.keys() for r in b]  # 3 steps, 2 evals
    for ra, rb in zip(a, b):
        for key in ra:  # relative for the log-probs (~ -240): fp32 sums in another order
            assert abs(ra[key] - rb[key]) < 1e-5 * max(1, abs(ra[key])), (key, ra[key], rb[key])
    # Adam moves a weight whose gradient is ~0 by up to lr = 1e-3 a step whatever that gradient's rounding: where
    # summation order flips it, weights differ by ~1e-4 (1.2e-4 seen) while every loss and metric above agrees
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=3e-4)


def test_implicit_reward_report_agrees_with_the_training_loop(tmp_path, hh_file, tok_dir, policy_dir):
    """eval.py --reference scores the held-out pairs by beta * log pi/pi_ref: its accuracy, margin and reward means
    equal the loop's final evaluation of the same pairs (computed by other code)."""
    train.main(dpo_args(tmp_path / "dpo", hh_file, tok_dir, policy_dir, "dpo.beta=0.3"))
    final = [r for r in records(tmp_path / "dpo") if "eval_loss" in r][-1]
    results = eval_script.main(["--model", str(tmp_path / "dpo" / "export"), "--reference", str(policy_dir),
                                "--data", f"{hh_file}[2200:2230]", "--max-length", "256",
                                "--out", str(tmp_path / "eval")])
    (report,) = results["dpo"].values()
    assert report["pairs"] == final["eval_pairs"] == 16
    assert report["reward"] == {"kind": "implicit", "beta": 0.3, "reference": str(policy_dir)}
    assert abs(report["accuracy"] - final["eval_rewards/accuracies"]) < 1e-9
    assert abs(report["margin"]["mean"] - final["eval_rewards/margins"]) < 1e-5
    assert abs(report["rewards"]["chosen_mean"] - final["eval_rewards/chosen"]) < 1e-5
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["results"]["dpo"]
