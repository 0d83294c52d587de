"""A/B in one run: the compiled step with the native one-pass statistics kernel against inductor's two-pass
statistics, on the parameter shapes of GPT-2 124M (2 threads), with AdamW(fused=True) beside it.

    python benchmarks/ab_native_stats.py
"""
import time, torch, sys, statistics
torch.set_num_threads(2)
from prodigy_dist import ProdigyPlusScheduleFree, native
shapes = [(50257, 768), (1024, 768)] + [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(768,)] * 50
params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
opt = ProdigyPlusScheduleFree(params, fast_path="compiled")
orig = native.row_col_sq_sums
def run(use_native, n=6):
    native.row_col_sq_sums = orig if use_native else (lambda g: None)
    ts = []
    for _ in range(n):
        t = time.perf_counter(); opt.step(); ts.append(time.perf_counter() - t)
    return statistics.median(ts[1:]) * 1e3
run(True, 3); run(False, 3)
res = {True: [], False: []}
for _ in range(4):
    for flag in (True, False):
        res[flag].append(run(flag))
print("params %.1fM" % (sum(p.numel() for p in params) / 1e6))
print("native  ms", ["%.1f" % x for x in res[True]], "median %.1f" % statistics.median(res[True]))
print("inductor ms", ["%.1f" % x for x in res[False]], "median %.1f" % statistics.median(res[False]))
adam = torch.optim.AdamW(params, fused=True)
adam.step(); ts=[]
for _ in range(6):
    t = time.perf_counter(); adam.step(); ts.append(time.perf_counter() - t)
print("AdamW fused ms %.1f" % (statistics.median(ts[1:]) * 1e3))
