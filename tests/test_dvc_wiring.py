"""dvc.yaml cannot drift: stages match the dataset catalog, and every module a stage imports is one of its deps."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml

from emdata.catalog import DATASETS

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES: dict[str, dict] = DVC["stages"]


def _outs(stage: dict, key: str = "outs") -> list[str]:
    return [o if isinstance(o, str) else next(iter(o)) for o in stage.get(key, [])]


def _emdata_imports(path: Path) -> set[str]:
    """Every ``emdata.*`` module ``path`` imports, at any depth of its code (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from emdata import ngff`` imports emdata.ngff; ``from emdata.x import y`` imports emdata.x (and
            # emdata.x.y when y is a module).
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "emdata" or n.startswith("emdata."))
    return found


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # ``name`` is a class or function of a module, not a module
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).resolve()


def _closure(roots: list[Path]) -> set[Path]:
    """The files of every emdata module reachable by imports from ``roots`` (packages' __init__ included)."""
    todo, seen = list(roots), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _emdata_imports(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                found = _module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == (REPO / d).resolve() or (REPO / d).resolve() in path.parents for d in deps)


def test_every_dataset_has_its_stage_and_every_stage_its_dataset():
    sources = {name for name in STAGES if name != "metadata"}
    assert sources == set(DATASETS), "dvc.yaml stages and emdata.catalog datasets differ"
    for name, dataset in DATASETS.items():
        stage = STAGES[name]
        assert stage["cmd"] == f"python stages/{name}.py"
        assert _outs(stage) == [dataset.output], f"stage {name} must write exactly {dataset.output}"
        assert _outs(stage, "metrics") == [dataset.metrics]
        assert {"mirror", "download", name} <= set(stage["params"])
        spec = importlib.util.find_spec(dataset.module)
        assert spec is not None, f"{name}: no module {dataset.module}"
        assert f"stages/{name}.py" in stage["deps"]
    # The metadata stage consolidates every output.
    assert {d.output for d in DATASETS.values()} <= set(STAGES["metadata"]["deps"])


def test_every_artifact_is_a_stage_output():
    outs = {o for stage in STAGES.values() for o in _outs(stage)}
    artifacts = DVC["artifacts"]
    assert set(artifacts) == set(STAGES)  # one name per dataset: the stage's
    for name, artifact in artifacts.items():
        assert artifact["path"] in outs, f"artifact {name} names {artifact['path']}, which no stage writes"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_depends_on_every_module_it_imports(stage):
    deps = STAGES[stage]["deps"]
    roots = [REPO / "stages" / f"{stage}.py"]
    if stage in DATASETS:  # emdata.sources.get_source imports the catalog's module by name
        roots.append(_module_file(DATASETS[stage].module))  # type: ignore[arg-type]
    files = _closure(roots)
    missing = sorted(str(f.relative_to(REPO)) for f in files if REPO in f.parents and not _covered(f, deps))
    assert not missing, f"stage {stage} imports modules that are not among its deps: {missing}"
    assert len(files) > 2  # the walk followed the imports


def test_the_import_walk_sees_function_level_imports(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from emdata.acquire import context\n")
    files = _closure([script])
    assert (REPO / "src/emdata/acquire/context.py").resolve() in files
    assert not _covered((REPO / "src/emdata/acquire/context.py").resolve(), ["src/emdata/ngff.py"])


@pytest.mark.slow  # one interpreter per stage (~3 s each)
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_script_runs_its_own_stage(stage, tmp_path):
    """The script a stage's cmd runs is the entry of that stage: a typo in its section fails naming the section."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(REPO / "stages", tmp_path / "stages")
    (tmp_path / "params.yaml").write_text(f"{stage}:\n  no_such_key: 1\n")
    proc = subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert f"unknown key(s) ['no_such_key'] in params section '{stage}'" in proc.stderr
    assert not (tmp_path / "data").exists()
