"""dvc.yaml's code dependencies cannot drift from what each stage imports.

DVC re-runs a stage when one of its ``deps`` changes; a library module a stage
imports but ``dvc.yaml`` does not list would let an edit (to ``metrics.py``, say,
which picks train's best epoch) leave a stale result marked up to date.  The deps
are kept by hand (so that, e.g., an edit to the report code re-runs nothing), and
this test computes each stage's import closure from the source and fails naming
every module ``dvc.yaml`` misses.

The closure is static and generous: every ``import`` in a module counts, including
imports inside functions (the package imports lazily to keep start-up fast), and
the family registry counts as importing every family module it names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "vesselseg"


def _module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _registry_modules() -> set[str]:
    """The family modules (and their networks) the registry names as strings, imported by get_family."""
    tree = ast.parse((SRC / PACKAGE / "registry.py").read_text())
    return {
        n.value.split(":")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith(f"{PACKAGE}.")
    }


def _imports(path: Path, only_functions: set[str] | None = None) -> set[str]:
    """Every vesselseg module imported in ``path`` (in ``only_functions`` and at top level, if given)."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = []
    if only_functions is None:
        nodes = list(ast.walk(tree))
    else:
        for top in tree.body:
            if isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef):
                if top.name in only_functions:
                    nodes += list(ast.walk(top))
            else:
                nodes += list(ast.walk(top))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from vesselseg import atomic`
        elif isinstance(node, ast.Name | ast.Attribute) and (
            getattr(node, "id", None) or getattr(node, "attr", None)
        ) in ("get_family", "family_of_model_file"):
            found |= _registry_modules()  # the registry imports the named family's module by its string
    return {m for m in found if m.split(".")[0] == PACKAGE and _module_file(m) is not None}


def _called(path: Path, function: str) -> set[str]:
    """``function`` and the module-level functions its body names (one level: _timed, _tracked)."""
    tree = ast.parse(path.read_text())
    tops = {t.name: t for t in tree.body if isinstance(t, ast.FunctionDef)}
    names = {n.id for n in ast.walk(tops[function]) if isinstance(n, ast.Name)}
    return {function} | (names & set(tops))


def closure(stage: str) -> set[Path]:
    """The source files the ``stage`` command can execute, from its cli function outwards."""
    cli = _module_file(f"{PACKAGE}.cli")
    assert cli is not None
    todo = _imports(cli, only_functions=_called(cli, stage) | {"main", "run_stage"})
    seen: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        # a module's package __init__ runs first
        parts = mod.split(".")
        todo |= {".".join(parts[:i]) for i in range(1, len(parts))} - seen
        todo |= _imports(_module_file(mod)) - seen  # type: ignore[arg-type]
    files = {_module_file(m) for m in seen} | {cli}
    return {f.relative_to(ROOT) for f in files if f is not None}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_dvc_yaml_lists_every_module_the_stage_imports(stage: str) -> None:
    deps = [Path(d) for d in _stages()[stage].get("deps", [])]
    missing = sorted(str(f) for f in closure(stage) if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} misses code it imports: {missing}"


def test_closure_sees_lazy_and_registry_imports() -> None:
    """The analysis itself: train reaches metrics.py (lazily) and every family module (by name)."""
    train = closure("train")
    assert Path("src/vesselseg/metrics.py") in train
    for fam in ("unet", "ipn", "resnet_patch", "knn", "vesselness"):
        assert Path(f"src/vesselseg/families/{fam}.py") in train
    assert Path("src/vesselseg/evaluate.py") not in closure("download")
