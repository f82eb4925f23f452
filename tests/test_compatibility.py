"""The compatibility block of `lerax_utils.py`: each feature test and private API it
relies on still behaves as the block assumes, so a new release that changes one fails
here, by name, rather than somewhere deep in another suite."""

import ctypes
import inspect
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

import lerax_utils

# -- Control flow


def _jax_version() -> tuple[int, ...]:
    return tuple(int(part) for part in jax.__version__.split(".")[:3])


def test_trace_state_clean_tells_eager_from_traced():
    # `jax.core.trace_state_clean` up to jax 0.4.x, `jax._src.core` later: a release
    # that moves or renames it again fails here (and every eager call would trace).
    assert lerax_utils._trace_state_clean() is True
    seen = []
    jax.make_jaxpr(lambda x: seen.append(lerax_utils._trace_state_clean()) or x)(1.0)
    assert seen == [False]


def test_trace_context_tells_apart_the_configurations_that_change_a_trace():
    # `jax._src.config.trace_context`, what `jax.jit` keys its cache on (jax 0.4.26
    # to 0.10): a release that moves it fails here.
    default = lerax_utils._trace_context()
    hash(default)
    with jax.numpy_dtype_promotion("strict"):
        assert lerax_utils._trace_context() != default
    assert lerax_utils._trace_context() == default


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


def test_checkpoint_dtypes_are_those_of_the_installed_jax():
    found = lerax_utils._checkpoint_dtypes()
    for name in ("bool", "bfloat16", "float32", "int4", "complex64", "float8_e4m3fn"):
        assert found[name] == np.dtype(getattr(jnp, name))
    assert all(found[name] == np.dtype(getattr(jnp, name)) for name in found)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_key_impls_are_named_by_their_dtype(impl):
    key = jax.random.key(0, impl=impl)
    assert lerax_utils._key_impl_name(key.dtype) == impl
    key_dtype, data_shape, data_dtype = lerax_utils._key_impl_types()[impl]
    assert key_dtype == key.dtype
    assert data_shape == jax.random.key_data(key).shape
    assert data_dtype == np.uint32
    assert lerax_utils._key_impl_name(np.dtype(np.float32)) is None


def test_weak_array_sets_only_the_weak_type():
    strong = jnp.arange(3.0)
    weak = lerax_utils._weak_array(strong)
    assert weak.aval.weak_type and not strong.aval.weak_type
    assert weak.dtype == strong.dtype
    assert np.asarray(weak).tobytes() == np.asarray(strong).tobytes()
    assert (weak * jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


# Loads place small arrays through the private call that `jax.device_put` ends in.
def test_batched_device_put_places_as_device_put_with_the_aval_given():
    assert lerax_utils._batched_device_put is not None  # Else loads are slower.
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    put = jax.device_put(data)
    aval = lerax_utils._ShapedArray(data.shape, data.dtype, True)
    args = (aval, put.sharding, [data], [*put.devices()], False)
    quick = lerax_utils._batched_device_put(*args)
    assert quick.aval.weak_type and (quick.shape, quick.dtype) == (put.shape, put.dtype)
    assert np.asarray(quick).tobytes() == data.tobytes()
    committed = lerax_utils._is_committed
    assert (quick.sharding, committed(quick)) == (put.sharding, committed(put))


# `jnp.asarray` stands in for `jax.device_put` only where it places arrays alike.
def test_asarray_places_as_device_put_but_under_set_mesh():
    data = np.arange(3.0, dtype=np.float32)
    quick, put = jnp.asarray(data), jax.device_put(data)
    committed = lerax_utils._is_committed
    assert (quick.sharding, committed(quick)) == (put.sharding, committed(put))
    if not hasattr(jax, "set_mesh"):  # Nothing to ask, then: never quick.
        assert lerax_utils._get_abstract_mesh() is None
        return
    assert getattr(lerax_utils._get_abstract_mesh(), "empty", None) is True
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    with jax.set_mesh(mesh):
        assert getattr(lerax_utils._get_abstract_mesh(), "empty", None) is False
        quick, put = jnp.asarray(data), jax.device_put(data)
        assert (quick.sharding, quick.committed) != (put.sharding, put.committed)


def test_placed_shapes_refuse_the_shardings_device_put_refuses():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    spec = jax.sharding.PartitionSpec("d", None, None)  # Three axes, for two.
    sharding = jax.sharding.NamedSharding(mesh, spec)
    with pytest.raises(ValueError) as put:
        jax.device_put(jnp.zeros((2, 3)), sharding)
    with pytest.raises(ValueError) as placed:
        lerax_utils._placed_shape(jax.ShapeDtypeStruct((2, 3), jnp.float32), sharding)
    assert str(placed.value) in str(put.value)


def test_distributed_client_is_none_before_initialize():
    assert lerax_utils._distributed_client() is None


def test_an_ordered_io_callback_under_vmap_is_refused_as_the_block_expects():
    def save(x):
        io_callback(lambda x: None, None, x, ordered=True)
        return x

    with pytest.raises(ValueError) as info:
        jax.vmap(save)(jnp.ones(2))
    assert lerax_utils._is_vmap_refusal(info.value)
    assert not lerax_utils._is_vmap_refusal(ValueError("another error"))


def test_numpy_scalar_keys_are_rendered_as_numpy_1_does():
    assert lerax_utils._NUMPY_2 == (int(np.__version__.split(".")[0]) >= 2)
    path = (jax.tree_util.DictKey(np.int64(1)),)
    assert lerax_utils._keystr(path) == "[1]"


# (end of compatibility tests)
