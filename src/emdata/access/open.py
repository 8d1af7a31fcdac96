"""Open one scale level of a project OME-Zarr (by dataset name or path) for block reads in z, y, x order."""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from emdata.access.cache import ChunkCache, default_cache
from emdata.access.spec import AXES, PAD_MODES, Box, RoiNm, box_to_nm
from emdata.errors import InvalidParameterError
from emdata.ngff import Geometry, ome_attrs

Backend = Literal["auto", "tensorstore", "zarr"]
BACKENDS: tuple[str, ...] = ("auto", "tensorstore", "zarr")
_UNIT_TO_NM = {"nanometer": 1.0, "micrometer": 1000.0, "angstrom": 0.1, None: 1.0}


def default_data_root() -> Path:
    """``$EMDATA_DATA_ROOT`` if set, else ``./data``."""
    return Path(os.environ.get("EMDATA_DATA_ROOT", "data"))


def resolve_dataset(name_or_path: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None) -> Path:
    """A path to an existing ``.zarr`` group, or a dataset name looked up as ``<data_root>/<name>.zarr``."""
    path = Path(name_or_path)
    if path.exists():
        return path
    root = Path(data_root) if data_root is not None else default_data_root()
    candidate = root / f"{name_or_path}.zarr"
    if candidate.exists():
        return candidate
    available = sorted(p.name[: -len(".zarr")] for p in root.glob("*.zarr")) if root.is_dir() else []
    raise InvalidParameterError(
        f"unknown dataset {str(name_or_path)!r}: no such path and no {candidate}; "
        f"datasets available under {root}: {available or 'none'}"
    )


@dataclass(frozen=True)
class ArrayRef:
    """Where a level lives: the OME-Zarr group, optional sub-group and label, and the level index."""

    root: Path
    group: str | None
    label: str | None
    level: int


@dataclass
class EmArray:
    """One scale level of an OME-Zarr image or label, read in (z, y, x) order; physical units are nm.

    ``voxel_size_nm`` and ``translation_nm`` are this level's ``scale`` and ``translation`` (the centre of
    voxel (0, 0, 0)). Reads go through tensorstore (``backend="tensorstore"``) or zarr-python, both backed by
    the same bounded ``cache`` of decoded chunks; ``backend`` is the one actually in use.
    """

    ref: ArrayRef
    shape: tuple[int, int, int]
    dtype: np.dtype
    chunks: tuple[int, int, int]
    shards: tuple[int, int, int] | None
    voxel_size_nm: tuple[float, float, float]
    translation_nm: tuple[float, float, float]
    n_levels: int
    backend: Backend
    cache: ChunkCache
    array_dir: Path
    axes: tuple[str, str, str] = AXES
    _store: Any = field(default=None, repr=False)

    @property
    def level(self) -> int:
        return self.ref.level

    @property
    def path(self) -> Path:
        """The zarr array directory of this level."""
        return self.array_dir

    @property
    def bounds(self) -> Box:
        return Box((0, 0, 0), self.shape)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.voxel_size_nm, self.translation_nm)

    def at_level(self, level: int) -> EmArray:
        """The same image or label at another scale level, sharing backend and cache."""
        if level == self.level:
            return self
        return open_array(self.ref.root, level=level, label=self.ref.label, group=self.ref.group,
                          backend=self.backend, cache=self.cache)

    def box_nm(self, box: Box) -> RoiNm | None:
        return box_to_nm(box, self.voxel_size_nm, self.translation_nm)

    def roi_to_voxels(self, roi: RoiNm) -> Box:
        return roi.to_voxels(self.voxel_size_nm, self.translation_nm)

    def read(self, box: Box) -> np.ndarray:
        """Read a box that lies inside the array; returns a new (z, y, x) array."""
        out = np.empty(box.shape, self.dtype)
        self.read_into(box, out)
        return out

    def read_into(self, box: Box, out: np.ndarray) -> None:
        """Read a box that lies inside the array into ``out`` (an array or view of the box's shape)."""
        if not self.bounds.contains(box):
            raise InvalidParameterError(f"box {box} is outside the array of shape {self.shape} (z, y, x)")
        if out.shape != box.shape:
            raise InvalidParameterError(f"out has shape {out.shape}, the box {box.shape} (z, y, x)")
        if box.size == 0:
            return
        if self.backend == "tensorstore":
            import tensorstore as ts

            # Copy decoded chunks straight into ``out``: one copy fewer than read() then assignment.
            ts.array(out, copy=False, write=True).write(self._store[box.slices]).result()
        else:
            self._read_zarr(box, out)

    def read_padded(self, box: Box, mode: str = "constant", constant_value: float = 0) -> np.ndarray:
        """Read any box; voxels outside the array follow ``numpy.pad(array, ..., mode)`` exactly."""
        if mode not in PAD_MODES:
            raise InvalidParameterError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
        if self.bounds.contains(box):
            return self.read(box)
        if box.size == 0:
            return np.full(box.shape, constant_value, dtype=self.dtype)
        inner = box.intersect(self.bounds)
        if mode == "constant":
            out = np.full(box.shape, constant_value, dtype=self.dtype)
            if inner is not None:
                self.read_into(inner, out[inner.relative_to(box)])
            return out
        # The source voxels the padding needs: on each padded side, from the array border at least as far
        # in as numpy.pad's first reflection reaches (the whole axis if it reflects more than once).
        starts, stops, widths = [], [], []
        for a, b, n in zip(box.start, box.stop, self.shape, strict=True):
            idx = _pad_indices(a, b, n, mode)
            lo, hi = max(-a, 0), max(b - n, 0)
            start, stop = int(idx.min()), int(idx.max()) + 1
            if lo:
                start, stop = 0, max(stop, min(lo, n - 1) + 1)
            if hi:
                start, stop = min(start, n - 1 - min(hi, n - 1)), n
            starts.append(start)
            stops.append(stop)
            widths.append((lo, hi))
        source = Box(tuple(starts), tuple(stops))  # type: ignore[arg-type]
        single = all(max(w) <= n - 1 or mode == "edge" for w, n in zip(widths, self.shape, strict=True))
        if source == inner and single:
            # The usual case (a halo crossing the border): read in place, mirror the margins like numpy.pad.
            out = np.empty(box.shape, self.dtype)
            self.read_into(inner, out[inner.relative_to(box)])
            for axis, (lo, hi) in enumerate(widths):
                _fill_margins(out, axis, lo, hi, mode)
            return out
        padded = np.pad(self.read(source), widths, mode=mode)  # type: ignore[call-overload]
        crop = tuple(slice(a - (s - w[0]), b - (s - w[0]))
                     for a, b, s, w in zip(box.start, box.stop, source.start, widths, strict=True))
        return padded[crop]

    def _load_chunk(self, cbox: Box) -> np.ndarray:
        return np.asarray(self._store[cbox.slices])

    def _read_zarr(self, box: Box, out: np.ndarray) -> None:
        if self.cache.total_bytes == 0:
            out[...] = self._store[box.slices]
            return
        # Assemble from whole decoded chunks so that overlapping reads decode each chunk once.
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(box.start, box.stop, self.chunks, strict=True)]
        for cidx in itertools.product(*ranges):
            cbox = Box(tuple(i * c for i, c in zip(cidx, self.chunks, strict=True)),  # type: ignore[arg-type]
                       tuple(min((i + 1) * c, n) for i, c, n in zip(cidx, self.chunks, self.shape, strict=True)))  # type: ignore[arg-type]
            key = (str(self.path), cidx)
            chunk = self.cache.get_or_load(key, functools.partial(self._load_chunk, cbox))
            part = cbox.intersect(box)
            assert part is not None
            out[part.relative_to(box)] = chunk[part.relative_to(cbox)]


def _fill_margins(out: np.ndarray, axis: int, lo: int, hi: int, mode: str) -> None:
    """Fill ``lo`` leading and ``hi`` trailing planes of ``axis`` from the planes between, as numpy.pad does."""
    n = out.shape[axis] - lo - hi

    def sl(a: int, b: int, step: int = 1) -> tuple[slice, ...]:
        index = [slice(None)] * out.ndim
        index[axis] = slice(a, b, step) if step == 1 else slice(b - 1, a - 1 if a > 0 else None, -1)
        return tuple(index)

    if lo:
        out[sl(0, lo)] = out[sl(lo, lo + 1)] if mode == "edge" or n == 1 else out[sl(lo + 1, 2 * lo + 1, -1)]
    if hi:
        end = lo + n
        if mode == "edge" or n == 1:
            out[sl(end, end + hi)] = out[sl(end - 1, end)]
        else:
            out[sl(end, end + hi)] = out[sl(end - 1 - hi, end - 1, -1)]


def _pad_indices(start: int, stop: int, n: int, mode: str) -> np.ndarray:
    """Source index of each coordinate in [start, stop) under numpy.pad's ``edge`` or ``reflect`` rule."""
    idx = np.arange(start, stop)
    if mode == "edge" or n == 1:
        return np.clip(idx, 0, n - 1)
    period = 2 * (n - 1)  # reflect without repeating the edge voxel: 0 1 .. n-1 n-2 .. 1 | 0 1 ..
    r = np.mod(idx, period)
    return np.where(r < n, r, period - r)


def _multiscales(group_path: Path) -> dict[str, Any]:
    try:
        group = zarr.open_group(str(group_path), mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:  # type: ignore[attr-defined]
        raise InvalidParameterError(f"no zarr v3 group at {group_path}") from exc
    ome = ome_attrs(group)
    if not ome.get("multiscales"):
        subgroups = sorted(name for name, _ in group.groups())
        raise InvalidParameterError(
            f"{group_path} has no OME-Zarr multiscales; pick a sub-group with group= (available: {subgroups or 'none'})"
        )
    return ome["multiscales"][0]


def _transforms(dataset: dict[str, Any], axis_units: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scale: tuple[float, ...] = (1.0, 1.0, 1.0)
    translation: tuple[float, ...] = (0.0, 0.0, 0.0)
    for t in dataset.get("coordinateTransformations", []):
        if t["type"] == "scale":
            scale = tuple(float(v) * u for v, u in zip(t["scale"], axis_units, strict=True))
        elif t["type"] == "translation":
            translation = tuple(float(v) * u for v, u in zip(t["translation"], axis_units, strict=True))
    return scale, translation


def _open_tensorstore(adir: Path, cache: ChunkCache) -> Any:
    import tensorstore as ts

    return ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(adir.resolve())},
         # Pulled data is immutable: trust cached chunks instead of re-validating them on every read.
         "recheck_cached_data": "open", "recheck_cached_metadata": "open"},
        read=True, context=cache.ts_context,
    ).result()


def open_array(
    name_or_path: str | os.PathLike[str],
    *,
    level: int = 0,
    label: str | None = None,
    group: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
    backend: Backend = "auto",
    cache: ChunkCache | None = None,
) -> EmArray:
    """Open scale ``level`` of a dataset (``"epfl"`` -> ``<data_root>/epfl.zarr``) or of an OME-Zarr path.

    ``group`` selects a sub-group holding the image (e.g. ``"training"``), ``label`` one of its
    ``labels/<name>``. The result carries the level's voxel size, translation (nm) and axes (z, y, x).
    ``backend="auto"`` reads through tensorstore and falls back to zarr-python if tensorstore is missing
    or cannot open the array.
    """
    if backend not in BACKENDS:
        raise InvalidParameterError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise InvalidParameterError(f"level must be an int, got {level!r}")
    root = resolve_dataset(name_or_path, data_root)
    base = root / group if group else root
    if group and not base.exists():
        raise InvalidParameterError(f"no sub-group {group!r} in {root}")
    if label is not None:
        labels_dir = base / "labels"
        if not (labels_dir / label).exists():
            names = sorted(p.name for p in labels_dir.iterdir() if p.is_dir()) if labels_dir.is_dir() else []
            raise InvalidParameterError(f"no label {label!r} in {base}; labels available: {names or 'none'}")
        base = labels_dir / label
    ms = _multiscales(base)
    datasets = ms["datasets"]
    if not 0 <= level < len(datasets):
        raise InvalidParameterError(
            f"scale level {level} does not exist in {base}: levels 0..{len(datasets) - 1} are available")
    axes = ms.get("axes", [{"name": a} for a in AXES])
    axis_names = tuple(a["name"] if isinstance(a, dict) else a for a in axes)
    if axis_names != AXES:
        raise InvalidParameterError(f"{base} has axes {axis_names}; emdata.access reads 3-D (z, y, x) images only")
    units = []
    for a in axes:
        unit = a.get("unit") if isinstance(a, dict) else None
        if unit not in _UNIT_TO_NM:
            raise InvalidParameterError(f"unsupported axis unit {unit!r} in {base}; expected nanometer")
        units.append(_UNIT_TO_NM[unit])
    scale, translation = _transforms(datasets[level], units)
    ref = ArrayRef(root=root, group=group, label=label, level=int(level))
    adir = base / datasets[level]["path"]
    zarray = zarr.open_array(str(adir), mode="r", zarr_format=3)
    if zarray.ndim != 3:
        raise InvalidParameterError(f"{adir} has {zarray.ndim} axes; expected 3 (z, y, x)")
    shards = tuple(zarray.shards) if zarray.shards is not None else None
    cache = cache if cache is not None else default_cache()
    store: Any = None
    if backend in ("auto", "tensorstore"):
        try:
            store = _open_tensorstore(adir, cache)
            backend = "tensorstore"
        except (ImportError, ValueError) as exc:
            if backend == "tensorstore":
                raise InvalidParameterError(f"tensorstore cannot open {adir}: {exc}") from exc
    if store is None:
        store, backend = zarray, "zarr"
    return EmArray(
        ref=ref, shape=tuple(int(s) for s in zarray.shape), dtype=np.dtype(zarray.dtype),  # type: ignore[arg-type]
        chunks=tuple(int(c) for c in zarray.chunks), shards=shards,  # type: ignore[arg-type]
        voxel_size_nm=scale, translation_nm=translation, n_levels=len(datasets),  # type: ignore[arg-type]
        backend=backend, cache=cache, array_dir=adir, _store=store,
    )
