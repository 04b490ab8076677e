"""How a run computes: precision=auto follows the hardware's native bf16, an explicit bf16 without it warns, and the
heap's free pages go back to the OS."""
import platform
import subprocess
import sys

import pytest
import torch

from rmcore.training import runtime
from rmcore.training.runtime import resolve_precision


@pytest.mark.parametrize("amx,avx512_bf16,expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                      (False, True, "bf16")])
def test_precision_auto_follows_native_bf16(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    precision, why = resolve_precision("auto", torch.device("cpu"))
    assert precision == expected and f"-> {expected}" in why
    assert resolve_precision("fp32", torch.device("cpu"))[0] == "fp32"


def test_explicit_bf16_without_native_bf16_runs_with_a_measured_warning(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(runtime, "bf16_slowdown", lambda: 123.0)
    with pytest.warns(UserWarning, match=r"bf16 matmul measured here is 123x slower than fp32"):
        assert resolve_precision("bf16", torch.device("cpu"))[0] == "bf16"


FRAGMENTED_HEAP = """
import os, sys, torch
from rmcore.training.runtime import release_freed_memory
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
blocks = [torch.ones(16 * 1024) for _ in range(4096)]  # 64 KB each: under glibc's mmap threshold, so on the heap
del blocks[::2]                                         # holes glibc keeps: the blocks after them pin the heap
before = rss_mb()
released = release_freed_memory()
print(released, before, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_release_freed_memory_returns_the_heaps_free_pages_to_the_os():
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    released, before, after = out.stdout.split()
    assert released == "True"
    assert float(before) - float(after) > 100, out.stdout  # 2048 freed blocks of 64 KB: 128 MB of free pages


FREED_BLOCK = """
import os, sys, torch
from rmcore.training.runtime import set_host_memory
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
applied = set_host_memory(sys.argv[1])
before = rss_mb()
block = torch.ones(64 * 2**20)  # 256 MB: glibc's own policy mmaps a block this size and unmaps it when freed
del block
print(applied, rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_host_memory_keep_keeps_freed_pages_that_glibcs_own_policy_returns():
    kept = {}
    for policy in ("keep", "glibc"):
        out = subprocess.run([sys.executable, "-c", FREED_BLOCK, policy], capture_output=True, text=True, check=True)
        applied, kept[policy] = out.stdout.split()
        assert applied == "True"
    assert float(kept["keep"]) > 200 and float(kept["glibc"]) < 20, kept
