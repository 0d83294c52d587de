"""Functions run on every rank of a multi-process test: ``fn(rank, world, *args)``, called by a worker pool
(tests/worker_pool.py) inside a fresh gloo process group; each returns what the test checks."""

from __future__ import annotations

import torch
import torch.distributed as dist


class ShardModel(torch.nn.Module):
    """Tall, wide and square matrices, a conv weight, 1-D tensors, an embedding and a 2-row matrix (an empty
    shard on 3 ranks), plus a layer that gets no gradient on odd steps."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 40)
        self.conv = torch.nn.Conv1d(40, 36, 3, padding=1)  # (36, 40, 3)
        self.tall = torch.nn.Linear(36, 70)  # (70, 36): 70 rows split 24/24/22 on 3 ranks
        self.wide = torch.nn.Linear(70, 33)  # (33, 70)
        self.tiny = torch.nn.Linear(33, 2)  # (2, 33): rank 2 of 3 holds nothing
        self.side = torch.nn.Linear(33, 2)  # used on even steps only

    def forward(self, tokens, step):
        h = self.embed(tokens).transpose(1, 2)  # (B, 40, T)
        h = torch.tanh(self.conv(h)).mean(dim=2)
        h = torch.relu(self.tall(h))
        h = torch.tanh(self.wide(h))
        out = self.tiny(h)
        return out + self.side(h) if step % 2 == 0 else out


def groups(model, options: dict):
    """(params, options) for the optimizer; ``two_groups=True`` puts the 1-D tensors in a second group with its
    own d (split_groups) and no weight decay."""
    options = dict(options)
    if not options.pop("two_groups", False):
        return model.parameters(), options
    return ([{"params": [p for p in model.parameters() if p.dim() >= 2]},
             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}], options)


def _new(cls, model, options):
    params, options = groups(model, options)
    return cls(params, **options)


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 50, (8, 6), generator=g), torch.randn(8, 2, generator=g)


def train(model, opt, steps, full=lambda p: p, start=0):
    for step in range(start, start + steps):
        tokens, target = batch(step)
        opt.zero_grad(set_to_none=True)
        ((model(tokens, step).float() - target) ** 2).mean().backward()
        opt.step()
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def single_process(options: dict, steps: int, dtype=torch.float32):
    from prodigy_dist import ProdigyPlusScheduleFree
    torch.manual_seed(0)
    model = ShardModel().to(dtype)
    opt = _new(ProdigyPlusScheduleFree, model, options)
    params = train(model, opt, steps)
    return params, [g["d"] for g in opt.param_groups]




def fsdp2_model(world: int, mesh_shape: tuple[int, ...] | None = None, dtype=torch.float32):
    """ShardModel with every layer and the root under fully_shard (HSDP with ``mesh_shape=(replicas, shards)``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = ShardModel().to(dtype)
    if mesh_shape:
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    for module in (model.embed, model.conv, model.tall, model.wide, model.tiny, model.side):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _all_d(opt, world: int) -> list[list[float]]:
    d = torch.tensor([g["d"] for g in opt.param_groups], dtype=torch.float64)
    all_d = [torch.zeros_like(d) for _ in range(world)]
    dist.all_gather(all_d, d)
    return [t.tolist() for t in all_d]


def fsdp2_worker(rank: int, world: int, options: dict, steps: int, mesh_shape=None, dtype=torch.float32):
    from prodigy_dist import ProdigyPlusScheduleFree

    model = fsdp2_model(world, mesh_shape, dtype)
    opt = _new(ProdigyPlusScheduleFree, model, options)
    params = train(model, opt, steps, full=lambda p: p.full_tensor().float())
    all_d = _all_d(opt, world)
    rows = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
    local = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "d": all_d, "rows": rows, "collectives": opt._reducer.collectives,
            "local": local} if rank == 0 else {"rows": rows, "local": local}


def fused_worker(rank: int, world: int, options: dict, steps: int):
    """FSDP2 with the fused backward pass: FSDP2 runs the post-accumulate-grad hooks on the sharded parameters
    after each reduce-scatter; the parameters are stepped there and the step is finished at the end of backward."""
    from prodigy_dist import ProdigyPlusScheduleFree, fused_backward

    model = fsdp2_model(world)
    opt = ProdigyPlusScheduleFree(model.parameters(), fused_back_pass=True, **options)
    fused_backward.attach(opt)
    for step in range(steps):
        tokens, target = batch(step)
        ((model(tokens, step) - target) ** 2).mean().backward()
        opt.step()  # a no-op: the hooks stepped and the end-of-backward callback finished the step
    grads_left = sum(p.grad is not None for p in model.parameters())
    params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    return {"params": params, "d": _all_d(opt, world), "k": opt.param_groups[0]["k"], "grads_left": grads_left,
            "collectives": opt._reducer.collectives}


def ddp_worker(rank: int, world: int, options: dict, steps: int):
    """DDP: full replicas with averaged gradients; bf16 replicas stay bitwise identical under stochastic rounding."""
    from torch.nn.parallel import DistributedDataParallel

    from prodigy_dist import ProdigyPlusScheduleFree

    options = dict(options)
    model = ShardModel().to(options.pop("dtype", torch.float32))
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    opt = _new(ProdigyPlusScheduleFree, model, options)
    for step in range(steps):
        tokens, target = batch(step)
        opt.zero_grad(set_to_none=True)
        ((ddp(tokens, step).float() - target) ** 2).mean().backward()
        opt.step()
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    return {"flat": flat, "d": opt.param_groups[0]["d"]}


# ------------------------------------------------------------------ checkpoints (DCP)
def _dcp_state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def dcp_save_worker(rank: int, world: int, ckpt: str, options: dict, steps: int, mesh_shape=None):
    """Train ``steps`` steps on ``world`` FSDP2 ranks (HSDP with ``mesh_shape``) and save model and optimizer
    with DCP."""
    import torch.distributed.checkpoint as dcp

    from prodigy_dist import ProdigyPlusScheduleFree

    model = fsdp2_model(world, mesh_shape)
    opt = _new(ProdigyPlusScheduleFree, model, options)
    train(model, opt, steps)
    dcp.save(_dcp_state(model, opt), checkpoint_id=ckpt)
    return _all_d(opt, world)


def dcp_resume_worker(rank: int, world: int, ckpt: str, options: dict, start: int, steps: int,
                      explicit_init: bool = True):
    """A fresh FSDP2 model and optimizer on ``world`` ranks load the checkpoint and train ``steps`` more steps.
    Without ``explicit_init`` DCP's own state creation (a zero-gradient step at lr=0) is exercised."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from prodigy_dist import ProdigyPlusScheduleFree

    model = fsdp2_model(world)
    opt = _new(ProdigyPlusScheduleFree, model, options)
    if explicit_init:
        opt.init_state()
    state = _dcp_state(model, opt)
    k_before = opt.param_groups[0]["k"]
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded_k = opt.param_groups[0]["k"]
    params = train(model, opt, steps, full=lambda p: p.full_tensor(), start=start)
    return {"params": params, "d": _all_d(opt, world), "k_before": k_before, "loaded_k": loaded_k}


def dcp_resume_single(ckpt: str, options: dict, start: int, steps: int):
    """The same on one plain process (no process group): a sharded checkpoint loads into a plain model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from prodigy_dist import ProdigyPlusScheduleFree

    torch.manual_seed(0)
    model = ShardModel()
    opt = _new(ProdigyPlusScheduleFree, model, options)
    opt.init_state()
    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    params = train(model, opt, steps, start=start)
    return params, [g["d"] for g in opt.param_groups]


def muon_count_worker(rank: int, world: int, steps: int):
    """FSDP2 + Muon, counting the Newton-Schulz runs of this rank."""
    import prodigy_dist.muon as muon
    from prodigy_dist import ProdigyPlusScheduleFree

    calls = []
    original = muon.newton_schulz

    def counting(g, *args, **kwargs):
        calls.append(tuple(g.shape))
        return original(g, *args, **kwargs)

    muon.newton_schulz = counting
    try:
        model = fsdp2_model(world)
        opt = ProdigyPlusScheduleFree(model.parameters(), use_muon_pp=True)
        train(model, opt, steps)
    finally:
        muon.newton_schulz = original
    return {"calls": calls, "collectives": opt._reducer.collectives}


def collectives_worker(rank: int, world: int, n_layers: int, options: dict, steps: int):
    """Collectives per step on an FSDP2 model of ``2 * n_layers`` tensors (weights and biases, each layer sharded)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from prodigy_dist import ProdigyPlusScheduleFree

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(40, 40) for _ in range(n_layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _new(ProdigyPlusScheduleFree, model, options)
    counts = []
    for step in range(steps):
        x = torch.randn(4, 40, generator=torch.Generator().manual_seed(step))
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        before = opt._reducer.collectives
        opt.step()
        counts.append(opt._reducer.collectives - before)
    return {"counts": counts, "tensors": len(list(model.parameters())), "d": _all_d(opt, world)}


def dcp_save_single(ckpt: str, options: dict, steps: int):
    """Train ``steps`` steps on one plain process and save model and optimizer with DCP (no process group)."""
    import torch.distributed.checkpoint as dcp

    from prodigy_dist import ProdigyPlusScheduleFree

    torch.manual_seed(0)
    model = ShardModel()
    opt = _new(ProdigyPlusScheduleFree, model, options)
    train(model, opt, steps)
    dcp.save(_dcp_state(model, opt), checkpoint_id=ckpt)


def placement_error_worker(rank: int, world: int):
    """Parameters sharded on dim 1 (``shard_placement_fn``) are refused when the optimizer is built."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from prodigy_dist import ProdigyPlusScheduleFree

    model = torch.nn.Linear(8, 6)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)), shard_placement_fn=lambda p: Shard(p.dim() - 1))
    try:
        ProdigyPlusScheduleFree(model.parameters())
    except NotImplementedError as e:
        return str(e)
    return "no error"

