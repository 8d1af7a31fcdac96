"""Gatan DigitalMicrograph DM3/DM4 images: tags parsed by ncempy, voxels memory-mapped, calibrations in nm."""

from __future__ import annotations

import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from ncempy.io import dm as ncempy_dm

from emdata.formats.volume import (
    AXES,
    Volume,
    VolumeFormatError,
    VolumeFormatWarning,
    as_zyx,
    check_extent,
    check_shape,
    is_uncalibrated,
    length_nm,
)

# DM ImageData.DataType -> numpy (voxels are little-endian in both DM3 and DM4, as ncempy reads them).
_DTYPES = {1: "<i2", 2: "<f4", 6: "u1", 7: "<i4", 9: "i1", 10: "<u2", 11: "<u4", 12: "<f8"}
_REFUSED = {3: "complex64 (an FFT?)", 13: "complex128 (an FFT?)", 14: "binary (a mask?)",
            23: "RGB colour", 27: "complex (packed FFT)"}
_RGB = 23
_SPECTRUM_SIGNALS = {"EELS", "EDS", "EDX", "X-RAY", "CL"}
_TIME_UNITS = {"s", "ms", "µs", "us", "ns", "min", "h"}
_IMAGE = re.compile(r"^\.ImageList\.(\d+)\.ImageData\.DataType$")


def read_dm(path: Path, version: int) -> Volume:
    """The one image of a DM3/DM4 file (its thumbnail skipped) as a read-only memory map."""
    tags = _read_tags(path, version)
    items = sorted(int(m.group(1)) for k in tags if (m := _IMAGE.match(k)))
    # GMS saves a thumbnail (RGB, 2-D) as the first ImageList entry; ncempy skips it the same way.
    if len(items) > 1 and _int(tags, path, f".ImageList.{items[0]}.ImageData.DataType") == _RGB:
        items = items[1:]
    if len(items) != 1:
        raise VolumeFormatError(f"{path}: holds {len(items)} images (ImageList entries {items}); expected one")
    base = f".ImageList.{items[0]}"
    _refuse_spectrum(path, tags, base)

    code = _int(tags, path, f"{base}.ImageData.DataType")
    if code not in _DTYPES:
        raise VolumeFormatError(f"{path}: ImageData.DataType {code} is {_REFUSED.get(code, 'unknown')}; integer "
                                f"or float images only")
    dtype = np.dtype(_DTYPES[code])
    ndim = 0
    while f"{base}.ImageData.Dimensions.{ndim + 1}" in tags:
        ndim += 1
        if ndim > 4:
            break
    if ndim not in (1, 2, 3):
        raise VolumeFormatError(f"{path}: ImageData.Dimensions has {ndim} entries; only 2-D images and 3-D stacks "
                                f"(1-D is a spectrum or profile, 4-D a 4D-STEM or spectrum-image dataset)")
    dims_xyz = tuple(_int(tags, path, f"{base}.ImageData.Dimensions.{i}") for i in range(1, ndim + 1))
    check_shape(path, dims_xyz, f"{base}.ImageData.Dimensions")
    shape = dims_xyz[::-1]  # DM lists x first
    offset = _int(tags, path, f"{base}.ImageData.Data.arrayOffset")
    nbytes = _int(tags, path, f"{base}.ImageData.Data.arraySize")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes != expected:
        raise VolumeFormatError(f"{path}: ImageData.Data holds {nbytes} bytes, its Dimensions {list(dims_xyz)} "
                                f"(x first) of {dtype} need {expected}")
    check_extent(path, offset, nbytes, path.stat().st_size, f"{base}.ImageData.Data")

    calib = []  # x first, as DM lists them
    for i in range(1, ndim + 1):
        key = f"{base}.ImageData.Calibrations.Dimension.{i}"
        unit = tags.get(f"{key}.Units", "")
        calib.append((str(unit) if unit is not None else "", tags.get(f"{key}.Scale")))
    calib_zyx = [(None, None)] * (3 - ndim) + calib[::-1]
    sizes: list[float | None] = []
    units: list[str | None] = []
    for axis, (unit, scale) in zip(AXES, calib_zyx, strict=True):
        if unit is None or is_uncalibrated(unit) or scale is None:
            sizes.append(None)
            units.append(None)
        elif axis == "z" and unit.strip() in _TIME_UNITS:
            warnings.warn(f"{path}: axis z is calibrated in {unit!r}: a time series of images, read as a stack "
                          f"with no z spacing", VolumeFormatWarning, stacklevel=3)
            sizes.append(None)
            units.append(None)
        else:
            sizes.append(length_nm(path, axis, float(scale), unit, "ImageData.Calibrations", float32=True))
            units.append(unit)

    data = as_zyx(path, np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))
    return Volume(data, (sizes[0], sizes[1], sizes[2]), f"dm{version}", path, True,
                  (units[0], units[1], units[2]), f"DM{version} ImageData.Calibrations (Dimension.1 is x)")


def _read_tags(path: Path, version: int) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(16)
    # The root tag group's length (bytes 4:8 in DM3, 4:12 in DM4) follows the 12- (DM3) or 16-byte (DM4) header;
    # real files end 4 to 8 bytes later still (ncempy's test files), so this is a lower bound on the size.
    if len(head) < 16:
        raise VolumeFormatError(f"{path}: {len(head)} bytes, shorter than a DM{version} header")
    root = struct.unpack(">I", head[4:8])[0] if version == 3 else struct.unpack(">Q", head[4:12])[0]
    announced = root + (12 if version == 3 else 16)
    size = path.stat().st_size
    if size < announced:
        raise VolumeFormatError(f"{path}: truncated: its header announces {announced} bytes, the file has {size}")
    try:
        # on_memory=False: ncempy reads only the tags; voxels are skipped (seeked over) and mapped by the caller.
        with ncempy_dm.fileDM(path, on_memory=False) as f:
            return dict(f.allTags)
    except Exception as exc:  # a third-party parser on untrusted bytes: any failure means a corrupt file
        raise VolumeFormatError(f"{path}: not a readable DM{version} file ({type(exc).__name__}: {exc})") from exc


def _int(tags: dict[str, Any], path: Path, key: str) -> int:
    value = tags.get(key)
    if value is None or isinstance(value, str):
        raise VolumeFormatError(f"{path}: DM tag {key} is missing or not a number ({value!r})")
    return int(value)


def _refuse_spectrum(path: Path, tags: dict[str, Any], base: str) -> None:
    meta = f"{base}.ImageTags.Meta Data"
    form = str(tags.get(f"{meta}.Format", ""))
    signal = str(tags.get(f"{meta}.Signal", ""))
    if "spectrum" in form.lower() or signal.upper() in _SPECTRUM_SIGNALS:
        raise VolumeFormatError(f"{path}: not an image but a spectrum (ImageTags.Meta Data.Format {form!r}, "
                                f"Signal {signal!r})")
