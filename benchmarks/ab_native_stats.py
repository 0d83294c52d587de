"""A/B in one run: what each native CPU kernel (prodigy_dist.native) buys in the compiled step, on the parameter
shapes of GPT-2 124M (bench_step.py's set), fp32, default options, 2 threads; AdamW(fused=True) timed in the same
rounds.

  all native                 statistics pass with the Prodigy sums and the accumulators of StableAdamW's divisors
                             (no RMS pass where they can be taken), native update (which keeps z's sampled values
                             compact: the statistics pass does not walk z), the updates of the bucket's matrices
                             in one native call
  RMS passes                 the same without those accumulators: each matrix's native RMS pass right before its
                             update
  compiled update            the update pass compiled by inductor (the statistics pass walks z again)
  native stats, no Prodigy   the Prodigy sums in the compiled sample kernel (a strided walk over g and z)
  inductor RMS               the RMS pass compiled by inductor
  inductor only              no native kernel at all

    python benchmarks/ab_native_stats.py [--set gpt-20m] [--threads 1] [--rounds 8]
"""

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from bench_step import TENSOR_SETS, make_base_tensors, make_params  # noqa: E402

from prodigy_dist import ProdigyPlusScheduleFree, compiled, native  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--set", default="gpt2-124m", choices=sorted(TENSOR_SETS))
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--rounds", type=int, default=8)
args = parser.parse_args()
torch.set_num_threads(args.threads)

base = make_base_tensors(args.set, torch.float32, seed=0)
params = make_params(base)
opt = ProdigyPlusScheduleFree(params, fast_path="compiled")
adamw = torch.optim.AdamW(make_params(base), fused=True)
off = lambda *a, **k: None  # noqa: E731
no_update = lambda *a, **k: False  # noqa: E731
stats, stats_many = native.statistics, native.statistics_many
# name -> replacements of the native kernels and of compiled's expansion predicates (the rest as built), or None for
# AdamW
modes = {
    "all native": {},
    "RMS passes": {"_expansion": lambda b, i: None, "_expansion_all": lambda b: None},
    "compiled update": {"update_sf_factored": no_update, "update_sf_factored_many": no_update},
    "native stats, no Prodigy": {
        "statistics": lambda g, sample=None, extra=None: stats(g, None, extra),
        "statistics_many": lambda gs, sample=None, extra=None: stats_many(gs, None, extra),
        "update_sf_factored": no_update, "update_sf_factored_many": no_update},
    "inductor RMS": {"rms_factored": off, "update_sf_factored": no_update, "update_sf_factored_many": no_update},
    "inductor only": {"statistics": off, "statistics_many": off, "rms_factored": off, "update_sf_factored": no_update,
                      "update_sf_factored_many": no_update},
    "AdamW(fused=True)": None,
}
ORIGINAL = {name: getattr(native, name) for name in ("statistics", "statistics_many", "rms_factored",
                                                     "update_sf_factored", "update_sf_factored_many")}
ORIGINAL.update({name: getattr(compiled, name) for name in ("_expansion", "_expansion_all")})


def use(replacements: dict) -> None:
    for name, kernel in ORIGINAL.items():
        setattr(compiled if name.startswith("_") else native, name, replacements.get(name, kernel))


def run(mode: str, n: int = 6) -> float:
    optimizer = adamw if modes[mode] is None else opt
    if modes[mode] is not None:
        use(modes[mode])
        # (the same gradients every step: d would double every 4 steps and overflow the statistics after ~200 steps;
        # the time of a step does not depend on d)
        for group in opt.param_groups:
            group["d"] = group["d0"]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


for m in modes:
    run(m, 3)  # compile and warm up
results = {m: [] for m in modes}
for _ in range(args.rounds):
    for m in modes:
        results[m].append(run(m))
use({})
fused = statistics.median(results["AdamW(fused=True)"])
print(f"{args.set}: {sum(p.numel() for p in params) / 1e6:.1f}M params, torch {torch.__version__}, "
      f"{args.threads} threads, {args.rounds} rounds")
for m, r in results.items():
    print(f"{m:26s} median {statistics.median(r):7.1f} ms  x fused {statistics.median(r) / fused:5.2f}   rounds "
          + " ".join(f"{x:.0f}" for x in r))
