"""The run context: the only way a source reaches the network, and what the mirror says it serves.

A source never rewrites URLs or builds a downloader itself: it asks the context for a :class:`Downloader`
(files and documents over HTTP, checksums from the right section), for the URL actually fetched for a live
resource, and for a tensorstore store over HTTP (the run's retry, timeout and redaction policy in one place).
"""

from __future__ import annotations

import base64
import logging
import netrc
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from tqdm import tqdm

from emdata.acquire.download import ChecksumRegistry, Downloader
from emdata.acquire.params import DownloadConfig, dataclass_from_section
from emdata.acquire.tsio import ReadPolicy
from emdata.acquire.urls import redact, redact_text, rewrite, validate_mirror
from emdata.errors import DownloadError, InvalidParameterError

if TYPE_CHECKING:
    import tensorstore as ts

log = logging.getLogger(__name__)

Origin = Literal["live", "replica", "cache"]
# What a mirror can serve: the project's synthetic replica, or a faithful cache/proxy of the live bytes.
MIRROR_SERVES = ("replica", "cache")


@dataclass(frozen=True)
class MirrorConfig:
    """params.yaml ``mirror``: where every live URL is fetched from instead, and what is served there.

    ``url`` empty = the live hosts. ``serves: replica`` is the offline replica (synthetic voxels behind the real
    documents: only then are checks of live facts relaxed and the ``replica`` checksum section used);
    ``serves: cache`` is a copy of the live bytes (a lab's proxy): verified against the live pins like the live
    hosts. Credentials never go here (they would reach ``dvc.lock``): a mirror that needs them reads ~/.netrc.
    """

    url: str = ""
    serves: str = "replica"

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", validate_mirror(self.url))
        if self.serves not in MIRROR_SERVES:
            raise InvalidParameterError(f"mirror.serves must be one of {list(MIRROR_SERVES)}, got {self.serves!r}")

    @property
    def origin(self) -> Origin:
        """Where a run's bytes come from: ``live``, or the mirror's ``replica`` / ``cache``."""
        return "live" if not self.url else self.serves  # type: ignore[return-value]


def mirror_config(value: Any) -> MirrorConfig:
    """The ``mirror`` param: a mapping ``{url, serves}``; a bare URL is refused (it would not say what it serves)."""
    if isinstance(value, str):
        raise InvalidParameterError(
            f"mirror must be a mapping {{url: ..., serves: replica|cache}}, got the string {redact(value)!r}: "
            "say what the mirror serves (the synthetic replica, or a cache of the live bytes)")
    if value is not None and not isinstance(value, Mapping):
        raise InvalidParameterError(f"mirror must be a mapping {{url, serves}}, got {value!r}")
    return dataclass_from_section(MirrorConfig, value, "mirror")


@dataclass(frozen=True)
class RunContext:
    """What every source needs besides its own params: where to fetch from and where to keep things."""

    mirror: MirrorConfig
    download: DownloadConfig
    repo_root: Path

    @property
    def origin(self) -> Origin:
        return self.mirror.origin

    @property
    def is_replica(self) -> bool:
        """True only for the synthetic replica: the one origin whose voxels differ from the live ones."""
        return self.origin == "replica"

    @property
    def downloads_dir(self) -> Path:
        """Raw downloads (kept until a verified conversion; never a DVC output)."""
        return self.repo_root / "data" / ".downloads"

    @property
    def checksums_path(self) -> Path:
        return self.repo_root / self.download.checksums_file

    @cached_property
    def checksums(self) -> ChecksumRegistry:
        """Pinned and recorded sha256: the ``replica`` section for the replica, ``live`` for live and a cache."""
        return ChecksumRegistry(self.checksums_path, "replica" if self.is_replica else "live")

    def url(self, live_url: str) -> str:
        """The URL fetched for ``live_url`` (rewritten onto the mirror when there is one)."""
        return rewrite(live_url, self.mirror.url)

    def downloader(self, *, progress: bool | None = None) -> Downloader:
        """A downloader over the mirror (or live) with the run's settings and checksum section."""
        return Downloader(self.download, mirror=self.mirror.url, registry=self.checksums, progress=progress)

    def tensorstore_context(self, *, concurrency: int, cache_bytes: int, copy_threads: int | None = None) -> ts.Context:
        """Shared tensorstore resources: ``concurrency`` HTTP requests in flight, the run's retry policy.

        The cache pool holds shard and minishard indices (without it every chunk would fetch its index again)
        and decoded chunks that straddle two blocks of a read.
        """
        import tensorstore as ts

        spec: dict[str, Any] = {
            "http_request_concurrency": {"limit": int(concurrency)},
            "http_request_retries": {"max_retries": int(self.download.retries),
                                     "initial_delay": f"{max(self.download.backoff_s, 0.001)}s",
                                     "max_delay": f"{self.download.backoff_max_s}s"},
            "cache_pool": {"total_bytes_limit": int(cache_bytes)},
        }
        if copy_threads is not None:
            spec["data_copy_concurrency"] = {"limit": int(copy_threads)}
        return ts.Context(spec)

    def progress(self, desc: str, total: float | None, unit: str = "B") -> tqdm:
        """A progress bar for one phase (bytes written, chunks, slices), shown only on a terminal."""
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                    disable=None, mininterval=1.0, leave=False)

    @property
    def read_policy(self) -> ReadPolicy:
        """Deadline and retries of each tensorstore read, from the ``download`` params."""
        return ReadPolicy(timeout_s=self.download.read_timeout_s, retries=self.download.retries,
                          backoff_s=self.download.backoff_s, backoff_max_s=self.download.backoff_max_s)

    def kvstore(self, live_prefix: str) -> dict[str, Any]:
        """A tensorstore ``http`` kvstore spec for the folder ``live_prefix`` (rewritten onto the mirror)."""
        base = self.url(live_prefix.rstrip("/")) + "/"
        spec: dict[str, Any] = {"driver": "http", "base_url": base}
        auth = _netrc_authorization(base)
        if auth is not None:
            spec["headers"] = [f"Authorization: {auth}"]
        return spec

    def open_tensorstore(self, spec: Mapping[str, Any], live_prefix: str, context: ts.Context,
                         what: str) -> ts.TensorStore:
        """Open ``spec`` (a driver spec without kvstore) read-only over HTTP at ``live_prefix``.

        tensorstore reports every failure (HTTP status, bad metadata) as ValueError: it becomes a DownloadError
        naming ``what`` and the redacted URL.
        """
        import tensorstore as ts

        full = {**spec, "kvstore": self.kvstore(live_prefix), "open": True,
                "recheck_cached_data": "open", "recheck_cached_metadata": "open"}
        where = f"{what} at {redact(self.url(live_prefix))}"
        future = ts.open(full, context=context, read=True)
        try:
            return future.result(timeout=self.download.read_timeout_s * (self.download.retries + 1))
        except TimeoutError as exc:
            future.cancel()
            raise DownloadError(f"opening {where} stalled: no answer within "
                                f"{self.download.read_timeout_s * (self.download.retries + 1):g} s") from exc
        except ValueError as exc:
            raise DownloadError(f"opening {where} failed: {redact_text(str(exc))}") from None


def _netrc_authorization(url: str) -> str | None:
    """A Basic ``Authorization`` value for ``url``'s host from ~/.netrc (requests reads netrc by itself)."""
    host = urlsplit(url).hostname
    try:
        auth = netrc.netrc().authenticators(host or "")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None
    if not auth or auth[2] is None:
        return None
    login, _, password = auth
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def run_context(params: Mapping[str, Any], repo_root: Path | None = None) -> RunContext:
    """The context from the top-level ``mirror`` and ``download`` params.

    The mirror comes only from params.yaml, never from the environment, so that ``dvc.lock`` always records
    where a run's bytes came from.
    """
    return RunContext(
        mirror=mirror_config(params.get("mirror")),
        download=dataclass_from_section(DownloadConfig, params.get("download"), "download"),
        repo_root=(repo_root or Path.cwd()).resolve(),
    )
