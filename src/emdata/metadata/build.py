"""The metadata stage: records, statistics, thumbnails, table (CSV, Parquet), summary, DVC metrics and plots."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from emdata.acquire.fsutil import atomic_dir, write_json_atomic
from emdata.acquire.params import dataclass_from_section, load_params
from emdata.catalog import DATASETS
from emdata.acquire.allocator import bound_malloc
from emdata.metadata.records import ArrayRecord, MetadataParams, output_records
from emdata.metadata.stats import Histogram, common_bins, foreground_fraction, intensity_stats, rebin
from emdata.metadata.summary import summary_markdown
from emdata.metadata.thumbnails import Thumbnail, write_thumbnails
from emdata.ngff import multiscales

log = logging.getLogger(__name__)

TABLE = "metadata/datasets.csv"
PARQUET = "metadata/datasets.parquet"
THUMBNAILS = "metadata/thumbnails"
SUMMARY = "METADATA_SUMMARY.md"
METRICS = "metrics/metadata.json"
INTENSITY_METRICS = "metrics/intensity"  # one JSON per image: `dvc metrics show metrics/intensity`
PLOTS = "plots/intensity"  # one CSV per dtype, a `dataset` column: one line per image in `dvc plots show`
PLOT_TEMPLATE = "plots/histogram.json"  # Vega-Lite template colouring each CSV's lines by `dataset`


def file_stem(name: str) -> str:
    """``epfl/training`` -> ``epfl.training``: an image's name as a file name."""
    return name.replace("/", ".")


def _level_array(group: zarr.Group, level: int, what: str) -> tuple[zarr.Array, int]:
    datasets = multiscales(group)["datasets"]
    used = min(level, len(datasets) - 1)
    if used != level:
        log.warning("%s has %d levels: statistics from level %d, not %d", what, len(datasets), used, level)
    array = group[datasets[used]["path"]]
    assert isinstance(array, zarr.Array)
    return array, used


def collect(repo_root: Path, params: MetadataParams, thumbnails_dir: Path | None = None) -> tuple[
        list[ArrayRecord], dict[str, Histogram], dict[str, list[Thumbnail]]]:
    """Records with statistics of every array, the histograms of every image and (if a folder is given) thumbnails."""
    records: list[ArrayRecord] = []
    hists: dict[str, Histogram] = {}
    thumbs: dict[str, list[Thumbnail]] = {}
    for dataset in params.datasets:
        path = repo_root / DATASETS[dataset].output
        base = output_records(dataset, path, repo_root)
        root = zarr.open_group(str(path), mode="r")
        for rec in base:
            began = time.monotonic()
            group = root[rec.array.rsplit("/", 1)[0]] if "/" in rec.array else root
            assert isinstance(group, zarr.Group)
            array, used = _level_array(group, params.level, f"{path}/{rec.array}")
            if rec.kind == "image":
                stats, hist = intensity_stats(array, used, params.background_max_value.get(dataset))
                rec = replace(rec, stats=stats)
                hists[rec.name] = hist
                if thumbnails_dir is not None:
                    labels = []
                    for other in base:
                        if other.kind == "label" and other.image == rec.image:
                            lgroup = root[other.array.rsplit("/", 1)[0]]
                            assert isinstance(lgroup, zarr.Group)
                            labels.append((lgroup, other.label_colors))
                    # Contrast from the tissue's percentiles: padding outside it would wash the picture out.
                    window = (stats.p0_5, stats.p99_5)
                    if stats.p0_5_foreground is not None and stats.p99_5_foreground is not None:
                        window = (stats.p0_5_foreground, stats.p99_5_foreground)
                    thumbs[rec.name] = write_thumbnails(group, labels, window, params.thumbnail_px, thumbnails_dir,
                                                        file_stem(rec.name))
            else:
                rec = replace(rec, foreground_fraction=foreground_fraction(array))
            log.info("metadata: %s %s done in %.1f s", dataset, rec.array, time.monotonic() - began)
            records.append(rec)
    return records, hists, thumbs


def table(records: Sequence[ArrayRecord]) -> pd.DataFrame:
    return pd.DataFrame([r.row() for r in records])


def histogram_frames(records: Sequence[ArrayRecord], hists: Mapping[str, Histogram],
                     bins: int) -> dict[str, pd.DataFrame]:
    """Long-format histograms, one frame per dtype (no raw x axis shared by int16 and uint8): dataset, intensity,
    fraction (of the image's voxels in the bin starting at ``intensity``)."""
    by_dtype: dict[str, list[ArrayRecord]] = {}
    for r in records:
        if r.name in hists and r.kind == "image":
            by_dtype.setdefault(r.dtype, []).append(r)
    frames = {}
    for dtype, recs in by_dtype.items():
        start, width, n = common_bins([hists[r.name] for r in recs], bins, np.dtype(dtype))
        edges = start + width * np.arange(n)
        rows = []
        for r in recs:
            fractions = rebin(hists[r.name], start, width, n)
            rows.append(pd.DataFrame({"dataset": r.name, "intensity": np.round(edges, 6),
                                      "fraction": np.round(fractions, 8)}))
        frames[dtype] = pd.concat(rows, ignore_index=True)
    return frames


def build_metadata(repo_root: Path, params: MetadataParams, mirror: str = "") -> dict[str, Any]:
    """Write every output of the stage under ``repo_root``; return the figures of ``metrics/metadata.json``."""
    repo_root = Path(repo_root)
    with atomic_dir(repo_root / THUMBNAILS) as thumbs_dir:
        records, hists, thumbs = collect(repo_root, params, thumbs_dir)
        # Paths as they will be once the folder is in place.
        thumbs = {k: [replace(t, path=repo_root / THUMBNAILS / t.path.name) for t in v] for k, v in thumbs.items()}
    frame = table(records)
    (repo_root / TABLE).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(repo_root / TABLE, index=False)
    frame.to_parquet(repo_root / PARQUET, index=False, engine="pyarrow")
    with atomic_dir(repo_root / PLOTS) as plots_dir:
        for dtype, hist_frame in histogram_frames(records, hists, params.histogram_bins).items():
            hist_frame.to_csv(plots_dir / f"{dtype}.csv", index=False)
    with atomic_dir(repo_root / INTENSITY_METRICS) as metrics_dir:
        for r in records:
            if r.stats is not None:
                write_json_atomic(metrics_dir / f"{file_stem(r.name)}.json", {"dtype": r.dtype, **r.stats.metrics()})
    (repo_root / SUMMARY).write_text(summary_markdown(records, thumbs, repo_root, mirror, TABLE, INTENSITY_METRICS,
                                                      PLOTS))
    metrics = {
        "n_datasets": len({r.dataset for r in records}),
        "n_arrays": len(records),
        "uncompressed_GB": round(sum(r.uncompressed_bytes for r in records) / 1e9, 3),
        "stored_GB": round(sum(r.stored_bytes for r in records) / 1e9, 3),
        "compression_ratio": {f"{r.dataset}/{r.array}": r.compression_ratio for r in records},
    }
    write_json_atomic(repo_root / METRICS, metrics)
    return metrics


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    bound_malloc()  # freed buffers go back to the system (bench/bench_memory.py)
    root = Path.cwd()
    params = load_params(root / "params.yaml")
    section = dataclass_from_section(MetadataParams, params.get("metadata"), "metadata")
    mirror = params.get("mirror") or ""
    if isinstance(mirror, Mapping):  # {url: ..., serves: ...}
        mirror = mirror.get("url") or ""
    metrics = build_metadata(root, section, str(mirror))
    log.info("metadata: %d arrays of %d datasets, %s GB stored", metrics["n_arrays"], metrics["n_datasets"],
             metrics["stored_GB"])
