"""Deterministic, EM-like synthetic volumes: cells with dark membranes, mitochondria, texture and noise.

Everything is a function of global voxel coordinates (z, y, x) and the seed, so slabs generated separately
at different origins agree with one another (exactly for the labels; the noise depends on the slab origin).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

# Cells are computed on a grid this many times coarser than the output, then upsampled: cheap and
# gives membranes a realistic ~2-voxel thickness after blurring.
_COARSE = 4


@dataclass(frozen=True)
class SynthVolume:
    """One generated block, all arrays in z, y, x order."""

    em: np.ndarray  # uint8 grey values
    cells: np.ndarray  # uint64 cell ids (neuron-like segmentation), never 0 inside tissue
    mito: np.ndarray  # bool mitochondria mask


def _hash_uniform(seed: int, *keys: Any, salt: int = 0) -> Any:
    """Uniform [0, 1) values hashed from integer arrays or scalars (a splitmix64-style mix; same everywhere)."""
    with np.errstate(over="ignore"):
        h: Any = np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64) ^ np.uint64(salt)
        for k in keys:
            h = h ^ (np.asarray(k).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def _cell_labels(origin: Sequence[int], shape: Sequence[int], seed: int, cell_size: int) -> np.ndarray:
    """Voronoi cells of a jittered grid of seeds (spacing ``cell_size`` voxels), as uint64 ids."""
    lo = [o // _COARSE for o in origin]
    hi = [-(-(o + s) // _COARSE) for o, s in zip(origin, shape, strict=True)]
    coords = np.meshgrid(*[(np.arange(a, b) + 0.5) * _COARSE for a, b in zip(lo, hi, strict=True)],
                         indexing="ij", sparse=True)
    home = [np.floor(c / cell_size).astype(np.int64) for c in coords]
    best = np.full(np.broadcast_shapes(*[c.shape for c in coords]), np.inf, dtype=np.float32)
    label = np.zeros(best.shape, dtype=np.uint64)
    for dz, dy, dx in itertools.product((-1, 0, 1), repeat=3):
        cell = [home[0] + dz, home[1] + dy, home[2] + dx]
        dist = np.zeros(best.shape, dtype=np.float32)
        for axis in range(3):
            jitter = _hash_uniform(seed, *cell, salt=axis + 1)
            # Anisotropic stretch along y makes the cells look less like a crystal.
            pos = (cell[axis] + 0.15 + 0.7 * jitter) * cell_size
            dist = dist + ((coords[axis] - pos) * (0.8 if axis == 1 else 1.0)) ** 2
        closer = dist < best
        best = np.where(closer, dist, best)
        ids = ((cell[0] + 2**19).astype(np.uint64) << np.uint64(40)) | \
              ((cell[1] + 2**19).astype(np.uint64) << np.uint64(20)) | (cell[2] + 2**19).astype(np.uint64)
        label = np.where(closer, ids, label)
    up = label
    for axis in range(3):
        up = np.repeat(up, _COARSE, axis=axis)
    offs = [o - a * _COARSE for o, a in zip(origin, lo, strict=True)]
    return up[offs[0]: offs[0] + shape[0], offs[1]: offs[1] + shape[1], offs[2]: offs[2] + shape[2]]


def _mito_mask(origin: Sequence[int], shape: Sequence[int], seed: int, spacing: int, radius: float) -> np.ndarray:
    """Elongated ellipsoids (about half the grid cells get one), stamped into their bounding boxes."""
    mask = np.zeros(shape, dtype=bool)
    reach = int(radius * 3) + 1
    ranges = [range((o - reach) // spacing, (o + s + reach) // spacing + 1)
              for o, s in zip(origin, shape, strict=True)]
    for cell in itertools.product(*ranges):
        key = [np.int64(c) for c in cell]
        if _hash_uniform(seed, *key, salt=11) > 0.55:
            continue
        centre = [(c + 0.2 + 0.6 * float(_hash_uniform(seed, *key, salt=20 + a))) * spacing
                  for a, c in enumerate(cell)]
        long_axis = int(_hash_uniform(seed, *key, salt=30) * 3)
        radii = [radius * (0.7 + 0.6 * float(_hash_uniform(seed, *key, salt=40 + a))) for a in range(3)]
        radii[long_axis] *= 2.5
        box = [(max(int(c - r) - 1, o), min(int(c + r) + 2, o + s))
               for c, r, o, s in zip(centre, radii, origin, shape, strict=True)]
        if any(a >= b for a, b in box):
            continue
        grids = np.meshgrid(*[np.arange(a, b) + 0.5 for a, b in box], indexing="ij", sparse=True)
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1.0
        local = tuple(slice(a - o, b - o) for (a, b), o in zip(box, origin, strict=True))
        mask[local] |= inside
    return mask


def em_like(
    shape: Sequence[int],
    *,
    seed: int,
    origin: Sequence[int] = (0, 0, 0),
    cell_size: int = 48,
    mito_spacing: int = 56,
    mito_radius: float = 9.0,
    noise_sigma: float = 12.0,
) -> SynthVolume:
    """Generate a block of an infinite EM-like volume (z, y, x), starting at global voxel ``origin``."""
    shape = tuple(int(s) for s in shape)
    origin = tuple(int(o) for o in origin)
    margin = 3  # blur context, so neighbouring slabs join without seams in the blurred signal
    big_origin = tuple(o - margin for o in origin)
    big_shape = tuple(s + 2 * margin for s in shape)
    cells = _cell_labels(big_origin, big_shape, seed, cell_size)
    mito = _mito_mask(big_origin, big_shape, seed, mito_spacing, mito_radius)

    membrane = np.zeros(big_shape, dtype=bool)
    for axis in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        edge = cells[tuple(a)] != cells[tuple(b)]
        membrane[tuple(a)] |= edge
        membrane[tuple(b)] |= edge

    # Per-cell cytoplasm tone, darker mitochondria with a striped (cristae-like) texture, dark membranes.
    tone = 165.0 + 25.0 * (_hash_uniform(seed, cells, salt=99).astype(np.float32) - 0.5)
    img = tone.astype(np.float32)
    zz = (np.arange(big_shape[0]) + big_origin[0])[:, None, None]
    xx = (np.arange(big_shape[2]) + big_origin[2])[None, None, :]
    cristae = 12.0 * np.sin((zz + xx) * 0.9).astype(np.float32)
    img = np.where(mito, 95.0 + cristae, img)
    mito_edge = mito & ~ndimage.binary_erosion(mito)
    img[mito_edge] = 55.0
    img[membrane] = 45.0
    img = ndimage.gaussian_filter(img, sigma=1.0, truncate=2.5)
    rng = np.random.default_rng([seed, *[o & 0xFFFFFFFF for o in origin]])
    inner = tuple(slice(margin, margin + s) for s in shape)
    img = img[inner] + rng.normal(0.0, noise_sigma, size=shape).astype(np.float32)
    em = np.clip(img, 0, 255).astype(np.uint8)
    return SynthVolume(em=em, cells=np.ascontiguousarray(cells[inner]), mito=np.ascontiguousarray(mito[inner]))
