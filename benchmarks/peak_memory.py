#!/usr/bin/env python
"""Peak extra memory of one optimizer step on a CPU: how much the resident set grows above its level before the step.

Linux only: the kernel's high-water mark of the resident set (VmHWM) is reset before each measured step
(``echo 5 > /proc/self/clear_refs``) and read after it; the peak extra memory is VmHWM minus the resident set just
before the step. The script re-executes itself with glibc's mmap threshold fixed at 128 KiB
(``MALLOC_MMAP_THRESHOLD_``), so every larger temporary is mapped when allocated and unmapped when freed and shows
up in the peak (by default glibc raises the threshold after the first frees and keeps such blocks resident, which
would hide them). Cached buffers that live across steps (the eager path's scratch buffers, the compiled path's
stochastic-rounding buffer) are resident before the step and count as 0; the state is allocated by warm-up steps
first. Reported in MB and in units of one fp32 buffer of the parameter count (the fast-path issue's bound: at most
one beyond the state).

    python benchmarks/peak_memory.py [--sets gpt2-124m,gpt-20m] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from bench_step import TENSOR_SETS, make_base_tensors, make_params  # noqa: E402

from prodigy_dist import ProdigyPlusScheduleFree  # noqa: E402


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra(step) -> int:
    """Bytes the resident set rose above its level before ``step()`` at its highest point during it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    step()
    return _status("VmHWM") - before


def main(argv=None) -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="gpt2-124m,gpt-20m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per optimizer (the maximum is reported)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    makers = {
        "ours, fast_path=compiled": lambda ps: ProdigyPlusScheduleFree(ps, fast_path="compiled"),
        "ours, fast_path=eager": lambda ps: ProdigyPlusScheduleFree(ps, fast_path="eager"),
        "ours, compiled, bf16": lambda ps: ProdigyPlusScheduleFree(ps, fast_path="compiled"),
        "AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, fused=True),
    }
    print(f"torch {torch.__version__}, {args.threads} threads; peak extra resident memory of one step (max of "
          f"{args.steps})\n")
    print("| set | optimizer | params | peak extra MB | in fp32 parameter buffers |")
    print("|---|---|---|---|---|")
    for set_name in args.sets.split(","):
        for name, make in makers.items():
            dtype = torch.bfloat16 if "bf16" in name else torch.float32
            params = make_params(make_base_tensors(set_name, dtype, seed=0))
            n = sum(p.numel() for p in params)
            opt = make(params)
            for _ in range(2):  # state, compilation, scratch buffers
                opt.step()
            peak = max(peak_extra(opt.step) for _ in range(args.steps))
            print(f"| {set_name} | {name} | {n / 1e6:.1f}M | {peak / 2**20:.0f} | {peak / (4 * n):.3f} |", flush=True)
            del opt, params
            gc.collect()


if __name__ == "__main__":
    main()
