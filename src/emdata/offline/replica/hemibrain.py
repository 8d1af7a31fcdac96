"""Replica of the FlyEM hemibrain precomputed volumes at their real extents: JPEG EM and the v1.0 segmentation.

Served at the real paths under ``storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain/``:

* ``emdata/clahe_yz/jpeg``: uint8, JPEG (quality 75), 64^3 chunks, 9 scales of 8..2048 nm, scale 0 the real
  [34427, 39725, 41394] voxels (x, y, z; no ``voxel_offset``, i.e. 0), each coarser scale the previous one
  halved (rounded up). Sharded at every scale as FlyEM shards its JPEG precomputed volumes (verbatim sample
  in the reference folder): ``neuroglancer_uint64_sharded_v1``, identity hash, preshift 9, minishard 6,
  shard_bits 15, ``data_encoding`` and ``minishard_index_encoding`` gzip. This ``info`` itself is unverified
  (no copy of the real one exists); its numbers come from that sample and the hemibrain extents.
* ``v1.0/segmentation``: the ``info`` is the real one, byte for byte (``segmentation_info_bytes``, rebuilt from
  its values and checked against the verbatim copy by a test): uint64, compressed_segmentation, scale 0
  [34432, 39552, 41408], the real per-scale sharding.

Like the real volume, the box is mostly empty: tissue (``synth.em_like`` tiles, relabelled per tile, seams drawn
as dark membranes so the EM matches the labels) fills a box of the profile's size whose faces are slightly
wavy (indented up to ``WOBBLE`` voxels), and around it lies a ``halo`` of JPEG-noisy background: grey values
near but above 0 (about 2..12 at full resolution, decaying away from the tissue) with JPEG ringing at the
tissue's edge, the kind of thing a tissue threshold (``background_max_value``) has to cope with. Beyond the halo
nothing is stored: those chunks are absent from their shard, and every shard without data is absent (404), as
in the real bucket. Only the shards around the tissue are written, so the real-size volume costs nothing else.

Shards are written by :func:`emdata.formats.precomputed.encode_shard` (tensorstore would rewrite a 2048^3-voxel
shard for every block written into it): chunks are JPEG / compressed_segmentation encoded by tensorstore into an
unsharded in-memory copy, then gzip-ed and laid out per shard. Everything is a pure function of the profile:
the same bytes each build.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from emdata.formats.precomputed import ScaleInfo, encode_shard, parse_info
from emdata.offline.replica.synth import em_like

log = logging.getLogger(__name__)

VERSION = 3

BUCKET_DIR = "storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain"
EM_PATH = "emdata/clahe_yz/jpeg"
SEG_PATH = "v1.0/segmentation"
CHUNK = 64
N_SCALES = 9
EM_SIZE_XYZ = (34427, 39725, 41394)  # hemibrain bounding box, scale 0 (x, y, z)
JPEG_QUALITY = 75
SEED = 1837  # the generator's seed; any fixed value
SEAM_GREY = 50  # tile seams are label boundaries, so they are drawn as dark membrane
WOBBLE = 12  # voxels by which the tissue's faces are indented, at most
ALIGN = 2 ** (N_SCALES - 1)  # the written region is aligned to this, so every scale's piece is whole voxels

# FlyEM's sharding of its JPEG precomputed volumes (dvid ngprecomputed_test.go sampleInfo), every scale.
EM_SHARDING = {"@type": "neuroglancer_uint64_sharded_v1", "data_encoding": "gzip", "hash": "identity",
               "minishard_bits": 6, "minishard_index_encoding": "gzip", "preshift_bits": 9, "shard_bits": 15}
# The verbatim v1.0 segmentation info, per scale: resolution, size (x, y, z), shard, minishard, preshift bits.
_SEG_SCALES = (
    (8, (34432, 39552, 41408), 15, 6, 9), (16, (17216, 19776, 20704), 12, 6, 9),
    (32, (8608, 9888, 10352), 9, 6, 9), (64, (4304, 4944, 5176), 6, 6, 9), (128, (2152, 2472, 2588), 3, 6, 9),
    (256, (1076, 1236, 1294), 0, 6, 9), (512, (538, 618, 647), 0, 3, 9), (1024, (269, 309, 324), 0, 0, 9),
    (2048, (135, 155, 162), 0, 0, 6),
)


@dataclass(frozen=True)
class ReplicaProfile:
    """Where the tissue is; every vector x, y, z (precomputed's order), voxels at scale 0."""

    tissue_lo_xyz: tuple[int, int, int]  # multiples of 128 (one 1024 nm voxel), so coarse voxels are all or none
    tissue_size_xyz: tuple[int, int, int]  # multiples of 128
    halo: int  # voxels of noisy background around the tissue
    block: int  # voxels per axis generated at once (a multiple of tile, 128 or 256)
    tile: int = 128  # size of the bank's tiles
    bank: int = 8  # distinct em_like tiles

    def tissue_zyx(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lo = tuple(reversed(self.tissue_lo_xyz))
        return lo, tuple(a + n for a, n in zip(lo, reversed(self.tissue_size_xyz), strict=True))

    def region_zyx(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The written region (tissue and halo), aligned to ``ALIGN`` voxels."""
        lo, hi = self.tissue_zyx()
        return (tuple((a - self.halo) // ALIGN * ALIGN for a in lo),
                tuple(-(-(b + self.halo) // ALIGN) * ALIGN for b in hi))


PROFILES: dict[str, ReplicaProfile] = {
    # Tests: 384^3 voxels of tissue straddling shard boundaries (2048 voxels at scale 0) on every axis.
    "small": ReplicaProfile(tissue_lo_xyz=(18176, 16256, 20352), tissue_size_xyz=(384, 384, 384), halo=64,
                            block=128, bank=4),
    # Demo: room for the default 1000^3 crop (and its coarse selection window) inside the tissue.
    "full": ReplicaProfile(tissue_lo_xyz=(17792, 15744, 19840), tissue_size_xyz=(1280, 1280, 1280), halo=64,
                           block=256),
}


def em_info() -> dict[str, Any]:
    """The EM volume's ``info`` (image, uint8, JPEG, FlyEM's sharding at every scale)."""
    scales = []
    for s in range(N_SCALES):
        res = 8 * 2**s
        scales.append({"chunk_sizes": [[CHUNK] * 3], "encoding": "jpeg", "jpeg_quality": JPEG_QUALITY,
                       "key": f"{res}.0x{res}.0x{res}.0", "resolution": [float(res)] * 3,
                       "sharding": dict(EM_SHARDING), "size": [-(-n // 2**s) for n in EM_SIZE_XYZ]})
    return {"@type": "neuroglancer_multiscale_volume", "data_type": "uint8", "num_channels": 1, "scales": scales,
            "type": "image"}


def segmentation_info() -> dict[str, Any]:
    """The real v1.0 segmentation ``info`` (key order as served)."""
    scales = []
    for res, size, shard, minishard, preshift in _SEG_SCALES:
        scales.append({
            "chunk_sizes": [[CHUNK] * 3], "compressed_segmentation_block_size": [8, 8, 8],
            "encoding": "compressed_segmentation", "key": f"{res}.0x{res}.0x{res}.0", "resolution": [res] * 3,
            "sharding": {"@type": "neuroglancer_uint64_sharded_v1", "data_encoding": "gzip", "hash": "identity",
                         "minishard_bits": minishard, "minishard_index_encoding": "gzip", "preshift_bits": preshift,
                         "shard_bits": shard},
            "size": list(size)})
    return {"@type": "neuroglancer_multiscale_volume", "data_type": "uint64", "num_channels": 1, "scales": scales,
            "type": "segmentation", "mesh": "mesh", "segment_name_map": "names",
            "segment_properties": "segment_properties"}


def segmentation_info_bytes() -> bytes:
    """The bytes the real bucket serves (CloudVolume's dump: JSON, indent 4, no final newline)."""
    return json.dumps(segmentation_info(), indent=4).encode()


class _TileBank:
    """A few EM-like tiles (z, y, x) with their labels compacted to 1..n, generated once per build."""

    def __init__(self, profile: ReplicaProfile) -> None:
        self.tile = profile.tile
        self.em: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        for k in range(profile.bank):
            vol = em_like((self.tile,) * 3, seed=SEED, origin=(0, 0, 100_000 * (k + 1)))
            _, compact = np.unique(vol.cells, return_inverse=True)
            self.em.append(np.maximum(vol.em, 16))  # tissue is never as dark as the background
            self.labels.append((compact.reshape(vol.cells.shape) + 1).astype(np.uint64))

    def fill(self, z0: int, y0: int, x0: int, em: np.ndarray, seg: np.ndarray) -> None:
        """Fill one block (z, y, x at global ``z0, y0, x0``, multiples of the tile) with flipped, relabelled tiles."""
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


def outside_distance(profile: ReplicaProfile, origin_zyx: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Voxels (Chebyshev) from each voxel of the block at global ``origin_zyx`` to the tissue; 0 inside it."""
    lo, hi = profile.tissue_zyx()
    coords = [np.arange(o, o + n, dtype=np.float32) for o, n in zip(origin_zyx, shape, strict=True)]
    dist = np.zeros(shape, np.float32)
    for axis in range(3):
        c = coords[axis]
        outside_1d = np.maximum(lo[axis] - c, c + 1 - hi[axis])  # < 0 inside the box along this axis
        if outside_1d.max() + WOBBLE < 0:
            continue  # deep inside along this axis: this face cannot reach the block
        u, v = (coords[a] for a in range(3) if a != axis)
        indent = WOBBLE * (0.5 + 0.5 * np.sin(u / (41.0 + 7 * axis) + axis)[:, None]
                           * np.sin(v / (57.0 - 5 * axis) + 2 * axis)[None, :])
        term = np.expand_dims(indent, axis) + np.expand_dims(outside_1d, tuple(a for a in range(3) if a != axis))
        np.maximum(dist, term, out=dist)
    return np.ceil(dist, out=dist)


def halo_values(dist: np.ndarray, halo: int, rng: np.random.Generator) -> np.ndarray:
    """Noisy background near the tissue (``dist`` voxels away): about 8 at its edge, decaying to about 2, never
    0 (uint8)."""
    level = 2.0 + 6.0 * np.exp(-dist / np.float32(halo / 2.0)) + 1.5 * rng.standard_normal(dist.shape, np.float32)
    return np.clip(np.rint(level), 1, 12).astype(np.uint8)


def _mean2(a: np.ndarray) -> np.ndarray:
    """2x2x2 mean, rounded half up (the replica's own pyramid; any fixed rounding would do)."""
    z, y, x = (s // 2 for s in a.shape)
    total = a[: 2 * z, : 2 * y, : 2 * x].reshape(z, 2, y, 2, x, 2).sum(axis=(1, 3, 5), dtype=np.uint16)
    return ((total + 4) >> 3).astype(np.uint8)


_CHUNK_KEY = re.compile(r"^(?P<key>[^/]+)/(?P<x>\d+)-\d+_(?P<y>\d+)-\d+_(?P<z>\d+)-\d+$")


class _ShardedWriter:
    """Chunks encoded by tensorstore into an unsharded in-memory copy of a volume, collected per shard."""

    def __init__(self, info: dict[str, Any], what: str) -> None:
        self.volume = parse_info(info, what)
        self.by_key = {s.key: s for s in self.volume.scales}
        self.context = ts.Context({"data_copy_concurrency": {"limit": 4}, "cache_pool": {"total_bytes_limit": 0}})
        self.kvstore = ts.KvStore.open({"driver": "memory"}, context=self.context).result()
        unsharded = {**info, "scales": [{k: v for k, v in s.items() if k != "sharding"} for s in info["scales"]]}
        self.kvstore.write("info", json.dumps(unsharded).encode()).result()
        self.scales = []
        for s in range(len(info["scales"])):
            store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "memory"},
                             "scale_index": s, "open": True}, context=self.context).result()
            self.scales.append(store[ts.d["channel"][0]].T)  # x, y, z, channel -> z, y, x
        self.shards: dict[tuple[str, str], list[tuple[int, bytes]]] = {}

    def write(self, scale: int, lo_zyx: tuple[int, ...], data: np.ndarray) -> Any:
        sl = tuple(slice(a, a + n) for a, n in zip(lo_zyx, data.shape, strict=True))
        return self.scales[scale][sl].write(np.ascontiguousarray(data))

    def collect(self) -> None:
        """Move every encoded chunk written so far into its shard's list (all-fill chunks were never stored)."""
        keys = [k.decode() for k in self.kvstore.list().result() if k != b"info"]
        reads = [(k, self.kvstore.read(k)) for k in keys]
        for key, future in reads:
            m = _CHUNK_KEY.match(key)
            assert m is not None, key
            scale: ScaleInfo = self.by_key[m["key"]]
            grid = tuple(int(m[a]) // c for a, c in zip("zyx", scale.chunk_size, strict=True))
            chunk_id = scale.chunk_id(grid)
            assert scale.sharding is not None
            shard, _ = scale.sharding.shard_of(chunk_id)
            self.shards.setdefault((scale.key, scale.sharding.shard_name(shard)), []).append(
                (chunk_id, future.result().value))
        # Every chunk key is "<scale key>/...": "/" sorts just before "0".
        for prefix in {k.split("/", 1)[0] for k in keys}:
            self.kvstore.delete_range(ts.KvStore.KeyRange(prefix + "/", prefix + "0")).result()

    def save(self, folder: Path) -> int:
        """Write every shard file under ``folder/<scale key>/``; returns the number of shards."""
        for (key, name), chunks in sorted(self.shards.items()):
            sharding = self.by_key[key].sharding
            assert sharding is not None
            (folder / key).mkdir(parents=True, exist_ok=True)
            (folder / key / name).write_bytes(encode_shard(chunks, sharding))
        return len(self.shards)


def _blocks(profile: ReplicaProfile) -> Iterator[tuple[int, int, int]]:
    lo, hi = profile.region_zyx()
    b = profile.block
    for z in range(lo[0], hi[0], b):
        for y in range(lo[1], hi[1], b):
            for x in range(lo[2], hi[2], b):
                yield z, y, x


def build(root: Path, profile: str) -> None:
    """Write the replica's hemibrain volumes under ``root`` (one block at a time, then the shards)."""
    prof = PROFILES[profile]
    began = time.monotonic()
    em_dir = root / BUCKET_DIR / EM_PATH
    seg_dir = root / BUCKET_DIR / SEG_PATH
    em_dir.mkdir(parents=True, exist_ok=True)
    seg_dir.mkdir(parents=True, exist_ok=True)
    (em_dir / "info").write_text(json.dumps(em_info(), indent=2) + "\n")
    (seg_dir / "info").write_bytes(segmentation_info_bytes())
    em = _ShardedWriter(em_info(), "replica EM")
    seg = _ShardedWriter(segmentation_info(), "replica segmentation")
    bank = _TileBank(prof)
    # Scales whose per-block piece is at least a chunk are written per block; coarser ones are gathered over
    # the region (1/512 of it and less) and written at the end.
    per_block = [s for s in range(N_SCALES) if prof.block // 2**s >= CHUNK]
    gather = max(per_block) + 1
    region_lo, region_hi = prof.region_zyx()
    shape = tuple((b - a) // 2**gather for a, b in zip(region_lo, region_hi, strict=True))
    gathered = (np.zeros(shape, np.uint8), np.zeros(shape, np.uint64))
    written = 0
    for z, y, x in _blocks(prof):
        tissue_lo, tissue_hi = prof.tissue_zyx()
        if any(max(lo - (c + prof.block), c + 1 - hi) > prof.halo
               for c, lo, hi in zip((z, y, x), tissue_lo, tissue_hi, strict=True)):
            continue  # beyond the halo: never written, absent from its shard
        dist = outside_distance(prof, (z, y, x), (prof.block,) * 3)
        outside = dist > 0
        block_em = np.zeros(dist.shape, np.uint8)
        block_seg = np.zeros(dist.shape, np.uint64)
        if not outside.all():
            bank.fill(z, y, x, block_em, block_seg)
        if outside.any():
            near = outside & (dist <= prof.halo)
            block_em[outside] = 0
            block_em[near] = halo_values(dist[near], prof.halo, np.random.default_rng([SEED, z, y, x]))
            block_seg[outside] = 0
        del dist, outside
        futures = []
        for s in range(gather + 1):
            if s > 0:
                block_em, block_seg = _mean2(block_em), block_seg[::2, ::2, ::2]
            if s in per_block:
                lo = tuple(c // 2**s for c in (z, y, x))
                futures += [em.write(s, lo, block_em), seg.write(s, lo, block_seg)]
            else:
                start = [(c - r) // 2**s for c, r in zip((z, y, x), region_lo, strict=True)]
                piece: tuple[int, ...] = block_em.shape
                local = tuple(slice(a, a + k) for a, k in zip(start, piece, strict=True))
                gathered[0][local] = block_em
                gathered[1][local] = block_seg
        for f in futures:
            f.result()
        em.collect()
        seg.collect()
        written += 1
    block_em, block_seg = gathered
    for s in range(gather, N_SCALES):
        if s > gather:
            block_em, block_seg = _mean2(block_em), block_seg[::2, ::2, ::2]
        lo = tuple(c // 2**s for c in region_lo)
        em.write(s, lo, block_em).result()
        seg.write(s, lo, block_seg).result()
        em.collect()
        seg.collect()
    shards = em.save(em_dir) + seg.save(seg_dir)
    log.info("replica hemibrain (%s): %d blocks, %d shard files in %.1f s", profile, written, shards,
             time.monotonic() - began)
