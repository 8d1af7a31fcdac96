"""TIFF images and stacks (tifffile): memory-mapped when uncompressed, calibrations from ImageJ, OME, FEI or tags."""

from __future__ import annotations

import logging
import threading
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from emdata.formats.volume import (
    Volume,
    VolumeFormatError,
    VolumeFormatWarning,
    VoxelSize,
    as_zyx,
    check_dtype,
    check_extent,
    check_shape,
    is_uncalibrated,
    length_nm,
)

log = logging.getLogger(__name__)

_STACK_AXES = "ZQIT"  # tifffile's names of an image stack's axis: slices, generic pages, images, frames
_TIFF_UNITS = {2: "in", 3: "cm", 4: "mm", 5: "µm"}  # ResolutionUnit (4, 5: non-standard, as tifffile reads them)
# Pixels per inch that desktop software writes by default: not a microscope's calibration.
_DESKTOP_DPI = {72.0, 96.0, 150.0, 300.0, 600.0, 1200.0}

Units = tuple[str | None, str | None, str | None]


def read_tiff(path: Path, max_decoded_bytes: int) -> Volume:
    """The first series of a TIFF as (z, y, x); memory-mapped when its voxels are stored uncompressed in one run."""
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # a third-party parser on untrusted bytes: any failure means a corrupt file
        raise VolumeFormatError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    with tif:
        try:
            if not tif.series:
                raise VolumeFormatError(f"{path}: holds no image (no image file directory with pixels)")
            series = tif.series[0]
            axes, shape, dtype, offset = series.axes, tuple(series.shape), series.dtype, series.dataoffset
            if len(tif.series) > 1:
                warnings.warn(f"{path}: holds {len(tif.series)} image series; reading the first, {axes} "
                              f"{list(shape)} (the others: {[list(s.shape) for s in tif.series[1:]]})",
                              VolumeFormatWarning, stacklevel=3)
        except VolumeFormatError:
            raise
        except Exception as exc:
            raise VolumeFormatError(f"{path}: TIFF structure unreadable ({type(exc).__name__}: {exc})") from exc
        check_shape(path, shape, f"image series shape ({axes})")
        if dtype is None:
            raise VolumeFormatError(f"{path}: TIFF sample format/bits per sample give no numeric type")
        check_dtype(path, np.dtype(dtype), "SampleFormat/BitsPerSample")
        stack_axis = _stack_axis(path, axes, shape)
        voxel, units, where = _calibration(tif, path, stack_axis)

        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offset is not None:  # uncompressed, one contiguous run: map it
            check_extent(path, int(offset), nbytes, path.stat().st_size, "StripOffsets/TileOffsets")
            raw: np.ndarray = np.memmap(path, dtype=np.dtype(dtype).newbyteorder(tif.byteorder), mode="r",
                                        offset=int(offset), shape=shape)
            mapped = True
        elif nbytes > max_decoded_bytes:  # never whole in memory: each read decodes only its pages
            log.info("%s: compressed (or scattered) TIFF of %d decoded bytes, more than max_decoded_bytes=%d: read "
                     "page by page on demand", path, nbytes, max_decoded_bytes)
            pages = int(np.prod([n for a, n in zip(axes, shape, strict=True) if a not in "YXS"], dtype=np.int64))
            yx = tuple(n for a, n in zip(axes, shape, strict=True) if a in "YX")
            stack = TiffPageStack(path, (pages, yx[0], yx[1]), np.dtype(dtype).newbyteorder("="))
            return Volume(stack, voxel, "tiff", path, False, units, where)  # type: ignore[arg-type]
        else:
            log.info("%s: compressed TIFF, decoding %d bytes page by page into memory", path, nbytes)
            raw = np.empty(shape, dtype=np.dtype(dtype).newbyteorder("="))
            try:
                series.asarray(out=raw, maxworkers=1)  # page by page into the one preallocated array
            except Exception as exc:
                raise VolumeFormatError(f"{path}: TIFF voxels undecodable ({type(exc).__name__}: {exc})") from exc
            raw.flags.writeable = False
            mapped = False
    data = as_zyx(path, raw.reshape([n for a, n in zip(axes, shape, strict=True) if n > 1 or a in "YX"]))
    return Volume(data, voxel, "tiff", path, mapped, units, where)


class TiffPageStack:
    """A compressed (or scattered) TIFF series as a read-only (z, y, x) array-like: indexing decodes only the
    pages (z) asked for, one page at a time, keeping up to ``cache_bytes`` of recently decoded pages (a box read
    after its neighbour in y or x does not decode the same pages again). Never holds the whole volume: the most it
    holds is the cache plus the box asked for. ``numpy.asarray`` of it decodes everything (small files only)."""

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: np.dtype,
                 cache_bytes: int = 64 * 2**20) -> None:
        self.path, self.shape, self.dtype, self.ndim = path, tuple(int(n) for n in shape), np.dtype(dtype), 3
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        page_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        self.cache_pages = max(1, cache_bytes // max(page_bytes, 1))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._tif: tifffile.TiffFile | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _page(self, z: int) -> np.ndarray:
        page = self._cache.get(z)
        if page is not None:
            self._cache.move_to_end(z)
            return page
        if self._tif is None:
            self._tif = tifffile.TiffFile(self.path)
        try:
            page = np.asarray(self._tif.asarray(key=z, series=0, maxworkers=1))
        except Exception as exc:
            raise VolumeFormatError(f"{self.path}: TIFF page {z} undecodable ({type(exc).__name__}: {exc})") from exc
        if page.size != self.shape[1] * self.shape[2]:
            raise VolumeFormatError(f"{self.path}: TIFF page {z} decodes to {page.shape}, expected "
                                    f"{self.shape[1:]}")
        page = page.reshape(self.shape[1:]).astype(self.dtype, copy=False)
        page.flags.writeable = False
        self._cache[z] = page
        while len(self._cache) > self.cache_pages:
            self._cache.popitem(last=False)
        return page

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or any(k is Ellipsis or k is None for k in key):
            raise IndexError(f"{self.path}: index with up to three ints or slices (z, y, x), got {key!r}")
        key = key + (slice(None),) * (3 - len(key))
        zs, rest = key[0], key[1:]
        with self._lock:
            if isinstance(zs, slice):
                planes = [self._page(z)[rest] for z in range(*zs.indices(self.shape[0]))]
                if not planes:
                    return np.empty((0, *np.empty(self.shape[1:], np.bool_)[rest].shape), self.dtype)
                return np.stack(planes)
            z = int(zs)
            if not -self.shape[0] <= z < self.shape[0]:
                raise IndexError(f"{self.path}: z index {z} out of range for {self.shape[0]} pages")
            return np.array(self._page(z % self.shape[0])[rest])

    def __iter__(self) -> Any:
        return (self[z] for z in range(self.shape[0]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def close(self) -> None:
        with self._lock:
            if self._tif is not None:
                self._tif.close()
                self._tif = None
            self._cache.clear()


def _stack_axis(path: Path, axes: str, shape: tuple[int, ...]) -> str | None:
    """Which tifffile axis is z (None for a 2-D image); refuses colour, channels and 4-D data."""
    stack = None
    for axis, n in zip(axes, shape, strict=True):
        if n == 1 or axis in "YX":
            continue
        if axis in "SC":
            what = "samples per pixel (RGB?)" if axis == "S" else "channels"
            raise VolumeFormatError(f"{path}: {n} {what} (axes {axes}, shape {list(shape)}); single-channel "
                                    f"grey-level images only")
        if axis not in _STACK_AXES or stack is not None:
            raise VolumeFormatError(f"{path}: axes {axes} of shape {list(shape)} are more than a 3-D stack")
        stack = axis
    if not axes.rstrip("S").endswith("YX"):
        raise VolumeFormatError(f"{path}: axes {axes}: expected the image's rows and columns (Y, X) last")
    return stack


def _calibration(tif: tifffile.TiffFile, path: Path, stack_axis: str | None) -> tuple[VoxelSize, Units, str]:
    """(z, y, x) nm, units, where from: ImageJ description, else OME-XML, else FEI metadata, else resolution tags."""
    page = tif.pages.first
    if tif.is_imagej and tif.imagej_metadata and "unit" in tif.imagej_metadata:
        return _imagej(tif.imagej_metadata, page, path, stack_axis)
    if tif.is_ome and tif.ome_metadata:
        return _ome(tif.ome_metadata, path, stack_axis)
    fei = tif.fei_metadata if tif.is_fei else None
    if fei and isinstance(fei.get("Scan"), dict) and "PixelWidth" in fei["Scan"]:
        scan = fei["Scan"]
        x = length_nm(path, "x", float(scan["PixelWidth"]), "m", "FEI [Scan] PixelWidth")
        y = length_nm(path, "y", float(scan.get("PixelHeight", scan["PixelWidth"])), "m", "FEI [Scan] PixelHeight")
        return (None, y, x), (None, "m", "m"), "FEI metadata [Scan] PixelWidth/PixelHeight (m)"
    return _resolution_tags(page, path)


def _pixel_size(page: Any, tag: str) -> float | None:
    """Unit per pixel from an X/YResolution tag (pixels per unit, a rational); None when absent or zero."""
    value = page.tags.get(tag)
    if value is None:
        return None
    num, den = value.value if isinstance(value.value, tuple) else (value.value, 1)
    return float(den) / float(num) if num and den else None


def _imagej(meta: dict[str, Any], page: Any, path: Path, stack_axis: str | None) -> tuple[VoxelSize, Units, str]:
    unit = str(meta["unit"])
    yunit, zunit = str(meta.get("yunit", unit)), str(meta.get("zunit", unit))
    where = "ImageJ description (unit, spacing) and X/YResolution"
    sizes: list[float | None] = []
    units: list[str | None] = []
    spacing = meta.get("spacing") if stack_axis == "Z" else None  # ImageJ frames (T) have a time interval
    for axis, value, u in (("z", spacing, zunit), ("y", _pixel_size(page, "YResolution"), yunit),
                           ("x", _pixel_size(page, "XResolution"), unit)):
        if value is None or is_uncalibrated(u):
            sizes.append(None)
            units.append(None)
        else:
            sizes.append(length_nm(path, axis, float(value), u, where))
            units.append(u)
    return (sizes[0], sizes[1], sizes[2]), (units[0], units[1], units[2]), where


def _ome(xml: str, path: Path, stack_axis: str | None) -> tuple[VoxelSize, Units, str]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise VolumeFormatError(f"{path}: OME-XML unreadable ({exc})") from exc
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    where = "OME-XML Pixels PhysicalSize{X,Y,Z} (default unit µm)"
    if pixels is None:
        return (None, None, None), (None, None, None), where
    sizes: list[float | None] = []
    units: list[str | None] = []
    for axis in ("z", "y", "x"):
        value = pixels.get(f"PhysicalSize{axis.upper()}")
        unit = pixels.get(f"PhysicalSize{axis.upper()}Unit", "µm")  # the OME schema's default
        if value is None or (axis == "z" and stack_axis != "Z"):
            sizes.append(None)
            units.append(None)
        else:
            try:
                number = float(value)
            except ValueError as exc:
                raise VolumeFormatError(f"{path}: OME PhysicalSize{axis.upper()}={value!r} is not a number") from exc
            sizes.append(length_nm(path, axis, number, unit, "OME-XML"))
            units.append(unit)
    return (sizes[0], sizes[1], sizes[2]), (units[0], units[1], units[2]), where


def _resolution_tags(page: Any, path: Path) -> tuple[VoxelSize, Units, str]:
    where = "TIFF XResolution/YResolution and ResolutionUnit"
    tag = page.tags.get("ResolutionUnit")
    unit = _TIFF_UNITS.get(int(tag.value)) if tag is not None else "in"  # the TIFF default is inch
    x, y = _pixel_size(page, "XResolution"), _pixel_size(page, "YResolution")
    if unit is None or x is None or y is None:
        return (None, None, None), (None, None, None), where
    if unit == "in" and {round(1 / x, 6), round(1 / y, 6)} <= _DESKTOP_DPI:
        warnings.warn(f"{path}: resolution {1 / x:g} x {1 / y:g} pixels per inch is a desktop default, not a "
                      f"microscope calibration; pixel size left unknown", VolumeFormatWarning, stacklevel=4)
        return (None, None, None), (None, None, None), where
    return ((None, length_nm(path, "y", y, unit, where), length_nm(path, "x", x, unit, where)),
            (None, unit, unit), where)
