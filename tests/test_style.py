"""Habits that keep the code readable, checked like behaviour: Snakemake's linter, snakefmt
for the rule files and ruff for the Python (settings in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import local_snakemake_environment

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=local_snakemake_environment())


def test_snakemake_lint_is_silent():
    result = run(str(BIN / "snakemake"), "--lint")
    lints = [line for line in (result.stdout + result.stderr).splitlines()
             if line.startswith("    * ")]
    assert result.returncode == 0 and not lints, result.stdout + result.stderr


@pytest.mark.parametrize("tool, arguments", [
    ("snakefmt", ("--check", "Snakefile", "workflow/rules")),
    ("ruff", ("check", "workflow", "tests")),
], ids=["snakefmt", "ruff"])
def test_formatters_and_linters_pass(tool, arguments):
    result = run(str(BIN / tool), *arguments)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
