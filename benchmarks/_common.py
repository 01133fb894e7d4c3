"""Shared helpers of the benchmark scripts: machine description and cpu/wall timing."""
from __future__ import annotations

import platform
import subprocess
import time
from typing import Any, Callable


def machine_name() -> str:
    """The CPU model from ``lscpu`` (falls back to ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run ``fn()``; return (its result, wall seconds, process cpu seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu
