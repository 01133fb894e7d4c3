"""Resumable training state: resume checkpoints and RNG states stored as plain tensors/lists.

A resume checkpoint is ``torch.save`` of a dict of tensors, numbers, strings, lists and dicts only, so it
loads with ``torch.load(..., weights_only=True)``. It is written through :func:`experiments.io.atomic_write`
(temporary file, fsync, rename), so a crash at any moment leaves either the old or the new checkpoint.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.io import atomic_write

RESUME_FILE = "resume.pt"
FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def load_resume_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a resume checkpoint with ``weights_only=True``; clear errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no resume checkpoint at {str(path)!r}; start without resume or point to the run folder")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "archlip-train-resume":
        raise ValueError(f"{str(path)!r} is not an archlip training resume checkpoint")
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has resume format version {state.get('version')}, expected {FORMAT_VERSION}")
    return state


# ----------------------------------------------------------------------------------------------------------
# RNG states as weights_only-loadable values


def python_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": None if gauss is None else float(gauss)}


def set_python_rng_state(state: dict) -> None:
    internal = tuple(int(v) for v in state["state"].tolist())
    random.setstate((int(state["version"]), internal, state["gauss"]))


def numpy_rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def set_numpy_rng_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached"]))


def capture_rng_states(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python, NumPy, torch CPU (and CUDA) global RNG states plus named ``torch.Generator`` states."""
    out = {"python": python_rng_state(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state(),
           "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng_states(states: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_states`; every named generator must be present in ``states``."""
    set_python_rng_state(states["python"])
    set_numpy_rng_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    saved = states.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise ValueError(f"resume checkpoint has no state for generator {name!r}; saved: {sorted(saved)}")
        gen.set_state(saved[name])
