"""The compatibility block of `lerax_utils.py`: each feature test and private API it
relies on still behaves as the block assumes, so a new release that changes one fails
here, by name, rather than somewhere deep in another suite."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np

import lerax_utils

# -- Control flow


def _jax_version() -> tuple[int, ...]:
    return tuple(int(part) for part in jax.__version__.split(".")[:3])


def test_scan_split_transpose_is_passed_only_where_lax_scan_takes_it():
    takes = "_split_transpose" in inspect.signature(jax.lax.scan).parameters
    assert lerax_utils._SCAN_TAKES_SPLIT_TRANSPOSE is takes
    # Present in jax 0.4.30 to 0.10 at least; a release that drops it fails here.
    assert takes or _jax_version() < (0, 4, 30)


def test_map_takes_batch_size_from_jax_0_4_31():
    assert lerax_utils._MAP_TAKES_BATCH_SIZE is (_jax_version() >= (0, 4, 31))
    assert lerax_utils._MAP_TAKES_BATCH_SIZE is (
        "batch_size" in inspect.signature(jax.lax.map).parameters
    )


def test_optimization_barrier_is_public_in_recent_jax():
    assert lerax_utils._HAS_OPTIMIZATION_BARRIER is hasattr(
        jax.lax, "optimization_barrier"
    )
    if _jax_version() >= (0, 4, 36):
        assert lerax_utils._HAS_OPTIMIZATION_BARRIER
        assert lerax_utils._optimization_barrier is jax.lax.optimization_barrier
    x = jnp.arange(3.0)
    assert jnp.array_equal(lerax_utils._optimization_barrier(x), x)
    batched = jax.vmap(lerax_utils._optimization_barrier)(jnp.ones((2, 3)))
    assert batched.shape == (2, 3)


def test_numbers_that_jax_types_in_a_custom_vjp_are_recognised():
    seen = []

    @jax.custom_vjp
    def scale(x, factor):
        return x * factor

    def forward(x, factor):
        seen.append(factor)
        return x * factor, None

    scale.defvjp(forward, lambda _, g: (g, None))
    jax.grad(scale)(1.0, 2.0)
    (factor,) = seen
    # A plain float, or a subclass that JAX defines; anything else would be static.
    assert type(factor) is float or lerax_utils._is_number_typed_by_jax(factor)
    if _jax_version() >= (0, 10):
        assert lerax_utils._is_number_typed_by_jax(factor)
    assert not lerax_utils._is_number_typed_by_jax(2.0)
    assert not lerax_utils._is_number_typed_by_jax(True)
    assert not lerax_utils._is_number_typed_by_jax(np.float32(2.0))


def test_custom_jvp_returns_prng_keys_in_recent_jax():
    assert isinstance(lerax_utils._custom_jvp_takes_keys(), bool)
    if _jax_version() >= (0, 5):
        assert lerax_utils._custom_jvp_takes_keys()


# -- Batches of pytrees

# -- Host callbacks and progress bars

# -- Checkpoints

# (end of compatibility tests)
