#!/usr/bin/env python
"""Where one optimizer step spends its time: torch.profiler over a few warm steps, ours against AdamW(fused).

Prints, per optimizer, the wall time of a step, the host time spent issuing it, the device time of its kernels
(summed) and the number of kernels launched, then the profiler's table of the most expensive operations. On a GPU
the gap between wall time and kernel time is launch and Python overhead; on a CPU the "kernels" are the ops.

Examples:
  python benchmarks/profile_step.py --device cuda --set gpt2-124m
  python benchmarks/profile_step.py --set gpt-20m --options '{"eps": null}' --rows 30
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
for path in (REPO_ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_step import TENSOR_SETS, make_base_tensors  # noqa: E402

from prodigy_dist import ProdigyPlusScheduleFree  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="gpt2-124m", choices=sorted(TENSOR_SETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--fast-path", default="auto")
    ap.add_argument("--options", default="{}", help="JSON of our optimizer's options")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    base = [(v.to(device), g.to(device)) for _, v, g in make_base_tensors(args.set, dtype, 0)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    makers = {"ours": lambda ps: ProdigyPlusScheduleFree(ps, fast_path=args.fast_path, **json.loads(args.options)),
              "AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)}
    for name, make in makers.items():
        params = []
        for value, grad in base:
            p = torch.nn.Parameter(value.clone())
            p.grad = grad
            params.append(p)
        opt = make(params)
        with contextlib.redirect_stdout(io.StringIO()):
            for _ in range(2):  # compile and warm up
                opt.step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            opt.step()
        sync()
        wall = (time.perf_counter() - t0) / args.steps
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                opt.step()
            sync()
        events = prof.key_averages()
        if device.type == "cuda":
            # (the GPU-side range of the Optimizer.step annotation spans the step: not a kernel)
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                       and not e.name.startswith("Optimizer.")]
            busy = sum(e.device_time for e in kernels) / args.steps / 1e3
            launches = len(kernels) / args.steps
            sort = "self_cuda_time_total"
        else:
            busy = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
            launches = sum(e.count for e in events) / args.steps
            sort = "self_cpu_time_total"
        print(f"\n== {name}: {args.set} {args.dtype} on {device}: {wall * 1e3:.2f} ms/step (unprofiled), "
              f"kernel time {busy:.2f} ms/step, {launches:.0f} kernels/step")
        print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
        if device.type == "cuda":  # where the host time goes (launches, compiled-code entry, synchronisations)
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        del opt, params


if __name__ == "__main__":
    main()
