"""Pyramid planning (anisotropy-aware factors) and reductions: mean for EM, mode for labels, nearest for masks."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Literal

import numpy as np
import tinybrain

from emdata.errors import InvalidParameterError

Method = Literal["mean", "mode", "nearest"]
METHODS: tuple[str, ...] = ("mean", "mode", "nearest")
Factors = tuple[int, int, int]

# How each method is described in the multiscales ``metadata`` (NGFF: "description", "method", "version").
DESCRIPTIONS: dict[str, str] = {
    "mean": "mean of each cell of factor voxels (border cells edge-padded), integers rounded half to even",
    "mode": "most frequent label of each cell (tinybrain countless mode pooling; a two-voxel cell keeps its "
            "first voxel)",
    "nearest": "the first voxel of each cell (strided sampling)",
}


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise InvalidParameterError(f"downsampling method must be one of {METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


def plan_factors(shape: Sequence[int], voxel_size_nm: Sequence[float], *, smallest: int = 64,
                 n_levels: int | None = None) -> list[Factors]:
    """Per-level downsampling factors (level 0 is (1, 1, 1)), each axis 1 or 2, for a near-isotropic pyramid.

    Neuroglancer's rule (``downsample_scales.compute_near_isotropic_downsampling_scales``): each level doubles
    the axis with the finest voxel, and every other axis whose doubled voxel is closer to that target than its
    current one. So a 50 x 8 x 8 nm stack keeps z until y and x reach 64 nm. An axis of one voxel never
    halves. Levels are added while the largest axis exceeds ``smallest`` voxels (or up to ``n_levels``).
    """
    if len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise InvalidParameterError(f"shape must be three positive sizes (z, y, x), got {tuple(shape)!r}")
    if len(voxel_size_nm) != 3 or any(not (v > 0) for v in voxel_size_nm):
        raise InvalidParameterError(f"voxel_size_nm must be three positive numbers, got {tuple(voxel_size_nm)!r}")
    if n_levels is not None and (isinstance(n_levels, bool) or int(n_levels) < 1):
        raise InvalidParameterError(f"n_levels must be a positive int, got {n_levels!r}")
    factors: list[Factors] = [(1, 1, 1)]
    size = [int(s) for s in shape]
    voxel = [float(v) for v in voxel_size_nm]
    while True:
        if n_levels is not None:
            if len(factors) >= n_levels:
                break
        elif max(size) <= smallest:
            break
        movable = [a for a in range(3) if size[a] > 1]
        if not movable:
            if n_levels is None:
                break
            raise InvalidParameterError(f"cannot make {n_levels} levels of shape {tuple(shape)}: "
                                        f"level {len(factors) - 1} is one voxel")
        finest = min(movable, key=lambda a: voxel[a])
        target = voxel[finest] * 2
        f = [1, 1, 1]
        f[finest] = 2
        for a in movable:
            if a != finest and abs(voxel[a] - target) > abs(voxel[a] * 2 - target):
                f[a] = 2
        factors.append((f[0], f[1], f[2]))
        size = [math.ceil(s / fa) for s, fa in zip(size, f, strict=True)]
        voxel = [v * fa for v, fa in zip(voxel, f, strict=True)]
    return factors


def cumulative(factors: Sequence[Sequence[int]]) -> list[Factors]:
    """Factors of each level relative to level 0."""
    out: list[Factors] = []
    acc = (1, 1, 1)
    for f in factors:
        acc = (acc[0] * int(f[0]), acc[1] * int(f[1]), acc[2] * int(f[2]))
        out.append(acc)
    return out


def shapes(shape: Sequence[int], factors: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """Shape of each level (ceil division per step, so no voxel is lost at the border)."""
    out = []
    cur = tuple(int(s) for s in shape)
    for f in factors:
        cur = tuple(math.ceil(s / int(fa)) for s, fa in zip(cur, f, strict=True))
        out.append(cur)
    return out  # type: ignore[return-value]


def _mean_float32(block: np.ndarray, f: Sequence[int]) -> np.ndarray:
    """The original reduction: float32 mean, np.rint for integers (kept for dtypes without an exact path)."""
    z, y, x = (s // fa for s, fa in zip(block.shape, f, strict=True))
    acc = block.reshape(z, f[0], y, f[1], x, f[2]).astype(np.float32).mean(axis=(1, 3, 5))
    if np.issubdtype(block.dtype, np.integer):
        acc = np.rint(acc)
    return acc.astype(block.dtype)


# Integer dtypes whose cell sums fit the wider type exactly (and below 2**24, where the float32 mean is exact).
_SUM_DTYPE = {np.dtype(np.uint8): np.uint16, np.dtype(np.int8): np.int16,
              np.dtype(np.uint16): np.int32, np.dtype(np.int16): np.int32}


# ``mean`` reduces a block in slabs of whole cells along z of about this many input bytes, each through the
# calling thread's reused buffers of the wider integer type (``_wide_scratch``) into its part of the output.
# One pass over a 64 MiB shard went through 64 + 32 + 16 MiB of uint16 temporaries, fresh pages on every call
# (the stages' malloc settings mmap every buffer of 1 MiB or more): on 256 x 512 x 512 uint8 shards 3.9x less
# time with the stages' malloc settings and 2.7x without (one-off, 2026-11-26; `make bench`: bench/bench_pyramid.py,
# "pyramid.mean of one ... block"); the same bytes.
_SLAB_BYTES = 1 << 20
_SCRATCH_MAX_BYTES = 16 << 20  # a thread keeps at most this much; a larger need gets a buffer for the call
_scratch = threading.local()


def mean(block: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean of each ``factors`` cell; odd border sizes edge-padded (the border voxel averages with itself).

    8-/16-bit integers: exact pairwise sums in a wider integer and round half to even, which is bit-identical
    to ``np.rint`` of the float32 mean (the sums are below 2**24 and divided by a power of two, so that mean is
    exact) at a fraction of its cost; in slabs along z (each cell lies in one slab, so the result is the same).
    Other dtypes use that float32 mean itself. The result is a new array.
    """
    f = [int(v) for v in factors]
    pad = [(0, s % fa) for s, fa in zip(block.shape, f, strict=True)]
    if any(p[1] for p in pad):
        block = np.pad(block, pad, mode="edge")
    wide = _SUM_DTYPE.get(block.dtype)
    if wide is None:
        return _mean_float32(block, f)
    if any(fa not in (1, 2) for fa in f):
        raise InvalidParameterError(f"factors must be 1 or 2 per axis, got {tuple(factors)}")
    if math.prod(f) == 1:
        return block.copy()
    out = np.empty(tuple(s // fa for s, fa in zip(block.shape, f, strict=True)), dtype=block.dtype)
    step = max(f[0], _SLAB_BYTES // max(1, block[:1].nbytes) // f[0] * f[0])
    wide_dtype = np.dtype(wide)
    for z in range(0, block.shape[0], step):
        _mean_exact_into(block[z:z + step], f, wide_dtype, out[z // f[0]:(z + step) // f[0]])
    return out


def _wide_scratch(dtype: np.dtype, n: int) -> np.ndarray:
    """``n`` elements of ``dtype`` from this thread's reused buffer (a new one above ``_SCRATCH_MAX_BYTES``)."""
    if n * dtype.itemsize > _SCRATCH_MAX_BYTES:
        return np.empty(n, dtype)
    buf = getattr(_scratch, dtype.str, None)
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype)
        setattr(_scratch, dtype.str, buf)
    return buf[:n]  # type: ignore[no-any-return]


def _mean_exact_into(block: np.ndarray, f: Sequence[int], wide: np.dtype, out: np.ndarray) -> None:
    """``mean`` of an 8-/16-bit integer ``block`` whose shape the factors (1 or 2, not all 1) divide, into
    ``out``. The sums go through two regions of the thread's scratch, each halving reading one, writing the other."""
    n = math.prod(f)
    # Each halving halves the size exactly: the first needs half the block, the second a quarter; the third
    # (an eighth) reuses the first region, the rounding's ``odd`` whichever region the last sum did not write.
    first = block.size // 2
    second = first // 2 if f.count(2) > 1 else first
    buf = _wide_scratch(wide, first + second)
    regions = (buf[:first], buf[first:])
    acc: np.ndarray = block
    halved = 0
    for axis, fa in enumerate(f):
        if fa == 2:
            lo = acc[(slice(None),) * axis + (slice(0, None, 2),)]
            hi = acc[(slice(None),) * axis + (slice(1, None, 2),)]
            dst = regions[halved % 2][:lo.size].reshape(lo.shape)
            np.add(lo, hi, out=dst, dtype=wide)
            acc = dst
            halved += 1
    # Round half to even of acc / n (n = 2**k), floor-based so negative sums round right too:
    # acc = n*q + r rounds up iff r > n/2, or r == n/2 and q is odd, i.e. iff r + n/2 - 1 + (q & 1) >= n.
    k = n.bit_length() - 1
    odd = regions[halved % 2][:acc.size].reshape(acc.shape)
    np.right_shift(acc, k, out=odd)
    odd &= 1
    acc += odd
    acc += n // 2 - 1
    acc >>= k
    np.copyto(out, acc, casting="unsafe")  # as acc.astype(out.dtype): the values fit


def mode(block: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Most frequent value of each cell: tinybrain's mode pooling (countless) for 2x2x2 and 2x2 cells.

    A cell of two voxels has a majority only if they agree, so it is the first voxel (nearest). A 2x2 cell in
    another plane is turned into the y, x plane first. tinybrain works on x, y, z (the Fortran view) and reads
    its input's memory as if contiguous: a non-contiguous view (a box sliced out of a larger array) gave wrong
    labels with tinybrain 1.7.0 (93% of the cells of a 16^3 view of a 24 x 40 x 72 array), so a view is copied
    first (tests/test_pyramid.py).
    """
    f = tuple(int(v) for v in factors)
    if any(v not in (1, 2) for v in f):
        raise InvalidParameterError(f"factors must be 1 or 2 per axis, got {f}")
    halved = [a for a in range(3) if f[a] == 2]
    if len(halved) <= 1:
        return nearest(block, f)
    if len(halved) == 3:
        out = tinybrain.downsample_segmentation(np.ascontiguousarray(block).T, (2, 2, 2), num_mips=1)[0]
        result = np.ascontiguousarray(np.asarray(out).T)
    else:
        keep = next(a for a in range(3) if f[a] == 1)
        perm = (keep, *halved)
        view = np.asfortranarray(np.asarray(block).transpose(perm).T)
        out = tinybrain.downsample_segmentation(view, (2, 2, 1), num_mips=1)[0]
        result = np.ascontiguousarray(np.asarray(out).T.transpose(np.argsort(perm)))
    expected = tuple(math.ceil(s / fa) for s, fa in zip(block.shape, f, strict=True))
    if result.shape != expected or result.dtype != block.dtype:  # guard against a library change
        raise RuntimeError(f"tinybrain mode pooling of {block.shape} {block.dtype} by {f} gave "
                           f"{result.shape} {result.dtype}, expected {expected}")
    return result


def nearest(block: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    f = [int(v) for v in factors]
    return np.ascontiguousarray(block[::f[0], ::f[1], ::f[2]])


def reduce(block: np.ndarray, factors: Sequence[int], method: Method) -> np.ndarray:
    """Downsample ``block`` (z, y, x) by ``factors`` with ``method``."""
    if method == "mean":
        return mean(block, factors)
    if method == "mode":
        return mode(block, factors)
    if method == "nearest":
        return nearest(block, factors)
    raise InvalidParameterError(f"downsampling method must be one of {METHODS}, got {method!r}")
