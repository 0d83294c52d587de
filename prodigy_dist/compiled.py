"""The compiled fast path: the step of :mod:`prodigy_dist.kernels`, fused into a few passes by ``torch.compile``.

Same contract as :func:`kernels.statistics` / :func:`kernels.update` (a :class:`~kernels.Bucket` of local pieces,
phase A read-only, phase B a generator yielding per-tensor partial sums in the same rounds as the eager path), so it
runs unchanged on one process, DDP replicas and FSDP2 shards. The eager path stays the reference and the fallback.

Passes over memory per parameter of a 2-D tensor (fp32; bf16 halves every figure):

* phase A, factored statistics and Prodigy sample. On a CPU, one native pass (:mod:`prodigy_dist.native`) reads g
  once for the row and column sums of g^2 and, block by block, computes the Prodigy sums on the sampled elements
  (every 11th) with g still in cache: 4 B/param for g plus 4 B/param for z (or y), whose sampled walk at a stride
  of 44 bytes touches every cache line -- except where the previous step's native update left z's new sampled
  values in a compact vector (see phase B): then 4/11 B/param. Unfactored 2-D tensors use the same pass for their
  sum of g^2. A bucket's matrices take one native call (:func:`native.statistics_many`; one process for the
  factored ones). Elsewhere (or if the native build failed) inductor does it in three reads:
  the row sums and the column sums accumulated per block of ROW_BLOCK rows (inductor emits these as two loops: no
  formulation tried -- blocked rows, square tiles, permuted tiles, artificial dependencies for its outer-loop
  fusion -- got it to share one loop between a reduction over rows and one over columns), then one kernel over
  the strided slices of g and z (8 + 8 B/param);
* phase B, StableAdamW on (``eps`` a number): one read of g for the RMS of the update (recomputed, never stored;
  native on a CPU for factored tensors and for Schedule-Free with the full second moment; on one process each
  tensor's right before its update, which then reads g from cache), yield, then one fused pass that reads g, y
  and z and writes y and z (4 + 20 B/param). On a CPU, Schedule-Free tensors (fp32, or bf16 with either rounding;
  ``eps`` a number or None; factored, or with the full second moment) take a native update pass
  (:func:`native.update_sf_factored`, :func:`native.update_sf_full`; a bucket's factored tensors in one call,
  :func:`native.update_sf_factored_many`, which on one process also makes each tensor's RMS pass and divisor right
  before its update: a 20M-parameter GPT, bf16, 2 threads, step -0.75 ms), which also copies z's new values at the
  sampled positions into a compact vector (1/11 of z, from cache) for the next step's statistics: kept out of the
  state, remembered with z's version counter, so that any other write to z (a loaded checkpoint) makes the next
  step walk z again. It costs 4/11 B/param of memory (2/11 in bf16) and saves the walk over z.
  Prodigy mode writes the first moment in the RMS pass and reads it in the update pass; ``factored=False`` does
  the same with the full second moment; ``eps=None`` (Adam-atan2) has no RMS pass. On a CPU a bucket's matrices
  with the full second moment take one native call (:func:`native.update_sf_full_many`), and so do Prodigy mode's
  factored ones (:func:`native.update_prodigy_factored_many`; fp32 and bf16 with either rounding).
  Other bf16 storage with stochastic rounding on a CPU (Prodigy mode's other tensors): the update pass writes each
  chunk's fp32 results (at most TABLE_SIZE elements of y and z: 8 MB, reused) into a buffer that stays in cache,
  and a native kernel rounds them into the bf16 storage with the noise table (inductor's CPU code turns the bit
  casts of the rounding into scalar loops, which made that pass five times slower than rounding to nearest).
  Elsewhere the compiled pass rounds.

Small unfactored tensors (fewer than LIST_MAX elements: norm weights, biases) of a Schedule-Free bucket on a CPU
take native kernels over the whole list instead (:func:`native.statistics_list`, :func:`native.rms_full_sf_list`,
:func:`native.update_sf_full_list`): one call per pass for all of them, the threads splitting the list, each tensor
whole on one thread (a call per tensor and pass costs more than a small tensor's arithmetic; the packed eager kernels
they replaced cost about 35 us per operation from a cold cache: a 20M-parameter GPT's 74 small tensors, 2 threads,
step -0.26 ms in fp32 and -0.54 ms in bf16). On one process their RMS sums are all taken first, then the update
(they fit in cache), so the divisors come from the same vector operations as under a reducer.

Default options: 28 B/param on a CPU, 20 of them read (40 with inductor's statistics; fused AdamW: 28, 16 read).
No parameter-sized temporary is allocated: the largest buffers are the per-thread column sums and the new Prodigy
``s`` (1/11, bf16).

Compiled variants (anything else runs the eager kernels, by design): factored 2-D tensors and unfactored tensors,
fp32 or bf16 storage (stochastic rounding with exactly the noise of :mod:`prodigy_dist.rounding`, or round to
nearest), Schedule-Free or Prodigy mode, ``eps`` a number or ``None``, StableAdamW on/off, any weight decay, SPEED,
``prodigy_steps``. Not compiled: Muon, cautious, Grams, ADOPT, FOCUS, OrthoGrad, bias correction,
``factored_fp32=False``, factored tensors of more than 2 dims, non-contiguous tensors, DeepSpeed fragments.
Results equal the eager path's up to an ulp of fp32 (summation order, fused multiply-adds), and the bf16 roundings
of the eager path are reproduced (``emulate_precision_casts``, and the rounding of scalars that eager bf16 kernels
do), so bf16 weights differ from the eager path's in a few elements per 10^4 by one bf16 ulp.

On a GPU the same Python kernels become Triton code, called over lists of up to LIST_CHUNK tensors (one compiled
call per tensor costs more host time than the GPU needs for the tensor): the sums of g^2 (row and column sums as
two reductions), the Prodigy sample, the RMS pass and the update pass, whose stochastic rounding gathers its noise
from the table in the kernel. The native kernels are CPU-only. The CPU-only rounding details of the eager path
(scalars rounded to bf16 by some CPU kernels) are reproduced on a CPU only, and on a GPU the bf16 roundings of
intermediates are done on the bits (see :func:`_as`).

Compilation cost is kept out of the way: every per-step scalar (d, the coefficients, the rounding stream start)
enters compiled code as a tensor, never as a Python float; each kernel is compiled with dynamic shapes, so one
graph serves every tensor of a rank and dtype (inductor adds a second graph for small tensors: its reductions
specialise on a size range); each variant of each kernel is its own code object, so variants never share the
recompile limit. A list kernel (GPU) has one code object per list length and is compiled without duck shaping,
so any list of as many tensors reuses its graph. A kernel that cannot be compiled (no C++ compiler, a limit hit,
an inductor error) is logged once at warning level and runs the same Python function eagerly. A kernel's
``torch.compile`` wrapper is made on its first call, and a bucket whose every pass runs in the native kernels
(:func:`native_only`) neither probes ``torch.compile`` nor compiles anything.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import types
import weakref
from typing import Callable, Generator, NamedTuple

import torch
import torch.fx.experimental._config as _fx_config

from . import kernels, native
from .kernels import ABS_S, ATAN2_SCALE, DOT, L2SQ, Bucket
from .rounding import TABLE_SIZE, doubled_table, round_with_noise, table_starts
from .rounding import table_starts_many as rounding_starts

logger = logging.getLogger(__name__)

#: ``fast_path`` values accepted by the optimizer.
FAST_PATHS = ("auto", "compiled", "eager")

#: With ``fast_path="auto"`` on a CPU, a bucket that needs inductor's kernels takes the fast path only when the
#: optimizer holds at least this many parameters: compiling costs 10-60 s per variant on a CPU, which pays off only
#: for large models.
AUTO_CPU_MIN_PARAMS = 1 << 24

#: With ``fast_path="auto"`` on a CPU and one process, a bucket whose every pass runs in the native kernels
#: (:func:`native_only`: nothing to compile; the kernels are built once per machine, ~20 s, and cached) takes the
#: fast path from this many parameters on, small tensors included. Measured (BENCHMARKS.md, tenth session, 2
#: threads): GPT shapes of 1.9M parameters step in 5.6 ms instead of the eager path's 23.3, of 16.4M in 18.5 instead
#: of 81.3; below, the first build would take too many steps to pay off in a short script.
AUTO_CPU_NATIVE_MIN_PARAMS = 1 << 20

#: Rows per block of the compiled statistics pass (column partial sums accumulate per block of rows).
ROW_BLOCK = 32

#: On a GPU, every kernel runs in compiled calls over lists of up to LIST_CHUNK tensors. One compiled call costs
#: 100-200 us of host time (guards, wrapper, launches), more than an H100 needs for a pass over a 10M-element
#: tensor: with one call per tensor the GPU idled most of the step (GPT-2 124M, update pass of the 50 matrices:
#: 3.2 ms in 50 calls, 1.0 ms in one call over the list, AdamW(fused) 1.35 ms). Each list length is its own code
#: object (at most LIST_CHUNK graphs per kernel variant); chunks keep the compile time of a graph near that of a few
#: tensors (one graph over 50 tensors took 37 s).
LIST_CHUNK = 8


# ------------------------------------------------------------------------------------------ variants
class Variant(NamedTuple):
    """What a bucket's update needs; every field is a compile-time constant of the kernels."""

    full: bool  # full second moment (else factored, 2-D)
    schedulefree: bool
    atan2: bool  # eps=None
    stable: bool  # StableAdamW RMS scaling
    decay: str  # "none" | "by_lr" | "raw" (weight decay, Schedule-Free) | "scale" (Prodigy mode)
    storage: str  # "fp32" | "sr" (bf16, stochastic rounding) | "rne" (bf16, round to nearest) | "sr_out" (see _store)
    moment_dtype: torch.dtype  # dtype of exp_avg / exp_avg_sq (the storage dtype)


def variant(b: Bucket) -> Variant | None:
    """The compiled variant for bucket ``b``, or None when the bucket runs the eager kernels."""
    group, sc = b.group, b.sc
    if b.muon or group["use_cautious"] or group["use_grams"] or group["use_adopt"] or group["use_focus"] \
            or group["use_orthograd"] or group["use_bias_correction"] or sc["adopt_first"] or sc["raw_update"]:
        return None
    dtype = b.params[0].dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    if _tensor_obstacle(b) is not None:
        return None
    for p, dims, layout in zip(b.params, b.dims, b.layouts):
        if getattr(layout, "fragment", False):  # DeepSpeed ZeRO fragments: eager
            return None
        if dims is not None and p.dim() != 2:
            return None
    if b.kind == "factored":
        st = b.states[0]
        if st["exp_avg_sq_row"].dtype != torch.float32:
            return None
    lam = group["weight_decay"]
    if lam == 0:
        decay = "none"
    elif not group["use_schedulefree"]:
        decay = "scale"
    else:
        decay = "by_lr" if group["weight_decay_by_lr"] else "raw"
    if dtype == torch.float32:
        storage = "fp32"
    else:
        storage = "sr" if group["stochastic_rounding"] else "rne"
    eps = group["eps"]
    return Variant(full=b.kind == "full", schedulefree=group["use_schedulefree"], atan2=eps is None,
                   stable=group["use_stableadamw"] and eps is not None, decay=decay, storage=storage,
                   moment_dtype=dtype)


def _native_schedulefree(V: Variant) -> bool:
    """Whether the native Schedule-Free kernels (prodigy_dist.native: the update passes, their list forms) take
    variant ``V``: Schedule-Free, fp32 or bf16 storage."""
    return V.schedulefree and V.storage in ("fp32", "sr", "rne")


def _tensor_obstacle(b: Bucket) -> str | None:
    """Why a tensor of bucket ``b`` keeps the bucket off the compiled kernels (a layout of its memory they do not
    take), or None."""
    dtype = b.params[0].dtype
    for p, g in zip(b.params, b.grads):
        if g.dtype != dtype:
            return f"a gradient of dtype {g.dtype} for a parameter of dtype {dtype}"
        if not p.is_contiguous() or not g.is_contiguous():
            return f"a non-contiguous parameter or gradient of shape {tuple(p.shape)}"
    return None


_obstacles_logged: set[str] = set()


# ------------------------------------------------------------------------------------------ compilation
class _Kernel:
    """A Python function, compiled once per process with dynamic shapes; runs eagerly (logged once) if it can't be.

    ``name`` becomes the code object's name: each kernel variant has its own code object, hence its own cache
    entries and recompile budget, and shows up under that name in TORCH_LOGS output.
    """

    def __init__(self, name: str, fn: Callable, duck_shape: bool = True):
        code = fn.__code__.replace(co_name=name)
        self.fn = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        self.name = name
        self.compiled: Callable | None = None  # (made on the first call: torch.compile imports dynamo, ~1.3 s)
        self.failed = False
        self.duck_shape = duck_shape

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.compiled is None:
                    # emulate_precision_casts: keep the explicit bf16 roundings of intermediate values (inductor
                    # would otherwise compute through them in fp32 and differ from the eager path)
                    self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True,
                                                  options={"emulate_precision_casts": True})
                if self.duck_shape:
                    return self.compiled(*args)
                # no duck shaping: sizes that happen to be equal get no guard tying them together, so that a list
                # call (GPU) is reused by any list of as many tensors, whatever their shapes
                old, _fx_config.use_duck_shape = _fx_config.use_duck_shape, False
                try:
                    return self.compiled(*args)
                finally:
                    _fx_config.use_duck_shape = old
            except Exception as exc:  # compilation failed or a recompile limit was hit: never silently
                self.failed = True
                logger.warning("prodigy_dist: torch.compile of %s failed (%s: %s); this kernel runs eagerly "
                               "from now on (slower, same results)", self.name, type(exc).__name__,
                               str(exc).splitlines()[0] if str(exc) else "")
        return self.fn(*args)


_kernels: dict[tuple, _Kernel] = {}


def _kernel(name: str, fn: Callable, key: tuple) -> _Kernel:
    """The kernel ``fn`` compiled for ``key`` (cached); list kernels (names ending in "_list") without duck shaping."""
    k = _kernels.get((name,) + key)
    if k is None:
        tag = "_".join(str(v).replace("torch.", "") for v in key)
        k = _kernels[(name,) + key] = _Kernel(f"{name}__{tag}", fn, duck_shape=not name.endswith("_list"))
    return k


_available: dict[str, bool] = {}


def available(device: torch.device) -> bool:
    """Whether torch.compile works on ``device`` (tried once per device type; a failure is logged once)."""
    kind = device.type
    if kind not in _available:
        ok, why = True, ""
        if kind == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None \
                and shutil.which("clang++") is None:
            ok, why = False, "no C++ compiler found (inductor needs one on a CPU)"
        if ok:
            try:
                probe = torch.compile(_probe, dynamic=True, fullgraph=True)
                probe(torch.ones(3, device=device))
            except Exception as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
        if not ok:
            logger.warning("prodigy_dist: the compiled fast path is unavailable on %s (%s); the eager path is used",
                           kind, why)
        _available[kind] = ok
    return _available[kind]


def _probe(x):
    return x * 2 + 1


def choose(b: Bucket, fast_path: str, total_params: Callable[[], int], alone: bool, packable: bool = False) -> bool:
    """Whether bucket ``b`` runs the compiled kernels.

    ``"eager"``: never. ``"compiled"``: every supported bucket. ``"auto"``: supported buckets, except, on one process,
    the buckets of small tensors (they stay in the eager kernels, packed where they can be: one compiled call per
    tensor costs more than it saves there), and, on a CPU, except when the optimizer holds fewer than
    AUTO_CPU_MIN_PARAMS parameters (compile time would not pay off). A bucket that can be packed
    (``packable``, prodigy_dist.packing) runs the packed eager kernels, a few passes over its elements, unless every
    piece takes the native list kernels (:func:`_listed`: a CPU, small unfactored Schedule-Free pieces), one call
    per pass for all of them. A packed bucket is never compiled. Where nothing needs compiling (:func:`native_only`)
    none of that holds back a bucket: ``"auto"`` takes it, small tensors included, from AUTO_CPU_NATIVE_MIN_PARAMS
    parameters on, and torch.compile is not even probed.
    """
    if fast_path == "eager" or b.pack is not None:
        return False
    V = variant(b)
    if V is None:
        # options the compiled kernels do not take are documented; a tensor's memory layout would be a surprise
        obstacle = _tensor_obstacle(b)
        if obstacle is not None and obstacle not in _obstacles_logged:
            _obstacles_logged.add(obstacle)
            logger.info("prodigy_dist: %d tensors run the eager kernels instead of the compiled fast path: %s "
                        "(logged once)", len(b.params), obstacle)
        return False
    device = b.params[0].device
    small_model = fast_path == "auto" and device.type == "cpu" and total_params() < AUTO_CPU_MIN_PARAMS
    if small_model and total_params() < AUTO_CPU_NATIVE_MIN_PARAMS:
        return False
    natively = native_only(b, V)
    if small_model and not natively:
        return False
    if not natively and (packable or (fast_path == "auto" and alone and b.scratch is None)):
        lists = V.full and _native_schedulefree(V) and len(_listed(b)) == len(b.params)
        if not lists:
            return False
    if not natively and not available(device):  # (native kernels alone need no torch.compile)
        return False
    b.variant = V
    return True


def native_only(b: Bucket, V: Variant) -> bool:
    """Whether every pass of bucket ``b`` (variant ``V``) runs in the native kernels, so that nothing is compiled:
    a CPU, one process, the kernels built; Schedule-Free with fp32 or bf16 storage (factored 2-D tensors, or
    unfactored ones that are 2-D or small enough for the list kernels), or Prodigy mode with factored 2-D tensors;
    with stochastic rounding, rows of at most TABLE_SIZE elements. tests/test_compiled.py holds this to the passes
    that run."""
    if not b.alone or _on_gpu(b) or V.storage not in ("fp32", "sr", "rne"):
        return False
    if V.full:
        if not V.schedulefree or not all(g.dim() == 2 or g.numel() < LIST_MAX for g in b.grads):
            return False
    elif not all(g.dim() == 2 for g in b.grads):
        return False
    if V.storage == "sr" and any((g.shape[-1] if g.dim() >= 2 else g.numel()) > TABLE_SIZE for g in b.grads):
        return False
    return native.available()


def merge(buckets: list[Bucket]) -> list[Bucket]:
    """Merge the compiled single-tensor buckets of one group and kind into one bucket.

    On one process the eager path steps each large tensor in a bucket of its own (for its scratch buffers); the
    compiled kernels need no scratch, and one bucket per group and kind runs the per-bucket work (the Prodigy
    sample, the scalars, the stacking of per-tensor sums) once instead of once per tensor. The d statistics are
    summed in parameter order whatever the bucketing, so results do not change.
    """
    merged: dict[tuple, Bucket] = {}
    out: list[Bucket] = []
    for b in buckets:
        if b.impl is not sys.modules[__name__] or b.scratch is None:
            out.append(b)
            continue
        key = (id(b.group), b.kind, b.muon, b.params[0].dtype, b.params[0].device)
        m = merged.get(key)
        if m is None:
            m = merged[key] = Bucket(group=b.group, sc=b.sc, kind=b.kind, muon=b.muon, params=[], grads=[],
                                     states=[], layouts=[], dims=[], sr_seed=b.sr_seed, impl=b.impl,
                                     alone=b.alone, variant=b.variant)
            out.append(m)
        m.params += b.params
        m.grads += b.grads
        m.states += b.states
        m.layouts += b.layouts
        m.dims += b.dims
        m.positions += b.positions
    return out


# ------------------------------------------------------------------------------------------ the kernels
def _stats_2d(g):
    """Sums of g^2 along dim 1 and along dim 0 of the whole blocks of ROW_BLOCK rows of a 2-D tensor (fp32).

    The column sums are accumulated per block of ROW_BLOCK rows (a contiguous walk) and the block sums added at the
    end, instead of walking whole columns with a stride. The last ``rows % ROW_BLOCK`` rows are left to the caller.
    """
    m, n = g.shape
    blocks = m // ROW_BLOCK
    sq = g[:blocks * ROW_BLOCK].float().square()
    return sq.sum(1), sq.view(blocks, ROW_BLOCK, n).sum(1).sum(0)


def _sample_pass(gs, ds, p0, s, sv, speed: bool):
    """The Prodigy statistics of one tensor on its sampled slice (every 11th element; ``gs`` and ``ds`` are strided
    views of the gradient and of z or y): dot(g, p0 - x), then sum|s_new| and s_new, or SPEED's |p0 - x| norms.
    Intermediates are rounded like the eager path's (p0 and s are bf16 for fp32 parameters)."""
    e_dtype = torch.promote_types(p0.dtype, ds.dtype)
    e = _as(p0.float() - ds.float(), e_dtype)
    dot = _as((_as(gs.float(), e_dtype) * e).sum(), e_dtype)
    if speed:
        return dot, e.abs().sum(), (e * e).sum(), None
    s1 = _as(s.float() * sv[0], s.dtype)
    if gs.dtype == s.dtype and s.dtype != torch.float32 and gs.device.type == "cpu":
        # on a CPU, the eager add_ of a strided bf16 tensor with alpha rounds alpha, then alpha * g, to bf16
        s_new = _as(s1 + _as(gs.float() * _as(sv[1], s.dtype), s.dtype), s.dtype)
    else:
        s_new = _as(s1 + gs.float() * sv[1], s.dtype)
    return dot, s_new.abs().sum(), None, s_new.to(s.dtype)


def _as(x, dtype: torch.dtype):
    """``x`` rounded to ``dtype`` (round to nearest) and back to fp32: the eager path's intermediate roundings.

    On a GPU the rounding to bf16 is done on the bits (round to nearest even; NaN kept): Triton code elided the
    round trip through bf16 of some intermediates, ``emulate_precision_casts`` notwithstanding (the new Prodigy
    ``s`` of an fp32 tensor differed from the eager path's in 6-12% of its elements on an H100)."""
    if dtype == torch.float32:
        return x
    if not _bit_rounding(x) or dtype != torch.bfloat16 or x.dtype != torch.float32:
        return x.to(dtype).float()
    bits = x.view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return torch.where(x.isnan(), x, bits.view(torch.float32))


def _bit_rounding(x) -> bool:
    """Whether :func:`_as` rounds on the bits (everywhere but on a CPU; a test forces it on a CPU)."""
    return x.device.type != "cpu"


def _sq_sums_list(gs, factored: bool):
    """Per tensor of a list (GPU): (sums of g^2 along dim 1, along dim 0) of a 2-D tensor, or (sum of g^2,)."""
    out = []
    for g in gs:
        sq = g.float().square()
        out.append((sq.sum(1), sq.sum(0)) if factored else (sq.sum(),))
    return out


def _sample_list(gss, dss, p0s, ss, sv, speed: bool):
    """:func:`_sample_pass` over a list of tensors (GPU)."""
    return [_sample_pass(gs, ds, p0, s, sv, speed) for gs, ds, p0, s in zip(gss, dss, p0s, ss)]


def _moments(g, m, v, s, V: Variant):
    """The new first moment (Prodigy mode) and full second moment, fp32 values rounded like their storage."""
    m_new = v_new = None
    if not V.schedulefree:
        m_new = _as(_as(m.float() * s[_BETA1], V.moment_dtype) + g * s[_M_ALPHA], V.moment_dtype)
    if V.full:
        v_new = _as(_as(v.float() * s[_BETA2], V.moment_dtype) + (g * g) * s[_V_ALPHA], V.moment_dtype)
    return m_new, v_new


def _direction(g, a, c, m_new, v_new, s, V: Variant):
    """The normalised update before StableAdamW scaling (fp32)."""
    if V.full:
        den = _as(v_new.sqrt(), V.moment_dtype)
        if not V.atan2:
            # (torch._foreach_add_ of a Python scalar to bf16 tensors rounds the scalar to bf16 first on a CPU, not
            # on a GPU)
            eps_term = _as(s[_EPS_TERM], V.moment_dtype) if g.device.type == "cpu" else s[_EPS_TERM]
            den = _as(den + eps_term, V.moment_dtype)
    else:
        den = a[:, None] * c[None, :]  # sqrt(r_i c_j) as sqrt(r_i) sqrt(c_j): no square root per element
        if not V.atan2:
            den = den + s[_EPS_TERM]
    num = g * s[_D] if V.schedulefree else m_new
    if V.atan2:
        return torch.atan2(num, den) * ATAN2_SCALE
    return num / den


def _rms_pass(g, a, c, m, v, s, V: Variant):
    """Sum of the squared update (StableAdamW); writes the new first/second moment when they are stored."""
    g = g.float()
    m_new, v_new = _moments(g, m, v, s, V)
    u = _direction(g, a, c, m_new, v_new, s, V)
    if m_new is not None:
        m.copy_(m_new)
    if v_new is not None:
        v.copy_(v_new)
    return (u * u).sum()


def _store(target, value, aux, V: Variant):
    """Write an fp32 result: to fp32 storage, to bf16 storage rounded to nearest or stochastically (``aux``: the
    noise), or, for "sr_out", to the fp32 buffer ``aux``, which the caller rounds stochastically (native.py)."""
    if V.storage == "sr":
        target.copy_(round_with_noise(value, aux))
    elif V.storage == "sr_out":
        aux.copy_(value)
    else:
        target.copy_(value)


def _update_pass(g, a, c, m, v, y, z, scale, s, aux_y, aux_z, V: Variant, moments_done: bool):
    """The update: direction (scaled by the StableAdamW factor ``scale``), weight decay, Schedule-Free
    interpolation or Prodigy step; writes y (the parameter) and z in place (``aux_*``: see :func:`_store`)."""
    g = g.float()
    if moments_done:  # the RMS pass stored them
        m_new = m.float() if m is not None else None
        v_new = v.float() if v is not None else None
    else:
        m_new, v_new = _moments(g, m, v, s, V)
        if m_new is not None:
            m.copy_(m_new)
        if v_new is not None:
            v.copy_(v_new)
    def direction():  # built once per use, so that inductor fuses it into each consumer instead of storing it
        u = _direction(g, a, c, m_new, v_new, s, V)
        return u / scale if V.stable else u

    u = direction()
    y32 = y.float()
    if V.schedulefree:
        z32 = z.float()
        if V.decay == "by_lr":
            u = u + y32 * s[_LAM]
        u2 = direction()
        if V.decay == "by_lr":
            u2 = u2 + y32 * s[_LAM]
        y_new = torch.lerp(y32, z32, s[_C])
        z_new = z32 + u * s[_NEG_DLR]
        y_new = y_new + u2 * s[_NEG_DLR_XY]
        if V.decay == "raw":
            z_new = z_new + y32 * s[_NEG_LAM]
            y_new = y_new + y32 * s[_NEG_LAM_XY]
        _store(z, z_new, aux_z, V)
    else:
        y_new = y32 * s[_KEEP] if V.decay == "scale" else y32
        y_new = y_new + u * s[_NEG_DLR]
    _store(y, y_new, aux_y, V)


def _rms_list(gs, as_, cs, ms, vs, s, V: Variant):
    """:func:`_rms_pass` over a list of tensors (GPU): their sums of the squared update, stacked."""
    return torch.stack([_rms_pass(g, a, c, m, v, s, V) for g, a, c, m, v in zip(gs, as_, cs, ms, vs)])


def _update_list(gs, as_, cs, ms, vs, ys, zs, scales, s, table, starts, V: Variant, moments_done: bool):
    """:func:`_update_pass` over a list of tensors (GPU). Stochastic rounding: element f of tensor i takes the
    noise table[(starts[i, stream] + f) % TABLE_SIZE], gathered in the kernel (the table stays in the GPU's L2)."""
    for i, (g, a, c, m, v, y, z, scale) in enumerate(zip(gs, as_, cs, ms, vs, ys, zs, scales)):
        aux_y = aux_z = None
        if V.storage == "sr":
            index = torch.arange(y.numel(), device=y.device).view(y.shape)
            aux_y = table[(starts[i, 0] + index) % TABLE_SIZE]
            if z is not None:
                aux_z = table[(starts[i, 1] + index) % TABLE_SIZE]
        _update_pass(g, a, c, m, v, y, z, scale, s, aux_y, aux_z, V, moments_done)


def _derived(b: Bucket, name: str, make: Callable[[], object]):
    """``b.derived[name]``, made by ``make()`` on first use: only for what follows from the bucket's layouts, dims and
    sizes (which stay the same for as long as the optimizer reuses the bucket)."""
    value = b.derived.get(name)
    if value is None:
        value = b.derived[name] = make()
    return value


def _numels(b: Bucket) -> list[int]:
    """The global element count of each piece."""
    return _derived(b, "numels", lambda: [lay.global_numel for lay in b.layouts])


def _slice_starts(b: Bucket) -> list[int]:
    """Each piece's first sampled local element (its layout's slice_start)."""
    return _derived(b, "slice_starts", lambda: [lay.slice_start for lay in b.layouts])


def _on_gpu(b: Bucket) -> bool:
    """Whether the bucket's kernels run in list calls (any device but the CPU)."""
    return not b.params[0].is_cpu


def _chunks(b: Bucket, indices) -> list[list[int]]:
    """``indices`` in lists of at most LIST_CHUNK on a GPU, one by one on a CPU."""
    indices = list(indices)
    size = LIST_CHUNK if _on_gpu(b) else 1
    return [indices[i:i + size] for i in range(0, len(indices), size)]


# Positions in the per-bucket scalar vector (fp32, on the bucket's device).
_D, _EPS_TERM, _BETA1, _M_ALPHA, _BETA2, _V_ALPHA, _C, _NEG_DLR, _NEG_DLR_XY, _LAM, _NEG_LAM, _NEG_LAM_XY, \
    _KEEP = range(13)


def _scalars(b: Bucket) -> torch.Tensor:
    """The step's scalars as one fp32 tensor (computed in double precision like the eager path's Python floats); made
    once per group, step and device (the buckets of a group share its step scalars ``b.sc``), and only read."""
    group, sc = b.group, b.sc
    device = b.params[0].device
    made = sc.get("_tensor")
    if made is not None and made.device == device:
        return made
    d, beta1, beta2, dlr = sc["d"], sc["beta1"], sc["beta2"], sc["dlr"]
    lam = group["weight_decay"]
    c, xy = sc.get("c", 0.0), sc.get("xy", 1.0)
    eps = group["eps"]
    decay = lam * (dlr if group["weight_decay_by_lr"] else 1.0)
    values = [d, d * eps if eps is not None else 0.0, beta1, (1 - beta1) * d, beta2, (1 - beta2) * d * d, c, -dlr,
              -dlr * xy, lam, -lam, -lam * xy, 1 - decay]
    sc["_tensor"] = made = torch.tensor(values, dtype=torch.float32, device=device)
    return made


# ------------------------------------------------------------------------------------------ phase A
def _row_col(b: Bucket, i: int, dr: int, dc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factored statistics of the 2-D piece ``i``: (sum of g^2 over dr, over dc), keepdim, fp32.

    On a CPU the native one-pass kernel of :mod:`prodigy_dist.native` computes both (inductor reads the tensor
    twice). Elsewhere, or if it could not be built, the compiled kernel takes the whole blocks of ROW_BLOCK rows and
    the last few rows are added eagerly (so the kernel's row count is always a multiple of the block and one graph
    serves every shape).
    """
    g = b.grads[i]
    sums = _native_pass(b, i)
    if sums is not None:
        return _oriented(*sums, dr)
    main = g.shape[0] - g.shape[0] % ROW_BLOCK
    if main:
        rows, cols = _kernel("prodigy_stats", _stats_2d, (g.dtype,))(g)
    if main < g.shape[0]:
        tail = g[main:].float().square()
        tail_rows, tail_cols = tail.sum(1), tail.sum(0)
        rows, cols = (torch.cat([rows, tail_rows]), cols + tail_cols) if main else (tail_rows, tail_cols)
    return _oriented(rows, cols, dr)


def _row_col_all(b: Bucket) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None:
    """:func:`_row_col` of every piece of the factored bucket ``b`` from one native call on one process (CPU, no
    piece a fragment), with their Prodigy statistics (into ``b.prodigy_rows``) and StableAdamW accumulators: the
    per-piece Python work and calls of a 20M-parameter GPT's 38 matrices cost ~1 ms a step from a cold cache.
    Returns (sums over dr, sums over dc, sums of g^2), or None where that does not apply."""
    if not (b.alone and native.available()) or _on_gpu(b) or any(lay.fragment for lay in b.layouts):
        return None
    sample = None
    if b.sc["prodigy_active"] and not b.sc["adopt_first"]:
        sample = _many_sample(b, range(len(b.grads)))
        if sample is None:
            return None
    expansion = _expansion_all(b)
    out = native.statistics_many(b.grads, sample, expansion)
    if out is None:
        return None
    sums, rows, cols, s_new, accumulators = out
    if sample is not None:
        b.prodigy_rows = (sums[:, :3], s_new)
    if accumulators is not None:
        b.expansions = dict(enumerate(accumulators))
    # (as _oriented: the native pass returns them keepdim)
    drs = _derived(b, "drs", lambda: [dr for dr, _ in b.dims])
    return ([c if dr == 0 else r for r, c, dr in zip(rows, cols, drs)],
            [r if dr == 0 else c for r, c, dr in zip(rows, cols, drs)], sums[:, 3])


def _many_sample(b: Bucket, idx) -> tuple | None:
    """What native.statistics_many needs for the Prodigy statistics of the pieces ``idx`` (per field: the sample
    starts, the sampled tensors (z, or the parameters without Schedule-Free), p0, s (None with SPEED), beta3, delta,
    and z's compact samples where the native update left them), or None where they are not wanted (no ``p0``)."""
    sc, group = b.sc, b.group
    if not (sc["prodigy_active"] and not sc["adopt_first"]):
        return None
    idx = list(idx)
    states = [b.states[i] for i in idx]
    if not all("p0" in st for st in states):
        return None
    p0s = [st["p0"] for st in states]
    slice_starts = _slice_starts(b)
    starts = [slice_starts[i] for i in idx]
    if group["use_schedulefree"]:
        data = [st["z"] for st in states]
        compacts = [_recalled_samples(z, start) for z, start in zip(data, starts)]
        compacts = [c if c is None or c.numel() == p0.numel() else None for c, p0 in zip(compacts, p0s)]
    else:
        data = [kernels.prodigy_data(b, i) for i in idx]
        compacts = [None] * len(idx)
    ss = None if group["use_speed"] else [st["s"] for st in states]
    return starts, data, p0s, ss, sc["beta3"], sc["delta"], compacts


def _oriented(rows: torch.Tensor, cols: torch.Tensor, dr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D piece's sums of g^2 along dim 1 (``rows``) and dim 0 (``cols``) as row_col returns them: (sum over
    dr, sum over dc), keepdim."""
    if rows.dim() == 1:  # (the native pass returns them keepdim already)
        rows, cols = rows.view(-1, 1), cols.view(1, -1)
    return (cols, rows) if dr == 0 else (rows, cols)


def _sq_norms(b: Bucket) -> list[torch.Tensor] | torch.Tensor:
    """Sums of g^2 of an unfactored bucket: for its small tensors on a CPU from one native call over the list
    (:func:`_listed`), for 2-D pieces on a CPU from the native pass (one call for all of them); both compute the
    Prodigy statistics in the same read of g (the column sums the native pass also returns are not needed here)."""
    listed = _listed(b)
    if len(listed) == len(b.grads):
        return _list_statistics(b, listed, every=True)
    out: list[torch.Tensor | None] = [None] * len(b.grads)
    if listed:
        for i, t in zip(listed, _list_statistics(b, listed, every=False).unbind(0)):
            out[i] = t
    many = [i for i, g in enumerate(b.grads) if out[i] is None and g.dim() == 2]
    if many and native.available():
        wanted = b.sc["prodigy_active"] and not b.sc["adopt_first"]
        sample = _many_sample(b, many) if wanted else None
        if sample is not None or not wanted:  # (else piece by piece below)
            result = native.statistics_many([b.grads[i] for i in many], sample)
            if result is not None:
                sums, _, _, s_new, _ = result
                for j, i in enumerate(many):
                    out[i] = sums[j, 3]
                    if sample is not None:
                        b.prodigy_parts[i] = (sums[j, :3], s_new[j] if s_new is not None else None)
    for i, g in enumerate(b.grads):
        if out[i] is not None:
            continue
        sums = _native_pass(b, i) if g.dim() == 2 else None
        if sums is not None:
            out[i] = sums[0].sum()
    rest = [i for i, t in enumerate(out) if t is None]
    if rest:
        norms = torch._foreach_norm([b.grads[i] for i in rest], dtype=torch.float32)
        for i, t in zip(rest, norms):
            out[i] = t.square()
    return out


#: On a CPU, the tensors of an unfactored bucket with fewer elements than this (norm weights, biases) take native
#: kernels over the whole list, one call per pass (:func:`native.statistics_list`, :func:`native.rms_full_sf_list`,
#: :func:`native.update_sf_full_list`): a call per tensor and pass costs more than a small tensor's arithmetic.
LIST_MAX = 1 << 16


def _listed(b: Bucket) -> list[int]:
    """The pieces of bucket ``b`` that take the native list kernels (CPU, unfactored, fewer than LIST_MAX
    elements, the kernels built)."""
    if b.kind != "full" or _on_gpu(b) or not native.available():
        return []
    return _derived(b, "listed", lambda: [i for i, p in enumerate(b.params) if p.numel() < LIST_MAX])


def _list_statistics(b: Bucket, listed: list[int], every: bool) -> torch.Tensor:
    """The sums of g^2 of the pieces ``listed`` from one native call (a vector), which also computes their Prodigy
    statistics: into ``b.prodigy_rows`` if ``every`` piece of the bucket is listed, else into ``b.prodigy_parts``."""
    sc, states = b.sc, b.states
    sample = None
    if sc["prodigy_active"] and not sc["adopt_first"] and all("p0" in states[i] for i in listed):
        speed = b.group["use_speed"]
        slice_starts = _slice_starts(b)
        sample = ([kernels.prodigy_data(b, i) for i in listed], [states[i]["p0"] for i in listed],
                  None if speed else [states[i]["s"] for i in listed], [slice_starts[i] for i in listed],
                  sc["beta3"], sc["delta"])
    sq, sums, s_new = native.statistics_list([b.grads[i] for i in listed], sample)
    if sample is not None:
        if every:
            b.prodigy_rows = (sums, s_new)
        else:
            for j, (i, row) in enumerate(zip(listed, sums.unbind(0))):
                b.prodigy_parts[i] = (row, s_new[j] if s_new is not None else None)
    return sq


def _native_pass(b: Bucket, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Piece ``i``'s sums of g^2 along dim 1 and along dim 0 from the native pass (on a CPU), which computes its
    Prodigy statistics in the same read of g and leaves them in ``b.prodigy_parts``; None where it does not apply."""
    if b.grads[i].device.type != "cpu":
        return None
    expansion = _expansion(b, i)
    sums = native.statistics(b.grads[i], _native_sample(b, i), expansion)
    if sums is None:
        return None
    rows, cols, prodigy, s_new = sums[:4]
    if prodigy is not None:
        b.prodigy_parts[i] = (prodigy, s_new)
    if expansion is not None:
        b.expansions[i] = sums[4]
    return rows, cols


def _expansion_scalars(b: Bucket) -> tuple[float, float, float] | None:
    """Where the native statistics pass of the factored bucket ``b`` leaves the accumulators of its pieces'
    StableAdamW divisors (native.factors explains them), its scalars (beta2, alpha, 1 / d^2): where the update takes
    each piece's RMS pass right before its update (one process, the native Schedule-Free update), which they then
    spare. None elsewhere."""
    if not (b.alone and b.kind == "factored"):
        return None
    V = b.variant
    if V is None or not (V.stable and _native_schedulefree(V)):
        return None
    d, beta2 = b.sc["d"], b.sc["beta2"]
    inv_d2 = 1.0 / (d * d) if d > 0 else math.inf
    if not inv_d2 < _FP32_MAX:
        return None
    return beta2, (1 - beta2) * d * d, inv_d2


def _expansion_parts(b: Bucket) -> tuple[list[str], list[float]]:
    """Per piece, the state name of the moment of the factor indexed by g's rows, and 1 / g's column count."""
    return _derived(b, "expansion", lambda: (
        ["exp_avg_sq_row" if dr_dc[1] == 0 else "exp_avg_sq_col" for dr_dc in b.dims],
        [1.0 / lay.global_shape[1] for lay in b.layouts]))


def _expansion_moment(b: Bucket, i: int) -> tuple[torch.Tensor, float]:
    """Piece ``i``'s part of its expansion: the moment of the factor indexed by g's rows, and 1 / its column count."""
    names, inv_cols = _expansion_parts(b)
    return b.states[i][names[i]], inv_cols[i]


def _expansion(b: Bucket, i: int) -> tuple | None:
    """What native.statistics needs for piece ``i``'s accumulators (:func:`_expansion_scalars`), or None."""
    scalars = _expansion_scalars(b)
    if scalars is None:
        return None
    beta2, alpha, inv_d2 = scalars
    moment, inv_cols = _expansion_moment(b, i)
    return moment, beta2, alpha, inv_cols, inv_d2


def _expansion_all(b: Bucket) -> tuple | None:
    """What native.statistics_many needs for every piece's accumulators (:func:`_expansion_scalars`), or None."""
    scalars = _expansion_scalars(b)
    if scalars is None:
        return None
    beta2, alpha, inv_d2 = scalars
    names, inv_cols = _expansion_parts(b)
    return [st[name] for st, name in zip(b.states, names)], beta2, alpha, inv_cols, inv_d2


_FP32_MAX = torch.finfo(torch.float32).max


def _native_sample(b: Bucket, i: int) -> tuple | None:
    """What the native statistics pass needs to compute piece ``i``'s Prodigy statistics too (None: not wanted):
    :func:`_many_sample` of that piece alone."""
    sample = _many_sample(b, (i,))
    if sample is None:
        return None
    starts, data, p0s, ss, beta3, delta, compacts = sample
    return starts[0], data[0], p0s[0], ss[0] if ss is not None else None, beta3, delta, compacts[0]


def _prodigy_sample(b: Bucket, stats: torch.Tensor) -> None:
    """Compiled replacement of kernels._prodigy_sample: the sums the native statistics pass already computed, else
    one fused kernel per tensor over its sampled slice."""
    sc, group = b.sc, b.group
    speed = group["use_speed"]
    n = len(b.params)
    if b.prodigy_rows is None and len(b.prodigy_parts) == n:  # every piece's from its native pass: one stack
        parts = [b.prodigy_parts[i] for i in range(n)]
        b.prodigy_rows = (torch.stack([part[0] for part in parts]), None if speed else [part[1] for part in parts])
    if b.prodigy_rows is not None:  # every piece's, from one native call (_list_statistics) or stacked above
        sums, s_new = b.prodigy_rows
        data_dtype = kernels.prodigy_data(b, 0).dtype
        stats[:, DOT] = sums[:, 0] if data_dtype == torch.float32 else sums[:, 0].to(data_dtype).float()
        stats[:, ABS_S] = sums[:, 1]
        if speed:
            stats[:, L2SQ] = sums[:, 2]
        else:
            b.s_new = s_new
        return
    sv = torch.tensor([sc["beta3"], sc["delta"]], dtype=torch.float32, device=stats.device)
    outs: list = [None] * len(b.params)
    rest = []
    for i in range(len(b.params)):
        part = b.prodigy_parts.get(i)
        if part is None:
            rest.append(i)
            continue
        sums, s_new = part
        data = kernels.prodigy_data(b, i)
        dot = sums[0] if data.dtype == torch.float32 else sums[0].to(data.dtype).float()  # the bf16 dot
        outs[i] = (dot, sums[1], sums[2], s_new)
    for idx in _chunks(b, rest):
        i0 = idx[0]
        key = (b.grads[i0].dtype, kernels.prodigy_data(b, i0).dtype, b.states[i0]["p0"].dtype, speed)
        args = ([kernels.sample(b.grads[i], b.layouts[i]) for i in idx],
                [kernels.sample(kernels.prodigy_data(b, i), b.layouts[i]) for i in idx],
                [b.states[i]["p0"] for i in idx], [b.states[i].get("s") for i in idx])
        if len(idx) == 1 and not _on_gpu(b):
            outs[i0] = _kernel("prodigy_sample", _sample_pass, key)(*(a[0] for a in args), sv, speed)
            continue
        results = _kernel("prodigy_sample_list", _sample_list, key + (len(idx),))(*args, sv, speed)
        for i, r in zip(idx, results):
            outs[i] = r
    stats[:, DOT] = torch.stack([o[0] for o in outs]).float()
    stats[:, ABS_S] = torch.stack([o[1] for o in outs])
    if speed:
        stats[:, L2SQ] = torch.stack([o[2] for o in outs])
    else:
        b.s_new = [o[3] for o in outs]


@torch.no_grad()
def statistics(b: Bucket) -> list[torch.Tensor]:
    """Phase A (same contract as :func:`kernels.statistics`), with the compiled factored statistics and Prodigy
    sample."""
    if not _on_gpu(b):
        return kernels.statistics(b, row_col=_row_col, prodigy_sample=_prodigy_sample, sq_norms=_sq_norms,
                                  row_col_all=_row_col_all)
    # on a GPU: the sums of g^2 of the whole bucket first, in list calls
    factored = b.kind == "factored"
    sums: list = [None] * len(b.grads)
    for idx in _chunks(b, range(len(b.grads))):
        k = _kernel("prodigy_sq_sums_list", _sq_sums_list, (b.grads[idx[0]].dtype, factored, len(idx)))
        for i, r in zip(idx, k([b.grads[i] for i in idx], factored)):
            sums[i] = r

    return kernels.statistics(b, row_col=lambda b, i, dr, dc: _oriented(*sums[i], dr), prodigy_sample=_prodigy_sample,
                              sq_norms=lambda b: [t[0] for t in sums])


# ------------------------------------------------------------------------------------------ phase B
def _factors(b: Bucket) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Update the factored second moments of the bucket (small vectors, the operations of the eager path, batched
    in multi-tensor calls) and return, per tensor, the square roots of the two factors of the estimate as 1-D
    vectors: one per row, one per column of the piece (sqrt(R_i C_j / mean R) is computed as their product, up to
    an ulp of the eager path's value)."""
    d, beta2 = b.sc["d"], b.sc["beta2"]
    rs = [st["exp_avg_sq_row"] for st in b.states]
    cs = [st["exp_avg_sq_col"] for st in b.states]
    alpha = (1 - beta2) * d * d
    if not _on_gpu(b):  # the same operations in one native call (the multi-tensor calls cost more host time)
        expansions = None
        if b.expansions:
            expansions = ([b.expansions.get(i) for i in range(len(rs))], b.group["eps"], _numels(b))
        inv_r, inv_c, n_dc, dcs = _derived(b, "factor_sizes", lambda: (
            [1.0 / lay.global_shape[dr] for lay, (dr, _) in zip(b.layouts, b.dims)],
            [1.0 / lay.global_shape[dc] for lay, (_, dc) in zip(b.layouts, b.dims)],
            [lay.global_shape[dc] for lay, (_, dc) in zip(b.layouts, b.dims)], [dc for _, dc in b.dims]))
        r_sums = [b.r_sums.get(i) for i in range(len(rs))] if b.r_sums else [None] * len(rs)
        out = native.factors(rs, cs, b.row_parts, b.col_parts, inv_r, inv_c, n_dc, dcs,
                             [t[1:2] if t is not None else None for t in r_sums], beta2, alpha, expansions)
        if out is not None:
            if expansions is not None:
                b.divisors = out.pop()
            return [(out[2 * i + 1], out[2 * i]) if dr == 0 else (out[2 * i], out[2 * i + 1])
                    for i, (dr, _) in enumerate(b.dims)]
    shapes = [lay.global_shape for lay in b.layouts]
    for moments, parts, dim in ((rs, b.row_parts, 0), (cs, b.col_parts, 1)):
        torch._foreach_mul_(parts, [1.0 / shape[dims[dim]] for shape, dims in zip(shapes, b.dims)])
        torch._foreach_mul_(moments, beta2)
        torch._foreach_add_(moments, parts, alpha=alpha)
    totals = [b.r_sums[i][1:2] if i in b.r_sums else r.sum(dim=dc, keepdim=True)
              for i, (r, (_, dc)) in enumerate(zip(rs, b.dims))]
    means = torch._foreach_div(totals, [float(shape[dc]) for shape, (_, dc) in zip(shapes, b.dims)])
    torch._foreach_add_(means, 1e-30)
    rns = torch._foreach_div(rs, means)
    torch._foreach_sqrt_(rns)
    scs = torch._foreach_sqrt(cs)
    return [(sc.reshape(-1), rn.reshape(-1)) if dr == 0 else (rn.reshape(-1), sc.reshape(-1))  # rows, then cols
            for rn, sc, (dr, _) in zip(rns, scs, b.dims)]


@torch.no_grad()
def update(b: Bucket) -> Generator[list[torch.Tensor], None, None]:
    """Phase B (same contract as :func:`kernels.update`): yields the StableAdamW sums when that option is on."""
    V = b.variant if b.variant is not None else variant(b)  # (choose() found it)
    assert V is not None, "compiled.update on a bucket it does not support"
    s = _scalars(b)
    sc = b.sc
    n = len(b.params)
    key = tuple(V)
    if V.full:
        flat = lambda t: t.reshape(-1)  # noqa: E731  (elementwise: one 1-D graph for every shape)
        factors = [(None, None)] * n
    else:
        flat = lambda t: t  # noqa: E731
        factors = _factors(b)
    # small unfactored Schedule-Free pieces on a CPU: native kernels over the whole list, one call per pass; the
    # others ("rest") one by one
    listed = _listed(b) if V.full and _native_schedulefree(V) else []
    in_list = set(listed)
    rest = [i for i in range(n) if i not in in_list] if listed else range(n)
    ms: list = [None] * n
    vs: list = [None] * n
    if not V.full:  # (every piece is in rest)
        gs: list = list(b.grads)
        if not V.schedulefree:
            ms = [st["exp_avg"] for st in b.states]
    else:
        gs = [None] * n
        for i in rest:
            st = b.states[i]
            if not V.schedulefree:
                ms[i] = flat(st["exp_avg"])
            vs[i] = flat(st["exp_avg_sq"])
            gs[i] = flat(b.grads[i])
    scales: list[torch.Tensor | None] = [None] * n
    # On one process on a CPU, each tensor's RMS pass runs right before its update pass, which then reads g from
    # the cache (a tensor of a few MB) instead of memory; elsewhere all RMS sums first, for one reduction.
    rms_each = V.stable and b.alone and not _on_gpu(b)
    list_scales = all_scales = None
    if V.stable and not _on_gpu(b):
        rms_k = _kernel("prodigy_rms", _rms_pass, key)
        d_eps = (sc["d"], sc["d"] * b.group["eps"])
    if V.stable and listed:  # (writes v)
        list_uu = native.rms_full_sf_list([b.grads[i] for i in listed], [b.states[i]["exp_avg_sq"] for i in listed],
                                          s)
    if V.stable and not rms_each:
        if _on_gpu(b):
            uu = torch.cat([_kernel("prodigy_rms_list", _rms_list, key + (len(idx),))(
                [gs[i] for i in idx], [factors[i][0] for i in idx], [factors[i][1] for i in idx],
                [ms[i] for i in idx], [vs[i] for i in idx], s, V) for idx in _chunks(b, range(n))])
        elif listed:
            uu = torch.empty(n, dtype=torch.float32)
            uu[listed] = list_uu
            if rest:
                uu[rest] = torch.stack([_rms(rms_k, gs[i], *factors[i], ms[i], vs[i], s, V, d_eps) for i in rest])
        else:
            uu = torch.stack([_rms(rms_k, g, a, c, m, v, s, V, d_eps)
                              for g, (a, c), m, v in zip(gs, factors, ms, vs)])
        yield [uu]
        numels = torch.tensor(_numels(b), dtype=torch.float32, device=uu.device)
        all_scales = _stable_scales(uu, numels)
        scales = list(all_scales.unbind(0))
        if listed:
            list_scales = all_scales[listed]
    elif V.stable and listed:
        list_scales = _stable_scales(list_uu, _derived(b, "listed_numels", lambda: torch.tensor(
            [_numels(b)[i] for i in listed], dtype=torch.float32)))

    if not sc["prodigy_active"]:
        kernels.drop_prodigy_state(b)

    if _on_gpu(b):
        _update_lists(b, V, s, gs, factors, ms, vs, scales, flat)
        return
    # on a CPU from here
    if listed:
        _update_listed(b, listed, V, s, list_scales)
    stochastic = V.storage == "sr"
    native_update = _native_schedulefree(V)
    native_sr = stochastic and native.available()
    if native_sr:  # the kernel writes fp32 results into a buffer in cache, native.stochastic_round_ stores them
        V = V._replace(storage="sr_out")
    prodigy_mode_many = not V.schedulefree and not V.full
    if (native_update or prodigy_mode_many) and rest and (rms_each or not V.stable or all_scales is not None):
        # the pieces in one native call (each piece's RMS pass, which in Prodigy mode writes m, right before its
        # update on one process)
        many_scales = all_scales[list(rest)] if V.stable and not rms_each else None
        if native_update and rms_each and b.divisors is not None:  # (from the statistics pass; NaN: its RMS pass)
            many_scales = b.divisors  # (a factored bucket: rest is every piece)
        many = _native_update_many if native_update else _native_prodigy_many
        if many(b, list(rest), factors, s, V, stochastic, many_scales, rms_each):
            return
    upd = _kernel("prodigy_update", _update_pass, tuple(V) + (V.stable,))
    for i in rest:
        a, c = factors[i]
        if rms_each:
            scales[i] = _rms(rms_k, gs[i], a, c, ms[i], vs[i], s, V, d_eps, b.layouts[i].global_numel)
        if native_update and _native_update(b, i, a, c, s, scales[i], V, stochastic):
            continue
        z = flat(b.states[i]["z"]) if V.schedulefree else None
        # (detached: dynamo gives nn.Parameter inputs static shapes, which would recompile per shape)
        args = [gs[i], a, ms[i], vs[i], flat(b.params[i].detach()), z]
        if V.storage not in ("sr", "sr_out"):
            g, a, m, v, y, z = args
            upd(g, a, c, m, v, y, z, scales[i], s, None, None, V, V.stable)
            continue
        # Stochastic rounding reads the noise table from a start position that depends on the step: the tensor
        # is updated in chunks of at most TABLE_SIZE elements, whose noise is one contiguous slice of the table
        # written twice in a row (no gather in the kernel).
        table = doubled_table(b.params[i].device, b.sr_seed)
        start_y, start_z = table_starts(sc["k"], b.layouts[i].flat_offset, key=b.positions[i])
        y_all = args[4]
        row = y_all[0].numel() if y_all.dim() > 1 else 1
        step_rows = max(1, TABLE_SIZE // row)
        out = _sr_buffers(y_all.device, min(y_all.numel(), step_rows * row)) if native_sr else None
        for r0 in range(0, y_all.shape[0], step_rows):
            g, a_, m, v, y, z_ = (t[r0:r0 + step_rows] if t is not None else None for t in args)
            f0, count = r0 * row, y.numel()
            noise_y = table[(start_y + f0) % TABLE_SIZE:][:count].view(y.shape)
            noise_z = table[(start_z + f0) % TABLE_SIZE:][:count].view(y.shape) if z_ is not None else None
            if not native_sr:
                upd(g, a_, c, m, v, y, z_, scales[i], s, noise_y, noise_z, V, V.stable)
                continue
            out_y, out_z = out[0, :count].view(y.shape), out[1, :count].view(y.shape)
            upd(g, a_, c, m, v, y, z_, scales[i], s, out_y, out_z if z_ is not None else None, V, V.stable)
            for target, result, noise in ((y, out_y, noise_y), (z_, out_z, noise_z)):
                if target is not None and not native.stochastic_round_(target, result, noise):
                    raise RuntimeError("internal error: the native stochastic rounding refused contiguous CPU "
                                       "chunks; please report this")


def _update_listed(b: Bucket, listed: list[int], V: Variant, s: torch.Tensor, scales: torch.Tensor | None) -> None:
    """The native update of the small pieces ``listed`` (:func:`_listed`) in one call (``scales``: their
    StableAdamW divisors, or None)."""
    noise = None
    if V.storage == "sr":
        noise = (doubled_table(b.params[0].device, b.sr_seed),
                 *native.table_starts_many(b.sc["k"], [b.layouts[i].flat_offset for i in listed],
                                           [b.positions[i] for i in listed]))
    states = b.states
    if not native.update_sf_full_list([b.grads[i] for i in listed], [b.params[i] for i in listed],
                                      [states[i]["z"] for i in listed], [states[i]["exp_avg_sq"] for i in listed], s,
                                      scales, V.decay, atan2=V.atan2, noise=noise):
        raise RuntimeError("internal error: the native kernels are built but refused the update of small tensors; "
                           "please report this (PRODIGY_DIST_NATIVE=0 in the environment avoids them)")


def _stable_scales(uu: torch.Tensor, numels) -> torch.Tensor:
    """StableAdamW's divisors from the sums of the squared update and the element counts: sqrt(max(RMS, 1))."""
    return (uu / numels).sqrt().clamp_min(1.0).sqrt()


def _update_lists(b: Bucket, V: Variant, s, gs, factors, ms, vs, scales, flat) -> None:
    """The update pass on a GPU: list calls of :func:`_update_list` (stochastic rounding gathers its noise from
    the table in the kernel, from each tensor's start position)."""
    device = b.params[0].device
    table = starts = None
    if V.storage == "sr":
        table = doubled_table(device, b.sr_seed)
        ys, zs = rounding_starts(b.sc["k"], [lay.flat_offset for lay in b.layouts], b.positions)
        starts = torch.tensor(list(zip(ys, zs)), dtype=torch.int64, device=device)
    for idx in _chunks(b, range(len(b.params))):
        zs = [flat(b.states[i]["z"]) if V.schedulefree else None for i in idx]
        k = _kernel("prodigy_update_list", _update_list, tuple(V) + (V.stable, len(idx)))
        # (detached parameters: dynamo gives nn.Parameter inputs static shapes)
        k([gs[i] for i in idx], [factors[i][0] for i in idx], [factors[i][1] for i in idx], [ms[i] for i in idx],
          [vs[i] for i in idx], [flat(b.params[i].detach()) for i in idx], zs, [scales[i] for i in idx], s, table,
          starts[idx] if starts is not None else None, V, V.stable)


def _native_update(b: Bucket, i: int, a, c, s, scale, V: Variant, stochastic: bool) -> bool:
    """The native update of a Schedule-Free piece (CPU; factored with the factors ``a``, ``c``, or with the full
    second moment; fp32, or bf16 rounded stochastically or to nearest), which also leaves z's new sampled values for
    the next step's statistics pass (remembered with z's version counter: any other write to z voids them)."""
    st, layout = b.states[i], b.layouts[i]
    z_state = st["z"]
    # 2-D views (unfactored pieces of any shape: rows of their last dim); the sample positions are flat indices
    g, y, z = b.grads[i], b.params[i].detach(), z_state
    if V.full:
        rows = _rows_shape(g)
        g, y, z = g.reshape(rows), y.reshape(rows), z.reshape(rows)
    out = _samples_buffer(st)
    noise = None
    if stochastic:
        noise = (doubled_table(y.device, b.sr_seed),
                 *table_starts(b.sc["k"], layout.flat_offset, key=b.positions[i]))
    samples = (layout.slice_start, out) if out is not None else None
    if V.full:
        done = native.update_sf_full(g, y, z, st["exp_avg_sq"].reshape(g.shape), s, scale, V.decay, samples,
                                     atan2=V.atan2, noise=noise)
    else:
        done = native.update_sf_factored(g, y, z, a, c, s, scale, V.decay, samples, atan2=V.atan2, noise=noise)
    if not done:
        return False
    if out is not None:
        _remember_samples(z_state, layout.slice_start, out)
    return True


def _rows_shape(g: torch.Tensor) -> tuple[int, int]:
    """The 2-D view the native kernels take of an unfactored piece of any shape: rows of its last dim."""
    return (-1, g.shape[-1]) if g.dim() >= 2 else (1, -1)


def _samples_buffer(st: dict) -> torch.Tensor | None:
    """Where the native update of a piece with state ``st`` writes z's new sampled values: the buffer it wrote last
    step (free again: this step's statistics have read it) or a new one; None once the Prodigy statistics are off."""
    p0 = st.get("p0")
    if p0 is None:
        return None
    z = st["z"]
    entry = _samples_entry(z)
    if entry is not None and entry.values.numel() == p0.numel() and entry.values.dtype == z.dtype:
        return entry.values
    return torch.empty(p0.numel(), dtype=z.dtype)


def _native_update_many(b: Bucket, idx: list[int], factors, s, V: Variant, stochastic: bool,
                        scales: torch.Tensor | None, rms_each: bool) -> bool:
    """:func:`_native_update` of the pieces ``idx`` (factored, or with the full second moment) in one native call
    (CPU): their StableAdamW divisors from ``scales`` (one per piece, in ``idx`` order), or with ``rms_each`` from
    each piece's RMS pass right before its update (one process). False (nothing written) where the native kernels
    do not take every piece."""
    layouts = b.layouts
    every = len(idx) == len(b.params)  # (then idx is every piece in order)
    states = b.states if every else [b.states[i] for i in idx]
    slice_starts = _slice_starts(b)
    outs = [_samples_buffer(st) for st in states]
    starts = [slice_starts[i] if out is not None else -1 for i, out in zip(idx, outs)]
    all_numels = _numels(b)
    numels = all_numels if every else [all_numels[i] for i in idx]
    noise = None
    if stochastic:
        noise = (doubled_table(b.params[0].device, b.sr_seed),
                 *native.table_starts_many(b.sc["k"], [layouts[i].flat_offset for i in idx],
                                           [b.positions[i] for i in idx]))
    # (the parameters themselves, not detached aliases: the kernel writes through their data pointers)
    gs = list(b.grads) if every else [b.grads[i] for i in idx]
    ys = list(b.params) if every else [b.params[i] for i in idx]
    zs = z_states = [st["z"] for st in states]
    if V.full:  # (2-D views: rows of the last dim; the sample positions are flat indices)
        shapes = [_rows_shape(g) for g in gs]
        gs, ys, zs = ([t.reshape(shape) for t, shape in zip(ts, shapes)] for ts in (gs, ys, zs))
        vs = [st["exp_avg_sq"].reshape(g.shape) for st, g in zip(states, gs)]
        done = native.update_sf_full_many(gs, ys, zs, vs, s, scales, numels if rms_each else None, V.decay,
                                          list(zip(starts, outs)), atan2=V.atan2, noise=noise)
    else:
        rms = (b.sc["d"], b.sc["d"] * b.group["eps"], numels) if rms_each else None
        picked = factors if every else [factors[i] for i in idx]
        done = native.update_sf_factored_many(gs, ys, zs, [a for a, _ in picked], [c for _, c in picked], s, scales,
                                              rms, V.decay, list(zip(starts, outs)), atan2=V.atan2, noise=noise)
    if not done:
        return False
    for z, start, out in zip(z_states, starts, outs):
        if out is not None:
            _remember_samples(z, start, out)
    return True


def _native_prodigy_many(b: Bucket, idx: list[int], factors, s, V: Variant, stochastic: bool,
                         scales: torch.Tensor | None, rms_each: bool) -> bool:
    """Prodigy mode's update of the factored pieces ``idx`` in one native call (CPU:
    native.update_prodigy_factored_many): their StableAdamW divisors from ``scales`` (in ``idx`` order) or with
    ``rms_each`` from each piece's RMS pass right before its update. False (nothing written) where the native kernels
    do not take every piece."""
    noise = None
    if stochastic:
        starts_y, _ = native.table_starts_many(b.sc["k"], [b.layouts[i].flat_offset for i in idx],
                                               [b.positions[i] for i in idx])
        noise = (doubled_table(b.params[0].device, b.sr_seed), starts_y)
    rms = [b.layouts[i].global_numel for i in idx] if rms_each else None
    return native.update_prodigy_factored_many(
        [b.grads[i] for i in idx], [b.params[i].detach() for i in idx], [b.states[i]["exp_avg"] for i in idx],
        [factors[i][0] for i in idx], [factors[i][1] for i in idx], s, scales, rms, V.decay, atan2=V.atan2,
        noise=noise)


class _Samples:
    """z's sampled values as the native update left them, and what must still hold for them to be z's."""

    __slots__ = ("ref", "version", "ptr", "start", "values")

    def __init__(self, ref: weakref.ref, version: int, ptr: int, start: int, values: torch.Tensor):
        self.ref = ref  # to z
        self.version = version  # z's version counter then
        self.ptr = ptr  # z's data pointer then
        self.start = start  # the sample start
        self.values = values


#: id(z) -> _Samples
_z_samples: dict[int, _Samples] = {}


def _samples_entry(z: torch.Tensor) -> _Samples | None:
    """The entry remembered for this very tensor z (not for an earlier tensor with the same id), if any."""
    entry = _z_samples.get(id(z))
    return entry if entry is not None and entry.ref() is z else None


def _remember_samples(z: torch.Tensor, start: int, values: torch.Tensor) -> None:
    try:
        version = z._version
    except RuntimeError:  # an inference tensor has no version counter: nothing to check against, keep nothing
        return
    key = id(z)
    entry = _z_samples.get(key)
    if entry is not None and entry.ref() is z:  # (the same z as last step: its entry, updated)
        entry.version, entry.ptr, entry.start, entry.values = version, z.data_ptr(), start, values
        return
    ref = weakref.ref(z, lambda _, key=key: _z_samples.pop(key, None))
    _z_samples[key] = _Samples(ref, version, z.data_ptr(), start, values)


def _recalled_samples(z: torch.Tensor, start: int) -> torch.Tensor | None:
    """z's sampled values as the native update left them, if z has not been written since (else None)."""
    entry = _samples_entry(z)
    if entry is None:
        return None
    try:
        same = z._version == entry.version and z.data_ptr() == entry.ptr and entry.start == start
    except RuntimeError:
        same = False
    return entry.values if same else None


def _rms(rms_k: _Kernel, g, a, c, m, v, s, V: Variant, d_eps: tuple[float, float],
         numel: int = 0) -> torch.Tensor:
    """The StableAdamW sum of one tensor, or with ``numel`` (its global element count) the divisor computed from
    it: on a CPU the native pass (factored tensors, and Schedule-Free with the full second moment; inductor's
    reductions run at half the bandwidth there), else the compiled kernel. ``d_eps``: d and d * eps (the values of
    s[_D] and s[_EPS_TERM] before their rounding to fp32)."""
    if g.device.type == "cpu" and (not V.full or V.schedulefree):
        if V.full:
            out = native.rms_full_sf(g, v, s, numel=numel)
        elif V.schedulefree:
            out = native.rms_factored(g, a, c, *d_eps, numel=numel)
        else:
            out = native.rms_prodigy_factored(g, m, a, c, s, numel=numel)
        if out is not None:
            return out
    uu = rms_k(g, a, c, m, v, s, V)
    return _stable_scales(uu, float(numel)) if numel else uu


_sr_out: dict[torch.device, torch.Tensor] = {}


def _sr_buffers(device: torch.device, count: int) -> torch.Tensor:
    """Two fp32 rows of at least ``count`` elements for the results of the y and z streams before their stochastic
    rounding (at most 2 x TABLE_SIZE elements: 8 MB, reused every step, in cache while a chunk is rounded)."""
    buf = _sr_out.get(device)
    if buf is None or buf.shape[1] < count:
        buf = _sr_out[device] = torch.empty(2, max(count, 1), dtype=torch.float32, device=device)
    return buf
