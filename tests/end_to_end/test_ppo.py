"""ppo.py end to end on a tiny model: rollout log-probs, the first minibatch at ratio 1, a known reward that rises
(gae and grpo), exact resume, torchrun, and the checks made at start. The math itself: tests/formulas/test_rl.py."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rmcore.align.iteration import AlignRun
from rmcore.align.rollouts import pack, response_logprobs
from rmcore.config.loader import load_config
from rmcore.config.sections import PpoTrainConfig
from rmcore.data.tokenizer_training import train_tokenizer
from rmcore.errors import ConfigError
from rmcore.interop.hf_checkpoint import load_pretrained
from rmcore.model import CausalLM
from rmcore.rl import shape_scores

import ppo
from helpers.runs import conflicting_keys, history, ppo_args, records, torchrun


def test_logprobs_of_a_left_padded_batch_equal_each_sequence_alone(policy_dir):
    model = load_pretrained(CausalLM, policy_dir).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (9, 3, 6)]
    responses = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (2, 7, 4)]
    batch = pack(prompts, responses, pad_id=0)
    together = response_logprobs(model, batch, temperature=0.7, batch_size=3)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        alone = response_logprobs(model, pack([p], [r], pad_id=0), temperature=0.7, batch_size=1)
        assert torch.allclose(together[i, :len(r)], alone[0], atol=1e-5), i
        assert (together[i, len(r):] == 0).all()  # padding after the response
        # and against a plain forward of the sequence alone, logits / temperature
        logits = model(torch.tensor([p + r]))[0, len(p) - 1:-1] / 0.7
        want = logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None])[:, 0]
        assert torch.allclose(alone[0], want, atol=1e-5)


@pytest.mark.parametrize("old_logprobs", ["forward", "sampler"])
def test_first_minibatch_is_at_ratio_one_and_kl_zero(tmp_path, hh_file, policy_dir, rm_dir, old_logprobs):
    """With the old log-probs from a forward pass, the first minibatch's ratio is 1 and the KL 0 exactly (the same
    pass scores the policy and its identical reference); from the sampler (decoding, token by token), to 1e-5."""
    history = ppo.main(ppo_args(tmp_path / "p", hh_file, policy_dir, rm_dir, "ppo.iterations=1",
                                f"ppo.old_logprobs={old_logprobs}"))
    first = next(r for r in records(tmp_path / "p") if "loss/policy" in r)
    exact = old_logprobs == "forward"
    assert abs(first["policy/ratio"] - 1) < (1e-6 if exact else 1e-5)
    assert first["policy/approxkl"] < (1e-12 if exact else 1e-10) and first["policy/clipfrac"] == 0
    if exact:  # policy = reference exactly
        assert history[0]["objective/kl"] == 0 and history[0]["objective/kl_k3"] == 0
        assert history[0]["objective/non_score_reward"] == 0
    else:
        assert abs(history[0]["objective/kl"]) < 1e-4 and abs(history[0]["objective/kl_k3"]) < 1e-8
    later = [r for r in records(tmp_path / "p") if "loss/policy" in r][1:]
    assert any(abs(r["policy/ratio"] - 1) > 1e-6 for r in later)  # the policy did move after the first step
    trl_names = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                 "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                 "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens"]
    assert all(k in history[0] for k in trl_names)
    assert (tmp_path / "p" / "ppo_history.png").is_file()
    assert not conflicting_keys(tmp_path / "p")  # the iteration's figures and its last step's share a step


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_ppo_raises_a_known_reward(tmp_path, hh_file, policy_dir, rm_dir, advantage):
    extra = ["ppo.k=4", "ppo.prompts_per_iter=8"] if advantage == "grpo" else []
    history = ppo.main(ppo_args(tmp_path / "p", hh_file, policy_dir, rm_dir, f"ppo.advantage={advantage}",
                                "ppo.iterations=8", "optim.lr=3e-3", "ppo.beta=0.01", *extra))
    scores = [h["objective/scores"] for h in history]  # letters "e" per response
    assert sum(scores[-2:]) / 2 > scores[0] + 1.0, scores
    assert all(abs(h["objective/kl"]) < 1e3 for h in history), [h["objective/kl"] for h in history]


def test_ppo_resumes_exactly_after_a_kill(tmp_path, hh_file, policy_dir, rm_dir):
    common = ("ppo.iterations=3", "ppo.adaptive_kl=true", "ppo.kl_horizon=100")  # beta moves: it must be restored
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ppo.main(ppo_args(whole, hh_file, policy_dir, rm_dir, *common))
    with pytest.raises(SystemExit):
        ppo.main(ppo_args(cut, hh_file, policy_dir, rm_dir, *common, "ppo.halt_after_iteration=2"))
    assert not (cut / "export").exists()
    ppo.main(ppo_args(cut, hh_file, policy_dir, rm_dir, *common))
    a, b = load_file(whole / "export" / "model.safetensors"), load_file(cut / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = history(whole, "ppo"), history(cut, "ppo")
    assert ha == hb and len({h["beta"] for h in ha}) == 3


def test_ppo_with_save_every_3_killed_in_iteration_5_resumes_from_iteration_3_and_ends_identical(
        tmp_path, hh_file, policy_dir, rm_dir, monkeypatch, capsys):
    """Checkpoints every 3 iterations (the killed run's written in the background), exports every 2; a kill while
    iteration 5 scores its samples loses iterations 4-5, which the resumed run redoes exactly."""
    common = ("ppo.iterations=6", "ppo.save_every=3", "ppo.export_every=2")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ppo.main(ppo_args(whole, hh_file, policy_dir, rm_dir, *common))
    calls = []

    def killed_in_iteration_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed in iteration 5")
        return shape_scores(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ppo, "shape_scores", killed_in_iteration_5)
        with pytest.raises(KeyboardInterrupt):
            ppo.main(ppo_args(cut, hh_file, policy_dir, rm_dir, *common, "ppo.save_in_background=true"))
    # 16 samples, minibatches of 8, 2 epochs: 4 steps an iteration; iteration 3 ends at step 12
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_0000012"]
    assert sorted(p.name for p in (cut / "iterations").iterdir()) == ["iteration_0002", "iteration_0004"]
    capsys.readouterr()
    ppo.main(ppo_args(cut, hh_file, policy_dir, rm_dir, *common))
    assert f"resumed from {cut / 'checkpoints' / 'step_0000012'}" in capsys.readouterr().out
    a, b = load_file(whole / "export" / "model.safetensors"), load_file(cut / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history(whole, "ppo") == history(cut, "ppo")
    assert sorted(p.name for p in (cut / "iterations").iterdir()) == ["iteration_0004", "iteration_0006"]
    timed = json.loads((whole / "ppo_history.json").read_text())
    assert all(h["time/save"] > 0 and h["time/sample"] > 0 and h["time/update"] > 0 for h in timed)


def test_beta_zero_builds_no_reference_and_makes_the_same_update(tmp_path, hh_file, policy_dir, rm_dir, monkeypatch):
    # the old log-probs from a forward pass, as the reference's: the KL of the unchanged policy is then exactly 0
    common = ("ppo.iterations=2", "ppo.beta=0", "ppo.advantage=grpo", "ppo.k=4", "ppo.prompts_per_iter=8",
              "ppo.old_logprobs=forward")
    built, build_policy = [], AlignRun.build_policy
    monkeypatch.setattr(AlignRun, "build_policy", lambda self, *, with_reference=True: built.append(with_reference)
                        or build_policy(self, with_reference=with_reference))
    without = ppo.main(ppo_args(tmp_path / "without", hh_file, policy_dir, rm_dir, *common))
    monkeypatch.setattr(ppo, "needs_reference", lambda ppo_cfg: True)
    with_reference = ppo.main(ppo_args(tmp_path / "with", hh_file, policy_dir, rm_dir, *common))
    assert built == [False, True]
    a, b = (load_file(tmp_path / p / "export" / "model.safetensors") for p in ("without", "with"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # beta * KL = 0 * KL: the reference changes nothing
    assert "objective/kl" not in without[0] and with_reference[0]["objective/kl"] == 0


def test_old_logprobs_from_the_update_equal_a_separate_forward(tmp_path, hh_file, policy_dir, rm_dir, monkeypatch):
    """GRPO with one optimizer step per rollout (32 samples, one minibatch of 32, 1 epoch): the old log-probs taken
    from the update's forward give the update and the figures a separate forward pass gives."""
    common = ("ppo.iterations=2", "ppo.advantage=grpo", "ppo.k=4", "ppo.prompts_per_iter=8", "optim.epochs=1",
              "optim.micro_batch_size=8", "optim.grad_accum=4")
    forwards = []
    monkeypatch.setattr(ppo, "response_logprobs", lambda *a, **k: forwards.append(1) or response_logprobs(*a, **k))
    reused = ppo.main(ppo_args(tmp_path / "reused", hh_file, policy_dir, rm_dir, *common))
    assert len(forwards) == 2  # the reference's, one per iteration
    monkeypatch.setattr(ppo, "old_logprobs_source", lambda *a, **k: "forward")
    separate = ppo.main(ppo_args(tmp_path / "separate", hh_file, policy_dir, rm_dir, *common))
    assert len(forwards) == 2 + 4  # and the policy's
    a, b = (load_file(tmp_path / p / "export" / "model.safetensors") for p in ("reused", "separate"))
    # the two take the old log-probs from differently packed rows (each minibatch's vs the rollout's order) and
    # formulas (the update's fused log-prob and entropy vs log_softmax), equal to ~1e-7; AdamW's normalised steps
    # (lr 1e-3) carry that into the weights at ~5e-6 after 2 iterations: 1/200 of one step, where taking the old
    # log-probs from another policy would move them by whole steps
    assert all(torch.allclose(a[k], b[k], atol=2e-5, rtol=0) for k in a)
    for x, y in zip(reused, separate):
        assert x["objective/kl"] == pytest.approx(y["objective/kl"], abs=1e-5)
        assert x["objective/entropy"] == pytest.approx(y["objective/entropy"], abs=1e-4)
        assert x["objective/scores"] == y["objective/scores"]
    assert reused[1]["objective/kl"] != 0  # the policy moved in iteration 1, and the KL says so


def test_old_logprobs_from_the_sampler_equal_a_separate_forward(tmp_path, hh_file, policy_dir, rm_dir, monkeypatch):
    """Two epochs (the update cannot supply them), fp32: the sampler's log-probs as the old ones skip the policy's
    pass and give the rollout's KL, the update and the exported weights that pass gives."""
    common = ("ppo.iterations=2", "ppo.advantage=grpo", "ppo.k=4", "ppo.prompts_per_iter=8", "ppo.beta=0.05")
    forwards = []
    monkeypatch.setattr(ppo, "response_logprobs", lambda *a, **k: forwards.append(1) or response_logprobs(*a, **k))
    sampler = ppo.main(ppo_args(tmp_path / "sampler", hh_file, policy_dir, rm_dir, *common))  # auto: fp32
    assert len(forwards) == 2  # the reference's only
    forward = ppo.main(ppo_args(tmp_path / "forward", hh_file, policy_dir, rm_dir, *common,
                                "ppo.old_logprobs=forward"))
    assert len(forwards) == 2 + 4
    a, b = (load_file(tmp_path / p / "export" / "model.safetensors") for p in ("sampler", "forward"))
    # decoding (one token at a time against the cache) and the pass (the whole row) agree to 1e-5 per log-prob;
    # 8 AdamW steps at lr 1e-3 carry that into the weights far below one step's size
    assert all(torch.allclose(a[k], b[k], atol=2e-5, rtol=0) for k in a)
    assert max((a[k] - b[k]).abs().max() for k in a) > 0  # not the same code path by accident
    for x, y in zip(sampler, forward):
        assert x["objective/kl"] == pytest.approx(y["objective/kl"], abs=1e-5)
        assert x["objective/scores"] == y["objective/scores"]
    in_bf16 = load_config(PpoTrainConfig, None, ppo_args(tmp_path / "b", hh_file, policy_dir, rm_dir, *common,
                                                         "run.precision=bf16"))
    assert ppo.old_logprobs_source(in_bf16, samples_per_rank=32, has_critic=False) == "forward"  # auto in bf16


def test_ppo_under_torchrun_completes_and_resumes_exactly(tmp_path, hh_file, policy_dir, rm_dir):
    """2 processes (gloo, FSDP2 over policy, critic and the frozen reference): a run killed after its first
    iteration and resumed ends with the same weights and history as one never killed."""
    def run(out, *extra):
        proc = torchrun(2, "ppo.py", ppo_args(out, hh_file, policy_dir, rm_dir, "ppo.iterations=2", *extra),
                        timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "whole")
    run(tmp_path / "cut", "ppo.halt_after_iteration=1")
    run(tmp_path / "cut")
    ha, hb = (history(tmp_path / p, "ppo") for p in ("whole", "cut"))
    assert ha == hb and [h["samples"] for h in ha] == [16, 16]
    a, b = (load_file(tmp_path / p / "export" / "model.safetensors") for p in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_start_checks(tmp_path, hh_file, policy_dir, rm_dir):
    other = tmp_path / "other_tok"
    train_tokenizer(["hello world, a few words of text"] * 50, other, vocab_size=300)
    mismatched = tmp_path / "rm_other_tokenizer"
    shutil.copytree(rm_dir, mismatched)
    shutil.copy(other / "tokenizer.model", mismatched / "tokenizer.model")
    (mismatched / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="another tokenizer than the policy"):
        ppo.main(ppo_args(tmp_path / "a", hh_file, policy_dir, mismatched))
    with pytest.raises(ConfigError, match="ppo.k=1, expected >= 2"):
        ppo.main(ppo_args(tmp_path / "b", hh_file, policy_dir, rm_dir, "ppo.advantage=rloo"))
    with pytest.raises(ConfigError, match="not a reward model directory"):
        ppo.main(ppo_args(tmp_path / "c", hh_file, policy_dir, rm_dir, "ppo.critic=reward"))  # the reward is a function
    with pytest.warns(UserWarning, match="KL estimate and the importance ratios are biased"):
        ppo.main(ppo_args(tmp_path / "d", hh_file, policy_dir, rm_dir, "ppo.top_k=20", "ppo.iterations=1",
                          "ppo.critic=policy", "optim.epochs=1", "run.export=false"))
