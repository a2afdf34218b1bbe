"""The architecture of docs/design.md, checked: the import-linter contracts in pyproject.toml (layers, the engine
never importing a method, eval knowing nothing of compression, no cycles), and a CLI that starts without the
numerical libraries."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter")
    run = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


@pytest.mark.parametrize("module", ["lmshrink.cli", "lmshrink.pipeline.recipe", "lmshrink.core.stage"])
def test_parsing_recipes_and_the_cli_need_no_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules, 'transformers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "False"]
