"""Lint and types are part of the build: ruff over the tree, mypy over the package (py.typed ships)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("tool,args", [("ruff", ["check", "cds", "tests", "tools", "benchmarks"]), ("mypy", ["cds"])])
def test_static_checks(tool, args):
    exe = shutil.which(tool) or str(Path(sys.executable).with_name(tool))
    if not Path(exe).exists():
        pytest.skip(f"{tool} is not installed (it is in the dev extra)")
    proc = subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_py_typed_ships():
    assert (ROOT / "cds" / "py.typed").exists()
