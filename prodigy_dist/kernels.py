"""The fast math: kernels over lists of plain local tensors (never DTensors, never torch.distributed).

A :class:`Bucket` holds the parameters of one group that share a kind (factored second moment, full second moment,
or Muon). A step runs in two phases per bucket:

* :func:`statistics` (phase A) only reads: it computes the partial sums of the step (row and column sums of g^2,
  the Prodigy dot product and sum|s| on the sampled slice, SPEED norms, sum g^2 for the non-finite check) and the
  new Prodigy ``s`` out of place, so a skipped step leaves the state untouched;
* :func:`update` (phase B) is a generator: it applies the update and *yields* each list of per-tensor partial sums
  it needs summed across ranks (StableAdamW/OrthoGrad norms, the cautious mask count). The caller reduces them in
  place (or does nothing on one process) and resumes it. The number of yields depends only on the group's options,
  so every rank joins the same collectives.

Per-tensor scalars that depend on data (RMS scales, mask means) stay on the device: no host synchronisation here.

A *packed* bucket (``Bucket.pack``, see :mod:`prodigy_dist.packing`) runs the same code on lists that hold one flat
tensor per role (the state kept flat, gradients and parameters gathered, parameters scattered back once); only its
per-tensor sums are taken differently (see that module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator

import torch

from .layout import SLICE, ParamLayout
from .muon import Orthogonalise
from .packing import Pack
from .rounding import write_back_

ATAN2_SCALE = 1.2732395  # 4/pi: Adam-atan2 bounds |u| < 2
FOCUS_GAMMA = 0.1

# Columns of the per-tensor statistics rows produced by phase A. Only the total of GSQ (sum of g^2, for the
# non-finite check) is read: a packed bucket puts the sum over its tensors in its first row.
DOT, ABS_S, L2SQ, GSQ = range(4)
N_STATS = 4


class ScratchPool:
    """Persistent fp32 work buffers, reused tensor after tensor.

    On a CPU, writing a freshly allocated large tensor costs page faults that take several times longer than the
    arithmetic; reusing a few buffers the size of the largest parameter makes a step allocation-free.
    """

    def __init__(self):
        self._buffers: dict[tuple[int, torch.device], torch.Tensor] = {}

    def take(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        """An fp32 tensor shaped like ``like`` backed by buffer ``slot`` (contents undefined)."""
        key = (slot, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self._buffers[key] = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
        return buf[:like.numel()].view(like.shape)

    def nbytes(self) -> int:
        return sum(b.numel() * 4 for b in self._buffers.values())


def _work(b: "Bucket", slot: int, like: torch.Tensor) -> torch.Tensor:
    """A scratch fp32 tensor shaped like ``like`` (pooled when the bucket runs alone, else freshly allocated)."""
    if b.scratch is not None:
        return b.scratch.take(slot, like)
    return torch.empty(like.shape, dtype=torch.float32, device=like.device)


def _fp32(b: "Bucket", slot: int, t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if fp32, else an fp32 copy in scratch ``slot``."""
    if t.dtype == torch.float32:
        return t
    return _work(b, slot, t).copy_(t)


@dataclass
class Bucket:
    """Parameters of one group and one kind, with everything phase A and B need."""

    group: dict[str, Any]
    sc: dict[str, Any]  # step scalars of the group (scalars.step_scalars)
    kind: str  # "factored" | "full" (second moment)
    muon: bool  # orthogonalised update (use_muon_pp, ndim >= 2)
    params: list[torch.Tensor]  # local storage tensors of the parameters
    grads: list[torch.Tensor]  # local gradients, original dtype (never modified)
    states: list[dict[str, Any]]
    layouts: list[ParamLayout]
    dims: list[tuple[int, int] | None]
    positions: list[int] = field(default_factory=list)  # order of each parameter in the optimizer
    sr_seed: int = 0
    scratch: ScratchPool | None = None  # only for a bucket of one tensor that runs start to finish alone
    alone: bool = False  # on one process: nothing is summed across ranks, per-tensor sums are final at once
    impl: Any = None  # module with statistics()/update() for this bucket (prodigy_dist.compiled); None: this one
    variant: Any = None  # set with impl: the compiled variant (prodigy_dist.compiled.Variant) of this step
    pack: Pack | None = None  # set: the tensors are stepped as one flat tensor (prodigy_dist.packing)
    # packed: the flat state roles (Pack.adopt), and the flat gradient ("g") and parameters ("w", Prodigy mode)
    # that phase A gathered for phase B
    flat: dict[str, torch.Tensor] = field(default_factory=dict)
    # what follows from the pieces' layouts, dims and sizes alone (lists of sample starts, element counts...): made on
    # first use and kept, since the optimizer reuses a step's buckets while their parameters and state stay the same
    derived: dict[str, Any] = field(default_factory=dict)
    # per piece, the new s that commit_s last stored in the state in place of the old one (None: copied into it)
    s_stored: list[torch.Tensor | None] = field(default_factory=list)
    # filled by statistics()
    row_parts: list[torch.Tensor] = field(default_factory=list)
    r_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # global sums of R along a sharded dc
    col_parts: list[torch.Tensor] = field(default_factory=list)
    s_new: list[torch.Tensor | None] = field(default_factory=list)  # packed: [the flat new s]
    stats: torch.Tensor | None = None
    # piece -> its Prodigy statistics, if the factored statistics pass computed them (prodigy_dist.native):
    # ([dot, sum|s_new| or SPEED's L1, SPEED's L2^2], s_new or None)
    prodigy_parts: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # or, when one native call computed them for every piece of the bucket (its small tensors): the (n, 3) sums
    # and the new s per piece (None with SPEED)
    prodigy_rows: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None
    # piece -> the accumulators from which StableAdamW's divisor follows without an RMS pass (prodigy_dist.native:
    # statistics, factors), where the native statistics pass computed them; and those divisors once the factors are
    # updated (NaN where a piece needs its RMS pass)
    expansions: dict[int, torch.Tensor] = field(default_factory=dict)
    divisors: torch.Tensor | None = None

    def release(self) -> None:
        """Drop what a step read and computed (the gradients included), keeping what the next step can reuse
        (the optimizer keeps the buckets of a step for the next one)."""
        self.grads = []
        self.stats = None
        self.row_parts, self.col_parts, self.s_new = [], [], []
        self.r_sums, self.prodigy_parts, self.prodigy_rows = {}, {}, None
        self.expansions, self.divisors = {}, None
        self.flat.pop("g", None)
        self.flat.pop("w", None)


def sample(t: torch.Tensor, layout: ParamLayout) -> torch.Tensor:
    """The local elements of ``t`` whose global flat index is a multiple of SLICE."""
    return t.reshape(-1)[layout.slice_start::SLICE]


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares (fp32, 0-dim): a partial sum when ``t`` is a local piece."""
    return torch.linalg.vector_norm(t, dtype=torch.float32).square()


# ------------------------------------------------------------------------------------------ phase A
@torch.no_grad()
def statistics(b: Bucket, row_col=None, prodigy_sample=None, sq_norms=None, row_col_all=None) -> list[torch.Tensor]:
    """Phase A: fill ``b.row_parts``, ``b.col_parts``, ``b.s_new`` and ``b.stats``; read-only on all state.

    ``row_col(b, i, dr, dc)``: optional replacement for the factored statistics of piece ``i`` (the compiled fast
    path passes its own); returns the fp32 sums of g^2 over dr and over dc, keepdim. ``row_col_all(b)``: likewise
    for every piece of a factored bucket at once, returning (sums over dr, sums over dc, the sums of g^2 as a
    vector), or None where it does not apply (then ``row_col`` runs piece by piece). ``prodigy_sample(b, stats)``:
    likewise for :func:`_prodigy_sample`; ``sq_norms(b)``: likewise for the sums of g^2 of an unfactored bucket.

    Returns the partial sums that must be summed across ranks before phase B (the factored statistics along a
    sharded dim); ``b.stats`` is reduced by the caller together with every other bucket's rows.
    """
    n = len(b.params)
    device = b.params[0].device
    stats = torch.zeros(n, N_STATS, dtype=torch.float32, device=device)
    to_reduce: list[torch.Tensor] = []
    gsq: list[torch.Tensor] = []
    b.row_parts, b.col_parts, b.prodigy_parts, b.prodigy_rows = [], [], {}, None
    b.expansions, b.divisors = {}, None
    whole = row_col_all(b) if b.kind == "factored" and row_col_all is not None else None
    if whole is not None:
        b.r_sums = {}
        b.row_parts, b.col_parts, gsq = whole
    elif b.kind == "factored":
        b.r_sums = {}
        for i, (g, (dr, dc), layout, st) in enumerate(zip(b.grads, b.dims, b.layouts, b.states)):
            if layout.fragment:  # statistics of the whole tensor, summed over every rank's fragments
                row, col = _fragment_sums(g, layout, dr, dc)
                b.row_parts.append(row)
                b.col_parts.append(col)
                gsq.append(_sq_norm(g))
                if layout.sharded:
                    to_reduce += [row, col]
                continue
            if row_col is not None:
                row, col = row_col(b, i, dr, dc)
            else:
                sq = _fp32(b, 0, g)
                sq = torch.square(sq, out=_work(b, 0, g))
                row, col = sq.sum(dim=dr, keepdim=True), sq.sum(dim=dc, keepdim=True)
            b.row_parts.append(row)
            b.col_parts.append(col)
            gsq.append(row.sum())
            if layout.sharded and dr == 0:
                to_reduce.append(row)
            if layout.sharded and dc == 0:
                to_reduce.append(col)
                # R is sharded along dc: the mean of R over dc needs the global sum, of R before this step's
                # EMA (ADOPT) and after it (the same operations as phase B, out of place)
                r = st["exp_avg_sq_row"]
                d, beta2 = b.sc["d"], b.sc["beta2"]
                r_new = (r * beta2).add_(row * (1.0 / layout.global_shape[dr]), alpha=(1 - beta2) * d * d)
                sums = torch.cat([r.sum(dim=dc, keepdim=True), r_new.sum(dim=dc, keepdim=True)])
                b.r_sums[len(b.row_parts) - 1] = sums
                to_reduce.append(sums)
    elif b.pack is not None:  # the flat gradient is kept for phase B
        b.flat["g"] = b.pack.gather(b.grads)
        g = b.flat["g"].float()
        gsq = torch.zeros(n, dtype=torch.float32, device=device)
        gsq[0] = torch.dot(g, g)
    elif sq_norms is not None:
        gsq = sq_norms(b)
    else:
        gsq = [t.square() for t in torch._foreach_norm(b.grads, dtype=torch.float32)]
    stats[:, GSQ] = torch.stack(gsq) if isinstance(gsq, list) else gsq

    sc = b.sc
    b.s_new = [None] * n
    if sc["prodigy_active"] and not sc["adopt_first"]:
        (prodigy_sample or _prodigy_sample)(b, stats)
    b.stats = stats
    return to_reduce


def prodigy_data(b: Bucket, i: int) -> torch.Tensor:
    """The tensor whose samples enter the Prodigy statistics of piece ``i``: z (Schedule-Free) or the parameter."""
    return b.states[i]["z"] if b.group["use_schedulefree"] else b.params[i].detach()


def _prodigy_sample(b: Bucket, stats: torch.Tensor) -> None:
    """The Prodigy statistics on the sampled slice: fills the DOT, ABS_S (and SPEED's L2SQ) columns of ``stats``
    and ``b.s_new``."""
    sc, group, pack = b.sc, b.group, b.pack
    if pack is None:
        data = [prodigy_data(b, i) for i in range(len(b.params))]
        gs = [sample(g, lay) for g, lay in zip(b.grads, b.layouts)]
        xs = [sample(t, lay) for t, lay in zip(data, b.layouts)]
        p0s = [st["p0"] for st in b.states]
    else:  # one flat tensor per role (in Prodigy mode, the parameters gathered here are kept for phase B)
        if group["use_schedulefree"]:
            x = b.flat["z"]
        else:
            x = b.flat["w"] = pack.gather(b.params)
        gs, xs = [b.flat["g"].index_select(0, pack.sample_index)], [x.index_select(0, pack.sample_index)]
        p0s = [b.flat["p0"]]
    es = torch._foreach_sub(p0s, xs)
    if pack is None:
        stats[:, DOT] = torch.stack([torch.dot(g.to(e.dtype), e).float() for g, e in zip(gs, es)])
    else:  # (a bf16 torch.dot sums the exact products in fp32, then rounds to bf16)
        (g, e) = gs[0], es[0]
        stats[:, DOT] = pack.samples.sums(g.to(e.dtype).float() * e.float()).to(e.dtype).float()
    if group["use_speed"]:
        stats[:, ABS_S] = _sample_sums(b, es, absolute=True)
        stats[:, L2SQ] = _sample_sums(b, es, absolute=False)
        return
    s_new = torch._foreach_mul([st["s"] for st in b.states] if pack is None else [b.flat["s"]], sc["beta3"])
    if pack is not None and gs[0].dtype == s_new[0].dtype != torch.float32 and gs[0].device.type == "cpu":
        # the per-tensor add_ below reads strided samples of g, and torch's strided CPU kernel for a low-precision
        # add_ with alpha rounds alpha, then alpha * g, to that precision: the same on the contiguous flat samples
        alpha = torch.tensor(sc["delta"], dtype=gs[0].dtype).item()
        torch._foreach_add_(s_new, [gs[0].float().mul_(alpha).to(gs[0].dtype)])
    else:
        torch._foreach_add_(s_new, gs, alpha=sc["delta"])
    b.s_new = s_new
    stats[:, ABS_S] = _sample_sums(b, s_new, absolute=True)


def _sample_sums(b: Bucket, ts: list[torch.Tensor], absolute: bool) -> torch.Tensor:
    """Per tensor, the fp32 sum of |t| (``absolute``) or of t^2 of its samples ``ts`` (packed: [flat samples])."""
    if b.pack is not None:
        x = ts[0].float()
        return b.pack.samples.sums(x.abs() if absolute else x.square())
    if absolute:
        return torch.stack(torch._foreach_norm(ts, ord=1, dtype=torch.float32))
    return torch.stack([t.square() for t in torch._foreach_norm(ts, dtype=torch.float32)])


def commit_s(b: Bucket) -> None:
    """Store phase A's new Prodigy ``s`` into the state (once the step is known to be finite)."""
    if b.pack is not None:
        b.flat["s"].copy_(b.s_new[0])
        return
    # A state tensor that owns its memory is replaced by the new one (phase A's own output); a view (of a flat
    # buffer: packing, DeepSpeed) is copied into. (The copy of every s cost ~0.25 ms a step on a 20M-parameter GPT.)
    # The s stored here last step owns its memory, and this step's s (computed from it) has its dtype, shape and
    # device: only the new one is checked.
    targets, sources = [], []
    stored = b.s_stored if len(b.s_stored) == len(b.states) else [None] * len(b.states)
    b.s_stored = []
    for st, new, last in zip(b.states, b.s_new, stored):
        old = st["s"]
        if new._base is None and (old is last or old._base is None and new.dtype == old.dtype and new.shape == old.shape
                                  and (new.is_cpu and old.is_cpu or new.device == old.device)):
            st["s"] = new
            b.s_stored.append(new)
        else:
            targets.append(old)
            sources.append(new)
            b.s_stored.append(None)
    if targets:
        torch._foreach_copy_(targets, sources)


def drop_prodigy_state(b: Bucket) -> None:
    """Delete p0 and s once the Prodigy statistics are off (prodigy_steps reached)."""
    for st in b.states:
        st.pop("p0", None)
        st.pop("s", None)
    b.s_stored = []


def _row_block(t: torch.Tensor, layout: ParamLayout) -> torch.Tensor:
    """A fragment's values (fp32) in a zero-padded block of the global rows it touches."""
    block = torch.zeros((layout.local_rows, *layout.global_shape[1:]), dtype=torch.float32, device=t.device)
    block.view(-1)[layout.lead:layout.lead + t.numel()] = t.reshape(-1)
    return block


def _rows_of(t: torch.Tensor, layout: ParamLayout, keeps_rows: bool) -> torch.Tensor:
    """The rows of a global-shaped statistic that a fragment touches (all of it if dim 0 was reduced)."""
    return t.narrow(0, layout.row_offset, layout.local_rows) if keeps_rows else t


def _fragment_sums(g: torch.Tensor, layout: ParamLayout, dr: int, dc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of g^2 over dr and over dc with the global keepdim shapes: this fragment's part, zeros elsewhere."""
    sq = _row_block(g, layout).square_()
    out = []
    for dim in (dr, dc):
        part = sq.sum(dim=dim, keepdim=True)
        if dim == 0:
            out.append(part)
            continue
        shape = list(layout.global_shape)
        shape[dim] = 1
        full = torch.zeros(shape, dtype=torch.float32, device=g.device)
        _rows_of(full, layout, True).copy_(part)
        out.append(full)
    return out[0], out[1]


def _fragment_sqrt(r: torch.Tensor, c: torch.Tensor, dr: int, dc: int, layout: ParamLayout,
                   eps_term: float | None) -> torch.Tensor:
    """The factored sqrt(v) (+ eps_term) of a fragment, from the global R and C (identical on every rank)."""
    mean = r.sum(dim=dc, keepdim=True).div_(layout.global_shape[dc]).add_(1e-30)
    r_l, c_l = _rows_of(r, layout, dr != 0), _rows_of(c, layout, dc != 0)
    block = torch.mul(r_l / _rows_of(mean, layout, dr != 0 and dc != 0), c_l)
    block = block.expand(layout.local_rows, *layout.global_shape[1:])
    out = block.reshape(-1)[layout.lead:layout.lead + layout.flat_numel].sqrt()
    return out.add_(eps_term) if eps_term is not None else out


# ------------------------------------------------------------------------------------------ phase B
def _factored_sqrt(r: torch.Tensor, c: torch.Tensor, dc: int, layout: ParamLayout,
                   eps_term: float | None, out: torch.Tensor | None = None,
                   r_sum: torch.Tensor | None = None) -> torch.Tensor:
    """sqrt(R / mean_dc(R) * C) (+ eps_term): the Adafactor estimate of sqrt(v) for every shape (A4).

    ``r_sum``: the global sum of R over dc when dc is sharded (from phase A's reduction); else summed here.
    """
    total = r_sum if r_sum is not None else r.sum(dim=dc, keepdim=True)
    mean = total.div(layout.global_shape[dc]).add_(1e-30)
    out = torch.mul(r / mean, c, out=out) if out is not None else torch.mul(r / mean, c)
    out.sqrt_()
    return out.add_(eps_term) if eps_term is not None else out


def layout_shape(r: torch.Tensor, c: torch.Tensor) -> torch.Size:
    """Local shape of the tensor whose factored statistics are r and c."""
    return torch.broadcast_shapes(r.shape, c.shape)


def _second_moment(b: Bucket, gs, ws, beta2: float, d: float, eps_term: float | None) -> list[torch.Tensor]:
    """Update the second moment; return sqrt(v) + eps_term (FOCUS: v), taken before the update under ADOPT."""
    group = b.group
    adopt = group["use_adopt"]
    if b.kind == "factored":
        out = []
        for i, (st, row, col, (dr, dc), layout) in enumerate(zip(b.states, b.row_parts, b.col_parts, b.dims,
                                                                 b.layouts)):
            r, c = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
            sums = b.r_sums.get(i)
            before, after = (sums[0:1], sums[1:2]) if sums is not None else (None, None)
            if adopt:
                out.append(_fragment_sqrt(r, c, dr, dc, layout, eps_term) if layout.fragment else
                           _factored_sqrt(r, c, dc, layout, eps_term, r_sum=before))
            shape = layout.global_shape
            r.mul_(beta2).add_(row.mul_(1.0 / shape[dr]), alpha=(1 - beta2) * d * d)
            c.mul_(beta2).add_(col.mul_(1.0 / shape[dc]), alpha=(1 - beta2) * d * d)
            if layout.fragment and not adopt:
                out.append(_fragment_sqrt(r, c, dr, dc, layout, eps_term))
            elif not adopt:  # into scratch 0 when the state is fp32 (the update is then built in place there)
                buf = _work(b, 0, r.expand(layout_shape(r, c))) if r.dtype == torch.float32 else None
                out.append(_factored_sqrt(r, c, dc, layout, eps_term, buf, r_sum=after))
        return out
    vs = _moments(b, "exp_avg_sq")
    before = _full_denominators(vs, group, eps_term) if adopt else None
    _scale_(vs, beta2)
    if group["use_focus"]:
        torch._foreach_add_(vs, ws, alpha=(1 - beta2) * d * d)
    else:
        torch._foreach_addcmul_(vs, gs, gs, value=(1 - beta2) * d * d)
    return before if adopt else _full_denominators(vs, group, eps_term)


def _full_denominators(vs, group, eps_term):
    if group["use_focus"]:
        return [v.clone() for v in vs]
    out = torch._foreach_sqrt(vs)
    if eps_term is not None:
        torch._foreach_add_(out, eps_term)
    return out


def _normalise(nums: list[torch.Tensor], denoms: list[torch.Tensor], ws: list[torch.Tensor],
               group: dict) -> list[torch.Tensor]:
    """Normalised updates from numerators (d*g or m) and denominators (with d*eps); numerators are consumed."""
    if group["use_focus"]:
        for num, den, w in zip(nums, denoms, ws):
            den = den.float().sub_(w).sign_().mul_(-FOCUS_GAMMA)
            num.sign_().add_(den)
    elif group["eps"] is None:
        for num, den in zip(nums, denoms):
            num.atan2_(den.float()).mul_(ATAN2_SCALE)
    else:
        torch._foreach_div_(nums, denoms)
    return nums


def _cautious_mask_(product: torch.Tensor, count: torch.Tensor, numel: int) -> torch.Tensor:
    """In place: 1[product > 0] / max(mean, 1e-3), with the (reduced) count of positive entries."""
    return (product > 0).float().div_(torch.clamp_min(count / numel, 1e-3))


def _scale_(tensors: list[torch.Tensor], factor: float) -> None:
    """In-place multiply by a Python scalar, computed in fp32 for low-precision tensors.

    (torch._foreach_mul_ on bf16 tensors rounds the scalar to bf16 first on CPU; Tensor.mul_ does not.)
    """
    if all(t.dtype == torch.float32 for t in tensors):
        torch._foreach_mul_(tensors, factor)
    else:
        for t in tensors:
            t.mul_(factor)


@torch.no_grad()
def update(b: Bucket) -> Generator[list[torch.Tensor], None, None]:
    """Phase B: apply the step to every parameter of the bucket; yields lists of partial sums to reduce."""
    group, sc = b.group, b.sc
    sf = group["use_schedulefree"]
    d, beta1, beta2 = sc["d"], sc["beta1"], sc["beta2"]
    n = len(b.params)
    # global sizes (packed: Pack.global_numels; packs have no option that needs them as a list)
    numels = [lay.global_numel for lay in b.layouts] if b.pack is None else None
    if b.pack is None:
        gs = [_fp32(b, 1, g) for g in b.grads]  # fp32 grads themselves: never modified in place below
        ys = [_fp32(b, 2, p) for p in b.params]
        zs = [_fp32(b, 3, st["z"]) for st in b.states] if sf else None
    else:
        gs, ys, zs = _packed_working(b)
    ws = zs if sf else ys
    plain = group["eps"] is not None and not group["use_focus"]
    eps_term = d * group["eps"] if plain else None

    if sc["adopt_first"]:  # ADOPT's first step only initialises the second moment
        _second_moment(b, gs, ws, 0.0, d, eps_term)
        return

    denoms = _second_moment(b, gs, ws, beta2, d, eps_term)
    sources = gs  # what Muon orthogonalises
    if sf:
        if sc["raw_update"]:
            us = [g.clone() for g in gs]
        elif plain:  # u = d g / (denom + d eps), written into the denominator's buffer
            us = [torch.div(torch.mul(g, d, out=_work(b, 4, g)), den, out=den) if den.dtype == torch.float32
                  else g * d / den for g, den in zip(gs, denoms)]
        else:
            us = _normalise(torch._foreach_mul(gs, d), denoms, ws, group)
    else:
        ms = _moments(b, "exp_avg")
        if group["use_adopt"]:
            bound = sc["k"] ** 0.25
            ghat = _normalise(torch._foreach_mul(gs, d), denoms, ws, group)
            torch._foreach_clamp_min_(ghat, -bound)
            torch._foreach_clamp_max_(ghat, bound)
            _scale_(ms, beta1)
            torch._foreach_add_(ms, ghat, alpha=1 - beta1)
            guide = ghat
        else:
            _scale_(ms, beta1)
            torch._foreach_add_(ms, gs, alpha=(1 - beta1) * d)
            guide = gs
        us = [m.float() if m.dtype != torch.float32 else m.clone() for m in ms]
        if group["use_cautious"]:
            products = torch._foreach_mul(guide, us)
            counts = torch.stack([(t > 0).sum(dtype=torch.float32) for t in products])
            yield [counts]
            for u, prod, cnt, numel in zip(us, products, counts, numels):
                u.mul_(_cautious_mask_(prod, cnt, numel))
        elif group["use_grams"]:
            for u, gd in zip(us, guide):
                u.abs_().mul_(torch.sign(gd))
        if not group["use_adopt"]:
            sources = [u.clone() for u in us] if b.muon else None
            us = _normalise(us, denoms, ws, group)

    if b.muon and not sc["raw_update"]:
        # Muon: the orthogonalised direction with the RMS of the Adam-path update it replaces (docs/MUON.md).
        # The directions are computed by the driver (on one process here; sharded: one owner rank per matrix).
        adam_sq = torch.stack([_sq_norm(u) for u in us])
        request = Orthogonalise(sources, b.layouts)
        yield [adam_sq, request]
        rms = (adam_sq / torch.tensor(numels, dtype=torch.float32, device=adam_sq.device)).sqrt()
        us = [x.mul_(r) for x, r in zip(request.results, rms)]

    # OrthoGrad: two rounds of per-tensor sums (|u - a w| is only known after a); StableAdamW: one round, or none
    # after OrthoGrad, whose sums give the RMS of its result.
    uu = None
    if group["use_orthograd"]:
        flat = [(u.reshape(-1), w.reshape(-1)) for u, w in zip(us, ws)]
        sums = torch.stack([torch.stack([torch.dot(w, u), torch.dot(w, w), torch.dot(u, u)]) for u, w in flat])
        yield [sums]
        wu, ww, u_sq = sums.unbind(1)
        active = ww.sqrt() > 1e-30  # OrthoGrad leaves u alone when |w| <= 1e-30
        proj = torch.where(active, wu / (ww + 1e-30), torch.zeros_like(wu))
        for u, w, pr in zip(us, ws, proj):
            u.sub_(w * pr)
        orth_sq = torch.stack([_sq_norm(u) for u in us])
        yield [orth_sq]
        orth_norm = orth_sq.sqrt()
        gain = torch.where(active, u_sq.sqrt() / (orth_norm + 1e-30), torch.ones_like(orth_norm))
        torch._foreach_mul_(us, list(gain.unbind(0)))
        uu = (orth_norm * gain).square()  # not orth_sq * gain^2: gain may be ~1e30 where u' = 0
    if group["use_stableadamw"] and group["eps"] is not None:
        if uu is None:
            pieces = us if b.pack is None else b.pack.elements.split(us[0])
            uu = torch.stack(torch._foreach_norm(pieces, dtype=torch.float32)).square()
            yield [uu]
        sizes = torch.tensor(numels, dtype=torch.float32, device=uu.device) if b.pack is None else \
            b.pack.global_numels
        scale = (uu / sizes).sqrt().clamp_min(1.0).sqrt()
        if b.pack is None:
            torch._foreach_div_(us, list(scale.unbind(0)))
        else:
            us[0].div_(b.pack.elements.expand(scale))

    if not sc["prodigy_active"]:
        drop_prodigy_state(b)

    dlr, lam = sc["dlr"], group["weight_decay"]
    if sf:
        yield from _schedulefree_update(b, ys, zs, us, dlr, lam, numels)
    else:
        decay = lam * (dlr if group["weight_decay_by_lr"] else 1.0)
        if decay != 0:
            _scale_(ys, 1 - decay)
        torch._foreach_add_(ys, us, alpha=-dlr)
    _write_back(b, ys, zs)


def _schedulefree_update(b: Bucket, ys, zs, us, dlr: float, lam: float, numels: list[int]):
    """Schedule-Free interpolation (B §3.2, §4.4, §4.5), in place on the fp32 working copies."""
    group, sc = b.group, b.sc
    c, xy = sc["c"], sc["xy"]
    y_old = [y.clone() for y in ys] if lam != 0 and not group["weight_decay_by_lr"] else None
    if lam != 0 and group["weight_decay_by_lr"]:
        torch._foreach_add_(us, ys, alpha=lam)
    if group["use_cautious"] or group["use_grams"]:
        big = torch._foreach_sub(ys, zs)
        _scale_(big, c)
        torch._foreach_add_(big, us, alpha=dlr * xy)
        torch._foreach_add_(zs, us, alpha=-dlr)
        if group["use_cautious"]:
            products = torch._foreach_mul(us, big)
            counts = torch.stack([(t > 0).sum(dtype=torch.float32) for t in products])
            yield [counts]
            for y, bg, prod, cnt, numel in zip(ys, big, products, counts, numels):
                y.sub_(bg.mul_(_cautious_mask_(prod, cnt, numel)))
        else:
            for y, bg, u in zip(ys, big, us):
                y.sub_(bg.abs_().mul_(u.sign_()))
    else:
        torch._foreach_lerp_(ys, zs, c)
        torch._foreach_add_(zs, us, alpha=-dlr)
        torch._foreach_add_(ys, us, alpha=-dlr * xy)
    if y_old is not None:
        torch._foreach_add_(zs, y_old, alpha=-lam)
        torch._foreach_add_(ys, y_old, alpha=-lam * xy)


def _moments(b: Bucket, key: str) -> list[torch.Tensor]:
    """The bucket's moment tensors ``key``, updated in place (packed: the flat tensor the states are views of)."""
    return [st[key] for st in b.states] if b.pack is None else [b.flat[key]]


def _packed_working(b: Bucket) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """[g], [y] and [z] (None in Prodigy mode) of a packed bucket, fp32 and flat: g and y gathered (by phase A
    where it did), z the state's flat tensor itself when it is fp32 (updated in place, like an fp32 z unpacked)."""
    flat, pack = b.flat, b.pack
    y = flat.pop("w", None)
    if y is None:
        y = pack.gather(b.params)
    z = [flat["z"].float()] if b.group["use_schedulefree"] else None
    return [flat.pop("g").float()], [y.float()], z


def _write_back(b: Bucket, ys, zs) -> None:
    """Store the fp32 working copies y and z into their storage tensors (no-op where they are the same tensor)."""
    stochastic, step = b.group["stochastic_rounding"], b.sc["k"]
    if b.pack is not None:
        dtype = b.params[0].dtype
        b.pack.scatter_(b.params, b.pack.rounded(ys[0], dtype, stochastic, seed=b.sr_seed, step=step, stream=0,
                                                 keys=b.positions))
        if zs is not None and zs[0] is not b.flat["z"]:
            b.flat["z"].copy_(b.pack.rounded(zs[0], dtype, stochastic, seed=b.sr_seed, step=step, stream=1,
                                             keys=b.positions))
        return
    for i, (p, layout, key) in enumerate(zip(b.params, b.layouts, b.positions)):
        write_back_(p, ys[i], stochastic, flat_offset=layout.flat_offset, key=key, seed=b.sr_seed, step=step,
                    stream=0, work=_work(b, 0, p) if b.scratch is not None else None)
        if zs is not None:
            write_back_(b.states[i]["z"], zs[i], stochastic, flat_offset=layout.flat_offset, key=key,
                        seed=b.sr_seed, step=step, stream=1, work=_work(b, 0, p) if b.scratch is not None else None)
