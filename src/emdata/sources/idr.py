"""IDR image 9846137 (idr0086 experimentD, U2OS FIB-SEM): the ImageJ TIFF -> data/idr_9846137.zarr (OME-Zarr 0.5).

The data is the original TIFF on the EBI FTP host (over HTTPS); IDR's OMERO web app gives two metadata
documents, the JSON API image and the webclient ``imgData``. Shape, dtype and voxel size are read from the TIFF
(ImageJ description and resolution tags, in µm) and cross-checked against both documents before and after the
download. The OMERO web app has outages while the TIFF's host stays up: a document that cannot be had (5xx or
no connection after the retries, or a body that is not JSON) is skipped with a warning, and the stage goes on
with the TIFF's own metadata, recording the skipped cross-check in the provenance and the metrics
(``require_omero: true`` makes it fail instead). A 4xx is not an outage (the image moved or is gone): it fails.
The output is one OME-Zarr 0.5 image (z, y, x, nm) without labels; provenance (URLs, sha256, the documents' key
facts, any known discrepancy) is in the root's ``emdata`` attributes.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from emdata import ngff
from emdata.acquire.context import RunContext
from emdata.acquire.download import Downloader
from emdata.acquire.params import check_chunks_and_shards, check_sha256_pins
from emdata.catalog import find
from emdata.errors import DownloadError, InvalidParameterError, SourceMismatchError
from emdata.formats import read_volume
from emdata.formats.volume import PagedArray
from emdata.sources.base import Converted, FileSource

log = logging.getLogger(__name__)

IMAGE_ID = 9846137
STUDY = "idr0086-miron-micrographs"
EXPERIMENT = "experimentD"
DATASET = "U2OS_chromatin"
FILE_NAME = "Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif"
TIFF_URL = ("https://ftp.ebi.ac.uk/pub/databases/IDR/idr0086-miron-micrographs/20200610-ftp/experimentD/"
            f"Miron_FIB-SEM/Miron_FIB-SEM_processed/{FILE_NAME}")
API_URL = f"https://idr.openmicroscopy.org/api/v0/m/images/{IMAGE_ID}/"
IMGDATA_URL = f"https://idr.openmicroscopy.org/webclient/imgData/{IMAGE_ID}/"
ABOUT = find("idr").about  # title, page, licence, citation, DOI (emdata.catalog)

# Length units -> nanometres. ImageJ writes µm as the escape "\u00B5m" (six characters) in its description;
# OMERO names units by enum ("MICROMETER") and symbol ("µm").
NM_PER_UNIT = {
    "nm": 1.0, "nanometer": 1.0, "nanometre": 1.0, "NANOMETER": 1.0,
    "µm": 1e3, "μm": 1e3, "\\u00B5m": 1e3, "\\u00b5m": 1e3, "um": 1e3, "micron": 1e3, "microns": 1e3,
    "micrometer": 1e3, "micrometre": 1e3, "MICROMETER": 1e3,
    "mm": 1e6, "MILLIMETER": 1e6,
}
# Voxel sizes agree when they differ by less than this fraction (µm -> nm conversions leave float noise).
RELATIVE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class IdrParams:
    chunks: Sequence[int] = ngff.DEFAULT_CHUNKS
    shards: Sequence[int] = ngff.UINT8_SHARDS
    keep_downloads: bool = False
    sha256: Mapping[str, str] = field(default_factory=dict)  # file name -> pinned sha256 of the live file
    require_omero: bool = False  # fail when an OMERO document is unavailable, instead of skipping its cross-check

    def __post_init__(self) -> None:
        for name in ("keep_downloads", "require_omero"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(f"idr.{name} must be true or false, got {getattr(self, name)!r}")
        check_chunks_and_shards("idr", self.chunks, self.shards)
        check_sha256_pins("idr", self.sha256, FILE_NAME.__eq__, str([FILE_NAME]))


@dataclass(frozen=True)
class ImageFacts:
    """What one description of the image states; ``None`` where it states nothing. Axes z, y, x; sizes in nm."""

    where: str
    shape: tuple[int | None, int | None, int | None]
    dtype: str | None
    voxel_size_nm: tuple[float | None, float | None, float | None]
    channels: int | None = None
    timepoints: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "voxel_size_nm": list(self.voxel_size_nm),
                "channels": self.channels, "timepoints": self.timepoints}


@dataclass(frozen=True)
class IdrPlan:
    """What IDR's OMERO documents say, checked against each other before the TIFF is fetched.

    A document that was unavailable (an OMERO outage) is None here and named in ``unavailable`` with the reason.
    """

    api: ImageFacts | None
    imgdata: ImageFacts | None
    documents: tuple[dict[str, Any], ...]
    discrepancies: tuple[str, ...]
    unavailable: Mapping[str, str] = field(default_factory=dict)  # URL -> why it could not be had

    @property
    def checked(self) -> tuple[ImageFacts, ...]:
        return tuple(f for f in (self.api, self.imgdata) if f is not None)


# "HTTP 503" in a DownloadError's message (the engine names the last status); no status = no connection.
_STATUS = re.compile(r"\bHTTP (\d{3})\b")
OUTAGE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def fetch_document(fetch: Downloader, url: str, require: bool) -> tuple[Any, str | None]:
    """A JSON document of the OMERO web app, or (None, reason) when the app is down and ``require`` is False.

    Down means: 5xx/408/429 or no connection after the configured retries, or a body that is not JSON (a
    maintenance page). A 4xx is not an outage (the image is gone or moved): it raises, as does anything when
    ``require`` is True.
    """
    try:
        # fetch_json fetches a body that does not parse again, within the retries (a transient fault), before
        # it is taken for a maintenance page.
        return fetch.fetch_json(url), None
    except DownloadError as exc:
        m = _STATUS.search(str(exc))
        if require or (m is not None and int(m.group(1)) not in OUTAGE_STATUSES):
            raise
        return None, str(exc)
    except SourceMismatchError as exc:
        if require:
            raise
        return None, f"the answer is not JSON (a maintenance page?): {exc}"


class IdrSource(FileSource[IdrParams, IdrPlan]):
    name = "idr"
    params_type = IdrParams


    def plan(self, params: IdrParams, ctx: RunContext, fetch: Downloader) -> tuple[IdrPlan, dict[str, str]]:
        # The documents first: a source that changed is caught before 152 MB are fetched.
        notes: list[str] = []
        unavailable: dict[str, str] = {}
        facts: dict[str, ImageFacts] = {}
        infos: list[dict[str, Any]] = []
        for url, parse in ((API_URL, parse_api_image), (IMGDATA_URL, parse_imgdata)):
            doc, why = fetch_document(fetch, url, params.require_omero)
            if why is None:
                facts[url], info = parse(doc, notes)
                infos.append(info)
            else:
                unavailable[url] = why
        api, imgdata = facts.get(API_URL), facts.get(IMGDATA_URL)
        check_identity(*infos)
        if api is not None and imgdata is not None:
            cross_check(api, imgdata)
        for url, why in unavailable.items():
            log.warning("idr: %s is unavailable (IDR's OMERO web app is down?): %s; going on with the TIFF's own "
                        "metadata, without that cross-check", url, why)
        return IdrPlan(api, imgdata, tuple(infos), tuple(notes), unavailable), {FILE_NAME: TIFF_URL}

    def convert(self, params: IdrParams, plan: IdrPlan, files: Mapping[str, Path], root: zarr.Group,
                ctx: RunContext) -> Converted:
        image, tiff = read_imagej_tiff(files[FILE_NAME])
        for doc in plan.checked:
            cross_check(tiff, doc)
        voxel_size = tuple(v for v in tiff.voxel_size_nm if v is not None)
        if len(voxel_size) != 3:  # the TIFF always states all three (read_imagej_tiff raises otherwise)
            raise SourceMismatchError(f"{FILE_NAME}: voxel size {tiff.voxel_size_nm} is incomplete")
        written = ngff.write_image(root, name=f"idr_{IMAGE_ID}", source=PagedArray(image),
                                   geometry=ngff.Geometry(voxel_size),  # type: ignore[arg-type]
                                   chunks=params.chunks, shards=params.shards, method="mean", what=FILE_NAME)
        figures = {"shape": list(image.shape), "levels": written["levels"],
                   "mean_intensity": round(float(written["mean"]), 2),  # exact: sum of voxels / count
                   "omero_documents_checked": len(plan.checked),
                   "omero_documents_unavailable": len(plan.unavailable)}
        checked = [f.where for f in plan.checked]
        agreeing = ("agreeing with IDR's " + " and ".join(checked)) if checked else "not cross-checked"
        skipped = (f"; not cross-checked against {', '.join(plan.unavailable)} (unavailable: OMERO outage)"
                   if plan.unavailable else "")
        cross = {"status": "skipped" if not checked else "partial" if plan.unavailable else "done",
                 "checked": [d["url"] for d in plan.documents],
                 "unavailable": dict(plan.unavailable)}
        return Converted(
            voxel_size_nm=voxel_size, figures=figures, discrepancies=plan.discrepancies,
            voxel_size_note=f"from the TIFF (ImageJ spacing and X/YResolution, µm -> nm), {agreeing}{skipped}",
            details={"study": STUDY, "experiment": EXPERIMENT, "idr_dataset": DATASET, "image_id": IMAGE_ID,
                     "image_name": FILE_NAME, "metadata_documents": list(plan.documents),
                     "omero_cross_check": cross, "tiff": tiff.to_dict()})


# ----------------------------------------------------------------------------- metadata documents
def _number(value: Any, where: str, *, integer: bool = False) -> Any:
    """A number from a document, or None when absent; anything else is a mismatch naming the value."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
        raise SourceMismatchError(f"{where}: expected a {'whole ' if integer else ''}number, got {value!r}")
    return int(value) if integer else float(value)


def to_nm(value: Any, unit: Any, where: str) -> float | None:
    """``value`` in ``unit`` as nanometres (explicit conversion); None when the document states no value."""
    number = _number(value, where)
    if number is None:
        return None
    if unit not in NM_PER_UNIT:
        raise SourceMismatchError(f"{where}: unknown length unit {unit!r} (known: {sorted(set(NM_PER_UNIT))})")
    return round(number * NM_PER_UNIT[unit], 6)  # drops float noise such as 1 / 50 * 1e3 = 20.000000000000004


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SourceMismatchError(f"{where}: expected a JSON object, got {type(value).__name__} {value!r:.80}")
    return value


def parse_api_image(doc: Any, notes: list[str]) -> tuple[ImageFacts, dict[str, Any]]:
    """Facts of ``GET /api/v0/m/images/<id>/``: ``{"data": {"@id", "Name", "Pixels": {...}}}``.

    The OMERO docs sample of a single image shows ``"data": [ {...} ]``; real servers answer ``"data": {...}``.
    The list form is accepted (a known discrepancy, logged and recorded) when it holds exactly one image.
    """
    where = API_URL
    data = _mapping(doc, where).get("data")
    if isinstance(data, list):
        if len(data) != 1:
            raise SourceMismatchError(f"{where}: 'data' is a list of {len(data)} images, expected one image object")
        _note(notes, f"{where}: 'data' is a one-element list (as in the OMERO docs sample), not an object")
        data = data[0]
    image = _mapping(data, f"{where} data")
    if not image:
        raise SourceMismatchError(f"{where}: no image object under 'data' (keys: {sorted(_mapping(doc, where))})")
    pixels = _mapping(image.get("Pixels"), f"{where} data.Pixels")
    sizes = {a: _number(pixels.get(f"Size{a}"), f"{where} Pixels.Size{a}", integer=True) for a in "ZYXCT"}
    voxel = []
    for axis in "ZYX":
        length = _mapping(pixels.get(f"PhysicalSize{axis}"), f"{where} Pixels.PhysicalSize{axis}")
        nm = to_nm(length.get("Value"), length.get("Unit", length.get("Symbol")),
                   f"{where} Pixels.PhysicalSize{axis}") if length else None
        if nm is None:
            _note(notes, f"{where}: Pixels.PhysicalSize{axis} not stated; the TIFF's value is used")
        voxel.append(nm)
    dtype = _mapping(pixels.get("Type"), f"{where} Pixels.Type").get("value")
    facts = ImageFacts("the JSON API image", (sizes["Z"], sizes["Y"], sizes["X"]), dtype,
                       tuple(voxel), sizes["C"], sizes["T"])  # type: ignore[arg-type]
    info = {"url": API_URL, "image_id": image.get("@id"), "image_name": image.get("Name"), **facts.to_dict()}
    return facts, info


def parse_imgdata(doc: Any, notes: list[str]) -> tuple[ImageFacts, dict[str, Any]]:
    """Facts of ``GET /webclient/imgData/<id>/``: ``{"id", "meta": {...}, "size": {...}, "pixel_size": {...}}``.

    ``pixel_size`` is in µm (OMERO's default length unit; ``imageMarshal`` reports ``getPhysicalSize*`` values
    in microns) and may be null per axis when the file states no size.
    """
    where = IMGDATA_URL
    doc = _mapping(doc, where)
    meta = _mapping(doc.get("meta"), f"{where} meta")
    size = _mapping(doc.get("size"), f"{where} size")
    pixel_size = _mapping(doc.get("pixel_size"), f"{where} pixel_size")
    shape = tuple(_number(size.get(k), f"{where} size.{k}", integer=True) for k in ("z", "height", "width"))
    voxel = []
    for axis in "zyx":
        nm = to_nm(pixel_size.get(axis), "MICROMETER", f"{where} pixel_size.{axis}")
        if nm is None:
            _note(notes, f"{where}: pixel_size.{axis} not stated; the TIFF's value is used")
        voxel.append(nm)
    facts = ImageFacts("the webclient imgData", shape, meta.get("pixelsType"), tuple(voxel),  # type: ignore[arg-type]
                       _number(size.get("c"), f"{where} size.c", integer=True),
                       _number(size.get("t"), f"{where} size.t", integer=True))
    info = {"url": IMGDATA_URL, "image_id": doc.get("id"), "image_name": meta.get("imageName"),
            "project_name": meta.get("projectName"), "dataset_name": meta.get("datasetName"),
            "dataset_id": meta.get("datasetId"), **facts.to_dict()}
    return facts, info


def check_identity(*infos: Mapping[str, Any]) -> None:
    """Each document must describe image 9846137, the file we download, in the study's dataset."""
    for info in infos:
        if info["image_id"] != IMAGE_ID:
            raise SourceMismatchError(f"{info['url']}: describes image {info['image_id']!r}, expected {IMAGE_ID}")
        if info["image_name"] not in (None, FILE_NAME):
            raise SourceMismatchError(f"{info['url']}: image name {info['image_name']!r}, expected {FILE_NAME!r}")
        dataset = info.get("dataset_name")
        if dataset not in (None, DATASET):
            raise SourceMismatchError(f"{info['url']}: dataset {dataset!r}, expected {DATASET!r}")
        project = info.get("project_name")
        if project is not None and not str(project).startswith(STUDY):
            raise SourceMismatchError(f"{info['url']}: project {project!r}, expected one of study {STUDY!r}")


def cross_check(reference: ImageFacts, other: ImageFacts) -> None:
    """Every value both state must agree (voxel sizes within RELATIVE_TOLERANCE); a disagreement raises."""
    pairs = [("shape (z, y, x)", reference.shape, other.shape), ("dtype", reference.dtype, other.dtype),
             ("channels", reference.channels, other.channels), ("timepoints", reference.timepoints, other.timepoints)]
    for what, a, b in pairs:
        if isinstance(a, tuple):
            agree = all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
        else:
            agree = a is None or b is None or a == b
        if not agree:
            raise SourceMismatchError(f"{what}: {reference.where} says {_show(a)}, {other.where} says {_show(b)}")
    for axis, ra, ob in zip("zyx", reference.voxel_size_nm, other.voxel_size_nm, strict=True):
        if ra is not None and ob is not None and not math.isclose(ra, ob, rel_tol=RELATIVE_TOLERANCE):
            raise SourceMismatchError(
                f"voxel size ({axis}): {reference.where} says {ra:g} nm, {other.where} says {ob:g} nm "
                f"(z, y, x: {_show(reference.voxel_size_nm)} vs {_show(other.voxel_size_nm)} nm)")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join("?" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
                               for v in value) + ")"
    return repr(value)


def _note(notes: list[str], text: str) -> None:
    log.warning("known discrepancy: %s", text)
    notes.append(text)


# ----------------------------------------------------------------------------- the TIFF
def read_imagej_tiff(path: Path) -> tuple[np.ndarray, ImageFacts]:
    """The stack as (z, y, x) (memory-mapped when uncompressed and contiguous) and the facts its tags state.

    x and y sizes come from X/YResolution (pixels per unit), z from the ImageJ ``spacing``; the unit is the
    ImageJ ``unit`` (µm here), converted to nm explicitly.
    """
    with tifffile.TiffFile(path) as tif:
        if not tif.is_imagej or tif.imagej_metadata is None:
            raise SourceMismatchError(f"{path.name}: expected an ImageJ TIFF, found no ImageJ description")
        meta = tif.imagej_metadata
        page = tif.pages.first
        pages = len(tif.pages)
        tags = page.tags
        resolution = [tags[k].value if k in tags else None for k in ("YResolution", "XResolution")]
    unit = meta.get("unit")
    spacing = meta.get("spacing")
    if spacing is None or any(r is None for r in resolution) or unit is None:
        raise SourceMismatchError(f"{path.name}: ImageJ spacing {spacing!r}, unit {unit!r} or resolution "
                                  f"{resolution!r} missing; cannot tell the voxel size")
    per_unit = [num / den for num, den in resolution]  # type: ignore[misc]
    voxel = (to_nm(spacing, unit, f"{path.name} ImageJ spacing"),
             *(to_nm(1.0 / p, unit, f"{path.name} resolution") for p in per_unit))
    image: np.ndarray
    try:
        image = tifffile.memmap(path, mode="r")
    except ValueError:  # compressed or not contiguous: decoded page by page, within the reader's bound (logged)
        image = read_volume(path).data
    if image.ndim != 3 or pages != image.shape[0] or meta.get("images", pages) != pages:
        raise SourceMismatchError(f"{path.name}: expected a z-stack of {pages} pages (ImageJ images="
                                  f"{meta.get('images')!r}), read shape {image.shape}")
    facts = ImageFacts("the TIFF", image.shape, str(image.dtype), voxel, 1, 1)  # type: ignore[arg-type]
    return image, facts


SOURCE = IdrSource()
