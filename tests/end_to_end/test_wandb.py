"""W&B for real: offline runs of train.py, raft.py, ppo.py and eval.py read back with wandb's own record reader;
the sweep files pass wandb's sweep-config validation; online without credentials stops at the start."""
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import eval as eval_cli
import ppo
import raft
import train
from helpers.runs import REPO, args, ppo_args, raft_args

pytest.importorskip("wandb")  # in the dev extra; a bare install runs the rest of the suite


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")


def read_offline_run(root: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of the one offline run under root, read with wandb's own reader of its record log."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore
    files = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    # wandb's service process may still be writing the log when finish() returns (seen once in CI on a loaded
    # 2-core machine: the config was there, no history): read until the run's closing `exit` record is in
    records, deadline = None, time.monotonic() + 60
    while not records or records[-1].WhichOneof("record_type") != "exit":
        if records is not None:
            assert time.monotonic() < deadline, [r.WhichOneof("record_type") for r in records]
            time.sleep(0.2)
        store = datastore.DataStore()
        store.open_for_scan(files[0])
        records = []
        while (data := store.scan_data()) is not None:
            records.append(wandb_internal_pb2.Record())
            records[-1].ParseFromString(data)
    config, history = {}, []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind in ("run", "config"):  # the run record carries the config given to wandb.init; updates follow
            for item in (record.run.config if kind == "run" else record.config).update:
                config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return config, history


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_offline_rm_run_holds_the_losses_of_metrics_jsonl_and_the_resolved_config(tmp_path, hh_file, tok_dir):
    out = tmp_path / "rm"
    train.main(args("rm", out, hh_file, tok_dir, "optim.max_steps=3", "run.eval_every=2", "logging.wandb=offline"))
    config, history = read_offline_run(out)
    mine = {r["step"]: r["loss"] for r in jsonl(out / "metrics.jsonl") if "loss" in r}
    theirs = {row["_step"]: row["loss"] for row in history if "loss" in row}
    assert len(mine) == 3 and theirs == mine
    evals = [r["eval_acc"] for r in jsonl(out / "metrics.jsonl") if "eval_acc" in r]
    assert [row["eval_acc"] for row in history if "eval_acc" in row] == evals
    saved = yaml.safe_load((out / "config.yaml").read_text())  # the resolved config the run wrote
    assert {k: config[k] for k in saved} == json.loads(json.dumps(saved))
    assert config["optim"]["lr"] == 1e-3 and config["run"]["stage"] == "rm" and config["model"]["dim"] == 64


def test_offline_raft_ppo_and_eval_runs_hold_their_metrics_and_config(tmp_path, hh_file, policy_dir, rm_dir):
    raft.main(raft_args(tmp_path / "raft", hh_file, policy_dir, "raft.iterations=1", "logging.wandb=offline"))
    config, history = read_offline_run(tmp_path / "raft")
    assert config["raft"]["k"] == 4
    logged = [r for r in jsonl(tmp_path / "raft" / "metrics.jsonl") if "raft/reward_all" in r]
    assert [row["raft/reward_all"] for row in history if "raft/reward_all" in row] == \
        [r["raft/reward_all"] for r in logged] and logged

    ppo.main(ppo_args(tmp_path / "ppo", hh_file, policy_dir, rm_dir, "ppo.iterations=1", "logging.wandb=offline"))
    config, history = read_offline_run(tmp_path / "ppo")
    assert config["ppo"]["advantage"] == "gae" and config["optim"]["epochs"] == 2
    logged = [r["loss/policy"] for r in jsonl(tmp_path / "ppo" / "metrics.jsonl") if "loss/policy" in r]
    assert [row["loss/policy"] for row in history if "loss/policy" in row] == logged and logged
    assert any("objective/kl" in row for row in history)

    eval_cli.main(["--model", str(rm_dir), "--data", f"{hh_file}[2200:2230]", "--out",
                   str(tmp_path / "eval"), "--wandb", "offline"])
    config, history = read_offline_run(tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["results"]
    (model, per_model), = report.items()
    (spec, result), = per_model.items()
    assert history[0][f"{model}/{spec}/accuracy"] == result["accuracy"]
    assert config["model"] == [str(rm_dir)] and config["wandb"] == "offline"


def test_sweep_files_pass_wandbs_sweep_config_validation():
    import sweeps
    files = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    assert files
    for f in files:
        assert sweeps.schema_violations_from_proposed_config(yaml.safe_load(f.read_text())) == [], f
    # the validation does reject a malformed file
    assert sweeps.schema_violations_from_proposed_config({"method": "grid", "parameters": {"x": {"valuez": [1]}}})


def test_online_without_credentials_stops_at_the_start(tmp_path, hh_file, tok_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true")  # no ~/.netrc, no API key
    out = tmp_path / "rm"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args("rm", out, hh_file, tok_dir,
                           "optim.max_steps=3", "logging.wandb=online")], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "logging.wandb=online" in proc.stderr and "wandb login" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr  # one message
    trained = (out / "metrics.jsonl").is_file() and any("loss" in r for r in jsonl(out / "metrics.jsonl"))
    assert not trained  # stopped before the first step
