"""``read_volume``: the format of an image file recognised from its first bytes, then read by its reader."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

from emdata.formats.dm import read_dm
from emdata.formats.mrc import HEADER_BYTES, has_map_id, parse_header, read_mrc
from emdata.formats.tiff import read_tiff
from emdata.formats.volume import DEFAULT_MAX_DECODED_BYTES, Volume, VolumeFormatError

log = logging.getLogger(__name__)

FORMATS = ("dm3", "dm4", "tiff", "mrc")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_EXTENSIONS = {".dm3": "dm3", ".dm4": "dm4", ".tif": "tiff", ".tiff": "tiff", ".mrc": "mrc", ".mrcs": "mrc",
               ".map": "mrc", ".st": "mrc", ".ali": "mrc", ".rec": "mrc"}


def detect_format(path: str | os.PathLike[str]) -> str:
    """"dm3", "dm4", "tiff" or "mrc", from the file's first bytes (not its name); VolumeFormatError otherwise.

    DM3/DM4: a big-endian version 3 or 4 and a byte-order flag of 0 or 1. TIFF: ``II*\\0``/``MM\\0*`` (and BigTIFF).
    MRC: the map ID ``MAP`` at byte 208, or, without it, a 1024-byte header whose fields are consistent.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as exc:
        raise VolumeFormatError(f"{p}: cannot be read ({exc})") from exc
    if len(head) >= 16:
        version = struct.unpack(">I", head[:4])[0]
        if version == 3 and struct.unpack(">I", head[8:12])[0] in (0, 1):
            return "dm3"
        if version == 4 and struct.unpack(">I", head[12:16])[0] in (0, 1):
            return "dm4"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if has_map_id(head) or parse_header(head) is not None:
        return "mrc"
    raise VolumeFormatError(f"{p}: unknown format (first bytes {head[:16].hex(' ')}, {len(head)} bytes read): not "
                            f"DM3, DM4, TIFF or MRC")


def read_volume(path: str | os.PathLike[str], *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Volume:
    """Read a DM3, DM4, TIFF or MRC image or stack as (z, y, x) voxels with their size in nm per axis.

    The format is recognised from the file's content (:func:`detect_format`); a name that says otherwise is
    logged. Voxels are memory-mapped whenever the file stores them uncompressed (DM, MRC, most TIFF); a
    compressed TIFF is decoded page by page into one array of at most ``max_decoded_bytes``; a larger one is
    returned as a ``TiffPageStack`` (indexing decodes only the pages asked for; never the whole volume at once).
    Refuses, with a :class:`VolumeFormatError` naming the file and the cause: spectra and other 1-D data,
    colour, multi-channel and 4-D data, complex or boolean voxels, calibrations that are not lengths, and
    headers whose shape or data offset do not fit the file. See :class:`Volume` for what is returned.
    """
    p = Path(path)
    fmt = detect_format(p)
    named = _EXTENSIONS.get(p.suffix.lower())
    if named is not None and named != fmt:
        log.warning("%s: named like %s but its content is %s; reading it as %s", p, named, fmt, fmt)
    if fmt in ("dm3", "dm4"):
        return read_dm(p, int(fmt[-1]))
    if fmt == "tiff":
        return read_tiff(p, max_decoded_bytes)
    return read_mrc(p)
