"""torchrun support: one process per device, DDP, metric reduction, rank-0-only output.

Under `torchrun` the environment carries RANK, WORLD_SIZE and LOCAL_RANK; a plain
`fastvae-train` has none of them and runs as the single rank 0, without a process group.
Under torchrun the run always joins the process group and wraps the model in DDP, one
process included: `torchrun --nproc-per-node 1` then exercises the same path (NCCL on a GPU)
that several processes take.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # the process group's (nccl, gloo), None without torchrun

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_type: str) -> DistInfo:
    """Join the process group torchrun prepared (NCCL for CUDA, gloo for CPU); no-op otherwise."""
    if not launched_by_torchrun():
        return DistInfo()
    backend = "nccl" if device_type == "cuda" else "gloo"
    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), backend
    )
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        # DDP imports torch.distributed.nn.functional on first use, and its functions take
        # `group=group.WORLD` as a default argument: imported after init_process_group, they
        # would hold the default group forever, and teardown could not destroy it (see there).
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group(backend=backend)
    return info


def teardown(info: DistInfo) -> None:
    """Destroy the process group; call it once nothing (no DDP module) holds the group any more.

    The group must really go here, not at interpreter exit: gloo's worker threads release the
    work of each collective after running it, and the work of a DDP gradient all-reduce holds
    a Python object (the context torch keeps in thread-local state during backward). A thread
    that releases one while Python shuts down is ended by the interpreter inside a C++
    destructor, which aborts the process ("terminate called without an active exception").
    Destroying the group joins those threads while the interpreter still runs."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a float64 stats vector over ranks (identity with one process)."""
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's value of `obj` on every rank (used for the run folder name)."""
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
