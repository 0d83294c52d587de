"""DeepSpeed runs for tests/test_deepspeed.py: one launch of 2 gloo ranks (CPU accelerator) runs many cases.

Each case builds a DeepSpeed engine around ProdigyPlusScheduleFree (named in the JSON config, or passed as a class
or an instance), trains a small model whose matrices ZeRO cuts mid-row, and returns per rank: every group's d, the
exported state (global fp32 weights, factored statistics, Prodigy samples), and the gradients the optimizer saw,
gathered to full tensors, so the test can replay them through a one-process optimizer.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist

VOCAB, WIDTH, HIDDEN = 50, 40, 70


class TinyLM(torch.nn.Module):
    """Embedding, a conv weight (3-D), a tall and a wide matrix, a 2-row head and biases: every parameter gets a
    gradient every step (ZeRO steps parameters without gradient with zeros, one process skips them)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)  # (50, 40)
        self.conv = torch.nn.Conv1d(WIDTH, 36, 3, padding=1)  # (36, 40, 3)
        self.up = torch.nn.Linear(36, HIDDEN)  # (70, 36) tall
        self.down = torch.nn.Linear(HIDDEN, 33)  # (33, 70) wide
        self.head = torch.nn.Linear(33, 2)  # (2, 33)

    def forward(self, tokens):
        h = self.embed(tokens).transpose(1, 2)
        h = torch.tanh(self.conv(h)).mean(dim=2)
        h = torch.relu(self.up(h))
        h = torch.tanh(self.down(h))
        return self.head(h)


def batch(step: int, micro: int = 0, size: int = 8):
    g = torch.Generator().manual_seed(1000 + 10 * step + micro)
    return torch.randint(0, VOCAB, (size, 6), generator=g), torch.randn(size, 2, generator=g)


def loss_fn(model, tokens, target):
    out = model(tokens)
    return ((out.float() - target) ** 2).mean()


def param_groups(model, options: dict, two_groups: bool):
    if not two_groups:
        return list(model.parameters())
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2]
    vectors = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}]


def ds_config(stage: int, dtype: str, options: dict, via: str, world: int, accum: int, sub_group: int | None,
              offload: bool = False):
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 8 // world,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if stage == 3 and sub_group is not None:
        cfg["zero_optimization"]["sub_group_size"] = sub_group
    if stage in (1, 2):
        cfg["zero_optimization"]["reduce_bucket_size"] = 500  # several buckets, cut mid-parameter
        cfg["zero_optimization"]["allgather_bucket_size"] = 500
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if via == "config":
        cfg["optimizer"] = {"type": "ProdigyPlusScheduleFree", "params": dict(options)}
    return cfg


def setup_deepspeed() -> None:
    """CPU accelerator, no JIT-built C++ op (the shm all-reduce fast path is patched out)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed
    import logging
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def _gathering_spy(opt, names_of_layout, names_of_param, record: dict):
    """Wrap opt._buckets (ZeRO 1-3: one call per partition, with positions) and opt._planned_buckets (ZeRO-0: the
    step of whole tensors, whose buckets may be reused from the step before) so every gradient the optimizer steps
    is recorded as a full tensor (summed over ranks later): fragments are placed at their global flat range, whole
    tensors as they are."""
    inner, inner_planned = opt._buckets, opt._planned_buckets

    def note(items):
        for _, p in items:
            layout = opt._layouts.get(id(p))
            g = p.grad.detach().float().reshape(-1)
            if layout is not None and layout.fragment:
                name = names_of_layout[id(layout)]
                full = record.setdefault(name, torch.zeros(layout.global_numel))
                full[layout.flat_start:layout.flat_start + layout.flat_numel] += g
            else:
                name = names_of_param[id(p)]
                record[name] = record.get(name, 0) + g.clone()

    def spy(items, scalars, positions=None):
        if positions is None:
            return inner(items, scalars)
        note(items)
        return inner(items, scalars, positions)

    def planned_spy(items, scalars):
        note(items)
        return inner_planned(items, scalars)

    opt._buckets, opt._planned_buckets = spy, planned_spy


def run_case(rank: int, world: int, case: dict) -> dict:
    import deepspeed

    import prodigy_dist  # noqa: F401  (registers torch.optim.ProdigyPlusScheduleFree)
    from prodigy_dist import ProdigyPlusScheduleFree
    from prodigy_dist import deepspeed as pds

    stage, dtype, options = case["stage"], case["dtype"], case.get("options", {})
    via, steps, accum = case.get("via", "config"), case.get("steps", 20), case.get("accum", 1)
    torch.manual_seed(0)
    model = TinyLM()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    if via == "file":
        import json
        with open(case["config_file"]) as f:
            cfg = json.load(f)
        cfg["train_micro_batch_size_per_gpu"] = 8 // world
        options = cfg["optimizer"]["params"]
    else:
        cfg = ds_config(stage, dtype, options, via, world, accum, case.get("sub_group"), case.get("offload", False))
    groups = param_groups(model, options, case.get("two_groups", False))
    kwargs: dict[str, Any] = {}
    if via == "class":
        kwargs["optimizer"] = lambda params: ProdigyPlusScheduleFree(params, **options)
    elif via == "instance":
        kwargs["optimizer"] = ProdigyPlusScheduleFree(groups, **options)
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg, **kwargs)
    base = engine.optimizer if isinstance(engine.optimizer, ProdigyPlusScheduleFree) else engine.optimizer.optimizer
    try:
        binding = pds.attach(engine)
    except Exception as e:
        if case.get("expect_error") != type(e).__name__:
            raise
        return {"rank": rank, "error_type": type(e).__name__, "message": str(e)}
    names_of_layout = {id(pc.layout): pc.name for pc in binding.pieces()}
    names_of_param = {}
    if not binding.pieces():
        names_of_param = {id(hp): n for n, _, hp in pds._zero0_params(engine, base)}
    if case.get("import_file"):
        pds.import_state(engine, case["import_file"])
    start = case.get("start_step", 0)
    grads: list[dict] = []
    losses = []
    half = 8 // world
    for step in range(start, start + steps):
        record: dict = {}
        _gathering_spy(base, names_of_layout, names_of_param, record)
        for micro in range(accum):
            tokens, target = batch(step, micro)
            mine = slice(rank * half, (rank + 1) * half)
            loss = loss_fn(engine, tokens[mine], target[mine].to(torch.bfloat16 if dtype == "bf16" else
                                                                 torch.float32))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        del base._buckets, base._planned_buckets  # back to the class methods
        grads.append(record)
    out = {"rank": rank, "d": [float(g["d"]) for g in base._ds_all_groups],
           "k": [int(g["k"]) for g in base._ds_all_groups], "losses": losses, "initial": initial,
           "stage": binding.stage}
    exported = pds.export_state(engine)
    out["params"] = exported["params"]
    out["state"] = exported["state"]
    out["param_groups"] = exported["param_groups"]
    base.eval()  # Schedule-Free: the model weights become x (DeepSpeed's low-precision copies included)
    out["eval_params"] = module_params(engine, stage)
    base.train()
    # full gradients: fragments summed over ranks (ZeRO 1-3); ZeRO-0 gradients are already identical
    if binding.pieces():
        for record in grads:
            for name in sorted(record):
                dist.all_reduce(record[name])
    out["grads"] = [{n: g.reshape(initial[n].shape) for n, g in r.items()} for r in grads]
    if case.get("checkpoint"):
        out.update(_checkpoint_round_trip(engine, base, case, rank, world, steps))
    return out


def run_upstream(rank: int, world: int, case: dict) -> dict:
    """The published prodigyplus.ProdigyPlusScheduleFree under the same DeepSpeed config (for the README's
    comparison): d per rank, the state it keeps, or the error it raises."""
    import deepspeed
    from prodigyplus import ProdigyPlusScheduleFree as Upstream
    stage, options, steps = case["stage"], case.get("options", {}), case.get("steps", 20)
    torch.manual_seed(0)
    model = TinyLM()
    cfg = ds_config(stage, case["dtype"], options, "class", world, 1, None)
    cfg["zero_allow_untested_optimizer"] = True
    groups = param_groups(model, options, case.get("two_groups", False))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg,
                                           optimizer=lambda params: Upstream(params, **options))
    base = engine.optimizer.optimizer if stage else engine.optimizer
    half = 8 // world
    try:
        for step in range(steps):
            tokens, target = batch(step)
            mine = slice(rank * half, (rank + 1) * half)
            engine.backward(loss_fn(engine, tokens[mine], target[mine]))
            engine.step()
    except Exception as e:
        return {"rank": rank, "error_type": type(e).__name__, "message": str(e)}
    keys = sorted({k for st in base.state.values() for k in st})
    shapes = sorted({tuple(v.shape) for st in base.state.values() for k, v in st.items()
                     if torch.is_tensor(v) and v.dim() >= 1 and k in ("exp_avg_sq", "exp_avg_sq_row")})
    return {"rank": rank, "d": [float(g["d"]) for g in base.param_groups], "state_keys": keys,
            "second_moment_shapes": shapes}


def module_params(engine, stage: int) -> dict[str, torch.Tensor]:
    """The model's weights as the forward pass sees them (ZeRO-3: gathered)."""
    import deepspeed
    named = list(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().float().clone() for n, p in named}
    return {n: p.detach().float().clone() for n, p in named}


def _checkpoint_round_trip(engine, base, case: dict, rank: int, world: int, steps: int) -> dict:
    """Save, train 3 more steps, load, train the same 3 steps again: the continuation must repeat exactly."""
    path = case["checkpoint"]
    engine.save_checkpoint(path, tag="t")
    half = 8 // world

    def more():
        for step in range(steps, steps + 3):
            tokens, target = batch(step)
            mine = slice(rank * half, (rank + 1) * half)
            dtype = torch.bfloat16 if case["dtype"] == "bf16" else torch.float32
            engine.backward(loss_fn(engine, tokens[mine], target[mine].to(dtype)))
            engine.step()
        from prodigy_dist import deepspeed as pds
        ex = pds.export_state(engine)
        return ex["params"], [float(g["d"]) for g in base._ds_all_groups]

    first, d_first = more()
    engine.load_checkpoint(path, tag="t")
    second, d_second = more()
    return {"continued": first, "continued_d": d_first, "resumed": second, "resumed_d": d_second}


def _end(code: int) -> None:
    """End a rank: destroy the process group, then os._exit (gloo may abort in interpreter shutdown)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fsdp2_import(rank: int, world: int, port: int, path: str, options: dict, start: int, steps: int,
                 out_dir: str) -> None:
    """FSDP2 on ``world`` ranks: import an exported DeepSpeed state, train ``steps`` steps on the whole batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    code = 0
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from prodigy_dist import ProdigyPlusScheduleFree
        from prodigy_dist.deepspeed import import_state, load_exported
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = TinyLM()
        fully_shard(model, mesh=mesh)
        opt = ProdigyPlusScheduleFree(model.parameters(), **options)
        import_state(opt, load_exported(path), model.named_parameters())
        for step in range(start, start + steps):  # every rank the whole batch: the averaged gradient is its own
            opt.zero_grad(set_to_none=True)
            loss_fn(model, *batch(step)).backward()
            opt.step()
        full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        rows = {n: p.to_local().shape[0] if p.dim() else 0 for n, p in model.named_parameters()}
        torch.save({"params": full, "d": [g["d"] for g in opt.param_groups], "rows": rows},
                   os.path.join(out_dir, f"fsdp{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        code = 1
    _end(code)


def launch_fsdp2_import(path: str, options: dict, start: int, steps: int, world: int = 3) -> list[dict]:
    import socket
    import tempfile

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(fsdp2_import, args=(world, port, path, options, start, steps, tmp), nprocs=world,
                           start_method="spawn", join=True)
        return [torch.load(os.path.join(tmp, f"fsdp{r}.pt"), weights_only=True) for r in range(world)]


def main(rank: int, world: int, port: int, cases: list[dict], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    code = 0
    try:
        setup_deepspeed()
        results = []
        for case in cases:
            try:
                run = run_upstream if case.get("via") == "upstream" else run_case
                results.append({"ok": True, **run(rank, world, case)})
            except Exception:
                results.append({"ok": False, "error": traceback.format_exc()})
                code = 1
                break  # the other rank may be stuck in a collective: stop here
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        code = 1
    _end(code)


# ---------------------------------------------------------------------------------------------- one process
def named_state(opt, model) -> dict[str, dict[str, torch.Tensor]]:
    return {n: dict(opt.state[p]) for n, p in model.named_parameters() if p in opt.state}


def _results(model, opt):
    """(params, d per group, state by name, the Schedule-Free evaluation weights)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = named_state(opt, model)
    opt.eval()
    evaluated = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.train()
    return params, [g["d"] for g in opt.param_groups], state, evaluated


def one_process(options: dict, steps: int, accum: int = 1, two_groups: bool = False):
    """The same training on one process with the whole batch: (params, d per group, state by name)."""
    from prodigy_dist import ProdigyPlusScheduleFree
    torch.manual_seed(0)
    model = TinyLM()
    opt = ProdigyPlusScheduleFree(param_groups(model, options, two_groups), **options)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        for micro in range(accum):
            tokens, target = batch(step, micro)
            (loss_fn(model, tokens, target) / accum).backward()
        opt.step()
    return _results(model, opt)


def replay(initial: dict, grads: list[dict], options: dict, two_groups: bool = False, bf16: bool = False):
    """One process stepping fp32 copies of the initial weights with the recorded full gradients."""
    from prodigy_dist import ProdigyPlusScheduleFree
    torch.manual_seed(0)
    model = TinyLM()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(initial[n].to(torch.bfloat16).float() if bf16 else initial[n])
    opt = ProdigyPlusScheduleFree(param_groups(model, options, two_groups), **options)
    for record in grads:
        for n, p in model.named_parameters():
            p.grad = record[n].clone().reshape(p.shape) if n in record else None
        opt.step()
    return _results(model, opt)


def launch(cases: list[dict], world: int = 2) -> list[list[dict]]:
    """Run the cases on ``world`` spawned ranks; returns each rank's list of case results."""
    import socket
    import tempfile

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            if case.get("checkpoint") is True:
                case["checkpoint"] = os.path.join(tmp, f"ckpt{cases.index(case)}")
        ctx = mp.start_processes(main, args=(world, port, cases, tmp), nprocs=world, start_method="spawn",
                                 join=False)
        while not ctx.join(timeout=600):
            pass
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
