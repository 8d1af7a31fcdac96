"""Replica of the EPFL CVLab hippocampus folder: ITK-style uncompressed multipage TIFFs at the real paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from emdata.offline.replica.synth import em_like

VERSION = 1
HOST_PATH = "documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/ ElectronMicroscopy_Hippocampus"
# (z, y, x): the real shapes in "full"; "small" keeps the 3:4 aspect for the tests.
SHAPES = {
    "full": {"split": (165, 768, 1024), "volumedata": (1065, 1536, 2048)},
    "small": {"split": (20, 96, 128), "volumedata": (48, 160, 224)},
    "half": {"split": (165, 768, 512), "volumedata": (1065, 1536, 1024)},  # full's shapes, x halved
    "double": {"split": (165, 768, 2048), "volumedata": (1065, 1536, 4096)},  # x doubled
    "quad": {"split": (165, 768, 4096), "volumedata": (1065, 1536, 8192)},  # x four times
}
EXTRA_PROFILES = ("half", "double", "quad")  # bench/bench_memory.py's sizes
SEEDS = {"training": 101, "testing": 202, "volumedata": 303}


def write_itk_tiff(path: Path, volume: np.ndarray) -> None:
    """Uncompressed multipage TIFF as ITK writes it: Software InsightToolkit, 4 rows per strip, no resolution."""
    tifffile.imwrite(path, volume, photometric="minisblack", software="InsightToolkit", rowsperstrip=4,
                     metadata=None, compression=None)


def build(root: Path, profile: str) -> None:
    folder = root / HOST_PATH
    folder.mkdir(parents=True, exist_ok=True)
    shapes = SHAPES[profile]
    for split in ("training", "testing"):
        vol = em_like(shapes["split"], seed=SEEDS[split])
        write_itk_tiff(folder / f"{split}.tif", vol.em)
        write_itk_tiff(folder / f"{split}_groundtruth.tif", np.where(vol.mito, 255, 0).astype(np.uint8))
    # The full-size volumedata.tif (3.35 GB) is generated only on request: it takes minutes.
    if profile == "small" or _want_full_volumedata():
        z = shapes["volumedata"][0]
        with tifffile.TiffWriter(folder / "volumedata.tif") as tif:
            for z0 in range(0, z, 64):
                slab = em_like((min(64, z - z0), *shapes["volumedata"][1:]), seed=SEEDS["volumedata"],
                               origin=(z0, 0, 0)).em
                for page in slab:
                    tif.write(page, photometric="minisblack", software="InsightToolkit", rowsperstrip=4,
                              metadata=None, contiguous=True)


def _want_full_volumedata() -> bool:
    import os

    return os.environ.get("EMDATA_REPLICA_VOLUMEDATA", "") == "1"
