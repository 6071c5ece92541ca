"""torchrun environment, process group, sums across ranks.

timm's init_distributed_device wants its argparse namespace; this is the same few lines without it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device_pref: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; pick the device. NCCL on GPU, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", store=attempt_store(rank, world),
                                rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30),
                                device_id=device if use_cuda else None)
    return Dist(rank, world, local_rank, device)


def attempt_store(rank: int, world: int) -> dist.Store:
    """torchrun's store, with keys of this restart attempt only.

    Under torchrun the workers share the agent's store, which outlives a restart
    (--max-restarts): without a per-attempt prefix, restarted ranks can read the previous
    attempt's addresses and fail with "connection refused" (pytorch/pytorch#167288).
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world,
                                       timeout=datetime.timedelta(minutes=30)))
    return dist.PrefixStore(f"usi/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def env_rank() -> int:
    """The rank before any process group exists (for deciding who prints an early error)."""
    return int(os.environ.get("RANK", "0"))


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; a no-op outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_across(tensor: torch.Tensor) -> torch.Tensor:
    """In-place element-wise max over ranks; a no-op outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
