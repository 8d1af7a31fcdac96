"""The replica's HTTP server: serves ROOT/HOST/PATH as MIRROR/HOST/PATH with Range support and fault injection.

Besides faults (switched on by tests), the server has :class:`Behaviour`: how the real hosts behave, on by
default where the evidence says so (``shared/reference/sources/live_behaviour_evidence.md``), each behind a
switch: gzip ``Content-Encoding``, the status of a missing object per host, the autoindex style, server-side
hashes (GCS ``x-goog-hash``, S3 ``ETag``) and host outages. Content can also be generated on request
(``providers``: a real-size volume costs nothing until a chunk of it is read).
"""

from __future__ import annotations

import base64
import email.utils
import gzip
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
COPY_BLOCK = 256 * 1024
# Faults and behaviour of a running replica are read (GET) and replaced (PUT, JSON) here; no host has these paths.
CONTROL_PATH = "/_replica/faults"
BEHAVIOUR_PATH = "/_replica/behaviour"
AUTOINDEX_STYLES = ("apache-table", "pre", "nginx")

# A provider answers a path relative to the root (HOST/PATH) with the bytes to serve, or None (not its path).
Provider = Callable[[str], "bytes | None"]


@dataclass
class Behaviour:
    """How the hosts behave. Defaults are the real hosts' ways (evidence in the reference folder); each can be
    switched for a test (``ReplicaServer.set_behaviour`` or ``PUT /_replica/behaviour``)."""

    # Stored ``.gz`` files under these hosts go out as they are, labelled ``Content-Encoding: gzip`` (Apache's
    # AddEncoding): a client that decodes transparently sees other bytes and another length than the server's.
    gz_as_encoding_hosts: list[str] = field(default_factory=lambda: ["ftp.ebi.ac.uk"])
    # On demand: any path containing one of these is gzip-compressed on the fly (``Content-Encoding: gzip``), as a
    # proxy or CDN may do whatever the client asked; never a file that already is ``.gz``.
    gzip_paths: list[str] = field(default_factory=list)
    # Status of a missing object per host (404 unless named: 403 is an S3 bucket without anonymous listing).
    missing_status: dict[str, int] = field(default_factory=dict)
    # Autoindex style of folder URLs: ``index.<style>.html`` is served where it exists, else ``index.html``.
    autoindex: str = "apache-table"
    # GCS sends ``x-goog-hash: crc32c=..,md5=..``; S3 an ``ETag`` that is the MD5 of a single-part object.
    server_hashes: bool = True
    # Hosts that answer 503 to everything (e.g. IDR's OMERO web app during an outage).
    outage_hosts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.autoindex not in AUTOINDEX_STYLES:
            raise ValueError(f"autoindex must be one of {AUTOINDEX_STYLES}, got {self.autoindex!r}")
        bad = {h: s for h, s in self.missing_status.items() if s not in (403, 404)}
        if bad:
            raise ValueError(f"missing_status must map hosts to 403 or 404, got {bad}")


@dataclass
class Faults:
    """Switchable faults. Counters (``*_count``) apply to that many matching requests, then switch off.

    ``path_contains`` restricts every fault to URLs containing that text ('' = all requests).
    """

    path_contains: str = ""
    drop_after_bytes: int | None = None  # close the connection after sending this many body bytes
    drop_count: int = 0
    status: int | None = None  # answer this status (e.g. 500, 503) instead of the file
    status_count: int = 0
    retry_after_s: float | None = None  # with status 429: the Retry-After header
    truncate_to_bytes: int | None = None  # a complete-looking response whose body (and length) is cut short
    truncate_count: int = 0
    corrupt_count: int = 0  # flip a byte near the middle of the body (a different one each time)
    ignore_ranges: bool = False  # answer 200 with the whole file, as servers without Range support do
    latency_s: float = 0.0  # added before every response (not a counter: stays until reset)
    bandwidth_bps: float | None = None  # per-connection throttle (not a counter)
    redirect_to: str | None = None  # answer 302 with Location = this base URL + the request path
    redirect_count: int = 0
    requests_seen: list[str] = field(default_factory=list)

    def _take(self, name: str) -> bool:
        count = getattr(self, name)
        if count > 0:
            setattr(self, name, count - 1)
            return True
        return False


class ReplicaServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many concurrent range readers (tensorstore, parallel downloads) connect at once.
    request_queue_size = 128

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0,
                 providers: Mapping[str, Provider] | None = None) -> None:
        self.root = Path(root).resolve()
        self.faults = Faults()
        self.behaviour = Behaviour()
        self.providers = dict(providers or {})  # path prefix (HOST/PATH) -> provider of generated content
        self.lock = threading.Lock()
        self._hashes: dict[tuple[str, int, float], tuple[str, str]] = {}
        super().__init__((host, port), ReplicaHandler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up mid-response are normal (and provoked by the fault tests): no traceback.
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]

    def set_faults(self, settings: dict[str, object]) -> None:
        """Replace the faults with ``settings`` (names of ``Faults`` fields); unknown names are refused."""
        known = {f.name for f in fields(Faults)} - {"requests_seen"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; valid: {sorted(known)}")
        with self.lock:
            self.faults = Faults(**settings)  # type: ignore[arg-type]

    def faults_state(self) -> dict[str, object]:
        with self.lock:
            state = asdict(self.faults)
        state["requests_seen"] = len(state["requests_seen"])
        return state

    def reset_faults(self) -> None:
        """Faults off and the request log empty; behaviour back to the real hosts' defaults."""
        with self.lock:
            self.faults = Faults()
            self.behaviour = Behaviour()

    def set_behaviour(self, settings: Mapping[str, object]) -> None:
        """Change behaviour fields (names of ``Behaviour`` fields; the others keep their values)."""
        known = {f.name for f in fields(Behaviour)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown behaviour(s) {unknown}; valid: {sorted(known)}")
        with self.lock:
            self.behaviour = Behaviour(**{**asdict(self.behaviour), **settings})  # type: ignore[arg-type]

    def object_hashes(self, resource: _Resource) -> tuple[str, str]:
        """(md5 hex, crc32c base64) of a whole object, cached per path, size and mtime."""
        import google_crc32c  # zarr's own dependency (pinned with zarr)

        key = (resource.name, resource.size, resource.mtime)
        with self.lock:
            cached = self._hashes.get(key)
        if cached is None:
            md5, crc = hashlib.md5(usedforsecurity=False), google_crc32c.Checksum()
            for block in resource.blocks(0, resource.size):
                md5.update(block)
                crc.update(block)
            cached = (md5.hexdigest(), base64.b64encode(crc.digest()).decode())
            with self.lock:
                self._hashes[key] = cached
        return cached


@dataclass(frozen=True)
class _Resource:
    """What a URL resolves to: a file of the tree, or bytes generated by a provider."""

    name: str  # HOST/PATH relative to the root
    size: int
    mtime: float
    path: Path | None = None
    data: bytes | None = None

    def blocks(self, start: int, length: int) -> Iterator[bytes]:
        if self.data is not None:
            for i in range(start, start + length, COPY_BLOCK):
                yield self.data[i:min(i + COPY_BLOCK, start + length)]
            return
        assert self.path is not None
        with self.path.open("rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                block = f.read(min(COPY_BLOCK, left))
                if not block:
                    return
                left -= len(block)
                yield block


class ReplicaHandler(BaseHTTPRequestHandler):
    server: ReplicaServer
    protocol_version = "HTTP/1.1"
    server_version = "emdata-replica/1"
    # Headers and body go out in two writes; with Nagle's algorithm the body then waits for the client's delayed
    # ACK: ~44 ms on every keep-alive response after the first, a stall the real hosts don't have (latency is
    # the ``latency_s`` fault's job, explicit and measured).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def _resolve(self) -> _Resource | None:
        path = unquote(urlsplit(self.path).path)
        root = self.server.root
        target = (root / path.lstrip("/")).resolve()
        if root not in target.parents and target != root:
            return None
        if target.is_dir():
            styled = target / f"index.{self.server.behaviour.autoindex}.html"
            target = styled if styled.is_file() else target / "index.html"
        if target.is_file():
            stat = target.stat()
            return _Resource(target.relative_to(root).as_posix(), stat.st_size, stat.st_mtime, path=target)
        name = path.lstrip("/")
        for prefix, provider in self.server.providers.items():
            if name.startswith(prefix):
                data = provider(name)
                if data is not None:
                    return _Resource(name, len(data), 0.0, data=data)
        return None

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == CONTROL_PATH:
            self._send_json(self.server.faults_state())
            return
        if path == BEHAVIOUR_PATH:
            self._send_json(asdict(self.server.behaviour))
            return
        self._serve(head=False)

    def do_PUT(self) -> None:
        """``PUT /_replica/faults`` with a JSON object of ``Faults`` fields replaces the faults ({} clears them);
        ``PUT /_replica/behaviour`` changes the named ``Behaviour`` fields."""
        path = urlsplit(self.path).path
        if path not in (CONTROL_PATH, BEHAVIOUR_PATH):
            self._send_status(405)
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if path == CONTROL_PATH:
                self.server.set_faults(body)
            else:
                self.server.set_behaviour(body)
        except (ValueError, TypeError) as exc:
            self._send_json({"error": str(exc)}, status=400)
            return
        self._send_json(self.server.faults_state() if path == CONTROL_PATH else asdict(self.server.behaviour))

    def _send_json(self, data: object, status: int = 200) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_status(self, status: int, extra: dict[str, str] | None = None) -> None:
        body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        server = self.server
        with server.lock:
            faults = server.faults
            faults.requests_seen.append(f"{self.command} {self.path} {self.headers.get('Range', '')}".strip())
            matches = faults.path_contains in self.path
            status = faults.status if matches and faults.status and faults._take("status_count") else None
            latency, bandwidth, retry_after = faults.latency_s, faults.bandwidth_bps, faults.retry_after_s
            redirect = faults.redirect_to if matches and faults.redirect_to and faults._take("redirect_count") else None
        if latency:
            time.sleep(latency)
        if status is not None:
            extra = {"Retry-After": f"{retry_after:g}"} if status == 429 and retry_after is not None else None
            self._send_status(status, extra)
            return
        if redirect is not None:
            self._send_status(302, {"Location": redirect.rstrip("/") + self.path})
            return
        behaviour = server.behaviour
        host = unquote(urlsplit(self.path).path).lstrip("/").split("/", 1)[0]
        if host in behaviour.outage_hosts:
            self._send_status(503)
            return
        target = self._resolve()
        if target is None:
            self._send_status(behaviour.missing_status.get(host, 404))
            return
        headers: dict[str, str] = {}
        if behaviour.server_hashes and host == "storage.googleapis.com":
            md5, crc = server.object_hashes(target)
            headers["x-goog-hash"] = f"crc32c={crc},md5={base64.b64encode(bytes.fromhex(md5)).decode()}"
        elif behaviour.server_hashes and host.endswith(".s3.amazonaws.com"):
            headers["ETag"] = f'"{server.object_hashes(target)[0]}"'
        if any(p in self.path for p in behaviour.gzip_paths) and not target.name.endswith(".gz"):
            # Compressed on the fly: what is sent is the gzip stream, its length and ranges are the stream's.
            data = gzip.compress(b"".join(target.blocks(0, target.size)), mtime=0)
            target = _Resource(target.name, len(data), target.mtime, data=data)
            headers["Content-Encoding"] = "gzip"
        elif host in behaviour.gz_as_encoding_hosts and target.name.endswith(".gz"):
            headers["Content-Encoding"] = "gzip"
        size = target.size
        start, end = 0, size - 1
        status_code = 200
        range_header = self.headers.get("Range")
        if range_header and not server.faults.ignore_ranges:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                self._send_status(416, {"Content-Range": f"bytes */{size}"})
                return
            start, end = parsed
            status_code = 206
        length = end - start + 1
        # Body faults apply only to bodies long enough to show them (not to a 1-byte size probe).
        with server.lock:
            faults = server.faults
            matches = faults.path_contains in self.path and not head
            drop = truncate = None
            if matches and faults.drop_after_bytes is not None and length > faults.drop_after_bytes \
                    and faults._take("drop_count"):
                drop = faults.drop_after_bytes
            if matches and faults.truncate_to_bytes is not None and length > faults.truncate_to_bytes \
                    and faults._take("truncate_count"):
                truncate = faults.truncate_to_bytes
                length = truncate
            # The flipped byte: the body's middle, moved by the flips still to come, so that two corrupted
            # responses differ (as independent faults would).
            corrupt = (length // 2 + faults.corrupt_count) % length \
                if matches and length > 1 and faults._take("corrupt_count") else None
        self.send_response(status_code)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "text/html" if target.name.endswith(".html") else "application/octet-stream")
        self.send_header("Last-Modified", email.utils.formatdate(target.mtime, usegmt=True))
        for key, value in headers.items():
            self.send_header(key, value)
        if status_code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        self._send_body(target, start, length, drop=drop, corrupt=corrupt, bandwidth=bandwidth)

    def _send_body(self, target: _Resource, start: int, length: int, *, drop: int | None, corrupt: int | None,
                   bandwidth: float | None) -> None:
        sent = 0
        began = time.monotonic()
        for block in target.blocks(start, length):
            if corrupt is not None and sent <= corrupt < sent + len(block):
                i = corrupt - sent
                block = block[:i] + bytes([block[i] ^ 0xFF]) + block[i + 1:]
            if drop is not None and sent + len(block) > drop:
                self.wfile.write(block[: max(0, drop - sent)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            try:
                self.wfile.write(block)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            sent += len(block)
            if bandwidth:
                ahead = sent / bandwidth - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One byte range (RFC 9110), including suffix ranges ``bytes=-N``; None means unsatisfiable (416)."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        n = int(last)
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


@contextmanager
def serve_in_thread(root: Path, port: int = 0,
                    providers: Mapping[str, Provider] | None = None) -> Iterator[ReplicaServer]:
    """Serve ``root`` on loopback in a background thread (port 0 = a free port) until the block exits."""
    server = ReplicaServer(root, port=port, providers=providers)
    # A short poll interval: shutdown() waits for the next poll (0.5 s by default, per test in the suite).
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="emdata-replica",
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def cache_root() -> Path:
    """Where generated replica trees are kept between runs (override with EMDATA_REPLICA_CACHE)."""
    env = os.environ.get("EMDATA_REPLICA_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emdata" / "replica"
