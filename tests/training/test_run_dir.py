"""A run never lies: no model without data, one run per directory, checkpoints only their own run resumes (with
fallback past a corrupt one), finite weights only, corrupt inputs named. Tiny models, fp32."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rmcore.errors import NonFiniteLoss, UserError
from rmcore.interop.hf_checkpoint import save_pretrained
from rmcore.training.checkpoints import Checkpointer
from rmcore.training.run_dir import RunLock

import eval as eval_cli
import train
from conftest import non_finite_tensors
from helpers.runs import REPO, args, assert_same_weights, losses


def no_export(out):
    return not (Path(out) / "export").exists()


# ---------------------------------------------------------------------------------------------------- no data, no model
@pytest.fixture(scope="module")
def odd_files(tmp_path_factory, hh_file):
    d = tmp_path_factory.mktemp("odd")
    (d / "empty.jsonl").write_text("")
    (d / "bad.jsonl").write_text('{"chosen": 1}\nnot json\n')
    (d / "short.jsonl").write_text(json.dumps({"text": "hi there"}) + "\n")
    return d


@pytest.mark.parametrize("stage,case,match", [
    ("rm", "empty file", r"empty\.jsonl holds no records \(an empty file\)"),
    ("rm", "slice past the end", r"selects no record: the file has 2,312 records"),
    ("rm", "reversed slice", r"bad slice \[10:5\]: it is reversed"),
    ("rm", "every pair too long", r"all 40 records read were dropped: .*longer than max_length=8"),
    ("rm", "every record skipped", r"all 2 records read were dropped: 2 bad record skipped"),
    ("rm", "epochs=0", r"optim\.epochs=0; expected >= 1"),
    ("rm", "max_steps=0", r"optim\.max_steps=0; expected >= 1"),
    ("sft", "text shorter than one block", r"fewer than one block \(data\.block_size=64\)"),
])
def test_no_data_no_model(stage, case, match, tmp_path, hh_file, tok_dir, odd_files):
    extra = {"empty file": [f"data.train=['{odd_files / 'empty.jsonl'}']"],
             "slice past the end": [f"data.train=['{hh_file}[5000:]']"],
             "reversed slice": [f"data.train=['{hh_file}[10:5]']"],
             "every pair too long": ["data.max_length=8"],
             "every record skipped": [f"data.train=['{odd_files / 'bad.jsonl'}']", "data.skip_bad_lines=true"],
             "epochs=0": ["optim.epochs=0"],
             "max_steps=0": ["optim.max_steps=0"],
             "text shorter than one block": [f"data.train=['{odd_files / 'short.jsonl'}']", "data.eval=[]"]}[case]
    with pytest.raises(UserError, match=match):
        train.main(args(stage, tmp_path / "run", hh_file, tok_dir, *extra))
    assert no_export(tmp_path / "run")


def test_eval_py_on_zero_pairs_is_an_error(tmp_path, hh_file, tok_dir):
    train.main(args("rm", tmp_path / "rm", hh_file, tok_dir, "optim.max_steps=1"))
    with pytest.raises(UserError, match=r"no pairs to evaluate \(all 30 records read were dropped"):
        eval_cli.main(["--model", str(tmp_path / "rm" / "export"), "--data", f"{hh_file}[2200:2230]",
                       "--max-length", "8", "--out", str(tmp_path / "ev")])


# ------------------------------------------------------------------------------------------------ one run per directory
def test_another_config_never_resumes_the_old_run(tmp_path, hh_file, tok_dir):
    common = ["optim.max_steps=3", "run.save_every=1", "run.eval_every=0"]
    train.main(args("rm", tmp_path / "run", hh_file, tok_dir, *common))
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(UserError,
                       match=r"(?s)different run.*optim\.lr: checkpoint 0\.001, this run 0\.0001.*run\.resume=never"):
        train.main(args("rm", tmp_path / "run", hh_file, tok_dir, *common, "optim.lr=1e-4"))
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # the refused run wrote nothing
    # resume=never moves the earlier run aside, out loud, and the new run owns the directory
    train.main(args("rm", tmp_path / "run", hh_file, tok_dir, *common, "optim.lr=1e-4", "run.resume=never"))
    aside = list((tmp_path / "run").glob("replaced-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_0000003").is_dir()
    assert [p.name for p in Checkpointer(tmp_path / "run", None).complete()] == ["step_0000002", "step_0000003"]
    assert "lr: 0.0001" in (tmp_path / "run" / "config.yaml").read_text()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and records[0]["lr"] == pytest.approx(1e-4)


def test_resumed_metrics_hold_each_step_once(tmp_path, hh_file, tok_dir):
    common = ["optim.max_steps=6", "optim.micro_batch_size=2", "run.save_every=2", "run.eval_every=3"]
    with pytest.raises(SystemExit):
        train.main(args("rm", tmp_path / "run", hh_file, tok_dir, *common, "run.halt_at_step=5"))
    train.main(args("rm", tmp_path / "run", hh_file, tok_dir, *common))
    train.main(args("rm", tmp_path / "run", hh_file, tok_dir, *common))  # a finished run, run again: nothing twice
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]


def test_second_run_on_a_directory_stops_naming_the_first(tmp_path, hh_file, tok_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    # the second run is started first, with everything imported, and enters train.py's main the moment the first
    # run holds the lock: the two overlap however fast the machine is
    second_argv = args("rm", run, hh_file, tok_dir, "optim.max_steps=8", "optim.micro_batch_size=2", "optim.lr=5e-3")
    waiter = (f"import os, runpy, sys, time; sys.path.insert(0, {str(REPO)!r}); import train\n"
              f"while not os.path.exists({str(run / '.lock')!r}): time.sleep(0.005)\n"
              f"sys.argv = ['train.py'] + {second_argv!r}\n"
              f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')\n")
    second = subprocess.Popen([sys.executable, "-c", waiter], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                              *args("rm", run, hh_file, tok_dir, "optim.max_steps=8", "optim.micro_batch_size=2",
                                    "optim.lr=2e-3")], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _, first_err = first.communicate(timeout=300)
    _, second_err = second.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode != 0 and "Traceback" not in second_err, second_err[-2000:]
    assert f"{run} is in use by another run (PID {first.pid} on" in second_err, second_err
    assert "lr: 0.002" in (run / "config.yaml").read_text()  # the first run's config, matching its export
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["lr"] == pytest.approx(2e-3)
    assert not (run / ".lock").exists()  # released at the end


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    from rmcore.training.distributed import Dist
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                "since": "then"}))
    with RunLock(tmp_path, Dist()):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"PID {os.getpid()}"):  # and now it is held by a live process
            RunLock(tmp_path, Dist()).__enter__()
    assert not (tmp_path / ".lock").exists()


def test_a_checkpoint_of_another_shape_names_its_tensors(tmp_path):
    from rmcore.model import ModelConfig, RewardModel
    from rmcore.training.distributed import Dist
    from rmcore.training.trainer import make_optimizer

    def model(n_layers):
        m = RewardModel(ModelConfig(vocab_size=40, dim=16, n_layers=n_layers, n_heads=2, ffn_dim=32))
        m.init_weights()
        return m
    three = model(3)
    ckpt = Checkpointer(tmp_path, Dist())
    path = ckpt.save(three, make_optimizer(three, lr=1e-3), 1, {})
    two = model(2)
    with pytest.raises(UserError, match=r"(?s)does not fit this model.*unexpected tensors: \['model\.layers\.2\."):
        ckpt.load(path, two, make_optimizer(two, lr=1e-3))


# ---------------------------------------------------------------------------------------------------- non-finite
def test_skipping_non_finite_steps_stops_after_the_limit_and_writes_nothing_non_finite(tmp_path, hh_file, tok_dir):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"3 steps in a row .*run\.max_skips_in_a_row=3"):
        train.main(args("rm", out, hh_file, tok_dir, "optim.lr=1e30", "optim.grad_clip=0", "run.on_nonfinite=skip",
                        "run.max_skips_in_a_row=3", "optim.max_steps=20", "optim.micro_batch_size=2",
                        "run.save_every=1", "run.eval_every=0"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 3 and no_export(out)
    assert (out / "checkpoints").is_dir() and non_finite_tensors(out) == []


def test_nan_margin_is_a_data_error(tmp_path):
    from rmcore.data.formats import read_examples
    from rmcore.errors import DataError
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0}) + "\n"
                 + '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: the margin is nan"):
        read_examples([str(f)])


# ---------------------------------------------------------------------------------------------------- corrupt files
def test_unreadable_latest_checkpoint_falls_back_to_the_one_before(tmp_path, hh_file, tok_dir):
    common = ["optim.micro_batch_size=4", "optim.max_steps=7", "run.save_every=2", "run.keep=3", "run.eval_every=0"]
    train.main(args("rm", tmp_path / "full", hh_file, tok_dir, *common))
    with pytest.raises(SystemExit):
        train.main(args("rm", tmp_path / "cut", hh_file, tok_dir, *common, "run.halt_at_step=5"))
    shard = next((tmp_path / "cut" / "checkpoints" / "step_0000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match=r"resumed from .*step_0000002 instead: .*step_0000004"):
        train.main(args("rm", tmp_path / "cut", hh_file, tok_dir, *common))
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    assert_same_weights(tmp_path / "full", tmp_path / "cut", atol=0)


def run_cli(script, *argv, cwd):
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return proc.stderr


def test_corrupt_inputs_are_one_line_errors_naming_the_file(tmp_path, hh_file, tok_dir):
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(Path(hh_file).read_bytes()[:20000])
    err = run_cli("train.py", *args("rm", tmp_path / "a", hh_file, tok_dir, f"data.train=['{truncated}']"),
                  cwd=tmp_path)
    assert f"error: {truncated}: unreadable after line" in err and "truncated" in err

    train.main(args("rm", tmp_path / "rm", hh_file, tok_dir, "optim.max_steps=1"))
    weights = tmp_path / "rm" / "export" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = run_cli("eval.py", "--model", tmp_path / "rm" / "export", "--data", f"{hh_file}[2200:2230]", cwd=tmp_path)
    assert f"error: {weights}: unreadable weights" in err

    # the config file's errors, in this process: the message the `error:` line above would carry
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("run:\n  stage: rm\n  out_dir: [unclosed\n")
    with pytest.raises(UserError) as raised:
        train.main(["--config", str(bad_yaml)])
    assert str(raised.value).startswith(f"{bad_yaml}:") and "YAML syntax error" in str(raised.value)
    with pytest.raises(UserError) as raised:
        train.main(["--config", str(tmp_path / "missing.yaml")])
    assert str(raised.value) == f"{tmp_path / 'missing.yaml'}: no such config file"


@pytest.mark.parametrize("spec,match", [
    ("{hh}[a:b]", r"bad slice '\[a:b\]'"),
    ("{hh}[ 1 : 5 ]", r"bad slice '\[ 1 : 5 \]'"),
    ("{dir}", r"is a directory"),
    ("Anthropic/hh-rlhf", r"looks like a Hugging Face dataset name"),
    ("{dir}/nothing.jsonl", r"nothing\.jsonl: no such file$"),
])
def test_file_spec_errors_say_what_is_wrong(spec, match, hh_file, tmp_path):
    from rmcore.data.formats import read_examples
    from rmcore.errors import DataError
    with pytest.raises(DataError, match=match):
        read_examples([spec.format(hh=hh_file, dir=tmp_path)])


def test_config_sizes_are_checked_before_any_work(tmp_path, hh_file, tok_dir):
    for key in ("optim.micro_batch_size=0", "optim.grad_accum=-1", "data.block_size=0", "data.max_length=0"):
        with pytest.raises(UserError, match=key.replace(".", r"\.").split("=")[0] + r"=-?\d+; expected >= 1"):
            train.main(args("rm", tmp_path / "run", hh_file, tok_dir, key))
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------- scoring
def test_score_refuses_what_it_cannot_score(tmp_path, hh_file, tok_dir):
    from rmcore.errors import DataError
    train.main(args("rm", tmp_path / "rm", hh_file, tok_dir, "optim.max_steps=1"))
    model = str(tmp_path / "rm" / "export")
    cases = {"blank line": ('{"text": "a"}\n\n{"text": "b"}\n', r"in\.jsonl:2: blank line"),
             "empty text": ('{"text": "a"}\n{"text": "  "}\n', r"in\.jsonl:2: empty `text`"),
             "empty response": ('{"prompt": "hi", "response": ""}\n', r"in\.jsonl:1: empty `response`")}
    for name, (content, match) in cases.items():
        (tmp_path / "in.jsonl").write_text(content)
        with pytest.raises(DataError, match=match):
            eval_cli.main(["score", "--model", model, "--input", str(tmp_path / "in.jsonl"), "--output",
                           str(tmp_path / "out.jsonl")])
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match=r"max_length=100000 is above the model's position limit"):
        eval_cli.main(["score", "--model", model, "--input", str(tmp_path / "in.jsonl"), "--output",
                       str(tmp_path / "out.jsonl"), "--max-length", "100000"])


def test_non_finite_weights_are_never_written(tmp_path):
    from rmcore.errors import NonFiniteWeights
    from rmcore.model import ModelConfig, RewardModel
    from rmcore.training.checkpoints import export_pretrained
    from rmcore.training.distributed import Dist
    from rmcore.training.trainer import make_optimizer
    m = RewardModel(ModelConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, ffn_dim=32))
    m.init_weights()
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[3, 5] = float("inf")
    with pytest.raises(NonFiniteWeights, match=r"checkpoint at step 1.*first: model\.layers\.0\.mlp\.up_proj\.weight"):
        Checkpointer(tmp_path, Dist()).save(m, make_optimizer(m, lr=1e-3), 1, {})
    with pytest.raises(NonFiniteWeights, match="export"):
        export_pretrained(m, tmp_path / "export", Dist())
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "export").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_finite_agrees_with_isfinite_all_also_where_the_sum_overflows(dtype):
    from rmcore.training.checkpoints import all_finite
    huge = torch.full((4, 8), 3e38)  # every entry finite, their sum inf: the one-read shortcut must not decide
    cases = {"normal": torch.randn(4, 8), "huge": huge}
    for name, value in (("inf", float("inf")), ("nan", float("nan")), ("-inf", float("-inf"))):
        cases[f"huge and one {name}"], cases[f"normal and one {name}"] = huge.clone(), torch.randn(4, 8)
        cases[f"huge and one {name}"][1, 2] = cases[f"normal and one {name}"][3, 0] = value
    for name, t in cases.items():
        t = t.to(dtype)
        assert all_finite(t) == bool(torch.isfinite(t).all()), name
    assert all_finite(huge.to(dtype)) and not all_finite(cases["normal and one nan"].to(dtype))


def test_a_nan_reward_is_an_error(tmp_path, tok_dir):
    from rmcore.eval.scorer import RewardScorer
    from rmcore.model import ModelConfig, RewardModel
    from rmcore.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(tok_dir)
    m = RewardModel(ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=64))
    m.init_weights()
    with torch.no_grad():
        m.score.weight[0, 0] = float("nan")
    save_pretrained(m, tmp_path)  # written by hand: training never exports such weights
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"non-finite reward for input\(s\) \[0, 1\]"):
        RewardScorer(tmp_path).score(["\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: b"])


def test_corrupt_parquet_gzip_and_json_files_are_named(tmp_path):
    from rmcore.data.formats import read_examples
    from rmcore.errors import DataError
    from rmcore.interop.hf_checkpoint import read_hf_config
    (tmp_path / "x.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match=r"x\.parquet: unreadable parquet"):
        read_examples([str(tmp_path / "x.parquet")])
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "not gzip"}\n')
    with pytest.raises(DataError, match=r"plain\.jsonl\.gz: unreadable after line 0 .*corrupt or truncated"):
        read_examples([str(tmp_path / "plain.jsonl.gz")])
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(UserError, match=r"config\.json: malformed JSON"):
        read_hf_config(tmp_path)


def test_malformed_trainer_json_falls_back_too(tmp_path, hh_file, tok_dir):
    common = ["optim.micro_batch_size=4", "optim.max_steps=5", "run.save_every=2", "run.keep=3", "run.eval_every=0"]
    with pytest.raises(SystemExit):
        train.main(args("rm", tmp_path / "cut", hh_file, tok_dir, *common, "run.halt_at_step=4"))
    (tmp_path / "cut" / "checkpoints" / "step_0000004" / "trainer.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"step_0000002 instead: .*trainer\.json: unreadable"):
        train.main(args("rm", tmp_path / "cut", hh_file, tok_dir, *common))
    train.main(args("rm", tmp_path / "full", hh_file, tok_dir, *common))
    assert_same_weights(tmp_path / "full", tmp_path / "cut", atol=0)
