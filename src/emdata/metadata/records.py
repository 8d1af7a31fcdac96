"""One typed record per level-0 array of an output, read from its OME-Zarr and ``emdata`` attributes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from emdata.catalog import DATASETS
from emdata.errors import InvalidParameterError, SourceMismatchError
from emdata.metadata.stats import IntensityStats
from emdata.ngff import find_images, label_names, multiscales, ome_attrs

# Whole source documents (precomputed ``info``) and per-file lists have their own columns or stay in the Zarr.
BULKY_KEYS = frozenset({"files", "info", "metadata_documents"})
# Older names of the ``discrepancies`` key, read until every source writes the new one.
OLD_DISCREPANCY_KEYS = ("known_discrepancies", "known_disagreements", "notes")
# Keys of an NGFF ``image-label`` ``properties`` entry that may hold a class name, in order of preference.
CLASS_NAME_KEYS = ("class", "name", "label", "class-name", "description")


@dataclass(frozen=True)
class MetadataParams:
    """params.yaml section ``metadata``."""

    datasets: Sequence[str] = tuple(DATASETS)
    level: int = 0  # pyramid level the statistics and histograms are computed from (0 = every voxel)
    histogram_bins: int = 64
    thumbnail_px: int = 512  # longest side of each thumbnail's image
    background_max_value: Mapping[str, float] = field(default_factory=dict)  # dataset -> grey value

    def __post_init__(self) -> None:
        unknown = [d for d in self.datasets if d not in DATASETS] if isinstance(self.datasets, (list, tuple)) else 1
        if unknown or not self.datasets:
            raise InvalidParameterError(f"metadata.datasets must name datasets from {sorted(DATASETS)}, "
                                        f"got {self.datasets!r}")
        for name, lo, hi in (("level", 0, 32), ("histogram_bins", 2, 4096), ("thumbnail_px", 32, 4096)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise InvalidParameterError(f"metadata.{name} must be an integer in {lo}..{hi}, got {value!r}")
        bg = self.background_max_value
        if not isinstance(bg, Mapping) or any(
                k not in DATASETS or isinstance(v, bool) or not isinstance(v, (int, float)) for k, v in bg.items()):
            raise InvalidParameterError(f"metadata.background_max_value must map dataset names "
                                        f"{sorted(DATASETS)} to grey values, got {bg!r}")


@dataclass(frozen=True)
class SourceFacts:
    """What an output's root ``emdata`` attributes say about where it came from (old key names tolerated)."""

    title: str
    page: str
    source_url: str
    doi: tuple[str, ...]
    citation: str
    licence: str
    origin: str  # "live", "replica" or "cache"; "" when the output does not say
    raw_files: tuple[tuple[str, str], ...]  # (file name, sha256)
    discrepancies: tuple[str, ...]  # known disagreements between the source's API/documents and its files
    labels: Mapping[str, Any]
    provenance: str  # every other attribute, JSON

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str) -> SourceFacts:
        if not isinstance(attrs, Mapping):
            raise SourceMismatchError(f"{where}: attribute 'emdata' must be a mapping, got {type(attrs).__name__}")
        files = attrs.get("files") or []
        raw = tuple((str(f.get("name") or f.get("url")), str(f["sha256"]))
                    for f in files if isinstance(f, Mapping) and f.get("sha256"))
        discrepancies = _texts(attrs.get("discrepancies"))
        for key in OLD_DISCREPANCY_KEYS:
            discrepancies += _texts(attrs.get(key))
        labels = attrs.get("labels")
        return cls(
            title=str(attrs.get("title") or ""), page=str(attrs.get("page") or ""),
            source_url=str(attrs.get("source_url") or attrs.get("page") or ""),
            doi=_dois(attrs.get("doi")), citation=str(attrs.get("citation") or ""),
            licence=str(attrs.get("licence") or ""), origin=str(attrs.get("origin") or ""),
            raw_files=raw, discrepancies=discrepancies,
            labels=labels if isinstance(labels, Mapping) else {},
            provenance=json.dumps(_without(attrs, BULKY_KEYS), sort_keys=True, default=str),
        )


@dataclass(frozen=True)
class RunFacts:
    """When and by what the stage made the output (the ``run`` key of ``metrics/<dataset>.json``)."""

    acquired_utc: str = ""
    emdata_version: str = ""
    commit: str = ""
    origin: str = ""  # read when the output's attributes do not say

    @classmethod
    def read(cls, metrics_file: Path) -> RunFacts:
        if not metrics_file.is_file():
            return cls()
        try:
            run = json.loads(metrics_file.read_text()).get("run") or {}
        except (json.JSONDecodeError, AttributeError) as exc:
            raise SourceMismatchError(f"{metrics_file}: not a JSON object of metrics ({exc})") from exc
        if not isinstance(run, Mapping):
            raise SourceMismatchError(f"{metrics_file}: 'run' must be a mapping, got {run!r}")
        return cls(**{k: str(run.get(k) or "") for k in ("acquired_utc", "emdata_version", "commit", "origin")})


@dataclass(frozen=True)
class ArrayRecord:
    """One level-0 image or label array of a dataset output: everything the table has about it."""

    dataset: str  # the stage name (emdata.catalog)
    image: str  # the image group inside the output: "" for the root, else e.g. "training"
    array: str  # path of level 0 inside the output, e.g. "training/labels/mito/0"
    kind: str  # "image" or "label"
    label: str  # the label's name ("" for images)
    axes: tuple[str, ...]
    unit: str
    shape: tuple[int, ...]
    dtype: str
    voxel_size: tuple[float, ...]
    translation: tuple[float, ...]
    levels: int
    downsampling: str  # the multiscales ``type``
    chunks: tuple[int, ...]
    shards: tuple[int, ...]
    uncompressed_bytes: int
    stored_bytes: int
    label_classes: tuple[str, ...]  # "value: name" (or one description) of a label array
    label_colors: Mapping[int, tuple[int, int, int, int]]  # NGFF ``colors`` of a label array
    source: SourceFacts
    run: RunFacts
    zarr_sha256: str  # of the whole output's stored tree
    stats: IntensityStats | None = None  # images
    foreground_fraction: float | None = None  # labels: non-zero voxels

    @property
    def name(self) -> str:
        """``dataset`` or ``dataset/image``: how the metrics, plots and thumbnails name an image."""
        return f"{self.dataset}/{self.image}" if self.image else self.dataset

    @property
    def compression_ratio(self) -> float | None:
        return round(self.uncompressed_bytes / self.stored_bytes, 2) if self.stored_bytes else None

    def row(self) -> dict[str, Any]:
        """The record as one flat row of ``metadata/datasets.csv`` / ``.parquet`` (scalars only)."""
        row: dict[str, Any] = {
            "dataset": self.dataset, "image": self.image or ".", "array": self.array, "kind": self.kind,
            "label": self.label, "axes": "".join(self.axes), "shape": "x".join(map(str, self.shape)),
            "dtype": self.dtype, "unit": self.unit, "levels": self.levels, "downsampling": self.downsampling,
            "chunks": "x".join(map(str, self.chunks)), "shards": "x".join(map(str, self.shards)),
            "uncompressed_bytes": self.uncompressed_bytes, "stored_bytes": self.stored_bytes,
            "compression_ratio": self.compression_ratio,
        }
        row.update({f"voxel_size_{a}": v for a, v in zip(self.axes, self.voxel_size, strict=True)})
        row.update({f"translation_{a}": t for a, t in zip(self.axes, self.translation, strict=True)})
        stats = asdict(self.stats) if self.stats else {}
        for key in ("level", "min", "max", "mean", "std", "p0_5", "p99_5", "background_fraction", "p0_5_foreground",
                    "p99_5_foreground"):
            row[f"stats_{key}" if key == "level" else key] = stats.get(key)
        row["stats_method"] = stats.get("method", "")
        row["background"] = stats.get("background", "")
        row["foreground_fraction"] = self.foreground_fraction
        row["label_classes"] = "; ".join(self.label_classes)
        s = self.source
        row.update({
            "title": s.title, "page": s.page, "source_url": s.source_url, "doi": "; ".join(s.doi),
            "citation": s.citation, "licence": s.licence, "origin": s.origin,
            "discrepancies": " | ".join(s.discrepancies),
            "acquired_utc": self.run.acquired_utc, "emdata_version": self.run.emdata_version,
            "commit": self.run.commit,
            "raw_sha256": "; ".join(f"{name}:{digest}" for name, digest in s.raw_files),
            "zarr_sha256": self.zarr_sha256, "provenance": s.provenance,
        })
        return row


def _texts(value: Any) -> tuple[str, ...]:
    """A discrepancy list as text: strings as they are, mappings as ``key: value`` pairs."""
    if value is None or isinstance(value, (int, float)):
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, Mapping):
            out.append("; ".join(f"{k}: {json.dumps(v, default=str) if not isinstance(v, str) else v}"
                                 for k, v in item.items()))
        else:
            out.append(str(item))
    return tuple(out)


def _dois(value: Any) -> tuple[str, ...]:
    """DOIs as recorded: a string, a list, or (older outputs) a mapping of what -> DOI."""
    if not value:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Mapping):
        return tuple(f"{v} ({k})" for k, v in value.items())
    return tuple(str(v) for v in value)


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


def label_classes(label_group: zarr.Group, label: str, source_labels: Mapping[str, Any]) -> tuple[str, ...]:
    """Class names of a label: NGFF ``image-label`` ``properties`` if present, else the source's ``labels``."""
    image_label = ome_attrs(label_group).get("image-label") or {}
    names = []
    for prop in image_label.get("properties") or []:
        if isinstance(prop, Mapping) and "label-value" in prop:
            name = next((str(prop[k]) for k in CLASS_NAME_KEYS if prop.get(k) not in (None, "")), None)
            if name is None:
                name = json.dumps({k: v for k, v in prop.items() if k != "label-value"}, default=str)
            names.append(f"{prop['label-value']}: {name}")
    if names:
        return tuple(names)
    described = source_labels.get(label)
    if isinstance(described, Mapping):
        for key in ("classes", "values"):
            values = described.get(key)
            if isinstance(values, Mapping):
                return tuple(f"{k}: {v}" for k, v in values.items())
            if isinstance(values, str):
                return (values,)
    elif isinstance(described, str):
        return (described,)
    return ()


def label_colors(label_group: zarr.Group) -> dict[int, tuple[int, int, int, int]]:
    image_label = ome_attrs(label_group).get("image-label") or {}
    colors: dict[int, tuple[int, int, int, int]] = {}
    for entry in image_label.get("colors") or []:
        try:
            rgba = [int(c) for c in entry["rgba"]]
            colors[int(entry["label-value"])] = (rgba[0], rgba[1], rgba[2], rgba[3] if len(rgba) > 3 else 255)
        except (KeyError, TypeError, ValueError, IndexError):
            continue  # a colour we cannot read is left to the default palette, never guessed
    return colors


def level0(group: zarr.Group) -> tuple[dict[str, Any], zarr.Array]:
    ms = multiscales(group)
    array = group[ms["datasets"][0]["path"]]
    if not isinstance(array, zarr.Array):
        raise SourceMismatchError(f"{group.store_path}: level 0 {ms['datasets'][0]['path']!r} is not an array")
    return ms, array


def array_record(dataset: str, image: str, group: zarr.Group, base: Path, source: SourceFacts, run: RunFacts,
                 zarr_sha256: str, label: str = "") -> ArrayRecord:
    """The record of one image group (or, with ``label``, of its label group ``group``), without statistics."""
    ms, array = level0(group)
    transforms = {t["type"]: t for t in ms["datasets"][0]["coordinateTransformations"]}
    scale = [float(v) for v in transforms["scale"]["scale"]]
    translation = [float(v) for v in transforms.get("translation", {"translation": [0.0] * len(scale)})["translation"]]
    axes = tuple(str(a["name"]) for a in ms["axes"])
    units = sorted({str(a.get("unit")) for a in ms["axes"]})
    folder = base / group.path / ms["datasets"][0]["path"]
    stored = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return ArrayRecord(
        dataset=dataset, image=image, array=f"{group.path}/{ms['datasets'][0]['path']}".lstrip("/"),
        kind="label" if label else "image", label=label, axes=axes, unit=",".join(units),
        shape=tuple(int(s) for s in array.shape), dtype=str(array.dtype), voxel_size=tuple(scale),
        translation=tuple(translation), levels=len(ms["datasets"]), downsampling=str(ms.get("type") or ""),
        chunks=tuple(array.chunks), shards=tuple(array.shards or ()),
        uncompressed_bytes=int(np.prod(array.shape)) * array.dtype.itemsize, stored_bytes=stored,
        label_classes=label_classes(group, label, source.labels) if label else (),
        label_colors=label_colors(group) if label else {},
        source=source, run=run, zarr_sha256=zarr_sha256,
    )


def output_records(dataset: str, path: Path, repo_root: Path) -> list[ArrayRecord]:
    """Records (without statistics) of every image and label array of one dataset's output."""
    if not path.exists():
        raise SourceMismatchError(f"{path} is missing: run its stage first (dvc repro {dataset})")
    root = zarr.open_group(str(path), mode="r")
    attrs = cast(dict[str, Any], root.attrs.asdict())
    source = SourceFacts.from_attrs(attrs.get("emdata", {}), str(path))
    run = RunFacts.read(repo_root / DATASETS[dataset].metrics)
    if not source.origin and run.origin:
        source = replace(source, origin=run.origin)
    digest = tree_sha256(path)
    records: list[ArrayRecord] = []
    images = find_images(root)
    if not images:
        raise SourceMismatchError(f"{path}: no OME-Zarr multiscale image at the root or in a child group")
    for image, group in images:
        records.append(array_record(dataset, image, group, path, source, run, digest))
        for label in label_names(group):
            lgroup = group[f"labels/{label}"]
            assert isinstance(lgroup, zarr.Group)
            records.append(array_record(dataset, image, lgroup, path, source, run, digest, label=label))
    return records
