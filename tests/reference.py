"""The checkpoint key layouts in ../shared/reference (CI clones shared/ beside the repo)."""
from __future__ import annotations

from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def read_reference(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a reference key list (``key<TAB>d1,d2,...`` lines); skips the test if it is absent."""
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference key list {path} absent (CI clones shared/ beside the repo)")
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, shape = line.partition("\t")
        out[key] = tuple(int(s) for s in shape.split(",")) if shape.strip() else ()
    return out
