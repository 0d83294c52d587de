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


def orthogonalise(requests: list, reducer: Reducer) -> None:
    """Fill the Muon directions of ``requests`` (:class:`prodigy_dist.muon.Orthogonalise`), DISTRIBUTED.md D3.

    Whole matrices are orthogonalised where they are. Matrices sharded over the reducer's group are each
    orthogonalised by exactly one owner rank (owners balanced by Newton-Schulz cost, the same choice on every rank
    from the global shapes): one all_to_all sends every rank's rows to the owners, one sends the directions back,
    for all sharded matrices of the round together. Uneven and empty shards need no padding (variable splits).
    """
    from .layout import chunk_ranges
    from .muon import muon_direction

    sharded = []
    for req in requests:
        local = [i for i, lay in enumerate(req.layouts) if not (lay.sharded and reducer.active)]
        req.run_locally(local)
        sharded += [(req, i) for i, lay in enumerate(req.layouts) if lay.sharded and reducer.active]
    if not sharded:
        return
    import torch.distributed as dist

    group = reducer.group
    world, me = dist.get_world_size(group), dist.get_rank(group)
    load = [0.0] * world
    owners, rows = [], []
    for req, i in sharded:
        shape = req.layouts[i].global_shape
        cols = req.layouts[i].row_numel
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += shape[0] * cols * min(shape[0], cols)
        owners.append(owner)
        rows.append(chunk_ranges(shape[0], world))
    row_numel = [req.layouts[i].row_numel for req, i in sharded]
    device = sharded[0][0].sources[sharded[0][1]].device

    def exchange(parts_for: list[list[torch.Tensor]], recv_counts: list[int]) -> torch.Tensor:
        send = torch.cat([t.reshape(-1) for parts in parts_for for t in parts]) if any(parts_for) else \
            torch.zeros(0, device=device)
        recv = torch.empty(sum(recv_counts), dtype=torch.float32, device=device)
        dist.all_to_all_single(recv, send, output_split_sizes=recv_counts,
                               input_split_sizes=[sum(t.numel() for t in parts) for parts in parts_for],
                               group=group)
        reducer.collectives += 1
        reducer.bytes_reduced += (send.numel() + recv.numel()) * 4
        return recv

    # 1. every rank's rows to the owners
    mine = [k for k, o in enumerate(owners) if o == me]
    recv = exchange([[req.sources[i].float() for k, (req, i) in enumerate(sharded) if owners[k] == j]
                     for j in range(world)],
                    [sum(rows[k][j][1] * row_numel[k] for k in mine) for j in range(world)])
    pieces: dict[int, list[torch.Tensor]] = {k: [] for k in mine}
    offset = 0
    for j in range(world):
        for k in mine:
            n = rows[k][j][1] * row_numel[k]
            pieces[k].append(recv[offset:offset + n])
            offset += n
    # 2. the owners orthogonalise whole matrices and send each rank its rows back
    directions = {}
    for k in mine:
        req, i = sharded[k]
        full = torch.cat(pieces[k]).view(req.layouts[i].global_shape)
        directions[k] = muon_direction(full).reshape(full.shape[0], -1)
    back = exchange([[directions[k][rows[k][j][0]:rows[k][j][0] + rows[k][j][1]] for k in mine]
                     for j in range(world)],
                    [sum(rows[k][me][1] * row_numel[k] for k in range(len(sharded)) if owners[k] == j)
                     for j in range(world)])
    offset = 0
    for j in range(world):
        for k, (req, i) in enumerate(sharded):
            if owners[k] != j:
                continue
            n = req.sources[i].numel()
            req.results[i] = back[offset:offset + n].view(req.sources[i].shape)
            offset += n
