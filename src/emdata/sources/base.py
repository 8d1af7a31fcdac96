"""What every source shares: the ``Source`` interface, the provenance record, and the file-source skeleton.

A file source (EPFL, IDR, EMPIAR) only says what differs: which files to fetch (after checking whatever
documents describe them) and how to convert them. :func:`run_file_source` does the rest, once for all:
fetch (verified, resumable), convert into a temporary folder (each image written and read back by
``emdata.ngff.write_image``), write the provenance, publish atomically, then discard the raw downloads.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import zarr

from emdata import ngff
from emdata.acquire.context import RunContext
from emdata.acquire.download import Download, Downloader, DownloadResult, discard_downloads, transfer_figures
from emdata.acquire.fsutil import atomic_dir
from emdata.acquire.params import dataclass_from_section
from emdata.catalog import About, find


class Source(Protocol):
    """A dataset we acquire: validates its params section, then fetches and writes its one output."""

    name: str  # the dataset's name in emdata.catalog (= the DVC stage)

    def parse_params(self, section: Mapping[str, Any] | None) -> Any:
        """Validate the params section into a frozen dataclass; raise InvalidParameterError naming bad values."""
        ...

    def run(self, params: Any, ctx: RunContext) -> dict[str, Any]:
        """Fetch, convert and write the output atomically; return the figures for the stage's metrics file."""
        ...


def output_path(name: str, ctx: RunContext) -> Path:
    """Where dataset ``name``'s output goes in the repository of ``ctx``."""
    return ctx.repo_root / find(name).output


@dataclass(frozen=True)
class FileRecord:
    """One raw file behind an output: its live URL (never the mirror's), size and sha256."""

    url: str
    name: str
    size: int
    sha256: str

    @classmethod
    def of(cls, result: DownloadResult) -> FileRecord:
        return cls(result.url, Path(result.dest).name, result.size, result.sha256)


@dataclass(frozen=True)
class Provenance:
    """The output's ``emdata`` root attributes: live URLs only, nothing time-dependent (outputs are reproducible).

    ``origin`` says where the bytes came from (``live``, or a mirror's ``replica`` / ``cache``);
    ``discrepancies`` are the known disagreements between a source's documents and its files, each a sentence;
    ``details`` are the source's own facts (documents, crop, listing ...), kept beside the common keys.
    """

    dataset: str
    about: About
    origin: str
    voxel_size_nm: Sequence[float]
    voxel_size_note: str = ""
    files: Sequence[FileRecord] = ()
    discrepancies: Sequence[str] = ()
    labels: Mapping[str, Any] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        common: dict[str, Any] = {
            "dataset": self.dataset,
            "title": self.about.title,
            "page": self.about.page,
            "licence": self.about.licence,
            "citation": self.about.citation,
            "doi": list(self.about.doi),
            "origin": self.origin,
            "axes": list(ngff.AXES),
            "voxel_size_nm": [float(v) for v in self.voxel_size_nm],
            "voxel_size_note": self.voxel_size_note,
            "files": [f.__dict__ for f in self.files],
            "discrepancies": list(self.discrepancies),
            "labels": dict(self.labels) if self.labels is not None else None,
        }
        clash = sorted(set(common) & set(self.details))
        if clash:
            raise ValueError(f"provenance details must not redefine common keys {clash}")
        return {**common, **self.details}


P = TypeVar("P")
Plan = TypeVar("Plan")


class SourceBase(Generic[P]):
    """What every source shares: its name (the catalog's), its facts, and its params section parsed into
    ``params_type`` (a frozen dataclass that validates itself), unknown keys named."""

    name: str
    params_type: type[P]

    @property
    def about(self) -> About:
        return find(self.name).about

    def parse_params(self, section: Mapping[str, Any] | None) -> P:
        return dataclass_from_section(self.params_type, section, self.name)


@dataclass(frozen=True)
class Converted:
    """What a file source's conversion says about the output it wrote."""

    voxel_size_nm: Sequence[float]
    figures: Mapping[str, Any]  # numbers for the metrics file
    voxel_size_note: str = ""
    discrepancies: Sequence[str] = ()
    labels: Mapping[str, Any] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


class FileSource(SourceBase[P], ABC, Generic[P, Plan]):
    """A source whose data are whole files over HTTP: says which files, and how to convert them.

    Its params need ``keep_downloads`` (bool) and ``sha256`` (file name -> pinned sha256 of the live file).
    """

    @abstractmethod
    def plan(self, params: P, ctx: RunContext, fetch: Downloader) -> tuple[Plan, Mapping[str, str]]:
        """Check the source's documents (before any large download); return the plan and ``{file name: live URL}``."""

    @abstractmethod
    def convert(self, params: P, plan: Plan, files: Mapping[str, Path], root: zarr.Group,
                ctx: RunContext) -> Converted:
        """Write the output into ``root`` from the downloaded ``files``; keep no reference to them afterwards."""

    def run(self, params: P, ctx: RunContext) -> dict[str, Any]:
        return run_file_source(self, params, ctx)


def run_file_source(source: FileSource[P, Plan], params: P, ctx: RunContext) -> dict[str, Any]:
    """Fetch, convert, read back, publish atomically, write provenance; discard the downloads last."""
    downloader = ctx.downloader()
    plan, urls = source.plan(params, ctx, downloader)
    folder = ctx.downloads_dir / source.name
    pins: Mapping[str, str] = params.sha256  # type: ignore[attr-defined]
    items = [Download(url, folder / name, sha256=pins.get(name)) for name, url in urls.items()]
    began = time.monotonic()
    results = downloader.download_all(items)
    download_s = time.monotonic() - began

    began = time.monotonic()
    with atomic_dir(output_path(source.name, ctx)) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        converted = source.convert(params, plan, {Path(r.dest).name: Path(r.dest) for r in results}, root, ctx)
        root.attrs["emdata"] = Provenance(
            dataset=source.name, about=source.about, origin=ctx.origin, voxel_size_nm=converted.voxel_size_nm,
            voxel_size_note=converted.voxel_size_note, files=[FileRecord.of(r) for r in results],
            discrepancies=converted.discrepancies, labels=converted.labels, details=converted.details,
        ).to_dict()
    convert_s = time.monotonic() - began
    # The raw files go only after the converted output is verified and in place (see README).
    if not params.keep_downloads:  # type: ignore[attr-defined]
        discard_downloads(results, folder)
    return {**transfer_figures(results, download_s), "convert_seconds": round(convert_s, 2),
            "discrepancies": len(converted.discrepancies), **converted.figures}
