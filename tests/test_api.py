"""Options, errors, modes, metrics, non-finite gradients and checkpoints."""

import copy
import io
import logging

import pytest
import torch

from prodigy_dist import ProdigyPlusScheduleFree
from prodigy_dist.options import DEFAULTS

from .helpers import MixedModel, loss_of, max_rel_diff, train_step, two_groups


def _param():
    return [torch.nn.Parameter(torch.randn(4, 4))]


def test_constructor_matches_the_design():
    import inspect
    sig = inspect.signature(ProdigyPlusScheduleFree.__init__)
    positional = [n for n, p in sig.parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD][2:]
    assert positional == list(DEFAULTS)  # all 27 options, in the documented order
    assert len(positional) == 27
    for name, default in DEFAULTS.items():
        assert sig.parameters[name].default == default
    assert DEFAULTS["split_groups_mean"] is True


@pytest.mark.parametrize("name,value,exc,message", [
    ("lr", 0.0, ValueError, "Invalid lr: 0.0"), ("lr", -1.0, ValueError, "Invalid lr: -1.0"),
    ("lr", float("nan"), ValueError, "Invalid lr: nan"), ("lr", "1", TypeError, "Invalid lr: '1'"),
    ("betas", (1.0, 0.99), ValueError, "Invalid betas[0]: 1.0"), ("betas", (0.9, -0.1), ValueError,
                                                                     "Invalid betas[1]: -0.1"),
    ("betas", (0.9,), TypeError, "Invalid betas: (0.9,)"), ("beta3", 1.0, ValueError, "Invalid beta3: 1.0"),
    ("weight_decay", -0.1, ValueError, "Invalid weight_decay: -0.1"), ("d0", 0.0, ValueError, "Invalid d0: 0.0"),
    ("d_coef", 0.0, ValueError, "Invalid d_coef: 0.0"), ("prodigy_steps", -1, ValueError, "Invalid prodigy_steps: -1"),
    ("prodigy_steps", 2.5, TypeError, "Invalid prodigy_steps: 2.5"), ("eps", 0.0, ValueError, "Invalid eps: 0.0"),
    ("eps", -1e-8, ValueError, "Invalid eps: -1e-08"), ("schedulefree_c", -1.0, ValueError,
                                                        "Invalid schedulefree_c: -1.0"),
    ("use_cautious", 1, TypeError, "Invalid use_cautious: 1"), ("factored", "yes", TypeError,
                                                                "Invalid factored: 'yes'"),
])
def test_invalid_option_names_option_and_value(name, value, exc, message):
    with pytest.raises(exc) as info:
        ProdigyPlusScheduleFree(_param(), **{name: value})
    assert message in str(info.value)


def test_invalid_option_in_a_param_group():
    with pytest.raises(ValueError, match="weight_decay: -1"):
        ProdigyPlusScheduleFree([{"params": _param()}, {"params": _param(), "weight_decay": -1.0}])


@pytest.mark.parametrize("options,words", [
    (dict(use_cautious=True, use_grams=True), "use_cautious"),
    (dict(use_focus=True, eps=None), "use_focus"),
    (dict(use_muon_pp=True, use_focus=True), "use_muon_pp"),
    (dict(use_muon_pp=True, use_adopt=True), "use_muon_pp"),
    (dict(betas=(0.0, 0.99)), "beta"),
])
def test_incompatible_combinations_raise(options, words):
    with pytest.raises(ValueError, match=words):
        ProdigyPlusScheduleFree(_param(), **options)


def test_bad_keyword_only_options():
    with pytest.raises(ValueError, match="nonfinite_grads"):
        ProdigyPlusScheduleFree(_param(), nonfinite_grads="ignore")
    with pytest.raises(ValueError, match="sr_seed"):
        ProdigyPlusScheduleFree(_param(), sr_seed=-1)


def test_group_wide_option_must_agree():
    with pytest.raises(ValueError, match="fused_back_pass"):
        ProdigyPlusScheduleFree([{"params": _param()}, {"params": _param(), "fused_back_pass": True}])


def test_precedence_rules_are_logged_not_printed(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="prodigy_dist"):
        ProdigyPlusScheduleFree(_param(), eps=None)
        ProdigyPlusScheduleFree(_param(), use_speed=True, weight_decay=0.1)
    assert "StableAdamW is not applied" in caplog.text
    assert "use_speed" in caplog.text
    assert capsys.readouterr().out == ""


def test_step_in_eval_mode_raises_with_fix():
    torch.manual_seed(0)
    model = MixedModel()
    opt = ProdigyPlusScheduleFree(model.parameters())
    train_step(model, opt, 0)
    opt.eval()
    loss_of(model, 1).backward()
    with pytest.raises(RuntimeError, match=r"optimizer.train\(\)"):
        opt.step()
    opt.train()
    opt.step()
    assert opt.param_groups[0]["k"] == 3


def test_train_eval_idempotent_and_exact_round_trip():
    torch.manual_seed(0)
    model = MixedModel()
    opt = ProdigyPlusScheduleFree(model.parameters())
    for step in range(5):
        train_step(model, opt, step)
    y = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    x = [p.detach().clone() for p in model.parameters()]
    opt.eval()  # idempotent
    assert all(torch.equal(a, p) for a, p in zip(x, model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(x, y))
    # x = (y - (1 - beta1) z) / beta1
    z = [opt.state[p]["z"] for p in model.parameters()]
    for xi, yi, zi in zip(x, y, z):
        torch.testing.assert_close(xi, (yi - 0.1 * zi) / 0.9, rtol=1e-5, atol=1e-6)
    opt.train()
    opt.train()
    for a, p in zip(y, model.parameters()):
        torch.testing.assert_close(p.detach(), a, rtol=0, atol=2e-7)


def test_metrics_no_sync_and_values():
    torch.manual_seed(0)
    model = MixedModel()
    opt = ProdigyPlusScheduleFree(two_groups(model))
    for step in range(6):
        train_step(model, opt, step)
    m = opt.metrics()
    g0 = opt.param_groups[0]
    assert m["d/0"] == g0["d"] > g0["d0"]
    assert m["step"] == 6 and m["skipped_steps"] == 0
    assert m["dlr/1"] > 0 and 0 < m["effective_lr/0"] < m["dlr/0"]
    assert m["d_denom/0"] > 0
    assert all(isinstance(v, float) for v in m.values())


def test_one_host_sync_per_step(monkeypatch):
    """Every device-to-host read goes through one .tolist() per step (no .item() per tensor)."""
    torch.manual_seed(0)
    model = MixedModel()
    opt = ProdigyPlusScheduleFree(two_groups(model), use_speed=True)
    calls = {"item": 0, "tolist": 0}
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist

    def item(self):
        calls["item"] += 1
        return real_item(self)

    def tolist(self):
        calls["tolist"] += 1
        return real_tolist(self)

    for step in range(3):
        opt.zero_grad()
        loss_of(model, step).backward()
        monkeypatch.setattr(torch.Tensor, "item", item)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        opt.step()
        monkeypatch.undo()
    assert calls == {"item": 0, "tolist": 3}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_whole_step(bad, caplog):
    torch.manual_seed(0)
    model = MixedModel()
    opt = ProdigyPlusScheduleFree(two_groups(model))
    for step in range(4):
        train_step(model, opt, step)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_of(model, 4).backward()
    model.square.weight.grad[3, 5] = bad
    with caplog.at_level(logging.WARNING, logger="prodigy_dist"):
        opt.step()
    assert "non-finite gradient" in caplog.text
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    after = opt.state_dict()
    for pid, st in state["state"].items():
        for key, value in st.items():
            assert torch.equal(value, after["state"][pid][key]), key
    g0 = opt.param_groups[0]
    assert g0["d"] == state["param_groups"][0]["d"] and g0["k"] == 5
    assert opt.metrics()["skipped_steps"] == 1
    train_step(model, opt, 5)  # training goes on
    assert opt.param_groups[0]["k"] == 6


def test_nonfinite_gradient_can_raise():
    torch.manual_seed(0)
    model = MixedModel()
    opt = ProdigyPlusScheduleFree(model.parameters(), nonfinite_grads="raise")
    loss_of(model, 0).backward()
    model.conv.bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()


@pytest.mark.parametrize("fast_path", ["eager", "compiled"])
@pytest.mark.parametrize("role", ["p0", "s"])
def test_nonfinite_state_with_finite_gradients_raises(fast_path, role):
    """A NaN in the state that only the Prodigy statistics read (p0, s) is caught by the step's one host sync: the
    step raises with a fix-it hint and writes nothing."""
    torch.manual_seed(0)
    model = MixedModel()
    opt = ProdigyPlusScheduleFree(model.parameters(), fast_path=fast_path)
    train_step(model, opt, 0)
    opt.zero_grad()
    loss_of(model, 1).backward()
    params = [p.detach().clone() for p in model.parameters()]
    opt.state[model.square.weight][role][0] = float("nan")
    with pytest.raises(RuntimeError, match="not finite although the gradients are.*Reload the last good checkpoint"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert opt.param_groups[0]["k"] == 2


def _run(model, opt, steps, start=0, dtype=torch.float32):
    for step in range(start, start + steps):
        train_step(model, opt, step, dtype)


@pytest.mark.parametrize("options", [{}, dict(use_speed=True, weight_decay=0.01), dict(use_schedulefree=False),
                                     dict(use_muon_pp=True)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resume_from_checkpoint_is_bitwise_identical(options, mode):
    torch.manual_seed(0)
    model = MixedModel()
    opt = ProdigyPlusScheduleFree(two_groups(model), **options)
    _run(model, opt, 6)
    if mode == "eval":
        opt.eval()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    if mode == "eval":
        opt.train()
    _run(model, opt, 8, start=6)

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = MixedModel()
    ropt = ProdigyPlusScheduleFree(two_groups(resumed), **options)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    ropt.load_state_dict(ckpt["opt"])
    for p, rp in zip(model.parameters(), resumed.parameters()):
        for key, value in ropt.state[rp].items():
            if torch.is_tensor(value):
                assert value.dtype == opt.state[p][key].dtype, key  # bf16 p0/s stay bf16
    if mode == "eval":
        ropt.train()
    _run(resumed, ropt, 8, start=6)
    assert max_rel_diff(model, resumed) == 0.0
    assert [g["d"] for g in ropt.param_groups] == [g["d"] for g in opt.param_groups]
    assert ropt.param_groups[0]["k"] == opt.param_groups[0]["k"] == 15


def test_resume_bf16_keeps_fp32_factored_statistics():
    torch.manual_seed(0)
    model = MixedModel().to(torch.bfloat16)
    opt = ProdigyPlusScheduleFree(model.parameters())
    _run(model, opt, 3, dtype=torch.bfloat16)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = ProdigyPlusScheduleFree(model.parameters())
    opt2.load_state_dict(sd)
    st = opt2.state[model.square.weight]
    assert st["exp_avg_sq_row"].dtype == torch.float32
    assert torch.equal(st["exp_avg_sq_row"], opt.state[model.square.weight]["exp_avg_sq_row"])


def test_init_state_allocates_everything_and_changes_nothing():
    torch.manual_seed(0)
    model = MixedModel()
    before = [p.detach().clone() for p in model.parameters()]
    opt = ProdigyPlusScheduleFree(two_groups(model))
    opt.init_state()
    assert all(len(opt.state[p]) > 0 for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.param_groups[0]["k"] == 1
    st = opt.state[model.square.weight]
    assert set(st) == {"exp_avg_sq_row", "exp_avg_sq_col", "z", "p0", "s"}
    assert st["p0"].numel() == -(-48 * 48 // 11) and st["p0"].dtype == torch.bfloat16


def test_state_bytes_per_parameter_fp32_matrix():
    p = torch.nn.Parameter(torch.randn(512, 768))
    opt = ProdigyPlusScheduleFree([p])
    p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t))
    assert nbytes / p.numel() <= 4.4


def test_parameters_without_grad_are_left_alone_and_counter_advances():
    torch.manual_seed(0)
    model = MixedModel()
    opt = ProdigyPlusScheduleFree(two_groups(model))
    frozen = model.unfactored.weight.detach().clone()
    model.unfactored.weight.requires_grad_(False)
    _run(model, opt, 3)
    assert torch.equal(frozen, model.unfactored.weight)
    assert len(opt.state[model.unfactored.weight]) == 0
    assert opt.param_groups[1]["k"] == 4
    opt.zero_grad()
    opt.step()  # no gradients at all: the step counter still advances, nothing moves
    assert opt.param_groups[0]["k"] == 5


def test_add_param_group_after_construction_joins_the_step_counter():
    torch.manual_seed(0)
    model = MixedModel()
    opt = ProdigyPlusScheduleFree([p for p in model.parameters() if p.dim() >= 2])
    _run(model, opt, 2)
    opt.add_param_group({"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.01})
    assert opt.param_groups[1]["k"] == opt.param_groups[0]["k"] == 3
    assert opt.param_groups[1]["d"] == opt.param_groups[0]["d"]  # one group at construction: d is shared
    _run(model, opt, 2, start=2)
    assert opt.param_groups[1]["d"] == opt.param_groups[0]["d"] and opt.param_groups[1]["k"] == 5
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": -1.0})
    with pytest.raises(TypeError, match="weight_decey"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decey": 0.1})
    assert len(opt.param_groups) == 2  # the rejected groups did not join


def test_buckets_are_reused_until_something_they_depend_on_changes(monkeypatch):
    """The buckets of a step are reused from the last one (one process) and formed anew when the parameters with
    gradients, an option, the state, a dtype or the fast path change; reused or not, the steps are the same."""
    from prodigy_dist import ProdigyPlusScheduleFree

    def run(reuse: bool):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30)),
                  torch.nn.Parameter(torch.randn(7))]
        opt = ProdigyPlusScheduleFree(params, d0=1e-3)
        if not reuse:
            opt._plan_key = lambda items, scalars: None
        seen = []
        for step in range(9):
            for i, p in enumerate(params):
                # new gradient tensors every step (zero_grad(set_to_none=True)); the last parameter has none on
                # steps 3-4
                p.grad = None if (i == 2 and step in (3, 4)) else (p.detach() - 1) * 0.1 + torch.randn_like(p) * 0.01
            if step == 6:
                opt.param_groups[0]["weight_decay"] = 0.1
            if step == 7:
                opt.load_state_dict(opt.state_dict())
            opt.step()
            seen.append(opt._plan[1] if opt._plan is not None else None)
        return params, opt, seen

    pa, oa, seen = run(True)
    # the kept buckets hold no gradient: set to None, they are freed
    import gc
    import weakref
    grads = [weakref.ref(p.grad) for p in pa]
    for p in pa:
        p.grad = None
    gc.collect()
    assert all(ref() is None for ref in grads) and oa._plan is not None
    pb, ob, _ = run(False)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    assert oa.param_groups[0]["d"] == ob.param_groups[0]["d"] > 1e-3
    # step 0 keeps nothing (no state before it), 1 forms them, 2 reuses them, 3 (a parameter without gradient)
    # forms new ones, 4 reuses those, 5 (all gradients again), 6 (weight decay) and 7 (loaded state) form new ones,
    # 8 reuses them
    assert seen[0] is None and seen[1] is not None and seen[2] is seen[1]
    assert seen[3] is not seen[2] and seen[4] is seen[3]
    assert seen[5] is not seen[4] and seen[6] is not seen[5] and seen[7] is not seen[6] and seen[8] is seen[7]


def test_a_tensor_in_a_parameter_group_does_not_break_bucket_reuse():
    """A group entry that does not compare as a bool (a tensor of several values, put there by a user or a
    framework) makes the buckets be formed anew rather than fail."""
    from prodigy_dist import ProdigyPlusScheduleFree
    params = [torch.nn.Parameter(torch.randn(8, 6))]
    opt = ProdigyPlusScheduleFree(params)
    for step in range(3):
        opt.param_groups[0]["custom"] = torch.ones(3) * step
        params[0].grad = torch.randn_like(params[0])
        opt.step()
    assert opt.param_groups[0]["k"] == 4
