"""Lazy xarray views of a dataset level: dask-backed ``DataArray`` with dims (z, y, x) and coordinates in nm."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from emdata.access.open import EmArray, Location, open_array
from emdata.access.spec import AXES, Box
from emdata.errors import InvalidParameterError


class _Reader:
    """What ``dask.array.from_array`` needs (shape, dtype, ndim, basic slicing) on top of an ``EmArray``.

    Pickles with its array, i.e. as the recipe to reopen it: dask workers open their own handles.
    """

    def __init__(self, array: EmArray) -> None:
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        if len(key) != 3:
            raise InvalidParameterError(f"index {key!r} has more than 3 axes (z, y, x)")
        slices, squeeze = [], []
        for axis, (k, n) in enumerate(zip(key, self.shape, strict=True)):
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} is out of range for axis {AXES[axis]} of size {n}")
                k = slice(i, i + 1)
                squeeze.append(axis)
            elif not isinstance(k, slice):
                raise InvalidParameterError(f"only ints and slices of (z, y, x) are supported here, got {key!r}")
            slices.append(range(*k.indices(n)))
        if any(len(r) == 0 for r in slices):
            return np.empty([0 if len(r) == 0 else len(r) for r in slices], self.dtype).squeeze(axis=tuple(squeeze))
        start = tuple(min(r) for r in slices)
        stop = tuple(max(r) + 1 for r in slices)
        data = self.array.read(Box(start, stop))  # type: ignore[arg-type]
        picked = data[np.ix_(*(np.asarray(r) - a for r, a in zip(slices, start, strict=True)))]
        return picked.squeeze(axis=tuple(squeeze)) if squeeze else picked


def to_dataarray(array: EmArray, *, chunks: Any = None) -> Any:
    """A lazy ``xarray.DataArray`` of ``array``: dims (z, y, x), coordinates = translation + index * scale (nm).

    ``chunks`` (dask chunks) defaults to the storage shards (or chunks), so a dask task reads whole shards.
    """
    import dask.array as da
    import xarray as xr

    dask_chunks = chunks if chunks is not None else (array.shards or array.chunks)
    data = da.from_array(_Reader(array), chunks=dask_chunks, meta=np.empty((0, 0, 0), array.dtype),
                         name="emdata-" + hashlib.sha1(f"{array.location}|{array.level}|{dask_chunks}".encode()).hexdigest())
    coords = {
        ax: xr.Variable(ax, t + np.arange(n) * v, attrs={"units": "nm", "long_name": f"{ax} (voxel centre)"})
        for ax, n, v, t in zip(AXES, array.shape, array.voxel_size_nm, array.translation_nm, strict=True)
    }
    ref = array.ref
    name = ref.label or (ref.group or str(ref.root).rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr"))
    return xr.DataArray(data, dims=AXES, coords=coords, name=name, attrs={
        "units_of_coordinates": "nm", "voxel_size_nm": list(array.voxel_size_nm),
        "translation_nm": list(array.translation_nm), "level": array.level, "source": str(array.location),
    })


def open_dataarray(
    name: str | os.PathLike[str] | Location,
    *,
    level: int = 0,
    label: str | None = None,
    group: str | None = None,
    chunks: Any = None,
    **open_kwargs: Any,
) -> Any:
    """Open a dataset level as a lazy, dask-backed ``xarray.DataArray`` (dims z, y, x; coordinates in nm).

    ``name``, ``level``, ``label``, ``group`` and ``open_kwargs`` (``data_root``, ``remote``, ``rev``,
    ``storage_options``, ``backend``, ...) are those of ``open_array``. Nothing is read until computed;
    select physical regions with ``.sel(z=slice(z0_nm, z1_nm))``.
    """
    return to_dataarray(open_array(name, level=level, label=label, group=group, **open_kwargs), chunks=chunks)
