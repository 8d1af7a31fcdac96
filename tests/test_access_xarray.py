"""emdata.access.xarray: lazy dask-backed DataArrays with (z, y, x) dims and nm coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from access_fixtures import em_like, make_volume

from emdata.access.xarray import open_dataarray

xr = pytest.importorskip("xarray")
dask_array = pytest.importorskip("dask.array")


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    root = tmp_path_factory.mktemp("xr")
    image = em_like((12, 20, 18), seed=2)
    make_volume(root / "toy.zarr", image, voxel_size_nm=(8.0, 4.0, 2.5), translation_nm=(80.0, -40.0, 12.5),
                n_levels=2, chunks=(4, 4, 4), shards=(8, 8, 8), labels={"mito": (image > 150).astype(np.uint8)})
    return root, image


def test_dataarray_is_lazy_with_nm_coordinates(volume):
    root, image = volume
    arr = open_dataarray("toy", data_root=root)
    assert isinstance(arr, xr.DataArray) and isinstance(arr.data, dask_array.Array)
    assert arr.dims == ("z", "y", "x") and arr.shape == image.shape and arr.dtype == image.dtype
    assert arr.data.chunks[0] == (8, 4)  # dask chunks follow the storage shards
    for ax, t, v, n in zip("zyx", (80.0, -40.0, 12.5), (8.0, 4.0, 2.5), image.shape, strict=True):
        np.testing.assert_array_equal(arr[ax].values, t + np.arange(n) * v)
        assert arr[ax].attrs["units"] == "nm"
    np.testing.assert_array_equal(arr.values, image)
    # Physical selection: voxel centres in [96, 120) nm on z are voxels 2, 3, 4.
    sub = arr.sel(z=slice(96, 119.9), x=slice(12.5, 19.9))  # label slices include both ends
    np.testing.assert_array_equal(sub.values, image[2:5, :, 0:3])
    np.testing.assert_array_equal(arr[1:9:3, ::5, 3].values, image[1:9:3, ::5, 3])
    np.testing.assert_array_equal(arr[::-2, 4, -3:].values, image[::-2, 4, -3:])


def test_level_and_label(volume):
    root, image = volume
    lvl1 = open_dataarray("toy", data_root=root, level=1)
    assert lvl1.attrs["voxel_size_nm"] == [16.0, 8.0, 5.0]
    t1 = lvl1.attrs["translation_nm"]
    for ax, t, v in zip("zyx", t1, (16.0, 8.0, 5.0), strict=True):
        np.testing.assert_allclose(lvl1[ax].values, t + np.arange(lvl1.sizes[ax]) * v)
    # Level-1 voxel centres sit between the level-0 ones they average (mean pyramid, factor 2).
    np.testing.assert_allclose(lvl1["z"].values[:2], [84.0, 100.0])
    mito = open_dataarray("toy", data_root=root, label="mito")
    assert mito.name == "mito"
    np.testing.assert_array_equal(mito.values, (image > 150).astype(np.uint8))
