"""Helpers shared by the suites in this folder (not by the top-level suite, which a
user who copies `lerax_utils.py` runs on its own)."""

import os
import pathlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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


def _bits(x: Any) -> bytes:
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x).tobytes()


def assert_identical(actual: Any, expected: Any, *, weak_types: bool = False) -> None:
    """Same structure, same static leaves, and arrays of the same type, dtype, shape
    and bits (weak types too, if asked)."""
    actual_leaves, actual_def = jax.tree_util.tree_flatten_with_path(actual)
    expected_leaves, expected_def = jax.tree_util.tree_flatten(expected)
    assert actual_def == expected_def
    for (path, a), e in zip(actual_leaves, expected_leaves, strict=True):
        where = jax.tree_util.keystr(path)
        assert type(a) is type(e), where
        if eqx.is_array(e):
            assert (a.dtype, a.shape) == (e.dtype, e.shape), where
            assert _bits(a) == _bits(e), where
            if weak_types:
                assert a.aval.weak_type == e.aval.weak_type, where
        else:
            assert a is e or a == e, where


# -- Batches of pytrees

# -- Host callbacks and progress bars

# -- Checkpoints

# (end of helpers)
