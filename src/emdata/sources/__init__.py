"""The sources: one module each behind the ``Source`` protocol, dispatched by name from ``SOURCES``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

from emdata.errors import InvalidParameterError
from emdata.params import RunContext

# name -> module defining a module-level ``SOURCE`` object that satisfies ``Source``.
SOURCE_MODULES: dict[str, str] = {
    "epfl": "emdata.sources.epfl",
    "hemibrain": "emdata.sources.hemibrain",
    "empiar": "emdata.sources.empiar",
    "idr": "emdata.sources.idr",
    "openorganelle": "emdata.sources.openorganelle",
}


class Source(Protocol):
    """A dataset we acquire: validates its params section, then fetches and writes its one output."""

    name: str
    output: str  # path of the DVC output relative to the repo root, e.g. "data/epfl.zarr"

    def parse_params(self, section: Mapping[str, Any] | None) -> Any:
        """Validate the params section into a frozen dataclass; raise InvalidParameterError naming bad values."""
        ...

    def run(self, params: Any, ctx: RunContext) -> dict[str, Any]:
        """Fetch, convert and write ``output`` atomically; return the figures for the stage's metrics file."""
        ...


def get_source(name: str) -> Source:
    if name not in SOURCE_MODULES:
        raise InvalidParameterError(f"unknown dataset {name!r}; valid: {sorted(SOURCE_MODULES)}")
    return importlib.import_module(SOURCE_MODULES[name]).SOURCE  # type: ignore[no-any-return]
