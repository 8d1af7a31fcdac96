"""Janelia OpenOrganelle jrc_mus-nacc-2 FIB-SEM (int16 zarr v2 pyramid on S3) -> data/jrc_mus-nacc-2.zarr.

The source is the OME-NGFF 0.4 group ``recon-2/em/fibsem-int16`` of
``s3://janelia-cosem-datasets/jrc_mus-nacc-2/jrc_mus-nacc-2.zarr`` (anonymous), read over its HTTPS form.
Steps:

1. GET the group's ``.zattrs`` and the chosen level's ``.zarray`` and check them against what we know (int16,
   3-D, chunks 64^3, zstd, fill 0, C order, axes z, y, x in nanometer, the level's scale and translation, the
   published shape); an ROI is checked against the level's shape. Label layers (``labels``, off by default) are
   checked the same way and must lie on the chosen level's grid. All of this before any chunk is read.
2. HEAD every chunk of the ROI: the store is dense, so a missing chunk (404, which tensorstore would read as
   fill) counts against ``max_missing_chunks`` (default 0) and the stage fails naming the first one; a 403 (a
   bucket that hides missing keys) fails naming the chunk URL.
3. Stream one level (``level``), or an ROI of it, with tensorstore's ``zarr`` (v2) driver over an
   ``http`` kvstore, one output shard at a time (several in flight, bounded memory), each shard read back and
   compared voxel for voxel before the next one is written.
4. Write an OME-Zarr 0.5 image (int16, z, y, x, nm): voxel size and translation from the source's transforms
   for that level plus the ROI offset, our own mean pyramid, and the chosen label layers as NGFF labels.

Nothing is downloaded to disk (chunks go straight from HTTP into the output), so there are no raw downloads to
delete; the metadata documents' sizes and sha256 are recorded in the provenance and in ``checksums.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emdata import ngff
from emdata.acquire.context import RunContext
from emdata.acquire.download import ChecksumRegistry, Downloader
from emdata.acquire.fsutil import atomic_dir
from emdata.acquire.params import check_chunks_and_shards, check_number
from emdata.acquire.tsio import remote_blocks
from emdata.catalog import find
from emdata.errors import DownloadError, InvalidParameterError, SourceMismatchError
from emdata.sources.base import FileRecord, Provenance, SourceBase, output_path

log = logging.getLogger(__name__)

DATASET = "jrc_mus-nacc-2"
STORE_URL = f"https://janelia-cosem-datasets.s3.amazonaws.com/{DATASET}/{DATASET}.zarr"
STORE_S3 = f"s3://janelia-cosem-datasets/{DATASET}/{DATASET}.zarr"
GROUP_PATH = "recon-2/em/fibsem-int16"
GROUP_URL = f"{STORE_URL}/{GROUP_PATH}"
LAYER = f"zarr://{STORE_S3}/{GROUP_PATH}"  # the layer link of the dataset's web page
ABOUT = find("openorganelle").about  # title, page, licence, citation, DOI (emdata.catalog)
NUCLEI_DOI = "10.25378/janelia.26513209"  # the nucleus segmentation's figshare record (a pointer to the bucket)

# Label layers that ``labels`` can select: name -> (group path in the store, what it is).
# UNVERIFIED: the nucleus path comes from public loaders (torch-em janelia_nucleus.py reads `.zattrs` and `s0`
# there, released at one coarser resolution, paired with the EM level of equal scale); no listing of the bucket
# was seen here, so the layer is off by default and every fact about it is checked before a chunk is read.
LABEL_LAYERS: dict[str, tuple[str, str]] = {
    "nuc": ("recon-2/labels/inference/segmentations/nuc",
            f"manual nucleus instance segmentation (Amira-Avizo), doi:{NUCLEI_DOI}"),
}

# What we know of the store (reference/sources/openorganelle_*: the zarr metadata dump and the web page).
N_LEVELS = 9
S0_VOXEL_NM = (2.96, 4.0, 4.0)  # z, y, x; each level doubles it, with half-voxel translations
PUBLISHED_SHAPES: tuple[tuple[int, int, int], ...] = (
    (564, 2520, 2596), (282, 1260, 1298), (141, 630, 649), (70, 315, 324), (35, 157, 162),
    (17, 78, 81), (8, 39, 40), (4, 19, 20), (2, 9, 10),
)
CHUNKS = (64, 64, 64)
COMPRESSOR = {"id": "zstd", "level": 1}
CACHE_BYTES = 32 * 2**20  # decoded source chunks shared by neighbouring output shards
HEAD_WORKERS = 16  # chunk existence checks in flight (at most ``concurrency``)
MAX_CHUNK_CHECKS = 20_000  # chunks HEADed per array (the whole of s0 has 14,760; label chunks may be smaller)
MAX_LABEL_CHUNK = 1024  # a label array's chunk edge above this is refused (bounded decode memory)
FORBIDDEN_MEANING = (
    "S3 answers 403 instead of 404 for a key that does not exist when the bucket does not grant anonymous "
    "listing (or when the object is not public), so a missing chunk cannot be told from a forbidden one; "
    "tensorstore reads only 404 as fill, so the chunk cannot be read and nothing is written. Open the URL in a "
    "browser: NoSuchKey/AccessDenied in the body says which")


def level_transform(level: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The known scale and translation (nm, z, y, x) of ``s<level>``: voxel centres of a 2x mean pyramid."""
    factor = 2**level
    return (tuple(v * factor for v in S0_VOXEL_NM), tuple(v * (factor - 1) / 2 for v in S0_VOXEL_NM))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class OpenOrganelleParams:
    """params.yaml section ``openorganelle``; every vector is z, y, x."""

    level: int = 0  # source level s<level> (0 = 2.96 x 4 x 4 nm)
    roi_voxels: Sequence[Sequence[int]] | None = None  # [[z0, y0, x0], [z1, y1, x1]] half-open, at that level
    labels: Sequence[str] = ()  # label layers (LABEL_LAYERS) written as NGFF labels; [] = none
    max_missing_chunks: int = 0  # EM chunks of the ROI allowed to be absent (404, read as 0); the store is dense
    chunks: Sequence[int] = ngff.DEFAULT_CHUNKS
    shards: Sequence[int] = ngff.DEFAULT_SHARDS
    concurrency: int = 64  # HTTP requests in flight
    max_inflight_mb: float = 256.0  # decoded voxels requested ahead of the writer

    def __post_init__(self) -> None:
        if not _is_int(self.level) or not 0 <= self.level < N_LEVELS:
            raise InvalidParameterError(
                f"openorganelle.level must be an integer in [0, {N_LEVELS - 1}] (s0..s{N_LEVELS - 1}), "
                f"got {self.level!r}")
        roi = self.roi_voxels
        if roi is not None:
            ok = (isinstance(roi, (list, tuple)) and len(roi) == 2
                  and all(isinstance(c, (list, tuple)) and len(c) == 3 and all(_is_int(v) for v in c) for c in roi))
            if not ok or any(v < 0 for c in roi for v in c) or any(
                    a >= b for a, b in zip(roi[0], roi[1], strict=True)):
                raise InvalidParameterError(
                    "openorganelle.roi_voxels must be null or [[z0, y0, x0], [z1, y1, x1]] with integers "
                    f"0 <= start < stop, got {roi!r}")
            object.__setattr__(self, "roi_voxels", (tuple(roi[0]), tuple(roi[1])))
        labels = self.labels
        if labels is None:
            labels = ()
        if not isinstance(labels, (list, tuple)) or not all(isinstance(n, str) for n in labels):
            raise InvalidParameterError(f"openorganelle.labels must be a list of layer names, got {labels!r}")
        unknown = [n for n in labels if n not in LABEL_LAYERS]
        if unknown or len(set(labels)) != len(labels):
            raise InvalidParameterError(
                f"openorganelle.labels {list(labels)!r}: unknown or repeated layer(s) {unknown or list(labels)}; "
                f"valid: {sorted(LABEL_LAYERS)}")
        object.__setattr__(self, "labels", tuple(labels))
        if not _is_int(self.max_missing_chunks) or self.max_missing_chunks < 0:
            raise InvalidParameterError(
                f"openorganelle.max_missing_chunks must be an integer >= 0, got {self.max_missing_chunks!r}")
        check_chunks_and_shards("openorganelle", self.chunks, self.shards)
        check_number("openorganelle.concurrency", self.concurrency, kind=int, low=1, high=1024, low_open=False)
        check_number("openorganelle.max_inflight_mb", self.max_inflight_mb, low=0, high=2**16)


@dataclass(frozen=True)
class LabelPlan:
    """A label layer checked against the chosen EM level (same grid) before any chunk is read."""

    name: str
    url: str  # the live URL of the label array (``.../nuc/s0``)
    shape: tuple[int, int, int]
    dtype: str
    chunks: tuple[int, int, int]
    dimension_separator: str
    scale_nm: tuple[float, float, float]
    translation_nm: tuple[float, float, float]
    documents: dict[str, Any]  # ".zattrs" and "s0/.zarray" as served


@dataclass(frozen=True)
class LevelPlan:
    """Everything decided from the metadata documents before the first chunk is read (vectors z, y, x)."""

    level: int
    path: str  # e.g. "s0"
    shape: tuple[int, int, int]  # of the whole source level
    scale_nm: tuple[float, float, float]
    translation_nm: tuple[float, float, float]
    dimension_separator: str
    roi_start: tuple[int, int, int]
    roi_stop: tuple[int, int, int]
    discrepancies: tuple[str, ...]  # known, accepted disagreements (logged and recorded)

    @property
    def roi_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.roi_start, self.roi_stop, strict=True))  # type: ignore[return-value]

    @property
    def output_translation_nm(self) -> tuple[float, float, float]:
        """The level's translation moved to the ROI's first voxel."""
        return tuple(t + a * s for t, a, s in zip(self.translation_nm, self.roi_start, self.scale_nm,
                                                   strict=True))  # type: ignore[return-value]


def _close(a: Sequence[Any], b: Sequence[float]) -> bool:
    return (isinstance(a, (list, tuple)) and len(a) == len(b)
            and all(isinstance(x, (int, float)) and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)
                    for x, y in zip(a, b, strict=True)))


def _transforms(items: Any, where: str) -> tuple[Any, Any]:
    """(scale, translation) of a coordinateTransformations list (translation None when absent)."""
    if not isinstance(items, list):
        raise SourceMismatchError(f"{where}: coordinateTransformations must be a list, got {items!r}")
    by_type = {t.get("type"): t for t in items if isinstance(t, Mapping)}
    scale = by_type.get("scale", {}).get("scale")
    translation = by_type.get("translation", {}).get("translation")
    return scale, translation


def _multiscale(doc: Any, where: str) -> Mapping[str, Any]:
    """The first multiscale of an OME-NGFF 0.4 ``.zattrs``: version 0.4, axes z, y, x in nanometer, no global shift."""
    ms = doc.get("multiscales") if isinstance(doc, Mapping) else None
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], Mapping):
        raise SourceMismatchError(f"{where}: expected an OME-NGFF 'multiscales' list, got {str(doc)[:200]!r}")
    m = ms[0]
    if m.get("version") != "0.4":
        raise SourceMismatchError(f"{where}: expected multiscales version '0.4', got {m.get('version')!r}")
    axes = m.get("axes")
    expected_axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in ngff.AXES]
    got_axes = [{k: a.get(k) for k in ("name", "type", "unit")} for a in axes] if isinstance(axes, list) and all(
        isinstance(a, Mapping) for a in axes) else axes
    if got_axes != expected_axes:
        raise SourceMismatchError(f"{where}: expected axes {expected_axes}, got {axes!r}")
    global_scale, global_translation = _transforms(m.get("coordinateTransformations", []), where)
    if (global_scale is not None and not _close(global_scale, (1.0, 1.0, 1.0))) or global_translation is not None:
        raise SourceMismatchError(
            f"{where}: expected the multiscale-wide transform to be scale [1.0, 1.0, 1.0] only, got "
            f"{m.get('coordinateTransformations')!r}")
    datasets = m.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, Mapping) for d in datasets):
        raise SourceMismatchError(f"{where}: expected a list of datasets, got {datasets!r}")
    return m


def check_group_attrs(doc: Any, level: int) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """Check the group's ``.zattrs`` (OME-NGFF 0.4) and return level ``level``'s path, scale and translation."""
    where = f"{GROUP_URL}/.zattrs"
    datasets = _multiscale(doc, where)["datasets"]
    paths = [d.get("path") for d in datasets]
    expected_paths = [f"s{i}" for i in range(N_LEVELS)]
    if paths != expected_paths:
        raise SourceMismatchError(f"{where}: expected datasets {expected_paths}, got {paths!r}")
    scale, translation = _transforms(datasets[level].get("coordinateTransformations"), f"{where} s{level}")
    known_scale, known_translation = level_transform(level)
    if not _close(scale, known_scale):
        raise SourceMismatchError(f"{where}: s{level} scale is {scale!r}, expected {list(known_scale)} nm (z, y, x)")
    if not _close(translation if translation is not None else [0.0] * 3, known_translation):
        raise SourceMismatchError(
            f"{where}: s{level} translation is {translation!r}, expected {list(known_translation)} nm (z, y, x)")
    # The document's own values (they carry float noise such as 11.840000000000002) go into the output.
    return f"s{level}", tuple(float(v) for v in scale), tuple(float(v) for v in (translation or [0.0] * 3))


def _zarray_common(doc: Any, where: str) -> tuple[np.dtype, list[int], str]:
    """zarr v2 basics of a ``.zarray``: its dtype, 3-D shape and chunk key separator."""
    if not isinstance(doc, Mapping) or doc.get("zarr_format") != 2:
        raise SourceMismatchError(f"{where}: expected a zarr v2 array (zarr_format 2), got {str(doc)[:200]!r}")
    try:
        dtype = np.dtype(doc.get("dtype"))
    except TypeError as exc:
        raise SourceMismatchError(f"{where}: dtype {doc.get('dtype')!r} is not a numpy dtype") from exc
    shape = doc.get("shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(s) and s > 0 for s in shape):
        raise SourceMismatchError(f"{where}: expected a 3-D shape (z, y, x), got {shape!r}")
    if doc.get("filters"):
        raise SourceMismatchError(f"{where}: expected no filters, got {doc.get('filters')!r}")
    separator = doc.get("dimension_separator", ".")  # zarr v2: absent means "."
    if separator not in (".", "/"):
        raise SourceMismatchError(f"{where}: dimension_separator must be '.' or '/', got {separator!r}")
    return dtype, shape, separator


def check_zarray(doc: Any, level: int) -> tuple[tuple[int, int, int], str, list[str]]:
    """Check a level's ``.zarray`` (the published shape included); return its shape, separator and notes."""
    where = f"{GROUP_URL}/s{level}/.zarray"
    dtype, shape, separator = _zarray_common(doc, where)
    if dtype.kind != "i" or dtype.itemsize != 2:
        raise SourceMismatchError(f"{where}: expected dtype int16 ('<i2'), got {doc.get('dtype')!r}")
    for key, expected in (("chunks", list(CHUNKS)), ("fill_value", 0), ("order", "C")):
        if doc.get(key) != expected:
            raise SourceMismatchError(f"{where}: expected {key} {expected!r}, got {doc.get(key)!r}")
    compressor = doc.get("compressor")
    if not isinstance(compressor, Mapping) or compressor.get("id") != COMPRESSOR["id"]:
        raise SourceMismatchError(f"{where}: expected compressor {COMPRESSOR}, got {compressor!r}")
    notes = []
    if compressor.get("level") != COMPRESSOR["level"]:
        notes.append(f"s{level} compressor {dict(compressor)} differs from the known {COMPRESSOR} (decodes the same)")
    published = list(PUBLISHED_SHAPES[level])
    if shape != published:
        raise SourceMismatchError(f"{where}: shape {shape} (z, y, x) differs from the published {published}")
    return tuple(shape), separator, notes  # type: ignore[return-value]


def plan_level(params: OpenOrganelleParams, zattrs: Any, zarray_doc: Any) -> LevelPlan:
    """Check the documents and the ROI; InvalidParameterError names an ROI that does not fit the level."""
    path, scale, translation = check_group_attrs(zattrs, params.level)
    shape, separator, notes = check_zarray(zarray_doc, params.level)
    if params.roi_voxels is None:
        start, stop = (0, 0, 0), shape
    else:
        start, stop = (tuple(c) for c in params.roi_voxels)  # type: ignore[assignment]
        if any(b > n for b, n in zip(stop, shape, strict=True)):
            raise InvalidParameterError(
                f"openorganelle.roi_voxels {[list(start), list(stop)]} does not fit s{params.level} of shape "
                f"{list(shape)} (z, y, x)")
    for note in notes:
        log.warning("openorganelle: %s", note)
    return LevelPlan(level=params.level, path=path, shape=shape, scale_nm=scale,  # type: ignore[arg-type]
                     translation_nm=translation, dimension_separator=separator,  # type: ignore[arg-type]
                     roi_start=start, roi_stop=stop, discrepancies=tuple(notes))  # type: ignore[arg-type]


def plan_label(name: str, zattrs: Any, zarray_doc: Any, plan: LevelPlan, em_zattrs: Any) -> LabelPlan:
    """Check a label layer's documents and that it lies on the chosen EM level's grid (scale, translation, ROI).

    A layer on another grid is refused (InvalidParameterError naming both grids and the EM level that matches,
    if one does); nothing is resampled.
    """
    group = f"{STORE_URL}/{LABEL_LAYERS[name][0]}"
    where = f"{group}/.zattrs"
    datasets = _multiscale(zattrs, where)["datasets"]
    first = datasets[0]
    path = first.get("path")
    if path != "s0":
        raise SourceMismatchError(f"{where}: expected the label's first dataset at path 's0', got {path!r}")
    scale, translation = _transforms(first.get("coordinateTransformations"), f"{where} s0")
    translation = translation if translation is not None else [0.0, 0.0, 0.0]
    if not all(isinstance(v, list) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            for v in (scale, translation)):
        raise SourceMismatchError(f"{where}: s0 scale {scale!r} / translation {translation!r} are not 3 numbers")
    url = f"{group}/s0"
    if not (_close(scale, plan.scale_nm) and _close(translation, plan.translation_nm)):
        matching = [d.get("path") for d in _multiscale(em_zattrs, f"{GROUP_URL}/.zattrs")["datasets"]
                    if _close(_transforms(d.get("coordinateTransformations"), GROUP_URL)[0], scale)]
        hint = (f"the EM level of equal scale is {matching[0]} (set openorganelle.level: {matching[0][1:]})"
                if matching else "no EM level has that scale")
        raise InvalidParameterError(
            f"openorganelle.labels {name!r}: {url} is at scale {list(scale)} nm, translation {list(translation)} nm "
            f"(z, y, x); openorganelle.level {plan.level} ({GROUP_URL}/{plan.path}) is at scale "
            f"{list(plan.scale_nm)} nm, translation {list(plan.translation_nm)} nm: they do not align; {hint}")
    where = f"{url}/.zarray"
    dtype, shape, separator = _zarray_common(zarray_doc, where)
    if dtype.kind not in "iu":
        raise SourceMismatchError(f"{where}: a label array must have an integer dtype, got {zarray_doc.get('dtype')!r}")
    chunks = zarray_doc.get("chunks")
    if not isinstance(chunks, list) or len(chunks) != 3 or not all(
            _is_int(c) and 0 < c <= MAX_LABEL_CHUNK for c in chunks):
        raise SourceMismatchError(f"{where}: expected 3 chunk sizes in [1, {MAX_LABEL_CHUNK}], got {chunks!r}")
    if zarray_doc.get("fill_value") not in (0, None):
        raise SourceMismatchError(f"{where}: expected fill_value 0 (background), got {zarray_doc.get('fill_value')!r}")
    if any(b > n for b, n in zip(plan.roi_stop, shape, strict=True)):
        raise InvalidParameterError(
            f"openorganelle.labels {name!r}: {url} has shape {shape} (z, y, x), the ROI "
            f"{[list(plan.roi_start), list(plan.roi_stop)]} of {GROUP_URL}/{plan.path} (shape {list(plan.shape)}) "
            "does not fit it")
    return LabelPlan(name=name, url=url, shape=tuple(shape), dtype=str(dtype),  # type: ignore[arg-type]
                     chunks=tuple(chunks), dimension_separator=separator,  # type: ignore[arg-type]
                     scale_nm=tuple(float(v) for v in scale),  # type: ignore[arg-type]
                     translation_nm=tuple(float(v) for v in translation),  # type: ignore[arg-type]
                     documents={".zattrs": zattrs, "s0/.zarray": zarray_doc})


# ----------------------------------------------------------------------------- chunk existence
def chunk_urls(array_url: str, start: Sequence[int], stop: Sequence[int], chunks: Sequence[int],
               separator: str) -> list[str]:
    """Live URLs of the chunks a box [start, stop) touches, in C order of their grid index (at most
    MAX_CHUNK_CHECKS: more fails naming the count, before any request)."""
    ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, chunks, strict=True)]
    count = math.prod(len(r) for r in ranges)
    if count > MAX_CHUNK_CHECKS:
        raise SourceMismatchError(
            f"{array_url}: the ROI touches {count} chunks of {list(chunks)} voxels, more than the {MAX_CHUNK_CHECKS} "
            "this stage checks one by one (the whole of s0 is 14,760)")
    return [f"{array_url}/{separator.join(map(str, index))}" for index in itertools.product(*ranges)]


def missing_chunks(fetch: Downloader, urls: Sequence[str], workers: int, what: str) -> list[str]:
    """HEAD each chunk URL; return those that answer 404 (in order). A 403 or any other answer fails, naming it."""
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="chunk-head") as pool:
        statuses = list(pool.map(lambda url: fetch.head(url)[0], urls))
    missing = []
    for url, status in zip(urls, statuses, strict=True):
        if status == 403:
            raise DownloadError(f"{url}: HTTP 403 Forbidden for a chunk of {what}. {FORBIDDEN_MEANING}")
        if status == 404:
            missing.append(url)
        elif not 200 <= status < 300:
            raise DownloadError(f"{url}: HEAD answered HTTP {status} for a chunk of {what} (expected 200, or 404 "
                                "for a missing chunk)")
    return missing


# ----------------------------------------------------------------------------- documents and provenance
def _document(fetch: Downloader, registry: ChecksumRegistry, url: str) -> tuple[Any, FileRecord]:
    """GET a JSON document; return it and its file record (live URL, size, sha256), recorded in the registry."""
    body = fetch.fetch_bytes(url)
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise SourceMismatchError(f"{url} is not JSON: {body[:80]!r}") from exc
    digest = hashlib.sha256(body).hexdigest()
    before = registry.get(url)
    if before is not None and before.get("sha256") != digest:
        log.warning("openorganelle: %s changed since it was last recorded (sha256 %s -> %s)", url,
                    before.get("sha256"), digest)
    registry.record(url, len(body), digest)
    return doc, FileRecord(url, url[len(STORE_URL) + 1:], len(body), digest)


def provenance(plan: LevelPlan, zattrs: Any, zarray_doc: Any, files: list[FileRecord], origin: str,
               labels: Sequence[LabelPlan] = (), checked: Mapping[str, Any] | None = None) -> Provenance:
    """The output's ``emdata`` attributes: live URLs only (never the mirror), nothing time-dependent."""
    label_records = {
        lp.name: {"source_url": lp.url, "what": LABEL_LAYERS[lp.name][1], "dtype": lp.dtype,
                  "source_shape": list(lp.shape), "scale_nm": list(lp.scale_nm),
                  "translation_nm": list(lp.translation_nm), "info": lp.documents,
                  "alignment": f"same scale and translation as {GROUP_PATH}/{plan.path}; same ROI",
                  "path_note": "the layer's path is taken from public loaders, not from a listing of the bucket"}
        for lp in labels}
    return Provenance(
        dataset="openorganelle", about=ABOUT, origin=origin, voxel_size_nm=plan.scale_nm, files=files,
        discrepancies=plan.discrepancies, labels=label_records or None,
        details={
            "source_url": f"{GROUP_URL}/{plan.path}",
            "store": STORE_S3,
            "layer": LAYER,
            "translation_nm": list(plan.output_translation_nm),
            "level": plan.level,
            "array_path": f"{GROUP_PATH}/{plan.path}",
            "source_shape": list(plan.shape),
            "roi_voxels": [list(plan.roi_start), list(plan.roi_stop)],
            "roi_note": "half-open voxel box (z, y, x) of the source level; the translation includes its start",
            "dtype": "int16",
            "dimension_separator": plan.dimension_separator,
            "chunks_checked": dict(checked or {}),
            "info": {".zattrs": zattrs, f"{plan.path}/.zarray": zarray_doc},
            "labels_note": (f"label layers written: {[lp.name for lp in labels]}" if labels else
                            "no labels (openorganelle.labels is empty; the nucleus segmentation "
                            f"recon-2/labels/inference/segmentations/nuc, doi:{NUCLEI_DOI}, is at an unverified "
                            "path)"),
        })


class OpenOrganelleSource(SourceBase[OpenOrganelleParams]):
    name = "openorganelle"
    params_type = OpenOrganelleParams


    def run(self, params: OpenOrganelleParams, ctx: RunContext) -> dict[str, Any]:
        return fetch_openorganelle(params, ctx, output_path(self.name, ctx))


def fetch_openorganelle(params: OpenOrganelleParams, ctx: RunContext, out: Path) -> dict[str, Any]:
    """Check the metadata and the chunks, then stream one level (or an ROI of it) into ``out`` atomically."""
    began = time.monotonic()
    fetch = ctx.downloader(progress=False)
    zattrs, zattrs_file = _document(fetch, ctx.checksums, f"{GROUP_URL}/.zattrs")
    # The level is checked in the group's attributes before its .zarray is asked for.
    path, _, _ = check_group_attrs(zattrs, params.level)
    zarray_doc, zarray_file = _document(fetch, ctx.checksums, f"{GROUP_URL}/{path}/.zarray")
    plan = plan_level(params, zattrs, zarray_doc)
    files = [zattrs_file, zarray_file]
    label_plans = []
    for name in params.labels:
        group = f"{STORE_URL}/{LABEL_LAYERS[name][0]}"
        label_attrs, label_attrs_file = _document(fetch, ctx.checksums, f"{group}/.zattrs")
        label_zarray, label_zarray_file = _document(fetch, ctx.checksums, f"{group}/s0/.zarray")
        label_plans.append(plan_label(name, label_attrs, label_zarray, plan, zattrs))
        files += [label_attrs_file, label_zarray_file]
    log.info("openorganelle: s%d %s (z, y, x) at %s nm, ROI %s..%s, labels %s", plan.level, list(plan.shape),
             list(plan.scale_nm), list(plan.roi_start), list(plan.roi_stop), list(params.labels))

    # Every chunk of the ROI is asked for before any is read: tensorstore would read a missing one as fill.
    workers = min(params.concurrency, HEAD_WORKERS)
    what = f"openorganelle s{plan.level}"
    em_urls = chunk_urls(f"{GROUP_URL}/{plan.path}", plan.roi_start, plan.roi_stop, CHUNKS, plan.dimension_separator)
    checks_began = time.monotonic()
    missing = missing_chunks(fetch, em_urls, workers, what)
    log.info("openorganelle: %d chunks of %s checked (HEAD) in %.1f s, %d missing", len(em_urls), what,
             time.monotonic() - checks_began, len(missing))
    discrepancies = list(plan.discrepancies)
    if len(missing) > params.max_missing_chunks:
        raise SourceMismatchError(
            f"{len(missing)} of {len(em_urls)} chunks of {what} in the ROI are missing (HTTP 404), more than "
            f"openorganelle.max_missing_chunks = {params.max_missing_chunks}: the store is dense (every chunk "
            f"exists upstream), so a missing one means an incomplete or changed store, not empty space; first "
            f"missing: {missing[0]}")
    if missing:
        note = (f"{len(missing)} of {len(em_urls)} chunks of {what} in the ROI are missing upstream (404) and read "
                f"as 0 (allowed by max_missing_chunks = {params.max_missing_chunks}); first: {missing[0]}")
        log.warning("openorganelle: %s", note)
        discrepancies.append(note)
    checked: dict[str, Any] = {"em": {"checked": len(em_urls), "missing": len(missing)}}
    for lp in label_plans:
        urls = chunk_urls(lp.url, plan.roi_start, plan.roi_stop, lp.chunks, lp.dimension_separator)
        # Label stores leave all-background chunks out: a 404 there is background, only counted.
        checked[lp.name] = {"checked": len(urls),
                            "missing": len(missing_chunks(fetch, urls, workers, f"label layer {lp.name!r}"))}
    plan = dataclasses.replace(plan, discrepancies=tuple(discrepancies))

    context = ctx.tensorstore_context(concurrency=params.concurrency, cache_bytes=CACHE_BYTES)
    # tensorstore reads the array's .zarray itself, so either chunk key separator works.
    source = ctx.open_tensorstore({"driver": "zarr"}, f"{GROUP_URL}/{plan.path}", context, what)
    if tuple(source.shape) != plan.shape or source.dtype.numpy_dtype != np.int16:
        raise SourceMismatchError(
            f"{GROUP_URL}/{plan.path}: tensorstore opened {list(source.shape)} {source.dtype.name}, the .zarray "
            f"says {list(plan.shape)} int16")
    budget = params.max_inflight_mb * 2**20 / (1 + len(label_plans))
    labels = []
    for lp in label_plans:
        store = ctx.open_tensorstore({"driver": "zarr"}, lp.url, context, f"label layer {lp.name!r}")
        if tuple(store.shape) != lp.shape or str(store.dtype.numpy_dtype) != lp.dtype:
            raise SourceMismatchError(f"{lp.url}: tensorstore opened {list(store.shape)} {store.dtype.name}, the "
                                      f".zarray says {list(lp.shape)} {lp.dtype}")
        labels.append(ngff.Label(lp.name, remote_blocks(store, plan.roi_shape, plan.roi_start, dtype=lp.dtype,
                                                        max_inflight_bytes=budget, what=f"label layer {lp.name!r}"),
                                 method="mode"))

    geometry = ngff.Geometry(plan.scale_nm, plan.output_translation_nm)  # type: ignore[arg-type]
    blocks = remote_blocks(source, plan.roi_shape, plan.roi_start, dtype=np.int16, max_inflight_bytes=budget,
                           what=what)
    with atomic_dir(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        try:
            written = ngff.write_image(root, name=DATASET, source=blocks, geometry=geometry, chunks=params.chunks,
                                       shards=params.shards, method="mean", labels=labels, what=what)
        except DownloadError as exc:
            # A chunk that turned 403 after the checks above (tensorstore: PERMISSION_DENIED).
            if "403" in str(exc) or "PERMISSION_DENIED" in str(exc):
                raise DownloadError(f"{exc}\nA chunk answered HTTP 403 after the existence checks (its URL is "
                                    f"above). {FORBIDDEN_MEANING}") from exc
            raise
        root.attrs["emdata"] = provenance(plan, zattrs, zarray_doc, files, ctx.origin, label_plans,
                                          checked).to_dict()
    seconds = time.monotonic() - began
    return {
        "level": plan.level,
        "shape": list(plan.roi_shape),
        "roi_start_voxels": list(plan.roi_start),
        "voxel_size_nm": list(plan.scale_nm),
        "discrepancies": len(plan.discrepancies),
        "chunks_checked": len(em_urls),
        "chunks_missing": len(missing),
        "labels": [lp.name for lp in label_plans],
        "write": written,
        "MBps_end_to_end": round(math.prod(plan.roi_shape) * 2 / 1e6 / max(seconds, 1e-9), 1),
        "seconds": round(seconds, 2),
    }


SOURCE = OpenOrganelleSource()
