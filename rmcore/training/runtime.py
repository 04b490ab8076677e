"""How a run computes: the precision (from the hardware), seeds, the model built for one process or sharded with
FSDP2 across many, autocast and the compute dtype, and gradient synchronisation under accumulation.
"""
from __future__ import annotations

import ctypes
import random
import time
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from rmcore.interop.hf_checkpoint import config_from_hf, load_pretrained, read_hf_config, with_reward_heads
from rmcore.interop.hub import resolve_model
from rmcore.lora import LoraConfig, adapters_disabled, apply_lora
from rmcore.model import ModelConfig
from rmcore.training.distributed import Dist, apply_fsdp


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` multiplies bf16 matrices natively, why)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'does not support'} bf16"
    if torch.cpu._is_amx_tile_supported():
        return True, "this CPU has AMX tiles (native bf16 matmuls)"
    if torch.cpu._is_avx512_bf16_supported():
        return True, "this CPU has AVX512-BF16 (native bf16 matmuls)"
    return False, "this CPU has neither AMX nor AVX512-BF16, so bf16 matmuls are emulated"


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(bf16 | fp32, a one-line reason). auto: bf16 where the device has native bf16, else fp32. An explicit bf16
    on a CPU without native bf16 is honoured, with a warning that measures how much slower its matmuls are."""
    native, why = native_bf16(device)
    if requested == "auto":
        return ("bf16" if native else "fp32"), f"precision=auto: {why} -> {'bf16' if native else 'fp32'}"
    if requested == "bf16" and not native:
        warnings.warn(f"precision=bf16 although {why}: a bf16 matmul measured here is {bf16_slowdown():.0f}x "
                      f"slower than fp32; precision=auto would pick fp32", stacklevel=2)
    return requested, f"precision={requested} (asked for; {why})"


def bf16_slowdown(n: int = 256, reps: int = 3) -> float:
    """Time of an n^3 bf16 matmul over an fp32 one on this CPU (best of `reps`)."""
    def best(dtype):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)
    best(torch.float32)  # warm-up
    return best(torch.bfloat16) / best(torch.float32)


_libc = ctypes.CDLL(None)
_malloc_trim, _mallopt = getattr(_libc, "malloc_trim", None), getattr(_libc, "mallopt", None)  # glibc's
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)

# What a CPU run does with the memory its tensors free (run.host_memory). Each optimizer step frees its activations;
# the next step allocates them again, in blocks of other sizes when rows are packed. Pages the OS hands back anew
# are zeroed on first touch (a page fault each): ~20% of a GRPO update step at 135M (bench/README.md).
HOST_MEMORY_POLICIES = {
    # after each optimizer step the heap's free pages go back to the OS: the lowest peak RSS, every step faults in
    # its activations again
    "release": "malloc_trim(0) after each optimizer step",
    # nothing goes back to the OS and no block is mmapped: the next step reuses the pages without faults; peak RSS
    # also holds the freed blocks glibc cannot reuse for other sizes
    "keep": "mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, 2 GiB)",
    # glibc's own: blocks over a moving threshold mmapped and unmapped on free, the heap trimmed at the top
    "glibc": "no change",
}


def set_host_memory(policy: str) -> bool:
    """Apply a HOST_MEMORY_POLICIES entry's allocator settings once at the start of a CPU run; False where libc is
    not glibc (nothing changes there)."""
    if _mallopt is None or _malloc_trim is None:
        return False
    if policy == "keep":
        return bool(_mallopt(M_MMAP_MAX, 0)) and bool(_mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return True


def release_freed_memory() -> bool:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim(0)`); False where there is no such call."""
    return bool(_malloc_trim(0)) if _malloc_trim is not None else False


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cls, dist: Dist, *, init_from: str | None = None, architecture: ModelConfig | None = None,
                bf16: bool = False, seed: int = 0, new_head: bool = False, activation_checkpointing: bool = False,
                lora: LoraConfig | None = None, reward_heads: int | None = None):
    """The model to train, on dist.device: loaded from `init_from` (an HF directory), or a fresh init of
    `architecture` seeded by `seed`. One process: the module itself. N processes: built on the meta device, sharded
    with FSDP2, materialised empty, then filled from rank 0's full weights, so N processes start from exactly the
    weights one process would. activation_checkpointing and lora are ways to train, not part of the weights: they
    apply to a loaded model too. With lora.enabled, the trunk is frozen and LoRA adapters (seeded by `seed`) are
    what trains. reward_heads: a loaded RewardModel's head count (load_pretrained)."""
    lora = lora if lora is not None and lora.enabled else None

    def full_model():
        if init_from:
            m = load_pretrained(cls, init_from, new_head=new_head, reward_heads=reward_heads)
        else:
            torch.manual_seed(seed)
            m = cls(architecture)
            m.init_weights()
        return apply_lora(m, lora, seed) if lora else m

    if not dist.enabled:
        model = full_model().to(dist.device)
    else:
        cfg = (with_reward_heads(config_from_hf(read_hf_config(resolve_model(init_from))), cls, reward_heads,
                                 new_head=new_head, source=init_from) if init_from else architecture)
        with torch.device("meta"):
            model = cls(cfg)
        if lora:
            apply_lora(model, lora, seed)
        apply_fsdp(model, dist.mesh, bf16)
        model.to_empty(device=dist.device)
        model.model.reset_buffers(device=dist.device)
        full = full_model().state_dict() if dist.is_main else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.model.activation_checkpointing = activation_checkpointing
    return model


def frozen(model):
    """A model that is only read (a reference policy, a reward): eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


@contextmanager
def reference_model(policy, reference):
    """The model that gives the reference log-probs: `reference`, or the policy with its LoRA adapters off."""
    if reference is not None:
        yield reference
    else:
        with adapters_disabled(policy):
            yield policy


def autocast(dist: Dist, bf16: bool):
    """bf16 autocast for the single-process path (FSDP2's MixedPrecisionPolicy does it for N processes).
    On CPU too: bf16 matmuls run ~6x faster than fp32 on AMX machines."""
    if bf16 and not dist.enabled:
        return torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16)
    return nullcontext()


def compute_dtype(bf16: bool) -> torch.dtype:
    """The dtype activations are computed in (by autocast on one process, by FSDP2's policy on many): what a
    KV cache must hold."""
    return torch.bfloat16 if bf16 else torch.float32


def set_grad_sync(model, sync: bool):
    """Skip FSDP2's gradient reduce-scatter on all but the last micro-batch of an accumulation step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
