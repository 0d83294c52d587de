"""Stochastic rounding of fp32 values into bf16 storage, with reproducible noise.

The noise added below the bf16 mantissa comes from a generator seeded with a hash of (seed, step, stream, global
flat offset of the local piece) instead of the device's global generator (ALGORITHM.md A5): replicas of a parameter
(DDP, HSDP, ZeRO-0) hold the same piece at the same offset, draw the same noise and stay bitwise equal, and a
resumed run rounds exactly like the uninterrupted one. (A piece at another offset draws other noise, so a sharded
run rounds differently from a single process; the rounding stays unbiased either way.)
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_generators: dict[torch.device, torch.Generator] = {}


def _mix(*values: int) -> int:
    """splitmix64-style hash of a few integers into a non-negative 63-bit seed."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


def rounding_noise(numel: int, flat_offset: int, seed: int, step: int, stream: int,
                   device: torch.device) -> torch.Tensor:
    """int32 noise in [0, 2**16), a deterministic function of the arguments."""
    gen = _generators.get(device)
    if gen is None:
        gen = _generators[device] = torch.Generator(device=device)
    gen.manual_seed(_mix(seed, step, stream, flat_offset))
    return torch.randint(0, 1 << 16, (numel,), generator=gen, dtype=torch.int32, device=device)


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, *, flat_offset: int, seed: int, step: int,
                     stream: int) -> None:
    """target (bf16) <- source (fp32) with stochastic rounding; deterministic given the arguments."""
    noise = rounding_noise(source.numel(), flat_offset, seed, step, stream, source.device)
    noise.add_(source.contiguous().view(torch.int32).reshape(-1)).bitwise_and_(-65536)
    target.copy_(noise.view(torch.float32).view(source.shape))


def write_back_(target: torch.Tensor, source: torch.Tensor, stochastic: bool, *, flat_offset: int, seed: int,
                step: int, stream: int) -> None:
    """Store an fp32 working copy into its storage tensor (a no-op when they are the same tensor)."""
    if target is source:
        return
    if stochastic and target.dtype == torch.bfloat16 and source.dtype == torch.float32:
        copy_stochastic_(target, source, flat_offset=flat_offset, seed=seed, step=step, stream=stream)
    else:
        target.copy_(source)
