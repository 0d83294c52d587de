"""The fast optimizer equals the readable reference implementation, step by step, for every option."""

import copy

import pytest
import torch

from prodigy_dist import ProdigyPlusScheduleFree, fused_backward, packing
from prodigy_dist.reference import ReferenceProdigyPlusScheduleFree

from .helpers import DEVICES, MixedModel, loss_of, make_pair, max_rel_diff, train_step, two_groups

OPTIONS = {
    "defaults": {},
    "eps_none": dict(eps=None),
    "no_stableadamw": dict(use_stableadamw=False),
    "bias_correction": dict(use_bias_correction=True),
    "wd_by_lr": dict(weight_decay=0.1),
    "wd_raw": dict(weight_decay=0.01, weight_decay_by_lr=False),
    "no_limiter": dict(d_limiter=False, d_coef=0.5),
    "prodigy_steps": dict(prodigy_steps=8),
    "speed": dict(use_speed=True),
    "unfactored": dict(factored=False),
    "factored_bf16_stats": dict(factored_fp32=False),
    "cautious": dict(use_cautious=True),
    "grams": dict(use_grams=True),
    "adopt": dict(use_adopt=True),
    "orthograd": dict(use_orthograd=True),
    "focus": dict(use_focus=True),
    "schedulefree_c": dict(schedulefree_c=10.0),
    "no_split": dict(split_groups=False),
    "split_no_mean": dict(split_groups_mean=False),
    "beta3": dict(beta3=0.9, betas=(0.95, 0.999)),
    "muon": dict(use_muon_pp=True),
    "muon_cautious_orthograd": dict(use_muon_pp=True, use_cautious=True, use_orthograd=True),
    "prodigy_mode": dict(use_schedulefree=False),
    "prodigy_cautious": dict(use_schedulefree=False, use_cautious=True),
    "prodigy_grams": dict(use_schedulefree=False, use_grams=True),
    "prodigy_adopt": dict(use_schedulefree=False, use_adopt=True),
    "prodigy_adopt_cautious": dict(use_schedulefree=False, use_adopt=True, use_cautious=True),
    "prodigy_focus": dict(use_schedulefree=False, use_focus=True),
    "prodigy_orthograd_eps_none": dict(use_schedulefree=False, use_orthograd=True, eps=None),
    "prodigy_speed_wd": dict(use_schedulefree=False, use_speed=True, weight_decay=0.01),
    "prodigy_muon": dict(use_schedulefree=False, use_muon_pp=True),
    "everything_sf": dict(use_bias_correction=True, weight_decay=0.05, use_cautious=True, use_orthograd=True,
                          schedulefree_c=5.0, use_speed=True),
}

STEPS = 30

#: d's tolerance where the sums are taken in another order than the reference's (see the test below)
ORDER_FLOOR = {"no_limiter": 5e-3}


def _skip_unless_packing_applies(opt, packed: bool) -> None:
    """The packed case of options that pack nothing would repeat the per-tensor one with looser bounds."""
    if packed and not any(packing.group_packable(g) for g in opt.param_groups):
        pytest.skip("these options pack no tensor: the per_tensor case covers them")


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per_tensor"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("device", DEVICES)
def test_fast_equals_reference_fp32(name, device, packed, monkeypatch):
    monkeypatch.setattr(packing, "ENABLED", packed)
    options = OPTIONS[name]
    ma, fast, mb, ref = make_pair(ProdigyPlusScheduleFree, ReferenceProdigyPlusScheduleFree, options, device=device)
    _skip_unless_packing_applies(fast, packed)
    # A GPU sums in another order, and so do the segment sums of packed tensors (packing.Segments.sums): d's
    # cancelling sums agree to a few fp32 ulps of their terms (packed on a CPU: up to 8e-7 after 30 steps). Without
    # the d limiter, d = d_coef * N / den every step and each step's d feeds the next N: a 1.5e-7 difference at the
    # first step grew to 5e-4 in 30 steps (packed, CPU), so that case is held to its floor (as in
    # test_parity_upstream.FLOOR_TOL).
    ordered = device == "cpu" and not packed
    d_rel = 1e-6 if ordered else ORDER_FLOOR.get(name, 2e-5)
    for step in range(STEPS):
        la = train_step(ma, fast, step)
        lb = train_step(mb, ref, step)
        for ga, gb in zip(fast.param_groups, ref.param_groups):
            assert ga["k"] == gb["k"]
            assert ga["d"] == pytest.approx(gb["d"], rel=d_rel), f"step {step}"
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-7)
    # On a CPU, the same operations in the same order: bitwise equal, except where the fast path sums OrthoGrad's
    # norms for the reducer instead of calling vector_norm, keeps SPEED's running values in fp32 tensors, or sums
    # the Prodigy samples of packed tensors by segments. On a GPU, the multi-tensor kernels and the per-tensor ones
    # of the reference differ in their last bits.
    exact = device == "cpu" and not packed and not (options.get("use_orthograd") or options.get("use_speed"))
    w_rel = 1e-5 if ordered else max(1e-5, d_rel)
    assert max_rel_diff(ma, mb) == 0.0 if exact else max_rel_diff(ma, mb) < w_rel
    if fast.param_groups[0]["use_schedulefree"]:
        fast.eval()
        ref.eval()
        assert max_rel_diff(ma, mb) < w_rel
    # the run really moved: d grew from d0 and the weights changed
    assert fast.param_groups[0]["d"] > fast.param_groups[0]["d0"] or options.get("use_bias_correction")


@pytest.mark.parametrize("name", ["defaults", "unfactored", "prodigy_mode", "eps_none", "muon", "speed"])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_fast_equals_reference_bf16(name, stochastic, device):
    """bf16 weights: identical up to a few bf16 rounding flips of the fp32 intermediates (1 ulp = 2**-8 rel)."""
    options = dict(OPTIONS[name], stochastic_rounding=stochastic)
    dtype = torch.bfloat16
    ma, fast, mb, ref = make_pair(ProdigyPlusScheduleFree, ReferenceProdigyPlusScheduleFree, options, dtype=dtype,
                                  device=device)
    for step in range(20):
        train_step(ma, fast, step, dtype)
        train_step(mb, ref, step, dtype)
    assert fast.param_groups[0]["d"] == pytest.approx(ref.param_groups[0]["d"], rel=2e-3)
    assert max_rel_diff(ma, mb) < 2e-2
    for p in ma.parameters():
        assert p.dtype == dtype
        st = fast.state[p]
        assert st["p0"].dtype == torch.bfloat16
        if "exp_avg_sq_row" in st:
            assert st["exp_avg_sq_row"].dtype == torch.float32


def test_stochastic_rounding_is_unbiased_and_deterministic():
    """bf16 weights with many tiny updates drift like fp32 on average (round-to-nearest would stall)."""
    from prodigy_dist.rounding import copy_stochastic_
    src = torch.full((200_000,), 1.0 + 2 ** -10)  # between two bf16 values, 1/8 of the way up
    out = torch.empty(200_000, dtype=torch.bfloat16)
    copy_stochastic_(out, src, flat_offset=0, key=0, seed=3, step=1, stream=0)
    assert out.float().mean().item() == pytest.approx(src.mean().item(), abs=2e-4)
    assert set(out.float().unique().tolist()) == {1.0, 1.0078125}
    again = torch.empty_like(out)
    copy_stochastic_(again, src, flat_offset=0, key=0, seed=3, step=1, stream=0)
    assert torch.equal(out, again)
    for other in (dict(step=2, key=0), dict(step=1, key=1)):  # another step, another parameter: other noise
        different = torch.empty_like(out)
        copy_stochastic_(different, src, flat_offset=0, seed=3, stream=0, **other)
        assert not torch.equal(out, different)
    # the noise is a function of the element: a piece at global offset 1000 rounds as those elements of the whole
    piece = torch.empty(50_000, dtype=torch.bfloat16)
    copy_stochastic_(piece, src[1000:51_000], flat_offset=1000, key=0, seed=3, step=1, stream=0)
    assert torch.equal(piece, out[1000:51_000])


def _fused_pair(options):
    torch.manual_seed(0)
    ma = MixedModel()
    mb = copy.deepcopy(ma)
    plain = ProdigyPlusScheduleFree(two_groups(ma), **options)
    fused = ProdigyPlusScheduleFree(two_groups(mb), fused_back_pass=True, **options)
    fused_backward.attach(fused)
    return ma, plain, mb, fused


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per_tensor"])
@pytest.mark.parametrize("name", ["defaults", "speed", "muon", "prodigy_mode", "cautious", "no_split"])
def test_fused_backward_equals_step(name, packed, monkeypatch):
    """The hooks step tensor by tensor: bitwise step() when step() does too; with packing, step() sums the Prodigy
    samples of small tensors by segments, equal up to float summation order."""
    monkeypatch.setattr(packing, "ENABLED", packed)
    ma, plain, mb, fused = _fused_pair(OPTIONS[name])
    _skip_unless_packing_applies(plain, packed)
    for step in range(12):
        train_step(ma, plain, step)
        loss_of(mb, step).backward()
        fused.step()  # a no-op: the hooks stepped every parameter during backward
        assert all(p.grad is None for p in mb.parameters())
    assert [g["k"] for g in fused.param_groups] == [g["k"] for g in plain.param_groups] == [13, 13]
    if packed:
        assert [g["d"] for g in fused.param_groups] == pytest.approx([g["d"] for g in plain.param_groups], rel=1e-6)
        assert max_rel_diff(ma, mb) < 1e-5
    else:
        assert [g["d"] for g in fused.param_groups] == [g["d"] for g in plain.param_groups]
        assert max_rel_diff(ma, mb) == 0.0


def test_fused_backward_unused_parameter_and_accumulation():
    """A parameter with no gradient and gradient accumulation shift neither the step counter nor d."""
    ma, plain, mb, fused = _fused_pair({})
    ma.unfactored.weight.requires_grad_(False)
    mb.unfactored.weight.requires_grad_(False)
    for step in range(6):
        plain.zero_grad()
        (loss_of(ma, 2 * step) + loss_of(ma, 2 * step + 1)).backward()
        plain.step()
        with fused_backward.accumulate(fused):
            loss_of(mb, 2 * step).backward()
        loss_of(mb, 2 * step + 1).backward()
    assert fused.param_groups[0]["k"] == plain.param_groups[0]["k"] == 7
    assert fused.param_groups[0]["d"] == pytest.approx(plain.param_groups[0]["d"], rel=1e-6)
    assert max_rel_diff(ma, mb) < 1e-5


def test_fused_backward_hook_firing_twice_starts_a_new_step():
    """Stepping the same parameter again (hooks driven by hand, no backward) finishes the previous step first."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 40))
    q = torch.nn.Parameter(torch.randn(40))
    opt = ProdigyPlusScheduleFree([p, q], fused_back_pass=True)
    for step in range(3):
        p.grad = torch.randn(64, 40)
        opt.step_param(p)
        p.grad = None
    assert opt.param_groups[0]["k"] == 3  # two steps finished, the third still open
    opt.step()
    assert opt.param_groups[0]["k"] == 4


def test_fused_back_pass_without_hooks_is_an_error():
    p = torch.nn.Parameter(torch.randn(4))
    opt = ProdigyPlusScheduleFree([p], fused_back_pass=True)
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="fused_backward.attach"):
        opt.step()


class LargeModel(torch.nn.Module):
    """Tensors large enough (>= 65536 elements) for the fast path's scratch-buffer route, tall and wide."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(96, 800)  # (800, 96): tall, 76800 elements
        self.down = torch.nn.Linear(800, 96)  # (96, 800): wide
        self.out = torch.nn.Linear(96, 4)

    def forward(self, x):
        return self.out(self.down(torch.relu(self.up(x))))


@pytest.mark.parametrize("options", [{}, dict(use_schedulefree=False), dict(weight_decay=0.1, use_cautious=True),
                                     dict(eps=None), dict(factored=False), dict(use_adopt=True)])
@pytest.mark.parametrize("dtype,stochastic", [(torch.float32, False), (torch.bfloat16, False),
                                              (torch.bfloat16, True)])
def test_fast_equals_reference_large_tensors(options, dtype, stochastic):
    torch.manual_seed(0)
    ma = LargeModel().to(dtype)
    mb = copy.deepcopy(ma)
    fast = ProdigyPlusScheduleFree(ma.parameters(), stochastic_rounding=stochastic, **options)
    ref = ReferenceProdigyPlusScheduleFree(mb.parameters(), stochastic_rounding=stochastic, **options)
    gen = torch.Generator().manual_seed(0)
    for step in range(8):
        x, t = torch.randn(32, 96, generator=gen).to(dtype), torch.randn(32, 4, generator=gen)
        for model, opt in ((ma, fast), (mb, ref)):
            opt.zero_grad()
            ((model(x).float() - t) ** 2).mean().backward()
            opt.step()
    assert fast.param_groups[0]["d"] == ref.param_groups[0]["d"]
    assert max_rel_diff(ma, mb) == 0.0
    assert fast._scratch.nbytes() > 0  # the large tensors went through the scratch buffers
