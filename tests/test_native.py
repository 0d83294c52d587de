"""The native CPU kernels (prodigy_dist.native) against torch, and their use by the compiled path."""

import math

import pytest
import torch

from prodigy_dist import native


def _built() -> bool:
    return native.available()


pytestmark = pytest.mark.skipif(not _built(), reason="no C++ toolchain: the native kernel could not be built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 40), (1, 7), (33, 70), (257, 1000), (3000, 33)])
def test_row_and_column_sums_of_squares(shape, dtype):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    rows, cols, none, none_too = native.statistics(g)
    assert none is None and none_too is None
    sq = g.double().square()
    assert rows.dtype == cols.dtype == torch.float32 and rows.shape == (shape[0], 1) and cols.shape == (1, shape[1])
    torch.testing.assert_close(rows.double(), sq.sum(1, keepdim=True), rtol=1e-5, atol=0)
    torch.testing.assert_close(cols.double(), sq.sum(0, keepdim=True), rtol=1e-5, atol=0)


@pytest.mark.parametrize("speed", [False, True], ids=["s", "speed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 3, 10])
@pytest.mark.parametrize("shape", [(0, 40), (1, 7), (33, 70), (5, 11), (257, 1000), (2000, 96)])
def test_prodigy_statistics_in_the_same_pass_match_the_compiled_sample_kernel(shape, start, dtype, speed):
    """Same sums (to fp32 summation order) and bit-identical s as prodigy_dist.compiled._sample_pass, whose
    roundings test_compiled holds to the eager path."""
    from prodigy_dist import compiled

    gen = torch.Generator().manual_seed(1)
    g = (torch.randn(shape, generator=gen) * 1e-2).to(dtype)
    x = torch.randn(shape, generator=gen).to(dtype)
    xs = x.reshape(-1)[start::11]
    p0 = (xs.float() + torch.randn(xs.shape, generator=gen) * 1e-2).bfloat16()
    s = None if speed else (torch.randn(xs.shape, generator=gen) * 1e-3).bfloat16()
    beta3, delta = 0.99, 3.7e-4
    rows, cols, sums, s_new = native.statistics(g, (start, x, p0, s, beta3, delta))
    sq = g.double().square()
    torch.testing.assert_close(rows.double(), sq.sum(1, keepdim=True), rtol=1e-5, atol=0)
    torch.testing.assert_close(cols.double(), sq.sum(0, keepdim=True), rtol=1e-5, atol=0)

    sv = torch.tensor([beta3, delta])
    dot, a1, a2, s_ref = compiled._sample_pass(g.reshape(-1)[start::11], xs, p0, s, sv, speed)
    assert sums.dtype == torch.float32 and sums.shape == (3,)
    # the dot cancels: both are held to the exact dot of the same rounded differences, relative to sum |terms|
    e = p0.float() - xs.float()
    e = e.bfloat16().float() if dtype == torch.bfloat16 else e
    terms = g.reshape(-1)[start::11].double() * e.double()
    scale = terms.abs().sum().item() + 1e-30
    exact = terms.sum().item()
    assert abs(sums[0].item() - exact) <= 1e-6 * scale
    if dtype == torch.bfloat16:  # rounded to bf16 by the caller, like the compiled kernel's
        assert abs(sums[0].bfloat16().float() - dot) <= abs(dot) * 2 ** -7 + 1e-6 * scale
    else:
        assert abs(sums[0].item() - dot.item()) <= 2e-6 * scale
    torch.testing.assert_close(sums[1], a1.float(), rtol=1e-5, atol=1e-30)
    if speed:
        torch.testing.assert_close(sums[2], a2.float(), rtol=1e-5, atol=1e-30)
        assert s_new is None
    else:
        assert sums[2] == 0 and s_new.dtype == torch.bfloat16 and torch.equal(s_new, s_ref)


def test_prodigy_statistics_refuse_what_they_do_not_handle():
    g = torch.randn(8, 8)
    p0 = torch.zeros(6, dtype=torch.bfloat16)
    assert native.statistics(g, (0, torch.randn(8, 8).double(), p0, None, 0.9, 1.0)) is None  # x's dtype
    assert native.statistics(g, (0, torch.randn(8, 8).t(), p0, None, 0.9, 1.0)) is None  # x not contiguous
    assert native.statistics(g, (0, torch.randn(8, 8), p0.float(), None, 0.9, 1.0)) is None  # p0 not bf16
    with pytest.raises(RuntimeError, match="one value per sample"):
        native.statistics(g, (0, torch.randn(8, 8), p0[:5], None, 0.9, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_s_bits_with_non_finite_values_match_the_compiled_sample_kernel(dtype):
    """NaN, +-Inf and huge values in g and s: the same bf16 values of the new s as the compiled kernel, on the
    vectorised (sixteen samples at a time) and the scalar part of the walk."""
    from prodigy_dist import compiled

    gen = torch.Generator().manual_seed(2)
    g = (torch.randn(300, 64, generator=gen) * 1e-2)
    flat = g.view(-1)
    flat[0:11 * 40:11 * 3] = float("nan")
    flat[11 * 7::11 * 53] = float("inf")
    flat[11 * 9::11 * 61] = -3e38
    g = g.to(dtype)
    x = torch.randn(300, 64, generator=gen).to(dtype)
    xs = x.reshape(-1)[0::11]
    p0 = xs.float().bfloat16()
    s = (torch.randn(xs.shape, generator=gen) * 1e-3).bfloat16()
    s[5::37] = float("inf")
    s[6::41] = float("nan")
    _, _, _, s_new = native.statistics(g, (0, x, p0, s, 0.99, 3.7e-4))
    _, _, _, s_ref = compiled._sample_pass(g.reshape(-1)[0::11], xs, p0, s, torch.tensor([0.99, 3.7e-4]), False)
    assert s_new.isnan().any() and s_new.isinf().any()
    nan = s_new.isnan()  # (NaN payloads and signs may differ: a NaN s means the step is refused anyway)
    assert torch.equal(nan, s_ref.isnan())
    assert torch.equal(s_new[~nan].view(torch.int16), s_ref[~nan].view(torch.int16))

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 40), (1, 7), (33, 70), (257, 1000), (3000, 33)])
def test_rms_factored_is_the_sum_of_the_squared_update(shape, dtype):
    gen = torch.Generator().manual_seed(2)
    g = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
    a, c = torch.rand(shape[0], generator=gen) + 0.1, torch.rand(shape[1], generator=gen) + 0.1
    d, eps_term = 3e-4, 3e-4 * 1e-8
    got = native.rms_factored(g, a, c, d, eps_term)
    u = (g.double() * d) / (a.double()[:, None] * c.double()[None, :] + eps_term)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), u.square().sum(), rtol=1e-5, atol=0)
    # the compiled pass it replaces gives the same value
    from prodigy_dist import compiled

    V = compiled.Variant(full=False, schedulefree=True, atan2=False, stable=True, decay="none", storage="fp32",
                         moment_dtype=torch.float32)
    s = torch.zeros(13)
    s[compiled._D], s[compiled._EPS_TERM] = d, eps_term
    torch.testing.assert_close(got, compiled._rms_pass(g, a, c, None, None, s, V), rtol=1e-5, atol=0)
    # with the global element count: StableAdamW's divisor, the bits of the reduced path's (the sums of all
    # tensors of a bucket divided at once)
    numel = 3 * max(g.numel(), 1)
    for big_d in (d, 1e4):  # an RMS below 1 (divisor 1) and above
        total = native.rms_factored(g, a, c, big_d, eps_term)
        divisor = native.rms_factored(g, a, c, big_d, eps_term, numel=numel)
        sums = total.view(1).expand(3).contiguous()
        assert torch.equal(divisor, compiled._stable_scales(sums, torch.full((3,), float(numel)))[0])
        assert divisor.item() == pytest.approx(max((total.item() / numel) ** 0.5, 1.0) ** 0.5, rel=1e-6)
    assert g.numel() == 0 or divisor.item() > 1.5


def test_not_applicable_returns_none():
    assert native.statistics(torch.ones(3, 4, 5)) is None
    assert native.statistics(torch.ones(4, 6).t()) is None  # not contiguous
    assert native.statistics(torch.ones(4, 6, dtype=torch.float64)) is None
    assert native.rms_factored(torch.ones(4, 6).t(), torch.ones(6), torch.ones(4), 1.0, 0.0) is None
    assert native.rms_factored(torch.ones(4, 6), torch.ones(4).double(), torch.ones(6), 1.0, 0.0) is None


def test_compiled_path_uses_it(monkeypatch):
    from prodigy_dist import ProdigyPlusScheduleFree

    calls, update_calls = [], []
    original, original_update = native.statistics_many, native.update_sf_factored_many
    monkeypatch.setattr(native, "statistics_many", lambda gs, *a: calls.append(
        ([tuple(g.shape) for g in gs], a[0] is not None, a[1] is not None)) or original(gs, *a))
    monkeypatch.setattr(native, "update_sf_factored_many", lambda gs, *a, **k: update_calls.append(
        ([tuple(g.shape) for g in gs], a[6] is not None)) or original_update(gs, *a, **k))
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 200)
    opt = ProdigyPlusScheduleFree(model.parameters(), fast_path="compiled")
    model(torch.randn(8, 300)).square().mean().backward()
    opt.step()
    assert calls == [([(200, 300)], True, True)]  # with the Prodigy statistics and StableAdamW's accumulators
    assert update_calls == [([(200, 300)], True)]  # the divisor given (or its RMS pass right before its update)


def test_stochastic_rounding_has_the_bits_of_the_rounding_module():
    """(bits + noise) truncated: the same bf16 as rounding.copy_stochastic_'s integer formulation, for random bit
    patterns of every exponent, subnormals, zeros, the largest finite values and infinities."""
    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(-2 ** 31, 2 ** 31, (1 << 16,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 1.0, -1.5, 2.0 ** -126, 2.0 ** -149, -2.0 ** -140, 3.4028234663852886e38,
                            -3.4028234663852886e38, float("inf"), float("-inf"), 0.99999994, 2.0 ** 100])
    x = torch.cat([bits.view(torch.float32), special])
    x = x[~torch.isnan(x)].contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, dtype=torch.int32)
    noise[-len(special):] = 65535
    expected = ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)
    got = torch.empty_like(expected)
    assert native.stochastic_round_(got, x, noise)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_stochastic_rounding_refuses_what_it_does_not_handle():
    target, x, noise = torch.empty(4, dtype=torch.bfloat16), torch.ones(4), torch.zeros(4, dtype=torch.int32)
    assert not native.stochastic_round_(target.float(), x, noise)
    assert not native.stochastic_round_(target, x.double(), noise)
    assert not native.stochastic_round_(target, x, noise.long())
    assert not native.stochastic_round_(torch.empty(4, 2, dtype=torch.bfloat16).t(), torch.ones(2, 4), noise.view(2, 2))
    with pytest.raises(RuntimeError, match="one size"):
        native.stochastic_round_(target, torch.ones(5), torch.zeros(5, dtype=torch.int32))


def test_the_environment_switch_keeps_the_kernels_off(monkeypatch):
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", False)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not native.available() and native.statistics(torch.ones(4, 4)) is None
    assert native.rms_factored(torch.ones(4, 4), torch.ones(4), torch.ones(4), 1.0, 0.0) is None


def test_atan2_is_within_two_ulp_with_the_special_values_of_torch():
    gen = torch.Generator().manual_seed(0)
    n = 1 << 20
    y = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 8)
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 8)
    x[:1000] = y[:1000]  # |y| = |x| (pi/4 exactly representable as the nearest fp32)
    x[1000:2000] = -y[1000:2000]
    got = native.atan2(y, x).double()
    exact = torch.atan2(y.double(), x.double())
    ulp = (exact.float().abs().view(torch.int32) + 1).view(torch.float32).double() - exact.float().abs().double()
    assert ((got - exact).abs() / ulp).max().item() <= 2.0
    special = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e-45, -3e38]
    ys = torch.tensor([a for a in special for _ in special])
    xs = torch.tensor([b for _ in special for b in special])
    got, want = native.atan2(ys, xs), torch.atan2(ys, xs)
    for value, expected, a, b in zip(got.tolist(), want.tolist(), ys.tolist(), xs.tolist()):
        if math.isnan(expected) or math.isinf(a) or math.isinf(b) or a == 0 or b == 0:  # exact there
            assert (math.isnan(value) and math.isnan(expected)) or (
                value == expected and math.copysign(1, value) == math.copysign(1, expected)), (a, b, value)
        else:
            assert value == pytest.approx(expected, rel=3e-7), (a, b)
    with pytest.raises(ValueError, match="one shape"):
        native.atan2(torch.ones(3), torch.ones(4))


def test_adam_atan2_takes_the_native_update(monkeypatch):
    from prodigy_dist import ProdigyPlusScheduleFree

    calls = []
    original = native.update_sf_factored_many
    monkeypatch.setattr(native, "update_sf_factored_many",
                        lambda *a, **k: calls.append(k.get("atan2")) or original(*a, **k))
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 200)
    opt = ProdigyPlusScheduleFree(model.parameters(), fast_path="compiled", eps=None)
    model(torch.randn(8, 300)).square().mean().backward()
    opt.step()
    assert calls == [True]  # the weight matrix (the bias is unfactored)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_prodigy_factored_updates_the_first_moment_as_the_compiled_pass(dtype):
    from prodigy_dist import compiled

    gen = torch.Generator().manual_seed(3)
    shape = (67, 130)
    g = (torch.randn(shape, generator=gen) * 1e-2).to(dtype)
    m = (torch.randn(shape, generator=gen) * 1e-5).to(dtype)
    a, c = torch.rand(shape[0], generator=gen) + 0.1, torch.rand(shape[1], generator=gen) + 0.1
    V = compiled.Variant(full=False, schedulefree=False, atan2=False, stable=True, decay="none", storage="fp32",
                         moment_dtype=dtype)
    s = torch.zeros(13)
    d, beta1 = 2e-3, 0.9
    s[compiled._D], s[compiled._EPS_TERM] = d, d * 1e-8
    s[compiled._BETA1], s[compiled._M_ALPHA] = beta1, (1 - beta1) * d
    m_native, m_compiled = m.clone(), m.clone()
    total = native.rms_prodigy_factored(g, m_native, a, c, s)
    want = compiled._rms_pass(g, a, c, m_compiled, None, s, V)
    assert total.dtype == torch.float32 and total.dim() == 0
    torch.testing.assert_close(total, want, rtol=1e-5, atol=0)
    if dtype == torch.bfloat16:  # the same roundings: equal but for rare last-bit flips of the fp32 intermediates
        assert (m_native != m_compiled).float().mean().item() < 1e-3
    else:
        torch.testing.assert_close(m_native, m_compiled, rtol=1e-6, atol=0)
    assert not torch.equal(m_native, m)  # the moment moved
    exact = (m.double() * beta1 + g.double() * (1 - beta1) * d)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6  # (relative to the largest value: sums that cancel)
    torch.testing.assert_close(m_native.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())
    divisor = native.rms_prodigy_factored(g, m.clone(), a, c, s, numel=10)
    assert divisor.item() == pytest.approx(max((total.item() / 10) ** 0.5, 1.0) ** 0.5, rel=1e-6)
    assert native.rms_prodigy_factored(g, m.float() if dtype != torch.float32 else m.bfloat16(), a, c, s) is None


@pytest.mark.parametrize("kernel,options,shape,moment", [
    ("update_prodigy_factored_many", dict(use_schedulefree=False), (200, 400), "exp_avg"),
    ("update_sf_full_many", dict(factored=False), (200, 400), "exp_avg_sq")], ids=["prodigy_mode", "unfactored"])
def test_the_compiled_path_takes_the_native_rms_passes(monkeypatch, kernel, options, shape, moment):
    """(The RMS pass of each matrix right before its update, in the native update's call.)"""
    from prodigy_dist import ProdigyPlusScheduleFree

    calls = []
    original = getattr(native, kernel)
    monkeypatch.setattr(native, kernel, lambda g, *a, **k: calls.append(
        tuple((g[0] if isinstance(g, list) else g).shape)) or original(g, *a, **k))
    torch.manual_seed(0)
    model = torch.nn.Linear(400, 200)
    opt = ProdigyPlusScheduleFree(model.parameters(), fast_path="compiled", **options)
    model(torch.randn(8, 400)).square().mean().backward()
    opt.step()
    assert shape in calls
    assert opt.state[model.weight][moment].abs().sum() > 0  # the moment it wrote


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_full_sf_updates_the_second_moment_as_the_compiled_pass(dtype):
    from prodigy_dist import compiled

    gen = torch.Generator().manual_seed(4)
    n = 50_001  # (an odd size: a partial last vector)
    g = (torch.randn(n, generator=gen) * 1e-2).to(dtype)
    v = (torch.rand(n, generator=gen) * 1e-9).to(dtype)
    V = compiled.Variant(full=True, schedulefree=True, atan2=False, stable=True, decay="none", storage="fp32",
                         moment_dtype=dtype)
    s = torch.zeros(13)
    d, beta2 = 2e-3, 0.99
    s[compiled._D], s[compiled._EPS_TERM], s[compiled._BETA2], s[compiled._V_ALPHA] = d, d * 1e-8, beta2, \
        (1 - beta2) * d * d
    v_native, v_compiled = v.clone(), v.clone()
    total = native.rms_full_sf(g, v_native, s)
    want = compiled._rms_pass(g, None, None, None, v_compiled, s, V)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=0)
    if dtype == torch.bfloat16:  # the same roundings: equal but for rare last-bit flips of the fp32 intermediates
        assert (v_native != v_compiled).float().mean().item() < 1e-3
    else:
        torch.testing.assert_close(v_native, v_compiled, rtol=1e-6, atol=0)
    exact = v.double() * beta2 + g.double() ** 2 * (1 - beta2) * d * d
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(v_native.double(), exact, rtol=tol, atol=0)
    u = g.double() * d / (exact.sqrt() + d * 1e-8)
    torch.testing.assert_close(total.double(), u.square().sum(), rtol=3e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=0)
    divisor = native.rms_full_sf(g, v.clone(), s, numel=7)
    assert divisor.item() == pytest.approx(max((total.item() / 7) ** 0.5, 1.0) ** 0.5, rel=1e-6)
    assert native.rms_full_sf(g, v.float() if dtype != torch.float32 else v.bfloat16(), s) is None


# Sizes of a list of small tensors: empty, single, shorter and longer than a vector, one past a 4096-element chunk
# and one longer than the RMS kernel's per-thread grain (its sum may then differ in summation order).
LIST_SIZES = [384, 1, 0, 1536, 40000, 11, 23, 4097]
LIST_STARTS = [3, 0, 0, 5, 7, 10, 0, 2]


def _list_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gs = [(torch.randn(n, generator=gen) * 1e-2).to(dtype) for n in LIST_SIZES]
    xs = [torch.randn(n, generator=gen).to(dtype) for n in LIST_SIZES]
    counts = [(n - s + 10) // 11 if n > s else 0 for n, s in zip(LIST_SIZES, LIST_STARTS)]
    p0s = [torch.randn(c, generator=gen).bfloat16() for c in counts]
    ss = [(torch.randn(c, generator=gen) * 1e-2).bfloat16() for c in counts]
    return gs, xs, p0s, ss


@pytest.mark.parametrize("speed", [False, True], ids=["s", "speed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_list_matches_the_single_tensor_pass(dtype, speed):
    """One call over a list of small tensors: per tensor the same Prodigy sums and new s bits as statistics() on the
    tensor as one row, and its sum of g^2."""
    gs, xs, p0s, ss = _list_inputs(dtype)
    sq, sums, s_new = native.statistics_list(gs, (xs, p0s, None if speed else ss, LIST_STARTS, 0.999, 0.02))
    assert sq.shape == (len(gs),) and sums.shape == (len(gs), 3) and (s_new is None) == speed
    for i, g in enumerate(gs):
        _, _, want, want_s = native.statistics(g.view(1, -1), (LIST_STARTS[i], xs[i].view(1, -1), p0s[i],
                                                               None if speed else ss[i], 0.999, 0.02))
        assert torch.equal(sums[i], want)
        if not speed:
            assert torch.equal(s_new[i], want_s)
        torch.testing.assert_close(sq[i].double(), g.double().square().sum(), rtol=1e-5, atol=0)
    assert sums[:, 0].abs().sum() > 0 and (speed or sums[:, 1].abs().sum() > 0)  # (not all empty)
    sq_only, none, none_too = native.statistics_list(gs)
    assert torch.equal(sq_only, sq) and none is None and none_too is None


def _scalars(d=1e-3, eps=1e-8, beta2=0.99, lam=0.01):
    # compiled._scalars' layout: d, d eps, beta1, (1 - beta1) d, beta2, (1 - beta2) d^2, c, -dlr, -dlr xy, lam, -lam,
    # -lam xy, 1 - decay
    return torch.tensor([d, d * eps, 0.9, 0.1 * d, beta2, (1 - beta2) * d * d, 0.3, -d, -2 * d, lam, -lam, -2 * lam,
                         1.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_list_rms_and_update_match_the_single_tensor_kernels(dtype):
    """rms_full_sf_list and update_sf_full_list against rms_full_sf and update_sf_full tensor by tensor: the same v,
    y and z bits (fp32, bf16 rounded to nearest or stochastically from each tensor's noise starts) for every weight
    decay mode, with StableAdamW's scales or atan2; the same sums (for tensors within one thread's grain)."""
    from prodigy_dist import rounding
    gs, _, _, _ = _list_inputs(dtype)
    gen = torch.Generator().manual_seed(3)
    k = _scalars()
    vs = [(torch.rand(n, generator=gen) * 1e-6).to(dtype) for n in LIST_SIZES]
    vs_each = [v.clone() for v in vs]
    uu = native.rms_full_sf_list(gs, vs, k)
    for i, g in enumerate(gs):
        want = native.rms_full_sf(g, vs_each[i], k)
        if g.numel() <= 1 << 14:
            assert torch.equal(uu[i], want)
        torch.testing.assert_close(uu[i], want, rtol=1e-6, atol=0)
        assert torch.equal(vs[i], vs_each[i])
    assert uu.sum() > 0
    scales = (uu / torch.tensor(LIST_SIZES).clamp_min(1)).sqrt().clamp_min(1).sqrt()
    table = rounding.doubled_table(torch.device("cpu"), 0)
    starts = [rounding.table_starts(5, 0, key=i) for i in range(len(gs))]
    roundings = [None, "sr"] if dtype == torch.bfloat16 else [None]
    for decay in ("none", "by_lr", "raw"):
        for atan2 in (False, True):
            for rounding_mode in roundings:
                ys = [torch.randn(n, generator=gen).to(dtype) for n in LIST_SIZES]
                zs = [torch.randn(n, generator=gen).to(dtype) for n in LIST_SIZES]
                ys_each, zs_each = [y.clone() for y in ys], [z.clone() for z in zs]
                v_list, v_each = [v.clone() for v in vs], [v.clone() for v in vs]
                noise = (table, [y for y, _ in starts], [z for _, z in starts]) if rounding_mode else None
                sc = None if atan2 else scales
                assert native.update_sf_full_list(gs, ys, zs, v_list, k, sc, decay, atan2=atan2, noise=noise)
                assert any(not torch.equal(z, z0) for z, z0 in zip(zs, zs_each))  # (it moved)
                for i, g in enumerate(gs):
                    row = (1, -1)
                    assert native.update_sf_full(g.view(row), ys_each[i].view(row), zs_each[i].view(row),
                                                 v_each[i].view(row), k, None if atan2 else sc[i].reshape(()), decay,
                                                 None, atan2=atan2,
                                                 noise=(table, *starts[i]) if rounding_mode else None)
                    assert torch.equal(ys[i], ys_each[i]) and torch.equal(zs[i], zs_each[i]), (decay, atan2, i)
                    assert torch.equal(v_list[i], v_each[i])



MANY_SHAPES = [(33, 70), (0, 40), (1, 7), (257, 300), (96, 2000)]


@pytest.mark.parametrize("expansion", [False, True], ids=["plain", "expansion"])
@pytest.mark.parametrize("sample", ["none", "s", "speed", "compact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_many_equals_the_pass_tensor_by_tensor(dtype, sample, expansion):
    """One call over several matrices: per matrix the same bits as statistics() (rows, columns, Prodigy sums, new
    s, StableAdamW's accumulators), and its sum of g^2."""
    gen = torch.Generator().manual_seed(5)
    gs = [(torch.randn(sh, generator=gen) * 1e-2).to(dtype) for sh in MANY_SHAPES]
    starts = [3, 0, 10, 7, 1]
    xs = [torch.randn(sh, generator=gen).to(dtype) for sh in MANY_SHAPES]
    counts = [(g.numel() - st + 10) // 11 if g.numel() > st else 0 for g, st in zip(gs, starts)]
    p0s = [(x.reshape(-1)[st::11].float() + 1e-2).bfloat16() for x, st in zip(xs, starts)]
    ss = [(torch.randn(c, generator=gen) * 1e-3).bfloat16() for c in counts]
    compacts = [x.reshape(-1)[st::11].clone() if i % 2 == 0 else None for i, (x, st) in enumerate(zip(xs, starts))]
    if sample == "compact":  # (a compact vector differs from x's samples: the pass must read it, not x)
        compacts = [None if c is None else c + 1 for c in compacts]
    f_olds = [torch.rand(sh[0], generator=gen) + 0.5 for sh in MANY_SHAPES]
    inv_cols = [1.0 / sh[1] for sh in MANY_SHAPES]
    speed = sample == "speed"
    samples = None if sample == "none" else (starts, xs, p0s, None if speed else ss, 0.99, 3.7e-4,
                                             compacts if sample == "compact" else [None] * len(gs))
    expand = (f_olds, 0.99, 0.01, inv_cols, 4.0) if expansion else None
    sums, rows, cols, s_new, accumulators = native.statistics_many(gs, samples, expand)
    assert sums.shape == (len(gs), 4) and sums.dtype == torch.float32
    assert (s_new is None) == (sample in ("none", "speed")) and (accumulators is None) == (not expansion)
    for i, g in enumerate(gs):
        one_sample = None if samples is None else (starts[i], xs[i], p0s[i], None if speed else ss[i], 0.99, 3.7e-4,
                                                   samples[6][i])
        one_expansion = None if not expansion else (f_olds[i], 0.99, 0.01, inv_cols[i], 4.0)
        want = native.statistics(g, one_sample, one_expansion)
        assert torch.equal(rows[i], want[0]) and torch.equal(cols[i], want[1])
        if samples is None:
            assert not sums[i, :3].any()
        else:
            assert torch.equal(sums[i, :3], want[2])
        if s_new is not None:
            assert torch.equal(s_new[i].view(torch.int16), want[3].view(torch.int16))
        if expansion:
            assert torch.equal(accumulators[i], want[4])
        torch.testing.assert_close(sums[i, 3].double(), g.double().square().sum(), rtol=1e-6, atol=0)
    assert samples is None or sums[:, 0].abs().sum() > 0  # (not all empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_are_the_same_bits_on_any_number_of_threads(dtype):
    """The statistics pass splits a tensor into shares fixed by its shape, each summing its columns (and the
    expansion's accumulators, and the Prodigy sums) from zero, added in share order: 1, 2 or 3 threads, one tensor or
    several in one call, give the same bits. (1000, 300) and (200, 3000) take several shares each."""
    gen = torch.Generator().manual_seed(12)
    shapes = [(1000, 300), (200, 3000), (7, 5)]
    gs = [(torch.randn(sh, generator=gen) * 1e-2).to(dtype) for sh in shapes]
    xs = [torch.randn(sh, generator=gen).to(dtype) for sh in shapes]
    starts = [4, 0, 2]
    p0s = [(x.reshape(-1)[st::11].float() + 1e-2).bfloat16() for x, st in zip(xs, starts)]
    ss = [(torch.randn(p.numel(), generator=gen) * 1e-3).bfloat16() for p in p0s]
    compacts = [x.reshape(-1)[st::11].clone() for x, st in zip(xs, starts)]
    f_olds = [torch.rand(sh[0], generator=gen) + 0.5 for sh in shapes]
    inv_cols = [1.0 / sh[1] for sh in shapes]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            one = [native.statistics(g, (st, x, p0, s, 0.99, 3.7e-4, c), (f, 0.99, 0.01, ic, 4.0))
                   for g, st, x, p0, s, c, f, ic in zip(gs, starts, xs, p0s, ss, compacts, f_olds, inv_cols)]
            many = native.statistics_many(gs, (starts, xs, p0s, ss, 0.99, 3.7e-4, compacts),
                                          (f_olds, 0.99, 0.01, inv_cols, 4.0))
            results.append((one, many))
    finally:
        torch.set_num_threads(threads)

    def bits(t):
        return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)

    (one_1, many_1) = results[0]
    for one, many in results[1:]:
        for a, b in zip(one, one_1):
            assert all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))
        assert torch.equal(many[0], many_1[0])
        for part, part_1 in zip(many[1:], many_1[1:]):
            assert all(torch.equal(bits(x), bits(y)) for x, y in zip(part, part_1))
    sums, rows, cols, s_new, accumulators = results[0][1]
    for i, (g, one) in enumerate(zip(gs, results[0][0])):  # (and one tensor alone as among others)
        assert torch.equal(rows[i], one[0]) and torch.equal(cols[i], one[1]) and torch.equal(sums[i, :3], one[2])
        assert torch.equal(bits(s_new[i]), bits(one[3])) and torch.equal(accumulators[i], one[4])
        torch.testing.assert_close(cols[i].double(), g.double().square().sum(0, keepdim=True), rtol=1e-5, atol=0)


def test_statistics_many_refuses_what_it_does_not_handle():
    gs = [torch.randn(4, 6), torch.randn(5, 3)]
    assert native.statistics_many([gs[0], gs[1].t()]) is None  # not contiguous
    assert native.statistics_many([gs[0], gs[1].bfloat16()]) is None  # two dtypes
    assert native.statistics_many([gs[0], torch.randn(2, 3, 4)]) is None  # not 2-D
    assert native.statistics_many(gs, None, ([torch.ones(4), torch.ones(5).double()], 0.9, 0.1, [1.0, 1.0],
                                             1.0)) is None  # f_old not fp32
    p0s = [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match="one value per sample"):
        native.statistics_many(gs, ([0, 0], gs, p0s, None, 0.9, 0.1, [None, None]))
    with pytest.raises(RuntimeError, match="one value per row"):
        native.statistics_many(gs, None, ([torch.ones(4), torch.ones(4)], 0.9, 0.1, [1.0, 1.0], 1.0))

def test_list_kernels_refuse_mismatched_lists():
    gs = [torch.randn(5), torch.randn(7)]
    with pytest.raises(RuntimeError, match="one tensor per gradient"):
        native.rms_full_sf_list(gs, [torch.zeros(5)], _scalars())
    with pytest.raises(RuntimeError, match="sizes and dtype"):
        native.rms_full_sf_list(gs, [torch.zeros(5), torch.zeros(6)], _scalars())
    with pytest.raises(ValueError, match="decay"):
        native.update_sf_full_list(gs, gs, gs, gs, _scalars(), None, "sometimes")
    with pytest.raises(RuntimeError, match="one value per sample"):
        native.statistics_list(gs, (gs, [torch.zeros(2, dtype=torch.bfloat16)] * 2, None, [0, 0], 0.9, 0.1))


@pytest.mark.parametrize("dc", [0, 1])
def test_factors_update_the_moments_and_return_their_normalised_square_roots(dc):
    """native.factors against the same operations in torch, to an ulp: r <- beta2 r + alpha (row part / n), likewise
    c, then sqrt(r / (sum r / n_dc + 1e-30)) and sqrt(c) (the sum of r taken over the pieces' ranks where given)."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(33, 70), (1, 5), (128, 3)]
    dims = [(1 - dc, dc)] * len(shapes)  # (dr, dc)
    rs, cs, row_parts, col_parts = [], [], [], []
    for shape, (dr, d) in zip(shapes, dims):
        r_shape, c_shape = list(shape), list(shape)
        r_shape[dr], c_shape[d] = 1, 1
        rs.append(torch.rand(r_shape, generator=gen) + 0.1)
        cs.append(torch.rand(c_shape, generator=gen) + 0.1)
        row_parts.append(torch.rand(r_shape, generator=gen) * 5)
        col_parts.append(torch.rand(c_shape, generator=gen) * 5)
    beta2, alpha = 0.99, 0.01 * 1e-6
    inv_r = [1.0 / s[dr] for s, (dr, _) in zip(shapes, dims)]
    inv_c = [1.0 / s[d] for s, (_, d) in zip(shapes, dims)]
    n_dc = [s[d] for s, (_, d) in zip(shapes, dims)]
    totals = [None, torch.tensor([7.5]), None]  # (the second as if its rows were sharded along dc)
    want_r = [r * beta2 + p * i * alpha for r, p, i in zip(rs, row_parts, inv_r)]
    want_c = [c * beta2 + p * i * alpha for c, p, i in zip(cs, col_parts, inv_c)]
    out = native.factors(rs, cs, row_parts, col_parts, inv_r, inv_c, n_dc, [dc] * 3, totals, beta2, alpha)
    for i in range(len(shapes)):
        torch.testing.assert_close(rs[i], want_r[i], rtol=3e-7, atol=0)
        torch.testing.assert_close(cs[i], want_c[i], rtol=3e-7, atol=0)
        total = totals[i] if totals[i] is not None else want_r[i].double().sum().float()
        mean = total / n_dc[i] + 1e-30
        torch.testing.assert_close(out[2 * i], (want_r[i] / mean).sqrt().reshape(-1), rtol=3e-7, atol=0)
        torch.testing.assert_close(out[2 * i + 1], want_c[i].sqrt().reshape(-1), rtol=3e-7, atol=0)
    assert native.factors([rs[0].double()], [cs[0]], [row_parts[0]], [col_parts[0]], inv_r[:1], inv_c[:1], n_dc[:1],
                          [dc], [None], beta2, alpha) is None  # (not fp32: nothing written)


def _update_tensors(dtype: torch.dtype, seed: int, shapes: list) -> tuple:
    """g (about 1e-2), y and z of the given shapes, and the generator that drew them (for what a test draws next)."""
    gen = torch.Generator().manual_seed(seed)
    gs = [(torch.randn(sh, generator=gen) * 1e-2).to(dtype) for sh in shapes]
    ys = [torch.randn(sh, generator=gen).to(dtype) for sh in shapes]
    zs = [torch.randn(sh, generator=gen).to(dtype) for sh in shapes]
    return gs, ys, zs, gen


@pytest.mark.parametrize("mode", ["rms_each", "rms_each_where_no_scale", "rms_each_all_scales", "scales", "none",
                                  "atan2", "bf16_sr", "bf16_sr_all_scales", "bf16_rne"])
def test_update_many_matches_the_single_tensor_kernels(mode):
    """update_sf_factored_many against rms_factored and update_sf_factored tensor by tensor: the same y, z and
    compact sample bits (rms_each_where_no_scale: the RMS pass only for the tensors whose given divisor is NaN, one
    tensor after another; with every divisor given, as without rms, all tensors' rows in one parallel region)."""
    from prodigy_dist import rounding
    dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float32
    shapes = [(33, 70), (1, 5), (128, 3), (64, 2000)]
    gs, ys, zs, gen = _update_tensors(dtype, 5, shapes)
    as_ = [torch.rand(s[0], generator=gen) * 1e-2 + 1e-3 for s in shapes]
    cs = [torch.rand(s[1], generator=gen) * 1e-2 + 1e-3 for s in shapes]
    k = _scalars()
    d, eps_term = k[0].item(), k[1].item()
    starts = [3, -1, 0, 7]
    outs = [torch.empty((g.numel() - st + 10) // 11, dtype=dtype) if st >= 0 else None for g, st in zip(gs, starts)]
    table = rounding.doubled_table(torch.device("cpu"), 0)
    streams = [rounding.table_starts(3, 0, key=i) for i in range(len(shapes))]
    noise = (table, [y for y, _ in streams], [z for _, z in streams]) if mode.startswith("bf16_sr") else None
    scales = {"scales": torch.tensor([1.0, 1.5, 2.0, 1.2]),
              "rms_each_where_no_scale": torch.tensor([1.5, math.nan, 2.0, math.nan]),
              "rms_each_all_scales": torch.tensor([1.5, 1.1, 2.0, 1.3]),
              "bf16_sr_all_scales": torch.tensor([1.5, 1.1, 2.0, 1.3])}.get(mode)
    rms = (d, eps_term, [g.numel() for g in gs]) if mode.startswith(("rms_each", "bf16")) else None
    atan2 = mode == "atan2"
    y1, z1 = [y.clone() for y in ys], [z.clone() for z in zs]
    o1 = [o.clone() if o is not None else None for o in outs]
    assert native.update_sf_factored_many(gs, y1, z1, as_, cs, k, scales, rms, "raw", list(zip(starts, o1)),
                                          atan2=atan2, noise=noise)
    for i, g in enumerate(gs):
        scale = None
        if scales is not None and not scales[i].isnan():
            scale = scales[i].reshape(())
        elif rms is not None:
            scale = native.rms_factored(g, as_[i], cs[i], d, eps_term, numel=g.numel())
        samples = (starts[i], outs[i]) if starts[i] >= 0 else None
        assert native.update_sf_factored(g, ys[i], zs[i], as_[i], cs[i], k, scale, "raw", samples, atan2=atan2,
                                         noise=(table, *streams[i]) if noise else None)
        assert torch.equal(y1[i], ys[i]) and torch.equal(z1[i], zs[i]), i
        if outs[i] is not None:
            assert torch.equal(o1[i], outs[i])
    assert not native.update_sf_factored_many(gs[:1], [ys[0].t()], zs[:1], as_[:1], cs[:1], k, None, None, "none",
                                              [(-1, None)])  # (a transposed y: not the kernel's)


@pytest.mark.parametrize("mode", ["rms_each", "none", "atan2", "bf16_sr", "bf16_rne"])
def test_update_full_many_matches_the_single_tensor_kernels(mode):
    """update_sf_full_many (the full second moment) against rms_full_sf and update_sf_full tensor by tensor: the same
    v, y, z and compact sample bits (rms_each: each tensor's RMS pass, which writes v, right before its update)."""
    from prodigy_dist import rounding
    dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float32
    shapes = [(33, 70), (1, 5), (128, 3), (64, 2000)]
    gs, ys, zs, gen = _update_tensors(dtype, 8, shapes)
    vs = [(torch.rand(sh, generator=gen) * 1e-9).to(dtype) for sh in shapes]
    k = _scalars()
    starts = [3, -1, 0, 7]
    outs = [torch.empty((g.numel() - st + 10) // 11, dtype=dtype) if st >= 0 else None for g, st in zip(gs, starts)]
    table = rounding.doubled_table(torch.device("cpu"), 0)
    streams = [rounding.table_starts(3, 0, key=i) for i in range(len(shapes))]
    noise = (table, [y for y, _ in streams], [z for _, z in streams]) if mode == "bf16_sr" else None
    rms = [g.numel() for g in gs] if mode in ("rms_each", "bf16_sr", "bf16_rne") else None
    atan2 = mode == "atan2"
    y1, z1, v1 = ([t.clone() for t in ts] for ts in (ys, zs, vs))
    v0 = [v.clone() for v in vs]
    o1 = [o.clone() if o is not None else None for o in outs]
    assert native.update_sf_full_many(gs, y1, z1, v1, k, None, rms, "raw", list(zip(starts, o1)), atan2=atan2,
                                      noise=noise)
    for i, g in enumerate(gs):
        scale = native.rms_full_sf(g, vs[i], k, numel=g.numel()) if rms is not None else None
        samples = (starts[i], outs[i]) if starts[i] >= 0 else None
        assert native.update_sf_full(g, ys[i], zs[i], vs[i], k, scale, "raw", samples, atan2=atan2,
                                     noise=(table, *streams[i]) if noise else None)
        for a, b in ((y1[i], ys[i]), (z1[i], zs[i]), (v1[i], vs[i])):
            assert torch.equal(a, b), i
        if outs[i] is not None:
            assert torch.equal(o1[i], outs[i])
    assert all(not torch.equal(v, before) for v, before in zip(v1, v0))  # (v was written: here or by the RMS pass)
    assert not native.update_sf_full_many(gs[:1], [ys[0].t()], zs[:1], vs[:1], k, None, None, "none",
                                          [(-1, None)])  # (a transposed y: not the kernel's)


def test_table_starts_many_are_the_starts_of_each_parameter():
    """The noise starts of several parameters hashed together (the (step, stream) part once) equal each one's."""
    from prodigy_dist import rounding
    offsets, keys = [0, 7, 123456789, 3, 2 ** 40], [0, 1, 5, 112, 7]
    for step in (1, 2, 1000, 2 ** 33):
        ys, zs = rounding.table_starts_many(step, offsets, keys)
        assert list(zip(ys, zs)) == [rounding.table_starts(step, off, key=key) for off, key in zip(offsets, keys)]
        assert len(set(ys)) == len(ys) and ys != zs  # (different per parameter and stream)
        assert native.table_starts_many(step, offsets, keys) == (ys, zs)  # (hashed natively: the same)


def _divisors_both_ways(g: torch.Tensor, dc: int, d: float, eps: float, r_old=None, c_old=None, beta2: float = 0.99):
    """StableAdamW's divisor of the factored g both ways: from the accumulators of its statistics pass
    (native.statistics with ``expansion``, then native.factors), and from the RMS pass over g with the factors
    (native.rms_factored). dc: the dim r's mean is taken over (r is indexed by g's rows when dc == 0)."""
    rows, cols = g.shape
    dr = 1 - dc
    r_shape, c_shape = [rows, cols], [rows, cols]
    r_shape[dr], c_shape[dc] = 1, 1
    r = r_old.clone() if r_old is not None else torch.zeros(r_shape)
    c = c_old.clone() if c_old is not None else torch.zeros(c_shape)
    alpha = (1 - beta2) * d * d
    f_old = r if dc == 0 else c  # the moment indexed by g's rows
    row_sums, col_sums, _, _, accumulators = native.statistics(g, None, (f_old, beta2, alpha, 1.0 / cols, 1 / d ** 2))
    assert accumulators.shape == (4, cols)
    parts = (row_sums, col_sums) if dr == 1 else (col_sums, row_sums)  # (sums over dr, over dc)
    shape = (rows, cols)
    out = native.factors([r], [c], [parts[0]], [parts[1]], [1.0 / shape[dr]], [1.0 / shape[dc]], [shape[dc]], [dc],
                         [None], beta2, alpha, ([accumulators], eps, [g.numel()]))
    assert len(out) == 3
    a, b = (out[0], out[1]) if dr == 1 else (out[1], out[0])  # (per row of g, per column)
    exact = native.rms_factored(g, a, b, d, d * eps, numel=g.numel())
    # the same sum in float64 from the factors, as the reference path computes it
    u = (g.double() * d) / (a.double()[:, None] * b.double()[None, :] + d * eps)
    rms = (u.square().sum() / g.numel()).sqrt().item()
    return out[2][0].item(), exact.item(), max(rms, 1.0) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dc", [0, 1])
@pytest.mark.parametrize("shape", [(1, 7), (33, 70), (257, 1000), (3000, 33)])
def test_expansion_gives_the_divisor_of_the_rms_pass(shape, dc, dtype):
    """StableAdamW's divisor from the statistics pass's accumulators equals the RMS pass's to fp32 rounding, for
    gradients large against eps, the first step (moments zero) and a later one, and rows and columns of zeros."""
    gen = torch.Generator().manual_seed(7)
    d = 3e-5
    for scale, moments in ((1e-2, False), (1e-4, True), (3.0, True)):
        g = (torch.randn(shape, generator=gen) * scale).to(dtype)
        if shape[0] > 2:
            g[1] = 0  # a row of zeros: no term
            g[:, 2] = 0  # a column of zeros
        rows, cols = shape
        r_old = c_old = None
        if moments:  # a later step: the moments hold earlier gradients' squares (smaller ones)
            r_shape, c_shape = [rows, cols], [rows, cols]
            r_shape[1 - dc], c_shape[dc] = 1, 1
            r_old = torch.rand(r_shape, generator=gen) * (scale * d * 0.3) ** 2  # (both means of d^2 g^2)
            c_old = torch.rand(c_shape, generator=gen) * (scale * d * 0.3) ** 2
        expanded, exact, float64 = _divisors_both_ways(g, dc, d, 1e-8, r_old, c_old)
        assert math.isfinite(expanded), (scale, moments)
        assert expanded == pytest.approx(exact, rel=5e-7, abs=0) and expanded == pytest.approx(float64, rel=5e-7)
        assert expanded > 1.3  # (the RMS above 1: the divisor is not just its floor)


def test_expansion_declines_where_eps_is_not_negligible_and_is_never_wrong():
    """Over gradients from far above eps to below it, and eps up to 1e-3, the divisor from the accumulators is NaN
    (the tensor takes its RMS pass) or equal to the RMS pass's to fp32 rounding. At the first step (x = 0.1 |g|) it is
    taken where t = eps / x stays under ~2.5e-3: with eps = 1e-8, gradients from 1e-4 up."""
    gen = torch.Generator().manual_seed(8)
    taken = {}
    for eps in (1e-8, 1e-6, 1e-3):
        for exponent in range(-12, 3):
            for small_columns in (False, True):
                g = torch.randn(64, 96, generator=gen) * 10.0 ** exponent
                if small_columns:
                    g[:, :5] *= 1e-3  # t = eps / x is largest there
                expanded, exact, float64 = _divisors_both_ways(g, 0, 1e-4, eps)
                if math.isnan(expanded):
                    continue
                taken[eps, exponent, small_columns] = expanded
                assert expanded == pytest.approx(exact, rel=5e-7) and expanded == pytest.approx(float64, rel=5e-7), \
                    (eps, exponent, small_columns)
    assert {e for eps, e, small in taken if eps == 1e-8 and not small} == set(range(-4, 3))
    assert {e for eps, e, small in taken if eps == 1e-3 and not small} == {1, 2}
    assert {e for eps, e, small in taken if eps == 1e-8 and small} == set(range(-1, 3))
    # one row of gradients far below the others (t large there), or far below even a tiny eps, where its moment
    # leaves the window of [1e-18, 1e18] d^2 in which f^-2 stays in fp32's range: declined (no overflow, and no NaN
    # term that would pass unseen)
    for eps in (1e-8, 1e-30):
        g = torch.randn(64, 96, generator=gen)
        g[3] *= 1e-12
        assert math.isnan(_divisors_both_ways(g, 0, 1e-4, eps)[0])
    g = torch.randn(64, 96, generator=gen)
    g[3] *= 1e-6  # (f ~ 1e-14: inside the window, and t small with this eps)
    expanded, exact, _ = _divisors_both_ways(g, 0, 1e-4, 1e-30)
    assert expanded == pytest.approx(exact, rel=5e-7)
    zero = torch.zeros(16, 32)
    assert _divisors_both_ways(zero, 1, 1e-4, 1e-8)[:2] == (1.0, 1.0)  # g zero: RMS 0, the divisor's floor 1


def test_expansion_leaves_the_row_and_column_sums_as_they_were():
    """With the expansion the row and column sums are the same bits; its accumulators are g^2 f^-1, g^2 f^-3/2 and
    g^2 f^-2 per column over the rows that are not all zeros, and the least f of those rows."""
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((257, 1000), (3, 5), (1000, 77)):
            g = torch.randn(shape, generator=gen).to(dtype)
            plain = native.statistics(g)
            expanded = native.statistics(g, None, (torch.rand(shape[0], generator=gen), 0.99, 0.01, 1 / shape[1], 1.0))
            assert torch.equal(plain[0], expanded[0]) and torch.equal(plain[1], expanded[1])
    g = torch.randn(40, 24, generator=gen)
    g[5] = 0
    f_old = torch.rand(40, generator=gen)
    acc = native.statistics(g, None, (f_old, 0.9, 0.5, 1 / 24, 4.0))[4].double()
    sq = g.double().square()
    f = (0.9 * f_old.double() + 0.5 * sq.sum(1) / 24) * 4.0
    used = sq.sum(1) > 0
    for k, power in enumerate((-1.0, -1.5, -2.0)):
        want = (sq[used] * f[used, None] ** power).sum(0)
        torch.testing.assert_close(acc[k], want, rtol=1e-5, atol=0)
    assert acc[3, 0].item() == pytest.approx(f[used].min().item(), rel=1e-6)
    assert native.statistics(g, None, (f_old.double(), 0.9, 0.5, 1 / 24, 4.0)) is None  # f_old not fp32
