"""dtr_core is a plain library: no orchestration imports anywhere inside it."""

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


def test_exported_sources_import_only_torch_transformers_and_siblings():
    """The copied sources travel with exported models, where dtr_core does not exist."""
    from dtr_core.export.hf_folder import COPIED_SOURCES

    allowed = {"torch", "transformers", "fla", "triton"} | set(sys.stdlib_module_names)
    linear_dir = Path(dtr_core.__file__).parent / "linear"
    for name in COPIED_SOURCES:
        for node in ast.walk(ast.parse((linear_dir / name).read_text())):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in allowed for a in node.names), (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 or node.module.split(".")[0] in allowed, (name, node.module)
