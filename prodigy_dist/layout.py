"""Where each local piece of a parameter sits in the global tensor.

One description covers every case (DISTRIBUTED.md D1): a single process or a DDP replica holds the whole tensor;
an FSDP2 ``Shard(0)`` piece holds a contiguous block of rows; a DeepSpeed ZeRO piece (a *fragment*) holds a
contiguous range of the global flattened tensor, possibly cut mid-row. The math decides factoring and every shape
rule from ``global_shape``, samples the Prodigy statistics on the global flat index, and divides sums by global sizes.
Pieces of one tensor held by several ranks are combined over ``group`` (``None`` means nothing to combine).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

#: The Prodigy statistics sample every SLICE-th element of the global flattened tensor (B §3.5).
SLICE = 11

#: Tensors whose dims are all smaller than this are not factored (B §3.4).
MIN_DIM_TO_FACTOR = 32


@dataclass(frozen=True)
class ParamLayout:
    """Layout of one local piece: rows ``[row_offset, row_offset + local_rows)`` of a ``global_shape`` tensor.
    (Immutable: the derived sizes and offsets are computed once, the optimizer reads them every step.)"""

    global_shape: tuple[int, ...]
    row_offset: int = 0
    local_rows: int | None = None
    group: Any = None  # process group over which the pieces of this tensor are combined; None = not sharded
    # A fragment (DeepSpeed ZeRO flat partitions): the local piece is the 1-D global flat range
    # [flat_start, flat_start + flat_numel), possibly cut mid-row; row_offset/local_rows then give the rows it
    # touches (see fragment_layout). None for row blocks.
    flat_start: int | None = None
    flat_numel: int | None = None

    @property
    def fragment(self) -> bool:
        return self.flat_start is not None

    @cached_property
    def lead(self) -> int:
        """A fragment's position in the block of the rows it touches (0 for row blocks)."""
        return self.flat_start - self.row_offset * self.row_numel if self.fragment else 0

    @cached_property
    def global_numel(self) -> int:
        n = 1
        for s in self.global_shape:
            n *= s
        return n

    @cached_property
    def row_numel(self) -> int:
        return self.global_numel // self.global_shape[0] if self.global_shape and self.global_shape[0] else 0

    @cached_property
    def flat_offset(self) -> int:
        """Global flat index of the first local element."""
        if self.flat_start is not None:
            return self.flat_start
        return self.row_offset * self.row_numel if self.global_shape else 0

    @property
    def sharded(self) -> bool:
        return self.group is not None

    @cached_property
    def slice_start(self) -> int:
        """First local flat index whose global index is a multiple of SLICE."""
        return (-self.flat_offset) % SLICE


def single_process_layout(p: torch.Tensor) -> ParamLayout:
    """The whole tensor held by this process, nothing to combine."""
    return ParamLayout(global_shape=tuple(p.shape), row_offset=0, local_rows=p.shape[0] if p.dim() else None)


def fragment_layout(global_shape: tuple[int, ...], flat_start: int, flat_numel: int, group: Any) -> ParamLayout:
    """A contiguous range of the global flattened tensor (a DeepSpeed ZeRO partition's piece of a parameter)."""
    shape = tuple(global_shape)
    row_numel = 1
    for s in shape[1:]:
        row_numel *= s
    if flat_numel == 0 or row_numel == 0:
        first, rows = 0, 0
    else:
        first = flat_start // row_numel
        rows = -(-(flat_start + flat_numel) // row_numel) - first
    return ParamLayout(global_shape=shape, row_offset=first, local_rows=rows, group=group, flat_start=flat_start,
                       flat_numel=flat_numel)


def factored_dims(global_shape: tuple[int, ...], factored: bool) -> tuple[int, int] | None:
    """(dr, dc) for a factored second moment, from the global shape, or None (B §3.4).

    dr is the largest dim and dc the second largest; on ties the higher index is "larger".
    """
    if not factored or len(global_shape) < 2:
        return None
    if all(s < MIN_DIM_TO_FACTOR for s in global_shape):
        return None
    order = sorted((s, i) for i, s in enumerate(global_shape))
    return order[-1][1], order[-2][1]


def dtensor_layout(p: Any) -> ParamLayout:
    """Layout of a DTensor parameter: FSDP2 ``Shard(0)`` on a 1-D mesh, or ``(Replicate(), Shard(0))`` (HSDP),
    where the pieces are combined over the shard dim's group; fully replicated DTensors need no combining."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, p.placements
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    if any(not isinstance(pl, (Shard, Replicate)) for pl in placements) or \
            any(placements[i].dim != 0 for i in shard_dims) or len(shard_dims) > 1:
        raise NotImplementedError(f"ProdigyPlusScheduleFree supports DTensor parameters sharded on dim 0 over one "
                                  f"mesh dim (FSDP2, HSDP); got placements {placements}")
    shape = tuple(p.shape)
    if not shard_dims:
        return ParamLayout(global_shape=shape, row_offset=0, local_rows=shape[0] if shape else None)
    mesh_dim = shard_dims[0]
    start, rows = chunk_ranges(shape[0], mesh.size(mesh_dim))[mesh.get_local_rank(mesh_dim)]
    return ParamLayout(global_shape=shape, row_offset=start, local_rows=rows, group=mesh.get_group(mesh_dim))


def chunk_ranges(n: int, world: int) -> list[tuple[int, int]]:
    """(start, length) of each rank's piece when ``n`` items are split like ``torch.chunk`` (FSDP2, DTensor
    ``Shard``): ceil(n / world) items per rank, the tail ranks get less or nothing."""
    chunk = -(-n // world) if world else 0
    return [(min(r * chunk, n), max(0, min(chunk, n - r * chunk))) for r in range(world)]
