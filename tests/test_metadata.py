"""The metadata stage on real and hand-built OME-Zarr outputs: records, statistics, thumbnails, table, DVC files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from PIL import Image

from emdata import ngff
from emdata.catalog import DATASETS
from emdata.errors import InvalidParameterError, SourceMismatchError
from emdata.metadata import (
    INTENSITY_METRICS, PARQUET, PLOTS, SUMMARY, TABLE, THUMBNAILS, MetadataParams, build_metadata, intensity_stats,
    tree_sha256, write_thumbnails,
)
from emdata.metadata.stats import APPROX_BINS
from emdata.metadata.thumbnails import FOOTER_PX, MIN_WIDTH_PX
from emdata.stage import run_stage

REPO = Path(__file__).resolve().parents[1]


def make_output(root: Path, dataset: str, data: np.ndarray, voxel: tuple[float, float, float],
                emdata_attrs: dict[str, Any] | None = None, labels: dict[str, np.ndarray] | None = None,
                colors: dict[int, list[int]] | None = None, n_levels: int = 3) -> Path:
    """A small OME-Zarr output of ``dataset`` at its catalog path, written with emdata.ngff like the stages."""
    path = root / DATASETS[dataset].output
    geometry = ngff.Geometry(voxel)
    group, arrays = ngff.create_image_group(path, name=dataset, shape=data.shape, dtype=data.dtype,
                                            geometry=geometry, chunks=(8, 16, 16), shards=(16, 32, 32),
                                            n_levels=n_levels)
    ngff.write_block_aligned(arrays[0], data)
    ngff.write_pyramid(arrays, "mean")
    for name, values in (labels or {}).items():
        larrays = ngff.create_label(group, name, colors=colors, shape=values.shape, dtype=values.dtype,
                                    geometry=geometry, chunks=(8, 16, 16), shards=(16, 32, 32), n_levels=n_levels)
        ngff.write_block_aligned(larrays[0], values)
        ngff.write_pyramid(larrays, "nearest")
    group.attrs["emdata"] = emdata_attrs or {}
    return path


def em_like(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(0.3, 1.7, shape).astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -3000), min(info.max, 3000)
    data = rng.normal((lo + hi) / 2, (hi - lo) / 6, shape)
    data[:, :3] = 0  # a band of background
    return np.clip(np.rint(data), info.min, info.max).astype(dtype)


@pytest.fixture()
def epfl_workspace(replica, tmp_path):
    (tmp_path / "params.yaml").write_text(f'mirror: {{url: "{replica.base_url}", serves: replica}}\nepfl: {{}}\n')
    run_stage("epfl", repo_root=tmp_path)
    return tmp_path


def read_table(ws: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    csv = pd.read_csv(ws / TABLE)
    parquet = pd.read_parquet(ws / PARQUET)
    return csv, parquet


def assert_parquet_equals_csv(ws: Path) -> pd.DataFrame:
    csv, parquet = read_table(ws)
    assert list(csv.columns) == list(parquet.columns) and len(csv) == len(parquet)
    # CSV loses only the difference between an empty string and a missing value, and numeric-looking text.
    expected = parquet.replace("", np.nan)
    for column in csv.columns:
        left, right = csv[column], expected[column]
        if pd.api.types.is_numeric_dtype(right) and not pd.api.types.is_bool_dtype(right):
            np.testing.assert_allclose(left.astype(float), right.astype(float), rtol=1e-12, err_msg=column)
        else:
            assert [None if pd.isna(v) else str(v) for v in left] == \
                   [None if pd.isna(v) else str(v) for v in right], column
    return parquet


def test_epfl_output_table_summary_metrics_plots_thumbnails(epfl_workspace):
    ws = epfl_workspace
    metrics = build_metadata(ws, MetadataParams(datasets=["epfl"]), mirror="http://127.0.0.1:1")
    table = assert_parquet_equals_csv(ws)
    assert sorted(table["array"]) == ["testing/0", "testing/labels/mito/0", "training/0", "training/labels/mito/0"]
    assert sorted(set(zip(table["kind"], table["label"]))) == [("image", ""), ("label", "mito")]
    assert set(table["shape"]) == {"20x96x128"} and set(table["dtype"]) == {"uint8"}
    assert (table[["voxel_size_z", "voxel_size_y", "voxel_size_x"]] == 5.0).all().all()
    output = ws / "data" / "epfl.zarr"
    root = zarr.open_group(str(output), mode="r")
    prov = root.attrs["emdata"]
    for f in prov["files"]:
        assert f"{f['name']}:{f['sha256']}" in table["raw_sha256"].iloc[0]
    assert set(table["zarr_sha256"]) == {tree_sha256(output)}
    classes = set(table.loc[table.kind == "label", "label_classes"])
    assert len(classes) == 1 and "1: mitochondrion" in classes.pop()
    assert set(table["licence"]) == {prov["licence"]}

    # Statistics of every voxel, against numpy on the same level-0 data.
    for split in ("training", "testing"):
        data = np.asarray(root[f"{split}/0"][...])
        stats = json.loads((ws / INTENSITY_METRICS / f"epfl.{split}.json").read_text())
        assert stats["voxels"] == data.size and stats["level"] == 0 and stats["method"] == "exact"
        assert stats["min"] == data.min() and stats["max"] == data.max()
        assert stats["mean"] == pytest.approx(data.mean(), abs=1e-4)
        assert stats["std"] == pytest.approx(data.std(), abs=1e-4)
        assert [stats["p0_5"], stats["p99_5"]] == pytest.approx(np.percentile(data, [0.5, 99.5]), abs=1e-9)
        assert stats["background_fraction"] == pytest.approx((data == 0).mean(), abs=1e-6)
        assert [stats["p0_5_foreground"], stats["p99_5_foreground"]] == pytest.approx(
            np.percentile(data[data != 0], [0.5, 99.5]), abs=1e-9)
        row = table[table.array == f"{split}/0"].iloc[0]
        assert row["mean"] == pytest.approx(data.mean()) and row["p99_5"] == stats["p99_5"]
        mito = np.asarray(root[f"{split}/labels/mito/0"][...])
        lrow = table[table.array == f"{split}/labels/mito/0"].iloc[0]
        assert lrow["foreground_fraction"] == pytest.approx((mito != 0).mean())

    # One histogram file per dtype, one series per image, each summing to 1 on the full uint8 range.
    assert sorted(p.name for p in (ws / PLOTS).iterdir()) == ["uint8.csv"]
    hist = pd.read_csv(ws / PLOTS / "uint8.csv")
    assert list(hist.columns) == ["dataset", "intensity", "fraction"]
    assert set(hist["dataset"]) == {"epfl/training", "epfl/testing"}
    assert hist.groupby("dataset")["fraction"].sum().round(6).eq(1.0).all()
    assert hist["intensity"].min() == 0 and hist["intensity"].max() == 252  # 64 bins of 4 grey values
    training = np.asarray(root["training/0"][...])
    first = hist[hist.dataset == "epfl/training"].set_index("intensity")["fraction"]
    assert first[100] == pytest.approx(((training >= 100) & (training < 104)).mean(), abs=1e-8)

    # Thumbnails: three planes per image, embedded in the summary.
    summary = (ws / SUMMARY).read_text()
    for split in ("training", "testing"):
        for plane in ("xy", "xz", "yz"):
            png = ws / THUMBNAILS / f"epfl.{split}.{plane}.png"
            assert png.is_file(), png
            assert f"]({THUMBNAILS}/epfl.{split}.{plane}.png)" in summary
            assert f"]({THUMBNAILS}/epfl.{split}.{plane}.labels.png)" in summary
    with Image.open(ws / THUMBNAILS / "epfl.training.xy.png") as im:
        assert im.size == (512, 384 + FOOTER_PX)  # 96 x 128 voxels of 5 nm, longest side 512
    assert "| epfl | `training/0` | image | 20, 96, 128 | uint8 |" in summary
    assert "1: mitochondrion" in summary.split("### epfl/training")[1].split("###")[0]  # under its thumbnails
    assert json.loads((ws / "metrics" / "metadata.json").read_text()) == metrics
    assert metrics["n_datasets"] == 1 and metrics["n_arrays"] == 4


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.float32])
def test_statistics_match_numpy_over_many_blocks(tmp_path, dtype):
    data = em_like((20, 40, 56), dtype, seed=3)
    path = make_output(tmp_path, "idr", data, (20.0, 20.0, 20.0))
    array = zarr.open_group(str(path), mode="r")["0"]
    stats, hist = intensity_stats(array, 0, max_bytes=4096)  # forces several hundred blocks
    assert stats.voxels == data.size and hist.total == data.size
    assert (stats.min, stats.max) == (float(data.min()), float(data.max()))
    assert stats.mean == pytest.approx(float(data.astype(np.float64).mean()), rel=1e-9, abs=1e-9)
    assert stats.std == pytest.approx(float(data.astype(np.float64).std()), rel=1e-9)
    expected = np.percentile(data, [0.5, 99.5])
    bin_width = (stats.max - stats.min) / APPROX_BINS
    if np.dtype(dtype).kind == "f":
        assert stats.method == "binned"
        assert [stats.p0_5, stats.p99_5] == pytest.approx(expected, abs=bin_width)
    else:
        assert stats.method == "exact"
        assert [stats.p0_5, stats.p99_5] == pytest.approx(expected, abs=1e-9)
    assert stats.background_fraction == pytest.approx((data == 0).mean())
    tissue = np.percentile(data[data != 0], [0.5, 99.5])
    assert [stats.p0_5_foreground, stats.p99_5_foreground] == pytest.approx(
        tissue, abs=bin_width if stats.method == "binned" else 1e-9)
    stats10, _ = intensity_stats(array, 0, background_max=10)
    assert stats10.background_fraction == pytest.approx((data <= 10).mean()) and stats10.background == "<= 10"


def test_planted_discrepancy_and_provenance_reach_table_and_summary(tmp_path):
    planted = "API says 776 rows, the TIFF has 775: the file wins"
    make_output(tmp_path, "idr", em_like((8, 32, 48), np.uint8), (20.0, 20.0, 20.0), {
        "title": "IDR image", "page": "https://idr.example/9846137", "doi": ["10.17867/10000148"],
        "citation": "Miron et al. 2020, Science Advances", "licence": "CC BY 4.0", "origin": "replica",
        "files": [{"name": "a.tif", "sha256": "ab" * 32}], "discrepancies": [planted]})
    # An output still written with the old key names, and a list of mappings (EMPIAR's form).
    make_output(tmp_path, "empiar", em_like((4, 32, 40), np.uint8, 1), (50.0, 8.0, 8.0), {
        "title": "EMPIAR-11759", "doi": "10.6019/EMPIAR-11759", "licence": "CC0",
        "known_disagreements": [{"field": "image_width", "api": 5496, "files": 5500}]})
    (tmp_path / "metrics").mkdir()
    run = {"acquired_utc": "2026-11-25T21:00:00Z", "emdata_version": "0.1.0", "commit": "0123456789abcdef"}
    (tmp_path / DATASETS["idr"].metrics).write_text(json.dumps({"seconds": 1.0, "run": run}))
    (tmp_path / DATASETS["empiar"].metrics).write_text(json.dumps({"run": {"origin": "cache"}}))

    build_metadata(tmp_path, MetadataParams(datasets=["idr", "empiar"]), mirror="")
    table = assert_parquet_equals_csv(tmp_path).set_index("dataset")
    assert table.loc["idr", "discrepancies"] == planted
    assert table.loc["empiar", "discrepancies"] == 'field: image_width; api: 5496; files: 5500'
    assert table.loc["idr", "doi"] == "10.17867/10000148" and table.loc["empiar", "doi"] == "10.6019/EMPIAR-11759"
    assert table.loc["idr", "citation"] == "Miron et al. 2020, Science Advances"
    assert table.loc["idr", "origin"] == "replica"
    assert table.loc["empiar", "origin"] == "cache"  # from its metrics' run facts, the attributes lacking it
    assert (table.loc["idr", "acquired_utc"], table.loc["idr", "commit"]) == (run["acquired_utc"], run["commit"])
    assert table.loc["empiar", "acquired_utc"] == ""  # not recorded: empty, never invented
    summary = (tmp_path / SUMMARY).read_text()
    assert f"  - {planted}" in summary and "  - field: image_width; api: 5496; files: 5500" in summary
    assert "- DOI: 10.17867/10000148" in summary and "- Citation: Miron et al. 2020, Science Advances" in summary
    assert f"acquired {run['acquired_utc']} with emdata 0.1.0 at commit {run['commit']}" in summary
    assert "- Citation: not recorded" in summary  # EMPIAR's attributes have none


def test_thumbnails_physical_aspect_levels_and_label_overlay(tmp_path):
    # EMPIAR-like anisotropy: 50 nm sections, 8 nm pixels.
    data = em_like((16, 96, 160), np.uint8, 2)
    mito = np.zeros(data.shape, np.uint8)
    mito[:, 40:60, 60:100] = 1
    make_output(tmp_path, "empiar", data, (50.0, 8.0, 8.0), {"labels": {"mito": {"values": {"1": "mitochondrion"}}}},
                labels={"mito": mito}, colors={1: [255, 0, 0, 255]})
    build_metadata(tmp_path, MetadataParams(datasets=["empiar"], thumbnail_px=160), mirror="")
    extents = {"xy": (96 * 8, 160 * 8), "xz": (16 * 50, 160 * 8), "yz": (16 * 50, 96 * 8)}
    for plane, (h_nm, w_nm) in extents.items():
        with Image.open(tmp_path / THUMBNAILS / f"empiar.{plane}.png") as im:
            plain = np.asarray(im)
            assert im.mode == "L"  # EM alone: greyscale
        with Image.open(tmp_path / THUMBNAILS / f"empiar.{plane}.labels.png") as im:
            rgb = np.asarray(im.convert("RGB"))
        assert plain.shape == rgb.shape[:2]
        scale = 160 / max(h_nm, w_nm)
        h, w = round(h_nm * scale), round(w_nm * scale)
        assert rgb.shape[:2] == (h + FOOTER_PX, max(w, MIN_WIDTH_PX)), plane
        assert abs(h / w - h_nm / w_nm) < 2 / min(h, w)  # physical aspect, to the pixel
        picture = rgb[:h, :w].astype(int)
        red = (picture[..., 0] - picture[..., 1] > 80) & (picture[..., 0] - picture[..., 2] > 80)
        # The label box, where the plane cuts it, is tinted red; nothing outside it is.
        assert red.any(), plane
        ys, xs = np.nonzero(red)
        if plane == "xy":
            assert 40 * 8 * scale - 2 <= ys.min() and ys.max() <= 60 * 8 * scale + 2
            assert 60 * 8 * scale - 2 <= xs.min() and xs.max() <= 100 * 8 * scale + 2
    with Image.open(tmp_path / THUMBNAILS / "empiar.xy.png") as im:
        footer = np.asarray(im.convert("L"))[-FOOTER_PX:]
    assert (footer > 200).sum() > 20  # the scale bar and its text
    table = pd.read_csv(tmp_path / TABLE)
    assert table.loc[table.kind == "label", "label_classes"].tolist() == ["1: mitochondrion"]


def test_ngff_properties_name_the_classes_before_the_source_attributes(tmp_path):
    seg = np.zeros((8, 32, 32), np.uint16)
    seg[2:6, 8:20, 8:20] = 7
    path = make_output(tmp_path, "idr", em_like(seg.shape, np.uint8), (20.0, 20.0, 20.0),
                       {"labels": {"cells": {"values": {"7": "old name"}}}}, labels={"cells": seg})
    group = zarr.open_group(str(path / "labels" / "cells"), mode="r+")
    ome = dict(group.attrs["ome"])
    ome["image-label"] = {**ome["image-label"], "properties": [{"label-value": 7, "class": "nucleus"}]}
    group.attrs["ome"] = ome
    build_metadata(tmp_path, MetadataParams(datasets=["idr"]), mirror="")
    table = pd.read_csv(tmp_path / TABLE)
    assert table.loc[table.kind == "label", "label_classes"].tolist() == ["7: nucleus"]
    assert "7: nucleus" in (tmp_path / SUMMARY).read_text()


def dvc(ws: Path, *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_dvc_metrics_and_plots_show_one_row_and_one_line_per_image(tmp_path):
    """The repository's own dvc.yaml and template: what `dvc metrics show` and `dvc plots show` give users."""
    make_output(tmp_path, "idr", em_like((8, 32, 48), np.uint8), (20.0, 20.0, 20.0))
    make_output(tmp_path, "empiar", em_like((4, 32, 40), np.uint8, 1), (50.0, 8.0, 8.0))
    make_output(tmp_path, "openorganelle", em_like((8, 24, 24), np.int16, 2), (2.96, 4.0, 4.0))
    build_metadata(tmp_path, MetadataParams(datasets=["idr", "empiar", "openorganelle"]), mirror="")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "plots" / "histogram.json", tmp_path / "plots" / "histogram.json")
    assert "metadata" in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)

    shown = dvc(tmp_path, "metrics", "show", "--json", INTENSITY_METRICS)
    files = next(iter(shown.values()))["data"]
    rows = {Path(k).name: v["data"] for k, v in files.items()}
    assert sorted(rows) == ["empiar.json", "idr.json", "openorganelle.json"]
    for name, row in rows.items():
        assert {"min", "max", "mean", "std", "p0_5", "p99_5", "background_fraction"} <= set(row), name

    plots = dvc(tmp_path, "plots", "show", "--json", PLOTS)
    assert not plots.get("errors"), plots["errors"]
    series = {}
    for plot_id, renders in plots["data"].items():
        for render in renders:
            spec = render["content"]
            assert spec["encoding"]["color"]["field"] == "dataset"
            series[Path(plot_id).name] = {d["dataset"] for d in spec["data"]["values"]}
    assert series == {"uint8.csv": {"idr", "empiar"}, "int16.csv": {"openorganelle"}}
    (tmp_path / "dvc_plots").mkdir(exist_ok=True)
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=REPO)
    assert ignored.returncode == 0, "dvc_plots/ must be ignored by .gitignore"


def test_missing_output_names_the_stage_to_run(tmp_path):
    with pytest.raises(SourceMismatchError, match="dvc repro epfl"):
        build_metadata(tmp_path, MetadataParams(datasets=["epfl"]), mirror="")


@pytest.mark.parametrize("bad", [{"datasets": ["epfl", "emdb"]}, {"datasets": []}, {"level": -1}, {"level": True},
                                 {"histogram_bins": 1}, {"thumbnail_px": 8},
                                 {"background_max_value": {"hemibrain": "ten"}},
                                 {"background_max_value": {"emdb": 10}}])
def test_bad_params_name_the_value(bad):
    with pytest.raises(InvalidParameterError, match=next(iter(bad))):
        MetadataParams(**bad)


def test_params_yaml_section_is_valid():
    from emdata.acquire.params import dataclass_from_section

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    section = dataclass_from_section(MetadataParams, params["metadata"], "metadata")
    assert section.level == 0 and set(section.datasets) == set(DATASETS)


def test_blank_mid_section_is_replaced_by_the_nearest_slice_with_contrast(tmp_path):
    data = em_like((16, 48, 64), np.uint8, 4)
    data[7:10] = 50  # missing sections around the centre (index 8 of 16 at level 0)
    path = make_output(tmp_path, "idr", data, (20.0, 20.0, 20.0), n_levels=1)
    thumbs = {t.plane: t for t in write_thumbnails(zarr.open_group(str(path), mode="r"), [], (0.0, 255.0), 64,
                                                   tmp_path, "idr")}
    assert thumbs["xy"].index in (6, 10) and thumbs["xy"].level == 0
    assert thumbs["xz"].index == 24 and thumbs["yz"].index == 32  # their mid-slices have contrast
    with Image.open(thumbs["xy"].path) as im:
        assert np.asarray(im.convert("L"))[: thumbs["xy"].image_px[0]].std() > 20


def test_statistics_are_the_same_read_with_zarr_from_memory_and_tensorstore_from_disk(tmp_path):
    data = em_like((12, 40, 48), np.int16, 5)
    disk = zarr.open_group(str(make_output(tmp_path, "idr", data, (20.0, 20.0, 20.0))), mode="r")["0"]
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=data.shape, chunks=(8, 16, 16), dtype=data.dtype)
    memory[...] = data
    assert intensity_stats(disk, 0, max_bytes=8192)[0] == intensity_stats(memory, 0, max_bytes=8192)[0]


def test_level_param_picks_the_pyramid_level_and_a_missing_one_is_clamped_and_recorded(tmp_path):
    data = em_like((16, 32, 48), np.uint8, 6)
    path = make_output(tmp_path, "idr", data, (20.0, 20.0, 20.0), n_levels=2)
    level1 = np.asarray(zarr.open_group(str(path), mode="r")["1"][...])
    build_metadata(tmp_path, MetadataParams(datasets=["idr"], level=1), mirror="")
    stats = json.loads((tmp_path / INTENSITY_METRICS / "idr.json").read_text())
    assert stats["level"] == 1 and stats["voxels"] == level1.size
    assert stats["mean"] == pytest.approx(level1.mean(), abs=1e-4)
    build_metadata(tmp_path, MetadataParams(datasets=["idr"], level=5), mirror="")
    stats = json.loads((tmp_path / INTENSITY_METRICS / "idr.json").read_text())
    assert stats["level"] == 1  # the coarsest there is, and the file says so
    assert pd.read_csv(tmp_path / TABLE)["stats_level"].tolist() == [1]
