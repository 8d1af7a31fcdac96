"""The consolidated metadata table, METADATA_SUMMARY.md, metrics and histogram plots, built from real outputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import zarr

from emdata.errors import InvalidParameterError, SourceMismatchError
from emdata.metadata import MetadataParams, build_metadata, tree_sha256
from emdata.stage import run_stage


@pytest.fixture()
def epfl_workspace(epfl_replica, tmp_path):
    (tmp_path / "params.yaml").write_text(f'mirror: "{epfl_replica.base_url}"\nepfl: {{}}\n')
    run_stage("epfl", repo_root=tmp_path)
    return tmp_path


def test_table_summary_metrics_and_plots(epfl_workspace):
    ws = epfl_workspace
    metrics = build_metadata(ws, MetadataParams(datasets=["epfl"]), mirror="http://127.0.0.1:1")
    table = pd.read_csv(ws / "metadata" / "datasets.csv")
    assert sorted(table["array"]) == ["testing/0", "testing/labels/mito/0", "training/0", "training/labels/mito/0"]
    assert set(table["kind"]) == {"image", "label:mito"}
    assert set(table["shape"]) == {"20x96x128"} and set(table["dtype"]) == {"uint8"}
    assert set(table["unit"]) == {"nanometer"}
    assert (table[["voxel_size_z", "voxel_size_y", "voxel_size_x"]] == 5.0).all().all()
    prov = zarr.open_group(str(ws / "data" / "epfl.zarr"), mode="r").attrs["emdata"]
    for f in prov["files"]:
        assert f"{f['name']}:{f['sha256']}" in table["raw_sha256"].iloc[0]
    assert set(table["zarr_sha256"]) == {tree_sha256(ws / "data" / "epfl.zarr")}
    assert (table["uncompressed_bytes"] == 20 * 96 * 128).all()
    summary = (ws / "METADATA_SUMMARY.md").read_text()
    assert "offline replica" in summary and "| epfl | `training/0` | image | 20, 96, 128 | uint8 |" in summary
    assert json.loads((ws / "metrics" / "metadata.json").read_text()) == metrics
    assert metrics["n_datasets"] == 1 and metrics["n_arrays"] == 4
    hist = pd.read_csv(ws / "plots" / "intensity_histograms.csv")
    assert set(hist["image"]) == {"epfl/training", "epfl/testing"}
    assert hist.groupby("image")["fraction"].sum().round(3).eq(1.0).all()


def test_missing_output_names_the_stage_to_run(tmp_path):
    with pytest.raises(SourceMismatchError, match="dvc repro epfl"):
        build_metadata(tmp_path, MetadataParams(datasets=["epfl"]), mirror="")


@pytest.mark.parametrize("bad", [{"datasets": ["epfl", "emdb"]}, {"datasets": []}, {"histogram_level": -1},
                                 {"histogram_bins": 1}])
def test_bad_params_name_the_value(bad):
    with pytest.raises(InvalidParameterError, match=next(iter(bad))):
        MetadataParams(**bad)
