"""A minimal Gatan DigitalMicrograph 3 (DM3) writer: one 2-D image plus its RGB thumbnail, as GMS lays them out.

File layout (DM3, version 3): a big-endian header ``version=3, root_length=file_size-16, byte_order=1``, the root
tag group, then 8 zero bytes. A tag group is ``is_sorted, is_open`` (1 byte each), a big-endian uint32 tag count,
then its tags; a tag is ``kind`` (20 = group, 21 = data), a big-endian uint16 label length and the label, then a
group or ``%%%%``, a big-endian uint32 count of type descriptors, the descriptors (big-endian uint32) and the
value, little-endian (byte_order=1). ``ImageList`` holds the thumbnail (DataType 23, RGBA) first and the image
second; each has ``ImageData`` with ``Calibrations`` (per-dimension Origin, Scale, Units), ``Data``,
``DataType``, ``Dimensions`` (x first) and ``PixelDepth``. Units are arrays of UTF-16 code units.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

# Tag value encodings (the type descriptor of a tag).
SHORT, LONG, USHORT, ULONG, FLOAT, DOUBLE, BOOLEAN, CHAR, OCTET = 2, 3, 4, 5, 6, 7, 8, 9, 10
STRUCT, STRING, ARRAY = 15, 18, 20
_ENCODING_DTYPE = {SHORT: "<i2", LONG: "<i4", USHORT: "<u2", ULONG: "<u4", FLOAT: "<f4", DOUBLE: "<f8",
                   BOOLEAN: "<u1", CHAR: "<i1", OCTET: "<u1"}
# Image DataType (ImageData.DataType) for each numpy dtype, and the array encoding GMS uses for its Data.
IMAGE_DATA_TYPES: dict[np.dtype, tuple[int, int]] = {
    np.dtype(np.int16): (1, SHORT), np.dtype(np.float32): (2, FLOAT), np.dtype(np.uint8): (6, OCTET),
    np.dtype(np.int32): (7, LONG), np.dtype(np.int8): (9, CHAR), np.dtype(np.uint16): (10, USHORT),
    np.dtype(np.uint32): (11, ULONG), np.dtype(np.float64): (12, DOUBLE),
}
RGBA_DATA_TYPE = 23
_GROUP, _DATA = 20, 21


@dataclass(frozen=True)
class Scalar:
    encoding: int
    value: float | int


@dataclass(frozen=True)
class Array:
    encoding: int
    values: np.ndarray  # 1-D, written little-endian in the encoding's dtype


Tag = tuple[str, Union["Group", Scalar, Array]]
Group = list[Tag]


def text(value: str) -> Array:
    """A DM string: an array of UTF-16 code units (how GMS stores Units and Name)."""
    return Array(USHORT, np.frombuffer(value.encode("utf-16-le"), dtype="<u2"))


def _encode_tag(label: str, value: Group | Scalar | Array) -> bytes:
    name = label.encode("latin-1")
    if isinstance(value, list):
        return struct.pack(">BH", _GROUP, len(name)) + name + _encode_group(value)
    if isinstance(value, Scalar):
        info = [value.encoding]
        payload = np.asarray(value.value, dtype=_ENCODING_DTYPE[value.encoding]).tobytes()
    else:
        info = [ARRAY, value.encoding, value.values.size]
        payload = np.ascontiguousarray(value.values, dtype=_ENCODING_DTYPE[value.encoding]).tobytes()
    return (struct.pack(">BH", _DATA, len(name)) + name + b"%%%%"
            + struct.pack(f">{len(info) + 1}I", len(info), *info) + payload)


def _encode_group(tags: Group) -> bytes:
    # Unnamed tags (list items such as Dimensions) have an empty label; readers number them 1, 2, ...
    return struct.pack(">BBI", 1, 0, len(tags)) + b"".join(_encode_tag(k, v) for k, v in tags)


def _calibrations(scales: Sequence[float], units: Sequence[str]) -> Group:
    """Calibrations for dimensions in DM order (x first)."""
    dims: Group = [("", [("Origin", Scalar(FLOAT, 0.0)), ("Scale", Scalar(FLOAT, s)), ("Units", text(u))])
                   for s, u in zip(scales, units, strict=True)]
    return [
        ("Brightness", [("Origin", Scalar(FLOAT, 0.0)), ("Scale", Scalar(FLOAT, 1.0)), ("Units", text(""))]),
        ("Dimension", dims),
        ("DisplayCalibratedUnits", Scalar(BOOLEAN, 1)),
    ]


def _image_entry(name: str, data: Array, data_type: int, pixel_depth: int, shape_yx: tuple[int, int],
                 scales_yx: Sequence[float], units_yx: Sequence[str], tags: Group) -> Group:
    height, width = shape_yx
    return [
        ("ImageData", [
            ("Calibrations", _calibrations([scales_yx[1], scales_yx[0]], [units_yx[1], units_yx[0]])),
            ("Data", data),
            ("DataType", Scalar(LONG, data_type)),
            ("Dimensions", [("", Scalar(ULONG, width)), ("", Scalar(ULONG, height))]),
            ("PixelDepth", Scalar(ULONG, pixel_depth)),
        ]),
        ("ImageTags", tags),
        ("Name", text(name)),
    ]


def thumbnail_rgba(image: np.ndarray, size: int = 128) -> np.ndarray:
    """A grey RGBA thumbnail (uint32 per pixel) of at most ``size`` pixels a side, by striding."""
    step = max(1, -(-max(image.shape) // size))
    grey = image[::step, ::step]
    lo, hi = float(grey.min()), float(grey.max())
    grey = ((grey.astype(np.float32) - lo) * (255.0 / (hi - lo if hi > lo else 1.0))).astype(np.uint32)
    return grey | (grey << 8) | (grey << 16) | (np.uint32(255) << 24)


def encode_dm3(image: np.ndarray, *, pixel_size: tuple[float, float], units: str | tuple[str, str] = "µm",
               name: str = "", image_tags: Group | None = None) -> bytes:
    """The bytes of a DM3 file holding ``image`` (y, x) with ``pixel_size`` (y, x) in ``units`` (one for both
    axes, or (y, x))."""
    if image.ndim != 2:
        raise ValueError(f"DM3 writer takes a 2-D image (y, x), got shape {image.shape}")
    if image.dtype not in IMAGE_DATA_TYPES:
        raise ValueError(f"DM3 writer has no DataType for {image.dtype}; valid: {sorted(map(str, IMAGE_DATA_TYPES))}")
    data_type, encoding = IMAGE_DATA_TYPES[image.dtype]
    units_yx = (units, units) if isinstance(units, str) else (units[0], units[1])
    thumb = thumbnail_rgba(image)
    image_list: Group = [
        ("", _image_entry("Thumbnail", Array(LONG, thumb.ravel().view("<i4")), RGBA_DATA_TYPE, 4,
                          thumb.shape, (1.0, 1.0), ("", ""), [])),
        ("", _image_entry(name, Array(encoding, image.ravel()), data_type, image.dtype.itemsize, image.shape,
                          pixel_size, units_yx, image_tags or [])),
    ]
    root: Group = [("ImageList", image_list)]
    body = _encode_group(root)
    total = 12 + len(body) + 8
    return struct.pack(">III", 3, total - 16, 1) + body + bytes(8)


def write_dm3(path: Path, image: np.ndarray, **kwargs: Any) -> None:
    """Write ``image`` (y, x) as a DM3 file at ``path``; see :func:`encode_dm3`."""
    Path(path).write_bytes(encode_dm3(image, **kwargs))
