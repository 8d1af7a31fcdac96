"""What every stage script does: read params once, validate, run one source, write its metrics."""

from __future__ import annotations

import datetime
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from emdata import __version__
from emdata.acquire.context import run_context
from emdata.acquire.fsutil import stage_lock, write_json_atomic
from emdata.acquire.params import check_sections, load_params
from emdata.catalog import find
from emdata.acquire.allocator import bound_malloc
from emdata.sources import get_source

log = logging.getLogger(__name__)


def run_stage(name: str, params_path: Path | str = "params.yaml", repo_root: Path | None = None) -> dict[str, Any]:
    """Run source ``name``: every param is validated before the first network call."""
    root = (repo_root or Path.cwd()).resolve()
    params = load_params(root / params_path)
    source = get_source(name)
    check_sections(params, str(params_path))
    ctx = run_context(params, root)
    section = source.parse_params(params.get(name))
    began = time.monotonic()
    with stage_lock(root, name):
        metrics = source.run(section, ctx)
    metrics.setdefault("seconds", round(time.monotonic() - began, 2))
    # When and by what the output was made: in the metrics (not the output, which stays reproducible).
    metrics["run"] = {"acquired_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                      "emdata_version": __version__, "commit": _commit(root), "origin": ctx.origin}
    write_json_atomic(root / find(name).metrics, metrics)
    return metrics


def _commit(root: Path) -> str | None:
    """The repository's HEAD commit (with ``-dirty`` when tracked files differ), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def main(name: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    bound_malloc()  # before any thread: freed shard buffers go back to the system (bench/bench_memory.py)
    # Log lines go around the progress bars (tqdm's redirect), never through them.
    with logging_redirect_tqdm():
        run_stage(name)
