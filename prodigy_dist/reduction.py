"""Bucketed reduction of a step's partial sums (DISTRIBUTED.md D2).

The math produces partial sums on local pieces (row/column statistics along a sharded dim, per-tensor dot products
and norms). Each phase of a step registers them here and calls :meth:`Reducer.flush` once: with a process group of
more than one rank, everything registered is packed into one fp32 buffer and summed with a single ``all_reduce``;
on one process (or with nothing sharded) ``flush`` does nothing. Every rank must register the same sequence of
sizes in the same order, also with empty shards or missing gradients, so all ranks join every collective.

The Muon directions of tensors spread over ranks are exchanged here too (:func:`orthogonalise`): one owner rank per
matrix, two all_to_all per round. These are the only places the optimizer issues collectives.
"""

from __future__ import annotations

from typing import Any

import torch


class Reducer:
    """Collects tensors to be summed across ``group``; :meth:`flush` sums them all in one collective."""

    def __init__(self, group: Any = None):
        self.group = group
        self._pending: list[torch.Tensor] = []
        self._active: bool | None = None
        self.collectives = 0  # number of collectives issued so far (for tests and benchmarks)
        self.bytes_reduced = 0
        #: id(fragment layout) -> every rank's (global flat start, length): set by the DeepSpeed integration
        self.fragment_spans: dict[int, list[tuple[int, int]]] = {}

    def comm_device(self, device: torch.device) -> torch.device:
        """Where collective buffers must live: the CPU for gloo; with NCCL the GPU, also for tensors offloaded to
        the CPU (DeepSpeed ZeRO-Offload)."""
        import torch.distributed as dist
        if dist.get_backend(self.group) == "gloo":
            return torch.device("cpu")
        if device.type == "cpu" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return device

    @property
    def active(self) -> bool:
        """Whether there is anything to combine: a process group of more than one rank (read once)."""
        if self.group is None:
            return False
        if self._active is None:
            import torch.distributed as dist
            self._active = dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1
        return self._active

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
        device = self.comm_device(pending[0].device if pending else torch.device("cpu"))
        flat = torch.cat([t.reshape(-1).float().to(device) for t in pending]) if pending else \
            torch.zeros(1, device=device)
        dist.all_reduce(flat, group=self.group)
        self.collectives += 1
        self.bytes_reduced += flat.numel() * 4
        offset = 0
        for t in pending:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def spans(layout: Any, world: int, fragment_spans: dict[int, list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Every rank's (global flat start, length) of the tensor ``layout`` describes: FSDP2 row blocks follow
    ``torch.chunk``; fragments (DeepSpeed ZeRO) come from ``fragment_spans``, filled by the integration."""
    from .layout import chunk_ranges

    if layout.fragment:
        return fragment_spans[id(layout)]
    return [(start * layout.row_numel, rows * layout.row_numel)
            for start, rows in chunk_ranges(layout.global_shape[0], world)]


def orthogonalise(requests: list, reducer: Reducer) -> None:
    """Fill the Muon directions of ``requests`` (:class:`prodigy_dist.muon.Orthogonalise`), DISTRIBUTED.md D3.

    A piece that is the whole tensor is orthogonalised where it is. Tensors whose pieces are spread over the
    reducer's group (FSDP2 row blocks, ZeRO fragments) are each orthogonalised by exactly one owner rank (owners
    balanced by Newton-Schulz cost, the same choice on every rank from the global shapes): one all_to_all sends every
    rank's piece to the owners, which place the pieces at their global flat ranges, and one sends each rank its range
    of the direction back, for all such tensors of the round together. Uneven and empty pieces need no padding.
    """
    from .muon import muon_direction

    spread = []
    for req in requests:
        for i, layout in enumerate(req.layouts):
            if reducer.active and layout.sharded:
                spread.append((req, i))
            else:
                src = req.sources[i]
                req.results[i] = muon_direction(src.view(layout.global_shape)).view(src.shape)
    if not spread:
        return
    import torch.distributed as dist

    group = reducer.group
    world, me = dist.get_world_size(group), dist.get_rank(group)
    load = [0.0] * world
    owners, where = [], []
    for req, i in spread:
        layout = req.layouts[i]
        rows, cols = layout.global_shape[0], layout.row_numel
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += rows * cols * min(rows, cols)
        owners.append(owner)
        where.append(spans(layout, world, reducer.fragment_spans))
    device = spread[0][0].sources[spread[0][1]].device
    comm = reducer.comm_device(device)
    mine = [k for k, o in enumerate(owners) if o == me]

    def exchange(parts_for: list[list[torch.Tensor]], recv_counts: list[int]) -> list[torch.Tensor]:
        send = [torch.cat([t.reshape(-1).float() for t in parts]) if parts else torch.zeros(0, device=device)
                for parts in parts_for]
        recv = torch.empty(sum(recv_counts), dtype=torch.float32, device=comm)
        dist.all_to_all_single(recv, torch.cat(send).to(comm), output_split_sizes=recv_counts,
                               input_split_sizes=[t.numel() for t in send], group=group)
        reducer.collectives += 1
        reducer.bytes_reduced += (sum(t.numel() for t in send) + recv.numel()) * 4
        return list(recv.to(device).split(recv_counts))

    # 1. every rank's pieces to the owners
    got = exchange([[req.sources[i] for k, (req, i) in enumerate(spread) if owners[k] == j] for j in range(world)],
                   [sum(where[k][j][1] for k in mine) for j in range(world)])
    directions = {}
    for k in mine:
        req, i = spread[k]
        layout = req.layouts[i]
        full = torch.zeros(layout.global_numel, dtype=torch.float32, device=device)
        for j in range(world):
            offset = sum(where[m][j][1] for m in mine if m < k)
            start, n = where[k][j]
            full[start:start + n] = got[j][offset:offset + n]
        directions[k] = muon_direction(full.view(layout.global_shape)).reshape(-1)
    # 2. the owners send each rank its range of the directions
    back = exchange([[directions[k][where[k][j][0]:where[k][j][0] + where[k][j][1]] for k in mine]
                     for j in range(world)],
                    [sum(where[k][me][1] for k in range(len(spread)) if owners[k] == j) for j in range(world)])
    for j in range(world):
        offset = 0
        for k, (req, i) in enumerate(spread):
            if owners[k] != j:
                continue
            n = req.sources[i].numel()
            req.results[i] = back[j][offset:offset + n].view(req.sources[i].shape)
            offset += n
