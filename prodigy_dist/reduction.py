"""Bucketed reduction of a step's partial sums (DISTRIBUTED.md D2).

The math produces partial sums on local pieces (row/column statistics along a sharded dim, per-tensor dot products
and norms). Each phase of a step registers them here and calls :meth:`Reducer.flush` once: with a process group of
more than one rank, everything registered is packed into one fp32 buffer and summed with a single ``all_reduce``;
on one process (or with nothing sharded) ``flush`` does nothing. Every rank must register the same sequence of
sizes in the same order, also with empty shards or missing gradients, so all ranks join every collective.
"""

from __future__ import annotations

from typing import Any

import torch


class Reducer:
    """Collects tensors to be summed across ``group``; :meth:`flush` sums them all in one collective."""

    def __init__(self, group: Any = None):
        self.group = group
        self._pending: list[torch.Tensor] = []
        self.collectives = 0  # number of collectives issued so far (for tests and benchmarks)
        self.bytes_reduced = 0

    @property
    def active(self) -> bool:
        if self.group is None:
            return False
        import torch.distributed as dist
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def add(self, t: torch.Tensor) -> torch.Tensor:
        """Register ``t`` (fp32) to be summed in place across ranks at the next flush; returns ``t``."""
        if self.active:
            self._pending.append(t)
        return t

    def flush(self) -> None:
        """Sum every registered tensor across ranks, in place, with one all_reduce."""
        pending, self._pending = self._pending, []
        if not self.active:
            return
        import torch.distributed as dist
        device = pending[0].device if pending else torch.device("cpu")
        flat = torch.cat([t.reshape(-1).float() for t in pending]) if pending else torch.zeros(1, device=device)
        dist.all_reduce(flat, group=self.group)
        self.collectives += 1
        self.bytes_reduced += flat.numel() * 4
        offset = 0
        for t in pending:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
