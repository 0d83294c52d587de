"""ProdigyPlusScheduleFree: the optimizer class. Bookkeeping only: groups, options, state, modes, checkpoints.

The math is in :mod:`prodigy_dist.kernels`, the per-group scalar rules in :mod:`prodigy_dist.scalars`, the layout of
each local piece in :mod:`prodigy_dist.layout` and the cross-rank sums in :mod:`prodigy_dist.reduction`.
A step is:

1. phase A for every bucket (read-only partial sums), one bucketed reduction;
2. one host synchronisation that reads the Prodigy numerator/denominator of every group and the non-finite flag;
3. if finite, phase B for every bucket (the update), whose per-tensor sums are reduced in lock-step;
4. the end-of-step update of d, the Schedule-Free weight sum and the step counter.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable
from typing import Any, Callable

import torch

from . import compiled, kernels, packing
from .kernels import ABS_S, DOT, GSQ, L2SQ, Bucket, ScratchPool, sample
from .layout import ParamLayout, dtensor_layout, factored_dims, single_process_layout
from .options import DEFAULTS, GLOBAL_OPTIONS, NONFINITE_POLICIES, log_precedence_rules, validate_group
from .muon import Orthogonalise
from .reduction import Reducer, orthogonalise
from .scalars import harmonic_mean, speed_beta, step_scalars, update_d
from .sharded_state import SAMPLE_KEYS, exchange_samples, global_state, local_piece

logger = logging.getLogger(__name__)

#: Tensors with at least this many local elements are stepped one at a time in reusable scratch buffers.
LARGE_TENSOR = 1 << 16

_D_KEYS = ("d", "d_prev", "d_numerator", "d_denom", "prev_d_numerator", "max_d_numerator")

#: Group entries that change every step and do not decide the buckets (every other entry does, for reuse).
_PER_STEP_KEYS = frozenset(_D_KEYS + ("params", "lr", "k", "dlr", "effective_lr", "weight_sum", "shared_d",
                                      "skipped_steps", "train_mode"))


class ProdigyPlusScheduleFree(torch.optim.Optimizer):
    r"""Prodigy + Schedule-Free with factored second moments, correct on any number of ranks.

    The learning rate is estimated (``d``) from global statistics; Schedule-Free averaging replaces the LR schedule.
    Call :meth:`train` before training steps and :meth:`eval` before evaluating or saving the evaluation weights.

    Args: the options of ALGORITHM.md Part A1 (see README's option table), each also settable per group, plus
        nonfinite_grads: ``"skip"`` (default) skips a step whose gradients hold NaN/Inf on any rank, leaving
            weights, state and d untouched and counting it; ``"raise"`` raises ``FloatingPointError`` instead.
        sr_seed: seed of the stochastic rounding noise (a hash of seed, step and global element index).
        fast_path: ``"auto"`` (default), ``"compiled"`` or ``"eager"``: which implementation of the step runs
            (see prodigy_dist.compiled; "auto" compiles on accelerators, and on a CPU for models of 16M+ params).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.99),
                 beta3: float | None = None, weight_decay: float = 0.0, weight_decay_by_lr: bool = True,
                 use_bias_correction: bool = False, d0: float = 1e-6, d_coef: float = 1.0, d_limiter: bool = True,
                 prodigy_steps: int = 0, use_speed: bool = False, eps: float | None = 1e-8,
                 split_groups: bool = True, split_groups_mean: bool = True, factored: bool = True,
                 factored_fp32: bool = True, fused_back_pass: bool = False, use_stableadamw: bool = True,
                 use_muon_pp: bool = False, use_cautious: bool = False, use_grams: bool = False,
                 use_adopt: bool = False, use_focus: bool = False, use_orthograd: bool = False,
                 stochastic_rounding: bool = True, schedulefree_c: float = 0.0, use_schedulefree: bool = True,
                 *, nonfinite_grads: str = "skip", sr_seed: int = 0, fast_path: str = "auto"):
        if fast_path not in compiled.FAST_PATHS:
            raise ValueError(f"Invalid fast_path: {fast_path!r} (expected one of {compiled.FAST_PATHS})")
        self.fast_path = fast_path
        if nonfinite_grads not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite_grads: {nonfinite_grads!r} (expected one of {NONFINITE_POLICIES})")
        if not isinstance(sr_seed, int) or isinstance(sr_seed, bool) or sr_seed < 0:
            raise ValueError(f"Invalid sr_seed: {sr_seed!r} (expected an int >= 0)")
        defaults = dict(lr=lr, betas=betas, beta3=beta3, weight_decay=weight_decay,
                        weight_decay_by_lr=weight_decay_by_lr, use_bias_correction=use_bias_correction, d0=d0,
                        d_coef=d_coef, d_limiter=d_limiter, prodigy_steps=prodigy_steps, use_speed=use_speed,
                        eps=eps, split_groups=split_groups, split_groups_mean=split_groups_mean,
                        factored=factored, factored_fp32=factored_fp32, fused_back_pass=fused_back_pass,
                        use_stableadamw=use_stableadamw, use_muon_pp=use_muon_pp, use_cautious=use_cautious,
                        use_grams=use_grams, use_adopt=use_adopt, use_focus=use_focus,
                        use_orthograd=use_orthograd, stochastic_rounding=stochastic_rounding,
                        schedulefree_c=schedulefree_c, use_schedulefree=use_schedulefree)
        assert set(defaults) == set(DEFAULTS)
        validate_group(defaults)
        self.nonfinite_grads = nonfinite_grads
        self.sr_seed = sr_seed
        self._reducer = Reducer(None)
        self._muon_requests: list[Orthogonalise] = []
        self._scratch = ScratchPool()
        self._packs: dict[tuple, packing.Pack] = {}  # prodigy_dist.packing.pack_for's cache
        self._layouts: dict[int, ParamLayout] = {}
        self._plan: tuple | None = None  # (what the buckets depend on, the buckets) of the last step
        self._sum_order_cache: tuple | None = None  # (buckets, device, _sum_order's tensors)
        self._fused = _FusedStepState()
        super().__init__(params, defaults)
        split = split_groups and len(self.param_groups) > 1
        if split_groups and len(self.param_groups) == 1:
            logger.debug("a single parameter group: split_groups has no effect")
        for group in self.param_groups:
            group["split_groups"] = split
            self._resolve_layouts(group)
        self._constructed = True
        if "deepspeed" in sys.modules:  # possibly built for deepspeed.initialize (see prodigy_dist.deepspeed)
            from .deepspeed import prepare_for_deepspeed
            prepare_for_deepspeed(self)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        unknown = set(param_group) - set(DEFAULTS) - {"params", "name", "param_names"}
        if unknown:
            raise TypeError(f"Unknown options in a param group: {sorted(unknown)}")
        validate_group({**self.defaults, **param_group})  # before the group joins the optimizer
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        for key in GLOBAL_OPTIONS:
            if key in param_group and index > 0 and key != "split_groups" and \
                    param_group[key] != self.param_groups[0][key]:
                raise ValueError(f"Invalid {key}: {param_group[key]!r} in param group {index}: this option must be "
                                 f"the same in every group (group 0 has {self.param_groups[0][key]!r})")
        validate_group(group)
        log_precedence_rules(group, index)
        for key, value in dict(d=group["d0"], d_prev=group["d0"], d_numerator=0.0, d_denom=0.0,
                               prev_d_numerator=0.0, max_d_numerator=0.0, shared_d=None, k=1, train_mode=True,
                               weight_sum=0.0, effective_lr=group["lr"], dlr=group["d0"] * group["lr"],
                               skipped_steps=0).items():
            group.setdefault(key, value)
        if getattr(self, "_constructed", False):
            # A group added after construction joins the optimizer-wide counters, mode and (unsplit) d.
            first = self.param_groups[0]
            group["split_groups"] = first["split_groups"]
            group["k"], group["train_mode"], group["skipped_steps"] = first["k"], first["train_mode"], \
                first["skipped_steps"]
            if not first["split_groups"]:
                for key in _D_KEYS:
                    group[key] = first[key]
            self._resolve_layouts(group)

    def _param_order(self) -> dict[int, tuple[int, int]]:
        """id(param) -> (group index, position over all groups); cached until the groups change."""
        key = tuple(len(g["params"]) for g in self.param_groups)
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != key:
            order, pos = {}, 0
            for gi, g in enumerate(self.param_groups):
                for p in g["params"]:
                    order[id(p)] = (gi, pos)
                    pos += 1
            self._order_cache = cached = (key, order)
        return cached[1]

    # ------------------------------------------------------------------ layout & state
    def _local(self, t: torch.Tensor) -> torch.Tensor:
        """The local piece of a parameter, gradient or state tensor (a DTensor's local shard, zero-copy)."""
        return t.to_local() if _is_dtensor(t) else t

    def _layout(self, p: torch.Tensor) -> ParamLayout:
        layout = self._layouts.get(id(p))
        if layout is None:
            layout = self._layouts[id(p)] = dtensor_layout(p) if _is_dtensor(p) else single_process_layout(p)
            if layout.sharded:
                self._use_group(layout.group)
        return layout

    def _resolve_layouts(self, group: dict[str, Any]) -> None:
        """Read the layout of every parameter of a group now: sharded parameters attach the reducer to their
        process group (here, not mid-training)."""
        for p in group["params"]:
            self._layout(p)

    def _use_group(self, group: Any) -> None:
        if self._reducer.group is None:
            self._reducer = Reducer(group)
        elif self._reducer.group is not group:
            raise RuntimeError("ProdigyPlusScheduleFree: parameters are sharded over different process groups; "
                               "build one optimizer per mesh")

    def _kind(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[str, tuple[int, int] | None]:
        layout = self._layout(p)
        dims = factored_dims(layout.global_shape, group["factored"] and not group["use_focus"])
        return ("factored", dims) if dims is not None else ("full", None)

    def _muon(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return group["use_muon_pp"] and len(self._layout(p).global_shape) >= 2

    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        return state if state else self._new_param_state(p, group, state)

    @torch.no_grad()
    def _new_param_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        local = self._local(p)
        layout = self._layout(p)
        kind, dims = self._kind(p, group)
        if kind == "factored":
            dr, dc = dims
            fdtype = torch.float32 if group["factored_fp32"] else p.dtype
            # a fragment (DeepSpeed ZeRO) keeps the statistics of the whole tensor, identical on every rank
            row_shape = list(layout.global_shape) if layout.fragment else list(local.shape)
            col_shape = list(row_shape)
            row_shape[dr] = 1
            col_shape[dc] = 1
            state["exp_avg_sq_row"] = torch.zeros(row_shape, dtype=fdtype, device=local.device)
            state["exp_avg_sq_col"] = torch.zeros(col_shape, dtype=fdtype, device=local.device)
        elif kind == "full":
            state["exp_avg_sq"] = torch.zeros_like(local)
        if group["use_schedulefree"]:
            state["z"] = local.detach().clone()
        else:
            state["exp_avg"] = torch.zeros_like(local)
        if group["prodigy_steps"] <= 0 or group["k"] < group["prodigy_steps"]:
            stat_dtype = torch.bfloat16 if p.dtype == torch.float32 else p.dtype
            state["p0"] = sample(local, layout).to(stat_dtype, copy=True)
            if group["use_speed"]:
                # Created now (not at the first step) so that the state has its final structure for checkpoints;
                # NaN marks "no running value yet".
                state["exp_avg_x0_dot"] = torch.full((), math.nan, device=local.device)
                state["max_x0_minus_l1_norm"] = torch.full((), 1e-8, device=local.device)
                state["max_x0_minus_l2_norm"] = torch.full((), 1e-8, device=local.device)
            else:
                state["s"] = torch.zeros_like(state["p0"])
        return state

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate the state of every parameter now (it is otherwise created at its first gradient).

        Useful before loading a checkpoint with torch.distributed.checkpoint, whose state-dict helpers otherwise
        run a "fake" optimizer step to create the state.
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._init_param_state(p, group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; unlike torch.optim.Optimizer, every state tensor keeps its saved dtype.

        (torch casts floating state to the parameter's dtype, which would turn the bf16 Prodigy samples of fp32
        parameters into fp32 and round the fp32 factored statistics of bf16 parameters to bf16.) The state of a
        sharded parameter may be given in checkpoint form (DTensors of global shape, see :meth:`state_dict`) or as
        full single-process tensors; each rank keeps its own piece. Collective on sharded optimizers.
        """
        self._fused.finish(self)
        state_dict = self._local_state_dict(state_dict)
        super().load_state_dict(state_dict)
        if hasattr(self, "_ds_all_groups"):  # torch replaced the group list (see prodigy_dist.deepspeed)
            self._ds_all_groups = self.param_groups
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                for key, value in saved.get(pid, {}).items():
                    if torch.is_tensor(value) and value.is_floating_point():
                        self.state[p][key] = value.detach().to(device=self._local(p).device, copy=True)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state. The state of sharded (DTensor) parameters is given in checkpoint form: DTensors with
        their true global shapes (the Prodigy samples re-chunked, one all_to_all), so that
        ``torch.distributed.checkpoint`` saves it on N ranks and loads it on M ranks or on one process.
        Collective on sharded optimizers: call it on every rank."""
        self._fused.finish(self)
        sd = super().state_dict()
        order = self._param_order()  # torch.optim numbers the parameters in this order too
        sharded = [(*order[id(p)], p) for g in self.param_groups for p in g["params"]
                   if self._layout(p).sharded and p in self.state]
        if not sharded:
            return sd
        entries, owners = [], []
        for _, i, p in sharded:
            for key in SAMPLE_KEYS:
                if key in self.state[p]:
                    entries.append((self._layout(p), self.state[p][key]))
                    owners.append((i, key))
        chunks: dict[int, dict[str, torch.Tensor]] = {}
        for (i, key), t in zip(owners, exchange_samples(entries, self._reducer.group, to_chunks=True)):
            chunks.setdefault(i, {})[key] = t
        state = dict(sd["state"])
        for gi, i, p in sharded:
            group = self.param_groups[gi]
            state[i] = global_state(p, self._layout(p), group["factored"] and not group["use_focus"],
                                    self.state[p], chunks.get(i, {}))
        return {"state": state, "param_groups": sd["param_groups"]}

    def _local_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with every state tensor of a sharded parameter replaced by this rank's local piece."""
        saved = state_dict["state"]
        pieces, entries, owners = {}, [], []
        for saved_group, (gi, group) in zip(state_dict["param_groups"], enumerate(self.param_groups)):
            factored = group["factored"] and not group["use_focus"]
            for pid, p in zip(saved_group["params"], group["params"]):
                layout = self._layout(p)
                if pid not in saved or not (layout.sharded or any(_is_dtensor(v) for v in saved[pid].values()
                                                                   if torch.is_tensor(v))):
                    continue
                local = {key: local_piece(v, layout, key, factored) if torch.is_tensor(v) else v
                         for key, v in saved[pid].items()}
                pieces[pid] = local
                if layout.sharded:
                    for key in SAMPLE_KEYS:
                        if key in local:
                            entries.append((layout, local[key]))
                            owners.append((pid, key))
        if self._reducer.active:  # every rank joins, also with nothing to exchange
            for (pid, key), t in zip(owners, exchange_samples(entries, self._reducer.group, to_chunks=False)):
                pieces[pid][key] = t
        if not pieces:
            return state_dict
        return {"state": {**saved, **pieces}, "param_groups": state_dict["param_groups"]}

    # ------------------------------------------------------------------ train / eval
    @torch.no_grad()
    def _set_mode(self, train: bool) -> None:
        self._fused.finish(self)
        for group in self.param_groups:
            if not group["use_schedulefree"] or group["train_mode"] == train:
                continue
            beta1 = group["betas"][0]
            weight = 1 - beta1 if train else 1 - 1 / beta1
            params = [self._local(p) for p in group["params"] if "z" in self.state[p]]
            if params:
                torch._foreach_lerp_(params, [self._local(self.state[p]["z"]) for p in group["params"]
                                              if "z" in self.state[p]], weight)
            group["train_mode"] = train

    def train(self) -> None:
        """Put the weights in training mode (y, where gradients are taken). Idempotent and cheap."""
        binding = getattr(self, "_ds_binding", None)  # under DeepSpeed: also refreshes the model weights
        binding.set_mode(self, True) if binding is not None else self._set_mode(True)

    def eval(self) -> None:
        """Put the weights in evaluation mode (the averaged x). Idempotent and cheap."""
        binding = getattr(self, "_ds_binding", None)  # under DeepSpeed: also refreshes the model weights
        binding.set_mode(self, False) if binding is not None else self._set_mode(False)

    def _check_train_mode(self) -> None:
        for group in self.param_groups:
            if group["use_schedulefree"] and not group["train_mode"]:
                raise RuntimeError("ProdigyPlusScheduleFree.step() called in eval mode: call optimizer.train() "
                                   "before training steps (and optimizer.eval() before evaluation)")

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.state and all(_is_zero(g["lr"]) for g in self.param_groups):
            # torch.distributed.checkpoint's state-dict helpers create missing state with a zero-gradient step at
            # lr=0; that must not count as a step (it would advance k and the Schedule-Free average).
            logger.info("first step with lr=0 everywhere: only the state was allocated (as by init_state())")
            self.init_state()
            return loss
        if "deepspeed" in sys.modules:
            from .deepspeed import deepspeed_step
            if deepspeed_step(self):  # a ZeRO partition's step, or DeepSpeed's state-allocating zero-gradient step
                return loss
        if self.param_groups[0]["fused_back_pass"]:
            # The parameters were stepped by the gradient hooks; finish a step the end-of-backward callback did
            # not get to (e.g. hooks driven by hand).
            if not self._fused.seen and any(p.grad is not None for g in self.param_groups for p in g["params"]):
                raise RuntimeError("fused_back_pass=True but no parameter was stepped during backward: attach the "
                                   "hooks with prodigy_dist.fused_backward.attach(optimizer), or construct the "
                                   "optimizer with fused_back_pass=False")
            self._fused.finish(self)
            return loss
        self._check_train_mode()
        items = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"] if p.grad is not None]
        self._run_step(items)
        return loss

    def _buckets(self, items: list[tuple[int, torch.Tensor]], scalars: list[dict],
                 positions: dict[int, int] | None = None) -> list[Bucket]:
        """Group the parameters by (group, kind, Muon, dtype, device). On one process a large tensor gets a bucket
        of its own, which works in the reusable scratch buffers instead of fresh allocations. Small tensors that
        can be packed (prodigy_dist.packing) go into packed buckets of at most packing.CAPACITY global elements, unless
        the fast path takes them (the native list kernels: prodigy_dist.compiled.choose)."""
        keyed: dict[tuple, Bucket] = {}
        alone = not self._reducer.active
        order = self._param_order()
        packs_ok = [packing.group_packable(g) for g in self.param_groups]
        fill: dict[tuple, tuple[int, int]] = {}  # packed bucket key -> (pack number, global elements so far)
        packed: list[tuple] = []
        for gi, p in items:
            group = self.param_groups[gi]
            state = self._init_param_state(p, group)
            kind, dims = self._kind(p, group)
            local = self._local(p)
            layout = self._layout(p)
            grad = self._local(p.grad)
            muon = self._muon(p, group)
            # Only when stepping alone: under a reducer every rank must form the same buckets, and the local
            # sizes of sharded pieces differ between ranks.
            alone_large = alone and local.numel() >= LARGE_TENSOR
            # (factored tensors of more than 2 dims apart: the compiled kernels take 2-D ones, and a bucket runs
            # compiled only if all its tensors can)
            key = (gi, kind, muon, local.dtype, local.device, kind == "factored" and len(layout.global_shape) > 2) \
                + ((id(p),) if alone_large else ())
            # packed or not, and in which pack: from global sizes only, the same on every rank
            numel = packing.packed_numel(kind, muon, layout, local.dtype) if packs_ok[gi] else None
            if numel is not None:
                key += (grad.dtype,)
                number, count = fill.get(key, (0, 0))
                if count and count + numel > packing.CAPACITY:
                    number, count = number + 1, 0
                fill[key] = (number, count + numel)
                key += ("packed", number)
            b = keyed.get(key)
            if b is None:
                b = keyed[key] = Bucket(group=group, sc=scalars[gi], kind=kind, muon=muon, params=[], grads=[],
                                        states=[], layouts=[], dims=[], sr_seed=self.sr_seed,
                                        scratch=self._scratch if alone_large else None, alone=alone)
                if numel is not None:
                    packed.append(key)
            b.params.append(local)
            b.grads.append(grad)
            b.states.append(state)
            b.layouts.append(layout)
            b.dims.append(dims)
            b.positions.append(order[id(p)][1] if positions is None else positions[id(p)])
        buckets = list(keyed.values())
        total: list[int] = []  # counted once per step, and only if a bucket asks

        def total_params() -> int:
            if not total:
                total.append(sum(self._layout(p).global_numel for g in self.param_groups for p in g["params"]))
            return total[0]

        packable = {id(keyed[key]) for key in packed if len(keyed[key].params) > 1}
        for b in buckets:  # the compiled fast path where it applies (prodigy_dist.compiled.choose)
            if compiled.choose(b, self.fast_path, total_params, alone, packable=id(b) in packable):
                b.impl = compiled
        for key in packed:
            b = keyed[key]
            if id(b) in packable and b.impl is None:
                pack = packing.pack_for(self._packs, b.params, b.layouts)
                flats = pack.adopt(b.states, b.params[0].dtype)  # the state, kept flat
                if flats is not None:
                    b.pack, b.flat = pack, flats
        return compiled.merge(buckets)

    def _planned_buckets(self, items: list[tuple[int, torch.Tensor]], scalars: list[dict]) -> list[Bucket]:
        """:meth:`_buckets`, reused from the last step when nothing it depends on changed (on one process without
        DTensors): the same parameters with gradients, their state dicts, dtypes and memory layouts, the groups and
        their options, the step flags that select kernels, the fast path. Forming the buckets costs several
        microseconds per tensor (a 20M-parameter GPT: ~0.7 ms a step from a cold cache), the check about one."""
        key = self._plan_key(items, scalars)
        plan = self._plan
        try:
            same = key is not None and plan is not None and plan[0] == key
        except RuntimeError:  # a group entry that does not compare (a tensor of several values): form them anew
            same = False
        if same:
            buckets = plan[1]
            by_group = {id(g): sc for g, sc in zip(self.param_groups, scalars)}
            for b in buckets:
                b.sc = by_group[id(b.group)]
                b.grads = [p.grad for p in b.params]  # (one process, no DTensor: the params are the local pieces)
                if b.pack is not None:
                    flats = b.pack.adopt(b.states, b.params[0].dtype)
                    if flats is None:  # the state changed dtypes: form the buckets anew
                        break
                    b.flat = flats
            else:
                return buckets
        buckets = self._buckets(items, scalars)
        self._plan = (key, buckets) if key is not None else None
        return buckets

    def _plan_key(self, items: list[tuple[int, torch.Tensor]], scalars: list[dict]) -> tuple | None:
        """What the buckets of a step depend on (compared with ==), or None where they are not reused (under a
        reducer, DTensors, a parameter without state yet)."""
        if self._reducer.active:
            return None
        state = self.state
        per_param = []
        for gi, p in items:
            st = state.get(p)
            if not st or _is_dtensor(p):
                return None
            g = p.grad
            per_param.append((gi, id(p), id(st), p.dtype, g.dtype, p.is_contiguous(), g.is_contiguous()))
        groups = tuple((id(g), tuple((k, v) for k, v in g.items() if k not in _PER_STEP_KEYS))
                       for g in self.param_groups)
        flags = tuple((sc["adopt_first"], sc["raw_update"]) for sc in scalars)
        settings = (self.fast_path, packing.ENABLED, compiled.LIST_MAX, compiled.AUTO_CPU_MIN_PARAMS,
                    compiled.AUTO_CPU_NATIVE_MIN_PARAMS)
        return settings, tuple(per_param), groups, flags

    def _run_step(self, items: list[tuple[int, torch.Tensor]]) -> None:
        scalars = [step_scalars(g) for g in self.param_groups]
        buckets = self._planned_buckets(items, scalars)
        try:
            rows = self._phase_a(buckets)
            sums = self._finish_statistics(buckets, rows)
            if sums is None:
                return
            self._phase_b(buckets)
            self._end_step(scalars, sums, stepped={id(b.group) for b in buckets if not b.sc["adopt_first"]})
        finally:
            for b in buckets:  # (kept for the next step: without the gradients, which the caller may free)
                b.release()

    def _phase_a(self, buckets: list[Bucket]) -> torch.Tensor:
        for b in buckets:
            for t in (b.impl or kernels).statistics(b):
                self._reducer.add(t)
        device = buckets[0].params[0].device if buckets else self._device()
        rows = torch.cat([b.stats for b in buckets]) if buckets else torch.zeros(0, 4, device=device)
        self._reducer.add(rows)
        self._reducer.flush()
        return rows

    def _device(self) -> torch.device:
        for g in self.param_groups:
            for p in g["params"]:
                return self._local(p).device
        return torch.device("cpu")

    def _phase_b(self, buckets: list[Bucket]) -> None:
        gens = [(b.impl or kernels).update(b) for b in buckets]
        if not self._reducer.active:
            for gen in gens:  # nothing to combine: finish each bucket before starting the next
                for items in gen:
                    self._submit(items)
                    self._flush()
            return
        while gens:  # lock-step: every bucket reaches its next reduction point, then one collective
            running = []
            for gen in gens:
                try:
                    self._submit(next(gen))
                    running.append(gen)
                except StopIteration:
                    pass
            if not running:
                break
            self._flush()
            gens = running

    def _submit(self, items: list[Any]) -> None:
        """Register what an update kernel yielded: partial sums to reduce, and Muon requests."""
        for t in items:
            if isinstance(t, Orthogonalise):
                self._muon_requests.append(t)
            else:
                self._reducer.add(t)

    def _flush(self) -> None:
        """One round: the bucketed all-reduce of the partial sums, then the Muon directions of the round."""
        self._reducer.flush()
        requests, self._muon_requests = self._muon_requests, []
        if requests:
            orthogonalise(requests, self._reducer)

    def _finish_statistics(self, buckets: list[Bucket], rows: torch.Tensor) -> tuple[list[float], list[float]] | None:
        """Turn reduced per-tensor rows into per-group (numerator, denominator); the step's one host sync.

        Returns None (after counting or raising) when a gradient was not finite; otherwise commits the new
        Prodigy ``s`` and SPEED running values and returns the host sums.
        """
        groups = self.param_groups
        split = groups[0]["split_groups"]
        n_acc = len(groups) if split else 1
        device = rows.device
        speed_commits = []
        parts = []  # (rows, their numerators, their denominators)
        runs: list[list] = []  # [start, end, delta, s dtype]: consecutive buckets with the same, one operation each
        start = 0
        for b in buckets:
            n = len(b.params)
            sl = slice(start, start + n)
            start += n
            if not (b.sc["prodigy_active"] and not b.sc["adopt_first"]):
                continue
            delta = b.sc["delta"]
            if not b.group["use_speed"]:
                s_dtype = b.states[0]["s"].dtype
                if runs and runs[-1][1] == sl.start and runs[-1][2:] == [delta, s_dtype]:
                    runs[-1][1] = sl.stop
                else:
                    runs.append([sl.start, sl.stop, delta, s_dtype])
            else:
                dot, l1, l2 = rows[sl, DOT], rows[sl, ABS_S], rows[sl, L2SQ].sqrt()
                beta = speed_beta(b.sc["k"])
                prev = torch.stack([st.get("exp_avg_x0_dot", dot[i]) for i, st in enumerate(b.states)])
                prev = torch.where(prev.isnan(), dot, prev)
                ema = prev * beta + dot * (1 - beta)
                tiny = torch.full_like(l1, 1e-8)
                l1 = torch.maximum(l1, torch.stack([st.get("max_x0_minus_l1_norm", tiny[i])
                                                    for i, st in enumerate(b.states)]))
                l2 = torch.maximum(l2, torch.stack([st.get("max_x0_minus_l2_norm", tiny[i])
                                                    for i, st in enumerate(b.states)]))
                parts.append((sl, (delta / (l2 + 1).square()) * ema / l1, l2))
                speed_commits.append((b, ema, l1, l2))
        for first, end, delta, s_dtype in runs:
            sl = slice(first, end)
            parts.append((sl, delta * rows[sl, DOT], rows[sl, ABS_S].to(s_dtype).float()))  # (sum|s| in s's dtype)
        if len(parts) == 1 and parts[0][0] == slice(0, rows.shape[0]):  # (one part covers every row)
            _, num_t, den_t = parts[0]
        else:
            num_t = torch.zeros(rows.shape[0], dtype=torch.float32, device=device)
            den_t = torch.zeros_like(num_t)
            for sl, num_part, den_part in parts:
                num_t[sl], den_t[sl] = num_part, den_part
        perm_t, acc_index = self._sum_order(buckets, device)
        num = torch.zeros(n_acc, dtype=torch.float32, device=device).index_add_(0, acc_index, num_t[perm_t])
        den = torch.zeros(n_acc, dtype=torch.float32, device=device).index_add_(0, acc_index, den_t[perm_t])
        # the one host synchronisation of the step; a NaN or Inf anywhere in the rows shows in its column's sum
        host = torch.cat([num, den, rows.sum(0)]).tolist()
        grads_finite = math.isfinite(host[2 * n_acc + GSQ])
        stats_finite = all(math.isfinite(v) for v in host)
        if not grads_finite:
            self._skip_step()
            return None
        if not stats_finite:
            raise RuntimeError("ProdigyPlusScheduleFree: the Prodigy statistics are not finite although the "
                               "gradients are: the weights or the optimizer state hold NaN/Inf. Reload the last "
                               "good checkpoint")
        for b in buckets:
            if b.s_new and b.s_new[0] is not None:
                kernels.commit_s(b)
        for b, ema, l1, l2 in speed_commits:
            for i, st in enumerate(b.states):
                st["exp_avg_x0_dot"], st["max_x0_minus_l1_norm"], st["max_x0_minus_l2_norm"] = ema[i], l1[i], l2[i]
        return host[:n_acc], host[n_acc:2 * n_acc]

    def _sum_order(self, buckets: list[Bucket], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For summing the per-tensor rows of a step in parameter order, whatever the bucketing or the order the hooks
        ran in: the permutation of the rows, and the accumulator (parameter group, or 0) of each permuted row. Kept
        with the bucket list they were made for (a reused plan reuses them)."""
        cached = self._sum_order_cache
        if cached is not None and cached[0] is buckets and cached[1] == device:
            return cached[2]
        groups = self.param_groups
        split = groups[0]["split_groups"]
        acc, positions = [], []
        for b in buckets:
            gi = next(i for i, g in enumerate(groups) if g is b.group) if split else 0
            acc += [gi] * len(b.params)
            positions += b.positions
        perm = sorted(range(len(positions)), key=positions.__getitem__)
        order = (torch.tensor(perm, dtype=torch.long, device=device),
                 torch.tensor([acc[i] for i in perm], dtype=torch.long, device=device))
        self._sum_order_cache = (buckets, device, order)
        return order

    def _skip_step(self) -> None:
        if self.nonfinite_grads == "raise":
            raise FloatingPointError("ProdigyPlusScheduleFree: non-finite gradient (NaN or Inf); the step was not "
                                     "applied. Use nonfinite_grads='skip' to skip such steps instead")
        for group in self.param_groups:
            group["skipped_steps"] += 1
        logger.warning("non-finite gradient: step skipped (weights, state and d untouched; %d skipped so far)",
                       self.param_groups[0]["skipped_steps"])

    def _end_step(self, scalars: list[dict], sums: tuple[list[float], list[float]], stepped: set[int]) -> None:
        groups = self.param_groups
        split = groups[0]["split_groups"]
        num, den = sums
        for gi, group in enumerate(groups if split else groups[:1]):
            if group["prodigy_steps"] > 0 and group["k"] == group["prodigy_steps"]:
                logger.info("param group %d: d frozen at %.6g after %d steps (prodigy_steps)", gi, group["d"],
                            group["k"])
            update_d(group, num[gi], den[gi])
        if split and groups[0]["split_groups_mean"]:
            shared = harmonic_mean([g["d"] for g in groups])
            for g in groups:
                g["shared_d"] = shared
        if not split:
            for g in groups[1:]:
                for key in _D_KEYS:
                    g[key] = groups[0][key]
        for g, sc in zip(groups, scalars):
            if g["use_schedulefree"]:
                if id(g) in stepped:
                    g["weight_sum"] = sc["weight_sum"]
                    g["effective_lr"] = g["lr"] * sc["xy"]
            else:
                g["effective_lr"] = g["lr"]
            g["dlr"] = sc["dlr"]
            g["k"] += 1

    # ------------------------------------------------------------------ fused backward pass
    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict[str, Any] | None = None) -> None:
        """Step one parameter now, from its gradient (fused backward pass; see prodigy_dist.fused_backward).

        The step's d statistics are collected and d is updated once per step, when the backward pass ends (or at
        the next ``step()``), so every parameter of a step sees the same d whatever order the hooks run in.
        """
        if p.grad is None:
            return
        self._fused.step_param(self, p, group)

    def metrics(self) -> dict[str, float]:
        """Numbers to log, per group ``i``: ``d/i``, ``dlr/i`` (d*lr, the Prodigy step size), ``effective_lr/i``
        (Schedule-Free: d*lr*xy; else d*lr), ``d_numerator/i``, ``d_denom/i``; plus ``step`` and
        ``skipped_steps``. No device synchronisation: the values were read at the step's single sync."""
        self._fused.finish(self)
        out: dict[str, float] = {}
        for i, g in enumerate(self.param_groups):
            out[f"d/{i}"] = float(g["d"])
            out[f"dlr/{i}"] = float(g["dlr"])
            out[f"effective_lr/{i}"] = float(g["dlr"] * g["effective_lr"] / g["lr"])
            out[f"d_numerator/{i}"] = float(g["d_numerator"])
            out[f"d_denom/{i}"] = float(g["d_denom"])
        out["step"] = float(self.param_groups[0]["k"] - 1)
        out["skipped_steps"] = float(self.param_groups[0]["skipped_steps"])
        return out


def _is_zero(lr: Any) -> bool:
    return bool(lr == 0) if not torch.is_tensor(lr) else lr.numel() == 1 and float(lr) == 0.0


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


class _FusedStepState:
    """Bookkeeping of a step driven parameter by parameter from gradient hooks.

    Each parameter is updated as its gradient arrives; its statistics rows are kept, and the step is finished
    (one reduction, one host sync, d update, counter) once: at the end of the backward pass, or before the same
    parameter is stepped again, or at ``step()``/``metrics()``/``state_dict()``.
    """

    def __init__(self):
        self.seen = False
        self.scalars: list[dict] | None = None
        self.done: dict[int, int] = {}  # id(param) -> order index of the parameter in the optimizer
        self.buckets: list[tuple[int, Bucket]] = []
        self.callback_queued = False

    def step_param(self, opt: ProdigyPlusScheduleFree, p: torch.Tensor, group: dict | None) -> None:
        self.seen = True
        if id(p) in self.done:
            self.finish(opt)  # the same parameter again: the previous step is over
        if self.scalars is None:
            opt._check_train_mode()
            self.scalars = [step_scalars(g) for g in opt.param_groups]
        order = opt._param_order()
        gi = order[id(p)][0] if group is None else next(i for i, g in enumerate(opt.param_groups) if g is group)
        (b,) = opt._buckets([(gi, p)], self.scalars)
        for t in (b.impl or kernels).statistics(b):
            opt._reducer.add(t)
        opt._reducer.flush()
        for items in (b.impl or kernels).update(b):
            opt._submit(items)
            opt._flush()
        self.done[id(p)] = order[id(p)][1]
        self.buckets.append((order[id(p)][1], b))
        self._queue_finish(opt)

    def _queue_finish(self, opt) -> None:
        if self.callback_queued:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self.finish(opt))
            self.callback_queued = True
        except RuntimeError:
            pass  # not inside a backward pass: finished lazily

    def finish(self, opt: ProdigyPlusScheduleFree) -> None:
        self.callback_queued = False
        if self.scalars is None:
            return
        scalars, entries = self.scalars, sorted(self.buckets, key=lambda e: e[0])
        self.scalars, self.buckets, self.done = None, [], {}
        buckets = [b for _, b in entries]
        rows = torch.cat([b.stats for b in buckets])
        opt._reducer.add(rows)
        opt._reducer.flush()
        sums = opt._finish_statistics(buckets, rows)
        if sums is None:
            logger.error("fused backward pass: the updates already applied during backward used a non-finite "
                         "gradient; d and the step counter were left untouched")
            return
        opt._end_step(scalars, sums, stepped={id(b.group) for b in buckets if not b.sc["adopt_first"]})
