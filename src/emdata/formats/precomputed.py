"""Neuroglancer precomputed volumes over HTTP(S): parse an ``info``, open one scale with tensorstore as z, y, x.

Precomputed is x, y, z (tensorstore's domain is x, y, z, channel, in global voxel coordinates that start at
the scale's ``voxel_offset``); everything this module hands out is z, y, x, and so are the fields of
:class:`ScaleInfo`. Sharded (``neuroglancer_uint64_sharded_v1``) and unsharded scales read the same way:
tensorstore resolves shard and minishard indices with HTTP Range requests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tensorstore as ts

from emdata.errors import DownloadError, SourceMismatchError

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
    sharded: bool

    @property
    def end(self) -> Zyx:
        """Global index one past the last voxel."""
        return tuple(o + s for o, s in zip(self.voxel_offset, self.size, strict=True))  # type: ignore[return-value]

    def describe(self) -> str:
        res = "x".join(f"{r:g}" for r in self.resolution_nm)
        return f"scale {self.index} ({self.key!r}, {res} nm, size {list(self.size)} z,y,x)"


@dataclass(frozen=True)
class VolumeInfo:
    """The parts of a precomputed ``info`` this package relies on."""

    url: str  # the live https URL of the volume (no trailing slash)
    data_type: str
    num_channels: int
    volume_type: str
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


def parse_info(doc: Mapping[str, Any], url: str) -> VolumeInfo:
    """Check and convert a precomputed ``info`` document (raises SourceMismatchError naming what is off)."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("scales"), list) or not doc["scales"]:
        raise SourceMismatchError(f"{url}/info is not a precomputed multiscale volume (no 'scales')")
    scales = []
    for i, s in enumerate(doc["scales"]):
        chunks = s.get("chunk_sizes") or [None]
        scales.append(ScaleInfo(
            index=i, key=str(s.get("key")),
            resolution_nm=_zyx(s.get("resolution"), f"scales[{i}].resolution", url, float),
            voxel_offset=_zyx(s.get("voxel_offset", [0, 0, 0]), f"scales[{i}].voxel_offset", url),
            size=_zyx(s.get("size"), f"scales[{i}].size", url),
            chunk_size=_zyx(chunks[0], f"scales[{i}].chunk_sizes[0]", url),
            encoding=str(s.get("encoding")),
            sharded=isinstance(s.get("sharding"), Mapping),
        ))
    return VolumeInfo(url=url.rstrip("/"), data_type=str(doc.get("data_type")),
                      num_channels=int(doc.get("num_channels", 1)), volume_type=str(doc.get("type")),
                      scales=tuple(scales))


def open_scale(http_url: str, scale: int, context: ts.Context) -> ts.TensorStore:
    """Open scale ``scale`` of the precomputed volume at ``http_url`` as a read-only z, y, x view.

    ``http_url`` is the URL actually fetched (already rewritten onto a mirror when there is one). Indices of
    the view are global voxel coordinates, like the ``info``: the first voxel is at ``voxel_offset``.
    """
    spec = {
        "driver": "neuroglancer_precomputed",
        "kvstore": {"driver": "http", "base_url": http_url.rstrip("/") + "/"},
        "scale_index": int(scale),
        "open": True,
        "recheck_cached_data": "open",
        "recheck_cached_metadata": "open",
    }
    try:
        store = ts.open(spec, context=context, read=True).result()
    except ValueError as exc:  # tensorstore reports every failure (HTTP status, bad info) as ValueError
        raise DownloadError(f"opening scale {scale} of {http_url} failed: {exc}") from exc
    return store[ts.d["channel"][0]].T  # x, y, z, channel -> z, y, x
