"""The OpenOrganelle jrc_mus-nacc-2 source end to end against its replica: metadata checks, streaming, geometry."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader

from emdata.errors import DownloadError, InvalidParameterError, SourceMismatchError
from emdata.acquire.context import MirrorConfig, RunContext
from emdata.acquire.params import DownloadConfig
from emdata.offline.replica import openorganelle as replica
from emdata.offline.replica.server import ReplicaServer, serve_in_thread
from emdata.sources.openorganelle import (
    GROUP_URL,
    PUBLISHED_SHAPES,
    SOURCE,
    check_group_attrs,
    check_zarray,
    level_transform,
)

OUTPUT = "data/jrc_mus-nacc-2.zarr"
DUMP = (Path(__file__).parent / "fixtures" / "reference" / "sources"
        / "openorganelle_jrc_mus-nacc-2_recon-2_em_fibsem-int16_zarr_metadata_dump.json")


def context(replica_copy_server: ReplicaServer, tmp_path: Path, retries: int = 5) -> RunContext:
    return RunContext(mirror=MirrorConfig(replica_copy_server.base_url), download=DownloadConfig(retries=retries, backoff_s=0),
                      repo_root=tmp_path)


def run(replica_copy_server: ReplicaServer, tmp_path: Path, retries: int = 5, **section: object) -> dict:
    return SOURCE.run(SOURCE.parse_params(section), context(replica_copy_server, tmp_path, retries))


def served_copy(replica_copy: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "served"
    shutil.copytree(replica_copy, copy)
    return copy


def chunk_requests(replica_copy_server: ReplicaServer) -> list[str]:
    return [r for r in replica_copy_server.faults.requests_seen if not r.split()[1].endswith((".zattrs", ".zarray"))]


def test_stage_writes_level_0_as_ome_zarr(replica_copy_server, replica_copy, tmp_path):
    metrics = run(replica_copy_server, tmp_path)
    out = tmp_path / OUTPUT
    source = replica.read_level(replica_copy, 0)
    assert source.dtype == np.int16 and (source < 0).any()  # the signed range survives
    nodes = list(Reader(parse_url(str(out)))())
    image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs))
    np.testing.assert_array_equal(np.asarray(image.data[0]), source)
    root = zarr.open_group(str(out), mode="r")
    ms = root.attrs["ome"]["multiscales"][0]
    assert root.attrs["ome"]["version"] == "0.5"
    assert [(a["name"], a["unit"]) for a in ms["axes"]] == [("z", "nanometer"), ("y", "nanometer"), ("x", "nanometer")]
    assert ms["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [2.96, 4.0, 4.0]}, {"type": "translation", "translation": [0.0, 0.0, 0.0]}]
    # Our own near-isotropic mean pyramid (2.96 x 4 x 4 nm: level 1 halves z only); a mean-pooled axis moves
    # its voxel centre by half a level-0 voxel, as the source's own s1 does.
    assert ms["datasets"][1]["coordinateTransformations"] == [
        {"type": "scale", "scale": [5.92, 4.0, 4.0]}, {"type": "translation", "translation": [1.48, 0.0, 0.0]}]
    level1 = root["1"][...]
    assert level1.dtype == np.int16 and level1.shape == (20, 96, 104)
    array = root["0"]
    assert array.chunks == (40, 64, 64) and array.shards == (40, 128, 128)  # 64^3 / 256^3 clipped to the array
    assert "labels" not in root
    prov = root.attrs["emdata"]
    assert prov["source_url"] == f"{GROUP_URL}/s0" and prov["source_url"].startswith("https://janelia-cosem")
    assert prov["licence"].startswith("CC BY 4.0") and prov["axes"] == ["z", "y", "x"]
    assert prov["voxel_size_nm"] == [2.96, 4.0, 4.0] and prov["dimension_separator"] == "/"
    assert prov["info"][".zattrs"] == replica.GROUP_ATTRS
    assert any("stand-in" in n for n in prov["discrepancies"])  # the replica's smaller shape is a recorded, known difference
    group = replica.group_dir(replica_copy)
    expected = {f"{GROUP_URL}/{name}": (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
                for name, path in ((".zattrs", group / ".zattrs"), ("s0/.zarray", group / "s0" / ".zarray"))}
    assert {f["url"]: (f["size"], f["sha256"]) for f in prov["files"]} == expected
    recorded = json.loads((tmp_path / "checksums.json").read_text())["replica"]
    assert {u: (v["size"], v["sha256"]) for u, v in recorded.items()} == expected
    assert not (tmp_path / "data" / ".downloads").exists()  # streamed: nothing kept on disk
    assert metrics["shape"] == [40, 96, 104] and metrics["write"]["bytes"] == source.nbytes
    assert all(isinstance(v, (int, float, list, dict)) for v in metrics.values())
    # The all-fill corner chunk is absent upstream (404) and reads as 0.
    assert any(r.endswith("/s0/0/0/0") for r in replica_copy_server.faults.requests_seen)
    assert (source[:, :64, :64] == 0).all()


@pytest.mark.parametrize(("level", "roi"), [
    (1, None),
    (0, [[5, 10, 20], [37, 90, 100]]),
    (2, [[1, 3, 4], [9, 24, 26]]),
])
def test_other_levels_and_rois_keep_the_source_geometry(replica_copy_server, replica_copy, tmp_path, level, roi):
    section: dict = {"level": level, "chunks": [16, 16, 16], "shards": [32, 32, 32]}
    if roi is not None:
        section["roi_voxels"] = roi
    metrics = run(replica_copy_server, tmp_path, **section)
    source = replica.read_level(replica_copy, level)
    start, stop = roi or [[0, 0, 0], list(source.shape)]
    expected = source[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
    root = zarr.open_group(str(tmp_path / OUTPUT), mode="r")
    np.testing.assert_array_equal(root["0"][...], expected)
    scale, translation = level_transform(level)
    doc_scale, doc_translation = replica._SCALES_AND_TRANSLATIONS[level]
    assert np.allclose(scale, doc_scale) and np.allclose(translation, doc_translation)
    ct = root.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert ct[0]["scale"] == doc_scale  # the document's own values, float noise included
    assert np.allclose(ct[1]["translation"], [t + a * s for t, a, s in zip(doc_translation, start, doc_scale,
                                                                             strict=True)])
    assert root.attrs["emdata"]["roi_voxels"] == [list(start), list(stop)]
    assert metrics["shape"] == list(expected.shape) and metrics["level"] == level
    assert root["0"].chunks == (16, 16, 16) or min(expected.shape) < 16


@pytest.mark.parametrize(("section", "message"), [
    ({"level": 9}, r"level.*got 9"),
    ({"level": -1}, r"level.*got -1"),
    ({"level": "s0"}, r"level.*got 's0'"),
    ({"roi_voxels": [[0, 0, 0], [10, 10]]}, r"roi_voxels.*\[10, 10\]"),
    ({"roi_voxels": [[5, 0, 0], [5, 10, 10]]}, r"roi_voxels.*start < stop.*\[5, 10, 10\]"),
    ({"roi_voxels": [[-1, 0, 0], [5, 10, 10]]}, r"roi_voxels.*-1"),
    ({"roi_voxels": [[0, 0, 0], [5.5, 10, 10]]}, r"roi_voxels.*5.5"),
    ({"chunks": [64, 64]}, r"openorganelle.chunks.*\[64, 64\]"),
    ({"shards": [100, 256, 256]}, r"shards \[100, 256, 256\].*multiples"),
    ({"concurrency": 0}, r"concurrency.*got 0"),
    ({"max_inflight_mb": -5}, r"max_inflight_mb.*-5"),
    ({"colour": "red"}, r"unknown key.*colour"),
])
def test_bad_params_fail_before_any_network_call(replica_copy_server, tmp_path, section, message):
    with pytest.raises(InvalidParameterError, match=message):
        run(replica_copy_server, tmp_path, **section)
    assert replica_copy_server.faults.requests_seen == []
    assert not (tmp_path / "data").exists()


def test_roi_outside_the_level_fails_before_any_chunk_is_read(replica_copy_server, tmp_path):
    with pytest.raises(InvalidParameterError, match=r"roi_voxels \[\[0, 0, 0\], \[20, 50, 50\]\].*s1.*\[20, 48, 52\]"):
        run(replica_copy_server, tmp_path, level=1, roi_voxels=[[0, 0, 0], [20, 50, 50]])
    assert [r.split()[1].rsplit("/", 2)[-2:] for r in replica_copy_server.faults.requests_seen] == [
        ["fibsem-int16", ".zattrs"], ["s1", ".zarray"]]
    assert not (tmp_path / OUTPUT).exists()


def _set_unit(doc: dict) -> None:
    doc["multiscales"][0]["axes"][2]["unit"] = "micrometer"


def _set_scale(doc: dict) -> None:
    doc["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [3.0, 4.0, 4.0]


def _set_dtype(doc: dict) -> None:
    doc["dtype"] = "<u2"


def _set_chunks(doc: dict) -> None:
    doc["chunks"] = [128, 128, 128]


@pytest.mark.parametrize(("document", "tamper", "message"), [
    (".zattrs", _set_unit, r"\.zattrs.*expected axes.*nanometer.*micrometer"),
    (".zattrs", _set_scale, r"s0 scale is \[3.0, 4.0, 4.0\], expected \[2.96, 4.0, 4.0\]"),
    ("s0/.zarray", _set_dtype, r"s0/\.zarray.*int16.*'<u2'"),
    ("s0/.zarray", _set_chunks, r"expected chunks \[64, 64, 64\], got \[128, 128, 128\]"),
])
def test_tampered_metadata_fails_before_any_chunk_and_leaves_no_output(replica_copy, tmp_path, document, tamper, message):
    served = served_copy(replica_copy, tmp_path)
    path = replica.group_dir(served) / document
    doc = json.loads(path.read_text())
    tamper(doc)
    path.write_text(json.dumps(doc))
    with serve_in_thread(served) as replica_copy_server:
        with pytest.raises(SourceMismatchError, match=message):
            run(replica_copy_server, tmp_path)
        assert chunk_requests(replica_copy_server) == []
    assert not (tmp_path / OUTPUT).exists()


def test_the_published_shape_is_enforced_against_the_live_store():
    doc = replica.zarray(PUBLISHED_SHAPES[0])
    assert check_zarray(doc, 0, strict=True) == (PUBLISHED_SHAPES[0], "/", [])
    small = replica.zarray((40, 96, 104), ".")
    with pytest.raises(SourceMismatchError, match=r"\[40, 96, 104\].*differs from the published \[564, 2520, 2596\]"):
        check_zarray(small, 0, strict=True)
    shape, separator, notes = check_zarray({k: v for k, v in small.items() if k != "dimension_separator"}, 0,
                                           strict=False)
    assert separator == "." and "stand-in" in notes[0]  # absent separator means "." in zarr v2


def test_injected_server_errors_beyond_retries_keep_the_old_output(replica_copy_server, tmp_path):
    run(replica_copy_server, tmp_path)
    out = tmp_path / OUTPUT
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    replica_copy_server.faults.requests_seen.clear()
    replica_copy_server.faults.path_contains, replica_copy_server.faults.status, replica_copy_server.faults.status_count = "/s0/0/1/", 503, 100
    with pytest.raises(DownloadError, match=r"reading openorganelle .*s0"):
        run(replica_copy_server, tmp_path, retries=1)
    assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["jrc_mus-nacc-2.zarr"]  # no temporary left


def test_dot_separated_chunk_keys_read_the_same(tmp_path):
    root = tmp_path / "dots"
    replica.build(root, "small", dimension_separator=".")
    assert (replica.group_dir(root) / "s0" / "0.1.1").is_file()
    with serve_in_thread(root) as replica_copy_server:
        run(replica_copy_server, tmp_path / "ws")
    out = zarr.open_group(str(tmp_path / "ws" / OUTPUT), mode="r")
    np.testing.assert_array_equal(out["0"][...], replica.read_level(root, 0))
    assert out.attrs["emdata"]["dimension_separator"] == "."


def test_replica_is_deterministic_and_serves_the_real_zattrs(replica_copy, tmp_path):
    again = tmp_path / "again"
    replica.build(again, "small")
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file() and ".built" not in p.parts)
    assert len(files) > 9
    assert all((replica_copy / f).read_bytes() == (again / f).read_bytes() for f in files)
    shapes = [tuple(json.loads((replica.group_dir(replica_copy) / f"s{i}" / ".zarray").read_text())["shape"])
              for i in range(9)]
    assert shapes == replica.level_shapes(replica.SHAPES["small"])
    for level, (scale, translation) in enumerate(replica._SCALES_AND_TRANSLATIONS):
        assert check_group_attrs(replica.GROUP_ATTRS, level) == (f"s{level}", tuple(scale), tuple(translation))
    assert replica.GROUP_ATTRS == json.loads(DUMP.read_text())["attrs"]


def test_stage_script_is_thin():
    text = (Path(__file__).parents[1] / "stages" / "openorganelle.py").read_text()
    assert 'main("openorganelle")' in text and "from emdata.stage import main" in text


@pytest.mark.network
def test_live_store_metadata_matches_what_we_know():
    from emdata.acquire.download import Downloader

    downloader = Downloader(DownloadConfig(retries=2), progress=False)
    zattrs = downloader.fetch_json(f"{GROUP_URL}/.zattrs")
    for level in (0, 8):
        path, _, _ = check_group_attrs(zattrs, level)
        shape, separator, _ = check_zarray(downloader.fetch_json(f"{GROUP_URL}/{path}/.zarray"), level, live=True)
        assert shape == PUBLISHED_SHAPES[level] and separator in (".", "/")
