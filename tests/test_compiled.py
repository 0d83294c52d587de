"""The compiled fast path (prodigy_dist.compiled) equals the eager path, compiles once, and is chosen as documented.

Compiled kernels are cached per process (prodigy_dist.compiled._kernels), so the variants below pay their compile
time once for the whole file; the tensor shapes are chosen so that every test reuses the same graphs (all 2-D
tensors have >= 64 rows and > 4096 elements: inductor specialises its reductions on those size ranges).
"""

from __future__ import annotations

import logging

import pytest
import torch

from prodigy_dist import ProdigyPlusScheduleFree, compiled, packing

from .helpers import DEVICES
from .test_reduction import CountingReducer

# (rows, cols): factored along dim 0 and along dim 1, a row count that is not a multiple of the block; a 1-D tensor
# (full second moment).
SHAPES = [(96, 64), (64, 200), (70, 64), (4200,)]
# another model: other shapes in the same size ranges, and as many tensors of each kind (a GPU's list calls)
OTHER_SHAPES = [(128, 80), (72, 300), (66, 64), (5000,)]

VARIANTS = {
    "default": {},
    "eps=None": dict(eps=None),
    "weight_decay": dict(weight_decay=0.1),
    "weight_decay_raw": dict(weight_decay=0.01, weight_decay_by_lr=False),
    "prodigy_mode": dict(use_schedulefree=False, weight_decay=0.1),
    "unfactored": dict(factored=False),
    "round_to_nearest": dict(stochastic_rounding=False),  # (bf16 storage; fp32 as default)
}


@pytest.fixture(autouse=True)
def no_packing(monkeypatch):
    """These tests hold the compiled kernels to the eager ones: small tensors stay out of packs (which run the flat
    eager kernels unless the native list kernels take the bucket; tests/test_packing.py holds them to the per-tensor
    path), so that the compiled runs take every path of a bucket: one by one, and the native lists."""
    monkeypatch.setattr(packing, "ENABLED", False)


def make_params(dtype: torch.dtype, seed: int = 0, device="cpu") -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(device, dtype)) for s in SHAPES]


def set_grads(params, step: int) -> None:
    """Gradients of a quadratic pulling every weight towards 1, plus noise (so that d grows)."""
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        noise = torch.randn(p.shape, generator=gen).to(p.device)
        p.grad = ((p.detach().float() - 1.0) * 0.1 + noise * 0.01).to(p.dtype)


def run(fast_path: str, options: dict, dtype: torch.dtype, steps: int = 4, reducer=None, device="cpu"):
    params = make_params(dtype, device=device)
    # d0 large enough that d grows within a few steps (so the test covers changing d)
    opt = ProdigyPlusScheduleFree(params, fast_path=fast_path, d0=1e-3, **options)
    if reducer is not None:
        opt._reducer = reducer
    for step in range(steps):
        set_grads(params, step)
        opt.step()
    return params, opt


def assert_close(pa, oa, pb, ob, dtype, carried_flips: bool = False):
    """fp32: equal to a few ulps; bf16: the rounded values equal except a few elements one bf16 ulp apart, or with
    ``carried_flips`` one bf16 ulp of the tensor's largest value (an element that flipped while it was large keeps
    that difference as its value shrinks: over several steps of a large tensor)."""
    assert [g["d"] for g in oa.param_groups] == pytest.approx([g["d"] for g in ob.param_groups], rel=1e-6)
    pairs = [(a, b) for a, b in zip(pa, pb)]
    for a, b in zip(pa, pb):
        for key, value in oa.state[a].items():
            if torch.is_tensor(value):
                pairs.append((value, ob.state[b][key]))
    for a, b in pairs:
        low_precision = a.dtype == torch.bfloat16
        a, b = a.detach().float(), b.detach().float()
        scale = b.abs().max().clamp_min(1e-30)
        if not low_precision:  # fp32 (also the fp32 factored statistics of bf16 parameters)
            assert ((a - b).abs().max() / scale).item() < (2e-6 if dtype == torch.float32 else 1e-5)
        else:
            differ = (a != b).float().mean().item()
            assert differ < 2e-3, differ
            # one bf16 ulp of the larger value, or a few fp32 ulps of the tensor's scale where an update cancels
            # the old value to nearly zero (the fp32 intermediates differ in their last bits)
            slack = scale * (2 ** -8 if carried_flips else 2 ** -20)
            assert ((a - b).abs() <= torch.maximum(a.abs(), b.abs()) * 2 ** -7 + slack).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_equals_eager(variant, dtype, device):
    options = VARIANTS[variant]
    pe, oe = run("eager", options, dtype, device=device)
    pc, oc = run("compiled", options, dtype, device=device)
    assert oe.param_groups[0]["d"] > 1e-3  # d moved: the steps used several values of d
    assert_close(pc, oc, pe, oe, dtype)
    assert set(_impls(oc, pc)) == {compiled}


@pytest.mark.parametrize("variant", ["default", "prodigy_mode"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_under_lockstep_reducer_equals_eager(variant, device):
    """Under a reducer (the sharded code path on one process): same collectives, same sizes, same results."""
    options = VARIANTS[variant]
    re, rc = CountingReducer(), CountingReducer()
    pe, oe = run("eager", options, torch.float32, reducer=re, device=device)
    pc, oc = run("compiled", options, torch.float32, reducer=rc, device=device)
    assert rc.flushes == re.flushes and rc.collectives == re.collectives > 0
    assert_close(pc, oc, pe, oe, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_formulation_equals_eager_on_a_cpu(monkeypatch, dtype):
    """What a GPU runs (list calls over several tensors, the noise gathered in the update kernel, bf16 roundings on
    the bits), run on the CPU: equal to the eager path, and reused by a model of other shapes."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiled, "_on_gpu", lambda b: True)
    monkeypatch.setattr(compiled, "_bit_rounding", lambda x: True)
    pe, oe = run("eager", {}, dtype)
    graphs = counters["stats"]["unique_graphs"]
    pc, oc = run("compiled", {}, dtype)
    assert_close(pc, oc, pe, oe, dtype)
    assert counters["stats"]["unique_graphs"] > graphs  # the list kernels were compiled, not found in the cache
    names = [k.name for k in compiled._kernels.values()]
    assert any(n.startswith("prodigy_update_list") and n.endswith("_3") for n in names)  # the 3 matrices: one call
    graphs = counters["stats"]["unique_graphs"]
    others = [torch.nn.Parameter((torch.randn(s) * 0.1).to(dtype)) for s in OTHER_SHAPES]
    opt = ProdigyPlusScheduleFree(others, fast_path="compiled", d0=1e-3)
    for p in others:
        p.grad = torch.randn_like(p) * 0.01
    opt.step()
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("options", [{}, dict(stochastic_rounding=False), dict(eps=None), dict(weight_decay=0.1),
                                     dict(factored=False), dict(factored=False, eps=None)],
                         ids=["default", "round_to_nearest", "eps=None", "weight_decay", "unfactored",
                              "unfactored_atan2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_update_equals_the_compiled_update(monkeypatch, dtype, options):
    """The native update pass of Schedule-Free tensors (CPU) against the compiled pass it replaces: fp32 to a few
    ulps (eps=None: our arctangent, within 2 ulp of torch's), bf16 with the same rounding bits."""
    from prodigy_dist import native
    if not native.available():
        pytest.skip("the native CPU kernels could not be built here")
    calls = {"update_sf_factored_many": 0, "update_sf_factored": 0, "update_sf_full": 0, "update_sf_full_list": 0}
    for name in calls:
        monkeypatch.setattr(native, name, lambda *a, _f=getattr(native, name), _n=name, **k:
                            calls.__setitem__(_n, calls[_n] + 1) or _f(*a, **k))
    pa, oa = run("compiled", options, dtype, steps=6)
    # every step: the 3 matrices in one call, and the small unfactored tensors (the 1-D one; unfactored, all 4) in
    # one list call
    assert calls == ({"update_sf_factored_many": 0, "update_sf_factored": 0, "update_sf_full": 0,
                      "update_sf_full_list": 6} if options.get("factored") is False
                     else {"update_sf_factored_many": 6, "update_sf_factored": 0, "update_sf_full": 0,
                           "update_sf_full_list": 6})
    for name in calls:
        monkeypatch.setattr(native, name, lambda *a, **k: False)
    monkeypatch.setattr(compiled, "LIST_MAX", 0)  # no list kernels: every tensor through the compiled update
    pb, ob = run("compiled", options, dtype, steps=6)
    for a, b in zip(pa, pb):
        for x, y in ((a, b), (oa.state[a]["z"], ob.state[b]["z"])):
            assert x.dtype == dtype
            if dtype == torch.bfloat16:  # (a one-ulp fp32 difference may flip a rounding, rarely)
                assert (x != y).float().mean().item() < 1e-3
                assert ((x.float() - y.float()).abs() <= y.float().abs() * 2 ** -7).all()
            else:
                assert ((x - y).abs().max() / y.abs().max()).item() < 1e-6
    assert oa.param_groups[0]["d"] == pytest.approx(ob.param_groups[0]["d"], rel=1e-6)


@pytest.mark.parametrize("options", [{}, dict(weight_decay=0.1), dict(eps=None), dict(use_stableadamw=False),
                                     dict(stochastic_rounding=False)],
                         ids=["default", "weight_decay", "eps=None", "no_stableadamw", "round_to_nearest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_prodigy_mode_update_equals_the_compiled_update(monkeypatch, dtype, options):
    """Prodigy mode (no Schedule-Free) on a CPU: the matrices' update in one native call (with StableAdamW, each
    one's RMS pass, which writes the first moment, right before its update) against the compiled update pass: fp32 to
    a few ulps, bf16 with the same rounding bits but where a one-ulp fp32 difference flips one (rarely)."""
    from prodigy_dist import native
    if not native.available():
        pytest.skip("the native CPU kernels could not be built here")
    options = dict(options, use_schedulefree=False)
    calls = []
    update = native.update_prodigy_factored_many
    monkeypatch.setattr(native, "update_prodigy_factored_many", lambda gs, *a, **k: calls.append(
        (len(gs), a[6] is not None)) or update(gs, *a, **k))
    pa, oa = run("compiled", options, dtype, steps=6)
    stable = options.get("eps", 1e-8) is not None and options.get("use_stableadamw", True)
    assert calls == [(3, stable)] * 6  # every step: the 3 matrices in one call (their RMS passes in it)
    monkeypatch.setattr(native, "update_prodigy_factored_many", lambda *a, **k: False)
    pb, ob = run("compiled", options, dtype, steps=6)
    for a, b in zip(pa, pb):
        for x, y in ((a, b), (oa.state[a]["exp_avg"], ob.state[b]["exp_avg"])):
            assert x.dtype == dtype
            if dtype == torch.bfloat16:
                assert (x != y).float().mean().item() < 1e-3
                assert ((x.float() - y.float()).abs() <= y.float().abs() * 2 ** -7).all()
            else:
                assert ((x - y).abs().max() / y.abs().max()).item() < 1e-6
    assert oa.param_groups[0]["d"] == pytest.approx(ob.param_groups[0]["d"], rel=1e-6)
    assert oa.param_groups[0]["d"] > 1e-3  # (d moved)
    pe, oe = run("eager", options, dtype, steps=6)
    assert_close(pa, oa, pe, oe, dtype)


@pytest.mark.parametrize("options", [{}, dict(eps=None), dict(weight_decay=0.1)], ids=["default", "eps=None",
                                                                                     "weight_decay"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unfactored_matrices_take_one_native_call_per_pass(monkeypatch, dtype, options):
    """factored=False on a CPU: the tensors too large for the list kernels take one native statistics call and one
    native update call per step (each one's RMS pass, which writes v, right before its update): bitwise the steps of
    the native calls per tensor, and (fp32) the eager path's. (In bf16 a 1-D tensor of 70000 differs from eager in 2
    elements by a little more than assert_close allows, with or without these calls: an fp32 ulp flips a rounding
    where an update cancels to nearly zero.)"""
    from prodigy_dist import native
    if not native.available():
        pytest.skip("the native CPU kernels could not be built here")
    options = dict(options, factored=False)
    calls = []
    for name in ("statistics_many", "update_sf_full_many"):
        monkeypatch.setattr(native, name, lambda gs, *a, _f=getattr(native, name), _n=name, **k: calls.append(
            (_n, [tuple(g.shape) for g in gs])) or _f(gs, *a, **k))

    def run_big(fast_path):
        gen = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype))
                  for s in [(300, 250), (4, 60, 300), (70_000,), (16,)]]
        opt = ProdigyPlusScheduleFree(params, fast_path=fast_path, d0=1e-3, **options)
        for step in range(4):
            set_grads(params, step)
            opt.step()
        return params, opt

    pc, oc = run_big("compiled")
    big = [(300, 250), (240, 300), (1, 70_000)]  # (2-D views: rows of the last dim)
    assert calls == [("statistics_many", [(300, 250)]), ("update_sf_full_many", big)] * 4
    assert oc.param_groups[0]["d"] > 1e-3  # (d moved)
    monkeypatch.setattr(native, "statistics_many", lambda *a, **k: None)
    monkeypatch.setattr(native, "update_sf_full_many", lambda *a, **k: False)
    pd, od = run_big("compiled")  # (the native passes tensor by tensor)
    assert oc.param_groups[0]["d"] == od.param_groups[0]["d"]
    for a, b in zip(pc, pd):
        assert torch.equal(a, b)
        for key, value in oc.state[a].items():
            if torch.is_tensor(value):
                assert torch.equal(value, od.state[b][key]), key
    if dtype == torch.float32:
        pe, oe = run_big("eager")
        assert_close(pc, oc, pe, oe, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stableadamw_divisors_come_from_the_statistics_pass_unless_eps_matters(monkeypatch, dtype):
    """On one process on a CPU, the matrices' StableAdamW divisors come from the accumulators of their statistics pass
    (native.factors) instead of an RMS pass over g; where eps is not small against the gradients (eps=1e-3 here) they
    come out NaN and the update takes the RMS pass. Either way the steps equal the eager path's."""
    from prodigy_dist import native
    if not native.available():
        pytest.skip("the native CPU kernels could not be built here")
    given = []
    update_many = native.update_sf_factored_many
    monkeypatch.setattr(native, "update_sf_factored_many",
                        lambda *a, **k: given.append(a[6].clone() if a[6] is not None else None) or update_many(*a, **k))
    for options, taken in (({}, True), (dict(eps=1e-3), False)):
        given.clear()
        pc, oc = run("compiled", options, dtype)
        assert len(given) == 4 and all(s is not None and s.shape == (3,) for s in given)  # the 3 matrices, each step
        assert all(bool(s.isfinite().all()) == taken and bool(s.isnan().all()) != taken for s in given), given
        assert all(bool((s > 1).all()) for s in given[:1] if taken)  # (RMS above 1 at the first step)
        pe, oe = run("eager", options, dtype)
        assert_close(pc, oc, pe, oe, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_update_leaves_z_samples_for_the_next_statistics(monkeypatch, dtype):
    """On a CPU, the native update of factored tensors keeps z's new sampled values, and the next statistics pass
    reads them instead of walking z: bitwise the same steps as walking z; any other write to z voids them."""
    from prodigy_dist import native
    if not native.available():
        pytest.skip("the native CPU kernels could not be built here")
    recall = compiled._recalled_samples
    found = []

    def counting(z, start):
        values = recall(z, start)
        found.append(values is not None)
        return values

    monkeypatch.setattr(compiled, "_recalled_samples", counting)
    pa, oa = run("compiled", {}, dtype, steps=5)
    assert sum(found) == 3 * 4  # the 3 matrices, in every step after the first
    assert oa.state[pa[0]]["z"].dtype == dtype
    monkeypatch.setattr(compiled, "_recalled_samples", lambda z, start: None)
    pb, ob = run("compiled", {}, dtype, steps=5)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for key, value in oa.state[a].items():
            if torch.is_tensor(value):
                assert torch.equal(value, ob.state[b][key]), key
    z = oa.state[pa[0]]["z"]
    assert recall(z, 0) is not None and recall(z, 1) is None  # (another sample start)
    z.mul_(1.0)  # an in-place write (e.g. a checkpoint loaded into the state) voids them
    assert recall(z, 0) is None


def test_bf16_tensor_larger_than_the_noise_table_equals_eager():
    """Stochastic rounding of a tensor stepped in several chunks of the noise table (on a CPU: the native rounding
    of each chunk's fp32 results), and with the native kernels unavailable (the compiled kernel's own rounding).
    One step: over more steps, the few elements one bf16 ulp apart (allowed) feed later steps, and where a later
    update cancels to nearly zero they differ by more than one ulp of the small result."""
    from prodigy_dist import native
    from prodigy_dist.rounding import TABLE_SIZE

    def run_big(fast_path: str) -> tuple[torch.Tensor, ProdigyPlusScheduleFree]:
        gen = torch.Generator().manual_seed(5)
        p = torch.nn.Parameter((torch.randn(TABLE_SIZE // 1000 + 100, 1000, generator=gen) * 0.1).bfloat16())
        opt = ProdigyPlusScheduleFree([p], fast_path=fast_path, d0=1e-3)
        p.grad = (torch.randn(p.shape, generator=gen) * 0.01).bfloat16()
        opt.step()
        return p, opt

    pe, oe = run_big("eager")
    pc, oc = run_big("compiled")
    assert pc.numel() > TABLE_SIZE
    assert_close([pc], oc, [pe], oe, torch.bfloat16)
    original = native._module, native._failed
    try:
        native._module, native._failed = None, True  # as if the build had failed
        pk, ok = run_big("compiled")
    finally:
        native._module, native._failed = original
    assert_close([pk], ok, [pe], oe, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_no_recompilation_when_d_and_step_change(device):
    from torch._dynamo.utils import counters

    params = make_params(torch.float32, device=device)
    opt = ProdigyPlusScheduleFree(params, fast_path="compiled", d0=1e-3)
    set_grads(params, 0)
    opt.step()
    graphs = counters["stats"]["unique_graphs"]
    ds = set()
    for step in range(1, 5):
        set_grads(params, step)
        opt.param_groups[0]["d"] *= 1.5  # new d (and with it every coefficient) and a new step count each time
        ds.add(opt.param_groups[0]["d"])
        opt.step()
    assert len(ds) == 4 and opt.param_groups[0]["k"] == 6
    assert counters["stats"]["unique_graphs"] == graphs
    # a model with other shapes reuses the same graphs too
    others = [torch.nn.Parameter(torch.randn(s, device=device) * 0.1) for s in OTHER_SHAPES]
    opt2 = ProdigyPlusScheduleFree(others, fast_path="compiled", d0=1e-3)
    for p in others:
        p.grad = torch.randn_like(p) * 0.01
    opt2.step()
    assert counters["stats"]["unique_graphs"] == graphs


def test_fast_path_option_is_validated():
    with pytest.raises(ValueError, match="'fast'"):
        ProdigyPlusScheduleFree(make_params(torch.float32), fast_path="fast")


def _impls(opt, params):
    from prodigy_dist.scalars import step_scalars
    for p in params:
        p.grad = torch.zeros_like(p)
    return [b.impl for b in opt._buckets([(0, p) for p in params], [step_scalars(opt.param_groups[0])])]


def test_selection(monkeypatch):
    from prodigy_dist.scalars import step_scalars
    params = make_params(torch.float32)
    # unsupported options run the eager kernels whatever fast_path says
    assert set(_impls(ProdigyPlusScheduleFree(params, fast_path="compiled", use_cautious=True), params)) == {None}
    assert set(_impls(ProdigyPlusScheduleFree(params, fast_path="compiled"), params)) == {compiled}
    assert set(_impls(ProdigyPlusScheduleFree(params, fast_path="eager"), params)) == {None}
    # auto on a CPU: a small model stays eager (no compile time); a large one compiles its large tensors only
    assert set(_impls(ProdigyPlusScheduleFree(params), params)) == {None}
    monkeypatch.setattr(compiled, "AUTO_CPU_MIN_PARAMS", 0)
    big = [torch.nn.Parameter(torch.randn(300, 256)), torch.nn.Parameter(torch.randn(40))]
    impls = _impls(ProdigyPlusScheduleFree(big, use_schedulefree=False), big)
    assert sorted(map(str, impls)) == sorted(map(str, [compiled, None]))
    # ... except small unfactored Schedule-Free tensors on a CPU: the native list kernels take them (one call per
    # pass for all of them)
    from prodigy_dist import native
    if native.available():
        assert set(_impls(ProdigyPlusScheduleFree(big), big)) == {compiled}
    # a factored tensor of more than 2 dims (a conv weight) runs eagerly, in a bucket of its own: the 2-D ones
    # beside it stay compiled (one bucket held them all before, and the conv weight sent it to the eager kernels)
    mixed = [torch.nn.Parameter(torch.randn(36, 40, 3)), torch.nn.Parameter(torch.randn(70, 36)),
             torch.nn.Parameter(torch.randn(33, 70))]
    for p in mixed:
        p.grad = torch.zeros_like(p)
    opt = ProdigyPlusScheduleFree(mixed, fast_path="compiled")
    buckets = {tuple(b.params[0].shape): (b.impl, len(b.params))
               for b in opt._buckets([(0, p) for p in mixed], [step_scalars(opt.param_groups[0])])}
    assert buckets == {(36, 40, 3): (None, 1), (70, 36): (compiled, 2)}


# Options whose every pass runs in the native kernels on a CPU (compiled.native_only), and the storage dtype; Prodigy
# mode's unfactored tensors (the vectors below) are the exception: they need inductor's kernels.
NATIVE_ONLY = {
    "default": ({}, torch.float32),
    "bf16_sr": ({}, torch.bfloat16),
    "bf16_round_to_nearest": (dict(stochastic_rounding=False), torch.bfloat16),
    "eps=None": (dict(eps=None), torch.float32),
    "weight_decay": (dict(weight_decay=0.1), torch.float32),
    "weight_decay_raw": (dict(weight_decay=0.01, weight_decay_by_lr=False), torch.float32),
    "no_stableadamw": (dict(use_stableadamw=False), torch.float32),
    "speed": (dict(use_speed=True), torch.float32),
    "prodigy_steps": (dict(prodigy_steps=2), torch.float32),
    "unfactored": (dict(factored=False), torch.float32),
    "unfactored_bf16": (dict(factored=False), torch.bfloat16),
    "prodigy_mode": (dict(use_schedulefree=False, weight_decay=0.1), torch.float32),
    "prodigy_mode_bf16": (dict(use_schedulefree=False), torch.bfloat16),
}


def _native_model(dtype, seed=0):
    """Large and small matrices (a bucket of their own and small buckets), a 3-row one, norm-like vectors."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(300, 256), (96, 64), (64, 200), (3, 70), (4200,), (64,)]
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]


@pytest.mark.parametrize("variant", list(NATIVE_ONLY))
def test_auto_on_a_cpu_takes_native_only_buckets_without_compiling(monkeypatch, variant):
    """fast_path="auto" on a CPU: a model of AUTO_CPU_NATIVE_MIN_PARAMS parameters or more (set to 0 here) steps
    every bucket that native_only() accepts in the native kernels, small tensors and packable buckets included,
    with nothing compiled (no kernel call, no torch.compile probe), and equals the eager path."""
    from prodigy_dist import native
    if not native.available():
        pytest.skip("the native CPU kernels could not be built here")
    options, dtype = NATIVE_ONLY[variant]
    monkeypatch.setattr(compiled, "AUTO_CPU_NATIVE_MIN_PARAMS", 0)
    monkeypatch.setattr(packing, "ENABLED", True)  # (the small vectors would be packed in the eager path)
    prodigy_mode = not options.get("use_schedulefree", True)

    def probed(device):
        raise AssertionError("torch.compile was probed")

    def kernel_called(self, *args):
        raise AssertionError(f"the compiled kernel {self.name} ran")

    monkeypatch.setattr(compiled, "available", probed)
    monkeypatch.setattr(compiled._Kernel, "__call__", kernel_called)
    pa = _native_model(dtype)
    oa = ProdigyPlusScheduleFree(pa, d0=1e-3, **options)
    for step in range(4):
        set_grads(pa, step)
        oa.step()
    for b in oa._plan[1]:
        expected = None if prodigy_mode and b.kind == "full" else compiled
        assert b.impl is expected, ([tuple(p.shape) for p in b.params], b.impl)
    monkeypatch.setattr(packing, "ENABLED", False)  # (the eager path per tensor, as the native one)
    pb = _native_model(dtype)
    ob = ProdigyPlusScheduleFree(pb, d0=1e-3, fast_path="eager", **options)
    for step in range(4):
        set_grads(pb, step)
        ob.step()
    if "prodigy_steps" not in options:
        assert ob.param_groups[0]["d"] > 1e-3
    # (bf16: in the large matrix one element of 76800 flips by one ulp and keeps that difference as its value
    # shrinks, 2-3 ulps of its final value; the same with fast_path="compiled")
    assert_close(pa, oa, pb, ob, dtype, carried_flips=True)


def test_a_reused_plan_steps_as_a_new_one_on_the_native_path(monkeypatch):
    """The native path keeps per bucket what follows from the layouts (Bucket.derived) and the s it stored last
    (Bucket.s_stored) while the optimizer reuses a plan. Against an optimizer that forms its buckets anew every step,
    the same bits through a reload of the state, an s replaced by hand with a view of a larger buffer (which must
    keep being written into, not replaced) and the end of the Prodigy statistics (prodigy_steps), after which no
    bucket keeps an old s."""
    from prodigy_dist import native
    if not native.available():
        pytest.skip("the native CPU kernels could not be built here")
    monkeypatch.setattr(compiled, "AUTO_CPU_NATIVE_MIN_PARAMS", 0)

    def probed(device):
        raise AssertionError("torch.compile was probed")

    def kernel_called(self, *args):
        raise AssertionError(f"the compiled kernel {self.name} ran")

    monkeypatch.setattr(compiled, "available", probed)  # (nothing compiled: the test stays fast)
    monkeypatch.setattr(compiled._Kernel, "__call__", kernel_called)

    def run(reuse: bool):
        params = _native_model(torch.float32)
        opt = ProdigyPlusScheduleFree(params, d0=1e-3, prodigy_steps=6)
        if not reuse:
            opt._plan_key = lambda items, scalars: None
        buffer = None
        for step in range(8):
            set_grads(params, step)
            if step == 3:
                opt.load_state_dict(opt.state_dict())
            if step == 4:
                st = opt.state[params[1]]
                buffer = torch.zeros(2 * st["s"].numel(), dtype=st["s"].dtype)
                buffer[:st["s"].numel()] = st["s"]
                st["s"] = buffer[:st["s"].numel()]
            opt.step()
            if step == 4:
                assert opt.state[params[1]]["s"]._base is buffer and buffer.abs().sum() > 0
            if reuse and step == 2:
                assert all(b.derived for b in opt._plan[1]) and any(b.s_stored for b in opt._plan[1])
        return params, opt

    pa, oa = run(True)
    pb, ob = run(False)
    assert oa._plan is not None and any(b.impl is compiled for b in oa._plan[1])
    assert all("s" not in oa.state[p] for p in pa) and all(not b.s_stored for b in oa._plan[1])
    assert oa.param_groups[0]["d"] == ob.param_groups[0]["d"] > 1e-3
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for key, value in oa.state[a].items():
            if torch.is_tensor(value):
                assert torch.equal(value, ob.state[b][key]), key


@pytest.mark.parametrize("variant", list(NATIVE_ONLY))
def test_the_native_step_is_the_same_on_any_number_of_threads(monkeypatch, variant):
    """On a CPU the native step's results do not depend on the number of threads: its reductions are cut into pieces
    fixed by the shapes and added in order (the statistics pass in shares of whole blocks, the RMS passes in pieces of
    16 rows or 4096 elements). Weights, state and d after four steps on 1, 2 and 3 threads: the same bits. The
    matrices span several shares and pieces; in Prodigy mode the vectors run eagerly, below torch's grain."""
    from prodigy_dist import native
    if not native.available():
        pytest.skip("the native CPU kernels could not be built here")
    options, dtype = NATIVE_ONLY[variant]
    monkeypatch.setattr(compiled, "AUTO_CPU_NATIVE_MIN_PARAMS", 0)
    gen = torch.Generator().manual_seed(3)
    shapes = [(700, 300), (64, 2000), (96, 64), (3, 70), (4200,), (64,)]
    values = [(torch.randn(s, generator=gen) * 0.1).to(dtype) for s in shapes]
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            params = [torch.nn.Parameter(v.clone()) for v in values]
            opt = ProdigyPlusScheduleFree(params, d0=1e-3, **options)
            for step in range(4):
                set_grads(params, step)
                opt.step()
            runs.append((params, opt))
    finally:
        torch.set_num_threads(threads)
    (pa, oa), rest = runs[0], runs[1:]
    assert oa._plan is not None and any(b.impl is compiled for b in oa._plan[1])
    if "prodigy_steps" not in options:
        assert oa.param_groups[0]["d"] > 1e-3

    def tensors(params, opt):
        out = [p.detach() for p in params]
        for p in params:
            out += [v for v in opt.state[p].values() if torch.is_tensor(v)]
        return out

    for pb, ob in rest:
        assert [g["d"] for g in ob.param_groups] == [g["d"] for g in oa.param_groups]
        for a, b in zip(tensors(pa, oa), tensors(pb, ob), strict=True):
            assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                               b.view(torch.int16) if b.dtype == torch.bfloat16 else b)


def test_auto_on_a_cpu_needs_the_native_threshold_and_native_only_buckets(monkeypatch):
    from prodigy_dist import native
    from prodigy_dist.scalars import step_scalars
    if not native.available():
        pytest.skip("the native CPU kernels could not be built here")
    # at AUTO_CPU_NATIVE_MIN_PARAMS parameters the native buckets take the fast path, one fewer and they stay eager
    at = [torch.nn.Parameter(torch.randn(1024, 1024))]
    below = [torch.nn.Parameter(torch.randn(1024, 1023)), torch.nn.Parameter(torch.randn(1023))]
    assert compiled.AUTO_CPU_NATIVE_MIN_PARAMS == 1024 * 1024
    assert set(_impls(ProdigyPlusScheduleFree(at), at)) == {compiled}
    assert set(_impls(ProdigyPlusScheduleFree(below), below)) == {None}
    # what needs inductor's kernels waits for AUTO_CPU_MIN_PARAMS: Prodigy mode's unfactored tensors, a 1-D tensor
    # too large for the list kernels, stochastic rounding of rows longer than the noise table
    big = [torch.nn.Parameter(torch.randn(1024, 1024)), torch.nn.Parameter(torch.randn(40))]
    impls = _impls(ProdigyPlusScheduleFree(big, use_schedulefree=False, factored=False), big)
    assert set(impls) == {None}
    wide = [torch.nn.Parameter(torch.randn(1024, 1024)), torch.nn.Parameter(torch.randn(70000))]
    opt = ProdigyPlusScheduleFree(wide, factored=False)
    for p in wide:
        p.grad = torch.zeros_like(p)
    impls = {tuple(b.params[0].shape): b.impl for b in opt._buckets([(0, p) for p in wide],
                                                                     [step_scalars(opt.param_groups[0])])}
    assert impls == {(1024, 1024): compiled, (70000,): None}
    long_rows = [torch.nn.Parameter(torch.randn(2, compiled.TABLE_SIZE + 1, dtype=torch.bfloat16))]
    assert set(_impls(ProdigyPlusScheduleFree(long_rows), long_rows)) == {None}
    assert set(_impls(ProdigyPlusScheduleFree(long_rows, stochastic_rounding=False), long_rows)) == {compiled}
    # under a reducer nothing changes (the buckets may need their collectives' kernels)
    opt = ProdigyPlusScheduleFree(at)
    opt._reducer = CountingReducer()
    assert set(_impls(opt, at)) == {None}


def test_compile_failure_is_logged_once_and_runs_eagerly(caplog):
    def breaks_the_graph(x):
        torch._dynamo.graph_break()  # fullgraph compilation fails
        return x * 3.0

    kernel = compiled._Kernel("prodigy_test_failure", breaks_the_graph)
    x = torch.arange(3.0)
    with caplog.at_level(logging.WARNING, logger="prodigy_dist.compiled"):
        assert torch.equal(kernel(x), x * 3.0)
        assert torch.equal(kernel(x), x * 3.0)
    warnings = [r for r in caplog.records if "prodigy_test_failure" in r.getMessage()]
    assert len(warnings) == 1 and kernel.failed


def test_a_non_contiguous_tensor_keeps_its_bucket_eager_and_says_so_once(caplog):
    params = make_params(torch.float32)
    params[1] = torch.nn.Parameter(torch.randn(200, 64).t())  # (64, 200), not contiguous
    compiled._obstacles_logged.clear()
    with caplog.at_level(logging.INFO, logger="prodigy_dist.compiled"):
        opt = ProdigyPlusScheduleFree(params, fast_path="compiled")
        assert None in _impls(opt, params)
        _impls(opt, params)
    said = [r for r in caplog.records if "non-contiguous" in r.getMessage()]
    assert len(said) == 1 and "(64, 200)" in said[0].getMessage()


@pytest.mark.parametrize("reduced", [False, True], ids=["one_process", "under_reducer"])
@pytest.mark.parametrize("options", [{}, dict(eps=None), dict(use_speed=True)], ids=["default", "eps=None", "speed"])
def test_small_and_large_unfactored_tensors_in_one_bucket_equal_eager(monkeypatch, options, reduced):
    """factored=False with a tensor of LIST_MAX elements or more beside small ones: the small ones take the native
    list kernels and the large one its own passes, in one bucket (the sums of g^2, the Prodigy statistics and the
    StableAdamW sums put back in tensor order); equal to the eager path, alone and under a lock-step reducer."""
    from prodigy_dist import native
    if not native.available():
        pytest.skip("the native CPU kernels could not be built here")
    monkeypatch.setattr(compiled, "LIST_MAX", 5000)
    shapes = [(300,), (96, 64), (40,), (4999,), (5000,)]
    calls = {"statistics_list": 0, "update_sf_full_list": 0}
    for name in calls:
        monkeypatch.setattr(native, name, lambda *a, _f=getattr(native, name), _n=name, **k:
                            calls.__setitem__(_n, calls[_n] + 1) or _f(*a, **k))
    results = {}
    for fast_path in ("eager", "compiled"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
        opt = ProdigyPlusScheduleFree(params, fast_path=fast_path, d0=1e-3, factored=False, **options)
        if reduced:
            opt._reducer = CountingReducer()
        for step in range(5):
            set_grads(params, step)
            opt.step()
        results[fast_path] = (params, opt)
    assert calls == {"statistics_list": 5, "update_sf_full_list": 5}  # compiled only: one call per step
    assert_close(*results["compiled"], *results["eager"], torch.float32)
    assert results["eager"][1].param_groups[0]["d"] > 1e-3
