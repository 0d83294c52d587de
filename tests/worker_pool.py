"""A persistent pool of gloo worker processes for multi-process tests on CPU.

Starting a process and importing torch costs seconds; a pool of ``world`` processes started once per test session
runs each test's function on every rank in about a second (TESTING-ON-CPU.md). For every task the workers create a
fresh process group (gloo, a new FileStore), call ``fn(rank, world, *args)`` and destroy the group again. Each rank's
return value comes back to the test; an exception on any rank fails the test with that rank's traceback (and the
pool is restarted, since the other ranks may be stuck in a collective until the group's timeout).
"""

from __future__ import annotations

import datetime
import importlib
import os
import queue
import sys
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

#: A rank waiting in a collective for a rank that failed gives up after this long.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=90)


def _serve(rank: int, world: int, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    while True:
        task = tasks.get()
        if task is None:
            break
        module, name, store_path, args = task
        try:
            fn = getattr(importlib.import_module(module), name)
            dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                                    timeout=COLLECTIVE_TIMEOUT)
            torch.manual_seed(0)
            value = fn(rank, world, *args)
            results.put((rank, True, value))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo may abort in interpreter shutdown


class WorkerPool:
    def __init__(self, world: int):
        self.world = world
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(self.world)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_serve, args=(r, self.world, self._tasks[r], self._results), daemon=True)
                       for r in range(self.world)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable, *args: Any, timeout: float = 600) -> list[Any]:
        """Run ``fn(rank, world, *args)`` on every rank; returns the ranks' return values in rank order."""
        with tempfile.TemporaryDirectory() as tmp:
            store = os.path.join(tmp, "store")
            for q in self._tasks:
                q.put((fn.__module__, fn.__name__, store, args))
            out: dict[int, Any] = {}
            errors = []
            try:
                for _ in range(self.world):
                    rank, ok, value = self._results.get(timeout=timeout)
                    (out.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
            except queue.Empty:
                errors.append(f"no result within {timeout} s")
        if errors:
            self.close()
            self._start()
            raise RuntimeError(f"{fn.__name__} failed on {self.world} ranks:\n" + "\n".join(errors))
        return [out[r] for r in range(self.world)]

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
