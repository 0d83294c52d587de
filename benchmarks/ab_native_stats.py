"""A/B/C in one run: the compiled step with the native one-pass statistics kernel (with and without copying out the
Prodigy samples of g in the same pass) against inductor's two-pass statistics, on the parameter shapes of GPT-2
124M, fp32, default options, 2 threads; AdamW(fused=True) timed in the same rounds.

    python benchmarks/ab_native_stats.py
"""

import statistics
import time

import torch

from prodigy_dist import ProdigyPlusScheduleFree, native

torch.set_num_threads(2)
shapes = [(50257, 768), (1024, 768)] + [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(768,)] * 50
params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
opt = ProdigyPlusScheduleFree(params, fast_path="compiled")
adamw = torch.optim.AdamW(params, fused=True)
original = native.row_col_sq_sums
modes = {
    "native, samples copied out": original,
    "native": lambda g, *a: original(g, None),
    "inductor (two passes)": lambda g, *a: None,
    "AdamW(fused=True)": None,
}


def run(mode: str, n: int = 6) -> float:
    optimizer = adamw if modes[mode] is None else opt
    if modes[mode] is not None:
        native.row_col_sq_sums = modes[mode]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


for m in modes:
    run(m, 3)  # compile and warm up
results = {m: [] for m in modes}
for _ in range(8):
    for m in modes:
        results[m].append(run(m))
native.row_col_sq_sums = original
fused = statistics.median(results["AdamW(fused=True)"])
print(f"params {sum(p.numel() for p in params) / 1e6:.1f}M, torch {torch.__version__}, 2 threads")
for m, r in results.items():
    print(f"{m:28s} median {statistics.median(r):7.1f} ms  x fused {statistics.median(r) / fused:5.2f}   rounds "
          + " ".join(f"{x:.0f}" for x in r))
