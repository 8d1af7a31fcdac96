"""Reliability across the acquisition plumbing: redirects, secrets, crash leftovers, concurrent runs, params."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from emdata.acquire.download import Download, Downloader
from emdata.acquire.fsutil import StageBusyError, stage_lock
from emdata.acquire.params import DownloadConfig
from emdata.catalog import DATASETS
from emdata.errors import DownloadError, InvalidParameterError
from emdata.stage import run_stage

EPFL_SMALL = "epfl: {splits: [training]}\n"


def params(server, extra: str = EPFL_SMALL) -> str:
    return f'mirror: {{url: "{server.base_url}", serves: replica}}\ndownload: {{retries: 1, backoff_s: 0}}\n' + extra


# ----------------------------------------------------------------------------- class 10: redirects
def test_a_redirect_to_another_host_is_not_followed(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 1000)
    server.faults.redirect_to, server.faults.redirect_count = "http://127.0.0.2:9", 1  # somewhere else entirely
    with pytest.raises(DownloadError, match=r"a.bin: HTTP 302 redirect to http://127.0.0.2:9/.*'127.0.0.2' is not a "
                                            r"host this source is known to redirect to"):
        Downloader(DownloadConfig(retries=0), mirror=server.base_url).download(Download(url, tmp_path / "a.bin"))
    assert not (tmp_path / "a.bin").exists()


def test_a_redirect_to_a_listed_host_is_followed(file_server, tmp_path):
    server, tree = file_server
    url = tree.add("a.bin", 1000)
    moved = tree.root / "moved" / "example.org" / "files" / "a.bin"
    moved.parent.mkdir(parents=True)
    moved.write_bytes(tree.files["a.bin"])
    server.faults.redirect_to = server.base_url.replace("127.0.0.1", "localhost") + "/moved"
    server.faults.redirect_count = 1
    downloader = Downloader(DownloadConfig(retries=0), mirror=server.base_url, redirect_hosts=["localhost"])
    result = downloader.download(Download(url, tmp_path / "a.bin", sha256=tree.sha256("a.bin")))
    assert result.size == 1000 and any("/moved/example.org/files/a.bin" in r for r in server.faults.requests_seen)
    # A redirect loop is bounded and named.
    server.faults.redirect_to, server.faults.redirect_count = server.base_url.replace("127.0.0.1", "localhost"), 99
    with pytest.raises(DownloadError, match="more than 5 redirects"):
        downloader.download(Download(url, tmp_path / "b.bin", sha256=tree.sha256("a.bin")))


# ----------------------------------------------------------------------------- class 7: secrets
def test_planted_credentials_reach_no_file_and_no_log(replica, tmp_path, monkeypatch, caplog):
    secrets = {"AWS_SECRET_ACCESS_KEY": "FAKEsecretKEY-7f3a9", "AWS_ACCESS_KEY_ID": "FAKEACCESSKEYID-2b8",
               "AWS_SESSION_TOKEN": "FAKEtoken-c41d"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine 127.0.0.1 login mirroruser password FAKEnetrcPW-99e1\n")
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(params(replica))
    with caplog.at_level(logging.DEBUG):
        run_stage("epfl", repo_root=ws)
    planted = [*secrets.values(), "FAKEnetrcPW-99e1", "mirroruser"]
    for path in ws.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaked = [s for s in planted if s.encode() in data]
            assert not leaked, f"{path} holds {leaked}"
    assert not [s for s in planted if s in caplog.text]
    # A password in the mirror URL is refused before anything runs, and is not echoed.
    (ws / "params.yaml").write_text(f'mirror: {{url: "http://u:FAKEurlPW-31@127.0.0.1:1"}}\n{EPFL_SMALL}')
    with pytest.raises(InvalidParameterError) as err:
        run_stage("epfl", repo_root=ws)
    assert "FAKEurlPW-31" not in str(err.value)


# ----------------------------------------------------------------------------- class 8: leftovers and races
def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(replica, tmp_path):
    (tmp_path / "params.yaml").write_text(params(replica))
    leftovers = [tmp_path / "data" / ".epfl.zarr.k1ll3d.tmp", tmp_path / "data" / ".epfl.zarr.old-12345"]
    for folder in leftovers:
        (folder / "training" / "0").mkdir(parents=True)
        (folder / "training" / "0" / "zarr.json").write_text("{}")
    run_stage("epfl", repo_root=tmp_path)
    assert not any(p.exists() for p in leftovers)
    assert [p.name for p in (tmp_path / "data").iterdir() if "epfl.zarr" in p.name] == ["epfl.zarr"]


def test_a_second_run_of_the_same_stage_fails_at_once_naming_the_lock(replica, tmp_path):
    (tmp_path / "params.yaml").write_text(params(replica))
    with stage_lock(tmp_path, "epfl"):
        with pytest.raises(StageBusyError, match=rf"stage 'epfl' is already running \(pid {os.getpid()} holds "):
            run_stage("epfl", repo_root=tmp_path)
    assert replica.faults.requests_seen == []  # it did nothing
    run_stage("epfl", repo_root=tmp_path)  # the lock is free again (and a killed holder frees it too: flock)


# ----------------------------------------------------------------------------- class 9: params
@pytest.mark.parametrize(("text", "message"), [
    ("download: {retries: .nan}\n", r"download.retries must be a finite int.*nan"),
    ("download: {read_timeout_s: .inf}\n", r"download.read_timeout_s must be a finite float.*inf"),
    ("download: {backoff_s: .nan}\n", r"download.backoff_s.*nan"),
    ("download: {range_part_mb: 1.0e-6}\n", r"download.range_part_mb.*\[0.0625, 4096\].*1e-06"),
    ("download: {workers: 100000}\n", r"download.workers.*100000"),
    ("download: {checksums_file: ../elsewhere.json}\n", r"checksums_file.*inside the repository.*'../elsewhere.json'"),
    ("download: {checksums_file: /etc/passwd}\n", r"checksums_file.*'/etc/passwd'"),
    ("epfl: {shards: [65536, 65536, 65536], chunks: [64, 64, 64]}\n", r"epfl.shards must be three integers in 1..4096"),
    ("epfl: {chunks: [0, 64, 64]}\n", r"epfl.chunks.*\[0, 64, 64\]"),
    ("epfll: {}\n", r"unknown section\(s\) \['epfll'\] in params.yaml"),
])
def test_params_outside_their_bounds_fail_naming_the_param(replica, tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(f'mirror: {{url: "{replica.base_url}", serves: replica}}\n' + text)
    with pytest.raises(InvalidParameterError, match=message):
        run_stage("epfl", repo_root=tmp_path)
    assert replica.faults.requests_seen == []
    assert not (tmp_path / "data").exists()


def test_checksums_file_in_a_subfolder_of_the_repository_is_fine(tmp_path):
    assert DownloadConfig(checksums_file="pins/checksums.json").checksums_file == "pins/checksums.json"
    assert Path("pins/checksums.json").suffix == ".json"


# ----------------------------------------------------------------------------- class 4: absurd numbers, hard cap
def _edit(path: Path, edit: Any) -> None:
    import json

    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


ABSURD = {
    "hemibrain": ("storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg/info",
                  lambda d: [s.update(chunk_sizes=[[10**6, 10**6, 10**6]], size=[2**40] * 3) for s in d["scales"]],
                  r"info scales\[0\]"),
    "empiar": ("www.ebi.ac.uk/empiar/api/entry/11759/index.html",
               lambda d: d["EMPIAR-11759"]["imagesets"][0].update(num_images_or_tilt_series=10**12),
               r"api/entry/11759/: imagesets\[0\].*num_images_or_tilt_series 1000000000000"),
    "openorganelle": ("janelia-cosem-datasets.s3.amazonaws.com/jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/recon-2/em/"
                      "fibsem-int16/s0/.zarray", lambda d: d.update(shape=[10**6, 10**6, 10**6]),
                      r"s0/.zarray: shape \[1000000, 1000000, 1000000\]"),
}


@pytest.mark.parametrize("stage", sorted(ABSURD))
def test_absurd_numbers_fail_naming_the_field_under_a_hard_memory_cap(stage, replica_copy, replica_copy_server,
                                                                      tmp_path):
    import subprocess
    import sys

    path, edit, message = ABSURD[stage]
    _edit(replica_copy / path, edit)
    ws = tmp_path / "ws"
    ws.mkdir()
    section = "{seed: 7, crop_size: [64, 64, 64]}" if stage == "hemibrain" else "{}"
    (ws / "params.yaml").write_text(params(replica_copy_server, extra=f"{stage}: {section}\n"))
    cap = 3 * 2**30  # address space: far below what the absurd numbers would ask for
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (%d, %d)); "
            "from emdata.stage import main; main(%r)" % (cap, cap, stage))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ws, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # a Python error, not an abort (bad_alloc) or a kill
    assert "SourceMismatchError" in proc.stderr and re.search(message, proc.stderr), proc.stderr[-2000:]
    assert "MemoryError" not in proc.stderr and "bad_alloc" not in proc.stderr
    assert not (ws / "data" / DATASETS[stage].output.removeprefix("data/")).exists()
