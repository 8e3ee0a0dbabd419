"""The torch.distributed process group a learner trains in, and the few collectives it uses.

A learner always runs inside a process group because DeepSpeed does. One learner alone (tests, the
in-process group) gets a 1-rank group on a free loopback port; that group is kept for the life of
the process, so building several learners one after another in one process just reuses it.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` means NCCL on a GPU and gloo on a CPU."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("learner.backend='nccl' needs a GPU learner; use 'gloo' or 'auto' on CPU")
    return backend


def ensure_process_group(rank: int, world_size: int, backend: str, init_method: str | None = None) -> None:
    """Join (or reuse) the default process group as ``rank`` of ``world_size``.

    ``init_method`` (``tcp://host:port``) is required for more than one rank; one rank without it
    gets a private loopback group. An existing group is reused when its rank and size match.
    DeepSpeed also reads ``LOCAL_RANK``: every learner process sees its own accelerator as device 0
    (Ray sets ``CUDA_VISIBLE_DEVICES`` per actor), so it is 0 unless the launcher set it.
    """
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise RuntimeError(
                f"a process group with rank {dist.get_rank()} of {dist.get_world_size()} already exists, but this "
                f"learner is rank {rank} of {world_size}; call shutdown_process_group() first"
            )
        return
    if init_method is None:
        if world_size != 1:
            raise ValueError(f"world_size={world_size} needs init_method='tcp://<rank 0 host>:<port>'")
        init_method = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def shutdown_process_group() -> None:
    """Barrier, then destroy the default group (a ZeRO-3 run can abort at exit without the barrier)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all ranks (a new tensor; ``x`` is left alone)."""
    out = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``x`` over all ranks (a new tensor; ``x`` is left alone)."""
    out = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out
