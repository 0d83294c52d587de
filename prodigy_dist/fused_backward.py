"""Fused backward pass: step each parameter as soon as its gradient is ready, then free the gradient.

    opt = ProdigyPlusScheduleFree(model.parameters(), fused_back_pass=True)
    handle = prodigy_dist.fused_backward.attach(opt)
    for batch in data:
        loss = model(batch).sum()
        loss.backward()          # parameters are updated during backward; gradients are freed
        opt.step()               # optional: a no-op kept for trainers that always call it

With gradient accumulation, run the micro-batches that must not step under ``accumulate(opt)``:

    with prodigy_dist.fused_backward.accumulate(opt):
        model(micro_batch_1).sum().backward()   # gradients accumulate, no step
    model(micro_batch_2).sum().backward()       # steps with the accumulated gradients

The step counter and d are finished once per step (at the end of the backward pass), so parameters that get no
gradient, hooks that fire again and accumulation never shift them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .optimizer import ProdigyPlusScheduleFree


class FusedBackwardHandle:
    """Returned by :func:`attach`; :meth:`remove` detaches the hooks."""

    def __init__(self, handles: list[Any]):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def attach(optimizer: ProdigyPlusScheduleFree) -> FusedBackwardHandle:
    """Register a post-accumulate-grad hook on every parameter of ``optimizer`` that steps it and frees its grad."""
    if not isinstance(optimizer, ProdigyPlusScheduleFree):
        raise TypeError(f"attach() expects a ProdigyPlusScheduleFree, got {type(optimizer).__name__}")
    if not optimizer.param_groups[0]["fused_back_pass"]:
        raise RuntimeError("attach() needs an optimizer built with fused_back_pass=True (otherwise step() would "
                           "update the parameters a second time)")
    handles = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                handles.append(p.register_post_accumulate_grad_hook(_make_hook(optimizer, group)))
    return FusedBackwardHandle(handles)


def _make_hook(optimizer: ProdigyPlusScheduleFree, group: dict):
    def hook(p: torch.Tensor) -> None:
        if getattr(optimizer, "_accumulating", False):
            return
        optimizer.step_param(p, group)
        p.grad = None
    return hook


@contextlib.contextmanager
def accumulate(optimizer: ProdigyPlusScheduleFree) -> Iterator[None]:
    """Within this context the hooks do not step: gradients accumulate for a later backward pass."""
    previous = getattr(optimizer, "_accumulating", False)
    optimizer._accumulating = True
    try:
        yield
    finally:
        optimizer._accumulating = previous
