"""The sources: one module each behind the ``Source`` protocol, dispatched by name through ``emdata.catalog``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

from emdata.catalog import find
from emdata.acquire.params import RunContext


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
    """The source of dataset ``name`` (see emdata.catalog); InvalidParameterError lists the valid names."""
    return importlib.import_module(find(name).module).SOURCE  # type: ignore[no-any-return]
