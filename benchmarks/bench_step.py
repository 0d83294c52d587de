#!/usr/bin/env python
"""Time one optimizer step, side by side, for AdamW and Prodigy + Schedule-Free.

Compared optimizers (any that fails to import or to construct is skipped with a note):

  adamw-foreach  torch.optim.AdamW(params, lr=1e-3, foreach=True)
  adamw-fused    torch.optim.AdamW(params, lr=1e-3, fused=True)
  upstream       prodigyplus.ProdigyPlusScheduleFree(params, lr=1.0)   (prodigy-plus-schedule-free)
  ours           prodigy_dist.ProdigyPlusScheduleFree(params, lr=1.0)  (defaults)
  ours[...]      extra variants of ours, one per --variants flag (keyword arguments)

The parameters are plain ``nn.Parameter`` tensors with the shapes of a GPT-2 style model and a random
``.grad`` (no module, no forward/backward). Every optimizer gets its own copy of the same tensors (same seed).
After a few warm-up steps the optimizers are timed in rounds: each round does one timed ``opt.step()``
per optimizer (the order rotates from round to round), so that machine noise hits all of them alike.
Reported: median ms/step, ratios to both AdamW variants, and optimizer-state bytes per parameter
(every tensor in ``opt.state[p]``, summed, divided by the parameter count; overall and for the
parameters with ndim >= 2 only).

Examples:
  python benchmarks/bench_step.py
  python benchmarks/bench_step.py --sets gpt-20m --dtypes fp32 --steps 3
  python benchmarks/bench_step.py --variants eps=None --variants use_schedulefree=False --out bench.md
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import gc
import io
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
from torch import nn

# Benchmark the working tree's prodigy_dist (repo root), even when it is not installed.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# --------------------------------------------------------------------------------------------------
# Tensor sets
# --------------------------------------------------------------------------------------------------


def gpt_shapes(vocab: int, ctx: int, d: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a GPT-2 style model (HF Conv1D layout: (in, out))."""
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


TENSOR_SETS = {
    # GPT-2 small: 124.4M parameters.
    "gpt2-124m": dict(vocab=50257, ctx=1024, d=768, layers=12),
    # A small GPT: 19.5M parameters.
    "gpt-20m": dict(vocab=8192, ctx=1024, d=384, layers=9),
    # Smaller ones, below 2^24 parameters (compiled.AUTO_CPU_MIN_PARAMS): 16.4M and 1.9M parameters.
    "gpt-16m": dict(vocab=1024, ctx=128, d=384, layers=9),
    "gpt-2m": dict(vocab=1024, ctx=128, d=128, layers=9),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_base_tensors(set_name: str, dtype: torch.dtype, seed: int):
    """Values and gradients, generated once per (set, dtype); every optimizer gets clones.

    Init like GPT-2: weights N(0, 0.02), LayerNorm weights 1, biases 0. Gradients N(0, 1e-2) everywhere.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in gpt_shapes(**TENSOR_SETS[set_name]):
        if len(shape) >= 2:
            value = torch.randn(shape, generator=gen).mul_(0.02)
        elif name.endswith(".weight"):
            value = torch.ones(shape)
        else:
            value = torch.zeros(shape)
        grad = torch.randn(shape, generator=gen).mul_(1e-2)
        out.append((name, value.to(dtype), grad.to(dtype)))
    return out


def make_params(base) -> list[nn.Parameter]:
    params = []
    for _, value, grad in base:
        p = nn.Parameter(value.clone())
        p.grad = grad.clone()
        params.append(p)
    return params


# --------------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------------


class Spec:
    """A named optimizer factory; ``error`` is set when the class could not be imported."""

    def __init__(self, name, factory, error=None, quiet=False):
        self.name = name
        self.factory = factory
        self.error = error
        self.quiet = quiet  # swallow stdout (the published package prints log lines)


def parse_variant(text: str) -> dict:
    """'eps=None,weight_decay=0.1' -> {'eps': None, 'weight_decay': 0.1}."""
    kwargs = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"variant item {item!r} is not key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return kwargs


def build_specs(selected: list[str], variants: list[dict]) -> list[Spec]:
    specs = []
    if "adamw-foreach" in selected:
        specs.append(Spec("AdamW(foreach)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)))
    if "adamw-fused" in selected:
        specs.append(Spec("AdamW(fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)))
    if "upstream" in selected:
        try:
            from prodigyplus import ProdigyPlusScheduleFree as Upstream

            specs.append(Spec("upstream 2.0.1" if _upstream_version() == "2.0.1" else "upstream",
                              lambda ps: Upstream(ps, lr=1.0), quiet=True))
        except Exception as exc:  # noqa: BLE001
            specs.append(Spec("upstream", None, error=f"{type(exc).__name__}: {exc}"))
    if "ours" in selected or variants:
        try:
            from prodigy_dist import ProdigyPlusScheduleFree as Ours

            error = None
        except Exception as exc:  # noqa: BLE001
            Ours, error = None, f"{type(exc).__name__}: {exc}"
        all_variants = ([{}] if "ours" in selected else []) + variants
        for kw in all_variants:
            label = "ours" if not kw else "ours[" + ",".join(f"{k}={v!r}" for k, v in kw.items()) + "]"
            factory = None if Ours is None else (lambda ps, kw=kw: Ours(ps, lr=1.0, **kw))
            specs.append(Spec(label, factory, error=error, quiet=True))
    return specs


def _upstream_version():
    try:
        from importlib.metadata import version

        return version("prodigy-plus-schedule-free")
    except Exception:  # noqa: BLE001
        return None


def quiet_if(flag: bool):
    return contextlib.redirect_stdout(io.StringIO()) if flag else contextlib.nullcontext()


def state_bytes(opt: torch.optim.Optimizer, params) -> tuple[float, float]:
    """Bytes of every tensor in opt.state[p], per parameter: (all params, params with ndim >= 2)."""

    def tensor_bytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(tensor_bytes(o) for o in obj)
        if isinstance(obj, dict):
            return sum(tensor_bytes(o) for o in obj.values())
        return 0

    tot_b = tot_n = mat_b = mat_n = 0
    for p in params:
        b = tensor_bytes(opt.state.get(p, {}))
        tot_b += b
        tot_n += p.numel()
        if p.ndim >= 2:
            mat_b += b
            mat_n += p.numel()
    return tot_b / max(tot_n, 1), mat_b / max(mat_n, 1)


# --------------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------------


class Entry:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.opt = None
        self.params = None
        self.times: list[float] = []
        self.note = None  # reason for n/a
        self.bytes_all = self.bytes_mat = None

    def fail(self, stage: str, exc: BaseException, verbose: bool):
        self.note = f"{stage} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if verbose:
            traceback.print_exc()
        self.free()

    def free(self):
        self.opt = None
        self.params = None


def run_case(specs, set_name, dtype_name, args):
    dtype = DTYPES[dtype_name]
    base = make_base_tensors(set_name, dtype, args.seed)
    n_params = sum(v.numel() for _, v, _ in base)
    n_mat = sum(v.numel() for _, v, _ in base if v.ndim >= 2)

    entries = [Entry(s) for s in specs]
    for e in entries:
        if e.spec.error is not None:
            e.note = "not importable"
            continue
        e.params = make_params(base)
        try:
            with quiet_if(e.spec.quiet):
                e.opt = e.spec.factory(e.params)
        except Exception as exc:  # noqa: BLE001
            e.fail("construct", exc, args.verbose)
            continue
        try:
            with quiet_if(e.spec.quiet):
                for _ in range(args.warmup):
                    e.opt.step()
        except Exception as exc:  # noqa: BLE001
            e.fail("step", exc, args.verbose)
            continue
        e.bytes_all, e.bytes_mat = state_bytes(e.opt, e.params)
    del base
    gc.collect()

    live = [e for e in entries if e.opt is not None]
    for r in range(args.steps):
        k = r % len(live) if live else 0
        for e in live[k:] + live[:k]:  # rotate the order each round
            if e.opt is None:
                continue
            try:
                with quiet_if(e.spec.quiet):
                    t0 = time.perf_counter()
                    e.opt.step()
                    t1 = time.perf_counter()
            except Exception as exc:  # noqa: BLE001
                e.fail("step", exc, args.verbose)
                continue
            e.times.append((t1 - t0) * 1e3)
        if args.verbose:
            print(f"    round {r + 1}/{args.steps} done", flush=True)

    for e in entries:
        e.free()
    gc.collect()
    return entries, n_params, n_mat


def fmt(x, spec="{:.1f}"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def make_table(entries) -> tuple[list[str], list[list[str]]]:
    med = {e.spec.name: (statistics.median(e.times) if e.times and e.note is None else None) for e in entries}
    ref_foreach = med.get("AdamW(foreach)")
    ref_fused = med.get("AdamW(fused)")
    header = ["optimizer", "ms/step (median)", "min", "max", "x AdamW(foreach)", "x AdamW(fused)",
              "state B/param", "state B/param (ndim>=2)"]
    rows = []
    for e in entries:
        if e.spec.error is not None:  # not importable: reported once as a note, not in every table
            continue
        m = med[e.spec.name]
        ok = m is not None
        rows.append([
            e.spec.name,
            fmt(m),
            fmt(min(e.times) if ok else None),
            fmt(max(e.times) if ok else None),
            fmt(m / ref_foreach if ok and ref_foreach else None, "{:.2f}"),
            fmt(m / ref_fused if ok and ref_fused else None, "{:.2f}"),
            fmt(e.bytes_all if ok else None, "{:.2f}"),
            fmt(e.bytes_mat if ok else None, "{:.2f}"),
        ])
    return header, rows


def text_table(header, rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--sets", default="gpt2-124m,gpt-20m", help=f"comma list of {', '.join(TENSOR_SETS)}")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (params and grads)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (rounds) per optimizer (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--optimizers", default="adamw-foreach,adamw-fused,upstream,ours",
                    help="comma list of adamw-foreach, adamw-fused, upstream, ours")
    ap.add_argument("--variants", action="append", default=[], type=parse_variant, metavar="K=V[,K=V...]",
                    help="extra variant of ours with these keyword arguments (repeatable), e.g. "
                         "--variants eps=None --variants use_schedulefree=False,factored=False")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the results as Markdown to this path")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks and per-round progress")
    args = ap.parse_args(argv)

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    selected = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    for s in sets:
        if s not in TENSOR_SETS:
            ap.error(f"unknown set {s!r}; choose from {', '.join(TENSOR_SETS)}")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    for o in selected:
        if o not in ("adamw-foreach", "adamw-fused", "upstream", "ours"):
            ap.error(f"unknown optimizer {o!r}")
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    torch.set_num_threads(args.threads)
    specs = build_specs(selected, args.variants)

    header_line = (f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU: {cpu_model()}, "
                   f"python {platform.python_version()}, date {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, "
                   f"steps {args.steps} (after {args.warmup} warm-up)")
    print(header_line)
    for s in specs:
        if s.error is not None:
            print(f"note: skipping {s.name}: import failed ({s.error})")
    print(flush=True)

    md = ["# Optimizer step benchmark", "", header_line, "",
          "Median wall time of one `opt.step()` (ms); state bytes = all tensors in `opt.state[p]` "
          "divided by the parameter count.", ""]
    for s in specs:
        if s.error is not None:
            md.append(f"- {s.name}: skipped, import failed ({s.error})")
    t_start = time.perf_counter()
    for set_name in sets:
        for dtype_name in dtypes:
            t0 = time.perf_counter()
            entries, n_params, n_mat = run_case(specs, set_name, dtype_name, args)
            title = f"{set_name} {dtype_name}: {n_params / 1e6:.1f}M params ({n_mat / 1e6:.1f}M in ndim>=2)"
            header, rows = make_table(entries)
            notes = [f"{e.spec.name}: {e.note}" for e in entries if e.note and e.spec.error is None]
            print(f"== {title}  [{time.perf_counter() - t0:.0f} s]")
            print(text_table(header, rows))
            for n in notes:
                print(f"   n/a {n}")
            print(flush=True)
            md += ["", f"## {title}", "", md_table(header, rows)]
            if notes:
                md += [""] + [f"- n/a {n}" for n in notes]
            gc.collect()
    print(f"total {time.perf_counter() - t_start:.0f} s")

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(md) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
