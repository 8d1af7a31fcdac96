"""`dvc pull`/`dvc push` of the outputs vs one tar GET + unpack from the same S3 endpoint.

Default (``--what outputs``): all outputs' files at their real size and count, as the stages write them
(``OUTPUTS``: shapes, stored bytes and levels from METADATA_SUMMARY.md, shard shapes from the stages' code: 64 MiB
for uint8; 225 files, 2.14 GB, 62 zarr.json and the small shards of upper levels and labels included), random
bytes (DVC and tar move bytes, they don't decode them). One git+DVC workspace, one `dvc add` of the five outputs,
`dvc push` to a moto S3 endpoint on loopback (``emdata.offline.services.s3``); the baseline object is the same
files as one tar. Per repeat, cases in a rotated order, cache and output deleted before each: one GET streamed
into ``tarfile``; `dvc pull` with DVC's defaults (cache.type reflink,copy: copy on ext4; jobs 4 x cores); with
cache.type hardlink; `dvc pull` with nothing to do (DVC's fixed cost). Every pulled tree is checked against the
CRC-32 of every written file. Wall seconds and CPU seconds (client + endpoint process) per case; ratios per repeat
(median, min..max). ``--diagnostics`` adds cache.type symlink, plain boto3 GETs of DVC's objects (8 threads), and
the same files at 1/32 of their bytes, which splits each case into fixed + per file + per MB.

``--what layouts``: the older experiment: one 512^3 EM-like volume written with ``emdata.ngff.write_image`` at
several shard sizes, push/pull per layout and a least-squares projection (``model``) to other file counts.

    .venv/bin/python bench/bench_dvc.py [--quick] [--diagnostics] [--what outputs,layouts] [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from emdata import ngff
from emdata.offline import services
from emdata.sources import empiar, hemibrain, openorganelle

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


# --- Real scale: all outputs' files, sized as the stages write them (64 MiB shards) ------------------------------

# (output, images): image = (path in the output, level-0 shape z,y,x, level-0 bytes stored, levels, shard, factors);
# shapes, stored bytes and levels from METADATA_SUMMARY.md; shards as the stages choose them, from the same code
# (uint8: 256 x 512 x 512, 64 MiB, hemibrain's uint64 segmentation on the EM's shards; OpenOrganelle's int16
# 256^3; EMPIAR's 16-section stack 16 x 1024 x 1024) at every level; pyramid factors 2 per axis (EMPIAR 1x2x2: 16
# z-sections at 50 nm).
OUTPUTS: tuple[tuple[str, tuple[tuple[str, tuple[int, int, int], float, int, tuple[int, ...],
                                      tuple[int, int, int]], ...]], ...] = (
    ("hemibrain_crop.zarr", (("", (1000, 1000, 1000), 832.0e6, 5, hemibrain.OUTPUT_SHARDS, (2, 2, 2)),
                             ("labels/segmentation", (1000, 1000, 1000), 24.4e6, 5, hemibrain.OUTPUT_SHARDS, (2, 2, 2)))),
    ("empiar_11759.zarr", (("", (16, 5500, 5496), 405.1e6, 8,
                            empiar.thin_stack_shards((16, 5500, 5496), ngff.DEFAULT_CHUNKS, empiar.EmpiarParams.shards),
                            (1, 2, 2)),)),
    ("epfl.zarr", tuple((f"{part}{sub}", (165, 768, 1024), nbytes, 5, ngff.UINT8_SHARDS, (2, 2, 2))
                        for part in ("training", "testing") for sub, nbytes in (("", 117.1e6), ("/labels/mito", 0.3e6)))),
    ("idr_9846137.zarr", (("", (184, 775, 1121), 145.5e6, 6, ngff.UINT8_SHARDS, (2, 2, 2)),)),
    ("jrc_mus-nacc-2.zarr", (("", (188, 840, 865), 159.0e6, 5, openorganelle.OpenOrganelleParams.shards, (2, 2, 2)),)),
)


def outputs_plan(scale: float = 1.0) -> dict[str, int]:
    """Relative path -> size of every file of the outputs: one shard file per shard of every level (its
    bytes in proportion to the voxels it holds), a zarr.json per array and per group. ``scale`` shrinks the
    bytes, not the files."""
    files: dict[str, int] = {}
    for out, images in OUTPUTS:
        groups = {""}
        for img, shape, nbytes, levels, shard, factors in images:
            per_voxel = nbytes * scale / math.prod(shape)
            parts = img.split("/") if img else []
            groups.update("/".join(parts[:i]) for i in range(len(parts) + 1))
            for level in range(levels):
                lshape = [max(1, -(-s // f**level)) for s, f in zip(shape, factors, strict=True)]
                array = "/".join([*parts, str(level)])
                files[f"{out}/{array}/zarr.json"] = 1_500
                for idx in np.ndindex(*(-(-s // c) for s, c in zip(lshape, shard, strict=True))):
                    voxels = math.prod(min(c, s - i * c) for i, c, s in zip(idx, shard, lshape, strict=True))
                    files[f"{out}/{array}/c/{'/'.join(map(str, idx))}"] = max(64, round(voxels * per_voxel))
        for group in groups:
            files[f"{out}/{group}/zarr.json" if group else f"{out}/zarr.json"] = 3_000
    return files


def write_files(root: Path, plan: dict[str, int], seed: int = 0) -> dict[str, int]:
    """Random (incompressible, all distinct) bytes of the planned sizes; returns the CRC-32 of each file."""
    rng = np.random.default_rng(seed)
    crcs = {}
    for rel, size in plan.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.bytes(size)
        path.write_bytes(data)
        crcs[rel] = zlib.crc32(data)
    return crcs


def tree_crcs(root: Path) -> dict[str, int]:
    """CRC-32 of every file under root (links followed), by path relative to root."""
    crcs = {}
    for path in root.rglob("*"):
        if path.is_file():
            crc = 0
            with path.open("rb") as f:
                while block := f.read(2**22):
                    crc = zlib.crc32(block, crc)
            crcs[path.relative_to(root).as_posix()] = crc
    return crcs


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class _Endpoint:
    """CPU seconds of the S3 endpoint's process (our only long-lived child), read from /proc."""

    def __init__(self) -> None:
        self.pid: int | None = None
        try:
            kids = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
            self.pid = int(kids[-1]) if kids else None
        except OSError:
            pass

    def cpu(self) -> float:
        if self.pid is None:
            return float("nan")
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OutputsSet:
    """All outputs' files at one byte scale in a git+DVC workspace pushed to the endpoint, and the pull cases."""

    def __init__(self, scale: float, root: Path, s3: Any, endpoint: str, extra_jobs: list[int],
                 diagnostics: bool) -> None:
        self.root, self.s3 = root, s3
        plan = outputs_plan(scale)
        sizes = sorted(plan.values())
        ws = self.ws = root / "ws"
        ws.mkdir(parents=True)
        began = time.perf_counter()
        self.crcs = write_files(ws / "data", plan)
        self.res: dict[str, Any] = {
            "scale": scale, "files": len(plan), "bytes": sum(sizes), "median_file_bytes": sizes[len(sizes) // 2],
            "files_under_1mb": sum(s < 2**20 for s in sizes), "write_s": round(time.perf_counter() - began, 1),
            "times": {}, "cpu": {}, "endpoint_cpu": {}}
        self.outs = [out for out, _ in OUTPUTS]
        self.prefix = f"outputs-{scale:g}"
        for cmd in (["git", "init", "-q"], [*DVC, "init", "-q"], [*DVC, "config", "core.analytics", "false"],
                    [*DVC, "remote", "add", "-d", "storage", f"s3://{BUCKET}/{self.prefix}"],
                    [*DVC, "remote", "modify", "storage", "endpointurl", endpoint]):
            sh(cmd, ws)
        self.res["dvc add_s"] = round(sh([*DVC, "add", "-q", *(f"data/{o}" for o in self.outs)], ws), 2)
        self.res["dvc push_s"] = round(sh([*DVC, "push", "-q"], ws), 2)
        # The baseline's object: the same files as one tar, streamed into one (multipart) upload as
        # `tar c | aws s3 cp - s3://...` would (push baseline: tar + one upload).
        import threading

        began = time.perf_counter()
        read_fd, write_fd = os.pipe()
        failed: list[BaseException] = []

        def write_tar() -> None:
            try:
                with os.fdopen(write_fd, "wb") as pipe, tarfile.open(fileobj=pipe, mode="w|") as tar:
                    for o in self.outs:
                        tar.add(ws / "data" / o, arcname=o)
            except BaseException as exc:  # reported below, after the upload sees the end of the pipe
                failed.append(exc)

        writer = threading.Thread(target=write_tar)
        writer.start()
        with os.fdopen(read_fd, "rb") as pipe:
            s3.upload_fileobj(pipe, BUCKET, f"tar/{self.prefix}.tar")
        writer.join()
        if failed:
            raise failed[0]
        self.res["tar + one upload_s"] = round(time.perf_counter() - began, 2)
        self.keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=self.prefix + "/") for o in page.get("Contents", [])]
        self.res["remote_objects"] = len(self.keys)
        self.remote_bytes = sum(o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=self.prefix + "/") for o in page.get("Contents", []))
        self.untar, self.objects = root / "untar", root / "objects"
        data = ws / "data"
        self.cases: dict[str, tuple[Any, Any]] = {
            "one GET + untar": (self.tar_get, lambda: self.check(self.untar, "untar")),
            "dvc pull (defaults: copy, jobs 4 x cores)": (lambda: self.dvc_pull("reflink,copy"),
                                                           lambda: self.check(data, "copy")),
            "dvc pull, cache.type hardlink": (lambda: self.dvc_pull("hardlink"), lambda: self.check(data, "hardlink")),
        }
        if diagnostics:
            self.cases["dvc pull, cache.type symlink"] = (lambda: self.dvc_pull("symlink"),
                                                          lambda: self.check(data, "symlink"))
        for jobs in extra_jobs:
            self.cases[f"dvc pull -j {jobs}, cache.type hardlink"] = (
                lambda j=jobs: self.dvc_pull("hardlink", j), lambda: self.check(data, "hardlink -j"))
        # Everything present: DVC's fixed cost (start-up, index, status); run right after a pull.
        self.cases["dvc pull, nothing to do"] = (lambda: sh([*DVC, "pull", "-q"], ws), lambda: None)
        if diagnostics:
            self.cases["boto3 GETs of DVC's objects, 8 threads (no DVC)"] = (self.object_gets, lambda: None)

    def clear(self) -> None:
        for path in (self.ws / ".dvc" / "cache", self.ws / ".dvc" / "tmp", *(self.ws / "data" / o for o in self.outs),
                     self.untar, self.objects):
            shutil.rmtree(path, ignore_errors=True)

    def dvc_pull(self, link: str, jobs: int | None = None) -> None:
        sh([*DVC, "config", "cache.type", link], self.ws)
        sh([*DVC, "pull", "-q", *(["-j", str(jobs)] if jobs else [])], self.ws)

    def check(self, root: Path, case: str) -> None:
        got = {f"{o}/{k}": v for o in self.outs for k, v in tree_crcs(root / o).items()}
        if got != self.crcs:
            raise AssertionError(f"{case}: the pulled files differ from the pushed ones")

    def tar_get(self) -> None:
        self.untar.mkdir()
        body = self.s3.get_object(Bucket=BUCKET, Key=f"tar/{self.prefix}.tar")["Body"]
        with tarfile.open(fileobj=_Reader(body), mode="r|") as tar:
            tar.extractall(self.untar, filter="data")

    def object_gets(self) -> None:
        """The same objects DVC fetches, by boto3 from 8 threads into files: the endpoint's per-object floor."""
        import concurrent.futures

        def get(key: str) -> int:
            path = self.objects / key
            path.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(BUCKET, key, str(path))
            return path.stat().st_size

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            if sum(pool.map(get, self.keys)) != self.remote_bytes:
                raise AssertionError("object GETs: byte count differs")

    def measure(self, name: str, server: _Endpoint) -> None:
        if name != "dvc pull, nothing to do":
            self.clear()
        os.sync()  # the previous case's writes are not this case's
        run, verify = self.cases[name]
        cpu0, kids0, srv0 = _cpu_self(), _cpu_children(), server.cpu()
        began = time.perf_counter()
        run()
        self.res["times"].setdefault(name, []).append(time.perf_counter() - began)
        self.res["cpu"].setdefault(name, []).append(_cpu_self() - cpu0 + _cpu_children() - kids0)
        self.res["endpoint_cpu"].setdefault(name, []).append(server.cpu() - srv0)
        verify()

    def summary(self) -> dict[str, Any]:
        res, base = self.res, "one GET + untar"
        res["ratios"] = {}
        for name in self.cases:
            t = res["times"][name]
            ratios = [a / b for a, b in zip(t, res["times"][base], strict=True)]
            cpu = [(c + e) / (cb + eb) for c, e, cb, eb in zip(res["cpu"][name], res["endpoint_cpu"][name],
                                                                res["cpu"][base], res["endpoint_cpu"][base],
                                                                strict=True)]
            res["ratios"][name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                   "median_s": statistics.median(t), "cpu_s": statistics.median(res["cpu"][name]),
                                   "endpoint_cpu_s": statistics.median(res["endpoint_cpu"][name]),
                                   "cpu_ratio": statistics.median(cpu), "cpu_ratio_min": min(cpu),
                                   "cpu_ratio_max": max(cpu)}
        return res


def run_outputs(args: argparse.Namespace, tmp: Path, s3: Any, endpoint: str) -> dict[str, Any]:
    """`dvc pull` of all outputs at their real file count vs one GET + untar, cases interleaved and rotated per
    repeat; at several byte scales (same files) when asked, which separates the cost per file from the cost per MB."""
    server = _Endpoint()
    sets = {scale: OutputsSet(scale, tmp / f"outputs-{scale:g}", s3, endpoint, args.outputs_jobs, args.diagnostics)
            for scale in args.scales}
    for r in range(args.repeats):
        for st in sets.values():
            names = [n for n in st.cases if n != "dvc pull, nothing to do"]
            order = names[r % len(names):] + names[:r % len(names)]
            order.insert(next(i for i, n in enumerate(order) if n.startswith("dvc pull")) + 1,
                         "dvc pull, nothing to do")
            for name in order:
                st.measure(name, server)
    for st in sets.values():
        st.clear()
    out: dict[str, Any] = {"sets": {f"{scale:g}": st.summary() for scale, st in sets.items()}}
    if len(sets) >= 2:
        out["split"] = split_costs(out["sets"])
    return out


def split_costs(sets: dict[str, Any]) -> dict[str, Any]:
    """Per case, cost = fixed + per_file * files + per_mb * MB: the sets hold the same files at different bytes, so
    the largest and smallest give per_mb; fixed is 'nothing to do' (0 for the baselines); per_file is the rest.
    For wall seconds and for CPU seconds (client + endpoint). Also the file count at which the case would be
    1.5x the tar at the largest set's bytes."""
    big, small = max(sets.values(), key=lambda s: s["bytes"]), min(sets.values(), key=lambda s: s["bytes"])
    files, dmb = big["files"], (big["bytes"] - small["bytes"]) / 1e6
    out: dict[str, Any] = {}
    for measure, get in (("wall", lambda r: r["median_s"]), ("cpu", lambda r: r["cpu_s"] + r["endpoint_cpu_s"])):
        per: dict[str, Any] = {}
        fixed_all = get(big["ratios"]["dvc pull, nothing to do"])
        for name in big["ratios"]:
            if name == "dvc pull, nothing to do":
                continue
            t_big, t_small = get(big["ratios"][name]), get(small["ratios"][name])
            fixed = fixed_all if name.startswith("dvc pull") else 0.0
            per_mb = (t_big - t_small) / dmb
            per_file = (t_small - per_mb * small["bytes"] / 1e6 - fixed) / files
            per[name] = {"fixed_s": fixed, "per_file_ms": per_file * 1e3, "per_mb_ms": per_mb * 1e3}
        tar = get(big["ratios"]["one GET + untar"])
        for name, p in per.items():
            if name.startswith("dvc pull") and p["per_file_ms"] > 0:
                n = (1.5 * tar - p["fixed_s"] - p["per_mb_ms"] / 1e3 * big["bytes"] / 1e6) / (p["per_file_ms"] / 1e3)
                p["files_for_1.5x"] = max(0, int(n))
        out[measure] = per
    return out


def report_outputs(results: dict[str, Any]) -> str:
    lines = []
    for o in results["outputs"]["sets"].values():
        lines += [f"All outputs' files (the stages' shards) at {o['scale']:g} of their bytes: {o['files']} files "
                  f"({o['files_under_1mb']} under 1 MiB), {o['bytes'] / 1e9:.3f} GB, median file "
                  f"{o['median_file_bytes'] / 1e6:.2f} MB; moto S3 on loopback; {results['cores']} cores; median of "
                  f"{results['repeats']} (min..max of per-repeat ratios); CPU = this process's or dvc's + the S3 "
                  "endpoint's CPU seconds", "",
                  "| case | seconds | x (GET + untar) | CPU s (client + endpoint) | CPU x |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in o["ratios"].items():
            lines.append(f"| {name} | {r['median_s']:.2f} | {r['median']:.2f}x ({r['min']:.2f}..{r['max']:.2f}) | "
                         f"{r['cpu_s']:.1f} + {r['endpoint_cpu_s']:.1f} | {r['cpu_ratio']:.2f}x "
                         f"({r['cpu_ratio_min']:.2f}..{r['cpu_ratio_max']:.2f}) |")
        lines += ["", f"Set-up, one sample each: `dvc add` {o['dvc add_s']:.1f} s, `dvc push` {o['dvc push_s']:.1f} s "
                  f"({o['remote_objects']} objects) vs tar + one upload {o['tar + one upload_s']:.1f} s = "
                  f"{o['dvc push_s'] / o['tar + one upload_s']:.2f}x.", ""]
    split = results["outputs"].get("split")
    if split:
        lines += ["Cost split (same files, two byte scales; fixed = 'nothing to do'):", "",
                  "| case | measure | fixed s | ms per file | ms per MB | files for 1.5x at full bytes |",
                  "|---|---|---:|---:|---:|---:|"]
        for measure, per in split.items():
            for name, p in per.items():
                lines.append(f"| {name} | {measure} | {p['fixed_s']:.2f} | {p['per_file_ms']:.2f} | "
                             f"{p['per_mb_ms']:.2f} | {p.get('files_for_1.5x', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="outputs' files at 1/32 of their bytes; layouts: a 128^3 volume, two layouts; one repeat")
    parser.add_argument("--what", default="outputs",
                        help="'outputs' (all outputs at real scale), 'layouts' (one volume, several shard sizes, "
                             "projected), or both: outputs,layouts")
    parser.add_argument("--diagnostics", action="store_true",
                        help="outputs: also cache.type symlink, plain boto3 GETs of DVC's objects, and the same "
                             "files at 1/32 of their bytes (splits the cost per file from the cost per MB)")
    parser.add_argument("--scales", default=None,
                        help="outputs: byte scales of the same files (default 1; 1,0.03125 with --diagnostics)")
    parser.add_argument("--outputs-jobs", default="", help="extra `dvc pull -j N` (hardlink) cases for outputs, e.g. 2,16")
    parser.add_argument("--size", type=int, default=512, help="layouts: edge of the cubic uint8 volume")
    parser.add_argument("--shards", default="64,128,256", help="layouts: shard edges to compare")
    parser.add_argument("--jobs", type=int, default=32, help="layouts: the 'more jobs' case (`dvc pull -j`)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    what = set(args.what.split(","))
    if what - {"outputs", "layouts"}:
        parser.error(f"--what: unknown {sorted(what - {'outputs', 'layouts'})}")
    args.outputs_jobs = [int(j) for j in args.outputs_jobs.split(",") if j]
    args.scales = [float(x) for x in (args.scales or ("1,0.03125" if args.diagnostics else "1")).split(",")]
    chunk = 64
    if args.quick:
        args.size, args.shards, args.repeats, chunk = 128, "32,128", 1, 32
        args.scales = [x / 32 for x in args.scales]
    shards = [int(s) for s in args.shards.split(",")] if "layouts" in what else []
    import boto3

    results: dict[str, Any] = {"size": args.size, "cores": os.cpu_count(), "repeats": args.repeats, "layouts": {}}
    with tempfile.TemporaryDirectory(prefix="bench_dvc_") as tmpname, services.s3([BUCKET]) as endpoint:
        tmp = Path(tmpname)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="emdata-local", aws_secret_access_key="emdata-local")
        if "outputs" in what:
            results["outputs"] = run_outputs(args, tmp, s3, endpoint)
            print(report_outputs(results), flush=True)
            delete_prefix(s3, "")
        vol = em_like(args.size) if shards else None
        layouts = {}
        for shard in shards:
            data = tmp / f"src_{shard}" / "vol.zarr"
            began = time.perf_counter()
            info = write_layout(data, vol, shard, chunk)  # type: ignore[arg-type]
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
    if shards:
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
