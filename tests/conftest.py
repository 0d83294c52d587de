"""Shared fixtures: persistent gloo worker pools for the multi-process tests (started on first use)."""

import pytest

from .worker_pool import WorkerPool


@pytest.fixture(scope="session")
def pools():
    """``pools(world)``: a WorkerPool of ``world`` gloo processes, shared by every test of the session."""
    started: dict[int, WorkerPool] = {}

    def get(world: int) -> WorkerPool:
        if world not in started:
            started[world] = WorkerPool(world)
        return started[world]

    yield get
    for pool in started.values():
        pool.close()
