"""The EPFL stage end to end against the replica: download, convert, verify, and fail early on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader

from emdata.errors import DownloadError, IntegrityError, InvalidParameterError
from emdata.offline.replica.epfl import HOST_PATH
from emdata.stage import run_stage

PARAMS = """
mirror: {{url: "{mirror}", serves: replica}}
download: {{workers: 2, retries: 1, backoff_s: 0}}
epfl:
  splits: [training, testing]
  include_volumedata: {volumedata}
  keep_downloads: {keep}
"""


def workspace(tmp_path: Path, mirror: str, volumedata: bool = False, keep: bool = False, extra: str = "") -> Path:
    (tmp_path / "params.yaml").write_text(PARAMS.format(mirror=mirror, volumedata=str(volumedata).lower(),
                                                        keep=str(keep).lower()) + extra)
    return tmp_path


def test_epfl_stage_writes_ome_zarr_with_labels(replica, replica_tree, tmp_path):
    ws = workspace(tmp_path, replica.base_url)
    metrics = run_stage("epfl", repo_root=ws)
    out = ws / "data" / "epfl.zarr"
    for split in ("training", "testing"):
        source = tifffile.imread(replica_tree / HOST_PATH / f"{split}.tif")
        truth = tifffile.imread(replica_tree / HOST_PATH / f"{split}_groundtruth.tif")
        nodes = list(Reader(parse_url(str(out / split)))())
        image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs))
        assert image.data[0].shape == source.shape
        np.testing.assert_array_equal(np.asarray(image.data[0]), source)
        ms = zarr.open_group(str(out / split), mode="r").attrs["ome"]["multiscales"][0]
        assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
        assert {a["unit"] for a in ms["axes"]} == {"nanometer"}
        assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [5.0, 5.0, 5.0]
        assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [10.0, 10.0, 10.0]
        labels = zarr.open_group(str(out / split / "labels"), mode="r")
        assert labels.attrs["ome"]["labels"] == ["mito"]
        mito = np.asarray(labels["mito"]["0"][...])
        np.testing.assert_array_equal(mito, (truth > 127).astype(np.uint8))
        assert metrics["arrays"][split]["shape"] == list(source.shape)
        assert zarr.open_array(str(out / split / "0"), mode="r").shards is not None
    # The root is an NGFF collection of its images (readers find them by name), its provenance kept beside.
    root_attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    assert root_attrs["ome"]["bioformats2raw.layout"] == 3
    assert zarr.open_group(str(out / "OME"), mode="r").attrs["ome"]["series"] == ["training", "testing"]
    prov = zarr.open_group(str(out), mode="r").attrs["emdata"]
    assert {f["name"] for f in prov["files"]} == {"training.tif", "training_groundtruth.tif", "testing.tif",
                                                  "testing_groundtruth.tif"}
    assert all(f["url"].startswith("https://documents.epfl.ch/") for f in prov["files"])  # the live URL
    # Raw TIFFs are deleted after the verified conversion; their hashes are kept for the next run.
    assert not (ws / "data" / ".downloads" / "epfl").exists()
    recorded = json.loads((ws / "checksums.json").read_text())["replica"]
    assert {f["url"]: f["sha256"] for f in prov["files"]} == {u: v["sha256"] for u, v in recorded.items()}
    assert json.loads((ws / "metrics" / "epfl.json").read_text())["files"] == 4


def test_volumedata_goes_through_parallel_ranges(replica, replica_tree, tmp_path):
    (tmp_path / "params.yaml").write_text(
        f'mirror: {{url: "{replica.base_url}", serves: replica}}\n'
        "download: {workers: 2, backoff_s: 0, range_threshold_mb: 0.5, range_part_mb: 0.25}\n"
        "epfl: {splits: [], include_volumedata: true, keep_downloads: true}\n")
    run_stage("epfl", repo_root=tmp_path)
    source = tifffile.imread(replica_tree / HOST_PATH / "volumedata.tif")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "data/epfl.zarr/volumedata/0"), mode="r")[...],
                                  source)
    assert (tmp_path / "data/.downloads/epfl/volumedata.tif").exists()  # keep_downloads: true
    size, part = (tmp_path / "data/.downloads/epfl/volumedata.tif").stat().st_size, int(0.25 * 2**20)
    ranges = [r.split(" ", 2)[2] for r in replica.faults.requests_seen if "volumedata" in r]
    # Nothing pinned: the file is fetched twice and the copies must agree. Each time: the stream that found a
    # large file (abandoned after its headers), then every part exactly once.
    once = ["bytes=0-"] + [f"bytes={s}-{min(s + part, size) - 1}" for s in range(0, size, part)]
    assert sorted(ranges) == sorted(once * 2)
    assert len(ranges) > 4


def test_failed_download_keeps_the_old_output_and_partial_bytes(replica, tmp_path):
    ws = workspace(tmp_path, replica.base_url)
    run_stage("epfl", repo_root=ws)
    before = sorted(p.relative_to(ws) for p in (ws / "data/epfl.zarr").rglob("*"))
    replica.faults.path_contains = "testing.tif"
    replica.faults.drop_after_bytes, replica.faults.drop_count = 100_000, 10
    with pytest.raises(DownloadError, match="testing.tif"):
        run_stage("epfl", repo_root=ws)
    assert sorted(p.relative_to(ws) for p in (ws / "data/epfl.zarr").rglob("*")) == before
    partial = ws / "data/.downloads/epfl/testing.tif.partial"
    assert partial.exists() and partial.stat().st_size > 0  # what was downloaded is not lost


def test_pinned_checksum_mismatch_fails_without_output(replica, tmp_path):
    ws = workspace(tmp_path, replica.base_url, extra="  sha256: {training.tif: " + "ab" * 32 + "}\n")
    with pytest.raises(IntegrityError, match="training.tif.*sha256"):
        run_stage("epfl", repo_root=ws)
    assert not (ws / "data" / "epfl.zarr").exists()


@pytest.mark.parametrize(("section", "message"), [
    ("epfl:\n  splits: [trainig]\n", r"epfl.splits.*\['trainig'\]"),
    ("epfl:\n  voxel_size_nm: [5, 5, -5]\n", r"voxel_size_nm.*-5"),
    ("epfl:\n  chunks: [64, 64]\n", r"epfl.chunks.*\[64, 64\]"),
    ("epfl:\n  shards: [100, 256, 256]\n", r"shards \[100, 256, 256\].*multiples"),
    ("epfl:\n  include_volumedata: maybe\n", r"include_volumedata.*'maybe'"),
    ("epfl:\n  colour: red\n", r"unknown key.*colour"),
    ("epfl:\n  sha256: {training.tif: 0}\n", r"sha256\['training.tif'\].*got 0"),
    ("download:\n  retries: -2\nepfl: {}\n", r"download.retries.*-2"),
    ("mirror: {url: 'ftp://nowhere'}\nepfl: {}\n", r"mirror.url.*ftp://nowhere"),
    ("mirror: http://127.0.0.1:1\nepfl: {}\n", r"mirror must be a mapping.*serves"),
    ("mirror: {url: 'http://127.0.0.1:1', serves: copy}\nepfl: {}\n", r"mirror.serves.*'copy'"),
    ("mirror: {url: 'http://127.0.0.1:1', kind: cache}\nepfl: {}\n", r"unknown key.*kind.*'mirror'"),
])
def test_bad_params_fail_before_any_network_call(replica, tmp_path, section, message):
    (tmp_path / "params.yaml").write_text(f'mirror: {{url: "{replica.base_url}", serves: replica}}\n' + section
                                          if not section.startswith("mirror") else section)
    with pytest.raises(InvalidParameterError, match=message):
        run_stage("epfl", repo_root=tmp_path)
    assert replica.faults.requests_seen == []
    assert not (tmp_path / "data").exists()


def test_mirror_credentials_are_refused_without_echoing_them(replica, tmp_path):
    (tmp_path / "params.yaml").write_text("mirror: {url: 'http://someone:s3cr3t-pw@127.0.0.1:1'}\nepfl: {}\n")
    with pytest.raises(InvalidParameterError, match=r"must not hold credentials.*netrc") as err:
        run_stage("epfl", repo_root=tmp_path)
    assert "s3cr3t-pw" not in str(err.value)
    assert replica.faults.requests_seen == []


def test_unknown_dataset_names_the_value_and_lists_valid_ones(replica, tmp_path):
    workspace(tmp_path, replica.base_url)
    with pytest.raises(InvalidParameterError, match=r"unknown dataset 'epfll'.*'epfl'"):
        run_stage("epfll", repo_root=tmp_path)
    assert replica.faults.requests_seen == []


def test_stage_script_is_thin_and_runs(replica, tmp_path):
    import subprocess
    import sys

    ws = workspace(tmp_path, replica.base_url)
    shutil.copytree(Path(__file__).parents[1] / "stages", ws / "stages")
    proc = subprocess.run([sys.executable, "stages/epfl.py"], cwd=ws, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (ws / "data/epfl.zarr/training/0/zarr.json").exists()


def test_a_cache_mirror_is_verified_against_the_live_pins(replica, replica_tree, tmp_path):
    """A mirror that serves a cache of the live bytes is held to the live pins, not the replica's section."""
    import hashlib

    from emdata.sources.epfl import BASE_URL

    url = BASE_URL + "training.tif"
    digest = hashlib.sha256((replica_tree / HOST_PATH / "training.tif").read_bytes()).hexdigest()
    cache = f'mirror: {{url: "{replica.base_url}", serves: cache}}\n'
    section = "download: {retries: 0, backoff_s: 0}\nepfl: {splits: [training]}\n"
    # A live pin that the cache's bytes do not match: refused, although the replica section would accept them.
    ws = tmp_path / "wrong"
    ws.mkdir()
    (ws / "params.yaml").write_text(cache + section)
    (ws / "checksums.json").write_text(json.dumps({"live": {url: {"size": 1, "sha256": "ab" * 32}},
                                                   "replica": {url: {"sha256": digest}}}))
    with pytest.raises(IntegrityError, match=r"training.tif.*(size|sha256)"):
        run_stage("epfl", repo_root=ws)
    assert not (ws / "data" / "epfl.zarr").exists()
    # The right live pin: verified with one download, the origin recorded as cache.
    ws = tmp_path / "right"
    ws.mkdir()
    (ws / "params.yaml").write_text(cache + section)
    size = (replica_tree / HOST_PATH / "training.tif").stat().st_size
    (ws / "checksums.json").write_text(json.dumps({"live": {url: {"size": size, "sha256": digest}}}))
    replica.faults.requests_seen.clear()
    metrics = run_stage("epfl", repo_root=ws)
    prov = zarr.open_group(str(ws / "data" / "epfl.zarr"), mode="r").attrs["emdata"]
    assert prov["origin"] == "cache" and metrics["run"]["origin"] == "cache"
    gets = [r for r in replica.faults.requests_seen if "training.tif" in r]
    assert len(gets) == 1  # pinned: no second download to confirm it


def test_a_compressed_tiff_converts_page_by_page_to_the_same_voxels(tmp_path, monkeypatch):
    """A TIFF that cannot be memory-mapped (compressed) and is larger than the decode bound is read on demand, page
    by page (never whole), and gives the voxels and the mask labels of the uncompressed file."""
    from emdata.acquire.context import MirrorConfig, RunContext
    from emdata.acquire.params import DownloadConfig
    from emdata.formats import read_volume
    from emdata.formats.tiff import TiffPageStack
    from emdata.sources import epfl

    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (20, 96, 128)).astype(np.uint8)
    mask = np.where(rng.random((20, 96, 128)) > 0.8, 255, 0).astype(np.uint8)
    paths = {}
    for name, data in (("image", image), ("mask", mask)):
        paths[name] = tmp_path / f"{name}.tif"
        tifffile.imwrite(paths[name], data, compression="zlib", photometric="minisblack")
    seen = []

    def small_bound(path):
        volume = read_volume(path, max_decoded_bytes=4096)
        seen.append(type(volume.data))
        return volume

    monkeypatch.setattr(epfl, "read_volume", small_bound)
    ctx = RunContext(mirror=MirrorConfig(), download=DownloadConfig(), repo_root=tmp_path)
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="w")
    params = epfl.EpflParams(chunks=(16, 32, 32), shards=(32, 64, 64))
    epfl.convert_split(root, "training", paths["image"], paths["mask"], params, ctx)
    assert seen == [TiffPageStack, TiffPageStack]
    np.testing.assert_array_equal(root["training/0"][:], image)
    np.testing.assert_array_equal(root["training/labels/mito/0"][:], (mask > 127).astype(np.uint8))
