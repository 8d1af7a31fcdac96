"""Neuroglancer precomputed ``info`` documents: checked, bounded and turned from x, y, z into z, y, x.

Precomputed is x, y, z; everything this module hands out is z, y, x, and so are the fields of
:class:`ScaleInfo`. Every number is bounded before anything is sized from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emdata.errors import SourceMismatchError

Zyx = tuple[int, int, int]


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

    @property
    def end(self) -> Zyx:
        """Global index one past the last voxel."""
        return tuple(o + s for o, s in zip(self.voxel_offset, self.size, strict=True))  # type: ignore[return-value]

    def describe(self) -> str:
        res = "x".join(f"{r:g}" for r in self.resolution_nm)
        return f"scale {self.index} ({self.key!r}, {res} nm, size {list(self.size)} z,y,x, {self.encoding})"


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


def _zyx(value: Any, what: str, url: str, kind: type = int) -> tuple[Any, Any, Any]:
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise SourceMismatchError(f"{url}/info: {what} must be three numbers (x, y, z), got {value!r}")
    x, y, z = (kind(v) for v in value)
    return z, y, x


# Bounds on the numbers of an ``info`` (hemibrain scale 0 is about 41k voxels per axis, chunks 64^3):
# a document outside them is refused before any array is sized from it.
MAX_AXIS_VOXELS = 2**31
MAX_CHUNK_AXIS = 4096
MAX_CHUNK_VOXELS = 2**27
MAX_SCALES = 64


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


def parse_info(doc: Mapping[str, Any], url: str) -> VolumeInfo:
    """Check and convert a precomputed ``info`` document (raises SourceMismatchError naming what is off)."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("scales"), list) or not doc["scales"]:
        raise SourceMismatchError(f"{url}/info is not a precomputed multiscale volume (no 'scales')")
    scales = []
    if len(doc["scales"]) > MAX_SCALES:
        raise SourceMismatchError(f"{url}/info lists {len(doc['scales'])} scales (at most {MAX_SCALES} expected)")
    channels = doc.get("num_channels", 1)
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= 1024:
        raise SourceMismatchError(f"{url}/info num_channels must be an integer 1..1024, got {channels!r}")
    for i, s in enumerate(doc["scales"]):
        if not isinstance(s, Mapping):
            raise SourceMismatchError(f"{url}/info scales[{i}] is not a JSON object: {str(s)[:80]!r}")
        chunks = s.get("chunk_sizes") or [None]
        if not isinstance(chunks, list):
            raise SourceMismatchError(f"{url}/info scales[{i}].chunk_sizes must be a list, got {chunks!r}")
        scales.append(ScaleInfo(
            index=i, key=str(s.get("key")),
            resolution_nm=_zyx(s.get("resolution"), f"scales[{i}].resolution", url, float),
            voxel_offset=_zyx(s.get("voxel_offset", [0, 0, 0]), f"scales[{i}].voxel_offset", url),
            size=_zyx(s.get("size"), f"scales[{i}].size", url),
            chunk_size=_zyx(chunks[0], f"scales[{i}].chunk_sizes[0]", url),
            encoding=str(s.get("encoding")),
        ))
        _check_bounds(scales[-1], url)
    return VolumeInfo(url=url.rstrip("/"), data_type=str(doc.get("data_type")),
                      num_channels=channels, scales=tuple(scales))
