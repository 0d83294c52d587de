"""Muon direction for ``use_muon_pp`` (ALGORITHM.md A3; the exact math is in docs/MUON.md).

For a parameter with ndim >= 2, the gradient (Schedule-Free) or the first moment (Prodigy mode) is viewed as a
``(shape[0], -1)`` matrix G and orthogonalised with a quintic Newton-Schulz iteration, X ~ U V^T from G = U S V^T.
The kernels then give the direction the RMS of the Adam-path update it replaces, so Prodigy's d and the
Schedule-Free averaging see updates of the same size as on the Adam path. Operates on plain local tensors.
"""

from __future__ import annotations

import torch

#: Quintic Newton-Schulz coefficients (Jordan et al., Muon).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximate orthogonalisation of the 2-D matrix ``g`` (fp32 result, shape of ``g``)."""
    a, b, c = NS_COEFFS
    x = g.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (torch.linalg.vector_norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if transposed else x


def muon_direction(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Unit-RMS orthogonalised direction of ``g`` (any shape with ndim >= 2), fp32, shaped like ``g``."""
    x = newton_schulz(g.reshape(g.shape[0], -1), steps).reshape(g.shape)
    norm = torch.linalg.vector_norm(x)
    return x.mul_((x.numel() ** 0.5) / norm.clamp_min(1e-30))


class Orthogonalise:
    """A request, yielded by the update kernel, for the Muon directions of a bucket's matrices.

    ``sources`` are the local pieces (fp32) and ``layouts`` where they sit. Whoever drives the kernel fills
    ``results`` (unit-RMS directions, shaped like the local pieces) before resuming it, through
    :func:`prodigy_dist.reduction.orthogonalise`: whole matrices where they are, matrices spread over ranks by
    exactly one owner rank each.
    """

    def __init__(self, sources: list[torch.Tensor], layouts: list):
        self.sources = sources
        self.layouts = layouts
        self.results: list[torch.Tensor | None] = [None] * len(sources)
