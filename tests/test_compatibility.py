"""The compatibility block of `lerax_utils.py`: each feature test and private API it
relies on still behaves as the block assumes, so a new release that changes one fails
here, by name, rather than somewhere deep in another suite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

import lerax_utils

# -- Control flow

# -- Batches of pytrees

# -- Host callbacks and progress bars

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
