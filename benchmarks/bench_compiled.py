#!/usr/bin/env python
"""The compiled fast path (prodigy_dist.compiled) against AdamW, the eager path and the published package.

For each tensor set (GPT-2 shapes from bench_step.py), thread count and variant of our optimizer, one case times, in
interleaved rounds (the order rotates every round; medians reported):

  fused      torch.optim.AdamW(fused=True)        (the reference: ~28 B/param in fp32)
  foreach    torch.optim.AdamW(foreach=True)
  upstream   prodigyplus.ProdigyPlusScheduleFree  (prodigy-plus-schedule-free, same options where it has them)
  eager      ours with fast_path="eager"
  compiled   ours with fast_path="compiled"   (every supported tensor compiled, the small ones too)
  auto       ours with fast_path="auto"       (the default: on one process the small tensors stay in the eager
                                              multi-tensor kernels, except the unfactored Schedule-Free ones on a
                                              CPU: native list kernels; compiled on a CPU from 2^24 parameters,
                                              and from 2^20 where every pass is native, small tensors included)
  copy       a bandwidth probe: copy_ between two 256 MiB buffers (bytes read + written / time)
  read       a read-bandwidth probe: sum() of one 256 MiB buffer (bytes read / time)

and reports ms/step, the ratios of ``compiled`` to each of the others, ``auto``'s ratio to fused AdamW, the bytes per
parameter the compiled passes move (counted from the passes, for the 2-D tensors that hold >99% of the parameters),
the floor (those bytes over the copy bandwidth measured in the same rounds) and the compile time (first step of
``compiled`` minus a warm step). On a CPU whose reads, not writes, bound these passes, the telling figure is
``auto x read floor at AdamW(fused)'s read rate``: auto's time over the time of reading our bytes (``B read/param``)
at the rate fused AdamW reads its 16 (fp32). The default step reads 16 B/param on one process on a CPU with the
native kernels (g in the statistics and update passes, y and z in the update; StableAdamW's divisors come from the
statistics pass, z's sampled values for the Prodigy statistics come compact from the previous update), so it is
1.0x fused AdamW when both read at the same rate; it moves 24 B/param against fused AdamW's 28.

The gradients are shared by all optimizers of a case (never modified); every optimizer has its own parameters.

Examples:
  python benchmarks/bench_compiled.py                                 # everything (~15 min on 2 cores)
  python benchmarks/bench_compiled.py --sets gpt-20m --threads 2 --variants default --steps 5
  python benchmarks/bench_compiled.py --out results.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import logging
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
for path in (REPO_ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_step import TENSOR_SETS, cpu_model, make_base_tensors  # noqa: E402

from prodigy_dist import ProdigyPlusScheduleFree, native  # noqa: E402

#: name -> (options of ours, parameter dtype)
VARIANTS = {
    "default": ({}, "fp32"),
    "bf16-sr": ({}, "bf16"),
    "eps=None": (dict(eps=None), "fp32"),
    "weight_decay=0.1": (dict(weight_decay=0.1), "fp32"),
    "prodigy-mode": (dict(use_schedulefree=False), "fp32"),
    "factored=False": (dict(factored=False), "fp32"),
}


def bytes_per_param(options: dict, dtype: str, native_kernels: bool) -> tuple[int, int]:
    """Bytes per parameter the compiled step reads and writes for a 2-D tensor on one process (see
    prodigy_dist/compiled.py), not counting the 1/11-sized Prodigy vectors (p0, s, and z's compact samples: about 1.5
    B/param in all)."""
    e = 4 if dtype == "fp32" else 2  # element size of g, y, z, m, v
    sf = options.get("use_schedulefree", True)
    full = not options.get("factored", True)
    stable = options.get("eps", 1e-8) is not None
    if native_kernels and sf:
        # one native pass over g; z's samples come compact from the native update of the step before (fp32 or
        # bf16, eps a number or None, factored or not; bf16's stochastic rounding also reads 8 B/param of noise
        # from a table that stays in cache, not counted)
        read = e
    elif native_kernels:  # phase A, one native pass: g, and the strided walk over z (or y) touches every line
        read = 2 * e
    elif full:  # sum g^2, then the Prodigy sample: strided walks over g and z (or y)
        read = 3 * e
    else:  # row sums and per-block column sums (2 loops), then the strided walks over g and z
        read = 4 * e
    written = 0
    # one process, native Schedule-Free update of factored tensors: StableAdamW's divisors come from the statistics
    # pass (native.factors), no RMS pass (unless eps is not small against the gradients: not so in these sets)
    divisors_from_statistics = native_kernels and sf and not full
    if stable and not divisors_from_statistics:
        read += e  # RMS pass reads g
        for stored in (not sf, full):  # ... and m (Prodigy mode), v (unfactored): read and written there
            if stored:
                read, written = read + e, written + e
    read, written = read + 2 * e, written + e  # update pass: g read, y read and written
    if sf:
        read, written = read + e, written + e  # z read and written
    for stored in (not sf, full):  # m, v: read (written in the RMS pass), or read and written here
        if stored:
            read, written = read + e, written + (0 if stable else e)
    return read, written


def adamw_bytes(dtype: str) -> tuple[int, int]:
    e = 4 if dtype == "fp32" else 2
    return 4 * e, 3 * e  # g, p, m, v read; p, m, v written


def upstream_factory(options: dict):
    try:
        from prodigyplus import ProdigyPlusScheduleFree as Upstream
    except Exception:  # noqa: BLE001
        return None
    known = {k: v for k, v in options.items() if k in ("eps", "weight_decay", "use_schedulefree", "factored")}
    return lambda ps: Upstream(ps, lr=1.0, **known)


def time_case(set_name: str, variant: str, threads: int, steps: int, with_baselines: bool,
              device: torch.device) -> dict:
    torch.set_num_threads(threads)
    options, dtype_name = VARIANTS[variant]
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    base = [(name, value.to(device), grad.to(device)) for name, value, grad in make_base_tensors(set_name, dtype, 0)]
    grads = [g for _, _, g in base]
    # a GPU runs the step asynchronously: every timing waits for it (and the probes) to finish
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_params = sum(g.numel() for g in grads)

    def params():
        ps = []
        for (_, value, _), g in zip(base, grads):
            p = torch.nn.Parameter(value.clone())
            p.grad = g
            ps.append(p)
        return ps

    factories = {"compiled": lambda ps: ProdigyPlusScheduleFree(ps, fast_path="compiled", **options),
                 "auto": lambda ps: ProdigyPlusScheduleFree(ps, fast_path="auto", **options),
                 "fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)}
    if with_baselines:
        factories["foreach"] = lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)
        up = upstream_factory(options)
        if up is not None:
            factories["upstream"] = up
        factories["eager"] = lambda ps: ProdigyPlusScheduleFree(ps, fast_path="eager", **options)
    opts, first_step = {}, {}
    for name, make in factories.items():
        with contextlib.redirect_stdout(io.StringIO()):
            opts[name] = make(params())
            sync()
            t0 = time.perf_counter()
            opts[name].step()
            sync()
            first_step[name] = time.perf_counter() - t0
            opts[name].step()  # warm-up
    src = torch.ones(1 << 26, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    names = list(opts) + ["copy", "read"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            if name in ("copy", "read"):
                t0 = time.perf_counter()
                dst.copy_(src) if name == "copy" else src.sum()
                sync()
                times[name].append(time.perf_counter() - t0)
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                t0 = time.perf_counter()
                opts[name].step()
                sync()
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    bandwidth = 2 * src.numel() * 4 / med["copy"]  # bytes read + written per second
    read, written = bytes_per_param(options, dtype_name, device.type == "cpu" and native.available())
    adamw_read, adamw_written = adamw_bytes(dtype_name)
    moved, adamw_moved = read + written, adamw_read + adamw_written
    out = dict(set=set_name, variant=variant, threads=threads, params=n_params, moved=moved, read=read,
               floor_ms=moved * n_params / bandwidth * 1e3, bandwidth=bandwidth / 1e9,
               read_bandwidth=src.numel() * 4 / med["read"] / 1e9,
               ms={n: med[n] * 1e3 for n in opts},
               compile_s=first_step["compiled"] - med["compiled"], adamw_moved=adamw_moved, adamw_read=adamw_read,
               adamw_floor_ms=adamw_moved * n_params / bandwidth * 1e3)
    del opts
    gc.collect()
    return out


def row(res: dict) -> list[str]:
    ms = res["ms"]
    c = ms["compiled"]

    def ratio(name):
        return f"{c / ms[name]:.2f}" if name in ms else "-"

    def val(name):
        return f"{ms[name]:.1f}" if name in ms else "-"

    return [res["set"], res["variant"], str(res["threads"]), f"{c:.1f}", val("fused"), val("foreach"),
            val("upstream"), val("eager"), ratio("fused"), ratio("foreach"), ratio("upstream"), ratio("eager"),
            str(res["moved"]), f"{res['floor_ms']:.1f}", f"{c / res['floor_ms']:.2f}",
            f"{ms['fused'] / res['adamw_floor_ms']:.2f}" if "fused" in ms else "-",
            f"{c / (ms['fused'] * res['moved'] / res['adamw_moved']):.2f}",
            val("auto"), f"{ms['auto'] / ms['fused']:.2f}",
            f"{ms['auto'] / (ms['fused'] * res['moved'] / res['adamw_moved']):.2f}",
            str(res["read"]), f"{ms['auto'] / (ms['fused'] * res['read'] / res['adamw_read']):.2f}",
            f"{res['bandwidth']:.1f}", f"{res['read_bandwidth']:.1f}", f"{res['compile_s']:.1f}"]


HEADER = ["set", "variant", "threads", "compiled ms", "AdamW fused ms", "AdamW foreach ms", "upstream ms",
          "eager ms", "x fused", "x foreach", "x upstream", "x eager", "B/param", "floor ms", "x floor",
          "fused x its floor", "x floor at AdamW(fused)'s bandwidth", "auto ms", "auto x fused",
          "auto x floor at AdamW(fused)'s bandwidth", "B read/param", "auto x read floor at AdamW(fused)'s read rate",
          "copy GB/s", "read GB/s", "compile s"]


def md(rows) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="gpt2-124m,gpt-20m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--baselines", default="all", choices=["all", "default"],
                    help="time AdamW(foreach)/upstream/eager alongside every variant, or only alongside 'default' "
                         "(AdamW(fused) is always timed)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (threads then only set the host's thread count)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for set_name in args.sets.split(","):
        assert set_name in TENSOR_SETS, set_name
        for threads in (int(t) for t in args.threads.split(",")):
            for variant in args.variants.split(","):
                assert variant in VARIANTS, variant
                res = time_case(set_name, variant, threads, args.steps,
                                with_baselines=args.baselines == "all" or variant == "default", device=device)
                rows.append(row(res))
                print(" | ".join(rows[-1]), flush=True)
    gpu = f", GPU: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    head = (f"torch {torch.__version__}, CPU: {cpu_model()}{gpu}, python {platform.python_version()}, "
            f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.steps} timed rounds, "
            f"command: python benchmarks/bench_compiled.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    text = head + "\n\n" + md(rows) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
