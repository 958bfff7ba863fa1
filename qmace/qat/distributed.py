"""Data-parallel QAT with ``torch.distributed``: process groups, ``DistributedDataParallel``, range sync.

One process per device (``gloo`` on CPU, ``nccl`` on CUDA). Each rank holds the whole QATModule and a shard
of the data; ``DistributedDataParallel`` averages the gradients (weights and LSQ ranges) over the ranks, so
with per-rank batches of ``B / world`` samples a step equals the one-process step on the global batch of
``B`` (up to float summation order). After every step rank 0's ranges are broadcast (the LSQ range
gradients were all-reduced, so this only removes drift from reduction order), and in EMA mode each update
uses the global batch's min/max (``all_reduce`` MIN/MAX): every rank quantizes with identical parameters.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist

from qmace.errors import ConfigError

log = logging.getLogger(__name__)
DEVICES = ("cpu", "cuda")


def check_device(device: str, nproc: int = 1) -> None:
    """ConfigError unless ``device`` can run ``nproc`` processes (``cuda``: one GPU per process).

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:<index>``.
        nproc: number of training processes.

    Raises:
        ConfigError: unknown device, CUDA unavailable, fewer GPUs than ``nproc``, or ``nproc < 1``.
    """
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise ConfigError(f"--device {device}: choose from {', '.join(DEVICES)}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available (torch {torch.__version__}, "
                              f"torch.cuda.is_available() is False); use --device cpu")
        if nproc > torch.cuda.device_count():
            raise ConfigError(f"--nproc {nproc} with --device cuda needs {nproc} GPUs, "
                              f"{torch.cuda.device_count()} visible")
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")


def backend_for(device: str) -> str:
    """The ``torch.distributed`` backend for a device.

    Args:
        device: ``cpu`` or ``cuda[:index]``.

    Returns:
        ``nccl`` for CUDA, ``gloo`` otherwise.
    """
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_device(device: str, local_rank: int) -> torch.device:
    """``cuda`` -> ``cuda:<local rank>`` (one GPU per process); ``cpu`` -> cpu.

    Args:
        device: the ``--device`` value.
        local_rank: this process's rank on its machine.

    Returns:
        The torch device this rank trains on.
    """
    return torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)


def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (or any launcher that sets WORLD_SIZE and RANK)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS's pick), for a ``--nproc`` process group.

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device: str, rank: int | None = None, world: int | None = None, port: int | None = None) -> tuple[int, int, int]:
    """Join the process group; returns ``(rank, world, local_rank)``. With ``port``: a single-machine group on
    127.0.0.1 (``--nproc``); without: torchrun's environment (``env://``, several machines).

    Args:
        device: the ``--device`` value (selects the backend, and the GPU for ``cuda``).
        rank: this process's rank (with ``port``).
        world: number of processes (with ``port``).
        port: the rendezvous port on 127.0.0.1, or None for torchrun's ``env://``.

    Returns:
        ``(rank, world, local_rank)``.
    """
    backend = backend_for(device)
    if port is not None:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        local = rank
    else:
        dist.init_process_group(backend, init_method="env://")
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if device == "cuda":
        torch.cuda.set_device(local)
    log.info("rank %d/%d (%s, local rank %d)", dist.get_rank(), dist.get_world_size(), backend, local)
    return dist.get_rank(), dist.get_world_size(), local


def shutdown() -> None:
    """Leave the process group (after a barrier) if one was joined; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _global_min_max(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = lo.clone(), hi.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return lo, hi


def data_parallel(module):
    """``module`` wrapped in DistributedDataParallel (module on its device; rank 0's parameters and buffers
    are broadcast on construction, so all ranks start identical); EMA range updates use global batch
    statistics.

    Args:
        module: the QATModule, already on this rank's device.

    Returns:
        The ``DistributedDataParallel`` wrapper.
    """
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    module.batch_range_reduce = _global_min_max
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)


@torch.no_grad()
def sync_ranges(module) -> None:
    """Make ``act_min``/``act_max`` bit-identical on every rank: rank 0's values (after a step whose range
    gradients DDP already all-reduced, so they differ at most by summation order) are broadcast.

    Args:
        module: the (unwrapped) QATModule.
    """
    for t in (module.act_min, module.act_max):
        dist.broadcast(t.data, src=0)


def spawn(fn: Callable, nproc: int, args: tuple) -> None:
    """Run ``fn(rank, *args)`` in ``nproc`` fresh processes (``torch.multiprocessing``, start method spawn).

    Args:
        fn: a picklable (module-level) function.
        nproc: number of processes.
        args: the arguments after the rank.
    """
    import torch.multiprocessing as mp

    mp.spawn(fn, args=args, nprocs=nproc, join=True)
