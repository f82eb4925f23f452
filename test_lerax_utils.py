"""Tests for lerax_utils.

Hypothesis profiles: `ci` is deterministic and is chosen when the `CI` environment
variable is set; `dev` is random and quicker. Set `HYPOTHESIS_PROFILE` to pick one.
"""

import contextlib
import dataclasses
import enum
import functools
import gc
import inspect
import io
import json
import math
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import lerax_utils
from lerax_utils import (
    Serializable,
    callback_with_list_wrapper,
    callback_with_numpy_wrapper,
    callback_wrapper,
    filter_cond,
    filter_fori_loop,
    filter_map,
    filter_scan,
    filter_switch,
    filter_while_loop,
    load_pytree,
    print_callback,
    save_pytree,
    stack_pytree,
    unstack_pytree,
)

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

ROOT = pathlib.Path(__file__).parent

#
# Strategies: random pytrees of arrays, static leaves and Equinox modules
#


def _double(x: Any) -> Any:
    return 2 * x


class _Marker:
    """An arbitrary object that compares by identity."""


_STATIC_LEAVES = ["tag", "", 0, -3, 2.5, True, jax.nn.relu, _double, _Marker()]
_DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16, jnp.int32, jnp.bool_]


class Policy(eqx.Module):
    """A small module with an array field, a function field and static fields."""

    params: Any
    activation: Callable[..., Any]
    name: str = eqx.field(static=True)
    scale: float = eqx.field(static=True, default=1.0)


_SPECIAL_FLOATS = st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0])


def _elements(dtype: Any) -> st.SearchStrategy[Any]:
    # Half-precision values are whole numbers small enough that adding a few ones is
    # exact: XLA computes a jitted chain of half-precision adds in float32 and rounds
    # once, where a Python loop rounds after each add.
    if dtype == jnp.float16:
        return st.one_of(st.integers(-1000, 1000).map(float), _SPECIAL_FLOATS)
    if dtype == jnp.bfloat16:
        return st.one_of(st.integers(-200, 200).map(float), _SPECIAL_FLOATS)
    if dtype == jnp.float32:
        return st.floats(width=32, allow_subnormal=False, min_value=-1e6, max_value=1e6)
    if dtype == jnp.int32:
        return st.integers(-(2**31), 2**31 - 1)
    return st.booleans()


@st.composite
def arrays(
    draw: st.DrawFn,
    leading: tuple[int, ...] = (),
    dtypes: Any = tuple(_DTYPES),
    numpy_allowed: bool = True,
) -> Any:
    dtype = draw(st.sampled_from(dtypes))
    shape = leading + draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    storage = np.float32 if dtype == jnp.bfloat16 else np.dtype(dtype)
    value = draw(hnp.arrays(storage, shape, elements=_elements(dtype))).astype(dtype)
    if numpy_allowed and draw(st.booleans()):
        return value
    return jnp.asarray(value)


@st.composite
def prng_keys(draw: st.DrawFn, leading: tuple[int, ...] = ()) -> Any:
    key = jax.random.key(draw(st.integers(0, 2**16)))
    return jax.random.split(key, leading) if leading else key


def pytrees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nested dicts, lists, tuples, None and `Policy` modules around `leaves`."""

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(children, max_size=3),
            st.tuples(children, children),
            st.dictionaries(st.sampled_from("abc"), children, max_size=3),
            st.builds(
                Policy,
                children,
                st.sampled_from([jax.nn.relu, jnp.tanh, _double]),
                st.sampled_from(["actor", "critic"]),
                st.sampled_from([1.0, 0.5]),
            ),
        )

    return st.recursive(st.one_of(leaves, st.none()), extend, max_leaves=6)


def carries(numpy_allowed: bool = True) -> st.SearchStrategy[Any]:
    return pytrees(
        st.one_of(
            arrays(numpy_allowed=numpy_allowed),
            arrays(numpy_allowed=numpy_allowed),
            prng_keys(),
            st.sampled_from(_STATIC_LEAVES),
        )
    )


def inputs(length: int) -> st.SearchStrategy[Any]:
    return pytrees(
        st.one_of(
            arrays(leading=(length,)),
            prng_keys(leading=(length,)),
            st.sampled_from(_STATIC_LEAVES),
        )
    )


#
# Reference helpers
#


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def advance(leaf: Any) -> Any:
    """One exact, dtype-preserving step for each kind of array leaf."""
    if not eqx.is_array(leaf):
        return leaf
    leaf = jnp.asarray(leaf)
    if _is_key(leaf):
        return jax.random.fold_in(leaf, 7)
    if leaf.dtype == jnp.bool_:
        return jnp.logical_not(leaf)
    return leaf + 1


def echo_step(carry: Any, x: Any) -> tuple[Any, Any]:
    """Advance every array in the carry; output the old carry and the input."""
    return jax.tree.map(advance, carry), (carry, x)


def traced_bools(tree: Any) -> Any:
    """`tree` with its Python bools as the arrays that JAX traces them as: the
    control-flow functions trace bools from the start, as `jax.lax` does."""
    return jax.tree.map(lambda x: jnp.asarray(x) if type(x) is bool else x, tree)


def python_loop_scan(f, init, xs, length, reverse):
    """The reference: thread the carry through a Python loop and stack the outputs."""
    carry = init
    outputs = []
    order = reversed(range(length)) if reverse else range(length)
    for i in order:
        x = jax.tree.map(lambda a, i=i: a[i] if eqx.is_array(a) else a, xs)
        carry, y = f(carry, x)
        outputs.append(y)
    if reverse:
        outputs.reverse()
    # Arrays come back as JAX arrays, and so do Python numbers that `f` changed.
    carry = jax.tree.map(
        lambda old, new: (
            jnp.asarray(new)
            if eqx.is_array(new) or (is_number(old) and not same_number(old, new))
            else new
        ),
        init,
        carry,
    )
    if outputs:
        ys = jax.tree.map(
            lambda *ys: (
                jnp.stack([jnp.asarray(y) for y in ys])
                if eqx.is_array(ys[0]) or is_number(ys[0])
                else ys[0]
            ),
            *outputs,
        )
        return carry, ys
    x_struct = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if eqx.is_array(a) else a,
        xs,
    )
    _, y_struct = eqx.filter_eval_shape(f, init, x_struct)
    empty = jax.tree.map(
        lambda s: (
            jnp.zeros((0, *s.shape), s.dtype)
            if isinstance(s, jax.ShapeDtypeStruct)
            else jnp.stack([jnp.asarray(s)])[:0]
            if is_number(s)
            else s
        ),
        y_struct,
    )
    return carry, empty


def is_number(x: Any) -> bool:
    return type(x) in (bool, int, float, complex)


def same_number(a: Any, b: Any) -> bool:
    """Same type and the same bits, so that NaNs match and signed zeros do not."""
    return type(a) is type(b) and struct.pack(
        "<2d", complex(a).real, complex(a).imag
    ) == struct.pack("<2d", complex(b).real, complex(b).imag)


def _bits(x: Any) -> bytes:
    x = jnp.asarray(x)
    if _is_key(x):
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


#
# Control flow: filter_scan
#


scan_options = st.fixed_dictionaries(
    {
        "reverse": st.booleans(),
        "unroll": st.sampled_from([1, 2, 3, True, False]),
    }
)


@given(data=st.data(), length=st.integers(0, 4), options=scan_options)
def test_filter_scan_matches_python_loop(data, length, options):
    init = data.draw(carries())
    xs = data.draw(inputs(length))
    # Without arrays in `xs` the length must be given; with them it is optional.
    xs_has_arrays = any(eqx.is_array(leaf) for leaf in jax.tree.leaves(xs))
    pass_length = data.draw(st.booleans()) or not xs_has_arrays
    expected = python_loop_scan(
        echo_step, traced_bools(init), xs, length, options["reverse"]
    )
    actual = filter_scan(
        echo_step, init, xs, length=length if pass_length else None, **options
    )
    assert_identical(actual, expected)


@given(data=st.data(), length=st.integers(0, 4), options=scan_options)
def test_filter_scan_matches_python_loop_under_jit(data, length, options):
    init = data.draw(carries())
    xs = data.draw(inputs(length))
    expected = python_loop_scan(
        echo_step, traced_bools(init), xs, length, options["reverse"]
    )

    @eqx.filter_jit
    def run(init, xs):
        return filter_scan(echo_step, init, xs, length=length, **options)

    assert_identical(run(init, xs), expected)


def _weak_scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.floats(-10, 10).map(jnp.asarray), st.integers(-10, 10).map(jnp.asarray)
    )


def array_trees(leading: tuple[int, ...] = ()) -> st.SearchStrategy[Any]:
    """Pytrees whose leaves are all JAX arrays, weak-typed scalars included."""
    leaves = st.one_of(arrays(leading, numpy_allowed=False), prng_keys(leading))
    if not leading:
        leaves = st.one_of(leaves, _weak_scalars())
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.sampled_from("abc"), children, max_size=3),
        ),
        max_leaves=5,
    )


@given(
    data=st.data(),
    length=st.integers(0, 4),
    options=scan_options,
    xs_none=st.booleans(),
)
def test_filter_scan_equals_lax_scan_on_array_trees(data, length, options, xs_none):
    init = data.draw(array_trees())
    xs = None if xs_none else data.draw(array_trees(leading=(length,)))
    expected = jax.lax.scan(echo_step, init, xs, length=length, **options)
    actual = filter_scan(echo_step, init, xs, length=length, **options)
    assert_identical(actual, expected, weak_types=True)


def _float_trees(leading: tuple[int, ...] = ()) -> st.SearchStrategy[Any]:
    leaves = arrays(leading, dtypes=(jnp.float32,), numpy_allowed=False)
    return st.recursive(
        leaves,
        lambda children: st.lists(children, min_size=1, max_size=3),
        max_leaves=4,
    )


@given(data=st.data(), length=st.integers(0, 4), options=scan_options)
def test_filter_scan_gradients_equal_lax_scan(data, length, options):
    init = data.draw(_float_trees())
    xs = data.draw(_float_trees(leading=(length,)))

    def step(carry, x):
        total = sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(x))
        return jax.tree.map(lambda c: c * jnp.cos(c) + total, carry), carry

    def loss(scan, init, xs):
        carry, ys = scan(step, init, xs, length=length, **options)
        return sum(jnp.sum(leaf) for leaf in jax.tree.leaves((carry, ys)))

    expected = jax.grad(loss, argnums=(1, 2))(jax.lax.scan, init, xs)
    actual = jax.grad(loss, argnums=(1, 2))(filter_scan, init, xs)
    assert_identical(actual, expected)


def _hand_partitioned_scan(f, init, xs, length):
    """The recipe filter_scan replaces: partition outside, combine inside."""
    init_arrays, init_static = eqx.partition(init, eqx.is_array)
    xs_arrays, xs_static = eqx.partition(xs, eqx.is_array)

    def body(carry_arrays, x_arrays):
        carry, y = f(
            eqx.combine(carry_arrays, init_static), eqx.combine(x_arrays, xs_static)
        )
        return eqx.filter(carry, eqx.is_array), eqx.filter(y, eqx.is_array)

    final, ys = jax.lax.scan(body, init_arrays, xs_arrays, length=length)
    return eqx.combine(final, init_static), ys


def test_filter_scan_traces_the_same_program_as_hand_partitioning():
    mlp = eqx.nn.MLP(3, 2, width_size=4, depth=2, key=jax.random.key(0))
    init = {"policy": mlp, "label": "actor", "obs": jnp.ones(3), "steps": 3}
    xs = {"noise": jnp.ones((5, 3)), "mode": "train"}

    def step(carry, x):
        action = carry["policy"](carry["obs"] + x["noise"])
        obs = carry["obs"] * 0.9 + jnp.sum(action)
        return {**carry, "obs": obs}, (action, carry["policy"])

    arrays, static = eqx.partition((init, xs), eqx.is_array)

    def with_filter_scan(arrays):
        init, xs = eqx.combine(arrays, static)
        carry, _ = filter_scan(step, init, xs)
        return eqx.filter(carry, eqx.is_array)

    def by_hand(arrays):
        init, xs = eqx.combine(arrays, static)
        carry, _ = _hand_partitioned_scan(step, init, xs, None)
        return eqx.filter(carry, eqx.is_array)

    def program_text(fun):
        # Older JAX prints the addresses of memoised thunks; they are not the program.
        return re.sub(r" at 0x[0-9a-f]+", "", str(jax.make_jaxpr(fun)(arrays)))

    assert "scan" in program_text(with_filter_scan)
    assert program_text(with_filter_scan) == program_text(by_hand)
    assert_identical(with_filter_scan(arrays), by_hand(arrays))


def test_filter_scan_static_carry_leaf_that_changes_is_an_error():
    def rename(carry, _):
        return {**carry, "tag": "renamed"}, None

    init = {"tag": "start", "x": jnp.zeros(2)}
    with pytest.raises(ValueError) as info:
        filter_scan(rename, init, length=3)
    assert str(info.value) == (
        "filter_scan: `f` returned a carry that differs from `init` at path ['tag']: "
        "it changed from str 'start' to str 'renamed'. Only arrays and Python numbers "
        "in the carry may change from step to step. If this value must change, make "
        "it an array in `init` with `jnp.asarray`; otherwise keep it out of the carry "
        "(close over it in `f`, or pass it in `xs`)."
    )


def test_filter_scan_python_number_returned_as_array_is_traced_as_lax_scan_does():
    def count(carry, _):
        return {"steps": jnp.asarray(carry["steps"]) + 1}, None

    expected = jax.lax.scan(count, {"steps": 0}, None, length=3)
    assert_identical(
        filter_scan(count, {"steps": 0}, length=3), expected, weak_types=True
    )


def test_filter_scan_array_carry_leaf_returned_as_object_is_an_error():
    with pytest.raises(TypeError) as info:
        filter_scan(lambda c, x: ([c[0], "done"], None), [1, jnp.zeros(2)], length=2)
    assert str(info.value) == (
        "filter_scan: `f` returned a carry that differs from `init` at path [1]: it "
        "was an array of shape (2,) and dtype float32 and is now str 'done'. Return "
        "an array or a Python number there, with the same shape and dtype as in "
        "`init`."
    )
    with pytest.raises(TypeError) as info:
        filter_scan(lambda c, x: ("done", None), 0, length=2)  # type: ignore[arg-type]
    assert str(info.value).startswith(
        "filter_scan: `f` returned a carry that differs from `init` at the top level: "
        "it was int 0 and is now str 'done'. Return an array or a Python number there"
    )


def test_filter_scan_array_carry_leaf_may_come_back_as_python_number():
    init = {"x": jnp.float32(3.0), "label": "a"}
    expected = jax.lax.scan(lambda c, _: (0.5, None), init["x"], None, length=2)[0]
    (final, _) = filter_scan(lambda c, _: ({**c, "x": 0.5}, None), init, length=2)
    assert_identical(final, {"x": expected, "label": "a"}, weak_types=True)


def test_filter_scan_changed_static_field_names_the_field():
    policy = Policy(jnp.ones(2), jax.nn.relu, "actor")

    def retitle(carry, _):
        p = carry["policy"]
        return {"policy": Policy(p.params, p.activation, "critic")}, None

    with pytest.raises(TypeError) as info:  # As `jax.lax.scan`: a new treedef.
        filter_scan(retitle, {"policy": policy}, length=2)
    assert str(info.value).startswith(
        "filter_scan: `f` returned a carry that differs from `init` at path "
        "['policy'].name: it is a static field that changed from str 'actor' to str "
        "'critic'. Only arrays and Python numbers"
    )


def test_filter_scan_changed_carry_structure_is_an_error():
    with pytest.raises(TypeError) as info:
        filter_scan(lambda c, _: ({"a": c["a"], "b": 1}, None), {"a": 1}, length=1)
    assert str(info.value).startswith(
        "filter_scan: `f` returned a carry that differs from `init` at the top level: "
        "it had keys ['a'] and now has ['a', 'b']. The carry must keep the structure "
        "of `init` from step to step.\n\njax.lax.scan says: "
    )
    with pytest.raises(TypeError) as info:
        filter_scan(lambda c, _: (c[:1], None), [jnp.ones(()), 2], length=1)
    assert "at the top level: it had length 2 and now has length 1." in str(info.value)


def test_filter_scan_carry_check_survives_python_dash_o():
    script = textwrap.dedent(
        """
        from lerax_utils import filter_scan
        try:
            filter_scan(lambda c, _: ("changed", None), "start", length=2)
        except ValueError as err:
            print("ValueError:", err)
        """
    )
    result = subprocess.run(
        [sys.executable, "-O", "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert result.stdout.startswith(
        "ValueError: filter_scan: `f` returned a carry that differs from `init` at the "
        "top level: it changed from str 'start' to str 'changed'."
    )


def test_filter_scan_passes_non_array_xs_to_every_step():
    seen = []

    def step(carry, x):
        seen.append((x["name"], x["fn"]))
        return carry + x["fn"](x["value"]), None

    xs = {"name": "obs", "fn": _double, "value": jnp.arange(4.0)}
    final, ys = filter_scan(step, jnp.float32(0), xs)
    assert ys is None
    assert seen == [("obs", _double)]  # One trace, static inputs unchanged.
    assert_identical(final, jnp.float32(2 * (0 + 1 + 2 + 3)))


def test_filter_scan_outputs_a_stacked_module_as_filter_vmap_does():
    keys = jax.random.split(jax.random.key(1), 4)

    def make(key):
        return eqx.nn.MLP(2, 3, width_size=5, depth=1, key=key)

    expected = eqx.filter_vmap(make)(keys)
    _, actual = filter_scan(lambda c, key: (c, make(key)), None, keys)
    assert_identical(actual, expected)
    assert actual.activation is expected.activation


def test_filter_scan_static_output_that_differs_between_traces_is_an_error():
    traces = []

    def step(carry, _):
        traces.append(None)
        # A weakly typed int carry that becomes a float makes lax.scan trace twice.
        return carry + 0.5, {"trace": f"trace {len(traces)}"}

    with pytest.raises(ValueError) as info:
        filter_scan(step, jnp.asarray(0), length=2)
    assert len(traces) == 2
    assert str(info.value) == (
        "filter_scan: the non-array part of `f`'s output `y` differs between two "
        "traces of `f`: at path ['trace'] it changed from str 'trace 1' to str "
        "'trace 2'. JAX may "
        "trace `f` more than once, and each trace must give the same static outputs. "
        "Return arrays for values that vary, or make the static values independent "
        "of how often `f` is called."
    )


def test_filter_scan_retraced_step_with_consistent_outputs_matches_lax_scan():
    def step(carry, _):
        return carry + 0.5, ("label", carry)

    expected_carry, expected_ys = jax.lax.scan(
        lambda c, x: (c + 0.5, c), jnp.asarray(0), None, length=3
    )
    carry, (label, ys) = filter_scan(step, jnp.asarray(0), length=3)
    assert label == "label"
    assert_identical((carry, ys), (expected_carry, expected_ys), weak_types=True)


def test_filter_scan_inconsistent_xs_sizes_name_the_leaves():
    xs = {"obs": jnp.ones((3, 2)), "actions": [jnp.ones(4)]}
    with pytest.raises(ValueError) as info:
        filter_scan(lambda c, x: (c, None), 0, xs)
    assert str(info.value) == (
        "filter_scan: every array in `xs` must have the same leading size, but the "
        "leading sizes differ (['actions'][0]: 4, ['obs']: 3). Slice or pad them to "
        "one length."
    )


def test_filter_scan_length_that_disagrees_with_xs_is_an_error():
    with pytest.raises(ValueError) as info:
        filter_scan(lambda c, x: (c, None), 0, jnp.ones(3), length=4)
    assert str(info.value).startswith(
        "filter_scan: `length=4` disagrees with the leading size 3 of the arrays in "
        "`xs`. Pass `length=3` or leave it out.\n\njax.lax.scan says: "
    )


def test_filter_scan_without_array_inputs_needs_a_length():
    with pytest.raises(ValueError) as info:
        filter_scan(lambda c, x: (c, None), 0, {"mode": "eval"})
    assert str(info.value) == (
        "filter_scan: cannot tell how many steps to run, because `xs` holds no "
        "arrays. Pass `length=`."
    )


def test_filter_scan_scalar_in_xs_is_an_error():
    with pytest.raises(ValueError) as info:
        filter_scan(lambda c, x: (c, None), 0, {"lr": jnp.float32(0.1)}, length=3)
    assert str(info.value).startswith(
        "filter_scan: the array at `xs` path ['lr'] is a scalar (shape ()), so it "
        "has no leading axis to scan over."
    )


_NOT_WHOLE = "filter_scan: `length` must be a whole number (a Python int, a NumPy "


@pytest.mark.parametrize(
    ("length", "error", "message"),
    [
        (-1, ValueError, "filter_scan: `length` must be non-negative; got -1."),
        (
            2.5,
            TypeError,
            _NOT_WHOLE + "integer or a 0-d integer array); got float 2.5.",
        ),
        ("3", TypeError, _NOT_WHOLE + "integer or a 0-d integer array); got str '3'."),
        (jnp.array([3]), TypeError, _NOT_WHOLE),
        (jnp.array(2.5), TypeError, _NOT_WHOLE),
    ],
)
def test_filter_scan_bad_length_is_an_error(length, error, message):
    with pytest.raises(error) as info:
        filter_scan(lambda c, x: (c, None), 0, length=length)
    assert str(info.value).startswith(message)


def test_filter_scan_bad_step_function_is_an_error():
    with pytest.raises(TypeError) as info:
        filter_scan("step", 0, length=1)  # type: ignore[arg-type]
    assert str(info.value) == "filter_scan: `f` must be callable; got str 'step'."
    with pytest.raises(TypeError) as info:
        filter_scan(lambda c, x: c, "s", length=1)  # type: ignore[arg-type]
    assert str(info.value).startswith(
        "filter_scan: `f` must return a pair `(new_carry, y)`; got str 's'.\n\n"
        "jax.lax.scan says: "
    )


class Accumulator(eqx.Module):
    rate: jax.Array
    label: str = eqx.field(static=True)

    def step(self, total, x):
        return total + self.rate * x, self.label


def test_filter_scan_accepts_bound_methods_and_partials():
    acc = Accumulator(jnp.float32(2.0), "acc")
    xs = jnp.arange(3.0)
    total, label = filter_scan(acc.step, jnp.float32(0), xs)
    assert label == "acc"
    assert_identical(total, jnp.float32(6.0))
    partial = eqx.Partial(lambda rate, c, x: (c + rate * x, None), jnp.float32(3.0))
    total, _ = filter_scan(partial, jnp.float32(0), xs)
    assert_identical(total, jnp.float32(9.0))


def test_filter_scan_under_vmap_matches_per_example_scans():
    inits = jnp.arange(6.0).reshape(3, 2)
    xs = jnp.arange(12.0).reshape(4, 3)

    def run(init, xs):
        def step(c, x):
            return {"v": c["v"] * 0.5 + x, "tag": c["tag"]}, c["v"].sum()

        carry, ys = filter_scan(step, {"v": init, "tag": "t"}, xs)
        return carry["v"], ys

    batched = jax.vmap(run, in_axes=(0, 1))(inits, xs)
    for i in range(3):
        assert_identical(
            jax.tree.map(lambda leaf, i=i: leaf[i], batched), run(inits[i], xs[:, i])
        )


def test_filter_scan_under_grad_and_filter_jit_with_a_module_carry():
    mlp = eqx.nn.MLP(2, 2, width_size=4, depth=1, key=jax.random.key(3))
    xs = jnp.linspace(-1.0, 1.0, 10).reshape(5, 2)

    def loss(filter_scan_like, model):
        def step(state, x):
            model, h = state
            h = jnp.tanh(model(h + x))
            return (model, h), jnp.sum(h**2)

        _, ys = filter_scan_like(step, (model, jnp.zeros(2)), xs)
        return jnp.sum(ys)

    def by_hand(step, init, xs):
        return _hand_partitioned_scan(step, init, xs, None)

    expected = eqx.filter_jit(eqx.filter_grad(lambda m: loss(by_hand, m)))(mlp)
    actual = eqx.filter_jit(eqx.filter_grad(lambda m: loss(filter_scan, m)))(mlp)
    assert_identical(actual, expected)


@pytest.mark.parametrize("supported", [True, False])
def test_filter_scan_passes_split_transpose_only_where_jax_takes_it(
    monkeypatch, supported
):
    calls = []
    real_scan = jax.lax.scan

    def spy(*args, **kwargs):
        calls.append(kwargs)
        if not supported:
            kwargs.pop("_split_transpose", None)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(lerax_utils, "_SCAN_TAKES_SPLIT_TRANSPOSE", supported)
    monkeypatch.setattr(jax.lax, "scan", spy)
    init = jnp.float32(0.0)
    carry, _ = filter_scan(lambda c, x: (c + x, None), init, jnp.ones(3))
    assert_identical(carry, real_scan(lambda c, x: (c + x, None), init, jnp.ones(3))[0])
    expected = {"length": 3, "reverse": False, "unroll": 1}
    if supported:
        expected["_split_transpose"] = False
    assert calls == [expected]


#
# Control flow: filter_cond
#


def _other_branch(*operands: Any) -> Any:
    def retreat(leaf: Any) -> Any:
        if not eqx.is_array(leaf):
            return leaf
        leaf = jnp.asarray(leaf)
        if _is_key(leaf) or leaf.dtype == jnp.bool_:
            return leaf
        return leaf - 1

    return jax.tree.map(retreat, operands)


def _advance_all(*operands: Any) -> Any:
    return jax.tree.map(advance, operands)


@given(
    operands=st.lists(carries(numpy_allowed=False), max_size=3),
    pred=st.booleans(),
    jit=st.booleans(),
)
def test_filter_cond_matches_python_if(operands, pred, jit):
    expected = (
        _advance_all(*traced_bools(operands))
        if pred
        else _other_branch(*traced_bools(operands))
    )

    def run(pred, operands):
        return filter_cond(pred, _advance_all, _other_branch, *operands)

    run = eqx.filter_jit(run) if jit else run
    assert_identical(run(jnp.asarray(pred), operands), expected)


def test_filter_cond_only_traces_the_branches_inside_the_cond():
    def outer(pred, x):
        return filter_cond(pred, jnp.sin, jnp.cos, x)

    jaxpr = jax.make_jaxpr(outer)(True, jnp.ones(3)).jaxpr
    top_level = {eqn.primitive.name for eqn in jaxpr.eqns}
    assert "cond" in top_level
    assert not top_level & {"sin", "cos", "select_n"}


def test_filter_cond_runs_only_the_chosen_branch():
    ran = []

    def branch(name, out):
        def run(x, label):
            jax.debug.callback(lambda: ran.append(name))
            return out(x), label

        return run

    labels = []

    @jax.jit
    def choose(pred, x):
        true_fun, false_fun = branch("true", jnp.sin), branch("false", jnp.cos)
        value, label = filter_cond(pred, true_fun, false_fun, x, "label")
        labels.append(label)
        return value

    value = choose(jnp.asarray(False), jnp.float32(0.0))
    jax.effects_barrier()
    assert ran == ["false"]
    assert labels == ["label"]
    assert_identical(value, jnp.cos(jnp.float32(0.0)))


def test_filter_cond_branches_with_different_static_outputs_are_an_error():
    with pytest.raises(ValueError) as info:
        filter_cond(
            True, lambda x: {"a": x, "m": "train"}, lambda x: {"a": x, "m": "eval"}, 1.0
        )
    assert str(info.value) == (
        "filter_cond: the branches' outputs disagree at path ['m']: compared with "
        "`true_fun`'s output, `false_fun`'s changed from str 'train' to str 'eval'. "
        "Every branch must return the same structure, arrays or Python numbers in "
        "the same places, and equal static values elsewhere; return arrays for values "
        "that differ between branches."
    )


def test_filter_cond_branch_returning_array_for_a_string_is_a_type_error():
    with pytest.raises(TypeError) as info:
        filter_cond(True, lambda x: (x, "a"), lambda x: (x, jnp.int32(0)), jnp.ones(()))
    assert str(info.value).startswith(
        "filter_cond: the branches' outputs disagree at path [1]: compared with "
        "`true_fun`'s output, `false_fun`'s is an array of shape () and dtype int32, "
        "where `true_fun` returns str 'a'."
    )


def test_filter_cond_bad_arguments_are_errors():
    with pytest.raises(TypeError) as info:
        filter_cond(True, "left", jnp.cos, 1.0)  # type: ignore[arg-type]
    assert (
        str(info.value) == "filter_cond: `true_fun` must be callable; got str 'left'."
    )
    with pytest.raises(TypeError) as info:
        filter_cond(jnp.array([True, False]), jnp.sin, jnp.cos, 1.0)
    assert str(info.value) == (
        "filter_cond: `pred` must be a scalar; got an array of shape (2,). Reduce it "
        "first, for example with `jnp.any` or `jnp.all`."
    )


#
# Control flow: Python numbers, traced once they change
#

_NUMBERS = st.one_of(
    st.booleans(),
    st.integers(-5, 5),
    st.floats(-5, 5, width=32),
    st.sampled_from([float("nan"), -0.0, 1 + 2j]),
)
_NUMBER_STEPS = ["keep", "add_x", "bump", "set"]


def _number_step(action: str, replacement: Any, c: Any, x: Any) -> Any:
    if action == "keep":
        return c
    if action == "add_x":
        return c + x
    if action == "bump":
        return c + 1
    return replacement


@st.composite
def _number_carries(draw: st.DrawFn) -> tuple[list[Any], list[Any]]:
    """A carry of Python numbers and arrays, with an update rule for each slot."""
    slots = draw(st.lists(st.one_of(_NUMBERS, arrays(numpy_allowed=False)), max_size=4))
    updates = [(draw(st.sampled_from(_NUMBER_STEPS)), draw(_NUMBERS)) for _ in slots]
    return slots, updates


def _outcome(run: Callable[[], Any]) -> Any:
    try:
        return run()
    except Exception as err:
        return err


def _assert_same_outcome(actual: Any, expected: Any, kept: Callable[[Any], bool]):
    """`actual` equals `expected` (an exception type, or values with weak types),
    except that leaves where `kept(path)` holds are the Python numbers themselves."""
    if isinstance(expected, Exception):
        assert type(actual) is type(expected), (actual, expected)
        return
    assert not isinstance(actual, Exception), actual
    expected_leaves, expected_def = jax.tree_util.tree_flatten_with_path(expected)
    assert jax.tree_util.tree_structure(actual) == expected_def
    for (path, e), a in zip(expected_leaves, jax.tree.leaves(actual), strict=True):
        if kept(path):
            assert is_number(a) and same_number(a, e if is_number(e) else e.item())
        else:
            assert_identical(a, jnp.asarray(e), weak_types=True)


@given(carry=_number_carries(), length=st.integers(0, 3), jit=st.booleans())
@example(carry=([False], [("set", False)]), length=0, jit=False)  # A bool set anew.
def test_filter_scan_python_numbers_in_the_carry_match_lax_scan(carry, length, jit):
    init, updates = carry
    xs = jnp.arange(length, dtype=jnp.float32)

    def step(c, x):
        new = [
            _number_step(action, replacement, leaf, x)
            for (action, replacement), leaf in zip(updates, c, strict=True)
        ]
        return new, (c, 7, x)

    def ours():
        return filter_scan(step, init, xs)

    expected = _outcome(lambda: jax.lax.scan(step, init, xs))
    actual = _outcome(eqx.filter_jit(ours) if jit else ours)

    def kept(path: Any) -> bool:  # A carry number that `f` returns unchanged.
        if path[0].idx != 0:
            return False
        i = path[1].idx
        action, replacement = updates[i]
        if not is_number(init[i]) or action == "add_x":
            return False
        if type(init[i]) is bool:  # Traced from the start: kept only if passed on.
            return action == "keep"
        return same_number(_number_step(action, replacement, init[i], None), init[i])

    _assert_same_outcome(actual, expected, kept)


@given(
    outputs=st.lists(
        st.tuples(st.one_of(_NUMBERS, st.just("x")), st.one_of(_NUMBERS, st.just("x"))),
        max_size=4,
    ),
    pred=st.booleans(),
    jit=st.booleans(),
)
def test_filter_cond_python_number_outputs_match_lax_cond(outputs, pred, jit):
    def branch(side: int) -> Callable[[Any], Any]:
        return lambda x: [x if pair[side] == "x" else pair[side] for pair in outputs]

    x = jnp.float32(1.5)
    expected = _outcome(lambda: jax.lax.cond(pred, branch(0), branch(1), x))

    def ours(pred):
        return filter_cond(pred, branch(0), branch(1), x)

    actual = _outcome(
        lambda: eqx.filter_jit(ours)(jnp.asarray(pred)) if jit else ours(pred)
    )

    def kept(path: Any) -> bool:  # Both branches return the same number.
        a, b = outputs[path[0].idx]
        return is_number(a) and same_number(a, b)

    _assert_same_outcome(actual, expected, kept)


def test_filter_scan_counter_in_the_carry_matches_lax_scan_and_its_gradient():
    def run(scan, w):
        def step(carry, x):
            w, steps = carry
            return (w * x, steps + 1), w

        (w, steps), ys = scan(step, (w, 0), jnp.arange(1.0, 4.0))
        return w + jnp.sum(ys) + steps

    assert_identical(
        jax.value_and_grad(functools.partial(run, filter_scan))(2.0),
        jax.value_and_grad(functools.partial(run, jax.lax.scan))(2.0),
    )
    (steps, label), _ = filter_scan(
        lambda c, _: ((c[0] + 1, c[1]), None), (0, "a"), length=5
    )
    assert label == "a"
    expected = jax.lax.scan(lambda s, _: (s + 1, None), 0, None, length=5)[0]
    assert_identical(steps, expected)


def test_filter_scan_promotes_without_retracing_when_no_number_changes():
    traces = []

    def step(carry, x):
        traces.append(None)
        return carry, x

    filter_scan(step, {"gamma": 0.99, "w": jnp.ones(2)}, jnp.ones(3))
    assert len(traces) == 1
    traces.clear()
    filter_scan(lambda c, x: step(c + 1, x), 0, jnp.ones(3))
    assert len(traces) == 2  # One trace finds the change, one traces the number.


def test_filter_scan_equal_nans_and_partials_are_not_changes():
    payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000123))[0]
    seen = []

    def keep_nan(c, _):
        seen.append(c["nan"])
        return c, c["nan"]

    filter_scan(keep_nan, {"nan": payload, "x": jnp.ones(2)}, None, length=2)
    assert seen == [payload]  # One trace, with the NaN a Python float throughout.
    # A weakly typed int carry that becomes a float makes lax.scan trace twice; each
    # trace returns a new, equal `partial`.
    final, made = filter_scan(
        lambda c, _: (c + 0.5, functools.partial(max, 1)),
        jnp.asarray(0),
        None,
        length=2,
    )
    assert made.func is max and made.args == (1,)


class _Mode(enum.IntEnum):
    TRAIN = 0
    EVAL = 1


def test_filter_scan_int_enum_in_the_carry_stays_a_static_member():
    (mode, steps), _ = filter_scan(
        lambda c, _: ((c[0], c[1] + 1), None), (_Mode.EVAL, 0), None, length=2
    )
    assert mode is _Mode.EVAL
    assert_identical(
        steps, jax.lax.scan(lambda s, _: (s + 1, None), 0, None, length=2)[0]
    )
    with pytest.raises(ValueError, match="changed from _Mode"):
        filter_scan(lambda c, _: (_Mode.TRAIN, None), _Mode.EVAL, None, length=1)


def test_filter_scan_numbers_that_change_because_others_changed_match_lax_scan():
    def step(c, _):
        a, b, c_ = c
        return (a + 1, b + a, c_ + b), (a, b, c_)

    expected = jax.lax.scan(step, (0, 0, 0), None, length=4)
    assert_identical(
        filter_scan(step, (0, 0, 0), None, length=4), expected, weak_types=True
    )


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_filter_scan_error_survives_a_leaf_whose_repr_raises():
    with pytest.raises(ValueError) as info:
        filter_scan(lambda c, _: (_Unprintable(), None), _Unprintable(), length=1)
    assert str(info.value).startswith(
        "filter_scan: `f` returned a carry that differs from `init` at the top level: "
        "it changed from _Unprintable <_Unprintable object whose repr raised> to "
        "_Unprintable <_Unprintable object whose repr raised>."
    )


def test_filter_scan_unroll_reaches_the_program():
    def unroll_of(fun):
        (eqn,) = [e for e in jax.make_jaxpr(fun)().eqns if e.primitive.name == "scan"]
        return eqn.params["unroll"]

    def step(c, x):
        return c + x, c

    xs = jnp.arange(6.0)
    for unroll in (1, 3, np.int64(2), True):
        options = {"unroll": unroll}
        ours = unroll_of(lambda o=options: filter_scan(step, 0.0, xs, **o))
        assert ours == unroll_of(lambda o=options: jax.lax.scan(step, 0.0, xs, **o))
    assert unroll_of(lambda: filter_scan(step, 0.0, xs, unroll=3)) == 3


def test_filter_scan_and_filter_cond_under_disable_jit():
    with jax.disable_jit():
        for pred in (True, False):
            out = filter_cond(
                pred, lambda x, s: (x + 1, s, 2), lambda x, s: (x - 1, s, 2), 1.0, "s"
            )
            assert_identical(out, (2.0 if pred else 0.0, "s", 2))
        (w, steps, label), ys = filter_scan(
            lambda c, x: ((c[0] + x, c[1] + 1, c[2]), c[1]), (0.0, 0, "s"), jnp.ones(3)
        )
    assert label == "s"
    assert_identical(ys, jnp.asarray([0, 1, 2]))
    assert int(steps) == 3 and float(w) == 3.0


#
# Control flow: filter_while_loop, filter_fori_loop, filter_switch, filter_map
#


def _program(fun: Callable[..., Any], *args: Any) -> str:
    # Older JAX prints the addresses of memoised thunks; they are not the program.
    return re.sub(r" at 0x[0-9a-f]+", "", str(jax.make_jaxpr(fun)(*args)))


def _count_up(carry: Any) -> Any:
    """Advance every array, and count the steps in `carry["step"]`."""
    return {**jax.tree.map(advance, carry), "step": carry["step"] + 1}


@given(data=st.data(), steps=st.integers(0, 3), jit=st.booleans())
def test_filter_while_loop_matches_python_loop(data, steps, jit):
    init = {"state": data.draw(carries()), "step": jnp.int32(0)}

    def not_done(carry):
        return carry["step"] < steps

    expected = traced_bools(init)
    while expected["step"] < steps:
        expected = _count_up(expected)
    expected = jax.tree.map(
        lambda x: jnp.asarray(x) if eqx.is_array(x) else x, expected
    )
    run = eqx.filter_jit(filter_while_loop) if jit else filter_while_loop
    assert_identical(run(not_done, _count_up, init), expected)


@given(data=st.data(), steps=st.integers(0, 3))
def test_filter_while_loop_equals_lax_while_loop_on_array_trees(data, steps):
    init = {"state": data.draw(array_trees()), "step": jnp.int32(0)}

    def not_done(carry):
        return carry["step"] < steps

    expected = jax.lax.while_loop(not_done, _count_up, init)
    assert_identical(
        filter_while_loop(not_done, _count_up, init), expected, weak_types=True
    )
    assert _program(lambda c: filter_while_loop(not_done, _count_up, c), init) == (
        _program(lambda c: jax.lax.while_loop(not_done, _count_up, c), init)
    )


def test_filter_while_loop_counts_with_a_python_number_as_lax_does():
    expected = jax.lax.while_loop(lambda c: c < 10, lambda c: c + 1, 0)
    assert_identical(
        filter_while_loop(lambda c: c < 10, lambda c: c + 1, 0),
        expected,
        weak_types=True,
    )


class _Episode(eqx.Module):
    """A point that a policy pushes until it leaves [-1, 1]."""

    position: jax.Array
    steps: Any
    policy: eqx.nn.MLP
    activation: Callable[..., Any]
    name: str = eqx.field(static=True)


def test_filter_while_loop_runs_an_episode_until_done_with_a_module_carry():
    policy = eqx.nn.MLP(1, 1, width_size=4, depth=1, key=jax.random.key(3))
    start = _Episode(jnp.zeros(()), 0, policy, jax.nn.sigmoid, "point")

    def running(episode):
        return jnp.abs(episode.position) < 1.0

    def step(episode):
        push = 0.1 + 0.2 * episode.activation(episode.policy(episode.position[None]))[0]
        return eqx.tree_at(
            lambda e: (e.position, e.steps),
            episode,
            (episode.position + push, episode.steps + 1),
        )

    end = eqx.filter_jit(filter_while_loop)(running, step, start)
    expected = start
    while running(expected):
        expected = step(expected)
    assert end.name == "point" and end.activation is jax.nn.sigmoid
    assert int(end.steps) == expected.steps > 0
    assert_identical(end.position, expected.position)


@given(data=st.data(), lower=st.integers(-2, 2), span=st.integers(0, 3))
def test_filter_fori_loop_matches_python_loop(data, lower, span):
    init = data.draw(carries())

    def body(i, carry):
        return jax.tree.map(lambda x: advance(x) if eqx.is_array(x) else x, carry)

    expected = traced_bools(init)
    for i in range(lower, lower + span):
        expected = body(i, expected)
    expected = jax.tree.map(
        lambda x: jnp.asarray(x) if eqx.is_array(x) else x, expected
    )
    assert_identical(filter_fori_loop(lower, lower + span, body, init), expected)


@given(data=st.data(), span=st.integers(0, 3), unroll=st.sampled_from([None, 1, 2]))
def test_filter_fori_loop_equals_lax_fori_loop_on_array_trees(data, span, unroll):
    init = data.draw(array_trees())

    def body(i, carry):
        return jax.tree.map(advance, carry)

    expected = jax.lax.fori_loop(0, span, body, init, unroll=unroll)
    actual = filter_fori_loop(0, span, body, init, unroll=unroll)
    assert_identical(actual, expected, weak_types=True)
    assert _program(
        lambda c: filter_fori_loop(0, span, body, c, unroll=unroll), init
    ) == (_program(lambda c: jax.lax.fori_loop(0, span, body, c, unroll=unroll), init))


def test_filter_fori_loop_is_reverse_differentiable_with_concrete_bounds():
    def loss(w, fori_loop):
        def body(i, carry):
            x, steps = carry
            return jnp.sin(x * w + i), steps + 1

        x, steps = fori_loop(0, 4, body, (jnp.ones(3), 0))
        return jnp.sum(x) + steps

    assert_identical(
        jax.value_and_grad(loss)(0.5, filter_fori_loop),
        jax.value_and_grad(loss)(0.5, jax.lax.fori_loop),
    )


def test_filter_fori_loop_with_traced_bounds_is_a_while_loop():
    def run(upper, fori_loop):
        return fori_loop(0, upper, lambda i, c: (c[0] + i, c[1]), (jnp.int32(0), "s"))[
            0
        ]

    ours = jax.jit(lambda n: run(n, filter_fori_loop))
    assert int(ours(5)) == 10
    assert "while" in _program(lambda n: run(n, filter_fori_loop), 5)


def _branch(shift: float) -> Callable[..., Any]:
    def branch(*operands):
        return jax.tree.map(
            lambda x: (
                x + shift
                if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)
                else x
            ),
            operands,
        )

    return branch


_FLOATS = arrays(dtypes=(jnp.float32, jnp.float16), numpy_allowed=False)


@given(
    operands=st.lists(
        pytrees(st.one_of(_FLOATS, st.sampled_from(_STATIC_LEAVES))), max_size=3
    ),
    index=st.integers(-1, 3),
    jit=st.booleans(),
)
def test_filter_switch_matches_python_indexing(operands, index, jit):
    branches = [_branch(1.0), _branch(-1.0), _branch(0.5)]
    expected = branches[min(max(index, 0), 2)](*traced_bools(operands))

    def run(index, operands):
        return filter_switch(index, branches, *operands)

    run = eqx.filter_jit(run) if jit else run
    assert_identical(run(jnp.asarray(index), operands), expected)


@given(operands=st.lists(array_trees(), max_size=3), index=st.integers(0, 2))
def test_filter_switch_equals_lax_switch_on_array_trees(operands, index):
    branches = [_branch(1.0), _branch(-1.0), _branch(0.5)]
    index = jnp.asarray(index)
    expected = jax.lax.switch(index, branches, *operands)
    assert_identical(
        filter_switch(index, branches, *operands), expected, weak_types=True
    )
    assert _program(lambda i, o: filter_switch(i, branches, *o), index, operands) == (
        _program(lambda i, o: jax.lax.switch(i, branches, *o), index, operands)
    )


def test_filter_switch_gradients_and_numbers_match_lax_switch():
    def loss(x, switch):
        return switch(1, [lambda x: x * 2.0, lambda x: jnp.sin(x), lambda _: 3.0], x)

    assert_identical(
        jax.value_and_grad(loss)(0.3, filter_switch),
        jax.value_and_grad(loss)(0.3, jax.lax.switch),
    )
    same = filter_switch(jnp.asarray(2), [lambda: (1, "a"), lambda: (1, "a")])
    assert same == (1, "a") and type(same[0]) is int
    with pytest.raises(ValueError, match=r"compared with `branches\[0\]`'s output, "):
        filter_switch(0, [lambda: "a", lambda: "b"])


@given(data=st.data(), length=st.integers(1, 4), jit=st.booleans())
def test_filter_map_matches_python_loop(data, length, jit):
    xs = data.draw(inputs(length))
    assume(any(eqx.is_array(leaf) for leaf in jax.tree.leaves(xs)))

    def f(x):
        return jax.tree.map(advance, x), "label"

    expected = python_loop_scan(lambda c, x: (c, f(x)), None, xs, length, False)[1]
    run = eqx.filter_jit(filter_map) if jit else filter_map
    assert_identical(run(f, xs), expected)


@given(data=st.data(), length=st.integers(1, 4), batch=st.sampled_from([None, 2]))
def test_filter_map_equals_lax_map_on_array_trees(data, length, batch):
    xs = data.draw(array_trees(leading=(length,)))
    assume(jax.tree.leaves(xs))
    if (
        batch is not None
        and "batch_size" not in inspect.signature(jax.lax.map).parameters
    ):
        with pytest.raises(TypeError, match="filter_map: `batch_size` needs a JAX"):
            filter_map(advance, xs, batch_size=batch)
        return
    options = {} if batch is None else {"batch_size": batch}
    expected = jax.lax.map(lambda x: jax.tree.map(advance, x), xs, **options)
    actual = filter_map(lambda x: jax.tree.map(advance, x), xs, **options)
    assert_identical(actual, expected, weak_types=True)
    assert _program(
        lambda v: filter_map(lambda x: jax.tree.map(advance, x), v, **options), xs
    ) == (
        _program(
            lambda v: jax.lax.map(lambda x: jax.tree.map(advance, x), v, **options), xs
        )
    )


def test_filter_map_gradients_match_lax_map():
    def loss(w, map_):
        return jnp.sum(map_(lambda x: jnp.sin(w * x), jnp.arange(4.0)))

    assert_identical(
        jax.value_and_grad(loss)(0.7, filter_map),
        jax.value_and_grad(loss)(0.7, jax.lax.map),
    )


def test_the_family_under_vmap_matches_per_example_calls():
    xs = jnp.arange(6.0).reshape(3, 2)

    def per_example(x):
        looped = filter_while_loop(
            lambda c: c[0] < 5.0, lambda c: (c[0] + x[0] + 1, c[1]), (x[1], "w")
        )
        fori = filter_fori_loop(0, 3, lambda i, c: (c[0] * x[0] + i, c[1]), (x[1], "f"))
        switched = filter_switch(
            jnp.int32(x[0]) % 2, [lambda y: (y, "s"), lambda y: (-y, "s")], x
        )
        mapped = filter_map(lambda y: (y * 2, "m"), x)
        return looped[0], fori[0], switched[0], mapped[0]

    batched = jax.vmap(per_example)(xs)
    one_by_one = [per_example(x) for x in xs]
    for i, values in enumerate(batched):
        assert_identical(values, jnp.stack([row[i] for row in one_by_one]))


#
# Batches of pytrees: unstack_pytree, stack_pytree
#


class LeafSpec(eqx.Module):
    """A placeholder for one array leaf in a tree template."""

    shape: tuple[int, ...] = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    # "jax", "numpy", "key", or "mixed": NumPy or JAX, drawn anew for each tree.
    kind: str = eqx.field(static=True)


def _is_spec(x: Any) -> bool:
    return isinstance(x, LeafSpec)


@st.composite
def leaf_specs(draw: st.DrawFn, axis: int, size: int) -> LeafSpec:
    """A leaf shape with `size` at `axis` (which must be valid for that shape)."""
    min_ndim = axis + 1 if axis >= 0 else -axis
    ndim = draw(st.integers(min_ndim, 3))
    shape = list(draw(hnp.array_shapes(min_dims=ndim, max_dims=ndim, max_side=3)))
    shape[axis] = size
    kind = draw(st.sampled_from(["jax", "numpy", "key", "mixed"]))
    dtype = None if kind == "key" else draw(st.sampled_from(_DTYPES))
    return LeafSpec(tuple(shape), dtype, kind)


@st.composite
def realize(draw: st.DrawFn, template: Any) -> Any:
    """Draw fresh array values for every `LeafSpec` in `template`."""

    def make(spec: Any) -> Any:
        if not _is_spec(spec):
            return spec
        if spec.kind == "key":
            return jax.random.wrap_key_data(
                jnp.asarray(draw(hnp.arrays(np.uint32, (*spec.shape, 2))))
            )
        storage = np.float32 if spec.dtype == jnp.bfloat16 else np.dtype(spec.dtype)
        values = draw(hnp.arrays(storage, spec.shape, elements=_elements(spec.dtype)))
        values = values.astype(spec.dtype)
        numpy = spec.kind == "numpy" or (spec.kind == "mixed" and draw(st.booleans()))
        return values if numpy else jnp.asarray(values)

    return jax.tree.map(make, template, is_leaf=_is_spec)


def batched_templates(axis: int, size: int) -> st.SearchStrategy[Any]:
    """Templates with at least one array leaf, each of `size` along `axis`."""
    spec = leaf_specs(axis, size)
    return st.tuples(spec, pytrees(st.one_of(spec, st.sampled_from(_STATIC_LEAVES))))


def _take_reference(leaf: Any, index: int, axis: int) -> Any:
    """Slice `index` along `axis` with plain NumPy, keeping the leaf's kind."""
    if isinstance(leaf, np.ndarray):
        return np.asarray(np.take(leaf, index, axis=axis))
    if _is_key(leaf):
        data = np.asarray(jax.random.key_data(leaf))
        return jax.random.wrap_key_data(
            jnp.asarray(np.take(data, index, axis=axis % leaf.ndim))
        )
    return jnp.asarray(np.take(np.asarray(leaf), index, axis=axis))


axes = st.integers(-3, 2)

# unstack_pytree slices concrete JAX leaves on the host or by a compiled program,
# whichever its cost estimate picks; `slicing_by(path)` forces one of them.
UNSTACK_PATHS = ["host", "compiled", "scheduled"]


@contextlib.contextmanager
def slicing_by(path: str) -> Any:
    saved = lerax_utils._UNSTACK_HOST_SECONDS_PER_SLICE
    per_slice = {"host": 0.0, "compiled": math.inf, "scheduled": saved}[path]
    lerax_utils._UNSTACK_HOST_SECONDS_PER_SLICE = per_slice
    lerax_utils._unstack_host_seconds.clear()
    try:
        yield
    finally:
        lerax_utils._UNSTACK_HOST_SECONDS_PER_SLICE = saved
        lerax_utils._unstack_host_seconds.clear()


@pytest.mark.parametrize("path", UNSTACK_PATHS)
@given(data=st.data(), axis=axes, size=st.integers(0, 4))
def test_unstack_pytree_matches_slicing_each_leaf(path, data, axis, size):
    tree = data.draw(batched_templates(axis, size).flatmap(realize))
    with slicing_by(path):
        slices = unstack_pytree(tree, axis=axis)
    assert len(slices) == size
    for index, piece in enumerate(slices):
        expected = jax.tree.map(
            lambda leaf, i=index: (
                _take_reference(leaf, i, axis) if eqx.is_array(leaf) else leaf
            ),
            tree,
        )
        assert_identical(piece, expected)


@pytest.mark.parametrize("path", ["host", "compiled"])
@given(data=st.data(), axis=axes, size=st.integers(1, 4))
def test_stack_pytree_inverts_unstack_pytree(path, data, axis, size):
    tree = data.draw(batched_templates(axis, size).flatmap(realize))
    with slicing_by(path):
        slices = unstack_pytree(tree, axis=axis)
    assert_identical(stack_pytree(slices, axis=axis), tree)


@given(data=st.data(), axis=axes, size=st.integers(1, 4))
def test_unstack_pytree_inverts_stack_pytree(data, axis, size):
    # Templates of slices: shapes one dimension shorter than the stacked ones.
    template = data.draw(batched_templates(axis, 1))

    def drop_axis(spec: Any) -> Any:
        if not _is_spec(spec):
            return spec
        shape = list(spec.shape)
        del shape[axis]
        return LeafSpec(tuple(shape), spec.dtype, spec.kind)

    template = jax.tree.map(drop_axis, template, is_leaf=_is_spec)
    trees = [data.draw(realize(template)) for _ in range(size)]
    stacked = stack_pytree(trees, axis=axis)
    # A leaf is NumPy after the round trip only if it was NumPy in every tree.
    columns = zip(*(jax.tree.leaves(tree) for tree in trees), strict=True)
    numpy_columns = [
        all(isinstance(leaf, np.ndarray) for leaf in column) for column in columns
    ]
    for leaf, numpy in zip(jax.tree.leaves(stacked), numpy_columns, strict=True):
        if eqx.is_array(leaf):
            assert isinstance(leaf, np.ndarray if numpy else jax.Array)
    pieces = unstack_pytree(stacked, axis=axis)
    assert len(pieces) == size
    for piece, tree in zip(pieces, trees, strict=True):
        leaves, treedef = jax.tree.flatten(tree)
        expected = [
            leaf if numpy or not isinstance(leaf, np.ndarray) else jnp.asarray(leaf)
            for leaf, numpy in zip(leaves, numpy_columns, strict=True)
        ]
        assert_identical(piece, treedef.unflatten(expected))


def test_unstack_pytree_keeps_numpy_leaves_as_views():
    data = np.arange(12.0).reshape(3, 4)
    slices = unstack_pytree({"x": data, "scalars": np.arange(3)}, axis=0)
    for index, piece in enumerate(slices):
        assert type(piece["x"]) is np.ndarray and type(piece["scalars"]) is np.ndarray
        assert np.shares_memory(piece["x"], data)
        assert piece["scalars"].shape == () and piece["scalars"] == index
    columns = unstack_pytree(data, axis=-1)
    assert all(np.shares_memory(column, data) for column in columns)


def test_unstack_pytree_keeps_jax_leaves_on_their_device():
    device = jax.devices()[-1]
    tree = {"a": jax.device_put(jnp.arange(6.0).reshape(3, 2), device)}
    for piece in unstack_pytree(tree):
        assert isinstance(piece["a"], jax.Array)
        assert piece["a"].devices() == {device}


@pytest.mark.parametrize("path", UNSTACK_PATHS)
@pytest.mark.parametrize("length", [1, 7, 32, 37, 70])
def test_unstack_pytree_agrees_on_first_and_later_calls(path, length):
    # The compiled program slices several rows per call; the last chunk overlaps
    # the one before it when `length` is not a multiple of the chunk.
    data = np.arange(length * 6, dtype=np.float32).reshape(length, 2, 3)
    tree = {"a": jnp.asarray(data), "b": [jnp.asarray(data[:, 0] > 5)]}
    expected = [
        {"a": jnp.asarray(data[i]), "b": [jnp.asarray(data[i, 0] > 5)]}
        for i in range(length)
    ]
    with slicing_by(path):
        for _ in range(3):
            assert_identical(unstack_pytree(tree), expected)
            assert_identical(unstack_pytree(tree, axis=0), expected)


def _committed(x: Any) -> Any:
    return getattr(x, "committed", getattr(x, "_committed", None))


@pytest.mark.parametrize("path", UNSTACK_PATHS)
def test_unstack_pytree_keeps_weak_types_and_commitment(path):
    device = jax.devices()[-1]
    weak = jax.lax.broadcast(jnp.asarray(1.5), (3, 2))  # a weakly typed float32
    assert weak.aval.weak_type
    tree = {
        "weak": weak,
        "free": jnp.arange(6, dtype=jnp.int32).reshape(3, 2),
        "placed": jax.device_put(np.arange(3.0, dtype=np.float32), device),
        "keys": jax.random.split(jax.random.key(1), 3),
    }
    # Each leaf alone (so each may take its own path), and all four together.
    parts = [{key: leaf} for key, leaf in tree.items()] + [tree]
    for part in parts:
        with slicing_by(path):
            slices = unstack_pytree(part)
        for index, piece in enumerate(slices):
            if "weak" in piece:
                assert piece["weak"].aval.weak_type
                assert piece["weak"].dtype == jnp.float32
            if "free" in piece:
                assert not piece["free"].aval.weak_type
                assert _committed(piece["free"]) is _committed(tree["free"]) is False
            if "placed" in piece:
                assert _committed(piece["placed"]) is True
                assert piece["placed"].devices() == {device}
            expected = {key: leaf[index] for key, leaf in part.items()}
            assert_identical(piece, expected, weak_types=True)


@pytest.mark.parametrize("guard", ["disallow", "log_explicit"])
def test_unstack_pytree_respects_transfer_guards(guard):
    # The host path's transfers are explicit: allowed under "disallow", which only
    # refuses implicit ones; under "log_explicit" the compiled program is used.
    tree = {"a": jnp.arange(12.0).reshape(4, 3), "b": jnp.arange(4)}
    expected = [{"a": tree["a"][i], "b": tree["b"][i]} for i in range(4)]
    with slicing_by("host"), jax.transfer_guard(guard):
        slices = unstack_pytree(tree)
    assert_identical(slices, expected)


def _programs_compiled(function: Any) -> int:
    """How many programs the jitted `function` has compiled so far."""
    return function._cache_size()


def _unstack_programs() -> int:
    return _programs_compiled(lerax_utils._index_rows)


def test_unstack_pytree_compiles_once_host_time_would_reach_the_compile_time():
    # Costs in made-up units: a slice costs 1 on the host, so a call (4 rows x 2
    # leaves) costs 8; the program (4 rows per call) is estimated at 4 + 4 x (1 + 2
    # x 1) = 16. So call 1 slices on the host, call 2 brings the host total to 16
    # and compiles one program, and every later call reuses it.
    tree = {"a": jnp.zeros((4, 97)), "b": jnp.ones((4, 5), jnp.int32)}
    expected = [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(4)]
    saved = lerax_utils._UNSTACK_COMPILE_SECONDS
    with slicing_by("host"):
        lerax_utils._UNSTACK_HOST_SECONDS_PER_SLICE = 1.0
        lerax_utils._UNSTACK_COMPILE_SECONDS = (4.0, 1.0, 1.0)
        try:
            programs = []
            for _ in range(4):
                assert_identical(unstack_pytree(tree), expected)
                programs.append(_unstack_programs())
            spent = list(lerax_utils._unstack_host_seconds.values())
        finally:
            lerax_utils._UNSTACK_COMPILE_SECONDS = saved
    before = programs[0]
    assert programs == [before, before + 1, before + 1, before + 1]
    assert spent == [math.inf]


def test_unstack_pytree_remembers_a_bounded_number_of_shapes():
    saved = lerax_utils._UNSTACK_SIGNATURES_KEPT
    lerax_utils._UNSTACK_SIGNATURES_KEPT = 3
    trees = [jnp.zeros((2, width)) for width in range(101, 106)]
    try:
        with slicing_by("scheduled"):
            for tree in trees[:4]:
                unstack_pytree(tree)
            unstack_pytree(trees[1])  # Seen again: now the most recent.
            unstack_pytree(trees[4])
            kept = [key[0][0][0] for key in lerax_utils._unstack_host_seconds]
    finally:
        lerax_utils._UNSTACK_SIGNATURES_KEPT = saved
    assert kept == [(2, 104), (2, 102), (2, 105)]


@pytest.mark.parametrize("enabled", [True, False])
def test_unstack_pytree_leaves_the_garbage_collector_alone(enabled):
    tree = {"a": jnp.arange(6.0).reshape(3, 2), "b": np.arange(3)}
    was_enabled = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        for path in UNSTACK_PATHS:
            with slicing_by(path):
                unstack_pytree(tree)
            assert gc.isenabled() is enabled
    finally:
        (gc.enable if was_enabled else gc.disable)()


def test_unstack_pytree_of_zero_length_is_empty():
    assert unstack_pytree({"a": jnp.zeros((0, 3)), "b": np.zeros(0)}) == []


@pytest.mark.parametrize("count", [64, 65, 150])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_stack_pytree_of_many_trees_matches_numpy(count, axis):
    trees = [
        {
            "w": jnp.full((2, 3), i, jnp.float32),
            "k": jax.random.split(jax.random.key(i), 2),
            "tag": "t",
        }
        for i in range(count)
    ]
    stacked = stack_pytree(trees, axis=axis)
    expected_w = np.stack([np.asarray(t["w"]) for t in trees], axis=axis)
    assert isinstance(stacked["w"], jax.Array)
    assert_identical(stacked["w"], jnp.asarray(expected_w))
    # Key data has a trailing axis of its own, so count the key axis from the front.
    key_data = [jax.random.key_data(t["k"]) for t in trees]
    expected_k = np.stack(key_data, axis=axis % 2)
    assert_identical(stacked["k"], jax.random.wrap_key_data(jnp.asarray(expected_k)))
    assert stacked["tag"] == "t"
    assert_identical(unstack_pytree(stacked, axis=axis), trees)


def test_stack_pytree_compiles_two_programs_for_any_number_of_trees():
    # Per result shape, one program fills the first chunk and one every later chunk:
    # the last chunk overlaps the one before it rather than being shorter.
    programs = [lerax_utils._stack_first_chunk, lerax_utils._stack_chunk_into]
    for count in (65, 100, 150):
        trees = [{"w": jnp.full((3, 7), i, jnp.float32)} for i in range(count)]
        before = [_programs_compiled(program) for program in programs]
        stacked = stack_pytree(trees)
        after = [_programs_compiled(program) for program in programs]
        assert_identical(stacked["w"], jnp.asarray(np.stack([t["w"] for t in trees])))
        assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1]


def test_unstack_and_stack_pytree_inside_jit():
    tree = {"a": jnp.arange(12.0).reshape(3, 4), "name": "batch"}

    @jax.jit
    def roundtrip(a):
        slices = unstack_pytree({"a": a, "name": "batch"}, axis=1)
        assert len(slices) == 4  # The length is static under `jit`.
        return stack_pytree(slices, axis=1)["a"], slices[2]["a"]

    stacked, third = roundtrip(tree["a"])
    assert_identical(stacked, tree["a"])
    assert_identical(third, tree["a"][:, 2])


def test_stack_pytree_makes_a_population_filter_vmap_can_run():
    keys = jax.random.split(jax.random.key(0), 5)

    def make(key):
        return eqx.nn.MLP(3, 2, width_size=8, depth=2, key=key)

    population = stack_pytree([make(key) for key in keys])
    assert_identical(population, eqx.filter_vmap(make)(keys))
    x = jnp.ones(3)
    outputs = eqx.filter_vmap(lambda model: model(x))(population)
    assert_identical(outputs, jnp.stack([make(key)(x) for key in keys]))


def test_unstack_pytree_splits_a_filter_scan_rollout_into_steps():
    policy = Policy(jnp.ones(2), jnp.tanh, "actor")

    def step(state, _):
        new = Policy(policy.activation(state.params) + 1.0, state.activation, "actor")
        return new, new

    _, rollout = filter_scan(step, policy, length=4)
    states = unstack_pytree(rollout)
    expected = policy
    for state in states:
        expected = step(expected, None)[0]
        assert_identical(state, expected)


def test_unstack_pytree_errors():
    cases = [
        (
            {"obs": jnp.ones((3, 2)), "act": [jnp.ones(4)]},
            0,
            "unstack_pytree: every array leaf must have the same size along `axis=0`, "
            "but the sizes differ (['act'][0]: 4, ['obs']: 3). Slice them to one "
            "size, or unstack the parts separately.",
        ),
        (
            {"obs": jnp.ones((3, 2)), "reward": jnp.ones(3)},
            1,
            "unstack_pytree: `axis=1` is out of range for the array at path "
            "['reward'], which has shape (3,) (axes run from -1 to 0). Pick an axis "
            "that every array leaf has.",
        ),
        (
            {"step": jnp.float32(1.0)},
            0,
            "unstack_pytree: `axis=0` is out of range for the array at path ['step'], "
            "which has shape () (it has no axes). Pick an axis that every array leaf "
            "has.",
        ),
        (
            {"lr": 0.1, "name": "adam"},
            0,
            "unstack_pytree: `tree` has no array leaves, so the number of slices is "
            "undefined (its leaves are [0.1, 'adam']). Pass a tree with at least one "
            "array.",
        ),
    ]
    for tree, axis, message in cases:
        with pytest.raises(ValueError) as info:
            unstack_pytree(tree, axis=axis)
        assert str(info.value) == message
    with pytest.raises(TypeError) as info:
        unstack_pytree({"a": jnp.ones(2)}, axis=0.0)  # type: ignore[arg-type]
    assert str(info.value) == "unstack_pytree: `axis` must be an int; got float 0.0."


_STACK_ERROR_END = (
    ". Every tree must have the same structure, the same shape and dtype at each "
    "array leaf, and equal non-array leaves."
)


@pytest.mark.parametrize(
    ("second", "detail"),
    [
        (
            {"w": jnp.ones(3), "f": jax.nn.relu},
            "at path ['w']: it has shape (3,) and dtype float32, where trees[0] has "
            "shape (2,) and dtype float32",
        ),
        (
            {"w": jnp.ones(2, jnp.int32), "f": jax.nn.relu},
            "at path ['w']: it has shape (2,) and dtype int32, where trees[0] has "
            "shape (2,) and dtype float32",
        ),
        (
            {"w": jnp.ones(2), "f": "relu"},
            f"at path ['f']: it changed from {type(jax.nn.relu).__name__} "
            f"{jax.nn.relu!r} to str 'relu'",
        ),
        (
            {"w": jnp.ones(2), "g": jax.nn.relu},
            "at the top level: it had keys ['f', 'w'] and now has ['g', 'w']",
        ),
        (
            {"w": 1.0, "f": jax.nn.relu},
            "at path ['w']: it was an array of shape (2,) and dtype float32 and is now "
            "float 1.0",
        ),
    ],
)
def test_stack_pytree_rejects_mismatched_trees(second, detail):
    first = {"w": jnp.ones(2), "f": jax.nn.relu}
    with pytest.raises(ValueError) as info:
        stack_pytree([first, first, second])
    expected = f"stack_pytree: trees[2] differs from trees[0] {detail}"
    assert str(info.value) == expected + _STACK_ERROR_END


def test_stack_pytree_argument_errors():
    with pytest.raises(ValueError) as info:
        stack_pytree([])
    assert str(info.value) == (
        "stack_pytree: `trees` is empty, so there is no structure to stack into. Pass "
        "at least one pytree."
    )
    with pytest.raises(TypeError) as info:
        stack_pytree({"w": jnp.ones(2)})  # type: ignore[arg-type]
    assert str(info.value) == (
        "stack_pytree: `trees` must be a list or tuple of pytrees; got dict. Wrap a "
        "single pytree in a list."
    )
    with pytest.raises(ValueError) as info:
        stack_pytree([{"w": jnp.ones(2)}], axis=2)
    assert str(info.value) == (
        "stack_pytree: `axis=2` is out of range for the array at path ['w'], which "
        "has shape (2,) (axes run from -2 to 1). Pick an axis that every array leaf "
        "has."
    )


#
# Host callbacks: callback_wrapper and friends, print_callback
#


def _expected_on_host(kind: str, leaf: Any, traced: bool = True) -> Any:
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
    data = jax.random.key_data(leaf) if _is_key(leaf) else leaf
    return np.asarray(data) if kind == "numpy" else np.asarray(data).tolist()


_WRAPPERS = {
    "jax": callback_wrapper,
    "numpy": callback_with_numpy_wrapper,
    "list": callback_with_list_wrapper,
}


def assert_received(actual: Any, expected: Any) -> None:
    """Exact match, with static leaves required to be the very same objects."""
    actual_leaves, actual_def = jax.tree_util.tree_flatten(actual)
    expected_leaves, expected_def = jax.tree_util.tree_flatten(expected)
    assert actual_def == expected_def
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        assert type(a) is type(e)
        if isinstance(e, jax.Array | np.ndarray):
            assert (a.dtype, a.shape) == (e.dtype, e.shape)
            assert _bits(a) == _bits(e)
        elif isinstance(e, float) and e != e:  # NaN from .tolist()
            assert a != a
        elif not isinstance(e, bool | int | float | complex):
            assert a is e
        else:
            assert a == e


@given(
    args=st.lists(carries(), max_size=3),
    kwargs=st.dictionaries(st.sampled_from(["loss", "step", "info"]), carries()),
    kind=st.sampled_from(sorted(_WRAPPERS)),
    jit=st.booleans(),
)
def test_callback_wrappers_hand_func_the_expected_leaves(args, kwargs, kind, jit):
    received = []
    wrapped = _WRAPPERS[kind](lambda *a, **k: received.append((a, k)))
    call = eqx.filter_jit(lambda a, k: wrapped(*a, **k)) if jit else wrapped
    result = call(args, kwargs) if jit else call(*args, **kwargs)
    jax.effects_barrier()
    assert result is None
    expected = jax.tree.map(
        lambda leaf: _expected_on_host(kind, leaf, traced=jit), (args, kwargs)
    )
    assert len(received) == 1
    (got_args, got_kwargs), (want_args, want_kwargs) = received[0], expected
    assert_received(list(got_args), want_args)
    assert_received(got_kwargs, want_kwargs)


def test_callback_wrapper_keeps_python_scalars_where_debug_callback_would_not():
    seen = []
    log = callback_with_list_wrapper(lambda step, loss: seen.append((step, loss)))

    @jax.jit
    def train_step(loss):
        log(3, loss)
        return loss

    train_step(jnp.float32(0.5))
    jax.effects_barrier()
    assert seen == [(3, 0.5)] and type(seen[0][0]) is int and type(seen[0][1]) is float


def test_ordered_callbacks_arrive_in_program_order_from_a_jitted_filter_scan():
    steps = []
    record = callback_with_list_wrapper(steps.append, ordered=True)

    @jax.jit
    def run():
        def body(step, _):
            record(step)
            return step + 1, None

        return filter_scan(body, jnp.int32(0), length=100)

    run()
    jax.effects_barrier()
    assert steps == list(range(100))


def _matmul_step(m: jax.Array) -> Callable[[jax.Array, None], tuple[jax.Array, None]]:
    return lambda c, _: (jnp.tanh(c @ m), None)


@pytest.mark.parametrize("kind", [*sorted(_WRAPPERS), "print_callback"])
def test_ordered_callbacks_keep_program_order_when_the_work_before_them_differs(kind):
    """Each callback waits on a chain of matrix products, slow (200 x 200) and fast
    (2 x 2) in turn. These chains are independent, and XLA's CPU runtime runs
    independent work concurrently, so unordered callbacks come out of order here
    (every time, in trials with the order left unenforced); ordered ones never may.
    `print_callback` is ordered on a single device."""
    arrived = []
    lines = io.StringIO()
    if kind == "print_callback":

        def record(i, x):
            print_callback(i, x, file=lines)
    else:
        record = _WRAPPERS[kind](lambda i, _: arrived.append(i), ordered=True)

    @jax.jit
    def run(slow, fast):
        for i in range(16):
            m = slow if i % 2 == 0 else fast
            c, _ = jax.lax.scan(_matmul_step(m), m, None, length=20)
            record(i, c[0, 0])

    for _ in range(3):
        arrived.clear()
        run(jnp.full((200, 200), 1e-3), jnp.full((2, 2), 1e-3))
        jax.effects_barrier()
        if kind == "print_callback":
            arrived = [int(line.split()[0]) for line in lines.getvalue().splitlines()]
            lines.seek(0)
            lines.truncate()
        assert arrived == list(range(16))


def test_callback_under_vmap_runs_once_per_batch_element():
    seen = []
    record = callback_with_list_wrapper(lambda tag, x: seen.append((tag, x)))
    jax.vmap(lambda x: record("row", x))(jnp.arange(6.0).reshape(3, 2))
    jax.effects_barrier()
    assert sorted(seen) == [
        ("row", [0.0, 1.0]),
        ("row", [2.0, 3.0]),
        ("row", [4.0, 5.0]),
    ]


def test_callback_under_grad_sees_the_forward_pass_and_changes_nothing():
    seen = []
    record = callback_with_numpy_wrapper(seen.append)

    def loss(x, log):
        y = jnp.sin(x) * 2.0
        if log:
            record(y)
        return jnp.sum(y**2)

    x = jnp.array([0.1, 0.2])
    expected = jax.grad(loss)(x, False)
    actual = jax.jit(jax.grad(loss), static_argnums=1)(x, True)
    jax.effects_barrier()
    assert_identical(actual, expected)
    assert len(seen) == 1 and _bits(seen[0]) == _bits(np.asarray(jnp.sin(x) * 2.0))


def test_callback_in_cond_and_lax_scan_bodies():
    seen = []
    record = callback_wrapper(lambda name, x: seen.append((name, x.tolist())))

    @jax.jit
    def run(pred, xs):
        def body(c, x):
            record("scan", x)
            return c, None

        jax.lax.scan(body, 0, xs)
        return filter_cond(
            pred, lambda x: record("true", x), lambda x: record("false", x), xs[0]
        )

    run(jnp.asarray(True), jnp.arange(3))
    jax.effects_barrier()
    # Unordered callbacks may arrive in any order; each must arrive once.
    assert sorted(seen) == [("scan", 0), ("scan", 1), ("scan", 2), ("true", 0)]


def test_exceptions_in_func_reach_the_caller():
    def fail(x):
        raise RuntimeError(f"cannot log {x.shape}")

    wrapped = callback_with_numpy_wrapper(fail)
    with pytest.raises(RuntimeError, match=r"cannot log \(2,\)"):
        wrapped(jnp.ones(2))
        jax.effects_barrier()
    with pytest.raises(Exception, match=r"cannot log \(2,\)"):
        jax.block_until_ready(jax.jit(lambda x: (wrapped(x), x)[1])(jnp.ones(2)))
        jax.effects_barrier()


def test_wrapped_functions_keep_metadata_and_return_none():
    def log_metrics(step: int, loss: float) -> str:
        """Write one line of metrics."""
        return "ignored"

    for wrapper in _WRAPPERS.values():
        wrapped = wrapper(log_metrics)
        assert wrapped.__name__ == "log_metrics"
        assert wrapped.__doc__ == "Write one line of metrics."
        assert wrapped.__wrapped__ is log_metrics  # type: ignore[attr-defined]
        assert wrapped(1, jnp.float32(0.5)) is None


@pytest.mark.parametrize("name", sorted(_WRAPPERS))
def test_callback_wrappers_check_their_arguments_at_once(name):
    wrapper = _WRAPPERS[name]
    function = wrapper.__name__
    with pytest.raises(TypeError) as info:
        wrapper("print")  # type: ignore[arg-type]
    assert str(info.value) == f"{function}: `func` must be callable; got str 'print'."
    with pytest.raises(TypeError) as info:
        wrapper(print, ordered="yes")  # type: ignore[arg-type]
    assert str(info.value) == f"{function}: `ordered` must be a bool; got str 'yes'."


@pytest.mark.parametrize("supported", [True, False])
def test_partitioned_is_passed_on_only_where_jax_takes_it(monkeypatch, supported):
    calls = []
    real_callback = jax.debug.callback
    real_options = inspect.signature(real_callback).parameters

    def spy(callback, *args, **options):
        calls.append(options)
        # Pretend to be a jax that takes `partitioned`, or one that does not.
        options = {
            name: value for name, value in options.items() if name in real_options
        }
        return real_callback(callback, *args, **options)

    monkeypatch.setattr(lerax_utils, "_DEBUG_CALLBACK_TAKES_PARTITIONED", supported)
    monkeypatch.setattr(jax.debug, "callback", spy)
    received = []

    def record(*args: Any, **kwargs: Any) -> None:
        received.append(kwargs)

    callback_wrapper(record)(jnp.ones(2), tag="t")
    jax.effects_barrier()
    assert received == [{"tag": "t"}]  # `partitioned` never reaches `func`.
    assert calls == [
        {"ordered": False, "partitioned": False} if supported else {"ordered": False}
    ]
    if not supported:
        with pytest.raises(ValueError) as info:
            callback_wrapper(print, partitioned=True)
        assert str(info.value) == (
            "callback_wrapper: `partitioned=True` needs a `jax.debug.callback` that "
            f"takes `partitioned`, and the installed jax {jax.__version__} does not. "
            "Upgrade jax, or pass `partitioned=False`."
        )


def test_print_callback_prints_arrays_as_lists_in_order(capsys):
    @jax.jit
    def step(x):
        print_callback("x =", x, "sum =", x.sum())
        print_callback("next", sep=": ", end="!\n")
        return x + 1

    step(jnp.arange(3.0))
    jax.effects_barrier()
    assert capsys.readouterr().out == "x = [0.0, 1.0, 2.0] sum = 3.0\nnext!\n"


def test_print_callback_prints_numpy_values_as_print_prints_their_tolist(capsys):
    # With 64-bit mode off, these would come back changed from a trip through a device.
    values = (
        np.float64(0.2) + np.float64(0.1) - np.float64(0.1),
        np.int64(3_000_000_000),
        np.array([2**63 + 5], dtype=np.uint64),
    )
    print(*(value.tolist() for value in values))
    expected = capsys.readouterr().out
    assert expected == "0.20000000000000004 3000000000 [9223372036854775813]\n"
    print_callback(*values)
    jax.jit(lambda x: print_callback(*values) or x)(jnp.ones(()))
    jax.effects_barrier()
    assert capsys.readouterr().out == expected * 2


@pytest.mark.skipif(
    lerax_utils._FENV is None, reason="needs the C library's fesetenv (Linux)"
)
def test_callbacks_see_subnormal_floats_as_they_are_and_xla_still_flushes_them():
    """XLA's CPU runtime flushes subnormal floats while it runs, callbacks included;
    there, `repr(1e-310)` would give '0.0'. `func` must see the real numbers, and
    the computation around the callback must flush as it does without one."""
    seen = []
    log = callback_with_list_wrapper(lambda *a: seen.append(repr(a)), ordered=True)
    values = (1e-310, np.float64(5e-324), np.array([1e-40], np.float32))
    traced = jnp.asarray(np.array([1e-41], np.float32))  # Copied, not computed.

    def run(x, traced, with_log):
        y = x * jnp.float32(0.01)  # Subnormal: flushed to zero by XLA.
        if with_log:
            log(*values, traced)
        return y, y * jnp.float32(2.0) + x

    x = jnp.float32(1e-37)
    expected = jax.jit(run, static_argnums=2)(x, traced, False)
    actual = jax.jit(run, static_argnums=2)(x, traced, True)
    jax.effects_barrier()
    assert_identical(actual, expected)
    assert expected[0] == 0.0
    subnormals = (values[2].tolist(), np.array([1e-41], np.float32).tolist())
    assert 0.0 not in subnormals[0] + subnormals[1]
    assert seen == [repr((1e-310, 5e-324, *subnormals))]


@pytest.mark.parametrize("kind", sorted(_WRAPPERS))
def test_callbacks_keep_no_tracer_alive_after_tracing(kind):
    log = _WRAPPERS[kind](lambda *args: None)
    with jax.checking_leaks():
        jax.jit(lambda x: log(x, np.ones(2), "tag", x.sum()) or x)(jnp.ones(3))
        jax.jit(lambda x: print_callback(x, np.ones(2), file=io.StringIO()) or x)(
            jnp.ones(3)
        )
    jax.effects_barrier()


# NumPy dtypes of every kind and size, in both byte orders.
_NUMPY_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?"),
    hnp.complex_number_dtypes(endianness="?"),
)


@st.composite
def numpy_values(draw: st.DrawFn) -> Any:
    """A NumPy array of any dtype, or a NumPy scalar."""
    dtype = draw(_NUMPY_DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    value = draw(hnp.arrays(dtype, shape))
    return value[()] if value.ndim == 0 and draw(st.booleans()) else value


_PYTHON_VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.complex_numbers(),
    st.booleans(),
    st.text(max_size=3),
)


def mixed_arguments() -> st.SearchStrategy[tuple[list[Any], dict[str, Any]]]:
    """Positional and keyword arguments mixing NumPy, JAX and Python leaves."""
    leaves = st.one_of(numpy_values(), arrays(numpy_allowed=False), _PYTHON_VALUES)
    return st.tuples(
        st.lists(leaves, max_size=4),
        st.dictionaries(st.sampled_from(["loss", "step", "info"]), leaves),
    )


def _call_maybe_jitted(call: Callable[..., Any], args, kwargs, jit: bool) -> None:
    """Call `call(*args, **kwargs)`, or under `jax.jit` with the JAX arrays traced
    and everything else (NumPy values included) closed over, as a user writes it."""
    if not jit:
        call(*args, **kwargs)
        return
    dynamic, static = eqx.partition((args, kwargs), lambda x: isinstance(x, jax.Array))

    def traced(dynamic):
        a, k = eqx.combine(dynamic, static)
        call(*a, **k)

    jax.jit(traced)(dynamic)


def assert_delivered(actual: Any, expected: Any) -> None:
    """The same leaves: NumPy and JAX arrays with the same type, dtype (byte order
    included), shape and bytes; anything else of the same type and repr."""
    actual_leaves, actual_def = jax.tree_util.tree_flatten(actual)
    expected_leaves, expected_def = jax.tree_util.tree_flatten(expected)
    assert actual_def == expected_def
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        assert type(a) is type(e)
        if isinstance(e, jax.Array):
            assert (a.dtype, a.shape, _bits(a)) == (e.dtype, e.shape, _bits(e))
        elif isinstance(e, np.ndarray | np.generic):
            assert (a.dtype, a.shape) == (e.dtype, e.shape)
            assert a.tobytes() == e.tobytes()
        else:
            assert repr(a) == repr(e)  # Exact, NaN and -0.0 included.


@given(arguments=mixed_arguments(), kind=st.sampled_from(sorted(_WRAPPERS)))
@settings(max_examples=40)
def test_numpy_and_python_leaves_reach_func_as_in_a_direct_call(arguments, kind):
    args, kwargs = arguments
    direct = []
    _call_maybe_jitted(lambda *a, **k: direct.append((a, k)), args, kwargs, False)
    received = []
    wrapped = _WRAPPERS[kind](lambda *a, **k: received.append((a, k)))
    for jit in (False, True):
        received.clear()
        _call_maybe_jitted(wrapped, args, kwargs, jit)
        jax.effects_barrier()
        assert len(received) == 1
        expected = jax.tree.map(
            lambda leaf: _expected_on_host(kind, leaf, traced=False), direct[0]
        )
        assert_delivered(received[0], expected)
        if kind == "jax":  # NumPy values are the very objects of the call.
            for a, e in zip(
                *map(jax.tree.leaves, (received[0], direct[0])), strict=True
            ):
                assert a is e or not isinstance(e, np.ndarray | np.generic)


def _extreme_numpy_values() -> list[Any]:
    """Arrays of every NumPy number dtype, in both byte orders, holding values that a
    trip through a 32-bit device would change; and a scalar of each."""
    values: list[Any] = [np.array([True, False]), np.bool_(True)]
    for code in ["i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"]:
        info = np.iinfo(code)
        for order in "<>":
            array = np.array([info.min, info.max, 3_000_000_000 % info.max], code)
            values += [array.astype(order + code), array[1]]
    for code in ["f2", "f4", "f8", "c8", "c16"]:
        info = np.finfo(code)
        special = [info.max, info.tiny, info.smallest_subnormal, 0.1, -0.0, np.nan]
        for order in "<>":
            array = np.array(special).astype(order + code)
            values += [array, array.astype(code)[3]]
    return values


@pytest.mark.parametrize("kind", sorted(_WRAPPERS))
def test_every_numpy_dtype_in_either_byte_order_reaches_func_exactly(kind):
    values = _extreme_numpy_values()
    received = []
    wrapped = _WRAPPERS[kind](lambda *a: received.append(a))
    wrapped(*values)
    jax.jit(lambda x: wrapped(*values) or x)(jnp.ones(()))
    jax.effects_barrier()
    expected = tuple(_expected_on_host(kind, v, traced=False) for v in values)
    assert len(received) == 2
    for got in received:
        assert_delivered(got, expected)
        if kind == "jax":
            assert all(a is e for a, e in zip(got, values, strict=True))
    printed, reference = io.StringIO(), io.StringIO()
    print(*(v.tolist() for v in values), file=reference)
    jax.jit(lambda x: print_callback(*values, file=printed) or x)(jnp.ones(()))
    jax.effects_barrier()
    assert printed.getvalue() == reference.getvalue()


@given(arguments=mixed_arguments(), jit=st.booleans())
@settings(max_examples=40)
def test_print_callback_prints_what_print_prints_for_each_tolist(arguments, jit):
    args, _ = arguments

    def as_list(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray | np.generic | jax.Array):
            return (
                np.asarray(leaf).tolist()
                if isinstance(leaf, jax.Array)
                else (leaf.tolist())
            )
        return leaf

    expected, printed = io.StringIO(), io.StringIO()
    print(*map(as_list, args), sep="|", file=expected)
    _call_maybe_jitted(print_callback, args, {"sep": "|", "file": printed}, jit)
    jax.effects_barrier()
    assert printed.getvalue() == expected.getvalue()


@pytest.mark.parametrize("jit", [False, True])
def test_typed_keys_after_other_arguments_still_arrive_as_typed_keys(jit):
    key = jax.random.key(42)
    received = []
    log = callback_wrapper(lambda tag, *rest: received.append((tag, *rest)))
    raw = callback_with_numpy_wrapper(lambda tag, *rest: received.append((tag, *rest)))

    def call(key, ones):
        log("tag", key)
        log("tag", np.ones(2), ones, key)
        raw("tag", ones, key)

    (jax.jit(call) if jit else call)(key, jnp.ones(2))
    jax.effects_barrier()
    assert [len(r) for r in received] == [2, 4, 3]
    for got in (received[0][1], received[1][3]):
        assert _is_key(got)
        assert str(jax.random.key_impl(got)) == str(jax.random.key_impl(key))
        assert _bits(got) == _bits(key)
    assert received[1][1].dtype == np.float64  # The NumPy value, as it was.
    assert not _is_key(received[1][2]) and received[1][2].tolist() == [1.0, 1.0]
    assert received[2][2].tolist() == jax.random.key_data(key).tolist()


def _two_params(step, loss):
    return step, loss


def _keyword_only(step, *, loss):
    return step, loss


def _any_arguments(*args, **kwargs):
    return args, kwargs


def _positional_only(step, /, loss=0.0):
    return step, loss


@given(
    func=st.sampled_from(
        [_two_params, _keyword_only, _any_arguments, _positional_only]
    ),
    count=st.integers(0, 3),
    keywords=st.sets(st.sampled_from(["step", "loss", "other"])),
    kind=st.sampled_from(sorted(_WRAPPERS)),
    jit=st.booleans(),
)
def test_wrapped_functions_accept_exactly_the_calls_func_accepts(
    func, count, keywords, kind, jit
):
    args = [jnp.float32(i) for i in range(count)]
    kwargs = {name: np.float64(0.5) for name in keywords}
    try:
        func(*args, **kwargs)
    except TypeError:
        direct_error = True
    else:
        direct_error = False
    checked = _WRAPPERS[kind](func)
    try:
        _call_maybe_jitted(checked, args, kwargs, jit)
    except TypeError as err:
        assert direct_error, err
        assert str(err).startswith(
            f"{func.__name__} (made by {_WRAPPERS[kind].__name__})"
        )
    else:
        assert not direct_error
    jax.effects_barrier()


@pytest.mark.parametrize("name", sorted(_WRAPPERS))
@pytest.mark.parametrize("jit", [False, True])
def test_a_call_that_func_refuses_raises_where_it_is_written(name, jit):
    calls = []

    def log_metrics(step, loss):
        calls.append((step, loss))

    wrapped = _WRAPPERS[name](log_metrics)
    with pytest.raises(TypeError) as direct:
        log_metrics(1, 2.0, 3.0)  # type: ignore[call-arg]

    def call(x):
        wrapped(1, x, x)  # type: ignore[call-arg]
        return x

    with pytest.raises(TypeError) as info:
        (jax.jit(call) if jit else call)(jnp.ones(2))
    jax.effects_barrier()
    assert calls == []
    assert "log_metrics()" in str(direct.value)
    assert str(info.value) == (
        f"log_metrics (made by {name_of(name)}): the arguments do not fit the "
        "signature log_metrics(step, loss): too many positional arguments. Pass the "
        "arguments that `log_metrics` itself takes."
    )
    assert isinstance(info.value.__cause__, TypeError)


def name_of(kind: str) -> str:
    return _WRAPPERS[kind].__name__


def test_print_callback_refuses_what_print_refuses_at_the_call():
    with pytest.raises(TypeError):
        print("x", ordered=True)  # type: ignore[call-overload]
    with pytest.raises(TypeError) as info:
        jax.jit(lambda x: print_callback("x", x, ordered=True))(jnp.ones(2))
    assert str(info.value) == (
        "print_callback: the arguments do not fit the signature print(*args, sep=' ', "
        "end='\\n', file=None, flush=False): got an unexpected keyword argument "
        "'ordered'. Pass what `print` takes: any positional arguments, and the "
        "keywords `sep`, `end`, `file` and `flush`."
    )


def test_functions_without_a_signature_are_called_unchecked():
    class Unsigned:
        __signature__ = "not a signature"  # `inspect.signature` raises TypeError.

        def __init__(self) -> None:
            self.calls: list[Any] = []

        def __call__(self, *args: Any) -> None:
            self.calls.append(args)

    func = Unsigned()
    with pytest.raises(TypeError):
        inspect.signature(func)
    callback_with_list_wrapper(func)(jnp.float32(1.5), "a", np.int64(2**40))
    jax.jit(lambda x: callback_with_list_wrapper(func)(x, x))(jnp.float32(2.0))
    jax.effects_barrier()
    assert func.calls == [(1.5, "a", 2**40), (2.0, 2.0)]
    callback_wrapper(max)(jnp.ones(()), 2)  # A builtin with no signature.
    jax.effects_barrier()


def _generator(x):
    yield x


async def _coroutine(x):
    return x


async def _async_generator(x):
    yield x


class _AsyncCall:
    async def __call__(self, x):
        return x


@pytest.mark.parametrize("name", sorted(_WRAPPERS))
@pytest.mark.parametrize(
    ("func", "shown", "kind", "creates"),
    [
        (_generator, "_generator", "a generator function", "a generator, which "
         "nothing here would iterate"),
        (_coroutine, "_coroutine", "an `async def` function", "a coroutine, which "
         "nothing here would await"),
        (_async_generator, "_async_generator", "an async generator function",
         "an async generator, which nothing here would iterate"),
        (_AsyncCall(), "_AsyncCall", "an `async def` function", "a coroutine, which "
         "nothing here would await"),
    ],
)  # fmt: skip
def test_functions_whose_body_would_never_run_are_refused(
    name, func, shown, kind, creates
):
    with pytest.raises(TypeError) as info:
        _WRAPPERS[name](func)
    assert str(info.value) == (
        f"{name_of(name)}: `func` ({shown}) is {kind}. Calling it only creates "
        f"{creates}, so its body would never run. Wrap a plain function that does "
        "the work instead, for example one that runs it to completion."
    )


#
# Checkpoints: Serializable
#


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


_CHECKPOINT_DTYPES = (*_DTYPES, jnp.int8, jnp.uint32, jnp.complex64)


def _checkpoint_elements(dtype: Any) -> st.SearchStrategy[Any]:
    if dtype == jnp.int8:
        return st.integers(-128, 127)
    if dtype == jnp.uint32:
        return st.integers(0, 2**32 - 1)
    if dtype == jnp.complex64:
        return st.complex_numbers(width=64)
    return _elements(dtype)


@st.composite
def checkpoint_arrays(draw: st.DrawFn) -> Any:
    dtype = draw(st.sampled_from(_CHECKPOINT_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=3))
    storage = np.float32 if dtype == jnp.bfloat16 else np.dtype(dtype)
    elements = _checkpoint_elements(dtype)
    value = draw(hnp.arrays(storage, shape, elements=elements)).astype(dtype)
    return value if draw(st.booleans()) else jnp.asarray(value)


checkpoint_params = pytrees(
    st.one_of(
        checkpoint_arrays(),
        prng_keys(leading=(2,)),
        prng_keys(),
        st.sampled_from([*_STATIC_LEAVES, 1.5e-300, -0.0, 3 + 4j, 2**40]),
    )
)


def _agent(width=4, seed=0, **kwargs):
    return Agent(width, key=jax.random.key(seed), **kwargs)


@given(params=checkpoint_params, temperature=st.floats(allow_nan=False))
def test_serialize_round_trips_are_bit_exact(params, temperature):
    model = Checkpointed(params, temperature=temperature)
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "model"
        model.serialize(path)
        loaded = Checkpointed.deserialize(path, params, temperature=0.0)
    assert type(loaded) is Checkpointed
    assert_identical(loaded, model)


def _save_and_load(tree: Any, shapes: bool, traced: bool) -> Any:
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "tree"
        if traced:  # Written by a host callback when the computation runs.
            eqx.filter_jit(lambda tree: save_pytree(path, tree))(tree)
            jax.effects_barrier()
        else:
            save_pytree(path, tree)
        like = eqx.filter_eval_shape(lambda: tree) if shapes else tree
        return load_pytree(path, like)


@given(
    params=checkpoint_params, step=st.integers(-(2**70), 2**70), shapes=st.booleans()
)
def test_save_pytree_round_trips_any_pytree_bit_exactly(params, step, shapes):
    tree = {"params": params, "step": step, "opt": [np.float32(0.5), None]}
    assert_identical(_save_and_load(tree, shapes, traced=False), tree)


@settings(max_examples=6)  # Each example compiles.
@given(params=checkpoint_params, shapes=st.booleans())
def test_save_pytree_inside_jit_round_trips_what_the_trace_saw(params, shapes):
    tree = {"params": params, "step": 3, "opt": [np.float32(0.5), None]}
    # Under `jit`, NumPy leaves are traced, so they are saved as JAX arrays.
    expected = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x) if isinstance(x, np.ndarray | np.generic) else x, tree
    )
    assert_identical(_save_and_load(tree, shapes, traced=True), expected)


def test_serialize_appends_the_suffix_so_runs_never_collide(tmp_path):
    first, second = _agent(seed=1), _agent(seed=2)
    first.serialize(tmp_path / "runs" / "run.1")  # Missing folders are created.
    second.serialize(tmp_path / "runs" / "run.2")
    first.serialize(tmp_path / "runs" / "final.eqx")
    second.serialize(str(tmp_path / "runs" / "exact.name"), no_suffix=True)
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == ["exact.name", "final.eqx", "run.1.eqx", "run.2.eqx"]
    key = jax.random.key(9)
    assert_identical(Agent.deserialize(tmp_path / "runs" / "run.1", 4, key=key), first)
    assert_identical(Agent.deserialize(tmp_path / "runs" / "run.2", 4, key=key), second)
    assert_identical(Agent.deserialize(tmp_path / "runs/final.eqx", 4, key=key), first)
    assert_identical(
        Agent.deserialize(tmp_path / "runs/exact.name", 4, key=key), second
    )


def test_deserialize_of_a_missing_file_names_both_candidates(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Agent.deserialize(tmp_path / "nothing", 4, key=jax.random.key(0))
    assert str(info.value) == (
        f"Serializable.deserialize: no checkpoint at '{tmp_path}/nothing' or "
        f"'{tmp_path}/nothing.eqx'. Check the path given to `serialize`."
    )


def test_serialize_rejects_a_path_that_is_not_a_path():
    with pytest.raises(TypeError) as info:
        _agent().serialize(3)  # type: ignore[arg-type]
    assert str(info.value) == (
        "Serializable.serialize: `path` must be a str or os.PathLike; got int 3."
    )


_WRITER = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    from test_lerax_utils import Agent
    Agent(4, key=jax.random.key(0), squash=jnp.tanh).serialize(sys.argv[1])
    """
)


def test_checkpoint_with_a_function_in_a_static_field_loads_in_another_process(
    tmp_path,
):
    for name in ("a", "b"):
        subprocess.run(
            [sys.executable, "-c", _WRITER, str(tmp_path / name)], cwd=ROOT, check=True
        )
    # Two processes, two memory layouts: the files are still identical.
    assert (tmp_path / "a.eqx").read_bytes() == (tmp_path / "b.eqx").read_bytes()
    loaded = Agent.deserialize(tmp_path / "a", 4, key=jax.random.key(5))
    assert_identical(loaded, _agent(squash=jnp.tanh))


def _read_header(path: pathlib.Path) -> tuple[int, dict[str, Any], bytes]:
    """Parse a checkpoint as the README describes it: the header length, the JSON
    header, and the data."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length]), data[8 + length :]


def _metadata_crc(header_text: bytes) -> int:
    """The README's header checksum: the header with its own slot set to zeros."""
    slot = re.search(rb'"metadata_crc32":"([0-9a-f]{8})"', header_text)
    assert slot is not None
    zeroed = header_text[: slot.start(1)] + b"00000000" + header_text[slot.end(1) :]
    return zlib.crc32(zeroed)


def test_checkpoint_is_a_safetensors_file_laid_out_as_the_readme_says(tmp_path):
    agent = _agent()
    agent.serialize(tmp_path / "agent")
    raw = (tmp_path / "agent.eqx").read_bytes()
    length, header, data = _read_header(tmp_path / "agent.eqx")
    assert (8 + length) % 8 == 0  # Padded with spaces, as the reference writer does.
    assert (
        raw[8 + len(json.dumps(header, separators=(",", ":"))) : 8 + length].strip(b" ")
        == b""
    )
    metadata = header.pop("__metadata__")
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["format"] == "lerax_utils"
    assert metadata["format_version"] == "2"
    assert metadata["library_version"] == lerax_utils.__version__
    assert metadata["class"] == "test_lerax_utils.Agent"
    assert int(metadata["metadata_crc32"], 16) == _metadata_crc(raw[8 : 8 + length])
    leaves = jax.tree_util.tree_flatten_with_path(agent)[0]
    arrays = [(jax.tree_util.keystr(p), x) for p, x in leaves if eqx.is_array(x)]
    entries = json.loads(metadata["leaves"])
    assert [entry["path"] for entry in entries] == [p for p, _ in arrays]
    assert list(header) == [p for p, _ in arrays]  # One tensor per array leaf.
    crcs = metadata["crc32"]
    assert len(crcs) == 8 * len(arrays)
    offset = 0
    for index, (entry, (path, array)) in enumerate(zip(entries, arrays, strict=True)):
        data_array = jax.random.key_data(array) if _is_key(array) else array
        tensor = header[path]
        assert tensor["shape"] == list(data_array.shape) == entry["shape"]
        assert entry["dtype"] == str(data_array.dtype)
        assert tensor["dtype"] == ("U32" if _is_key(array) else "F32")
        start, end = tensor["data_offsets"]
        assert start == offset  # Back to back, no holes.
        offset = end
        assert data[start:end] == np.asarray(data_array).tobytes()
        assert int(crcs[8 * index : 8 * index + 8], 16) == zlib.crc32(data[start:end])
    assert offset == len(data)
    key_entry = entries[-1]
    assert (key_entry["kind"], key_entry["impl"]) == ("key", "threefry2x32")
    assert key_entry["key_shape"] == [2]
    structure = metadata["structure"]
    assert "0x" not in structure and " at " not in structure  # No addresses.
    assert [
        "",
        {"node": "Agent", "static": {"squash": ["function", "tanh"]}},
    ] in json.loads(structure)


def _forge(good: bytes, edit: Callable[[Any, Any, Any], Any]) -> bytes:
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


def _load_error(path: Any, *args: Any, cls: Any = Agent, **kwargs: Any) -> str:
    """The message of the ValueError that loading `path` raises."""
    if cls is Agent:
        args = args or (4,)
        kwargs.setdefault("key", jax.random.key(0))
    with pytest.raises(ValueError) as info:
        cls.deserialize(path, *args, **kwargs)
    return str(info.value)


_FIX = ". Pass the constructor arguments the model was saved with."


def test_deserialize_checks_the_file_against_the_skeleton(tmp_path):
    path = tmp_path / "agent.eqx"
    _agent().serialize(path)
    prefix = f"Serializable.deserialize: the file '{path}' "
    assert _load_error(path, 5) == (
        prefix + "does not match the skeleton at path .mlp.width_size: the static "
        "field is 4 in the file and 5 in the skeleton" + _FIX
    )
    assert _load_error(path, squash=jax.nn.relu) == (
        prefix + "does not match the skeleton at path .squash: the static field is "
        "['function', 'tanh'] in the file and ['function', 'relu'] in the skeleton"
        + _FIX
    )


def test_deserialize_names_the_first_leaf_whose_shape_or_dtype_differs(tmp_path):
    path = tmp_path / "model"
    Checkpointed({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}).serialize(path)
    prefix = f"Serializable.deserialize: the file '{path}.eqx' "
    error = _load_error(
        path, {"w": jnp.ones((2, 4)), "b": jnp.zeros(3)}, cls=Checkpointed
    )
    assert error == (
        prefix + "holds at path .params['w'] an array of shape (2, 3) and dtype "
        "float32, but the skeleton has shape (2, 4) and dtype float32" + _FIX
    )
    error = _load_error(
        path, {"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.int32)}, cls=Checkpointed
    )
    assert error == (
        prefix + "holds at path .params['b'] an array of shape (3,) and dtype "
        "float32, but the skeleton has shape (3,) and dtype int32" + _FIX
    )
    error = _load_error(path, {"w": jnp.ones((2, 3))}, cls=Checkpointed)
    assert error == (
        prefix + "does not match the skeleton at path .params: the file has "
        "{'node': 'dict', 'keys': ['b', 'w']}, the skeleton has {'node': 'dict', "
        "'keys': ['w']}" + _FIX
    )


def test_deserialize_rejects_a_different_leaf_count(tmp_path, monkeypatch):
    path = tmp_path / "model.eqx"
    Checkpointed([jnp.ones(2), jnp.ones(2)]).serialize(path)
    # Skip the structure check to reach the count check, as a file with a
    # hand-edited structure would.
    monkeypatch.setattr(lerax_utils, "_structure_difference_in_file", lambda a, b: None)
    error = _load_error(path, [jnp.ones(2)], cls=Checkpointed)
    assert error == (
        f"Serializable.deserialize: the file '{path}' holds 3 leaves, but the "
        "skeleton built from the constructor arguments has 2; they first differ at "
        "path .params[1]" + _FIX
    )


def _bad_file(tmp_path: pathlib.Path, content: bytes) -> pathlib.Path:
    path = tmp_path / "bad.eqx"
    path.write_bytes(content)
    return path


def _checkpoint_bytes(tmp_path: pathlib.Path) -> bytes:
    _agent().serialize(tmp_path / "good")
    return (tmp_path / "good.eqx").read_bytes()


def test_deserialize_rejects_files_that_are_not_checkpoints(tmp_path):
    good = _checkpoint_bytes(tmp_path)
    length = struct.unpack("<Q", good[:8])[0]
    newer = _forge(
        good,
        lambda leaves, structure, header: header["__metadata__"].update(
            format_version="3"
        ),
    )
    cases = {
        b"": "is empty",
        b"step,loss\n1,0.5\n": "is not a lerax_utils checkpoint: it starts with "
        "b'step,los', which is neither a safetensors header length followed by `{` "
        "nor the format-1 magic b'LRXCKPT\\x00'",
        bytes(range(200)): "is not a lerax_utils checkpoint: it starts with "
        "b'\\x00\\x01\\x02\\x03\\x04\\x05\\x06\\x07', which is neither a safetensors "
        "header length followed by `{` nor the format-1 magic b'LRXCKPT\\x00'",
        newer: "has format version 3, newer than the 2 this lerax_utils "
        f"{lerax_utils.__version__} reads. Upgrade lerax_utils to load it",
        struct.pack("<Q", 2**40) + good[8:]: "declares a header of "
        f"{2**40} bytes, more than the {64 * 1024 * 1024} allowed; the file is corrupt",
        good + b"\x00": "has 1 trailing bytes after the data its header describes; "
        "it was not written by `serialize` in one piece",
        good[: 8 + length] + good[9 + length :]: "is truncated: it has "
        f"{len(good) - 1} bytes, and its header needs {len(good)}",
    }
    for content, problem in cases.items():
        path = _bad_file(tmp_path, content)
        assert (
            _load_error(path)
            == f"Serializable.deserialize: the file '{path}' {problem}."
        )


def test_deserialize_rejects_a_file_truncated_at_any_byte(tmp_path):
    model = Checkpointed({"k": jax.random.key(0), "n": 3, "w": jnp.arange(3.0)})
    model.serialize(tmp_path / "small")
    good = (tmp_path / "small.eqx").read_bytes()
    for size in range(1, len(good)):
        path = _bad_file(tmp_path, good[:size])
        with pytest.raises(ValueError) as info:
            Checkpointed.deserialize(path, model.params)
        error = str(info.value)
        assert error.startswith(f"Serializable.deserialize: the file '{path}' is ")
        assert "truncated" in error, (size, error)


@given(offset=st.integers(0, 10**6), flip=st.integers(1, 255))
def test_deserialize_rejects_a_corrupted_byte_anywhere(offset, flip):
    with tempfile.TemporaryDirectory() as folder:
        good = _checkpoint_bytes(pathlib.Path(folder))
        offset %= len(good)
        corrupt = bytearray(good)
        corrupt[offset] ^= flip
        path = _bad_file(pathlib.Path(folder), bytes(corrupt))
        assert _load_error(path).startswith("Serializable.deserialize: the file ")


def test_deserialize_never_allocates_from_a_forged_header(tmp_path):
    good = _checkpoint_bytes(tmp_path)

    def object_dtype(leaves, structure, header):
        leaves[0]["dtype"] = "object"

    path = _bad_file(tmp_path, _forge(good, object_dtype))
    assert _load_error(path) == (
        f"Serializable.deserialize: the file '{path}' has a malformed header (the "
        "leaf at path .mlp.layers[0].weight)."
    )


def test_deserialize_loads_plain_equinox_files(tmp_path):
    model = Checkpointed({"w": jnp.arange(6.0).reshape(2, 3), "n": 3}, temperature=2.0)
    eqx.tree_serialise_leaves(tmp_path / "legacy.eqx", model)
    loaded = Checkpointed.deserialize(
        tmp_path / "legacy", {"w": jnp.ones((2, 3)), "n": 0}
    )
    assert_identical(loaded, model)
    truncated = (tmp_path / "legacy.eqx").read_bytes()[:-3]
    path = _bad_file(tmp_path, truncated)
    error = _load_error(path, {"w": jnp.ones((2, 3)), "n": 0}, cls=Checkpointed)
    assert error.startswith(
        f"Serializable.deserialize: the file '{path}' could not be read as a plain "
        "Equinox file: "
    )


def test_a_failed_serialize_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "agent.eqx"
    _agent(seed=1).serialize(path)
    before = path.read_bytes()
    broken = Checkpointed([jnp.ones(3), jnp.ones(4)])
    broken.params[1].delete()  # Reading it fails in the middle of the save.
    with pytest.raises(RuntimeError, match="deleted"):
        broken.serialize(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["agent.eqx"]


_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    from test_lerax_utils import Checkpointed
    models = [Checkpointed(jnp.full(2_000_000, float(i))) for i in range(2)]
    print("ready", flush=True)
    i = 0
    while True:
        models[i % 2].serialize(sys.argv[1])
        i += 1
    """
)


def test_a_killed_writer_never_leaves_a_torn_checkpoint(tmp_path):
    path = tmp_path / "model.eqx"
    Checkpointed(jnp.full(2_000_000, 0.0)).serialize(path)
    rng = np.random.default_rng(0)
    for _ in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", _KILLED_WRITER, str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        ) as writer:
            assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.05, 0.5))
            writer.send_signal(signal.SIGKILL)
        loaded = Checkpointed.deserialize(path, jnp.zeros(2_000_000))
        values = set(np.unique(np.asarray(loaded.params)).tolist())
        assert values in ({0.0}, {1.0})


def test_serialize_inside_jit_writes_when_the_computation_runs(tmp_path):
    path = tmp_path / "every_ten"

    @eqx.filter_jit
    def train(model):
        def step(model, i):
            model = Checkpointed(model.params + 1.0)
            filter_cond(i % 10 == 9, lambda: model.serialize(path), lambda: None)
            return model, None

        return filter_scan(step, model, jnp.arange(25))[0]

    final = train(Checkpointed(jnp.zeros(3)))
    jax.effects_barrier()
    assert_identical(final.params, jnp.full(3, 25.0))
    saved = Checkpointed.deserialize(path, jnp.zeros(3))
    assert_identical(saved.params, jnp.full(3, 20.0))  # The last multiple of ten.


def test_serialize_eagerly_completes_before_returning(tmp_path):
    model = _agent(seed=4)
    model.serialize(tmp_path / "now")
    loaded = Agent.deserialize(tmp_path / "now", 4, key=jax.random.key(0))
    assert_identical(loaded, model)


def test_deserialize_returns_the_class_it_is_called_on(tmp_path):
    _agent().serialize(tmp_path / "agent")
    loaded: Agent = Agent.deserialize(tmp_path / "agent", 4, key=jax.random.key(0))
    assert type(loaded) is Agent


def _assert_exact(actual: Any, expected: Any) -> None:
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


def test_a_saved_false_loads_as_false_and_true_as_true(tmp_path):
    model = Checkpointed({"off": False, "on": True}, temperature=0.5)
    model.serialize(tmp_path / "flags")
    loaded = Checkpointed.deserialize(tmp_path / "flags", {"off": True, "on": False})
    assert loaded.params["off"] is False
    assert loaded.params["on"] is True


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_typed_keys_of_every_impl_round_trip_with_their_impl(tmp_path, impl):
    keys = jax.random.split(jax.random.key(3, impl=impl), 2)
    model = Checkpointed({"keys": keys, "one": jax.random.key(4, impl=impl)})
    model.serialize(tmp_path / "keys")
    loaded = Checkpointed.deserialize(tmp_path / "keys", model.params)
    assert_identical(loaded, model)
    assert lerax_utils._key_impl_name(loaded.params["keys"]) == impl
    other = "rbg" if impl == "threefry2x32" else "threefry2x32"
    skeleton = {"keys": jax.random.split(jax.random.key(0, impl=other), 2)}
    skeleton["one"] = model.params["one"]
    error = _load_error(tmp_path / "keys", skeleton, cls=Checkpointed)
    saved, wanted = keys.dtype, skeleton["keys"].dtype
    assert error == (
        f"Serializable.deserialize: the file '{tmp_path}/keys.eqx' holds at path "
        f".params['keys'] an array of shape (2,) and dtype {saved}, but the skeleton "
        f"has shape (2,) and dtype {wanted}" + _FIX
    )


def test_format_version_0_is_refused(tmp_path):
    good = _checkpoint_bytes(tmp_path)
    zero = _forge(
        good,
        lambda leaves, structure, header: header["__metadata__"].update(
            format_version="0"
        ),
    )
    path = _bad_file(tmp_path, zero)
    assert _load_error(path) == (
        f"Serializable.deserialize: the file '{path}' has an unknown format version 0."
    )
    legacy = (ROOT / "tests" / "fixtures" / "format1.eqx").read_bytes()
    path = _bad_file(tmp_path, legacy[:8] + struct.pack("<I", 0) + legacy[12:])
    assert _load_error(path) == (
        f"Serializable.deserialize: the file '{path}' has an unknown format version 0 "
        "after the format-1 magic; the file is corrupt."
    )


def test_writes_inside_one_jitted_loop_land_in_program_order(tmp_path):
    path = tmp_path / "latest"

    def save_many(x):
        for i in range(24):  # Independent writes: only their order ties them.
            Checkpointed(x + i).serialize(path)
        return x

    # The order is enforced, not lucky: every write is an ordered effect (the CPU
    # runtime happens to run even unordered callbacks in order, so the effect is
    # checked in the program itself).
    program = jax.make_jaxpr(save_many)(jnp.zeros(64)).jaxpr
    callbacks = [eqn for eqn in program.eqns if "callback" in eqn.primitive.name]
    assert len(callbacks) == 24
    assert all(eqn.params["ordered"] for eqn in callbacks)
    run = jax.jit(save_many)
    for attempt in range(6):
        run(jnp.full(64, float(attempt)))
        jax.effects_barrier()
        loaded = Checkpointed.deserialize(path, jnp.zeros(64))
        assert_identical(loaded.params, jnp.full(64, attempt + 23.0))


def test_a_save_that_fails_after_creating_its_temporary_removes_it(
    tmp_path, monkeypatch
):
    path = tmp_path / "agent.eqx"
    _agent(seed=1).serialize(path)
    before = path.read_bytes()

    def failing(*args):
        raise OSError(5, "Input/output error")

    # The file's fsync, and the checksum of its data (computed while it is written).
    for module, name in [(os, "fsync"), (zlib, "crc32")]:
        with monkeypatch.context() as patch:
            patch.setattr(module, name, failing)
            with pytest.raises(OSError, match="Input/output error"):
                _agent(seed=2).serialize(path)
        assert path.read_bytes() == before
        assert [p.name for p in tmp_path.iterdir()] == ["agent.eqx"]


def test_new_checkpoints_honour_the_umask_and_overwrites_keep_their_mode(tmp_path):
    for umask in (0o000, 0o002, 0o022, 0o027, 0o077):
        old = os.umask(umask)
        try:
            _agent().serialize(tmp_path / f"new{umask}")
            with open(tmp_path / f"reference{umask}", "wb"):
                pass
        finally:
            os.umask(old)
        expected = (tmp_path / f"reference{umask}").stat().st_mode
        assert (tmp_path / f"new{umask}.eqx").stat().st_mode == expected
    kept = tmp_path / "kept.eqx"
    _agent().serialize(kept)
    for mode in (0o604, 0o200):  # Even a file its owner cannot read.
        kept.chmod(mode)
        _agent(seed=1).serialize(kept)
        assert kept.stat().st_mode & 0o7777 == mode


def test_serialize_fsyncs_the_file_then_renames_it_then_fsyncs_the_folder(
    tmp_path, monkeypatch
):
    calls: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        name = os.readlink(f"/proc/self/fd/{descriptor}")
        content = pathlib.Path(name).read_bytes() if os.path.isfile(name) else b""
        calls.append(("fsync", name, str(len(content))))
        real_fsync(descriptor)

    def replace(source, target):
        calls.append(("replace", str(source), str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _agent().serialize(tmp_path / "agent")
    monkeypatch.undo()
    final = (tmp_path / "agent.eqx").read_bytes()
    assert [call[0] for call in calls] == ["fsync", "replace", "fsync"]
    assert calls[0][1] == calls[1][1]  # The temporary file, complete when synced.
    assert calls[0][2] == str(len(final))
    assert calls[1][2] == str(tmp_path / "agent.eqx")
    assert calls[2][1] == str(tmp_path)


def test_any_name_the_filesystem_accepts_saves(tmp_path):
    names = ["n" * 251 + ".eqx", "é" * 125 + ".eqx", "m" * 255]
    for name in names:
        assert len(name.encode()) <= 255
        model = Checkpointed(jnp.arange(3.0))
        model.serialize(tmp_path / name, no_suffix=True)
        loaded = Checkpointed.deserialize(tmp_path / name, jnp.zeros(3))
        assert_identical(loaded, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("", "`path` is empty. Pass a file name, such as 'checkpoints/run'."),
        (
            ".",
            "`path` '.' names a folder, not a file. Pass a file name inside it, "
            "such as 'model'.",
        ),
        (
            "/",
            "`path` '/' names a folder, not a file. Pass a file name inside it, "
            "such as '/model'.",
        ),
        (
            "runs/",
            "`path` 'runs/' names a folder, not a file. Pass a file name "
            "inside it, such as 'runs/model'.",
        ),
    ],
)
def test_serialize_and_deserialize_refuse_a_path_that_names_no_file(path, problem):
    for method, call in [
        ("serialize", lambda: _agent().serialize(path)),
        ("deserialize", lambda: Agent.deserialize(path, 4, key=jax.random.key(0))),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == f"Serializable.{method}: {problem}"


def test_serialize_refuses_a_no_suffix_that_is_not_a_bool(tmp_path):
    with pytest.raises(TypeError) as info:
        _agent().serialize(tmp_path / "a", no_suffix="False")  # type: ignore[arg-type]
    assert str(info.value) == (
        "Serializable.serialize: `no_suffix` must be True or False; got str 'False'."
    )
    assert list(tmp_path.iterdir()) == []


def _float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def test_python_floats_keep_their_nan_payload_and_sign(tmp_path):
    bits = [0x7FF8000000000123, 0xFFF8000000000001, 0x8000000000000000, 1]
    values = [_float(b) for b in bits]
    model = Checkpointed(values, temperature=_float(0x7FF800000000ABCD))
    model.serialize(tmp_path / "nan")
    loaded = Checkpointed.deserialize(tmp_path / "nan", [0.0] * 4)
    _assert_exact(loaded, model)
    loaded_bits = [struct.unpack("<Q", struct.pack("<d", v))[0] for v in loaded.params]
    assert loaded_bits == bits


class WithStatic(Serializable):
    """A model with a static dict."""

    weight: jax.Array
    options: Any = eqx.field(static=True)


def test_static_dicts_compare_as_mappings(tmp_path):
    WithStatic(jnp.ones(2), {"lr": 0.5, "decay": 0.9}).serialize(tmp_path / "s")
    loaded = WithStatic.deserialize(
        tmp_path / "s", jnp.ones(2), {"decay": 0.9, "lr": 0.5}
    )
    assert loaded.options == {"lr": 0.5, "decay": 0.9}
    error = _load_error(
        tmp_path / "s", jnp.ones(2), {"decay": 0.9, "lr": 0.25}, cls=WithStatic
    )
    assert error.startswith(
        f"Serializable.deserialize: the file '{tmp_path}/s.eqx' does not match the "
        "skeleton at path .options: the static field is "
    )


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float
    schedule: Any = None


def test_plain_fields_holding_objects_are_compared(tmp_path):
    model = Checkpointed({"w": jnp.ones(2), "config": Config(0.5, ("cosine", 3))})
    model.serialize(tmp_path / "c")
    loaded = Checkpointed.deserialize(
        tmp_path / "c", {"w": jnp.ones(2), "config": Config(0.5, ("cosine", 3))}
    )
    assert loaded.params["config"] == Config(0.5, ("cosine", 3))
    for other in [Config(0.1, ("cosine", 3)), Config(0.5, ("cosine", 4)), "0.5"]:
        error = _load_error(
            tmp_path / "c", {"w": jnp.ones(2), "config": other}, cls=Checkpointed
        )
        assert error.startswith(
            f"Serializable.deserialize: the file '{tmp_path}/c.eqx' does not match "
            "the skeleton at path .params['config']: the file has ['dataclass', "
            "'Config', "
        ), error


def test_a_static_true_does_not_stand_for_1(tmp_path):
    WithStatic(jnp.ones(2), True).serialize(tmp_path / "flag")
    error = _load_error(tmp_path / "flag", jnp.ones(2), 1, cls=WithStatic)
    assert error == (
        f"Serializable.deserialize: the file '{tmp_path}/flag.eqx' does not match the "
        "skeleton at path .options: the static field is True in the file and 1 in "
        "the skeleton" + _FIX
    )


def test_serialize_refuses_a_batched_model_under_vmap(tmp_path):
    @eqx.filter_vmap
    def save(x):
        Checkpointed(x).serialize(tmp_path / "population")
        return x

    with pytest.raises(ValueError) as info:
        save(jnp.arange(6.0).reshape(3, 2))
    assert str(info.value) == (
        "Serializable.serialize: the model is batched by `jax.vmap` or "
        "`eqx.filter_vmap`, and one path cannot hold every member of a batch. Call "
        "`serialize` outside the vmap, on the stacked model."
    )
    assert list(tmp_path.iterdir()) == []


def test_serialize_under_grad_saves_the_values(tmp_path):
    def loss(w):
        Checkpointed(w).serialize(tmp_path / "g")
        return (w**2).sum()

    try:
        gradient = jax.jit(jax.grad(loss))(jnp.arange(3.0))
    except ValueError as err:  # Older JAX has no JVP rule for IO callbacks.
        assert str(err) == "IO callbacks do not support JVP."
        return
    jax.effects_barrier()
    assert_identical(gradient, jnp.arange(3.0) * 2)
    saved = Checkpointed.deserialize(tmp_path / "g", jnp.zeros(3))
    assert_identical(saved.params, jnp.arange(3.0))


def test_a_concrete_model_saved_inside_jit_is_written_only_when_run(tmp_path):
    model = Checkpointed(jnp.arange(3.0))
    path = tmp_path / "closed"

    @jax.jit
    def maybe_save(flag):
        filter_cond(flag, lambda: model.serialize(path), lambda: None)
        return flag

    maybe_save.lower(True)  # Tracing alone writes nothing.
    maybe_save(False)
    jax.effects_barrier()
    assert list(tmp_path.iterdir()) == []
    maybe_save(True)
    jax.effects_barrier()
    assert_identical(Checkpointed.deserialize(path, jnp.zeros(3)), model)


def test_numpy_leaves_keep_their_exact_dtype_whatever_x64(tmp_path):
    params = {
        "f64": np.linspace(0.0, 1.0, 3),
        "i64": np.arange(3, dtype=np.int64) * 2**40,
        "u64": np.array([2**63 + 5], np.uint64),
        "c128": np.array([1 + 1e-300j]),
        "scalar": np.float64(0.1),
        "int_scalar": np.int64(2**40),
        "f32_scalar": np.float32(1.5),
    }
    model = Checkpointed(params)
    model.serialize(tmp_path / "wide")
    loaded = Checkpointed.deserialize(tmp_path / "wide", params)
    _assert_exact(loaded, model)


_REFUSED = [
    (
        np.ma.masked_array([1.0, 2.0], mask=[False, True]),
        "a masked array, whose "
        "mask would be lost. Save `x.data` and `x.mask` as two leaves, or `x.filled()`",
    ),
    (
        np.array([None, 1], dtype=object),
        "an array of Python objects, which a "
        "checkpoint cannot hold without pickle. Make the field static, or convert its "
        "items to numbers",
    ),
    (
        np.zeros(2, [("a", "f4")]),
        "an array of structured dtype [('a', '<f4')]. Save "
        "each of its fields as an array of its own",
    ),
    (
        np.zeros(1, "datetime64"),
        "an array of dtype datetime64, which a checkpoint cannot restore exactly. "
        "Convert it to a dtype of JAX, a string or a dated dtype with a unit",
    ),
]


@pytest.mark.parametrize(("leaf", "problem"), _REFUSED)
def test_serialize_refuses_leaves_that_could_never_load(tmp_path, leaf, problem):
    with pytest.raises(TypeError) as info:
        Checkpointed({"x": leaf}).serialize(tmp_path / "m")
    assert str(info.value) == (
        f"Serializable.serialize: the leaf at path .params['x'] is {problem}."
    )
    assert list(tmp_path.iterdir()) == []


def test_serialize_inside_jit_refuses_such_a_leaf_when_tracing(tmp_path):
    masked = np.ma.masked_array([1.0], mask=[True])

    @jax.jit
    def save(x):
        Checkpointed({"x": x, "m": masked}).serialize(tmp_path / "m")
        return x

    with pytest.raises(TypeError) as info:
        save.lower(jnp.ones(1))
    assert str(info.value).startswith(
        "Serializable.serialize: the leaf at path .params['m'] is a masked array"
    )


def test_numpy_strings_dates_and_big_endian_arrays_round_trip(tmp_path):
    params = {
        "text": np.array(["ab", "ç"]),
        "bytes": np.array([b"xy", b"z"]),
        "days": np.array(["2020-01-01", "NaT"], "datetime64[D]"),
        "delays": np.array([5, -3], "timedelta64[ms]"),
        "big": np.array([1.0, -2.5, np.nan], ">f4"),
        "big_ints": np.arange(3, dtype=">i8") - 2**40,
        "word": np.str_("hello"),
        "minute": np.datetime64("2021-05-06T07:08", "m"),
        "w": jnp.ones(2),
    }
    model = Checkpointed(params)
    model.serialize(tmp_path / "m")
    skeleton = dict(params, text=np.array(["zz", "q"]))  # Only the values differ.
    loaded = Checkpointed.deserialize(tmp_path / "m", skeleton)
    _assert_exact(loaded, model)
    assert loaded.params["big"].dtype.str == ">f4"
    tensors = dict(safetensors.deserialize((tmp_path / "m.eqx").read_bytes()))
    for name in ("big", "big_ints", "text", "days"):
        little = params[name].astype(params[name].dtype.newbyteorder("<"))
        assert bytes(tensors[f".params['{name}']"]["data"]) == little.tobytes()
    error = _load_error(
        tmp_path / "m", dict(params, text=np.array(["abc"])), cls=Checkpointed
    )
    assert error == (
        f"Serializable.deserialize: the file '{tmp_path}/m.eqx' holds at path "
        ".params['text'] an array of shape (2,) and dtype <U2, but the skeleton has "
        "shape (1,) and dtype <U3" + _FIX
    )


class Converts(Serializable):
    """A model whose constructor needs concrete values."""

    weight: Any

    def __init__(self, weight):
        self.weight = np.asarray(weight)


def test_deserialize_names_a_constructor_that_needs_concrete_values(tmp_path):
    Converts(jnp.ones(2)).serialize(tmp_path / "c")
    with pytest.raises(TypeError) as info:
        Converts.deserialize(tmp_path / "c", jnp.ones(2))
    assert str(info.value) == (
        "Serializable.deserialize: could not build a skeleton of Converts: its "
        "constructor, called with the given arguments under `eqx.filter_eval_shape` "
        "(arrays as shapes and dtypes, without values), needs a concrete value "
        "(TracerArrayConversionError). Keep JAX values as JAX arrays in the "
        "constructor (no `np.asarray`, `float()` or `if` on them), or compute such "
        "values after loading."
    )


def test_a_dtype_that_differs_only_in_width_names_x64(tmp_path):
    Checkpointed(jnp.zeros(3)).serialize(tmp_path / "narrow")
    jax.config.update("jax_enable_x64", True)
    try:
        error = _load_error(tmp_path / "narrow", jnp.zeros(3, float), cls=Checkpointed)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert error == (
        f"Serializable.deserialize: the file '{tmp_path}/narrow.eqx' holds at path "
        ".params an array of shape (3,) and dtype float32, but the skeleton has "
        "shape (3,) and dtype float64. The dtypes differ only in width: the file "
        "was probably saved with `jax_enable_x64` set otherwise than now. Set it as "
        "when saving, or save the leaf as a NumPy array, which keeps its dtype."
    )


def test_a_forged_key_or_scalar_never_loads_into_another_type(tmp_path):
    Checkpointed({"k": jax.random.key(0), "n": 3}).serialize(tmp_path / "good")
    good = (tmp_path / "good.eqx").read_bytes()
    skeleton = {"k": jax.random.key(1), "n": 0}

    def key_of_shape_1(leaves, structure, header):
        leaves[0]["shape"] = [1, 2]
        header[".params['k']"]["shape"] = [1, 2]

    def key_as_float(leaves, structure, header):
        leaves[0]["dtype"] = "float32"
        header[".params['k']"]["dtype"] = "F32"

    for edit in (key_of_shape_1, key_as_float):
        path = _bad_file(tmp_path, _forge(good, edit))
        assert _load_error(path, skeleton, cls=Checkpointed) == (
            f"Serializable.deserialize: the file '{path}' has a malformed header "
            "(the leaf at path .params['k'])."
        )

    def float_for_int(leaves, structure, header):
        leaves[1]["value"] = ["float", "400c000000000000"]

    path = _bad_file(tmp_path, _forge(good, float_for_int))
    assert _load_error(path, skeleton, cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' holds at path .params['n'] the "
        "Python float 3.5, where the skeleton has int 0" + _FIX
    )


_FOUR_DEVICES = textwrap.dedent(
    """
    import json, sys, tempfile
    import equinox as eqx, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    import lerax_utils
    from lerax_utils import (
        Serializable, callback_wrapper, filter_scan, stack_pytree, unstack_pytree
    )

    assert len(jax.devices()) == 4
    mesh = Mesh(np.array(jax.devices()), ("d",))
    by_row = NamedSharding(mesh, PartitionSpec("d"))
    by_column = NamedSharding(mesh, PartitionSpec(None, "d"))
    report = {}

    # filter_scan with a sharded carry, under jit.
    weights = jax.device_put(jnp.arange(8.0), by_row)
    def step(carry, x):
        return {"w": carry["w"] * 0.5 + x, "tag": carry["tag"]}, carry["w"].sum()
    run = eqx.filter_jit(lambda w: filter_scan(step, {"w": w, "tag": "t"}, jnp.ones(3)))
    (carry, sums) = run(weights)
    plain = np.arange(8.0, dtype=np.float32)
    expected = jax.lax.scan(lambda c, x: (c * 0.5 + x, c.sum()), plain, np.ones(3))
    report["scan"] = bool(
        np.array_equal(carry["w"], expected[0]) and np.array_equal(sums, expected[1])
        and carry["tag"] == "t" and len(carry["w"].sharding.device_set) == 4
    )

    # unstack_pytree and stack_pytree on an array sharded along its columns.
    grid = np.arange(32.0, dtype=np.float32).reshape(8, 4)
    table = jax.device_put(grid, by_column)
    rows = unstack_pytree({"t": table})
    back = stack_pytree(rows)["t"]
    report["unstack"] = bool(
        len(rows) == 8
        and all(np.array_equal(r["t"], grid[i]) for i, r in enumerate(rows))
        and all(len(r["t"].sharding.device_set) == 4 for r in rows)
        and np.array_equal(back, grid)
    )

    # Callbacks with partitioned=True: one call per shard.
    shapes = []
    if lerax_utils._DEBUG_CALLBACK_TAKES_PARTITIONED:
        record = lambda x, tag: shapes.append((x.shape, tag))
        log = callback_wrapper(record, partitioned=True)
        jax.jit(lambda x: (log(x, "shard"), x)[1])(weights)
        jax.effects_barrier()
        report["partitioned"] = sorted(shapes) == [((2,), "shard")] * 4
    else:
        try:
            callback_wrapper(print, partitioned=True)
        except ValueError:
            report["partitioned"] = True

    # serialize gathers sharded arrays; deserialize loads them back.
    class Sharded(Serializable):
        table: jax.Array
    with tempfile.TemporaryDirectory() as folder:
        Sharded(table).serialize(folder + "/sharded")
        loaded = Sharded.deserialize(folder + "/sharded", jnp.zeros((8, 4)))
    report["serialize"] = bool(np.array_equal(loaded.table, grid))

    # load_pytree: a `like` leaf sharded over the devices gives the skeleton its
    # sharding, for the reader to load into.
    with tempfile.TemporaryDirectory() as folder:
        lerax_utils.save_pytree(folder + "/tree", {"t": table, "n": 3})
        like = {"t": table, "n": 0}
        skeleton = lerax_utils._like_skeleton(like, folder + "/tree.eqx")
        tree = lerax_utils.load_pytree(folder + "/tree", like)
    report["pytree"] = bool(
        np.array_equal(tree["t"], grid) and tree["n"] == 3
        and skeleton["t"].sharding == table.sharding
    )
    print(json.dumps(report, sort_keys=True))
    """
)


def run_on_four_devices(code: str, *args: str, timeout: float = 300) -> Any:
    """Run `code` (with `args` in `sys.argv`) in a new process that has four CPU
    devices, and return the JSON report it prints last. The wait is bounded, so a hung
    process fails the test instead of hanging the suite."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": str(ROOT),
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


def test_on_four_cpu_devices():
    """Sharded arrays through every capability, in a process with four devices."""
    report = run_on_four_devices(_FOUR_DEVICES)
    assert report == {
        "partitioned": True,
        "pytree": True,
        "scan": True,
        "serialize": True,
        "unstack": True,
    }


#
# The project: public names, README and CI
#


def test_all_lists_exactly_the_public_names():
    public = {
        name
        for name, value in vars(lerax_utils).items()
        if not name.startswith("_")
        and getattr(value, "__module__", None) == "lerax_utils"
    }
    assert sorted(lerax_utils.__all__) == sorted(public)


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_the_two_commands_that_ci_runs():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "examples/quickstart.py" in commands[0]
    assert "pytest" in commands[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci_lines


def _readme_python_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return [part.split("```", 1)[0] for part in readme.split("```python\n")[1:]]


@pytest.mark.parametrize("index", range(len(_readme_python_blocks())))
def test_readme_python_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Examples may write checkpoints.
    code = _readme_python_blocks()[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {})


def _docstring_examples() -> list[tuple[str, str]]:
    examples = []
    for name in lerax_utils.__all__:
        doc = getattr(lerax_utils, name).__doc__ or ""
        for block in doc.split("```python\n")[1:]:
            examples.append((name, textwrap.dedent(block.split("```", 1)[0])))
    return examples


@pytest.mark.parametrize(("name", "code"), _docstring_examples())
def test_docstring_examples_run(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Examples may write checkpoints.
    exec(compile(code, f"{name} docstring example", "exec"), {})
