"""The datasets: one name each (the DVC stage name), its output, the module that acquires it, and its facts.

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
class About:
    """The fixed facts of a source: what it is, where it is described, how to cite it, under which licence."""

    title: str
    page: str
    licence: str
    citation: str
    doi: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dataset:
    name: str  # the stage name: dvc.yaml, params.yaml section, metrics/<name>.json, the table's ``dataset``
    output: str  # the DVC output, relative to the repository root
    module: str  # the module defining ``SOURCE`` (see emdata.sources.Source)
    about: About

    @property
    def output_name(self) -> str:
        """The output's file name without ``.zarr`` (``hemibrain_crop``)."""
        return PurePosixPath(self.output).name.removesuffix(".zarr")

    @property
    def metrics(self) -> str:
        return f"metrics/{self.name}.json"


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("epfl", "data/epfl.zarr", "emdata.sources.epfl", About(
        title='EPFL CVLab electron microscopy dataset, hippocampus CA1 (mitochondria)',
        page='https://www.epfl.ch/labs/cvlab/data/data-em/',
        licence='not stated (research use; cite Lucchi et al.)',
        citation=('A. Lucchi, K. Smith, R. Achanta, G. Knott, P. Fua. Supervoxel-Based Segmentation of '
                  'Mitochondria in EM Image Stacks with Learned Shape Features. IEEE Transactions on '
                  'Medical Imaging 31(2), 2012.'),
        doi=('10.1109/TMI.2011.2171705',),
    )),
    Dataset("hemibrain", "data/hemibrain_crop.zarr", "emdata.sources.hemibrain", About(
        title='Janelia FlyEM hemibrain v1.0/v1.2 grayscale (CLAHE, JPEG)',
        page='https://www.janelia.org/project-team/flyem/hemibrain',
        # Janelia releases the hemibrain under CC BY 4.0 (FlyEM release page; not restated in the bucket).
        licence='CC BY 4.0',
        citation=('L. K. Scheffer et al. A connectome and analysis of the adult Drosophila central brain. '
                  'eLife 9, e57443, 2020.'),
        doi=('10.7554/eLife.57443',),
    )),
    Dataset("empiar", "data/empiar_11759.zarr", "emdata.sources.empiar", About(
        title='EMPIAR-11759: Developing retina in zebrafish 55 hpf larval eye (SBF-SEM)',
        page='https://www.ebi.ac.uk/empiar/EMPIAR-11759/',
        licence='CC0 1.0 (all EMPIAR entries are released under CC0)',
        citation=('EMPIAR-11759, Electron Microscopy Public Image Archive (EMBL-EBI). Iudin et al., EMPIAR:'
                  ' the Electron Microscopy Public Image Archive, Nucleic Acids Research 51(D1), 2023.'),
        doi=('10.6019/EMPIAR-11759',),
    )),
    Dataset("idr", "data/idr_9846137.zarr", "emdata.sources.idr", About(
        title='IDR idr0086 experimentD: FIB-SEM of chromatin in a U2OS cell (Miron et al. 2020, Figure S3B)',
        page='https://idr.openmicroscopy.org/webclient/img_detail/9846137/',
        licence='CC BY 4.0',
        citation=('E. Miron et al. Chromatin arranges in chains of mesoscale domains with nanoscale '
                  'functional topography independent of cohesin. Science Advances 6(39), eaba8811, 2020. '
                  'Data: Image Data Resource idr0086.'),
        doi=('10.1126/sciadv.aba8811',),
    )),
    Dataset("openorganelle", "data/jrc_mus-nacc-2.zarr", "emdata.sources.openorganelle", About(
        title=('Janelia OpenOrganelle jrc_mus-nacc-2 (mouse nucleus accumbens) FIB-SEM, '
               'recon-2/em/fibsem-int16'),
        page='https://openorganelle.janelia.org/datasets/jrc_mus-nacc-2',
        licence='CC BY 4.0 (Janelia COSEM open data)',
        citation=('Janelia COSEM Project Team, OpenOrganelle jrc_mus-nacc-2: reconstructed FIB-SEM data, '
                  'Janelia Research Campus (figshare), doi:10.25378/janelia.24222898.'),
        doi=('10.25378/janelia.24222898',),
    )),
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
