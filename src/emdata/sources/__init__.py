"""The sources: one module each behind the ``Source`` interface, dispatched by name through ``emdata.catalog``."""

from __future__ import annotations

import importlib

from emdata.catalog import find
from emdata.sources.base import Source

__all__ = ["Source", "get_source"]


def get_source(name: str) -> Source:
    """The source of dataset ``name`` (see emdata.catalog); InvalidParameterError lists the valid names."""
    return importlib.import_module(find(name).module).SOURCE  # type: ignore[no-any-return]
