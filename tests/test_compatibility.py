"""The compatibility block of `lerax_utils.py`: each feature test and private API it
relies on still behaves as the block assumes, so a new release that changes one fails
here, by name, rather than somewhere deep in another suite."""

import ctypes
import sys

import jax
import jax.numpy as jnp
import pytest

import lerax_utils

# -- Control flow

# -- Batches of pytrees


def test_commitment_is_read_from_an_attribute_jax_still_has():
    array = jnp.zeros(2)
    assert hasattr(array, "committed") or hasattr(array, "_committed")
    assert lerax_utils._is_committed(array) is False
    assert lerax_utils._is_committed(jax.device_put(array, jax.devices()[0])) is True


def test_transfer_guards_are_read_under_the_names_jax_gives_them():
    for name in ("", "_device_to_host", "_host_to_device"):
        assert hasattr(jax.config, f"jax_transfer_guard{name}"), name
    assert lerax_utils._host_transfers_allowed()
    with jax.transfer_guard("disallow_explicit"):
        assert not lerax_utils._host_transfers_allowed()
    with jax.transfer_guard_device_to_host("log_explicit"):
        assert not lerax_utils._host_transfers_allowed()
    with jax.transfer_guard("disallow"):
        assert lerax_utils._host_transfers_allowed()


# -- Host callbacks and progress bars


def test_partitioned_gate_matches_what_jax_debug_callback_accepts():
    seen = []
    if lerax_utils._DEBUG_CALLBACK_TAKES_PARTITIONED:
        jax.jit(lambda x: jax.debug.callback(seen.append, x, partitioned=True))(
            jnp.ones(())
        )
        jax.effects_barrier()
        assert seen == [1.0]
    else:
        with pytest.raises(TypeError):
            jax.debug.callback(seen.append, jnp.ones(()), partitioned=True)


def test_traced_values_record_their_mesh_where_jax_has_sharding_in_types():
    sizes = []

    def record(x):
        sizes.append(lerax_utils._traced_mesh_size(x))
        return x

    jax.jit(record)(jnp.zeros(3))
    if hasattr(jax.sharding, "AxisType"):  # Explicit meshes: avals carry shardings.
        assert sizes == [0]  # No mesh around a plain `jit`.
    else:
        assert sizes == [None]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux gate")
def test_the_c_library_floating_point_environment_loads_on_linux():
    fenv = lerax_utils._FENV
    assert fenv is not None
    get_environment, set_environment = fenv
    saved = ctypes.create_string_buffer(256)
    assert get_environment(saved) == 0
    assert set_environment(saved) == 0


# -- Checkpoints

# (end of compatibility tests)
