"""params.yaml: loading, and validation of sections into frozen dataclasses naming any bad value."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import yaml

from emdata.errors import InvalidParameterError

T = TypeVar("T")


def load_params(path: Path | str = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"params file not found: {str(path)!r}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise InvalidParameterError(f"{str(path)!r} must hold a mapping at the top level")
    return data


def dataclass_from_section(cls: type[T], section: Mapping[str, Any] | None, where: str) -> T:
    """Build ``cls`` from a params section, naming any unknown key (typos fail loudly, before any work)."""
    section = dict(section or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(section) - known)
    if unknown:
        raise InvalidParameterError(f"unknown key(s) {unknown} in params section {where!r}; valid: {sorted(known)}")
    try:
        return cls(**section)
    except TypeError as exc:  # e.g. a list where a number is needed
        raise InvalidParameterError(f"bad params section {where!r}: {exc}") from exc


# Output chunks of at most 512 voxels and shards of at most 4096 per axis (and 2 Gi voxels): beyond that a
# single shard would not fit the memory a stage is allowed.
MAX_CHUNK_AXIS, MAX_SHARD_AXIS, MAX_SHARD_VOXELS = 512, 4096, 2**31


def check_chunks_and_shards(section: str, chunks: Any, shards: Any) -> None:
    """Output chunks and shards: three positive integers each (z, y, x), shards whole multiples of chunks."""
    for name, value, most in (("chunks", chunks, MAX_CHUNK_AXIS), ("shards", shards, MAX_SHARD_AXIS)):
        if not isinstance(value, (list, tuple)) or len(value) != 3 or any(
                isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= most for v in value):
            raise InvalidParameterError(
                f"{section}.{name} must be three integers in 1..{most} (z, y, x), got {value!r}")
    if math.prod(shards) > MAX_SHARD_VOXELS:
        raise InvalidParameterError(f"{section}.shards {list(shards)} hold more than {MAX_SHARD_VOXELS} voxels")
    if any(s % c for s, c in zip(shards, chunks, strict=True)):
        raise InvalidParameterError(f"{section}.shards {list(shards)} must be multiples of chunks {list(chunks)}")


def check_sha256_pins(section: str, pins: Any, is_known: Callable[[str], bool], valid: str) -> None:
    """Pinned sha256 per file name: known names (``valid`` describes them) and 64 lowercase hex digits."""
    if not isinstance(pins, Mapping):
        raise InvalidParameterError(f"{section}.sha256 must map file names to sha256, got {pins!r}")
    for name, digest in pins.items():
        if not is_known(str(name)):
            raise InvalidParameterError(f"{section}.sha256 names unknown file {name!r}; valid: {valid}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise InvalidParameterError(f"{section}.sha256[{name!r}] must be 64 lowercase hex digits, got {digest!r}")


def check_number(where: str, value: Any, *, kind: type = float, low: float, high: float,
                 low_open: bool = True) -> None:
    """The param ``where`` (e.g. ``download.retries``) must be a finite number (an int where ``kind`` is int) in
    its range; nan, inf and booleans fail, naming the param and the value."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and (
        kind is not int or isinstance(value, int)) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidParameterError(f"{where} must be a finite {kind.__name__} in {bound}, got {value!r}")


def _number(name: str, value: Any, **bounds: Any) -> None:
    check_number(f"download.{name}", value, **bounds)


@dataclass(frozen=True)
class DownloadConfig:
    """Settings of the download engine (params.yaml section ``download``)."""

    # Defaults measured by bench/bench_download.py (replica +30 ms per response, 20 MB/s per connection, 2 cores;
    # median of 3, ratio to the best grid point; bench/RESULTS.md). Files of 40 + 96 + 256 MB: 16 ranges x 8 MiB
    # 1.00x (1.44 s), 8 ranges x 16 MiB 1.58x, 4 ranges 2.8x, aria2c -x8 -s8 1.46x, the previous 4 workers /
    # 4 ranges x 64 MiB from 256 MB (one capped stream per file below 256 MB) 9.4x. 24 files of 2 MB (EMPIAR's
    # slices): 16 workers 1.00x, 8 workers 1.40x, 4 workers 2.6x, aria2c 2.2x. A host that limits connections per
    # client wants fewer workers and range_workers (a large file opens range_workers connections).
    workers: int = 16  # files downloaded at once
    range_workers: int = 16  # concurrent byte ranges of one large file
    range_threshold_mb: float = 32.0  # files at least this large are fetched as parallel ranges
    range_part_mb: float = 8.0
    retries: int = 5  # attempts after the first one
    backoff_s: float = 1.0  # first retry delay, doubled each time (capped at backoff_max_s)
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    checksums_file: str = "checksums.json"

    def __post_init__(self) -> None:
        for name in ("workers", "range_workers"):
            _number(name, getattr(self, name), kind=int, low=1, high=64, low_open=False)
        # A part below 64 KiB would mean a request per read block (1e-6 MB: one request per byte).
        _number("range_part_mb", self.range_part_mb, low=1 / 16, high=4096, low_open=False)
        _number("range_threshold_mb", self.range_threshold_mb, low=0, high=2**20)
        _number("retries", self.retries, kind=int, low=0, high=20, low_open=False)
        _number("backoff_s", self.backoff_s, low=0, high=600, low_open=False)
        for name in ("backoff_max_s", "connect_timeout_s", "read_timeout_s"):
            _number(name, getattr(self, name), low=0, high=3600)
        path = PurePosixPath(str(self.checksums_file))
        if not isinstance(self.checksums_file, str) or path.is_absolute() or ".." in path.parts \
                or path.suffix != ".json" or "\\" in self.checksums_file:
            raise InvalidParameterError(
                "download.checksums_file must be a .json path inside the repository (relative, no '..'), "
                f"got {self.checksums_file!r}")


def check_sections(params: Mapping[str, Any], where: str) -> None:
    """The top-level sections of params.yaml are the shared ones and one per dataset; a typo fails, naming it."""
    from emdata.catalog import DATASETS

    valid = {"mirror", "download", "metadata", *DATASETS}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise InvalidParameterError(f"unknown section(s) {unknown} in {where}; valid: {sorted(valid)}")
