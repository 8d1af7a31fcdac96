"""Opening datasets by name or path, geometry metadata, backends, errors and the bounded decoded-chunk cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorstore as ts
import zarr
from access_fixtures import em_like, make_volume
from hypothesis import given, settings
from hypothesis import strategies as st

from emdata.access import BlockGrid, BlockSpec, Box, ChunkCache, open_array
from emdata.errors import InvalidParameterError


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    image = em_like((24, 40, 36), seed=1)
    mito = (image > 140).astype(np.uint64)
    make_volume(root / "toy.zarr", image, voxel_size_nm=(8, 4, 4), translation_nm=(80, 40, 20), labels={"mito": mito})
    # A dataset with one image per split, like epfl.zarr.
    split = zarr.open_group(str(root / "split.zarr"), mode="w", zarr_format=3)
    split.attrs["note"] = "one group per split"
    make_volume(root / "split.zarr" / "training", image[:8], n_levels=1)
    return root, image, mito


def test_open_by_name_carries_geometry(data_root):
    root, image, _ = data_root
    arr = open_array("toy", data_root=root)
    assert arr.shape == (24, 40, 36) and arr.dtype == np.uint8 and arr.axes == ("z", "y", "x")
    assert arr.voxel_size_nm == (8.0, 4.0, 4.0) and arr.translation_nm == (80.0, 40.0, 20.0)
    assert arr.chunks == (8, 8, 8) and arr.shards == (16, 16, 16) and arr.n_levels == 2
    np.testing.assert_array_equal(arr.read(arr.bounds), image)
    lvl1 = open_array("toy", data_root=root, level=1)
    assert lvl1.shape == (12, 20, 18)
    assert lvl1.voxel_size_nm == (16.0, 8.0, 8.0) and lvl1.translation_nm == (84.0, 42.0, 22.0)
    assert arr.at_level(1).shape == lvl1.shape


def test_open_by_env_path_label_and_group(data_root, monkeypatch):
    root, image, mito = data_root
    monkeypatch.setenv("EMDATA_DATA_ROOT", str(root))
    labels = open_array("toy", label="mito")
    assert labels.dtype == np.uint64 and labels.translation_nm == (80.0, 40.0, 20.0)
    np.testing.assert_array_equal(labels.read(Box((0, 0, 0), (24, 40, 36))), mito)
    assert open_array("toy", label="mito", level=1).translation_nm == (80.0, 40.0, 20.0)  # nearest keeps centres
    by_path = open_array(root / "toy.zarr", backend="zarr")
    np.testing.assert_array_equal(by_path.read(Box((3, 5, 7), (20, 33, 30))), image[3:20, 5:33, 7:30])
    training = open_array("split", group="training")
    np.testing.assert_array_equal(training.read(training.bounds), image[:8])


def test_open_errors_name_what_is_available(data_root):
    root, _, _ = data_root
    with pytest.raises(InvalidParameterError, match=r"unknown dataset 'nope'.*\['split', 'toy'\]"):
        open_array("nope", data_root=root)
    with pytest.raises(ValueError, match=r"scale level 2 does not exist.*levels 0\.\.1"):
        open_array("toy", data_root=root, level=2)
    with pytest.raises(ValueError, match=r"no label 'cells'.*\['mito'\]"):
        open_array("toy", data_root=root, label="cells")
    with pytest.raises(ValueError, match=r"no OME-Zarr multiscales.*group=.*training"):
        open_array("split", data_root=root)
    with pytest.raises(ValueError, match=r"no sub-group 'testing'"):
        open_array("split", data_root=root, group="testing")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        open_array("toy", data_root=root, backend="h5py")  # type: ignore[arg-type]
    arr = open_array("toy", data_root=root)
    with pytest.raises(ValueError, match=r"outside the array"):
        arr.read(Box((0, 0, 0), (25, 1, 1)))
    with pytest.raises(ValueError, match=r"3 values for the axes"):
        Box((0, 0), (1, 1))  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(
    start=st.tuples(st.integers(-70, 70), st.integers(-90, 90), st.integers(-80, 80)),
    size=st.tuples(st.integers(0, 50), st.integers(0, 60), st.integers(0, 50)),
    mode=st.sampled_from(["constant", "reflect", "edge"]),
    backend=st.sampled_from(["tensorstore", "zarr"]),
)
def test_read_padded_equals_numpy_pad(data_root, start, size, mode, backend):
    root, image, _ = data_root
    arr = open_array("toy", data_root=root, backend=backend)
    box = Box.from_shape(size, start)
    pad = 120
    kwargs = {"constant_values": 7} if mode == "constant" else {}
    expected = np.pad(image, pad, mode=mode, **kwargs)[tuple(slice(a + pad, b + pad) for a, b in zip(box.start, box.stop))]
    np.testing.assert_array_equal(arr.read_padded(box, mode, 7), expected)
    # Into a given array (filled with garbage first): the same voxels, in that array.
    out = np.full(box.shape, 201, dtype=image.dtype)
    assert arr.read_padded(box, mode, 7, out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_read_padded_into_a_wrong_array_is_refused(data_root):
    root, image, _ = data_root
    arr = open_array("toy", data_root=root)
    box = Box((-2, 0, 0), (3, 4, 4))
    for bad in (np.empty((5, 4, 3), image.dtype), np.empty((5, 4, 4), np.float32)):
        with pytest.raises(ValueError, match=r"out is .* the box needs \(5, 4, 4\)"):
            arr.read_padded(box, "reflect", out=bad)


def _file_reads() -> int:
    for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/read"):
        if metric["name"] == "/tensorstore/kvstore/file/read":
            return int(metric["values"][0]["value"])
    return 0


def _chunks_touched(box: Box, chunk: int = 8) -> set[tuple[int, ...]]:
    import itertools

    return set(itertools.product(*(range(max(a, 0) // chunk, (b - 1) // chunk + 1) for a, b in zip(box.start, box.stop))))


def _tensorstore_only(arr):
    """The array read through tensorstore alone (not the direct shard reader of emdata.shards)."""
    assert arr.backend == "tensorstore" and arr._direct is not None
    return dataclasses.replace(arr, _direct=None)


def test_tensorstore_overlapping_reads_fetch_each_chunk_once(tmp_path):
    path = make_volume(tmp_path / "c.zarr", em_like((32, 32, 32)), n_levels=1, chunks=(8, 8, 8), shards=(32, 32, 32))
    arr = _tensorstore_only(open_array(path, cache=ChunkCache(64 * 2**20)))
    first, second = Box((0, 0, 0), (16, 16, 16)), Box((4, 4, 4), (24, 20, 16))
    before = _file_reads()
    arr.read(first)
    after_first = _file_reads()
    assert after_first - before >= len(_chunks_touched(first))  # chunks (+ shard index) really come from disk
    arr.read(second)
    new_chunks = _chunks_touched(second) - _chunks_touched(first)
    assert _file_reads() - after_first == len(new_chunks)  # overlapping chunks come from the cache
    # Without a cache the same overlapping read goes back to disk for every chunk it touches.
    uncached = _tensorstore_only(open_array(path, cache=ChunkCache(0)))
    uncached.read(first)
    mark = _file_reads()
    uncached.read(second)
    assert _file_reads() - mark >= len(_chunks_touched(second))


def test_direct_overlapping_reads_fetch_each_chunk_once(tmp_path):
    path = make_volume(tmp_path / "c.zarr", em_like((32, 32, 32)), n_levels=1, chunks=(8, 8, 8), shards=(32, 32, 32))
    arr = open_array(path, cache=ChunkCache(64 * 2**20))
    reader = arr._direct
    first, second = Box((0, 0, 0), (16, 16, 16)), Box((4, 4, 4), (24, 20, 16))
    arr.read(first)
    assert (reader.chunk_reads, reader.index_reads) == (len(_chunks_touched(first)), 1)
    arr.read(second)
    new_chunks = _chunks_touched(second) - _chunks_touched(first)
    assert (reader.chunk_reads, reader.index_reads) == (len(_chunks_touched(first) | new_chunks), 1)
    uncached = open_array(path, cache=ChunkCache(0))
    uncached.read(first)
    uncached.read(second)
    assert uncached._direct.chunk_reads == len(_chunks_touched(first)) + len(_chunks_touched(second))


def test_grid_with_halo_decodes_each_chunk_once(tmp_path):
    path = make_volume(tmp_path / "g.zarr", em_like((32, 32, 32)), n_levels=1, chunks=(8, 8, 8), shards=(16, 16, 16))
    arr = open_array(path, cache=ChunkCache(64 * 2**20))
    grid = BlockGrid(arr, BlockSpec(8, halo_voxels=4, border="reflect"), prefetch=2)
    blocks = list(grid)
    assert (arr._direct.chunk_reads, arr._direct.index_reads) == (4**3, 2**3)
    # The same through tensorstore alone: its shared cache_pool also decodes each chunk once.
    arr = _tensorstore_only(open_array(path, cache=ChunkCache(64 * 2**20)))
    grid = BlockGrid(arr, BlockSpec(8, halo_voxels=4, border="reflect"), prefetch=0)
    before = _file_reads()
    for got, expected in zip(grid, blocks, strict=True):
        np.testing.assert_array_equal(got.data, expected.data)
    n_chunks, n_shards = 4**3, 2**3
    # Each chunk once, plus at most one shard-index read per shard.
    assert n_chunks <= _file_reads() - before <= n_chunks + n_shards


def test_zarr_fallback_decodes_each_chunk_once(tmp_path):
    path = make_volume(tmp_path / "z.zarr", em_like((32, 32, 32)), n_levels=1)
    cache = ChunkCache(64 * 2**20)
    arr = open_array(path, backend="zarr", cache=cache)
    grid = BlockGrid(arr, BlockSpec(8, halo_voxels=4, overlap_voxels=2, border="edge"), prefetch=2)
    blocks = list(grid)
    assert cache.misses == 4**3 and cache.hits > cache.misses
    np.testing.assert_array_equal(blocks[5].data, BlockGrid(open_array(path), grid.spec)[5].data)
    small = ChunkCache(3 * 8**3)  # room for three uint8 chunks: the bound holds
    arr_small = open_array(path, backend="zarr", cache=small)
    list(BlockGrid(arr_small, grid.spec, prefetch=0))
    assert small.nbytes <= 3 * 8**3 and small.misses > 4**3


def test_auto_backend_falls_back_to_zarr(data_root, monkeypatch):
    root, image, _ = data_root
    assert open_array("toy", data_root=root).backend == "tensorstore"

    def broken(*args, **kwargs):
        raise ImportError("no tensorstore here")

    monkeypatch.setattr("emdata.access.open._open_tensorstore", broken)
    arr = open_array("toy", data_root=root)
    assert arr.backend == "zarr"
    np.testing.assert_array_equal(arr.read(Box((1, 2, 3), (9, 30, 33))), image[1:9, 2:30, 3:33])
    with pytest.raises(ValueError, match="tensorstore cannot open"):
        open_array("toy", data_root=root, backend="tensorstore")
