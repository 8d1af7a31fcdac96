"""The offline demo end to end (small replica): dvc repro, push to a loopback S3, pull back, metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_repro_push_pull_restores_every_output(tmp_path):
    ws = tmp_path / "demo"
    before = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    proc = subprocess.run(
        [sys.executable, "-m", "emdata.offline.demo", "--profile", "small", "--stage", "metadata", "--workspace", str(ws),
         "--set", "hemibrain.crop_size=[96, 128, 112]"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "EMDATA_REPLICA_CACHE": str(tmp_path / "replica-cache")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((ws / "demo_summary.json").read_text())
    stages = ("epfl", "hemibrain", "empiar", "idr", "openorganelle", "metadata")
    images = summary["outputs"]["data/epfl.zarr"]
    assert set(images) == {"training", "testing"}
    for image in images.values():
        assert image["shape"] == [20, 96, 128]  # the small replica's shape
        assert image["voxel_size_nm"] == [5.0, 5.0, 5.0] and image["labels"] == ["mito"]
    crop = summary["outputs"]["data/hemibrain_crop.zarr"]["."]
    assert crop["shape"] == [96, 128, 112] and crop["voxel_size_nm"] == [8.0, 8.0, 8.0]
    assert crop["labels"] == ["segmentation"] and crop["translation_nm"] != [0.0, 0.0, 0.0]
    metrics = json.loads((ws / "metrics" / "hemibrain.json").read_text())
    assert [o * 8.0 for o in metrics["crop_origin_voxels"]] == crop["translation_nm"]
    assert "| hemibrain | `0` | image | 96, 128, 112 | uint8 |" in (ws / "METADATA_SUMMARY.md").read_text()
    assert summary["outputs"]["data/idr_9846137.zarr"]["."]["voxel_size_nm"] == [20.0, 20.0, 20.0]
    assert summary["outputs"]["data/empiar_11759.zarr"]["."]["voxel_size_nm"] == [50.0, 7.99825, 7.99825]
    assert summary["outputs"]["data/jrc_mus-nacc-2.zarr"]["."]["dtype"] == "int16"
    assert summary["outputs"]["data/jrc_mus-nacc-2.zarr"]["."]["labels"] == ["nuc"]
    assert set(summary["step_seconds"]) == {"dvc repro", "dvc push", "dvc pull", "dvc metrics show",
                                            "dvc push to the local remote"}
    assert all(f"metrics/{m}.json" in proc.stdout for m in stages)  # dvc metrics show printed them
    lock = (ws / "dvc.lock").read_text()
    assert all(f"{stage}:" in lock for stage in stages) and "md5" in lock
    # The demo never touches the user's working tree, and every server it started is gone.
    after = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    assert after == before
    assert "emdata-local" not in proc.stdout + proc.stderr  # no credentials in the output
    urls = re.search(r"replica at (http://\S+); S3 endpoint at (http://\S+) ", proc.stdout)
    assert urls is not None
    for url in urls.groups():
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=2)

    # Every output passes the strict OME-NGFF 0.5 models (ome-zarr-models): images, their labels, EPFL's collection.
    import warnings

    import zarr
    from ome_zarr_models.v05 import BioFormats2Raw, Image

    from emdata.ngff import find_images

    for out in summary["outputs"]:
        root = zarr.open_group(str(ws / out), mode="r")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # ome-zarr-models warns about what it has to repair: nothing here
            warnings.filterwarnings("ignore", message=".*METADATA.ome.xml.*")  # zarr on the collection's OME-XML
            if "bioformats2raw.layout" in root.attrs.asdict().get("ome", {}):
                BioFormats2Raw.from_zarr(root)
            for _, group in find_images(root):
                image = Image.from_zarr(group)
                assert image.attributes.ome.multiscales[0].datasets
    # After the demo has exited, its workspace is up to date, and still pulls (from its local folder remote).
    dvc = [sys.executable, "-m", "dvc"]
    status = subprocess.run([*dvc, "status", "--json"], cwd=ws, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout
    crop = ws / "data" / "hemibrain_crop.zarr"
    before_files = sorted(p.relative_to(crop) for p in crop.rglob("*") if p.is_file())
    subprocess.run(["rm", "-rf", str(crop), str(ws / ".dvc" / "cache")], check=True)
    pull = subprocess.run([*dvc, "pull", "data/hemibrain_crop.zarr"], cwd=ws, capture_output=True, text=True,
                          timeout=300)
    assert pull.returncode == 0, pull.stderr[-2000:]
    assert sorted(p.relative_to(crop) for p in crop.rglob("*") if p.is_file()) == before_files
    # Editing a shared module marks every stage that imports it as changed (deps by package folder).
    with (ws / "src" / "emdata" / "acquire" / "fsutil.py").open("a") as f:
        f.write("\n# an edit\n")
    status = subprocess.run([*dvc, "status", "--json"], cwd=ws, capture_output=True, text=True, timeout=300)
    changed = set(json.loads(status.stdout))
    assert changed == set(stages), changed
