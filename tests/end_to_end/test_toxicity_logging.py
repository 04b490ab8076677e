"""A toxicity scorer in the loops (raft.toxicity, ppo.toxicity): its mean on each iteration's samples is logged, it
scores exactly what the reward scored, and it never changes the run (the same weights and figures without it)."""
import numpy as np
import pytest
import torch
from profanity_check import predict_prob

import ppo
import raft
from helpers import rewards as helper_rewards
from helpers.runs import ppo_args, raft_args, weights, without_times

TOXICITY_KEYS = ("toxicity_all", "toxicity_kept", "objective/toxicity")


def without_toxicity(history):
    return [{k: v for k, v in h.items() if k not in TOXICITY_KEYS} for h in without_times(history)]


def test_raft_logs_the_toxicity_of_exactly_the_samples_the_reward_scored(tmp_path, hh_file, policy_dir):
    def run(out, *extra):
        helper_rewards.SEEN["proxy"].clear()
        history = raft.main(raft_args(out, hh_file, policy_dir, "raft.iterations=2",
                                      "raft.reward=helpers.rewards:recorded_count_e", *extra))
        return history, list(helper_rewards.SEEN["proxy"])

    plain, _ = run(tmp_path / "plain")
    logged, seen = run(tmp_path / "logged", "raft.toxicity=profanity")
    for it, h in enumerate(logged):
        responses = [r for _, r, _ in seen[it * 64:(it + 1) * 64]]
        assert h["toxicity_all"] == pytest.approx(float(np.mean(predict_prob(responses))), abs=1e-12)
    assert without_toxicity(logged) == without_toxicity(plain)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "logged")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "logged" / "raft_history.png").is_file()


def test_ppo_logs_the_toxicity_of_its_responses_and_trains_as_without_it(tmp_path, hh_file, policy_dir, rm_dir):
    plain = ppo.main(ppo_args(tmp_path / "plain", hh_file, policy_dir, rm_dir, "ppo.iterations=2"))
    logged = ppo.main(ppo_args(tmp_path / "logged", hh_file, policy_dir, rm_dir, "ppo.iterations=2",
                               "ppo.toxicity=-profanity"))
    assert all(-1 <= h["objective/toxicity"] <= 0 for h in logged)  # negated: the spec is applied as written
    assert without_toxicity(logged) == without_toxicity(plain)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "logged")
    assert all(torch.equal(a[k], b[k]) for k in a)
