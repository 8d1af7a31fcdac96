"""Peak RSS of each DVC stage at two sizes of the replica: memory must not grow with the volume.

Each stage runs as users run it (``python stages/<name>.py`` in a scratch workspace whose params.yaml has
``mirror: {url: <replica>, serves: replica}``), once against the small replica profile and once against the
full one (the real shapes of EPFL and IDR; hemibrain's crop at its params.yaml size; OpenOrganelle by ROI),
one process at a time; its peak resident set size comes from ``os.wait4`` (``ru_maxrss`` of that process). The output's
bytes show how much larger the second size is.

    .venv/bin/python bench/bench_memory.py [--quick] [--stages epfl,hemibrain,...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from emdata.catalog import DATASETS, find
from emdata.offline import services

REPO = Path(__file__).resolve().parents[1]
STAGES = ["epfl", "hemibrain", "empiar", "idr", "openorganelle", "metadata"]
# Per size: the replica profile and params overrides (section -> values). The small replica's hemibrain tissue
# is 384^3, so its crop is smaller than params.yaml's 1000^3. OpenOrganelle's replica keeps the real s0 shape
# (7.4 GB) at both profiles: its ROI sets the size (8 MB vs 134 MB of int16).
SIZES: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "small": ("small", {"hemibrain": {"crop_size": [256, 256, 256], "min_tissue_fraction": 0.5},
                        "openorganelle": {"roi_voxels": [[0, 0, 0], [64, 256, 256]]}}),
    "full": ("full", {"openorganelle": {"roi_voxels": [[0, 0, 0], [256, 512, 512]]}}),
}


def workspace(ws: Path, mirror: str, overrides: dict[str, dict[str, Any]]) -> None:
    ws.mkdir(parents=True)
    shutil.copytree(REPO / "stages", ws / "stages")
    shutil.copy2(REPO / "checksums.json", ws / "checksums.json")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["mirror"] = {"url": mirror, "serves": "replica"}
    for section, values in overrides.items():
        params[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(ws: Path, name: str) -> dict[str, Any]:
    log = ws / f"{name}.log"
    began = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, f"stages/{name}.py"], cwd=ws, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"stage {name} failed (exit {proc.returncode}); last lines:\n"
                           + "\n".join(log.read_text().splitlines()[-15:]))
    output = ws / ("metadata" if name == "metadata" else find(name).output)
    nbytes = sum(p.stat().st_size for p in output.rglob("*") if p.is_file()) if output.is_dir() else \
        (output.stat().st_size if output.exists() else 0)
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": seconds, "output_mb": nbytes / 1e6}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the small size of the idr and epfl stages")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--sizes", default="small,full")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    sizes = [s for s in args.sizes.split(",") if s]
    if args.quick:
        stages, sizes = ["epfl", "idr"], ["small"]
    unknown = sorted(set(stages) - set(DATASETS) - {"metadata"}) + sorted(set(sizes) - set(SIZES))
    if unknown:
        raise SystemExit(f"unknown stage(s) or size(s) {unknown}")
    results: dict[str, Any] = {"cores": os.cpu_count(), "sizes": {s: SIZES[s] for s in sizes}, "stages": {}}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for size in sizes:
            profile, overrides = SIZES[size]
            sources = [s for s in stages if s in DATASETS]
            with services.replica(profile, sources=sources) as mirror:
                ws = Path(tmp) / size
                workspace(ws, mirror, overrides)
                for name in stages:
                    results["stages"].setdefault(name, {})[size] = run_stage(ws, name)
                    print(f"{name} ({size}): {results['stages'][name][size]}", flush=True)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def report(results: dict[str, Any]) -> str:
    sizes = list(results["sizes"])
    head = " | ".join(f"{s}: output MB, peak RSS MB, s" for s in sizes)
    lines = [f"| stage | {head} | RSS ratio {sizes[-1]}/{sizes[0]} | output ratio |",
             "|---|" + "---:|" * (len(sizes) + 2)]
    for name, per in results["stages"].items():
        cells = " | ".join(f"{per[s]['output_mb']:.1f}, **{per[s]['peak_rss_mb']:.0f}**, {per[s]['seconds']:.1f}"
                           for s in sizes)
        a, b = per[sizes[0]], per[sizes[-1]]
        rss = b["peak_rss_mb"] / a["peak_rss_mb"]
        out = b["output_mb"] / a["output_mb"] if a["output_mb"] else float("nan")
        lines.append(f"| {name} | {cells} | {rss:.2f} | {out:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    sys.exit(0)
