"""DeepSpeed ZeRO 0-3 on 2 gloo ranks (CPU accelerator, no JIT-built op) against one process.

One launch per ZeRO stage runs every case of that stage (tests/ds_workers.py). For each case: d is bitwise equal on
both ranks; replaying the gradients the optimizer saw through a one-process optimizer gives the same d (1e-6
relative), weights and state (1e-5, also in bf16, where DeepSpeed steps fp32 master copies); in fp32 the whole run
equals one process training on the whole batch (d 1e-6, weights 1e-5). In bf16 the forward/backward pass itself
runs in bf16, so against the fp32 one-process run only a loose bound holds (BF16_D_RTOL, BF16_PARAM_RTOL).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

from . import ds_workers as W

# DeepSpeed is imported by the worker processes (and by one test here), not at collection
pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available"),
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")]

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 20
BF16_D_RTOL = 0.25  # bf16 forward/backward against the fp32 one-process run
BF16_PARAM_RTOL = 0.1  # of each tensor's largest weight

# Sigma|s| is rounded to the dtype of s (bf16) per tensor before it enters d, as in one process; a last-bit change
# of a partial sum can move it by one bf16 ulp. With Muon (steps amplified by Newton-Schulz) that was measured once at
# 1.006e-6 relative on d after 20 steps (ZeRO-3, bf16, two groups); every other case stays within 1e-6.
D_RTOL_MUON = 2e-6

BASE = {"d0": 1e-4}  # default options, with d0 raised so that d moves within 20 steps
OPTION_SETS = {
    "default": BASE,
    "speed_biascorr_wd_unsplit": {**BASE, "use_speed": True, "use_bias_correction": True, "weight_decay": 0.01,
                                  "split_groups": False},
    "prodigy_cautious_orthograd": {**BASE, "use_schedulefree": False, "use_cautious": True, "use_orthograd": True},
    "atan2_adopt_wd": {**BASE, "eps": None, "use_adopt": True, "weight_decay": 0.1, "weight_decay_by_lr": False},
    "unfactored_grams": {**BASE, "factored": False, "use_schedulefree": False, "use_grams": True},
    "focus_prodigy_steps": {**BASE, "use_focus": True, "prodigy_steps": 8, "split_groups_mean": False},
    "no_stableadamw_coefs": {**BASE, "use_stableadamw": False, "d_limiter": False, "d_coef": 0.5,
                             "schedulefree_c": 10.0, "factored_fp32": False, "beta3": 0.95, "betas": [0.95, 0.98]},
}


def _cases(stage: int) -> list[dict]:
    sub = {"sub_group": 1500} if stage == 3 else {}  # several sub-groups: several step() calls per step
    cases = [
        dict(name="default-fp32", stage=stage, dtype="fp32", options=BASE, via="config", **sub),
        dict(name="default-bf16", stage=stage, dtype="bf16", options=BASE, via="config", **sub),
        dict(name="literal-defaults", stage=stage, dtype="fp32", options={}, via="config", steps=8),
        dict(name="speed_biascorr_wd_unsplit", stage=stage, dtype="fp32",
             options=OPTION_SETS["speed_biascorr_wd_unsplit"], via="class", two_groups=True, **sub),
        dict(name="prodigy_cautious_orthograd", stage=stage, dtype="bf16",
             options=OPTION_SETS["prodigy_cautious_orthograd"], via="instance", accum=2),
        dict(name="atan2_adopt_wd", stage=stage, dtype="fp32", options=OPTION_SETS["atan2_adopt_wd"],
             via="config", two_groups=True, **sub),
        dict(name="unfactored_grams", stage=stage, dtype="fp32", options=OPTION_SETS["unfactored_grams"],
             via="class"),
        dict(name="focus_prodigy_steps", stage=stage, dtype="fp32", options=OPTION_SETS["focus_prodigy_steps"],
             via="config", two_groups=True, steps=12),
        dict(name="no_stableadamw_coefs", stage=stage, dtype="fp32", options=OPTION_SETS["no_stableadamw_coefs"],
             via="config", **sub),
        dict(name="config-file", stage=stage, dtype="bf16", options={}, via="file",
             config_file=str(ROOT / "configs" / f"deepspeed_zero{stage}.json"), steps=3),
    ]
    cases.append(dict(name="muon", stage=stage, dtype="fp32", options={**BASE, "use_muon_pp": True}, via="config",
                      **sub))
    cases.append(dict(name="muon-bf16-2groups", stage=stage, dtype="bf16", options={**BASE, "use_muon_pp": True},
                      via="class", two_groups=True))
    if stage >= 1:  # ZeRO-Offload: the partitions and the optimizer state live on the CPU (here: the same device)
        cases.append(dict(name="offload", stage=stage, dtype="bf16", options=BASE, via="config", offload=True,
                          steps=10))
    if stage == 2:
        cases.append(dict(name="checkpoint", stage=2, dtype="fp32", options=BASE, via="config", checkpoint=True))
        # the published package under the same config, for the README's comparison
        cases.append(dict(name="upstream", stage=2, dtype="fp32", options=BASE, via="upstream", two_groups=True))
        cases.append(dict(name="upstream-unsplit", stage=2, dtype="fp32", options={**BASE, "split_groups": False},
                          via="upstream", two_groups=True))
    return cases


_RESULTS: dict[int, dict[str, list[dict]]] = {}


def _results(stage: int) -> dict[str, list[dict]]:
    if stage not in _RESULTS:
        cases = _cases(stage)
        per_rank = W.launch(cases)
        _RESULTS[stage] = {}
        for i, case in enumerate(cases):
            ranks = [r[i] if i < len(r) else {"ok": False, "error": "not run (an earlier case failed)"}
                     for r in per_rank]
            _RESULTS[stage][case["name"]] = [dict(case=case, **r) for r in ranks]
    return _RESULTS[stage]


def _case(stage: int, name: str) -> list[dict]:
    ranks = _results(stage)[name]
    for r in ranks:
        assert r["ok"], f"rank {r.get('rank')} failed:\n{r['error']}"
    return ranks


def _close_params(got: dict, want: dict, rtol: float) -> None:
    for name, w in want.items():
        torch.testing.assert_close(got[name].float(), w.float(), rtol=0,
                                   atol=rtol * max(w.abs().max().item(), 1e-12), msg=lambda m: f"{name}: {m}")


def _close_state(got: dict, want: dict, rtol: float) -> None:
    for name, entry in want.items():
        assert set(got[name]) == set(entry), f"{name}: state keys {sorted(got[name])} != {sorted(entry)}"
        for key, w in entry.items():
            if not torch.is_tensor(w):
                continue
            g = got[name][key]
            assert tuple(g.shape) == tuple(w.shape), f"{name}.{key}: shape {tuple(g.shape)} != {tuple(w.shape)}"
            assert g.dtype == w.dtype, f"{name}.{key}: dtype {g.dtype} != {w.dtype}"
            if w.numel() and torch.isfinite(w.float()).all():
                scale = max(w.float().abs().max().item(), 1e-30)
                if w.dim() == 0:  # SPEED's per-tensor running values: sums with cancellation, summed per rank
                    scale *= 10
                torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=rtol * scale + (1e-2 * scale if
                                           w.dtype == torch.bfloat16 else 0), msg=lambda m: f"{name}.{key}: {m}")


NAMES = [c["name"] for c in _cases(0)]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("name", [n for n in NAMES if n != "config-file"])
def test_zero_matches_one_process(stage, name):
    _check_case(stage, name)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_offload_matches_one_process(stage):
    _check_case(stage, "offload")


def _check_case(stage: int, name: str) -> None:
    r0, r1 = _case(stage, name)
    case = r0["case"]
    options, steps, accum = case["options"], case.get("steps", STEPS), case.get("accum", 1)
    two = case.get("two_groups", False)
    bf16 = case["dtype"] == "bf16"
    assert r0["stage"] == stage
    # d bitwise equal on both ranks, and the step counter advanced once per training step
    assert r0["d"] == r1["d"]
    assert r0["k"] == [steps + 1] * len(r0["k"])
    # the exported weights/state are the same on both ranks (gathered from the fragments)
    for name_ in r0["params"]:
        assert torch.equal(r0["params"][name_], r1["params"][name_])
    # replay: the gradients the optimizer saw, stepped by one process
    params, d, state, evaluated = W.replay(r0["initial"], r0["grads"], options, two, bf16=bf16)
    assert r0["d"] == pytest.approx(d, rel=D_RTOL_MUON if options.get("use_muon_pp") else 1e-6)
    _close_params(r0["params"], params, 1e-5)
    _close_state(r0["state"], state, 1e-5)
    # Schedule-Free eval(): the weights the model computes with (bf16: rounded to bf16)
    _close_params(r0["eval_params"], evaluated, 1e-5 if not bf16 else 2 ** -8)
    factored = [n for n, st in state.items() if "exp_avg_sq_row" in st]
    if options.get("factored", True) and not options.get("use_focus", False):
        assert factored, "no factored statistics in the one-process state"
    # end to end: one process training on the whole batch
    params, d, state, evaluated = W.one_process(options, steps, accum, two)
    if bf16:
        assert r0["d"] == pytest.approx(d, rel=BF16_D_RTOL)
        _close_params(r0["params"], params, BF16_PARAM_RTOL)
    else:
        assert r0["d"] == pytest.approx(d, rel=D_RTOL_MUON if options.get("use_muon_pp") else 1e-6)
        _close_params(r0["params"], params, 1e-5)
        _close_state(r0["state"], state, 1e-5)
        _close_params(r0["eval_params"], evaluated, 1e-5)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_config_file_trains(stage):
    """configs/deepspeed_zero{stage}.json names the optimizer; it runs without zero_allow_untested_optimizer."""
    cfg = json.loads((ROOT / "configs" / f"deepspeed_zero{stage}.json").read_text())
    assert cfg["optimizer"]["type"] == "ProdigyPlusScheduleFree"
    assert cfg["zero_optimization"]["stage"] == stage
    assert "zero_allow_untested_optimizer" not in cfg
    r0, r1 = _case(stage, "config-file")
    assert r0["d"] == r1["d"] and r0["k"] == [4]
    assert all(torch.isfinite(torch.tensor(r0["losses"])))


def test_upstream_package_under_zero2_is_not_sharding_aware():
    """prodigyplus 2.0.1 under the same ZeRO-2 config (2 groups): d differs per rank, the second moment is a flat
    unfactored vector; with split_groups=False it crashes. (Numbers in docs/DEEPSPEED.md.)"""
    r0, r1 = _case(2, "upstream")
    assert r0["d"] != r1["d"]
    assert "exp_avg_sq_row" not in r0["state_keys"] and "exp_avg_sq" in r0["state_keys"]
    assert all(len(shape) == 1 for shape in r0["second_moment_shapes"])
    _, d, _, _ = W.one_process(BASE, STEPS, two_groups=True)
    assert max(abs(a - b) / b for a, b in zip(r0["d"] + r1["d"], d + d)) > 0.1
    for r in _case(2, "upstream-unsplit"):
        assert r["error_type"] == "KeyError" and "running_d_numerator" in r["message"]


def test_checkpoint_round_trip_continues_exactly():
    r0, r1 = _case(2, "checkpoint")
    for r in (r0, r1):
        assert r["resumed_d"] == r["continued_d"]
        for name in r["continued"]:
            assert torch.equal(r["resumed"][name], r["continued"][name]), name


def test_export_imports_into_one_process_and_continues():
    """Export at 2 ranks (ZeRO-2), import into a single-process optimizer, train the same 3 steps: same run."""
    from prodigy_dist import ProdigyPlusScheduleFree
    from prodigy_dist.deepspeed import import_state
    r0, _ = _case(2, "checkpoint")
    exported = {"format": "prodigy_dist.portable_state/1", "param_groups": r0["param_groups"], "state": r0["state"],
                "params": r0["params"]}
    model = W.TinyLM()
    opt = ProdigyPlusScheduleFree(model.parameters(), **r0["case"]["options"])
    import_state(opt, exported, model.named_parameters())
    assert opt.param_groups[0]["k"] == STEPS + 1
    for step in range(STEPS, STEPS + 3):
        opt.zero_grad(set_to_none=True)
        W.loss_fn(model, *W.batch(step)).backward()
        opt.step()
    assert [g["d"] for g in opt.param_groups] == pytest.approx(r0["continued_d"], rel=1e-6)
    _close_params(r0["continued"], {n: p.detach() for n, p in model.named_parameters()}, 1e-5)


@pytest.fixture(scope="module")
def exported_file(tmp_path_factory):
    """The state exported after 20 steps of 2-rank ZeRO-2 (the checkpoint case), as a file."""
    r0, _ = _case(2, "checkpoint")
    path = tmp_path_factory.mktemp("export") / "state.pt"
    torch.save({"format": "prodigy_dist.portable_state/1", "param_groups": r0["param_groups"], "state": r0["state"],
                "params": r0["params"]}, path)
    return str(path), r0


def test_export_imports_into_deepspeed_one_rank(exported_file):
    """2 ranks ZeRO-2 -> 1 rank ZeRO-0, -2 and -3 (another data-parallel size and stage): the same 3 steps."""
    path, r0 = exported_file
    cases = [dict(name=f"import-{stage}", stage=stage, dtype="fp32", options=r0["case"]["options"], via="config",
                  import_file=path, start_step=STEPS, steps=3) for stage in (0, 2, 3)]
    (results,) = W.launch(cases, world=1)
    for r in results:
        assert r["ok"], r.get("error")
        assert r["k"] == [STEPS + 4]
        assert r["d"] == pytest.approx(r0["continued_d"], rel=1e-6)
        _close_params(r["params"], r0["continued"], 1e-5)


def test_export_imports_into_fsdp2_three_ranks(exported_file):
    """2 ranks ZeRO-2 -> FSDP2 on 3 ranks (uneven Shard(0) pieces): the same 3 steps."""
    path, r0 = exported_file
    ranks = W.launch_fsdp2_import(path, r0["case"]["options"], STEPS, 3)
    assert ranks[0]["rows"]["head.weight"] == 1 and ranks[2]["rows"]["head.weight"] == 0  # 2 rows on 3 ranks
    for r in ranks:
        assert r["d"] == ranks[0]["d"]
        assert r["d"] == pytest.approx(r0["continued_d"], rel=1e-6)
        _close_params(r["params"], r0["continued"], 1e-5)


def test_export_file_loads_safely(tmp_path):
    from prodigy_dist.deepspeed import EXPORT_FORMAT, load_exported
    r0, _ = _case(2, "checkpoint")
    path = tmp_path / "state.pt"
    torch.save({"format": EXPORT_FORMAT, "param_groups": r0["param_groups"], "state": r0["state"],
                "params": r0["params"]}, path)
    data = load_exported(str(path))  # torch.load(weights_only=True)
    assert set(data["state"]) == set(r0["state"])
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a prodigy_dist portable"):
        load_exported(str(tmp_path / "bad.pt"))


# ------------------------------------------------------------------------------------------ without processes
def test_registered_in_torch_optim():
    import prodigy_dist
    assert torch.optim.ProdigyPlusScheduleFree is prodigy_dist.ProdigyPlusScheduleFree


def test_declared_zero_supported():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    from prodigy_dist import ProdigyPlusScheduleFree
    ProdigyPlusScheduleFree([torch.nn.Parameter(torch.zeros(3))])
    assert ProdigyPlusScheduleFree in ZERO_SUPPORTED_OPTIMIZERS


def _fake_engine(**kw):
    values = dict(stage=2, clip=0.0, fp16=False, dynamic=False, scale=1.0, scheduler=None) | kw
    return types.SimpleNamespace(zero_optimization_stage=lambda: values["stage"],
                                 gradient_clipping=lambda: values["clip"], fp16_enabled=lambda: values["fp16"],
                                 dynamic_loss_scale=lambda: values["dynamic"], loss_scale=lambda: values["scale"],
                                 lr_scheduler=values["scheduler"])


def test_settings_that_fight_the_optimizer(caplog):
    from prodigy_dist import ProdigyPlusScheduleFree
    from prodigy_dist.deepspeed import check_engine
    opt = ProdigyPlusScheduleFree([torch.nn.Parameter(torch.zeros(3, 3))])
    with caplog.at_level(logging.WARNING, logger="prodigy_dist.deepspeed"):
        check_engine(_fake_engine(), opt)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="prodigy_dist.deepspeed"):
        check_engine(_fake_engine(clip=1.0), opt)
    assert "gradient_clipping=1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prodigy_dist.deepspeed"):
        check_engine(_fake_engine(fp16=True, dynamic=False, scale=1.0), opt)
    assert "without loss scaling" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prodigy_dist.deepspeed"):
        check_engine(_fake_engine(fp16=True, dynamic=True), opt)
        check_engine(_fake_engine(scheduler=object()), opt)
    assert "without loss scaling" not in caplog.text and "LR scheduler" in caplog.text
    fused = ProdigyPlusScheduleFree([torch.nn.Parameter(torch.zeros(3, 3))], fused_back_pass=True)
    with pytest.raises(NotImplementedError, match="fused_back_pass"):
        check_engine(_fake_engine(stage=0), fused)


def test_fragment_layout_rows():
    from prodigy_dist.layout import fragment_layout
    lay = fragment_layout((12, 16), 120, 72, None)  # elements 120..191 of a 12x16 weight
    assert (lay.row_offset, lay.local_rows, lay.lead, lay.flat_offset, lay.slice_start) == (7, 5, 8, 120, 1)
    empty = fragment_layout((12, 16), 0, 0, None)
    assert empty.local_rows == 0 and empty.flat_numel == 0


@pytest.mark.skipif(shutil.which("torchrun") is None and not (pathlib.Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not found")
def test_example_runs(tmp_path):
    """examples/deepspeed_lm.py trains a few steps on 2 ranks with configs/deepspeed_zero2.json."""
    torchrun = shutil.which("torchrun") or str(pathlib.Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "examples" / "deepspeed_lm.py"),
                          "--config", str(ROOT / "configs" / "deepspeed_zero2.json"), "--steps", "4",
                          "--save", str(tmp_path / "export.pt")],
                         capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 4" in out.stdout
    from prodigy_dist.deepspeed import load_exported
    data = load_exported(str(tmp_path / "export.pt"))
    assert data["param_groups"][0]["k"] == 5
