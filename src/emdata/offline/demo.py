"""The offline demo (``make demo``): the whole pipeline against the replica and a local S3 remote.

In a scratch copy of the repository (your tracked files are never touched) it starts the replica and a
moto S3 endpoint on loopback, runs ``dvc repro`` with ``mirror`` pointing at the replica, ``dvc push``,
deletes the cache and the outputs, ``dvc pull``s them back, checks them, shows the metrics and stops
every server it started. The workspace stays usable afterwards: its outputs are also pushed to a local
folder remote (``.emdata/demo-remote``, the workspace's default remote), so ``dvc pull`` works there after the
demo has exited; and the replica keeps its port between runs (``.emdata/replica.json``), so ``dvc status``
stays clean when it is started again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from emdata.offline import services
from emdata.errors import EmDataError, InvalidParameterError
from emdata.ngff import find_images, label_names, open_multiscale

log = logging.getLogger("emdata.offline.demo")

# The moto endpoint accepts any credentials: these placeholders exist only to satisfy the S3 client.
_LOCAL_S3_ENV = {"AWS_ACCESS_KEY_ID": "emdata-local", "AWS_SECRET_ACCESS_KEY": "emdata-local",
                 "AWS_DEFAULT_REGION": "us-east-1"}


# The replica serves OpenOrganelle at its real size (s0 is 7.38 GB, generated chunk by chunk): the demo reads a
# level (or ROI) that fits its time budget, with the nucleus labels on their own grid (s2).
DEMO_PARAMS: dict[str, dict[str, Any]] = {
    "full": {"openorganelle.level": 2, "openorganelle.labels": ["nuc"]},
    "small": {"openorganelle.level": 2, "openorganelle.roi_voxels": [[0, 128, 128], [64, 384, 384]],
              "openorganelle.labels": ["nuc"]},
}


class Demo:
    def __init__(self, repo: Path, workspace: Path, profile: str, stages: list[str] | None,
                 overrides: dict[str, Any]) -> None:
        self.repo = repo
        self.ws = workspace
        self.profile = profile
        self.stages = stages
        self.overrides = overrides
        self.timings: dict[str, float] = {}
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, **_LOCAL_S3_ENV, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}

    # ------------------------------------------------------------------ steps
    def step(self, title: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        print(f"\n=== {title}: {' '.join(cmd)}", flush=True)
        began = time.monotonic()
        proc = subprocess.run(cmd, cwd=self.ws, env=self.env, text=True, stdin=subprocess.DEVNULL)
        self.timings[title] = round(self.timings.get(title, 0.0) + time.monotonic() - began, 1)
        if proc.returncode != 0:
            raise EmDataError(f"demo step {title!r} failed with exit code {proc.returncode}")
        return proc

    def prepare_workspace(self) -> None:
        """Copy the repository's files (tracked and not ignored) into a fresh git repository."""
        if self.ws.exists():
            shutil.rmtree(self.ws)
        self.ws.mkdir(parents=True)
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=self.repo,
                               check=True, capture_output=True, text=True).stdout.split("\0")
        for name in filter(None, files):
            src = self.repo / name
            if src.is_file():
                dst = self.ws / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        git = ["git", "-c", "user.name=emdata demo", "-c", "user.email=demo@localhost"]
        subprocess.run([*git, "init", "-q"], cwd=self.ws, check=True)
        subprocess.run([*git, "add", "-A"], cwd=self.ws, check=True)
        subprocess.run([*git, "commit", "-qm", "demo workspace"], cwd=self.ws, check=True)

    def write_params(self, mirror: str) -> None:
        path = self.ws / "params.yaml"
        params = yaml.safe_load(path.read_text())
        params["mirror"] = {"url": mirror, "serves": "replica"}
        for dotted, value in {**DEMO_PARAMS[self.profile], **self.overrides}.items():
            section, _, key = dotted.partition(".")
            if section not in params or (key and key not in params[section]):
                raise InvalidParameterError(f"--set {dotted}: no such param in params.yaml")
            if key:
                params[section][key] = value
            else:
                params[section] = value
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    def outputs(self) -> list[str]:
        """The cached outputs that ``dvc repro`` produced (the stages asked for and those upstream of them)."""
        dvc_yaml = yaml.safe_load((self.ws / "dvc.yaml").read_text())
        outs = []
        for stage in dvc_yaml["stages"].values():
            for out in stage.get("outs", []):
                path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
                # cache: false outputs live in git, not on the remote
                if opts.get("cache", True) and (self.ws / path).exists():
                    outs.append(path)
        return outs

    def metrics_files(self) -> list[str]:
        dvc_yaml = yaml.safe_load((self.ws / "dvc.yaml").read_text())
        files = [m if isinstance(m, str) else next(iter(m)) for st in dvc_yaml["stages"].values()
                 for m in st.get("metrics", [])]
        return [f for f in files if (self.ws / f).exists()]

    def run(self) -> dict[str, Any]:
        began = time.monotonic()
        self.prepare_workspace()
        dvc = [sys.executable, "-m", "dvc"]
        remote_url = self._remote_url()
        bucket = remote_url.removeprefix("s3://").split("/", 1)[0]
        logs = self.ws / ".emdata-logs"
        print(f"demo workspace: {self.ws}\nstarting the replica ({self.profile} profile; the first run "
              "generates its synthetic volumes) and the S3 endpoint ...", flush=True)
        # The replica's log (what it generates, and how long it takes) goes to the console; moto's to a file.
        state = self.ws.parent / "replica.json"
        port = json.loads(state.read_text()).get("port", 0) if state.is_file() else 0
        with self._replica(port) as mirror, \
                services.s3([bucket], log_file=logs / "s3.log") as endpoint:
            state.write_text(json.dumps({"port": int(mirror.rsplit(":", 1)[1]), "profile": self.profile}))
            print(f"replica at {mirror}; S3 endpoint at {endpoint} (bucket {bucket})", flush=True)
            self.write_params(mirror)
            subprocess.run([*dvc, "remote", "modify", "--local", "storage", "endpointurl", endpoint],
                           cwd=self.ws, env=self.env, check=True)
            self.step("dvc repro", *dvc, "repro", *(self.stages or []))
            self.step("dvc push", *dvc, "push")
            outs = self.outputs()
            shutil.rmtree(self.ws / ".dvc" / "cache", ignore_errors=True)
            for out in outs:
                shutil.rmtree(self.ws / out, ignore_errors=True)
            print(f"\n=== deleted the DVC cache and {', '.join(outs)}", flush=True)
            self.step("dvc pull", *dvc, "pull", *outs)
            # One table per stage: the stages report different figures, and one table of all is too wide to read.
            for metrics_file in self.metrics_files():
                self.step("dvc metrics show", *dvc, "metrics", "show", "--md", metrics_file)
            # A remote that outlives the demo: the workspace's default, so `dvc pull` works after we exit.
            local = self.ws.parent / "demo-remote"
            for cmd in (["remote", "add", "--local", "-f", "local", str(local)], ["remote", "default", "--local", "local"]):
                subprocess.run([*dvc, *cmd], cwd=self.ws, env=self.env, check=True, capture_output=True)
            self.step("dvc push to the local remote", *dvc, "push", "-r", "local")
        checks = {out: describe_output(self.ws / out) for out in outs}
        summary = {"workspace": str(self.ws), "profile": self.profile, "outputs": checks,
                   "step_seconds": self.timings, "total_seconds": round(time.monotonic() - began, 1)}
        (self.ws / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _replica(self, port: int) -> Any:
        """The replica on the port of the previous demo (so params stay the same), or a free one."""
        if port:
            try:
                with socket.create_server(("127.0.0.1", port)):
                    pass
            except OSError:
                print(f"port {port} of the previous demo is busy: the replica takes a free one (the stages then "
                      "show as changed in `dvc status`)", flush=True)
                port = 0
        return services.replica(self.profile, port=port)

    def _remote_url(self) -> str:
        out = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=self.ws, env=self.env,
                             check=True, capture_output=True, text=True).stdout.split()
        if "storage" not in out:
            raise EmDataError("the DVC config names no remote 'storage'")
        return out[out.index("storage") + 1]


def describe_output(path: Path) -> dict[str, Any]:
    """Open every OME-Zarr image in ``path`` (the root or its child groups) and report its geometry."""
    import zarr

    if not path.exists():
        raise EmDataError(f"{path} is missing after dvc pull")
    images: dict[str, Any] = {}
    for name, group in find_images(zarr.open_group(str(path), mode="r")):
        ms, arrays = open_multiscale(path / name if name else path)
        scale, translation = (t for t in ms["datasets"][0]["coordinateTransformations"])
        images[name or "."] = {"shape": list(arrays[0].shape), "dtype": str(arrays[0].dtype),
                               "levels": len(arrays), "voxel_size_nm": scale["scale"],
                               "translation_nm": translation["translation"],
                               "axes": [a["name"] for a in ms["axes"]], "labels": label_names(group)}
    return images


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidParameterError(f"--set needs KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emdata.offline.demo", description=__doc__)
    parser.add_argument("--profile", choices=("full", "small"), default="full",
                        help="replica size: full keeps the real shapes of EPFL and IDR")
    parser.add_argument("--workspace", type=Path, default=Path(".emdata/demo"))
    parser.add_argument("--stage", action="append", dest="stages", help="only these stages (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                        help="override a param in the workspace's params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    repo = Path.cwd()
    if not (repo / "dvc.yaml").is_file():
        raise InvalidParameterError(f"run the demo from the repository root (no dvc.yaml in {repo})")
    demo = Demo(repo, args.workspace.resolve(), args.profile, args.stages, _parse_set(args.set))
    try:
        summary = demo.run()
    except EmDataError as exc:
        print(f"\nDEMO FAILED: {exc}\nworkspace kept for inspection: {demo.ws}", file=sys.stderr)
        return 1
    print("\n================ demo summary ================")
    for out, images in summary["outputs"].items():
        for name, d in images.items():
            print(f"{out}/{'' if name == '.' else name}: shape {tuple(d['shape'])} {d['dtype']}, "
                  f"voxel {d['voxel_size_nm']} nm, axes {''.join(d['axes'])}, {d['levels']} levels, "
                  f"labels {d['labels'] or 'none'}")
    print("step seconds:", ", ".join(f"{k} {v}" for k, v in summary["step_seconds"].items()))
    print(f"total {summary['total_seconds']} s. Results (pulled from the S3 remote) are in {demo.ws}/data;"
          f" metrics in {demo.ws}/metrics; summary in {demo.ws}/demo_summary.json")
    print(f"The workspace stays usable: cd {demo.ws} && dvc pull data/hemibrain_crop.zarr (from the local remote "
          f"{demo.ws.parent / 'demo-remote'}); to run stages again, start the replica on its port: "
          f"python -m emdata.offline.replica serve --profile {demo.profile} --port "
          f"{json.loads((demo.ws.parent / 'replica.json').read_text())['port']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
