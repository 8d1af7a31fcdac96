"""Mirror rewriting: a live URL https://HOST/PATH is fetched as MIRROR/HOST/PATH when a mirror is set."""

from __future__ import annotations

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
