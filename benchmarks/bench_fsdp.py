"""FSDP2 benchmark: the optimizer step on 1 and on 2 ranks, the bytes its collectives move, AdamW beside it, and
what the published prodigy-plus-schedule-free package does on the same FSDP2 model.

    python benchmarks/bench_fsdp.py [--layers 8] [--width 1024] [--steps 12]

Runs on CPU with gloo (each rank one thread), or on CUDA with NCCL when GPUs exist. Every number in one run, side
by side; the ratios are what to compare across machines (absolute times on a shared CPU are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def build(world: int, layers: int, width: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())
                                  for _ in range(layers)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    mesh = init_device_mesh(device, (world,))
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, device


def time_steps(model, opt, device: str, width: int, steps: int) -> list[float]:
    times = []
    for step in range(steps):
        x = torch.randn(16, width, device=device, generator=torch.Generator(device).manual_seed(step))
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[2:]  # first steps allocate state


def worker(rank: int, world: int, store: str, out: str, layers: int, width: int, steps: int) -> None:
    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, store=dist.FileStore(store, world), rank=rank, world_size=world)
    result = {}
    try:
        from prodigy_dist import ProdigyPlusScheduleFree

        model, device = build(world, layers, width)
        params = sum(p.numel() for p in model.parameters())
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        opt = ProdigyPlusScheduleFree(model.parameters())
        ours = time_steps(model, opt, device, width, steps)
        collectives = opt._reducer.collectives / steps
        reduced = opt._reducer.bytes_reduced / steps
        d = [g["d"] for g in opt.param_groups]

        model, device = build(world, layers, width)
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        theirs = time_steps(model, adamw, device, width, steps)

        upstream = {}
        for name, kwargs in (("defaults", {}), ("factored=False", dict(factored=False))):
            try:
                from prodigyplus import ProdigyPlusScheduleFree as Upstream

                model, device = build(world, layers, width)
                up = Upstream(model.parameters(), **kwargs)
                time_steps(model, up, device, width, 4)
                d_up = torch.tensor([up.param_groups[0]["d"]], dtype=torch.float64, device=device)
                gathered = [torch.zeros_like(d_up) for _ in range(world)]
                dist.all_gather(gathered, d_up)
                upstream[name] = {"d_per_rank": [float(t) for t in gathered]}
            except Exception as e:  # record what happens, whatever it is
                upstream[name] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [repr(e)])[0][:120]}"}
        result = dict(world=world, params=params, grad_bytes_total=grad_bytes, ours_ms=1e3 * statistics.median(ours),
                      adamw_ms=1e3 * statistics.median(theirs), collectives_per_step=collectives,
                      bytes_reduced_per_step=reduced, d=d, upstream=upstream)
    except BaseException:
        traceback.print_exc()
    finally:
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)


def run(world: int, layers: int, width: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out.json")
        mp.start_processes(worker, args=(world, store, out, layers, width, steps), nprocs=world,
                           start_method="spawn", join=True)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    results = [run(w, args.layers, args.width, args.steps) for w in (1, 2)]
    one, two = results
    print(f"model: {one['params'] / 1e6:.1f}M params ({args.layers} x Linear({args.width}, {args.width})), FSDP2, "
          f"{'NCCL' if torch.cuda.is_available() else 'gloo, 1 thread per rank'}, torch {torch.__version__}")
    print(f"{'ranks':>5} {'ours ms/step':>13} {'AdamW ms/step':>14} {'ours/AdamW':>11} {'collectives':>12} "
          f"{'bytes reduced':>14} {'/ grad bytes':>13}")
    for r in results:
        per_rank_grad = r["grad_bytes_total"] / r["world"]
        print(f"{r['world']:>5} {r['ours_ms']:>13.2f} {r['adamw_ms']:>14.2f} {r['ours_ms'] / r['adamw_ms']:>11.2f} "
              f"{r['collectives_per_step']:>12.1f} {r['bytes_reduced_per_step']:>14.0f} "
              f"{r['bytes_reduced_per_step'] / per_rank_grad:>13.5f}")
    print(f"per-rank step time, 2 ranks / 1 rank: ours {two['ours_ms'] / one['ours_ms']:.2f}, "
          f"AdamW {two['adamw_ms'] / one['adamw_ms']:.2f}")
    print(f"d after {args.steps} steps: 1 rank {one['d'][0]:.6g}, 2 ranks {two['d'][0]:.6g}")
    for r in results:
        for name, outcome in r["upstream"].items():
            print(f"prodigy-plus-schedule-free ({name}) on the same FSDP2 model, {r['world']} rank(s): {outcome}")


if __name__ == "__main__":
    main()
