"""`make bench`: run every benchmark, print a summary of ratios with the machine's core count, write bench/RESULTS.md.

Each benchmark runs as its own command (shown in the results); their outputs are gathered verbatim. With
``--quick`` every benchmark runs its smallest configuration (a smoke run of a few minutes) and the results go
to ``bench/out/RESULTS.quick.md`` instead, so a smoke run never replaces measured results.

    .venv/bin/python bench/bench_all.py [--quick] [--only download,dvc,...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
PY = ".venv/bin/python"

# name -> (full command, quick command, the owner's results file or None); {out} is bench/out.
BENCHMARKS: dict[str, tuple[str, str, str | None]] = {
    "download": ("bench/bench_download.py --json {out}/download{tag}.json",
                 "bench/bench_download.py --quick --json {out}/download{tag}.json", None),
    # --diagnostics: the bare S3 GETs of DVC's objects and a 1/32-bytes twin (fixed / per-file / per-MB costs).
    "dvc": ("bench/bench_dvc.py --diagnostics --json {out}/dvc{tag}.json", "bench/bench_dvc.py --quick --json {out}/dvc{tag}.json", None),
    "memory": ("bench/bench_memory.py --json {out}/memory{tag}.json",
               "bench/bench_memory.py --quick --json {out}/memory{tag}.json", None),
    # Its results file goes to bench/out (the owner's bench/RESULTS_pyramid.md is theirs) and is included below.
    "pyramid": ("bench/bench_pyramid.py --repeats 3 --memory-sizes 256 512 --out {out}/RESULTS_pyramid.md",
                "bench/bench_pyramid.py --size 128 --shards 64 --repeats 1 --memory-sizes 128 "
                "--out {out}/RESULTS_pyramid.quick.md",
                "RESULTS_pyramid.md"),
    "access": ("bench/bench_access.py --json {out}/access{tag}.json",
               "bench/bench_access.py --size 128 --block 64 --repeats 1 --large-size 128 --large-repeats 1 --out {out} "
               "--json {out}/access{tag}.json",
               "RESULTS_access.md"),
    # Reads over HTTP with latency: emdata's remote shard reader vs zarr-python (DATA_ACCESS_DESIGN.md, "Remote reads").
    "remote": ("bench/bench_access.py --suite remote --json {out}/remote{tag}.json",
               "bench/bench_access.py --suite remote --remote-size 128 --block 64 --remote-repeats 1 "
               "--remote-samples 20 --out {out} --json {out}/remote{tag}.json",
               "RESULTS_access.md"),
    "hemibrain": ("bench/bench_hemibrain.py --profile full --crop 512 --latency 0.02 --repeats 3",
                  "bench/bench_hemibrain.py --profile small --crop 128 --repeats 1", None),
}
RATIO = re.compile(r"\d+(\.\d+)?x\b|\bratio\b", re.IGNORECASE)


def machine() -> str:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), "")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{os.cpu_count()} cores ({model or platform.processor()}), Python {platform.python_version()}, "
            f"load average at start {load[0]:.1f}")


def run(name: str, command: str) -> dict[str, Any]:
    print(f"\n===== {name}: {PY} {command}", flush=True)
    began = time.perf_counter()
    proc = subprocess.Popen([PY, *command.split()], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    code = proc.wait()
    return {"command": f"{PY} {command}", "seconds": time.perf_counter() - began, "exit": code, "lines": lines,
            "utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")}


def summary(runs: dict[str, dict[str, Any]], tag: str = "") -> list[str]:
    """The ratios each target is judged by: computed from the JSON of ours, the ratio lines of the others."""
    out = [f"machine: {machine()}", ""]
    dl = _json(f"download{tag}.json")
    if dl:
        for set_name, s in dl["sets"].items():
            default = next(v for k, v in s["cases"].items() if k.startswith("defaults ("))
            line = (f"download, {set_name} files: defaults / best engine case = {default['ratio']:.2f}x "
                    f"({default['ratio_min']:.2f}..{default['ratio_max']:.2f}; target <= 1.1x)")
            if "default_vs_aria2c" in s:
                a = s["default_vs_aria2c"]
                line += f"; defaults / aria2c -x8 -s8 = {a['ratio']:.2f}x ({a['ratio_min']:.2f}..{a['ratio_max']:.2f})"
            out.append(line)
        first = dl["sets"]["large"]["cases"].get("defaults, first download (unpinned: fetched twice)")
        if first:
            out.append(f"download, first download of an unverifiable file (fetched twice) / best pinned = "
                       f"{first['ratio']:.2f}x")
    dvc = _json(f"dvc{tag}.json")
    if dvc:
        for scale, o in (dvc.get("outputs") or {}).get("sets", {}).items():
            what = (f"all outputs ({o['files']} files, {o['bytes'] / 1e9:.2f} GB"
                    + ("" if scale == "1" else f", bytes x{scale}") + ")")
            for name, r in o["ratios"].items():
                if name not in ("dvc pull, nothing to do", "one GET + untar"):  # pulls; (--diagnostics) bare GETs
                    out.append(f"dvc, {what}: `{name}` / (GET + untar) = {r['median']:.2f}x ({r['min']:.2f}.."
                               f"{r['max']:.2f}), CPU {r['cpu_ratio']:.2f}x"
                               + (" (target <= 1.5x)" if name.startswith("dvc pull") else ""))
            out.append(f"dvc, {what}: push / (tar + one upload) = {o['dvc push_s'] / o['tar + one upload_s']:.2f}x "
                       "(one sample)")
        for shard, lay in dvc["layouts"].items():
            r = lay["ratios"]
            pulls = {k: v for k, v in r.items() if k.startswith("dvc pull") and "median" in v}
            best = min(pulls, key=lambda k: pulls[k]["median"])
            out.append(f"dvc, {shard}^3 shards ({lay['files']} files, {lay['bytes'] / 1e6:.0f} MB): best pull "
                       f"`{best}` / (GET + untar) = {pulls[best]['median']:.2f}x ({pulls[best]['min']:.2f}.."
                       f"{pulls[best]['max']:.2f}; target <= 1.5x); push / (tar + upload) = "
                       f"{r['dvc push']['median']:.2f}x")
        for m in (dvc.get("model"), dvc.get("model_hardlink")):
            for name, p in (m or {}).get("projections", {}).items():
                out.append(f"dvc, `{m['case']}` projected to {name}: pull / tar = {p['ratio']:.2f}x (target <= 1.5x)")
    mem = _json(f"memory{tag}.json")
    if mem:
        sizes = list(mem["sizes"])
        for name, per in mem["stages"].items():
            if any(s not in per for s in sizes):
                continue
            a, b = per[sizes[0]], per[sizes[-1]]
            line = (f"memory, {name}: peak RSS " + " -> ".join(
                f"{per[s]['peak_rss_mb']:.0f} MB ({s}, anon {per[s].get('rss_anon_mb', 0):.0f} MB, output "
                f"{per[s]['output_mb']:.0f} MB)" for s in sizes))
            ratios = mem.get("ratios", {}).get(name, {}).get("peak_rss")
            if len(sizes) > 1 and ratios:
                line += (f"; ratio {statistics.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f}) while the "
                         f"output grows {b['output_mb'] / max(a['output_mb'], 1e-9):.1f}x (target <= 1.15)")
            out.append(line)
    acc = _json(f"access{tag}.json")
    remote = _json(f"remote{tag}.json")
    for r in (acc or {}).get("rows", []) + (remote or {}).get("remote", []):
        figure = f"access: {r['median']:.2f}x ({r['min']:.2f}..{r['max']:.2f}) [cpu {r['cpu_median']:.2f}x]"
        if r["target"] is None:  # a measured limit beside the rows, not a target
            out.append(f"{figure} {'(measured)' if r.get('label') == '(measured)' else '(measured limit)'}: {r['row']}")
            continue
        out.append(f"{figure} target {'>=' if r['higher_is_better'] else '<='} {r['target']}x "
                   f"{'met' if r['met'] else 'NOT met'}: {r['row']}")
    if "pyramid" in runs:  # the ratio rows of each shard size's tables, and the reductions (from its results file)
        made = OUT / f"RESULTS_pyramid{tag}.md"
        section = ""
        for line in made.read_text().splitlines() if made.exists() else runs["pyramid"]["lines"]:
            if line.startswith("## "):
                section = line[3:].strip().lower()
            elif line.startswith("|") and RATIO.search(line) and (
                    "vs" in line or "/ level 0" in line or section.startswith("mean reduction")):
                out.append(f"pyramid, {section}: {line.strip()}")
    if "hemibrain" in runs:
        out += [f"hemibrain: {line.strip()}" for line in runs["hemibrain"]["lines"]
                if line.startswith("|") and ("vs ts copy" in line or "x |" in line)]
    return out


def _json(name: str) -> Any:
    path = OUT / name
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smallest configurations; results to bench/out")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated, from {list(BENCHMARKS)}")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; valid: {list(BENCHMARKS)}")
    OUT.mkdir(exist_ok=True)
    tag = ".quick" if args.quick else ""
    for name in names:
        (OUT / f"{name}{tag}.json").unlink(missing_ok=True)
    began = datetime.datetime.now(datetime.UTC)
    header = machine()
    for name in names:
        full, quick, _ = BENCHMARKS[name]
        record = run(name, (quick if args.quick else full).format(out=OUT.relative_to(REPO), tag=tag))
        (OUT / f"run_{name}{tag}.json").write_text(json.dumps(record))
    # A subset (--only) re-renders RESULTS.md with the latest record of every other benchmark (each section
    # says when it ran), so one benchmark can be re-run without running all.
    runs = {name: json.loads((OUT / f"run_{name}{tag}.json").read_text()) for name in BENCHMARKS
            if (OUT / f"run_{name}{tag}.json").exists()}
    lines = summary(runs, tag)
    print("\n===== summary\n" + "\n".join(lines))
    target = OUT / "RESULTS.quick.md" if args.quick else HERE / "RESULTS.md"
    target.write_text(results_md(runs, lines, began, header, args.quick))
    print(f"\nwrote {target.relative_to(REPO)}")
    failed = [n for n in names if runs[n]["exit"]]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0


def results_md(runs: dict[str, dict[str, Any]], lines: list[str], began: datetime.datetime, header: str,
               quick: bool) -> str:
    total = sum(r["seconds"] for r in runs.values())
    md = ["# Benchmark results", "",
          f"Made by `make bench{' BENCH_ARGS=--quick' if quick else ''}` (`{PY} bench/bench_all.py"
          f"{' --quick' if quick else ''}`), last run {began:%Y-%m-%d %H:%M} UTC; the benchmarks took "
          f"{total / 60:.1f} min in all; {header}.",
          "The machine is shared and noisy: every ratio was measured side by side within one run (cases "
          "interleaved); read the ratios, not the absolute seconds. How each benchmark works: "
          "[README.md](README.md).", "", "## Summary of ratios", ""]
    md += [f"- {line}" if line else "" for line in lines]
    for name, r in runs.items():
        owner_file = BENCHMARKS[name][2]
        md += ["", f"## {name}", "", f"Command: `{r['command']}` (run {r['utc']} UTC, {r['seconds']:.0f} s, "
               f"exit {r['exit']})."]
        if owner_file:
            md.append(f"Details and discussion: [{owner_file}]({owner_file}).")
        body = r["lines"]
        made = OUT / f"RESULTS_{name}{'.quick' if quick else ''}.md"
        if name in ("download", "dvc", "memory"):  # ours print markdown
            md += ["", *body]
        elif name == "pyramid" and made.exists():  # it writes its tables to a file, with its command
            md += ["", *[f"##{line}" if line.startswith("#") else line for line in made.read_text().splitlines()]]
        else:
            md += ["", "```", *body[-80:], "```"]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
