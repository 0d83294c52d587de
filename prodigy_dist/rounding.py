"""Stochastic rounding of fp32 values into bf16 storage, with reproducible noise.

The noise added below the bf16 mantissa is read from a fixed table of 2**20 uniform 16-bit values (made once per
device and seed), instead of drawn from the device's global generator (ALGORITHM.md A5): the element of global flat
index i of a parameter reads entry (h + i) mod 2**20, where h is a hash of (step, stream, the parameter's position in
the optimizer; under DeepSpeed, its index in its ZeRO partition). The noise is thus a function of the element, not
of how the parameter is split: replicas (DDP, HSDP, ZeRO-0) stay bitwise equal, FSDP2 row blocks round exactly as
one process does (up to the rare flips where the fp32 value before the rounding differs in its last bits), and a
resumed run exactly like the uninterrupted one. Reading a table costs a fraction of generating fresh
random numbers. Each element's noise is uniform, so the rounding is unbiased; elements 2**20 apart in one tensor
share a value within one step.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
TABLE_SIZE = 1 << 20
_tables: dict[tuple[torch.device, int], torch.Tensor] = {}


_MIX_START = 0x9E3779B97F4A7C15


def _mix_in(h: int, v: int) -> int:
    """One round of :func:`_mix`: the 64-bit state ``h`` with ``v`` mixed in."""
    h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
    h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
    return h ^ (h >> 29)


def _mix(*values: int) -> int:
    """splitmix64-style hash of a few integers into a non-negative 63-bit integer."""
    h = _MIX_START
    for v in values:
        h = _mix_in(h, v)
    return h >> 1


def _table(device: torch.device, seed: int) -> torch.Tensor:
    table = _tables.get((device, seed))
    if table is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(_mix(seed, 0x5EED))
        table = torch.randint(0, 1 << 16, (TABLE_SIZE,), generator=gen, dtype=torch.int32, device=device)
        _tables[(device, seed)] = table
    return table


def table_start(step: int, stream: int, flat_offset: int, *, key: int) -> int:
    """Where in the noise table the stream's element at global flat index ``flat_offset`` of the parameter at
    position ``key`` in the optimizer reads its noise at ``step`` (the next elements read the next entries)."""
    return (_mix(step, stream, key) + flat_offset) % TABLE_SIZE


def table_starts(step: int, flat_offset: int, *, key: int) -> tuple[int, int]:
    """:func:`table_start` of the parameter's stream (0) and of z's (1)."""
    return table_start(step, 0, flat_offset, key=key), table_start(step, 1, flat_offset, key=key)


def table_starts_many(step: int, flat_offsets: list[int], keys: list[int]) -> tuple[list[int], list[int]]:
    """:func:`table_starts` of several parameters (``keys``, at ``flat_offsets``): the starts of the parameters'
    stream and of z's, as two lists. The hash of (step, stream) is taken once (a bf16 step of a 20M-parameter GPT
    hashed its 112 tensors' starts one by one in ~0.4 ms)."""
    out = []
    for stream in (0, 1):
        h = _mix_in(_mix_in(_MIX_START, step), stream)
        out.append([((_mix_in(h, key) >> 1) + offset) % TABLE_SIZE for offset, key in zip(flat_offsets, keys)])
    return out[0], out[1]


_doubled: dict[tuple[torch.device, int], torch.Tensor] = {}


def doubled_table(device: torch.device, seed: int) -> torch.Tensor:
    """The noise table twice in a row: TABLE_SIZE consecutive entries from any start are one slice."""
    t = _doubled.get((device, seed))
    if t is None:
        base = _table(device, seed)
        t = _doubled[(device, seed)] = torch.cat([base, base])
    return t


def round_with_noise(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` -> bf16 with the noise of :func:`copy_stochastic_` (``noise``: the table entries of these
    elements), out of place (the compiled kernels and the packed buckets use it)."""
    bits = (x.view(torch.int32) + noise) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, *, flat_offset: int, key: int, seed: int, step: int,
                     stream: int, work: torch.Tensor | None = None) -> None:
    """target (bf16) <- source (fp32) with stochastic rounding; deterministic given the arguments.

    ``work``: optional fp32 buffer with source's number of elements, used instead of a fresh allocation.
    """
    bits = source.contiguous().view(torch.int32).reshape(-1)
    n = bits.numel()
    out = work.reshape(-1).view(torch.int32) if work is not None else torch.empty_like(bits)
    table = _table(source.device, seed)
    start = table_start(step, stream, flat_offset, key=key)
    i = 0
    while i < n:
        m = min(n - i, TABLE_SIZE - start)
        torch.add(bits[i:i + m], table[start:start + m], out=out[i:i + m])
        i, start = i + m, 0
    out.bitwise_and_(-65536)
    target.copy_(out.view(torch.float32).view(source.shape))


def write_back_(target: torch.Tensor, source: torch.Tensor, stochastic: bool, *, flat_offset: int, key: int,
                seed: int, step: int, stream: int, work: torch.Tensor | None = None) -> None:
    """Store an fp32 working copy into its storage tensor (a no-op when they are the same tensor)."""
    if target is source:
        return
    if stochastic and target.dtype == torch.bfloat16 and source.dtype == torch.float32:
        copy_stochastic_(target, source, flat_offset=flat_offset, key=key, seed=seed, step=step, stream=stream,
                         work=work)
    else:
        target.copy_(source)
