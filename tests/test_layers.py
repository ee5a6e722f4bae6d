"""The package's layer contract (pyproject.toml, import-linter) and the rule that imports sit at the top."""
import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tokenflow_jax")
# cli.py dispatches to every recipe; importing them all would make `tokenflow-jax --help` pay for jax,
# transformers and torch, so each command imports its module when it runs.
DEFERRED_IMPORTS_ALLOWED = {"cli.py"}


def test_import_linter_contracts_are_kept():
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    if not os.path.exists(lint):
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        contracts = len(tomllib.load(f)["tool"]["importlinter"]["contracts"])
    assert contracts >= 4 and re.search(rf"Contracts: {contracts} kept, 0 broken", report), report


def test_project_imports_sit_at_the_top_of_each_module():
    local = re.compile(r"^[ \t]+(from tokenflow_jax|import tokenflow_jax)", re.M)
    offenders = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and os.path.relpath(path, PACKAGE) not in DEFERRED_IMPORTS_ALLOWED:
                with open(path) as f:
                    if local.search(f.read()):
                        offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, f"function-local project imports (move them to the top): {offenders}"
