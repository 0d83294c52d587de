"""The reduction layer: bounded collectives per step, and the lock-step schedule equals stepping alone.

A multi-rank run reduces its partial sums in lock-step rounds (every bucket reaches its next reduction point, then
one collective). Here a counting reducer that is "active" on one process (its sums are the identity, as on one
rank) drives that schedule, so the collectives of one step can be counted without starting processes.
"""

import copy

import pytest
import torch

from prodigy_dist import ProdigyPlusScheduleFree
from prodigy_dist.reduction import Reducer

from .helpers import MixedModel, loss_of, max_rel_diff, train_step, two_groups


class CountingReducer(Reducer):
    """Active on one process: records each flush and the number of floats it would reduce."""

    def __init__(self):
        super().__init__(None)
        self.flushes: list[int] = []

    @property
    def active(self) -> bool:
        return True

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        self.flushes.append(sum(t.numel() for t in pending))
        self.collectives += 1


class Wide(torch.nn.Module):
    def __init__(self, n_layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(40, 40) for _ in range(n_layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


ALL_OPTIONS = dict(use_orthograd=True, use_cautious=True, use_speed=True, use_bias_correction=True,
                   weight_decay=0.01)


@pytest.mark.parametrize("n_tensors", [10, 100])
@pytest.mark.parametrize("options,limit", [({}, 2), (ALL_OPTIONS, 4), (dict(ALL_OPTIONS, use_schedulefree=False), 4)])
def test_collectives_per_step_are_bounded(n_tensors, options, limit):
    torch.manual_seed(0)
    model = Wide(n_tensors // 2)
    opt = ProdigyPlusScheduleFree(model.parameters(), **options)
    opt._reducer = reducer = CountingReducer()
    x = torch.randn(8, 40)
    for _ in range(3):
        reducer.flushes.clear()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        assert 1 <= len(reducer.flushes) <= limit, reducer.flushes
    assert len(list(model.parameters())) == n_tensors


@pytest.mark.parametrize("name,options", [("defaults", {}), ("all", ALL_OPTIONS), ("muon", dict(use_muon_pp=True)),
                                          ("prodigy", dict(ALL_OPTIONS, use_schedulefree=False))])
def test_lockstep_schedule_equals_stepping_alone(name, options):
    torch.manual_seed(0)
    ma = MixedModel()
    mb = copy.deepcopy(ma)
    alone = ProdigyPlusScheduleFree(two_groups(ma), **options)
    lockstep = ProdigyPlusScheduleFree(two_groups(mb), **options)
    lockstep._reducer = CountingReducer()
    for step in range(10):
        train_step(ma, alone, step)
        train_step(mb, lockstep, step)
    assert [g["d"] for g in alone.param_groups] == [g["d"] for g in lockstep.param_groups]
    assert max_rel_diff(ma, mb) == 0.0
    assert lockstep._reducer.collectives > 0


def test_inactive_reducer_issues_nothing():
    torch.manual_seed(0)
    model = MixedModel()
    opt = ProdigyPlusScheduleFree(model.parameters())
    train_step(model, opt, 0)
    assert opt._reducer.collectives == 0 and not opt._reducer.active
