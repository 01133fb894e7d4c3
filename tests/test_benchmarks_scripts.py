"""The benchmark scripts stay runnable: they import, parse arguments, and shadow no package."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def test_no_script_shadows_a_package():
    # `python benchmarks/x.py` puts benchmarks/ first on sys.path: a script named like a package hides it
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    clashes = sorted(p.name for p in SCRIPTS if p.stem in packages)
    assert not clashes, f"benchmark scripts named like packages {sorted(packages)}: {clashes}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_imports_and_parses_help(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
