"""Write-back: same geometry, blending, resumability and several writers on blocks sharing shards."""

from __future__ import annotations

import multiprocessing as mp
import threading

import numpy as np
import pytest
from access_fixtures import em_like, make_volume, write_blocks_in_process

from emdata import ngff
from emdata.access import BlockGrid, BlockSpec, Box, open_array
from emdata.access.writer import BlockWriter, blend_window, output_shards
from emdata.ngff import open_multiscale


@pytest.fixture()
def source(tmp_path):
    data = em_like((20, 40, 36), seed=4)
    path = make_volume(tmp_path / "src.zarr", data, voxel_size_nm=(8, 4, 4), translation_nm=(5, 6, 7), n_levels=2)
    return path, data


@pytest.mark.parametrize("blend", ["none", "average", "smooth"])
@pytest.mark.parametrize("border", ["reflect", "shrink"])
def test_identity_prediction_round_trips_with_the_source_geometry(tmp_path, source, blend, border):
    path, data = source
    grid = BlockGrid(open_array(path), BlockSpec((8, 16, 12), halo_voxels=3, overlap_voxels=(2, 6, 4), border=border))
    writer = BlockWriter(tmp_path / "pred.zarr", grid, dtype="float32", blend=blend)
    for block in grid:
        assert writer.write(block, block.data.astype(np.float32))  # read-box shaped: the halo is cropped
    writer.finalize()
    out = open_array(tmp_path / "pred.zarr")
    assert (out.shape, out.voxel_size_nm, out.translation_nm) == (grid.array.shape, (8.0, 4.0, 4.0), (5.0, 6.0, 7.0))
    assert (out.chunks, out.shards, out.dtype) == (grid.array.chunks, grid.array.shards, np.float32)
    np.testing.assert_allclose(out.read(out.bounds), data, rtol=1e-5)


def test_output_shards_are_the_inputs_up_to_the_default(tmp_path, monkeypatch):
    """The stages' 64 MiB uint8 shards (256 x 512 x 512) would make a shard's blend buffers 512 MiB: the output's
    shards stop at DEFAULT_SHARDS (scaled down here), on whole chunks; the voxels are the same."""
    from types import SimpleNamespace

    assert output_shards(SimpleNamespace(shards=(256, 512, 512), chunks=(64, 64, 64))) == (256, 256, 256)
    assert output_shards(SimpleNamespace(shards=(288, 576, 96), chunks=(48, 48, 48))) == (240, 240, 96)
    assert output_shards(SimpleNamespace(shards=None, chunks=(64, 64, 64))) == (64, 64, 64)
    monkeypatch.setattr(ngff, "DEFAULT_SHARDS", (16, 16, 16))
    data = em_like((20, 40, 72), seed=5)
    path = make_volume(tmp_path / "wide.zarr", data, shards=(16, 32, 32), n_levels=1)
    grid = BlockGrid(open_array(path), BlockSpec(8, halo_voxels=2))
    writer = BlockWriter(tmp_path / "pred.zarr", grid, dtype="uint8", blend="average")
    for block in grid:
        writer.write(block, block.data)
    writer.finalize()
    out = open_array(tmp_path / "pred.zarr")
    assert grid.array.shards == (16, 32, 32) and out.shards == (16, 16, 16)
    np.testing.assert_array_equal(out.read(out.bounds), data)


def test_level_one_output_keeps_level_one_geometry(tmp_path, source):
    path, _ = source
    grid = BlockGrid(open_array(path), BlockSpec(8, level=1))
    writer = BlockWriter(tmp_path / "p1.zarr", grid, dtype="uint8", blend="none", n_levels=2)
    for block in grid:
        writer.write(block, block.data)
    writer.finalize()
    ms, arrays = open_multiscale(tmp_path / "p1.zarr")
    assert arrays[0].shape == grid.array.shape == (10, 20, 18)
    assert ms["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [16.0, 8.0, 8.0]}, {"type": "translation", "translation": [9.0, 8.0, 9.0]}]
    np.testing.assert_array_equal(arrays[0][:], grid.array.read(grid.array.bounds))
    assert arrays[1].shape == (5, 10, 9)


def test_average_and_smooth_blending_weights(tmp_path, source):
    path, _ = source
    grid = BlockGrid(open_array(path), BlockSpec((20, 20, 36), overlap_voxels=(0, 10, 0), border="shrink",
                                                 roi_voxels=Box((0, 0, 0), (20, 30, 36))))
    assert grid.grid_shape == (1, 2, 1)
    for blend in ("average", "smooth"):
        writer = BlockWriter(tmp_path / f"{blend}.zarr", grid, blend=blend)
        b0, b1 = grid.block_at(0), grid.block_at(1)
        writer.write(b0, np.full(b0.block_box.shape, 1.0, np.float32))
        writer.write(b1, np.full(b1.block_box.shape, 3.0, np.float32))
        writer.finalize()
        out = open_array(tmp_path / f"{blend}.zarr").read(Box((0, 0, 0), (20, 30, 36)))
        np.testing.assert_allclose(out[:, :10], 1, rtol=1e-6)
        np.testing.assert_allclose(out[:, 20:30], 3, rtol=1e-6)
        overlap = out[0, 10:20, 0]
        if blend == "average":
            np.testing.assert_allclose(overlap, 2.0)
        else:
            w0 = np.sin(np.pi * (np.arange(10, 20) + 0.5) / 20)
            w1 = np.sin(np.pi * (np.arange(0, 10) + 0.5) / 20)
            np.testing.assert_allclose(overlap, (w0 + 3 * w1) / (w0 + w1), rtol=1e-5)
            assert np.all(np.diff(overlap) > 0)  # a smooth ramp from 1 to 3
    assert blend_window((4, 4, 4), "smooth").min() > 0


def test_resume_skips_done_blocks_and_never_double_counts(tmp_path, source):
    path, data = source
    grid = BlockGrid(open_array(path), BlockSpec(8, overlap_voxels=4, border="edge"))
    out = tmp_path / "r.zarr"
    writer = BlockWriter(out, grid, blend="average")
    blocks = list(grid)
    for block in blocks[:10]:
        writer.write(block, block.data.astype(np.float32))
    # A crash after a block reached some of its chunks but before it was marked done:
    crashed = blocks[10]
    region = crashed.block_box.intersect(grid.array.bounds)
    first_chunk = next(writer._chunk_boxes(region))
    part = first_chunk.intersect(region)
    writer._add(first_chunk, part, crashed.block_box.key(),
                crashed.data[crashed.block_in_read][part.relative_to(crashed.block_box)].astype(np.float32),
                np.ones(part.shape, np.float32))
    with pytest.raises(ValueError, match="not written yet"):
        writer.finalize()
    resumed = BlockWriter(out, grid, blend="average")
    assert resumed.pending() == list(range(10, len(grid)))
    written = [resumed.write(b, b.data.astype(np.float32)) for b in grid]
    assert written == [False] * 10 + [True] * (len(grid) - 10)
    resumed.finalize()
    np.testing.assert_allclose(open_array(out).read(grid.array.bounds), data, rtol=1e-5)
    with pytest.raises(ValueError, match="different settings"):
        BlockWriter(out, grid, blend="smooth")


def test_threads_writing_disjoint_blocks_that_share_chunks_and_shards(tmp_path, source):
    path, data = source
    # 6^3 blocks overlapping by 2 inside 8^3 chunks inside 16^3 shards: every chunk is shared by several writers.
    grid = BlockGrid(open_array(path), BlockSpec(6, overlap_voxels=2, border="reflect",
                                                 roi_voxels=Box((0, 0, 0), (16, 16, 16))))
    out = tmp_path / "t.zarr"
    parts = [grid.shard(r, 4) for r in range(4)]

    def work(indices):
        writer = BlockWriter(out, grid, blend="smooth")
        for i in indices:
            block = grid[i]
            writer.write(block, block.data.astype(np.float32) * 2)

    threads = [threading.Thread(target=work, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    BlockWriter(out, grid, blend="smooth").finalize()
    roi = Box((0, 0, 0), (16, 16, 16))
    np.testing.assert_allclose(open_array(out).read(roi), data[roi.slices].astype(np.float32) * 2, rtol=1e-5)


def test_processes_writing_disjoint_blocks_that_share_a_shard(tmp_path, source):
    path, data = source
    spec = BlockSpec((4, 8, 8), overlap_voxels=(0, 2, 2), border="edge", roi_voxels=Box((0, 0, 0), (16, 16, 16)))
    grid = BlockGrid(open_array(path), spec)
    assert grid.roi == Box((0, 0, 0), (16, 16, 16))  # the whole ROI is one 16^3 shard
    out = tmp_path / "p.zarr"
    halves = [list(range(0, len(grid), 2)), list(range(1, len(grid), 2))]
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        written = pool.starmap(write_blocks_in_process,
                               [(str(path), str(out), spec.to_dict(), h, "average") for h in halves])
    assert sum(written) == len(grid)
    writer = BlockWriter(out, grid, blend="average")
    writer.finalize(worker=0, n_workers=2)
    writer.finalize(worker=1, n_workers=2)
    result = open_array(out).read(Box((0, 0, 0), (16, 16, 16)))
    np.testing.assert_allclose(result, data[:16, :16, :16].astype(np.float32) * 2, rtol=1e-5)
    writer.cleanup()
    assert not writer.partial.exists()


def test_writer_rejects_bad_shapes_and_blends(tmp_path, source):
    path, _ = source
    grid = BlockGrid(open_array(path), BlockSpec(8, halo_voxels=2))
    with pytest.raises(ValueError, match="blend must be one of"):
        BlockWriter(tmp_path / "x.zarr", grid, blend="max")  # type: ignore[arg-type]
    writer = BlockWriter(tmp_path / "x.zarr", grid)
    with pytest.raises(ValueError, match=r"prediction shape \(7, 8, 8\)"):
        writer.write(grid.block_at(0), np.zeros((7, 8, 8)))
