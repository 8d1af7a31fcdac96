"""Replica of OpenOrganelle jrc_mus-nacc-2 ``recon-2/em/fibsem-int16``: the real documents, voxels made on request.

Served at the real path under ``janelia-cosem-datasets.s3.amazonaws.com/jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/``.
The metadata documents are the real ones, from the verbatim zarr metadata dump in ``tests/fixtures/reference/
sources`` (``openorganelle_jrc_mus-nacc-2_recon-2_em_fibsem-int16_zarr_metadata_dump.json``): the group's
``.zattrs`` is the dump's ``attrs`` (OME-NGFF 0.4, nine levels, the real scales and translations with their float
noise such as 11.840000000000002) and each level's ``.zarray`` holds the dump's shape (s0 [564, 2520, 2596]),
dtype int16 little-endian, chunks 64^3, C order, fill 0 and compressor Zstd(level=1). The raw bytes of the real
documents are not held anywhere, only their content: they are written as zarr-python 2 writes them (JSON, indent
4, sorted keys), and ``dimension_separator`` "/" is our assumption (the dump does not show it).

The voxels are generated on request, one chunk at a time (``providers``): every chunk of every level answers,
as in the real dense store (17,266 chunks; evidence: its DVC record), so a real-size volume costs nothing until a
chunk of it is read. A chunk is a deterministic function of its level and index (EM-like cells and mitochondria
scaled to the level, three nuclei placed in nanometres so that every level shows them in the same place),
zstd-compressed as the ``.zarray`` says; voxels beyond the array's edge are fill (0).

The nucleus segmentation ``recon-2/labels/inference/segmentations/nuc`` is the replica's INVENTION in its
documents and voxels: public loaders read a group there (``.zattrs`` multiscales, one array ``s0`` at the grid of
the EM level of equal scale), but its documents were never seen. Here it is uint64 at EM s2's scale and
translation and shape, sparse (all-background chunks are absent and answer 404), ids 1..3 for the nuclei.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import Zstd
from scipy import ndimage

from emdata.offline.replica.synth import em_like

VERSION = 3

HOST = "janelia-cosem-datasets.s3.amazonaws.com"
STORE_PATH = "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr"
GROUP_PATH = "recon-2/em/fibsem-int16"
LABEL_PATH = "recon-2/labels/inference/segmentations/nuc"
N_LEVELS = 9
CHUNK = 64
SEED = 2015  # imaging started in 2015; any fixed value
CACHE_BYTES = 160 * 2**20  # generated chunks kept (all of s2 and its labels: a demo's HEAD-then-GET pass)

# From the dump (children s0..s8 "shape"), z, y, x.
SHAPES: tuple[tuple[int, int, int], ...] = (
    (564, 2520, 2596), (282, 1260, 1298), (141, 630, 649), (70, 315, 324), (35, 157, 162),
    (17, 78, 81), (8, 39, 40), (4, 19, 20), (2, 9, 10),
)
# The dump's "attrs" (the group's .zattrs): each level's scale and translation, float noise included.
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

# The replica's invention (see the module docstring): the nucleus labels on the grid of EM s2.
LABEL_LEVEL = 2
LABEL_SHAPE = SHAPES[LABEL_LEVEL]
LABEL_ATTRS: dict[str, Any] = {
    "multiscales": [{
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in ("z", "y", "x")],
        "coordinateTransformations": [{"scale": [1.0, 1.0, 1.0], "type": "scale"}],
        "datasets": [{"coordinateTransformations": [
            {"scale": _SCALES_AND_TRANSLATIONS[LABEL_LEVEL][0], "type": "scale"},
            {"translation": _SCALES_AND_TRANSLATIONS[LABEL_LEVEL][1], "type": "translation"}], "path": "s0"}],
        "metadata": None,
        "name": "nuc",
        "type": None,
        "version": "0.4",
    }],
}
# Nuclei (z, y, x centre and semi-axes in nm): the volume is 1669 x 10080 x 10384 nm, so they span all of z.
NUCLEI: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((800.0, 2600.0, 3000.0), (1500.0, 2100.0, 2300.0)),
    ((900.0, 7200.0, 2400.0), (1400.0, 1900.0, 1800.0)),
    ((700.0, 5600.0, 8000.0), (1600.0, 2300.0, 2000.0)),
)


def zjson(doc: Any) -> bytes:
    """A zarr v2 metadata document as zarr-python 2 writes it (``zarr.util.json_dumps``)."""
    return json.dumps(doc, indent=4, sort_keys=True, ensure_ascii=True, separators=(",", ": ")).encode()


def zarray(shape: tuple[int, ...], dimension_separator: str = "/", dtype: str = "<i2") -> dict[str, Any]:
    """A zarr v2 ``.zarray`` with the dump's properties (zstd 1, fill 0, C order, chunks 64^3)."""
    return {
        "chunks": [CHUNK] * 3,
        "compressor": {"id": "zstd", "level": 1},
        "dimension_separator": dimension_separator,
        "dtype": dtype,
        "fill_value": 0,
        "filters": None,
        "order": "C",
        "shape": list(shape),
        "zarr_format": 2,
    }


def group_dir(root: Path) -> Path:
    return root / HOST / STORE_PATH / GROUP_PATH


def label_dir(root: Path) -> Path:
    return root / HOST / STORE_PATH / LABEL_PATH


def documents(dimension_separator: str = "/") -> dict[str, bytes]:
    """Every metadata document served, by path relative to the store (``jrc_mus-nacc-2.zarr/``)."""
    docs: dict[str, bytes] = {}
    zgroup = zjson({"zarr_format": 2})
    for path in (GROUP_PATH, LABEL_PATH):
        parts = path.split("/")
        for n in range(len(parts) + 1):
            docs["/".join([*parts[:n], ".zgroup"])] = zgroup
    docs[f"{GROUP_PATH}/.zattrs"] = zjson(GROUP_ATTRS)
    for level, shape in enumerate(SHAPES):
        docs[f"{GROUP_PATH}/s{level}/.zarray"] = zjson(zarray(shape, dimension_separator))
    docs[f"{LABEL_PATH}/.zattrs"] = zjson(LABEL_ATTRS)
    docs[f"{LABEL_PATH}/s0/.zarray"] = zjson(zarray(LABEL_SHAPE, dimension_separator, "<u8"))
    return docs


def build(root: Path, profile: str, *, dimension_separator: str = "/") -> None:
    """Write the metadata documents (same for every profile: the voxels are generated on request)."""
    store = root / HOST / STORE_PATH
    for rel, body in documents(dimension_separator).items():
        (store / rel).parent.mkdir(parents=True, exist_ok=True)
        (store / rel).write_bytes(body)


# ----------------------------------------------------------------------------- voxels
def _centres_nm(level: int, origin: tuple[int, ...], shape: tuple[int, ...]) -> list[np.ndarray]:
    scale, translation = _SCALES_AND_TRANSLATIONS[level]
    return [(t + s * (o + np.arange(n, dtype=np.float64))).reshape([-1 if a == i else 1 for a in range(3)])
            for i, (s, t, o, n) in enumerate(zip(scale, translation, origin, shape, strict=True))]


def _nucleus_radius2(level: int, origin: tuple[int, ...], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel: the nucleus id (uint64, 0 = none) and the squared ellipsoid radius of the nearest nucleus."""
    z, y, x = _centres_nm(level, origin, shape)
    ids = np.zeros(shape, dtype=np.uint64)
    nearest = np.full(shape, np.inf)
    for i, (centre, radii) in enumerate(NUCLEI, start=1):
        r2 = np.broadcast_to(((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                             + ((x - centre[2]) / radii[2]) ** 2, shape)
        ids[r2 < 1.0] = i
        nearest = np.minimum(nearest, r2)
    return ids, nearest


def nuclei(level: int, origin: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Nucleus ids (uint64, 0 = none) of voxels ``origin .. origin + shape`` of EM level ``level``."""
    return _nucleus_radius2(level, origin, shape)[0]


def em_block(level: int, origin: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """int16 voxels of EM level ``level``: cells and mitochondria scaled to the level; nuclei with a dark envelope
    and a grainy, membrane-free chromatin texture."""
    f = 2 ** level
    em = em_like(shape, seed=SEED + level, origin=origin, cell_size=max(24, 160 // f),
                 mito_spacing=max(28, 120 // f), mito_radius=max(3.0, 20.0 / f)).em.astype(np.float32)
    ids, r2 = _nucleus_radius2(level, origin, shape)
    if ids.any() or ((r2 > 0.96) & (r2 < 1.04)).any():
        # Inside: grainy chromatin (no membranes or mitochondria), denser towards the envelope; then the envelope.
        rng = np.random.default_rng([SEED, level, *origin])
        grain = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape).astype(np.float32), 1.2) * 45.0
        chromatin = 125.0 + grain + rng.normal(0.0, 8.0, shape) - 40.0 * np.clip(r2 - 0.7, 0.0, 0.3)
        em = np.where(ids > 0, chromatin, em)
        em = np.where((r2 > 0.96) & (r2 < 1.04), 50.0 + rng.normal(0.0, 8.0, shape), em)
    # A signed range like the real fibsem-int16 (which spans negative values).
    return ((np.clip(em, 0, 255) - 120.0) * 96.0).astype(np.int16)


def _chunk_index(rel: str, separator: str) -> tuple[int, ...] | None:
    if separator not in (".", "/"):
        return None
    parts = rel.split(separator)
    if len(parts) != 3 or not all(re.fullmatch(r"0|[1-9][0-9]{0,5}", p) for p in parts):
        return None
    return tuple(int(p) for p in parts)


@lru_cache(maxsize=1)
def _zstd() -> Zstd:
    return Zstd(level=1)


class _Array:
    """Chunks of one served zarr v2 array, generated from a function of (origin, shape) -> voxels."""

    def __init__(self, zarray_path: Path, voxels: Callable[[tuple[int, ...], tuple[int, ...]], np.ndarray],
                 sparse: bool) -> None:
        self.zarray_path = zarray_path
        self.voxels = voxels
        self.sparse = sparse  # all-fill chunks are absent (404), as zarr writers leave them out

    def meta(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.zarray_path.read_bytes())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def chunk(self, key: str) -> bytes | None:
        meta = self.meta()
        if meta is None or not isinstance(meta.get("shape"), list) or not isinstance(meta.get("chunks"), list):
            return None
        index = _chunk_index(key, meta.get("dimension_separator", "."))
        shape, chunks = meta["shape"], meta["chunks"]
        if index is None or len(shape) != 3 or any(i >= math.ceil(n / c) for i, n, c in zip(index, shape, chunks,
                                                                                                 strict=True)):
            return None
        return _encoded(self, key, tuple(index), tuple(shape), tuple(chunks), str(meta.get("dtype")))


class _Cache:
    """Recently generated chunks, bounded in bytes: a HEAD and the GET after it ask for the same chunk."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple[Any, ...], bytes | None] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, key: tuple[Any, ...], make: Callable[[], bytes | None]) -> bytes | None:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            if key not in self.items:
                self.items[key] = value
                self.size += len(value or b"")
                while self.size > self.max_bytes and self.items:
                    self.size -= len(self.items.popitem(last=False)[1] or b"")
        return value


_CACHE = _Cache(CACHE_BYTES)


def _encoded(array: _Array, key: str, index: tuple[int, ...], shape: tuple[int, ...], chunks: tuple[int, ...],
             dtype: str) -> bytes | None:
    return _CACHE.get((id(array), key, shape, chunks, dtype),
                      lambda: _generate(array, index, shape, chunks, dtype))


def _generate(array: _Array, index: tuple[int, ...], shape: tuple[int, ...], chunks: tuple[int, ...],
              dtype: str) -> bytes | None:
    origin = tuple(i * c for i, c in zip(index, chunks, strict=True))
    inner = tuple(min(c, n - o) for c, n, o in zip(chunks, shape, origin, strict=True))
    # Always the whole chunk (its noise depends on the box generated), then fill beyond the array's edge.
    block = np.ascontiguousarray(array.voxels(origin, chunks), dtype=np.dtype(dtype))
    edge = np.ones(chunks, dtype=bool)
    edge[tuple(slice(0, s) for s in inner)] = False
    block[edge] = 0
    if array.sparse and not block.any():
        return None
    return bytes(_zstd().encode(block.tobytes(order="C")))


def providers(root: Path, profile: str) -> dict[str, Callable[[str], bytes | None]]:
    """The chunks of every EM level (dense) and of the nucleus labels (sparse), generated on request."""
    def em(level: int) -> Callable[[tuple[int, ...], tuple[int, ...]], np.ndarray]:
        return lambda origin, shape: em_block(level, origin, shape)

    arrays: dict[str, _Array] = {}
    for level in range(N_LEVELS):
        arrays[f"{HOST}/{STORE_PATH}/{GROUP_PATH}/s{level}/"] = _Array(
            group_dir(root) / f"s{level}" / ".zarray", em(level), sparse=False)
    arrays[f"{HOST}/{STORE_PATH}/{LABEL_PATH}/s0/"] = _Array(
        label_dir(root) / "s0" / ".zarray", lambda o, s: nuclei(LABEL_LEVEL, o, s), sparse=True)

    def provider(prefix: str, array: _Array) -> Callable[[str], bytes | None]:
        return lambda name: array.chunk(name[len(prefix):])

    return {prefix: provider(prefix, array) for prefix, array in arrays.items()}


def read_level(level: int, start: tuple[int, int, int] = (0, 0, 0),
               stop: tuple[int, int, int] | None = None) -> np.ndarray:
    """The replica's voxels of EM ``s<level>`` in a box (z, y, x), without a server (for tests)."""
    stop = stop or SHAPES[level]
    return _tiled(lambda o, s: em_block(level, o, s), start, stop, np.int16)


def read_labels(start: tuple[int, int, int] = (0, 0, 0), stop: tuple[int, int, int] | None = None) -> np.ndarray:
    """The replica's nucleus labels in a box of their ``s0`` (z, y, x), without a server (for tests)."""
    return _tiled(lambda o, s: nuclei(LABEL_LEVEL, o, s), start, stop or LABEL_SHAPE, np.uint64)


def _tiled(voxels: Callable[[tuple[int, ...], tuple[int, ...]], np.ndarray], start: tuple[int, ...],
           stop: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A box assembled chunk by chunk, exactly as the served chunks hold it (the noise depends on the chunk)."""
    out = np.zeros(tuple(b - a for a, b in zip(start, stop, strict=True)), dtype=dtype)
    ranges = [range(a // CHUNK, (b - 1) // CHUNK + 1) for a, b in zip(start, stop, strict=True)]
    for index in np.ndindex(*(len(r) for r in ranges)):
        origin = tuple(r[i] * CHUNK for r, i in zip(ranges, index, strict=True))
        block = voxels(origin, (CHUNK, CHUNK, CHUNK))
        lo = [max(a, o) for a, o in zip(start, origin, strict=True)]
        hi = [min(b, o + CHUNK) for b, o in zip(stop, origin, strict=True)]
        out[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))] = \
            block[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin, strict=True))]
    return out
