"""Helpers shared by the suites in this folder (not by the top-level suite, which a
user who copies `lerax_utils.py` runs on its own)."""

import os
import pathlib

from hypothesis import HealthCheck, settings

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    max_examples=30,
    suppress_health_check=_SLOW_IS_FINE,
)
settings.register_profile(
    "dev", deadline=None, max_examples=15, suppress_health_check=_SLOW_IS_FINE
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)

# -- Control flow

# -- Batches of pytrees

# -- Host callbacks and progress bars

# -- Checkpoints

# (end of helpers)
