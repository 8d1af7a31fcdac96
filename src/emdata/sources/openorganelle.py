"""Janelia OpenOrganelle jrc_mus-nacc-2 FIB-SEM (int16 zarr v2 pyramid on S3) -> data/jrc_mus-nacc-2.zarr.

The source is the OME-NGFF 0.4 group ``recon-2/em/fibsem-int16`` of
``s3://janelia-cosem-datasets/jrc_mus-nacc-2/jrc_mus-nacc-2.zarr`` (anonymous), read over its HTTPS form.
Steps:

1. GET the group's ``.zattrs`` and the chosen level's ``.zarray`` and check them against what we know (int16,
   3-D, chunks 64^3, zstd, fill 0, C order, axes z, y, x in nanometer, the level's scale and translation, the
   published shape); an ROI is checked against the level's shape. All of this before any chunk is read.
2. Stream one level (``level``), or an ROI of it, with tensorstore's ``zarr`` (v2) driver over an
   ``http`` kvstore, one output shard at a time (several in flight, bounded memory), each shard read back and
   compared voxel for voxel before the next one is written; progress is logged with MB/s and ETA.
3. Write an OME-Zarr 0.5 image (int16, z, y, x, nm): voxel size and translation from the source's transforms
   for that level plus the ROI offset, and our own mean pyramid. No labels: the nucleus segmentation
   (probably ``recon-2/labels/inference/segmentations/nuc``) is at an unverified path and is not fetched.

Nothing is downloaded to disk (chunks go straight from HTTP into the output), so there are no raw downloads to
delete; the metadata documents' sizes and sha256 are recorded in the provenance and in ``checksums.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emdata import ngff
from emdata.acquire.context import RunContext
from emdata.acquire.download import ChecksumRegistry, Downloader
from emdata.acquire.fsutil import atomic_dir
from emdata.acquire.params import check_chunks_and_shards, dataclass_from_section
from emdata.acquire.tsio import remote_blocks
from emdata.errors import InvalidParameterError, SourceMismatchError
from emdata.sources.base import About, FileRecord, Provenance, output_path

log = logging.getLogger(__name__)

DATASET = "jrc_mus-nacc-2"
STORE_URL = f"https://janelia-cosem-datasets.s3.amazonaws.com/{DATASET}/{DATASET}.zarr"
STORE_S3 = f"s3://janelia-cosem-datasets/{DATASET}/{DATASET}.zarr"
GROUP_PATH = "recon-2/em/fibsem-int16"
GROUP_URL = f"{STORE_URL}/{GROUP_PATH}"
LAYER = f"zarr://{STORE_S3}/{GROUP_PATH}"  # the layer link of the dataset's web page
ABOUT = About(
    title=f"Janelia OpenOrganelle {DATASET} (mouse nucleus accumbens) FIB-SEM, {GROUP_PATH}",
    page=f"https://openorganelle.janelia.org/datasets/{DATASET}",
    licence="CC BY 4.0 (Janelia COSEM open data)",
    citation=f"Janelia COSEM Project Team, OpenOrganelle {DATASET}: reconstructed FIB-SEM data, Janelia Research "
             "Campus (figshare), doi:10.25378/janelia.24222898.",
    doi=("10.25378/janelia.24222898",),
)
NUCLEI_DOI = "10.25378/janelia.26513209"  # the nucleus segmentation (not fetched: its path is unverified)

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
        check_chunks_and_shards("openorganelle", self.chunks, self.shards)
        if not _is_int(self.concurrency) or not 1 <= self.concurrency <= 1024:
            raise InvalidParameterError(
                f"openorganelle.concurrency must be an integer in [1, 1024], got {self.concurrency!r}")
        m = self.max_inflight_mb
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
            raise InvalidParameterError(f"openorganelle.max_inflight_mb must be a positive number, got {m!r}")


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


def check_group_attrs(doc: Any, level: int) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """Check the group's ``.zattrs`` (OME-NGFF 0.4) and return level ``level``'s path, scale and translation."""
    where = f"{GROUP_URL}/.zattrs"
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
    paths = [d.get("path") for d in datasets] if isinstance(datasets, list) and all(
        isinstance(d, Mapping) for d in datasets) else None
    expected_paths = [f"s{i}" for i in range(N_LEVELS)]
    if paths != expected_paths:
        raise SourceMismatchError(f"{where}: expected datasets {expected_paths}, got {paths!r}")
    assert isinstance(datasets, list)
    scale, translation = _transforms(datasets[level].get("coordinateTransformations"), f"{where} s{level}")
    known_scale, known_translation = level_transform(level)
    if not _close(scale, known_scale):
        raise SourceMismatchError(f"{where}: s{level} scale is {scale!r}, expected {list(known_scale)} nm (z, y, x)")
    if not _close(translation if translation is not None else [0.0] * 3, known_translation):
        raise SourceMismatchError(
            f"{where}: s{level} translation is {translation!r}, expected {list(known_translation)} nm (z, y, x)")
    # The document's own values (they carry float noise such as 11.840000000000002) go into the output.
    return f"s{level}", tuple(float(v) for v in scale), tuple(float(v) for v in (translation or [0.0] * 3))


def check_zarray(doc: Any, level: int, *, strict: bool) -> tuple[tuple[int, int, int], str, list[str]]:
    """Check a level's ``.zarray``; return its shape, chunk key separator and notes of accepted differences.

    The published shape is enforced (``strict``) against the live store and a cache of it; the offline replica
    serves smaller stand-in shapes, which are logged and recorded instead.
    """
    where = f"{GROUP_URL}/s{level}/.zarray"
    if not isinstance(doc, Mapping) or doc.get("zarr_format") != 2:
        raise SourceMismatchError(f"{where}: expected a zarr v2 array (zarr_format 2), got {str(doc)[:200]!r}")
    try:
        dtype = np.dtype(doc.get("dtype"))
    except TypeError as exc:
        raise SourceMismatchError(f"{where}: dtype {doc.get('dtype')!r} is not a numpy dtype") from exc
    if dtype.kind != "i" or dtype.itemsize != 2:
        raise SourceMismatchError(f"{where}: expected dtype int16 ('<i2'), got {doc.get('dtype')!r}")
    shape = doc.get("shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(s) and s > 0 for s in shape):
        raise SourceMismatchError(f"{where}: expected a 3-D shape (z, y, x), got {shape!r}")
    for key, expected in (("chunks", list(CHUNKS)), ("fill_value", 0), ("order", "C")):
        if doc.get(key) != expected:
            raise SourceMismatchError(f"{where}: expected {key} {expected!r}, got {doc.get(key)!r}")
    compressor = doc.get("compressor")
    if not isinstance(compressor, Mapping) or compressor.get("id") != COMPRESSOR["id"]:
        raise SourceMismatchError(f"{where}: expected compressor {COMPRESSOR}, got {compressor!r}")
    if doc.get("filters"):
        raise SourceMismatchError(f"{where}: expected no filters, got {doc.get('filters')!r}")
    separator = doc.get("dimension_separator", ".")  # zarr v2: absent means "."
    if separator not in (".", "/"):
        raise SourceMismatchError(f"{where}: dimension_separator must be '.' or '/', got {separator!r}")
    notes = []
    if compressor.get("level") != COMPRESSOR["level"]:
        notes.append(f"s{level} compressor {dict(compressor)} differs from the known {COMPRESSOR} (decodes the same)")
    published = list(PUBLISHED_SHAPES[level])
    if shape != published:
        if strict:
            raise SourceMismatchError(f"{where}: shape {shape} (z, y, x) differs from the published {published}")
        notes.append(f"s{level} shape {shape} is the replica's stand-in for the published {published}")
    return tuple(shape), separator, notes  # type: ignore[return-value]


def plan_level(params: OpenOrganelleParams, zattrs: Any, zarray_doc: Any, *, strict: bool) -> LevelPlan:
    """Check the documents and the ROI; InvalidParameterError names an ROI that does not fit the level."""
    path, scale, translation = check_group_attrs(zattrs, params.level)
    shape, separator, notes = check_zarray(zarray_doc, params.level, strict=strict)
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


def provenance(plan: LevelPlan, zattrs: Any, zarray_doc: Any, files: list[FileRecord], origin: str) -> Provenance:
    """The output's ``emdata`` attributes: live URLs only (never the mirror), nothing time-dependent."""
    return Provenance(
        dataset="openorganelle", about=ABOUT, origin=origin, voxel_size_nm=plan.scale_nm, files=files,
        discrepancies=plan.discrepancies, labels=None,
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
            "info": {".zattrs": zattrs, f"{plan.path}/.zarray": zarray_doc},
            "labels_note": "no labels: the nucleus segmentation (probably "
                           f"recon-2/labels/inference/segmentations/nuc, doi:{NUCLEI_DOI}) is at an unverified "
                           "path and is not fetched",
        })


class OpenOrganelleSource:
    name = "openorganelle"

    def parse_params(self, section: Mapping[str, Any] | None) -> OpenOrganelleParams:
        return dataclass_from_section(OpenOrganelleParams, section, "openorganelle")

    def run(self, params: OpenOrganelleParams, ctx: RunContext) -> dict[str, Any]:
        return fetch_openorganelle(params, ctx, output_path(self.name, ctx))


def fetch_openorganelle(params: OpenOrganelleParams, ctx: RunContext, out: Path) -> dict[str, Any]:
    """Check the metadata, then stream one level (or an ROI of it) into ``out`` atomically, verified."""
    began = time.monotonic()
    fetch = ctx.downloader(progress=False)
    zattrs, zattrs_file = _document(fetch, ctx.checksums, f"{GROUP_URL}/.zattrs")
    # The level is checked in the group's attributes before its .zarray is asked for.
    path, _, _ = check_group_attrs(zattrs, params.level)
    zarray_doc, zarray_file = _document(fetch, ctx.checksums, f"{GROUP_URL}/{path}/.zarray")
    plan = plan_level(params, zattrs, zarray_doc, strict=not ctx.is_replica)
    log.info("openorganelle: s%d %s (z, y, x) at %s nm, ROI %s..%s", plan.level, list(plan.shape),
             list(plan.scale_nm), list(plan.roi_start), list(plan.roi_stop))

    context = ctx.tensorstore_context(concurrency=params.concurrency, cache_bytes=CACHE_BYTES)
    what = f"openorganelle s{plan.level}"
    # tensorstore reads the array's .zarray itself, so either chunk key separator works.
    source = ctx.open_tensorstore({"driver": "zarr"}, f"{GROUP_URL}/{plan.path}", context, what)
    if tuple(source.shape) != plan.shape or source.dtype.numpy_dtype != np.int16:
        raise SourceMismatchError(
            f"{GROUP_URL}/{plan.path}: tensorstore opened {list(source.shape)} {source.dtype.name}, the .zarray "
            f"says {list(plan.shape)} int16")

    geometry = ngff.Geometry(plan.scale_nm, plan.output_translation_nm)  # type: ignore[arg-type]
    blocks = remote_blocks(source, plan.roi_shape, plan.roi_start, dtype=np.int16,
                           max_inflight_bytes=params.max_inflight_mb * 2**20, what=what)
    with atomic_dir(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        written = ngff.write_image(root, name=DATASET, source=blocks, geometry=geometry, chunks=params.chunks,
                                   shards=params.shards, method="mean", what=what)
        root.attrs["emdata"] = provenance(plan, zattrs, zarray_doc, [zattrs_file, zarray_file], ctx.origin).to_dict()
    seconds = time.monotonic() - began
    return {
        "level": plan.level,
        "shape": list(plan.roi_shape),
        "roi_start_voxels": list(plan.roi_start),
        "voxel_size_nm": list(plan.scale_nm),
        "discrepancies": len(plan.discrepancies),
        "write": written,
        "MBps_end_to_end": round(math.prod(plan.roi_shape) * 2 / 1e6 / max(seconds, 1e-9), 1),
        "seconds": round(seconds, 2),
    }


SOURCE = OpenOrganelleSource()
