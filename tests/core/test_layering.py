"""Layering: dtr_core is a plain library, exported sources travel without it, and the import graph
of dtr_core / tasks / flows has no circles and no arrow pointing up a layer."""

import ast
import sys
from pathlib import Path

import dtr_core

FORBIDDEN = {"prefect", "mlflow", "hydra", "omegaconf"}


def test_core_imports_no_orchestration_code():
    offenders = []
    for path in Path(dtr_core.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


ALLOWED_IN_EXPORTS = {"torch", "transformers"} | set(sys.stdlib_module_names)
OPTIONAL_IN_EXPORTS = {"fla", "triton"}  # only inside try: transformers refuses a folder that needs them
LINEAR_DIR = Path(dtr_core.__file__).parent / "linear"


def exported_import_offenders(path: Path) -> list[str]:
    """Imports in ``path`` that an exported folder cannot satisfy: anything but torch, transformers, the
    stdlib and sibling files, except fla and Triton inside try (as transformers' own check reads them)."""
    offenders = []

    def visit(node, in_try: bool) -> None:
        allowed = ALLOWED_IN_EXPORTS | (OPTIONAL_IN_EXPORTS if in_try else set())
        if isinstance(node, ast.Import):
            offenders.extend(a.name for a in node.names if a.name.split(".")[0] not in allowed)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] not in allowed:
            offenders.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            offenders.append("." * node.level + (node.module or ""))  # outside the folder
        for child in ast.iter_child_nodes(node):
            visit(child, in_try or isinstance(node, ast.Try))

    visit(ast.parse(path.read_text()), False)
    return [f"{path.name}: {name}" for name in offenders]


def test_exported_sources_import_only_torch_transformers_and_siblings():
    """The copied sources travel with exported models, where dtr_core does not exist."""
    from dtr_core.export.hf_folder import COPIED_SOURCES

    assert [o for name in COPIED_SOURCES for o in exported_import_offenders(LINEAR_DIR / name)] == []


def test_modeling_file_imports_only_torch_transformers_and_the_copied_sources():
    """The modeling file loads in a folder without dtr_core, and every sibling it needs (transformers
    follows its relative imports to copy them) is one export copies; linear/ holds nothing else but
    build.py, the dtr_core-only builder."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from dtr_core.export.hf_folder import COPIED_SOURCES, MODELING_FILE

    modeling = LINEAR_DIR / MODELING_FILE
    assert exported_import_offenders(modeling) == []
    assert {Path(f).name for f in get_relative_import_files(modeling)} == set(COPIED_SOURCES)
    rest = {p.name for p in LINEAR_DIR.glob("*.py")} - {MODELING_FILE, *COPIED_SOURCES}
    assert rest == {"__init__.py", "build.py"}


# --- the import graph of the project's own packages ----------------------------------------------

REPO = Path(dtr_core.__file__).resolve().parent.parent
# Each layer may import only from the layers below it (a lower number).
LAYERS = {"dtr_core": 0, "tasks": 1, "flows": 2}


def project_modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the layered packages."""
    modules = {}
    for package in LAYERS:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (in functions too: a lazy import
    that hides a cycle is still a cycle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # ``from package import module`` imports the module; ``from module import name`` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_layers_import_only_from_below():
    graph = import_graph()
    upward = [f"{a} → {b}" for a, targets in graph.items() for b in targets
              if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]]
    assert upward == []


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}  # state: 1 on the current path, 2 finished

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" → ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_import_graph_sees_relative_and_package_imports():
    """The graph is only as good as its edges: known imports of each kind must be in it."""
    graph = import_graph()
    assert "dtr_core.adapters.base" in graph["dtr_core.adapters.llama"]  # from .base import ...
    assert "dtr_core.run" in graph["flows.dtr"]  # from dtr_core.run import ...
    assert "dtr_core.adapters.bert" in graph["dtr_core.adapters"]  # a package's __init__
