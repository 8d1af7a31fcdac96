"""The image-volume type every format reader returns, its errors, and lengths in any unit turned into nm."""

from __future__ import annotations

import math
import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emdata.errors import SourceMismatchError

VoxelSize = tuple[float | None, float | None, float | None]
AXES = ("z", "y", "x")
# A single axis longer than this is a corrupt header, not an EM image (the largest SBF-SEM tiles are ~10^5).
MAX_AXIS = 1 << 24
# A compressed TIFF cannot be memory-mapped: up to this many decoded bytes it is decoded page by page into one
# array; a larger one is read page by page on demand (formats.tiff.TiffPageStack), never whole.
DEFAULT_MAX_DECODED_BYTES = 64 << 20


class VolumeFormatError(SourceMismatchError, ValueError):
    """A file is not an image volume this package can read; the message names the file and the cause."""


class VolumeFormatWarning(UserWarning):
    """A file was read, but something in it is off (e.g. an MRC header without its map ID)."""


@dataclass(frozen=True, eq=False)  # eq would compare arrays element-wise: identity instead
class Volume:
    """An image or image stack read from one file, as (z, y, x) voxels with their size in nm per axis.

    ``data`` is read-only and, when ``memory_mapped`` is true, a ``numpy.memmap`` of the file (indexing reads only
    what is asked for; keep the object alive while using it). A 2-D image has ``z = 1``. ``voxel_size_nm`` is
    (z, y, x); an entry is None where the file has no calibration for that axis. ``units`` gives the unit as the
    file spells it per axis (None where uncalibrated) and ``calibration`` where the sizes were read from.
    """

    data: np.ndarray
    voxel_size_nm: VoxelSize
    source_format: str  # "dm3", "dm4", "tiff" or "mrc"
    path: Path
    memory_mapped: bool
    units: tuple[str | None, str | None, str | None]
    calibration: str

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"{self.path}: Volume.data must be (z, y, x), got shape {self.data.shape}")
        if len(self.voxel_size_nm) != 3 or len(self.units) != 3:
            raise ValueError(f"{self.path}: voxel_size_nm and units must have one entry per axis (z, y, x)")

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.data.shape
        return int(z), int(y), int(x)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype


# Lengths, in nm per unit, under the spellings DM, MRC, ImageJ, OME and TIFF resolution tags use.
_NM_PER_UNIT: dict[str, float] = {
    "pm": 1e-3, "Å": 0.1, "\u212b": 0.1, "A": 0.1, "nm": 1.0,
    "µm": 1e3, "\u03bcm": 1e3, "um": 1e3, "mm": 1e6, "cm": 1e7, "m": 1e9, "in": 2.54e7,
}
_NM_PER_WORD: dict[str, float] = {
    "picometer": 1e-3, "picometre": 1e-3, "angstrom": 0.1, "ångström": 0.1, "ang": 0.1,
    "nanometer": 1.0, "nanometre": 1.0, "micron": 1e3, "micrometer": 1e3, "micrometre": 1e3,
    "millimeter": 1e6, "millimetre": 1e6, "centimeter": 1e7, "centimetre": 1e7, "meter": 1e9, "metre": 1e9,
    "inch": 2.54e7,
}
# Units that mean "no calibration" (DM writes "", ImageJ "pixel").
UNCALIBRATED_UNITS = frozenset({"", "pixel", "pixels", "px", "pix"})
# ImageJ writes non-ASCII units as Java escapes in its description ("unit=\\u00B5m").
_JAVA_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def normalise_unit(unit: str) -> str:
    return _JAVA_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), unit.strip())


def nm_per_unit(unit: str) -> float | None:
    """nm in one ``unit`` (any spelling of pm, Å, nm, µm, mm, cm, m, inch); None if it is not a length."""
    text = normalise_unit(unit)
    if text in _NM_PER_UNIT:
        return _NM_PER_UNIT[text]
    low = text.lower()
    if text.isupper() and low in _NM_PER_UNIT and low != "a":  # "NM", "UM"; not "Mm" (megametre) nor "a"
        return _NM_PER_UNIT[low]
    return _NM_PER_WORD.get(low, _NM_PER_WORD.get(low.removesuffix("s")))


def is_uncalibrated(unit: str) -> bool:
    return normalise_unit(unit).lower() in UNCALIBRATED_UNITS


def length_nm(path: Path, axis: str, size: float, unit: str, where: str, *, float32: bool = False) -> float:
    """``size`` in ``unit`` as nm, checked (positive, finite, a length), rounded to 12 significant digits.

    ``float32``: the value was stored as float32 (DM, MRC); it is taken at its shortest decimal form, so that
    0.00799825 µm gives 7.99825 nm rather than 7.998250424861908.
    """
    factor = nm_per_unit(unit)
    if factor is None:
        raise VolumeFormatError(f"{path}: axis {axis} is calibrated in {unit!r} ({where}), not a length: not a "
                                f"spatial image (a spectrum, diffraction pattern or time series?)")
    value = float(str(np.float32(size))) if float32 else float(size)
    if not math.isfinite(value) or value <= 0:
        raise VolumeFormatError(f"{path}: axis {axis} has pixel size {size!r} {unit} ({where}): not a positive "
                                f"finite length")
    return float(f"{value * factor:.12g}")


def check_shape(path: Path, shape: tuple[int, ...], field: str) -> None:
    """Every axis of a header's shape is within 1..MAX_AXIS (VolumeFormatError names the file and the field)."""
    if not shape or any(int(n) < 1 or int(n) > MAX_AXIS for n in shape):
        raise VolumeFormatError(f"{path}: header field {field} = {list(shape)} is not a shape (each axis must be "
                                f"1..{MAX_AXIS})")


def check_extent(path: Path, offset: int, nbytes: int, file_size: int, field: str) -> None:
    """The data [offset, offset + nbytes) lies inside the file."""
    if offset < 0 or nbytes < 0 or offset + nbytes > file_size:
        raise VolumeFormatError(f"{path}: {field}: {nbytes} bytes of voxels at offset {offset} run past the end "
                                f"of the file ({file_size} bytes): truncated or corrupt")


def check_dtype(path: Path, dtype: np.dtype, where: str) -> None:
    if dtype.kind not in "iuf":
        kind = {"c": "complex (an FFT?)", "b": "boolean (a mask?)"}.get(dtype.kind, "not a number")
        raise VolumeFormatError(f"{path}: voxels are {dtype} ({where}): {kind}; integer or float images only")


def as_zyx(path: Path, data: np.ndarray) -> np.ndarray:
    """A 2-D image as (1, y, x); refuses 1-D data (a spectrum or a profile) and more than 3 axes."""
    if data.ndim == 2:
        data = data.reshape((1, *data.shape))
    if data.ndim != 3:
        raise VolumeFormatError(f"{path}: {data.ndim}-D data of shape {data.shape}: only 2-D images and 3-D stacks")
    if data.shape[1] < 2 or data.shape[2] < 2:
        raise VolumeFormatError(f"{path}: data of shape {data.shape[1:]} (y, x) is 1-D (a spectrum or a profile), "
                                f"not an image")
    return data


def file_mapping(data: np.ndarray) -> mmap.mmap | None:
    """The memory map of a file under ``data`` (a ``numpy.memmap``, or a view of one), else None."""
    obj: object = data
    while obj is not None:
        found = getattr(obj, "_mmap", None)
        if isinstance(found, mmap.mmap):
            return found
        if isinstance(obj, mmap.mmap):
            return obj
        obj = getattr(obj, "base", None)
    return None


def release_pages(data: np.ndarray) -> bool:
    """Drop this process's mapped pages of the file under ``data`` (``madvise(MADV_DONTNEED)``); False if none.

    The pages of a memory-mapped file count in the resident set while mapped: reading a whole volume through
    its map holds the whole file there (RssFile), though the kernel could drop it at any time. A read-only
    shared mapping loses nothing: the next access faults the page back in from the page cache (or the file).
    """
    mapping = file_mapping(data)
    if mapping is None or not hasattr(mapping, "madvise"):
        return False
    try:
        mapping.madvise(mmap.MADV_DONTNEED)
    except (ValueError, OSError):  # closed, or a platform without it: nothing to drop
        return False
    return True


class PagedArray:
    """A read-only (z, y, x) array-like over a memory-mapped volume whose indexing returns a copy of the box and
    then drops the mapped pages, so reading the whole file box by box keeps one box's pages resident, not the file.

    A copy rather than a view: the writer keeps boxes in flight and compares them with what it read back, which
    would fault their pages back in (measured: 1.3-2x the file-backed peak of copies, bench/README.md).
    """

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape = tuple(int(n) for n in data.shape)
        self.dtype = data.dtype
        self.ndim = data.ndim

    SLAB_BYTES = 8 * 2**20  # of the file's rows: a box is copied this much at a time, its pages dropped after each

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        view = self.data[key]  # no page touched yet
        z = key[0] if key else None
        if not isinstance(z, slice) or not isinstance(view, np.ndarray) or view.ndim != 3:
            out = np.array(view)  # a copy: views kept by the writer would fault the file's pages back in
            release_pages(self.data)
            return out
        # A box's rows are narrower than the file's pages: copying it touches whole pages of every row it crosses
        # (up to 16x the box for 256-byte rows of 4 KiB pages), so copy a few planes at a time.
        start, _, step = z.indices(self.shape[0])
        plane_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        per = max(1, self.SLAB_BYTES // max(plane_bytes, 1))
        out = np.empty(view.shape, self.dtype)
        rest = key[1:]
        for i in range(0, view.shape[0], per):
            n = min(per, view.shape[0] - i)
            lo = start + i * step
            out[i:i + n] = self.data[(slice(lo, lo + n * step, step) if step > 0 else
                                      slice(lo, lo + n * step if lo + n * step >= 0 else None, step), *rest)]
            release_pages(self.data)
        return out

    def __len__(self) -> int:
        return self.shape[0]
