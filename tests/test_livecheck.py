"""The live check, run as the maintainer runs it but with "live" pointed at a loopback replica (no internet here)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from emdata.offline import livecheck
from emdata.offline.livecheck import AGREE, DIFFER, LIVE_DOWN, OWN, SAME_CONTENT, SOURCES, Row, check_config
from emdata.offline.replica import ReplicaServer
from emdata.sources import epfl, hemibrain, idr, openorganelle

EMPIAR_DATA = "ftp.ebi.ac.uk/empiar/world_availability/11759/data"
OO_GROUP = f"janelia-cosem-datasets.s3.amazonaws.com/{openorganelle.DATASET}/{openorganelle.DATASET}.zarr/" \
           f"{openorganelle.GROUP_PATH}"
# Quick to give up on a host that is down (the tests' outages are deliberate).
CONFIG = check_config(timeout_s=10.0, retries=1)


def run(live: ReplicaServer | str, replica: ReplicaServer, sources: tuple[str, ...] = SOURCES) -> list[Row]:
    base = live if isinstance(live, str) else live.base_url
    return livecheck.run_checks(base, replica.base_url, profile="small", sources=sources, config=CONFIG)


def verdicts(rows: list[Row], verdict: str) -> dict[tuple[str, str], Row]:
    return {(r.source, r.check): r for r in rows if r.verdict == verdict}


def test_two_servers_of_the_same_replica_agree_on_every_check(replica: ReplicaServer,
                                                              replica_copy_server: ReplicaServer) -> None:
    rows = run(replica_copy_server, replica)
    assert {r.source for r in rows} == set(SOURCES)
    assert [r for r in rows if r.verdict != AGREE] == []
    assert livecheck.exit_status(rows) == 0
    checks = {(r.source, r.check) for r in rows}
    # What the issue asks to compare, per source: documents, headers, a range, a decoded chunk, a missing key.
    for expected in [("openorganelle", ".zattrs (document)"), ("openorganelle", "s0/.zarray (document)"),
                     ("empiar", "API entry (document)"), ("hemibrain", "v1.0 segmentation info (document)"),
                     ("hemibrain", "EM info: size (z, y, x), every scale"), ("idr", "webclient imgData: fields"),
                     ("empiar", "listing: image files"), ("empiar", "F57-8_test1.xml.gz: Content-Encoding"),
                     ("openorganelle", "s8 chunk 0/0/0: ETag (server MD5)"),
                     ("hemibrain", "EM chunk (coarsest scale, centre): shape, dtype"),
                     ("hemibrain", "segmentation chunk (coarsest scale, centre): shape, dtype"),
                     ("openorganelle", "s8 chunk 0/0/0 decoded: shape, dtype"),
                     ("epfl", "training.tif: GET bytes=0-15 content"), ("idr", "TIFF: GET bytes=0-15 content")]:
        assert expected in checks, expected
    for source in SOURCES:
        if source != "idr":  # IDR's missing-key status is EBI's, checked under empiar
            assert (source, "a missing object: HEAD status") in checks
    # Small requests, bounded in count: each side sees about a hundred.
    assert len(replica.faults.requests_seen) < 150
    assert all("Range: bytes=" not in line or line.endswith("-15") for line in replica.faults.requests_seen)


def test_tampered_documents_and_files_are_reported(replica: ReplicaServer, replica_copy: Path,
                                                   replica_copy_server: ReplicaServer) -> None:
    # "Live" is a copy of the replica with one thing changed per source.
    zattrs = replica_copy / OO_GROUP / ".zattrs"
    doc = json.loads(zattrs.read_bytes())
    doc["multiscales"][0]["datasets"][3]["coordinateTransformations"][0]["scale"][0] = 23.7
    zattrs.write_text(json.dumps(doc, indent=4, sort_keys=True))
    zarray = replica_copy / OO_GROUP / "s0" / ".zarray"
    zarray.write_text(json.dumps(json.loads(zarray.read_bytes()), indent=1))  # the same content, other bytes
    seg_info = replica_copy / "storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain/v1.0/segmentation/info"
    info = json.loads(seg_info.read_bytes())
    info["scales"][0]["size"][0] += 64
    seg_info.write_text(json.dumps(info, indent=4))
    (replica_copy / EMPIAR_DATA / "F57-8_test1.xml.gz").unlink()
    tiff = replica_copy / idr.TIFF_URL.split("://", 1)[1]
    body = bytearray(tiff.read_bytes())
    body[:4] = b"MM\x00*"
    tiff.write_bytes(bytes(body))
    training = replica_copy / epfl.BASE_URL.split("://", 1)[1].replace("%20", " ") / "training.tif"
    with training.open("ab") as f:
        f.write(b"\0" * 100)  # another size: the replica's sizes are its own, not a difference

    rows = run(replica_copy_server, replica)
    differ = verdicts(rows, DIFFER)
    assert set(differ) == {
        ("openorganelle", ".zattrs (document)"),
        ("hemibrain", "v1.0 segmentation info (document)"),
        ("empiar", "F57-8_test1.xml.gz: HEAD status"),
        ("empiar", "F57-8_test1.xml.gz: GET bytes=0-15 status"),
        ("idr", "TIFF: GET bytes=0-15 content"),
    }
    assert "multiscales[0].datasets[3].coordinateTransformations[0].scale[0]: 23.7 live, 23.68 in the replica" \
        in differ[("openorganelle", ".zattrs (document)")].note
    assert "scales[0].size[0]: 34496 live, 34432 in the replica" in \
        differ[("hemibrain", "v1.0 segmentation info (document)")].note
    assert (differ[("empiar", "F57-8_test1.xml.gz: HEAD status")].live,
            differ[("empiar", "F57-8_test1.xml.gz: HEAD status")].replica) == ("404", "200")
    assert differ[("idr", "TIFF: GET bytes=0-15 content")].live == "TIFF, big-endian"
    assert set(verdicts(rows, SAME_CONTENT)) == {("openorganelle", "s0/.zarray (document)")}
    own = verdicts(rows, OWN)
    assert set(own) == {("epfl", "training.tif: Content-Length")}
    assert int(own[("epfl", "training.tif: Content-Length")].live) == \
        int(own[("epfl", "training.tif: Content-Length")].replica) + 100
    assert livecheck.exit_status(rows) == 1
    table = livecheck.format_table(rows)
    assert "Summary:" in table and "5 DIFFER" in table and "[DIFFER] hemibrain / v1.0 segmentation info" in table


def test_host_behaviours_that_differ_are_reported(replica: ReplicaServer,
                                                  replica_copy_server: ReplicaServer) -> None:
    # The behaviours issue 8 is about: gzip encoding of a .gz, 403 for a missing key, server hashes, listing style.
    replica_copy_server.set_behaviour({
        "gz_as_encoding_hosts": [], "autoindex": "pre", "server_hashes": False,
        "missing_status": {"janelia-cosem-datasets.s3.amazonaws.com": 403, "storage.googleapis.com": 403}})
    rows = run(replica_copy_server, replica, ("empiar", "hemibrain", "openorganelle"))
    differ = verdicts(rows, DIFFER)
    shard = next(r.check.split(":")[0] for r in rows if r.check.startswith("shard "))
    assert set(differ) == {
        ("empiar", "F57-8_test1.xml.gz: Content-Encoding"),
        ("empiar", "listing: style"),
        ("hemibrain", f"{shard}: x-goog-hash (server MD5)"),
        ("hemibrain", "a missing object: HEAD status"),
        ("openorganelle", "s8 chunk 0/0/0: ETag (server MD5)"),
        ("openorganelle", "a missing object: HEAD status"),
    }
    assert (differ[("empiar", "F57-8_test1.xml.gz: Content-Encoding")].live,
            differ[("empiar", "F57-8_test1.xml.gz: Content-Encoding")].replica) == ("identity", "gzip")
    assert (differ[("openorganelle", "a missing object: HEAD status")].live,
            differ[("openorganelle", "a missing object: HEAD status")].replica) == ("403", "404")
    assert differ[("openorganelle", "s8 chunk 0/0/0: ETag (server MD5)")].live == "absent"
    # The listing in another style still lists the same files.
    assert ("empiar", "listing: image files") in verdicts(rows, AGREE)


def test_an_outage_of_one_host_is_reported_as_down_and_the_rest_is_compared(
        replica: ReplicaServer, replica_copy_server: ReplicaServer) -> None:
    replica_copy_server.set_behaviour({"outage_hosts": ["idr.openmicroscopy.org"]})
    rows = run(replica_copy_server, replica, ("idr",))
    down = verdicts(rows, LIVE_DOWN)
    assert set(down) == {("idr", "JSON API image (document)"), ("idr", "webclient imgData (document)")}
    assert "HTTP 503" in down[("idr", "JSON API image (document)")].note
    # Asked once: the second document was not requested from a host already found down.
    seen = [r for r in replica_copy_server.faults.requests_seen if "idr.openmicroscopy.org" in r]
    assert len(seen) == CONFIG.retries + 1
    assert {r.verdict for r in rows if r.check.startswith("TIFF")} == {AGREE}
    assert livecheck.exit_status(rows) == 2


def test_live_hosts_that_do_not_answer_are_reported_not_raised(replica: ReplicaServer) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    rows = run(dead, replica)
    assert {r.source for r in rows} == set(SOURCES)
    assert {r.verdict for r in rows} == {LIVE_DOWN}
    assert [r for r in rows if r.live != "no answer"] == []
    assert livecheck.exit_status(rows) == 2


def test_the_command_serves_its_own_replica_and_prints_the_table(replica_tree: Path, replica: ReplicaServer,
                                                                 tmp_path: Path) -> None:
    # As a maintainer runs it, with "live" on loopback: the command builds (here: finds cached) and serves the
    # replica itself.
    env = {**os.environ, "EMDATA_REPLICA_CACHE": str(replica_tree.parent)}
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "emdata.offline.livecheck", "--replica-profile", "small",
                           "--live-base", replica.base_url, "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["source"] for r in rows} == set(SOURCES) and {r["verdict"] for r in rows} == {AGREE}
    assert f"Summary: {len(rows)} agree" in proc.stdout
    assert proc.stdout.splitlines()[1].split() == ["source", "check", "live", "replica", "verdict"]
    assert hemibrain.EM_URL.split("://", 1)[1] not in proc.stderr  # nothing failed along the way


def test_bad_arguments_fail_naming_them(replica: ReplicaServer) -> None:
    with pytest.raises(ValueError, match="unknown source"):
        livecheck.run_checks("", replica.base_url, sources=("nope",))
    assert livecheck.main(["--replica-base", replica.base_url, "--live-base", "ftp://x", "--sources", "epfl"]) == 1


def test_a_field_missing_from_an_omero_document_is_named(replica: ReplicaServer, replica_copy: Path,
                                                        replica_copy_server: ReplicaServer) -> None:
    imgdata = replica_copy / "idr.openmicroscopy.org/webclient/imgData/9846137/index.html"
    doc = json.loads(imgdata.read_bytes())
    doc["meta"]["pixelsType_renamed"] = doc["meta"].pop("pixelsType")
    imgdata.write_text(json.dumps(doc))
    rows = run(replica_copy_server, replica, ("idr",))
    differ = verdicts(rows, DIFFER)
    assert differ[("idr", "webclient imgData: fields")].note == \
        "only live: ['meta.pixelsType_renamed']; only in the replica: ['meta.pixelsType']"
    assert differ[("idr", "webclient imgData: dtype")].live == "-"  # the parser found no pixelsType live


def test_a_redirect_elsewhere_is_an_error_naming_where_it_points_not_an_outage(
        replica: ReplicaServer, replica_copy_server: ReplicaServer) -> None:
    replica_copy_server.set_faults({"redirect_to": "http://mirror.invalid", "redirect_count": 5,
                                    "path_contains": "/api/v0/m/images/"})
    rows = run(replica_copy_server, replica, ("idr",))
    errors = verdicts(rows, livecheck.ERROR)
    assert set(errors) == {("idr", "JSON API image (document)")}
    assert "redirect to http://mirror.invalid/" in errors[("idr", "JSON API image (document)")].note
    # The host is not taken as down: the next document from it is compared.
    assert ("idr", "webclient imgData: fields") in verdicts(rows, AGREE)


def test_what_the_small_profile_changes_on_purpose_is_the_replicas_own(
        replica: ReplicaServer, replica_copy: Path, replica_copy_server: ReplicaServer) -> None:
    from emdata.offline.replica import empiar as replica_empiar
    from emdata.offline.replica import idr as replica_idr

    # "Live" serves the verbatim EMPIAR entry (5628 x 5632) and IDR documents of the real shape (184, 775, 1121).
    (replica_copy / replica_empiar.API_PATH / "index.html").write_text(replica_empiar.API_DOCUMENT)
    real = replica_idr.SHAPES["full"]
    replica_idr.write_json(replica_copy / replica_idr.API_PATH, replica_idr.api_image_document(real))
    rows = run(replica_copy_server, replica, ("empiar", "idr"))
    own = verdicts(rows, OWN)
    assert set(own) == {("empiar", "API entry (document)"), ("idr", "JSON API image: shape (z, y, x)")}
    assert own[("empiar", "API entry (document)")].note.startswith("the small profile's slice size: ")
    assert "image_width: \"5628\" live, \"128\" in the replica" in own[("empiar", "API entry (document)")].note
    assert own[("idr", "JSON API image: shape (z, y, x)")].live == "[184, 775, 1121]"
    assert verdicts(rows, DIFFER) == {}
    # Against the full profile (real slice size and shapes), the same answers are differences.
    full = livecheck.run_checks(replica_copy_server.base_url, replica.base_url, profile="full",
                                sources=("empiar", "idr"), config=CONFIG)
    assert {("empiar", "API entry (document)"), ("idr", "JSON API image: shape (z, y, x)")} <= set(
        verdicts(full, DIFFER))
