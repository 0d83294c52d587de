"""DeepSpeed integration: the optimizer named in a DeepSpeed JSON config, exact under ZeRO 0, 1, 2 and 3.

Registration (DISTRIBUTED.md D4). DeepSpeed has no optimizer registry: a config's ``"optimizer": {"type": NAME}``
must be one of DeepSpeed's own names or ``getattr(torch.optim, NAME)``. ``import prodigy_dist`` therefore sets
``torch.optim.ProdigyPlusScheduleFree`` to our class (a documented monkey-patch; nothing else in ``torch.optim`` is
touched). ZeRO refuses optimizers not in its ``ZERO_SUPPORTED_OPTIMIZERS`` list unless the config sets
``zero_allow_untested_optimizer``; the optimizer adds its own class to that list when it is built while DeepSpeed is
imported, because it handles ZeRO's flat partitions itself (below), so the flag is not needed.

What ZeRO hands the optimizer, and how the math sees the one-process truth:

* ZeRO-0: the real parameters (fp32) or fp32 master copies of the original shapes (bf16/fp16,
  ``FP16_UnfusedOptimizer``), with the gradients already averaged: every rank computes the same step. DeepSpeed's
  zero-gradient ``step()`` at construction (it allocates Adam's state that way) only allocates our state here.
* ZeRO-1/2: one flat fp32 partition per parameter group; ``step()`` is called once per group. ZeRO-3: one flat fp32
  partition per sub-group; ``step()`` is called once per sub-group. The binding below reads from the ZeRO optimizer
  which global flat range of which parameter (of which global shape) sits where in each partition
  (:func:`prodigy_dist.layout.fragment_layout`), and steps every parameter of the partition as a fragment: factored
  statistics, Prodigy samples (global flat index mod 11) and per-tensor sums are partial sums over the fragments of
  every rank, summed with the optimizer's bucketed all-reduce; Muon matrices are assembled on one owner rank each
  (:func:`prodigy_dist.reduction.orthogonalise`). A rank holding nothing of a parameter still joins with an empty fragment. d and the step counter are finalised once per training step, after the last partition's call.

The binding is made automatically at the first ``step()`` (the ZeRO optimizer is found among the callers), or
explicitly with :func:`attach`. Settings that fight the optimizer are reported then (:func:`check_engine`).

Checkpoints: ``engine.save_checkpoint``/``load_checkpoint`` work at the same data-parallel size (the state of a
partition is plain tensors in ``optimizer.state[partition]``). :func:`export_state`/:func:`import_state` move the
optimizer state (and fp32 master weights) keyed by parameter name with global shapes between DeepSpeed at any
data-parallel size, FSDP2 and one process; files are written with ``torch.save`` and read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .layout import SLICE, ParamLayout, fragment_layout

logger = logging.getLogger(__name__)

#: The name a DeepSpeed config uses: ``"optimizer": {"type": "ProdigyPlusScheduleFree"}``.
CONFIG_NAME = "ProdigyPlusScheduleFree"

#: Format tag of :func:`export_state` files.
EXPORT_FORMAT = "prodigy_dist.portable_state/1"

_ZERO12 = "DeepSpeedZeroOptimizer"
_ZERO3 = "DeepSpeedZeroOptimizer_Stage3"
_UNFUSED = "FP16_UnfusedOptimizer"
_UNSUPPORTED_WRAPPERS = {
    "BF16_Optimizer": "ZeRO-1 with bf16 weights and fp32 gradient accumulation (DeepSpeed's BF16_Optimizer) is not "
                      "supported: set data_types.grad_accum_dtype to \"bf16\", or use ZeRO stage 2",
    "FP16_Optimizer": "DeepSpeed's fused FP16_Optimizer (one flat master tensor) is not supported: use ZeRO stage "
                      "1-3 or the unfused path",
}

#: State keys stored as one flat tensor the size of a ZeRO partition (every element has one); the others are stored
#: per parameter under "<index>.<key>".
_FLAT_KEYS = ("z", "exp_avg")
#: Every parameter's state holds one of these (the second moment), so their presence says the state exists.
_MARKER_KEYS = ("exp_avg_sq_row", "exp_avg_sq")


# ---------------------------------------------------------------------------------------------------- registration
def register_with_torch_optim() -> None:
    """Make ``torch.optim.ProdigyPlusScheduleFree`` our class (DeepSpeed resolves config names there)."""
    from .optimizer import ProdigyPlusScheduleFree
    existing = getattr(torch.optim, CONFIG_NAME, None)
    if existing is not None and existing is not ProdigyPlusScheduleFree:
        logger.warning("torch.optim.%s is already %r; not replaced, so a DeepSpeed config naming %s gets that class",
                       CONFIG_NAME, existing, CONFIG_NAME)
        return
    setattr(torch.optim, CONFIG_NAME, ProdigyPlusScheduleFree)
    if "deepspeed" in sys.modules:
        allow_under_zero()


def allow_under_zero() -> None:
    """Add our class to DeepSpeed's ZeRO-supported optimizers (exact-type list), if DeepSpeed can be imported."""
    from .optimizer import ProdigyPlusScheduleFree
    try:
        utils = importlib.import_module("deepspeed.runtime.zero.utils")
    except Exception:  # DeepSpeed missing or broken: nothing to declare
        return
    if ProdigyPlusScheduleFree not in utils.ZERO_SUPPORTED_OPTIMIZERS:
        utils.ZERO_SUPPORTED_OPTIMIZERS.append(ProdigyPlusScheduleFree)


def prepare_for_deepspeed(opt) -> None:
    """Called by the optimizer's constructor when DeepSpeed is imported: declare ZeRO support and remember the list
    of parameter groups (ZeRO-1/2 swap ``param_groups`` for a one-group list during each ``step()`` call)."""
    allow_under_zero()
    opt._ds_all_groups = opt.param_groups


# ---------------------------------------------------------------------------------------------------- the step
def deepspeed_step(opt) -> bool:
    """Called at the top of ``opt.step()`` when DeepSpeed is imported. Returns True when the call was handled here:
    a ZeRO partition's step, or the zero-gradient step DeepSpeed runs at construction to allocate state."""
    binding = getattr(opt, "_ds_binding", None)
    if binding is None:
        callers = _callers(opt)
        if callers is None:
            return False
        if callers.allocating:
            opt.init_state()
            return True
        binding = _bind(opt, callers.wrapper, callers.engine)
    return binding.step(opt)


@dataclass
class _Callers:
    wrapper: Any  # the DeepSpeed object whose .optimizer is ours (ZeRO or fp16 wrapper), or None
    engine: Any  # the DeepSpeedEngine, or None
    allocating: bool  # inside FP16_UnfusedOptimizer.initialize_optimizer_states


def _callers(opt, depth: int = 24) -> _Callers | None:
    """Find who is calling ``opt.step()``: a DeepSpeed wrapper or engine among the caller frames, or None."""
    frame = sys._getframe(2)
    wrapper = engine = None
    for _ in range(depth):
        if frame is None:
            break
        obj = frame.f_locals.get("self")
        if obj is not None and not type(obj).__module__.startswith("deepspeed"):
            obj = None  # only DeepSpeed's own objects (a trainer holding .optimizer is not a ZeRO wrapper)
        name = type(obj).__name__ if obj is not None else ""
        if name == _UNFUSED and frame.f_code.co_name == "initialize_optimizer_states":
            return _Callers(obj, None, True)
        if wrapper is None and obj is not None and obj is not opt and getattr(obj, "optimizer", None) is opt:
            wrapper = obj
        if engine is None and obj is not None and hasattr(obj, "zero_optimization_stage") and \
                hasattr(obj, "gradient_clipping"):
            engine = obj
        frame = frame.f_back
    if wrapper is None and engine is None:
        return None
    if wrapper is engine:  # ZeRO-0 fp32: the engine drives the optimizer itself
        wrapper = None
    return _Callers(wrapper, engine, False)


def attach(engine_or_wrapper: Any, optimizer: Any = None) -> "_Binding":
    """Bind the optimizer to a DeepSpeed engine (or its ZeRO optimizer) now, instead of at the first ``step()``;
    reports settings that fight the optimizer. Returns the binding (its ``stage`` and ``pieces()`` describe what
    each rank holds)."""
    from .optimizer import ProdigyPlusScheduleFree
    engine = engine_or_wrapper if hasattr(engine_or_wrapper, "zero_optimization_stage") else None
    wrapper = engine.optimizer if engine is not None else engine_or_wrapper
    opt = optimizer
    if opt is None:
        opt = wrapper if isinstance(wrapper, ProdigyPlusScheduleFree) else getattr(wrapper, "optimizer", None)
    if not isinstance(opt, ProdigyPlusScheduleFree):
        raise TypeError(f"attach: expected a DeepSpeed engine or ZeRO optimizer wrapping a ProdigyPlusScheduleFree, "
                        f"got {type(engine_or_wrapper).__name__} wrapping {type(opt).__name__}")
    if wrapper is opt:
        wrapper = None
    existing = getattr(opt, "_ds_binding", None)
    if existing is not None and existing.wrapper is wrapper:
        if engine is not None and existing.engine is None:
            existing.engine = engine
            check_engine(engine, opt)
        return existing
    return _bind(opt, wrapper, engine)


def _bind(opt, wrapper, engine) -> "_Binding":
    name = type(wrapper).__name__ if wrapper is not None else ""
    if name in _UNSUPPORTED_WRAPPERS:
        raise NotImplementedError(_UNSUPPORTED_WRAPPERS[name])
    if engine is not None:
        check_engine(engine, opt)
    elif wrapper is not None and getattr(wrapper, "clip_grad", 0) and getattr(wrapper, "clip_grad", 0) > 0:
        _warn_clipping(wrapper.clip_grad)
    if name == _ZERO12 or name == _ZERO3:
        binding: _Binding = _ZeroBinding(opt, wrapper, engine)
    else:
        binding = _Binding(opt, wrapper, engine)
    opt._ds_binding = binding
    return binding


def _comm_device(group: Any) -> torch.device:
    """Where collective buffers must live for ``group``: the CPU for gloo, else DeepSpeed's accelerator device."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    try:
        from deepspeed.accelerator import get_accelerator
        return torch.device(get_accelerator().current_device_name())
    except Exception:  # DeepSpeed's accelerator unavailable: the current CUDA device
        return torch.device("cuda", torch.cuda.current_device())


def _warn_clipping(value: float) -> None:
    logger.warning("DeepSpeed gradient_clipping=%g rescales the gradients before ProdigyPlusScheduleFree sees them: "
                   "d is estimated from the clipped gradients and clipped steps are taken at the unclipped step size "
                   "(StableAdamW already bounds the update). Set \"gradient_clipping\": 0 unless you need it", value)


def check_engine(engine: Any, opt: Any) -> None:
    """Report DeepSpeed settings that fight the optimizer: errors for what cannot work, warnings otherwise."""
    stage = engine.zero_optimization_stage()
    groups = getattr(opt, "_ds_all_groups", opt.param_groups)
    if any(g["fused_back_pass"] for g in groups):
        raise NotImplementedError("fused_back_pass under DeepSpeed is not supported: DeepSpeed owns the backward "
                                  "pass and calls step(); use fused_back_pass=False")
    if engine.gradient_clipping() > 0:
        _warn_clipping(engine.gradient_clipping())
    if engine.fp16_enabled() and not engine.dynamic_loss_scale() and (engine.loss_scale() or 1.0) <= 1.0:
        logger.warning("DeepSpeed fp16 without loss scaling (static loss_scale=%s): small gradients underflow to "
                       "zero in fp16 and Prodigy's d stalls. Use \"loss_scale\": 0 (dynamic) or bf16",
                       engine.loss_scale())
    if getattr(engine, "lr_scheduler", None) is not None and any(g["use_schedulefree"] for g in groups):
        logger.warning("a DeepSpeed LR scheduler (%s) drives ProdigyPlusScheduleFree's lr: Schedule-Free needs no "
                       "schedule and d adapts the step size; remove the \"scheduler\" section unless this is "
                       "intended (e.g. warmup)", type(engine.lr_scheduler).__name__)


class _Binding:
    """ZeRO-0: the optimizer sees whole tensors; nothing to translate."""

    stage = 0

    def __init__(self, opt, wrapper, engine):
        self.wrapper, self.engine = wrapper, engine

    def step(self, opt) -> bool:
        return False

    def pieces(self) -> list["_Piece"]:
        return []

    @torch.no_grad()
    def set_mode(self, opt, train: bool) -> None:
        """Schedule-Free train/eval on what ZeRO-0 steps, then refresh DeepSpeed's low-precision model weights."""
        opt._set_mode(train)
        if type(self.wrapper).__name__ == _UNFUSED:
            for lows, highs in zip(self.wrapper.fp16_groups, self.wrapper.fp32_groups):
                for lp, hp in zip(lows, highs):
                    lp.data.copy_(hp.data)


@dataclass
class _Piece:
    """One parameter's fragment in one ZeRO flat partition."""

    param: torch.Tensor  # the model parameter (ZeRO-3: partitioned, global shape in ds_shape)
    name: str | None
    layout: ParamLayout
    offset: int  # where the fragment starts in the flat partition
    index: int  # position in the partition (names its per-parameter state keys)


@dataclass
class _Call:
    """What one ``step()`` call of the ZeRO optimizer steps: one flat fp32 partition."""

    flat: torch.Tensor
    group_index: int
    pieces: list[_Piece]


class _ZeroBinding(_Binding):
    """ZeRO 1-3: flat partitions, one ``step()`` call per partition, d finalised after the last one."""

    def __init__(self, opt, wrapper, engine):
        super().__init__(opt, wrapper, engine)
        import torch.distributed as dist
        names = getattr(wrapper, "param_names", None) or {}
        self.groups = getattr(opt, "_ds_all_groups", None)
        if self.groups is None:  # built before DeepSpeed was imported: the full list, where it can be told
            full = wrapper.optimizer.param_groups
            n_groups = len(getattr(wrapper, "bit16_groups", None) or full)
            if type(wrapper).__name__ == _ZERO3 or len(full) == n_groups:
                self.groups = opt._ds_all_groups = full
        if self.groups is None:
            raise RuntimeError("ProdigyPlusScheduleFree was built before DeepSpeed was imported, so it cannot find "
                               "all of its parameter groups inside a ZeRO step: call "
                               "prodigy_dist.deepspeed.attach(engine) right after deepspeed.initialize, or import "
                               "deepspeed before building the optimizer")
        self.calls: list[_Call] = []
        if type(wrapper).__name__ == _ZERO12:
            self.stage = 2 if getattr(wrapper, "partition_gradients", False) else 1
            for i, flat in enumerate(wrapper.single_partition_of_fp32_groups):
                group = wrapper.real_dp_process_group[i]
                pieces = []
                for k, lp in enumerate(wrapper.bit16_groups[i]):
                    mapping = getattr(lp, "_hp_mapping", None)
                    if mapping is None:
                        start, numel, offset = 0, 0, 0
                    else:
                        start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
                        offset = mapping.hp_fragment_address.start
                    pieces.append(_Piece(lp, names.get(lp), fragment_layout(tuple(lp.shape), start, numel, group),
                                         offset, k))
                self.calls.append(_Call(flat, i, pieces))
        else:
            self.stage = 3
            group = wrapper.dp_process_group
            rank = dist.get_rank(group)
            for j, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
                pieces, offset = [], 0
                for k, p in enumerate(wrapper.fp16_groups[j]):
                    per_rank = p.partition_numel()
                    start = rank * per_rank
                    numel = max(0, min(per_rank, p.ds_numel - start))
                    pieces.append(_Piece(p, names.get(p), fragment_layout(tuple(p.ds_shape), start if numel else 0,
                                                                          numel, group), offset, k))
                    offset += per_rank
                if offset != flat.numel():
                    raise RuntimeError(f"ZeRO-3 sub-group {j}: its parameters' partitions hold {offset} elements but "
                                       f"the flat fp32 partition has {flat.numel()}; this DeepSpeed version lays out "
                                       f"partitions differently from 0.19.8 (please report)")
                self.calls.append(_Call(flat, wrapper.sub_group_to_group_id[j], pieces))
        offloaded = getattr(wrapper, "cpu_offload", False) or getattr(wrapper, "offload_optimizer", False)
        if offloaded and self.calls and _comm_device(self.calls[0].pieces[0].layout.group).type != "cpu":
            raise NotImplementedError("ZeRO-Offload with an accelerator is not supported yet: the optimizer's "
                                      "per-step sums live on the CPU with the offloaded partitions, but the process "
                                      "group needs accelerator tensors. Remove offload_optimizer (ZeRO-Offload with "
                                      "the CPU accelerator and gloo works)")
        for call in self.calls:
            for piece in call.pieces:
                if piece.layout.flat_numel and piece.offset + piece.layout.flat_numel > call.flat.numel():
                    raise RuntimeError(f"ZeRO partition map out of range for {piece.name or piece.index}")
        if self.calls:
            opt._use_group(self.calls[0].pieces[0].layout.group)
        self.index = {id(c.flat): j for j, c in enumerate(self.calls)}
        self.ranges = self._rank_ranges()
        opt._reducer.fragment_spans.update(self.ranges)  # where every rank's fragments sit (Muon's exchange)
        self.next_call = 0
        self._step: dict[str, Any] = {}

    def pieces(self) -> list[_Piece]:
        return [p for c in self.calls for p in c.pieces]

    def _rank_ranges(self) -> dict[int, list[tuple[int, int]]]:
        """id(layout) -> every rank's (global flat start, length) of that parameter (for Muon's exchange).

        ZeRO-3 partitions are a formula of the rank; ZeRO-1/2 ranges are gathered once (a collective at binding,
        which happens on every rank at the same point: the first step or attach())."""
        import torch.distributed as dist
        pieces = self.pieces()
        if not pieces:
            return {}
        group = pieces[0].layout.group
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        if self.stage == 3:
            out = {}
            for piece in pieces:
                per_rank = piece.param.partition_numel()
                ranges = []
                for r in range(world):
                    n = max(0, min(per_rank, piece.param.ds_numel - r * per_rank))
                    ranges.append((r * per_rank if n else 0, n))
                out[id(piece.layout)] = ranges
            return out
        mine = torch.tensor([[p.layout.flat_start, p.layout.flat_numel] for p in pieces], dtype=torch.int64,
                            device=_comm_device(group))
        if world > 1:
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine, group=group)
        else:
            every = [mine]
        every = [t.cpu() for t in every]
        return {id(p.layout): [tuple(int(v) for v in every[r][k]) for r in range(world)]
                for k, p in enumerate(pieces)}

    @torch.no_grad()
    def set_mode(self, opt, train: bool) -> None:
        """Schedule-Free train/eval on the flat fp32 partitions (shown to the optimizer as its parameters), then
        refresh the model weights from them the way ZeRO does after a step."""
        groups = opt._ds_all_groups
        shown, saved = opt.param_groups, [g["params"] for g in groups]
        if self.stage == 3:  # as ZeRO-3's step: release gathered (also persistent) parameters first
            self.wrapper._partition_all_parameters()
        try:
            for g in groups:
                g["params"] = []
            for call in self.calls:
                groups[call.group_index]["params"].append(call.flat)
            opt.param_groups = groups
            opt._set_mode(train)
        finally:
            for g, params in zip(groups, saved):
                g["params"] = params
            opt.param_groups = shown
        w = self.wrapper
        if self.stage == 3:
            for j in range(len(self.calls)):
                w._reassign_or_swap_out_partitioned_parameters(j)
            if getattr(w, "persistent_parameters", None):
                w.persistent_parameters[0].all_gather(w.persistent_parameters)
            w.invalidate_secondary_tensor()
        else:
            w.update_lp_params()

    def _current(self, opt) -> int:
        tensors = [p for g in opt.param_groups for p in g["params"]]
        if len(tensors) != 1 or id(tensors[0]) not in self.index:
            raise RuntimeError(f"ProdigyPlusScheduleFree under ZeRO-{self.stage}: step() was called with "
                               f"{len(tensors)} tensors that are not one of the ZeRO optimizer's flat partitions; "
                               f"call engine.step() (not optimizer.step()) under ZeRO")
        return self.index[id(tensors[0])]

    @torch.no_grad()
    def step(self, opt) -> bool:
        j = self._current(opt)
        if j != self.next_call:
            raise RuntimeError(f"ZeRO stepped partition {j} while partition {self.next_call} was expected: every "
                               f"training step must step every partition in order")
        shown = opt.param_groups
        self.groups = opt._ds_all_groups  # replaced by load_state_dict
        if not any(g is self.groups[self.calls[j].group_index] for g in shown):
            raise RuntimeError("ProdigyPlusScheduleFree under ZeRO: the parameter groups DeepSpeed shows are not the "
                               "optimizer's own (were param_groups replaced?); re-create the engine")
        opt.param_groups = self.groups  # the optimizer's view: every group (ZeRO-1/2 show one at a time)
        views: list[torch.Tensor] = []
        try:
            if j == 0:
                from .scalars import step_scalars
                opt._check_train_mode()
                self._step = dict(scalars=[step_scalars(g) for g in self.groups], num=None, den=None,
                                  stepped=set(), skipped=False)
            st = self._step
            if not st["skipped"]:
                sums = self._run(opt, self.calls[j], views)
                if sums is None:
                    st["skipped"] = True
                    if j > 0:
                        logger.error("non-finite gradient in ZeRO partition %d after %d partitions were stepped: "
                                     "those keep their update; d and the step counter are left untouched", j, j)
                else:
                    num, den, stepped = sums
                    st["num"] = num if st["num"] is None else [a + b for a, b in zip(st["num"], num)]
                    st["den"] = den if st["den"] is None else [a + b for a, b in zip(st["den"], den)]
                    st["stepped"] |= stepped
            if j == len(self.calls) - 1 and not st["skipped"]:
                opt._end_step(st["scalars"], (st["num"], st["den"]), st["stepped"])
        finally:
            for v in views:
                opt.state.pop(v, None)
                opt._layouts.pop(id(v), None)
            opt.param_groups = shown
            self.next_call = (j + 1) % len(self.calls)
        return True

    def _run(self, opt, call: _Call, views: list[torch.Tensor]):
        """Phase A, the host sync, phase B for one partition; returns (num, den, stepped groups) or None."""
        flat = call.flat
        if flat.grad is None:
            raise RuntimeError("ZeRO called step() on a partition without gradient")
        store = opt.state[flat]
        items, positions = [], {}
        for piece in call.pieces:
            n = piece.layout.flat_numel
            v = flat.detach().narrow(0, piece.offset, n)
            v.grad = flat.grad.narrow(0, piece.offset, n)
            views.append(v)
            opt._layouts[id(v)] = piece.layout
            opt.state[v] = _FragmentState(store, flat, piece.index, piece.offset, n)
            items.append((call.group_index, v))
            positions[id(v)] = piece.index
        buckets = opt._buckets(items, self._step["scalars"], positions)
        rows = opt._phase_a(buckets)
        sums = opt._finish_statistics(buckets, rows)
        if sums is None:
            return None
        opt._phase_b(buckets)
        return sums[0], sums[1], {id(b.group) for b in buckets if not b.sc["adopt_first"]}


class _FragmentState(MutableMapping):
    """The state of one parameter's fragment, stored in its partition's state dict: ``z``/``exp_avg`` as views of
    partition-sized flat tensors, everything else under ``"<index>.<key>"`` (so DeepSpeed's checkpoints hold plain
    tensors keyed by the partition)."""

    def __init__(self, store: dict, flat: torch.Tensor, index: int, offset: int, numel: int):
        self.store, self.flat, self.prefix, self.offset, self.numel = store, flat, f"{index}.", offset, numel

    def _own(self) -> list[str]:
        return [k[len(self.prefix):] for k in self.store if isinstance(k, str) and k.startswith(self.prefix)]

    def _initialised(self) -> bool:
        """Whether this parameter's state exists (every state has one of the second-moment keys), in O(1)."""
        return any(self.prefix + k in self.store for k in _MARKER_KEYS)

    def __getitem__(self, key: str) -> Any:
        if key in _FLAT_KEYS:
            if key not in self.store or not self._initialised():
                raise KeyError(key)
            return self.store[key].narrow(0, self.offset, self.numel)
        return self.store[self.prefix + key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _FLAT_KEYS:
            full = self.store.get(key)
            if full is None:
                full = self.store[key] = torch.zeros(self.flat.numel(), dtype=value.dtype, device=value.device)
            full.narrow(0, self.offset, self.numel).copy_(value.reshape(-1))
        else:
            self.store[self.prefix + key] = value

    def __delitem__(self, key: str) -> None:
        if key in _FLAT_KEYS:
            raise KeyError(f"{key} is stored for the whole partition and cannot be removed per parameter")
        del self.store[self.prefix + key]

    def __iter__(self) -> Iterator[str]:
        own = self._own()
        if own:
            yield from (k for k in _FLAT_KEYS if k in self.store)
        yield from own

    def __len__(self) -> int:  # truthiness is asked at every step: O(1) when empty, exact otherwise
        if not self._initialised():
            return len(self._own())
        return len(self._own()) + sum(k in self.store for k in _FLAT_KEYS)

    def __bool__(self) -> bool:
        return self._initialised()


def train(engine: Any) -> None:
    """Schedule-Free training mode for a DeepSpeed engine's weights (same as ``optimizer.train()`` once bound)."""
    opt, binding = _binding(engine)
    binding.set_mode(opt, True)


def eval(engine: Any) -> None:  # noqa: A001 (mirrors optimizer.eval)
    """Schedule-Free evaluation mode: the model weights become the averaged sequence x (every ZeRO stage)."""
    opt, binding = _binding(engine)
    binding.set_mode(opt, False)


# ---------------------------------------------------------------------------------------------------- export/import
def _sample_range(start: int, numel: int) -> tuple[int, int]:
    """(first, count) of the global Prodigy samples (flat indices 0, SLICE, ...) inside [start, start + numel)."""
    first = -(-start // SLICE)
    return first, max(0, -(-(start + numel) // SLICE) - first)


def _binding(engine: Any):
    from .optimizer import ProdigyPlusScheduleFree
    wrapper = engine.optimizer
    opt = wrapper if isinstance(wrapper, ProdigyPlusScheduleFree) else getattr(wrapper, "optimizer", None)
    if not isinstance(opt, ProdigyPlusScheduleFree):
        raise TypeError(f"expected a DeepSpeed engine whose optimizer is ProdigyPlusScheduleFree, got "
                        f"{type(opt).__name__}")
    return opt, attach(engine, opt)


def _group_record(group: dict, names: list[str]) -> dict:
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k not in ("params",)}
    record["param_names"] = names
    return record


def _zero0_params(engine: Any, opt) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """ZeRO-0: (name, model parameter, the tensor the optimizer steps) in the optimizer's order."""
    wrapper = engine.optimizer
    by_id = {id(p): n for n, p in engine.module.named_parameters()}
    out = []
    if wrapper is opt:
        for g in opt.param_groups:
            out += [(by_id[id(p)], p, p) for p in g["params"]]
    else:  # FP16_UnfusedOptimizer: fp32 masters beside the bf16/fp16 model parameters
        for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups):
            out += [(by_id[id(lp)], lp, hp) for lp, hp in zip(lows, highs)]
    return out


@torch.no_grad()
def export_state(engine: Any, path: str | None = None) -> dict[str, Any]:
    """The optimizer state of a DeepSpeed engine in portable form (collective: call on every rank).

    Returns (and with ``path``, rank 0 writes with ``torch.save``) ``{"format", "param_groups", "state", "params"}``:
    ``state[name]`` holds every state tensor with the parameter's global shape (factored statistics with their
    global keepdim shapes, the Prodigy samples as the global sample vector), ``params[name]`` the fp32 weights the
    optimizer steps (master copies under bf16/fp16), ``param_groups`` the group options and scalars (d, k, ...) with
    the names of their parameters. Loadable with ``torch.load(weights_only=True)`` and :func:`import_state`.
    """
    import torch.distributed as dist
    opt, binding = _binding(engine)
    groups = getattr(opt, "_ds_all_groups", opt.param_groups)
    state_out: dict[str, dict[str, Any]] = {}
    params_out: dict[str, torch.Tensor] = {}
    group_names: list[list[str]] = [[] for _ in groups]
    if isinstance(binding, _ZeroBinding):
        reduce_list: list[torch.Tensor] = []
        for call in binding.calls:
            store = opt.state.get(call.flat, {})
            for piece in call.pieces:
                layout, name = piece.layout, piece.name
                if name is None:
                    raise RuntimeError("export_state: DeepSpeed did not record parameter names for this engine")
                group_names[call.group_index].append(name)
                shape, start, n = layout.global_shape, layout.flat_start, layout.flat_numel
                full = torch.zeros(layout.global_numel, dtype=torch.float32)
                full[start:start + n] = call.flat.detach().narrow(0, piece.offset, n).float().cpu()
                params_out[name] = full.view(shape)
                reduce_list.append(full)
                frag = _FragmentState(store, call.flat, piece.index, piece.offset, n)
                entry: dict[str, Any] = {}
                for key in list(frag):
                    value = frag[key]
                    if key in _FLAT_KEYS or key == "exp_avg_sq":
                        t = torch.zeros(layout.global_numel, dtype=value.dtype)
                        t[start:start + n] = value.cpu()
                        entry[key] = t.view(shape)
                        reduce_list.append(t)
                    elif key in ("p0", "s"):
                        first, count = _sample_range(start, n) if n else (0, 0)
                        t = torch.zeros(-(-layout.global_numel // SLICE), dtype=value.dtype)
                        t[first:first + count] = value.cpu()
                        entry[key] = t
                        reduce_list.append(t)
                    else:  # factored statistics and SPEED values: global and identical on every rank
                        entry[key] = value.detach().cpu().clone()
                state_out[name] = entry
        group = binding.calls[0].pieces[0].layout.group if binding.calls else None
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            _sum_disjoint(reduce_list, group)
    else:
        index = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        for name, _, hp in _zero0_params(engine, opt):
            group_names[index[id(hp)]].append(name)
            params_out[name] = hp.detach().float().cpu().clone()
            state_out[name] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                               for k, v in opt.state.get(hp, {}).items()}
    out = {"format": EXPORT_FORMAT, "param_groups": [_group_record(g, names) for g, names in zip(groups, group_names)],
           "state": state_out, "params": params_out}
    if path is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        torch.save(out, path)
    if path is not None and dist.is_initialized():
        dist.barrier()
    return out


def _sum_disjoint(tensors: list[torch.Tensor], group: Any) -> None:
    """Sum, in place across ranks, tensors that each rank filled on disjoint ranges (zeros elsewhere); one
    all_reduce per dtype."""
    import torch.distributed as dist
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):
        ts = by_dtype[dtype]
        flat = torch.cat([t.reshape(-1).float() for t in ts])  # bf16 samples: one rank's value plus zeros, exact
        flat = flat.to(_comm_device(group))
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        offset = 0
        for t in ts:
            t.reshape(-1).copy_(flat[offset:offset + t.numel()])
            offset += t.numel()


def load_exported(path: str) -> dict[str, Any]:
    """Read an :func:`export_state` file safely (``torch.load(weights_only=True)``) and check its format."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path!r} is not a prodigy_dist portable optimizer state (format {EXPORT_FORMAT!r})")
    return data


_SCALAR_SKIP = ("params", "param_names")


def state_dict_for(exported: dict[str, Any], named_params: dict[str, torch.Tensor] | list[tuple[str, Any]],
                   param_groups: list[dict]) -> dict[str, Any]:
    """A ``load_state_dict`` argument for an optimizer whose ``param_groups`` hold the named parameters (one process,
    DDP, or FSDP2, whose ``load_state_dict`` accepts full single-process tensors for sharded parameters)."""
    names_of = {id(p): n for n, p in (named_params.items() if isinstance(named_params, dict) else named_params)}
    state, groups_out, index = {}, [], 0
    if len(param_groups) != len(exported["param_groups"]):
        raise ValueError(f"the export has {len(exported['param_groups'])} parameter groups, the optimizer "
                         f"{len(param_groups)}")
    for gi, (group, saved) in enumerate(zip(param_groups, exported["param_groups"])):
        ids = []
        for p in group["params"]:
            name = names_of.get(id(p))
            if name is None or name not in exported["state"]:
                raise ValueError(f"parameter {name!r} of group {gi} has no exported state")
            if name not in saved["param_names"]:
                raise ValueError(f"parameter {name!r} is in group {gi} here but not in the export's group {gi}")
            entry = exported["state"][name]
            if entry:
                state[index] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in entry.items()}
            ids.append(index)
            index += 1
        record = {k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k not in _SCALAR_SKIP}
        groups_out.append({**record, "params": ids})
    return {"state": state, "param_groups": groups_out}


@torch.no_grad()
def import_state(target: Any, exported: dict[str, Any] | str, named_params: Any = None,
                 load_params: bool = True) -> None:
    """Load an :func:`export_state` result into ``target``: a DeepSpeed engine (any ZeRO stage and data-parallel
    size; collective) or a ProdigyPlusScheduleFree (then ``named_params``, e.g. ``model.named_parameters()``, names
    its parameters). With ``load_params`` the exported fp32 weights are written into the parameters (and DeepSpeed's
    master copies) too, so the run continues exactly."""
    from .optimizer import ProdigyPlusScheduleFree
    if isinstance(exported, str):
        exported = load_exported(exported)
    if isinstance(target, ProdigyPlusScheduleFree):
        if named_params is None:
            raise TypeError("import_state into an optimizer needs named_params (e.g. model.named_parameters())")
        named = list(named_params.items() if isinstance(named_params, dict) else named_params)
        if load_params:
            for name, p in named:
                src = exported["params"][name]
                local = p.to_local() if hasattr(p, "to_local") else p
                if local is p:
                    p.copy_(src.to(p.dtype))
                else:  # a sharded DTensor parameter: copy its own piece (same placements)
                    from torch.distributed.tensor import distribute_tensor
                    p.copy_(distribute_tensor(src.to(p.dtype), p.device_mesh, p.placements))
        target.load_state_dict(state_dict_for(exported, named, target.param_groups))
        return
    opt, binding = _binding(target)
    groups = getattr(opt, "_ds_all_groups", opt.param_groups)
    if not isinstance(binding, _ZeroBinding):
        pairs = _zero0_params(target, opt)
        if load_params:
            for name, lp, hp in pairs:
                src = exported["params"][name]
                hp.copy_(src.to(hp.dtype))
                if lp is not hp:
                    lp.copy_(src.to(lp.dtype))
        named = [(name, hp) for name, _, hp in pairs]
        opt.load_state_dict(state_dict_for(exported, named, groups))
        return
    for gi, (group, saved) in enumerate(zip(groups, exported["param_groups"])):
        for k, v in saved.items():
            if k not in _SCALAR_SKIP:
                group[k] = tuple(v) if k == "betas" else v
    for call in binding.calls:
        store = opt.state.setdefault(call.flat, {})
        for piece in call.pieces:
            layout, name = piece.layout, piece.name
            if name not in exported["state"]:
                raise ValueError(f"parameter {name!r} has no exported state")
            if tuple(exported["params"][name].shape) != layout.global_shape:
                raise ValueError(f"parameter {name!r}: exported shape {tuple(exported['params'][name].shape)}, "
                                 f"here {layout.global_shape}")
            start, n = layout.flat_start, layout.flat_numel
            frag = _FragmentState(store, call.flat, piece.index, piece.offset, n)
            for key, value in exported["state"][name].items():
                if not torch.is_tensor(value):
                    frag[key] = value
                elif key in _FLAT_KEYS or key == "exp_avg_sq":
                    frag[key] = value.reshape(-1)[start:start + n].to(call.flat.device).clone()
                elif key in ("p0", "s"):
                    first, count = _sample_range(start, n) if n else (0, 0)
                    frag[key] = value[first:first + count].to(call.flat.device).clone()
                else:
                    frag[key] = value.to(call.flat.device).clone()
            if load_params:
                src = exported["params"][name].reshape(-1)
                call.flat.narrow(0, piece.offset, n).copy_(src[start:start + n])
                _write_model_param(piece.param, src, binding.stage, start, n)


def _write_model_param(param: torch.Tensor, src: torch.Tensor, stage: int, start: int, numel: int) -> None:
    """Write the global fp32 weights into DeepSpeed's low-precision model parameter (ZeRO-1/2: the whole
    parameter; ZeRO-3: this rank's partition ``ds_tensor``)."""
    if stage == 3:
        param.ds_tensor.view(-1).narrow(0, 0, numel).copy_(src[start:start + numel].to(param.ds_tensor.dtype))
    else:
        param.data.copy_(src.view(param.shape).to(param.dtype))
