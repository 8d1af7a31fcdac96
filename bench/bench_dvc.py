"""`dvc push`/`dvc pull` of an OME-Zarr output vs its file layout, against one tar GET + unpack from the same S3.

One EM-like uint8 volume (smooth structure plus noise: compresses about like EM) is written with
``emdata.ngff.write_image`` (the stages' writer, 64^3 chunks, blosc-zstd) in several shard sizes; the same
shards serve every level, so small shards mean many files, small upper-level files included. For each
layout, in a fresh git+DVC workspace whose remote is a moto S3 endpoint on loopback
(``emdata.offline.services.s3``): ``dvc add``, ``dvc push`` (into a fresh prefix each repeat), then, with
the cache and the output deleted before each, ``dvc pull`` with DVC's default jobs and cache type (copy on
this file system), with more jobs, and with hardlinks; and the baseline: a tar of the same bytes uploaded
as one object (push baseline) and fetched with one GET streamed into ``tarfile`` (pull baseline).
Layouts are interleaved within each repeat; ratios are per repeat (median, min..max).

    .venv/bin/python bench/bench_dvc.py [--quick] [--size 512] [--shards 64,128,256] [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from emdata import ngff
from emdata.offline import services

BUCKET = "emdata-bench"
ENV = {**os.environ, "AWS_ACCESS_KEY_ID": "emdata-local", "AWS_SECRET_ACCESS_KEY": "emdata-local",
       "AWS_DEFAULT_REGION": "us-east-1", "DVC_NO_ANALYTICS": "1"}
DVC = [sys.executable, "-m", "dvc"]


def em_like(size: int, seed: int = 0) -> np.ndarray:
    """Smooth 'membranes and organelles' at 1/8 resolution, upsampled, plus shot-like noise: uint8."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(128, 40, (max(1, size // 8),) * 3).astype(np.float32)
    vol = np.repeat(np.repeat(np.repeat(coarse, 8, 0), 8, 1), 8, 2)[:size, :size, :size]
    vol += rng.normal(0, 10, vol.shape).astype(np.float32)
    return np.clip(vol, 0, 255).astype(np.uint8)


def write_layout(path: Path, vol: np.ndarray, shard: int, chunk: int) -> dict[str, Any]:
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    ngff.write_image(root, name="em", source=vol, geometry=ngff.Geometry((8.0, 8.0, 8.0)), what="bench volume",
                     chunks=(chunk,) * 3, shards=(shard,) * 3, verify=False)
    files = [p for p in path.rglob("*") if p.is_file()]
    sizes = sorted(p.stat().st_size for p in files)
    return {"files": len(files), "bytes": sum(sizes), "median_file_bytes": sizes[len(sizes) // 2],
            "files_under_1mb": sum(s < 2**20 for s in sizes)}


def sh(cmd: list[str], cwd: Path) -> float:
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}: {proc.stderr[-2000:]}")
    return time.perf_counter() - began


def workspace(ws: Path, data: Path, endpoint: str) -> None:
    ws.mkdir(parents=True)
    for cmd in (["git", "init", "-q"], [*DVC, "init", "-q"], [*DVC, "config", "core.analytics", "false"],
                [*DVC, "remote", "add", "-d", "storage", f"s3://{BUCKET}/none"],
                [*DVC, "remote", "modify", "storage", "endpointurl", endpoint]):
        sh(cmd, ws)
    (ws / "data").mkdir()
    shutil.copytree(data, ws / "data" / "vol.zarr")
    sh([*DVC, "add", "-q", "data/vol.zarr"], ws)


def clear(ws: Path) -> None:
    shutil.rmtree(ws / ".dvc" / "cache", ignore_errors=True)
    shutil.rmtree(ws / "data" / "vol.zarr", ignore_errors=True)
    shutil.rmtree(ws / ".dvc" / "tmp", ignore_errors=True)  # DVC's state (hashes of files it saw)


def tar_push_pull(s3: Any, data: Path, tmp: Path, key: str) -> tuple[float, float]:
    tar_path = tmp / "vol.tar"
    began = time.perf_counter()
    with tarfile.open(tar_path, "w") as tar:
        tar.add(data, arcname="vol.zarr")
    s3.upload_file(str(tar_path), BUCKET, key)
    push = time.perf_counter() - began
    tar_path.unlink()
    out = tmp / "untar"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    began = time.perf_counter()
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"]
    with tarfile.open(fileobj=_Reader(body), mode="r|") as tar:
        tar.extractall(out, filter="data")
    pull = time.perf_counter() - began
    s3.delete_object(Bucket=BUCKET, Key=key)
    return push, pull


class _Reader(io.RawIOBase):
    """botocore's streaming body as a file object for ``tarfile``'s stream mode."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.body.read(len(b))
        b[: len(data)] = data
        return len(data)


def same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / p).read_bytes() == (b / p).read_bytes() for p in fa)


def delete_prefix(s3: Any, prefix: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 128^3 volume, two layouts, one repeat")
    parser.add_argument("--size", type=int, default=512, help="edge of the cubic uint8 volume")
    parser.add_argument("--shards", default="64,128,256", help="shard edges to compare")
    parser.add_argument("--jobs", type=int, default=32, help="the 'more jobs' case (`dvc pull -j`)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    chunk = 64
    if args.quick:
        args.size, args.shards, args.repeats, chunk = 128, "32,128", 1, 32
    shards = [int(s) for s in args.shards.split(",")]
    import boto3

    vol = em_like(args.size)
    results: dict[str, Any] = {"size": args.size, "cores": os.cpu_count(), "repeats": args.repeats, "layouts": {}}
    with tempfile.TemporaryDirectory(prefix="bench_dvc_") as tmpname, services.s3([BUCKET]) as endpoint:
        tmp = Path(tmpname)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="emdata-local", aws_secret_access_key="emdata-local")
        layouts = {}
        for shard in shards:
            data = tmp / f"src_{shard}" / "vol.zarr"
            began = time.perf_counter()
            info = write_layout(data, vol, shard, chunk)
            info["write_s"] = round(time.perf_counter() - began, 2)
            workspace(tmp / f"ws_{shard}", data, endpoint)
            layouts[shard] = (data, info)
            results["layouts"][shard] = {**info, "times": {}}
        cases = ["dvc push", "dvc pull (default jobs, copy)", f"dvc pull -j {args.jobs} (copy)",
                 f"dvc pull -j {args.jobs} (hardlink)", "tar + one upload", "one GET + untar"]
        for r in range(args.repeats):
            for shard, (data, _) in layouts.items():
                ws = tmp / f"ws_{shard}"
                times = results["layouts"][shard]["times"]
                prefix = f"{shard}/r{r}"
                sh([*DVC, "remote", "modify", "storage", "url", f"s3://{BUCKET}/{prefix}"], ws)
                sh([*DVC, "config", "cache.type", "reflink,copy"], ws)
                times.setdefault(cases[0], []).append(sh([*DVC, "push", "-q"], ws))
                for case, jobs, link in ((cases[1], None, "reflink,copy"), (cases[2], args.jobs, "reflink,copy"),
                                         (cases[3], args.jobs, "hardlink")):
                    sh([*DVC, "config", "cache.type", link], ws)
                    clear(ws)
                    cmd = [*DVC, "pull", "-q"] + (["-j", str(jobs)] if jobs else [])
                    times.setdefault(case, []).append(sh(cmd, ws))
                    if not same_tree(data, ws / "data" / "vol.zarr"):
                        raise AssertionError(f"{case}: the pulled tree differs from the pushed one ({shard})")
                # Everything present: DVC's fixed cost (start-up, index, status), whatever the layout.
                times.setdefault("dvc pull, nothing to do", []).append(sh([*DVC, "pull", "-q"], ws))
                push, pull = tar_push_pull(s3, data, tmp, f"tar/{shard}/r{r}.tar")
                times.setdefault(cases[4], []).append(push)
                times.setdefault(cases[5], []).append(pull)
                sh([*DVC, "config", "cache.type", "reflink,copy"], ws)
                delete_prefix(s3, prefix + "/")
    for shard, lay in results["layouts"].items():
        t = lay["times"]
        lay["ratios"] = {}
        for case in cases[:4]:
            base = t[cases[4]] if case == "dvc push" else t[cases[5]]
            ratios = [a / b for a, b in zip(t[case], base, strict=True)]
            lay["ratios"][case] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                   "median_s": statistics.median(t[case])}
        for case in (*cases[4:], "dvc pull, nothing to do"):
            lay["ratios"][case] = {"median_s": statistics.median(t[case])}
    results["model"] = model(results, cases[1])
    results["model_hardlink"] = model(results, cases[3])
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return results


def model(results: dict[str, Any], case: str) -> dict[str, Any]:
    """pull = fixed + per_file * files + per_mb * MB (least squares over the layouts), and tar = per_mb_tar * MB.

    The layouts hold the same bytes, so the fit separates DVC's cost per file from its cost per byte; the fixed
    cost is the pull with nothing to do. Projected to the outputs of issue 12 (2,021 files, 2.07 GB).
    """
    lays = list(results["layouts"].values())
    fixed = statistics.median(lay["ratios"]["dvc pull, nothing to do"]["median_s"] for lay in lays)
    files = np.array([lay["files"] for lay in lays], float)
    mb = np.array([lay["bytes"] / 1e6 for lay in lays], float)
    pull = np.array([lay["ratios"][case]["median_s"] for lay in lays]) - fixed
    if len(set(files.tolist())) < 2:
        return {}
    per_file, intercept = np.polyfit(files, pull, 1)
    per_mb = intercept / float(mb.mean())
    tar_per_mb = statistics.median(lay["ratios"]["one GET + untar"]["median_s"] / (lay["bytes"] / 1e6) for lay in lays)
    out: dict[str, Any] = {"case": case, "fixed_s": fixed, "per_file_ms": per_file * 1e3, "per_mb_ms": per_mb * 1e3,
                           "tar_per_mb_ms": tar_per_mb * 1e3, "projections": {}}
    for n_files, gb in ((2021, 2.07), (500, 2.07), (150, 2.07)):
        dvc = fixed + per_file * n_files + per_mb * gb * 1e3
        out["projections"][f"{n_files} files, {gb} GB"] = {"dvc_s": dvc, "tar_s": tar_per_mb * gb * 1e3,
                                                         "ratio": dvc / (tar_per_mb * gb * 1e3)}
    return out


def report(results: dict[str, Any]) -> str:
    lines = [f"{results['size']}^3 uint8 EM-like volume, 64^3 chunks (blosc-zstd) and its pyramid; moto S3 on "
             f"loopback; {results['cores']} cores; median of {results['repeats']} (min..max of per-repeat ratios); "
             "pull ratios are time / (one GET + untar), push ratios time / (tar + one upload)", "",
             "| shards | files (< 1 MiB) | MB | median file | case | seconds | ratio |", "|---|---:|---:|---:|---|---:|---:|"]
    for shard, lay in results["layouts"].items():
        head = (f"| {shard}^3 | {lay['files']} ({lay['files_under_1mb']}) | {lay['bytes'] / 1e6:.1f} | "
                f"{lay['median_file_bytes'] / 1e3:.0f} kB")
        for case, r in lay["ratios"].items():
            ratio = f"{r['median']:.2f}x ({r['min']:.2f}..{r['max']:.2f})" if "median" in r else "1 (baseline)"
            lines.append(f"{head} | {case} | {r['median_s']:.2f} | {ratio} |")
            head = "| | | | "
    for m in (results.get("model"), results.get("model_hardlink")):
        if not m:
            continue
        lines += ["", f"Model of `{m['case']}`: {m['fixed_s']:.2f} s fixed (a pull with nothing to do) + "
                  f"{m['per_file_ms']:.1f} ms per file + {m['per_mb_ms']:.2f} ms per MB; one GET + untar "
                  f"{m['tar_per_mb_ms']:.2f} ms per MB. Projected:", ""]
        for name, p in m["projections"].items():
            lines.append(f"- {name}: dvc pull {p['dvc_s']:.1f} s vs tar {p['tar_s']:.1f} s = {p['ratio']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    sys.exit(0)
