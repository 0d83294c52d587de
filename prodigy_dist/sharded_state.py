"""Optimizer state of sharded parameters in checkpoint form (DISTRIBUTED.md D5).

The optimizer keeps each parameter's state as plain local tensors (the math runs on them). For a checkpoint the
state of a DTensor parameter is presented as DTensors with their true global shape, so that
``torch.distributed.checkpoint`` can save it on N ranks and load it on M ranks or on one process:

* ``z``, ``exp_avg``, ``exp_avg_sq``: the parameter's own placements and shape;
* factored statistics: a statistic that keeps dim 0 is sharded like the parameter; one reduced over dim 0 is
  identical on every rank (it was summed across the shard group) and is saved as replicated;
* the Prodigy samples ``p0``/``s`` hold the elements of the global flattened tensor at multiples of SLICE; the
  pieces ranks hold are contiguous but not ``torch.chunk``-aligned, so they are exchanged (one all_to_all for all
  parameters) into the ``torch.chunk`` layout of the global sample vector when saving, and back when loading.

Anything else (0-dim SPEED values) is identical on every rank and stays a plain tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from .layout import SLICE, ParamLayout, chunk_ranges, factored_dims

SAMPLE_KEYS = ("p0", "s")
LIKE_PARAM_KEYS = ("z", "exp_avg", "exp_avg_sq")
FACTORED_KEYS = {"exp_avg_sq_row": 0, "exp_avg_sq_col": 1}  # which of (dr, dc) the statistic reduces over


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def n_samples(layout: ParamLayout) -> int:
    """Length of the global sample vector of a tensor (its elements at flat indices 0, SLICE, 2*SLICE, ...)."""
    return _ceil_div(layout.global_numel, SLICE)


def held_samples(layout: ParamLayout, rows: tuple[int, int]) -> tuple[int, int]:
    """(first, count) of the global samples held by a piece of ``rows`` = (row offset, number of rows)."""
    a = rows[0] * layout.row_numel
    b = a + rows[1] * layout.row_numel
    first = _ceil_div(a, SLICE)
    return first, _ceil_div(b, SLICE) - first


def _overlap(x: tuple[int, int], y: tuple[int, int]) -> tuple[int, int]:
    start = max(x[0], y[0])
    end = min(x[0] + x[1], y[0] + y[1])
    return start, max(0, end - start)


def exchange_samples(entries: list[tuple[ParamLayout, torch.Tensor]], group: Any, to_chunks: bool
                     ) -> list[torch.Tensor]:
    """Move sample vectors between the pieces ranks hold (``to_chunks=True``: from the sampled rows of each rank to
    the ``torch.chunk`` layout of the global sample vector; ``False``: back). One all_to_all for every entry.

    Every rank of ``group`` must pass the same parameters in the same order (also with empty pieces).
    """
    import torch.distributed as dist

    world, me = dist.get_world_size(group), dist.get_rank(group)
    held, chunked = [], []
    for layout, _ in entries:
        held.append([held_samples(layout, r) for r in chunk_ranges(layout.global_shape[0], world)])
        chunked.append(chunk_ranges(n_samples(layout), world))
    src, dst = (held, chunked) if to_chunks else (chunked, held)
    send_parts, send_sizes, recv_sizes = [], [], []
    for j in range(world):
        sent = received = 0
        for i, (_, t) in enumerate(entries):
            start, n = _overlap(src[i][me], dst[i][j])
            send_parts.append(t.reshape(-1)[start - src[i][me][0]:start - src[i][me][0] + n].float())
            sent += n
            received += _overlap(src[i][j], dst[i][me])[1]
        send_sizes.append(sent)
        recv_sizes.append(received)
    device = entries[0][1].device if entries else torch.device("cpu")
    send = torch.cat(send_parts) if send_parts else torch.zeros(0, device=device)
    recv = torch.empty(sum(recv_sizes), dtype=torch.float32, device=device)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=group)
    out = [torch.empty(dst[i][me][1], dtype=t.dtype, device=t.device) for i, (_, t) in enumerate(entries)]
    offset = 0
    for j in range(world):
        for i in range(len(entries)):
            start, n = _overlap(src[i][j], dst[i][me])
            out[i][start - dst[i][me][0]:start - dst[i][me][0] + n] = recv[offset:offset + n]
            offset += n
    return out


def global_state(p: Any, layout: ParamLayout, factored: bool, state: dict[str, Any],
                 chunked_samples: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The checkpoint form of one DTensor parameter's state (see the module docstring); no copies but the
    exchanged samples."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh, placements = p.device_mesh, p.placements
    replicated = [Replicate()] * mesh.ndim
    dims = factored_dims(layout.global_shape, factored)
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in chunked_samples:
            value = DTensor.from_local(chunked_samples[key], mesh, placements, run_check=False,
                                       shape=(n_samples(layout),), stride=(1,))
        elif key in LIKE_PARAM_KEYS:
            value = DTensor.from_local(value, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
        elif key in FACTORED_KEYS and dims is not None:
            if dims[FACTORED_KEYS[key]] == 0:  # reduced over the sharded dim: the same on every rank
                value = DTensor.from_local(value, mesh, replicated, run_check=False)
            else:
                shape = (layout.global_shape[0],) + tuple(value.shape[1:])
                value = DTensor.from_local(value, mesh, placements, run_check=False, shape=shape,
                                           stride=torch.empty(shape, device="meta").stride())
        out[key] = value
    return out


def local_piece(value: torch.Tensor, layout: ParamLayout, key: str, factored: bool) -> torch.Tensor:
    """This rank's piece of a saved state tensor: the local shard of a DTensor, or the matching rows of a full
    (single-process) tensor. Sample vectors come back in the chunk layout; :func:`exchange_samples` moves them."""
    if hasattr(value, "to_local") and type(value).__name__ == "DTensor":
        return value.to_local()
    if not layout.sharded:
        return value
    import torch.distributed as dist

    if key in SAMPLE_KEYS:
        start, n = chunk_ranges(n_samples(layout), dist.get_world_size(layout.group))[dist.get_rank(layout.group)]
        return value.reshape(-1)[start:start + n]
    dims = factored_dims(layout.global_shape, factored)
    keeps_rows = key in LIKE_PARAM_KEYS or (key in FACTORED_KEYS and dims is not None and
                                            dims[FACTORED_KEYS[key]] != 0)
    if keeps_rows and value.dim() and value.shape[0] == layout.global_shape[0]:
        return value.narrow(0, layout.row_offset, layout.local_rows)
    return value
