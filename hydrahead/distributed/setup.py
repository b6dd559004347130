"""Process-group setup from torchrun's environment, or a plain single process.

``DistEnv`` is the one object that knows the world: rank, size, device and the named
process groups. Code asks it for a group by name (``data``: the data-parallel replicas of
the backbone; ``head``: the ranks over which the classes are sharded) instead of reading
globals. Today both are the world group; the names keep the call sites honest.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    data_group: dist.ProcessGroup | None
    head_group: dist.ProcessGroup | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.data_group)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Join the process group described by torchrun's variables (or form a world of one).

    NCCL with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is available and the
    backend is ``auto``; gloo on CPU otherwise. A single process without torchrun still
    gets a one-rank group, so collectives and checkpoints take one code path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"dist.backend must be one of {BACKENDS}, got {backend!r}")
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("dist.backend=nccl needs CUDA, but no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            # Under torchrun the store can outlive a failed attempt and still hold the dead
            # workers' addresses; a per-attempt namespace keeps a restarted group from
            # dialling them.
            store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"hydrahead/attempt-{attempt}/", store)
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=timeout,
                device_id=device if backend == "nccl" else None,
            )
        else:  # plain `python launch/train.py`: a world of one, no rendezvous needed
            if world_size != 1:
                raise ValueError(f"WORLD_SIZE={world_size} without MASTER_ADDR: launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    world = dist.group.WORLD
    return DistEnv(rank, world_size, local_rank, device, backend, data_group=world, head_group=world)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
