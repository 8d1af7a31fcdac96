"""Peak RSS of each DVC stage at two sizes that both span many output shards: memory must not grow with the volume.

Each stage runs as users run it (``python stages/<name>.py`` in a scratch workspace whose params.yaml has
``mirror: {url: <replica>, serves: replica}``), one process at a time, at two sizes ("1x", "2x") whose level 0
spans more output shards than the writer keeps in flight, "2x" about twice "1x" in voxels:

- epfl (the training split and its mask): the replica's ``double`` profile (165 x 768 x 2048) vs ``quad`` (x 4096);
  idr: ``double`` (184 x 775 x 2242) vs ``quad`` (x 4484): their real shapes span too few 64 MiB output shards;
- empiar: the replica's ``half`` profile (16 slices of 5500 x 2748) vs the real 16 x 5500 x 5496;
- hemibrain: crop 500 x 1000 x 1000 vs params.yaml's 1000^3, with its segmentation;
- openorganelle: ROI 256 x 512 x 1024 vs 512 x 512 x 1024 voxels of s0 (int16);
- metadata: over the outputs of that size.

While the stage runs, a sampler reads its ``/proc/<pid>/status`` every 20 ms: the peaks of RssAnon (heap,
arenas, tensorstore buffers: what the process allocated) and RssFile (shared libraries and pages of
memory-mapped files, which the kernel can drop at any time) are reported apart; ``peak_rss_mb`` is the kernel's
high-water mark of their sum (``ru_maxrss`` from ``os.wait4``). A bounded stage has an RSS ratio (2x / 1x) near
1 while its output doubles. ``--repeats N`` runs the sizes interleaved N times (median, min..max of the
per-repeat ratios). ``--sizes small`` runs the tiny test profile only (``--quick``: epfl and idr).

    .venv/bin/python bench/bench_memory.py [--quick] [--stages epfl,hemibrain,...] [--sizes 1x,2x] [--repeats N]
                                           [--json F] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from emdata.catalog import DATASETS, find
from emdata.offline import services

REPO = Path(__file__).resolve().parents[1]
STAGES = ["epfl", "hemibrain", "empiar", "idr", "openorganelle", "metadata"]


# Per size: the replica profile serving each file stage (hemibrain and OpenOrganelle always come from "full": their
# size is a param) and params.yaml overrides (section -> values). "1x" and "2x" both span more output shards than
# the writer keeps in flight (128 MiB of level-0 shards written + as many read back, one a level above), "2x"
# about twice "1x". EPFL and IDR run at 2x and 4x their real shape: with 64 MiB shards (ngff.UINT8_SHARDS) the
# real shapes hold 4 and 6 level-0 shards, too few to fill the writer (1x real / 2x: 1.16x and 1.19x measured).
SIZES: dict[str, dict[str, Any]] = {
    "small": {"profiles": dict.fromkeys(("epfl", "idr", "empiar", "hemibrain", "openorganelle"), "small"), "overrides": {
        "hemibrain": {"crop_size": [256, 256, 256], "min_tissue_fraction": 0.5},
        "openorganelle": {"roi_voxels": [[0, 0, 0], [64, 256, 256]]}}},
    "1x": {"profiles": {"epfl": "double", "idr": "double", "empiar": "half"}, "overrides": {
        "epfl": {"splits": ["training"]},
        "hemibrain": {"crop_size": [500, 1000, 1000]},
        "openorganelle": {"roi_voxels": [[0, 0, 0], [256, 512, 1024]]}}},
    "2x": {"profiles": {"epfl": "quad", "idr": "quad", "empiar": "full"}, "overrides": {
        "epfl": {"splits": ["training"]},
        "openorganelle": {"roi_voxels": [[0, 0, 0], [512, 512, 1024]]}}},
}
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def workspace(ws: Path, overrides: dict[str, dict[str, Any]]) -> None:
    ws.mkdir(parents=True)
    shutil.copytree(REPO / "stages", ws / "stages")
    shutil.copy2(REPO / "checksums.json", ws / "checksums.json")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def set_mirror(ws: Path, mirror: str) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["mirror"] = {"url": mirror, "serves": "replica"}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def read_status(pid: int) -> dict[str, int]:
    """kB per field of ``/proc/<pid>/status`` (empty once the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in STATUS_FIELDS:
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


class Sampler(threading.Thread):
    """The peak of each /proc/<pid>/status field while the process runs."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peaks: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for key, kb in read_status(self.pid).items():
                self.peaks[key] = max(self.peaks.get(key, 0), kb)
            self.stop.wait(self.every_s)


def run_stage(ws: Path, name: str) -> dict[str, Any]:
    log = ws / f"{name}.log"
    began = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, f"stages/{name}.py"], cwd=ws, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        sampler = Sampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.stop.set()
        sampler.join()
    seconds = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"stage {name} failed (exit {proc.returncode}); last lines:\n"
                           + "\n".join(log.read_text().splitlines()[-15:]))
    output = ws / ("metadata" if name == "metadata" else find(name).output)
    files = [p for p in output.rglob("*") if p.is_file()] if output.is_dir() else [output] if output.exists() else []
    peaks = sampler.peaks
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "rss_anon_mb": peaks.get("RssAnon", 0) / 1024,
            "rss_file_mb": peaks.get("RssFile", 0) / 1024, "seconds": seconds,
            "output_mb": sum(p.stat().st_size for p in files) / 1e6, "output_files": len(files)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the small size of the idr and epfl stages")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--sizes", default="1x,2x")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each stage at each size, sizes interleaved")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the workspaces (outputs, logs) in this folder")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    sizes = [s for s in args.sizes.split(",") if s]
    if args.quick:
        stages, sizes = ["epfl", "idr"], ["small"]
    unknown = sorted(set(stages) - set(DATASETS) - {"metadata"}) + sorted(set(sizes) - set(SIZES))
    if unknown:
        raise SystemExit(f"unknown stage(s) or size(s) {unknown}")
    results: dict[str, Any] = {"cores": os.cpu_count(), "sizes": {s: SIZES[s] for s in sizes}, "stages": {},
                               "repeats": args.repeats, "ratios": {}}  # ratios: per stage, per repeat (last/first)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_memory_"))) \
            if args.keep is None else args.keep
        for repeat, size in ((r, s) for r in range(args.repeats) for s in sizes):  # sizes interleaved
            overrides = SIZES[size]["overrides"]
            sources = [s for s in stages if s in DATASETS]
            profile = {s: SIZES[size]["profiles"].get(s, "full") for s in sources}
            groups = {p: [s for s in sources if profile[s] == p] for p in sorted(set(profile.values()))}
            with ExitStack() as servers:  # one replica server per profile
                mirrors = {p: servers.enter_context(services.replica(p, sources=names)) for p, names in groups.items()}
                ws = tmp / f"{size}-{repeat}"
                workspace(ws, overrides)
                for name in stages:
                    if name in DATASETS:
                        set_mirror(ws, mirrors[profile[name]])
                    one = run_stage(ws, name)
                    runs.setdefault(name, {}).setdefault(size, []).append(one)
                    print(f"{name} ({size}, repeat {repeat + 1}): {one}", flush=True)
                if args.keep is None:
                    shutil.rmtree(ws)
    for name, per in runs.items():
        results["stages"][name] = {size: summarise(one) for size, one in per.items()}
        if len(sizes) > 1 and all(len(per.get(s, [])) == args.repeats for s in sizes):
            ratios = [b["peak_rss_mb"] / a["peak_rss_mb"] for a, b in zip(per[sizes[0]], per[sizes[-1]], strict=True)]
            anon = [b["rss_anon_mb"] / a["rss_anon_mb"] for a, b in zip(per[sizes[0]], per[sizes[-1]], strict=True)
                    if a["rss_anon_mb"]]
            results["ratios"][name] = {"peak_rss": ratios, "rss_anon": anon}
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over the repeats (the figures of every repeat under ``runs``)."""
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    out["runs"] = runs
    return out


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def report(results: dict[str, Any]) -> str:
    sizes = list(results["sizes"])
    head = " | ".join(f"{s}: output MB (files), peak RSS MB (anon + file), s" for s in sizes)
    tail = f" RSS ratio {sizes[-1]}/{sizes[0]}, median (min..max); anon | output ratio |" if len(sizes) > 1 else ""
    lines = [f"| stage | {head} |{tail}", "|---|" + "---:|" * (len(sizes) + (2 if len(sizes) > 1 else 0))]
    for name, per in results["stages"].items():
        if any(s not in per for s in sizes):
            continue
        if len(sizes) == 1:
            s = sizes[0]
            lines.append(f"| {name} | {per[s]['output_mb']:.1f} ({per[s]['output_files']:.0f}), "
                         f"**{per[s]['peak_rss_mb']:.0f}** ({per[s]['rss_anon_mb']:.0f} + {per[s]['rss_file_mb']:.0f}), "
                         f"{per[s]['seconds']:.1f} |")
            continue
        cells = " | ".join(f"{per[s]['output_mb']:.1f} ({per[s].get('output_files', 0):.0f}), "
                           f"**{per[s]['peak_rss_mb']:.0f}** ({per[s].get('rss_anon_mb', 0):.0f} + "
                           f"{per[s].get('rss_file_mb', 0):.0f}), {per[s]['seconds']:.1f}" for s in sizes)
        a, b = per[sizes[0]], per[sizes[-1]]
        ratios = results.get("ratios", {}).get(name) or {"peak_rss": [b["peak_rss_mb"] / a["peak_rss_mb"]], "rss_anon": [
            b["rss_anon_mb"] / a["rss_anon_mb"] if a.get("rss_anon_mb") else float("nan")]}
        out = b["output_mb"] / a["output_mb"] if a["output_mb"] else float("nan")
        lines.append(f"| {name} | {cells} | {_spread(ratios['peak_rss'])}; {_spread(ratios['rss_anon'])} | "
                     f"{out:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    sys.exit(0)
