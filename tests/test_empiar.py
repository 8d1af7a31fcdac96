"""The EMPIAR stage end to end against the small replica (every server behaviour), its cross-checks and failures."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pytest
import requests
import tifffile
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader

from emdata.acquire.context import MirrorConfig, RunContext
from emdata.acquire.params import DownloadConfig
from emdata.errors import DownloadError, IntegrityError, InvalidParameterError, SourceMismatchError
from emdata.offline.replica import ReplicaServer
from emdata.offline.replica import empiar as replica
from emdata.offline.replica.dm3_writer import write_dm3
from emdata.offline.replica.server import AUTOINDEX_STYLES
from emdata.sources import empiar
from emdata.sources.empiar import SOURCE

REFERENCE = Path(__file__).parent / "fixtures" / "reference" / "sources"
REFERENCE_API = REFERENCE / "empiar_11759_api.json"
OUTPUT = "data/empiar_11759.zarr"
LIVE_DATA = "https://ftp.ebi.ac.uk/empiar/world_availability/11759/data/"
SLICES = [replica.SLICE_NAME.format(i) for i in range(replica.N_SLICES)]
# Verbatim from shared/reference/sources/ebi_https_autoindex_apache_style_fixture.html.txt: a public test fixture
# (a GWAS Catalog summary-statistics downloader's _generate.py) modelled on ftp.ebi.ac.uk's Apache table listing.
EBI_APACHE_TABLE_FIXTURE = """<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">
<html>
 <head><title>Index of /pub/databases/gwas/summary_statistics/X/GCST90000001</title></head>
 <body>
<h1>Index of /pub/databases/gwas/summary_statistics/X/GCST90000001</h1>
  <table>
   <tr><th valign="top"><img src="/icons/blank.gif" alt="[ICO]"></th><th><a href="?C=N;O=D">Name</a></th><th><a href="?C=M;O=A">Last modified</a></th><th><a href="?C=S;O=A">Size</a></th><th><a href="?C=D;O=A">Description</a></th></tr>
   <tr><th colspan="5"><hr></th></tr>
<tr><td valign="top"><img src="/icons/back.gif" alt="[PARENTDIR]"></td><td><a href="/pub/databases/gwas/summary_statistics/X/">Parent Directory</a></td><td>&nbsp;</td><td align="right">  - </td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/text.gif" alt="[TXT]"></td><td><a href="GCST90000001_buildGRCh37.tsv">GCST90000001_buildGRCh37.tsv</a></td><td align="right">2025-02-07 19:49  </td><td align="right">1.2G</td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/folder.gif" alt="[DIR]"></td><td><a href="harmonised/">harmonised/</a></td><td align="right">2025-02-07 19:49  </td><td align="right">  - </td><td>&nbsp;</td></tr>
   <tr><th colspan="5"><hr></th></tr>
</table>
</body></html>
"""  # noqa: E501


def run(server: ReplicaServer, ws: Path, section: dict[str, Any] | None = None, **download: Any) -> dict[str, Any]:
    """What the stage does: validate the params section first, then run against the replica."""
    params = SOURCE.parse_params(section or {})
    config = DownloadConfig(**{"workers": 4, "retries": 1, "backoff_s": 0, **download})
    return SOURCE.run(params, RunContext(mirror=MirrorConfig(server.base_url), download=config, repo_root=ws))


def data_dir(replica_copy: Path) -> Path:
    return replica_copy / replica.DATA_PATH


def replica_stack(root: Path) -> np.ndarray:
    return np.concatenate([empiar.read_slice(data_dir(root) / name).data for name in SLICES])


def api_file(replica_copy: Path) -> Path:
    return replica_copy / replica.API_PATH / "index.html"


def tamper_api(replica_copy: Path, **imageset: Any) -> None:
    doc = json.loads(api_file(replica_copy).read_text())
    doc["EMPIAR-11759"]["imagesets"][0].update(imageset)
    api_file(replica_copy).write_text(json.dumps(doc))


def relist(replica_copy: Path, without: tuple[str, ...] = ()) -> None:
    """Rewrite the data folder's listings (every style) from its content, leaving out ``without``."""
    folder = data_dir(replica_copy)
    entries = [e for e in replica.listing_entries(folder) if e[0] not in without]
    replica.write_indexes(folder, replica.url_path(replica.DATA_PATH), entries)


def output_level0(ws: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(ws / OUTPUT / "0"), mode="r")[...])


def provenance(ws: Path) -> dict[str, Any]:
    return dict(zarr.open_group(str(ws / OUTPUT), mode="r").attrs["emdata"])


def gets(server: ReplicaServer, suffix: str) -> list[str]:
    return [r for r in server.faults.requests_seen if r.startswith("GET ") and r.split(" ")[1].endswith(suffix)]


def heads(server: ReplicaServer) -> list[str]:
    return [r.split(" ")[1] for r in server.faults.requests_seen if r.startswith("HEAD ")]


# ---------------------------------------------------------------------------------------------- the stage
def test_stage_writes_verified_ome_zarr_with_provenance(replica_copy_server, replica_copy, tmp_path):
    """Default behaviour = EBI's: Apache table listing, the .xml.gz sent with Content-Encoding: gzip."""
    xml_url = replica_copy_server.base_url + "/" + replica.DATA_PATH + "/" + replica.XML_NAME
    served = requests.head(xml_url, timeout=10)
    assert served.headers["Content-Encoding"] == "gzip"  # as the real Apache labels .gz files
    listing = requests.get(replica_copy_server.base_url + "/" + replica.DATA_PATH + "/", timeout=10).text
    assert "<table>" in listing and 'href="?C=N;O=D"' in listing and "<pre>" not in listing
    replica_copy_server.faults.requests_seen.clear()

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
    assert ms["name"] == "empiar_11759"
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

    prov = provenance(ws)
    assert prov["dataset"] == "empiar" and prov["licence"].startswith("CC0") and prov["origin"] == "replica"
    assert prov["doi"] == ["10.6019/EMPIAR-11759"] and "Developing retina" in prov["title"]
    assert "Iudin" in prov["citation"] and prov["entry"] == 11759
    assert prov["voxel_size_nm"] == [50.0, 7.99825, 7.99825] and prov["axes"] == ["z", "y", "x"]
    assert prov["voxel_size_note"].startswith("z from the API entry's details text ('50 nm per section'); y, x from "
                                              "the DM3 calibration (µm)")
    assert prov["api"]["url"] == "https://www.ebi.ac.uk/empiar/api/entry/11759/"
    assert prov["api"]["z_nm"] == 50.0 and prov["api"]["num_images"] == 16 and prov["api"]["directory"] == "data"
    assert prov["image_files"] == {"format": "dm3", "dtype": "uint8", "data_format": "agrees", "voxel_type": "agrees",
                                   "files": 16, "sections": 16}
    assert prov["listing"]["slices"] == SLICES and prov["listing"]["complete"] is True
    assert prov["listing"]["other_entries"] == ["F57-8_test1.xml.gz", f"{replica.SUBFOLDER}/"]
    assert prov["listing"]["pattern"] == "F57-8_test1_3VBSED_slice_{:04d}.dm3"
    assert prov["side_files"] == [{"name": replica.XML_NAME, "url": LIVE_DATA + replica.XML_NAME, "status": "ok",
                                   "reason": ""}]
    files = {f["name"]: f for f in prov["files"]}
    assert set(files) == set(SLICES) | {"F57-8_test1.xml.gz"}
    assert all(f["url"] == LIVE_DATA + f["name"] for f in prov["files"])  # the live URL, not the mirror's
    # The .xml.gz is kept as the server holds it (gzip bytes), not as requests would decode it.
    raw = (data_dir(replica_copy) / replica.XML_NAME).read_bytes()
    assert files[replica.XML_NAME]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert files[replica.XML_NAME]["size"] == len(raw) and gzip.decompress(raw).startswith(b"<?xml")
    assert prov["discrepancies"] == [] and prov["decoded_sha256_checked"] == []  # replica: no live pins
    # Raw downloads are gone after the verified conversion; their hashes are kept for the next run.
    assert not (ws / "data" / ".downloads" / "empiar").exists()
    recorded = json.loads((ws / "checksums.json").read_text())["replica"]
    assert {f["url"]: f["sha256"] for f in prov["files"]} == {u: v["sha256"] for u, v in recorded.items()}
    assert metrics["files"] == 17 and metrics["shape"] == [16, 96, 128] and metrics["listing_attempts"] == 1
    assert metrics["listing_complete"] == 1 and metrics["listing_confirmed_by_head"] == 0
    assert metrics["side_files_unavailable"] == 0
    assert all(isinstance(v, (int, float)) or (isinstance(v, list) and all(isinstance(x, int) for x in v))
               for v in metrics.values())
    # The 16 slices went through the download engine; nothing was HEADed (the listing was complete).
    assert {r.split(" ")[1].rsplit("/", 1)[1] for r in gets(replica_copy_server, ".dm3")} == set(SLICES)
    assert heads(replica_copy_server) == []


@pytest.mark.parametrize("style", AUTOINDEX_STYLES)
def test_every_listing_style_gives_the_same_output(replica_copy_server, replica_copy, tmp_path, style):
    replica_copy_server.set_behaviour({"autoindex": style})
    page = requests.get(replica_copy_server.base_url + "/" + replica.DATA_PATH + "/", timeout=10).text
    assert {"apache-table": "<table>", "pre": "<pre><img", "nginx": '<a href="../">../</a>'}[style] in page
    run(replica_copy_server, tmp_path)
    np.testing.assert_array_equal(output_level0(tmp_path), replica_stack(replica_copy))
    prov = provenance(tmp_path)
    assert prov["listing"]["slices"] == SLICES and prov["listing"]["complete"] is True
    assert prov["listing"]["other_entries"] == ["F57-8_test1.xml.gz", f"{replica.SUBFOLDER}/"]


def test_gzip_encoded_documents_are_decoded(replica_copy_server, replica_copy, tmp_path):
    """The API JSON compressed on the fly (Content-Encoding: gzip) is decoded and parsed as a document."""
    replica_copy_server.set_behaviour({"gzip_paths": ["/empiar/api/entry/"]})
    assert requests.head(replica_copy_server.base_url + "/" + replica.API_PATH + "/",
                         timeout=10).headers.get("Content-Encoding") == "gzip"
    run(replica_copy_server, tmp_path)
    assert provenance(tmp_path)["api"]["num_images"] == 16


def test_short_listing_falls_back_to_count_and_pattern_confirmed_by_head(replica_copy_server, replica_copy, tmp_path,
                                                                        caplog):
    relist(replica_copy, without=(SLICES[7],))
    with caplog.at_level(logging.WARNING, logger="emdata.sources.empiar"):
        metrics = run(replica_copy_server, tmp_path, {"listing_attempts": 2})
    assert len(gets(replica_copy_server, "/11759/data/")) == 2  # fetched again before falling back
    assert heads(replica_copy_server) == ["/" + replica.DATA_PATH + "/" + SLICES[7]]  # one HEAD: the unlisted name
    np.testing.assert_array_equal(output_level0(tmp_path), replica_stack(replica_copy))
    listing = provenance(tmp_path)["listing"]
    assert listing["complete"] is False and listing["slices"] == SLICES
    assert listing["confirmed_by_head"] == [SLICES[7]] and listing["listed_per_attempt"] == [15, 15]
    assert listing["pattern"] == "F57-8_test1_3VBSED_slice_{:04d}.dm3"
    assert metrics["listing_complete"] == 0 and metrics["listing_confirmed_by_head"] == 1
    assert "listed [15, 15] image files in 2 attempts; the API says 16" in caplog.text
    assert "confirmed by HEAD: F57-8_test1_3VBSED_slice_0007.dm3" in caplog.text


def test_short_listing_recovers_when_a_later_fetch_is_complete(replica_tree):
    full = (data_dir(replica_tree) / "index.apache-table.html").read_bytes()
    short = b"\n".join(line for line in full.split(b"\n") if b"slice_0003" not in line)
    pages = iter([short, short, full])
    listing = empiar.fetch_listing(lambda url: next(pages), 16, attempts=3)
    assert listing.attempts == 3 and listing.complete and list(listing.files) == SLICES
    assert listing.seen == (15, 15, 16) and listing.others == ("F57-8_test1.xml.gz", f"{replica.SUBFOLDER}/")


@pytest.mark.parametrize("status", [404, 403])
def test_short_listing_with_an_absent_slice_fails_early_naming_the_url(replica_copy_server, replica_copy, tmp_path,
                                                                      status):
    (data_dir(replica_copy) / SLICES[7]).unlink()
    relist(replica_copy)
    replica_copy_server.set_behaviour({"missing_status": {"ftp.ebi.ac.uk": status}})
    with pytest.raises(SourceMismatchError, match=rf"HEAD {LIVE_DATA}F57-8_test1_3VBSED_slice_0007.dm3 answered "
                                                  rf"HTTP {status} \(absent\), so image 7 of 0..15 cannot be fetched"):
        run(replica_copy_server, tmp_path, {"listing_attempts": 1})
    assert gets(replica_copy_server, ".dm3") == []  # failed before any slice download
    assert not (tmp_path / OUTPUT).exists()


def test_a_listing_without_any_slice_falls_back_to_the_entrys_known_naming(replica_copy_server, replica_copy,
                                                                            tmp_path):
    relist(replica_copy, without=tuple(SLICES))
    run(replica_copy_server, tmp_path, {"listing_attempts": 1})
    assert heads(replica_copy_server) == ["/" + replica.DATA_PATH + "/" + name for name in SLICES]
    np.testing.assert_array_equal(output_level0(tmp_path), replica_stack(replica_copy))
    listing = provenance(tmp_path)["listing"]
    assert listing["complete"] is False and listing["confirmed_by_head"] == SLICES
    assert listing["pattern"] == "F57-8_test1_3VBSED_slice_{:04d}.dm3"


def test_a_listing_without_any_image_and_no_known_naming_cannot_fall_back():
    page = b"<a href='README.txt'>README.txt</a>"
    with pytest.raises(SourceMismatchError, match=r"listed \[0, 0\] image files in 2 attempts; the API says 16; no "
                                                  r"naming pattern to fall back on"):
        empiar.fetch_listing(lambda url: page, 16, 2, head=lambda url: (200, {}))


def test_missing_xml_gz_is_recorded_not_fatal(replica_copy_server, replica_copy, tmp_path, caplog):
    (data_dir(replica_copy) / replica.XML_NAME).unlink()  # the (stale) listing still names it
    with caplog.at_level(logging.WARNING, logger="emdata.sources.empiar"):
        metrics = run(replica_copy_server, tmp_path)
    np.testing.assert_array_equal(output_level0(tmp_path), replica_stack(replica_copy))
    prov = provenance(tmp_path)
    (side,) = prov["side_files"]
    assert side["status"] == "unavailable" and side["url"] == LIVE_DATA + replica.XML_NAME
    assert "HTTP 404" in side["reason"]
    assert {f["name"] for f in prov["files"]} == set(SLICES)
    assert metrics["side_files_unavailable"] == 1 and metrics["files"] == 16
    assert f"{LIVE_DATA}{replica.XML_NAME} is unavailable" in caplog.text and "optional" in caplog.text


def test_unlisted_xml_gz_is_still_tried_and_recorded(replica_copy_server, replica_copy, tmp_path):
    (data_dir(replica_copy) / replica.XML_NAME).unlink()
    relist(replica_copy)
    run(replica_copy_server, tmp_path)
    assert provenance(tmp_path)["side_files"][0]["status"] == "unavailable"
    assert provenance(tmp_path)["listing"]["other_entries"] == [f"{replica.SUBFOLDER}/"]


@pytest.mark.parametrize(("content", "reason"), [
    (b"not gzip at all" * 10, "not gzip data"),
    (gzip.compress(b"\x00\x01binary, not XML", mtime=0), "does not begin like XML"),
    (gzip.compress(b"<?xml version='1.0'?><stack/>" * 50, mtime=0)[:-12], "truncated"),
])
def test_undecodable_xml_gz_is_recorded_not_fatal(replica_copy_server, replica_copy, tmp_path, content, reason):
    (data_dir(replica_copy) / replica.XML_NAME).write_bytes(content)
    relist(replica_copy)
    run(replica_copy_server, tmp_path, {"keep_downloads": True})
    prov = provenance(tmp_path)
    assert prov["side_files"][0]["status"] == "undecodable" and reason in prov["side_files"][0]["reason"]
    assert replica.XML_NAME not in {f["name"] for f in prov["files"]}
    kept = {p.name for p in (tmp_path / "data/.downloads/empiar").iterdir()}
    assert kept == set(SLICES)  # the undecodable file is not kept as if it were good


def test_a_wrong_pin_on_the_xml_gz_is_still_fatal(replica_copy_server, tmp_path):
    with pytest.raises(IntegrityError, match=r"F57-8_test1.xml.gz.*sha256"):
        run(replica_copy_server, tmp_path, {"sha256": {replica.XML_NAME: "ab" * 32}})
    assert gets(replica_copy_server, ".dm3") == [] and not (tmp_path / OUTPUT).exists()


# ---------------------------------------------------------------------------------------------- any format
@pytest.mark.parametrize(("dtype", "voxel_type", "pixel_size", "units"), [
    (np.float32, "32 BIT FLOAT", (80.0, 8.0), ("Å", "nm")),
    (np.int16, "SIGNED 16 BIT INTEGER", (8000.0, 0.008), ("pm", "µm")),
    (np.uint16, "UNSIGNED 16 BIT INTEGER", (8e-6, 8e-6), ("mm", "mm")),
])
def test_other_dtypes_and_units_convert_with_their_voxel_sizes(replica_copy_server, replica_copy, tmp_path, dtype,
                                                               voxel_type, pixel_size, units):
    rng = np.random.default_rng(3)
    raw = rng.normal(1000, 300, (16, 96, 128))
    stack = raw.astype(dtype) if dtype == np.float32 else np.clip(raw, -3000, 3000).astype(dtype)
    for name, image in zip(SLICES, stack, strict=True):
        write_dm3(data_dir(replica_copy) / name, image, pixel_size=pixel_size, units=units)
    relist(replica_copy)
    tamper_api(replica_copy, voxel_type=voxel_type)
    run(replica_copy_server, tmp_path)
    level0 = output_level0(tmp_path)
    assert level0.dtype == dtype
    np.testing.assert_array_equal(level0, stack)
    prov = provenance(tmp_path)
    assert prov["voxel_size_nm"] == [50.0, 8.0, 8.0]
    assert prov["image_files"]["dtype"] == np.dtype(dtype).name and prov["image_files"]["voxel_type"] == "agrees"
    ms = zarr.open_group(str(tmp_path / OUTPUT), mode="r").attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [50.0, 8.0, 8.0]


def test_voxel_type_that_disagrees_with_the_files_fails(replica_copy_server, replica_copy, tmp_path):
    for name in SLICES:
        write_dm3(data_dir(replica_copy) / name, np.ones((96, 128), np.float32), pixel_size=(8.0, 8.0), units="nm")
    relist(replica_copy)
    with pytest.raises(SourceMismatchError, match=r"voxel_type 'UNSIGNED BYTE' \(uint8\), but the files hold float32"):
        run(replica_copy_server, tmp_path)
    assert not (tmp_path / OUTPUT).exists()


def test_an_mrc_stack_image_set_uses_every_section_and_its_own_z(replica_copy_server, replica_copy, tmp_path):
    """One 3-D MRC file (z calibrated in the header) as the image set: the API says MRC, one image."""
    folder = data_dir(replica_copy)
    for name in SLICES:
        (folder / name).unlink()
    volume = np.random.default_rng(5).normal(0, 1, (12, 96, 128)).astype(np.float32)
    with mrcfile.new(folder / "tomogram.mrc") as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = (80.0, 80.0, 500.0)  # x, y, z in Å
    relist(replica_copy)
    tamper_api(replica_copy, data_format="MRC", voxel_type="32 BIT FLOAT", num_images_or_tilt_series=1)
    metrics = run(replica_copy_server, tmp_path)
    np.testing.assert_array_equal(output_level0(tmp_path), volume)
    prov = provenance(tmp_path)
    assert prov["voxel_size_nm"] == [50.0, 8.0, 8.0] and metrics["shape"] == [12, 96, 128]
    assert prov["voxel_size_note"].startswith("z from the MRC calibration")
    assert prov["listing"]["slices"] == ["tomogram.mrc"]
    assert prov["image_files"] == {"format": "mrc", "dtype": "float32", "data_format": "agrees",
                                   "voxel_type": "agrees", "files": 1, "sections": 12}


def test_an_uncalibrated_tiff_slice_set_takes_y_x_from_the_api(replica_copy_server, replica_copy, tmp_path, caplog):
    """TIFF slices without resolution tags: y, x from the API pixel size (recorded), z from the details text."""
    folder = data_dir(replica_copy)
    stack = np.random.default_rng(9).integers(0, 60000, (16, 96, 128), dtype=np.uint16)
    for name, image in zip(SLICES, stack, strict=True):
        (folder / name).unlink()
        tifffile.imwrite(folder / name.replace(".dm3", ".tif"), image)
    relist(replica_copy)
    tamper_api(replica_copy, data_format="TIFF", voxel_type="UNSIGNED 16 BIT INTEGER")
    with caplog.at_level(logging.WARNING, logger="emdata.sources.empiar"):
        run(replica_copy_server, tmp_path)
    np.testing.assert_array_equal(output_level0(tmp_path), stack)
    prov = provenance(tmp_path)
    assert prov["voxel_size_nm"] == [50.0, 8.0, 8.0] and prov["image_files"]["format"] == "tiff"
    assert "y, x from the API pixel_height/pixel_width (Å): the files carry no calibration" in prov["voxel_size_note"]
    assert "not calibrated in y, x; using the API pixel size" in caplog.text


def test_one_image_expected_but_several_listed_fails(replica_copy_server, replica_copy, tmp_path):
    tamper_api(replica_copy, num_images_or_tilt_series=1)
    with pytest.raises(SourceMismatchError, match=r"lists 16 image files .*the API says num_images_or_tilt_series "
                                                  r"= 1: which one is the image set is unclear"):
        run(replica_copy_server, tmp_path)


def test_data_format_that_disagrees_with_the_content_fails(replica_copy_server, replica_copy, tmp_path):
    folder = data_dir(replica_copy)
    for name in SLICES:  # DM3 content under .mrc names: the content decides, and it is not what the API says
        (folder / name).rename(folder / name.replace(".dm3", ".mrc"))
    relist(replica_copy)
    tamper_api(replica_copy, data_format="MRC")
    with pytest.raises(SourceMismatchError, match=r"data_format 'MRC', but the files are dm3"):
        run(replica_copy_server, tmp_path)


# ---------------------------------------------------------------------------------------------- params and API
@pytest.mark.parametrize(("section", "message"), [
    ({"chunks": [64, 64]}, r"empiar.chunks.*\[64, 64\]"),
    ({"chunks": [64, 64, 0]}, r"empiar.chunks.*\[64, 64, 0\]"),
    ({"shards": [100, 256, 256]}, r"shards \[100, 256, 256\].*multiples"),
    ({"listing_attempts": 0}, r"listing_attempts.*got 0"),
    ({"listing_attempts": "3"}, r"listing_attempts.*got '3'"),
    ({"keep_downloads": "yes"}, r"keep_downloads.*'yes'"),
    ({"sha256": {"data/slice_0000.dm3": "ab" * 32}}, r"unknown file 'data/slice_0000.dm3'"),
    ({"sha256": {"F57-8_test1_3VBSED_slice_0000.dm3": "XYZ"}}, r"sha256\['F57-8_test1_3VBSED_slice_0000.dm3'\].*'XYZ'"),
    ({"entry": "11759"}, r"empiar.entry must be an EMPIAR entry number.*'11759'"),
    ({"entry": 0}, r"empiar.entry must be an EMPIAR entry number.*got 0"),
    ({"imageset": -1}, r"empiar.imageset must be an index 0..999 or .*got -1"),
    ({"imageset": ""}, r"empiar.imageset must be an index"),
    ({"entry": 11760}, r"empiar.entry 11760: this stage writes data/empiar_11759.zarr.*add a dataset for "
                       r"EMPIAR-11760 to emdata.catalog"),
    ({"listing_attempt": 3}, r"unknown key.*listing_attempt"),
])
def test_bad_params_fail_before_any_network_call(replica_copy_server, tmp_path, section, message):
    with pytest.raises(InvalidParameterError, match=message):
        run(replica_copy_server, tmp_path, section)
    assert replica_copy_server.faults.requests_seen == []
    assert not (tmp_path / "data").exists()


def test_a_pin_for_a_file_the_folder_lacks_fails_before_downloads(replica_copy_server, tmp_path):
    with pytest.raises(InvalidParameterError, match=r"empiar.sha256 pins \['other.dm3'\], which .*11759/data/ does "
                                                    r"not hold"):
        run(replica_copy_server, tmp_path, {"sha256": {"other.dm3": "ab" * 32}})
    assert gets(replica_copy_server, ".dm3") == []


@pytest.mark.parametrize("imageset", [0, "data", "Developing retina in zebrafish 55 hpf larval eye."])
def test_imageset_is_selected_by_index_directory_or_name(imageset):
    facts = empiar.parse_api(json.loads(replica.API_DOCUMENT), 11759, imageset)
    assert (facts.imageset_index, facts.directory, facts.files_url) == (0, "data", LIVE_DATA)


def test_unknown_imageset_names_the_ones_there_are():
    with pytest.raises(SourceMismatchError, match=r"no image set 'raw' \(empiar.imageset\); the entry has "
                                                  r"\[\"0: 'data' \('Developing retina"):
        empiar.parse_api(json.loads(replica.API_DOCUMENT), 11759, "raw")
    with pytest.raises(SourceMismatchError, match=r"no image set 1 "):
        empiar.parse_api(json.loads(replica.API_DOCUMENT), 11759, 1)


def test_another_entry_is_parsed_from_its_own_document():
    doc = json.loads(replica.API_DOCUMENT)
    other = {"EMPIAR-10310": {**doc["EMPIAR-11759"], "imagesets": [
        {"directory": "data/tomos", "name": "tomograms", "num_images_or_tilt_series": 3, "data_format": "MRC",
         "voxel_type": "32 BIT FLOAT", "pixel_width": 13.6, "pixel_height": 13.6, "image_width": None,
         "image_height": None, "details": "Tomograms."}]}}
    facts = empiar.parse_api(other, 10310, "tomograms")
    assert facts.files_url == "https://ftp.ebi.ac.uk/empiar/world_availability/10310/data/tomos/"
    assert facts.url == "https://www.ebi.ac.uk/empiar/api/entry/10310/"
    assert (facts.pixel_width_nm, facts.z_nm, facts.image_width) == (1.36, None, None)
    assert empiar.image_extensions(facts.data_format) == (".mrc", ".mrcs", ".map", ".st", ".ali", ".rec")
    about = empiar.about_entry(10310, facts.title)
    assert about.doi == ("10.6019/EMPIAR-10310",) and about.page.endswith("/EMPIAR-10310/")
    assert empiar.about_entry(11759) is empiar.ABOUT


def test_api_document_of_another_shape_fails_clearly(replica_copy_server, replica_copy, tmp_path):
    api_file(replica_copy).write_text(json.dumps({"EMPIAR-11760": {}}))
    with pytest.raises(SourceMismatchError, match=r"api/entry/11759/: the EMPIAR-11759 entry lacks or garbles"):
        run(replica_copy_server, tmp_path)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"image_width": "130"}, r"the API says width x height \(130, 96\), the DM3 files are \(128, 96\)"),
    ({"pixel_width": 100.0}, r"pixel size in x: the API says 100 Å = 10 nm, the DM3 calibration 7.99825 nm"),
    ({"num_images_or_tilt_series": 15}, r"lists 16 image files named F57-8_test1_3VBSED_slice_\{:04d\}.dm3, the "
                                        r"API says num_images_or_tilt_series = 15"),
    ({"details": "The resolution is 8nm/px in xy."}, r"does not state the section thickness.*has no z calibration"),
    ({"data_format": "TIFF"}, r"data_format 'TIFF', but the files are dm3 \(recognised from their content\)"),
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


@pytest.mark.parametrize(("text", "nm"), [("50nm per section", 50.0), ("0.05 µm per slice", 50.0),
                                          ("300 Å/section", 30.0), ("8nm/px in xy", None)])
def test_section_thickness_text(text, nm):
    assert empiar.section_thickness_nm(text) == nm


def test_the_live_size_disagreement_is_known_logged_and_recorded(caplog):
    """The verbatim API says 5628 x 5632; the live slices are 5496 x 5500: recorded, not fatal."""
    document = json.loads(replica.API_DOCUMENT)
    assert replica.API_DOCUMENT == REFERENCE_API.read_text(encoding="utf-8")  # served byte for byte
    facts = empiar.parse_api(document)
    assert (facts.num_images, facts.z_nm, facts.pixel_width_nm) == (16, 50.0, 8.0)
    live_shape = np.broadcast_to(np.uint8(0), (1, 5500, 5496))  # shapes only; no 30 MB per slice
    slices = [empiar.Slice(name, live_shape, (7.99825, 7.99825), None, "dm3") for name in SLICES]
    with caplog.at_level(logging.WARNING, logger="emdata.sources.empiar"):
        known = empiar.check_slices(slices, facts).discrepancies
    assert len(known) == 1 and "5628 x 5632, the DM3 slices are 5496 x 5500" in known[0]
    assert "5628 x 5632" in caplog.text and "known disagreement" in caplog.text
    # The same API values against any other file size are not known: they fail, naming both.
    other = [empiar.Slice(s.name, np.broadcast_to(np.uint8(0), (1, 5500, 5500)), s.pixel_size_nm, None, "dm3")
             for s in slices]
    with pytest.raises(SourceMismatchError, match=r"\(5628, 5632\), the DM3 files are \(5500, 5500\)"):
        empiar.check_slices(other, facts)
    # ... and the same sizes under another entry are not known either.
    with pytest.raises(SourceMismatchError, match=r"\(5628, 5632\), the DM3 files are \(5496, 5500\)"):
        empiar.check_slices(slices, empiar.ApiFacts(**{**facts.to_dict(), "entry": 10310}))


def test_slices_that_disagree_with_one_another_fail(replica_copy_server, replica_copy, tmp_path):
    write_dm3(data_dir(replica_copy) / SLICES[7], np.zeros((96, 120), np.uint8),
              pixel_size=(replica.PIXEL_SIZE_UM,) * 2)
    relist(replica_copy)
    with pytest.raises(SourceMismatchError, match=r"slice_0007.dm3 is \(96, 120\).*slice_0000.dm3 is \(96, 128\)"):
        run(replica_copy_server, tmp_path)
    assert not (tmp_path / OUTPUT).exists()
    assert len(list((tmp_path / "data/.downloads/empiar").glob("*.dm3"))) == 16  # kept: no verified output


def test_slices_of_another_dtype_among_the_rest_fail(replica_copy_server, replica_copy, tmp_path):
    write_dm3(data_dir(replica_copy) / SLICES[3], np.zeros((96, 128), np.int16),
              pixel_size=(replica.PIXEL_SIZE_UM,) * 2)
    relist(replica_copy)
    with pytest.raises(SourceMismatchError, match=r"slice_0003.dm3 is dm3 int16 .*slice_0000.dm3 is dm3 uint8"):
        run(replica_copy_server, tmp_path)


# ---------------------------------------------------------------------------------------------- listing units
def test_autoindex_links_of_any_form_are_resolved_against_the_folder():
    page = """<a href="?C=N;O=D">Name</a> <a href="/empiar/world_availability/11759/">Parent Directory</a>
    <a href="F57-8_test1_3VBSED_slice_0000.dm3">a</a>
    <A HREF='/empiar/world_availability/11759/data/F57-8_test1_3VBSED_slice_0001.dm3'>b</A>
    <a class=x href=F57-8_test1_3VBSED_slice_0002.dm3>unquoted</a>
    <a href="https://ftp.ebi.ac.uk/empiar/world_availability/11759/data/F57-8_test1.xml.gz">c</a>
    <a href="some%20folder/">d</a> <a href="https://example.org/x.dm3">e</a> <a href="../other/y.dm3">f</a>
    <a href='a&amp;b.dm3'>entity</a> <a href="../">../</a>"""
    files, folders = empiar.parse_autoindex(page)
    assert files == ["F57-8_test1.xml.gz", "F57-8_test1_3VBSED_slice_0000.dm3", "F57-8_test1_3VBSED_slice_0001.dm3",
                     "F57-8_test1_3VBSED_slice_0002.dm3", "a&b.dm3"]
    assert folders == ["some folder"]


def test_the_reference_fixture_of_ebis_autoindex_parses():
    """The Apache table page from public fixtures modelled on ftp.ebi.ac.uk (shared reference, verbatim excerpt)."""
    text = EBI_APACHE_TABLE_FIXTURE
    base = "https://ftp.ebi.ac.uk/pub/databases/gwas/summary_statistics/X/GCST90000001/"
    assert empiar.parse_autoindex(text, base) == (["GCST90000001_buildGRCh37.tsv"], ["harmonised"])


def test_listing_with_a_gap_in_the_numbering_cannot_be_completed():
    page = "".join(f'<a href="{replica.SLICE_NAME.format(i)}">x</a>\n' for i in [*range(15), 16])
    with pytest.raises(SourceMismatchError, match=r"listed \[16\] image files in 1 attempts.*numbers 0..14, 16\)"
                                                  r": the listed numbers span 0..16, more than 16 images"):
        empiar.fetch_listing(lambda url: page.encode(), 16, attempts=1, head=lambda url: (200, {}))


def test_fallback_numbering_starting_at_one_is_confirmed_name_by_name():
    """Listed 2..5 of 5 images named img1..img5 (not padded): 0 is impossible, so 1..5; img1 is HEADed."""
    page = "".join(f"<a href='img{i}.tif'>x</a>" for i in range(2, 6)) + "<a href='notes.txt'>n</a>"
    asked: list[str] = []

    def head(url: str) -> tuple[int, dict[str, str]]:
        asked.append(url)
        return (200, {}) if url.endswith("/img1.tif") else (404, {})

    listing = empiar.fetch_listing(lambda url: page.encode(), 5, 1, "https://h/d/", (".tif", ".tiff"), head)
    assert listing.files == ("img1.tif", "img2.tif", "img3.tif", "img4.tif", "img5.tif")
    assert asked == ["https://h/d/img1.tif"] and listing.others == ("notes.txt",) and listing.pattern == "img{}.tif"


def test_number_files_picks_the_largest_numbered_group():
    names = ["a_001.dm3", "a_002.dm3", "a_003.dm3", "thumb_1.dm3", "b.dm3", "a_001.tif"]
    numbering, numbered = empiar.number_files(names, (".dm3",))
    assert str(numbering) == "a_{:03d}.dm3" and numbered == {1: "a_001.dm3", 2: "a_002.dm3", 3: "a_003.dm3"}
    assert numbering is not None and numbering.name(12) == "a_012.dm3"


@pytest.mark.parametrize(("voxel_type", "dtype"), [
    ("UNSIGNED BYTE", "uint8"), ("SIGNED BYTE", "int8"), ("UNSIGNED 16 BIT INTEGER", "uint16"),
    ("SIGNED 16 BIT INTEGER", "int16"), ("SIGNED 32 BIT INTEGER", "int32"), ("32 BIT FLOAT", "float32"),
    ("64 BIT FLOAT", "float64"), ("OTHER", None), ("", None),
])
def test_api_voxel_types(voxel_type, dtype):
    got = empiar.api_dtype(voxel_type)
    assert (got.name if got is not None else None) == dtype


# ---------------------------------------------------------------------------------------------- failures, pins
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
    assert set(empiar.LIVE_DECODED_SHA256) == {SLICES[i] for i in (5, 10, 11, 13, 15)}
    assert empiar.KNOWN_ENTRIES[11759].live_decoded_sha256 is empiar.LIVE_DECODED_SHA256
    records = json.loads((REFERENCE / "empiar_11759_macroscope_slice_records.json").read_text())
    published = {r["files"]["raw"].rsplit("/", 1)[1]: r["metadata"]["technical"]["sha256"] for r in records}
    assert published == empiar.LIVE_DECODED_SHA256
    pixels = np.arange(30, dtype=np.uint8).reshape(1, 5, 6)
    s = empiar.Slice(SLICES[5], pixels, (7.99825, 7.99825))
    with pytest.raises(IntegrityError, match=rf"{SLICES[5]}: decoded pixels have sha256 [0-9a-f]{{64}}, pinned 9b3790"):
        empiar.verify_decoded_sha256([s], empiar.LIVE_DECODED_SHA256)
    right = {SLICES[5]: hashlib.sha256(pixels.tobytes()).hexdigest()}
    assert empiar.verify_decoded_sha256([s, empiar.Slice("other.dm3", pixels, (1.0, 1.0))], right) == [SLICES[5]]


def test_keep_downloads_keeps_the_raw_files(replica_copy_server, tmp_path):
    run(replica_copy_server, tmp_path, {"keep_downloads": True})
    kept = sorted(p.name for p in (tmp_path / "data/.downloads/empiar").iterdir())
    assert len(kept) == 17 and "F57-8_test1.xml.gz" in kept




def test_run_stage_reads_the_params_yaml_section(replica_copy_server, tmp_path):
    """Through the stage runner, as DVC runs it, with the repository's own empiar section."""
    import yaml

    from emdata.stage import run_stage

    section = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())["empiar"]
    assert section["entry"] == 11759 and section["imageset"] == 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "mirror": {"url": replica_copy_server.base_url, "serves": "replica"},
        "download": {"workers": 4, "retries": 1, "backoff_s": 0}, "empiar": section}))
    metrics = run_stage("empiar", repo_root=tmp_path)
    assert json.loads((tmp_path / "metrics" / "empiar.json").read_text()) == metrics
    assert (tmp_path / OUTPUT / "0" / "zarr.json").exists()


def test_replica_bytes_are_deterministic(replica_tree, tmp_path):
    replica.build(tmp_path, "small")
    ours = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and ".built" not in p.parts)
    # API, 16 slices, XML.gz, and the listing in 3 styles in the data folder and in its one sub-folder
    assert len(ours) == 1 + 16 + 1 + 3 + 3
    assert all((tmp_path / p).read_bytes() == (replica_tree / p).read_bytes() for p in ours)
    assert not list(tmp_path.rglob("data/index.html"))


@pytest.mark.network
def test_live_api_and_listing_agree_with_what_we_know():
    """Touches the live EMPIAR API and HTTPS autoindex (no slice download): the facts the stage relies on."""
    from emdata.acquire.download import Downloader

    downloader = Downloader(DownloadConfig(retries=2))
    facts = empiar.parse_api(downloader.fetch_json(empiar.API_URL))
    assert (facts.num_images, facts.z_nm, facts.pixel_width_nm) == (16, 50.0, 8.0)
    listing = empiar.fetch_listing(downloader.fetch_bytes, facts.num_images, 3, facts.files_url,
                                   empiar.image_extensions(facts.data_format), downloader.head)
    assert list(listing.files) == SLICES and "F57-8_test1.xml.gz" in listing.others


def test_slice_stack_reads_sections_across_files_lazily():
    first = np.arange(2 * 4 * 5).reshape(2, 4, 5)
    second = first[:1] + 100
    stack = empiar.SliceStack([empiar.Slice("a", first, (1.0, 1.0)), empiar.Slice("b", second, (1.0, 1.0))])
    whole = np.concatenate([first, second])
    assert stack.shape == (3, 4, 5)
    for key in [(slice(1, 3), slice(1, 3), slice(0, 2)), (slice(0, 3), slice(None), slice(None)),
                (slice(2, 3), slice(3, 4), slice(4, 5)), (slice(3, 3), slice(None), slice(1, 4))]:
        np.testing.assert_array_equal(stack[key], whole[key])


# ---------------------------------------------------------------------------------------------- shard layout
@pytest.mark.parametrize(("shape", "shards", "expected"), [
    ((16, 5500, 5496), (256, 256, 256), (256, 1024, 1024)),  # EMPIAR-11759: 16 x 1024 x 1024 once clipped
    ((16, 5500, 5496), (256, 512, 512), (256, 2048, 2048)),  # the same voxels per shard as 256 x 512 x 512
    ((16, 96, 128), (256, 256, 256), (256, 256, 256)),  # a shard already covers y and x
    ((300, 5500, 5496), (256, 256, 256), (256, 256, 256)),  # as deep as the shard: unchanged
    ((1, 9000, 9000), (256, 256, 256), (256, 4096, 4096)),  # one section: up to the params' axis limit
])
def test_thin_stacks_get_wider_shards_of_the_params_voxel_count(shape, shards, expected):
    got = empiar.thin_stack_shards(shape, (64, 64, 64), shards)
    assert got == expected
    z = min(shards[0], shape[0])
    assert z * got[1] * got[2] <= int(np.prod(shards))


def test_replica_half_profile_serves_only_the_file_sources(tmp_path):
    from emdata.offline.replica import build_replica

    with pytest.raises(InvalidParameterError, match=r"'half' is not served by \['hemibrain'\]"):
        build_replica("half", ["hemibrain"], root=tmp_path)
    assert replica.SHAPES["half"] == (5500, 2748) and "half" in replica.EXTRA_PROFILES
    doc = replica.api_document("half")["EMPIAR-11759"]["imagesets"][0]
    assert (doc["image_width"], doc["image_height"]) == ("2748", "5500")  # agrees with the half-size slices
