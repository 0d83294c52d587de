"""Small models and training loops shared by the tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

#: Devices the device-parametrised tests run on: the CPU always, a GPU too where there is one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class MixedModel(nn.Module):
    """Wide, square and tall matrices, a conv weight, 1-D tensors and a small unfactored matrix."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 40, 3, padding=1)  # weight (40, 3, 3, 3): dr=0, dc=1
        self.inp = nn.Linear(40, 48)  # (48, 40): tall
        self.square = nn.Linear(48, 48)
        self.wide = nn.Linear(48, 96)  # (96, 48): tall
        self.norm = nn.LayerNorm(96)
        self.small = nn.Linear(96, 40)  # (40, 96): wide
        self.tiny = nn.Linear(40, 8)  # (8, 40): factored, one dim < 32
        self.unfactored = nn.Linear(8, 8, bias=False)  # (8, 8): all dims < 32, full second moment

    def forward(self, x):
        h = self.conv(x).mean(dim=(2, 3))
        h = torch.relu(self.inp(h))
        h = torch.relu(self.square(h))
        h = self.norm(self.wide(h))
        h = self.tiny(torch.relu(self.small(h)))
        return h + self.unfactored(h)


def two_groups(model: nn.Module, **second) -> list[dict]:
    mats = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [dict(params=mats), dict(params=rest, **second)]


def batch(step: int, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 3, 6, 6, generator=g).to(device, dtype)
    t = torch.randn(16, 8, generator=g).to(device, dtype)
    return x, t


def loss_of(model, step, dtype=torch.float32):
    x, t = batch(step, dtype, next(model.parameters()).device)
    return ((model(x).float() - t.float()) ** 2).mean()


def make_pair(cls_a, cls_b, options: dict, dtype=torch.float32, seed: int = 0, groups=two_groups, device="cpu"):
    torch.manual_seed(seed)
    model_a = MixedModel().to(device, dtype)
    model_b = copy.deepcopy(model_a)
    return model_a, cls_a(groups(model_a), **options), model_b, cls_b(groups(model_b), **options)


def train_step(model, opt, step, dtype=torch.float32):
    opt.zero_grad(set_to_none=True)
    loss = loss_of(model, step, dtype)
    loss.backward()
    opt.step()
    return loss.item()


def max_rel_diff(model_a, model_b) -> float:
    """Largest |a - b| over each tensor, relative to that tensor's largest magnitude."""
    worst = 0.0
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        a, b = a.detach().float(), b.detach().float()
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return worst
