"""EPFL CVLab hippocampus CA1 FIB-SEM: TIFF stacks and mitochondria masks -> data/epfl.zarr (OME-Zarr 0.5).

Layout of the output: one image group per split (``training``, ``testing``, optionally ``volumedata``), each
an OME-Zarr 0.5 multiscale image (z, y, x, nm) with its ground truth as NGFF labels ``labels/mito``
(0 = background, 1 = mitochondrion). Provenance (URLs, sizes, sha256 of the raw TIFFs) is in the root's
``emdata`` attributes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emdata import ngff
from emdata.acquire.context import RunContext
from emdata.acquire.download import Downloader
from emdata.acquire.params import check_chunks_and_shards, check_sha256_pins
from emdata.catalog import find
from emdata.errors import InvalidParameterError, SourceMismatchError
from emdata.formats import read_volume
from emdata.formats.volume import PagedArray, release_pages
from emdata.sources.base import Converted, FileSource

log = logging.getLogger(__name__)

BASE_URL = "https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus/"
SPLITS = ("training", "testing")
ABOUT = find("epfl").about  # title, page, licence, citation, DOI (emdata.catalog)
MITO_LABEL = 1


@dataclass(frozen=True)
class EpflParams:
    splits: Sequence[str] = SPLITS
    include_volumedata: bool = False
    voxel_size_nm: Sequence[float] = (5.0, 5.0, 5.0)
    chunks: Sequence[int] = ngff.DEFAULT_CHUNKS
    shards: Sequence[int] = ngff.UINT8_SHARDS
    keep_downloads: bool = False
    sha256: Mapping[str, str] = field(default_factory=dict)  # file name -> pinned sha256 of the live file

    def __post_init__(self) -> None:
        bad = [s for s in self.splits if s not in SPLITS] if isinstance(self.splits, (list, tuple)) else None
        if bad is None or bad or len(set(self.splits)) != len(self.splits):
            raise InvalidParameterError(f"epfl.splits must be distinct names from {list(SPLITS)}, got {self.splits!r}")
        if not self.splits and not self.include_volumedata:
            raise InvalidParameterError("epfl.splits is empty and include_volumedata is false: nothing to fetch")
        for name in ("include_volumedata", "keep_downloads"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(f"epfl.{name} must be true or false, got {getattr(self, name)!r}")
        ngff.Geometry(tuple(self.voxel_size_nm))  # type: ignore[arg-type]  # validates
        check_chunks_and_shards("epfl", self.chunks, self.shards)
        known = {n for s in SPLITS for n in (f"{s}.tif", f"{s}_groundtruth.tif")} | {"volumedata.tif"}
        check_sha256_pins("epfl", self.sha256, known.__contains__, str(sorted(known)))

    @property
    def files(self) -> list[str]:
        names = [n for s in self.splits for n in (f"{s}.tif", f"{s}_groundtruth.tif")]
        return names + (["volumedata.tif"] if self.include_volumedata else [])


class EpflSource(FileSource[EpflParams, None]):
    name = "epfl"
    params_type = EpflParams


    def plan(self, params: EpflParams, ctx: RunContext, fetch: Downloader) -> tuple[None, dict[str, str]]:
        return None, {name: BASE_URL + name for name in params.files}  # no documents: the files are all there is

    def convert(self, params: EpflParams, plan: None, files: Mapping[str, Path], root: zarr.Group,
                ctx: RunContext) -> Converted:
        figures: dict[str, Any] = {}
        for split in params.splits:
            figures[split] = convert_split(root, split, files[f"{split}.tif"], files[f"{split}_groundtruth.tif"],
                                           params, ctx)
        if params.include_volumedata:
            figures["volumedata"] = convert_split(root, "volumedata", files["volumedata.tif"], None, params, ctx)
        # The root lists its images (NGFF collection layout), so generic readers find them by name.
        ngff.write_collection(root, list(figures))
        return Converted(
            voxel_size_nm=params.voxel_size_nm, figures={"arrays": figures},
            voxel_size_note="about 5 nm isotropic, from the web page; the TIFFs carry no resolution tags",
            labels={"mito": {"from": "*_groundtruth.tif", "values": {"0": "background", "1": "mitochondrion"}}})


def read_tiff(path: Path) -> np.ndarray:
    """The stack as a (z, y, x) array: memory-mapped when the file allows it, else decoded page by page within
    the reader's bound (never silently whole); a file that is not a TIFF fails naming it. Read it through
    ``PagedArray`` so that its mapped pages do not accumulate in the resident set."""
    volume = read_volume(path)
    if volume.source_format != "tiff":
        raise SourceMismatchError(f"{path.name}: expected a TIFF stack, the file is {volume.source_format}")
    return volume.data


class MitoMask:
    """The ground truth as labels (0 background, 1 mitochondrion; > 127 in the TIFF), computed box by box."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = PagedArray(mask)  # each box read drops the mapped pages it touched
        self.shape = mask.shape
        self.dtype = np.dtype(np.uint8)

    def __getitem__(self, box: Any) -> np.ndarray:
        return (np.asarray(self.mask[box]) > 127).astype(np.uint8) * MITO_LABEL


def convert_split(root: zarr.Group, split: str, image_path: Path, mask_path: Path | None,
                  params: EpflParams, ctx: RunContext) -> dict[str, Any]:
    """Write one split as an image (+ mito labels) group, each read back and compared with its TIFF."""
    image = read_tiff(image_path)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise SourceMismatchError(f"{image_path.name}: expected a 3-D uint8 stack, got {image.shape} {image.dtype}")
    labels = []
    figures: dict[str, Any] = {"shape": list(image.shape)}
    if mask_path is not None:
        mask = read_tiff(mask_path)
        if mask.shape != image.shape:
            raise SourceMismatchError(f"{mask_path.name} has shape {mask.shape}, its image {image.shape}")
        counts = np.zeros(256, dtype=np.int64)  # the mask's values, one slice at a time (bincount widens to int64)
        for z in range(mask.shape[0]):
            counts += np.bincount(np.asarray(mask[z], dtype=np.uint8).ravel(), minlength=256)
            release_pages(mask)  # one slice of the map resident at a time
        values = np.flatnonzero(counts)
        if not set(values.tolist()) <= {0, 255}:
            log.warning("%s holds values %s, not only 0/255; > 127 counts as mitochondria", mask_path.name,
                        values[:10].tolist())
        labels.append(ngff.Label("mito", MitoMask(mask), colors={MITO_LABEL: [255, 64, 64, 255]},
                                 properties={0: {"name": "background"}, MITO_LABEL: {"name": "mitochondrion"}},
                                 method="nearest"))
        figures["mask_values"] = values[:10].tolist()
    with ctx.progress(f"write {split}", image.nbytes * (1 + len(labels))) as bar:
        written = ngff.write_image(root.create_group(split), name=split, source=PagedArray(image),
                                   geometry=ngff.Geometry(tuple(params.voxel_size_nm)),  # type: ignore[arg-type]
                                   chunks=params.chunks, shards=params.shards, method="mean", labels=labels,
                                   what=image_path.name, on_block=bar.update)
    # Metrics are numbers (DVC tabulates them); dtype and source live in the output's attributes.
    figures["levels"] = written["levels"]
    figures["mean_intensity"] = round(float(written["mean"]), 2)
    if labels:
        figures["mito_fraction"] = round(float(written["labels"]["mito"]["mean"]) / MITO_LABEL, 5)
    return figures


SOURCE = EpflSource()
