"""The error hierarchy: every error the package raises on purpose derives from EmDataError."""

from __future__ import annotations


class EmDataError(Exception):
    """Base class of the package's errors."""


class InvalidParameterError(EmDataError, ValueError):
    """A parameter, dataset name or argument has a bad value; raised before any network call or write."""


class DownloadError(EmDataError, OSError):
    """A download failed for good (after the configured retries); the message names the URL and status."""


class IntegrityError(DownloadError):
    """Downloaded bytes do not match the expected size or sha256; they are never renamed into place."""


class SourceMismatchError(EmDataError, RuntimeError):
    """The source served something other than what we know about it (shape, dtype, format)."""
