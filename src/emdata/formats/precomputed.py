"""Neuroglancer precomputed ``info`` documents and sharding: checked, bounded and turned from x, y, z into z, y, x.

Precomputed is x, y, z; everything this module hands out is z, y, x, and so are the fields of
:class:`ScaleInfo`. Every number is bounded before anything is sized from it. The sharded format
(``neuroglancer_uint64_sharded_v1``) is implemented here too: which shard file holds a chunk (what a reader
names when a shard is missing or forbidden), and how a shard file is laid out (what the replica writes).
"""

from __future__ import annotations

import gzip
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emdata.errors import SourceMismatchError

Zyx = tuple[int, int, int]

SHARDING_TYPE = "neuroglancer_uint64_sharded_v1"
SHARD_HASHES = ("identity", "murmurhash3_x86_128")
SHARD_ENCODINGS = ("raw", "gzip")
ENCODINGS = ("raw", "jpeg", "png", "compressed_segmentation", "compresso")
DATA_TYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32")


@dataclass(frozen=True)
class ShardingInfo:
    """A scale's ``sharding`` block (``neuroglancer_uint64_sharded_v1``), bounded."""

    preshift_bits: int
    minishard_bits: int
    shard_bits: int
    hash: str
    minishard_index_encoding: str
    data_encoding: str

    def shard_of(self, chunk_id: int) -> tuple[int, int]:
        """(shard, minishard) holding the chunk ``chunk_id`` (only the identity hash is computed here)."""
        if self.hash != "identity":
            raise NotImplementedError(f"shard_of: hash {self.hash!r} is not computed here (only 'identity')")
        hashed = chunk_id >> self.preshift_bits
        return (hashed >> self.minishard_bits) & ((1 << self.shard_bits) - 1), hashed & ((1 << self.minishard_bits) - 1)

    def shard_name(self, shard: int) -> str:
        """The shard's file name: the number in hex, zero-padded to ceil(shard_bits / 4) digits."""
        return f"{shard:0{(self.shard_bits + 3) // 4}x}.shard"


@dataclass(frozen=True)
class ScaleInfo:
    """One entry of ``info["scales"]``, with every vector turned from x, y, z into z, y, x."""

    index: int
    key: str
    resolution_nm: tuple[float, float, float]
    voxel_offset: Zyx  # global index of the first voxel
    size: Zyx
    chunk_size: Zyx
    encoding: str
    sharding: ShardingInfo | None = None

    @property
    def end(self) -> Zyx:
        """Global index one past the last voxel."""
        return tuple(o + s for o, s in zip(self.voxel_offset, self.size, strict=True))  # type: ignore[return-value]

    @property
    def grid(self) -> Zyx:
        """Chunks per axis (z, y, x)."""
        return tuple(-(-s // c) for s, c in zip(self.size, self.chunk_size, strict=True))  # type: ignore[return-value]

    def describe(self) -> str:
        res = "x".join(f"{r:g}" for r in self.resolution_nm)
        return f"scale {self.index} ({self.key!r}, {res} nm, size {list(self.size)} z,y,x, {self.encoding})"

    def chunk_id(self, grid_zyx: Sequence[int]) -> int:
        """The compressed Morton code of the chunk at grid position (z, y, x) (the sharded format's chunk id)."""
        return compressed_morton_code(tuple(reversed(grid_zyx)), tuple(reversed(self.grid)))

    def chunk_files(self, lo: Sequence[int], hi: Sequence[int]) -> list[str]:
        """Object names (relative to the volume) holding the chunks that overlap global voxels [lo, hi) (z, y, x).

        Sharded: the shard files (identity hash only); unsharded: the chunk files ``key/x0-x1_y0-y1_z0-z1``.
        """
        ranges = []
        for a, b, o, c, n in zip(lo, hi, self.voxel_offset, self.chunk_size, self.size, strict=True):
            first, last = max(a - o, 0) // c, min(b - o, n) - 1
            ranges.append(range(first, last // c + 1) if last >= first * c else range(0))
        names: set[str] = set()
        for gz in ranges[0]:
            for gy in ranges[1]:
                for gx in ranges[2]:
                    if self.sharding is not None:
                        shard, _ = self.sharding.shard_of(self.chunk_id((gz, gy, gx)))
                        names.add(f"{self.key}/{self.sharding.shard_name(shard)}")
                    else:
                        box = [(o + g * c, o + min((g + 1) * c, n)) for g, o, c, n in
                               zip((gx, gy, gz), self.voxel_offset[::-1], self.chunk_size[::-1], self.size[::-1],
                                   strict=True)]
                        names.add(f"{self.key}/" + "_".join(f"{a}-{b}" for a, b in box))
        return sorted(names)


@dataclass(frozen=True)
class VolumeInfo:
    """The parts of a precomputed ``info`` this package relies on."""

    url: str  # the live https URL of the volume (no trailing slash)
    data_type: str
    num_channels: int
    scales: tuple[ScaleInfo, ...]

    def scale_with_resolution(self, resolution_nm: Sequence[float]) -> ScaleInfo | None:
        for s in self.scales:
            if all(math.isclose(a, b) for a, b in zip(s.resolution_nm, resolution_nm, strict=True)):
                return s
        return None


def compressed_morton_code(position_xyz: Sequence[int], grid_xyz: Sequence[int]) -> int:
    """Neuroglancer's compressed Morton code: bits of x, y, z interleaved while each axis still has bits."""
    bits = [max(0, (n - 1).bit_length()) for n in grid_xyz]
    code, out = 0, 0
    for i in range(max(bits)):
        for axis in range(3):
            if i < bits[axis]:
                code |= ((position_xyz[axis] >> i) & 1) << out
                out += 1
    return code


def _encode(data: bytes, encoding: str) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0) if encoding == "gzip" else data


def encode_shard(chunks: Iterable[tuple[int, bytes]], sharding: ShardingInfo) -> bytes:
    """One shard file holding ``chunks`` ((chunk id, encoded chunk) pairs, all of this shard), deterministic.

    Layout: the shard index (2**minishard_bits pairs of uint64 [start, end) byte offsets, relative to its end),
    then per minishard its chunks in chunk id order followed by its minishard index (chunk ids, offsets and
    sizes, the first two delta-encoded), each encoded as the sharding says.
    """
    by_minishard: dict[int, list[tuple[int, bytes]]] = {}
    for chunk_id, data in chunks:
        by_minishard.setdefault(sharding.shard_of(chunk_id)[1], []).append((chunk_id, data))
    n = 1 << sharding.minishard_bits
    index = bytearray()
    body = bytearray()
    for minishard in range(n):
        entries = sorted(by_minishard.get(minishard, []))
        if not entries:
            index += struct.pack("<QQ", len(body), len(body))
            continue
        ids, offsets, sizes = [], [], []
        previous_id, previous_end = 0, 0
        for chunk_id, data in entries:
            encoded = _encode(data, sharding.data_encoding)
            ids.append(chunk_id - previous_id)
            offsets.append(len(body) - previous_end)
            sizes.append(len(encoded))
            body += encoded
            previous_id, previous_end = chunk_id, len(body)
        table = _encode(struct.pack(f"<{3 * len(ids)}Q", *ids, *offsets, *sizes), sharding.minishard_index_encoding)
        index += struct.pack("<QQ", len(body), len(body) + len(table))
        body += table
    return bytes(index) + bytes(body)


def _zyx(value: Any, what: str, url: str, kind: type = int) -> tuple[Any, Any, Any]:
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise SourceMismatchError(f"{url}/info: {what} must be three numbers (x, y, z), got {value!r}")
    if kind is int and not all(float(v).is_integer() for v in value):
        raise SourceMismatchError(f"{url}/info: {what} must be three integers (x, y, z), got {value!r}")
    x, y, z = (kind(v) for v in value)
    return z, y, x


# Bounds on the numbers of an ``info`` (hemibrain scale 0 is about 41k voxels per axis, chunks 64^3):
# a document outside them is refused before any array is sized from it.
MAX_AXIS_VOXELS = 2**31
MAX_CHUNK_AXIS = 4096
MAX_CHUNK_VOXELS = 2**27
MAX_SCALES = 64
MAX_CHUNK_SIZES = 16  # entries of ``chunk_sizes`` (readers use the first)
MAX_MINISHARD_BITS = 32  # a shard index has 2**minishard_bits entries of 16 bytes (read before any chunk)


def _int_field(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SourceMismatchError(f"{where} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def parse_sharding(doc: Any, where: str) -> ShardingInfo:
    """Check a ``sharding`` block; ``where`` (URL and field) names it in errors."""
    if not isinstance(doc, Mapping):
        raise SourceMismatchError(f"{where} must be a JSON object, got {str(doc)[:80]!r}")
    if doc.get("@type") != SHARDING_TYPE:
        raise SourceMismatchError(f"{where}.@type must be {SHARDING_TYPE!r}, got {doc.get('@type')!r}")
    preshift = _int_field(doc.get("preshift_bits"), f"{where}.preshift_bits", 0, 64)
    minishard = _int_field(doc.get("minishard_bits"), f"{where}.minishard_bits", 0, MAX_MINISHARD_BITS)
    shard = _int_field(doc.get("shard_bits"), f"{where}.shard_bits", 0, 64)
    if preshift + minishard + shard > 64:
        raise SourceMismatchError(f"{where}: preshift_bits + minishard_bits + shard_bits = "
                                  f"{preshift + minishard + shard} exceeds the 64 bits of a chunk id")
    values = {}
    for name, allowed, default in (("hash", SHARD_HASHES, None), ("minishard_index_encoding", SHARD_ENCODINGS, "raw"),
                                   ("data_encoding", SHARD_ENCODINGS, "raw")):
        v = doc.get(name, default)
        if v not in allowed:
            raise SourceMismatchError(f"{where}.{name} must be one of {list(allowed)}, got {v!r}")
        values[name] = v
    return ShardingInfo(preshift, minishard, shard, **values)  # type: ignore[arg-type]


# A scale key becomes part of every chunk URL: plain path segments only (no "..", no absolute path, no query).
_KEY = re.compile(r"[A-Za-z0-9_.,\-]{1,128}(/[A-Za-z0-9_.,\-]{1,128}){0,7}")


def _key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key) or any(p in (".", "..") for p in key.split("/")):
        raise SourceMismatchError(f"{where}.key must be a relative path of plain segments, got {key!r}")
    return key


def _check_bounds(scale: ScaleInfo, url: str) -> None:
    where = f"{url}/info scales[{scale.index}]"
    if not all(0 < n <= MAX_AXIS_VOXELS for n in scale.size):
        raise SourceMismatchError(f"{where}.size {list(scale.size)[::-1]} (x, y, z): each must be 1..{MAX_AXIS_VOXELS}")
    if not all(abs(o) <= MAX_AXIS_VOXELS for o in scale.voxel_offset):
        raise SourceMismatchError(f"{where}.voxel_offset {list(scale.voxel_offset)[::-1]} (x, y, z) is out of range")
    if not all(0 < c <= MAX_CHUNK_AXIS for c in scale.chunk_size) or math.prod(scale.chunk_size) > MAX_CHUNK_VOXELS:
        raise SourceMismatchError(f"{where}.chunk_sizes[0] {list(scale.chunk_size)[::-1]} (x, y, z): each must be "
                                  f"1..{MAX_CHUNK_AXIS} and at most {MAX_CHUNK_VOXELS} voxels in all")
    if not all(math.isfinite(r) and 0 < r <= 1e6 for r in scale.resolution_nm):
        raise SourceMismatchError(f"{where}.resolution {list(scale.resolution_nm)[::-1]} nm (x, y, z) must be "
                                  "positive and finite")
    if scale.encoding not in ENCODINGS:
        raise SourceMismatchError(f"{where}.encoding must be one of {list(ENCODINGS)}, got {scale.encoding!r}")
    if scale.sharding is not None:
        bits = sum(max(0, (g - 1).bit_length()) for g in scale.grid)
        if bits > 64:
            raise SourceMismatchError(f"{where}: the chunk grid {list(scale.grid)[::-1]} (x, y, z) needs {bits} bits "
                                      "of chunk id, more than the sharded format's 64")


def _check_scale_extras(s: Mapping[str, Any], i: int, url: str) -> None:
    if "jpeg_quality" in s:
        _int_field(s["jpeg_quality"], f"{url}/info scales[{i}].jpeg_quality", 0, 100)
    if "compressed_segmentation_block_size" in s:
        what = f"scales[{i}].compressed_segmentation_block_size"
        block = _zyx(s["compressed_segmentation_block_size"], what, url)
        if not all(1 <= b <= MAX_CHUNK_AXIS for b in block):
            raise SourceMismatchError(f"{url}/info {what} {list(block)[::-1]} (x, y, z): each must be "
                                      f"1..{MAX_CHUNK_AXIS}")


def parse_info(doc: Mapping[str, Any], url: str) -> VolumeInfo:
    """Check and convert a precomputed ``info`` document (raises SourceMismatchError naming the URL and field)."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("scales"), list) or not doc["scales"]:
        raise SourceMismatchError(f"{url}/info is not a precomputed multiscale volume (no 'scales')")
    scales = []
    if len(doc["scales"]) > MAX_SCALES:
        raise SourceMismatchError(f"{url}/info lists {len(doc['scales'])} scales (at most {MAX_SCALES} expected)")
    channels = doc.get("num_channels", 1)
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= 1024:
        raise SourceMismatchError(f"{url}/info num_channels must be an integer 1..1024, got {channels!r}")
    data_type = doc.get("data_type")
    if data_type not in DATA_TYPES:
        raise SourceMismatchError(f"{url}/info data_type must be one of {list(DATA_TYPES)}, got {data_type!r}")
    for i, s in enumerate(doc["scales"]):
        where = f"{url}/info scales[{i}]"
        if not isinstance(s, Mapping):
            raise SourceMismatchError(f"{where} is not a JSON object: {str(s)[:80]!r}")
        chunks = s.get("chunk_sizes") or [None]
        if not isinstance(chunks, list) or len(chunks) > MAX_CHUNK_SIZES:
            raise SourceMismatchError(f"{where}.chunk_sizes must be a list of at most {MAX_CHUNK_SIZES} sizes, "
                                      f"got {str(chunks)[:80]!r}")
        _check_scale_extras(s, i, url)
        sharding = s.get("sharding")
        scales.append(ScaleInfo(
            index=i, key=_key(s.get("key"), where),
            resolution_nm=_zyx(s.get("resolution"), f"scales[{i}].resolution", url, float),
            voxel_offset=_zyx(s.get("voxel_offset", [0, 0, 0]), f"scales[{i}].voxel_offset", url),
            size=_zyx(s.get("size"), f"scales[{i}].size", url),
            chunk_size=_zyx(chunks[0], f"scales[{i}].chunk_sizes[0]", url),
            encoding=str(s.get("encoding")),
            sharding=None if sharding is None else parse_sharding(sharding, f"{where}.sharding"),
        ))
        _check_bounds(scales[-1], url)
    return VolumeInfo(url=url.rstrip("/"), data_type=str(data_type), num_channels=channels, scales=tuple(scales))
