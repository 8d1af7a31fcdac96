"""The download engine against the replica server with injected faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emdata.acquire.download import ChecksumRegistry, Download, Downloader
from emdata.errors import DownloadError, IntegrityError, InvalidParameterError
from emdata.acquire.params import DownloadConfig

MB = 2**20


def make(server, *, sleeps=None, registry=None, **config):
    config.setdefault("backoff_s", 0.0)
    return Downloader(DownloadConfig(**config), mirror=server.base_url, registry=registry, progress=False,
                      sleep=(sleeps.append if sleeps is not None else lambda s: None))


def ranges_seen(server, name, probes=False):
    """The Range headers of the GETs for ``name``; the one-byte size probe (bytes=0-0) only if asked."""
    spans = [r.split(" ", 2)[2] for r in server.faults.requests_seen if name in r and r.count(" ") >= 2]
    return spans if probes else [s for s in spans if s != "bytes=0-0"]


def test_plain_download_verifies_and_records_hash(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 300_000)
    registry = ChecksumRegistry(tmp_path / "checksums.json", "replica")
    result = make(server, registry=registry).download(Download(url, tmp_path / "out" / "a.bin"))
    assert Path(result.dest).read_bytes() == tree.files["a.bin"]
    # Nothing pinned, no server hash: a second download must agree before the file is kept and recorded.
    assert result.sha256 == tree.sha256("a.bin") and result.fetched_bytes == 2 * 300_000
    saved = json.loads((tmp_path / "checksums.json").read_text())
    assert saved["replica"][url]["sha256"] == tree.sha256("a.bin") and saved["replica"][url]["size"] == 300_000
    assert saved["replica"][url]["verified_by"] == "two downloads agreed" and saved["replica"][url]["recorded"]
    assert not any(p.name.endswith((".partial", ".check2.partial")) for p in (tmp_path / "out").iterdir())
    # The next run verifies against the recorded hash: one download.
    server.faults.requests_seen.clear()
    again = make(server, registry=ChecksumRegistry(tmp_path / "checksums.json", "replica")).download(
        Download(url, tmp_path / "again" / "a.bin"))
    assert again.fetched_bytes == 300_000 and len(server.faults.requests_seen) == 1
    assert saved["live"] == {}
    assert not (tmp_path / "out" / "a.bin.partial").exists()


def test_interrupted_download_resumes_without_refetching(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 3 * MB)
    dest = tmp_path / "a.bin"
    server.faults.drop_after_bytes, server.faults.drop_count = 1 * MB, 1
    with pytest.raises(DownloadError, match="a.bin"):
        make(server, retries=0).download(Download(url, dest, sha256=tree.sha256("a.bin")))
    partial = tmp_path / "a.bin.partial"
    assert not dest.exists() and partial.stat().st_size == 1 * MB  # kept, not lost
    server.faults.requests_seen.clear()
    result = make(server).download(Download(url, dest, sha256=tree.sha256("a.bin")))
    assert dest.read_bytes() == tree.files["a.bin"]
    assert result.fetched_bytes == 2 * MB  # only the missing bytes crossed the network
    assert ranges_seen(server, "a.bin") == [f"bytes={MB}-"]


def test_drop_mid_body_is_retried_and_resumed_in_one_call(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 2 * MB)
    server.faults.drop_after_bytes, server.faults.drop_count = 700_000, 2
    result = make(server, retries=3).download(Download(url, tmp_path / "a.bin", sha256=tree.sha256("a.bin")))
    assert result.sha256 == tree.sha256("a.bin") and result.fetched_bytes == 2 * MB
    spans = ranges_seen(server, "a.bin")
    assert len(spans) == 3 and spans[0] == "bytes=0-"
    first, second = (int(s.removeprefix("bytes=").rstrip("-")) for s in spans[1:])
    # Each retry resumes where the bytes on disk end (at most one 64 KiB read block short of the drop).
    assert 700_000 - 65_536 < first <= 700_000
    assert first + 700_000 - 65_536 < second <= first + 700_000


def test_corrupted_body_is_detected_and_never_renamed(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 100_000)
    server.faults.corrupt_count = 2  # the download and its one retry
    dest = tmp_path / "a.bin"
    with pytest.raises(IntegrityError, match="sha256"):
        make(server).download(Download(url, dest, sha256=tree.sha256("a.bin")))
    assert not dest.exists() and not (tmp_path / "a.bin.partial").exists()
    # One corrupted copy is a transient fault: a second download is made, and it verifies.
    server.faults.corrupt_count = 1
    result = make(server).download(Download(url, dest, sha256=tree.sha256("a.bin")))
    assert result.sha256 == tree.sha256("a.bin") and result.fetched_bytes == 2 * 100_000


def test_recorded_hash_is_verified_on_the_next_run(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 50_000)
    registry_path = tmp_path / "checksums.json"
    make(server, registry=ChecksumRegistry(registry_path, "replica")).download(Download(url, tmp_path / "1.bin"))
    server.faults.corrupt_count = 2
    with pytest.raises(IntegrityError):
        make(server, registry=ChecksumRegistry(registry_path, "replica")).download(Download(url, tmp_path / "2.bin"))
    assert not (tmp_path / "2.bin").exists()


def test_truncated_body_is_detected_and_never_renamed(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 200_000)
    server.faults.truncate_to_bytes, server.faults.truncate_count = 1000, 100
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match="ended at byte"):
        make(server, retries=2).download(Download(url, dest))
    assert not dest.exists()


def test_truncated_body_with_a_matching_length_fails_the_size_check(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 200_000)
    # Without Range support the server's Content-Length is the only length: a cut body looks complete.
    server.faults.ignore_ranges = True
    server.faults.truncate_to_bytes, server.faults.truncate_count = 1000, 100
    with pytest.raises(IntegrityError, match="size 1000 != expected 200000"):
        make(server).download(Download(url, tmp_path / "a.bin", size=200_000))
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "a.bin.partial").exists()


def test_server_that_ignores_ranges_restarts_cleanly(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 1 * MB)
    server.faults.ignore_ranges = True
    server.faults.drop_after_bytes, server.faults.drop_count = 300_000, 1
    result = make(server, retries=2).download(Download(url, tmp_path / "a.bin"))
    assert result.sha256 == tree.sha256("a.bin")


def test_retries_stop_at_the_bound_with_url_and_status(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 1000)
    server.faults.status, server.faults.status_count = 503, 100
    sleeps: list[float] = []
    with pytest.raises(DownloadError) as err:
        make(server, retries=3, backoff_s=0.5, sleeps=sleeps).download(Download(url, tmp_path / "a.bin"))
    assert f"{server.base_url}/example.org/files/a.bin" in str(err.value) and "HTTP 503" in str(err.value)
    assert "4 attempts" in str(err.value)
    assert len([r for r in server.faults.requests_seen if "a.bin" in r]) == 4
    assert sleeps == [0.5, 1.0, 2.0]  # exponential backoff
    assert not (tmp_path / "a.bin").exists()


def test_429_retry_after_is_honoured(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 1000)
    server.faults.status, server.faults.status_count, server.faults.retry_after_s = 429, 2, 7
    sleeps: list[float] = []
    result = make(server, retries=3, sleeps=sleeps).download(Download(url, tmp_path / "a.bin"))
    assert result.size == 1000 and sleeps == [7.0, 7.0]


def test_404_fails_at_once(file_server, tmp_path):
    server, _ = file_server
    with pytest.raises(DownloadError, match=r"example.org/files/missing.bin.*HTTP 404"):
        make(server, retries=5).download(Download("https://example.org/files/missing.bin", tmp_path / "m"))
    assert len(server.faults.requests_seen) == 1


def test_parallel_ranges_of_one_large_file(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("big.bin", 5 * MB + 123)
    parts = [f"bytes={s}-{min(s + MB, 5 * MB + 123) - 1}" for s in range(0, 5 * MB + 123, MB)]
    result = make(server, range_threshold_mb=1, range_part_mb=1, range_workers=3).download(
        Download(url, tmp_path / "big.bin", sha256=tree.sha256("big.bin")))
    assert result.sha256 == tree.sha256("big.bin")
    # Size unknown: a stream starts, sees a large file in its first response, and turns into ranges.
    spans = ranges_seen(server, "big.bin", probes=True)
    assert spans[0] == "bytes=0-" and sorted(spans[1:]) == sorted(parts)
    assert not (tmp_path / "big.bin.partial.parts").exists()
    # Size known (pinned): a one-byte probe checks Range support first.
    server.faults.requests_seen.clear()
    make(server, range_threshold_mb=1, range_part_mb=1, range_workers=3).download(
        Download(url, tmp_path / "big2.bin", size=5 * MB + 123, sha256=tree.sha256("big.bin")))
    spans = ranges_seen(server, "big.bin", probes=True)
    assert spans[0] == "bytes=0-0" and sorted(spans[1:]) == sorted(parts)


def test_small_files_cost_one_request_each(file_server, tmp_path):
    server, tree = file_server
    urls = [tree.add(f"s{i}.bin", 10_000, seed=i) for i in range(3)]
    make(server).download_all([Download(u, tmp_path / u.rsplit("/", 1)[1], sha256=tree.sha256(f"s{i}.bin"))
                               for i, u in enumerate(urls)])
    assert len(server.faults.requests_seen) == 3


def test_a_corrupted_first_download_is_caught_by_the_second_and_never_recorded(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 400_000)
    registry = ChecksumRegistry(tmp_path / "checksums.json", "replica")
    server.faults.corrupt_count = 1  # the first download has one flipped byte; nothing pinned
    result = make(server, registry=registry).download(Download(url, tmp_path / "a.bin"))
    assert (tmp_path / "a.bin").read_bytes() == tree.files["a.bin"]  # two good downloads out of three agreed
    assert result.sha256 == tree.sha256("a.bin") and result.fetched_bytes == 3 * 400_000
    assert registry.get(url)["sha256"] == tree.sha256("a.bin")  # type: ignore[index]
    server.faults.corrupt_count = 2  # two of three corrupted, each differently: no two agree
    with pytest.raises(IntegrityError, match=r"a.bin: three downloads gave three different sha256"):
        make(server, registry=ChecksumRegistry(tmp_path / "c2.json", "replica")).download(
            Download(url, tmp_path / "b.bin"))
    assert not list(tmp_path.glob("b.bin*"))  # nothing kept
    assert not (tmp_path / "c2.json").exists()  # and nothing recorded


def test_a_mismatch_with_a_recorded_hash_says_when_and_how_to_accept(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 1000)
    registry = ChecksumRegistry(tmp_path / "checksums.json", "replica")
    registry.record(url, 1000, "ab" * 32, "two downloads agreed")
    with pytest.raises(IntegrityError, match=r"differs from abab.*recorded on 20\d\d-.*emdata checksums forget"):
        make(server, registry=registry).download(Download(url, tmp_path / "a.bin"))
    assert registry.forget(url) and registry.get(url) is None


def test_already_present_file_is_reused(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 1000)
    dl = make(server)
    dl.download(Download(url, tmp_path / "a.bin"))
    server.faults.requests_seen.clear()
    again = dl.download(Download(url, tmp_path / "a.bin", sha256=tree.sha256("a.bin")))
    assert again.reused and again.fetched_bytes == 0 and server.faults.requests_seen == []


@pytest.mark.parametrize("bad", [{"workers": 0}, {"retries": -1}, {"read_timeout_s": "fast"},
                                 {"range_part_mb": 0}])
def test_bad_download_config_names_the_value(bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(InvalidParameterError, match=f"download.{key}.*{value!r}"):
        DownloadConfig(**bad)


def test_progress_bar_only_on_a_terminal_unless_asked(file_server, tmp_path, capsys):
    server, tree = file_server
    urls = [tree.add(f"p{i}.bin", 200_000, seed=i) for i in range(3)]
    items = [Download(u, tmp_path / "quiet" / u.rsplit("/", 1)[1]) for u in urls]
    Downloader(DownloadConfig(), mirror=server.base_url).download_all(items)  # stderr is not a terminal here
    assert "download" not in capsys.readouterr().err
    items = [Download(u, tmp_path / "loud" / u.rsplit("/", 1)[1]) for u in urls]
    Downloader(DownloadConfig(), mirror=server.base_url, progress=True).download_all(items)
    err = capsys.readouterr().err
    assert "download" in err and "B/s" in err  # bytes, rate (and ETA while running)


def test_complete_partial_left_before_its_rename_is_verified_not_refetched(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 100_000)
    (tmp_path / "a.bin.partial").write_bytes(tree.files["a.bin"])  # killed between download and rename
    result = make(server).download(Download(url, tmp_path / "a.bin", sha256=tree.sha256("a.bin")))
    assert result.fetched_bytes == 0 and (tmp_path / "a.bin").read_bytes() == tree.files["a.bin"]


def test_partial_longer_than_the_file_starts_again(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 100_000)
    (tmp_path / "a.bin.partial").write_bytes(b"x" * 150_000)  # the file shrank upstream since
    result = make(server).download(Download(url, tmp_path / "a.bin"))
    assert result.sha256 == tree.sha256("a.bin")


def test_interrupted_ranged_download_fetches_only_missing_parts(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("big.bin", 3 * MB)
    dl = make(server, retries=0, range_threshold_mb=1, range_part_mb=1, range_workers=1)
    orig = dl._get

    def fail_last_part(target, headers):
        if headers.get("Range", "").startswith(f"bytes={2 * MB}-"):
            raise DownloadError("simulated failure of the last part")
        return orig(target, headers)

    dl._get = fail_last_part  # type: ignore[method-assign]
    pin = tree.sha256("big.bin")
    with pytest.raises(DownloadError):
        dl.download(Download(url, tmp_path / "big.bin", sha256=pin))
    assert json.loads((tmp_path / "big.bin.partial.parts").read_text())["done"] == [0, MB]
    server.faults.requests_seen.clear()
    # Now with a threshold that would pick one stream and another part size: the saved layout wins.
    result = make(server, range_threshold_mb=100, range_part_mb=0.5).download(
        Download(url, tmp_path / "big.bin", sha256=pin))
    assert result.sha256 == tree.sha256("big.bin")
    assert ranges_seen(server, "big.bin") == [f"bytes={2 * MB}-{3 * MB - 1}"]  # the missing part only
    assert result.fetched_bytes == MB


def test_ranged_download_restarts_when_the_file_changed_upstream(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("big.bin", 2 * MB)
    parts = tmp_path / "big.bin.partial.parts"
    (tmp_path / "big.bin.partial").write_bytes(b"\0" * (3 * MB))
    parts.write_text(json.dumps({"total": 3 * MB, "part": MB, "done": [0, MB]}))
    result = make(server, range_threshold_mb=1, range_part_mb=1).download(Download(url, tmp_path / "big.bin"))
    assert result.sha256 == tree.sha256("big.bin") and not parts.exists()


# ----------------------------------------------------------------------------- what real hosts do
def _host_file(tree, host: str, name: str, data: bytes) -> str:
    path = tree.root / host / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"https://{host}/{name}"


def test_a_gz_file_labelled_gzip_encoded_is_stored_as_the_server_holds_it(file_server, tmp_path):
    import gzip
    import hashlib

    server, tree = file_server
    stored = gzip.compress(b"<xml>" + b"slice " * 5000 + b"</xml>", mtime=0)
    url = _host_file(tree, "ftp.ebi.ac.uk", "entry/F57-8_test1.xml.gz", stored)  # EBI labels .gz gzip-encoded
    result = make(server).download(Download(url, tmp_path / "x.xml.gz"))
    assert (tmp_path / "x.xml.gz").read_bytes() == stored  # not the decoded XML
    assert result.sha256 == hashlib.sha256(stored).hexdigest() and result.size == len(stored)


def test_a_body_compressed_in_transit_is_refused_not_stored(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("volume.tif", 200_000)
    server.behaviour.gzip_paths = ["volume.tif"]  # a server that compresses although identity was asked
    with pytest.raises(DownloadError, match=r"volume.tif.*Content-Encoding 'gzip'.*identity"):
        make(server, retries=0).download(Download(url, tmp_path / "volume.tif"))
    assert not (tmp_path / "volume.tif").exists()


def test_documents_labelled_gzip_are_decoded_within_a_bound(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("doc.json", 10)
    (tree.root / "example.org" / "files" / "doc.json").write_text(json.dumps({"a": list(range(1000))}))
    server.behaviour.gzip_paths = ["doc.json"]
    assert make(server).fetch_json(url) == {"a": list(range(1000))}
    with pytest.raises(DownloadError, match=r"doc.json.*larger than 100 bytes"):
        make(server).fetch_bytes(url, max_bytes=100)


@pytest.mark.parametrize("host", ["storage.googleapis.com", "janelia-cosem-datasets.s3.amazonaws.com"])
def test_server_hashes_verify_a_first_download_without_a_pin(file_server, tmp_path, host):
    import numpy as np

    server, tree = file_server
    data = np.random.default_rng(3).integers(0, 256, 400_000, dtype=np.uint8).tobytes()
    url = _host_file(tree, host, "bucket/obj.bin", data)
    assert make(server).download(Download(url, tmp_path / "ok.bin")).size == len(data)
    server.faults.corrupt_count = 1  # one flipped byte; nothing pinned, but the server states the MD5
    with pytest.raises(IntegrityError, match=r"obj.bin: md5 .* stated by the server"):
        make(server, retries=0).download(Download(url, tmp_path / "bad.bin"))
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.partial").exists()


def test_head_reports_existence_without_raising(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("there.bin", 10)
    status, headers = make(server).head(url)
    assert status == 200 and headers["Content-Length"] == "10"
    assert make(server).head(url.replace("there", "absent"))[0] == 404
    server.faults.path_contains, server.faults.status, server.faults.status_count = "there", 503, 1
    assert make(server).head(url)[0] == 200  # a 503 is retried


def test_a_document_cut_short_with_a_matching_length_is_fetched_again(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("doc.json", 10)
    (tree.root / "example.org" / "files" / "doc.json").write_text(json.dumps({"values": list(range(200))}))
    server.faults.truncate_to_bytes, server.faults.truncate_count = 50, 1  # looks complete, is not JSON
    assert make(server).fetch_json(url) == {"values": list(range(200))}
    server.faults.truncate_to_bytes, server.faults.truncate_count = 50, 10
    with pytest.raises(Exception, match=r"doc.json: expected a JSON document.*after 3 attempts"):
        make(server, retries=2).fetch_json(url)


def test_unverifiable_ranged_downloads_repeated_in_one_folder_are_never_zeros(file_server, tmp_path):
    """Leftover parts lists of confirmation copies must never pass for downloaded bytes (they did: zeros)."""
    server, tree = file_server
    url = tree.add("big.bin", 3 * MB)
    for run in range(3):
        registry = ChecksumRegistry(tmp_path / f"c{run}.json", "replica")  # nothing recorded: confirm each time
        if run == 1:
            server.faults.corrupt_count = 1  # one run needs the third copy
        result = make(server, registry=registry, range_threshold_mb=1, range_part_mb=1).download(
            Download(url, tmp_path / "big.bin"))
        assert result.sha256 == tree.sha256("big.bin"), f"run {run}"
        assert (tmp_path / "big.bin").read_bytes() == tree.files["big.bin"]
        (tmp_path / "big.bin").unlink()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("big.bin")) == []
