"""MRC/CCP4 maps, image stacks and images (mrcfile, permissive): memory-mapped, voxel size from the header in nm."""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE
from mrcfile.utils import byte_order_from_machine_stamp, data_dtype_from_header

from emdata.formats.volume import (
    MAX_AXIS,
    Volume,
    VolumeFormatError,
    VolumeFormatWarning,
    as_zyx,
    check_dtype,
    check_extent,
    length_nm,
)

HEADER_BYTES = HEADER_DTYPE.itemsize  # 1024
MAP_ID_OFFSET = 208
_MODES = {0, 1, 2, 3, 4, 6, 12, 101}


def _oriented(head: bytes) -> np.recarray:
    """The header in the byte order of its machine stamp, or the other one when only that gives a known mode
    (files with a wrong stamp exist; mrcfile does the same)."""
    raw = np.frombuffer(head[:HEADER_BYTES], dtype=HEADER_DTYPE).reshape(())
    try:
        stamped = byte_order_from_machine_stamp(raw["machst"])
    except ValueError:
        stamped = "<"
    other = ">" if stamped == "<" else "<"
    for order in (stamped, other):
        header = raw.view(HEADER_DTYPE.newbyteorder(order)).view(np.recarray)
        if int(header.mode) in _MODES:
            return header
    return raw.view(HEADER_DTYPE.newbyteorder(stamped)).view(np.recarray)


def header_problem(header: np.recarray) -> str | None:
    """The first header field that makes no sense, as 'field = value: why'; None if all do."""
    if int(header.mode) not in _MODES:
        return f"mode = {int(header.mode)}: not an MRC mode {sorted(_MODES)}"
    shape = [int(header.nx), int(header.ny), int(header.nz)]
    if any(n < 1 or n > MAX_AXIS for n in shape):
        return f"nx, ny, nz = {shape}: each must be 1..{MAX_AXIS}"
    mapping = [int(header.mapc), int(header.mapr), int(header.maps)]
    if sorted(mapping) != [1, 2, 3]:
        return f"mapc, mapr, maps = {mapping}: not a permutation of 1, 2, 3"
    if int(header.nsymbt) < 0:
        return f"nsymbt = {int(header.nsymbt)}: a negative extended-header size"
    return None


def parse_header(head: bytes) -> np.recarray | None:
    """The 1024-byte header if its fields make sense (see :func:`header_problem`), else None.

    Used to recognise MRC files whose header lacks the map ID.
    """
    if len(head) < HEADER_BYTES:
        return None
    header = _oriented(head)
    return header if header_problem(header) is None else None


def has_map_id(head: bytes) -> bool:
    return head[MAP_ID_OFFSET:MAP_ID_OFFSET + 3] == b"MAP"


def read_mrc(path: Path) -> Volume:
    """An MRC image, image stack or volume as a read-only memory map; warns (VolumeFormatWarning) when read
    permissively, e.g. for a header without the map ID."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise VolumeFormatError(f"{path}: {len(head)} bytes, shorter than an MRC header ({HEADER_BYTES})")
    header = _oriented(head)
    problem = header_problem(header)
    if problem is not None:
        raise VolumeFormatError(f"{path}: MRC header field {problem}")
    shape_xyz = (int(header.nx), int(header.ny), int(header.nz))
    mode = int(header.mode)
    try:
        dtype = data_dtype_from_header(header)
    except ValueError as exc:
        raise VolumeFormatError(f"{path}: MRC mode {mode} has no numeric type ({exc})") from exc
    check_dtype(path, dtype, f"MRC mode {mode}")
    if int(header.ispg) >= 401:
        raise VolumeFormatError(f"{path}: MRC space group {int(header.ispg)} is a stack of volumes (4-D)")
    offset = HEADER_BYTES + int(header.nsymbt)
    nbytes = int(np.prod(shape_xyz, dtype=np.int64)) * dtype.itemsize
    check_extent(path, offset, nbytes, size, "nx * ny * nz after the header and nsymbt")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
                data = mrc.data
        except Exception as exc:  # a third-party parser on untrusted bytes: any failure means a corrupt file
            raise VolumeFormatError(f"{path}: not a readable MRC file ({type(exc).__name__}: {exc})") from exc
    if not has_map_id(head):
        warnings.warn(f"{path}: MRC header has no map ID ('MAP ' at byte {MAP_ID_OFFSET}); its other fields are "
                      f"consistent, read with mrcfile's permissive mode", VolumeFormatWarning, stacklevel=3)
    for w in caught:
        if "Map ID string not found" in str(w.message):
            continue  # said above, in plainer words
        warnings.warn(f"{path}: {w.message} (read with mrcfile's permissive mode)", VolumeFormatWarning,
                      stacklevel=3)
    if data is None or data.size != int(np.prod(shape_xyz)):
        raise VolumeFormatError(f"{path}: mrcfile read no data of the header's shape {list(shape_xyz)} (x, y, z)")
    data = data.reshape(shape_xyz[::-1])  # (sections, rows, columns)
    # Sections, rows and columns lie along the physical axes maps, mapr, mapc (1 = X, 2 = Y, 3 = Z).
    along = (int(header.maps), int(header.mapr), int(header.mapc))
    if along != (3, 2, 1):
        data = data.transpose([along.index(3), along.index(2), along.index(1)])

    sizes: list[float | None] = []
    for axis, cell, sampling, n in (("z", header.cella.z, header.mz, header.nz),
                                    ("y", header.cella.y, header.my, header.ny),
                                    ("x", header.cella.x, header.mx, header.nx)):
        # Space group 0 is an image or image stack: cella.z is a z spacing only where mz samples the nz > 1
        # sections like a volume (IMOD, temp.mrc); mrcfile writes mz = 1 for stacks and single images.
        stack = axis == "z" and int(header.ispg) == 0 and not int(sampling) == int(n) > 1
        if int(sampling) <= 0 or float(cell) == 0 or stack:
            sizes.append(None)
        else:
            voxel = float(str(np.float32(cell))) / int(sampling)
            sizes.append(length_nm(path, axis, voxel, "Å", "MRC cella / mx, my, mz"))
    units = tuple("Å" if s is not None else None for s in sizes)
    return Volume(as_zyx(path, data), (sizes[0], sizes[1], sizes[2]), "mrc", path, True,
                  (units[0], units[1], units[2]), "MRC header cella (Å) / mx, my, mz")
