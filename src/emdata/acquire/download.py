"""The download engine every source uses: resumable, verified, retried, parallel HTTP downloads.

A file is streamed into ``<dest>.partial``; an interrupted download resumes from the bytes it has with a
``Range`` request. Bytes are verified against the size the server announced (``Content-Range`` total) and
against a pinned sha256 before ``os.replace`` moves them into place; bad bytes never reach ``dest``.
Large files are fetched as parallel byte ranges written in place (``os.pwrite``), resumable per part.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from emdata import __version__
from emdata.errors import DownloadError, IntegrityError, SourceMismatchError
from emdata.acquire.fsutil import write_json_atomic
from emdata.acquire.params import DownloadConfig
from emdata.acquire.urls import redact, rewrite

log = logging.getLogger(__name__)

USER_AGENT = f"emdata/{__version__} (+https://github.com/emdata/emdata; reproducible EM data downloads)"
# Bytes still in a read buffer when a connection breaks are lost: small blocks bound what a resume refetches.
STREAM_BLOCK = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# Documents (JSON, index pages) larger than this are refused: none of the sources' documents comes close.
MAX_DOCUMENT_BYTES = 16 * 2**20
MAX_REDIRECTS = 5
# Worth retrying: the server or the path may recover. Everything else (404, 403, ...) fails at once.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Download:
    """One file to fetch: the live URL (rewritten onto the mirror at fetch time) and where it goes."""

    url: str
    dest: Path
    size: int | None = None  # expected size in bytes, when known
    sha256: str | None = None  # pinned checksum, when known (else looked up in / recorded to the registry)


@dataclass(frozen=True)
class DownloadResult:
    url: str
    dest: Path
    size: int
    sha256: str
    fetched_bytes: int  # bytes that crossed the network in this run (0 when the file was already here)
    seconds: float
    reused: bool


class _RetryableStatus(Exception):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def make_session(config: DownloadConfig) -> requests.Session:
    session = requests.Session()
    pool = config.workers * config.range_workers + 4
    adapter = HTTPAdapter(pool_connections=pool, pool_maxsize=pool, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    # The bytes on the server, not a transfer encoding of them: a body still labelled gzip is then the stored
    # object itself (e.g. Apache's AddEncoding on a .gz file), and is kept as it is.
    session.headers["Accept-Encoding"] = "identity"
    return session


class ChecksumRegistry:
    """sha256 and size per live URL, kept in a JSON file: ``{"live": {url: {...}}, "replica": {url: {...}}}``.

    The replica's voxels are synthetic, so its bytes have a section of their own; the live hosts and a cache of
    their bytes share ``live``. Entries not pinned by hand are recorded on first download so the next run
    verifies them.
    """

    SECTIONS = ("live", "replica")

    def __init__(self, path: Path | None, section: str) -> None:
        if section not in self.SECTIONS:
            raise ValueError(f"checksum section must be one of {self.SECTIONS}, got {section!r}")
        self.path = path
        self.section = section
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, dict[str, Any]]] = {key: {} for key in self.SECTIONS}
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text())
            except ValueError as exc:
                raise IntegrityError(f"{path}: not a JSON checksum file ({exc})") from exc
            unknown = sorted(set(loaded) - set(self.SECTIONS)) if isinstance(loaded, dict) else ["<not a mapping>"]
            if unknown:
                raise IntegrityError(f"{path}: unknown section(s) {unknown}; valid: {list(self.SECTIONS)}")
            for key in self._data:
                self._data[key].update(loaded.get(key, {}))

    def get(self, url: str) -> dict[str, Any] | None:
        return self._data[self.section].get(url)

    def record(self, url: str, size: int, sha256: str, verified_by: str = "first seen (a document)") -> None:
        """Record a verified file's hash (not a pin: a later mismatch says when and how it was recorded)."""
        when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        with self._lock:
            self._data[self.section][url] = {"size": size, "sha256": sha256, "recorded": when,
                                             "verified_by": verified_by}
            self._save()

    def forget(self, url: str) -> bool:
        """Drop a recorded or pinned hash (to accept an upstream change); False when there was none."""
        with self._lock:
            found = self._data[self.section].pop(url, None) is not None
            self._save()
        return found

    def entries(self) -> dict[str, dict[str, Any]]:
        return dict(self._data[self.section])

    def _save(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self._data)


def sha256_file(path: Path, block: int = 8 * STREAM_BLOCK) -> str:
    return hash_file(path, block)[0]


def hash_file(path: Path, block: int = 8 * STREAM_BLOCK) -> tuple[str, str]:
    """(sha256, md5) of a file in one pass (md5 only to check the hash a server sends)."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(block):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


_ETAG_MD5 = re.compile(r'^(?:W/)?"?([0-9a-fA-F]{32})"?$')


def server_md5(headers: Mapping[str, str]) -> str | None:
    """The MD5 (hex) of the whole object a server states: GCS ``x-goog-hash: ..md5=<base64>``, or an S3 ``ETag``
    that is a plain MD5 (single-part uploads; multipart ETags end in ``-N`` and are not an MD5)."""
    for part in headers.get("x-goog-hash", "").split(","):
        key, _, value = part.strip().partition("=")
        if key == "md5" and value:
            try:
                raw = base64.b64decode(value, validate=True)
            except ValueError:
                return None
            return raw.hex() if len(raw) == 16 else None
    m = _ETAG_MD5.match(headers.get("ETag", "").strip())
    return m.group(1).lower() if m and not headers.get("ETag", "").startswith("W/") else None


class Downloader:
    """Fetches :class:`Download` items from ``mirror`` (or live) with the settings of ``config``."""

    def __init__(self, config: DownloadConfig, *, mirror: str = "", registry: ChecksumRegistry | None = None,
                 session: requests.Session | None = None, progress: bool | None = None,
                 sleep: Callable[[float], None] = time.sleep, redirect_hosts: Sequence[str] = ()) -> None:
        self.config = config
        self.mirror = mirror
        # Redirects are followed only to these hosts (a source known to redirect names them); any other
        # redirect fails, naming where it pointed. Nothing of ours (no auth header) travels with a redirect.
        self.redirect_hosts = frozenset(redirect_hosts)
        self.registry = registry or ChecksumRegistry(None, "live")  # in memory only
        self.session = session or make_session(config)
        self.progress = progress  # None = a bar only on a terminal
        self._sleep = sleep
        self._bar: tqdm | None = None
        self._server_md5: dict[str, str] = {}  # fetched URL -> the MD5 its server stated for the whole object
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- public API
    def fetch_bytes(self, url: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
        """GET a small document (metadata JSON, an index page) with the same retries and timeouts.

        At most ``max_bytes`` are read (a document is never allowed to fill memory); a gzip-encoded body is
        decoded, within the same bound, since documents are parsed, not stored.
        """
        target = rewrite(url, self.mirror)

        def attempt(_: int) -> bytes:
            with self._get(target, {}) as response:
                body = bytearray()
                for block in response.raw.stream(STREAM_BLOCK, decode_content=False):
                    body += block
                    if len(body) > max_bytes:
                        raise DownloadError(f"GET {redact(target)}: the document is larger than {max_bytes} bytes")
                _check_length(response, len(body), target)
                if response.headers.get("Content-Encoding", "identity").lower() in ("gzip", "x-gzip"):
                    return _gunzip(bytes(body), max_bytes, target)
                return bytes(body)

        return self._with_retries(target, attempt)  # type: ignore[no-any-return]

    def fetch_json(self, url: str) -> Any:
        """GET a JSON document; see :meth:`fetch_json_and_bytes`."""
        return self.fetch_json_and_bytes(url)[0]

    def fetch_json_and_bytes(self, url: str) -> tuple[Any, bytes]:
        """GET a JSON document and the bytes it came in.

        A body that does not parse (cut short with a matching length, garbled, a maintenance page) is fetched
        again with the same retries as a failed request; then it fails naming the URL and what came instead.
        """
        target = redact(rewrite(url, self.mirror))
        for n in range(self.config.retries + 1):
            body = self.fetch_bytes(url)
            try:
                return json.loads(body), body
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
                problem = f"expected a JSON document, got {body[:60]!r}... ({exc})"
            if n < self.config.retries:
                delay = min(self.config.backoff_s * 2**n, self.config.backoff_max_s)
                log.warning("GET %s: %s; retry %d/%d in %.1f s", target, problem, n + 1, self.config.retries, delay)
                self._sleep(delay)
        raise SourceMismatchError(f"{target}: {problem} (after {self.config.retries + 1} attempts)")

    def download_all(self, items: Sequence[Download]) -> list[DownloadResult]:
        """Download every item (``config.workers`` at a time) with one progress bar; results keep the order."""
        # Sizes known from the items or the registry give the bar a total, hence an ETA.
        sizes = [self._expected(i)["size"] for i in items]
        total = sum(sizes) if all(s is not None for s in sizes) else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="download",
                  disable=None if self.progress is None else not self.progress, mininterval=1.0) as bar:
            self._bar = bar
            try:
                if len(items) == 1 or self.config.workers == 1:
                    return [self.download(i) for i in items]
                with ThreadPoolExecutor(self.config.workers, thread_name_prefix="download") as pool:
                    return list(pool.map(self.download, items))
            finally:
                self._bar = None

    def download(self, item: Download) -> DownloadResult:
        """Fetch one file into place, verified; reuse it when it is already there and verifies.

        Verified means: against a pinned sha256, else the one recorded on an earlier run, else the MD5 the server
        states; a file with none of these is downloaded a second time and the two must agree before it is
        kept and its hash recorded. Nothing unverified is ever recorded as good.
        """
        began = time.monotonic()
        dest = Path(item.dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        expected = self._expected(item)
        if dest.exists():
            size = dest.stat().st_size
            if expected["sha256"] is not None and size == expected.get("size", size) \
                    and sha256_file(dest) == expected["sha256"]:
                log.info("%s: already present and verified (%d bytes)", dest.name, size)
                self._advance(size)
                return DownloadResult(item.url, dest, size, expected["sha256"], 0, time.monotonic() - began, True)
            log.warning("%s: present but nothing verifies it (or it differs); downloading again", dest)
            dest.unlink()
        target = rewrite(item.url, self.mirror)
        partial = _partial(dest)
        fetched = 0
        # One bad copy may be a transient fault: a file that does not match its expected hash is downloaded once
        # more, afresh, before it fails.
        for attempt in range(2 if self.config.retries else 1):
            fetched += self._fetch(target, dest, expected["size"])
            size = partial.stat().st_size
            digest, md5 = hash_file(partial)
            with self._lock:
                stated = self._server_md5.pop(target, None)
            if expected["sha256"] in (None, digest) or attempt:
                break
            log.warning("%s: sha256 %s is not the expected %s; downloading it once more", dest.name, digest,
                        expected["sha256"])
            _discard_partial(dest)
        self._verify(item.url, partial, size, digest, expected)
        if stated is not None and stated != md5:
            self._verify(item.url, partial, size, digest, {"server md5": stated, "md5": md5})
        how = expected["how"] or ("server md5" if stated is not None else None)
        if how is None:
            more, digest = self._confirm(target, dest, digest)
            fetched += more
            how = "two downloads agreed"
        os.replace(partial, dest)
        _parts_file(dest).unlink(missing_ok=True)
        if expected["how"] is None:
            self.registry.record(item.url, size, digest, how)
        seconds = time.monotonic() - began
        log.info("%s: %d bytes in %.1f s (%.1f MB/s), verified by %s", dest.name, size, seconds,
                 fetched / 1e6 / max(seconds, 1e-9), how)
        return DownloadResult(item.url, dest, size, digest, fetched, seconds, False)

    # ----------------------------------------------------------------- internals
    def _expected(self, item: Download) -> dict[str, Any]:
        """Size and sha256 to verify against, and how they are known: pinned by a person, or recorded."""
        known = self.registry.get(item.url) or {}
        sha = item.sha256 or known.get("sha256")
        how = "pinned" if item.sha256 or (sha and "recorded" not in known) else "recorded" if sha else None
        return {"size": item.size if item.size is not None else known.get("size"), "sha256": sha, "how": how,
                "recorded": None if item.sha256 else known.get("recorded")}

    def _fetch(self, target: str, dest: Path, size: int | None) -> int:
        """Download ``target`` into ``dest``'s ``.partial`` (resumed, ranged when large); the bytes fetched."""
        threshold = int(self.config.range_threshold_mb * 2**20)
        # An interrupted ranged download goes on in ranges, whatever the threshold says now; a file known to be
        # large is probed for Range support first; one of unknown size starts as a stream, which switches to
        # ranges as soon as its first response shows a large file (no extra round trip for small files).
        total = None
        if _parts_file(dest).exists() or (size is not None and size >= threshold):
            total = self._probe_total(target)
        try:
            if total is not None:
                return self._download_ranges(target, dest, total)
            return self._download_stream(target, dest, ranges_from=threshold)
        except _UseRanges as switch:
            return self._download_ranges(target, dest, switch.total)

    def _confirm(self, target: str, dest: Path, digest: str) -> tuple[int, str]:
        """A file nothing can verify: fetch it again (a third time if they differ); two must agree.

        Returns the bytes fetched and the agreed sha256 (an agreeing copy is left as ``dest``'s partial).
        """
        fetched = 0
        digests = [digest]
        checks = [dest.with_name(f"{dest.name}.check{n}") for n in (2, 3)]
        for check in checks:  # a copy is always fetched afresh: never resumed from an earlier run's leftovers
            _discard_partial(check)
        for n, check in enumerate(checks, 2):
            fetched += self._fetch(target, check, None)
            digests.append(sha256_file(_partial(check)))
            agreed = [i for i, d in enumerate(digests[:-1]) if d == digests[-1]]
            if agreed:
                if agreed[0] != 0:  # the first copy was the odd one out: keep an agreeing one
                    os.replace(_partial(check), _partial(dest))
                for other in checks:
                    _discard_partial(other)
                return fetched, digests[-1]
            log.warning("%s: download %d has sha256 %s, earlier ones %s; fetching again", dest.name, n,
                        digests[-1], digests[:-1])
        for other in checks:
            _discard_partial(other)
        _discard_partial(dest)
        raise IntegrityError(f"{redact(target)}: three downloads gave three different sha256 {digests}; nothing "
                             "pinned or stated by the server can tell the good one, so none is kept")

    def _advance(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.update(n)

    def _verify(self, url: str, partial: Path, size: int, digest: str, expected: dict[str, Any]) -> None:
        problem = None
        if expected.get("size") is not None and size != expected["size"]:
            problem = f"size {size} != expected {expected['size']}"
        elif expected.get("sha256") is not None and digest != expected["sha256"]:
            problem = f"sha256 {digest} != expected {expected['sha256']}"
            if expected.get("how") == "recorded":
                problem = (f"sha256 {digest} differs from {expected['sha256']}, recorded on {expected['recorded']}; "
                           f"if the file changed upstream, accept it with `emdata checksums forget {url}` and run "
                           "again")
        elif "server md5" in expected:
            problem = f"md5 {expected['md5']} != {expected['server md5']} stated by the server (x-goog-hash/ETag)"
        if problem:
            _discard_partial(partial.with_suffix(""))
            raise IntegrityError(f"{redact(url)}: {problem}; the bad download was deleted, not kept")

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        timeout = (self.config.connect_timeout_s, self.config.read_timeout_s)
        response = self.session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=False)
        for _ in range(MAX_REDIRECTS):
            if not response.is_redirect:
                break
            location = urljoin(response.url, response.headers.get("Location", ""))
            response.close()
            host = urlsplit(location).hostname or ""
            if host not in self.redirect_hosts:
                raise DownloadError(f"GET {redact(url)}: HTTP {response.status_code} redirect to {redact(location)}; "
                                    f"{host!r} is not a host this source is known to redirect to, so it is not "
                                    "followed")
            response = self.session.get(location, headers=headers, stream=True, timeout=timeout,
                                        allow_redirects=False)
        else:
            response.close()
            raise DownloadError(f"GET {redact(url)}: more than {MAX_REDIRECTS} redirects")
        if response.status_code in RETRY_STATUSES:
            retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
            response.close()
            raise _RetryableStatus(response.status_code, retry_after)
        if response.status_code == 416:
            response.close()
            m = re.match(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
            raise _RangeNotSatisfiable(f"GET {redact(url)}: HTTP 416 for {headers.get('Range')}",
                                       int(m.group(1)) if m else None)
        if response.status_code >= 400:
            response.close()
            raise DownloadError(f"GET {redact(url)} failed: HTTP {response.status_code} {response.reason}")
        md5 = server_md5(response.headers)
        if md5 is not None:
            with self._lock:
                self._server_md5[url] = md5
        return response

    def head(self, url: str) -> tuple[int, Mapping[str, str]]:
        """HEAD a live URL (rewritten onto the mirror): its status and headers, with the same retries.

        A 4xx answer is returned, not raised (the caller asks whether something exists); 5xx and 429 are retried.
        """
        target = rewrite(url, self.mirror)
        timeout = (self.config.connect_timeout_s, self.config.read_timeout_s)

        def attempt(_: int) -> tuple[int, Mapping[str, str]]:
            response = self.session.head(target, timeout=timeout, allow_redirects=False)
            response.close()
            if response.status_code in RETRY_STATUSES:
                raise _RetryableStatus(response.status_code, _retry_after_seconds(response.headers.get("Retry-After")))
            return response.status_code, dict(response.headers)

        return self._with_retries(target, attempt)  # type: ignore[no-any-return]

    @staticmethod
    def _refuse_recoding(response: requests.Response, url: str) -> None:
        """A file body compressed in transit although identity was asked: its bytes are not the file's."""
        encoding = response.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("identity", "") and not (encoding in ("gzip", "x-gzip")
                                                      and urlsplit(url).path.endswith((".gz", ".tgz"))):
            response.close()
            raise DownloadError(f"GET {redact(url)}: the server sent the body with Content-Encoding {encoding!r} "
                                "although identity was asked; the bytes would not be the file's, so none are kept")

    def _with_retries(self, url: str, attempt: Callable[[int], Any]) -> Any:
        """Run ``attempt`` until it succeeds or ``config.retries`` retries are spent (exponential backoff)."""
        last = ""
        for n in range(self.config.retries + 1):
            try:
                return attempt(n)
            except _RetryableStatus as exc:
                last = f"HTTP {exc.status}"
                delay = exc.retry_after
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError, _ShortBody) as exc:
                last = f"{type(exc).__name__}: {exc}"
                delay = None
            if n == self.config.retries:
                break
            if delay is None:
                delay = min(self.config.backoff_s * 2**n, self.config.backoff_max_s)
            log.warning("GET %s: %s; retry %d/%d in %.1f s", redact(url), last, n + 1, self.config.retries, delay)
            self._sleep(delay)
        raise DownloadError(f"GET {redact(url)} failed after {self.config.retries + 1} attempts: {last}")

    def _probe_total(self, url: str) -> int | None:
        """The file's size from a one-byte range request (None when the server ignores ranges)."""
        def attempt(_: int) -> int | None:
            with self._get(url, {"Range": "bytes=0-0"}) as response:
                if response.status_code != 206:
                    return None
                m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                return int(m.group(3)) if m and m.group(3) != "*" else None

        return self._with_retries(url, attempt)  # type: ignore[no-any-return]

    def _download_stream(self, url: str, dest: Path, ranges_from: int | None = None) -> int:
        """One stream into ``.partial``, resumed from its current length after any interruption.

        With ``ranges_from``, a fresh download whose first response announces at least that many bytes (and
        honours Range) raises :class:`_UseRanges` instead, before reading the body.
        """
        partial = _partial(dest)
        fetched = 0

        def attempt(_: int) -> None:
            nonlocal fetched
            have = partial.stat().st_size if partial.exists() else 0
            try:
                response = self._get(url, {"Range": f"bytes={have}-"})
            except _RangeNotSatisfiable as exc:
                if not have:
                    raise
                if exc.total == have:
                    return  # the partial is already complete (stopped before its rename): verify it
                # The partial is longer than the file: it changed upstream. Start again.
                log.warning("%s: %d bytes on disk but the server has %s; starting again", dest.name, have, exc.total)
                partial.unlink()
                self._advance(-have)
                raise _ShortBody("resume offset beyond the end of the file") from None
            self._refuse_recoding(response, url)
            with response:
                start, total = _range_of(response, have)
                if ranges_from is not None and not have and response.status_code == 206 \
                        and total is not None and total >= ranges_from:
                    raise _UseRanges(total)
                if start == 0 and have:
                    log.warning("%s: server ignored the resume request; starting again", dest.name)
                    self._advance(-have)
                mode = "r+b" if start else "wb"
                with partial.open(mode if partial.exists() else "wb") as f:
                    f.seek(start)
                    f.truncate()
                    try:
                        self._copy(response, f)
                    finally:
                        got = f.tell() - start
                        fetched += got
                if total is not None and start + got != total:
                    raise _ShortBody(f"body ended at byte {start + got} of {total}")

        if partial.exists():
            log.info("%s: resuming after %d bytes already downloaded", dest.name, partial.stat().st_size)
            self._advance(partial.stat().st_size)
        self._with_retries(url, attempt)
        return fetched

    def _copy(self, response: requests.Response, f: Any) -> None:
        for block in response.raw.stream(STREAM_BLOCK, decode_content=False):
            f.write(block)
            self._advance(len(block))

    def _download_ranges(self, url: str, dest: Path, total: int) -> int:
        """Parallel byte ranges written in place; finished parts are listed in ``<dest>.partial.parts``."""
        partial, parts_file = _partial(dest), _parts_file(dest)
        part = max(1, int(self.config.range_part_mb * 2**20))
        done: set[int] = set()
        saved = json.loads(parts_file.read_text()) if parts_file.exists() else None
        if saved is not None and not partial.exists():  # a list of finished parts without their bytes
            log.warning("%s: a parts list without its partial file; starting again", dest.name)
            parts_file.unlink()
            saved = None
        if saved is not None and saved.get("total") != total:
            log.warning("%s: the file changed upstream (%s -> %d bytes); starting again", dest.name,
                        saved.get("total"), total)
            partial.unlink(missing_ok=True)
            saved = None
        if saved is not None:
            part = int(saved["part"])  # the finished parts were cut with the saved part size
            done = set(saved.get("done", []))
        spans = [(s, min(s + part, total) - 1) for s in range(0, total, part)]
        if saved is None and partial.exists():
            # A single-stream partial: its prefix is good; whole parts inside it count as done.
            have = partial.stat().st_size
            done = {s for s, e in spans if e < have}
        with partial.open("r+b" if partial.exists() else "wb") as f:
            f.truncate(total)
        lock = threading.Lock()
        self._advance(sum(e - s + 1 for s, e in spans if s in done))
        fetched = 0
        fd = os.open(partial, os.O_WRONLY)
        try:
            def fetch_span(span: tuple[int, int]) -> None:
                nonlocal fetched
                start, end = span

                def attempt(_: int) -> None:
                    nonlocal fetched
                    pos = start
                    try:
                        with self._get(url, {"Range": f"bytes={start}-{end}"}) as response:
                            self._refuse_recoding(response, url)
                            got_start, _total = _range_of(response, start)
                            if got_start != start or response.status_code != 206:
                                raise DownloadError(
                                    f"GET {redact(url)}: server did not honour Range bytes={start}-{end}")
                            for block in response.raw.stream(STREAM_BLOCK, decode_content=False):
                                os.pwrite(fd, block, pos)
                                pos += len(block)
                                self._advance(len(block))
                        if pos != end + 1:
                            raise _ShortBody(f"range {start}-{end} ended at byte {pos}")
                    except BaseException:
                        self._advance(-(pos - start))  # the part is fetched again from its start
                        raise
                    finally:
                        with lock:
                            fetched += pos - start

                self._with_retries(url, attempt)
                with lock:
                    done.add(start)
                    write_json_atomic(parts_file, {"total": total, "part": part, "done": sorted(done)})

            todo = [s for s in spans if s[0] not in done]
            with ThreadPoolExecutor(self.config.range_workers, thread_name_prefix="range") as pool:
                list(pool.map(fetch_span, todo))
        finally:
            os.close(fd)
        return fetched


class _RangeNotSatisfiable(DownloadError):
    """HTTP 416: the requested range starts at or beyond the end of the file (``total`` bytes, if said)."""

    def __init__(self, message: str, total: int | None) -> None:
        super().__init__(message)
        self.total = total


class _UseRanges(Exception):
    """A stream found a large file with Range support: fetch it as parallel ranges instead."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.total = total


class _ShortBody(Exception):
    """The server closed a response before the bytes it announced (retried, resuming where it stopped)."""


def _discard_partial(dest: Path) -> None:
    """Remove ``dest``'s partial download and its list of finished parts (they only make sense together)."""
    _partial(dest).unlink(missing_ok=True)
    _parts_file(dest).unlink(missing_ok=True)


def _partial(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


def _parts_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial.parts")


def _range_of(response: requests.Response, asked_from: int) -> tuple[int, int | None]:
    """(first byte, file size) of a response: 206 says it in Content-Range, 200 is the whole file."""
    if response.status_code == 206:
        m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if not m:
            raise DownloadError(f"206 without a valid Content-Range from {redact(response.url)}")
        return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))
    length = response.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def _check_length(response: requests.Response, got: int, url: str) -> None:
    """A body shorter than its Content-Length is a broken transfer (retried), never a document."""
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) != got:
        raise _ShortBody(f"GET {redact(url)}: body of {got} bytes, Content-Length {length}")


def _gunzip(body: bytes, max_bytes: int, url: str) -> bytes:
    """Decode a gzip-encoded document, at most ``max_bytes`` of it (a gzip bomb fails, it does not fill memory)."""
    decoder = zlib.decompressobj(wbits=31)
    try:
        out = decoder.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise DownloadError(f"GET {redact(url)}: body labelled gzip does not decode ({exc})") from exc
    if len(out) > max_bytes or decoder.unconsumed_tail:
        raise DownloadError(f"GET {redact(url)}: the decoded document is larger than {max_bytes} bytes")
    return out


def transfer_figures(results: Sequence[DownloadResult], seconds: float) -> dict[str, Any]:
    """The numbers a stage reports about its downloads (for its metrics file)."""
    fetched = sum(r.fetched_bytes for r in results)
    return {"files": len(results), "downloaded_bytes": fetched, "download_seconds": round(seconds, 2),
            "download_MBps": round(fetched / 1e6 / max(seconds, 1e-9), 1)}


def discard_downloads(results: Sequence[DownloadResult], folder: Path) -> None:
    """Delete raw downloads once their conversion is verified and in place; ``folder`` too if left empty."""
    for r in results:
        Path(r.dest).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # not empty (other files) or already gone
        pass
