"""From clone to data: publish in one clone (repro + push + commit), pull one output in a fresh clone."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emdata.offline import services

REPO = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=emdata test", "-c", "user.email=test@localhost"]
# The loopback S3 endpoint (moto) accepts any credentials: placeholders for the client.
S3_ENV = {"AWS_ACCESS_KEY_ID": "test-only", "AWS_SECRET_ACCESS_KEY": "test-only", "AWS_DEFAULT_REGION": "us-east-1"}


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


def _set_params(clone: Path, mirror: str) -> None:
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["mirror"] = {"url": mirror, "serves": "replica"}
    params["hemibrain"]["crop_size"] = [64, 64, 64]
    params["hemibrain"]["min_tissue_fraction"] = 0.5
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_publish_in_one_clone_then_a_fresh_clone_pulls_hemibrain_byte_identical(tmp_path):
    env = {**os.environ, **S3_ENV, "EMDATA_REPLICA_CACHE": str(tmp_path / "replica-cache"), "DVC_NO_ANALYTICS": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    dvc = [sys.executable, "-m", "dvc"]
    first, second = tmp_path / "maintainer", tmp_path / "user"
    _run(["git", "clone", "-q", str(REPO), str(first)], tmp_path, env)
    remotes = _run([*dvc, "remote", "list"], first, env).stdout.split()
    bucket = remotes[remotes.index("storage") + 1].removeprefix("s3://").split("/", 1)[0]
    with services.replica("small", sources=["hemibrain"]) as mirror, services.s3([bucket]) as endpoint:
        _set_params(first, mirror)
        _run([*dvc, "remote", "modify", "--local", "storage", "endpointurl", endpoint], first, env)
        # Replica-made data is never published as live.
        refused = subprocess.run([sys.executable, "-m", "emdata.publish", "hemibrain"], cwd=first, env=env,
                                 capture_output=True, text=True, timeout=600)
        assert refused.returncode != 0 and "never published as live" in refused.stderr
        assert not (first / "data" / "hemibrain_crop.zarr").exists()
        out = _run([sys.executable, "-m", "emdata.publish", "hemibrain", "--allow-replica"], first, env).stdout
        assert "git add dvc.lock checksums.json metrics" in out
        _run([*GIT, "add", "dvc.lock", "checksums.json", "metrics", "params.yaml"], first, env)
        _run([*GIT, "commit", "-qm", "Publish hemibrain"], first, env)
        lock = (first / "dvc.lock").read_text()
        assert "hemibrain:" in lock and "test-only" not in lock and endpoint not in lock

        # A user: a fresh clone, the remote's endpoint (credentials in the environment), one output.
        _run(["git", "clone", "-q", str(first), str(second)], tmp_path, env)
        assert not (second / "data" / "hemibrain_crop.zarr").exists()
        _run([*dvc, "remote", "modify", "--local", "storage", "endpointurl", endpoint], second, env)
        _run([*dvc, "pull", "data/hemibrain_crop.zarr"], second, env)
    pulled, made = second / "data" / "hemibrain_crop.zarr", first / "data" / "hemibrain_crop.zarr"
    assert _tree(pulled) == _tree(made) and len(_tree(made)) > 5  # image and label levels, chunks
    assert not (second / "data" / "epfl.zarr").exists()  # just the one asked for
