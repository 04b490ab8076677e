"""What the loops do when something goes wrong: a NaN storm, a broken policy, a reward that misbehaves, bad
sampler settings, an export interrupted, a RAFT iteration that keeps nothing, an empty comparison. Each is one
line naming what to fix, a non-zero exit, and nothing broken written."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from rmcore.align.rewards import checked_rewards
from rmcore.errors import CheckpointError, ConfigError, NonFiniteOutputs, RewardError, UserError
from rmcore.interop.hf_checkpoint import load_pretrained
from rmcore.model import CausalLM, RewardModel
from rmcore.tokenizer import Tokenizer
from rmcore.training.checkpoints import export_pretrained
from rmcore.training.distributed import Dist

import eval as eval_cli
import ppo
import raft
import train
from helpers import rewards
from helpers.runs import REPO, TESTS, args, ppo_args, raft_args

STORM = ["optim.lr=1e30", "run.on_nonfinite=skip"]  # step 1 sends the weights to ~1e30; every later loss is NaN


def script(name, argv):
    """`python name.py argv` as a user runs it (tests/ on PYTHONPATH for the test rewards)."""
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / f"{name}.py"), *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)


def assert_one_line_failure(proc, *phrases):
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for phrase in phrases:
        assert phrase in last, last


def test_a_nan_storm_in_train_py_exports_nothing(tmp_path, hh_file, tok_dir):
    """9 of 10 steps skipped (never 10 in a row): a stop at the end, no checkpoint and no export."""
    out = tmp_path / "rm"
    proc = script("train", args("rm", out, hh_file, tok_dir, *STORM, f"data.train=['{hh_file}[:200]']",
                                "optim.max_steps=10", "run.eval_every=0", "data.eval=[]"))
    assert_one_line_failure(proc, "9 of its 10 steps were skipped", "run.max_skipped_fraction=0.25")
    assert not (out / "export").exists() and not list(out.glob("checkpoints/step_*"))
    # with any share of skips allowed, the outputs of the finite 1e30 weights stop it
    with pytest.raises(NonFiniteOutputs, match="outputs on a probe input are NaN or inf"):
        train.main(args("rm", tmp_path / "rm2", hh_file, tok_dir, *STORM, "optim.max_steps=10", "run.eval_every=0",
                        "data.eval=[]", "run.max_skipped_fraction=1"))
    assert not (tmp_path / "rm2" / "export").exists()


@pytest.mark.parametrize("iterations", [1, 2])
def test_a_nan_storm_in_raft_py_exports_nothing(tmp_path, hh_file, policy_dir, iterations):
    out = tmp_path / "raft"
    proc = script("raft", raft_args(out, hh_file, policy_dir, *STORM, f"raft.iterations={iterations}"))
    assert_one_line_failure(proc, "after raft iteration 1", "1 of its 2 steps were skipped")
    assert not (out / "export").exists() and not (out / "iterations").exists()
    with pytest.raises(NonFiniteOutputs, match="after raft iteration 1: its outputs on a probe input"):
        raft.main(raft_args(tmp_path / "raft2", hh_file, policy_dir, *STORM, "raft.iterations=2",
                            "run.max_skipped_fraction=1"))
    assert not (tmp_path / "raft2" / "iterations").exists()


def test_a_nan_storm_in_ppo_py_exports_nothing(tmp_path, hh_file, policy_dir, rm_dir):
    out = tmp_path / "ppo"
    proc = script("ppo", ppo_args(out, hh_file, policy_dir, rm_dir, *STORM, "ppo.iterations=1"))
    assert_one_line_failure(proc, "after ppo iteration 1", "3 of its 4 steps were skipped")
    assert not (out / "export").exists() and not (out / "iterations").exists()


def test_sampling_from_a_broken_policy_is_one_error_naming_the_iteration(tmp_path, hh_file, policy_dir):
    broken = tmp_path / "broken"
    shutil.copytree(policy_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    # finite weights whose logits overflow, as after a NaN storm (scaling every weight would not do: RMSNorm of an
    # overflowed activation is 0, and the logits come out uniform)
    scaled = {k: v * 1e30 if k in ("lm_head.weight", "model.norm.weight") else v for k, v in weights.items()}
    save_file(scaled, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteOutputs, match=r"raft iteration 1, sampling: the model's logits are NaN or inf"):
        raft.main(raft_args(tmp_path / "r", hh_file, broken, "raft.iterations=1"))


@pytest.mark.parametrize("name, returned", [("raises", "raised ZeroDivisionError: float division by zero (at"),
                                            ("returns_nan", "returned a non-finite reward nan for response 0"),
                                            ("one_short", "returned 2 rewards for 3 responses"),
                                            ("strings", "returned 'good' (str) for response 0; expected a number"),
                                            ("returns_none", "returned None (NoneType); expected a list of 3")])
def test_a_broken_reward_function_is_one_line_naming_it(name, returned):
    with pytest.raises(RewardError) as e:
        checked_rewards(getattr(rewards, name), ["p"] * 3, ["a", "b", "c"],
                        source=f"raft.reward=helpers.rewards:{name}")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"raft.reward=helpers.rewards:{name} ") and returned in message


def test_the_loops_name_the_reward_and_the_iteration(tmp_path, hh_file, policy_dir, rm_dir):
    with pytest.raises(RewardError, match=r"raft.reward=helpers.rewards:strings \(iteration 1, samples\) returned "
                                          r"'good' \(str\)"):
        raft.main(raft_args(tmp_path / "r", hh_file, policy_dir, "raft.reward=helpers.rewards:strings"))
    proc = script("ppo", ppo_args(tmp_path / "p", hh_file, policy_dir, rm_dir, "ppo.reward=helpers.rewards:raises"))
    assert_one_line_failure(proc, "ppo.reward=helpers.rewards:raises (iteration 1, samples) raised ZeroDivisionError")


@pytest.mark.parametrize("setting, message", [
    ("top_p=0", "top_p=0"), ("top_p=1.5", "top_p=1.5"), ("top_k=-1", "top_k=-1; expected >= 0"),
    ("temperature=0", "temperature=0"), ("max_new_tokens=0", "max_new_tokens=0; expected >= 1"),
    ("k=0", "k=0; expected >= 1"), ("prompts_per_iter=0", "prompts_per_iter=0; expected >= 1"),
    ("iterations=0", "iterations=0; expected >= 1")])
def test_bad_sampler_settings_stop_both_loops_at_start(tmp_path, hh_file, policy_dir, rm_dir, setting, message):
    with pytest.raises(ConfigError, match=f"raft.{message}"):
        raft.main(raft_args(tmp_path / "r", hh_file, policy_dir, f"raft.{setting}"))
    with pytest.raises(ConfigError, match=f"ppo.{message}"):
        ppo.main(ppo_args(tmp_path / "p", hh_file, policy_dir, rm_dir, f"ppo.{setting}"))
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()  # before any run directory


def test_compare_on_no_prompt_is_an_error(tmp_path, hh_file, policy_dir, rm_dir):
    with pytest.raises(UserError, match="selects no record"):
        eval_cli.main(["compare", "--policy-a", str(policy_dir), "--policy-b", str(policy_dir), "--judge",
                       str(rm_dir), "--prompts", f"{hh_file}[5:5]", "--out", str(tmp_path / "cmp")])
    assert not (tmp_path / "cmp").exists()
    with pytest.raises(SystemExit):
        eval_cli.main(["compare", "--policy-a", str(policy_dir), "--policy-b", str(policy_dir), "--judge",
                       str(rm_dir), "--prompts", f"{hh_file}[:4]", "--top-p", "0"])


def test_an_interrupted_export_leaves_the_previous_one_and_readers_name_an_incomplete_one(tmp_path, hh_file,
                                                                                         policy_dir, monkeypatch):
    model, tok = load_pretrained(CausalLM, policy_dir), Tokenizer.from_pretrained(policy_dir)
    out = tmp_path / "export"
    export_pretrained(model, out, Dist(device=torch.device("cpu")), tokenizer=tok)
    before = load_file(str(out / "model.safetensors"))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed while writing the tokenizer")

    monkeypatch.setattr(Tokenizer, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        export_pretrained(model, out, Dist(device=torch.device("cpu")), tokenizer=tok)
    after = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before) and (out / "tokenizer.model").is_file()
    # a folder with weights and no config.json (what an in-place write left) is named for what it is
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(out / "model.safetensors", half)
    for read in (lambda: load_pretrained(CausalLM, half), lambda: load_pretrained(RewardModel, half, new_head=True),
                 lambda: eval_cli.main(["compare", "--policy-a", str(half), "--policy-b", str(policy_dir),
                                        "--judge", str(policy_dir), "--prompts", f"{hh_file}[:2]"])):
        with pytest.raises(CheckpointError, match=r"half: an incomplete export: no config.json \(holds "
                                                  r"model.safetensors\)"):
            read()


def test_raft_stops_after_iterations_that_keep_nothing(tmp_path, hh_file, policy_dir):
    """max_new_tokens=1 with the truncated rule: every sample is cut at the limit, so nothing is kept."""
    with pytest.warns(UserWarning, match=r"no sample kept this iteration: 64 samples, discarded 64 truncated") as w:
        with pytest.raises(UserError, match=r"2 such iteration\(s\) in a row: stopping \(raft.max_empty_iterations=2"):
            raft.main(raft_args(tmp_path / "r", hh_file, policy_dir, "raft.iterations=4", "raft.max_new_tokens=1",
                                "raft.discard=[truncated]"))
    assert len([x for x in w if "no sample kept" in str(x.message)]) == 2
    history = json.loads((tmp_path / "r" / "raft_history.json").read_text())
    assert [h["kept"] for h in history] == [0]  # the first empty iteration ran (and trained on nothing)
