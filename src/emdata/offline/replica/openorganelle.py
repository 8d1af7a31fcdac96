"""Replica of OpenOrganelle jrc_mus-nacc-2 ``recon-2/em/fibsem-int16``: a zarr v2 int16 pyramid s0..s8.

Served at the real path under ``janelia-cosem-datasets.s3.amazonaws.com/jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/``.
The group's ``.zattrs`` is the real one, byte for byte as ``json.dumps`` writes the verbatim dump in
``tests/fixtures/reference/sources`` (OME-NGFF 0.4, nine levels, the real scales and translations, including
their float noise such as 11.840000000000002). Each array's ``.zarray`` is rebuilt from the dump's
zarr-python properties (int16 little-endian, fill 0, C order, chunks 64^3, zstd level 1) with the chunk key
separator "/" (the real one is unverified) and the replica's smaller shapes.

Shapes are a documented stand-in: the real s0 is [564, 2520, 2596] (7.38 GB of int16), far beyond the demo's
time budget, so "full" has s0 [188, 840, 865] (a third per axis) and "small" [40, 96, 104]; every level is the previous one
halved (floor, like the real s7 [4, 19, 20] -> s8 [2, 9, 10]), at least 1 voxel per axis, made by 2x2x2 mean
like a mean pyramid. Voxels are ``synth.em_like`` grey values mapped to a signed range; a corner column of
the bounding box (y and x below one chunk) is 0, so its all-fill chunks are never written and readers must
treat the missing keys (404) as fill, as they do for the real bucket's empty chunks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from emdata.offline.replica.synth import em_like

VERSION = 2

HOST = "janelia-cosem-datasets.s3.amazonaws.com"
STORE_PATH = "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr"
GROUP_PATH = "recon-2/em/fibsem-int16"
N_LEVELS = 9
CHUNK = 64
SEED = 2015  # imaging started in 2015; any fixed value
# "full" is a third of the real s0 along each axis (274 MB of int16), "small" is for the tests.
SHAPES: dict[str, tuple[int, int, int]] = {"full": (188, 840, 865), "small": (40, 96, 104)}
EMPTY_CORNER = CHUNK  # y, x below this at s0 are 0 (fill), so those chunks are absent

# The group's ``.zattrs``: the "attrs" object of
# reference/sources/openorganelle_jrc_mus-nacc-2_recon-2_em_fibsem-int16_zarr_metadata_dump.json, verbatim.
_SCALES_AND_TRANSLATIONS: list[tuple[list[float], list[float]]] = [
    ([2.96, 4.0, 4.0], [0.0, 0.0, 0.0]),
    ([5.92, 8.0, 8.0], [1.48, 2.0, 2.0]),
    ([11.840000000000002, 16.0, 16.0], [4.4399999999999995, 6.0, 6.0]),
    ([23.68, 32.0, 32.0], [10.36, 14.0, 14.0]),
    ([47.36, 64.0, 64.0], [22.2, 30.0, 30.0]),
    ([94.72, 128.0, 128.0], [45.88, 62.0, 62.0]),
    ([189.44, 256.0, 256.0], [93.24, 126.0, 126.0]),
    ([378.8799999999999, 512.0, 512.0], [187.96, 254.0, 254.0]),
    ([757.7599999999999, 1024.0, 1024.0], [377.4, 510.0, 510.0]),
]
GROUP_ATTRS: dict[str, Any] = {
    "multiscales": [{
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in ("z", "y", "x")],
        "coordinateTransformations": [{"scale": [1.0, 1.0, 1.0], "type": "scale"}],
        "datasets": [
            {"coordinateTransformations": [{"scale": s, "type": "scale"},
                                           {"translation": t, "type": "translation"}],
             "path": f"s{i}"}
            for i, (s, t) in enumerate(_SCALES_AND_TRANSLATIONS)
        ],
        "metadata": None,
        "name": "",
        "type": None,
        "version": "0.4",
    }],
}


def group_dir(root: Path) -> Path:
    return root / HOST / STORE_PATH / GROUP_PATH


def level_shapes(s0: tuple[int, int, int], n_levels: int = N_LEVELS) -> list[tuple[int, int, int]]:
    """s0 halved per level, floor (like the real store), at least 1 voxel per axis."""
    shapes = [s0]
    for _ in range(n_levels - 1):
        shapes.append(tuple(max(1, s // 2) for s in shapes[-1]))  # type: ignore[arg-type]
    return shapes


def zarray(shape: tuple[int, ...], dimension_separator: str = "/") -> dict[str, Any]:
    """A zarr v2 ``.zarray`` as zarr-python writes it, from the dump's properties (int16, zstd 1, fill 0, C)."""
    return {
        "chunks": [CHUNK] * 3,
        "compressor": {"id": "zstd", "level": 1},
        "dimension_separator": dimension_separator,
        "dtype": "<i2",
        "fill_value": 0,
        "filters": None,
        "order": "C",
        "shape": list(shape),
        "zarr_format": 2,
    }


def to_int16(em: np.ndarray) -> np.ndarray:
    """uint8 grey values -> a signed range like the real fibsem-int16 (which spans negative values)."""
    return ((em.astype(np.int16) - 120) * 96).astype(np.int16)


def s0_volume(shape: tuple[int, int, int]) -> np.ndarray:
    vol = to_int16(em_like(shape, seed=SEED).em)
    vol[:, :EMPTY_CORNER, :EMPTY_CORNER] = 0
    return vol


def downsample_floor(vol: np.ndarray) -> np.ndarray:
    """2x2x2 mean over the floor-halved extent (an axis of 1 stays 1)."""
    out = vol
    for axis in range(3):
        n = out.shape[axis]
        if n == 1:
            continue
        half = n // 2
        sl_a = [slice(None)] * 3
        sl_b = [slice(None)] * 3
        sl_a[axis] = slice(0, 2 * half, 2)
        sl_b[axis] = slice(1, 2 * half, 2)
        out = (out[tuple(sl_a)].astype(np.float32) + out[tuple(sl_b)]) / 2
    return np.rint(out).astype(np.int16)


def write_level(path: Path, data: np.ndarray, dimension_separator: str = "/") -> None:
    """One zarr v2 array written by tensorstore (all-fill chunks are not stored), then its ``.zarray`` as JSON."""
    meta = zarray(data.shape, dimension_separator)
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
                     "metadata": {k: v for k, v in meta.items() if k != "zarr_format"}},
                    create=True, delete_existing=True).result()
    store.write(data).result()
    (path / ".zarray").write_text(json.dumps(meta, indent=4, sort_keys=True))


def build(root: Path, profile: str, *, dimension_separator: str = "/") -> None:
    """Write the group (``.zgroup``, ``.zattrs``) and arrays s0..s8 under ``root/HOST/...``; same bytes each time."""
    group = group_dir(root)
    group.mkdir(parents=True, exist_ok=True)
    # Parent groups of a zarr v2 hierarchy (their own attributes, if any, are not known).
    node = root / HOST / STORE_PATH
    for part in ("", *GROUP_PATH.split("/")):
        node = node / part if part else node
        (node / ".zgroup").write_text(json.dumps({"zarr_format": 2}, indent=4))
    (group / ".zattrs").write_text(json.dumps(GROUP_ATTRS, indent=4))
    vol = s0_volume(SHAPES[profile])
    for level in range(N_LEVELS):
        if level:
            vol = downsample_floor(vol)
        write_level(group / f"s{level}", vol, dimension_separator)


def read_level(root: Path, level: int) -> np.ndarray:
    """The replica's voxels of ``s<level>`` (z, y, x), read back from its files (for tests)."""
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(group_dir(root) / f"s{level}")}},
                    open=True, read=True).result()
    return np.asarray(store.read().result())
