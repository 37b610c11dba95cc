"""The layout shows the architecture (README: Architecture): sub-packages by job, arrows pointing down only, the
core never importing a plug-in, no import circles, no environment variables as channels between modules."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# what each part of harness/ may import (besides itself and the contracts at harness/ top level)
ALLOWED = {
    "run": {"train", "evaluate", "report", "inputs"},
    "train": {"evaluate", "inputs"},
    "evaluate": {"inputs"},
    "report": {"inputs"},
    "inputs": set(),
}
CONTRACTS = {"errors", "protocols", "identity", "records", "checks"}


def imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_arrows_point_down_and_the_core_reaches_plugins_only_through_the_registry():
    for path in sorted((REPO / "harness").rglob("*.py")):
        part = path.relative_to(REPO / "harness").parts
        package = part[0] if len(part) > 1 else None
        for module in imports_of(path):
            top = module.split(".")[0]
            assert top not in ("methods", "tasks"), f"{path}: imports {module}; reach plug-ins through the registry"
            if top != "harness" or module == "harness":
                continue
            target = module.split(".")[1]
            if target in CONTRACTS or target == package or package is None:
                continue
            assert target in ALLOWED[package], f"{path}: harness.{package} must not import {module}"


def test_contracts_import_no_subpackage():
    for name in CONTRACTS:
        for module in imports_of(REPO / "harness" / f"{name}.py"):
            parts = module.split(".")
            assert not (parts[0] == "harness" and len(parts) > 1 and parts[1] in ALLOWED and parts[1] != "inputs"), \
                f"harness/{name}.py imports {module}"


def test_no_module_writes_the_environment_as_a_channel():
    for path in sorted((REPO / "harness").rglob("*.py")):
        text = path.read_text()
        assert "os.environ[" not in text.replace("os.environ[\"WORLD_SIZE\"]", ""), path
        assert "os.environ.setdefault" not in text or path.name == "cli.py", path  # the CLI quiets libraries only
        assert "os.putenv" not in text, path
