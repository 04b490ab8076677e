"""RAFT: selection, discard rules, the reward interface, a known reward that rises, exact resume, torchrun."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rmcore.align.rewards import checked_rewards, load_reward
from rmcore.align.selection import discard_reason, distinct_n, select_global, select_local
from rmcore.data.template import Template
from rmcore.errors import ConfigError
from rmcore.interop.hf_checkpoint import save_pretrained

import raft
import train
from helpers.runs import REPO, args, conflicting_keys, history, raft_args, records, torchrun, without_times


# ------------------------------------------------------------------------------------------------ pure pieces
def test_local_selection_keeps_the_argmax_of_each_prompt():
    rng = np.random.default_rng(0)
    k, n_prompts = 4, 50
    rewards = rng.normal(size=k * n_prompts).round(1)  # rounding makes ties
    valid = rng.random(k * n_prompts) > 0.2
    kept = select_local(rewards, k, valid)
    expected = []
    for p in range(n_prompts):
        rows = [p * k + j for j in range(k) if valid[p * k + j]]
        if rows:
            best = max(rewards[i] for i in rows)
            expected.append(min(i for i in rows if rewards[i] == best))  # the first of equal best
    assert kept == expected
    assert rewards[kept].mean() >= rewards[valid].mean()


def test_prompt_order_pass_draws_every_prompt_once_per_pass():
    from rmcore.align.rollouts import PromptPool
    from rmcore.data.records import Report
    pool = PromptPool([f"p{i}" for i in range(10)], [[i] for i in range(10)], Report("p"))
    drawn = [pool.draw(4, 0, it, order="pass") for it in range(5)]  # 20 draws: two passes
    flat = [i for d in drawn for i in d]
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10)) and flat[:10] != flat[10:]
    redraw = [pool.draw(4, 0, it) for it in range(5)]
    assert sorted(i for d in redraw for i in d) != sorted(flat)  # fresh draws repeat prompts within 10


def test_global_selection_keeps_the_top_n_over_k():
    rng = np.random.default_rng(1)
    rewards, k = rng.normal(size=37), 4
    valid = np.ones(37, bool)
    kept = select_global(rewards, k, valid)
    assert len(kept) == 37 // k
    assert sorted(rewards[kept].tolist()) == sorted(rewards.tolist())[-(37 // k):]
    assert rewards[kept].mean() >= rewards.mean()
    valid[np.argsort(-rewards)[:3]] = False  # the best three are discarded: never kept
    assert not set(select_global(rewards, k, valid)) & set(np.argsort(-rewards)[:3].tolist())
    # K = 1 keeps every valid sample
    assert select_local(rewards[:8], 1, valid[:8]) == [i for i in range(8) if valid[i]]
    # LMFlow's alpha: the top floor(N * alpha) of the valid samples, best first
    top = select_global(rewards, 1, valid, keep_fraction=0.3)
    assert top == sorted(np.flatnonzero(valid).tolist(), key=lambda i: -rewards[i])[:11]  # floor(37 * 0.3)


def test_discard_rules_and_distinct_n():
    t = Template()
    assert discard_reason("  ", True, t, ("empty", "truncated", "tag")) == "empty"
    assert discard_reason("fine", False, t, ("empty", "truncated", "tag")) == "truncated"
    assert discard_reason("fine ###Assistant: more", True, t, ("empty", "truncated", "tag")) == "tag"
    assert discard_reason("fine", False, t, ("empty",)) is None
    assert distinct_n([[1, 2, 1, 2]], 1) == 0.5 and distinct_n([[1, 2, 1, 2]], 2) == 2 / 3


def test_reward_interface(tmp_path):
    fn = load_reward("helpers.rewards:count_e")
    assert checked_rewards(fn, ["p", "p"], ["eee", "x"]) == [3.0, 0.0]
    with pytest.raises(ConfigError, match="module:function"):
        load_reward("no_such_dir_or_function")
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward("helpers.rewards:nope")
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        checked_rewards(lambda p, r: [1.0], ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="non-finite"):
        checked_rewards(lambda p, r: [float("nan")], ["a"], ["c"])


# ------------------------------------------------------------------------------------------------ the loop
def test_raft_raises_a_known_reward(tmp_path, hh_file, policy_dir):
    history = raft.main(raft_args(tmp_path / "r", hh_file, policy_dir, "raft.iterations=8", "optim.epochs=3",
                                  "optim.lr=3e-3"))
    mean_reward = [h["reward_all"] for h in history]  # over all 64 samples of an iteration
    assert np.mean(mean_reward[-2:]) > mean_reward[0] + 1.0, mean_reward  # one more letter "e" per response
    first = [h["reward_first"] for h in history]
    assert all(h["reward_kept"] >= h["reward_all"] for h in history)
    saved = json.loads((tmp_path / "r" / "raft_history.json").read_text())
    assert [h["reward_first"] for h in saved] == first
    assert (tmp_path / "r" / "raft_history.png").is_file()


def test_an_ensemble_reward_trains_as_its_aggregate_written_by_hand(tmp_path, hh_file, policy_dir):
    """raft.reward=[count_e, count_words] with aggregation min samples, selects and trains exactly as a function
    that takes the min itself, and logs the members' disagreement per iteration."""
    hand = raft.main(raft_args(tmp_path / "hand", hh_file, policy_dir, "raft.iterations=2",
                               "raft.reward=helpers.rewards:min_e_words"))
    ens = raft.main(raft_args(tmp_path / "ens", hh_file, policy_dir, "raft.iterations=2", "raft.reward_aggregation=min",
                              "raft.reward=[helpers.rewards:count_e, helpers.rewards:count_words]"))
    for h, e in zip(without_times(hand), without_times(ens)):
        assert {k: v for k, v in e.items() if k != "reward_disagreement"} == h
    assert all(e["reward_disagreement"] > 0 for e in ens)
    logged = [r for r in records(tmp_path / "ens") if "raft/reward_disagreement" in r]
    assert [r["raft/reward_disagreement"] for r in logged] == [e["reward_disagreement"] for e in ens]


def test_the_held_out_reward_is_measured_before_each_update_and_after_the_last(tmp_path, hh_file, policy_dir):
    """held_out_reward describes the policy that sampled the iteration (the starting policy for iteration 1), as
    the samples' rewards do; held_out_reward_final the exported one. Both recomputed here from the models."""
    from rmcore.align.rollouts import default_stop_strings, load_prompts, sample
    from rmcore.interop.hf_checkpoint import load_pretrained
    from rmcore.model import CausalLM
    from rmcore.tokenizer import Tokenizer

    from helpers.rewards import count_e
    out = tmp_path / "r"
    # lr 3e-3: one update moves the greedy answers (at 1e-3 they stay without an "e" for two iterations)
    history = raft.main(raft_args(out, hh_file, policy_dir, "raft.iterations=2", "optim.lr=3e-3",
                                  f"data.eval=['{hh_file}[2200:2230]']", "raft.eval_prompts=6"))
    tok, template = Tokenizer.from_pretrained(policy_dir), Template()
    pool = load_prompts([f"{hh_file}[2200:2230]"], tok, template, max_tokens=128, name="held out")

    def greedy_reward(model_dir):
        model = load_pretrained(CausalLM, model_dir).eval()
        s = sample(model, pool, list(range(6)), tokenizer=tok, max_new_tokens=24, batch_size=64, temperature=0.0,
                   stop_strings=default_stop_strings(template))
        return float(np.mean(count_e(s.prompts, s.responses)))

    assert history[0]["held_out_reward"] == greedy_reward(policy_dir)
    assert history[1]["held_out_reward_final"] == greedy_reward(out / "export")
    assert "held_out_reward_final" not in history[0]
    assert history[1]["held_out_reward_final"] != history[0]["held_out_reward"]  # the two moments differ here
    assert not conflicting_keys(out)


def test_raft_resumes_exactly_after_a_kill(tmp_path, hh_file, policy_dir):
    whole = tmp_path / "whole"
    raft.main(raft_args(whole, hh_file, policy_dir, "raft.iterations=3"))
    cut = tmp_path / "cut"
    with pytest.raises(SystemExit):
        raft.main(raft_args(cut, hh_file, policy_dir, "raft.iterations=3", "raft.halt_after_iteration=2"))
    assert not (cut / "export").exists()
    raft.main(raft_args(cut, hh_file, policy_dir, "raft.iterations=3"))
    a, b = load_file(whole / "export" / "model.safetensors"), load_file(cut / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history(whole, "raft") == history(cut, "raft")


def test_raft_under_torchrun(tmp_path, hh_file, policy_dir):
    """2 processes (gloo, FSDP2 with bf16 compute: the KV cache in bf16) finish, sampling half the prompts each,
    and keep one sample per prompt."""
    out = tmp_path / "two"
    proc = torchrun(2, "raft.py", raft_args(out, hh_file, policy_dir, "raft.iterations=2", "run.precision=bf16"),
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "raft_history.json").read_text())
    assert [h["samples"] for h in history] == [16 * 4] * 2
    assert all(h["kept"] == 16 for h in history)  # only empty responses are discarded, and K samples never all are


def test_greedy_generation_under_fsdp_equals_one_process_when_a_rank_stops_early(tmp_path):
    from rmcore.generate import rollout
    from rmcore.model import CausalLM, ModelConfig
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                 max_seq_len=64))
    model.init_weights(0.5)  # peaked, varied continuations
    save_pretrained(model, tmp_path / "policy")
    model.eval()
    pad = 0
    prompts = [[[1, 5, 9, 33, 4], [1, 7]], [[1, 11, 12], [1, 40, 41, 42, 43, 44]]]
    free = [rollout(model, p, max_new_tokens=12, eos_id=-1, pad_id=pad, temperature=0).responses() for p in prompts]
    # as EOS, a token every rank-1 row writes early and no rank-0 row writes: rank 1 is done long before rank 0
    candidates = set.intersection(*map(set, free[1])) - set().union(*map(set, free[0])) - {pad}
    assert candidates, "pick prompts whose continuations differ"  # keeps the test's premise explicit
    eos = min(candidates, key=lambda t: max(row.index(t) for row in free[1]))
    spec = {"prompts": prompts, "max_new_tokens": 12, "eos": eos, "pad": pad}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    one = [rollout(model, p, max_new_tokens=12, eos_id=eos, pad_id=pad, temperature=0, with_logprobs=True)
           for p in prompts]
    assert max(len(x) for x in one[1].responses()) < max(len(x) for x in one[0].responses())  # rank 1 ends first
    proc = torchrun(2, "tests/helpers/fsdp_generate.py",
                    [tmp_path / "policy", tmp_path / "spec.json", tmp_path / "out"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        assert got["responses"] == one[rank].responses()
        assert got["mask"] == one[rank].response_mask.tolist()
        assert np.allclose(got["logprobs"], one[rank].logprobs.numpy(), atol=1e-5)


def test_compare_a_policy_with_itself_is_all_ties(tmp_path, hh_file, tok_dir, policy_dir):
    import eval as eval_cli
    train.main(args("rm", tmp_path / "rm", hh_file, tok_dir, "optim.max_steps=2", "data.eval=[]"))
    r = eval_cli.main(["compare", "--policy-a", str(policy_dir), "--policy-b", str(policy_dir), "--judge",
                       str(tmp_path / "rm" / "export"), "--prompts", f"{hh_file}[2200:2216]", "--max-new-tokens", "16",
                       "--out", str(tmp_path / "cmp")])
    assert r["prompts"] > 0 and r["ties"] == r["prompts"] and r["wins"] == r["losses"] == 0
    assert r["mean_tokens_a"] == r["mean_tokens_b"] and r["mean_reward_a"] == r["mean_reward_b"]
    assert r["distinct_2_a"] == r["distinct_2_b"] and 0 < r["distinct_2_a"] <= 1
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"ties {r['prompts']} (100.0%)" in md and md.count("**A** (reward") == r["prompts"]
    other = eval_cli.main(["compare", "--policy-a", str(policy_dir), "--policy-b", str(policy_dir), "--judge",
                           str(tmp_path / "rm" / "export"), "--prompts", f"{hh_file}[2200:2216]", "--max-new-tokens",
                           "16", "--out", str(tmp_path / "cmp2"), "--seed", "1"])
    # the seed matters: ties above are not vacuous
    assert [s["a"] for s in other["samples"]] != [s["a"] for s in r["samples"]]


def test_a_response_is_cut_at_its_stop_the_same_way_for_reward_and_training(tmp_path, hh_file, policy_dir):
    """The sampled text, the text the reward sees and the text trained on are one and the same, cut before the
    stop string; the token ids end at the token that completed the stop."""
    from rmcore.align.rollouts import load_prompts, sample
    from rmcore.data.datasets import document_tokens
    from rmcore.data.records import Example
    from rmcore.generate import cut_at_stop
    from rmcore.tokenizer import Tokenizer
    tok, template = Tokenizer.from_pretrained(policy_dir), Template()
    from rmcore.interop.hf_checkpoint import load_pretrained
    from rmcore.model import CausalLM
    model = load_pretrained(CausalLM, policy_dir).eval()
    pool = load_prompts([f"{hh_file}[:20]"], tok, template, max_tokens=256, name="prompts")
    rows = list(range(8))
    free = sample(model, pool, rows, tokenizer=tok, max_new_tokens=16, batch_size=8, temperature=0.0)
    stop = free.responses[0].strip()[2:4]  # two characters the first response writes
    assert stop
    s = sample(model, pool, rows, tokenizer=tok, max_new_tokens=16, batch_size=8, temperature=0.0,
               stop_strings=(stop,))
    n_cut = 0
    for text, toks, stopped in zip(s.responses, s.tokens, s.stopped):
        decoded = tok.decode(toks)
        assert (text, stopped) == cut_at_stop(decoded, (stop,))
        if stopped and toks[-1] != tok.eos_id:
            n_cut += 1
            assert stop in decoded and stop not in tok.decode(toks[:-1])  # the last token completed the stop
    assert n_cut >= 1
    seen = []
    checked_rewards(lambda prompts, responses: seen.extend(responses) or [0.0] * len(responses), s.prompts, s.responses)
    assert seen == s.responses
    for prompt, text in zip(s.prompts, s.responses):
        ids, mask = document_tokens(Example("x", prompt, text), tok, template, "response")
        assert tok.decode([i for i, m in zip(ids, mask) if m]).strip() == text.strip()
        assert stop not in text


def test_k_1_without_discards_trains_on_every_sample(tmp_path, hh_file, policy_dir):
    history = raft.main(raft_args(tmp_path / "k1", hh_file, policy_dir, "raft.iterations=1", "raft.k=1",
                                  "raft.discard=[]"))
    assert history[0]["kept"] == history[0]["samples"] == 16
    assert history[0]["reward_kept"] == history[0]["reward_all"] == history[0]["reward_first"]


def test_raft_configs_load_and_hold_the_reference_recipe():
    from rmcore.config.sections import RaftTrainConfig, load_stages
    [c] = load_stages(str(REPO / "configs/open_llama_3b_raft.yaml"), [], RaftTrainConfig)
    assert ((c.raft.prompts_per_iter, c.raft.k, c.raft.selection, c.optim.lr, c.raft.max_new_tokens)
            == (2048, 8, "local", 2e-5, 128))
    assert c.data.human_tag == "###Human:" and c.run.precision == "bf16" and c.data.sft_loss_on == "response"
    for name in ("tiny_raft.yaml", "small_raft.yaml"):
        [c] = load_stages(str(REPO / "configs" / name), [], RaftTrainConfig)
        assert c.raft.reward and c.run.init_from and c.data.sft_loss_on == "response"
    with pytest.raises(ConfigError, match="unknown key 'raft'"):  # a RAFT config is raft.py's
        train.main(["--config", str(REPO / "configs/tiny_raft.yaml")])
