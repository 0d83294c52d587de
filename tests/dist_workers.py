"""Functions run on every rank of a multi-process test (gloo on CPU; module-level so spawn can import them)."""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist


def _exit(code: int) -> None:
    """End a gloo rank: destroy the process group, then os._exit (gloo may abort in interpreter shutdown)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def train(model, opt, steps, full=lambda p: p):
    from prodigy_dist import ProdigyPlusScheduleFree  # noqa: F401
    for step in range(steps):
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


def fsdp2_worker(rank: int, world: int, store_path: str, out_path: str, options: dict, steps: int,
                 mesh_shape: tuple[int, ...] | None = None) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from prodigy_dist import ProdigyPlusScheduleFree

        torch.manual_seed(0)
        model = ShardModel()
        if mesh_shape:  # HSDP: (replicas, shards)
            mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world,))
        for module in (model.embed, model.conv, model.tall, model.wide, model.tiny, model.side):
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = ProdigyPlusScheduleFree(model.parameters(), **options)
        params = train(model, opt, steps, full=lambda p: p.full_tensor())
        d = torch.tensor([g["d"] for g in opt.param_groups], dtype=torch.float64)
        all_d = [torch.zeros_like(d) for _ in range(world)]
        dist.all_gather(all_d, d)
        rows = torch.tensor([p.to_local().shape[0] for p in model.parameters()])
        all_rows = [torch.zeros_like(rows) for _ in range(world)]
        dist.all_gather(all_rows, rows)
        local_rows = {n: [int(r[i]) for r in all_rows] for i, (n, _) in enumerate(model.named_parameters())}
        if rank == 0:
            torch.save({"params": params, "d": [t.tolist() for t in all_d], "rows": local_rows,
                        "collectives": opt._reducer.collectives}, out_path)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        _exit(1)
    _exit(0)


def errors_worker(rank: int, world: int, store_path: str, out_path: str) -> None:
    """Unsupported sharded combinations raise clear errors instead of computing something else."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
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
        if rank == 0:
            torch.save(messages, out_path)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        _exit(1)
    _exit(0)


def ddp_worker(rank: int, world: int, store_path: str, out_path: str, options: dict, steps: int) -> None:
    """DDP: full replicas with averaged gradients; bf16 replicas stay bitwise identical under stochastic rounding."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel

        from prodigy_dist import ProdigyPlusScheduleFree

        torch.manual_seed(0)
        model = ShardModel().to(options.pop("dtype", torch.float32))
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        opt = ProdigyPlusScheduleFree(model.parameters(), **options)
        for step in range(steps):
            tokens, target = batch(step)
            opt.zero_grad(set_to_none=True)
            ((ddp(tokens, step).float() - target) ** 2).mean().backward()
            opt.step()
        flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            torch.save({"flat": gathered, "d": opt.param_groups[0]["d"]}, out_path)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        _exit(1)
    _exit(0)
