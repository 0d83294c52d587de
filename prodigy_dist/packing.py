"""Packing: the many small tensors of a bucket stepped as consecutive segments of one flat tensor.

A model holds dozens to hundreds of small 1-D tensors (norm weights, biases). Stepped one at a time, each costs a few
dozen Python-level operations per step, which on a CPU dominates their arithmetic by far (GPT-2 124M: 98 tensors,
121k elements, 3.7 ms per step unpacked, 1.0 ms packed, 0.38 ms for fused AdamW). A *packed* bucket is stepped instead
on flat tensors: the same elementwise kernels of :mod:`prodigy_dist.kernels` run on lists holding one flat tensor per
role, so the elementwise results are bitwise those of the per-tensor path. Per-tensor sums: StableAdamW's come from
one multi-tensor norm over views of the flat update (bitwise the per-tensor values); the Prodigy sample's (dot,
sum|s|, SPEED's norms) are segment sums (:class:`Segments`), equal to the per-tensor ones up to float summation order;
the sum of g^2 (only its total is read: the non-finite check) is one dot product.

The flat tensors: the gradients and the parameters are gathered (``torch.cat``) every step and the parameters
scattered back once (one multi-tensor copy). The optimizer state (z, the moments, the Prodigy p0 and s) is *kept*
flat: :meth:`Pack.adopt` copies each role of the states into one flat tensor once and makes every state entry a view
of it (same values, shape and dtype), so later steps read and update it in place. A state entry replaced from outside
(``load_state_dict``) is noticed (it is no longer the view the pack made) and adopted again at the next step.
Gathering or scattering 98 tensors costs about 60 us on a CPU, ten times an elementwise pass over all of them.
Stochastic rounding of bf16 storage reads, for each tensor, exactly the noise :mod:`prodigy_dist.rounding` gives it.

Which tensors are packed (:func:`group_packable`, :func:`packed_numel`) is decided from global quantities and options
only, so that every rank of a sharded run forms the same buckets: a full second moment, neither Muon nor an option
with per-tensor sums other than StableAdamW's (cautious, OrthoGrad), no DeepSpeed fragment, fp32 or bf16 storage, and
a global size below :data:`MAX_NUMEL`. Packs hold at most :data:`CAPACITY` global elements (more tensors make several
packs), so the flat copies (gradients, parameters, the fp32 temporaries of the update) stay small next to the model. A
pack of fewer than two tensors is stepped per tensor. A bucket whose tensors the native list kernels take (a CPU,
Schedule-Free, the compiled fast path: :func:`prodigy_dist.compiled.choose`) is not packed: they step the tensors
in place, one call per pass.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch

from .layout import SLICE, ParamLayout
from .rounding import doubled_table, round_with_noise, table_starts_many

logger = logging.getLogger(__name__)

#: Only tensors with fewer global elements than this are packed (the optimizer's LARGE_TENSOR threshold).
MAX_NUMEL = 1 << 16

#: At most this many global elements in one pack (hence also local elements): the flat copies of a pack
#: (about ten fp32 tensors of this size at the peak of phase B) stay a few tens of MB.
CAPACITY = 1 << 20

#: Packing on or off (tests step the same tensors both ways). Must be the same on every rank.
ENABLED = True

_DTYPES = (torch.float32, torch.bfloat16)
_STATE_KEYS = ("z", "exp_avg", "exp_avg_sq", "p0", "s")
_SAMPLED = ("p0", "s")  # state roles that hold the Prodigy samples of a tensor, not all its elements


def group_packable(group: dict[str, Any]) -> bool:
    """Whether a group's options allow packing: none asks for per-tensor sums other than StableAdamW's."""
    return ENABLED and not group["use_cautious"] and not group["use_orthograd"]


def packed_numel(kind: str, muon: bool, layout: ParamLayout, dtype: torch.dtype) -> int | None:
    """A tensor's global number of elements if it may join a pack (in a group that allows packing), else None:
    decided from its kind, storage dtype and global layout only (never local sizes), so every rank decides alike."""
    if kind != "full" or muon or layout.fragment or dtype not in _DTYPES:
        return None
    numel = layout.global_numel
    return numel if numel < MAX_NUMEL else None


class Segments:
    """A flat tensor cut into consecutive segments of the given sizes (empty segments allowed)."""

    def __init__(self, sizes: list[int], device: torch.device):
        if any(n < 0 for n in sizes):
            raise ValueError(f"Invalid segment sizes: {sizes} (expected sizes >= 0)")
        self.sizes = list(sizes)
        self.total = sum(self.sizes)
        self.lengths = torch.tensor(self.sizes, dtype=torch.long, device=device)
        self._owner: torch.Tensor | None = None
        self._within: torch.Tensor | None = None

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 sum of each segment of the flat ``x`` (0 for an empty segment), accumulated in fp64.

        ``segment_reduce`` adds a segment's elements one after the other; in fp32 its rounding error grows with the
        segment's length, well past that of the pairwise and vectorised sums of the per-tensor path (a packed
        4608-element tensor moved d by 1.5e-6 in 30 steps against 4e-7 for a mere change of summation order).
        Accumulated in fp64 and rounded once, each sum is within about one fp32 ulp of the exact one (the
        arguments are the Prodigy samples, 1/11 of the elements: the conversion costs little)."""
        if x.dim() != 1 or x.numel() != self.total:
            raise ValueError(f"Invalid flat tensor of shape {tuple(x.shape)}: expected ({self.total},)")
        # unsafe: skips checking lengths against x on the device (a host sync on accelerators); checked above
        return torch.segment_reduce(x.double(), "sum", lengths=self.lengths, unsafe=True).float()

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of the segments of the flat ``x``."""
        return x.split(self.sizes)

    def expand(self, per_segment: torch.Tensor) -> torch.Tensor:
        """A flat tensor holding ``per_segment[i]`` at every element of segment ``i`` (no host sync)."""
        return per_segment.index_select(0, self.owner())

    def owner(self) -> torch.Tensor:
        """The segment of each element (cached; index_select with it is 3x faster than repeat_interleave)."""
        if self._owner is None:
            segments = torch.arange(len(self.sizes), dtype=torch.int32, device=self.lengths.device)
            self._owner = segments.repeat_interleave(self.lengths, output_size=self.total)
        return self._owner

    def within(self) -> torch.Tensor:
        """Each element's index within its segment (cached)."""
        if self._within is None:
            firsts = (torch.cumsum(self.lengths, 0) - self.lengths).int()
            self._within = torch.arange(self.total, dtype=torch.int32, device=self.lengths.device) - \
                self.expand(firsts)
        return self._within


class Pack:
    """Where the local pieces of a bucket's tensors sit in one flat tensor, and where their Prodigy samples sit.

    ``elements``: one segment per tensor (its local elements, in order); ``samples``: one segment per tensor (its
    sampled elements, local flat indices ``slice_start + SLICE * n``, see :func:`kernels.sample`); ``sample_index``:
    the flat positions of all samples, in segment order.
    """

    def __init__(self, tensors: list[torch.Tensor], layouts: list[ParamLayout]):
        if len(tensors) != len(layouts):
            raise ValueError(f"Invalid pack: {len(tensors)} tensors for {len(layouts)} layouts")
        device = tensors[0].device
        self.layouts = list(layouts)  # (the cache is keyed by their ids: keeps them alive)
        numels = [t.numel() for t in tensors]
        flat_offsets = self.flat_offsets = [lay.flat_offset for lay in layouts]
        # where a piece is not 1-D: its shape (flattened on gathering, its flat segment viewed so on scattering)
        self.shaped = [(i, t.shape) for i, t in enumerate(tensors) if t.dim() != 1]
        self.elements = Segments(numels, device)
        positions: list[int] = []
        counts = []
        base = 0
        for n, offset in zip(numels, flat_offsets):
            before = len(positions)
            positions.extend(range(base + (-offset) % SLICE, base + n, SLICE))
            counts.append(len(positions) - before)
            base += n
        self.samples = Segments(counts, device)
        self.sample_index = torch.tensor(positions, dtype=torch.int32, device=device)
        self._roles: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # state role -> (flat, its views)
        self._starts: tuple[tuple, torch.Tensor] | None = None  # ((step, keys), table starts of streams 0 and 1)
        # per tensor: its global number of elements (StableAdamW's RMS)
        self.global_numels = torch.tensor([lay.global_numel for lay in layouts], dtype=torch.float32, device=device)

    def gather(self, tensors: list[torch.Tensor], sampled: bool = False) -> torch.Tensor:
        """One flat copy of ``tensors`` in their dtype: pieces shaped like the pack's, or (``sampled``) 1-D tensors
        of their samples (p0, s). (No Python-level operation per 1-D tensor: each costs about as much as copying a
        thousand elements.)"""
        if self.shaped and not sampled:
            tensors = list(tensors)
            for i, _ in self.shaped:
                tensors[i] = tensors[i].reshape(-1)
        flat = torch.cat(tensors)
        want = (self.samples if sampled else self.elements).total
        if flat.numel() != want:
            raise RuntimeError(f"internal error: a pack of {want} elements gathered {flat.numel()}; a parameter "
                               f"changed shape after the optimizer first saw it")
        return flat

    def pieces(self, flat: torch.Tensor, sampled: bool = False) -> list[torch.Tensor]:
        """Views of the segments of ``flat``, shaped like the pack's pieces (or 1-D sample vectors)."""
        pieces = list((self.samples if sampled else self.elements).split(flat))
        if not sampled:
            for i, shape in self.shaped:
                pieces[i] = pieces[i].view(shape)
        return pieces

    def scatter_(self, targets: list[torch.Tensor], flat: torch.Tensor) -> None:
        """Copy each segment of ``flat`` into its target (converted to the target's dtype like ``Tensor.copy_``)."""
        torch._foreach_copy_(targets, self.pieces(flat))

    def rounded(self, flat: torch.Tensor, dtype: torch.dtype, stochastic: bool, *, seed: int, step: int,
                stream: int, keys: list[int]) -> torch.Tensor:
        """fp32 results in storage ``dtype`` as :func:`rounding.write_back_` stores them tensor by tensor: bf16 with
        stochastic rounding uses exactly the noise each tensor would get on its own; else round to nearest."""
        if flat.dtype == dtype:
            return flat
        if stochastic and dtype == torch.bfloat16 and flat.dtype == torch.float32:
            return self._stochastic_bf16(flat, seed, step, stream, keys)
        return flat.to(dtype)

    def adopt(self, states: list[dict[str, Any]], dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """The flat tensor of each state role (z, exp_avg, exp_avg_sq, p0, s), whose segments the states' entries
        are views of; entries that are not (first step, or replaced since) are copied into a new flat tensor
        first, and become views of it. Values never change. None if the roles cannot be packed: a role missing
        in some states, or in mixed dtypes (``dtype``: the parameters')."""
        flats: dict[str, torch.Tensor] = {}
        stale = []
        for key in _STATE_KEYS:
            if key not in states[0]:
                continue
            role = self._roles.get(key)
            if role is None or not all(map(operator.is_, [st[key] for st in states], role[1])):
                stale.append(key)
            else:
                flats[key] = role[0]
        if not stale:
            return flats
        if not uniform_state(states, dtype):
            logger.debug("state of mixed dtypes: these tensors are stepped one at a time")
            return None
        for key in stale:
            sampled = key in _SAMPLED
            flat = flats[key] = self.gather([st[key] for st in states], sampled=sampled)
            views = self.pieces(flat, sampled)
            for st, view in zip(states, views):
                st[key] = view
            self._roles[key] = (flat, views)
        return flats

    def _stochastic_bf16(self, flat: torch.Tensor, seed: int, step: int, stream: int, keys: list[int]
                         ) -> torch.Tensor:
        """bf16 values of the fp32 ``flat``, each tensor rounded with the noise of its own table start (``keys``:
        the tensors' positions in the optimizer)."""
        when = (step, tuple(keys))
        if self._starts is None or self._starts[0] != when:  # both streams' starts, hashed once per step
            starts = table_starts_many(step, self.flat_offsets, list(keys))
            self._starts = (when, torch.tensor(starts, dtype=torch.long, device=flat.device))
        # a tensor of n < MAX_NUMEL <= TABLE_SIZE elements reads entries start .. start + n of the doubled table
        index = self.elements.expand(self._starts[1][stream])
        index += self.elements.within()
        return round_with_noise(flat, doubled_table(flat.device, seed).index_select(0, index))


#: Packs cached per optimizer (the set of tensors with a gradient rarely changes; the cache never grows beyond this).
CACHE_SIZE = 16


def pack_for(cache: dict[tuple, Pack], tensors: list[torch.Tensor], layouts: list[ParamLayout]) -> Pack:
    """The pack of these local pieces from ``cache`` (the optimizer's), keyed by the identity of their layouts
    and the device; made on a miss.

    A layout determines the piece's shape and global offset; the optimizer keeps one layout object per parameter,
    and a cached pack keeps its layouts alive, so their ids are not reused while the entry exists.
    """
    key = (tensors[0].device, *map(id, layouts))
    pack = cache.get(key)
    if pack is None:
        if len(cache) >= CACHE_SIZE:
            cache.pop(next(iter(cache)))
        pack = cache[key] = Pack(tensors, layouts)
    return pack


def uniform_state(states: list[dict[str, Any]], dtype: torch.dtype) -> bool:
    """Whether every state holds the same tensor roles, each in one dtype, the moments and z in ``dtype`` (packed
    roles are concatenated: mixed dtypes, e.g. from an unusual checkpoint, would be promoted)."""
    first = states[0]
    for key in _STATE_KEYS:
        if key not in first:
            if any(key in st for st in states):
                return False
            continue
        want = first[key].dtype if key in ("p0", "s") else dtype
        if any(key not in st or st[key].dtype != want for st in states):
            return False
    return True
