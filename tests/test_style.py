"""The tree stays lint-clean (ruff config in pyproject.toml) and cites only sources a reader can find."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    if not os.path.exists(ruff):
        pytest.skip("ruff is not installed (pip install -e .[test])")
    result = subprocess.run([ruff, "check", "--output-format", "concise", ROOT], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# Documents that live outside the repository: the code may cite the paper, the official code, VAR and library
# docs, never these: "<NAME>.md", "<NAME> 3.1", and the upper-case spec name as a bare word (a shell variable
# of that name, assigned or expanded, is fine). The names are split so that this file does not match.
PRIVATE_NOTES = ("SP" + "EC", "ASS" + "ETS", "TPU_" + "AOT", "ENV_" + "NOTES", "HOUSE_" + "STYLE")
PRIVATE_CITATION = re.compile(r"\b(?:" + "|".join(PRIVATE_NOTES) + r")(?:\.md\b|\s*§?\s*\d)"
                              r"|(?<![$\w])" + PRIVATE_NOTES[0] + r"\b(?!\s*=)")
SCANNED = ("tokenflow_jax/", "configs/", "tests/", "launch/", "bench/", "README.md", "setup.py")


def test_no_citations_of_documents_outside_the_repository():
    git = shutil.which("git")
    if git is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    listed = subprocess.run([git, "ls-files", "--cached", "--others", "--exclude-standard", "--", *SCANNED],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    hits = []
    for path in sorted(set(listed)):
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):
            continue
        with open(full, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if PRIVATE_CITATION.search(line):
                hits.append(f"{path}:{number}: {line.strip()}")
    assert not hits, "cite the paper, the official code or a library's docs instead:\n" + "\n".join(hits)
