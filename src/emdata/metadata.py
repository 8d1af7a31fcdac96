"""The consolidated metadata table of every dataset output, METADATA_SUMMARY.md, and figures for DVC.

One row per array at full resolution (each image and each of its labels): geometry with units, shape,
dtype, storage, source, licence, checksums (of the raw source files and of the stored Zarr tree) and the
provenance recorded by the source's stage in the group's ``emdata`` attributes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from emdata.errors import InvalidParameterError, SourceMismatchError
from emdata.acquire.fsutil import write_json_atomic
from emdata.ngff import find_images, label_names, multiscales
from emdata.acquire.params import dataclass_from_section, load_params
from emdata.catalog import DATASETS
from emdata.sources import get_source

log = logging.getLogger(__name__)

TABLE = "metadata/datasets.csv"
SUMMARY = "METADATA_SUMMARY.md"
METRICS = "metrics/metadata.json"
HISTOGRAMS = "plots/intensity_histograms.csv"
# Whole source documents (precomputed ``info``) and per-file lists have their own columns or stay in the Zarr.
BULKY_KEYS = frozenset({"files", "info"})
# Provenance keys worth a line in the summary when a stage recorded them (e.g. where a random crop came from).
PROVENANCE_NOTES = ("seed", "crop_origin_voxels", "crop_origin_nm", "crop_size_voxels", "voxel_size_note")


@dataclass(frozen=True)
class MetadataParams:
    datasets: Sequence[str] = tuple(DATASETS)
    histogram_level: int = 1  # pyramid level the intensity histograms are computed from
    histogram_bins: int = 64

    def __post_init__(self) -> None:
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or not self.datasets:
            raise InvalidParameterError(f"metadata.datasets must name datasets from {sorted(DATASETS)}, "
                                        f"got {list(self.datasets)!r}")
        if isinstance(self.histogram_level, bool) or not isinstance(self.histogram_level, int) \
                or self.histogram_level < 0:
            raise InvalidParameterError(f"metadata.histogram_level must be an integer >= 0, got "
                                        f"{self.histogram_level!r}")
        if isinstance(self.histogram_bins, bool) or not isinstance(self.histogram_bins, int) \
                or not 2 <= self.histogram_bins <= 256:
            raise InvalidParameterError(f"metadata.histogram_bins must be an integer in 2..256, got "
                                        f"{self.histogram_bins!r}")


def _without(value: Any, keys: frozenset[str]) -> Any:
    """``value`` with every mapping's ``keys`` dropped, at any depth."""
    if isinstance(value, Mapping):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def tree_sha256(path: Path) -> str:
    """sha256 over the sorted relative paths and bytes of every file under ``path``."""
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _array_rows(dataset: str, image: str, kind: str, group: zarr.Group, base: Path) -> dict[str, Any]:
    ms = multiscales(group)
    level0 = group[ms["datasets"][0]["path"]]
    assert isinstance(level0, zarr.Array)
    transforms = {t["type"]: t for t in ms["datasets"][0]["coordinateTransformations"]}
    scale = transforms["scale"]["scale"]
    translation = transforms.get("translation", {"translation": [0.0] * len(scale)})["translation"]
    axes = [a["name"] for a in ms["axes"]]
    units = {a.get("unit") for a in ms["axes"]}
    folder = base / group.path / ms["datasets"][0]["path"]
    stored = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    uncompressed = int(np.prod(level0.shape)) * level0.dtype.itemsize
    row: dict[str, Any] = {
        "dataset": dataset, "image": image or ".", "array": f"{group.path}/{ms['datasets'][0]['path']}".lstrip("/"),
        "kind": kind, "axes": "".join(axes), "shape": "x".join(map(str, level0.shape)), "dtype": str(level0.dtype),
        "unit": units.pop() if len(units) == 1 else ",".join(sorted(map(str, units))),
        "levels": len(ms["datasets"]), "chunks": "x".join(map(str, level0.chunks)),
        "shards": "x".join(map(str, level0.shards)) if level0.shards else "",
        "uncompressed_bytes": uncompressed, "stored_bytes": stored,
        "compression_ratio": round(uncompressed / stored, 2) if stored else None,
    }
    row.update({f"voxel_size_{axis}": s for axis, s in zip(axes, scale, strict=True)})
    row.update({f"translation_{axis}": t for axis, t in zip(axes, translation, strict=True)})
    return row


def collect(outputs: Mapping[str, Path], params: MetadataParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The table (one row per level-0 array) and the intensity histograms of every image."""
    rows: list[dict[str, Any]] = []
    hist_rows: list[dict[str, Any]] = []
    for dataset, path in outputs.items():
        if not path.exists():
            raise SourceMismatchError(f"{path} is missing: run its stage first (dvc repro {dataset})")
        root = zarr.open_group(str(path), mode="r")
        prov: dict[str, Any] = dict(root.attrs.asdict().get("emdata", {}))  # type: ignore[arg-type]
        raw = "; ".join(f"{f.get('name', f.get('url'))}:{f['sha256']}" for f in prov.get("files", []) if "sha256" in f)
        common = {
            "source": prov.get("title") or prov.get("source_url") or dataset,
            "source_url": prov.get("source_url") or prov.get("page") or "",
            "licence": prov.get("licence", ""),
            "raw_sha256": raw,
            "zarr_sha256": tree_sha256(path),
            "provenance": json.dumps(_without(prov, BULKY_KEYS), sort_keys=True, default=str),
        }
        for image, group in find_images(root):
            rows.append({**_array_rows(dataset, image, "image", group, path), **common})
            ms = multiscales(group)
            level = min(params.histogram_level, len(ms["datasets"]) - 1)
            array = group[ms["datasets"][level]["path"]]
            assert isinstance(array, zarr.Array)
            data = np.asarray(array[...])
            # uint8 over its full range, so EM images compare on one axis; other types over their data range.
            value_range = (0, 256) if data.dtype == np.uint8 else (float(data.min()), float(data.max()) + 1)
            counts, edges = np.histogram(data, bins=params.histogram_bins, range=value_range)
            name = f"{dataset}/{image}" if image else dataset
            total = counts.sum()
            hist_rows += [{"image": name, "intensity": round(float(edges[i]), 3), "fraction": round(c / total, 6)}
                          for i, c in enumerate(counts)]
            for label in label_names(group):
                lgroup = group[f"labels/{label}"]
                assert isinstance(lgroup, zarr.Group)
                rows.append({**_array_rows(dataset, image, f"label:{label}", lgroup, path), **common})
    table = pd.DataFrame(rows)
    return table, pd.DataFrame(hist_rows, columns=["image", "intensity", "fraction"])


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def summary_markdown(table: pd.DataFrame, mirror: str) -> str:
    origin = ("the **offline replica** (synthetic stand-ins at the real paths; regenerate with a live `dvc repro`)"
              if mirror else "the live sources")
    lines = [
        "# Metadata summary",
        "",
        f"Generated by the `metadata` stage (`dvc repro metadata`) from {origin}.",
        f"The full table, with checksums and provenance, is `{TABLE}`. Axes are z, y, x; sizes are of level 0.",
        "",
        "| dataset | array | kind | shape (z, y, x) | dtype | voxel size (z, y, x) | translation (z, y, x) | levels "
        "| stored | ratio | licence |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in table.itertuples():
        vox = f"{r.voxel_size_z:g}, {r.voxel_size_y:g}, {r.voxel_size_x:g} {r.unit}"
        tr = f"{r.translation_z:g}, {r.translation_y:g}, {r.translation_x:g}"
        lines.append(f"| {r.dataset} | `{r.array}` | {r.kind} | {r.shape.replace('x', ', ')} | {r.dtype} | {vox} "
                     f"| {tr} | {r.levels} | {_human(r.stored_bytes)} | {r.compression_ratio} | {r.licence} |")
    lines += ["", "## Sources and checksums", ""]
    for dataset, group in table.groupby("dataset", sort=False):
        first = group.iloc[0]
        lines.append(f"- **{dataset}**: {first.source} ({first.source_url}); Zarr tree sha256 `{first.zarr_sha256}`")
        prov = json.loads(first.provenance)
        notes = [f"{k} `{prov[k]}`" for k in PROVENANCE_NOTES if prov.get(k) is not None]
        if notes:
            lines.append(f"  - {', '.join(notes)}")
        for item in filter(None, str(first.raw_sha256 or "").split("; ")):
            name, _, digest = item.rpartition(":")
            lines.append(f"  - raw `{name}` sha256 `{digest}`")
    return "\n".join(lines) + "\n"


def build_metadata(repo_root: Path, params: MetadataParams, mirror: str) -> dict[str, Any]:
    outputs = {d: repo_root / get_source(d).output for d in params.datasets}
    table, histograms = collect(outputs, params)
    (repo_root / TABLE).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(repo_root / TABLE, index=False)
    (repo_root / HISTOGRAMS).parent.mkdir(parents=True, exist_ok=True)
    histograms.to_csv(repo_root / HISTOGRAMS, index=False)
    (repo_root / SUMMARY).write_text(summary_markdown(table, mirror))
    metrics = {
        "n_datasets": int(table["dataset"].nunique()),
        "n_arrays": len(table),
        "uncompressed_GB": round(float(table["uncompressed_bytes"].sum()) / 1e9, 3),
        "stored_GB": round(float(table["stored_bytes"].sum()) / 1e9, 3),
        "compression_ratio": {f"{r.dataset}/{r.array}": r.compression_ratio for r in table.itertuples()},
    }
    write_json_atomic(repo_root / METRICS, metrics)
    return metrics


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    root = Path.cwd()
    params = load_params(root / "params.yaml")
    section = dataclass_from_section(MetadataParams, params.get("metadata"), "metadata")
    metrics = build_metadata(root, section, params.get("mirror") or "")
    log.info("metadata: %d arrays of %d datasets, %s GB stored", metrics["n_arrays"], metrics["n_datasets"],
             metrics["stored_GB"])
