"""Packed buckets (prodigy_dist.packing) step exactly like the same tensors stepped one at a time."""

import math

import pytest
import torch

from prodigy_dist import ProdigyPlusScheduleFree, compiled, packing
from prodigy_dist.kernels import sample
from prodigy_dist.layout import ParamLayout, chunk_ranges
from prodigy_dist.rounding import write_back_
from prodigy_dist.scalars import step_scalars

from .helpers import DEVICES

# 1-D tensors of many sizes (0: an empty piece; 1, 10, 11, 12 around the sampling stride), a small 2-D tensor (all
# dims < 32: full second moment, packed with a shape), and a 1-D tensor too large to pack
SIZES = [1, 10, 11, 12, 0, 3000, 7, 500, 2048, 23]
SHAPED = (8, 12)
LARGE = packing.MAX_NUMEL + 5
STEPS = 10

OPTIONS = {
    "defaults": {},
    "eps_none": dict(eps=None),
    "no_stableadamw": dict(use_stableadamw=False),
    "speed": dict(use_speed=True),
    "adopt": dict(use_adopt=True),
    "focus": dict(use_focus=True),
    "grams": dict(use_grams=True),
    "bias_correction": dict(use_bias_correction=True),
    "wd_by_lr": dict(weight_decay=0.1),
    "wd_raw": dict(weight_decay=0.01, weight_decay_by_lr=False, schedulefree_c=5.0),
    "prodigy_steps": dict(prodigy_steps=4),
    "prodigy_mode": dict(use_schedulefree=False),
    "prodigy_adopt": dict(use_schedulefree=False, use_adopt=True),
    "prodigy_grams_wd": dict(use_schedulefree=False, use_grams=True, weight_decay=0.1),
    "prodigy_focus_speed": dict(use_schedulefree=False, use_focus=True, use_speed=True),
}


def _params(dtype, large=False, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    shapes = [(n,) for n in SIZES] + [SHAPED] + ([(LARGE,)] if large else [])
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]


def _run(monkeypatch, enabled, dtype, options, steps=STEPS, no_grad=None, large=False, device="cpu"):
    """A few steps on a quadratic (gradients that agree from step to step, so that d grows), packed or not."""
    monkeypatch.setattr(packing, "ENABLED", enabled)
    params = _params(dtype, large, device)
    opt = ProdigyPlusScheduleFree(params, d0=1e-3, fast_path="eager", **options)
    gen = torch.Generator().manual_seed(1)
    targets = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    for step in range(steps):
        for i, (p, t) in enumerate(zip(params, targets)):
            noise = torch.randn(p.shape, generator=gen).to(device)
            p.grad = None if (no_grad is not None and i == no_grad and step % 2) else \
                (p.detach().float() - t + 0.1 * noise).to(dtype)
        opt.step()
    return params, opt


def _packed_buckets(opt):
    items = [(0, p) for p in opt.param_groups[0]["params"] if p.grad is not None]
    return [b for b in opt._buckets(items, [step_scalars(g) for g in opt.param_groups]) if b.pack is not None]


def _assert_close(a, b, dtype):
    """fp32: equal to float summation order; bf16: equal up to one bf16 ulp in a few elements."""
    a, b = a.detach().float(), b.detach().float()
    assert a.shape == b.shape
    if not b.numel():
        return
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * b.abs().max().item())
        return
    diff = (a - b).abs()
    ulp = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(1e-30))) - 7)
    assert bool((diff <= ulp).all()), f"{int((diff > ulp).sum())} elements differ by more than one bf16 ulp"
    assert int((diff > 0).sum()) <= max(2, a.numel() // 200)


def _compare(pa, oa, pb, ob, dtype):
    for ga, gb in zip(oa.param_groups, ob.param_groups):
        assert ga["k"] == gb["k"]
        assert ga["d"] == pytest.approx(gb["d"], rel=1e-6 if dtype == torch.float32 else 1e-3)
    for a, b in zip(pa, pb):
        assert a.dtype == b.dtype
        _assert_close(a, b, dtype)
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if torch.is_tensor(value) and value.numel():
                assert value.dtype == sb[key].dtype, key
                _assert_close(value, sb[key], value.dtype)  # (p0 and s are bf16 for fp32 parameters too)


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_sr"])
@pytest.mark.parametrize("device", DEVICES)
def test_packed_equals_per_tensor(monkeypatch, name, dtype, device):
    pa, oa = _run(monkeypatch, True, dtype, OPTIONS[name], device=device)
    assert len(_packed_buckets(oa)) == 1
    pb, ob = _run(monkeypatch, False, dtype, OPTIONS[name], device=device)
    assert not _packed_buckets(ob)
    _compare(pa, oa, pb, ob, dtype)
    assert oa.param_groups[0]["d"] > 1e-3 or OPTIONS[name].get("use_bias_correction")  # d moved
    assert not torch.equal(pa[5].detach(), _params(dtype, device=device)[5].detach())  # the weights moved


def test_packed_round_to_nearest_bf16(monkeypatch):
    pa, oa = _run(monkeypatch, True, torch.bfloat16, dict(stochastic_rounding=False))
    pb, ob = _run(monkeypatch, False, torch.bfloat16, dict(stochastic_rounding=False))
    _compare(pa, oa, pb, ob, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_sr"])
def test_parameter_without_gradient_and_large_tensor(monkeypatch, dtype):
    """Every other step a tensor in the middle of the pack has no gradient (another pack is formed); a 1-D tensor
    above MAX_NUMEL is stepped on its own."""
    pa, oa = _run(monkeypatch, True, dtype, {}, no_grad=5, large=True)
    (b,) = _packed_buckets(oa)  # (after a step without the gradient of tensor 5)
    assert len(b.params) == len(SIZES) and all(p.numel() < packing.MAX_NUMEL for p in b.params)
    pb, ob = _run(monkeypatch, False, dtype, {}, no_grad=5, large=True)
    _compare(pa, oa, pb, ob, dtype)


def test_packs_are_capped(monkeypatch):
    monkeypatch.setattr(packing, "CAPACITY", 2100)
    pa, oa = _run(monkeypatch, True, torch.float32, {})
    packs = _packed_buckets(oa)
    # [1, 10, 11, 12, 0], [3000], [7, 500], [2048, 23], [8 x 12]: packs of one are stepped per tensor
    assert sorted(len(b.params) for b in packs) == [2, 2, 5]
    assert all(sum(p.numel() for p in b.params) <= 2100 for b in packs)
    pb, ob = _run(monkeypatch, False, torch.float32, {})
    _compare(pa, oa, pb, ob, torch.float32)


@pytest.mark.parametrize("options", [dict(use_cautious=True), dict(use_orthograd=True), dict(use_muon_pp=True)])
def test_options_with_other_per_tensor_sums_are_not_packed(monkeypatch, options):
    monkeypatch.setattr(packing, "ENABLED", True)
    params = _params(torch.float32)
    opt = ProdigyPlusScheduleFree(params, **options)
    for p in params:
        p.grad = torch.ones_like(p)
    packed = _packed_buckets(opt)
    if options.get("use_muon_pp"):  # only the 2-D tensor is orthogonalised: the 1-D ones are still packed
        assert len(packed) == 1 and all(p.dim() == 1 for p in packed[0].params)
    else:
        assert not packed


def test_skipped_step_leaves_everything_untouched(monkeypatch):
    pa, oa = _run(monkeypatch, True, torch.float32, {}, steps=3)
    before = [p.detach().clone() for p in pa]
    state = {i: {k: v.clone() for k, v in oa.state[p].items() if torch.is_tensor(v)} for i, p in enumerate(pa)}
    group = dict(oa.param_groups[0])
    for i, p in enumerate(pa):
        p.grad = torch.ones_like(p)
    pa[3].grad[4] = math.nan  # in the middle of the pack
    oa.step()
    assert oa.param_groups[0]["skipped_steps"] == 1
    for key in ("k", "d", "d_numerator", "weight_sum"):
        assert oa.param_groups[0][key] == group[key]
    for i, p in enumerate(pa):
        assert torch.equal(p.detach(), before[i])
        for key, value in state[i].items():
            assert torch.equal(oa.state[p][key], value), key


def test_packed_buckets_are_never_compiled(monkeypatch):
    """A bucket that can be packed runs packed (eager) even with fast_path="compiled", unless the native list
    kernels take all of its tensors (Schedule-Free on a CPU): then it is not packed."""
    from prodigy_dist import native
    monkeypatch.setattr(packing, "ENABLED", True)
    params = _params(torch.float32)
    opt = ProdigyPlusScheduleFree(params, fast_path="compiled", use_schedulefree=False)
    for p in params:
        p.grad = torch.ones_like(p)
    (b,) = _packed_buckets(opt)
    assert compiled.variant(b) is not None  # it would be compiled if it were not packed
    assert not compiled.choose(b, "compiled", lambda: 1 << 30, True)
    if native.available():
        opt = ProdigyPlusScheduleFree(params, fast_path="compiled")
        assert _packed_buckets(opt) == []
        items = [(0, p) for p in params]
        assert {b.impl for b in opt._buckets(items, [step_scalars(g) for g in opt.param_groups])} == {compiled}


def _sharded_layouts(world):
    """Layouts of the pieces of a few tensors over ``world`` ranks (Shard(0), uneven and empty pieces)."""
    out = []
    for shape in [(7, 3), (11,), (40,), (5, 5), (2,)]:
        for start, rows in chunk_ranges(shape[0], world):
            out.append(ParamLayout(global_shape=shape, row_offset=start, local_rows=rows, group=object()))
    return out


def test_pack_positions_sums_and_noise_match_each_tensor():
    layouts = _sharded_layouts(3)
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn((lay.local_rows, *lay.global_shape[1:]), generator=gen) for lay in layouts]
    assert any(t.numel() == 0 for t in tensors)
    pack = packing.Pack(tensors, layouts)
    flat = pack.gather(tensors)
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in tensors]))
    # samples at the same local flat indices as kernels.sample, segment sums (0 for empty pieces)
    want = [sample(t, lay) for t, lay in zip(tensors, layouts)]
    assert torch.equal(flat[pack.sample_index], torch.cat(want))
    assert pack.samples.sizes == [w.numel() for w in want]
    sums = pack.elements.sums(flat)
    torch.testing.assert_close(sums, torch.stack([t.sum() for t in tensors]), rtol=1e-6, atol=1e-6)
    # accumulated in fp64, then rounded once: the fp32 rounding of the (almost) exact sum
    assert torch.equal(sums, torch.stack([t.double().sum() for t in tensors]).float())
    assert all(float(s) == 0.0 for s, t in zip(sums, tensors) if t.numel() == 0)
    expanded = pack.elements.expand(torch.arange(len(tensors), dtype=torch.float32))
    assert torch.equal(expanded, torch.cat([torch.full((t.numel(),), float(i)) for i, t in enumerate(tensors)]))
    # stochastic rounding: each tensor gets exactly the noise write_back_ gives it on its own
    for stream in (0, 1):
        got = [torch.empty_like(t, dtype=torch.bfloat16) for t in tensors]
        keys = [10 + i for i in range(len(tensors))]
        pack.scatter_(got, pack.rounded(flat * 1.001, torch.bfloat16, True, seed=3, step=7, stream=stream,
                                        keys=keys))
        for t, g, lay, key in zip(tensors, got, layouts, keys):
            ref = torch.empty_like(g)
            write_back_(ref, t * 1.001, True, flat_offset=lay.flat_offset, key=key, seed=3, step=7, stream=stream)
            assert torch.equal(g, ref)
    # scatter puts every segment back in place, with its shape
    back = [torch.zeros_like(t) for t in tensors]
    pack.scatter_(back, flat)
    assert all(torch.equal(a, t) for a, t in zip(back, tensors))


def test_segments_reject_bad_input():
    with pytest.raises(ValueError, match="segment sizes"):
        packing.Segments([3, -1], torch.device("cpu"))
    seg = packing.Segments([2, 0, 3], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"expected \(5,\)"):
        seg.sums(torch.ones(4))
    assert seg.sums(torch.arange(5.0)).tolist() == [1.0, 0.0, 9.0]


def test_state_is_kept_flat_and_a_loaded_checkpoint_resumes_exactly(monkeypatch):
    """The packed state roles are views of one flat tensor each; a state dict saved with torch.save and loaded into
    a new optimizer (whose entries are then adopted again) continues bitwise like the uninterrupted run."""
    import io

    params, opt = _run(monkeypatch, True, torch.bfloat16, {}, steps=4)
    packed = [p for p in params if p.dim() == 1 or p.shape == SHAPED]
    for key in ("z", "exp_avg_sq", "p0", "s"):
        bases = {id(opt.state[p][key]._base) for p in packed}
        assert len(bases) == 1 and opt.state[packed[0]][key]._base is not None, key
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = ProdigyPlusScheduleFree(clones, d0=1e-3, fast_path="eager")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p, c in zip(params, clones):
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            c.grad = p.grad.clone()
        opt.step()
        resumed.step()
    assert resumed.param_groups[0]["d"] == opt.param_groups[0]["d"]
    for p, c in zip(params, clones):
        assert torch.equal(p.detach(), c.detach())
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(value, resumed.state[c][key]), key
    assert resumed.state[clones[0]]["z"]._base is resumed.state[clones[1]]["z"]._base  # adopted again


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_sr"])
def test_first_step_is_bitwise_equal(monkeypatch, dtype):
    """One step (d is still d0): weights and state equal bitwise (every elementwise rounding, the StableAdamW sums
    and the stochastic rounding noise match the per-tensor path)."""
    pa, oa = _run(monkeypatch, True, dtype, {}, steps=1)
    pb, ob = _run(monkeypatch, False, dtype, {}, steps=1)
    for a, b in zip(pa, pb):
        assert torch.equal(a.detach(), b.detach())
        for key, value in oa.state[a].items():
            if torch.is_tensor(value):
                assert torch.equal(value, ob.state[b][key]), key
    assert any(bool((oa.state[p]["s"] != 0).any()) for p in pa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_sr"])
def test_phase_a_matches_per_tensor_statistics(monkeypatch, dtype):
    """Phase A on the same state, packed and per tensor: the new Prodigy s bitwise (for bf16, torch rounds the
    per-tensor add_ of strided samples with alpha in two steps, which the packed path reproduces on contiguous
    samples), the dot and sum|s| columns to float summation order, the total of g^2."""
    from prodigy_dist import kernels

    params, opt = _run(monkeypatch, True, dtype, {}, steps=3)  # s is not zero any more
    scalars = [step_scalars(g) for g in opt.param_groups]
    items = [(0, p) for p in params]
    out = {}
    for enabled in (True, False):
        monkeypatch.setattr(packing, "ENABLED", enabled)
        buckets = [b for b in opt._buckets(items, scalars) if b.kind == "full"]
        assert len(buckets) == 1 and (buckets[0].pack is not None) == enabled
        b = buckets[0]
        kernels.statistics(b)
        out[enabled] = (torch.cat([s.reshape(-1) for s in b.s_new]), b.stats)
    (s_packed, rows_packed), (s_single, rows_single) = out[True], out[False]
    assert torch.equal(s_packed, s_single)
    if dtype == torch.bfloat16:  # (else rounding delta to bf16 would change nothing and prove nothing)
        delta = scalars[0]["delta"]
        assert torch.tensor(delta, dtype=dtype).item() != delta
    torch.testing.assert_close(rows_packed[:, :2], rows_single[:, :2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rows_packed[:, 3].sum(), rows_single[:, 3].sum(), rtol=1e-6, atol=0)
