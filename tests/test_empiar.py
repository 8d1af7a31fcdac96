"""The EMPIAR-11759 stage end to end against the small replica, its cross-checks, and its failures."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader

from emdata.errors import DownloadError, IntegrityError, InvalidParameterError, SourceMismatchError
from emdata.acquire.context import MirrorConfig, RunContext
from emdata.acquire.params import DownloadConfig
from emdata.offline.replica import ReplicaServer
from emdata.offline.replica import empiar as replica
from emdata.offline.replica.dm3_writer import write_dm3
from emdata.sources import empiar
from emdata.sources.empiar import SOURCE

REFERENCE_API = Path(__file__).parent / "fixtures" / "reference" / "sources" / "empiar_11759_api.json"
OUTPUT = "data/empiar_11759.zarr"


def run(replica_copy_server: ReplicaServer, ws: Path, section: dict[str, Any] | None = None, **download: Any) -> dict[str, Any]:
    """What the stage does: validate the params section first, then run against the replica."""
    params = SOURCE.parse_params(section or {})
    config = DownloadConfig(**{"workers": 4, "retries": 1, "backoff_s": 0, **download})
    return SOURCE.run(params, RunContext(mirror=MirrorConfig(replica_copy_server.base_url), download=config, repo_root=ws))


def replica_stack(replica_copy: Path) -> np.ndarray:
    return np.stack([empiar.read_slice(replica_copy / replica.DATA_PATH / replica.SLICE_NAME.format(i)).data
                     for i in range(replica.N_SLICES)])


def api_file(replica_copy: Path) -> Path:
    return replica_copy / replica.API_PATH / "index.html"


def tamper_api(replica_copy: Path, **imageset: Any) -> None:
    doc = json.loads(api_file(replica_copy).read_text())
    doc["EMPIAR-11759"]["imagesets"][0].update(imageset)
    api_file(replica_copy).write_text(json.dumps(doc))


def test_stage_writes_verified_ome_zarr_with_provenance(replica_copy_server, replica_copy, tmp_path):
    ws = tmp_path / "ws"
    metrics = run(replica_copy_server, ws)
    out = ws / OUTPUT
    expected = replica_stack(replica_copy)
    assert expected.shape == (16, 96, 128)
    nodes = list(Reader(parse_url(str(out)))())
    image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs))
    np.testing.assert_array_equal(np.asarray(image.data[0]), expected)
    level0 = zarr.open_array(str(out / "0"), mode="r")
    assert level0.chunks == (16, 64, 64) and level0.shards == (16, 128, 128)  # 64^3 / 256^3 clipped to the array
    ms = zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]
    assert [(a["name"], a["unit"]) for a in ms["axes"]] == [("z", "nanometer"), ("y", "nanometer"),
                                                             ("x", "nanometer")]
    assert ms["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [50.0, 7.99825, 7.99825]}, {"type": "translation", "translation": [0.0, 0.0, 0.0]}]
    # Anisotropy-aware pyramid: z (50 nm) is not halved until y and x come close to it.
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [50.0, 15.9965, 15.9965]
    assert ms["type"] == "mean"
    level1 = zarr.open_array(str(out / "1"), mode="r")[...]
    np.testing.assert_array_equal(level1[0, 0, 0],  # factors (1, 2, 2): a 2 x 2 patch of one slice
                                  np.rint(expected[0, :2, :2].astype(np.float32).mean()).astype(np.uint8))

    prov = zarr.open_group(str(out), mode="r").attrs["emdata"]
    assert prov["dataset"] == "empiar" and prov["licence"].startswith("CC0") and prov["origin"] == "replica"
    assert prov["doi"] == ["10.6019/EMPIAR-11759"] and "Developing retina" in prov["title"]
    assert "Iudin" in prov["citation"]
    assert prov["voxel_size_nm"] == [50.0, 7.99825, 7.99825] and prov["axes"] == ["z", "y", "x"]
    assert prov["api"]["url"] == "https://www.ebi.ac.uk/empiar/api/entry/11759/"
    assert prov["api"]["z_nm"] == 50.0 and prov["api"]["num_images"] == 16
    assert prov["listing"]["slices"] == [replica.SLICE_NAME.format(i) for i in range(16)]
    assert prov["listing"]["other_entries"] == ["F57-8_test1.xml.gz", f"{replica.SUBFOLDER}/"]
    names = {f["name"] for f in prov["files"]}
    assert names == {replica.SLICE_NAME.format(i) for i in range(16)} | {"F57-8_test1.xml.gz"}
    assert all(f["url"] == "https://ftp.ebi.ac.uk/empiar/world_availability/11759/data/" + f["name"]
               for f in prov["files"])  # the live URL, not the mirror's
    assert prov["discrepancies"] == [] and prov["decoded_sha256_checked"] == []  # replica: no live pins
    # Raw downloads are gone after the verified conversion; their hashes are kept for the next run.
    assert not (ws / "data" / ".downloads" / "empiar").exists()
    recorded = json.loads((ws / "checksums.json").read_text())["replica"]
    assert {f["url"]: f["sha256"] for f in prov["files"]} == {u: v["sha256"] for u, v in recorded.items()}
    assert metrics["files"] == 17 and metrics["shape"] == [16, 96, 128] and metrics["listing_attempts"] == 1
    assert all(isinstance(v, (int, float)) or (isinstance(v, list) and all(isinstance(x, int) for x in v))
               for v in metrics.values())
    # The 16 slices went through the download engine, each fetched once.
    slices_seen = [r for r in replica_copy_server.faults.requests_seen if r.split(" ")[1].endswith(".dm3")]
    assert len(slices_seen) == 16


def test_keep_downloads_keeps_the_raw_files(replica_copy_server, tmp_path):
    run(replica_copy_server, tmp_path, {"keep_downloads": True})
    kept = sorted(p.name for p in (tmp_path / "data/.downloads/empiar").iterdir())
    assert len(kept) == 17 and "F57-8_test1.xml.gz" in kept


@pytest.mark.parametrize(("section", "message"), [
    ({"chunks": [64, 64]}, r"empiar.chunks.*\[64, 64\]"),
    ({"chunks": [64, 64, 0]}, r"empiar.chunks.*\[64, 64, 0\]"),
    ({"shards": [100, 256, 256]}, r"shards \[100, 256, 256\].*multiples"),
    ({"listing_attempts": 0}, r"listing_attempts.*got 0"),
    ({"listing_attempts": "3"}, r"listing_attempts.*got '3'"),
    ({"keep_downloads": "yes"}, r"keep_downloads.*'yes'"),
    ({"sha256": {"slice_0000.dm3": "ab" * 32}}, r"unknown file 'slice_0000.dm3'"),
    ({"sha256": {"F57-8_test1_3VBSED_slice_0000.dm3": "XYZ"}}, r"sha256\['F57-8_test1_3VBSED_slice_0000.dm3'\].*'XYZ'"),
    ({"entry": 11760}, r"unknown key.*entry"),
])
def test_bad_params_fail_before_any_network_call(replica_copy_server, tmp_path, section, message):
    with pytest.raises(InvalidParameterError, match=message):
        run(replica_copy_server, tmp_path, section)
    assert replica_copy_server.faults.requests_seen == []
    assert not (tmp_path / "data").exists()


def test_api_document_of_another_shape_fails_clearly(replica_copy_server, replica_copy, tmp_path):
    api_file(replica_copy).write_text(json.dumps({"EMPIAR-11760": {}}))
    with pytest.raises(SourceMismatchError, match=r"api/entry/11759/: the EMPIAR-11759 entry lacks or garbles"):
        run(replica_copy_server, tmp_path)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"image_width": "130"}, r"the API says width x height \(130, 96\), the DM3 slices are \(128, 96\)"),
    ({"pixel_width": 100.0}, r"pixel size in x: the API says 100.0 Å = 10.0 nm, the DM3 calibration 7.99825 nm"),
    ({"num_images_or_tilt_series": 15}, r"lists 16 DM3 slices, the API says num_images_or_tilt_series = 15"),
    ({"details": "The resolution is 8nm/px in xy."}, r"does not state the section thickness.*8nm/px in xy"),
    ({"data_format": "TIFF"}, r"expected imagesets\[0\] of DM3 UNSIGNED BYTE images in 'data', got 'TIFF'"),
])
def test_metadata_disagreement_fails_without_output(replica_copy_server, replica_copy, tmp_path, change, message):
    tamper_api(replica_copy, **change)
    with pytest.raises(SourceMismatchError, match=message):
        run(replica_copy_server, tmp_path)
    assert not (tmp_path / OUTPUT).exists()


def test_z_spacing_comes_from_the_details_text(replica_copy_server, replica_copy, tmp_path):
    tamper_api(replica_copy, details="SBF-SEM. The resolution is 8nm/px in xy and 40 nm per section (z).")
    run(replica_copy_server, tmp_path)
    ms = zarr.open_group(str(tmp_path / OUTPUT), mode="r").attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [40.0, 7.99825, 7.99825]


def test_the_live_size_disagreement_is_known_logged_and_recorded(caplog):
    """The verbatim API says 5628 x 5632; the live slices are 5496 x 5500: recorded, not fatal."""
    document = json.loads(replica.API_DOCUMENT)
    assert replica.API_DOCUMENT == REFERENCE_API.read_text(encoding="utf-8")  # served byte for byte
    facts = empiar.parse_api(document)
    assert (facts.num_images, facts.z_nm, facts.pixel_width_nm) == (16, 50.0, 8.0)
    live_shape = np.broadcast_to(np.uint8(0), (5500, 5496))  # shapes only; no 30 MB per slice
    slices = [empiar.Slice(replica.SLICE_NAME.format(i), live_shape, (7.99825, 7.99825)) for i in range(16)]
    with caplog.at_level(logging.WARNING, logger="emdata.sources.empiar"):
        known = empiar.check_slices(slices, facts)
    assert len(known) == 1 and "5628 x 5632, the DM3 slices are 5496 x 5500" in known[0]
    assert "5628 x 5632" in caplog.text and "known disagreement" in caplog.text
    # The same API values against any other file size are not known: they fail, naming both.
    other = [empiar.Slice(s.name, np.broadcast_to(np.uint8(0), (5500, 5500)), s.pixel_size_nm) for s in slices]
    with pytest.raises(SourceMismatchError, match=r"\(5628, 5632\), the DM3 slices are \(5500, 5500\)"):
        empiar.check_slices(other, facts)


def test_slices_that_disagree_with_one_another_fail(replica_copy_server, replica_copy, tmp_path):
    odd = np.zeros((96, 120), np.uint8)
    write_dm3(replica_copy / replica.DATA_PATH / replica.SLICE_NAME.format(7), odd,
                      pixel_size=(replica.PIXEL_SIZE_UM,) * 2)
    with pytest.raises(SourceMismatchError, match=r"slice_0007.dm3 is \(96, 120\).*slice_0000.dm3 is \(96, 128\)"):
        run(replica_copy_server, tmp_path)
    assert not (tmp_path / OUTPUT).exists()
    assert len(list((tmp_path / "data/.downloads/empiar").glob("*.dm3"))) == 16  # kept: no verified output


def test_short_listing_is_fetched_again_then_fails_clearly(replica_copy_server, replica_copy, tmp_path):
    index = replica_copy / replica.DATA_PATH / "index.html"
    index.write_text(re.sub(r".*slice_0007\.dm3.*\n", "", index.read_text()))
    with pytest.raises(SourceMismatchError, match=r"listed \[15, 15\] DM3 slices in 2 attempts; the API says 16 .*last missing: \[7\]"):
        run(replica_copy_server, tmp_path, {"listing_attempts": 2})
    listing = [r for r in replica_copy_server.faults.requests_seen if r.split(" ")[1].endswith("/11759/data/")]
    assert len(listing) == 2
    assert not any(r.split(" ")[1].endswith(".dm3") for r in replica_copy_server.faults.requests_seen)  # nothing downloaded
    assert not (tmp_path / "data").exists()


def test_listing_recovers_when_a_later_fetch_is_complete(replica_tree):
    full = (replica_tree / replica.DATA_PATH / "index.html").read_bytes()
    short = re.sub(rb".*slice_0003\.dm3.*\n", b"", full)
    pages = iter([short, short, full])
    slices, others, attempts = empiar.fetch_listing(lambda url: next(pages), 16, attempts=3)
    assert attempts == 3 and len(slices) == 16 and others == ["F57-8_test1.xml.gz", f"{replica.SUBFOLDER}/"]


def test_listing_with_a_gap_in_the_numbering_is_short():
    page = "".join(f'<a href="{replica.SLICE_NAME.format(i)}">x</a>\n' for i in [*range(15), 16])
    with pytest.raises(SourceMismatchError, match=r"listed \[16\] DM3 slices in 1 attempts.*last missing: \[15\]"):
        empiar.fetch_listing(lambda url: page.encode(), 16, attempts=1)


def test_server_errors_beyond_retries_leave_no_output(replica_copy_server, tmp_path):
    replica_copy_server.faults.path_contains = "slice_0003"
    replica_copy_server.faults.status, replica_copy_server.faults.status_count = 503, 10
    with pytest.raises(DownloadError, match="slice_0003.dm3"):
        run(replica_copy_server, tmp_path, retries=2)
    assert not (tmp_path / OUTPUT).exists()
    assert not list((tmp_path / "data").glob("empiar_11759.zarr*"))  # no half-written temporary either


def test_api_server_error_fails_before_any_download(replica_copy_server, tmp_path):
    replica_copy_server.faults.path_contains = "/empiar/api/"
    replica_copy_server.faults.status, replica_copy_server.faults.status_count = 500, 10
    with pytest.raises(DownloadError, match="api/entry/11759"):
        run(replica_copy_server, tmp_path)
    assert all("/empiar/api/" in r for r in replica_copy_server.faults.requests_seen)


def test_pinned_file_checksum_mismatch_fails_without_output(replica_copy_server, tmp_path):
    with pytest.raises(IntegrityError, match="slice_0002.dm3.*sha256"):
        run(replica_copy_server, tmp_path, {"sha256": {"F57-8_test1_3VBSED_slice_0002.dm3": "ab" * 32}})
    assert not (tmp_path / OUTPUT).exists()


def test_live_decoded_pins_are_checked_and_a_wrong_one_fails():
    """The third-party hashes of decoded live slices: the check as the stage runs it when fetching live."""
    assert set(empiar.LIVE_DECODED_SHA256) == {replica.SLICE_NAME.format(i) for i in (5, 10, 11, 13, 15)}
    records = json.loads((REFERENCE_API.parent / "empiar_11759_macroscope_slice_records.json").read_text())
    published = {r["files"]["raw"].rsplit("/", 1)[1]: r["metadata"]["technical"]["sha256"] for r in records}
    assert published == empiar.LIVE_DECODED_SHA256
    pixels = np.arange(30, dtype=np.uint8).reshape(5, 6)
    name = replica.SLICE_NAME.format(5)
    s = empiar.Slice(name, pixels, (7.99825, 7.99825))
    with pytest.raises(IntegrityError, match=rf"{name}: decoded pixels have sha256 [0-9a-f]{{64}}, pinned 9b3790"):
        empiar.verify_decoded_sha256([s], empiar.LIVE_DECODED_SHA256)
    import hashlib

    right = {name: hashlib.sha256(pixels.tobytes()).hexdigest()}
    assert empiar.verify_decoded_sha256([s, empiar.Slice("other.dm3", pixels, (1.0, 1.0))], right) == [name]


def test_stage_script_is_thin():
    script = (Path(__file__).parents[1] / "stages" / "empiar.py").read_text()
    assert 'main("empiar")' in script and "from emdata.stage import main" in script


@pytest.mark.network
def test_live_api_and_listing_agree_with_what_we_know():
    """Touches the live EMPIAR API and FTP autoindex (no slice download): the facts the stage relies on."""
    from emdata.acquire.download import Downloader

    downloader = Downloader(DownloadConfig(retries=2))
    facts = empiar.parse_api(downloader.fetch_json(empiar.API_URL))
    assert (facts.num_images, facts.z_nm, facts.pixel_width_nm) == (16, 50.0, 8.0)
    slices, others, _ = empiar.fetch_listing(downloader.fetch_bytes, facts.num_images, attempts=3)
    assert slices == [replica.SLICE_NAME.format(i) for i in range(16)] and "F57-8_test1.xml.gz" in others


def test_run_stage_reads_the_params_yaml_section(replica_copy_server, tmp_path):
    """Through the stage runner, as DVC runs it."""
    from emdata.stage import run_stage

    (tmp_path / "params.yaml").write_text(
        f'mirror: {{url: "{replica_copy_server.base_url}", serves: replica}}\ndownload: {{workers: 4, retries: 1, backoff_s: 0}}\n'
        "empiar: {chunks: [64, 64, 64], shards: [256, 256, 256], listing_attempts: 3, keep_downloads: false}\n")
    metrics = run_stage("empiar", repo_root=tmp_path)
    assert json.loads((tmp_path / "metrics" / "empiar.json").read_text()) == metrics
    assert (tmp_path / OUTPUT / "0" / "zarr.json").exists()
    (tmp_path / "params.yaml").write_text(f'mirror: {{url: "{replica_copy_server.base_url}", serves: replica}}\nempiar: {{listing_attempt: 3}}\n')
    seen = len(replica_copy_server.faults.requests_seen)
    with pytest.raises(InvalidParameterError, match=r"unknown key.*listing_attempt"):
        run_stage("empiar", repo_root=tmp_path)
    assert len(replica_copy_server.faults.requests_seen) == seen


def test_replica_bytes_are_deterministic(replica_tree, tmp_path):
    replica.build(tmp_path, "small")
    ours = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and ".built" not in p.parts)
    assert len(ours) == 20  # API, index, 16 slices, XML.gz, sub-folder index
    assert all((tmp_path / p).read_bytes() == (replica_tree / p).read_bytes() for p in ours)


def test_autoindex_links_of_any_form_are_resolved_against_the_folder():
    page = """<a href="?C=N;O=D">Name</a> <a href="/empiar/world_availability/11759/">Parent Directory</a>
    <a href="F57-8_test1_3VBSED_slice_0000.dm3">a</a>
    <a HREF="/empiar/world_availability/11759/data/F57-8_test1_3VBSED_slice_0001.dm3">b</a>
    <a href="https://ftp.ebi.ac.uk/empiar/world_availability/11759/data/F57-8_test1.xml.gz">c</a>
    <a href="some%20folder/">d</a> <a href="https://example.org/x.dm3">e</a> <a href="../other/y.dm3">f</a>"""
    files, folders = empiar.parse_autoindex(page)
    assert files == ["F57-8_test1.xml.gz", "F57-8_test1_3VBSED_slice_0000.dm3", "F57-8_test1_3VBSED_slice_0001.dm3"]
    assert folders == ["some folder"]
