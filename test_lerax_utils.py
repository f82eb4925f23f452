"""Tests for lerax_utils.

Hypothesis profiles: `ci` is deterministic and is chosen when the `CI` environment
variable is set; `dev` is random and quicker. Set `HYPOTHESIS_PROFILE` to pick one.
"""

import contextlib
import functools
import inspect
import io
import json
import math
import os
import pathlib
import re
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from typing import Any

import equinox as eqx
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def traced_numbers(tree: Any) -> Any:
    """`tree` with its Python numbers as the arrays that JAX traces them as, as
    `filter_cond` and `filter_switch` trace them (as `jax.lax.cond` does)."""
    return jax.tree.map(lambda x: jnp.asarray(x) if is_number(x) else x, tree)


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
        _advance_all(*traced_numbers(operands))
        if pred
        else _other_branch(*traced_numbers(operands))
    )

    def run(pred, operands):
        return filter_cond(pred, _advance_all, _other_branch, *operands)

    run = eqx.filter_jit(run) if jit else run
    assert_identical(run(jnp.asarray(pred), operands), expected)


#
# Control flow: Python numbers, traced once they change
#

_NUMBERS = st.one_of(
    st.booleans(),
    st.integers(-5, 5),
    st.floats(-5, 5, width=32),
    st.sampled_from([float("nan"), -0.0, 1 + 2j]),
)
_NUMBER_STEPS = ["keep", "add_x", "bump", "set", "remake"]


def _number_step(action: str, replacement: Any, c: Any, x: Any) -> Any:
    if action == "keep":
        return c
    if action == "add_x":
        return c + x
    if action == "bump":
        return c + 1
    if action == "remake":  # Equal (a bool becomes an int); new where not shared.
        return c * 1
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
@example(carry=([0.5, 2.0], [("bump", 0), ("remake", 0)]), length=2, jit=False)
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

    # Every number comes back as lax's array, even where both branches return it.
    _assert_same_outcome(actual, expected, kept=lambda path: False)


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
    expected = branches[min(max(index, 0), 2)](*traced_numbers(operands))

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
        if kind == "jax":  # NumPy scalars as they were, arrays as copies.
            for a, e in zip(
                *map(jax.tree.leaves, (received[0], direct[0])), strict=True
            ):
                if isinstance(e, np.ndarray | np.generic):
                    assert (a is e) != isinstance(e, np.ndarray)


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


# One family of checks: what saves loads back, and what differs from the skeleton is
# refused. Empty arrays of every dtype, static floats of every kind, partials, and
# skeletons with one static leaf more or less at any depth, or a static float changed.

_EMPTY_DTYPES = [
    name
    for name in [
        "bool",
        "int8",
        "uint16",
        "float16",
        "bfloat16",
        "float64",
        "complex64",
        "int4",
        "uint4",
        "int2",
        "uint2",
        "float4_e2m1fn",
        "float8_e4m3fn",
        "float8_e5m2",
    ]
    if hasattr(jnp, name)
]
_STATIC_FLOATS = [
    float("inf"),
    float("-inf"),
    float("nan"),
    struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000123))[0],  # A NaN payload.
    -0.0,
    0.0,
    1e-310,
]


class _Tagged(eqx.Module):
    """An array with a static value."""

    value: Any
    tag: Any = eqx.field(static=True)


@st.composite
def _empty_arrays(draw: st.DrawFn) -> Any:
    dtype = getattr(jnp, draw(st.sampled_from(_EMPTY_DTYPES)))
    shape = list(draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=2)))
    shape[draw(st.integers(0, len(shape) - 1))] = 0
    empty = np.zeros(shape, dtype)
    return empty if draw(st.booleans()) else jnp.asarray(empty)


_static_values = st.one_of(
    st.sampled_from(_STATIC_FLOATS),
    st.builds(functools.partial, st.just(_double), st.integers(-2, 2)),
    st.builds(
        functools.partial, st.just(_double), st.integers(0, 1), st.integers(0, 1)
    ),
    st.sampled_from(["s", None, (0.5, -0.0)]),
)
_family_leaves = st.one_of(
    _empty_arrays(),
    arrays(),
    st.sampled_from(_STATIC_FLOATS),  # Python numbers: saved, not static.
    st.sampled_from(["s", "t"]),  # Static leaves.
    st.builds(_Tagged, _empty_arrays(), _static_values),
)
_family_trees = st.recursive(
    _family_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.tuples(children, children),
        st.dictionaries(st.sampled_from("abc"), children, max_size=3),
    ),
    max_leaves=8,
)


def _differing_skeletons(tree: Any) -> list[Any]:
    """`tree` with one static leaf more at the end of each list, tuple and dict, or
    one less where one ends it, or one static float of a `_Tagged` changed."""
    if isinstance(tree, _Tagged):
        if type(tree.tag) is not float:
            return []
        return [_Tagged(tree.value, 0.0 if math.isnan(tree.tag) else -tree.tag)]
    if isinstance(tree, dict):
        found = [dict(tree, **{"~": "extra"})]  # "~" sorts after every key.
        if tree and isinstance(tree[max(tree)], str):
            found.append({k: v for k, v in tree.items() if k != max(tree)})
        for key, child in tree.items():
            found += [
                dict(tree, **{key: other}) for other in _differing_skeletons(child)
            ]
        return found
    if isinstance(tree, list | tuple):
        kind = type(tree)
        found = [kind([*tree, "extra"])]
        if tree and isinstance(tree[-1], str):
            found.append(kind(tree[:-1]))
        for index, child in enumerate(tree):
            for other in _differing_skeletons(child):
                found.append(kind([*tree[:index], other, *tree[index + 1 :]]))
        return found
    return []


def _numbers_as_bits(tree: Any) -> Any:
    """Python numbers as their type and bits, so that NaNs compare equal."""
    return jax.tree_util.tree_map(
        lambda x: (type(x).__name__, struct.pack("<d", x)) if type(x) is float else x,
        tree,
    )


@given(tree=_family_trees)
def test_what_saves_loads_back_and_what_differs_from_the_skeleton_is_refused(tree):
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "tree"
        save_pytree(path, tree)
        loaded = load_pytree(path, tree)
        assert_identical(_numbers_as_bits(loaded), _numbers_as_bits(tree))
        for like in _differing_skeletons(tree):
            with pytest.raises(ValueError, match="does not match `like` at "):
                load_pytree(path, like)


def _load_error(path: Any, *args: Any, cls: Any = Agent, **kwargs: Any) -> str:
    """The message of the ValueError that loading `path` raises."""
    if cls is Agent:
        args = args or (4,)
        kwargs.setdefault("key", jax.random.key(0))
    with pytest.raises(ValueError) as info:
        cls.deserialize(path, *args, **kwargs)
    return str(info.value)


def _bad_file(tmp_path: pathlib.Path, content: bytes) -> pathlib.Path:
    path = tmp_path / "bad.eqx"
    path.write_bytes(content)
    return path


def _checkpoint_bytes(tmp_path: pathlib.Path) -> bytes:
    _agent().serialize(tmp_path / "good")
    return (tmp_path / "good.eqx").read_bytes()


@given(offset=st.integers(0, 10**6), flip=st.integers(1, 255))
def test_deserialize_rejects_a_corrupted_byte_anywhere(offset, flip):
    with tempfile.TemporaryDirectory() as folder:
        good = _checkpoint_bytes(pathlib.Path(folder))
        offset %= len(good)
        corrupt = bytearray(good)
        corrupt[offset] ^= flip
        path = _bad_file(pathlib.Path(folder), bytes(corrupt))
        assert _load_error(path).startswith("Serializable.deserialize: the file ")


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


def test_readme_stays_short():
    # A user reads it in ten minutes: details live in the docstrings, FORMAT.md
    # and benchmarks/README.md.
    assert len((ROOT / "README.md").read_text().splitlines()) <= 400


def test_benchmark_figures_cover_every_benchmark_script():
    figures = (ROOT / "benchmarks" / "README.md").read_text()
    scripts = sorted(path.name for path in (ROOT / "benchmarks").glob("bench_*.py"))
    assert scripts
    sections = [line[3:] for line in figures.splitlines() if line.startswith("## ")]
    assert sorted(sections) == scripts


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
def test_docstring_examples_print_what_they_say(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Examples may write checkpoints.
    # With what the module docstring says that the examples assume.
    assumed = {name: getattr(lerax_utils, name) for name in lerax_utils.__all__}
    assumed.update(eqx=eqx, jax=jax, jnp=jnp)
    assert "`import jax.numpy as jnp` and `from lerax_utils import *`" in " ".join(
        (lerax_utils.__doc__ or "").split()
    )
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, f"{name} docstring example", "exec"), assumed)
        jax.effects_barrier()
    if output.getvalue():  # What it prints is its last line's comment.
        comment = code.strip().splitlines()[-1].split("  # ")[1]
        assert output.getvalue() == comment + "\n"
