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


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 50, (8, 6), generator=g), torch.randn(8, 2, generator=g)


def train(model, opt, steps, full=lambda p: p, start=0):
    for step in range(start, start + steps):
        tokens, target = batch(step)
        opt.zero_grad(set_to_none=True)
        ((model(tokens, step) - target) ** 2).mean().backward()
        opt.step()
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def single_process(options: dict, steps: int):
    from prodigy_dist import ProdigyPlusScheduleFree
    torch.manual_seed(0)
    model = ShardModel()
    opt = ProdigyPlusScheduleFree(model.parameters(), **options)
    params = train(model, opt, steps)
    return params, [g["d"] for g in opt.param_groups]




def fsdp2_model(world: int, mesh_shape: tuple[int, ...] | None = None):
    """ShardModel with every layer and the root under fully_shard (HSDP with ``mesh_shape=(replicas, shards)``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = ShardModel()
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


def fsdp2_worker(rank: int, world: int, options: dict, steps: int, mesh_shape=None):
    from prodigy_dist import ProdigyPlusScheduleFree

    model = fsdp2_model(world, mesh_shape)
    opt = ProdigyPlusScheduleFree(model.parameters(), **options)
    params = train(model, opt, steps, full=lambda p: p.full_tensor())
    all_d = _all_d(opt, world)
    rows = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
    return {"params": params, "d": all_d, "rows": rows, "collectives": opt._reducer.collectives} if rank == 0 \
        else {"rows": rows}


def errors_worker(rank: int, world: int):
    """Unsupported sharded combinations raise clear errors instead of computing something else."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from prodigy_dist import ProdigyPlusScheduleFree

    model = ShardModel()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    messages = []
    for options in (dict(use_muon_pp=True), dict(fused_back_pass=True)):
        try:
            ProdigyPlusScheduleFree(model.parameters(), **options)
            messages.append("no error")
        except NotImplementedError as e:
            messages.append(str(e))
    return messages


def ddp_worker(rank: int, world: int, options: dict, steps: int):
    """DDP: full replicas with averaged gradients; bf16 replicas stay bitwise identical under stochastic rounding."""
    from torch.nn.parallel import DistributedDataParallel

    from prodigy_dist import ProdigyPlusScheduleFree

    options = dict(options)
    model = ShardModel().to(options.pop("dtype", torch.float32))
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    opt = ProdigyPlusScheduleFree(model.parameters(), **options)
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


def dcp_save_worker(rank: int, world: int, ckpt: str, options: dict, steps: int):
    """Train ``steps`` steps on ``world`` FSDP2 ranks and save model and optimizer with DCP."""
    import torch.distributed.checkpoint as dcp

    from prodigy_dist import ProdigyPlusScheduleFree

    model = fsdp2_model(world)
    opt = ProdigyPlusScheduleFree(model.parameters(), **options)
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
    opt = ProdigyPlusScheduleFree(model.parameters(), **options)
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
    opt = ProdigyPlusScheduleFree(model.parameters(), **options)
    opt.init_state()
    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    params = train(model, opt, steps, start=start)
    return params, [g["d"] for g in opt.param_groups]
