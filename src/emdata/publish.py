"""``make publish``: the maintainer's live run -- ``dvc repro``, ``dvc push``, then the files to commit.

Publishing replica-made data as live is refused: every output's recorded origin must be ``live`` or ``cache``
(a mirror of the live bytes). ``--allow-replica`` exists only to exercise the flow offline (tests); what it
publishes then says ``replica`` in its attributes and in ``dvc.lock``'s params.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import zarr

from emdata.acquire.context import mirror_config
from emdata.acquire.params import load_params
from emdata.catalog import DATASETS, find
from emdata.errors import EmDataError, InvalidParameterError

# What a maintainer commits after publishing: the lock (hashes of every output, so `dvc pull` can find them),
# the checksums of the raw files, and the metrics/metadata that describe the published data.
FILES_TO_COMMIT = ("dvc.lock", "checksums.json", "metrics", "metadata", "METADATA_SUMMARY.md", "plots")


def check_publishable(repo: Path, stages: list[str], allow_replica: bool) -> None:
    """Refuse a replica mirror, and any output whose recorded origin is the replica (unless allowed)."""
    mirror = mirror_config(load_params(repo / "params.yaml").get("mirror"))
    if mirror.origin == "replica" and not allow_replica:
        raise InvalidParameterError(
            f"params.yaml mirror.url is {mirror.url!r} serving the replica: replica-made data is never published "
            "as live; set mirror.url to \"\" (live) or to a cache of the live bytes with serves: cache")
    for name in stages:
        if name not in DATASETS:
            continue
        out = repo / find(name).output
        if not out.exists():
            continue
        attrs = zarr.open_group(str(out), mode="r").attrs.asdict().get("emdata")
        origin = attrs.get("origin") if isinstance(attrs, dict) else None
        if origin not in ("live", "cache") and not (allow_replica and origin == "replica"):
            raise InvalidParameterError(f"{out} was made from origin {origin!r}, not live bytes: not published")


def publish(repo: Path, stages: list[str], *, allow_replica: bool = False, remote: str | None = None) -> list[str]:
    """Reproduce ``stages`` (all when empty), push their outputs, and return the paths to commit."""
    names = stages or [*DATASETS, "metadata"]
    check_publishable(repo, names, allow_replica)
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "repro", *stages], repo)
    check_publishable(repo, names, allow_replica)  # what was just made, not only what was there
    _run([*dvc, "push", *(["-r", remote] if remote else []), *stages], repo)
    return [f for f in FILES_TO_COMMIT if (repo / f).exists()]


def _run(cmd: list[str], repo: Path) -> None:
    print(f"=== {' '.join(cmd[2:])}", flush=True)
    if subprocess.run(cmd, cwd=repo, stdin=subprocess.DEVNULL).returncode != 0:
        raise EmDataError(f"{' '.join(cmd[2:])} failed; nothing was published")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emdata.publish", description=__doc__)
    parser.add_argument("stages", nargs="*", help="stages to publish (default: all)")
    parser.add_argument("--remote", help="the DVC remote to push to (default: the repository's default)")
    parser.add_argument("--allow-replica", action="store_true",
                        help="exercise the flow with replica data (tests only: the data says replica)")
    args = parser.parse_args(argv)
    repo = Path.cwd()
    if not (repo / "dvc.yaml").is_file():
        print("run from the repository root (no dvc.yaml here)", file=sys.stderr)
        return 2
    try:
        files = publish(repo, args.stages, allow_replica=args.allow_replica, remote=args.remote)
    except EmDataError as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 1
    print("\nPublished. Review and commit:\n  git add " + " ".join(files) + "\n  git commit -m 'Publish data'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
