"""Where the CPU step's time goes: each native pass of one step, and memory probes, timed from a flushed cache.

On the parameter shapes of bench_step.py's sets (fp32, default options, ``fast_path="auto"``), it times:

  step                  one whole ``opt.step()``
  statistics            the native statistics passes of the step (row and column sums of g^2, the Prodigy sums, and
                        the accumulators of StableAdamW's divisors)
  factors, update       the factor updates with those divisors, and the update passes of the matrices (one native
                        call each; an RMS pass before the update only where a divisor could not be taken)
  other native          the native list kernels of the small tensors
  rest                  step minus the native calls: Python, small torch operations, the host sync

and, on the matrices' gradients alone (``g``):

  g.sum()               one read of every g, per tensor (a read-only pass's floor)
  stats, no samples     native.statistics without the Prodigy samples
  RMS pass              native.rms_factored
  update pass           native.update_sf_factored_many with given divisors (reads g, y, z; writes y, z)
  AdamW(fused) kernel   torch._fused_adamw_ on the same matrices (reads g, p, m, v; writes p, m, v)

Before every timed call a copy between two 256 MB buffers flushes the caches, as another optimizer's step would. The
medians of ``--rounds`` rounds are printed with the read rate of g where it applies. Machines differ mostly in how
fast one core reads from memory: the read-only passes (statistics, RMS) run at about ``g.sum()``'s rate, the update
pass and fused AdamW overlap writes with their reads (see BENCHMARKS.md, seventh session).

    python benchmarks/pass_times.py [--set gpt2-124m] [--threads 1] [--rounds 9]
"""

import argparse
import collections
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from bench_step import TENSOR_SETS, make_base_tensors, make_params  # noqa: E402

from prodigy_dist import ProdigyPlusScheduleFree, native  # noqa: E402

STEP_KERNELS = {"statistics": ("statistics", "statistics_many"), "factors": ("factors",),
                "update": ("update_sf_factored_many",),
                "other native": ("statistics_list", "rms_full_sf_list", "update_sf_full_list")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="gpt-20m", choices=sorted(TENSOR_SETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        sys.exit("the native kernels could not be built (see the log); nothing to time")

    flush_src = torch.ones(1 << 26)
    flush_dst = torch.empty_like(flush_src)

    def timed(fn) -> float:
        """Median ms of fn() over the rounds, each from a flushed cache."""
        times = []
        for _ in range(args.rounds):
            flush_dst.copy_(flush_src)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    base = make_base_tensors(args.set, torch.float32, seed=0)
    params = make_params(base)
    opt = ProdigyPlusScheduleFree(params)
    spent: dict[str, list[float]] = collections.defaultdict(list)
    current = dict.fromkeys(STEP_KERNELS, 0.0)  # this step's time in each kernel
    originals = {}
    for label, names in STEP_KERNELS.items():
        for name in names:
            kernel = originals[name] = getattr(native, name)

            def wrapped(*a, _kernel=kernel, _label=label, **k):
                t0 = time.perf_counter()
                out = _kernel(*a, **k)
                current[_label] += time.perf_counter() - t0
                return out
            setattr(native, name, wrapped)
    for _ in range(3):
        opt.step()
    steps = []
    try:
        for _ in range(args.rounds):
            current.update(dict.fromkeys(current, 0.0))
            flush_dst.copy_(flush_src)
            t0 = time.perf_counter()
            opt.step()
            steps.append(time.perf_counter() - t0)
            for label, seconds in current.items():
                spent[label].append(seconds)
    finally:
        for name, kernel in originals.items():
            setattr(native, name, kernel)
    print(f"{args.set}, fp32, default options, {args.threads} threads, {torch.__version__}; medians of "
          f"{args.rounds} rounds from a flushed cache")
    step_ms = statistics.median(steps) * 1e3
    parts = {label: statistics.median(v) * 1e3 for label, v in spent.items()}
    print(f"  {'step':22s} {step_ms:7.2f} ms")
    for label, ms in parts.items():
        print(f"  {label:22s} {ms:7.2f} ms")
    print(f"  {'rest':22s} {step_ms - sum(parts.values()):7.2f} ms")

    mats = [(p, opt.state[p]) for p in params if p.dim() == 2 and "exp_avg_sq_row" in opt.state[p]]
    gs = [p.grad for p, _ in mats]
    ys = [p.detach().clone() for p, _ in mats]
    zs = [st["z"].clone() for _, st in mats]
    gen = torch.Generator().manual_seed(0)
    rows = [torch.rand(g.shape[0], generator=gen) + 0.5 for g in gs]
    cols = [torch.rand(g.shape[1], generator=gen) * 0.01 + 0.01 for g in gs]
    d = 1e-6
    k = torch.tensor([d, d * 1e-8, 0.9, 0.1 * d, 0.99, 0.01 * d * d, 0.1, -d, -0.9 * d, 0.0, 0.0, 0.0, 1.0])
    divisors = torch.ones(len(gs))
    no_samples = [(-1, None)] * len(gs)
    moments = ([torch.zeros_like(g) for g in gs], [torch.zeros_like(g) for g in gs])
    counts = [torch.tensor(1.0) for _ in gs]
    g_bytes = sum(g.numel() for g in gs) * 4
    probes = {
        "g.sum()": lambda: [g.sum() for g in gs],
        "stats, no samples": lambda: [native.statistics(g) for g in gs],
        "RMS pass": lambda: [native.rms_factored(g, a, c, d, d * 1e-8) for g, a, c in zip(gs, rows, cols)],
        "update pass": lambda: native.update_sf_factored_many(gs, ys, zs, rows, cols, k, divisors, None, "none",
                                                              no_samples),
        "AdamW(fused) kernel": lambda: torch._fused_adamw_(ys, gs, *moments, [], counts, lr=1e-3, beta1=0.9,
                                                           beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False,
                                                           maximize=False),
    }
    print(f"the {len(gs)} matrices alone ({g_bytes / 1e6:.0f} MB of g):")
    for label, fn in probes.items():
        ms = timed(fn)
        print(f"  {label:22s} {ms:7.2f} ms   g read at {g_bytes / ms / 1e6:5.1f} GB/s")


if __name__ == "__main__":
    main()
