"""Where each stored tensor of a checkpoint lands in the model's weights, block by block.

A checkpoint stores each linear layer on its own as ``[out_features, in_features]``; the
model keeps einsum layouts (``[in dims..., out dims...]``) and fuses some layers into one
weight: ``w_qkv [D, K, G + 2, H]`` holds ``q_proj``, ``k_proj`` and ``v_proj``, and
``w_gate_up [D, 2, F]`` holds ``gate_proj`` and ``up_proj`` (see :mod:`.llama`). A weight is
then a tuple of parts (:class:`Part`), each one stored tensor in a :class:`Same` or
:class:`OutIn` layout at its place in the weight, and :func:`weight_block` builds any block of the weight
(a whole weight, or one device's shard of it) by reading only the rows and columns of each
stored tensor that the block holds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Union

import numpy as np

Index = tuple[slice, ...]


def _bounds(index: Index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each axis of the block ``index`` of an array of ``shape``."""
    bounds = []
    for part, size in zip(index, shape):
        start, stop, step = part.indices(size)
        if step != 1:
            raise ValueError(f"a block of a weight is a box of unit steps, got the slice {part}")
        bounds.append((start, max(start, stop)))
    return bounds


def block_shape(index: Index, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the block ``index`` of an array of ``shape``."""
    return tuple(stop - start for start, stop in _bounds(index, shape))


def flat_range(index: Index, shape: tuple[int, ...]) -> slice:
    """The elements of the box ``index`` of a row-major array of ``shape`` as one range of its
    flattening; ``ValueError`` if they are not contiguous there.

    The box is contiguous when, for some axis ``j``, it spans one element on every axis before
    ``j`` and the whole of every axis after it.
    """
    bounds = _bounds(index, shape)
    lengths = [stop - start for start, stop in bounds]
    partial = [axis for axis, (length, size) in enumerate(zip(lengths, shape)) if length != size]
    last = partial[-1] if partial else 0
    if any(length != 1 for length in lengths[:last]):
        raise ValueError(f"the block {bounds} of an array of shape {shape} is not one range of its rows "
                         f"or columns")
    strides = [math.prod(shape[axis + 1:]) for axis in range(len(shape))]
    start = sum(begin * stride for (begin, _), stride in zip(bounds, strides))
    return slice(start, start + math.prod(lengths))


@dataclasses.dataclass(frozen=True)
class Same:
    """A tensor stored in the model's layout (embeddings, norms), of ``shape``."""

    shape: tuple[int, ...]

    @property
    def source_shape(self) -> tuple[int, ...]:
        return self.shape

    def source_index(self, index: Index) -> Index:
        """The stored block that holds the model block ``index``: the same one."""
        return index

    def block(self, stored: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return stored


@dataclasses.dataclass(frozen=True)
class OutIn:
    """A linear layer stored ``[out, in]`` = ``[prod(out_dims), prod(in_dims)]`` and kept as
    ``[*in_dims, *out_dims]`` (the transpose, split into heads)."""

    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.in_dims + self.out_dims

    @property
    def source_shape(self) -> tuple[int, int]:
        return math.prod(self.out_dims), math.prod(self.in_dims)

    def source_index(self, index: Index) -> tuple[slice, slice]:
        """The stored ``(rows, columns)`` that hold the model block ``index``; ``ValueError`` if
        they are not one range of rows and one of columns."""
        split = len(self.in_dims)
        return flat_range(index[split:], self.out_dims), flat_range(index[:split], self.in_dims)

    def block(self, stored: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The model block of ``shape`` held by the stored block ``stored`` (``source_index``'s)."""
        return stored.T.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Flat:
    """A vector stored flat, ``[prod(shape)]``, kept as ``shape`` (a bias split into heads)."""

    shape: tuple[int, ...]

    @property
    def source_shape(self) -> tuple[int]:
        return (math.prod(self.shape),)

    def source_index(self, index: Index) -> tuple[slice]:
        """The stored range that holds the model block ``index``; ``ValueError`` if it is not one range."""
        return (flat_range(index, self.shape),)

    def block(self, stored: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return stored.reshape(shape)


Layout = Union[Same, OutIn, Flat]


@dataclasses.dataclass(frozen=True)
class Part:
    """One stored tensor, ``name``, in ``layout``, at its place in a model weight.

    ``axis`` None: the tensor is the whole weight. Otherwise it is the weight's slice ``at`` on
    ``axis``: an ``int`` (the tensor lacks that axis, as ``k_proj`` at ``w_qkv[:, :, G]``) or a
    ``slice`` (the tensor spans it, as ``q_proj`` at ``w_qkv[:, :, :G]``).
    """

    name: str
    layout: Layout
    axis: int | None = None
    at: int | slice | None = None

    def region(self, weight_shape: tuple[int, ...]) -> Index:
        """The part's place in the whole weight, as a box (an ``int`` ``at`` as a one-wide slice)."""
        whole = tuple(slice(0, size) for size in weight_shape)
        if self.axis is None:
            return whole
        at = slice(self.at, self.at + 1) if isinstance(self.at, int) else self.at
        return whole[:self.axis] + (at,) + whole[self.axis + 1:]

    def within(self, index: Index, weight_shape: tuple[int, ...]) -> tuple[Index, tuple] | None:
        """For the block ``index`` of the weight: ``(the block of this part it holds, where that
        lands in the weight's block)``, or None if the block holds none of this part."""
        if self.axis is None:
            return index, tuple(slice(None) for _ in index)
        start, stop = _bounds(index, weight_shape)[self.axis]
        whole = tuple(slice(None) for _ in index)
        before, after = index[:self.axis], index[self.axis + 1:]
        if isinstance(self.at, int):
            if not start <= self.at < stop:
                return None
            return before + after, whole[:self.axis] + (self.at - start,) + whole[self.axis + 1:]
        low, high = max(start, self.at.start), min(stop, self.at.stop)
        if low >= high:
            return None
        part_index = before + (slice(low - self.at.start, high - self.at.start),) + after
        return part_index, whole[:self.axis] + (slice(low - start, high - start),) + whole[self.axis + 1:]


def check_parts(parts: tuple[Part, ...], weight_shape: tuple[int, ...], weight: str) -> None:
    """``ValueError`` unless ``parts`` cover a weight of ``weight_shape`` (named ``weight``) exactly
    once, each in a box of its layout's shape: one part that is the whole weight, or parts side by
    side along one axis."""
    names = [part.name for part in parts]
    axes = {part.axis for part in parts}
    if len(axes) != 1 or (None in axes and len(parts) != 1):
        raise ValueError(f"the stored tensors {names} of {weight} are not one whole weight nor parts along one axis")
    (axis,) = axes
    for part in parts:
        shape = block_shape(part.region(weight_shape), weight_shape)
        if isinstance(part.at, int):  # the part lacks this axis
            shape = shape[:axis] + shape[axis + 1:]
        if shape != part.layout.shape:
            raise ValueError(f"{part.name} would fill a block of shape {shape} of {weight} {weight_shape}, "
                             f"but its layout has the shape {part.layout.shape}")
    if axis is not None:
        spans = sorted(_bounds(part.region(weight_shape), weight_shape)[axis] for part in parts)
        edges = [0] + [stop for _, stop in spans]
        if [start for start, _ in spans] != edges[:-1] or edges[-1] != weight_shape[axis]:
            raise ValueError(f"the stored tensors {names} do not cover axis {axis} of {weight} {weight_shape} "
                             f"exactly once: they span {spans}")


def weight_block(weight_shape: tuple[int, ...], dtype, parts: tuple[Part, ...], index: Index,
                 read: Callable[[str, tuple[slice, ...]], np.ndarray]) -> np.ndarray:
    """The block ``index`` of a weight of ``weight_shape`` and ``dtype``, built from its ``parts``.

    Parameters
    ----------
    weight_shape : the model weight's shape, e.g. ``[D, K, G + 2, H]`` for ``w_qkv``
    dtype : the model weight's dtype
    parts : the stored tensors that make up the weight (:func:`check_parts` holds for them)
    index : a box of the weight (one slice per axis): all of it, or one device's shard
    read : ``read(name, source_index)`` reads the block ``source_index`` of the stored tensor
        ``name``; only the rows and columns of each tensor that the block holds are asked for

    Returns
    -------
    numpy array [block_shape(index, weight_shape)] of ``dtype``
    """
    block = np.empty(block_shape(index, weight_shape), dtype)
    for part in parts:
        found = part.within(index, weight_shape)
        if found is None:
            continue
        part_index, destination = found
        stored = np.asarray(read(part.name, part.layout.source_index(part_index)))
        block[destination] = part.layout.block(stored, block_shape(part_index, part.layout.shape)).astype(dtype)
    return block
