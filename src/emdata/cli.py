"""The ``emdata`` command: list, inspect, verify, pull and view the repository's datasets."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emdata.catalog import DATASETS, Dataset, find
from emdata.errors import InvalidParameterError

EXIT_OK = 0
EXIT_FAILED = 1  # verification found a difference, or dvc pull failed
EXIT_USAGE = 2  # unknown dataset or group, bad arguments, not inside a repository (argparse uses 2 too)
EXIT_NOT_PULLED = 3  # the dataset's output is not in the workspace

TABLE = "metadata/datasets.csv"
DVC_LOCK = "dvc.lock"


class CliError(Exception):
    """A one-line error for the user, with the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# --- the repository and its records -------------------------------------------------------------------


def find_repo(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding ``dvc.yaml``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise CliError(f"no dvc.yaml in {here} or above: run emdata inside the emdata repository or pass --repo PATH",
                   EXIT_USAGE)


def resolve_name(name: str) -> Dataset:
    """A dataset by stage name, output name (as ``open_array``) or output path (``data/epfl.zarr``)."""
    cleaned = name.rstrip("/")
    for dataset in DATASETS.values():
        if cleaned == dataset.output:
            return dataset
    try:
        return find(cleaned)
    except InvalidParameterError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def pulled_output(args: argparse.Namespace) -> tuple[Path, Dataset, Path]:
    """The repository, the dataset ``args.name`` and its output path; CliError when it is not pulled."""
    repo = find_repo(args.repo)
    dataset = resolve_name(args.name)
    path = repo / dataset.output
    if not is_pulled(path):
        raise not_pulled(dataset, path)
    return repo, dataset, path


def is_pulled(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def not_pulled(dataset: Dataset, path: Path) -> CliError:
    return CliError(f"{dataset.name} is not in the workspace ({path} is missing): run `emdata pull {dataset.name}` "
                    f"(or `dvc pull {dataset.output}`)", EXIT_NOT_PULLED)


def files_under(path: Path) -> Iterator[Path]:
    """Every file below ``path``, in sorted relative-path order (the order DVC and the table hash them in)."""
    yield from sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes, files) of everything below ``path``."""
    total = count = 0
    for f in path.rglob("*"):
        if f.is_file():
            total += f.stat().st_size
            count += 1
    return total, count


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def table_rows(repo: Path, dataset: Dataset) -> list[dict[str, str]]:
    """The dataset's rows of ``metadata/datasets.csv`` ([] when the table or the rows are absent)."""
    table = repo / TABLE
    if not table.is_file():
        return []
    with table.open(newline="", encoding="utf-8") as fh:
        return [row for row in csv.DictReader(fh) if row.get("dataset") == dataset.name]


def lock_record(repo: Path, dataset: Dataset) -> dict[str, Any] | None:
    """The output's entry in ``dvc.lock`` (path, hash, md5, size, nfiles), or None when there is none."""
    import yaml

    lock = repo / DVC_LOCK
    if not lock.is_file():
        return None
    try:
        content = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise CliError(f"{lock} is not valid YAML: {e}") from None
    for stage in (content.get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, dict) and str(out.get("path", "")).rstrip("/") == dataset.output:
                return out
    return None


def root_attrs(path: Path) -> dict[str, Any]:
    import zarr

    return dict(zarr.open_group(str(path), mode="r").attrs.asdict())


def origin_of(attrs: dict[str, Any]) -> str:
    """``live``, ``replica`` or ``cache``, as the stage recorded it in ``attrs["emdata"]["origin"]``."""
    emdata = attrs.get("emdata")
    origin = emdata.get("origin") if isinstance(emdata, dict) else None
    if isinstance(origin, dict):  # a structured record: its kind
        origin = origin.get("kind") or origin.get("type") or origin.get("name")
    return str(origin) if origin else "unknown"


# --- emdata list --------------------------------------------------------------------------------------


@dataclass
class ImageSummary:
    image: str
    shape: str
    voxel_size_nm: str


@dataclass
class ListEntry:
    dataset: str
    output: str
    pulled: bool
    size_bytes: int | None
    size_source: str  # "workspace", "dvc.lock" or ""
    origin: str
    images: list[ImageSummary] = field(default_factory=list)


def _fmt_num(v: Any) -> str:
    f = float(v)
    return str(int(f)) if f.is_integer() else f"{f:g}"


def _images_from_zarr(path: Path) -> list[ImageSummary]:
    import zarr

    from emdata.ngff import find_images, multiscales

    out = []
    for name, group in find_images(zarr.open_group(str(path), mode="r")):
        ms = multiscales(group)
        level0 = ms["datasets"][0]
        array = group[level0["path"]]
        assert isinstance(array, zarr.Array)
        scale = next(t["scale"] for t in level0["coordinateTransformations"] if t["type"] == "scale")
        out.append(ImageSummary(name or ".", "x".join(map(str, array.shape)), "x".join(map(_fmt_num, scale))))
    return out


def _images_from_table(rows: list[dict[str, str]]) -> list[ImageSummary]:
    return [ImageSummary(r.get("image") or ".", r.get("shape", "?"),
                         "x".join(_fmt_num(r[f"voxel_size_{a}"]) if r.get(f"voxel_size_{a}") else "?" for a in "zyx"))
            for r in rows if r.get("kind") == "image"]


def list_entries(repo: Path) -> list[ListEntry]:
    entries = []
    for dataset in DATASETS.values():
        path = repo / dataset.output
        if is_pulled(path):
            size, _ = disk_usage(path)
            try:
                origin, images = origin_of(root_attrs(path)), _images_from_zarr(path)
            except Exception as e:  # noqa: BLE001 - shown in the listing, and list exits non-zero
                origin, images = f"unreadable: {_short_error(e)}", []
            entries.append(ListEntry(dataset.name, dataset.output, True, size, "workspace", origin, images))
        else:
            lock = lock_record(repo, dataset)
            remote_size = int(lock["size"]) if lock and "size" in lock else None
            entries.append(ListEntry(dataset.name, dataset.output, False, remote_size,
                                     "dvc.lock" if remote_size else "",
                                     "-", _images_from_table(table_rows(repo, dataset))))
    return entries


def _short_error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def cmd_list(args: argparse.Namespace) -> int:
    repo = find_repo(args.repo)
    entries = list_entries(repo)
    if args.json:
        print(json.dumps([e.__dict__ | {"images": [i.__dict__ for i in e.images]} for e in entries], indent=2))
        _fail_on_unreadable(entries)
        return EXIT_OK
    header = ("dataset", "output", "pulled", "image", "shape (z,y,x)", "voxel nm (z,y,x)", "size", "origin")
    rows: list[tuple[str, ...]] = []
    for e in entries:
        size = human_bytes(e.size_bytes) + (" (remote)" if e.size_source == "dvc.lock" else "")
        images = e.images or [ImageSummary("-", "-", "-")]
        for i, img in enumerate(images):
            if i == 0:
                rows.append((e.dataset, e.output, "yes" if e.pulled else "no", img.image, img.shape,
                             img.voxel_size_nm, size, e.origin))
            else:
                rows.append(("", "", "", img.image, img.shape, img.voxel_size_nm, "", ""))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not all(e.pulled for e in entries):
        print(f"\nnot pulled: images from {TABLE}, sizes from {DVC_LOCK} where recorded; "
              "get one with `emdata pull NAME`")
    _fail_on_unreadable(entries)
    return EXIT_OK


def _fail_on_unreadable(entries: list[ListEntry]) -> None:
    bad = [e.dataset for e in entries if e.origin.startswith("unreadable")]
    if bad:
        raise CliError(f"unreadable output(s): {', '.join(bad)}; `emdata verify NAME` names the damaged files")


# --- emdata info --------------------------------------------------------------------------------------


def _array_record(group: Any, ms: dict[str, Any]) -> dict[str, Any]:
    levels = []
    for d in ms["datasets"]:
        array = group[d["path"]]
        transforms = {t["type"]: t for t in d["coordinateTransformations"]}
        levels.append({
            "path": d["path"], "shape": list(array.shape), "dtype": str(array.dtype), "chunks": list(array.chunks),
            "shards": list(array.shards) if array.shards else None,
            "scale": transforms["scale"]["scale"],
            "translation": transforms.get("translation", {}).get("translation"),
        })
    return {"axes": ms["axes"], "downsampling": ms.get("type"), "levels": levels}


def info_record(repo: Path, dataset: Dataset) -> dict[str, Any]:
    path = repo / dataset.output
    record: dict[str, Any] = {
        "dataset": dataset.name, "output": dataset.output, "output_name": dataset.output_name,
        "module": dataset.module, "path": str(path), "pulled": is_pulled(path),
        "dvc_lock": lock_record(repo, dataset), "table": table_rows(repo, dataset),
    }
    if not record["pulled"]:
        return record
    size, nfiles = disk_usage(path)
    try:
        attrs, images = _read_output(path)
    except Exception as e:  # noqa: BLE001 - a damaged output is reported, not a traceback
        raise CliError(f"{path} is not a readable OME-Zarr ({_short_error(e)}); `emdata verify "
                       f"{dataset.name}` names the damaged files") from None
    record.update(size_bytes=size, files=nfiles, origin=origin_of(attrs), attributes=attrs, images=images)
    return record


def _read_output(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import zarr

    from emdata.ngff import find_images, label_names, multiscales, ome_attrs

    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs.asdict())
    images = []
    for name, group in find_images(root):
        labels = {}
        for label in label_names(group):
            lgroup = group[f"labels/{label}"]
            assert isinstance(lgroup, zarr.Group)
            labels[label] = {"ome": ome_attrs(lgroup), **_array_record(lgroup, multiscales(lgroup))}
        images.append({"image": name or ".", "ome": ome_attrs(group), **_array_record(group, multiscales(group)),
                       "labels": labels})
    return attrs, images


def cmd_info(args: argparse.Namespace) -> int:
    repo = find_repo(args.repo)
    dataset = resolve_name(args.name)
    record = info_record(repo, dataset)
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    else:
        _print_info(record)
    if not record["pulled"]:
        raise not_pulled(dataset, repo / dataset.output)
    return EXIT_OK


def _print_info(r: dict[str, Any]) -> None:
    print(f"{r['dataset']}: output {r['output']} (name {r['output_name']}), acquired by {r['module']}")
    if r["pulled"]:
        print(f"  workspace: {r['path']}, {human_bytes(r['size_bytes'])} in {r['files']} files; "
              f"origin {r['origin']}")
    else:
        print(f"  workspace: not pulled ({r['path']} is missing)")
    lock = r["dvc_lock"]
    if lock:
        print(f"  dvc.lock: md5 {lock.get('md5')}, {human_bytes(lock.get('size'))} in {lock.get('nfiles')} files")
    else:
        print(f"  dvc.lock: no record of {r['output']}")
    for image in r.get("images", []):
        print(f"image {image['image']}: axes {','.join(a['name'] for a in image['axes'])}, "
              f"{len(image['levels'])} levels ({image['downsampling']})")
        _print_levels(image["levels"], "  ")
        for label, rec in image["labels"].items():
            print(f"  label {label}: {len(rec['levels'])} levels ({rec['downsampling']})")
            _print_levels(rec["levels"][:1], "    ")
    if r.get("attributes") is not None:
        # The OME attributes are the levels above; --json prints them verbatim.
        other = {k: v for k, v in r["attributes"].items() if k != "ome"}
        print("attributes of the output's root (besides ome; --json prints all):")
        print(_indent(json.dumps(other, indent=2, default=str), "  "))
    if r["table"]:
        print(f"{TABLE}:")
        for row in r["table"]:
            print(f"  {row.get('array', '?')}:")
            for key, value in row.items():
                if key not in ("dataset", "array"):
                    print(f"    {key}: {value}")
    else:
        print(f"{TABLE}: no rows for {r['dataset']}")


def _print_levels(levels: list[dict[str, Any]], indent: str) -> None:
    for lv in levels:
        shards = "x".join(map(str, lv["shards"])) if lv["shards"] else "none"
        print(f"{indent}{lv['path']}: {'x'.join(map(str, lv['shape']))} {lv['dtype']}, "
              f"voxel {'x'.join(map(_fmt_num, lv['scale']))}, translation "
              f"{'x'.join(map(_fmt_num, lv['translation'] or [0, 0, 0]))}, chunks "
              f"{'x'.join(map(str, lv['chunks']))}, shards {shards}")


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# --- emdata verify ------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    status: str  # "ok", "FAIL" or "not recorded"
    detail: str
    problems: list[str] = field(default_factory=list)


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def dvc_dir_md5(entries: list[dict[str, str]]) -> str:
    """DVC's hash of a directory: md5 of its sorted ``[{"md5", "relpath"}]`` manifest as DVC serialises it."""
    ordered = sorted(entries, key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(ordered, sort_keys=True).encode("utf-8"), usedforsecurity=False).hexdigest() + ".dir"


def _dvc_manifest(repo: Path, oid: str) -> tuple[Path, list[dict[str, str]] | None]:
    """Where DVC's cache keeps the ``.dir`` manifest ``oid``, and its entries (None when it is not there)."""
    try:
        from dvc.repo import Repo

        with Repo(str(repo)) as dvc_repo:
            cache_path = Path(dvc_repo.cache.local.oid_to_path(oid))
    except Exception:  # noqa: BLE001 - no usable DVC repo: look where DVC 3 puts its cache by default
        cache_path = repo / ".dvc" / "cache" / "files" / "md5" / oid[:2] / oid[2:]
    if not cache_path.is_file():
        return cache_path, None
    raw = cache_path.read_bytes()
    # A manifest that does not hash to its own name cannot be used to name files.
    if hashlib.md5(raw, usedforsecurity=False).hexdigest() + ".dir" != oid:
        raise CliError(f"DVC cache manifest {cache_path} is corrupt (its md5 is not {oid})")
    entries = json.loads(raw)
    return cache_path, [{"md5": e["md5"], "relpath": e["relpath"]} for e in entries]


def check_dvc(repo: Path, dataset: Dataset, path: Path) -> Check:
    lock = lock_record(repo, dataset)
    if lock is None or not str(lock.get("md5", "")).endswith(".dir"):
        return Check("dvc.lock", "not recorded", f"{DVC_LOCK} has no directory hash for {dataset.output}")
    if lock.get("hash") != "md5":
        return Check("dvc.lock", "not recorded", f"{DVC_LOCK} records a DVC 2 (md5-dos2unix) hash; not checked")
    oid = str(lock["md5"])
    workspace = [{"md5": _md5_file(f), "relpath": f.relative_to(path).as_posix()} for f in files_under(path)]
    if dvc_dir_md5(workspace) == oid:
        return Check("dvc.lock", "ok", f"{len(workspace)} files hash to {oid} (DVC's record of {dataset.output})")
    cache_path, manifest = _dvc_manifest(repo, oid)
    if manifest is None:
        return Check("dvc.lock", "FAIL", f"the files do not hash to {oid}; DVC's manifest is not in the cache "
                     f"({cache_path}) to name them: `dvc fetch {dataset.output}` gets it",
                     [f"{dataset.output}: directory md5 differs from {DVC_LOCK}"])
    recorded = {e["relpath"]: e["md5"] for e in manifest}
    actual = {e["relpath"]: e["md5"] for e in workspace}
    problems = []
    for rel in sorted(recorded.keys() | actual.keys()):
        shown = f"{dataset.output}/{rel}"
        if rel not in actual:
            problems.append(f"{shown}: missing (DVC recorded md5 {recorded[rel]})")
        elif rel not in recorded:
            problems.append(f"{shown}: not in DVC's record (an extra file)")
        elif recorded[rel] != actual[rel]:
            problems.append(f"{shown}: md5 {actual[rel]}, DVC recorded {recorded[rel]}")
    return Check("dvc.lock", "FAIL", f"{len(problems)} of {len(recorded)} files differ from DVC's record {oid} "
                 f"(manifest {cache_path})", problems)


def check_table(repo: Path, dataset: Dataset, path: Path) -> Check:
    from emdata.metadata import tree_sha256  # the table's own hash (imported here: the table stack is heavy)

    recorded = {r.get("zarr_sha256", "") for r in table_rows(repo, dataset)} - {""}
    if not recorded:
        return Check(TABLE, "not recorded", f"no zarr_sha256 for {dataset.name} in {TABLE}")
    if len(recorded) > 1:
        return Check(TABLE, "FAIL", f"{TABLE} records {len(recorded)} different zarr_sha256 for {dataset.name}",
                     [f"{TABLE}: conflicting zarr_sha256 {sorted(recorded)}"])
    expected = recorded.pop()
    actual = tree_sha256(path)
    if actual == expected:
        return Check(TABLE, "ok", f"Zarr tree sha256 {actual}")
    return Check(TABLE, "FAIL", f"Zarr tree sha256 {actual}, the table records {expected}",
                 [f"{dataset.output}: Zarr tree sha256 differs from {TABLE}"])


def _arrays(group: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    import zarr

    for name, member in sorted(group.members(), key=lambda m: m[0]):
        key = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            yield key, member
        else:
            yield from _arrays(member, f"{key}/")


def check_decode(dataset: Dataset, path: Path) -> Check:
    """Every stored chunk (or shard) of every array decodes; a failure names the file."""
    import zarr

    from emdata.ngff import block_slices

    problems: list[str] = []
    n_arrays = n_files = 0
    try:
        arrays = list(_arrays(zarr.open_group(str(path), mode="r")))
    except Exception as e:  # noqa: BLE001 - unreadable metadata is a verification failure, not a traceback
        problems.append(f"{dataset.output}: its zarr.json metadata does not parse ({_short_error(e)})")
        return Check("decode", "FAIL", "the Zarr hierarchy could not be opened", problems)
    for name, array in arrays:
        n_arrays += 1
        step = array.shards or array.chunks
        for region in block_slices(array.shape, step):
            key = array.metadata.encode_chunk_key(tuple(s.start // b for s, b in zip(region, step, strict=True)))
            n_files += 1
            try:
                array[region]
            except Exception as e:  # noqa: BLE001 - any decoding failure is reported with its file
                problems.append(f"{dataset.output}/{name}/{key}: does not decode ({type(e).__name__}: {e})")
    status = "FAIL" if problems else "ok"
    return Check("decode", status, f"{n_arrays} arrays, {n_files} chunk/shard files read"
                 + (f", {len(problems)} failed" if problems else ""), problems)


def cmd_verify(args: argparse.Namespace) -> int:
    repo, dataset, path = pulled_output(args)
    began = time.monotonic()
    print(f"verify {dataset.name} ({dataset.output})")
    checks = [check_dvc(repo, dataset, path), check_table(repo, dataset, path)]
    if not args.no_decode:
        checks.append(check_decode(dataset, path))
    for check in checks:
        print(f"  {check.name:<22} {check.status:<13} {check.detail}")
        for problem in check.problems:
            print(f"    {problem}")
    failed = [c for c in checks if c.status == "FAIL"]
    problems = [p for c in failed for p in c.problems]
    if failed:
        raise CliError(f"{dataset.name} failed verification ({', '.join(c.name for c in failed)}): "
                       + "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
    if not any(c.status == "ok" for c in checks[:2]):
        raise CliError(f"{dataset.name}: no recorded hash to verify against (no {DVC_LOCK} entry, no "
                       f"zarr_sha256 in {TABLE}); `dvc repro {dataset.name}` and the metadata stage record them")
    print(f"ok: {dataset.name} matches its records ({time.monotonic() - began:.1f} s)")
    return EXIT_OK


# --- emdata pull --------------------------------------------------------------------------------------


def _dvc_command() -> list[str]:
    return [sys.executable, "-m", "dvc"]


def default_remote(repo: Path) -> str | None:
    """The name of the DVC remote ``dvc pull`` uses, or None when none is configured."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        dvc_repo = Repo(str(repo))
    except NotDvcRepoError:
        raise CliError(f"{repo} is not a DVC repository (no .dvc folder): clone the emdata repository with git",
                       EXIT_USAGE) from None
    with dvc_repo:
        config = dvc_repo.config
        name = config["core"].get("remote")
        if name and name in config["remote"]:
            return str(name)
    return None


def cmd_pull(args: argparse.Namespace) -> int:
    repo = find_repo(args.repo)
    dataset = resolve_name(args.name)
    if lock_record(repo, dataset) is None:
        raise CliError(f"{DVC_LOCK} records no hash for {dataset.output}, so there is nothing to pull: it has not "
                       f"been published yet; build it with `dvc repro {dataset.name}`")
    remote = default_remote(repo)
    if remote is None:
        raise CliError("no default DVC remote is configured: add one with `dvc remote add -d storage URL` "
                       "(credentials with `dvc remote modify --local storage ...`; see README)")
    cmd = [*_dvc_command(), "pull", dataset.output]
    print(f"$ dvc pull {dataset.output}  (remote {remote!r}, in {repo})", flush=True)
    # dvc writes straight to the terminal, so its progress bars show.
    proc = subprocess.run(cmd, cwd=repo, check=False)
    if proc.returncode != 0:
        raise CliError(f"dvc pull {dataset.output} failed (exit {proc.returncode}), see dvc's message above; for "
                       f"missing credentials or endpoint: `dvc remote modify --local {remote} access_key_id ...` "
                       "(and endpointurl for a non-AWS store) or the usual AWS environment")
    if not is_pulled(repo / dataset.output):
        raise CliError(f"dvc pull finished but {dataset.output} is still missing")
    print(f"pulled {dataset.name} into {dataset.output}; check it with `emdata verify {dataset.name}`")
    return EXIT_OK


# --- emdata view --------------------------------------------------------------------------------------


def cmd_view(args: argparse.Namespace) -> int:
    from emdata import viewer

    _, dataset, path = pulled_output(args)
    try:
        server = viewer.serve(dataset.name, path, groups=args.group or None, port=args.port, layout=args.layout,
                              log_requests=args.log_requests)
    except InvalidParameterError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except OSError as e:
        raise CliError(f"cannot serve on {viewer.LOOPBACK}:{args.port}: {e.strerror or e}", EXIT_USAGE) from None
    try:
        print(f"serving {dataset.output} on {server.base_url} (loopback only; Ctrl-C stops it)", file=sys.stderr)
        for image in server.images:
            labels = ", ".join(label.name for label in image.labels) or "none"
            print(f"  {image.name or '.'}: {'x'.join(map(str, image.shape))} {image.dtype} (z,y,x), voxel "
                  f"{'x'.join(map(_fmt_num, image.voxel_size_nm))} nm, translation "
                  f"{', '.join(map(_fmt_num, image.translation_nm))} nm; labels: {labels}", file=sys.stderr)
        sys.stderr.flush()
        print(server.url, flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(server.url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return EXIT_OK


# --- checksums ----------------------------------------------------------------------------------------


def _registry(repo: Path, section: str) -> Any:
    from emdata.acquire.download import ChecksumRegistry
    from emdata.acquire.params import DownloadConfig, dataclass_from_section, load_params

    params = load_params(repo / "params.yaml")
    config = dataclass_from_section(DownloadConfig, params.get("download"), "download")
    return ChecksumRegistry(repo / config.checksums_file, section)


def cmd_checksums(args: argparse.Namespace) -> int:
    """List the pinned and recorded sha256 of the raw files, or forget one to accept an upstream change."""
    repo = find_repo(args.repo)
    registry = _registry(repo, args.section)
    if args.action == "list":
        for url, entry in sorted(registry.entries().items()):
            how = f"recorded {entry['recorded']} ({entry.get('verified_by', '?')})" if "recorded" in entry \
                else "pinned"
            print(f"{entry.get('sha256')}  {entry.get('size', '?'):>12}  {how}  {url}")
        return EXIT_OK
    if not args.url:
        raise CliError("checksums forget needs the URL (as `emdata checksums list` prints it)", EXIT_USAGE)
    if not registry.forget(args.url):
        raise CliError(f"no {args.section} checksum for {args.url!r}", EXIT_USAGE)
    print(f"forgot the {args.section} checksum of {args.url}; the next run downloads and verifies it afresh")
    return EXIT_OK


# --- entry point --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(d.name if d.name == d.output_name else f"{d.name} ({d.output_name})"
                      for d in DATASETS.values())
    name_help = "stage name, output name or output path (hemibrain, hemibrain_crop, data/hemibrain_crop.zarr)"
    parser = argparse.ArgumentParser(
        prog="emdata", description="List, inspect, verify, pull and view the emdata datasets.",
        epilog=f"datasets: {names}. Exit codes: 0 ok, 1 verification or pull failed, 2 usage error or unknown "
               "name, 3 dataset not pulled.")
    parser.add_argument("--repo", type=Path, default=None,
                        help="the emdata repository (default: the nearest folder with dvc.yaml at or above .)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="every dataset: pulled or not, shape, voxel size, size, origin")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="a dataset's full record: attributes, levels, labels, dvc.lock, table rows")
    p.add_argument("name", help=name_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="re-check an output against dvc.lock, the table's hash; decode every chunk")
    p.add_argument("name", help=name_help)
    p.add_argument("--no-decode", action="store_true", help="skip decoding every chunk (hashes only)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("pull", help="dvc pull a dataset's output from the configured remote")
    p.add_argument("name", help=name_help)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("view", help="serve the OME-Zarr and Neuroglancer on loopback, print the viewer URL")
    p.add_argument("name", help=name_help)
    p.add_argument("--group", action="append", metavar="GROUP",
                   help="an image group to show (repeatable; e.g. training for epfl); default: every image")
    p.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    p.add_argument("--layout", default="4panel", choices=["4panel", "xy", "xz", "yz", "3d", "xy-3d"],
                   help="Neuroglancer layout (default 4panel)")
    p.add_argument("--open", action="store_true", help="open the URL in the default browser")
    p.add_argument("--log-requests", action="store_true", help="print every data request to stderr")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("checksums", help="list the raw files' pinned/recorded sha256, or forget one (an upstream "
                                         "change)")
    p.add_argument("action", choices=["list", "forget"])
    p.add_argument("url", nargs="?", help="with forget: the live URL whose checksum to drop")
    p.add_argument("--section", choices=["live", "replica"], default="live",
                   help="live (also a cache mirror's) or replica checksums (default live)")
    p.set_defaults(func=cmd_checksums)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except CliError as e:
        print(f"emdata {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:  # e.g. `emdata info x | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
