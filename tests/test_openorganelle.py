"""The OpenOrganelle jrc_mus-nacc-2 source end to end against its replica: real documents, dense store, labels."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import zarr
from numcodecs import get_codec
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader

from emdata.acquire.context import MirrorConfig, RunContext
from emdata.acquire.params import DownloadConfig
from emdata.errors import DownloadError, InvalidParameterError, SourceMismatchError
from emdata.offline.replica import openorganelle as oo_replica
from emdata.offline.replica.server import ReplicaServer, serve_in_thread
from emdata.sources.openorganelle import (
    GROUP_URL,
    PUBLISHED_SHAPES,
    SOURCE,
    STORE_URL,
    check_group_attrs,
    check_zarray,
    level_transform,
)

OUTPUT = "data/jrc_mus-nacc-2.zarr"
DUMP = (Path(__file__).parent / "fixtures" / "reference" / "sources"
        / "openorganelle_jrc_mus-nacc-2_recon-2_em_fibsem-int16_zarr_metadata_dump.json")
HOST = oo_replica.HOST
# A box of s0 at the far corner: crosses chunk borders and ends at the array's edge in y and x (12 chunks).
EDGE_ROI = [[100, 2400, 2500], [164, 2520, 2596]]
# A box of s2, the grid of the replica's nucleus labels (18 chunks, nuclei and background).
LABEL_ROI = [[40, 250, 250], [104, 378, 378]]


def context(server: ReplicaServer, tmp_path: Path, retries: int = 5) -> RunContext:
    return RunContext(mirror=MirrorConfig(server.base_url), download=DownloadConfig(retries=retries, backoff_s=0),
                      repo_root=tmp_path)


def run(server: ReplicaServer, tmp_path: Path, retries: int = 5, **section: object) -> dict:
    return SOURCE.run(SOURCE.parse_params(section), context(server, tmp_path, retries))


def chunk_requests(server: ReplicaServer) -> list[str]:
    return [r for r in server.faults.requests_seen
            if not r.split()[1].endswith((".zattrs", ".zarray", ".zgroup"))]


def box(roi: list[list[int]]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    return tuple(roi[0]), tuple(roi[1])  # type: ignore[return-value]


@pytest.fixture()
def server_over(tmp_path: Path) -> Iterator[Callable[..., ReplicaServer]]:
    """A server over a tree with the replica's providers, some chunks dropped (``drop``: URL path endings)."""
    stack = []

    def serve(tree: Path, drop: tuple[str, ...] = ()) -> ReplicaServer:
        providers = {prefix: (lambda name, p=provider: None if name.endswith(drop) and drop else p(name))
                     for prefix, provider in oo_replica.providers(tree, "small").items()}
        cm = serve_in_thread(tree, providers=providers)
        stack.append(cm)
        return cm.__enter__()

    yield serve
    for cm in stack:
        cm.__exit__(None, None, None)


# ----------------------------------------------------------------------------- the stage end to end
def test_stage_writes_an_roi_of_the_real_sized_level_0(replica, tmp_path):
    metrics = run(replica, tmp_path, roi_voxels=EDGE_ROI)
    out = tmp_path / OUTPUT
    expected = replica_read(0, EDGE_ROI)
    assert expected.dtype == np.int16 and (expected < 0).any()  # the signed range survives
    nodes = list(Reader(parse_url(str(out)))())
    image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs))
    np.testing.assert_array_equal(np.asarray(image.data[0]), expected)
    root = zarr.open_group(str(out), mode="r")
    ms = root.attrs["ome"]["multiscales"][0]
    assert root.attrs["ome"]["version"] == "0.5"
    assert [(a["name"], a["unit"]) for a in ms["axes"]] == [("z", "nanometer"), ("y", "nanometer"), ("x", "nanometer")]
    scale, translation = ms["datasets"][0]["coordinateTransformations"]
    assert scale == {"type": "scale", "scale": [2.96, 4.0, 4.0]}
    assert np.allclose(translation["translation"], [100 * 2.96, 2400 * 4.0, 2500 * 4.0])
    assert root["0"].shape == (64, 120, 96) and root["0"].dtype == np.int16
    assert "labels" not in root
    prov = root.attrs["emdata"]
    assert prov["source_url"] == f"{GROUP_URL}/s0" and prov["source_url"].startswith("https://janelia-cosem")
    assert prov["licence"].startswith("CC BY 4.0") and prov["axes"] == ["z", "y", "x"]
    assert prov["voxel_size_nm"] == [2.96, 4.0, 4.0] and prov["dimension_separator"] == "/"
    assert prov["source_shape"] == [564, 2520, 2596] and prov["roi_voxels"] == EDGE_ROI
    assert prov["info"][".zattrs"] == json.loads(DUMP.read_text())["attrs"]
    assert prov["discrepancies"] == [] and prov["labels"] is None
    assert prov["chunks_checked"] == {"em": {"checked": 12, "missing": 0}}
    docs = oo_replica.documents()
    expected_files = {f"{GROUP_URL}/{name}": (len(docs[f"{oo_replica.GROUP_PATH}/{name}"]),
                                              hashlib.sha256(docs[f"{oo_replica.GROUP_PATH}/{name}"]).hexdigest())
                      for name in (".zattrs", "s0/.zarray")}
    assert {f["url"]: (f["size"], f["sha256"]) for f in prov["files"]} == expected_files
    recorded = json.loads((tmp_path / "checksums.json").read_text())["replica"]
    assert {u: (v["size"], v["sha256"]) for u, v in recorded.items()} == expected_files
    assert not (tmp_path / "data" / ".downloads").exists()  # streamed: nothing kept on disk
    assert metrics["shape"] == [64, 120, 96] and metrics["write"]["bytes"] == expected.nbytes
    assert (metrics["chunks_checked"], metrics["chunks_missing"]) == (12, 0)
    assert all(isinstance(v, (int, float, list, dict)) for v in metrics.values())
    # Every chunk of the ROI was asked for (HEAD) before the first was read, and only those were read.
    chunks = chunk_requests(replica)
    heads = [r.split()[1] for r in chunks if r.startswith("HEAD")]
    gets = {r.split()[1] for r in chunks if r.startswith("GET")}
    assert len(heads) == 12 and set(heads) == gets
    assert all(r.startswith("HEAD") for r in chunks[:12])
    assert f"/{HOST}/jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/recon-2/em/fibsem-int16/s0/2/39/40" in gets  # edge chunk


def replica_read(level: int, roi: list[list[int]] | None) -> np.ndarray:
    start, stop = box(roi) if roi else ((0, 0, 0), oo_replica.SHAPES[level])
    return oo_replica.read_level(level, start, stop)


@pytest.mark.parametrize(("level", "roi"), [
    (8, None),
    (4, None),
    (3, [[5, 10, 20], [37, 90, 100]]),
    (1, [[1, 3, 4], [9, 24, 26]]),
])
def test_other_levels_and_rois_keep_the_source_geometry(replica, tmp_path, level, roi):
    section: dict = {"level": level, "chunks": [16, 16, 16], "shards": [32, 32, 32]}
    if roi is not None:
        section["roi_voxels"] = roi
    metrics = run(replica, tmp_path, **section)
    expected = replica_read(level, roi)
    start = roi[0] if roi else [0, 0, 0]
    root = zarr.open_group(str(tmp_path / OUTPUT), mode="r")
    np.testing.assert_array_equal(root["0"][...], expected)
    scale, translation = level_transform(level)
    doc_scale, doc_translation = oo_replica._SCALES_AND_TRANSLATIONS[level]
    assert np.allclose(scale, doc_scale) and np.allclose(translation, doc_translation)
    ct = root.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert ct[0]["scale"] == doc_scale  # the document's own values, float noise included
    assert np.allclose(ct[1]["translation"], [t + a * s for t, a, s in zip(doc_translation, start, doc_scale,
                                                                             strict=True)])
    assert root.attrs["emdata"]["roi_voxels"] == [list(start), [a + n for a, n in zip(start, expected.shape)]]
    assert metrics["shape"] == list(expected.shape) and metrics["level"] == level


@pytest.mark.parametrize(("section", "message"), [
    ({"level": 9}, r"level.*got 9"),
    ({"level": -1}, r"level.*got -1"),
    ({"level": "s0"}, r"level.*got 's0'"),
    ({"roi_voxels": [[0, 0, 0], [10, 10]]}, r"roi_voxels.*\[10, 10\]"),
    ({"roi_voxels": [[5, 0, 0], [5, 10, 10]]}, r"roi_voxels.*start < stop.*\[5, 10, 10\]"),
    ({"roi_voxels": [[-1, 0, 0], [5, 10, 10]]}, r"roi_voxels.*-1"),
    ({"roi_voxels": [[0, 0, 0], [5.5, 10, 10]]}, r"roi_voxels.*5.5"),
    ({"labels": ["mito"]}, r"labels \['mito'\].*valid: \['nuc'\]"),
    ({"labels": "nuc"}, r"labels must be a list.*'nuc'"),
    ({"labels": ["nuc", "nuc"]}, r"repeated"),
    ({"max_missing_chunks": -1}, r"max_missing_chunks.*-1"),
    ({"chunks": [64, 64]}, r"openorganelle.chunks.*\[64, 64\]"),
    ({"shards": [100, 256, 256]}, r"shards \[100, 256, 256\].*multiples"),
    ({"concurrency": 0}, r"concurrency.*got 0"),
    ({"max_inflight_mb": -5}, r"max_inflight_mb.*-5"),
    ({"colour": "red"}, r"unknown key.*colour"),
])
def test_bad_params_fail_before_any_network_call(replica, tmp_path, section, message):
    with pytest.raises(InvalidParameterError, match=message):
        run(replica, tmp_path, **section)
    assert replica.faults.requests_seen == []
    assert not (tmp_path / "data").exists()


def test_roi_outside_the_level_fails_before_any_chunk_is_read(replica, tmp_path):
    with pytest.raises(InvalidParameterError,
                       match=r"roi_voxels \[\[0, 0, 0\], \[283, 10, 10\]\].*s1.*\[282, 1260, 1298\]"):
        run(replica, tmp_path, level=1, roi_voxels=[[0, 0, 0], [283, 10, 10]])
    assert [r.split()[1].rsplit("/", 2)[-2:] for r in replica.faults.requests_seen] == [
        ["fibsem-int16", ".zattrs"], ["s1", ".zarray"]]
    assert not (tmp_path / OUTPUT).exists()


# ----------------------------------------------------------------------------- the documents
def _set_unit(doc: dict) -> None:
    doc["multiscales"][0]["axes"][2]["unit"] = "micrometer"


def _set_scale(doc: dict) -> None:
    doc["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [3.0, 4.0, 4.0]


def _set_dtype(doc: dict) -> None:
    doc["dtype"] = "<u2"


def _set_chunks(doc: dict) -> None:
    doc["chunks"] = [128, 128, 128]


def _set_shape(doc: dict) -> None:
    doc["shape"] = [188, 840, 865]


@pytest.mark.parametrize(("document", "tamper", "message"), [
    (".zattrs", _set_unit, r"\.zattrs.*expected axes.*nanometer.*micrometer"),
    (".zattrs", _set_scale, r"s0 scale is \[3.0, 4.0, 4.0\], expected \[2.96, 4.0, 4.0\]"),
    ("s0/.zarray", _set_dtype, r"s0/\.zarray.*int16.*'<u2'"),
    ("s0/.zarray", _set_chunks, r"expected chunks \[64, 64, 64\], got \[128, 128, 128\]"),
    ("s0/.zarray", _set_shape, r"shape \[188, 840, 865\].*differs from the published \[564, 2520, 2596\]"),
])
def test_tampered_metadata_fails_before_any_chunk_and_leaves_no_output(replica_copy, tmp_path, document, tamper,
                                                                       message):
    path = oo_replica.group_dir(replica_copy) / document
    doc = json.loads(path.read_text())
    tamper(doc)
    path.write_text(json.dumps(doc))
    with serve_in_thread(replica_copy) as server:
        with pytest.raises(SourceMismatchError, match=message):
            run(server, tmp_path, roi_voxels=EDGE_ROI)
        assert chunk_requests(server) == []
    assert not (tmp_path / OUTPUT).exists()


def test_the_published_shape_is_enforced_also_against_the_replica():
    doc = oo_replica.zarray(PUBLISHED_SHAPES[0])
    assert check_zarray(doc, 0) == (PUBLISHED_SHAPES[0], "/", [])
    small = oo_replica.zarray((40, 96, 104), ".")
    with pytest.raises(SourceMismatchError, match=r"\[40, 96, 104\].*differs from the published \[564, 2520, 2596\]"):
        check_zarray(small, 0)
    shape, separator, notes = check_zarray({k: v for k, v in doc.items() if k != "dimension_separator"}, 0)
    assert separator == "." and notes == []  # absent separator means "." in zarr v2


def _zarray_from_dump(child: dict) -> dict:
    """What zarr-python 2 writes as ``.zarray`` for an array with the dump's properties (independent of the replica)."""
    assert child["compressor"] == "Zstd(level=1)" and child["filters"] == [] and child["dtype"] == "int16"
    return {"chunks": child["chunks"], "compressor": {"id": "zstd", "level": 1}, "dimension_separator": "/",
            "dtype": "<i2", "fill_value": child["fill_value"], "filters": None, "order": child["order"],
            "shape": child["shape"], "zarr_format": 2}


def test_served_documents_are_the_verbatim_ones(replica):
    """Byte for byte as zarr-python 2 writes the dump's content (the real files' raw bytes are not held)."""
    dump = json.loads(DUMP.read_text())
    base = f"{replica.base_url}/{HOST}/jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/recon-2/em/fibsem-int16"

    def served(rel: str) -> bytes:
        response = requests.get(f"{base}/{rel}", timeout=10)
        assert response.status_code == 200, rel
        return response.content

    zattrs = served(".zattrs")
    assert zattrs == json.dumps(dump["attrs"], indent=4, sort_keys=True).encode()
    assert list(json.loads(zattrs)["multiscales"][0]) == list(dump["attrs"]["multiscales"][0])  # key order kept
    assert json.loads(zattrs) == dump["attrs"]
    assert json.loads(served(".zgroup")) == {"zarr_format": 2}
    total = 0
    for name, child in dump["children"].items():
        body = served(f"{name}/.zarray")
        doc = json.loads(body)
        assert body == json.dumps(_zarray_from_dump(child), indent=4, sort_keys=True).encode()
        assert repr(get_codec(doc["compressor"])) == child["compressor"]
        assert np.dtype(doc["dtype"]) == np.dtype(child["dtype"])
        assert [math.ceil(n / c) for n, c in zip(doc["shape"], doc["chunks"])] == child["cdata_shape"]
        total += math.prod(child["cdata_shape"])
    assert total == 17266  # the dense store's chunk count (its DVC record: 17,285 objects with the metadata)
    assert json.loads(served("s0/.zarray"))["shape"] == [564, 2520, 2596]


def test_the_store_is_dense_and_ends_at_each_level_s_grid(replica):
    """Every chunk answers (first and last of each level shown); one past the grid is 404."""
    base = f"{replica.base_url}/{HOST}/jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/recon-2/em/fibsem-int16"
    for level, shape in enumerate(PUBLISHED_SHAPES):
        grid = [math.ceil(n / 64) for n in shape]
        last = [g - 1 for g in grid]
        for index in ([0, 0, 0], last):
            assert requests.head(f"{base}/s{level}/{'/'.join(map(str, index))}", timeout=30).status_code == 200
        for axis in range(3):
            past = list(last)
            past[axis] += 1
            assert requests.head(f"{base}/s{level}/{'/'.join(map(str, past))}", timeout=30).status_code == 404
    assert requests.head(f"{base}/s0/0.0.0", timeout=30).status_code == 404  # the separator is "/"


def test_replica_chunks_are_deterministic(replica_tree, tmp_path):
    oo_replica.build(tmp_path, "full")
    ours, theirs = oo_replica.providers(tmp_path, "full"), oo_replica.providers(replica_tree, "small")
    for key in ("s0/3/20/17", "s5/0/1/1", "s8/0/0/0"):
        prefix = f"{HOST}/{oo_replica.STORE_PATH}/{oo_replica.GROUP_PATH}/{key.split('/')[0]}/"
        a, b = ours[prefix](prefix + key.split("/", 1)[1]), theirs[prefix](prefix + key.split("/", 1)[1])
        assert a is not None and a == b
    assert all((tmp_path / HOST / oo_replica.STORE_PATH / rel).read_bytes() == body
               for rel, body in oo_replica.documents().items())


def test_dot_separated_chunk_keys_read_the_same(tmp_path, server_over):
    root = tmp_path / "dots"
    oo_replica.build(root, "small", dimension_separator=".")
    server = server_over(root)
    run(server, tmp_path / "ws", level=3, roi_voxels=[[0, 60, 60], [70, 130, 130]])
    assert any(r.split()[1].endswith("/s3/1.1.1") for r in server.faults.requests_seen)
    out = zarr.open_group(str(tmp_path / "ws" / OUTPUT), mode="r")
    np.testing.assert_array_equal(out["0"][...], oo_replica.read_level(3, (0, 60, 60), (70, 130, 130)))
    assert out.attrs["emdata"]["dimension_separator"] == "."


# ----------------------------------------------------------------------------- missing chunks, 403, 5xx
MISSING = "/s0/2/38/39"  # one chunk of EDGE_ROI


def test_a_missing_chunk_of_the_dense_store_fails_naming_it(replica_tree, tmp_path, server_over):
    server = server_over(replica_tree, drop=(MISSING,))
    with pytest.raises(SourceMismatchError, match=r"1 of 12 chunks of openorganelle s0 in the ROI are missing "
                                                  r"\(HTTP 404\).*max_missing_chunks = 0.*dense.*first missing: "
                                                  + f"{GROUP_URL}{MISSING}$"):
        run(server, tmp_path, roi_voxels=EDGE_ROI)
    assert not [r for r in chunk_requests(server) if r.startswith("GET")]  # failed before reading any chunk
    assert not (tmp_path / OUTPUT).exists()


def test_missing_chunks_within_the_bound_read_as_fill_and_are_recorded(replica_tree, tmp_path, server_over):
    server = server_over(replica_tree, drop=(MISSING,))
    metrics = run(server, tmp_path, roi_voxels=EDGE_ROI, max_missing_chunks=1)
    out = zarr.open_group(str(tmp_path / OUTPUT), mode="r")
    expected = replica_read(0, EDGE_ROI)
    # Chunk (2, 38, 39) covers z 128..164, y 2432..2496, x 2496..2560 of s0: ROI-relative 28.., 32..96, 0..60.
    expected[28:, 32:96, :60] = 0
    np.testing.assert_array_equal(out["0"][...], expected)
    assert (metrics["chunks_missing"], metrics["discrepancies"]) == (1, 1)
    note = out.attrs["emdata"]["discrepancies"][0]
    assert "1 of 12 chunks" in note and "read as 0" in note and note.endswith(f"{GROUP_URL}{MISSING}")


def test_a_403_for_a_missing_chunk_fails_naming_the_chunk_and_what_it_means(replica_tree, tmp_path, server_over):
    server = server_over(replica_tree, drop=(MISSING,))
    server.set_behaviour({"missing_status": {HOST: 403}})
    with pytest.raises(DownloadError, match=f"{GROUP_URL}{MISSING}: HTTP 403 Forbidden.*anonymous listing.*"
                                            "only 404 as fill"):
        run(server, tmp_path, roi_voxels=EDGE_ROI, max_missing_chunks=5)
    assert not (tmp_path / OUTPUT).exists()


def test_403_behaviour_with_every_chunk_present_completes(replica, tmp_path):
    replica.set_behaviour({"missing_status": {HOST: 403}})
    run(replica, tmp_path, level=4)
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / OUTPUT), mode="r")["0"][...], replica_read(4, None))


def test_injected_server_errors_beyond_retries_keep_the_old_output(replica, tmp_path):
    run(replica, tmp_path, level=5)
    out = tmp_path / OUTPUT
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    replica.faults.path_contains, replica.faults.status, replica.faults.status_count = "/s5/0/1/", 503, 100
    with pytest.raises(DownloadError, match=r"s5/0/1/.*503"):
        run(replica, tmp_path, retries=1, level=5)
    assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["jrc_mus-nacc-2.zarr"]  # no temporary left


# ----------------------------------------------------------------------------- labels
def test_nucleus_labels_are_written_aligned_with_the_em_level(replica, tmp_path):
    metrics = run(replica, tmp_path, level=2, roi_voxels=LABEL_ROI, labels=["nuc"])
    root = zarr.open_group(str(tmp_path / OUTPUT), mode="r")
    start, stop = box(LABEL_ROI)
    np.testing.assert_array_equal(root["0"][...], oo_replica.read_level(2, start, stop))
    nuc = root["labels/nuc/0"][...]
    expected = oo_replica.read_labels(start, stop)
    np.testing.assert_array_equal(nuc, expected)
    assert 0 in nuc and nuc.any() and nuc.dtype == np.uint64  # nuclei and background in the box
    image_ct = root.attrs["ome"]["multiscales"][0]["datasets"]
    label_ct = root["labels/nuc"].attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"] for d in label_ct] == [d["coordinateTransformations"]
                                                                  for d in image_ct[:len(label_ct)]]
    assert root["labels"].attrs["ome"]["labels"] == ["nuc"]
    prov = root.attrs["emdata"]
    record = prov["labels"]["nuc"]
    assert record["source_url"] == f"{STORE_URL}/recon-2/labels/inference/segmentations/nuc/s0"
    assert record["scale_nm"] == oo_replica._SCALES_AND_TRANSLATIONS[2][0]
    assert record["translation_nm"] == oo_replica._SCALES_AND_TRANSLATIONS[2][1]
    assert len(prov["files"]) == 4  # the EM's two documents and the label's two
    checked = prov["chunks_checked"]["nuc"]
    assert checked["checked"] == 18 and 0 < checked["missing"] < 18  # a sparse label store: 404 is background
    assert metrics["labels"] == ["nuc"]


def test_labels_on_another_grid_are_refused_naming_both(replica, tmp_path):
    with pytest.raises(InvalidParameterError,
                       match=r"labels 'nuc': .*/nuc/s0 is at scale \[11.840000000000002, 16.0, 16.0\] nm.*"
                             r"level 0 .*fibsem-int16/s0\) is at scale \[2.96, 4.0, 4.0\] nm.*do not align.*"
                             r"set openorganelle.level: 2"):
        run(replica, tmp_path, level=0, roi_voxels=EDGE_ROI, labels=["nuc"])
    assert chunk_requests(replica) == []
    assert not (tmp_path / "data").exists()


def _shift_label(doc: dict) -> None:
    doc["multiscales"][0]["datasets"][0]["coordinateTransformations"][1]["translation"] = [0.0, 0.0, 0.0]


def _shrink_label(doc: dict) -> None:
    doc["shape"] = [141, 200, 649]


def _set_dtype_float(doc: dict) -> None:
    doc["dtype"] = "<f4"


@pytest.mark.parametrize(("document", "tamper", "error", "message"), [
    (".zattrs", _shift_label, InvalidParameterError,
     r"translation \[0.0, 0.0, 0.0\] nm.*translation \[4.4399999999999995, 6.0, 6.0\] nm.*do not align"),
    ("s0/.zarray", _shrink_label, InvalidParameterError,
     r"nuc/s0 has shape \[141, 200, 649\].*ROI \[\[40, 250, 250\], \[104, 378, 378\]\].*\[141, 630, 649\].*"
     r"does not fit"),
    ("s0/.zarray", _set_dtype_float, SourceMismatchError, r"integer dtype.*'<f4'"),
])
def test_label_documents_that_do_not_fit_fail_before_any_chunk(replica_copy, tmp_path, server_over, document,
                                                               tamper, error, message):
    path = oo_replica.label_dir(replica_copy) / document
    doc = json.loads(path.read_text())
    tamper(doc)
    path.write_text(json.dumps(doc))
    server = server_over(replica_copy)
    with pytest.raises(error, match=message):
        run(server, tmp_path, level=2, roi_voxels=LABEL_ROI, labels=["nuc"])
    assert chunk_requests(server) == []
    assert not (tmp_path / OUTPUT).exists()


def test_the_replica_s_labels_match_its_em(replica_tree):
    """The invented nuclei are darker in the EM exactly where the labels say (same physical places per level)."""
    em = oo_replica.read_level(2, (0, 128, 128), (64, 384, 384)).astype(np.float64)
    nuc = oo_replica.read_labels((0, 128, 128), (64, 384, 384))
    assert 0.2 < (nuc > 0).mean() < 0.8
    assert em[nuc > 0].mean() < em[nuc == 0].mean() - 1000
    coarse = oo_replica.nuclei(4, (0, 0, 0), oo_replica.SHAPES[4])
    assert set(np.unique(coarse)) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- the stage script, the live store


@pytest.mark.network
def test_live_store_metadata_matches_what_we_know():
    from emdata.acquire.download import Downloader

    downloader = Downloader(DownloadConfig(retries=2), progress=False)
    zattrs = downloader.fetch_json(f"{GROUP_URL}/.zattrs")
    assert zattrs == json.loads(DUMP.read_text())["attrs"]
    for level in (0, 8):
        path, _, _ = check_group_attrs(zattrs, level)
        shape, separator, _ = check_zarray(downloader.fetch_json(f"{GROUP_URL}/{path}/.zarray"), level)
        assert shape == PUBLISHED_SHAPES[level] and separator in (".", "/")


def test_a_chunk_that_turns_403_after_the_checks_fails_naming_what_it_means(replica_tree, tmp_path):
    """Present at the HEAD, gone (403) at the GET: tensorstore's PERMISSION_DENIED is explained, nothing written."""
    seen: set[str] = set()

    def once(provider: Callable[[str], bytes | None]) -> Callable[[str], bytes | None]:
        def serve(name: str) -> bytes | None:
            if name.endswith(MISSING) and name in seen:
                return None
            seen.add(name)
            return provider(name)
        return serve

    providers = {prefix: once(p) for prefix, p in oo_replica.providers(replica_tree, "small").items()}
    with serve_in_thread(replica_tree, providers=providers) as server:
        server.set_behaviour({"missing_status": {HOST: 403}})
        with pytest.raises(DownloadError, match=r"(?s)fibsem-int16/s0/2/38/39.*403.*A chunk answered HTTP 403.*anonymous listing"):
            run(server, tmp_path, retries=0, roi_voxels=EDGE_ROI)
    assert not (tmp_path / OUTPUT).exists()


def test_the_chunk_checks_are_bounded_before_any_request():
    from emdata.sources.openorganelle import MAX_CHUNK_CHECKS, chunk_urls

    whole_s0 = chunk_urls(f"{GROUP_URL}/s0", (0, 0, 0), PUBLISHED_SHAPES[0], (64, 64, 64), "/")
    assert len(whole_s0) == 14760 <= MAX_CHUNK_CHECKS
    assert whole_s0[0].endswith("/s0/0/0/0") and whole_s0[-1].endswith("/s0/8/39/40")
    with pytest.raises(SourceMismatchError, match=r"nuc/s0: the ROI touches 14745600 chunks of \[1, 1, 1\]"):
        chunk_urls(f"{STORE_URL}/recon-2/labels/inference/segmentations/nuc/s0", (0, 0, 0), (64, 240, 960),
                   (1, 1, 1), "/")


# ----------------------------------------------------------------------------- the replica's other behaviours
def test_gzip_content_encoding_on_documents_and_chunks_reads_the_same(replica, tmp_path):
    """A proxy that gzips everything on the fly: the documents and the chunks decode to the same voxels."""
    replica.set_behaviour({"gzip_paths": ["/fibsem-int16/"]})
    run(replica, tmp_path, level=3, roi_voxels=[[0, 60, 60], [70, 130, 130]])
    out = zarr.open_group(str(tmp_path / OUTPUT), mode="r")
    np.testing.assert_array_equal(out["0"][...], oo_replica.read_level(3, (0, 60, 60), (70, 130, 130)))
    assert out.attrs["emdata"]["info"][".zattrs"] == json.loads(DUMP.read_text())["attrs"]


def test_an_outage_of_the_bucket_fails_at_the_first_document_naming_it(replica, tmp_path):
    replica.set_behaviour({"outage_hosts": [HOST]})
    with pytest.raises(DownloadError, match=r"fibsem-int16/\.zattrs failed after 2 attempts: HTTP 503"):
        run(replica, tmp_path, retries=1, level=4)
    assert chunk_requests(replica) == []
    assert not (tmp_path / "data").exists()
