"""Where and how torch runs: the device a command asked for, and the CPU threads it may use."""
from __future__ import annotations

import contextlib

from experiments.errors import UserError


def resolve_device(name: str | None):
    """Validate ``--device`` and return a ``torch.device`` (never silently falls back to CPU)."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")
    return device


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Use ``n`` torch CPU threads inside the block and restore the previous count after (None: unchanged)."""
    if n is None:
        yield
        return
    if n < 1:
        raise UserError(f"--threads must be >= 1, got {n}")
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
