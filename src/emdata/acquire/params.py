"""params.yaml: loading, and validation of sections into frozen dataclasses naming any bad value."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
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


def check_chunks_and_shards(section: str, chunks: Any, shards: Any) -> None:
    """Output chunks and shards: three positive integers each (z, y, x), shards whole multiples of chunks."""
    for name, value in (("chunks", chunks), ("shards", shards)):
        if not isinstance(value, (list, tuple)) or len(value) != 3 or any(
                isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value):
            raise InvalidParameterError(f"{section}.{name} must be three positive integers (z, y, x), got {value!r}")
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


def _positive(name: str, value: Any, kind: type = float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
        kind is int and not isinstance(value, int)
    ):
        raise InvalidParameterError(f"download.{name} must be a positive {kind.__name__}, got {value!r}")


@dataclass(frozen=True)
class DownloadConfig:
    """Settings of the download engine (params.yaml section ``download``)."""

    workers: int = 4  # files downloaded at once
    range_workers: int = 4  # concurrent byte ranges of one large file
    range_threshold_mb: float = 256.0  # files at least this large are fetched as parallel ranges
    range_part_mb: float = 64.0
    retries: int = 5  # attempts after the first one
    backoff_s: float = 1.0  # first retry delay, doubled each time (capped at backoff_max_s)
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    checksums_file: str = "checksums.json"

    def __post_init__(self) -> None:
        for name in ("workers", "range_workers"):
            _positive(name, getattr(self, name), int)
        for name in ("range_threshold_mb", "range_part_mb", "connect_timeout_s", "read_timeout_s",
                     "backoff_max_s"):
            _positive(name, getattr(self, name))
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise InvalidParameterError(f"download.retries must be an integer >= 0, got {self.retries!r}")
        if not isinstance(self.backoff_s, (int, float)) or self.backoff_s < 0:
            raise InvalidParameterError(f"download.backoff_s must be >= 0, got {self.backoff_s!r}")
