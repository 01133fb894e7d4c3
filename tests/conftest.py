"""Suite-wide settings: headless plotting, bounded hypothesis runs, deterministic seeds."""
from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")
# Spin-waiting OpenMP threads make LAPACK calls up to ~100x slower on a shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "archlip", deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("archlip")

# The suite's models are tiny: one intra-op thread is 5-20x faster than two on a 2-core machine that is also
# running the test process itself (measured: full suite 77 s with one thread).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
