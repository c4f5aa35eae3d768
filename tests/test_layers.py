"""The package's layers, checked on the source: environments know nothing of models, models nothing of
environments, and the leaf modules depend on nothing of the package's training machinery."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_sftrl"
ML = {"torch", "transformers", "peft", "bitsandbytes", "lightning", "torchmetrics"}
TRAINING = {"lit_sftrl.envs", "lit_sftrl.data", "lit_sftrl.training", "lit_sftrl.run", "lit_sftrl.pretraining",
            "lit_sftrl.cli"}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def under(name: str, prefixes: set[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("path", sorted((PACKAGE / "envs").glob("*.py")), ids=lambda p: p.name)
def test_environments_import_no_model_library_and_nothing_of_the_package_outside_envs(path):
    bad = {
        name for name in imports(path)
        if under(name, ML) or (under(name, {"lit_sftrl"}) and not under(name, {"lit_sftrl.envs"}))
    }
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_know_nothing_of_environments_or_training(path):
    bad = {name for name in imports(path) if under(name, TRAINING)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("leaf", ["core/seeding.py", "data/episodes.py", "models/chat.py"])
def test_leaf_modules_import_nothing_of_the_package(leaf):
    path = PACKAGE / leaf
    bad = {name for name in imports(path) if under(name, {"lit_sftrl"} | ML)}
    assert not bad, f"{leaf}.py imports {sorted(bad)}"


def test_the_model_layer_has_no_import_cycle():
    """models/config -> kv_cache -> encoding used to lead back to config (for Message and Prompt)."""
    graph = {path.stem: {name.rsplit(".", 1)[-1] for name in imports(path) if name.startswith("lit_sftrl.models.")}
             for path in (PACKAGE / "models").glob("*.py")}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    cyclic = sorted(module for module in graph if reaches(module, module, {module}))
    assert not cyclic, f"import cycles through {cyclic}"


def test_the_package_map_names_every_module():
    section = (PACKAGE.parent / "docs" / "reference" / "package-map.md").read_text().split("# Package map", 1)[1]
    modules = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    missing = [str(m) for m in modules if f"`{m.name}`" not in section and f"`{m}`" not in section]
    assert not missing, f"docs/reference/package-map.md lacks {missing}"
