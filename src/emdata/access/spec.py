"""Boxes, regions of interest and the block specification shared by training and inference (axes z, y, x)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from emdata.errors import InvalidParameterError

T = TypeVar("T")

AXES: tuple[str, str, str] = ("z", "y", "x")

BorderMode = Literal["constant", "reflect", "edge", "shrink", "drop"]
PAD_MODES: tuple[str, ...] = ("constant", "reflect", "edge")
BORDER_MODES: tuple[str, ...] = get_args(BorderMode)

Triple = tuple[int, int, int]


def as_triple(value: int | Sequence[int], name: str, *, minimum: int = 0) -> Triple:
    """Broadcast an int to (z, y, x) or check a 3-sequence; every value must be an integer >= ``minimum``."""
    if type(value) is tuple and len(value) == 3:  # the common case, e.g. every Box the library makes: plain ints
        a, b, c = value
        if type(a) is int and type(b) is int and type(c) is int and a >= minimum and b >= minimum and c >= minimum:
            return value  # type: ignore[return-value]
    if isinstance(value, (int,)) and not isinstance(value, bool):
        values: Sequence[Any] = (value, value, value)
    else:
        try:
            values = tuple(value)  # type: ignore[arg-type]
        except TypeError:
            raise InvalidParameterError(f"{name} must be an int or three ints (z, y, x), got {value!r}") from None
    if len(values) != 3:
        raise InvalidParameterError(
            f"{name} must have 3 values for the axes (z, y, x), got {len(values)}: {tuple(values)!r}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not float(v).is_integer():
            raise InvalidParameterError(f"{name} must be integers (z, y, x), got {tuple(values)!r}")
        out.append(int(v))
    if any(v < minimum for v in out):
        raise InvalidParameterError(f"{name} must be >= {minimum} on every axis (z, y, x), got {tuple(out)!r}")
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class Box:
    """A half-open voxel box ``[start, stop)`` on the axes (z, y, x); it may extend outside an array."""

    start: Triple
    stop: Triple

    def __post_init__(self) -> None:
        start = as_triple(self.start, "box start", minimum=-(2**62))
        stop = as_triple(self.stop, "box stop", minimum=-(2**62))
        if any(b < a for a, b in zip(start, stop, strict=True)):
            raise InvalidParameterError(f"box stop {stop!r} must be >= start {start!r} on every axis (z, y, x)")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)

    @classmethod
    def from_shape(cls, shape: Sequence[int], start: Sequence[int] = (0, 0, 0)) -> Box:
        return cls(tuple(start), tuple(a + s for a, s in zip(start, shape, strict=True)))  # type: ignore[arg-type]

    @property
    def shape(self) -> Triple:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    def grow(self, amount: Sequence[int]) -> Box:
        """The box widened by ``amount`` voxels on both sides of each axis."""
        return Box(tuple(a - h for a, h in zip(self.start, amount, strict=True)),  # type: ignore[arg-type]
                   tuple(b + h for b, h in zip(self.stop, amount, strict=True)))  # type: ignore[arg-type]

    def intersect(self, other: Box) -> Box | None:
        start = tuple(max(a, b) for a, b in zip(self.start, other.start, strict=True))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        if any(b <= a for a, b in zip(start, stop, strict=True)):
            return None
        return Box(start, stop)  # type: ignore[arg-type]

    def contains(self, other: Box) -> bool:
        return all(a <= c and d <= b for a, b, c, d in zip(self.start, self.stop, other.start, other.stop, strict=True))

    def relative_to(self, outer: Box) -> tuple[slice, slice, slice]:
        """Slices that select this box inside an array holding ``outer``."""
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, outer.start, strict=True))  # type: ignore[return-value]

    def key(self) -> str:
        """A file-name-safe identifier, e.g. ``z0-64_y0-64_x64-128``."""
        return "_".join(f"{ax}{a}-{b}" for ax, a, b in zip(AXES, self.start, self.stop, strict=True))


@dataclass(frozen=True)
class RoiNm:
    """A region in physical coordinates (nm, axes z, y, x): voxels whose centres lie in ``[start_nm, stop_nm)``."""

    start_nm: tuple[float, float, float]
    stop_nm: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name, v in (("start_nm", self.start_nm), ("stop_nm", self.stop_nm)):
            if len(v) != 3:
                raise InvalidParameterError(f"RoiNm.{name} must have 3 values (z, y, x), got {tuple(v)!r}")
        object.__setattr__(self, "start_nm", tuple(float(v) for v in self.start_nm))
        object.__setattr__(self, "stop_nm", tuple(float(v) for v in self.stop_nm))
        if any(b <= a for a, b in zip(self.start_nm, self.stop_nm, strict=True)):
            raise InvalidParameterError(
                f"RoiNm stop_nm {self.stop_nm!r} must be > start_nm {self.start_nm!r} on every axis (z, y, x)")

    def to_voxels(self, voxel_size_nm: Sequence[float], translation_nm: Sequence[float]) -> Box:
        # Voxel i is centred at translation + i * voxel_size; tiny tolerance absorbs float round-off.
        eps = 1e-9
        start = tuple(math.ceil((a - t) / v - eps) for a, t, v in zip(self.start_nm, translation_nm, voxel_size_nm, strict=True))
        stop = tuple(math.ceil((b - t) / v - eps) for b, t, v in zip(self.stop_nm, translation_nm, voxel_size_nm, strict=True))
        stop = tuple(max(a, b) for a, b in zip(start, stop, strict=True))
        return Box(start, stop)  # type: ignore[arg-type]


def box_to_nm(box: Box, voxel_size_nm: Sequence[float], translation_nm: Sequence[float]) -> RoiNm | None:
    """The physical extent (voxel edges, nm) of a non-empty box."""
    if box.size == 0:
        return None
    return RoiNm(tuple(t + (a - 0.5) * v for a, t, v in zip(box.start, translation_nm, voxel_size_nm, strict=True)),  # type: ignore[arg-type]
                 tuple(t + (b - 0.5) * v for b, t, v in zip(box.stop, translation_nm, voxel_size_nm, strict=True)))  # type: ignore[arg-type]


def _coerce_roi(value: Any, cls: type[T], name: str, expected: str) -> T | None:
    """``value`` as a ``cls`` (a Box or RoiNm), accepting a (start, stop) pair; None stays None."""
    if value is None or isinstance(value, cls):
        return value
    try:
        start, stop = value
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be a {expected} with 3 values each (z, y, x), got {value!r}") from None
    return cls(tuple(start), tuple(stop))  # type: ignore[call-arg]


@dataclass(frozen=True)
class BlockSpec:
    """How to cut an array into blocks, for training and inference alike (all sizes in voxels, axes z, y, x).

    ``block_shape_voxels`` is the block a model predicts; ``halo_voxels`` of context are added on every side
    when reading. Neighbouring blocks overlap by ``overlap_voxels`` (stride = block - overlap). ``border``
    says what happens where a block or its halo leaves the array: pad (``constant``/``reflect``/``edge``,
    exactly like ``numpy.pad``), ``shrink`` the block and halo to the array, or ``drop``: never read outside,
    so only voxels with a full halo inside the array are covered. ``level`` picks the pyramid level (None:
    the level the array was opened at); the ROI is given in voxels of that level or in nm, not both.
    """

    block_shape_voxels: Triple
    halo_voxels: Triple = (0, 0, 0)
    overlap_voxels: Triple = (0, 0, 0)
    border: BorderMode = "constant"
    constant_value: float = 0
    level: int | None = None
    roi_voxels: Box | None = None
    roi_nm: RoiNm | None = None

    def __post_init__(self) -> None:
        block = as_triple(self.block_shape_voxels, "block_shape_voxels", minimum=1)
        halo = as_triple(self.halo_voxels, "halo_voxels", minimum=0)
        overlap = as_triple(self.overlap_voxels, "overlap_voxels", minimum=0)
        if any(o >= b for o, b in zip(overlap, block, strict=True)):
            raise InvalidParameterError(
                f"overlap_voxels {overlap!r} must be smaller than block_shape_voxels {block!r} on every axis")
        if self.border not in BORDER_MODES:
            raise InvalidParameterError(f"border must be one of {BORDER_MODES}, got {self.border!r}")
        if self.level is not None and (isinstance(self.level, bool) or int(self.level) != self.level or self.level < 0):
            raise InvalidParameterError(f"level must be a non-negative int or None, got {self.level!r}")
        roi_voxels = _coerce_roi(self.roi_voxels, Box, "roi_voxels", "Box or (start, stop)")
        if roi_voxels is not None and roi_voxels.size == 0:
            raise InvalidParameterError(f"roi_voxels {roi_voxels!r} is empty")
        roi_nm = _coerce_roi(self.roi_nm, RoiNm, "roi_nm", "RoiNm or (start_nm, stop_nm)")
        if roi_voxels is not None and roi_nm is not None:
            raise InvalidParameterError("give roi_voxels or roi_nm, not both")
        object.__setattr__(self, "block_shape_voxels", block)
        object.__setattr__(self, "halo_voxels", halo)
        object.__setattr__(self, "overlap_voxels", overlap)
        object.__setattr__(self, "roi_voxels", roi_voxels)
        object.__setattr__(self, "roi_nm", roi_nm)

    @property
    def stride_voxels(self) -> Triple:
        return tuple(b - o for b, o in zip(self.block_shape_voxels, self.overlap_voxels, strict=True))  # type: ignore[return-value]

    @property
    def read_shape_voxels(self) -> Triple:
        """Shape of a full block with its halo (what pad and drop modes always return)."""
        return tuple(b + 2 * h for b, h in zip(self.block_shape_voxels, self.halo_voxels, strict=True))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_shape_voxels": list(self.block_shape_voxels), "halo_voxels": list(self.halo_voxels),
            "overlap_voxels": list(self.overlap_voxels), "border": self.border,
            "constant_value": self.constant_value, "level": self.level,
            "roi_voxels": None if self.roi_voxels is None else [list(self.roi_voxels.start), list(self.roi_voxels.stop)],
            "roi_nm": None if self.roi_nm is None else [list(self.roi_nm.start_nm), list(self.roi_nm.stop_nm)],
        }
