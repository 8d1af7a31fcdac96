"""emdata.access.dask: a LocalCluster with 2 worker processes writes the same bytes as one process, locally and to S3."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from access_fixtures import em_like, make_volume

from emdata.access import BlockGrid, BlockSpec, open_array
from emdata.access.dask import map_blocks
from emdata.access.writer import BlockWriter
from emdata.errors import InvalidParameterError
from emdata.offline import services

distributed = pytest.importorskip("distributed")

# moto accepts any credentials; these dummies never leave loopback.
S3_ENV = {"AWS_ACCESS_KEY_ID": "emdata-local", "AWS_SECRET_ACCESS_KEY": "emdata-local", "AWS_DEFAULT_REGION": "us-east-1"}


def smooth_model(data: np.ndarray) -> np.ndarray:
    """A stand-in for a network: a local mean that needs the halo (module level: pickled to the workers)."""
    x = data.astype(np.float32)
    return (x + np.roll(x, 1, 0) + np.roll(x, -1, 1) + np.roll(x, 1, 2)) / 4 + 0.5


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("dask") / "src.zarr"
    make_volume(path, em_like((20, 28, 24), seed=7), n_levels=1, chunks=(4, 4, 4), shards=(8, 8, 8))
    return path


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  memory_limit="1GiB") as cluster, distributed.Client(cluster) as c:
        yield c


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _grid(source, blend_spec):
    return BlockGrid(open_array(source), blend_spec, prefetch=0)


SPECS = {
    "smooth": BlockSpec((6, 10, 8), halo_voxels=1, overlap_voxels=(2, 4, 2), border="reflect"),
    "none": BlockSpec(8, halo_voxels=2, border="edge"),
}


@pytest.mark.parametrize("blend", ["smooth", "none"])
def test_cluster_output_is_byte_identical_to_single_process_and_blockwriter(tmp_path, source, client, blend):
    spec = SPECS[blend]
    grid = _grid(source, spec)
    single = map_blocks(smooth_model, grid, tmp_path / "single.zarr", blend=blend)
    assert single.shards_written == 3 * 4 * 3 and single.shards_skipped == 0
    assert single.blocks_computed >= len(grid)  # blocks reaching several shards are computed by each
    cluster = map_blocks(smooth_model, grid, tmp_path / "cluster.zarr", client=client, blend=blend)
    assert cluster.blocks_computed == single.blocks_computed
    assert _files(tmp_path / "single.zarr") == _files(tmp_path / "cluster.zarr")
    # And the same bytes as the lock-based BlockWriter in a plain loop: one geometry, one blend.
    writer = BlockWriter(tmp_path / "writer.zarr", grid, dtype="float32", blend=blend)  # type: ignore[arg-type]
    for block in grid:
        writer.write(block, smooth_model(block.data))
    writer.finalize()
    written = _files(tmp_path / "writer.zarr")
    mine = _files(tmp_path / "cluster.zarr")
    level0 = {k: v for k, v in mine.items() if k.startswith("0/c")}
    assert level0 and level0 == {k: v for k, v in written.items() if k.startswith("0/c")}
    out = open_array(tmp_path / "cluster.zarr")
    src = open_array(source)
    assert (out.shape, out.chunks, out.shards, out.voxel_size_nm, out.translation_nm) == (
        src.shape, src.chunks, src.shards, src.voxel_size_nm, src.translation_nm)


def test_output_shards_stop_at_the_default(tmp_path, source, monkeypatch):
    """Each task holds blend buffers of 8 bytes per voxel of its output shard: the output's shards are the input's
    up to DEFAULT_SHARDS (scaled down here), the same as BlockWriter's, byte for byte."""
    from emdata import ngff

    monkeypatch.setattr(ngff, "DEFAULT_SHARDS", (4, 8, 8))
    grid = _grid(source, SPECS["smooth"])
    result = map_blocks(smooth_model, grid, tmp_path / "single.zarr", blend="smooth")
    out = open_array(tmp_path / "single.zarr")
    assert open_array(source).shards == (8, 8, 8) and out.shards == (4, 8, 8)
    assert result.shards_written == 5 * 4 * 3
    writer = BlockWriter(tmp_path / "writer.zarr", grid, dtype="float32", blend="smooth")
    for block in grid:
        writer.write(block, smooth_model(block.data))
    writer.finalize()
    level0 = {k: v for k, v in _files(tmp_path / "single.zarr").items() if k.startswith("0/c")}
    assert level0 and level0 == {k: v for k, v in _files(tmp_path / "writer.zarr").items() if k.startswith("0/c")}


def test_resume_skips_finished_shards_and_refuses_other_settings(tmp_path, source):
    grid = _grid(source, SPECS["none"])
    out = tmp_path / "pred.zarr"
    calls = []

    def counting(data):
        calls.append(1)
        return smooth_model(data)

    first = map_blocks(counting, grid, out, blend="none")
    before = _files(out)
    # Simulate a crash that lost two shards: remove their markers and objects, then re-run.
    done = Path(str(out) + ".emdata-done")
    lost = sorted(p for p in done.iterdir() if p.name != "meta.json")[:2]
    for marker in lost:
        marker.unlink()
    calls.clear()
    again = map_blocks(counting, grid, out, blend="none")
    assert again.shards_written == 2 and again.shards_skipped == first.shards_written - 2
    assert 0 < len(calls) < first.blocks_computed
    assert _files(out) == before
    with pytest.raises(InvalidParameterError, match="other settings"):
        map_blocks(counting, grid, out, blend="average")
    with pytest.raises(InvalidParameterError, match="not written by map_blocks"):
        map_blocks(counting, grid, source)


@pytest.mark.slow
def test_cluster_writes_to_s3_without_locks(tmp_path, source, client, monkeypatch):
    import s3fs

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    grid = _grid(source, SPECS["smooth"])
    local = map_blocks(smooth_model, grid, tmp_path / "local.zarr", blend="smooth")
    with services.s3(["preds"], env=S3_ENV) as endpoint:
        opts = {"endpoint_url": endpoint, "key": S3_ENV["AWS_ACCESS_KEY_ID"], "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"]}
        remote = map_blocks(smooth_model, grid, "s3://preds/run1/pred.zarr", client=client, blend="smooth",
                            storage_options=opts)
        assert remote.shards_written == local.shards_written
        fs = s3fs.S3FileSystem(**opts)
        objects = {p.removeprefix("preds/run1/pred.zarr/"): fs.cat_file(p) for p in fs.find("preds/run1/pred.zarr")}
        assert objects == _files(tmp_path / "local.zarr")
        # Read back through open_array's URL path, too.
        arr = open_array("s3://preds/run1/pred.zarr", storage_options=opts)
        np.testing.assert_array_equal(arr.read(arr.bounds), open_array(tmp_path / "local.zarr").read(arr.bounds))
        again = map_blocks(smooth_model, grid, "s3://preds/run1/pred.zarr", client=client, blend="smooth",
                           storage_options=opts)
        assert again.shards_written == 0 and again.shards_skipped == local.shards_written
    assert os.environ["AWS_ACCESS_KEY_ID"] == "emdata-local"
