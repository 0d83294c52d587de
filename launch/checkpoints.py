"""Checkpoints of a run with ``torch.distributed.checkpoint`` (DCP): model, optimizer, step and RNG.

Layout: ``RUN/checkpoints/step_000100/`` holds the DCP files of the model and optimizer state (from
``get_state_dict``, so FSDP2, DDP and one process save the same keys) and ``rank{r}.pt`` per rank (the step and the
RNG states). DCP writes ``.metadata`` last, after every rank wrote its data, so a directory with ``.metadata`` is a
complete checkpoint; the newest complete one is what ``--resume`` and an automatic restart load.
Optimizers with ``init_state()`` (ProdigyPlusScheduleFree) get it called first: DCP's state-dict helpers would
otherwise run a fake zero-gradient step to create the state.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .engines import Runtime

_STEP_DIR = re.compile(r"step_(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoint_dir(run_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / ".metadata").is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _barrier(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.barrier()


def remove_all(run_dir: Path, runtime: Runtime) -> None:
    """Delete the checkpoints of an earlier run in ``run_dir`` (a fresh start must not resume from them)."""
    if runtime.is_main and checkpoint_dir(run_dir).exists():
        shutil.rmtree(checkpoint_dir(run_dir))
    _barrier(runtime)


def _model_and_optim(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if hasattr(optimizer, "init_state"):
        optimizer.init_state()
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime,
         keep: int = 2) -> Path:
    """Save a checkpoint of ``step``; keep only the newest ``keep`` complete ones."""
    path = checkpoint_dir(run_dir) / f"step_{step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    extra = {"step": step, "world": runtime.world, "cpu_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        extra["cuda_rng"] = torch.cuda.get_rng_state()
    torch.save(extra, path / f"rank{runtime.rank}.pt")
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group, as intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_model_and_optim(model, optimizer), checkpoint_id=path)
    if runtime.is_main:
        for _, old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(runtime)
    return path


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime) -> int:
    """Load a checkpoint into ``model`` and ``optimizer`` (in place); restore the RNG; return its step."""
    rank_file = Path(path) / f"rank{runtime.rank}.pt"
    if not rank_file.is_file():
        raise RuntimeError(f"{path} has no {rank_file.name}: it was saved by fewer processes; resume with the same "
                           "number of processes")
    extra = torch.load(rank_file, weights_only=True)
    if extra["world"] != runtime.world:
        raise RuntimeError(f"{path} was saved by {extra['world']} processes, this run has {runtime.world}: resume "
                           f"with --nproc-per-node {extra['world']} (the data order depends on the process count)")
    state = _model_and_optim(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(extra["cpu_rng"])
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["cuda_rng"])
    return int(extra["step"])
