"""torchrun environment, process group, sums across ranks.

timm's init_distributed_device wants its argparse namespace; this is the same few lines without it,
plus a process-group store that survives torchrun restarts (see attempt_store).
"""
from __future__ import annotations

import datetime
import os
import socket
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from usi.errors import UsageError

TIMEOUT = datetime.timedelta(minutes=30)
PUBLISHED = "usi/attempt-store"  # key in torchrun's store: "host port nonce" of this attempt's own store


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
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("run.device=cuda but torch sees no CUDA GPU here; use run.device=auto or cpu")
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
                                rank=rank, world_size=world, timeout=TIMEOUT, device_id=device if use_cuda else None)
    return Dist(rank, world, local_rank, device)


def attempt_store(rank: int, world: int) -> dist.Store:
    """A store that belongs to this launch attempt alone.

    Under torchrun the workers are handed the agent's store, which outlives restarts
    (--max-restarts): keys of a failed attempt are still there, and a restarted rank can read the
    previous attempt's addresses (pytorch/pytorch#167288, #135712). Prefixing keys with
    TORCHELASTIC_RESTART_COUNT does not fix it across nodes: each agent counts its own restarts, and a
    restart caused by a membership change does not count, so nodes disagree on the prefix and hang.

    So rank 0 starts a store of its own on a free port and publishes its address with a random
    nonce in the agent's store. The other ranks connect to the published address and check the
    nonce; a stale entry (its server died with the previous attempt, whose processes the agents
    stop before starting new ones) fails to connect or mismatches, and is read again.
    """
    shared, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=TIMEOUT))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return shared  # not torchrun's agent store: rank 0 hosts a fresh one for this process already
    if rank == 0:
        own = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
        nonce = uuid.uuid4().hex
        own.set("usi/nonce", nonce)
        shared.set(PUBLISHED, f"{reachable_address()} {own.port} {nonce}")
        return own
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    while time.monotonic() < deadline:
        host, port, nonce = shared.get(PUBLISHED).decode().split()
        if accepts(host, int(port)):  # a plain probe first: a failed store connect logs pages of C++ errors
            try:
                own = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10))
                if own.check(["usi/nonce"]) and own.get("usi/nonce").decode() == nonce:
                    own.set_timeout(TIMEOUT)
                    return own
            except RuntimeError:
                pass  # its server went away between the probe and the connect
        time.sleep(0.5)  # the previous attempt's entry: wait for this attempt's rank 0 to publish
    raise TimeoutError("rank 0's process-group store never became reachable")


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def reachable_address() -> str:
    """This host's address on the route to the agent's store (where the other nodes reach us)."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))  # UDP: sends nothing
            return s.getsockname()[0]
        except OSError:
            return master


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
