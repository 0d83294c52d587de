"""Where each local piece of a parameter sits in the global tensor.

One description covers every case (DISTRIBUTED.md D1): a single process or a DDP replica holds the whole tensor;
an FSDP2 ``Shard(0)`` piece holds a contiguous block of rows. The math decides factoring and every shape rule from
``global_shape``, samples the Prodigy statistics on the global flat index, and divides sums by global sizes.
Pieces of one tensor held by several ranks are combined over ``group`` (``None`` means nothing to combine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: The Prodigy statistics sample every SLICE-th element of the global flattened tensor (B §3.5).
SLICE = 11

#: Tensors whose dims are all smaller than this are not factored (B §3.4).
MIN_DIM_TO_FACTOR = 32


@dataclass(frozen=True)
class ParamLayout:
    """Layout of one local piece: rows ``[row_offset, row_offset + local_rows)`` of a ``global_shape`` tensor."""

    global_shape: tuple[int, ...]
    row_offset: int = 0
    local_rows: int | None = None
    group: Any = None  # process group over which the pieces of this tensor are combined; None = not sharded

    @property
    def global_numel(self) -> int:
        n = 1
        for s in self.global_shape:
            n *= s
        return n

    @property
    def row_numel(self) -> int:
        return self.global_numel // self.global_shape[0] if self.global_shape and self.global_shape[0] else 0

    @property
    def flat_offset(self) -> int:
        """Global flat index of the first local element."""
        return self.row_offset * self.row_numel if self.global_shape else 0

    @property
    def sharded(self) -> bool:
        return self.group is not None

    @property
    def slice_start(self) -> int:
        """First local flat index whose global index is a multiple of SLICE."""
        return (-self.flat_offset) % SLICE


def single_process_layout(p: torch.Tensor) -> ParamLayout:
    """The whole tensor held by this process, nothing to combine."""
    return ParamLayout(global_shape=tuple(p.shape), row_offset=0, local_rows=p.shape[0] if p.dim() else None)


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
    world = mesh.size(mesh_dim)
    rank = mesh.get_local_rank(mesh_dim)
    chunk = -(-shape[0] // world)  # torch.chunk: ceil(rows / world) rows per rank, the tail gets less or none
    start = min(rank * chunk, shape[0])
    rows = max(0, min(chunk, shape[0] - start))
    return ParamLayout(global_shape=shape, row_offset=start, local_rows=rows, group=mesh.get_group(mesh_dim))
