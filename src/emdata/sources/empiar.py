"""EMPIAR image sets (default EMPIAR-11759, zebrafish retina SBF-SEM) -> data/empiar_11759.zarr (OME-Zarr 0.5)."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin

import numpy as np
import zarr

from emdata import ngff
from emdata.acquire.context import RunContext
from emdata.acquire.download import Download, Downloader
from emdata.acquire.params import MAX_SHARD_AXIS, check_chunks_and_shards, check_sha256_pins
from emdata.catalog import find
from emdata.errors import DownloadError, IntegrityError, InvalidParameterError, SourceMismatchError
from emdata.formats import VolumeFormatError, read_volume
from emdata.formats.volume import release_pages
from emdata.sources.base import About, Converted, FileSource, run_file_source

log = logging.getLogger(__name__)

DEFAULT_ENTRY = 11759
API_URL_TEMPLATE = "https://www.ebi.ac.uk/empiar/api/entry/{entry}/"
FILES_URL_TEMPLATE = "https://ftp.ebi.ac.uk/empiar/world_availability/{entry}/"
ENTRY = f"EMPIAR-{DEFAULT_ENTRY}"
API_URL = API_URL_TEMPLATE.format(entry=DEFAULT_ENTRY)
DATA_URL = FILES_URL_TEMPLATE.format(entry=DEFAULT_ENTRY) + "data/"
XML_NAME = "F57-8_test1.xml.gz"
ABOUT = find("empiar").about  # title, page, licence, citation, DOI (emdata.catalog)
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


@dataclass(frozen=True)
class KnownEntry:
    """What we know about one entry beyond its API document (evidence in shared/reference/SOURCES.md)."""

    about: About
    size_disagreement: Mapping[str, tuple[int, int]] | None = None  # API vs files width x height, known
    live_decoded_sha256: Mapping[str, str] = field(default_factory=dict)
    side_files: tuple[str, ...] = ()  # optional files of the image-set folder (fetched, recorded, never required)
    # The image files' naming (prefix, suffix, zero-padded width; numbered from 0), seen in every report: the
    # fallback when the autoindex lists none of them at all (each name is still confirmed by a HEAD).
    file_pattern: tuple[str, str, int] | None = None


KNOWN_ENTRIES: dict[int, KnownEntry] = {
    DEFAULT_ENTRY: KnownEntry(ABOUT, KNOWN_SIZE_DISAGREEMENT, LIVE_DECODED_SHA256, (XML_NAME,),
                              ("F57-8_test1_3VBSED_slice_", ".dm3", 4)),
}
PIXEL_TOLERANCE = 0.01  # API pixel_width (Å) vs file calibration: relative
Z_TOLERANCE = 0.01  # file z calibration vs the details text: relative
# EMPIAR data_format -> what emdata.formats.detect_format says of such a file, and the names such files have.
FORMATS = {"DM3": "dm3", "DM4": "dm4", "TIFF": "tiff", "TIF": "tiff", "MRC": "mrc", "MRCS": "mrc", "CCP4": "mrc"}
EXTENSIONS = {"dm3": (".dm3",), "dm4": (".dm4",), "tiff": (".tif", ".tiff"),
              "mrc": (".mrc", ".mrcs", ".map", ".st", ".ali", ".rec")}
ALL_EXTENSIONS = tuple(e for exts in EXTENSIONS.values() for e in exts)
SIDE_FILE_SUFFIXES = (".xml", ".xml.gz")  # metadata beside the images: optional
# Bounds on what an entry may claim before anything is sized from it: EMPIAR's largest image sets hold some
# tens of thousands of images of at most tens of thousands of pixels a side.
MAX_IMAGES = 100_000
MAX_IMAGE_SIDE = 1 << 17
MAX_SIDE_FILE_DECODED = 1 << 30  # an .xml.gz decoding past this is refused (a gzip bomb), not read on
_Z_TEXT = re.compile(r"(\d+(?:\.\d+)?)\s*(nm|Å|A|µm|um)\s*(?:per|/)\s*(?:section|slice)", re.IGNORECASE)
_UNIT_NM = {"nm": 1.0, "å": 0.1, "a": 0.1, "µm": 1000.0, "um": 1000.0}


@dataclass(frozen=True)
class EmpiarParams:
    entry: int = DEFAULT_ENTRY  # EMPIAR entry number (the stage's output is named after it, see emdata.catalog)
    imageset: int | str = 0  # index into the entry's imagesets, or its directory or name
    chunks: Sequence[int] = ngff.DEFAULT_CHUNKS
    shards: Sequence[int] = ngff.DEFAULT_SHARDS
    listing_attempts: int = 3  # fetches of the autoindex before falling back to the count and naming pattern
    keep_downloads: bool = False
    sha256: Mapping[str, str] = field(default_factory=dict)  # file name -> pinned sha256 of the live file

    def __post_init__(self) -> None:
        if isinstance(self.entry, bool) or not isinstance(self.entry, int) or not 1 <= self.entry <= 10**6:
            raise InvalidParameterError(f"empiar.entry must be an EMPIAR entry number (e.g. 11759), got {self.entry!r}")
        if isinstance(self.imageset, bool) or not isinstance(self.imageset, (int, str)) or (
                isinstance(self.imageset, int) and not 0 <= self.imageset < 1000) or self.imageset == "":
            raise InvalidParameterError(f"empiar.imageset must be an index 0..999 or an image set's directory or "
                                        f"name, got {self.imageset!r}")
        check_chunks_and_shards("empiar", self.chunks, self.shards)
        if isinstance(self.listing_attempts, bool) or not isinstance(self.listing_attempts, int) or not (
                1 <= self.listing_attempts <= 20):
            raise InvalidParameterError(f"empiar.listing_attempts must be an integer 1..20, got {self.listing_attempts!r}")
        if not isinstance(self.keep_downloads, bool):
            raise InvalidParameterError(f"empiar.keep_downloads must be true or false, got {self.keep_downloads!r}")
        check_sha256_pins("empiar", self.sha256, lambda name: bool(name) and "/" not in name and
                          not name.startswith("."), "a file name of the image set's folder (no '/')")

    @property
    def api_url(self) -> str:
        return API_URL_TEMPLATE.format(entry=self.entry)


def about_entry(entry: int, title: str | None = None) -> About:
    """The fixed facts of ``entry``: ours for a known entry, else what every EMPIAR entry shares."""
    if entry in KNOWN_ENTRIES:
        return KNOWN_ENTRIES[entry].about
    name = f"EMPIAR-{entry}"
    return About(title=f"{name}: {title}" if title else name, page=f"https://www.ebi.ac.uk/empiar/{name}/",
                 licence=ABOUT.licence, citation=f"{name}, Electron Microscopy Public Image Archive (EMBL-EBI). "
                 "Iudin et al., EMPIAR: the Electron Microscopy Public Image Archive, Nucleic Acids Research "
                 "51(D1), 2023.", doi=(f"10.6019/{name}",))


# ---------------------------------------------------------------------------------------------- API document
@dataclass(frozen=True)
class ApiFacts:
    """What the stage uses from the API entry's selected image set."""

    entry: int
    title: str
    doi: str | None
    imageset_index: int
    imageset_name: str
    directory: str
    num_images: int
    image_width: int | None
    image_height: int | None
    pixel_width_nm: float | None
    pixel_height_nm: float | None
    voxel_type: str
    data_format: str
    z_nm: float | None  # from the details text ("50nm per section"), None when it does not say
    details: str

    @property
    def url(self) -> str:
        return API_URL_TEMPLATE.format(entry=self.entry)

    @property
    def files_url(self) -> str:
        """The image set's folder on the EBI HTTPS server (with a trailing slash)."""
        return FILES_URL_TEMPLATE.format(entry=self.entry) + self.directory + "/"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _optional_number(value: Any, kind: type) -> Any:
    return None if value in (None, "", "null") else kind(value)


def parse_api(document: Any, entry: int = DEFAULT_ENTRY, imageset: int | str = 0) -> ApiFacts:
    """Key facts of the API response ``{"EMPIAR-<entry>": {...}}`` for one image set (an index, directory or name).

    SourceMismatchError names the URL and what is missing. The format and voxel type are kept as the API spells
    them and cross-checked against the files later (:func:`check_slices`), never assumed.
    """
    url = API_URL_TEMPLATE.format(entry=entry)
    key = f"EMPIAR-{entry}"
    try:
        record = document[key]
        sets = list(record["imagesets"])
    except (KeyError, IndexError, TypeError) as exc:
        raise SourceMismatchError(f"{url}: the {key} entry lacks or garbles {exc}") from exc
    index = _select_imageset(sets, imageset, url)
    chosen = sets[index]
    try:
        details = str(chosen.get("details") or "")
        pw, ph = _optional_number(chosen.get("pixel_width"), float), _optional_number(chosen.get("pixel_height"), float)
        facts = ApiFacts(
            entry=entry, title=str(record["title"]), doi=record.get("entry_doi"), imageset_index=index,
            imageset_name=str(chosen.get("name") or ""), directory=str(chosen["directory"]).strip("/"),
            num_images=int(chosen["num_images_or_tilt_series"]),
            image_width=_optional_number(chosen.get("image_width"), int),
            image_height=_optional_number(chosen.get("image_height"), int),
            pixel_width_nm=None if pw is None else float(f"{pw / 10.0:.12g}"),  # the API gives Å
            pixel_height_nm=None if ph is None else float(f"{ph / 10.0:.12g}"),
            voxel_type=str(chosen.get("voxel_type") or ""), data_format=str(chosen.get("data_format") or ""),
            z_nm=section_thickness_nm(details), details=details,
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise SourceMismatchError(f"{url}: imagesets[{index}] of the {key} entry lacks or garbles {exc}") from exc
    if not facts.directory or ".." in facts.directory.split("/") or not 1 <= facts.num_images <= MAX_IMAGES:
        raise SourceMismatchError(f"{url}: imagesets[{index}] has directory {facts.directory!r} and "
                                  f"num_images_or_tilt_series {facts.num_images}: not an image set we can fetch "
                                  f"(1..{MAX_IMAGES} images)")
    for field_name in ("image_width", "image_height"):
        value = getattr(facts, field_name)
        if isinstance(value, int) and not 0 < value <= MAX_IMAGE_SIDE:
            raise SourceMismatchError(f"{url}: imagesets[{index}].{field_name} {value} is outside 1..{MAX_IMAGE_SIDE}")
    return facts


def _select_imageset(sets: Sequence[Any], imageset: int | str, url: str) -> int:
    described = [f"{i}: {s.get('directory')!r} ({s.get('name')!r})" for i, s in enumerate(sets)
                 if isinstance(s, Mapping)]
    if isinstance(imageset, int):
        if imageset < len(sets):
            return imageset
    else:
        matches = [i for i, s in enumerate(sets) if isinstance(s, Mapping) and imageset in (
            str(s.get("directory") or "").strip("/"), str(s.get("name") or ""))]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise SourceMismatchError(f"{url}: empiar.imageset {imageset!r} matches image sets {matches}; use the "
                                      f"index. Image sets: {described}")
    raise SourceMismatchError(f"{url}: no image set {imageset!r} (empiar.imageset); the entry has {described}")


def section_thickness_nm(details: str) -> float | None:
    """The z spacing from the free text ("... and 50nm per section (z)"), None when it does not say."""
    match = _Z_TEXT.search(details)
    if not match:
        return None
    return float(f"{float(match.group(1)) * _UNIT_NM[match.group(2).lower()]:.12g}")


# ---------------------------------------------------------------------------------------------- listing
class _Links(HTMLParser):
    """Every ``href`` of an ``<a>`` tag: double-, single- or un-quoted, any case, entities decoded."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def parse_autoindex(page: str, base_url: str = DATA_URL) -> tuple[list[str], list[str]]:
    """Files and sub-folders of an autoindex page of ``base_url`` (Apache table or ``<pre>``, nginx, others).

    Links are resolved against ``base_url`` (relative, absolute-path or full hrefs alike); sort links
    (``?C=N;O=D``), the parent directory and anything outside the folder are skipped.
    """
    parser = _Links()
    parser.feed(page)
    parser.close()
    base = unquote(base_url)
    files: list[str] = []
    folders: list[str] = []
    for href in parser.hrefs:
        target = unquote(urljoin(base_url, href.strip()))
        if not target.startswith(base):
            continue
        name = target[len(base):]
        if not name or name.startswith(("?", "#")) or "/" in name.rstrip("/") or "?" in name:
            continue
        (folders if name.endswith("/") else files).append(name.rstrip("/"))
    return sorted(set(files)), sorted(set(folders))


@dataclass(frozen=True)
class Numbering:
    """A naming pattern ``prefix`` + number (zero-padded to ``width``, 0 = not padded) + ``suffix``."""

    prefix: str
    suffix: str
    width: int

    def name(self, number: int) -> str:
        return f"{self.prefix}{number:0{self.width}d}{self.suffix}"

    def __str__(self) -> str:
        return f"{self.prefix}{{:0{self.width}d}}{self.suffix}" if self.width else f"{self.prefix}{{}}{self.suffix}"


_NUMBERED = re.compile(r"^(.*?)(\d+)(\D*)$")


def image_extensions(data_format: str) -> tuple[str, ...]:
    """Names an image set of the API's ``data_format`` has (every image format we read when it is another)."""
    fmt = FORMATS.get(data_format.strip().upper())
    return EXTENSIONS[fmt] if fmt else ALL_EXTENSIONS


def number_files(names: Sequence[str], extensions: Sequence[str]) -> tuple[Numbering | None, dict[int, str]]:
    """The largest group of ``names`` numbered alike (same prefix and suffix), as {number: name} in order.

    The last run of digits before the extension is the number; it is zero-padded when the group's numbers
    have one length and at least one leading zero.
    """
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for name in names:
        ext = next((e for e in extensions if name.lower().endswith(e)), None)
        m = _NUMBERED.match(name[:-len(ext)]) if ext else None
        if ext is None or m is None:
            continue
        groups.setdefault((m.group(1), m.group(3) + name[-len(ext):]), {})[int(m.group(2))] = name
    if not groups:
        return None, {}
    prefix, suffix = max(groups, key=lambda k: (len(groups[k]), k))
    numbered = groups[(prefix, suffix)]
    digits = [n[len(prefix):len(n) - len(suffix)] for n in numbered.values()]
    lengths = {len(d) for d in digits}
    width = lengths.pop() if len(lengths) == 1 and any(d.startswith("0") for d in digits) else 0
    return Numbering(prefix, suffix, width), dict(sorted(numbered.items()))


@dataclass(frozen=True)
class Listing:
    """The image set's files as found: from the autoindex, or (short listing) from the count and pattern + HEAD."""

    url: str
    files: tuple[str, ...]  # image files, in z order
    others: tuple[str, ...]  # every other entry of the folder (sub-folders end in "/")
    attempts: int
    complete: bool  # False: the autoindex stayed short and the names come from the fallback
    seen: tuple[int, ...] = ()  # image files the autoindex listed, per attempt
    pattern: str = ""
    confirmed_by_head: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "slices": list(self.files), "other_entries": list(self.others),
                "complete": self.complete, "attempts": self.attempts, "listed_per_attempt": list(self.seen),
                "pattern": self.pattern, "confirmed_by_head": list(self.confirmed_by_head)}


def fetch_listing(fetch: Callable[[str], bytes], expected: int, attempts: int, url: str = DATA_URL,
                  extensions: Sequence[str] = (".dm3",),
                  head: Callable[[str], tuple[int, Mapping[str, str]]] | None = None,
                  known_pattern: Numbering | None = None) -> Listing:
    """The image set's files: the autoindex (fetched again while short, up to ``attempts``), else the fallback.

    The load-balanced EBI autoindex can omit files. When it stays short, the names come from the entry's
    count (``expected``) and the naming pattern of the files it did list, each name confirmed by a HEAD
    (``head``; without one a short listing fails), or from ``known_pattern`` when it listed none of them.
    An absent file fails, naming its URL and the HTTP status.
    """
    seen: list[int] = []
    numbering: Numbering | None = None
    numbered: dict[int, str] = {}
    others: list[str] = []
    for attempt in range(1, attempts + 1):
        files, folders = parse_autoindex(fetch(url).decode("utf-8", errors="replace"), url)
        if expected == 1:
            images = [f for f in files if f.lower().endswith(tuple(extensions))]
            if len(images) == 1:
                rest = [f for f in files if f != images[0]] + [f + "/" for f in folders]
                return Listing(url, (images[0],), tuple(rest), attempt, True, (*seen, 1))
            if len(images) > 1:
                raise SourceMismatchError(f"{url} lists {len(images)} image files {images[:5]}, the API says "
                                          f"num_images_or_tilt_series = 1: which one is the image set is unclear")
            numbering, numbered = None, {}
            seen.append(len(images))
        else:
            numbering, numbered = number_files(files, extensions)
            seen.append(len(numbered))
        others = [f for f in files if f not in numbered.values()] + [f + "/" for f in folders]
        if len(numbered) > expected:
            raise SourceMismatchError(f"{url} lists {len(numbered)} image files named {numbering}, the API says "
                                      f"num_images_or_tilt_series = {expected}")
        if len(numbered) == expected and list(numbered) == list(range(min(numbered), min(numbered) + expected)):
            return Listing(url, tuple(numbered.values()), tuple(others), attempt, True, tuple(seen), str(numbering))
        log.warning("%s listed %d of %d image files (attempt %d of %d); the load-balanced index can omit files",
                    url, seen[-1], expected, attempt, attempts)
    short = (f"{url} listed {seen} image files in {attempts} attempts; the API says {expected}"
             + (f" (named {numbering}, numbers {_ranges(list(numbered))})" if numbering else ""))
    if numbering is None and known_pattern is not None:
        numbering = known_pattern
        short += f"; none of its names, so the entry's known naming {known_pattern} is used"
    if numbering is None or head is None:
        raise SourceMismatchError(short + "; no naming pattern to fall back on" if numbering is None else short)
    names, confirmed = _fall_back(numbering, numbered, expected, url, head, short)
    log.warning("%s: using the API count %d and the naming pattern %s; %d name(s) confirmed by HEAD: %s",
                short, expected, numbering, len(confirmed), ", ".join(confirmed))
    return Listing(url, tuple(names), tuple(others), attempts, False, tuple(seen), str(numbering), tuple(confirmed))


def _ranges(numbers: Sequence[int]) -> str:
    if not numbers:
        return "none"
    parts, start, prev = [], numbers[0], numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}" if start == prev else f"{start}..{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def _fall_back(numbering: Numbering, numbered: Mapping[int, str], expected: int, url: str,
               head: Callable[[str], tuple[int, Mapping[str, str]]], short: str) -> tuple[list[str], list[str]]:
    """Names ``start .. start + expected - 1`` in the pattern, the unlisted ones confirmed by HEAD.

    The numbering must hold every listed number; it starts at 0 when it can (EMPIAR sets mostly do), else at 1,
    else at the lowest listed number. A name whose HEAD is not 200 fails the stage, naming the URL and the status.
    """
    low, high = (min(numbered), max(numbered)) if numbered else (0, 0)
    if high - low + 1 > expected:
        raise SourceMismatchError(f"{short}: the listed numbers span {low}..{high}, more than {expected} images")
    starts = [s for s in (0, 1, low) if max(0, high - expected + 1) <= s <= low]
    start = starts[0] if starts else low
    names, confirmed = [], []
    for number in range(start, start + expected):
        name = numbering.name(number)
        if number not in numbered:
            status, _ = head(url + name)
            if status != 200:
                cause = "absent" if status in (403, 404, 410) else "not confirmed"
                raise SourceMismatchError(f"{short}; falling back to the naming pattern {numbering}: HEAD "
                                          f"{url + name} answered HTTP {status} ({cause}), so image {number} of "
                                          f"{start}..{start + expected - 1} cannot be fetched")
            confirmed.append(name)
        names.append(name)
    return names, confirmed


# ---------------------------------------------------------------------------------------------- side files
@dataclass(frozen=True)
class SideFile:
    """An optional file beside the images (EMPIAR-11759's ``.xml.gz``): fetched if it can be, never required."""

    name: str
    url: str
    status: str  # "ok", "unavailable" (not fetched) or "undecodable"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_side_file(path: Path) -> str:
    """"" when ``path`` is readable metadata (a ``.gz`` must gunzip, within bounds, to XML), else why not."""
    with path.open("rb") as f:
        head = f.read(64)
        if path.name.endswith(".gz"):
            decoder = zlib.decompressobj(wbits=31)
            f.seek(0)
            out, total = b"", 0
            try:
                while block := f.read(1 << 20):
                    piece = decoder.decompress(block, 1 << 20)
                    while True:
                        total += len(piece)
                        out = out or piece[:64]
                        if total > MAX_SIDE_FILE_DECODED:
                            return f"decodes past {MAX_SIDE_FILE_DECODED} bytes"
                        if not decoder.unconsumed_tail:
                            break
                        piece = decoder.decompress(decoder.unconsumed_tail, 1 << 20)
                piece = decoder.flush()
                total += len(piece)
                out = out or piece[:64]
            except zlib.error as exc:
                return f"not gzip data ({exc})"
            if not decoder.eof:
                return "the gzip stream is truncated"
            head = out
    if not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return f"does not begin like XML (first bytes {head[:16]!r})"
    return ""


def fetch_side_files(fetch: Downloader, folder: Path, url: str, names: Sequence[str],
                     pins: Mapping[str, str]) -> list[SideFile]:
    """Fetch each optional side file now (small): a failure is warned and recorded, not fatal.

    A pinned sha256 that does not match stays fatal (the pin is the user's explicit demand).
    """
    out: list[SideFile] = []
    for name in names:
        dest = folder / name
        try:
            fetch.download(Download(url + name, dest, sha256=pins.get(name)))
        except IntegrityError:
            raise
        except DownloadError as exc:
            log.warning("%s%s is unavailable (%s); going on without it (it is optional, and recorded)", url, name, exc)
            out.append(SideFile(name, url + name, "unavailable", str(exc)))
            continue
        problem = check_side_file(dest)
        if problem:
            log.warning("%s%s: %s; going on without it (it is optional, and recorded)", url, name, problem)
            dest.unlink(missing_ok=True)
            out.append(SideFile(name, url + name, "undecodable", problem))
        else:
            out.append(SideFile(name, url + name, "ok"))
    return out


# ---------------------------------------------------------------------------------------------- image files
@dataclass(frozen=True)
class Slice:
    """One file of the image set: its sections as a (z, y, x) read-only array (memory-mapped where possible)."""

    name: str
    data: np.ndarray  # (z, y, x); z = 1 for a 2-D image
    pixel_size_nm: tuple[float, float] | None  # (y, x); None: the file is not calibrated in y, x
    z_nm: float | None = None  # the file's own z spacing (a calibrated stack), else None
    source_format: str = ""
    units: tuple[str | None, str | None, str | None] = (None, None, None)

    @property
    def sections(self) -> int:
        return int(self.data.shape[0])


def read_slice(path: Path, *, stack: bool = False) -> Slice:
    """One image file (DM3/DM4/TIFF/MRC, read by :func:`emdata.formats.read_volume`) with its calibration in nm.

    Without ``stack`` the file must hold one section (a 2-D image); with it every section is used. y and x
    must be calibrated alike (both or neither). SourceMismatchError names the file and the cause.
    """
    try:
        volume = read_volume(path)
    except VolumeFormatError as exc:
        raise SourceMismatchError(f"{path.name}: not a readable image ({exc})") from exc
    if not stack and volume.shape[0] != 1:
        raise SourceMismatchError(f"{path.name}: expected one 2-D image, got {volume.shape[0]} sections of "
                                  f"{volume.shape[1:]} (a stack)")
    z, y, x = volume.voxel_size_nm
    if (y is None) != (x is None):
        raise SourceMismatchError(f"{path.name}: calibrated in only one of y, x ({volume.units[1]!r}, "
                                  f"{volume.units[2]!r})")
    return Slice(path.name, volume.data, None if y is None or x is None else (y, x), z if volume.shape[0] > 1 else None,
                 volume.source_format, volume.units)


class SliceStack:
    """The files' sections as one lazily read (z, y, x) array: indexing reads only the sections and rows asked for."""

    def __init__(self, slices: Sequence[Slice]) -> None:
        self.slices = list(slices)
        self.starts = np.cumsum([0] + [s.sections for s in slices])
        self.shape = (int(self.starts[-1]), *slices[0].data.shape[1:])
        self.dtype = slices[0].data.dtype

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        z, y, x = key
        z0, z1, _ = z.indices(self.shape[0])
        out = np.empty((max(z1 - z0, 0), len(range(*y.indices(self.shape[1]))), len(range(*x.indices(self.shape[2])))),
                       self.dtype)
        for i, s in enumerate(self.slices):
            lo, hi = max(z0, int(self.starts[i])), min(z1, int(self.starts[i + 1]))
            if lo < hi:
                out[lo - z0:hi - z0] = s.data[lo - self.starts[i]:hi - self.starts[i], y, x]
                release_pages(s.data)  # copied: one file's mapped pages resident at a time
        return out


def thin_stack_shards(shape: Sequence[int], chunks: Sequence[int], shards: Sequence[int]) -> tuple[int, int, int]:
    """The output shards for a stack thinner in z than ``shards``: y and x doubled while a shard still holds no
    more voxels than ``shards`` asks for (and no axis passes the params' limit).

    A shard is clipped to the volume (rounded up to whole chunks), so 16 sections with 256^3 shards would give
    16 x 256 x 256 shards (1 MiB of uint8: hundreds of files, each a fixed cost for ``dvc pull``); with this,
    16 x 1024 x 1024 (2^24 voxels, the voxels of a 256^3 shard). The chunks and the voxels are unchanged.
    (EMPIAR keeps 2^24-voxel shards, not the 64 MiB of ``ngff.UINT8_SHARDS``: 16 x 2048 x 2048 measured 1.26x
    the peak RSS from half to the whole stack, bench/README.md; its 63 files cost `dvc pull` little.)
    """
    z_chunk = min(int(chunks[0]), int(shape[0]))
    z = min(int(shards[0]), math.ceil(int(shape[0]) / z_chunk) * z_chunk)
    y, x = int(shards[1]), int(shards[2])
    budget = math.prod(int(v) for v in shards)
    while z * (2 * y) * (2 * x) <= budget and 2 * max(y, x) <= MAX_SHARD_AXIS and (
            y < shape[1] or x < shape[2]):
        y, x = 2 * y, 2 * x
    return int(shards[0]), y, x


def api_dtype(voxel_type: str) -> np.dtype | None:
    """The numpy dtype an EMPIAR ``voxel_type`` names ("UNSIGNED BYTE", "SIGNED 16 BIT INTEGER", "32 BIT FLOAT"
    ...), None when it names none we know."""
    words = voxel_type.upper().replace("-", " ").split()
    bits = next((int(w) for w in words if w.isdigit()), 8 if "BYTE" in words else None)
    if bits is None:
        return None
    if "FLOAT" in words or "REAL" in words:
        return np.dtype(f"float{bits}") if bits in (16, 32, 64) else None
    if "INTEGER" in words or "BYTE" in words or "INT" in words:
        if bits not in (8, 16, 32, 64):
            return None
        return np.dtype(f"int{bits}") if "SIGNED" in words and "UNSIGNED" not in words else np.dtype(f"uint{bits}")
    return None


@dataclass(frozen=True)
class Checked:
    """What the files say, checked against one another and the API: the voxel size and the notes to record."""

    voxel_size_nm: tuple[float, float, float]
    voxel_size_note: str
    discrepancies: list[str]
    cross_checks: dict[str, Any]


def check_slices(slices: Sequence[Slice], api: ApiFacts) -> Checked:
    """Files agree with one another (shape, dtype, calibration, format) and with the API; the voxel size in nm.

    The files decide format, dtype and units; the API's ``data_format``, ``voxel_type``, pixel size and image size
    are cross-checked (SourceMismatchError names both values). Known disagreements of an entry are logged and
    returned as sentences; the z spacing is the files' own (a calibrated stack) or the details text's.
    """
    first = slices[0]
    for s in slices[1:]:
        if s.data.shape[1:] != first.data.shape[1:] or s.pixel_size_nm != first.pixel_size_nm:
            raise SourceMismatchError(f"{s.name} is {s.data.shape[1:]} at {s.pixel_size_nm} nm, {first.name} is "
                                      f"{first.data.shape[1:]} at {first.pixel_size_nm} nm")
        if s.sections != first.sections:
            raise SourceMismatchError(f"{s.name} holds {s.sections} sections, {first.name} {first.sections}")
        if s.data.dtype != first.data.dtype or s.source_format != first.source_format or s.z_nm != first.z_nm:
            raise SourceMismatchError(f"{s.name} is {s.source_format} {s.data.dtype} (z {s.z_nm} nm), {first.name} "
                                      f"is {first.source_format} {first.data.dtype} (z {first.z_nm} nm)")
    sections = sum(s.sections for s in slices)
    if api.num_images not in (len(slices), sections):
        raise SourceMismatchError(f"{len(slices)} files ({sections} sections) read, the API says "
                                  f"num_images_or_tilt_series = {api.num_images}")
    checks: dict[str, Any] = {"format": first.source_format, "dtype": str(first.data.dtype)}
    expected_format = FORMATS.get(api.data_format.strip().upper())
    if expected_format is None:
        log.warning("%s: data_format %r is not one we cross-check; the files are %s", api.url, api.data_format,
                    first.source_format)
        checks["data_format"] = f"not cross-checked ({api.data_format!r})"
    elif expected_format != first.source_format:
        raise SourceMismatchError(f"{api.url}: data_format {api.data_format!r}, but the files are "
                                  f"{first.source_format} (recognised from their content)")
    else:
        checks["data_format"] = "agrees"
    expected_dtype = api_dtype(api.voxel_type)
    if expected_dtype is None:
        log.warning("%s: voxel_type %r is not one we cross-check; the files are %s", api.url, api.voxel_type,
                    first.data.dtype)
        checks["voxel_type"] = f"not cross-checked ({api.voxel_type!r})"
    elif expected_dtype != first.data.dtype.newbyteorder("="):
        raise SourceMismatchError(f"{api.url}: voxel_type {api.voxel_type!r} ({expected_dtype}), but the files "
                                  f"hold {first.data.dtype}")
    else:
        checks["voxel_type"] = "agrees"

    known: list[str] = []
    notes: list[str] = []
    if first.pixel_size_nm is None:
        if api.pixel_width_nm is None or api.pixel_height_nm is None:
            raise SourceMismatchError(f"{first.name}: not calibrated in y, x, and {api.url} gives no pixel_width / "
                                      f"pixel_height: no voxel size")
        log.warning("%s: the files are not calibrated in y, x; using the API pixel size %s x %s nm", api.url,
                    api.pixel_height_nm, api.pixel_width_nm)
        yx = (api.pixel_height_nm, api.pixel_width_nm)
        notes.append("y, x from the API pixel_height/pixel_width (Å): the files carry no calibration")
    else:
        yx = first.pixel_size_nm
        for axis, api_nm, file_nm in (("x", api.pixel_width_nm, yx[1]), ("y", api.pixel_height_nm, yx[0])):
            if api_nm is not None and abs(api_nm - file_nm) > PIXEL_TOLERANCE * file_nm:
                raise SourceMismatchError(f"pixel size in {axis}: the API says {api_nm * 10:g} Å = {api_nm:g} nm, the "
                                          f"{first.source_format.upper()} calibration {file_nm:g} nm (more than "
                                          f"{PIXEL_TOLERANCE:.0%} apart)")
        notes.append(f"y, x from the {first.source_format.upper()} calibration ({first.units[1]}), cross-checked "
                     f"against the API pixel_width/pixel_height (Å)")
    z = _z_spacing(first, api, sections, yx, notes)

    height, width = first.data.shape[1:]
    api_wh = (api.image_width, api.image_height)
    if None not in api_wh and api_wh != (width, height):
        files_wh = (width, height)
        entry = KNOWN_ENTRIES.get(api.entry)
        if entry is None or {"api_width_height": api_wh, "files_width_height": files_wh} != entry.size_disagreement:
            raise SourceMismatchError(f"image size: the API says width x height {api_wh}, the "
                                      f"{first.source_format.upper()} files are {files_wh}")
        log.warning("the API says %d x %d pixels, the files are %d x %d: a known disagreement, the files win",
                    *api_wh, *files_wh)
        known.append(f"{api.url}: image_width x image_height {api_wh[0]} x {api_wh[1]}, the "
                     f"{first.source_format.upper()} slices are {files_wh[0]} x {files_wh[1]} (a known disagreement "
                     f"of the live entry; the files are used)")
    return Checked((z, yx[0], yx[1]), "; ".join(notes), known, checks)


def _z_spacing(first: Slice, api: ApiFacts, sections: int, yx: tuple[float, float], notes: list[str]) -> float:
    if first.z_nm is not None:
        if api.z_nm is not None and abs(api.z_nm - first.z_nm) > Z_TOLERANCE * first.z_nm:
            raise SourceMismatchError(f"z spacing: {first.name} is calibrated at {first.z_nm:g} nm per section, the "
                                      f"{api.url} details text says {api.z_nm:g} nm")
        notes.insert(0, f"z from the {first.source_format.upper()} calibration ({first.units[0]})")
        return first.z_nm
    if api.z_nm is not None:
        notes.insert(0, f"z from the API entry's details text ('{api.z_nm:g} nm per section')")
        return api.z_nm
    if sections == 1:
        notes.insert(0, "z: one section, so no spacing; set to the x pixel size")
        return yx[1]
    raise SourceMismatchError(f"{api.url}: imagesets[{api.imageset_index}].details does not state the section "
                              f"thickness ('<N> nm per section') and {first.name} has no z calibration; details "
                              f"text: {api.details!r}")


def verify_decoded_sha256(slices: Sequence[Slice], pins: Mapping[str, str]) -> list[str]:
    """Check ``sha256(array.tobytes())`` of each pinned slice; IntegrityError names the slice and both digests."""
    checked = []
    for s in slices:
        if s.name in pins:
            digest = hashlib.sha256()  # = sha256(tobytes()), fed section by section (bounded memory)
            for section in s.data:
                digest.update(np.ascontiguousarray(section).tobytes())
                release_pages(s.data)
            got = digest.hexdigest()
            if got != pins[s.name]:
                raise IntegrityError(f"{s.name}: decoded pixels have sha256 {got}, pinned {pins[s.name]}")
            checked.append(s.name)
    return checked


# ---------------------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class EmpiarPlan:
    api: ApiFacts
    listing: Listing
    side_files: tuple[SideFile, ...]

    @property
    def slices(self) -> tuple[str, ...]:
        return self.listing.files


class EmpiarSource(FileSource[EmpiarParams, EmpiarPlan]):
    """An EMPIAR image set: the REST API entry, the files of its folder, each read whatever its format.

    The API entry gives the image count, the pixel size in Å, the declared format and voxel type and, only in
    its free ``details`` text, the section thickness. The files are listed from the EBI HTTPS autoindex (Apache
    table style, or any other; load-balanced, so a short listing is fetched again, then completed from the count
    and the naming pattern, each name confirmed by a HEAD), downloaded in parallel, read with
    :func:`emdata.formats.read_volume` (DM3/DM4/TIFF/MRC, slices or stacks, any integer or float dtype, any length
    unit) and cross-checked against the API before they are converted and verified. Side files (``.xml.gz``)
    are optional. The output is named after the entry in :mod:`emdata.catalog`: another entry needs its own
    catalog entry and DVC stage (the stage refuses an entry its output is not named after).
    """

    name = "empiar"
    params_type = EmpiarParams


    def run(self, params: EmpiarParams, ctx: RunContext) -> dict[str, Any]:
        output = find(self.name).output_name
        if output != f"empiar_{params.entry}":
            raise InvalidParameterError(
                f"empiar.entry {params.entry}: this stage writes {find(self.name).output}, named after another "
                f"entry; add a dataset for EMPIAR-{params.entry} to emdata.catalog (and its DVC stage) rather than "
                f"writing it under that name")
        source = _EntrySource(about_entry(params.entry))
        return run_file_source(source, params, ctx)

    def plan(self, params: EmpiarParams, ctx: RunContext, fetch: Downloader) -> tuple[EmpiarPlan, dict[str, str]]:
        api = parse_api(fetch.fetch_json(params.api_url), params.entry, params.imageset)
        known = KNOWN_ENTRIES.get(api.entry)
        pattern = Numbering(*known.file_pattern) if known and known.file_pattern else None
        listing = fetch_listing(fetch.fetch_bytes, api.num_images, params.listing_attempts, api.files_url,
                                image_extensions(api.data_format), fetch.head, pattern)
        unknown = sorted(set(params.sha256) - set(listing.files) - set(listing.others))
        side_names = sorted({n for n in listing.others if n.lower().endswith(SIDE_FILE_SUFFIXES)}
                            | set(known.side_files if known else ()))
        if unknown and not set(unknown) <= set(side_names):
            raise InvalidParameterError(f"empiar.sha256 pins {unknown}, which {api.files_url} does not hold; its "
                                        f"image files: {list(listing.files[:3])}... and {list(listing.others)}")
        for name in side_names:
            if name not in listing.others:
                log.warning("%s does not list %s; trying it anyway (optional)", api.files_url, name)
        sides = fetch_side_files(fetch, ctx.downloads_dir / self.name, api.files_url, side_names, params.sha256)
        wanted = list(listing.files) + [s.name for s in sides if s.status == "ok"]
        return EmpiarPlan(api, listing, tuple(sides)), {n: api.files_url + n for n in wanted}

    def convert(self, params: EmpiarParams, plan: EmpiarPlan, files: Mapping[str, Path], root: zarr.Group,
                ctx: RunContext) -> Converted:
        slices = [read_slice(files[name], stack=True) for name in plan.slices]  # stacks: every section is used
        checked = check_slices(slices, plan.api)
        known = KNOWN_ENTRIES.get(plan.api.entry)
        # Third-party decoded hashes describe the live pixels: checked unless the bytes are the replica's.
        decoded_checked = [] if ctx.is_replica or known is None else verify_decoded_sha256(
            slices, known.live_decoded_sha256)
        stack = SliceStack(slices)
        shards = thin_stack_shards(stack.shape, params.chunks, params.shards)
        written = ngff.write_image(root, name=f"empiar_{plan.api.entry}", source=stack,
                                   geometry=ngff.Geometry(checked.voxel_size_nm), chunks=params.chunks,
                                   shards=shards, method="mean",
                                   what=f"the {slices[0].source_format.upper()} files")
        means = []
        for s in slices:
            if isinstance(s.data, np.ndarray):
                means.append(float(np.mean(s.data, dtype=np.float64)))
            else:  # a compressed stack read on demand: section by section (equal sizes: the mean of the means)
                means.append(float(np.mean([np.mean(sec, dtype=np.float64) for sec in s.data])))
            release_pages(s.data)
        mean = float(np.mean(means))
        unavailable = [s for s in plan.side_files if s.status != "ok"]
        return Converted(
            voxel_size_nm=checked.voxel_size_nm,
            figures={"listing_attempts": plan.listing.attempts, "listing_complete": int(plan.listing.complete),
                     "listing_confirmed_by_head": len(plan.listing.confirmed_by_head),
                     "side_files_unavailable": len(unavailable),
                     "decoded_sha256_checked": len(decoded_checked), "shape": list(stack.shape),
                     "levels": written["levels"], "mean_intensity": round(mean, 2)},
            voxel_size_note=checked.voxel_size_note,
            discrepancies=checked.discrepancies,
            details={"entry": plan.api.entry, "source_url": plan.api.files_url,
                     "api": {"url": plan.api.url, **plan.api.to_dict()},
                     "image_files": {**checked.cross_checks, "files": len(slices), "sections": stack.shape[0]},
                     "listing": plan.listing.to_dict(),
                     "side_files": [s.to_dict() for s in plan.side_files],
                     "decoded_sha256_checked": decoded_checked})


class _EntrySource(EmpiarSource):
    """The source for one run: its ``about`` is the entry's."""

    def __init__(self, about: About) -> None:
        self._about = about

    @property
    def about(self) -> About:
        return self._about

    def run(self, params: EmpiarParams, ctx: RunContext) -> dict[str, Any]:
        return run_file_source(self, params, ctx)


SOURCE = EmpiarSource()
