"""Replica of the FlyEM hemibrain precomputed volumes: a JPEG EM look-alike and its uint64 segmentation.

Written with tensorstore's ``neuroglancer_precomputed`` driver at the real paths under
``storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain/``: ``emdata/clahe_yz/jpeg`` (uint8, JPEG,
64^3 chunks, 8 nm, mean-downsampled scales) and ``v1.0/segmentation`` (uint64, compressed_segmentation,
gzip-sharded like the real ``info``, nearest-downsampled scales with the same geometry).

Like the real volume, the bounding box is mostly empty: tissue is a rounded blob (a wobbly superellipsoid)
whose grey values are never 0, surrounded by 0 background whose chunks are never written (tensorstore reads
missing chunks as 0, as it does for the real bucket). Scale 0 has a non-zero ``voxel_offset``. Scales 0 and
1 are sharded (``neuroglancer_uint64_sharded_v1``); the coarser EM scales are unsharded, so a reader meets
both layouts.

To build fast, tissue is tiled from a small bank of ``synth.em_like`` tiles (each flipped and relabelled by
its position; cell ids never repeat between tiles, and the seams between tiles are drawn as dark membranes
so the EM still matches the labels). Everything is a pure function of the profile: the same bytes each build.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from emdata.offline.replica.synth import em_like

log = logging.getLogger(__name__)

VERSION = 1

BUCKET_DIR = "storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain"
EM_PATH = "emdata/clahe_yz/jpeg"
SEG_PATH = "v1.0/segmentation"
CHUNK = 64
SEED = 1837  # the generator's seed; any fixed value
SEAM_GREY = 50  # tile seams are label boundaries, so they are drawn as dark membrane


@dataclass(frozen=True)
class ReplicaProfile:
    """Geometry of one replica profile; every size in x, y, z order (precomputed's), voxels at scale 0."""

    size_xyz: tuple[int, int, int]
    voxel_offset_xyz: tuple[int, int, int]  # divisible by 2**(n_scales - 1), so every scale aligns exactly
    n_scales: int
    tissue_semi_axes_xyz: tuple[float, float, float]  # of the blob, centred in the bounding box
    tile: int = 128  # size of the bank's tiles (a multiple of CHUNK)
    block: int = 256  # voxels per axis generated and written at once (a multiple of tile and of 4 * CHUNK)
    bank: int = 8  # distinct em_like tiles


PROFILES: dict[str, ReplicaProfile] = {
    # Tests: a 384 x 352 x 320 box, tissue in the middle; builds in a few seconds.
    "small": ReplicaProfile(size_xyz=(384, 352, 320), voxel_offset_xyz=(64, 128, 192), n_scales=4,
                            tissue_semi_axes_xyz=(160.0, 150.0, 140.0), block=128, bank=4),
    # Demo: room for the default 1000^3 crop inside tissue at several positions.
    "full": ReplicaProfile(size_xyz=(1536, 1408, 1280), voxel_offset_xyz=(64, 128, 192), n_scales=6,
                           tissue_semi_axes_xyz=(640.0, 600.0, 580.0)),
}


def em_info(profile: ReplicaProfile) -> dict[str, Any]:
    """The EM volume's ``info`` (image, uint8, JPEG)."""
    scales = []
    for s in range(profile.n_scales):
        res = 8 * 2**s
        size, offset = _scale_geometry(profile, s)
        scale: dict[str, Any] = {"chunk_sizes": [[CHUNK] * 3], "encoding": "jpeg", "key": f"{res}.0x{res}.0x{res}.0",
                                 "resolution": [res] * 3, "size": list(size), "voxel_offset": list(offset)}
        if s <= 1:
            # 512 chunks (512^3 voxels, a few tens of MB of JPEG) per shard, 8 per minishard.
            scale["sharding"] = _sharding(size, preshift_bits=3, minishard_bits=6, data_encoding="raw")
        scales.append(scale)
    return {"@type": "neuroglancer_multiscale_volume", "data_type": "uint8", "num_channels": 1, "type": "image",
            "scales": scales}


def segmentation_info(profile: ReplicaProfile) -> dict[str, Any]:
    """The segmentation's ``info``, shaped like the real v1.0 one (same keys, encoding and sharding style)."""
    scales = []
    for s in range(profile.n_scales):
        res = 8 * 2**s
        size, offset = _scale_geometry(profile, s)
        scales.append({
            "chunk_sizes": [[CHUNK] * 3], "compressed_segmentation_block_size": [8, 8, 8],
            "encoding": "compressed_segmentation", "key": f"{res}.0x{res}.0x{res}.0", "resolution": [res] * 3,
            # 64 chunks (a 256^3 block) per shard: exactly what one generated block writes.
            "sharding": _sharding(size, preshift_bits=3, minishard_bits=3, data_encoding="gzip"),
            "size": list(size), "voxel_offset": list(offset),
        })
    return {"@type": "neuroglancer_multiscale_volume", "data_type": "uint64", "num_channels": 1,
            "type": "segmentation", "mesh": "mesh", "segment_name_map": "names",
            "segment_properties": "segment_properties", "scales": scales}


def _scale_geometry(profile: ReplicaProfile, s: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    f = 2**s
    size = tuple(math.ceil(n / f) for n in profile.size_xyz)
    offset = tuple(o // f for o in profile.voxel_offset_xyz)
    return size, offset


def _sharding(size: tuple[int, ...], *, preshift_bits: int, minishard_bits: int, data_encoding: str) -> dict[str, Any]:
    # The chunk id is the compressed Morton code of the chunk's grid position; its bit count bounds the shards.
    total_bits = sum(max(0, math.ceil(math.log2(math.ceil(n / CHUNK)))) for n in size)
    preshift = min(preshift_bits, total_bits)
    minishard = min(minishard_bits, total_bits - preshift)
    return {"@type": "neuroglancer_uint64_sharded_v1", "data_encoding": data_encoding, "hash": "identity",
            "minishard_bits": minishard, "minishard_index_encoding": "gzip", "preshift_bits": preshift,
            "shard_bits": max(0, total_bits - preshift - minishard)}


class _TileBank:
    """A few EM-like tiles (z, y, x) with their labels compacted to 1..n, generated once per build."""

    def __init__(self, profile: ReplicaProfile) -> None:
        self.tile = profile.tile
        self.em: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        for k in range(profile.bank):
            vol = em_like((self.tile,) * 3, seed=SEED, origin=(0, 0, 100_000 * (k + 1)))
            _, compact = np.unique(vol.cells, return_inverse=True)
            self.em.append(np.maximum(vol.em, 1))  # 0 is background only
            self.labels.append((compact.reshape(vol.cells.shape) + 1).astype(np.uint64))

    def fill(self, z0: int, y0: int, x0: int, em: np.ndarray, seg: np.ndarray) -> None:
        """Fill one block (z, y, x, origin relative to the volume's corner) with flipped, relabelled tiles."""
        t = self.tile
        for dz, dy, dx in np.ndindex(*(n // t for n in em.shape)):
            tz, ty, tx = z0 // t + dz, y0 // t + dy, x0 // t + dx
            h = _mix(tz, ty, tx)
            k = h % len(self.em)
            flips = tuple(axis for axis in range(3) if (h >> (8 + axis)) & 1)
            serial = ((tz * 4096 + ty) * 4096 + tx) + 1
            out = np.s_[dz * t:(dz + 1) * t, dy * t:(dy + 1) * t, dx * t:(dx + 1) * t]
            tile_em = np.flip(self.em[k], flips) if flips else self.em[k]
            tile_seg = np.flip(self.labels[k], flips) if flips else self.labels[k]
            em[out] = tile_em
            em[out][0, :, :] = np.minimum(em[out][0, :, :], SEAM_GREY)
            em[out][:, 0, :] = np.minimum(em[out][:, 0, :], SEAM_GREY)
            em[out][:, :, 0] = np.minimum(em[out][:, :, 0], SEAM_GREY)
            # Hemibrain-like body ids: large, unique per tile.
            np.add(tile_seg, np.uint64(1_000_000_000 + serial * 4096), out=seg[out])


def _mix(*keys: int) -> int:
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = ((h ^ (k + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


def tissue_mask(profile: ReplicaProfile, origin_zyx: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Where the blob is (z, y, x block at ``origin_zyx`` relative to the volume's corner)."""
    centre = [n / 2 for n in reversed(profile.size_xyz)]
    semi = list(reversed(profile.tissue_semi_axes_xyz))
    terms, wobble = [], []
    for axis in range(3):
        coord = np.arange(origin_zyx[axis], origin_zyx[axis] + shape[axis], dtype=np.float32) + 0.5
        terms.append(((coord - centre[axis]) / semi[axis]) ** 4)
        wobble.append(np.sin(coord / (90.0 + 17 * axis) + axis))
    inside = terms[0][:, None, None] + terms[1][None, :, None] + terms[2][None, None, :]
    bump = 0.12 * (wobble[0][:, None, None] * wobble[1][None, :, None] * wobble[2][None, None, :])
    return inside <= 1.0 + bump


def _blocks(profile: ReplicaProfile) -> Iterator[tuple[int, int, int]]:
    b = profile.block
    zs, ys, xs = (range(0, n, b) for n in reversed(profile.size_xyz))
    for z in zs:
        for y in ys:
            for x in xs:
                yield z, y, x


def _mean2(a: np.ndarray) -> np.ndarray:
    z, y, x = (s // 2 for s in a.shape)
    return np.rint(a[: 2 * z, : 2 * y, : 2 * x].reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5),
                                                                                  dtype=np.float32)).astype(np.uint8)


def _open_scales(path: Path, n: int, context: ts.Context) -> list[ts.TensorStore]:
    """Open every scale of an existing precomputed volume as a z, y, x view (channel dropped)."""
    out = []
    for s in range(n):
        store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path)},
                         "scale_index": s, "open": True}, context=context).result()
        out.append(store[ts.d["channel"][0]].T)
    return out


def build(root: Path, profile: str) -> None:
    """Write the replica's hemibrain volumes under ``root`` (one block at a time: bounded memory)."""
    prof = PROFILES[profile]
    began = time.monotonic()
    em_dir = root / BUCKET_DIR / EM_PATH
    seg_dir = root / BUCKET_DIR / SEG_PATH
    for path, info in ((em_dir, em_info(prof)), (seg_dir, segmentation_info(prof))):
        path.mkdir(parents=True, exist_ok=True)
        (path / "info").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    context = ts.Context({"data_copy_concurrency": {"limit": 4}, "file_io_concurrency": {"limit": 8},
                          "cache_pool": {"total_bytes_limit": 0}})
    em_scales = _open_scales(em_dir, prof.n_scales, context)
    seg_scales = _open_scales(seg_dir, prof.n_scales, context)
    bank = _TileBank(prof)
    # Scales whose per-block piece is at least a chunk are written per block; coarser ones are gathered in
    # memory (small: 1/512 of the volume and less) and written at the end.
    per_block = [s for s in range(prof.n_scales) if prof.block // 2**s >= CHUNK]
    gather = max(per_block) + 1
    gathered: tuple[np.ndarray, np.ndarray] | None = None
    if gather < prof.n_scales:
        shape = tuple(math.ceil(n / 2**gather) for n in reversed(prof.size_xyz))
        gathered = (np.zeros(shape, np.uint8), np.zeros(shape, np.uint64))
    offset_zyx = tuple(reversed(prof.voxel_offset_xyz))
    pending: deque[Any] = deque()
    written = 0
    for z, y, x in _blocks(prof):
        shape = tuple(min(prof.block, n - o) for n, o in zip(reversed(prof.size_xyz), (z, y, x), strict=True))
        mask = tissue_mask(prof, (z, y, x), shape)
        if not mask.any():
            continue  # background only: never written, read back as 0
        full = tuple(math.ceil(s / prof.tile) * prof.tile for s in shape)
        em = np.empty(full, np.uint8)
        seg = np.empty(full, np.uint64)
        bank.fill(z, y, x, em, seg)
        em = em[: shape[0], : shape[1], : shape[2]]
        seg = seg[: shape[0], : shape[1], : shape[2]]
        em[~mask] = 0
        seg[~mask] = 0
        for s in range(prof.n_scales):
            if s > 0:
                em, seg = _mean2(em), seg[::2, ::2, ::2]
            lo = tuple((o + c) // 2**s for o, c in zip(offset_zyx, (z, y, x), strict=True))
            sl = tuple(slice(a, a + n) for a, n in zip(lo, em.shape, strict=True))
            if s in per_block:
                pending.append(em_scales[s][sl].write(em))
                pending.append(seg_scales[s][sl].write(np.ascontiguousarray(seg)))
            elif s == gather and gathered is not None:
                local = tuple(slice(a // 2**s, a // 2**s + n) for a, n in zip((z, y, x), em.shape, strict=True))
                gathered[0][local] = em
                gathered[1][local] = seg
                break
        written += 1
        # A few blocks in flight keep tensorstore's encoders busy while numpy builds the next one.
        while len(pending) > 4 * len(per_block):
            pending.popleft().result()
    while pending:
        pending.popleft().result()
    if gathered is not None:
        em, seg = gathered
        for s in range(gather, prof.n_scales):
            if s > gather:
                em, seg = _mean2(em), seg[::2, ::2, ::2]
            lo = tuple(o // 2**s for o in offset_zyx)
            sl = tuple(slice(a, a + n) for a, n in zip(lo, em.shape, strict=True))
            em_scales[s][sl].write(em).result()
            seg_scales[s][sl].write(np.ascontiguousarray(seg)).result()
    log.info("replica hemibrain (%s): %d tissue blocks written in %.1f s", profile, written,
             time.monotonic() - began)
