"""The import boundaries the docstrings state, enforced: each module is imported alone in a
fresh interpreter and what it pulled in is checked; and no test imports another test module
(shared helpers live in tests/helpers.py and tests/vm/helpers.py)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

#: module -> modules it must not load (its docstring says why).
BOUNDARIES = {
    "vmdriver.driver": ["libvirt", "trio"],
    "vmdriver.backends.base": ["libvirt", "trio"],
    "vmdriver.backends.registry": ["libvirt", "trio"],
    "vmdriver.attachments": ["libvirt"],
    "vmdriver.backends.qmp": ["libvirt"],
    "vmdriver.backends.cloud_hypervisor": ["libvirt"],
    "vmdriver.cli": ["libvirt", "trio"],
    "volumed.exports": ["pyfuse3", "trio"],
    "volumed.fs.nodes": ["volumed.exports", "pyfuse3", "trio"],
    "volumed.api": ["vmdriver", "libvirt", "pyfuse3"],
    "volumed.daemon": ["vmdriver", "libvirt", "pyfuse3"],
    "volumed.openapi": ["pyfuse3"],
    "volumed.export_manager": ["pyfuse3"],
    "volumed.sandbox": ["pyfuse3", "trio"],
    "volumed.archive": ["pyfuse3", "trio"],
    "volumed.archive_worker": ["pyfuse3", "trio"],
    "volumed.archive_jobs": ["pyfuse3"],
    "volumed.config": ["trio", "pyfuse3", "fastapi"],
    "volumed.metrics": ["trio", "pyfuse3", "fastapi"],
    "volumed.audit": ["pyfuse3", "libvirt", "fastapi"],
}


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("module", sorted(BOUNDARIES))
def test_module_keeps_its_import_boundary(module: str) -> None:
    loaded = loaded_after_import(module)
    crossed = [
        name
        for name in loaded
        for forbidden in BOUNDARIES[module]
        if name == forbidden or name.startswith(forbidden + ".")
    ]
    assert crossed == [], f"{module} loads {crossed}"


def test_no_test_imports_another_test_module() -> None:
    offenders = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                last = node.module.rsplit(".", 1)[-1]
                if node.module.startswith("tests.") and last.startswith("test_"):
                    offenders.append(f"{path.relative_to(REPO)}: from {node.module}")
    assert offenders == []
