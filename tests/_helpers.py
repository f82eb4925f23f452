"""Helpers shared by the suites in this folder (not by the top-level suite, which a
user who copies `lerax_utils.py` runs on its own)."""

import contextlib
import json
import math
import os
import pathlib
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import lerax_utils
from lerax_utils import Serializable

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


def is_key(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def bits(x: Any) -> bytes:
    x = jnp.asarray(x)
    if is_key(x):
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
            assert bits(a) == bits(e), where
            if weak_types:
                assert a.aval.weak_type == e.aval.weak_type, where
        else:
            assert a is e or a == e, where


# -- Control flow

# -- Batches of pytrees


# unstack_pytree slices concrete JAX leaves on the host or by a compiled program,
# whichever its cost estimate picks; `slicing_by(path)` forces one of them.
UNSTACK_PATHS = ["host", "compiled", "scheduled"]


@contextlib.contextmanager
def slicing_by(path: str) -> Iterator[None]:
    saved = lerax_utils._UNSTACK_HOST_SECONDS_PER_SLICE
    per_slice = {"host": 0.0, "compiled": math.inf, "scheduled": saved}[path]
    lerax_utils._UNSTACK_HOST_SECONDS_PER_SLICE = per_slice
    lerax_utils._unstack_host_seconds.clear()
    try:
        yield
    finally:
        lerax_utils._UNSTACK_HOST_SECONDS_PER_SLICE = saved
        lerax_utils._unstack_host_seconds.clear()


# -- Host callbacks and progress bars


def run_on_four_devices(code: str, *args: str, timeout: float = 300) -> Any:
    """Run `code` (with `args` in `sys.argv`) in a new process that has four CPU
    devices, and return the JSON report it prints last. The wait is bounded, so a hung
    process fails the test instead of hanging the suite."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
    }
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


WRAPPERS = {
    "jax": lerax_utils.callback_wrapper,
    "numpy": lerax_utils.callback_with_numpy_wrapper,
    "list": lerax_utils.callback_with_list_wrapper,
}


def expected_on_host(kind: str, leaf: Any, traced: bool = True) -> Any:
    """What a wrapper of `kind` should hand the host function for `leaf`. NumPy
    leaves stay on the host unless `jit` traced them (then they are JAX arrays)."""
    if isinstance(leaf, np.ndarray | np.generic) and not traced:
        if kind == "jax":
            return leaf
        return np.asarray(leaf) if kind == "numpy" else leaf.tolist()
    if not eqx.is_array(leaf):
        return leaf
    leaf = jnp.asarray(leaf)
    if kind == "jax":
        return leaf
    data = jax.random.key_data(leaf) if is_key(leaf) else leaf
    return np.asarray(data) if kind == "numpy" else np.asarray(data).tolist()


def assert_delivered(actual: Any, expected: Any) -> None:
    """The same leaves: NumPy and JAX arrays with the same type, dtype (byte order
    included), shape and bytes; anything else of the same type and repr."""
    actual_leaves, actual_def = jax.tree_util.tree_flatten(actual)
    expected_leaves, expected_def = jax.tree_util.tree_flatten(expected)
    assert actual_def == expected_def
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        assert type(a) is type(e)
        if isinstance(e, jax.Array):
            assert (a.dtype, a.shape, bits(a)) == (e.dtype, e.shape, bits(e))
        elif isinstance(e, np.ndarray | np.generic):
            assert (a.dtype, a.shape) == (e.dtype, e.shape)
            assert a.tobytes() == e.tobytes()
        else:
            assert repr(a) == repr(e)  # Exact, NaN and -0.0 included.


# -- Checkpoints


class Checkpointed(Serializable):
    """A model whose parameters are any pytree, for round-trip tests."""

    params: Any
    activation: Callable[..., Any]
    temperature: float
    label: str = eqx.field(static=True)

    def __init__(self, params, activation=jax.nn.relu, temperature=0.5, label="run"):
        self.params = params
        self.activation = activation
        self.temperature = temperature
        self.label = label


class Agent(Serializable):
    """A realistic model: an MLP, a typed PRNG key and a function in a static field."""

    mlp: eqx.nn.MLP
    key: jax.Array
    squash: Callable[..., Any] = eqx.field(static=True)

    def __init__(self, width, *, key, squash=jnp.tanh):
        self.mlp = eqx.nn.MLP(3, 2, width, 2, key=key)
        self.key = jax.random.split(key, 2)
        self.squash = squash


class WithStatic(Serializable):
    """A model with a static dict."""

    weight: jax.Array
    options: Any = eqx.field(static=True)


def agent(width=4, seed=0, **kwargs):
    return Agent(width, key=jax.random.key(seed), **kwargs)


def assert_exact(actual: Any, expected: Any) -> None:
    """Same structure and leaf types, and every array or number bit for bit (NumPy
    leaves compared as NumPy, so no dtype is narrowed on the way)."""
    actual_leaves, actual_def = jax.tree_util.tree_flatten_with_path(actual)
    expected_leaves, expected_def = jax.tree_util.tree_flatten(expected)
    assert actual_def == expected_def
    for (path, a), e in zip(actual_leaves, expected_leaves, strict=True):
        where = jax.tree_util.keystr(path)
        assert type(a) is type(e), where
        if isinstance(e, np.ndarray | np.generic):
            assert (a.dtype, a.shape) == (e.dtype, e.shape), where
            assert a.tobytes() == e.tobytes(), where
        elif isinstance(e, float | complex):
            assert struct.pack("<2d", complex(a).real, complex(a).imag) == struct.pack(
                "<2d", complex(e).real, complex(e).imag
            ), where
        else:
            assert_identical(a, e)


def forge(good: bytes, edit: Callable[[Any, Any, Any], Any]) -> bytes:
    """A checkpoint with its header edited by `edit(leaves, structure, header)`, and
    every checksum made valid again, as a hostile user would craft it."""
    (length,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + length])
    metadata = header["__metadata__"]
    leaves = json.loads(metadata["leaves"])
    structure = json.loads(metadata["structure"])
    texts = metadata["leaves"], metadata["structure"]
    edit(leaves, structure, header)
    if metadata["leaves"] == texts[0]:  # Else `edit` replaced the text itself.
        metadata["leaves"] = json.dumps(leaves)
    if metadata["structure"] == texts[1]:
        metadata["structure"] = json.dumps(structure)
    metadata["metadata_crc32"] = "00000000"
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    crc = f"{zlib.crc32(text):08x}".encode()
    text = text.replace(
        b'"metadata_crc32":"00000000"', b'"metadata_crc32":"' + crc + b'"'
    )
    return struct.pack("<Q", len(text)) + text + good[8 + length :]


def load_error(path: Any, *args: Any, cls: Any = Agent, **kwargs: Any) -> str:
    """The message of the ValueError that loading `path` raises."""
    if cls is Agent:
        args = args or (4,)
        kwargs.setdefault("key", jax.random.key(0))
    with pytest.raises(ValueError) as info:
        cls.deserialize(path, *args, **kwargs)
    return str(info.value)


def bad_file(tmp_path: pathlib.Path, content: bytes) -> pathlib.Path:
    path = tmp_path / "bad.eqx"
    path.write_bytes(content)
    return path


def checkpoint_bytes(tmp_path: pathlib.Path) -> bytes:
    agent().serialize(tmp_path / "good")
    return (tmp_path / "good.eqx").read_bytes()


# (end of helpers)
