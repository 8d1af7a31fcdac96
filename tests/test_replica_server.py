"""The replica server speaks HTTP/1.1 the way the real hosts do: ranges, 206/416, 404, and faults on demand."""

from __future__ import annotations

import requests

from emdata.offline.replica.server import _parse_range


def test_full_get_and_head(file_server):
    server, tree = file_server
    tree.add("a.bin", 1000)
    url = f"{server.base_url}/example.org/files/a.bin"
    r = requests.get(url, timeout=5)
    assert r.status_code == 200 and r.content == tree.files["a.bin"]
    assert r.headers["Accept-Ranges"] == "bytes"
    h = requests.head(url, timeout=5)
    assert h.status_code == 200 and h.headers["Content-Length"] == "1000" and h.content == b""


def test_ranges_including_suffix_and_open_ended(file_server):
    server, tree = file_server
    tree.add("a.bin", 1000)
    data = tree.files["a.bin"]
    url = f"{server.base_url}/example.org/files/a.bin"
    for header, expected, content_range in [
        ("bytes=10-19", data[10:20], "bytes 10-19/1000"),
        ("bytes=990-", data[990:], "bytes 990-999/1000"),
        ("bytes=-5", data[-5:], "bytes 995-999/1000"),
        ("bytes=-5000", data, "bytes 0-999/1000"),
        ("bytes=900-5000", data[900:], "bytes 900-999/1000"),
    ]:
        r = requests.get(url, headers={"Range": header}, timeout=5)
        assert r.status_code == 206, header
        assert r.content == expected, header
        assert r.headers["Content-Range"] == content_range


def test_unsatisfiable_range_is_416(file_server):
    server, tree = file_server
    tree.add("a.bin", 100)
    url = f"{server.base_url}/example.org/files/a.bin"
    for header in ("bytes=100-", "bytes=50-10", "bytes=-0", "bytes=abc"):
        r = requests.get(url, headers={"Range": header}, timeout=5)
        assert r.status_code == 416, header
        assert r.headers["Content-Range"] == "bytes */100"


def test_parse_range_edges():
    assert _parse_range("bytes=0-0", 10) == (0, 0)
    assert _parse_range("bytes=-1", 10) == (9, 9)
    assert _parse_range("bytes=-", 10) is None
    assert _parse_range("bytes=0-1, 5-6", 10) is None  # multi-range is not served (one range only)


def test_missing_file_and_path_escape_are_404(file_server):
    server, tree = file_server
    assert requests.get(f"{server.base_url}/example.org/nope", timeout=5).status_code == 404
    assert requests.get(f"{server.base_url}/../../etc/passwd", timeout=5).status_code == 404


def test_percent_encoded_space_maps_to_folder_with_space(replica):
    url = (f"{replica.base_url}/documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/"
           "%20ElectronMicroscopy_Hippocampus/training.tif")
    r = requests.get(url, headers={"Range": "bytes=0-3"}, timeout=5)
    assert r.status_code == 206 and r.content[:2] in (b"II", b"MM")


def test_status_faults_count_down(file_server):
    server, tree = file_server
    tree.add("a.bin", 10)
    url = f"{server.base_url}/example.org/files/a.bin"
    server.faults.status, server.faults.status_count, server.faults.retry_after_s = 429, 2, 3
    first = requests.get(url, timeout=5)
    assert first.status_code == 429 and first.headers["Retry-After"] == "3"
    assert requests.get(url, timeout=5).status_code == 429
    assert requests.get(url, timeout=5).status_code == 200


def test_corrupt_and_truncate_faults(file_server):
    server, tree = file_server
    tree.add("a.bin", 1000)
    url = f"{server.base_url}/example.org/files/a.bin"
    server.faults.corrupt_count = 1
    bad = requests.get(url, timeout=5).content
    assert len(bad) == 1000 and bad != tree.files["a.bin"]
    server.faults.truncate_to_bytes, server.faults.truncate_count = 100, 1
    r = requests.get(url, timeout=5)
    assert r.status_code == 200 and len(r.content) == 100
    assert requests.get(url, timeout=5).content == tree.files["a.bin"]


def test_faults_switch_over_http_for_a_replica_in_another_process(file_server):
    server, tree = file_server
    tree.add("a.bin", 10)
    control = f"{server.base_url}/_replica/faults"
    r = requests.put(control, json={"status": 503, "status_count": 1}, timeout=5)
    assert r.status_code == 200 and r.json()["status"] == 503
    url = f"{server.base_url}/example.org/files/a.bin"
    assert requests.get(url, timeout=5).status_code == 503
    assert requests.get(url, timeout=5).status_code == 200
    assert requests.get(control, timeout=5).json()["requests_seen"] == 2
    bad = requests.put(control, json={"explode": True}, timeout=5)
    assert bad.status_code == 400 and "explode" in bad.json()["error"]
    assert requests.put(control, json={}, timeout=5).json()["status"] is None


def test_a_new_builder_version_replaces_the_old_files(tmp_path, monkeypatch):
    from emdata.offline import replica

    calls = []

    class Builder:
        VERSION = 1

        @staticmethod
        def build(root, profile):
            calls.append(Builder.VERSION)
            (root / "example.org").mkdir()
            (root / "example.org" / f"only-in-v{Builder.VERSION}.bin").write_bytes(b"x")
            (root / "example.org" / "both.bin").write_bytes(bytes([Builder.VERSION]))

    from emdata.catalog import DATASETS, About, Dataset

    monkeypatch.setitem(DATASETS, "fake", Dataset("fake", "data/fake.zarr", "fake_source", About("t", "p", "l", "c")))
    monkeypatch.setitem(__import__("sys").modules, "emdata.offline.replica.fake", Builder)
    tree = replica.build_replica("small", ["fake"], tmp_path)
    replica.build_replica("small", ["fake"], tmp_path)  # cached: not built again
    assert calls == [1]
    Builder.VERSION = 2
    replica.build_replica("small", ["fake"], tmp_path)
    assert calls == [1, 2]
    assert not (tree / "example.org" / "only-in-v1.bin").exists()  # stale file of v1 is gone
    assert (tree / "example.org" / "only-in-v2.bin").exists()
    assert (tree / "example.org" / "both.bin").read_bytes() == b"\x02"
