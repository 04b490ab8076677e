"""Where a run's time goes, by kind of operator: torch.profiler around a training script's main, in-process.

    python bench/profile_ops.py rm-135m                # train.py's rm stage as bench/rm_vs_trl.py --size 135m runs it
    python bench/profile_ops.py rm-135m --pairs 16     # fewer training pairs (default 40: 5 optimizer steps of 8)
    python bench/profile_ops.py grpo                   # ppo.py as bench/grpo_vs_trl.py runs it (2 iterations)
    python bench/profile_ops.py rm-135m --compare OLD  # the same, run at git commit OLD (a worktree), side by side

Each run prints the self CPU time of every operator summed into the groups below, with its share of the total, and
the heaviest operators by name, then the run's wall time and what of it no operator accounts for (Python between
operators, reading and writing files, the profiler's bookkeeping). The whole run is profiled: model load, data, eval
and saving included. The profiler's own overhead is in every figure; compare runs of this script with each other,
not with the benchmarks' wall times. With --compare, the script runs once at OLD (checked out in a temporary git
worktree) and once in this working tree, in two processes one after the other.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this tree's rmcore, also in a worktree of another commit (--compare)

# operator -> group; an operator not named here counts as "other"
GROUPS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                         "aten::_scaled_dot_product_efficient_attention"),
    "elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::pow", "aten::rsqrt",
                    "aten::silu", "aten::silu_backward", "aten::sum", "aten::mean", "aten::mul_", "aten::div_",
                    "aten::exp", "aten::exp_", "aten::where", "aten::cos", "aten::sin", "aten::sigmoid",
                    "aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::_softmax",
                    "aten::_softmax_backward_data", "aten::linalg_vector_norm"),
    "fills, accumulation, copies, allocation": ("aten::fill_", "aten::zero_", "aten::add_", "aten::copy_",
                                                "aten::empty", "aten::empty_strided", "aten::_to_copy"),
    "AdamW": ("aten::_fused_adamw_", "aten::_foreach_mul_", "aten::_foreach_add_", "aten::_foreach_addcmul_",
              "aten::_foreach_addcdiv_", "aten::_foreach_sqrt", "aten::_foreach_div_", "aten::_foreach_lerp_"),
    "concatenation and indexing": ("aten::cat", "aten::index", "aten::index_select", "aten::_index_put_impl_",
                                   "aten::embedding_dense_backward", "aten::index_add_", "aten::gather",
                                   "aten::scatter_add_"),
}


def rm_135m_argv(pairs: int) -> tuple[str, list[str]]:
    """train.py and bench/rm_vs_trl.py's rmcore overrides at --size 135m, held-out the first 8 of its records."""
    sys.path.insert(0, str(REPO / "bench"))
    import rm_vs_trl
    out = REPO / "runs" / "bench" / "rm_vs_trl"
    model_dir, _ = rm_vs_trl.build_135m(out, REPO / "models" / "smollm2-135m-instruct")
    cmd = rm_vs_trl.rmcore_command(model_dir.resolve(), out / "profile_ops", pairs, "fp32", "[1932:1940]", 1e-5, [])
    return "train.py", cmd[2:]


def grpo_argv(iterations: int) -> tuple[str, list[str]]:
    """ppo.py and bench/grpo_vs_trl.py's rmcore overrides (its defaults, `iterations` iterations)."""
    sys.path.insert(0, str(REPO / "bench"))
    import grpo_vs_trl
    a = argparse.Namespace(model=str(REPO / "models" / "smollm2-135m-instruct"), prompts=8, k=4, new_tokens=48,
                           iterations=iterations, epochs=2, out=str(REPO / "runs" / "bench" / "grpo_vs_trl"),
                           device="cpu", host_memory="keep", minibatch_order="samples")  # grpo_vs_trl's defaults
    grpo_vs_trl.prepare(a, Path(a.out))
    return "ppo.py", grpo_vs_trl.ppo_overrides(a, Path(a.out) / "profile_ops")


def profile(what: str, size: int, top: int) -> dict:
    """Profile one run in this process: {"groups": {group: s}, "top": [(op, s, calls)], "total": s, "wall": s}."""
    import importlib
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from rmcore.training.launch import run_script
    script, argv = rm_135m_argv(size) if what == "rm-135m" else grpo_argv(size)
    run_dir = Path(next(o for o in argv if o.startswith("run.out_dir=")).split("=", 1)[1])
    shutil.rmtree(run_dir, ignore_errors=True)
    main = importlib.import_module(Path(script).stem).main
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_script(main, argv)
        wall = time.perf_counter() - start
    shutil.rmtree(run_dir, ignore_errors=True)
    group_of = {op: group for group, ops in GROUPS.items() for op in ops}
    groups = dict.fromkeys([*GROUPS, "other"], 0.0)
    ops = []
    for e in prof.key_averages():
        seconds = e.self_cpu_time_total / 1e6
        groups[group_of.get(e.key, "other")] += seconds
        ops.append((e.key, seconds, e.count))
    ops.sort(key=lambda o: -o[1])
    return {"groups": groups, "top": ops[:top], "total": sum(groups.values()), "wall": wall}


def at_commit(commit: str, argv: list[str]) -> dict:
    """This script's child run at `commit`, in a temporary git worktree sharing this checkout's models/ and data."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True,
                       capture_output=True)
        try:
            for shared in ("models", "runs"):
                if (REPO / shared).exists() and not (tree / shared).exists():
                    (tree / shared).symlink_to(REPO / shared)
            # this file runs the old tree's code: the worktree gets it only if the commit lacks it
            shutil.copy(__file__, tree / "bench" / "profile_ops.py")
            out = subprocess.run([sys.executable, str(tree / "bench" / "profile_ops.py"), *argv, "--child"],
                                 check=True, capture_output=True, text=True, cwd=tree).stdout
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
    return json.loads(out.strip().splitlines()[-1])


def here(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--child"], check=True, capture_output=True, text=True,
                         cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["rm-135m", "grpo"])
    p.add_argument("--pairs", type=int, default=40, help="rm-135m: training pairs")
    p.add_argument("--iterations", type=int, default=2, help="grpo: iterations")
    p.add_argument("--top", type=int, default=12, help="operators listed by name")
    p.add_argument("--compare", metavar="COMMIT", help="also profile the code at COMMIT, printed first")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    size = a.pairs if a.what == "rm-135m" else a.iterations
    argv = [a.what, "--pairs", str(a.pairs), "--iterations", str(a.iterations), "--top", str(a.top)]
    if a.child:
        print(json.dumps(profile(a.what, size, a.top)))
        return
    sys.path.insert(0, str(REPO / "bench"))
    from rm_vs_trl import cpu_line
    print(cpu_line())
    runs = ([(a.compare, at_commit(a.compare, argv))] if a.compare else []) + [("this tree", here(argv))]
    print(f"{a.what}, {'pairs' if a.what == 'rm-135m' else 'iterations'} {size}: self CPU time by operator group, "
          f"seconds (share of the profiled total)")
    print("| group | " + " | ".join(name for name, _ in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for group in [*GROUPS, "other"]:
        print(f"| {group} | " + " | ".join(f"{r['groups'][group]:.2f} ({r['groups'][group] / r['total']:.1%})"
                                           for _, r in runs) + " |")
    print("| all operators | " + " | ".join(f"{r['total']:.2f}" for _, r in runs) + " |")
    # Python between operators, the disk (saving, loading), the profiler's own bookkeeping
    print("| outside operators | " + " | ".join(f"{r['wall'] - r['total']:.2f}" for _, r in runs) + " |")
    print("| wall | " + " | ".join(f"{r['wall']:.2f}" for _, r in runs) + " |")
    for name, r in runs:
        print(f"\n{name}, heaviest operators: " + "; ".join(f"{op} {s:.2f} s ({calls} calls)"
                                                           for op, s, calls in r["top"]))


if __name__ == "__main__":
    main()
