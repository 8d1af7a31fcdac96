"""What every stage script does: read params once, validate, run one source, write its metrics."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from emdata.acquire.fsutil import write_json_atomic
from emdata.acquire.params import load_params, run_context
from emdata.sources import get_source

log = logging.getLogger(__name__)


def run_stage(name: str, params_path: Path | str = "params.yaml", repo_root: Path | None = None) -> dict[str, Any]:
    """Run source ``name``: every param is validated before the first network call."""
    root = (repo_root or Path.cwd()).resolve()
    params = load_params(root / params_path)
    source = get_source(name)
    ctx = run_context(params, root)
    section = source.parse_params(params.get(name))
    began = time.monotonic()
    metrics = source.run(section, ctx)
    metrics.setdefault("seconds", round(time.monotonic() - began, 2))
    write_json_atomic(root / "metrics" / f"{name}.json", metrics)
    return metrics


def main(name: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    run_stage(name)
