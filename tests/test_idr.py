"""The IDR stage (image 9846137) end to end against its replica: metadata cross-checks, conversion, failures."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader

from emdata.errors import DownloadError, IntegrityError, InvalidParameterError, SourceMismatchError
from emdata.offline.replica import ReplicaServer, serve_in_thread
from emdata.offline.replica import idr as idr_replica
from emdata.sources import idr
from emdata.stage import run_stage

OUTPUT = "data/idr_9846137.zarr"
PARAMS = """
mirror: {{url: "{mirror}", serves: replica}}
download: {{workers: 2, retries: 1, backoff_s: 0}}
idr:
  chunks: [8, 32, 32]
  shards: [16, 64, 64]
  keep_downloads: {keep}
"""
Document = dict[str, Any]



@pytest.fixture()
def tampered(replica_tree: Path, tmp_path: Path) -> Iterator[Callable[..., ReplicaServer]]:
    """A copy of the replica with the API and/or imgData documents edited in place, served on loopback."""
    stack = []

    def serve(api: Callable[[Document], None] | None = None,
              imgdata: Callable[[Document], None] | None = None) -> ReplicaServer:
        tree = tmp_path / "tree"
        shutil.copytree(replica_tree, tree)
        for edit, rel in ((api, idr_replica.API_PATH), (imgdata, idr_replica.IMGDATA_PATH)):
            if edit is not None:
                doc = json.loads((tree / rel).read_text(encoding="utf-8"))
                edit(doc)
                (tree / rel).write_text(json.dumps(doc), encoding="utf-8")
        cm = serve_in_thread(tree)
        stack.append(cm)
        return cm.__enter__()

    yield serve
    for cm in stack:
        cm.__exit__(None, None, None)


def workspace(tmp_path: Path, mirror: str, keep: bool = False, extra: str = "") -> Path:
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    (ws / "params.yaml").write_text(PARAMS.format(mirror=mirror, keep=str(keep).lower()) + extra)
    return ws


def replica_tiff(tree: Path) -> Path:
    return tree / idr_replica.TIFF_PATH


def fetched_tiff(server: ReplicaServer) -> bool:
    return any(idr_replica.FILE_NAME in r for r in server.faults.requests_seen)


def assert_no_output(ws: Path) -> None:
    assert not (ws / OUTPUT).exists()
    assert not list((ws / "data").glob(".idr_9846137.zarr.*"))  # no temporary folder left behind


# ----------------------------------------------------------------------------- the stage end to end
def test_idr_stage_writes_verified_ome_zarr_with_provenance(replica, replica_tree, tmp_path):
    ws = workspace(tmp_path, replica.base_url)
    metrics = run_stage("idr", repo_root=ws)
    out = ws / OUTPUT
    source = tifffile.imread(replica_tiff(replica_tree))
    assert source.shape == idr_replica.SHAPES["small"]

    nodes = list(Reader(parse_url(str(out)))())
    image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs))
    np.testing.assert_array_equal(np.asarray(image.data[0]), source)
    ms = zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"nanometer"}
    assert ms["type"] == "mean"
    level0, level1 = (d["coordinateTransformations"] for d in ms["datasets"][:2])
    assert level0 == [{"type": "scale", "scale": [20.0, 20.0, 20.0]},
                      {"type": "translation", "translation": [0.0, 0.0, 0.0]}]
    assert level1 == [{"type": "scale", "scale": [40.0, 40.0, 40.0]},
                      {"type": "translation", "translation": [10.0, 10.0, 10.0]}]
    # Level 1 is the 2x2x2 mean of level 0.
    l1 = zarr.open_array(str(out / "1"), mode="r")[...]
    expected = np.rint(source[:, :, :].reshape(12, 2, 48, 2, 70, 2).astype(np.float32).mean(axis=(1, 3, 5)))
    np.testing.assert_array_equal(l1, expected.astype(np.uint8))
    arr0 = zarr.open_array(str(out / "0"), mode="r")
    assert (arr0.chunks, arr0.shards) == ((8, 32, 32), (16, 64, 64))  # from the params
    assert not (out / "labels").exists()

    prov = zarr.open_group(str(out), mode="r").attrs["emdata"]
    assert prov["dataset"] == "idr" and prov["licence"] == "CC BY 4.0" and prov["doi"] == ["10.1126/sciadv.aba8811"]
    assert (prov["study"], prov["idr_dataset"], prov["image_id"], prov["image_name"]) == (
        "idr0086-miron-micrographs", "U2OS_chromatin", 9846137, "Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif")
    assert prov["axes"] == ["z", "y", "x"] and prov["voxel_size_nm"] == [20.0, 20.0, 20.0]
    digest = hashlib.sha256(replica_tiff(replica_tree).read_bytes()).hexdigest()
    assert prov["files"] == [{"url": idr.TIFF_URL, "name": idr_replica.FILE_NAME,
                              "size": replica_tiff(replica_tree).stat().st_size, "sha256": digest}]
    assert prov["files"][0]["url"].startswith("https://ftp.ebi.ac.uk/pub/databases/IDR/")  # the live URL
    docs = {d["url"]: d for d in prov["metadata_documents"]}
    assert set(docs) == {"https://idr.openmicroscopy.org/api/v0/m/images/9846137/",
                         "https://idr.openmicroscopy.org/webclient/imgData/9846137/"}
    assert all(d["shape"] == [24, 96, 140] and d["voxel_size_nm"] == [20.0, 20.0, 20.0] and d["dtype"] == "uint8"
               for d in docs.values())
    assert docs[idr.IMGDATA_URL]["dataset_name"] == "U2OS_chromatin"
    assert prov["discrepancies"] == []
    assert prov["omero_cross_check"] == {"status": "done", "checked": [idr.API_URL, idr.IMGDATA_URL],
                                         "unavailable": {}}
    assert prov["voxel_size_note"].endswith("agreeing with IDR's the JSON API image and the webclient imgData")
    # The raw TIFF is gone after the verified conversion; its checksum is recorded for the next run.
    assert not (ws / "data" / ".downloads" / "idr").exists()
    assert json.loads((ws / "checksums.json").read_text())["replica"][idr.TIFF_URL]["sha256"] == digest
    saved = json.loads((ws / "metrics" / "idr.json").read_text())
    assert saved["shape"] == [24, 96, 140] and saved["files"] == 1 and saved["discrepancies"] == 0
    assert all(isinstance(v, (int, float, list, dict)) for v in metrics.values())
    # Exactly the two documents and the TIFF were fetched (never a JPEG render).
    paths = sorted({r.split(" ")[1] for r in replica.faults.requests_seen})
    assert paths == sorted(["/" + idr_replica.TIFF_PATH, "/idr.openmicroscopy.org/api/v0/m/images/9846137/",
                            "/idr.openmicroscopy.org/webclient/imgData/9846137/"])


def test_keep_downloads_keeps_the_raw_tiff(replica, replica_tree, tmp_path):
    ws = workspace(tmp_path, replica.base_url, keep=True)
    run_stage("idr", repo_root=ws)
    kept = ws / "data" / ".downloads" / "idr" / idr_replica.FILE_NAME
    assert kept.read_bytes() == replica_tiff(replica_tree).read_bytes()


# ----------------------------------------------------------------------------- params
@pytest.mark.parametrize(("section", "message"), [
    ("idr:\n  chunks: [64, 64]\n", r"idr.chunks.*\[64, 64\]"),
    ("idr:\n  chunks: [64, 0, 64]\n", r"idr.chunks.*\[64, 0, 64\]"),
    ("idr:\n  shards: [100, 256, 256]\n", r"shards \[100, 256, 256\].*multiples"),
    ("idr:\n  keep_downloads: maybe\n", r"idr.keep_downloads.*'maybe'"),
    ("idr:\n  require_omero: 1\n", r"idr.require_omero must be true or false, got 1"),
    ("idr:\n  image_id: 1\n", r"unknown key.*image_id"),
    ("idr:\n  sha256: {other.tif: " + "ab" * 32 + "}\n", r"unknown file 'other.tif'"),
    (f"idr:\n  sha256: {{{idr_replica.FILE_NAME}: ABC}}\n", r"sha256\[.*\].*got 'ABC'"),
    ("download:\n  workers: 0\nidr: {}\n", r"download.workers.*0"),
])
def test_bad_params_fail_before_any_network_call(replica, tmp_path, section, message):
    (tmp_path / "params.yaml").write_text(f'mirror: {{url: "{replica.base_url}", serves: replica}}\n' + section)
    with pytest.raises(InvalidParameterError, match=message):
        run_stage("idr", repo_root=tmp_path)
    assert replica.faults.requests_seen == []
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- metadata cross-checks
def _pixels(doc: Document) -> Document:
    return doc["data"]["Pixels"]


@pytest.mark.parametrize(("api", "imgdata", "message"), [
    (lambda d: _pixels(d).update(SizeZ=25), None,
     r"shape \(z, y, x\): the JSON API image says \(25, 96, 140\), the webclient imgData says \(24, 96, 140\)"),
    (lambda d: _pixels(d)["Type"].update(value="uint16"), None, r"dtype: .* says 'uint16', .* says 'uint8'"),
    (lambda d: _pixels(d)["PhysicalSizeX"].update(Value=0.04), None,
     r"voxel size \(x\): the JSON API image says 40 nm, the webclient imgData says 20 nm"),
    (None, lambda d: d["pixel_size"].update(z=0.05), r"voxel size \(z\): .* says 20 nm, .*imgData says 50 nm"),
    (lambda d: _pixels(d)["PhysicalSizeY"].update(Unit="PARSEC"), None, r"unknown length unit 'PARSEC'"),
    (lambda d: d["data"].update({"@id": 1}), None, r"describes image 1, expected 9846137"),
    (None, lambda d: d["meta"].update(datasetName="HeLa_chromatin"), r"dataset 'HeLa_chromatin'"),
    (lambda d: d.update(data=[d["data"], d["data"]]), None, r"list of 2 images"),
])
def test_documents_that_disagree_fail_before_the_download(tampered, tmp_path, api, imgdata, message):
    server = tampered(api=api, imgdata=imgdata)
    ws = workspace(tmp_path, server.base_url)
    with pytest.raises(SourceMismatchError, match=message):
        run_stage("idr", repo_root=ws)
    assert not fetched_tiff(server)
    assert_no_output(ws)


def test_documents_that_agree_with_each_other_but_not_the_tiff_fail_after_it(tampered, tmp_path):
    server = tampered(api=lambda d: _pixels(d).update(SizeX=141),
                      imgdata=lambda d: d["size"].update(width=141))
    ws = workspace(tmp_path, server.base_url)
    with pytest.raises(SourceMismatchError, match=r"the TIFF says \(24, 96, 140\), the JSON API image says "
                                                  r"\(24, 96, 141\)"):
        run_stage("idr", repo_root=ws)
    assert_no_output(ws)
    assert (ws / "data/.downloads/idr" / idr_replica.FILE_NAME).exists()  # kept: nothing was converted


def _list_without_z(doc: Document) -> None:
    del doc["data"]["Pixels"]["PhysicalSizeZ"]
    doc["data"] = [doc["data"]]


def test_known_discrepancies_are_logged_and_recorded(tampered, tmp_path, caplog):
    """The docs' ``"data": [...]`` form and unstated sizes are accepted; the TIFF's own sizes are used."""
    server = tampered(api=_list_without_z, imgdata=lambda d: d["pixel_size"].update(z=None))
    ws = workspace(tmp_path, server.base_url)
    with caplog.at_level(logging.WARNING, logger="emdata.sources.idr"):
        metrics = run_stage("idr", repo_root=ws)
    notes = zarr.open_group(str(ws / OUTPUT), mode="r").attrs["emdata"]["discrepancies"]
    assert len(notes) == 3 and metrics["discrepancies"] == 3
    assert any("one-element list" in n for n in notes)
    assert any("PhysicalSizeZ not stated" in n for n in notes)
    assert any("pixel_size.z not stated" in n for n in notes)
    assert sum("known discrepancy" in r.message for r in caplog.records) == 3
    prov = zarr.open_group(str(ws / OUTPUT), mode="r").attrs["emdata"]
    assert prov["voxel_size_nm"] == [20.0, 20.0, 20.0]
    assert prov["metadata_documents"][0]["voxel_size_nm"] == [None, 20.0, 20.0]


def test_sizes_in_other_units_are_converted_explicitly(tampered, tmp_path):
    def nanometres(doc: Document) -> None:
        for axis in "XYZ":
            _pixels(doc)[f"PhysicalSize{axis}"] = {"Symbol": "nm", "Value": 20.0, "Unit": "NANOMETER"}

    server = tampered(api=nanometres)
    run_stage("idr", repo_root=workspace(tmp_path, server.base_url))
    ms = zarr.open_group(str(tmp_path / "ws" / OUTPUT), mode="r").attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [20.0, 20.0, 20.0]


@pytest.mark.parametrize(("unit", "value", "nm"), [("MICROMETER", 0.02, 20.0), ("\\u00B5m", 0.02, 20.0),
                                                   ("µm", 1 / 50, 20.0), ("NANOMETER", 4, 4.0),
                                                   ("micron", 0.004, 4.0)])
def test_to_nm(unit, value, nm):
    assert idr.to_nm(value, unit, "here") == nm


# ----------------------------------------------------------------------------- failures leave no output
def test_server_errors_beyond_retries_leave_no_output(replica, tmp_path):
    ws = workspace(tmp_path, replica.base_url)
    replica.faults.path_contains = idr_replica.FILE_NAME
    replica.faults.status, replica.faults.status_count = 503, 10
    with pytest.raises(DownloadError, match=idr_replica.FILE_NAME):
        run_stage("idr", repo_root=ws)
    assert sum(idr_replica.FILE_NAME in r for r in replica.faults.requests_seen) == 2  # first try + 1 retry
    assert_no_output(ws)


def test_a_404_on_a_metadata_document_is_not_an_outage_and_fails_before_the_download(replica, tmp_path):
    ws = workspace(tmp_path, replica.base_url)
    replica.faults.path_contains = "/api/v0/"
    replica.faults.status, replica.faults.status_count = 404, 10
    with pytest.raises(DownloadError, match=r"api/v0/m/images/9846137.*HTTP 404"):
        run_stage("idr", repo_root=ws)
    assert not fetched_tiff(replica)
    assert_no_output(ws)


def test_failed_run_keeps_the_previous_output(replica, tmp_path):
    ws = workspace(tmp_path, replica.base_url)
    run_stage("idr", repo_root=ws)
    before = sorted(p.relative_to(ws) for p in (ws / OUTPUT).rglob("*"))
    replica.faults.path_contains = idr_replica.FILE_NAME
    replica.faults.status, replica.faults.status_count = 502, 10
    with pytest.raises(DownloadError, match=idr_replica.FILE_NAME):
        run_stage("idr", repo_root=ws)
    assert sorted(p.relative_to(ws) for p in (ws / OUTPUT).rglob("*")) == before


# ----------------------------------------------------------------------------- OMERO outages
OMERO_HOST = "idr.openmicroscopy.org"


def test_omero_outage_proceeds_on_the_tiff_metadata_and_records_the_skipped_cross_check(replica, replica_tree,
                                                                                       tmp_path, caplog):
    replica.set_behaviour({"outage_hosts": [OMERO_HOST]})
    ws = workspace(tmp_path, replica.base_url)
    with caplog.at_level(logging.WARNING, logger="emdata.sources.idr"):
        metrics = run_stage("idr", repo_root=ws)
    # The JSON answered 503 (first try + 1 retry each); the TIFF on the other host came through and is verified.
    seen = replica.faults.requests_seen
    assert sum("/api/v0/m/images/9846137/" in r for r in seen) == 2
    assert sum("/webclient/imgData/9846137/" in r for r in seen) == 2
    source = tifffile.imread(replica_tiff(replica_tree))
    np.testing.assert_array_equal(zarr.open_array(str(ws / OUTPUT / "0"), mode="r")[...], source)
    prov = zarr.open_group(str(ws / OUTPUT), mode="r").attrs["emdata"]
    assert prov["voxel_size_nm"] == [20.0, 20.0, 20.0]  # from the TIFF alone
    cross = prov["omero_cross_check"]
    assert cross["status"] == "skipped" and cross["checked"] == [] and prov["metadata_documents"] == []
    assert set(cross["unavailable"]) == {idr.API_URL, idr.IMGDATA_URL}
    assert all("HTTP 503" in why for why in cross["unavailable"].values())
    assert "not cross-checked" in prov["voxel_size_note"] and "OMERO outage" in prov["voxel_size_note"]
    assert (metrics["omero_documents_checked"], metrics["omero_documents_unavailable"]) == (0, 2)
    saved = json.loads((ws / "metrics" / "idr.json").read_text())
    assert saved["omero_documents_unavailable"] == 2
    warnings = [r.message for r in caplog.records if "unavailable" in r.message]
    assert len(warnings) == 2 and all("TIFF's own metadata" in w for w in warnings)


def test_omero_outage_fails_before_the_download_when_omero_is_required(replica, tmp_path):
    replica.set_behaviour({"outage_hosts": [OMERO_HOST]})
    ws = workspace(tmp_path, replica.base_url, extra="  require_omero: true\n")
    with pytest.raises(DownloadError, match=r"idr.openmicroscopy.org/api/v0/m/images/9846137/.*HTTP 503"):
        run_stage("idr", repo_root=ws)
    assert not fetched_tiff(replica)
    assert_no_output(ws)


def test_one_document_down_still_cross_checks_the_other(replica, tmp_path):
    ws = workspace(tmp_path, replica.base_url)
    replica.faults.path_contains = "/api/v0/"
    replica.faults.status, replica.faults.status_count = 500, 10
    metrics = run_stage("idr", repo_root=ws)
    prov = zarr.open_group(str(ws / OUTPUT), mode="r").attrs["emdata"]
    assert prov["omero_cross_check"]["status"] == "partial"
    assert prov["omero_cross_check"]["checked"] == [idr.IMGDATA_URL]
    assert list(prov["omero_cross_check"]["unavailable"]) == [idr.API_URL]
    assert (metrics["omero_documents_checked"], metrics["omero_documents_unavailable"]) == (1, 1)


def test_a_maintenance_page_instead_of_json_counts_as_an_outage(tampered, tmp_path):
    server = tampered()
    (Path(server.root) / idr_replica.IMGDATA_PATH).write_text("<html><body>OMERO.web is down for maintenance"
                                                               "</body></html>")
    ws = workspace(tmp_path, server.base_url)
    run_stage("idr", repo_root=ws)
    cross = zarr.open_group(str(ws / OUTPUT), mode="r").attrs["emdata"]["omero_cross_check"]
    assert cross["status"] == "partial" and "not JSON" in cross["unavailable"][idr.IMGDATA_URL]


def test_during_an_outage_a_tiff_that_disagrees_with_itself_still_fails(tampered, tmp_path):
    """Skipping the cross-check does not skip the TIFF's own checks (ImageJ metadata, stack shape)."""
    server = tampered()
    server.set_behaviour({"outage_hosts": [OMERO_HOST]})
    tiff = Path(server.root) / idr_replica.TIFF_PATH
    data = tifffile.imread(tiff)
    tifffile.imwrite(tiff, data)  # no ImageJ description, no resolution: the voxel size cannot be told
    ws = workspace(tmp_path, server.base_url)
    with pytest.raises(SourceMismatchError, match=r"expected an ImageJ TIFF"):
        run_stage("idr", repo_root=ws)
    assert_no_output(ws)


def test_pinned_checksum_mismatch_fails_without_output(replica, tmp_path):
    ws = workspace(tmp_path, replica.base_url, extra=f"  sha256: {{{idr_replica.FILE_NAME}: {'ab' * 32}}}\n")
    with pytest.raises(IntegrityError, match="sha256"):
        run_stage("idr", repo_root=ws)
    assert_no_output(ws)


def test_conversion_that_does_not_read_back_equal_keeps_the_raw_tiff(replica, tmp_path, monkeypatch):
    # ngff's own tests show a lossy write is caught; here: what the stage does when the check fails after writing.
    write_image = idr.ngff.write_image

    def written_then_refused(*args: Any, **kwargs: Any) -> Any:
        write_image(*args, **kwargs)
        raise SourceMismatchError("conversion of the TIFF does not read back equal at (slice(0, 8), ...)")

    monkeypatch.setattr(idr.ngff, "write_image", written_then_refused)
    ws = workspace(tmp_path, replica.base_url)
    with pytest.raises(SourceMismatchError, match="does not read back equal"):
        run_stage("idr", repo_root=ws)
    assert_no_output(ws)
    assert (ws / "data/.downloads/idr" / idr_replica.FILE_NAME).exists()


# ----------------------------------------------------------------------------- the replica itself
def test_replica_tiff_is_imagej_like_the_real_file(replica_tree):
    with tifffile.TiffFile(replica_tiff(replica_tree)) as tif:
        page = tif.pages.first
        assert tif.is_imagej and tif.imagej_metadata is not None
        meta = tif.imagej_metadata
        assert (meta["ImageJ"], meta["unit"], meta["spacing"], meta["images"]) == ("1.52p", "\\u00B5m", 0.02, 24)
        assert page.compression == 1 and page.rowsperstrip == 96 and len(page.dataoffsets) == 1
        assert page.tags["XResolution"].value == (50, 1) and page.tags["ResolutionUnit"].value == 1
        assert tif.series[0].dataoffset is not None  # contiguous: memory-mappable
    # The keys of the real file's description (reference tag dump idr_9846137_xy_tif_tags.json).
    assert set(meta) == {"ImageJ", "images", "slices", "unit", "spacing", "loop", "min", "max"}


# The keys of omero-web's imageMarshal, in its order (omeroweb/webgateway/marshal.py, ome/omero-web @ 0304697;
# reference: live_behaviour_evidence.md), for an image with a rendering definition and no objective settings.
IMAGE_MARSHAL = {
    ".": ["id", "meta", "perms", "interpolate", "size", "pixel_size", "pixel_range", "channels", "split_channel",
          "rdefs", "tiles", "init_zoom"],
    "meta": ["imageName", "imageDescription", "imageAuthor", "projectName", "projectId", "projectDescription",
             "datasetName", "datasetId", "datasetDescription", "wellSampleId", "wellId", "imageTimestamp", "imageId",
             "pixelsType"],
    "perms": ["canAnnotate", "canEdit", "canDelete", "canLink"],
    "size": ["width", "height", "z", "t", "c"],
    "pixel_size": ["x", "y", "z"],
    "channel": ["emissionWave", "label", "color", "inverted", "reverseIntensity", "family", "coefficient", "active",
                "window"],
    "window": ["min", "max", "start", "end"],
    "rdefs": ["model", "projection", "defaultZ", "defaultT", "invertAxis"],
}


def test_replica_imgdata_has_the_field_set_of_omero_web_s_image_marshal(replica):
    import requests

    doc = requests.get(f"{replica.base_url}/{OMERO_HOST}/webclient/imgData/9846137/", timeout=10).json()
    assert list(doc) == IMAGE_MARSHAL["."]
    for key in ("meta", "perms", "size", "pixel_size", "rdefs"):
        assert list(doc[key]) == IMAGE_MARSHAL[key], key
    assert [list(c) for c in doc["channels"]] == [IMAGE_MARSHAL["channel"]]
    assert list(doc["channels"][0]["window"]) == IMAGE_MARSHAL["window"]
    # The values a third party recorded from the live document.
    assert doc["meta"]["projectName"] == "idr0086-miron-micrographs/experimentD"
    assert doc["pixel_size"] == {"x": 0.02, "y": 0.02, "z": 0.02} and doc["meta"]["pixelsType"] == "uint8"


def test_replica_is_deterministic(replica_tree, tmp_path):
    idr_replica.build(tmp_path, "small")
    for rel in (idr_replica.TIFF_PATH, idr_replica.API_PATH, idr_replica.IMGDATA_PATH):
        assert (tmp_path / rel).read_bytes() == (replica_tree / rel).read_bytes()


# ----------------------------------------------------------------------------- the stage script


def test_stage_script_runs(replica, tmp_path):
    ws = workspace(tmp_path, replica.base_url)
    shutil.copytree(Path(__file__).parents[1] / "stages", ws / "stages")
    proc = subprocess.run([sys.executable, "stages/idr.py"], cwd=ws, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (ws / OUTPUT / "0" / "zarr.json").exists()


# ----------------------------------------------------------------------------- the live source
@pytest.mark.network
def test_live_idr_documents_and_tiff_agree_with_what_we_know():
    import requests

    from emdata.acquire.download import USER_AGENT

    headers = {"User-Agent": USER_AGENT}
    notes: list[str] = []
    api, _ = idr.parse_api_image(requests.get(idr.API_URL, headers=headers, timeout=30).json(), notes)
    imgdata, info = idr.parse_imgdata(requests.get(idr.IMGDATA_URL, headers=headers, timeout=30).json(), notes)
    idr.cross_check(api, imgdata)
    assert api.shape == (184, 775, 1121) and api.dtype == "uint8"
    assert info["dataset_name"] == "U2OS_chromatin"
    r = requests.get(idr.TIFF_URL, headers={**headers, "Range": "bytes=0-7"}, timeout=30)
    assert r.status_code == 206 and r.content[:4] == b"II*\x00"


# ----------------------------------------------------------------------------- the replica's other behaviours
def test_gzip_encoded_omero_documents_are_decoded_and_cross_checked(replica, tmp_path):
    replica.set_behaviour({"gzip_paths": [f"/{OMERO_HOST}/"]})
    run_stage("idr", repo_root=workspace(tmp_path, replica.base_url))
    prov = zarr.open_group(str(tmp_path / "ws" / OUTPUT), mode="r").attrs["emdata"]
    assert prov["omero_cross_check"]["status"] == "done" and len(prov["metadata_documents"]) == 2


def test_a_tiff_recoded_in_transit_fails_naming_the_url_and_the_encoding(replica, tmp_path):
    replica.set_behaviour({"gzip_paths": [idr_replica.FILE_NAME]})
    ws = workspace(tmp_path, replica.base_url)
    with pytest.raises(DownloadError, match=idr_replica.FILE_NAME + r".*Content-Encoding 'gzip'"):
        run_stage("idr", repo_root=ws)
    assert_no_output(ws)


def test_a_dropped_connection_to_omero_counts_as_an_outage(replica, tmp_path):
    replica.faults.path_contains = "/webclient/imgData/"
    replica.faults.drop_after_bytes, replica.faults.drop_count = 10, 10
    ws = workspace(tmp_path, replica.base_url)
    run_stage("idr", repo_root=ws)
    cross = zarr.open_group(str(ws / OUTPUT), mode="r").attrs["emdata"]["omero_cross_check"]
    assert cross["status"] == "partial" and "failed after 2 attempts" in cross["unavailable"][idr.IMGDATA_URL]
