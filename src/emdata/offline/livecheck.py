"""The live check (``make live-check``): small requests to every live source, compared with the replica, as a table.

For each source, the same requests go to the live hosts (or ``--live-base``, a mirror of them) and to the replica
(a loopback server over the built replica, or ``--replica-base``): the metadata documents, a HEAD and one byte range
of the files, one chunk of each chunked volume decoded to shape and dtype, and a key that does not exist (404 or
403?). Every request goes through the project's :class:`~emdata.acquire.download.Downloader` (or, for a chunk,
``RunContext.open_tensorstore``), with few retries and short timeouts; a host that does not answer is reported
as down, once, and not asked again.

Verdicts: ``agree``; ``same content`` (a document parses to the same JSON, its bytes differ: formatting);
``replica's own`` (a difference the replica makes on purpose: synthetic voxels, sizes of the small profile);
``DIFFER`` (the replica, or what the project assumes of the live host, is wrong: act on it); ``live down`` /
``replica down``; ``error`` (an answer that could not be read). Exit status: 1 when anything differs or failed,
2 when only a host was down, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from emdata.acquire.context import MirrorConfig, RunContext
from emdata.acquire.download import Downloader, server_md5
from emdata.acquire.params import DownloadConfig
from emdata.acquire.urls import redact
from emdata.errors import DownloadError, EmDataError

log = logging.getLogger(__name__)

SOURCES = ("epfl", "empiar", "idr", "hemibrain", "openorganelle")
# Verdicts, in the order the summary counts them.
AGREE, SAME_CONTENT, OWN, DIFFER, LIVE_DOWN, REPLICA_DOWN, ERROR = (
    "agree", "same content", "replica's own", "DIFFER", "live down", "replica down", "error")
VERDICTS = (AGREE, SAME_CONTENT, OWN, DIFFER, LIVE_DOWN, REPLICA_DOWN, ERROR)
FAILING = frozenset({DIFFER, ERROR})
DOWN = frozenset({LIVE_DOWN, REPLICA_DOWN})
# Every request is small: documents are bounded, a range is this many bytes, a chunk read is one chunk.
MAX_DOCUMENT_BYTES = 4 * 2**20
RANGE_BYTES = 16
MISSING_NAME = "emdata-live-check-no-such-object"
_STATUS = re.compile(r"\bHTTP (\d{3})\b")
_DOWN_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def check_config(timeout_s: float = 20.0, retries: int = 2) -> DownloadConfig:
    """Few retries and short timeouts: a check that hangs on a dead host is worse than one that says so."""
    return DownloadConfig(workers=1, range_workers=1, retries=retries, backoff_s=0.5, backoff_max_s=2.0,
                          connect_timeout_s=min(10.0, timeout_s), read_timeout_s=timeout_s)


# ----------------------------------------------------------------------------- answers
@dataclass(frozen=True)
class Answer:
    """What one side answered: a status, headers and (for a GET) the body; or why there is no answer."""

    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    down: str | None = None  # the host did not answer (no connection, 5xx after the retries): why
    error: str | None = None  # an answer that could not be used (a redirect elsewhere, a body too large, ...)

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


class Side:
    """One side of the comparison: the live hosts (or a mirror of them), or the replica."""

    def __init__(self, base: str, serves: str, config: DownloadConfig, repo_root: Path) -> None:
        self.ctx = RunContext(mirror=MirrorConfig(base, serves), download=config, repo_root=repo_root)
        self.fetch: Downloader = self.ctx.downloader(progress=False)
        self.down: dict[str, str] = {}  # host -> why it is taken as down (asked once, then skipped)
        self._ts_context: Any = None

    def where(self, url: str) -> str:
        return redact(self.ctx.url(url))

    def _ask(self, url: str, request: Callable[[], Answer]) -> Answer:
        host = urlsplit(url).hostname or ""
        if host in self.down:
            return Answer(down=f"{host} did not answer an earlier request ({self.down[host]})")
        try:
            return request()
        except DownloadError as exc:
            text = str(exc)
            m = _STATUS.search(text)
            status = int(m.group(1)) if m else None
            if "redirect" in text or (status is None and "failed after" not in text):
                return Answer(error=text)  # a redirect elsewhere, a body too large or undecodable: say so
            if status is not None and status not in _DOWN_STATUSES:
                return Answer(status=status)  # a 4xx is an answer (compared), not a failure
            # No connection, timeouts or 5xx through every retry: the host is down for this run.
            self.down[host] = text
            return Answer(down=text)

    def get(self, url: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Answer:
        """GET a document (decoded if sent gzip-encoded); a 4xx is an answer with that status."""
        def request() -> Answer:
            return Answer(status=200, body=self.fetch.fetch_bytes(url, max_bytes=max_bytes))

        return self._ask(url, request)

    def head(self, url: str) -> Answer:
        return self._ask(url, lambda: Answer(*self.fetch.head(url)))

    def get_range(self, url: str, first: int = 0, last: int = RANGE_BYTES - 1) -> Answer:
        """GET ``bytes=first-last`` with the downloader's session, redirect policy and retries.

        The Downloader has no public ranged GET (asked for: ``Downloader.fetch_range``); this uses its request
        and retry steps. At most ``last - first + 1`` bytes are read, whatever the server sends.
        """
        target = self.ctx.url(url)
        want = last - first + 1

        def attempt(_: int) -> Answer:
            with self.fetch._get(target, {"Range": f"bytes={first}-{last}"}) as response:
                body = bytearray()
                for block in response.raw.stream(want, decode_content=False):
                    body += block
                    if len(body) >= want:
                        break
                return Answer(response.status_code, dict(response.headers), bytes(body[:want]))

        return self._ask(url, lambda: self.fetch._with_retries(target, attempt))  # type: ignore[no-any-return]

    def read_chunk(self, spec: Mapping[str, Any], live_prefix: str, box: Callable[[Any], tuple[Any, tuple]],
                   what: str) -> tuple[Answer, Any]:
        """Open a store with ``RunContext.open_tensorstore`` and read the one chunk ``box(store)`` names:
        (answer, (array, extra)) where extra is what ``box`` returns besides the index expression."""
        from emdata.acquire.tsio import ts_result

        host = urlsplit(live_prefix).hostname or ""
        if host in self.down:
            return Answer(down=f"{host} did not answer an earlier request ({self.down[host]})"), None
        if self._ts_context is None:
            self._ts_context = self.ctx.tensorstore_context(concurrency=4, cache_bytes=8 * 2**20)
        try:
            store = self.ctx.open_tensorstore(spec, live_prefix, self._ts_context, what)
            view, extra = box(store)
            limit = self.ctx.download.read_timeout_s * (self.ctx.download.retries + 1)
            array = ts_result(view.read(), f"{what} at {self.where(live_prefix)}", limit)
        except DownloadError as exc:
            text = str(exc)
            if re.search(r"UNAVAILABLE|HTTP code 5\d\d|stalled|Failed to connect|Connection refused", text):
                self.down.setdefault(host, text[:300])
                return Answer(down=text[:500]), None
            return Answer(error=text[:500]), None
        except (ValueError, EmDataError, TimeoutError) as exc:  # a document tensorstore refused
            return Answer(error=f"{type(exc).__name__}: {str(exc)[:500]}"), None
        return Answer(status=200), (np.asarray(array), extra)

    def close(self) -> None:
        self.fetch.session.close()


# ----------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One line of the table: a fact of one source as the live host and the replica state it."""

    source: str
    check: str
    live: str
    replica: str
    verdict: str
    url: str = ""  # the live URL the fact is about
    note: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bytes):
        return value[:8].hex(" ") + (" ..." if len(value) > 8 else "")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


class Report:
    """The rows of one run, with helpers that turn two answers or two values into a row."""

    def __init__(self, source: str, live: Side, replica: Side) -> None:
        self.source = source
        self.live = live
        self.replica = replica
        self.rows: list[Row] = []

    def add(self, check: str, live: Any, replica: Any, verdict: str, url: str = "", note: str = "") -> None:
        self.rows.append(Row(self.source, check, _show(live), _show(replica), verdict, url, note))

    def unavailable(self, check: str, live: Answer, replica: Answer, url: str) -> bool:
        """A row for a side that did not answer (True), or False when both answered."""
        for answer, verdict in ((live, LIVE_DOWN), (replica, REPLICA_DOWN)):
            if answer.down is not None:
                live_cell, replica_cell = ("no answer", "not compared") if verdict == LIVE_DOWN else (
                    "not compared", "no answer")
                self.add(check, live_cell, replica_cell, verdict, url, answer.down)
                return True
        for answer, side in ((live, "live"), (replica, "replica")):
            if answer.error is not None:
                self.add(check, live.status if side == "replica" else "unreadable",
                         replica.status if side == "live" else "unreadable", ERROR, url, f"{side}: {answer.error}")
                return True
        return False

    def value(self, check: str, live: Any, replica: Any, *, own: bool = False, url: str = "",
              note: str = "") -> None:
        """Equal values agree; unequal ones DIFFER, or are the replica's own when ``own``."""
        verdict = AGREE if live == replica else OWN if own else DIFFER
        self.add(check, live, replica, verdict, url, note)

    def status(self, check: str, live: Answer, replica: Answer, url: str) -> bool:
        """The HTTP status of both (True when both answered with one)."""
        if live.down is not None or replica.down is not None:
            self.unavailable(check, live, replica, url)
            return False
        if live.status is None or replica.status is None:
            self.unavailable(check, live, replica, url)
            return False
        self.value(check, live.status, replica.status, url=url)
        return True


def json_diff(a: Any, b: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, what differs) for every place two JSON values differ (dict keys, list items, leaves)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            p = f"{path}.{key}" if path else str(key)
            if key not in b:
                yield p, "only live"
            elif key not in a:
                yield p, "only in the replica"
            else:
                yield from json_diff(a[key], b[key], p)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield path, f"{len(a)} items live, {len(b)} in the replica"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            yield from json_diff(x, y, f"{path}[{i}]")
    elif a != b or type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        yield path, f"{json.dumps(a)[:60]} live, {json.dumps(b)[:60]} in the replica"


def compare_document(report: Report, name: str, url: str, live: Answer, replica: Answer, *,
                     allowed: Sequence[str] = (), why_allowed: str = "") -> tuple[Any, Any]:
    """A JSON document: identical bytes, else the same parsed content, else the paths that differ.

    ``allowed`` are paths the replica changes on purpose (``why_allowed``). Returns both parsed documents
    (None where unavailable), for the key facts.
    """
    check = f"{name} (document)"
    if report.unavailable(check, live, replica, url):
        return None, None
    if live.status != 200 or replica.status != 200:
        report.value(f"{check}: status", live.status, replica.status, url=url)
        return None, None
    assert live.body is not None and replica.body is not None
    docs = []
    for side, answer in (("live", live), ("replica", replica)):
        try:
            docs.append(json.loads(answer.body))  # type: ignore[arg-type]
        except ValueError as exc:
            report.add(check, f"{len(live.body)} bytes", f"{len(replica.body)} bytes", ERROR, url,
                       f"{side}: not JSON ({exc}): {answer.body[:80]!r}")  # type: ignore[index]
            return None, None
    sizes = (f"{len(live.body)} bytes", f"{len(replica.body)} bytes")
    if live.body == replica.body:
        report.add(check, *sizes, AGREE, url, "identical bytes")
        return docs[0], docs[1]
    diffs = list(json_diff(docs[0], docs[1]))
    if not diffs:
        report.add(check, *sizes, SAME_CONTENT, url, "the same JSON; the bytes differ (key order or formatting)")
        return docs[0], docs[1]
    shown = "; ".join(f"{p}: {d}" for p, d in diffs[:6]) + (f"; ... {len(diffs) - 6} more" if len(diffs) > 6 else "")
    own = all(any(p == a or p.startswith(a + ".") or p.startswith(a + "[") for a in allowed) for p, _ in diffs)
    report.add(check, *sizes, OWN if own else DIFFER, url, (f"{why_allowed}: " if own else "") + shown)
    return docs[0], docs[1]


def compare_file(report: Report, name: str, url: str, *, sizes_own: bool = True, hash_header: str | None = None,
                 range_first: int = 0) -> tuple[Answer, Answer]:
    """A data file: HEAD (status, Accept-Ranges, Content-Encoding, Content-Length, the server's hash) and one
    byte range (status, Content-Range, what its first bytes are)."""
    live, replica = report.live.head(url), report.replica.head(url)
    if report.status(f"{name}: HEAD status", live, replica, url) and live.status == replica.status == 200:
        report.value(f"{name}: Accept-Ranges", live.header("Accept-Ranges"), replica.header("Accept-Ranges"),
                     url=url)
        report.value(f"{name}: Content-Encoding", live.header("Content-Encoding") or "identity",
                     replica.header("Content-Encoding") or "identity", url=url)
        report.value(f"{name}: Content-Length", live.header("Content-Length"), replica.header("Content-Length"),
                     own=sizes_own, url=url, note="the replica's files are its own (synthetic, smaller)"
                     if sizes_own and live.header("Content-Length") != replica.header("Content-Length") else "")
        if hash_header is not None:
            report.value(f"{name}: {hash_header} (server MD5)", _hash_kind(live.headers, hash_header),
                         _hash_kind(replica.headers, hash_header), url=url)
    last = range_first + RANGE_BYTES - 1
    live_r, replica_r = report.live.get_range(url, range_first, last), report.replica.get_range(url, range_first,
                                                                                                   last)
    check = f"{name}: GET bytes={range_first}-{last}"
    if report.status(f"{check} status", live_r, replica_r, url) and live_r.status == replica_r.status == 206:
        report.value(f"{check} Content-Range", _range_part(live_r), _range_part(replica_r), url=url)
        if range_first == 0:
            report.value(f"{check} content", signature(live_r.body or b""), signature(replica_r.body or b""),
                         url=url)
    return live, replica


def _hash_kind(headers: Mapping[str, str], name: str) -> str:
    value = next((v for k, v in headers.items() if k.lower() == name.lower()), None)
    if value is None:
        return "absent"
    return "an MD5" if server_md5({name: value}) else f"not an MD5 ({value[:40]})"


def _range_part(answer: Answer) -> str | None:
    """``bytes a-b/`` of a Content-Range (the total is the file's size: the replica's own)."""
    value = answer.header("Content-Range")
    return None if value is None else value.rsplit("/", 1)[0] + "/"


def signature(head: bytes) -> str:
    """What a file's first bytes say it is (the same on both sides when the replica writes the real format)."""
    if head[:4] == b"II*\x00":
        return "TIFF, little-endian"
    if head[:4] == b"MM\x00*":
        return "TIFF, big-endian"
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        return "BigTIFF"
    if len(head) >= 12 and head[:4] == b"\x00\x00\x00\x03":
        return f"DM3, byte-order flag {int.from_bytes(head[8:12], 'big')}"
    if len(head) >= 16 and head[:4] == b"\x00\x00\x00\x04":
        return f"DM4, byte-order flag {int.from_bytes(head[12:16], 'big')}"
    if head[:2] == b"\x1f\x8b":
        return "gzip stream"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd frame"
    return "bytes " + head[:4].hex(" ")


def compare_missing(report: Report, folder_url: str) -> None:
    """The status of a key that does not exist (404 is read as empty by tensorstore; 403 is an error)."""
    url = folder_url.rstrip("/") + "/" + MISSING_NAME
    report.status("a missing object: HEAD status", report.live.head(url), report.replica.head(url), url)


# ----------------------------------------------------------------------------- sources
def check_epfl(report: Report, profile: str) -> None:
    from emdata.sources.epfl import BASE_URL, SPLITS

    for name in [n for s in SPLITS for n in (f"{s}.tif", f"{s}_groundtruth.tif")] + ["volumedata.tif"]:
        compare_file(report, name, BASE_URL + name)
    compare_missing(report, BASE_URL)


def check_empiar(report: Report, profile: str) -> None:
    from emdata.offline.replica import empiar as replica_empiar
    from emdata.sources.empiar import API_URL, DATA_URL, XML_NAME, number_files, parse_autoindex

    live, replica = report.live.get(API_URL), report.replica.get(API_URL)
    allowed = [p for p, _ in json_diff(replica_empiar.api_document("full"), replica_empiar.api_document(profile))]
    compare_document(report, "API entry", API_URL, live, replica, allowed=allowed,
                     why_allowed=f"the {profile} profile's slice size")
    live, replica = report.live.get(DATA_URL), report.replica.get(DATA_URL)
    if not report.unavailable("listing", live, replica, DATA_URL) \
            and report.status("listing: status", live, replica, DATA_URL) and live.status == replica.status == 200:
        pages = [a.body.decode("utf-8", errors="replace") for a in (live, replica)]  # type: ignore[union-attr]
        report.value("listing: style", *(_listing_style(p) for p in pages), url=DATA_URL)
        (lf, ld), (rf, rd) = (parse_autoindex(p, DATA_URL) for p in pages)
        (lnum, lfiles), (rnum, rfiles) = number_files(lf, (".dm3",)), number_files(rf, (".dm3",))
        report.value("listing: image files", f"{len(lfiles)} named {lnum}", f"{len(rfiles)} named {rnum}",
                     url=DATA_URL)
        report.value("listing: other files", sorted(set(lf) - set(lfiles.values())),
                     sorted(set(rf) - set(rfiles.values())), url=DATA_URL)
        report.value("listing: sub-folders (count)", len(ld), len(rd), url=DATA_URL)
        report.value("listing: sub-folder names", ld, rd, own=True, url=DATA_URL,
                     note="" if ld == rd else "the replica's sub-folder name is a placeholder (never recorded)")
    first = replica_empiar.SLICE_NAME.format(0)
    compare_file(report, first, DATA_URL + first)
    compare_file(report, XML_NAME, DATA_URL + XML_NAME)
    compare_missing(report, DATA_URL)


def _listing_style(page: str) -> str:
    lower = page.lower()
    if "<table" in lower:
        return "table (Apache HTMLTable)"
    if "<pre" in lower:
        return "<pre> (Apache fancy or nginx)"
    return "other"


def check_idr(report: Report, profile: str) -> None:
    from emdata.sources.idr import API_URL, IMGDATA_URL, TIFF_URL, parse_api_image, parse_imgdata

    own_shape = profile != "full"
    for name, url, parse in (("JSON API image", API_URL, parse_api_image),
                             ("webclient imgData", IMGDATA_URL, parse_imgdata)):
        live, replica = report.live.get(url), report.replica.get(url)
        check = f"{name} (document)"
        if report.unavailable(check, live, replica, url) or not report.status(f"{check}: status", live, replica,
                                                                             url):
            continue
        if live.status != 200 or replica.status != 200:
            continue
        facts = []
        for side, answer in (("live", live), ("replica", replica)):
            try:
                doc = json.loads(answer.body)  # type: ignore[arg-type]
                facts.append((doc, parse(doc, [])[1]))
            except (ValueError, EmDataError) as exc:
                report.add(check, "", "", ERROR, url, f"{side}: {exc}")
                break
        else:
            (ldoc, lfacts), (rdoc, rfacts) = facts
            lkeys, rkeys = _fields(ldoc), _fields(rdoc)
            extra = [f"only live: {sorted(set(lkeys) - set(rkeys))}" if set(lkeys) - set(rkeys) else "",
                     f"only in the replica: {sorted(set(rkeys) - set(lkeys))}" if set(rkeys) - set(lkeys) else ""]
            report.add(f"{name}: fields", f"{len(lkeys)} fields", f"{len(rkeys)} fields",
                       AGREE if set(lkeys) == set(rkeys) else DIFFER, url, "; ".join(e for e in extra if e))
            for key in ("image_id", "image_name", "project_name", "dataset_name", "dtype", "voxel_size_nm",
                        "channels", "timepoints"):
                if key in lfacts or key in rfacts:
                    report.value(f"{name}: {key}", lfacts.get(key), rfacts.get(key), url=url)
            report.value(f"{name}: shape (z, y, x)", lfacts.get("shape"), rfacts.get("shape"), own=own_shape,
                         url=url, note=f"the {profile} profile's shape" if own_shape else "")
    compare_file(report, "TIFF", TIFF_URL)


def _fields(doc: Any) -> list[str]:
    """The field set of an OMERO document: its keys, two levels down (``meta.imageName``, ``data.Pixels.SizeX``)."""
    keys: list[str] = []

    def walk(value: Any, prefix: str, depth: int) -> None:
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                keys.append(prefix + str(k))
                if depth < 2:
                    walk(value[k], f"{prefix}{k}.", depth + 1)

    walk(doc, "", 0)
    return keys


def check_hemibrain(report: Report, profile: str) -> None:
    from emdata.sources.hemibrain import EM_URL, SEGMENTATION_URL

    url = f"{SEGMENTATION_URL}/info"
    seg_docs = compare_document(report, "v1.0 segmentation info", url, report.live.get(url), report.replica.get(url))
    url = f"{EM_URL}/info"
    live, replica = report.live.get(url), report.replica.get(url)
    em = None
    if not report.unavailable("EM info", live, replica, url) and report.status("EM info: status", live, replica, url) \
            and live.status == replica.status == 200:
        em = _parse_infos(report, "EM info", EM_URL, [json_or_none(a.body) for a in (live, replica)])
    if em is not None:
        li, ri = em
        report.value("EM info: data_type, channels", (li.data_type, li.num_channels),
                     (ri.data_type, ri.num_channels), url=url)
        report.value("EM info: scale keys", [s.key for s in li.scales], [s.key for s in ri.scales], url=url)
        for what, get in (("size (z, y, x)", lambda s: s.size), ("voxel_offset", lambda s: s.voxel_offset),
                          ("chunk size", lambda s: s.chunk_size), ("encoding", lambda s: s.encoding),
                          ("sharding", lambda s: _sharding(s.sharding))):
            lv, rv = [get(s) for s in li.scales], [get(s) for s in ri.scales]
            first = next((i for i, (a, b) in enumerate(zip(lv, rv, strict=False)) if a != b), None)
            if first is None and len(lv) == len(rv):
                report.value(f"EM info: {what}, every scale", lv[0] if lv else None, rv[0] if rv else None,
                             url=url, note="" if len(set(map(str, lv))) == 1 else f"{len(lv)} scales, scale 0 shown")
            else:
                i = first if first is not None else min(len(lv), len(rv))
                report.value(f"EM info: {what}, scale {i}", lv[i] if i < len(lv) else "absent",
                             rv[i] if i < len(rv) else "absent", url=url)
        _precomputed_chunk(report, "EM", EM_URL, em, shard_hash="x-goog-hash")
        compare_missing(report, f"{EM_URL}/{li.scales[-1].key}")
    if seg_docs[0] is not None and seg_docs[1] is not None:
        seg = _parse_infos(report, "v1.0 segmentation info", SEGMENTATION_URL, list(seg_docs))
        if seg is not None:
            _precomputed_chunk(report, "segmentation", SEGMENTATION_URL, seg)


def json_or_none(body: bytes | None) -> Any:
    try:
        return None if body is None else json.loads(body)
    except ValueError:
        return None


def _parse_infos(report: Report, name: str, volume_url: str, docs: Sequence[Any]) -> tuple[Any, Any] | None:
    """Both sides' precomputed ``info`` checked by the project's parser (an error row names what it refused)."""
    from emdata.formats.precomputed import parse_info

    infos = []
    for side, doc in zip(("live", "replica"), docs, strict=True):
        try:
            infos.append(parse_info(doc, volume_url))
        except (ValueError, TypeError, AttributeError, EmDataError) as exc:
            report.add(f"{name}: parsed", "", "", ERROR, f"{volume_url}/info", f"{side}: {exc}")
            return None
    return infos[0], infos[1]


def _precomputed_chunk(report: Report, name: str, volume_url: str, infos: tuple[Any, Any],
                       shard_hash: str | None = None) -> None:
    """One chunk of the coarsest scale at the volume's centre (tissue, in the real brain and the replica), read
    by tensorstore as the stage reads it; with ``shard_hash``, the HEAD and a range of the object holding it."""
    chunks = []
    for reader, info in zip((report.live, report.replica), infos, strict=True):
        scale = info.scales[-1]
        lo = [o + (n // 2) // c * c for o, n, c in zip(scale.voxel_offset, scale.size, scale.chunk_size, strict=True)]
        hi = [min(a + c, e) for a, c, e in zip(lo, scale.chunk_size, scale.end, strict=True)]

        def box(store: Any, lo: list[int] = lo, hi: list[int] = hi, scale: Any = scale) -> tuple[Any, tuple]:
            import tensorstore as ts

            view = store[ts.d["channel"][0]].T[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
            return view, (scale, lo, hi)

        chunks.append(reader.read_chunk({"driver": "neuroglancer_precomputed", "scale_index": len(info.scales) - 1},
                                        volume_url, box, f"hemibrain {name}"))
    _compare_chunks(report, f"{name} chunk (coarsest scale, centre)", volume_url, chunks)
    (_, lread), (_, rread) = chunks
    if shard_hash is None or lread is None or rread is None:
        return
    names = []
    for _, (scale, lo, hi) in (lread, rread):
        files = scale.chunk_files(lo, hi)
        names.append(files[0] if files else None)
    report.value(f"{name} chunk: object holding it", names[0], names[1], url=volume_url)
    if names[0] is not None:
        compare_file(report, f"shard {names[0]}", f"{volume_url}/{names[0]}", hash_header=shard_hash)


def _sharding(s: Any) -> str | None:
    if s is None:
        return None
    return (f"preshift {s.preshift_bits}, minishard {s.minishard_bits}, shard {s.shard_bits}, {s.hash}, "
            f"index {s.minishard_index_encoding}, data {s.data_encoding}")


def _compare_chunks(report: Report, check: str, url: str, chunks: Sequence[tuple[Answer, Any]]) -> None:
    (la, lread), (ra, rread) = chunks
    if report.unavailable(check, la, ra, url):
        return
    (larr, _), (rarr, _) = lread, rread
    report.value(f"{check}: shape, dtype", (list(larr.shape), larr.dtype.name), (list(rarr.shape), rarr.dtype.name),
                 url=url)
    report.value(f"{check}: non-zero voxels", f"{np.count_nonzero(larr)} of {larr.size}",
                 f"{np.count_nonzero(rarr)} of {rarr.size}", own=True, url=url,
                 note="values differ: the replica's voxels are synthetic")


def check_openorganelle(report: Report, profile: str) -> None:
    from emdata.sources.openorganelle import GROUP_URL, LABEL_LAYERS, N_LEVELS, STORE_URL

    compare_document(report, ".zattrs", f"{GROUP_URL}/.zattrs", report.live.get(f"{GROUP_URL}/.zattrs"),
                     report.replica.get(f"{GROUP_URL}/.zattrs"))
    zarrays: list[tuple[Any, Any]] = []
    for level in range(N_LEVELS):
        url = f"{GROUP_URL}/s{level}/.zarray"
        zarrays.append(compare_document(report, f"s{level}/.zarray", url, report.live.get(url),
                                        report.replica.get(url)))
    level = N_LEVELS - 1
    docs = zarrays[level]
    array_url = f"{GROUP_URL}/s{level}"
    if any(not isinstance(d, dict) for d in docs):
        down = [side for side in (report.live, report.replica) if urlsplit(GROUP_URL).hostname in side.down]
        verdict = ERROR if not down else LIVE_DOWN if down[0] is report.live else REPLICA_DOWN
        cells = {LIVE_DOWN: ("no answer", "not compared"), REPLICA_DOWN: ("not compared", "no answer")}.get(
            verdict, ("not compared", "not compared"))
        report.add(f"s{level} chunk", *cells, verdict, array_url,
                   f"no s{level}/.zarray on both sides to read a chunk with")
    else:
        seps = [str(d.get("dimension_separator", ".")) for d in docs]
        report.value(f"s{level}/.zarray: dimension_separator", *seps, url=array_url)
        key = seps[0].join(["0", "0", "0"])
        compare_file(report, f"s{level} chunk {key}", f"{array_url}/{key}", hash_header="ETag")
        chunks = []
        for side, doc in ((report.live, docs[0]), (report.replica, docs[1])):
            stop = [min(int(c), int(n)) for c, n in zip(doc["chunks"], doc["shape"], strict=True)]

            def box(store: Any, stop: list[int] = stop) -> tuple[Any, tuple]:
                return store[tuple(slice(0, b) for b in stop)], ()

            chunks.append(side.read_chunk({"driver": "zarr"}, array_url, box, f"OpenOrganelle s{level}"))
        _compare_chunks(report, f"s{level} chunk {key} decoded", array_url, chunks)
        compare_missing(report, array_url)
    for name, (path, _) in LABEL_LAYERS.items():
        url = f"{STORE_URL}/{path}/.zattrs"
        report.status(f"labels {name!r} .zattrs: status (the path is unverified)", report.live.head(url),
                      report.replica.head(url), url)


CHECKS: dict[str, Callable[[Report, str], None]] = {
    "epfl": check_epfl, "empiar": check_empiar, "idr": check_idr, "hemibrain": check_hemibrain,
    "openorganelle": check_openorganelle,
}


# ----------------------------------------------------------------------------- running and printing
def run_checks(live_base: str, replica_base: str, *, profile: str = "small", sources: Sequence[str] = SOURCES,
               config: DownloadConfig | None = None) -> list[Row]:
    """Compare every source of ``sources`` as served by the live hosts (``live_base`` = '' for the real ones,
    else a mirror of them) and by the replica at ``replica_base``; the rows in source order."""
    unknown = [s for s in sources if s not in CHECKS]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; valid: {list(CHECKS)}")
    if not replica_base:
        raise ValueError("replica_base must be the URL of a replica server")
    MirrorConfig(live_base, "cache"), MirrorConfig(replica_base, "replica")  # a bad URL fails here, naming it
    config = config or check_config()
    with tempfile.TemporaryDirectory(prefix="emdata-live-check-") as tmp:
        # Each source gets its own sides (downloaders are not shared across threads' host-down memos).
        def one(source: str) -> list[Row]:
            live = Side(live_base, "cache", config, Path(tmp))
            replica = Side(replica_base, "replica", config, Path(tmp))
            report = Report(source, live, replica)
            try:
                CHECKS[source](report, profile)
            except Exception as exc:  # one source's surprise must not hide the others' rows
                log.exception("live check of %s failed", source)
                report.add("the check itself", "", "", ERROR, "", f"{type(exc).__name__}: {exc}")
            finally:
                live.close()
                replica.close()
            return report.rows

        with ThreadPoolExecutor(len(sources) or 1, thread_name_prefix="live-check") as pool:
            return [row for rows in pool.map(one, sources) for row in rows]


def exit_status(rows: Sequence[Row]) -> int:
    """1: something differs or could not be read; 2: only a host was down; 0: everything agrees."""
    verdicts = {r.verdict for r in rows}
    return 1 if verdicts & FAILING else 2 if verdicts & DOWN else 0


def summary(rows: Sequence[Row]) -> str:
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    return ", ".join(f"{n} {v}" for v, n in counts.items() if n) or "no checks"


def format_table(rows: Sequence[Row], width: int = 38) -> str:
    """The table (cells cut to ``width``), then every row that is not an agreement in full, with its URL."""
    def cut(text: str, n: int) -> str:
        text = " ".join(text.split())
        return text if len(text) <= n else text[:n - 3] + "..."

    header = ("source", "check", "live", "replica", "verdict")
    cells = [header] + [(r.source, cut(r.check, 66), cut(r.live, width), cut(r.replica, width), r.verdict)
                        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notable = [r for r in rows if r.verdict not in (AGREE, SAME_CONTENT)]
    if notable:
        lines += ["", "Details:"]
        for r in notable:
            lines.append(f"- [{r.verdict}] {r.source} / {r.check}: live {r.live!r}, replica {r.replica!r}"
                         + (f" -- {r.note}" if r.note else "") + (f" ({r.url})" if r.url else ""))
    lines += ["", f"Summary: {summary(rows)}"]
    return "\n".join(lines)


@contextmanager
def replica_server(profile: str, sources: Sequence[str]) -> Iterator[str]:
    """Build (or reuse from the cache) the replica of ``profile`` and serve it on loopback; yields its URL."""
    from emdata.offline.replica import build_replica, replica_providers, serve_in_thread

    tree = build_replica(profile, sources)  # type: ignore[arg-type]
    with serve_in_thread(tree, providers=replica_providers(tree, profile, sources)) as server:  # type: ignore[arg-type]
        yield server.base_url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emdata.offline.livecheck", description=__doc__.splitlines()[0])
    parser.add_argument("--replica-profile", choices=("small", "full"), default="small",
                        help="the replica built and served for the comparison (default: small, built in seconds)")
    parser.add_argument("--live-base", default="",
                        help="fetch 'live' URLs from this mirror (BASE/HOST/PATH) instead of the real hosts")
    parser.add_argument("--replica-base", default="", help="a running replica server (else one is started)")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, from {list(SOURCES)}")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds a request may take (default 20)")
    parser.add_argument("--retries", type=int, default=2, help="retries of a failed request (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sources = [s for s in args.sources.split(",") if s]
    try:
        config = check_config(args.timeout, args.retries)
        with ExitStack() as stack:
            replica_base = args.replica_base or stack.enter_context(replica_server(args.replica_profile, sources))
            live = redact(args.live_base) if args.live_base else "the live hosts"
            print(f"Live check: {live} vs the replica ({args.replica_profile} profile) at {replica_base}",
                  flush=True)
            rows = run_checks(args.live_base, replica_base, profile=args.replica_profile, sources=sources,
                              config=config)
    except (ValueError, EmDataError) as exc:
        print(f"live check: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    return exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
