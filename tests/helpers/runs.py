"""Command lines for tiny runs of train.py, raft.py and ppo.py, and readers of what a run wrote."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128"]


def args(stage, out, hh_file, tok_dir, *extra):
    """train.py's overrides for a tiny fp32 CPU run of `stage` on the shipped data."""
    base = [f"run.stage={stage}", f"run.out_dir={out}", f"run.tokenizer={tok_dir}", "run.precision=fp32",
            "run.device=cpu", "logging.progress=false", "optim.lr=1e-3", "optim.grad_clip=0",
            f"data.train=['{hh_file}[:40]']", f"data.eval=['{hh_file}[2200:2230]']", "data.max_length=256",
            "data.block_size=64", *MODEL]
    return base + list(extra)


def raft_args(out, hh_file, policy_dir, *extra):
    """raft.py's overrides: 16 prompts x 4 samples an iteration, rewarded by the number of letters "e"."""
    return [f"run.out_dir={out}", f"run.init_from={policy_dir}", "run.precision=fp32", "run.device=cpu",
            "logging.progress=false", f"data.train=['{hh_file}[:200]']", "data.eval=[]", "raft.eval_prompts=0",
            "raft.reward=helpers.rewards:count_e", "raft.discard=[empty]", "raft.prompts_per_iter=16", "raft.k=4",
            "raft.max_new_tokens=24", "raft.max_prompt_tokens=128", "raft.generation_batch_size=64",
            "optim.lr=1e-3", "optim.schedule=constant", "optim.micro_batch_size=8", "optim.grad_clip=1.0",
            *extra]


def ppo_args(out, hh_file, policy_dir, rm_dir, *extra):
    """ppo.py's overrides: 16 prompts an iteration, rewarded by the number of letters "e", the critic from rm_dir."""
    return [f"run.out_dir={out}", f"run.init_from={policy_dir}", "run.precision=fp32", "run.device=cpu",
            "logging.progress=false", f"data.train=['{hh_file}[:200]']", "data.eval=[]", "ppo.eval_prompts=0",
            "ppo.reward=helpers.rewards:count_e", f"ppo.critic={rm_dir}", "ppo.prompts_per_iter=16", "ppo.k=1",
            "ppo.max_new_tokens=16", "ppo.max_prompt_tokens=96", "ppo.generation_batch_size=64",
            "optim.lr=1e-3", "optim.micro_batch_size=4", "optim.grad_accum=2", "optim.epochs=2", *extra]


def torchrun(nproc, script, argv, timeout=300):
    """`script` (a path under the repository) under torchrun with nproc processes, tests/ on PYTHONPATH."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / script), *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def records(out):
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_times(rows):
    """History rows without the seconds each phase took (time/*): what a second run must reproduce exactly."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def history(out, name):
    """A run's name_history.json (name: raft or ppo) without_times."""
    return without_times(json.loads((Path(out) / f"{name}_history.json").read_text()))


def conflicting_keys(out):
    """(step, key, values) for each key that metrics.jsonl holds more than once at one step with different values
    (W&B would keep one of them)."""
    seen = {}
    for rec in records(out):
        for key, value in rec.items():
            seen.setdefault((rec["step"], key), set()).add(json.dumps(value))
    return [(step, key, values) for (step, key), values in seen.items() if len(values) > 1]


def losses(out):
    """step -> loss, the last record of each step (a resumed run re-logs the steps after its checkpoint)."""
    return {rec["step"]: rec["loss"] for rec in records(out) if "loss" in rec}


def weights(out):
    return load_file(str(Path(out) / "export" / "model.safetensors"))


def assert_same_weights(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), k
