"""EMPIAR-11759 (zebrafish retina, SBF-SEM): 16 DM3 slices -> data/empiar_11759.zarr (OME-Zarr 0.5, z, y, x, nm).

The EMPIAR REST API entry gives the image count, the pixel size in Å and, only in its free ``details`` text,
the section thickness (z). The slices are listed from the Apache autoindex of the entry's ``data/`` folder
(load-balanced: a listing can miss files, so it is fetched again, a bounded number of times), downloaded in
parallel, read with ``ncempy`` and cross-checked against the API before they are converted and verified.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin

import numpy as np
import zarr
from ncempy.io import dm

from emdata import ngff
from emdata.acquire.context import RunContext
from emdata.acquire.download import Downloader
from emdata.acquire.params import check_chunks_and_shards, check_sha256_pins, dataclass_from_section
from emdata.errors import IntegrityError, InvalidParameterError, SourceMismatchError
from emdata.sources.base import About, Converted, FileSource

log = logging.getLogger(__name__)

ENTRY = "EMPIAR-11759"
API_URL = "https://www.ebi.ac.uk/empiar/api/entry/11759/"
DATA_URL = "https://ftp.ebi.ac.uk/empiar/world_availability/11759/data/"
XML_NAME = "F57-8_test1.xml.gz"
ABOUT = About(
    title=f"{ENTRY}: Developing retina in zebrafish 55 hpf larval eye (SBF-SEM)",
    page="https://www.ebi.ac.uk/empiar/EMPIAR-11759/",
    licence="CC0 1.0 (all EMPIAR entries are released under CC0)",
    citation="EMPIAR-11759, Electron Microscopy Public Image Archive (EMBL-EBI). Iudin et al., EMPIAR: the Electron "
             "Microscopy Public Image Archive, Nucleic Acids Research 51(D1), 2023.",
    doi=("10.6019/EMPIAR-11759",),
)
SLICE_PATTERN = re.compile(r"^F57-8_test1_3VBSED_slice_(\d{4})\.dm3$")
# The API says 5628 x 5632 pixels; every live slice decodes to 5496 x 5500 (checked twice, SOURCES.md).
KNOWN_SIZE_DISAGREEMENT = {"api_width_height": (5628, 5632), "files_width_height": (5496, 5500)}
# sha256(ndarray.tobytes()) of live decoded slices, published by a third party (reedmarkham/macroscope catalog,
# 2025-06-11; reference copy sources/empiar_11759_macroscope_slice_records.json). They describe the live bytes
# only, so they are checked only when fetching live (the replica is synthetic).
LIVE_DECODED_SHA256 = {
    "F57-8_test1_3VBSED_slice_0005.dm3": "9b37907f0dbe656bf7e0f0878b24bc8418c901bd05ad86a4618359bd6ca2e02a",
    "F57-8_test1_3VBSED_slice_0010.dm3": "946d3502931b347eea448df5a7c61447250287182177a23d6d0aa94128082e96",
    "F57-8_test1_3VBSED_slice_0011.dm3": "100666cdab63aae491f65ad9c077848bad95696cdc1917d4e5a3dacc4c3b820b",
    "F57-8_test1_3VBSED_slice_0013.dm3": "5a51501ee7a636f533d536e7dbf5962848d1283f6fcdf3b609b44df940f0bc31",
    "F57-8_test1_3VBSED_slice_0015.dm3": "a02f69ff4b0e595f8da2fde443125d0f8fae3fc28bdfd76091e4946e68a074ad",
}
UNIT_TO_NM = {"µm": 1000.0, "um": 1000.0, "nm": 1.0, "Å": 0.1, "A": 0.1}
PIXEL_TOLERANCE = 0.01  # API pixel_width (Å) vs DM3 calibration: relative
_Z_TEXT = re.compile(r"(\d+(?:\.\d+)?)\s*nm\s*(?:per|/)\s*section", re.IGNORECASE)


@dataclass(frozen=True)
class EmpiarParams:
    chunks: Sequence[int] = ngff.DEFAULT_CHUNKS
    shards: Sequence[int] = ngff.DEFAULT_SHARDS
    listing_attempts: int = 3  # fetches of the autoindex before a short listing fails the stage
    keep_downloads: bool = False
    sha256: Mapping[str, str] = field(default_factory=dict)  # file name -> pinned sha256 of the live file

    def __post_init__(self) -> None:
        check_chunks_and_shards("empiar", self.chunks, self.shards)
        if isinstance(self.listing_attempts, bool) or not isinstance(self.listing_attempts, int) or not (
                1 <= self.listing_attempts <= 20):
            raise InvalidParameterError(f"empiar.listing_attempts must be an integer 1..20, got {self.listing_attempts!r}")
        if not isinstance(self.keep_downloads, bool):
            raise InvalidParameterError(f"empiar.keep_downloads must be true or false, got {self.keep_downloads!r}")
        check_sha256_pins("empiar", self.sha256, lambda name: name == XML_NAME or bool(SLICE_PATTERN.match(name)),
                          f"{XML_NAME!r} or F57-8_test1_3VBSED_slice_NNNN.dm3")


# ---------------------------------------------------------------------------------------------- API document
@dataclass(frozen=True)
class ApiFacts:
    """What the stage uses from the API entry (``imagesets[0]``)."""

    title: str
    doi: str | None
    num_images: int
    image_width: int
    image_height: int
    pixel_width_nm: float
    pixel_height_nm: float
    voxel_type: str
    data_format: str
    z_nm: float
    details: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_api(document: Any) -> ApiFacts:
    """Key facts of the API response ``{"EMPIAR-11759": {...}}``; SourceMismatchError when a fact is missing."""
    try:
        entry = document[ENTRY]
        imageset = entry["imagesets"][0]
        facts = ApiFacts(
            title=str(entry["title"]), doi=entry.get("entry_doi"),
            num_images=int(imageset["num_images_or_tilt_series"]),
            image_width=int(imageset["image_width"]), image_height=int(imageset["image_height"]),
            pixel_width_nm=float(imageset["pixel_width"]) / 10.0,  # the API gives Å
            pixel_height_nm=float(imageset["pixel_height"]) / 10.0,
            voxel_type=str(imageset["voxel_type"]), data_format=str(imageset["data_format"]),
            z_nm=section_thickness_nm(str(imageset.get("details") or "")),
            details=str(imageset.get("details") or ""),
        )
        directory = imageset["directory"]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise SourceMismatchError(f"{API_URL}: the {ENTRY} entry lacks or garbles {exc}") from exc
    if str(directory).strip("/") != "data" or facts.data_format != "DM3" or facts.voxel_type != "UNSIGNED BYTE":
        raise SourceMismatchError(f"{API_URL}: expected imagesets[0] of DM3 UNSIGNED BYTE images in 'data', got "
                                  f"{facts.data_format!r} {facts.voxel_type!r} in {directory!r}")
    return facts


def section_thickness_nm(details: str) -> float:
    """The z spacing from the free text ("... and 50nm per section (z)"): no other field of the entry has it."""
    match = _Z_TEXT.search(details)
    if not match:
        raise SourceMismatchError(f"{API_URL}: imagesets[0].details does not state the section thickness "
                                  f"('<N> nm per section'); details text: {details!r}")
    return float(match.group(1))


# ---------------------------------------------------------------------------------------------- listing
def parse_autoindex(page: str, base_url: str = DATA_URL) -> tuple[list[str], list[str]]:
    """Files and sub-folders of an Apache autoindex page of ``base_url``.

    Links are resolved against ``base_url`` (relative, absolute-path or full hrefs alike); sort links
    (``?C=N;O=D``), the parent directory and anything outside the folder are skipped.
    """
    files: list[str] = []
    folders: list[str] = []
    for href in re.findall(r'<a\s+href="([^"]+)"', page, flags=re.IGNORECASE):
        target = unquote(urljoin(base_url, html.unescape(href)))
        if not target.startswith(unquote(base_url)):
            continue
        name = target[len(unquote(base_url)):]
        if not name or name.startswith("?") or "/" in name.rstrip("/"):
            continue
        (folders if name.endswith("/") else files).append(name.rstrip("/"))
    return sorted(set(files)), sorted(set(folders))


def fetch_listing(fetch: Callable[[str], bytes], expected_slices: int, attempts: int) -> tuple[list[str], list[str], int]:
    """The listing's (slices, other entries, attempts used); a short listing is fetched again up to ``attempts``."""
    seen: list[int] = []
    missing: list[int] = []
    for attempt in range(1, attempts + 1):
        files, folders = parse_autoindex(fetch(DATA_URL).decode("utf-8", errors="replace"))
        found = [f for f in files if SLICE_PATTERN.match(f)]
        others = [f for f in files if f not in found] + [f + "/" for f in folders]
        if len(found) > expected_slices:
            raise SourceMismatchError(f"{DATA_URL} lists {len(found)} DM3 slices, the API says "
                                      f"num_images_or_tilt_series = {expected_slices}")
        numbers = [int(SLICE_PATTERN.match(f).group(1)) for f in found]  # type: ignore[union-attr]
        if len(found) == expected_slices and numbers == list(range(expected_slices)):
            return found, others, attempt
        seen.append(len(found))
        missing = sorted(set(range(expected_slices)) - set(numbers))
        log.warning("%s listed %d of %d slices (attempt %d of %d); the load-balanced index can omit files",
                    DATA_URL, len(found), expected_slices, attempt, attempts)
    raise SourceMismatchError(f"{DATA_URL} listed {seen} DM3 slices in {attempts} attempts; the API says "
                              f"{expected_slices} (slices 0000..{expected_slices - 1:04d}); last missing: {missing}")


# ---------------------------------------------------------------------------------------------- DM3 slices
@dataclass(frozen=True)
class Slice:
    name: str
    data: np.ndarray  # (y, x) read-only memory map of the image data
    pixel_size_nm: tuple[float, float]  # (y, x)


def read_slice(path: Path) -> Slice:
    """One DM3 image (the thumbnail skipped) as a memory map, with its calibration converted to nm."""
    try:
        with dm.fileDM(path, on_memory=False) as f:  # metadata only: the pixels are memory-mapped below
            if f.numObjects not in (1, 2) or not f.dataShape:
                raise SourceMismatchError(f"{path.name}: expected one image (and its thumbnail), the file holds "
                                          f"{f.numObjects} datasets")
            item = 0 if f.numObjects == 1 else 1  # ncempy's dataset 0 skips the thumbnail (item 0) when there is one
            if f.dataShape[item] != 2 or f.zSize[item] != 1:
                raise SourceMismatchError(f"{path.name}: expected a 2-D image, got a {f.dataShape[item]}-D dataset")
            first = sum(int(n) for n in f.dataShape[:item])  # calibrations are listed per dataset, x first
            units = [str(u) for u in f.scaleUnit[first:first + 2][::-1]]
            sizes = [float(s) for s in f.scale[first:first + 2][::-1]]
            data = f.getMemmap(0)
    except (OSError, AssertionError, KeyError, IndexError) as exc:
        raise SourceMismatchError(f"{path.name}: not a readable DM3 image ({exc})") from exc
    if data.dtype != np.uint8 or data.ndim != 2:
        raise SourceMismatchError(f"{path.name}: expected a 2-D uint8 image, got {data.shape} {data.dtype}")
    if any(u not in UNIT_TO_NM for u in units) or any(s <= 0 for s in sizes):
        raise SourceMismatchError(f"{path.name}: calibration {sizes} {units} is not a length in {sorted(UNIT_TO_NM)}")
    # float32 in the file: 0.00799825 µm reads back as 0.007998250424861908, hence the rounding.
    nm = tuple(round(s * UNIT_TO_NM[u], 6) for s, u in zip(sizes, units, strict=True))
    return Slice(path.name, data, (nm[0], nm[1]))


class SliceStack:
    """The slices as one lazily read (z, y, x) array: indexing reads only the slices and rows asked for."""

    def __init__(self, slices: Sequence[Slice]) -> None:
        self.slices = list(slices)
        self.shape = (len(slices), *slices[0].data.shape)
        self.dtype = slices[0].data.dtype

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        z, y, x = key
        return np.stack([np.asarray(s.data[y, x]) for s in self.slices[z]])


def check_slices(slices: Sequence[Slice], api: ApiFacts) -> list[str]:
    """Slices agree with one another and with the API; returns the known disagreements (logged, recorded)."""
    first = slices[0]
    for s in slices[1:]:
        if s.data.shape != first.data.shape or s.pixel_size_nm != first.pixel_size_nm:
            raise SourceMismatchError(f"{s.name} is {s.data.shape} at {s.pixel_size_nm} nm, {first.name} is "
                                      f"{first.data.shape} at {first.pixel_size_nm} nm")
    if len(slices) != api.num_images:
        raise SourceMismatchError(f"{len(slices)} slices read, the API says {api.num_images}")
    for axis, api_nm, file_nm in (("x", api.pixel_width_nm, first.pixel_size_nm[1]),
                                  ("y", api.pixel_height_nm, first.pixel_size_nm[0])):
        if abs(api_nm - file_nm) > PIXEL_TOLERANCE * file_nm:
            raise SourceMismatchError(f"pixel size in {axis}: the API says {api_nm * 10} Å = {api_nm} nm, the DM3 "
                                      f"calibration {file_nm} nm (more than {PIXEL_TOLERANCE:.0%} apart)")
    known: list[str] = []
    height, width = first.data.shape
    if (api.image_width, api.image_height) != (width, height):
        api_wh, files_wh = (api.image_width, api.image_height), (width, height)
        if {"api_width_height": api_wh, "files_width_height": files_wh} != KNOWN_SIZE_DISAGREEMENT:
            raise SourceMismatchError(f"image size: the API says width x height {api_wh}, the DM3 slices are {files_wh}")
        log.warning("the API says %d x %d pixels, the slices are %d x %d: a known disagreement, the files win",
                    *api_wh, *files_wh)
        known.append(f"{API_URL}: image_width x image_height {api_wh[0]} x {api_wh[1]}, the DM3 slices are "
                     f"{files_wh[0]} x {files_wh[1]} (a known disagreement of the live entry; the files are used)")
    return known


def verify_decoded_sha256(slices: Sequence[Slice], pins: Mapping[str, str]) -> list[str]:
    """Check ``sha256(array.tobytes())`` of each pinned slice; IntegrityError names the slice and both digests."""
    checked = []
    for s in slices:
        if s.name in pins:
            got = hashlib.sha256(np.ascontiguousarray(s.data).tobytes()).hexdigest()
            if got != pins[s.name]:
                raise IntegrityError(f"{s.name}: decoded pixels have sha256 {got}, pinned {pins[s.name]}")
            checked.append(s.name)
    return checked


# ---------------------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class EmpiarPlan:
    api: ApiFacts
    slices: tuple[str, ...]  # file names of the slices, in z order
    others: tuple[str, ...]  # the listing's other entries
    listing_attempts: int


class EmpiarSource(FileSource[EmpiarParams, EmpiarPlan]):
    name = "empiar"
    about = ABOUT

    def parse_params(self, section: Mapping[str, Any] | None) -> EmpiarParams:
        return dataclass_from_section(EmpiarParams, section, "empiar")

    def plan(self, params: EmpiarParams, ctx: RunContext, fetch: Downloader) -> tuple[EmpiarPlan, dict[str, str]]:
        api = parse_api(fetch.fetch_json(API_URL))
        names, others, attempts = fetch_listing(fetch.fetch_bytes, api.num_images, params.listing_attempts)
        if XML_NAME not in others:
            log.warning("%s does not list %s; fetching the slices only", DATA_URL, XML_NAME)
        wanted = names + ([XML_NAME] if XML_NAME in others else [])
        return EmpiarPlan(api, tuple(names), tuple(others), attempts), {n: DATA_URL + n for n in wanted}

    def convert(self, params: EmpiarParams, plan: EmpiarPlan, files: Mapping[str, Path], root: zarr.Group,
                ctx: RunContext) -> Converted:
        slices = [read_slice(files[name]) for name in plan.slices]
        known = check_slices(slices, plan.api)
        # The third party's decoded hashes describe the live pixels: checked unless the bytes are the replica's.
        decoded_checked = [] if ctx.is_replica else verify_decoded_sha256(slices, LIVE_DECODED_SHA256)
        stack = SliceStack(slices)
        voxel = (plan.api.z_nm, *slices[0].pixel_size_nm)
        written = ngff.write_image(root, name="empiar_11759", source=stack, geometry=ngff.Geometry(voxel),
                                   chunks=params.chunks, shards=params.shards, method="mean", what="the DM3 slices")
        mean = float(np.mean([float(np.asarray(s.data).mean()) for s in slices]))
        return Converted(
            voxel_size_nm=voxel,
            figures={"listing_attempts": plan.listing_attempts, "decoded_sha256_checked": len(decoded_checked),
                     "shape": list(stack.shape), "levels": written["levels"], "mean_intensity": round(mean, 2)},
            voxel_size_note="z from the API entry's details text ('50nm per section'); y, x from the DM3 "
                            "calibration (µm), cross-checked against the API pixel_width/pixel_height (Å)",
            discrepancies=known,
            details={"source_url": DATA_URL, "api": {"url": API_URL, **plan.api.to_dict()},
                     "listing": {"url": DATA_URL, "slices": list(plan.slices), "other_entries": list(plan.others)},
                     "decoded_sha256_checked": decoded_checked})


SOURCE = EmpiarSource()
