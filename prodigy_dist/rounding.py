"""Stochastic rounding of fp32 values into bf16 storage, with layout-independent noise.

The noise added below the bf16 mantissa is a hash of (seed, step, stream, global element index) instead of a draw
from a device generator (ALGORITHM.md A5): replicas of a parameter (DDP, HSDP, ZeRO-0) round identically and stay
bitwise equal, a sharded run rounds exactly like a single process, and a resumed run rounds like the uninterrupted
one. The hash is computed in int64 without overflow (every product stays below 2**63).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x2C1B3C6D
_STEP = 0x9E3779B1 & 0x7FFFFFFF
_SEED = 0x632BE5AB


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def rounding_noise(numel: int, flat_offset: int, seed: int, step: int, stream: int,
                   device: torch.device) -> torch.Tensor:
    """int32 noise in [0, 2**16) for global flat indices ``flat_offset .. flat_offset + numel``."""
    key = ((seed * _SEED) ^ (step * _STEP) ^ (stream << 28)) & _MASK32
    idx = torch.arange(flat_offset, flat_offset + numel, dtype=torch.int64, device=device)
    h = _hash32((idx & _MASK32) ^ key)
    h = _hash32(h ^ ((idx >> 32) & _MASK32))
    return (h & 0xFFFF).to(torch.int32)


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, *, flat_offset: int, seed: int, step: int,
                     stream: int) -> None:
    """target (bf16) <- source (fp32) with stochastic rounding; deterministic given the arguments."""
    noise = rounding_noise(source.numel(), flat_offset, seed, step, stream, source.device)
    bits = source.contiguous().view(torch.int32).reshape(-1)
    noise.add_(bits).bitwise_and_(-65536)
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
