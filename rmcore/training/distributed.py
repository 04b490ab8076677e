"""Process group, FSDP2 wrapping, collectives and rank-0 printing.

`torchrun --nproc_per_node=N train.py ...` sets RANK/WORLD_SIZE/LOCAL_RANK: we join a process group (NCCL on
GPU, gloo on CPU) and shard the model with FSDP2. A plain `python train.py` is one process with no process group
and no wrapping; every collective below is then the identity, so the loops have one code path.

Multi-node is torchrun's usual rendezvous, nothing rmcore-specific:
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=JOB train.py ...
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object = None  # DeviceMesh when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join torchrun's process group if there is one. device: auto (CUDA when present), cuda or cpu."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size == 1:
        return Dist(device=dev)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    mesh = init_device_mesh(dev.type, (world_size,))
    return Dist(torch_dist.get_rank(), world_size, local_rank, dev, mesh)


def shutdown():
    """The end of a torchrun process: leave the process group together (a rank that tears down while another still
    talks to it aborts), then exit at once. Sharded parameters keep the gloo group alive past destroy_process_group;
    freed during interpreter finalization, its threads sometimes abort the process ("terminate called without an
    active exception", a few runs in a hundred) after all work is done, turning a finished run into a failure.
    Nothing is left to do at this point, so the process skips finalization. One process: nothing happens."""
    if not torch_dist.is_initialized():
        return
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def barrier():
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum python numbers over ranks (one collective for the list)."""
    if not torch_dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """t summed over ranks, as a new tensor (t itself on one process): the reduce_sum of rmcore.rl's statistics."""
    if not torch_dist.is_initialized():
        return t
    t = t.clone()
    torch_dist.all_reduce(t)
    return t


def broadcast_object(obj, src: int = 0):
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Concatenate a list from every rank (rank order)."""
    if not torch_dist.is_initialized():
        return list(obj)
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, list(obj))
    return [x for part in out for x in part]


def apply_fsdp(model: nn.Module, mesh, bf16: bool) -> nn.Module:
    """FSDP2 as torchtitan applies it: each transformer block is its own unit, then the root (embeddings,
    final norm, head). bf16 computes in bf16 and reduces gradients in fp32; masters stay fp32."""
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    if hasattr(model, "score"):
        # the reward head keeps fp32 weights in compute (rewards in bf16 tie; see RewardModel.forward)
        fully_shard(model.score, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def say(dist: Dist, text: str):
    """Print on rank 0 only."""
    if dist.is_main:
        print(text, flush=True)
