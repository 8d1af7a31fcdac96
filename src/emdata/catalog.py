"""The datasets: one name each (the DVC stage name), its output path, and the module that acquires it.

Every part of the project that names a dataset goes through this table: the stages (``dvc.yaml``), the
metrics files (``metrics/<name>.json``), the metadata table's ``dataset`` column, ``open_array`` and the
``emdata`` command. ``find`` also accepts an output's own name (``hemibrain_crop`` for ``hemibrain``), so the
name a user reads in ``data/`` works too. Importing this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from emdata.errors import InvalidParameterError


@dataclass(frozen=True)
class Dataset:
    name: str  # the stage name: dvc.yaml, params.yaml section, metrics/<name>.json, the table's ``dataset``
    output: str  # the DVC output, relative to the repository root
    module: str  # the module defining ``SOURCE`` (see emdata.sources.Source)

    @property
    def output_name(self) -> str:
        """The output's file name without ``.zarr`` (``hemibrain_crop``)."""
        return PurePosixPath(self.output).name.removesuffix(".zarr")

    @property
    def metrics(self) -> str:
        return f"metrics/{self.name}.json"


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("epfl", "data/epfl.zarr", "emdata.sources.epfl"),
    Dataset("hemibrain", "data/hemibrain_crop.zarr", "emdata.sources.hemibrain"),
    Dataset("empiar", "data/empiar_11759.zarr", "emdata.sources.empiar"),
    Dataset("idr", "data/idr_9846137.zarr", "emdata.sources.idr"),
    Dataset("openorganelle", "data/jrc_mus-nacc-2.zarr", "emdata.sources.openorganelle"),
)}


def find(name: str) -> Dataset:
    """The dataset called ``name`` (stage name or output name); InvalidParameterError lists the valid names."""
    if name in DATASETS:
        return DATASETS[name]
    for dataset in DATASETS.values():
        if name == dataset.output_name:
            return dataset
    valid = sorted(n for d in DATASETS.values() for n in {d.name, d.output_name})
    raise InvalidParameterError(f"unknown dataset {name!r}; valid: {valid}")
