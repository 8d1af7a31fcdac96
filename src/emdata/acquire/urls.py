"""Mirror rewriting: a live URL https://HOST/PATH is fetched as MIRROR/HOST/PATH when a mirror is set."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from emdata.errors import InvalidParameterError


def validate_mirror(mirror: str | None) -> str:
    """Return the mirror base URL without a trailing slash ('' = live); reject anything but http(s)."""
    if not mirror:
        return ""
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidParameterError(f"mirror.url must be empty (live) or an http(s) base URL, got {redact(mirror)!r}")
    if parts.username is not None or parts.password is not None:
        # A password in a param would reach dvc.lock, logs and errors: credentials come from ~/.netrc.
        raise InvalidParameterError(f"mirror.url must not hold credentials ({redact(mirror)!r}): put them in "
                                    "~/.netrc for the mirror's host")
    if parts.query or parts.fragment:
        raise InvalidParameterError(f"mirror.url must be a plain base URL without query or fragment, "
                                    f"got {redact(mirror)!r}")
    return mirror.rstrip("/")


def rewrite(url: str, mirror: str | None) -> str:
    """Rewrite a live ``https://`` URL onto ``mirror``; with no mirror the URL is returned unchanged."""
    base = validate_mirror(mirror)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidParameterError(f"source URL must be absolute http(s), got {url!r}")
    if not base:
        return url
    rest = url.split("://", 1)[1]
    return f"{base}/{rest}"


def redact(url: str) -> str:
    """Drop any user:password@ part so URLs can be logged."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return parts._replace(netloc=f"***@{host}").geturl()
    return url


_AUTH_HEADER = re.compile(r"(Authorization:\s*)(\w+\s+)?[^\s\"',}\]]+", re.IGNORECASE)


def redact_text(text: str) -> str:
    """A message with any ``Authorization`` header value and URL credentials blanked (errors of libraries may
    echo the request they made)."""
    text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}***", text)
    return re.sub(r"(https?://)[^/\s:@]+:[^/\s@]+@", r"\1***@", text)
