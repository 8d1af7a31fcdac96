"""Finding the data (repository root, catalog names, the dvc pull hint) and streaming without pull (DVC remote, URLs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from access_fixtures import em_like, make_volume

from emdata.access import open_array
from emdata.access.open import find_repo_root
from emdata.errors import InvalidParameterError
from emdata.offline import services
from emdata.offline.replica import serve_in_thread

# moto accepts any credentials; these dummies never leave loopback.
S3_ENV = {"AWS_ACCESS_KEY_ID": "emdata-local", "AWS_SECRET_ACCESS_KEY": "emdata-local", "AWS_DEFAULT_REGION": "us-east-1"}


def _epfl_like(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """An output shaped like data/epfl.zarr: a plain root group with a ``training`` image and ``mito`` labels."""
    image = em_like((12, 20, 16), seed=11)
    mito = (image > 140).astype(np.uint8)
    zarr.open_group(str(out), mode="w", zarr_format=3)
    make_volume(out / "training", image, voxel_size_nm=(5, 5, 5), n_levels=2, chunks=(4, 4, 4), shards=(8, 8, 8),
                labels={"mito": mito})
    return image, mito


@pytest.fixture()
def workspace(tmp_path):
    ws = tmp_path / "repo"
    (ws / "data").mkdir(parents=True)
    (ws / "dvc.yaml").write_text("stages: {}\n")
    (ws / "notebooks" / "deep").mkdir(parents=True)
    return ws


def test_finds_the_repository_from_a_subfolder_and_names_the_pull_command(workspace, monkeypatch):
    monkeypatch.delenv("EMDATA_DATA_ROOT", raising=False)
    monkeypatch.chdir(workspace / "notebooks" / "deep")
    assert find_repo_root() == workspace.resolve()
    with pytest.raises(InvalidParameterError) as err:
        open_array("epfl", group="training")
    message = str(err.value)
    assert "`dvc pull data/epfl.zarr`" in message and "`emdata pull epfl`" in message
    assert "remote=True" in message and "EMDATA_DATA_ROOT" in message
    # The output name works as well as the stage name, and names the stage in the hint.
    with pytest.raises(InvalidParameterError, match=r"`dvc pull data/hemibrain_crop.zarr` \(or `emdata pull hemibrain`\)"):
        open_array("hemibrain_crop")
    image, mito = _epfl_like(workspace / "data" / "epfl.zarr")
    make_volume(workspace / "data" / "hemibrain_crop.zarr", image, n_levels=1)
    np.testing.assert_array_equal(open_array("epfl", group="training").read(open_array(
        "epfl", group="training").bounds), image)
    a, b = open_array("hemibrain"), open_array("hemibrain_crop")
    assert a.path == b.path and str(a.path).startswith(str(workspace.resolve()))
    with pytest.raises(InvalidParameterError, match=r"unknown dataset 'nope'.*catalog names: \['empiar', 'epfl'"):
        open_array("nope")


def _dvc(ws: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


@pytest.mark.slow
def test_streams_an_output_from_the_dvc_remote_without_pull(workspace, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    ws = workspace
    image, mito = _epfl_like(ws / "data" / "epfl.zarr")
    git = ["git", "-c", "user.name=emdata-test", "-c", "user.email=test@example.org"]
    subprocess.run([*git, "init", "-q"], cwd=ws, check=True)
    _dvc(ws, "init", "-q")
    _dvc(ws, "add", "data/epfl.zarr")
    with services.s3(["dvc-store"]) as endpoint:
        _dvc(ws, "remote", "add", "-d", "storage", "s3://dvc-store/v1")
        _dvc(ws, "remote", "modify", "--local", "storage", "endpointurl", endpoint)
        subprocess.run([*git, "add", "-A"], cwd=ws, check=True)
        subprocess.run([*git, "commit", "-qm", "data"], cwd=ws, check=True)
        _dvc(ws, "push")
        shutil.rmtree(ws / ".dvc" / "cache")
        shutil.rmtree(ws / "data" / "epfl.zarr")
        monkeypatch.chdir(ws / "notebooks")

        streamed = open_array("epfl", group="training", remote=True)
        assert streamed.backend == "zarr" and "DVC remote" in str(streamed.path)
        got = streamed.read(streamed.bounds)
        label = open_array("epfl", group="training", label="mito", level=1, remote="storage")
        got_label = label.read(label.bounds)
        assert not (ws / "data" / "epfl.zarr").exists() and not (ws / ".dvc" / "cache" / "files").exists()

        _dvc(ws, "pull", "data/epfl.zarr")
        pulled = open_array("epfl", group="training")
        assert pulled.backend == "tensorstore"
        np.testing.assert_array_equal(got, pulled.read(pulled.bounds))
        np.testing.assert_array_equal(got, image)
        pulled_label = open_array("epfl", group="training", label="mito", level=1)
        np.testing.assert_array_equal(got_label, pulled_label.read(pulled_label.bounds))
        assert (label.shape, label.voxel_size_nm, label.translation_nm) == (
            pulled_label.shape, pulled_label.voxel_size_nm, pulled_label.translation_nm)


def test_reads_an_ome_zarr_over_https_and_s3_urls(tmp_path, monkeypatch):
    served = tmp_path / "served" / "example.org"
    image, _ = _epfl_like(served / "vol.zarr")
    with serve_in_thread(tmp_path / "served") as server:
        url = f"{server.base_url}/example.org/vol.zarr"
        arr = open_array(url, group="training", level=1)
        local = open_array(served / "vol.zarr", group="training", level=1)
        assert arr.backend == "zarr" and (arr.shape, arr.voxel_size_nm) == (local.shape, local.voxel_size_nm)
        np.testing.assert_array_equal(arr.read(arr.bounds), local.read(local.bounds))
        with pytest.raises(InvalidParameterError, match="no label 'cells'"):
            open_array(url, group="training", label="cells")
        with pytest.raises(InvalidParameterError, match="reads local data"):
            open_array(url, group="training", backend="tensorstore")
