"""Tests for lerax_utils.

Hypothesis profiles: `ci` is deterministic and is chosen when the `CI` environment
variable is set; `dev` is random and quicker. Set `HYPOTHESIS_PROFILE` to pick one.
"""

import contextlib
import gc
import inspect
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lerax_utils
from lerax_utils import (
    Serializable,
    callback_with_list_wrapper,
    callback_with_numpy_wrapper,
    callback_wrapper,
    filter_cond,
    filter_scan,
    print_callback,
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


def _elements(dtype: Any) -> st.SearchStrategy[Any]:
    if dtype == jnp.float16:
        return st.floats(width=16, allow_subnormal=False)
    if dtype in (jnp.float32, jnp.bfloat16):
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
    carry = jax.tree.map(lambda x: jnp.asarray(x) if eqx.is_array(x) else x, carry)
    if outputs:
        ys = jax.tree.map(
            lambda *ys: (
                jnp.stack([jnp.asarray(y) for y in ys])
                if eqx.is_array(ys[0])
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
            else s
        ),
        y_struct,
    )
    return carry, empty


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
    expected = python_loop_scan(echo_step, init, xs, length, options["reverse"])
    actual = filter_scan(
        echo_step, init, xs, length=length if pass_length else None, **options
    )
    assert_identical(actual, expected)


@given(data=st.data(), length=st.integers(0, 4), options=scan_options)
def test_filter_scan_matches_python_loop_under_jit(data, length, options):
    init = data.draw(carries())
    xs = data.draw(inputs(length))
    expected = python_loop_scan(echo_step, init, xs, length, options["reverse"])

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
        "it changed from str 'start' to str 'renamed'. Only array leaves of the carry "
        "may change from step to step. If this value must change, make it an array "
        "in `init` with `jnp.asarray`; otherwise keep it out of the carry (close over "
        "it in `f`, or pass it in `xs`)."
    )


def test_filter_scan_python_scalar_returned_as_array_is_an_error():
    def count(carry, _):
        return {"steps": jnp.asarray(carry["steps"]) + 1}, None

    with pytest.raises(ValueError) as info:
        filter_scan(count, {"steps": 0}, length=3)
    assert str(info.value) == (
        "filter_scan: `f` returned a carry that differs from `init` at path "
        "['steps']: it was the static (non-array) int 0 and is now an array of shape "
        "() and dtype int32. Only array leaves of the carry may change from step to "
        "step. If this value must change, make it an array in `init` with "
        "`jnp.asarray`; otherwise keep it out of the carry (close over it in `f`, or "
        "pass it in `xs`)."
    )


def test_filter_scan_array_carry_leaf_returned_as_object_is_an_error():
    with pytest.raises(ValueError) as info:
        filter_scan(lambda c, x: ([c[0], "done"], None), [1, jnp.zeros(2)], length=2)
    assert str(info.value) == (
        "filter_scan: `f` returned a carry that differs from `init` at path [1]: it "
        "was an array of shape (2,) and dtype float32 and is now str 'done'. Return "
        "an array (or a Python number) there, with the same shape and dtype as in "
        "`init`."
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

    with pytest.raises(ValueError) as info:
        filter_scan(retitle, {"policy": policy}, length=2)
    assert str(info.value).startswith(
        "filter_scan: `f` returned a carry that differs from `init` at path "
        "['policy'].name: it is a static field that changed from str 'actor' to str "
        "'critic'. Only array leaves"
    )


def test_filter_scan_changed_carry_structure_is_an_error():
    with pytest.raises(ValueError) as info:
        filter_scan(lambda c, _: ({"a": c["a"], "b": 1}, None), {"a": 1}, length=1)
    assert str(info.value).startswith(
        "filter_scan: `f` returned a carry that differs from `init` at the top level: "
        "it had keys ['a'] and now has ['a', 'b']."
    )
    with pytest.raises(ValueError) as info:
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
        return carry + 0.5, {"trace": len(traces)}

    with pytest.raises(ValueError) as info:
        filter_scan(step, jnp.asarray(0), length=2)
    assert len(traces) == 2
    assert str(info.value) == (
        "filter_scan: the non-array part of `f`'s output `y` differs between two "
        "traces of `f`: at path ['trace'] it changed from int 1 to int 2. JAX may "
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
    assert str(info.value) == (
        "filter_scan: `length=4` disagrees with the leading size 3 of the arrays in "
        "`xs`. Pass `length=3` or leave it out."
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


@pytest.mark.parametrize(
    ("length", "error", "message"),
    [
        (-1, ValueError, "filter_scan: `length` must be non-negative; got -1."),
        (2.0, TypeError, "filter_scan: `length` must be a Python int or None; got "),
        (True, TypeError, "filter_scan: `length` must be a Python int or None; got "),
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
        filter_scan(lambda c, x: c, 0, length=1)  # type: ignore[arg-type]
    assert str(info.value) == (
        "filter_scan: `f` must return a pair `(new_carry, y)`; got int 0."
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
    expected = _advance_all(*operands) if pred else _other_branch(*operands)

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
        "Both branches must return the same structure and the same non-array "
        "leaves; return arrays for values that differ between branches."
    )


def test_filter_cond_branch_returning_array_for_static_is_an_error():
    with pytest.raises(ValueError) as info:
        filter_cond(True, lambda x: (x, 0), lambda x: (x, jnp.int32(0)), jnp.ones(()))
    assert str(info.value).startswith(
        "filter_cond: the branches' outputs disagree at path [1]: compared with "
        "`true_fun`'s output, `false_fun`'s was the static (non-array) int 0 and is "
        "now an array of shape () and dtype int32."
    )


def test_filter_cond_bad_arguments_are_errors():
    with pytest.raises(TypeError) as info:
        filter_cond(True, "left", jnp.cos, 1.0)  # type: ignore[arg-type]
    assert (
        str(info.value) == "filter_cond: `true_fun` must be callable; got str 'left'."
    )
    with pytest.raises(ValueError) as info:
        filter_cond(jnp.array([True, False]), jnp.sin, jnp.cos, 1.0)
    assert str(info.value) == (
        "filter_cond: `pred` must be a scalar; got an array of shape (2,). Reduce it "
        "first, for example with `jnp.any` or `jnp.all`."
    )


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


def _expected_on_host(kind: str, leaf: Any) -> Any:
    """What a wrapper of `kind` should hand the host function for `leaf`."""
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
    expected = jax.tree.map(lambda leaf: _expected_on_host(kind, leaf), (args, kwargs))
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


def _read_header(path: pathlib.Path) -> tuple[bytes, int, dict[str, Any], int]:
    """Parse a checkpoint's prefix and header as the README describes them."""
    data = path.read_bytes()
    magic, version, length, crc = struct.unpack("<8sIQI", data[:24])
    header = data[24 : 24 + length]
    assert zlib.crc32(header) == crc
    return magic, version, json.loads(header), len(data) - 24 - length


def test_checkpoint_header_describes_every_leaf(tmp_path):
    agent = _agent()
    agent.serialize(tmp_path / "agent")
    magic, version, header, data_bytes = _read_header(tmp_path / "agent.eqx")
    assert (magic, version) == (b"LRXCKPT\x00", 1)
    assert header["library_version"] == lerax_utils.__version__
    leaves = jax.tree_util.tree_flatten_with_path(agent)[0]
    arrays = [(jax.tree_util.keystr(p), x) for p, x in leaves if eqx.is_array(x)]
    assert [entry["path"] for entry in header["leaves"]] == [p for p, _ in arrays]
    for entry, (_, array) in zip(header["leaves"], arrays, strict=True):
        data = jax.random.key_data(array) if _is_key(array) else array
        assert entry["shape"] == list(data.shape)
        assert entry["dtype"] == str(data.dtype)
    # The arrays' bytes, then a CRC-32 for each array.
    nbytes = [entry["nbytes"] for entry in header["leaves"]]
    assert data_bytes == sum(nbytes) + 4 * len(nbytes)
    data = (tmp_path / "agent.eqx").read_bytes()[-data_bytes:]
    offsets = np.cumsum([0, *nbytes])
    checksums = struct.unpack(f"<{len(nbytes)}I", data[offsets[-1] :])
    for start, end, checksum in zip(offsets[:-1], offsets[1:], checksums, strict=True):
        assert zlib.crc32(data[start:end]) == checksum
    structure = json.dumps(header["structure"])
    assert "0x" not in structure and " at " not in structure  # No addresses.
    assert [
        "",
        {"node": "Agent", "static": {"squash": ["function", "tanh"]}},
    ] in header["structure"]


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
    cases = {
        b"": "is empty",
        b"step,loss\n1,0.5\n": "is not a lerax_utils checkpoint: it starts with "
        "b'step,los', not b'LRXCKPT\\x00'",
        bytes(range(200)): "is not a lerax_utils checkpoint: it starts with "
        "b'\\x00\\x01\\x02\\x03\\x04\\x05\\x06\\x07', not b'LRXCKPT\\x00'",
        b"LRXCKPT\x01" + good[8:]: "is not a lerax_utils checkpoint: it starts with "
        "b'LRXCKPT\\x01', not b'LRXCKPT\\x00'",
        good[:8] + struct.pack("<I", 2) + good[12:]: "has format version 2, newer "
        f"than the 1 this lerax_utils {lerax_utils.__version__} reads. Upgrade "
        "lerax_utils to load it",
        good[:12] + struct.pack("<Q", 2**40) + good[20:]: "declares a header of "
        f"{2**40} bytes, more than the {64 * 1024 * 1024} allowed; the file is corrupt",
        good + b"\x00": "has 1 trailing bytes after the data its header describes; "
        "it was not written by `serialize` in one piece",
    }
    for content, problem in cases.items():
        path = _bad_file(tmp_path, content)
        assert (
            _load_error(path)
            == f"Serializable.deserialize: the file '{path}' {problem}."
        )


def test_deserialize_rejects_a_file_truncated_at_any_byte(tmp_path):
    good = _checkpoint_bytes(tmp_path)
    for size in range(1, len(good)):
        path = _bad_file(tmp_path, good[:size])
        error = _load_error(path)
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
    _, _, header, _ = _read_header(tmp_path / "good.eqx")
    header["leaves"][0]["dtype"] = "object"
    forged = json.dumps(header).encode()
    prefix = struct.pack("<8sIQI", b"LRXCKPT\x00", 1, len(forged), zlib.crc32(forged))
    data_start = 24 + struct.unpack("<Q", good[12:20])[0]
    path = _bad_file(tmp_path, prefix + forged + good[data_start:])
    assert _load_error(path) == (
        f"Serializable.deserialize: the file '{path}' has a malformed header."
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

    # The clear error for ordered callbacks on several devices.
    try:
        callback_wrapper(print, ordered=True)(weights)
    except ValueError as err:
        report["ordered"] = str(err)

    # serialize gathers sharded arrays; deserialize loads them back.
    class Sharded(Serializable):
        table: jax.Array
    with tempfile.TemporaryDirectory() as folder:
        Sharded(table).serialize(folder + "/sharded")
        loaded = Sharded.deserialize(folder + "/sharded", jnp.zeros((8, 4)))
    report["serialize"] = bool(np.array_equal(loaded.table, grid))
    print(json.dumps(report, sort_keys=True))
    """
)


def test_on_four_cpu_devices():
    """Sharded arrays through every capability, in a process with four devices."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run(
        [sys.executable, "-c", _FOUR_DEVICES],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {
        "ordered": (
            "callback_wrapper: `ordered=True` callbacks need every array on one "
            "device, but an argument of shape (8,) is spread over 4 devices, and JAX "
            "refuses ordered callbacks on several devices. Pass `ordered=False`, or "
            "gather the array onto one device first."
        ),
        "partitioned": True,
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
