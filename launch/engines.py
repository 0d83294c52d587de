"""The process side of a run: start the process group, distribute a model with an engine, end cleanly.

Engines: ``fsdp2`` (``fully_shard`` on each block, then on the root), ``ddp`` (DistributedDataParallel),
``single`` (one plain process, no process group). ``deepspeed`` runs its own example (``examples/deepspeed_lm.py``).
The backend is NCCL with one GPU per process when CUDA is available, gloo on CPU otherwise.

A script started with ``python script.py`` (no torchrun) and a distributed engine runs as a world of one process,
so every example also works without a launcher.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

ENGINES = ("fsdp2", "ddp", "deepspeed", "single")
DISTRIBUTED = ("fsdp2", "ddp", "deepspeed")


@dataclass(frozen=True)
class Runtime:
    """Where this process sits in the run."""

    engine: str
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.engine in DISTRIBUTED

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def restart(self) -> int:
        """How many times torchrun has restarted the workers (0 on the first attempt)."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str) -> Runtime:
    """Initialise this process for ``engine``; the process group for the distributed engines."""
    if engine not in ENGINES:
        raise ValueError(f"Invalid engine: {engine!r} (expected one of {ENGINES})")
    cuda = torch.cuda.is_available()
    if engine == "single":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise RuntimeError(f"engine 'single' started as one of {world} processes: run it with one process "
                               "(prodigy-dist-launch --engine single, or python SCRIPT) or pick fsdp2/ddp")
        return Runtime(engine, 0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    if "RANK" not in os.environ:  # started without torchrun: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun's workers share the agent's TCPStore across restarts: a key left by the failed attempt (such as the
    # address rank 0 listened on) could be read before the new rank 0 overwrites it, so each attempt gets its own
    # key prefix.
    store, rank, world = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    return Runtime(engine, dist.get_rank(), dist.get_world_size(), local_rank, device)


def distribute(model: nn.Module, runtime: Runtime, blocks: list[nn.Module]) -> nn.Module:
    """The model as the engine trains it: FSDP2 shards each of ``blocks`` then the root; DDP replicates."""
    if runtime.engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(runtime.device.type, (runtime.world,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if runtime.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if runtime.engine == "single":
        return model
    raise ValueError(f"Invalid engine for distribute(): {runtime.engine!r} (DeepSpeed builds its own engine)")


def mean_across_ranks(value: torch.Tensor, runtime: Runtime) -> float:
    """The mean of a scalar over all ranks, as a float (one all_reduce; none on one process)."""
    value = value.detach().float().reshape(1).clone()
    if runtime.distributed and runtime.world > 1:
        dist.all_reduce(value)
        value /= runtime.world
    return value.item()


def run_and_finish(work) -> None:
    """Run ``work()``, print the traceback of an exception, then :func:`finish` with exit code 0 or 1."""
    code = 0
    try:
        work()
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    finish(code)


def finish(code: int = 0) -> None:
    """End the process: destroy the process group, flush, ``os._exit`` (gloo may abort during interpreter exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
