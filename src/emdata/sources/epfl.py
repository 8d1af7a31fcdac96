"""EPFL CVLab hippocampus CA1 FIB-SEM: TIFF stacks and mitochondria masks -> data/epfl.zarr (OME-Zarr 0.5).

Layout of the output: one image group per split (``training``, ``testing``, optionally ``volumedata``), each
an OME-Zarr 0.5 multiscale image (z, y, x, nm) with its ground truth as NGFF labels ``labels/mito``
(0 = background, 1 = mitochondrion). Provenance (URLs, sizes, sha256 of the raw TIFFs) is in the root's
``emdata`` attributes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from emdata import ngff
from emdata.acquire.download import (
    ChecksumRegistry,
    Download,
    Downloader,
    DownloadResult,
    discard_downloads,
    transfer_figures,
)
from emdata.errors import InvalidParameterError, SourceMismatchError
from emdata.acquire.fsutil import atomic_dir
from emdata.acquire.params import RunContext, check_chunks_and_shards, check_sha256_pins, dataclass_from_section

log = logging.getLogger(__name__)

BASE_URL = "https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus/"
PAGE_URL = "https://www.epfl.ch/labs/cvlab/data/data-em/"
SPLITS = ("training", "testing")
LICENCE = "not stated (research use; cite Lucchi et al. 2012)"
MITO_LABEL = 1


@dataclass(frozen=True)
class EpflParams:
    splits: Sequence[str] = SPLITS
    include_volumedata: bool = False
    voxel_size_nm: Sequence[float] = (5.0, 5.0, 5.0)
    chunks: Sequence[int] = ngff.DEFAULT_CHUNKS
    shards: Sequence[int] = ngff.DEFAULT_SHARDS
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


class EpflSource:
    name = "epfl"
    output = "data/epfl.zarr"

    def parse_params(self, section: Mapping[str, Any] | None) -> EpflParams:
        return dataclass_from_section(EpflParams, section, "epfl")

    def run(self, params: EpflParams, ctx: RunContext) -> dict[str, Any]:
        downloads = ctx.downloads_dir / self.name
        items = [Download(BASE_URL + n, downloads / n, sha256=params.sha256.get(n)) for n in params.files]
        registry = ChecksumRegistry(ctx.checksums_path, "mirror" if ctx.mirror else "live")
        began = time.monotonic()
        results = Downloader(ctx.download, mirror=ctx.mirror, registry=registry).download_all(items)
        download_s = time.monotonic() - began
        by_name = {Path(r.dest).name: r for r in results}

        began = time.monotonic()
        out = ctx.repo_root / self.output
        figures: dict[str, Any] = {}
        with atomic_dir(out) as tmp:
            root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            for split in params.splits:
                figures[split] = convert_split(root, split, by_name[f"{split}.tif"].dest,
                                               by_name[f"{split}_groundtruth.tif"].dest, params)
            if params.include_volumedata:
                figures["volumedata"] = convert_split(root, "volumedata", by_name["volumedata.tif"].dest,
                                                      None, params)
            root.attrs["emdata"] = provenance(params, results)
        convert_s = time.monotonic() - began
        # Downloads go only after the converted output is verified and in place (see README).
        if not params.keep_downloads:
            discard_downloads(results, downloads)
        return {**transfer_figures(results, download_s), "convert_seconds": round(convert_s, 2), "arrays": figures}


def read_tiff(path: Path) -> np.ndarray:
    """The stack as a (z, y, x) array, memory-mapped when the file allows it (uncompressed, contiguous)."""
    try:
        return tifffile.memmap(path, mode="r")
    except ValueError:
        return tifffile.imread(path)


def convert_split(root: zarr.Group, split: str, image_path: Path, mask_path: Path | None,
                  params: EpflParams) -> dict[str, Any]:
    """Write one split as an image (+ mito labels) group, then check every voxel against the TIFFs."""
    image = read_tiff(image_path)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise SourceMismatchError(f"{image_path.name}: expected a 3-D uint8 stack, got {image.shape} {image.dtype}")
    geometry = ngff.Geometry(tuple(params.voxel_size_nm))  # type: ignore[arg-type]
    group = root.create_group(split)
    arrays = ngff.create_multiscale(group, name=split, shape=image.shape, dtype=image.dtype, geometry=geometry,
                                    chunks=params.chunks, shards=params.shards)
    ngff.write_block_aligned(arrays[0], image)
    ngff.write_pyramid(arrays, "mean")
    ngff.check_read_back(arrays[0], image, image_path.name)
    # Metrics are numbers (DVC tabulates them); dtype and source live in the output's attributes.
    figures: dict[str, Any] = {"shape": list(image.shape),
                               "levels": len(arrays), "mean_intensity": round(float(image.mean()), 2)}
    if mask_path is not None:
        mask = read_tiff(mask_path)
        if mask.shape != image.shape:
            raise SourceMismatchError(f"{mask_path.name} has shape {mask.shape}, its image {image.shape}")
        values = np.unique(mask)
        if not set(values.tolist()) <= {0, 255}:
            log.warning("%s holds values %s, not only 0/255; > 127 counts as mitochondria", mask_path.name,
                        values[:10].tolist())
        labels = (mask > 127).astype(np.uint8) * MITO_LABEL
        larrays = ngff.create_label(group, "mito", shape=labels.shape, dtype=np.uint8, geometry=geometry,
                                    chunks=params.chunks, shards=params.shards,
                                    colors={MITO_LABEL: [255, 64, 64, 255]})
        ngff.write_block_aligned(larrays[0], labels)
        ngff.write_pyramid(larrays, "nearest")
        ngff.check_read_back(larrays[0], labels, mask_path.name)
        figures["mito_fraction"] = round(float(labels.mean()), 5)
        figures["mask_values"] = values[:10].tolist()
    return figures


def provenance(params: EpflParams, results: Sequence[DownloadResult]) -> dict[str, Any]:
    return {
        "source": "epfl",
        "title": "EPFL CVLab electron microscopy dataset, hippocampus CA1 (mitochondria)",
        "page": PAGE_URL,
        "licence": LICENCE,
        "axes": list(ngff.AXES),
        "voxel_size_nm": list(params.voxel_size_nm),
        "voxel_size_note": "about 5 nm isotropic, from the web page; the TIFFs carry no resolution tags",
        "files": [{"url": r.url, "name": Path(r.dest).name, "size": r.size, "sha256": r.sha256} for r in results],
        "labels": {"mito": {"from": "*_groundtruth.tif", "values": {"0": "background", "1": "mitochondrion"}}},
    }


SOURCE = EpflSource()
