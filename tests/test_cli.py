"""The emdata command (list, info, verify, pull) on tiny OME-Zarr outputs in a temporary repository."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from emdata.cli import EXIT_FAILED, EXIT_NOT_PULLED, EXIT_OK, EXIT_USAGE, dvc_dir_md5, main
from emdata.metadata import tree_sha256
from emdata.ngff import Geometry, create_image_group, create_label, create_multiscale, write_pyramid

HEMIBRAIN = "data/hemibrain_crop.zarr"
EPFL = "data/epfl.zarr"
SHAPE = (24, 40, 36)


def em_like(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Blobs on a gradient plus noise: compresses like EM and shows structure in a screenshot."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    img = 80 + 60 * np.sin(x / 3.0) * np.cos(y / 4.0) + 20 * np.sin(z / 5.0)
    return np.clip(img + rng.normal(0, 8, shape), 0, 255).astype(np.uint8)


def make_hemibrain(repo: Path, *, translation_nm: tuple[float, float, float] = (800.0, 160.0, 80.0)) -> Path:
    """``data/hemibrain_crop.zarr``: an image at 8 nm with a uint64 segmentation, sharded, two levels."""
    path = repo / HEMIBRAIN
    geometry = Geometry((8.0, 8.0, 8.0), translation_nm)
    data = em_like(SHAPE, 0)
    root, arrays = create_image_group(
        path, name="hemibrain", shape=SHAPE, dtype="uint8", geometry=geometry, n_levels=2, chunks=(8, 16, 16),
        shards=(16, 32, 32), extra_attrs={"emdata": {"source": "hemibrain", "origin": "replica", "seed": 7}})
    arrays[0][...] = data
    write_pyramid(arrays, "mean")
    seg = create_label(root, "segmentation", shape=SHAPE, dtype="uint64", geometry=geometry, n_levels=2,
                       chunks=(8, 16, 16), shards=(16, 32, 32))
    seg[0][...] = (data // 50).astype(np.uint64) * 1000 + 3
    write_pyramid(seg, "nearest")
    return path


def make_epfl(repo: Path) -> Path:
    """``data/epfl.zarr``: images ``training`` and ``testing`` (not at the root), each with a ``mito`` mask."""
    path = repo / EPFL
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["emdata"] = {"source": "epfl"}  # no origin recorded: shown as "unknown"
    for i, split in enumerate(("testing", "training")):
        group = root.create_group(split)
        geometry = Geometry((5.0, 5.0, 5.0))
        arrays = create_multiscale(group, name=split, shape=(16, 32, 32), dtype="uint8", geometry=geometry,
                                   n_levels=2, chunks=(16, 16, 16), shards=None)
        arrays[0][...] = em_like((16, 32, 32), i)
        write_pyramid(arrays, "mean")
        mito = create_label(group, "mito", colors={1: [255, 0, 0, 255]}, shape=(16, 32, 32), dtype="uint8",
                            geometry=geometry, n_levels=2, chunks=(16, 16, 16), shards=None)
        mito[0][4:10, 8:20, 8:20] = 1
        write_pyramid(mito, "nearest")
    return path


def write_table(repo: Path, outputs: dict[str, Path]) -> None:
    """``metadata/datasets.csv`` rows as the metadata stage writes them (the columns the command reads)."""
    from emdata.ngff import find_images, multiscales

    rows = []
    for dataset, path in outputs.items():
        digest = tree_sha256(path)
        for image, group in find_images(zarr.open_group(str(path), mode="r")):
            ms = multiscales(group)
            scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
            rows.append({"dataset": dataset, "image": image or ".", "array": f"{image}/0".lstrip("/"),
                         "kind": "image", "shape": "x".join(map(str, group["0"].shape)),
                         "voxel_size_z": scale[0], "voxel_size_y": scale[1], "voxel_size_x": scale[2],
                         "zarr_sha256": digest})
    (repo / "metadata").mkdir(exist_ok=True)
    with (repo / "metadata/datasets.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


DVC_YAML = """stages:
  hemibrain:
    cmd: python stages/hemibrain.py
    outs:
      - data/hemibrain_crop.zarr
  epfl:
    cmd: python stages/epfl.py
    outs:
      - data/epfl.zarr
"""


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed: {proc.stdout}{proc.stderr}"
    return proc


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A repository folder with dvc.yaml, hemibrain and epfl pulled, their table rows; no DVC records yet."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "dvc.yaml").write_text(DVC_YAML)
    write_table(root, {"hemibrain": make_hemibrain(root), "epfl": make_epfl(root)})
    return root


@pytest.fixture()
def dvc_repo(repo: Path) -> Path:
    """``repo`` as a DVC repository whose dvc.lock records both outputs (and whose cache holds them)."""
    dvc(repo, "init", "--no-scm", "-q")
    dvc(repo, "commit", "-f", "-q", "hemibrain", "epfl")
    return repo


def run(repo: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["--repo", str(repo), *args])
    out, err = capsys.readouterr()
    return code, out, err


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# --- list ---------------------------------------------------------------------------------------------


def test_list_as_users_run_it(repo: Path) -> None:
    """``python -m emdata list`` and the installed ``emdata`` script, run from inside the repository."""
    (repo / "sub").mkdir()
    script = Path(sys.executable).parent / "emdata"
    assert script.is_file(), f"{script} missing: pip install -e . installs the [project.scripts] entry"
    for cmd in ([sys.executable, "-m", "emdata", "list"], [str(script), "list"]):
        proc = subprocess.run(cmd, cwd=repo / "sub", capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line and not line.startswith(" ")}
        hemi = lines["hemibrain"].split()
        assert hemi[:7] == ["hemibrain", HEMIBRAIN, "yes", ".", "24x40x36", "8x8x8", hemi[6]]
        assert hemi[-1] == "replica"
        assert lines["epfl"].split()[2:6] == ["yes", "testing", "16x32x32", "5x5x5"]
        assert lines["epfl"].split()[-1] == "unknown"  # no origin in its attributes
        assert "training" in proc.stdout
        for name in ("empiar", "idr", "openorganelle"):
            assert lines[name].split()[2] == "no"


def test_list_json_sizes_and_unpulled_from_table(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(repo / EPFL)  # its table rows stay: list still shows its shape, from the table
    code, out, _ = run(repo, "list", "--json", capsys=capsys)
    assert code == EXIT_OK
    entries = {e["dataset"]: e for e in json.loads(out)}
    hemi = entries["hemibrain"]
    assert hemi["pulled"] is True
    assert hemi["size_bytes"] == sum(f.stat().st_size for f in (repo / HEMIBRAIN).rglob("*") if f.is_file())
    assert entries["epfl"]["pulled"] is False and entries["epfl"]["origin"] == "-"
    assert [(i["image"], i["shape"]) for i in entries["epfl"]["images"]] == [("testing", "16x32x32"),
                                                                            ("training", "16x32x32")]
    assert entries["idr"]["images"] == [] and entries["idr"]["size_bytes"] is None


def test_unknown_name_lists_valid_names(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("info", "verify", "pull", "view"):
        code, out, err = run(repo, command, "hemibrian", capsys=capsys)
        assert code == EXIT_USAGE
        assert len(err.strip().splitlines()) == 1
        assert "'hemibrian'" in err and "hemibrain_crop" in err and "jrc_mus-nacc-2" in err


def test_outside_a_repository_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(tmp_path, "list", capsys=capsys)
    assert code == EXIT_USAGE and "no dvc.yaml" in err and "--repo" in err


# --- info ---------------------------------------------------------------------------------------------


def test_info_shows_the_full_record(dvc_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(dvc_repo, "info", "hemibrain_crop", capsys=capsys)
    assert code == EXIT_OK
    assert out.startswith(f"hemibrain: output {HEMIBRAIN}")
    assert "origin replica" in out
    assert "0: 24x40x36 uint8, voxel 8x8x8, translation 800x160x80, chunks 8x16x16, shards 16x32x32" in out
    assert "label segmentation: 2 levels (nearest)" in out
    assert '"seed": 7' in out  # the emdata attributes
    assert f"zarr_sha256: {tree_sha256(dvc_repo / HEMIBRAIN)}" in out  # its table row
    lock_md5 = json.loads(run(dvc_repo, "info", "hemibrain", "--json", capsys=capsys)[1])["dvc_lock"]["md5"]
    assert f"dvc.lock: md5 {lock_md5}" in out and lock_md5.endswith(".dir")


def test_info_json_groups(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(repo, "info", EPFL, "--json", capsys=capsys)  # the output path works as a name too
    assert code == EXIT_OK
    record = json.loads(out)
    assert [i["image"] for i in record["images"]] == ["testing", "training"]
    training = record["images"][1]
    assert training["levels"][1]["shape"] == [8, 16, 16] and training["levels"][1]["scale"] == [10.0, 10.0, 10.0]
    assert training["labels"]["mito"]["ome"]["image-label"]["colors"] == [{"label-value": 1, "rgba": [255, 0, 0, 255]}]
    assert record["dvc_lock"] is None and len(record["table"]) == 2


def test_info_of_unpulled_dataset_says_how_to_pull(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(repo, "info", "idr", capsys=capsys)
    assert code == EXIT_NOT_PULLED
    assert "not pulled" in out
    assert "emdata pull idr" in err and "dvc pull data/idr_9846137.zarr" in err


# --- verify -------------------------------------------------------------------------------------------


def test_dvc_dir_md5_is_dvcs_own(dvc_repo: Path) -> None:
    """Our recomputation of a directory hash equals what DVC wrote to dvc.lock and names its cache manifest."""
    import yaml

    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    oid = lock["stages"]["hemibrain"]["outs"][0]["md5"]
    manifest = dvc_repo / ".dvc/cache/files/md5" / oid[:2] / oid[2:]
    assert dvc_dir_md5(json.loads(manifest.read_bytes())) == oid


def test_verify_ok_then_one_flipped_byte_is_named(dvc_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(dvc_repo, "verify", "hemibrain", capsys=capsys)
    assert code == EXIT_OK, out + err
    assert "dvc.lock" in out and "ok" in out and "decode" in out
    # Files are hard-linked or copied from DVC's cache; rewrite the workspace copy only.
    shard = dvc_repo / HEMIBRAIN / "0/c/0/1/0"
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data)
    flip_byte(shard)
    code, out, err = run(dvc_repo, "verify", "hemibrain", capsys=capsys)
    assert code == EXIT_FAILED
    assert f"{HEMIBRAIN}/0/c/0/1/0: md5 " in out and "DVC recorded" in out
    assert "metadata/datasets.csv" in out and "FAIL" in out
    assert f"{HEMIBRAIN}/0/c/0/1/0" in err and len(err.strip().splitlines()) == 1
    # Only that file: every other file still matches DVC's record.
    assert out.count("DVC recorded") == 1


def test_verify_names_missing_and_extra_files(dvc_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (dvc_repo / EPFL / "training/labels/mito/1/c/0/0/0").unlink()
    (dvc_repo / EPFL / "training/notes.txt").write_text("not part of the output")
    code, out, _ = run(dvc_repo, "verify", "epfl", "--no-decode", capsys=capsys)
    assert code == EXIT_FAILED
    assert f"{EPFL}/training/labels/mito/1/c/0/0/0: missing" in out
    assert f"{EPFL}/training/notes.txt: not in DVC's record" in out


def test_verify_without_dvc_uses_the_table_and_decodes(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(repo, "verify", "epfl", capsys=capsys)
    assert code == EXIT_OK, out
    assert "not recorded" in out  # no dvc.lock here
    # Garbage in a chunk: the table's tree hash differs and the chunk no longer decodes, named by file.
    chunk = repo / EPFL / "testing/0/c/0/1/1"
    chunk.write_bytes(b"\x00" * 40)
    code, out, err = run(repo, "verify", "epfl", capsys=capsys)
    assert code == EXIT_FAILED
    assert "Zarr tree sha256" in out
    assert f"{EPFL}/testing/0/c/0/1/1: does not decode" in out


def test_damaged_metadata_is_reported_not_a_traceback(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / EPFL / "training/zarr.json").write_text("{not json")
    code, out, err = run(repo, "list", capsys=capsys)
    assert code == EXIT_FAILED and "unreadable" in out and "epfl" in err and "emdata verify" in err
    code, _, err = run(repo, "info", "epfl", capsys=capsys)
    assert code == EXIT_FAILED and f"{repo / EPFL} is not a readable OME-Zarr" in err
    code, out, err = run(repo, "verify", "epfl", capsys=capsys)
    assert code == EXIT_FAILED and "zarr.json metadata does not parse" in out and "Zarr tree sha256" in out


def test_verify_with_nothing_recorded_fails(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "metadata/datasets.csv").unlink()
    code, _, err = run(repo, "verify", "hemibrain", "--no-decode", capsys=capsys)
    assert code == EXIT_FAILED and "no recorded hash" in err


def test_verify_unpulled(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(repo, "verify", "openorganelle", capsys=capsys)
    assert code == EXIT_NOT_PULLED and "emdata pull openorganelle" in err


# --- pull ---------------------------------------------------------------------------------------------


def test_pull_without_record_remote_or_dvc(dvc_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(dvc_repo, "pull", "idr", capsys=capsys)
    assert code == EXIT_FAILED and "dvc.lock records no hash for data/idr_9846137.zarr" in err
    code, _, err = run(dvc_repo, "pull", "hemibrain", capsys=capsys)
    assert code == EXIT_FAILED and "no default DVC remote" in err and "dvc remote add -d" in err
    plain = dvc_repo.parent / "plain"  # dvc.yaml and dvc.lock, but no .dvc: not a DVC repository
    plain.mkdir()
    for name in ("dvc.yaml", "dvc.lock"):
        shutil.copy(dvc_repo / name, plain / name)
    code, _, err = run(plain, "pull", "hemibrain", capsys=capsys)
    assert code == EXIT_USAGE and "not a DVC repository" in err


@pytest.mark.slow  # three dvc commands plus a push: ~5 s idle, ~12 s on a loaded 2-core machine
def test_pull_from_a_remote_then_verify(dvc_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dvc(dvc_repo, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(dvc_repo, "push", "-q", HEMIBRAIN)
    before = {p.relative_to(dvc_repo / HEMIBRAIN): p.read_bytes()
              for p in (dvc_repo / HEMIBRAIN).rglob("*") if p.is_file()}
    shutil.rmtree(dvc_repo / HEMIBRAIN)
    shutil.rmtree(dvc_repo / ".dvc/cache")
    code, out, err = run(dvc_repo, "pull", "hemibrain_crop", capsys=capsys)
    assert code == EXIT_OK, err
    after = {p.relative_to(dvc_repo / HEMIBRAIN): p.read_bytes()
             for p in (dvc_repo / HEMIBRAIN).rglob("*") if p.is_file()}
    assert after == before
    code, out, err = run(dvc_repo, "verify", "hemibrain", "--no-decode", capsys=capsys)
    assert code == EXIT_OK, out + err
    # A remote that is gone: dvc pull's failure becomes a one-line error naming the output.
    shutil.rmtree(dvc_repo / HEMIBRAIN)
    shutil.rmtree(dvc_repo / ".dvc/cache")
    shutil.rmtree(tmp_path / "remote")
    code, out, err = run(dvc_repo, "pull", "hemibrain", capsys=capsys)
    assert code == EXIT_FAILED
    assert err.strip().splitlines()[-1].startswith(f"emdata pull: error: dvc pull {HEMIBRAIN} failed")


def test_checksums_list_and_forget(tmp_path):
    from emdata.acquire.download import ChecksumRegistry
    from emdata.cli import main

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("download: {checksums_file: checksums.json}\n")
    registry = ChecksumRegistry(tmp_path / "checksums.json", "live")
    registry.record("https://example.org/a.tif", 10, "ab" * 32, "two downloads agreed")
    assert main(["--repo", str(tmp_path), "checksums", "list"]) == 0
    assert main(["--repo", str(tmp_path), "checksums", "forget", "https://example.org/a.tif"]) == 0
    assert ChecksumRegistry(tmp_path / "checksums.json", "live").get("https://example.org/a.tif") is None
    assert main(["--repo", str(tmp_path), "checksums", "forget", "https://example.org/a.tif"]) == 2
