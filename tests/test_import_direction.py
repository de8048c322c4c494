"""Layering of the package and the tools, read from the source (no imports run): utils import neither data
nor modeling, modeling never imports engine, clustering imports only structures and utils, every package
imports only the ones below it, and no tool imports another tool."""

import ast
import os

from conftest import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "part_distillation")
TOOLS = os.path.join(REPO_ROOT, "tools")


def _imported_modules(path: str, package: str) -> set:
    """Absolute dotted names imported by the module at ``path`` (relative imports resolved in ``package``)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return names


def _package_modules(subpackage: str):
    root = os.path.join(PACKAGE, subpackage)
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(dirpath, REPO_ROOT).replace(os.sep, ".")
                yield path, rel


def _offenders(subpackage: str, forbidden) -> list:
    bad = []
    for path, package in _package_modules(subpackage):
        for module in _imported_modules(path, package):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(f"{os.path.relpath(path, REPO_ROOT)} imports {module}")
    return bad


def test_utils_import_neither_data_nor_modeling():
    assert _offenders("utils", ["part_distillation.data", "part_distillation.modeling"]) == []


def test_modeling_does_not_import_engine():
    assert _offenders("modeling", ["part_distillation.engine"]) == []


def test_clustering_imports_only_structures_and_utils():
    package = ["config", "data", "modeling", "evaluation", "engine"]
    assert _offenders("clustering", [f"part_distillation.{name}" for name in package]) == []


def test_modeling_grouping_is_only_a_compatibility_alias():
    """The old home of K-means and the CRF re-exports clustering/ (no code of its own, same module objects)."""
    import part_distillation.clustering.crf as crf
    import part_distillation.clustering.kmeans as kmeans
    import part_distillation.modeling.grouping.crf as old_crf
    from part_distillation.modeling.grouping.kmeans import batched_kmeans

    assert old_crf is crf and batched_kmeans is kmeans.batched_kmeans
    assert set(os.listdir(os.path.join(PACKAGE, "modeling", "grouping"))) - {"__pycache__"} == {"__init__.py"}


def test_packages_import_only_downwards():
    """utils ← structures ← clustering ← data ← modeling ← evaluation ← engine (README, "Inside
    part_distillation/")."""
    order = ["utils", "structures", "clustering", "data", "modeling", "evaluation", "engine"]
    bad = []
    for i, sub in enumerate(order):
        bad += _offenders(sub, [f"part_distillation.{above}" for above in order[i + 1 :]])
    assert bad == []


def test_tools_do_not_import_tools():
    tools = {name[:-3] for name in os.listdir(TOOLS) if name.endswith(".py")}
    bad = []
    for name in sorted(tools):
        path = os.path.join(TOOLS, name + ".py")
        source = open(path, encoding="utf-8").read()
        imported = {m.split(".")[0] for m in _imported_modules(path, "tools")}
        bad += [f"tools/{name}.py imports {m}" for m in sorted(imported & (tools - {name}))]
        if "sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))" in source:  # tools/ itself
            bad.append(f"tools/{name}.py puts tools/ on sys.path")
    assert bad == []
