"""Grid iteration: exact coverage by block cores and halo contents equal to slicing a numpy.pad-ed copy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from access_fixtures import em_like, make_volume
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emdata.access import BlockGrid, BlockSpec, Box, ChunkCache, RoiNm, axis_blocks, open_array
from emdata.errors import InvalidParameterError

BORDERS = ["constant", "reflect", "edge", "shrink", "drop"]
_volumes: dict[tuple[int, ...], tuple[str, np.ndarray]] = {}


@pytest.fixture(scope="module")
def vol_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("grid_volumes")


def volume(vol_dir, shape):
    """One OME-Zarr per shape, built once per test session."""
    if shape not in _volumes:
        data = em_like(shape, seed=sum(shape))
        path = make_volume(vol_dir / f"v_{'x'.join(map(str, shape))}.zarr", data, n_levels=1,
                           chunks=(4, 4, 4), shards=(8, 8, 8))
        _volumes[shape] = (str(path), data)
    return _volumes[shape]


@st.composite
def axis_cases(draw):
    size = draw(st.integers(1, 80))
    r0 = draw(st.integers(0, size - 1))
    r1 = draw(st.integers(r0 + 1, size))
    block = draw(st.integers(1, 40))
    overlap = draw(st.integers(0, block - 1))
    halo = draw(st.integers(0, 12))
    border = draw(st.sampled_from(BORDERS))
    return size, (r0, r1), block, overlap, halo, border


@settings(max_examples=400, deadline=None)
@given(axis_cases())
def test_axis_blocks_cores_partition_the_covered_range(case):
    size, roi, block, overlap, halo, border = case
    if border == "drop" and min(roi[1], size - halo) - max(roi[0], halo) < block:
        with pytest.raises(InvalidParameterError, match="drop mode"):
            axis_blocks(roi=roi, size=size, block=block, overlap=overlap, halo=halo, border=border)
        return
    blocks = axis_blocks(roi=roi, size=size, block=block, overlap=overlap, halo=halo, border=border)
    lo, hi = (max(roi[0], halo), min(roi[1], size - halo)) if border == "drop" else roi
    counts = np.zeros(size + 2 * block + 2 * halo, int)
    for b in blocks:
        counts[b.core[0] + block + halo:b.core[1] + block + halo] += 1
        assert b.block[0] <= b.core[0] < b.core[1] <= b.block[1], b  # the core lies in its block
        if border == "shrink":
            assert b.block[1] <= roi[1] and b.read == (max(b.block[0] - halo, 0), min(b.block[1] + halo, size))
        else:
            assert b.block[1] - b.block[0] == block and b.read == (b.block[0] - halo, b.block[1] + halo)
        if border == "drop":
            assert 0 <= b.read[0] and b.read[1] <= size
    expected = np.zeros_like(counts)
    expected[lo + block + halo:hi + block + halo] = 1
    np.testing.assert_array_equal(counts, expected)
    starts = [b.block[0] for b in blocks]
    assert starts == sorted(starts) and starts[0] == lo


@st.composite
def grid_cases(draw):
    shape = tuple(draw(st.integers(1, 14)) for _ in range(3))
    block = tuple(draw(st.integers(1, 9)) for _ in range(3))
    overlap = tuple(draw(st.integers(0, b - 1)) for b in block)
    halo = tuple(draw(st.integers(0, 5)) for _ in range(3))
    border = draw(st.sampled_from(BORDERS))
    use_roi = draw(st.booleans())
    roi = None
    if use_roi:
        start = tuple(draw(st.integers(0, s - 1)) for s in shape)
        stop = tuple(draw(st.integers(a + 1, s)) for a, s in zip(start, shape))
        roi = Box(start, stop)
    constant = draw(st.integers(0, 255))
    return shape, BlockSpec(block, halo_voxels=halo, overlap_voxels=overlap, border=border, roi_voxels=roi,
                            constant_value=constant)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=grid_cases(), backend=st.sampled_from(["tensorstore", "zarr"]))
def test_grid_exact_coverage_and_halo_contents(vol_dir, case, backend):
    shape, spec = case
    path, data = volume(vol_dir, shape)
    array = open_array(path, backend=backend, cache=ChunkCache())
    try:
        grid = BlockGrid(array, spec, prefetch=2, release_chunks=True)
    except InvalidParameterError as exc:
        assert spec.border == "drop" and "drop mode" in str(exc)
        return
    roi = spec.roi_voxels or Box((0, 0, 0), shape)
    pad = max(max(spec.read_shape_voxels), 1) * 2 + max(shape)
    padded = None
    if spec.border in ("constant", "reflect", "edge"):
        kwargs = {"constant_values": spec.constant_value} if spec.border == "constant" else {}
        padded = np.pad(data, pad, mode=spec.border, **kwargs)
    counts = np.zeros(shape, np.int32)
    seen = 0
    for block in grid:
        seen += 1
        assert block.data.shape == block.read_box.shape
        counts[block.core_box.slices] += 1
        assert block.read_box.contains(block.block_box) and block.block_box.contains(block.core_box)
        if padded is not None:
            expected = padded[tuple(slice(a + pad, b + pad) for a, b in zip(block.read_box.start, block.read_box.stop))]
            assert block.data.shape == spec.read_shape_voxels
        else:
            assert Box((0, 0, 0), shape).contains(block.read_box)
            expected = data[block.read_box.slices]
        np.testing.assert_array_equal(block.data, expected)
    assert seen == len(grid)
    if grid.blocks_share_chunks:
        # The pass dropped every chunk it decoded once no later block read it, and none earlier: kept, the
        # same pass decodes as many. Both paths: the shard reader (tensorstore) and zarr-python (as remote data).
        assert array.chunks_in_lru and array.cache.nbytes == 0
        kept = BlockGrid(open_array(path, backend=backend, cache=ChunkCache()), spec, release_chunks=False)
        assert sum(b.data.size for b in kept) == sum(b.read_box.size for b in grid.blocks())
        assert array.cache.misses == kept.array.cache.misses > 0
        if backend == "tensorstore":
            assert array._direct is not None and kept.array.cache.misses == kept.array._direct.chunk_reads
        assert kept.array.cache.nbytes > 0
    covered = np.zeros(shape, np.int32)
    covered[grid.covered_box.slices] = 1
    np.testing.assert_array_equal(counts, covered)
    if spec.border != "drop":
        assert grid.covered_box == roi


def test_items_carry_voxel_and_physical_coordinates(tmp_path):
    data = em_like((20, 24, 28))
    path = make_volume(tmp_path / "a.zarr", data, voxel_size_nm=(8, 4, 2), translation_nm=(100, 10, 1))
    grid = BlockGrid(open_array(path), BlockSpec((8, 8, 8), halo_voxels=(1, 2, 3), border="edge"))
    block = grid[(1, 2, 3)]
    assert block.index == (1, 2, 3)
    assert block.block_box == Box((8, 16, 24), (16, 24, 32))
    assert block.read_box == Box((7, 14, 21), (17, 26, 35))
    assert block.read_origin_nm == (100 + 7 * 8, 10 + 14 * 4, 1 + 21 * 2)
    assert block.core_nm == RoiNm((100 + 7.5 * 8, 10 + 15.5 * 4, 1 + 23.5 * 2), (100 + 15.5 * 8, 10 + 23.5 * 4, 1 + 27.5 * 2))
    np.testing.assert_array_equal(block.core(), data[8:16, 16:24, 24:28])
    assert grid[-1].index == (2, 2, 3) and len(grid) == 3 * 3 * 4


def test_roi_in_nm_and_level_selection(tmp_path):
    data = em_like((32, 32, 32))
    path = make_volume(tmp_path / "a.zarr", data, voxel_size_nm=(8, 8, 8), translation_nm=(0, 0, 0))
    array = open_array(path)
    # Voxel centres 2..9 along each axis -> [16, 80) nm.
    grid = BlockGrid(array, BlockSpec(4, roi_nm=RoiNm((16, 16, 16), (80, 80, 80))))
    assert grid.roi == Box((2, 2, 2), (10, 10, 10)) and len(grid) == 8
    level1 = BlockGrid(array, BlockSpec(4, level=1))
    assert level1.array.level == 1 and level1.array.shape == (16, 16, 16)
    assert level1.array.voxel_size_nm == (16.0, 16.0, 16.0) and level1.array.translation_nm == (4.0, 4.0, 4.0)
    assert len(level1) == 64
    assert BlockGrid(array, BlockSpec(16)).is_chunk_aligned and not grid.is_chunk_aligned


def test_rank_sharding_is_disjoint_and_complete(tmp_path):
    path = make_volume(tmp_path / "a.zarr", em_like((16, 16, 16)), n_levels=1)
    grid = BlockGrid(open_array(path), BlockSpec(4))
    parts = [grid.shard(r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(len(grid)))
    blocks = list(grid.iter_blocks(parts[1]))
    assert [b.index for b in blocks] == [grid.block_at(i).index for i in parts[1]]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"block_shape_voxels": (4, 4)}, "3 values"),
    ({"block_shape_voxels": 4, "halo_voxels": -1}, "halo_voxels must be >= 0"),
    ({"block_shape_voxels": (4, 0, 4)}, "block_shape_voxels must be >= 1"),
    ({"block_shape_voxels": 4, "overlap_voxels": 4}, "overlap_voxels"),
    ({"block_shape_voxels": 4, "border": "wrap"}, "border must be one of"),
    ({"block_shape_voxels": 4, "level": -1}, "level"),
    ({"block_shape_voxels": 4, "roi_voxels": Box((0, 0, 0), (1, 1, 1)), "roi_nm": ((0, 0, 0), (1, 1, 1))}, "not both"),
])
def test_spec_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSpec(**kwargs)


def test_grid_errors_name_the_problem(tmp_path):
    path = make_volume(tmp_path / "a.zarr", em_like((16, 16, 16)), n_levels=2)
    array = open_array(path)
    with pytest.raises(ValueError, match=r"does not fit in drop mode"):
        BlockGrid(array, BlockSpec((32, 4, 4), border="drop"))
    with pytest.raises(ValueError, match=r"does not fit in drop mode"):
        BlockGrid(array, BlockSpec((12, 4, 4), halo_voxels=3, border="drop"))
    with pytest.raises(ValueError, match=r"outside the array"):
        BlockGrid(array, BlockSpec(4, roi_voxels=Box((0, 0, 0), (17, 4, 4))))
    with pytest.raises(ValueError, match=r"outside the array"):
        BlockGrid(array, BlockSpec(4, roi_nm=RoiNm((-1000, -1000, -1000), (-500, -500, -500))))
    with pytest.raises(ValueError, match=r"scale level 5 does not exist"):
        BlockGrid(array, BlockSpec(4, level=5))
    # A block larger than the array is fine when padding or shrinking.
    assert BlockGrid(array, BlockSpec(32, border="reflect"))[0].data.shape == (32, 32, 32)
    assert BlockGrid(array, BlockSpec(32, border="shrink"))[0].data.shape == (16, 16, 16)


def test_default_prefetch_follows_how_blocks_are_read(vol_dir):
    path, _ = volume(vol_dir, (16, 16, 16))
    local, remote_like = open_array(path), open_array(path, backend="zarr")
    assert local._direct is not None and remote_like._direct is None
    # Aligned blocks without halo from local shards: decoded into the block on the decoding threads, 2 ahead.
    assert BlockGrid(local, BlockSpec(8)).prefetch == 2 and BlockGrid(local, BlockSpec(8))._direct_blocks
    # ... of at most 16 chunks; larger ones (64 chunks of 4^3 here) through reading threads, 2 to 4 ahead.
    from emdata.shards import decode_threads

    big = BlockGrid(local, BlockSpec(16))
    assert not big._direct_blocks and big.prefetch == min(4, max(2, decode_threads()))
    # Blocks that share chunks (halo), or another reader: reading threads, 4; an explicit value always wins.
    assert BlockGrid(local, BlockSpec(8, halo_voxels=2)).prefetch == 4
    assert not BlockGrid(local, BlockSpec(8, halo_voxels=2))._direct_blocks
    assert BlockGrid(remote_like, BlockSpec(8)).prefetch == 4
    assert BlockGrid(local, BlockSpec(8), prefetch=0).prefetch == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidParameterError, match="prefetch must be an int >= 0 or None"):
            BlockGrid(local, BlockSpec(8), prefetch=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("threads, prefetch, groups", [(2, 2, 1), (2, 1, 1), (16, 2, 6), (16, 1, 8), (4, 2, 2)])
def test_direct_blocks_are_cut_into_as_many_groups_as_keep_the_decoding_threads_busy(vol_dir, monkeypatch, threads,
                                                                                      prefetch, groups):
    """prefetch + 1 blocks are in flight: each in ceil(threads / (prefetch + 1)) groups (at most its 8 chunks)."""
    import emdata.access.grid as grid_module

    path, data = volume(vol_dir, (16, 16, 16))
    array = open_array(path, cache=ChunkCache())
    monkeypatch.setattr(grid_module, "decode_threads", lambda: threads)
    futures = []
    real = array._submit_direct

    def submit(box, out, groups=None):
        started = real(box, out, groups)
        futures.append(len(started))
        return started

    monkeypatch.setattr(array, "_submit_direct", submit)
    grid = BlockGrid(array, BlockSpec(8), prefetch=prefetch)
    assert grid._direct_blocks
    for block in grid:
        np.testing.assert_array_equal(block.data, data[block.read_box.slices])
    assert futures == [min(groups, 8)] * len(grid)


@settings(max_examples=200, deadline=None)
@given(st.sets(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=40))
def test_chunk_boxes_cover_exactly_the_chunks_asked(cidxs):
    from emdata.access.open import chunk_boxes

    boxes = chunk_boxes(cidxs)
    covered = [c for lo, hi in boxes for c in itertools.product(*(range(a, b) for a, b in zip(lo, hi, strict=True)))]
    assert len(covered) == len(set(covered)) and set(covered) == cidxs  # every chunk once, nothing more
    zs, ys, xs = (sorted({c[i] for c in cidxs}) for i in range(3))
    if len(cidxs) == len(zs) * len(ys) * len(xs) and all(v[-1] - v[0] + 1 == len(v) for v in (zs, ys, xs)):
        assert len(boxes) == 1  # a box of chunks: one read
