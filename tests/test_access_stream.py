"""Finding the data (repository root, catalog names, the dvc pull hint) and streaming without pull (DVC remote, URLs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import zarr
from access_fixtures import em_like, make_volume

from emdata.access import BlockGrid, BlockSpec, Box, ChunkCache, open_array
from emdata.access.open import find_repo_root
from emdata.errors import InvalidParameterError
from emdata.offline import services
from emdata.offline.replica import serve_in_thread
from emdata.access.remote import RemoteShardReader
from emdata.shards import CorruptShardError

# moto accepts any credentials; these dummies never leave loopback.
S3_ENV = {"AWS_ACCESS_KEY_ID": "emdata-local", "AWS_SECRET_ACCESS_KEY": "emdata-local", "AWS_DEFAULT_REGION": "us-east-1"}


def _epfl_like(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """An output shaped like data/epfl.zarr: a plain root group with a ``training`` image and ``mito`` labels."""
    image = em_like((12, 20, 16), seed=11)
    mito = (image > 140).astype(np.uint8)
    zarr.open_group(str(out), mode="w", zarr_format=3)
    make_volume(out / "training", image, voxel_size_nm=(5, 5, 5), n_levels=2, chunks=(4, 4, 4), shards=(8, 8, 8),
                labels={"mito": mito})
    return image, mito


@pytest.fixture()
def workspace(tmp_path):
    ws = tmp_path / "repo"
    (ws / "data").mkdir(parents=True)
    (ws / "dvc.yaml").write_text("stages: {}\n")
    (ws / "notebooks" / "deep").mkdir(parents=True)
    return ws


def test_finds_the_repository_from_a_subfolder_and_names_the_pull_command(workspace, monkeypatch):
    monkeypatch.delenv("EMDATA_DATA_ROOT", raising=False)
    monkeypatch.chdir(workspace / "notebooks" / "deep")
    assert find_repo_root() == workspace.resolve()
    with pytest.raises(InvalidParameterError) as err:
        open_array("epfl", group="training")
    message = str(err.value)
    assert "`dvc pull data/epfl.zarr`" in message and "`emdata pull epfl`" in message
    assert "remote=True" in message and "EMDATA_DATA_ROOT" in message
    # The output name works as well as the stage name, and names the stage in the hint.
    with pytest.raises(InvalidParameterError, match=r"`dvc pull data/hemibrain_crop.zarr` \(or `emdata pull hemibrain`\)"):
        open_array("hemibrain_crop")
    image, mito = _epfl_like(workspace / "data" / "epfl.zarr")
    make_volume(workspace / "data" / "hemibrain_crop.zarr", image, n_levels=1)
    np.testing.assert_array_equal(open_array("epfl", group="training").read(open_array(
        "epfl", group="training").bounds), image)
    a, b = open_array("hemibrain"), open_array("hemibrain_crop")
    assert a.path == b.path and str(a.path).startswith(str(workspace.resolve()))
    with pytest.raises(InvalidParameterError, match=r"unknown dataset 'nope'.*catalog names: \['empiar', 'epfl'"):
        open_array("nope")


def _dvc(ws: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


@pytest.mark.slow
def test_streams_an_output_from_the_dvc_remote_without_pull(workspace, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    ws = workspace
    image, mito = _epfl_like(ws / "data" / "epfl.zarr")
    git = ["git", "-c", "user.name=emdata-test", "-c", "user.email=test@example.org"]
    subprocess.run([*git, "init", "-q"], cwd=ws, check=True)
    _dvc(ws, "init", "-q")
    _dvc(ws, "add", "data/epfl.zarr")
    with services.s3(["dvc-store"]) as endpoint:
        _dvc(ws, "remote", "add", "-d", "storage", "s3://dvc-store/v1")
        _dvc(ws, "remote", "modify", "--local", "storage", "endpointurl", endpoint)
        subprocess.run([*git, "add", "-A"], cwd=ws, check=True)
        subprocess.run([*git, "commit", "-qm", "data"], cwd=ws, check=True)
        _dvc(ws, "push")
        shutil.rmtree(ws / ".dvc" / "cache")
        shutil.rmtree(ws / "data" / "epfl.zarr")
        monkeypatch.chdir(ws / "notebooks")

        streamed = open_array("epfl", group="training", remote=True)
        assert streamed.backend == "zarr" and "DVC remote" in str(streamed.path)
        assert isinstance(streamed._direct, RemoteShardReader)  # chunks: concurrent range reads of the shards
        got = streamed.read(streamed.bounds)
        label = open_array("epfl", group="training", label="mito", level=1, remote="storage")
        got_label = label.read(label.bounds)
        assert not (ws / "data" / "epfl.zarr").exists() and not (ws / ".dvc" / "cache" / "files").exists()

        _dvc(ws, "pull", "data/epfl.zarr")
        # Streamed again with the objects now in the DVC cache (opened from there: files without fsspec's size).
        np.testing.assert_array_equal(open_array("epfl", group="training", remote=True, cache=ChunkCache()).read(
            streamed.bounds), image)
        np.testing.assert_array_equal(open_array("epfl", group="training", remote=True, backend="zarr",
                                                 cache=ChunkCache()).read(streamed.bounds), image)
        pulled = open_array("epfl", group="training")
        assert pulled.backend == "tensorstore"
        np.testing.assert_array_equal(got, pulled.read(pulled.bounds))
        np.testing.assert_array_equal(got, image)
        pulled_label = open_array("epfl", group="training", label="mito", level=1)
        np.testing.assert_array_equal(got_label, pulled_label.read(pulled_label.bounds))
        assert (label.shape, label.voxel_size_nm, label.translation_nm) == (
            pulled_label.shape, pulled_label.voxel_size_nm, pulled_label.translation_nm)


def test_reads_an_ome_zarr_over_https_and_s3_urls(tmp_path, monkeypatch):
    served = tmp_path / "served" / "example.org"
    image, _ = _epfl_like(served / "vol.zarr")
    with serve_in_thread(tmp_path / "served") as server:
        url = f"{server.base_url}/example.org/vol.zarr"
        arr = open_array(url, group="training", level=1)
        local = open_array(served / "vol.zarr", group="training", level=1)
        assert arr.backend == "zarr" and (arr.shape, arr.voxel_size_nm) == (local.shape, local.voxel_size_nm)
        np.testing.assert_array_equal(arr.read(arr.bounds), local.read(local.bounds))
        with pytest.raises(InvalidParameterError, match="no label 'cells'"):
            open_array(url, group="training", label="cells")
        with pytest.raises(InvalidParameterError, match="reads local data"):
            open_array(url, group="training", backend="tensorstore")


def _served_volume(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A sharded OME-Zarr (18 shards of 8 chunks, edge shards cut) served over HTTP; one shard is all fill value,
    so zarr-python writes no file for it."""
    image = em_like((32, 48, 40), seed=12)
    image[:16, :16, :16] = 0
    make_volume(tmp_path / "served" / "example.org" / "vol.zarr", image, n_levels=1, chunks=(8, 8, 8),
                shards=(16, 16, 16))
    return tmp_path / "served" / "example.org" / "vol.zarr" / "0", image


def test_remote_shards_fetch_each_index_once_and_adjacent_chunks_in_one_request(tmp_path):
    level0, image = _served_volume(tmp_path)
    assert not (level0 / "c" / "0" / "0" / "0").exists()  # the shard of fill value: read as such
    shard_files = sum(1 for f in (level0 / "c").rglob("*") if f.is_file())
    with serve_in_thread(tmp_path / "served") as server:
        arr = open_array(f"{server.base_url}/example.org/vol.zarr", cache=ChunkCache())
        reader = arr._direct
        assert isinstance(reader, RemoteShardReader) and arr.backend == "zarr"
        assert open_array(f"{server.base_url}/example.org/vol.zarr", backend="zarr")._direct is None  # opt out
        seen = len(server.faults.requests_seen)
        for spec in (BlockSpec(16), BlockSpec(16, halo_voxels=4, border="reflect")):
            pad = 20  # blocks at the far end reach past the volume by up to a block and its halo
            padded = np.pad(image, pad, mode=spec.border)
            for b in BlockGrid(arr, spec):
                want = padded[tuple(slice(a + pad, z + pad) for a, z in zip(b.read_box.start, b.read_box.stop))]
                np.testing.assert_array_equal(b.data, want)
        requests = server.faults.requests_seen[seen:]
        index_requests = [r for r in requests if "bytes=-" in r]
        # Each shard's index once (the missing shard's 404 too), over both passes.
        assert len(index_requests) == len(set(index_requests)) == shard_files + 1 == reader.index_reads + 1
        # The aligned pass reads each shard's chunks in one request; the halo pass decodes each chunk once.
        # Every stored chunk twice (the aligned pass keeps none; the halo pass each once): 8 fill-value chunks not.
        assert reader.chunk_reads == 2 * (4 * 6 * 5 - 8)
        chunk_requests = len(requests) - len(index_requests)
        assert chunk_requests < reader.chunk_reads / 2, (chunk_requests, reader.chunk_reads)


def test_remote_shards_refuse_a_bad_index_or_response_naming_the_shard(tmp_path):
    level0, image = _served_volume(tmp_path)
    box = Box((16, 16, 16), (32, 32, 32))  # shard (1, 1, 1): whole
    shard = level0 / "c" / "1" / "1" / "1"
    with serve_in_thread(tmp_path / "served") as server:
        url = f"{server.base_url}/example.org/vol.zarr"

        def fresh(cache: int = 2**20) -> Any:  # a new reader and chunk cache: nothing read before is reused
            return open_array(url, cache=ChunkCache(cache))

        np.testing.assert_array_equal(fresh().read(box), image[box.slices])
        # A response cut short: the index, then (index cached) a chunk's bytes.
        server.set_faults({"truncate_to_bytes": 100, "truncate_count": 1, "path_contains": "/c/1/1/1"})
        with pytest.raises(CorruptShardError, match=r"/0/c/1/1/1: asked for its \d+-byte shard index, got 100 bytes"):
            fresh().read(box)
        arr = fresh(0)
        arr.read(box)
        server.set_faults({"truncate_to_bytes": 100, "truncate_count": 1, "path_contains": "/c/1/1/1"})
        with pytest.raises(CorruptShardError, match=r"/0/c/1/1/1: asked for bytes \d+\.\.\d+, got 100 bytes"):
            arr.read(box)
        # A server that answers every range with the whole file.
        server.set_faults({"ignore_ranges": True})
        with pytest.raises(CorruptShardError, match="ignoring Range"):
            fresh().read(box)
        server.set_faults({})
        # An index with a valid checksum that puts a chunk at more bytes than blosc makes of a chunk: refused
        # before that chunk is fetched.
        raw = shard.read_bytes()
        size = 8 * 16 + 4
        index = np.frombuffer(raw[-size:-4], "<u8").reshape(-1, 2).copy()
        index[3, 1] = 2**40
        body = index.tobytes()
        shard.write_bytes(raw[:-size] + body + google_crc32c.value(body).to_bytes(4, "little"))
        seen = len(server.faults.requests_seen)
        with pytest.raises(CorruptShardError, match=r"/0/c/1/1/1: its index puts chunk \(\d+, \d+, \d+\) at \d+\+"
                                                    r"1099511627776; a chunk takes 16 to 528 bytes"):
            fresh().read(box)
        shard_requests = [r for r in server.faults.requests_seen[seen:] if "/c/" in r]
        assert shard_requests == [f"GET /example.org/vol.zarr/0/c/1/1/1 bytes=-{size}"]
        # An index that fails its checksum.
        shard.write_bytes(raw[:-size] + bytes([raw[-size] ^ 1]) + raw[-size + 1:])
        with pytest.raises(CorruptShardError, match=r"/0/c/1/1/1: the shard index fails its crc32c checksum"):
            fresh().read(box)


def test_remote_shard_index_is_fetched_once_by_threads_reading_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    level0, image = _served_volume(tmp_path)
    with serve_in_thread(tmp_path / "served") as server:
        server.set_faults({"latency_s": 0.05})  # every read is in flight while the others start
        arr = open_array(f"{server.base_url}/example.org/vol.zarr", cache=ChunkCache())
        boxes = [Box((16 + z, 16 + y, 16), (24 + z, 24 + y, 32)) for z in (0, 8) for y in (0, 8)]  # shard (1, 1, 1)
        boxes += [Box((0, 0, 0), (8, 8, 8)), Box((8, 8, 8), (16, 16, 16))]  # the missing shard (0, 0, 0)
        seen = len(server.faults.requests_seen)
        with ThreadPoolExecutor(len(boxes)) as pool:
            got = list(pool.map(arr.read, boxes))
        for box, data in zip(boxes, got, strict=True):
            np.testing.assert_array_equal(data, image[box.slices])
        index_requests = [r for r in server.faults.requests_seen[seen:] if "bytes=-" in r]
        assert sorted(index_requests) == [f"GET /example.org/vol.zarr/0/c/{s} bytes=-132" for s in ("0/0/0", "1/1/1")]
