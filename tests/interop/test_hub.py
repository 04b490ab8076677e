"""Models and datasets by Hugging Face Hub id, against a stand-in for the Hub on 127.0.0.1 (tests/helpers/
hub_server.py) that answers the endpoints huggingface_hub calls. rmcore runs in subprocesses with HF_ENDPOINT,
HF_HOME, HF_HUB_OFFLINE and HF_TOKEN set as a user sets them: the download path is the one users run."""
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from rmcore.interop.hf_checkpoint import load_pretrained, save_adapter
from rmcore.lora import LoraConfig, lora_modules
from rmcore.model import RewardModel
from rmcore.training.distributed import Dist
from rmcore.training.runtime import build_model

from helpers.hub_server import HubServer
from helpers.runs import REPO, args, raft_args

RM, LM, ADAPTER, GATED, BROKEN, DATA = ("rmcore-test/tiny-rm", "rmcore-test/tiny-lm", "rmcore-test/tiny-adapter",
                                        "rmcore-test/gated-rm", "rmcore-test/broken-rm", "rmcore-test/hh-slice")
IDS = [[1, 17, 42, 99, 7, 2], [1, 5, 6, 2]]  # two token sequences scored everywhere below


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repos(rm_dir, policy_dir, hh_file, tmp_path_factory):
    """What the stand-in serves: the tiny RM (two commits: v1, then main with the value head doubled, beside
    files rmcore never reads), the tiny policy, a PEFT adapter over the RM by hub id, and a dataset of 40 HH
    records as jsonl.gz and as two parquet files."""
    rm_files = files_of(rm_dir)
    weights = load(rm_files["model.safetensors"])
    doubled = save({**weights, "score.weight": weights["score.weight"] * 2})
    tmp = tmp_path_factory.mktemp("adapter")
    model = build_model(RewardModel, Dist(), init_from=str(rm_dir), lora=LoraConfig(enabled=True, rank=4, alpha=8.0,
                                                                                      dropout=0.0), seed=3)
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    save_adapter(model, tmp / "adapter", model.state_dict(), lora=LoraConfig(enabled=True, rank=4, alpha=8.0,
                                                                             dropout=0.0), base=RM)
    with gzip.open(hh_file, "rt") as f:
        records = [json.loads(line) for _, line in zip(range(40), f)]
    jsonl = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    import pyarrow as pa
    import pyarrow.parquet as pq
    parquet = []
    for part in (records[:20], records[20:]):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part), buffer)
        parquet.append(buffer.getvalue())
    extra = {"README.md": b"# tiny rm\n", "optimizer.pt": b"not read by rmcore"}
    return {
        "rm_v1": {**rm_files, **extra},
        "rm_main": {**rm_files, **extra, "model.safetensors": doubled},
        "lm": files_of(policy_dir),
        "adapter": {**files_of(tmp / "adapter"), **{k: v for k, v in rm_files.items() if k.startswith(("tokenizer",
                                                                                                    "special"))}},
        "data": {"data/test.jsonl.gz": jsonl, "data/test-00000-of-00002.parquet": parquet[0],
                 "data/test-00001-of-00002.parquet": parquet[1], "README.md": b"40 HH records\n"},
        "records": records,
    }


def serve(repos) -> tuple[HubServer, dict]:
    hub = HubServer().start()
    commits = {"v1": hub.add(RM, repos["rm_v1"], ref="v1")}
    commits["main"] = hub.add(RM, repos["rm_main"])
    hub.add(LM, repos["lm"])
    hub.add(ADAPTER, repos["adapter"])
    hub.add(GATED, repos["rm_v1"], gated=True)
    hub.add(BROKEN, repos["rm_v1"])
    hub.broken.add((BROKEN, "model.safetensors"))
    hub.add(DATA, repos["data"], kind="dataset")
    return hub, commits


@pytest.fixture(scope="module")
def hub(repos):
    server, commits = serve(repos)
    server.commits = commits
    yield server
    server.stop()


def run(argv, hub_url, hf_home, cwd=REPO, **env):
    """A command with the Hub variables a user sets; huggingface_hub reads them when it is imported."""
    full = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    full.update({"HF_ENDPOINT": hub_url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1",
                 "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5", **env})
    return subprocess.run([sys.executable, *map(str, argv)], env=full, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


# what a snippet prints: the rewards of IDS from a model loaded by id, and the files of its snapshot
SCORE = ("import json, sys, torch; from rmcore import RewardModel, Tokenizer, load_pretrained; "
         "m = load_pretrained(RewardModel, sys.argv[1]).eval(); tok = Tokenizer.from_pretrained(sys.argv[1]); "
         f"r = [float(m(torch.tensor([x]))[0]) for x in {IDS}]; "
         "print(json.dumps({'rewards': r, 'vocab': tok.vocab_size}))")


def rewards_of(path) -> list[float]:
    model = load_pretrained(RewardModel, path).eval()
    with torch.no_grad():
        return [float(model(torch.tensor([x]))[0]) for x in IDS]


def snapshot_files(hf_home: Path, repo: str, kind: str = "models") -> set[str]:
    folder = hf_home / "hub" / f"{kind}--{repo.replace('/', '--')}" / "snapshots"
    return {p.relative_to(s).as_posix() for s in folder.iterdir() for p in s.rglob("*") if p.is_file()}


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


# ------------------------------------------------------------------------------------------------ models
def test_a_model_by_hub_id_is_fetched_with_only_the_files_rmcore_reads(hub, repos, rm_dir, tmp_path):
    proc = run(["-c", SCORE, RM + "@v1"], hub.url, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rewards"] == pytest.approx(rewards_of(rm_dir), abs=1e-6)  # the very weights of the local export
    assert snapshot_files(tmp_path / "hf", RM) == set(repos["rm_v1"]) - {"README.md", "optimizer.pt"}
    assert not any("README.md" in r or "optimizer.pt" in r for r in hub.requests)


def test_a_revision_pins_the_weights_and_the_export_records_the_commit(hub, rm_dir, hh_file, tok_dir, tmp_path):
    v1, main = (json.loads(run(["-c", SCORE, spec], hub.url, tmp_path / "hf").stdout.splitlines()[-1])["rewards"]
                for spec in (RM + "@v1", RM))
    assert main == pytest.approx([2 * r for r in v1], rel=1e-5)  # main doubled the value head
    commit = hub.commits["v1"]
    same = json.loads(run(["-c", SCORE, f"{RM}@{commit}"], hub.url, tmp_path / "hf").stdout.splitlines()[-1])
    assert same["rewards"] == v1  # a commit hash names the same snapshot as its tag
    out = tmp_path / "rm"
    proc = run(["train.py", *args("rm", out, hh_file, tok_dir, f"run.init_from={RM}@v1", "optim.max_steps=1",
                                  "data.eval=[]")], hub.url, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "export" / "config.json").read_text())["rmcore"]
    assert record["hub_revisions"] == {f"{RM}@v1": commit}


def test_the_cache_serves_a_second_run_with_the_hub_gone_and_offline(repos, rm_dir, tmp_path):
    hub, _ = serve(repos)
    assert run(["-c", SCORE, RM], hub.url, tmp_path / "hf").returncode == 0
    hub.stop()  # the Hub is unreachable from now on
    for offline in ("0", "1"):
        proc = run(["-c", SCORE, RM], hub.url, tmp_path / "hf", HF_HUB_OFFLINE=offline)
        assert proc.returncode == 0, (offline, proc.stderr[-2000:])
        assert json.loads(proc.stdout.splitlines()[-1])["rewards"] == pytest.approx(
            [2 * r for r in rewards_of(rm_dir)], rel=1e-5)


def test_a_local_directory_named_like_the_id_wins(hub, policy_dir, rm_dir, tmp_path, monkeypatch):
    shutil.copytree(rm_dir, tmp_path / RM)  # ./rmcore-test/tiny-rm holds the v1 weights; the Hub's main doubles them
    monkeypatch.chdir(tmp_path)
    before = len(hub.requests)
    proc = run(["-c", SCORE, RM], hub.url, tmp_path / "hf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1])["rewards"] == pytest.approx(rewards_of(rm_dir), abs=1e-6)
    assert len(hub.requests) == before


def test_a_peft_adapter_by_id_brings_its_base_by_id(hub, repos, tmp_path):
    proc = run(["-c", SCORE, ADAPTER], hub.url, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert snapshot_files(tmp_path / "hf", RM)  # the base, named in adapter_config.json by its id, came from the hub
    for name in ("base", "adapter"):  # the same files, all local: the adapter folded into the hub's main base
        (tmp_path / name).mkdir()
        for file, data in repos["rm_main" if name == "base" else "adapter"].items():
            (tmp_path / name / file).write_bytes(data)
    assert json.loads(proc.stdout.splitlines()[-1])["rewards"] == pytest.approx(
        rewards_of_adapter(tmp_path / "base", tmp_path / "adapter"), abs=1e-6)


def rewards_of_adapter(base, adapter) -> list[float]:
    model = load_pretrained(RewardModel, base, adapter=adapter).eval()
    with torch.no_grad():
        return [float(model(torch.tensor([x]))[0]) for x in IDS]


@pytest.mark.parametrize("spec,env,expected", [
    ("rmcore-test/no-such-model", {}, "no model repository rmcore-test/no-such-model"),
    (RM + "@no-such-branch", {}, "has no revision 'no-such-branch'"),
    (GATED, {}, "is a gated model repository"),
    (BROKEN, {}, "the download from"),
    (RM, {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1 forbids downloading it"),
])
def test_every_hub_failure_is_one_line_naming_the_id(hub, hh_file, tmp_path, spec, env, expected):
    proc = run(["eval.py", "--model", spec, "--data", f"{hh_file}[2200:2210]", "--out", tmp_path / "ev"], hub.url,
               tmp_path / "hf", **env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith(f"error: {spec}: ") and expected in line, line
    if env.get("HF_HUB_OFFLINE"):
        assert str(tmp_path / "hf" / "hub") in line  # the cache folder it looked in


def test_a_gated_model_downloads_with_a_token(hub, rm_dir, tmp_path):
    proc = run(["-c", SCORE, GATED], hub.url, tmp_path / "hf", HF_TOKEN=hub.token)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_interrupted_download_is_never_read_as_complete(repos, tmp_path):
    hub, _ = serve(repos)
    try:
        first = run(["-c", SCORE, BROKEN], hub.url, tmp_path / "hf")
        assert first.returncode != 0 and "the download from" in first.stderr
        offline = run(["-c", SCORE, BROKEN], hub.url, tmp_path / "hf", HF_HUB_OFFLINE="1")
        assert offline.returncode != 0 and "is incomplete" in offline.stderr, offline.stderr[-2000:]
        hub.broken.clear()  # the network is back: the next run finishes the snapshot
        assert run(["-c", SCORE, BROKEN], hub.url, tmp_path / "hf").returncode == 0
    finally:
        hub.stop()


# ------------------------------------------------------------------------------------------------ datasets
READ = ("import json, sys; from rmcore.data.formats import read_examples; "
        "ex, rep = read_examples(sys.argv[1:]); "
        "print(json.dumps([[e.id, e.prompt, e.chosen, e.rejected] for e in ex]))")


def test_dataset_files_by_hf_path_read_like_local_files(hub, repos, tmp_path):
    local = tmp_path / "local.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in repos["records"]))
    want = json.loads(run(["-c", READ, str(local)], hub.url, tmp_path / "hf").stdout.splitlines()[-1])
    for spec, rows in ((f"hf://datasets/{DATA}/data/test.jsonl.gz[:10]", slice(0, 10)),
                       (f"hf://datasets/{DATA}/data/*.parquet[15:30]", slice(15, 30))):  # a glob read as one stream
        proc = run(["-c", READ, spec], hub.url, tmp_path / "hf")
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout.splitlines()[-1])
        assert [g[1:] for g in got] == [w[1:] for w in want[rows]], spec
    assert got[0][0] == f"hf://datasets/{DATA}/data/test-00000-of-00002.parquet:row 15"
    assert got[-1][0] == f"hf://datasets/{DATA}/data/test-00001-of-00002.parquet:row 9"
    assert snapshot_files(tmp_path / "hf", DATA, "datasets") == set(repos["data"]) - {"README.md"}
    missing = run(["-c", READ, f"hf://datasets/{DATA}/data/nothing-*.parquet"], hub.url, tmp_path / "hf")
    assert missing.returncode != 0 and "no file of the dataset repository" in missing.stderr


def test_eval_of_a_hub_model_on_a_hub_dataset_runs_offline_from_the_cache(hub, rm_dir, tmp_path):
    argv = ["eval.py", "--model", RM, "--data", f"hf://datasets/{DATA}/data/test.jsonl.gz"]
    online = run([*argv, "--out", tmp_path / "online"], hub.url, tmp_path / "hf")
    assert online.returncode == 0, online.stderr[-2000:]
    requests = len(hub.requests)
    offline = run([*argv, "--out", tmp_path / "offline"], hub.url, tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert len(hub.requests) == requests  # nothing asked of the network
    a, b = (json.loads((tmp_path / d / "report.json").read_text())["results"] for d in ("online", "offline"))
    assert a == b and next(iter(next(iter(a.values())).values()))["pairs"] >= 10  # 19 fit the RM's max_length


def test_raft_starts_from_and_is_rewarded_by_hub_models(hub, hh_file, tmp_path):
    out = tmp_path / "raft"
    proc = run(["raft.py", *raft_args(out, hh_file, LM, "raft.iterations=1", "raft.prompts_per_iter=4", "raft.k=2",
                                      f"raft.reward={RM}@v1")], hub.url, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "export" / "config.json").read_text())["rmcore"]
    assert set(record["hub_revisions"]) == {LM, f"{RM}@v1"}
