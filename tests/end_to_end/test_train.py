"""train.py end to end on the shipped data: accumulation equivalence, 2-process FSDP2 parity, kill-and-resume,
export to transformers, NaN handling. Tiny models, fp32 where numbers are compared."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rmcore.errors import NonFiniteLoss

import train
from helpers.runs import REPO, args, assert_same_weights, losses, torchrun

# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,extra", [
    ("rm", ["loss.center_coef=0.01"]),
    ("sft", ["data.sft_loss_on=assistant"]),  # micro-batches with different numbers of real target tokens
])
def test_grad_accumulation_equals_one_big_batch(stage, extra, tmp_path, hh_file, tok_dir):
    big = args(stage, tmp_path / "big", hh_file, tok_dir, "optim.micro_batch_size=8", "optim.grad_accum=1",
               "optim.max_steps=3", *extra)
    small = args(stage, tmp_path / "small", hh_file, tok_dir, "optim.micro_batch_size=2", "optim.grad_accum=4",
                 "optim.max_steps=3", *extra)
    train.main(big)
    train.main(small)
    lb, ls = losses(tmp_path / "big"), losses(tmp_path / "small")
    assert len(lb) == 3 and all(abs(lb[s] - ls[s]) < 1e-6 for s in lb)
    # Adam divides by sqrt(v): where a gradient is ~0, fp32 summation-order noise moves a weight by up to ~1e-5
    assert_same_weights(tmp_path / "big", tmp_path / "small", atol=1e-4)
    # and the weights moved: the comparison is not between two untouched inits
    assert lb[1] != lb[3]


def test_resume_follows_the_uninterrupted_run(tmp_path, hh_file, tok_dir):
    common = ["optim.micro_batch_size=4", "optim.epochs=2", "optim.max_steps=7", "run.save_every=2",
              "data.group_by_length=true"]  # 5 steps per epoch: the resumed part crosses an epoch boundary
    train.main(args("rm", tmp_path / "full", hh_file, tok_dir, *common))
    with pytest.raises(SystemExit):  # killed after step 5: the last checkpoint is step 4
        train.main(args("rm", tmp_path / "cut", hh_file, tok_dir, *common, "run.halt_at_step=5"))
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    train.main(args("rm", tmp_path / "cut", hh_file, tok_dir, *common))
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(full) == 7 and full == cut  # bit-identical, steps 5-7 recomputed after resuming at 4
    assert_same_weights(tmp_path / "full", tmp_path / "cut", atol=0)


def test_export_loads_in_transformers_with_the_same_rewards(tmp_path, hh_file, tok_dir):
    from transformers import LlamaForSequenceClassification

    import rmcore
    from rmcore.data.batching import collate_pairs
    from rmcore.data.datasets import DataConfig, load_pairs
    train.main(args("rm", tmp_path / "rm", hh_file, tok_dir, "optim.max_steps=2"))
    export = tmp_path / "rm" / "export"
    ours = rmcore.load_pretrained(rmcore.RewardModel, export).eval()
    hf = LlamaForSequenceClassification.from_pretrained(export).eval()
    tok = rmcore.Tokenizer.from_pretrained(export)
    assert json.loads((export / "config.json").read_text())["rmcore"]["template"]["human"] == "###Human:"
    data, _ = load_pairs([f"{hh_file}[:6]"], tok, DataConfig(), "x")
    batch = collate_pairs(data, list(range(len(data))), tok.pad_id)
    with torch.no_grad():
        r_ours = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
        r_hf = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert torch.allclose(r_ours, r_hf, atol=1e-4), (r_ours, r_hf)


def test_nonfinite_loss_stops_with_step_ids_and_checkpoint(tmp_path, hh_file, tok_dir, monkeypatch):
    real = train.pairwise_loss
    calls = {"n": 0}

    def poisoned(*a, **k):  # the 3rd step's loss is NaN (2 micro-batches per step)
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] in (5, 6) else loss

    monkeypatch.setattr(train, "pairwise_loss", poisoned)
    common = ["optim.micro_batch_size=2", "optim.grad_accum=2", "optim.max_steps=4", "run.save_every=1",
              "run.eval_every=0"]
    with pytest.raises(NonFiniteLoss) as err:
        train.main(args("rm", tmp_path / "stop", hh_file, tok_dir, *common, "data.eval=[]"))
    msg = str(err.value)
    assert "at step 3" in msg and f"{hh_file}:" in msg and "step_0000002" in msg  # step 3 as metrics.jsonl counts

    calls["n"] = 0
    train.main(args("rm", tmp_path / "skip", hh_file, tok_dir, *common, "data.eval=[]", "run.on_nonfinite=skip"))
    records = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1]


@pytest.mark.parametrize("stage", ["rm", "sft"])
def test_two_process_fsdp_matches_one_process(stage, tmp_path, hh_file, tok_dir):
    common = ["optim.max_steps=4", "optim.epochs=2", "run.eval_every=2"]
    one = torchrun(1, "train.py", args(stage, tmp_path / "one", hh_file, tok_dir, "optim.micro_batch_size=8", *common))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, "train.py", args(stage, tmp_path / "two", hh_file, tok_dir, "optim.micro_batch_size=4", *common))
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == 4 and all(abs(l1[s] - l2[s]) < 1e-5 for s in l1), (l1, l2)
    evals = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
             for r in ("one", "two")]
    assert len(evals[0]) == 2 and all(abs(a["eval_loss"] - b["eval_loss"]) < 1e-5 for a, b in zip(*evals))
    # as with accumulation: where a gradient is ~0, Adam's 1/sqrt(v) magnifies fp32 summation-order noise (~3e-5)
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-4)


def test_two_process_resume(tmp_path, hh_file, tok_dir):
    common = ["optim.micro_batch_size=4", "optim.max_steps=5", "run.save_every=2", "run.eval_every=0"]
    full = torchrun(2, "train.py", args("rm", tmp_path / "full", hh_file, tok_dir, *common))
    assert full.returncode == 0, full.stderr[-3000:]
    cut = torchrun(2, "train.py", args("rm", tmp_path / "cut", hh_file, tok_dir, *common, "run.halt_at_step=3"))
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert losses(tmp_path / "cut").keys() == {1, 2, 3}
    rest = torchrun(2, "train.py", args("rm", tmp_path / "cut", hh_file, tok_dir, *common))
    assert rest.returncode == 0 and "resumed from" in rest.stdout + rest.stderr
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def test_recipe_configs_hold_the_reference_recipe():
    from rmcore.config.sections import load_stages
    (sft_cfg,) = load_stages(str(REPO / "configs" / "open_llama_3b_sft.yaml"))
    (rm_cfg,) = load_stages(str(REPO / "configs" / "open_llama_3b_rm.yaml"))
    for cfg in (sft_cfg, rm_cfg):
        assert (cfg.data.human_tag, cfg.data.assistant_tag) == ("###Human:", "###Assistant:")
        assert cfg.data.train[1].endswith("[:6275]") and cfg.data.eval[0].endswith("[6275:]")
        assert cfg.run.precision == "bf16" and cfg.optim.schedule == "linear"
    assert ((sft_cfg.run.stage, sft_cfg.optim.lr, sft_cfg.optim.epochs, sft_cfg.data.block_size)
            == ("sft", 2e-5, 2, 1024))
    assert sft_cfg.data.sft_loss_on == "all" and not sft_cfg.data.document_mask
    assert (rm_cfg.run.stage, rm_cfg.optim.lr, rm_cfg.optim.epochs, rm_cfg.data.max_length) == ("rm", 5e-6, 1, 512)
    assert rm_cfg.run.init_from == sft_cfg.run.out_dir + "/export"
    stages = load_stages(str(REPO / "configs" / "tiny.yaml"))
    assert [c.run.stage for c in stages] == ["tokenizer", "sft", "rm"]


def test_local_sweep_runner_tables_each_runs_final_metrics(tmp_path, hh_file, tok_dir):
    from rmcore.config import sweep
    spec = tmp_path / "sweep.yaml"
    spec.write_text("method: grid\nparameters:\n  loss.center_coef: {values: [0.0, 0.1]}\n"
                    "command: [python, train.py, --config, configs/tiny_rm.yaml]\n")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        rows = sweep.main([str(spec), "--out", str(tmp_path / "runs"), "run.init_from=null", "optim.max_steps=3",
                           *args("rm", "unused", hh_file, tok_dir)[2:]])
    finally:
        os.chdir(cwd)
    assert [r["run"] for r in rows] == ["loss.center_coef=0.0", "loss.center_coef=0.1"]
    for r in rows:
        rec = [json.loads(x) for x in (tmp_path / "runs" / r["run"] / "metrics.jsonl").read_text().splitlines()]
        assert r["eval_acc"] == rec[-1]["eval_acc"] and r["train_loss"] == rec[-2]["loss"]
    table = (tmp_path / "runs" / "results.md").read_text()
    assert f"{100 * rows[1]['eval_acc']:.2f}" in table and rows[0]["train_loss"] != rows[1]["train_loss"]


# ------------------------------------------------------------------------------------------------------------- fidelity


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_is_resolved_and_recorded(native, tmp_path, hh_file, tok_dir, monkeypatch):
    import yaml
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    argv = [a for a in args("rm", tmp_path, hh_file, tok_dir) if not a.startswith("run.precision=")]
    # one step of one pair: cheap even where bf16 is emulated (AVX2-only CPUs)
    train.main(argv + ["run.precision=auto", "optim.max_steps=1", "optim.micro_batch_size=1", "data.eval=[]"])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["run"]["precision"] == ("bf16" if native else "fp32")


def test_bf16_training_eval_counts_the_ties_eval_py_counts(tmp_path, hh_file, tok_dir):
    """In-training evaluation under bf16 autocast and eval.py in fp32, same weights and pairs: the same ties, since
    rewards stay fp32. The held-out pairs are ones where bf16-rounded rewards do tie."""
    from rmcore.data.datasets import DataConfig, load_pairs
    from rmcore.eval.scorer import RewardScorer

    import eval as eval_cli
    out = tmp_path / "rm"
    # one step of one pair, then the evaluation: cheap even where bf16 is emulated (AVX2-only CPUs); the tiny lr
    # keeps the rewards of the fresh init, which crowd together
    train.main(args("rm", out, hh_file, tok_dir, "run.precision=bf16", "optim.max_steps=1", "optim.micro_batch_size=1",
                    "optim.lr=1e-9"))
    in_training = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    report = eval_cli.main(["--model", str(out / "export"), "--data", f"{hh_file}[2200:2230]",
                            "--out", str(tmp_path / "ev")])
    evaluated = report["rm"][f"{hh_file}[2200:2230]"]
    assert in_training["eval_pairs"] == evaluated["pairs"] == 16
    assert in_training["eval_ties"] == evaluated["ties"] == 0  # (accuracy may differ: the trunk ran in bf16)
    # the teeth: rounded to bf16, these very rewards would tie
    scorer = RewardScorer(out / "export")
    pairs, _ = load_pairs([f"{hh_file}[2200:2230]"], scorer.tokenizer, DataConfig(max_length=256), "x")
    r = torch.from_numpy(scorer.score_ids(pairs.chosen + pairs.rejected)).float()
    r_c, r_r = r.bfloat16().chunk(2)
    assert int((r_c == r_r).sum()) > 0


def test_logged_eval_loss_is_the_plain_pairwise_loss_eval_py_reports(tmp_path, hh_file, tok_dir):
    import eval as eval_cli
    out = tmp_path / "rm"
    train.main(args("rm", out, hh_file, tok_dir, "loss.center_coef=0.1", "optim.max_steps=3"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    report = eval_cli.main(["--model", str(out / "export"), "--data", f"{hh_file}[2200:2230]",
                            "--out", str(tmp_path / "ev")])
    assert abs(final["eval_loss"] - report["rm"][f"{hh_file}[2200:2230]"]["loss"]) < 1e-4
    # the centering term and the optimised total are logged under their own names, in training and eval alike
    for rec, prefix in ((records[0], ""), (final, "eval_")):
        assert rec[f"{prefix}center_loss"] > 0
        assert abs(rec[f"{prefix}total_loss"] - rec[f"{prefix}loss"] - rec[f"{prefix}center_loss"]) < 1e-6


def test_sft_steps_without_targets_are_counted_not_fatal(tmp_path, hh_file, tok_dir):
    """Assistant-only loss on 16-token blocks: some blocks hold only human text. Such a step changes nothing and is
    counted; it used to be a 0/0 loss that stopped the run as non-finite."""
    from rmcore.data.datasets import DataConfig, load_blocks
    from rmcore.data.sampler import ShardedSampler
    from rmcore.losses import shift_targets
    from rmcore.tokenizer import Tokenizer
    extra = ["data.sft_loss_on=assistant", "data.block_size=16", "optim.micro_batch_size=1", "optim.max_steps=30",
             "data.eval=[]"]
    train.main(args("sft", tmp_path / "sft", hh_file, tok_dir, *extra))
    records = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    # independent count: the same blocks in the sampler's order, and which have no target token
    blocks, _ = load_blocks([f"{hh_file}[:40]"], Tokenizer.from_pretrained(tok_dir),
                            DataConfig(block_size=16, sft_loss_on="assistant"), "x")
    order = [b[0] for _, b in zip(range(30), ShardedSampler(len(blocks), 1, seed=0))]
    empty = [int(shift_targets(torch.from_numpy(blocks.tokens[[i]]).long(),
                               torch.from_numpy(blocks.loss_mask[[i]]))[1].sum() == 0)
             for i in order]
    assert sum(empty) > 0
    assert [r["empty_steps"] for r in records] == np.cumsum(empty).tolist()
    assert all(("loss" not in r) == bool(e) for r, e in zip(records, empty))  # no loss logged for an empty step
    assert records[-1]["skipped_steps"] == 0 and (tmp_path / "sft" / "export" / "model.safetensors").is_file()


def test_missing_data_and_model_files_are_one_clear_message(tmp_path):
    env = {**os.environ, "RMCORE_DATA": str(tmp_path / "no-data-here"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for part in ("error:", "RMCORE_DATA", "harmless-base/test.jsonl.gz", "MIT", "github.com/anthropics/hh-rlhf",
                 str(tmp_path / "no-data-here" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz")):
        assert part in proc.stderr, part
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "score", "--model", str(tmp_path / "nope"),
                           "--input", "x.jsonl", "--output", "y.jsonl"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == (f"error: {tmp_path / 'nope'}: no such directory "
                           f"(expected an HF-format model directory or a hub id)\n")


def test_activation_checkpointing_applies_to_a_loaded_model(tmp_path, hh_file, tok_dir, monkeypatch):
    """model.activation_checkpointing is a way to run, not a weight: it takes effect for run.init_from too, and
    changes no loss."""
    import rmcore.model
    train.main(args("sft", tmp_path / "sft", hh_file, tok_dir, "optim.max_steps=1"))
    calls, real = [], rmcore.model.checkpoint
    monkeypatch.setattr(rmcore.model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for ac in ("false", "true"):
        train.main(args("rm", tmp_path / ac, hh_file, tok_dir, f"run.init_from={tmp_path / 'sft' / 'export'}",
                        f"model.activation_checkpointing={ac}", "optim.max_steps=3"))
        runs[ac] = losses(tmp_path / ac)
        assert bool(calls) == (ac == "true")
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-6)
