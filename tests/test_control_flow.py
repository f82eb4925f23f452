"""The control-flow family as a superset of `jax.lax`'s.

Each mistake below is made once with `jax.lax` and once with ours: both must raise
the same exception type. Each call form that `jax.lax` accepts must give the same
result with ours. Each message that a `**Raises:**` section quotes is raised by some
mistake. The property tests of the family are in `test_lerax_utils.py`.
"""

import dataclasses
import decimal
import enum
import fractions
import functools
import gc
import inspect
import math
import re
import struct
import subprocess
import sys
import textwrap
import threading
import types
import weakref
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import ROOT, assert_identical, run_on_four_devices
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import io_callback

import lerax_utils
from lerax_utils import (
    filter_cond,
    filter_fori_loop,
    filter_map,
    filter_scan,
    filter_switch,
    filter_while_loop,
)


def _error_type(run: Callable[[], Any]) -> type[BaseException]:
    try:
        run()
    except Exception as err:
        return type(err)
    raise AssertionError("the call did not raise")


def _lax_scan_checks_unroll() -> bool:
    try:
        jax.lax.scan(lambda c, x: (c, x), 0.0, jnp.ones(2), unroll=-1)
    except ValueError as err:
        return "unroll" in str(err)
    except Exception:
        return False
    return False


def _identity_step(c: Any, x: Any) -> Any:
    return c, x


SCAN_MISTAKES: dict[str, Callable[[Any], Any]] = {
    "f is not callable": lambda scan: scan("f", 0.0, None, length=2),
    "f returns three values": lambda scan: scan(
        lambda c, x: (c, x, x), 0.0, None, length=1
    ),
    "f returns a bare carry": lambda scan: scan(
        lambda c, x: c, (0.0, 1.0), None, length=1
    ),
    "carry dtype changes": lambda scan: scan(
        lambda c, x: (c.astype(jnp.int32), None), jnp.ones(2), None, length=1
    ),
    "carry shape changes": lambda scan: scan(
        lambda c, x: (jnp.ones(3), None), jnp.ones(2), None, length=1
    ),
    "carry list gets shorter": lambda scan: scan(
        lambda c, x: (c[:1], None), [jnp.ones(()), jnp.ones(())], None, length=1
    ),
    "carry dict gains a key": lambda scan: scan(
        lambda c, x: ({**c, "b": c["a"]}, None), {"a": jnp.ones(())}, None, length=1
    ),
    "carry number becomes a string": lambda scan: scan(
        lambda c, x: ("done", None), 0, None, length=1
    ),
    "carry array becomes None": lambda scan: scan(
        lambda c, x: (None, None), jnp.ones(()), None, length=1
    ),
    "xs leading sizes differ": lambda scan: scan(
        _identity_step, 0.0, (jnp.ones(3), jnp.ones(4))
    ),
    "length larger than xs": lambda scan: scan(
        _identity_step, 0.0, jnp.ones(3), length=4
    ),
    "length smaller than xs": lambda scan: scan(
        _identity_step, 0.0, jnp.ones(3), length=2
    ),
    "xs holds a 0-d array": lambda scan: scan(_identity_step, 0.0, jnp.ones(())),
    "no xs and no length": lambda scan: scan(_identity_step, 0.0, None),
    "traced length": lambda scan: jax.jit(
        lambda n: scan(_identity_step, 0.0, None, length=n)
    )(3),
    "negative unroll": lambda scan: scan(_identity_step, 0.0, jnp.ones(2), unroll=-1),
    "string unroll": lambda scan: scan(_identity_step, 0.0, jnp.ones(2), unroll="2"),
    "carry int becomes float32 array": lambda scan: scan(
        lambda c, x: (jnp.float32(1.5), None), jnp.int32(0), None, length=1
    ),
}


@pytest.mark.parametrize("mistake", SCAN_MISTAKES)
def test_filter_scan_raises_what_lax_scan_raises(mistake):
    make = SCAN_MISTAKES[mistake]
    if mistake == "negative unroll" and not _lax_scan_checks_unroll():
        pytest.skip("this JAX does not check `unroll`; it fails later, at random")
    ours = _error_type(lambda: make(filter_scan))
    assert issubclass(ours, _error_type(lambda: make(jax.lax.scan)))
    assert issubclass(ours, TypeError | ValueError)


COND_MISTAKES: dict[str, Callable[[Any], Any]] = {
    "true_fun is not callable": lambda cond: cond(True, "f", jnp.sin, 1.0),
    "false_fun is not callable": lambda cond: cond(True, jnp.sin, 3, 1.0),
    "pred is a vector": lambda cond: cond(jnp.ones(2) > 0, jnp.sin, jnp.cos, 1.0),
    "pred is a list": lambda cond: cond([True], jnp.sin, jnp.cos, 1.0),
    "pred is None": lambda cond: cond(None, jnp.sin, jnp.cos, 1.0),
    "pred is a string": lambda cond: cond("yes", jnp.sin, jnp.cos, 1.0),
    "branch structures differ": lambda cond: cond(
        True, lambda x: (x, x), lambda x: [x, x], 1.0
    ),
    "branch lengths differ": lambda cond: cond(
        True, lambda x: (x, x), lambda x: (x,), 1.0
    ),
    "branch dtypes differ": lambda cond: cond(
        True, lambda x: x, lambda x: x.astype(jnp.int32), jnp.ones(2)
    ),
    "branch shapes differ": lambda cond: cond(
        True, lambda x: x, lambda x: x[:1], jnp.ones(2)
    ),
    "a branch returns a string": lambda cond: cond(
        True, lambda x: x, lambda x: "x", jnp.ones(2)
    ),
    "operand and positional operands": lambda cond: cond(
        True, lambda x: x, lambda x: x, 1.0, operand=2.0
    ),
    "a branch that raises": lambda cond: cond(
        True, lambda x: x[5, 5], lambda x: x, jnp.ones(2)
    ),
    "branches return an int and a float": lambda cond: cond(
        True, lambda: 1, lambda: 2.5
    ),
}


@pytest.mark.parametrize("mistake", COND_MISTAKES)
def test_filter_cond_raises_what_lax_cond_raises(mistake):
    make = COND_MISTAKES[mistake]
    ours = _error_type(lambda: make(filter_cond))
    assert issubclass(ours, _error_type(lambda: make(jax.lax.cond)))


def _assert_same(actual: Any, expected: Any) -> None:
    actual_leaves, actual_def = jax.tree.flatten(actual)
    expected_leaves, expected_def = jax.tree.flatten(expected)
    assert actual_def == expected_def
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        a, e = jnp.asarray(a), jnp.asarray(e)
        assert (a.dtype, a.shape, a.aval.weak_type) == (
            e.dtype,
            e.shape,
            e.aval.weak_type,
        )
        assert np.array_equal(a, e, equal_nan=True)


class _Pair(NamedTuple):
    carry: Any
    y: Any


_THREE = np.asarray(3)  # A concrete 0-d array, even inside `jax.jit`.


def _sum_step(c: Any, x: Any) -> Any:
    return c + x, c


SCAN_CALLS: dict[str, Callable[[Any], Any]] = {
    "NumPy integer length": lambda scan: scan(
        lambda c, x: (c + 1.0, c), 0.0, None, length=np.int64(3)
    ),
    "0-d array length": lambda scan: scan(
        lambda c, x: (c + 1.0, c), 0.0, None, length=_THREE
    ),
    "integral float length": lambda scan: scan(
        lambda c, x: (c + 1.0, c), 0.0, None, length=3.0
    ),
    "bool length": lambda scan: scan(lambda c, x: (c + 1.0, c), 0.0, None, length=True),
    "f returns a list": lambda scan: scan(
        lambda c, x: [c + x, c], 0.0, jnp.arange(3.0)
    ),
    "f returns a namedtuple": lambda scan: scan(
        lambda c, x: _Pair(c + x, c), 0.0, jnp.arange(3.0)
    ),
    "f returns a dict of two": lambda scan: scan(
        lambda c, x: {"a": c + x, "b": c}, 0.0, jnp.arange(3.0)
    ),
    "a bool flag negated with ~": lambda scan: scan(
        lambda c, r: (c, jnp.where(~c[1], r, 0.0)), (jnp.float32(0), True), jnp.ones(3)
    ),
    "bools added as JAX adds them": lambda scan: scan(
        lambda c, r: (c, r * (c[1] + c[2])), (0.0, True, True), jnp.ones(3)
    ),
    "Python int carry that becomes a float": lambda scan: scan(
        _sum_step, 0, jnp.arange(3.0)
    ),
    "counter with no inputs": lambda scan: scan(
        lambda h, _: (h + 1, None), 0, None, length=20
    ),
    "carry replaced by a constant": lambda scan: scan(
        lambda c, x: (2.5, c), 1.0, jnp.arange(2.0)
    ),
    "complex carry": lambda scan: scan(_sum_step, 1j, jnp.arange(3.0)),
    "NumPy integer unroll": lambda scan: scan(
        _sum_step, 0.0, jnp.arange(4.0), unroll=np.int32(2)
    ),
    "unroll=0": lambda scan: scan(_sum_step, 0.0, jnp.arange(4.0), unroll=0),
    "NumPy bool unroll": lambda scan: scan(
        _sum_step, 0.0, jnp.arange(4.0), unroll=np.True_
    ),
    "truthy non-bool reverse": lambda scan: scan(
        _sum_step, 0.0, jnp.arange(4.0), reverse=1
    ),
    "NumPy inputs": lambda scan: scan(_sum_step, np.float32(0), np.arange(4.0)),
    "array methods on a number carry": lambda scan: scan(
        lambda c, x: (c + x, jnp.zeros(c.shape)), 0.0, jnp.arange(3.0)
    ),
    "astype on an unchanged int carry": lambda scan: scan(
        lambda c, x: (c, c.astype(jnp.float32) * x), 1, jnp.arange(3.0)
    ),
    "int32 overflow of an unchanged carry": lambda scan: scan(
        lambda c, x: (c, c * 4), 2**30, jnp.arange(3.0)
    ),
    "integer division by zero": lambda scan: scan(
        lambda c, x: (c, c // 0), 1, jnp.arange(3.0)
    ),
    "Python numbers as outputs": lambda scan: scan(
        lambda c, x: (c, (1, 2.5, True)), jnp.zeros(()), None, length=3
    ),
}


@pytest.mark.parametrize("call", SCAN_CALLS)
@pytest.mark.parametrize("jit", [False, True])
def test_filter_scan_accepts_every_call_lax_scan_accepts(call, jit):
    make = SCAN_CALLS[call]
    try:
        expected = make(jax.lax.scan)
    except Exception as err:  # Old JAX refuses some forms, such as `unroll=0`.
        with pytest.raises(type(err)):
            make(filter_scan)
        return
    run = jax.jit(lambda: make(filter_scan)) if jit else lambda: make(filter_scan)
    actual = run()
    # A carry that `f` leaves unchanged may stay a Python number; compare values.
    _assert_same(actual, jax.jit(lambda: make(jax.lax.scan))() if jit else expected)


COND_CALLS: dict[str, Callable[[Any, Any], Any]] = {
    "operand keyword": lambda cond, p: cond(p, jnp.sin, jnp.cos, operand=1.0),
    "no operands": lambda cond, p: cond(p, lambda: 1.0, lambda: 2.0),
    "several operands": lambda cond, p: cond(
        p, lambda a, b: a + b, lambda a, b: a - b, 1.0, jnp.ones(2)
    ),
    "the older five-argument form": lambda cond, p: cond(p, 1.0, jnp.sin, 2.0, jnp.cos),
    "a number and an array": lambda cond, p: cond(
        p, lambda _: 2.0, lambda x: 2 * x, jnp.float32(3.0)
    ),
    "two different numbers": lambda cond, p: cond(p, lambda: 1, lambda: 2),
    "an integer pred": lambda cond, p: cond(jnp.int32(3) * p, jnp.sin, jnp.cos, 1.0),
    "a float pred": lambda cond, p: cond(0.5 * p, jnp.sin, jnp.cos, 1.0),
    "a bool operand negated with ~": lambda cond, p: cond(
        p, lambda x, f: jnp.where(~f, x, -x), lambda x, f: x, 1.0, True
    ),
    "astype on a number operand": lambda cond, p: cond(
        p, lambda x: x.astype(jnp.int32), lambda x: x.astype(jnp.int32) + 1, 1.0
    ),
    "int32 overflow in a branch": lambda cond, p: cond(
        p, lambda x: x * 4, lambda x: x, 2**30
    ),
    "a NumPy bool pred": lambda cond, p: cond(np.bool_(True), jnp.sin, jnp.cos, 1.0),
}


@pytest.mark.parametrize("call", COND_CALLS)
@pytest.mark.parametrize("pred", [True, False])
@pytest.mark.parametrize("jit", [False, True])
def test_filter_cond_accepts_every_call_lax_cond_accepts(call, pred, jit):
    make = COND_CALLS[call]
    if jit:
        expected = jax.jit(lambda p: make(jax.lax.cond, p))(pred)
        actual = jax.jit(lambda p: make(filter_cond, p))(pred)
    else:
        expected, actual = make(jax.lax.cond, pred), make(filter_cond, pred)
    _assert_same(actual, expected)


def _message(run: Callable[[], Any]) -> str:
    try:
        run()
    except TypeError as err:
        return str(err)
    raise AssertionError("the call did not raise")


def test_jax_messages_name_the_users_parameters_and_source():
    def step(state, x):
        return (state[0], state[1].astype(jnp.int32)), None

    def scan_with(scan):
        return _message(lambda: scan(step, (jnp.ones(2), jnp.zeros(3)), None, length=2))

    assert "component state[1] has type float32[3]" in scan_with(filter_scan)
    assert scan_with(filter_scan) == scan_with(jax.lax.scan)

    def keep(x):
        return x

    def to_int(x):
        return x.astype(jnp.int32)

    def cond_with(cond):
        return _message(lambda: cond(True, keep, to_int, jnp.ones(2)))

    assert cond_with(filter_cond) == cond_with(jax.lax.cond)
    assert "lerax_utils" not in cond_with(filter_cond)


def test_traced_length_is_a_concretization_error_naming_the_fix():
    with pytest.raises(jax.errors.ConcretizationTypeError) as info:
        jax.jit(lambda n: filter_scan(_identity_step, 0.0, None, length=n))(3)
    assert "filter_scan: `length` must be concrete, but it is traced." in str(
        info.value
    )


_BAD_UNROLL = "filter_scan: `unroll` must be a bool or a non-negative int; "


@pytest.mark.parametrize(
    ("unroll", "error", "message"),
    [
        (
            "2",
            TypeError,
            "filter_scan: `unroll` must be a bool or a non-negative int; ",
        ),
        (
            1.5,
            TypeError,
            "filter_scan: `unroll` must be a bool or a non-negative int; ",
        ),
        (
            -1,
            ValueError,
            "filter_scan: `unroll` must be a bool or a non-negative int; ",
        ),
    ],
)
def test_bad_unroll_is_named(unroll, error, message):
    with pytest.raises(error) as info:
        filter_scan(_identity_step, 0.0, jnp.ones(2), unroll=unroll)
    assert str(info.value).startswith(message)


class _Named(eqx.Module):
    params: jax.Array
    name: str = eqx.field(static=True)


def _retraced_with_new_labels() -> Any:
    traces: list[None] = []

    def step(carry: Any, _: Any) -> Any:
        traces.append(None)
        return carry + 0.5, {"trace": f"trace {len(traces)}"}

    return filter_scan(step, jnp.asarray(0), None, length=2)


def _keep(*args: Any) -> Any:
    return args[-1]


def _map_without_batch_size() -> Any:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lerax_utils, "_MAP_TAKES_BATCH_SIZE", False)
        return filter_map(_keep, jnp.ones(3), batch_size=2)


def _map_retraced_with_new_labels(label: Callable[[int], Any] = "trace {}".format):
    if not lerax_utils._MAP_TAKES_BATCH_SIZE:
        pytest.skip("this JAX's lax.map has no batch_size, which traces f twice")
    traces: list[None] = []

    def f(x: Any) -> Any:
        traces.append(None)
        return x * 2, label(len(traces))

    return filter_map(f, jnp.arange(5.0), batch_size=2)


_CONCRETE = jax.errors.ConcretizationTypeError

# Each mistake, the exception it raises and how its message begins: the texts of the
# error tables that the README had, and one for every message a docstring quotes.
_RAISES: list[tuple[Callable[[], Any], type[Exception], str]] = [
    (
        lambda: filter_scan(
            lambda c, _: ({**c, "tag": "b"}, None),
            {"tag": "a", "x": 0.0},
            None,
            length=1,
        ),
        ValueError,
        "filter_scan: `f` returned a carry that differs from `init` at path ['tag']: "
        "it changed from str 'a' to str 'b'.",
    ),
    (
        lambda: filter_scan(
            lambda c, _: ({"policy": _Named(c["policy"].params, "critic")}, None),
            {"policy": _Named(jnp.ones(2), "actor")},
            None,
            length=1,
        ),
        TypeError,
        "filter_scan: `f` returned a carry that differs from `init` at path "
        "['policy'].name: it is a static field that changed from str 'actor' to str "
        "'critic'.",
    ),
    (
        lambda: filter_scan(
            lambda c, _: ([c[0], "done"], None), [1, jnp.zeros(2)], None, length=1
        ),
        TypeError,
        "filter_scan: `f` returned a carry that differs from `init` at path [1]: it "
        "was an array of shape (2,) and dtype float32 and is now str 'done'.",
    ),
    (
        lambda: filter_scan(
            lambda c, _: ({"a": c["a"], "b": 1}, None), {"a": 1}, None, length=1
        ),
        TypeError,
        "filter_scan: `f` returned a carry that differs from `init` at the top "
        "level: it had keys ['a'] and now has ['a', 'b'].",
    ),
    (
        lambda: filter_scan(lambda c, x: c, "s", None, length=1),  # type: ignore[arg-type]
        TypeError,
        "filter_scan: `f` must return a pair `(new_carry, y)`; got str 's'.",
    ),
    (
        lambda: filter_scan("step", 0, None, length=1),  # type: ignore[arg-type]
        TypeError,
        "filter_scan: `f` must be callable; got str 'step'.",
    ),
    (
        lambda: jax.jit(  # Where a NumPy leaf stays one.
            lambda: filter_scan(
                _identity_step, 0, {"obs": jnp.ones((3, 2)), "actions": [np.ones(4)]}
            )
        )(),
        ValueError,
        "filter_scan: every array in `xs` must have the same leading size, but the "
        "leading sizes differ (['actions'][0]: 4, ['obs']: 3).",
    ),
    (
        lambda: filter_scan(_identity_step, 0, jnp.ones(3), length=4),
        ValueError,
        "filter_scan: `length=4` disagrees with the leading size 3 of the arrays in "
        "`xs`.",
    ),
    (
        lambda: filter_scan(_identity_step, 0, {"mode": "eval"}),
        ValueError,
        "filter_scan: cannot tell how many steps to run, because `xs` holds no "
        "arrays. Pass `length=`.",
    ),
    (
        lambda: filter_scan(  # The second leaf: the message names its own path.
            _identity_step, 0, {"a": jnp.ones(3), "lr": jnp.float32(0.1)}, length=3
        ),
        ValueError,
        "filter_scan: the array at `xs` path ['lr'] is a scalar (shape ()), so it "
        "has no leading axis to scan over.",
    ),
    (
        lambda: filter_scan(_identity_step, 0, None, length=2.5),  # type: ignore[arg-type]
        TypeError,
        "filter_scan: `length` must be a whole number (a Python int, a NumPy integer "
        "or a 0-d integer array); got float 2.5.",
    ),
    (
        lambda: jax.jit(lambda n: filter_scan(_identity_step, 0.0, None, length=n))(3),
        _CONCRETE,
        "filter_scan: `length` must be concrete, but it is traced.",
    ),
    (
        lambda: filter_scan(_identity_step, 0, None, length=-1),
        ValueError,
        "filter_scan: `length` must be non-negative; got -1.",
    ),
    (
        lambda: filter_scan(_identity_step, 0.0, jnp.ones(2), unroll="2"),  # type: ignore[arg-type]
        TypeError,
        "filter_scan: `unroll` must be a bool or a non-negative int; got str '2'.",
    ),
    (
        lambda: filter_scan(_identity_step, 0.0, jnp.ones(2), unroll=-1),
        ValueError,
        "filter_scan: `unroll` must be a bool or a non-negative int; got -1.",
    ),
    (
        _retraced_with_new_labels,
        ValueError,
        "filter_scan: the non-array part of `f`'s output `y` differs between two "
        "traces of `f`: at path ['trace'] it changed from str 'trace 1' to str "
        "'trace 2'.",
    ),
    (
        lambda: filter_cond(True, "left", jnp.cos, 1.0),  # type: ignore[arg-type]
        TypeError,
        "filter_cond: `true_fun` must be callable; got str 'left'.",
    ),
    (
        lambda: filter_cond(jnp.array([True, False]), jnp.sin, jnp.cos, 1.0),
        TypeError,
        "filter_cond: `pred` must be a scalar; got an array of shape (2,).",
    ),
    (
        lambda: filter_cond(
            True, lambda x: (x, "a"), lambda x: (x, jnp.int32(0)), jnp.ones(())
        ),
        TypeError,
        "filter_cond: the branches' outputs disagree at path [1]: compared with "
        "`true_fun`'s output, `false_fun`'s was str 'a' and is now an array of "
        "shape () and dtype int32.",
    ),
    (
        lambda: filter_cond(True, lambda x: (x, x), lambda x: (x,), 1.0),
        TypeError,
        "filter_cond: the branches' outputs disagree at the top level: compared with "
        "`true_fun`'s output, `false_fun`'s had length 2 and now has length 1.",
    ),
    (
        lambda: filter_cond(
            True, lambda x: {"a": x, "m": "train"}, lambda x: {"a": x, "m": "eval"}, 1.0
        ),
        ValueError,
        "filter_cond: the branches' outputs disagree at path ['m']: compared with "
        "`true_fun`'s output, `false_fun`'s changed from str 'train' to str 'eval'.",
    ),
    (
        lambda: filter_cond(True, lambda x: x, lambda x: x, 1.0, operand=2.0),
        TypeError,
        "filter_cond: pass the operands either positionally or as `operand=`, not both",
    ),
    (
        lambda: filter_scan(_identity_step, 0.0, jnp.ones(3), progress=1),  # type: ignore[arg-type]
        TypeError,
        "filter_scan: `progress` must be a bool or a string (the bar's description); "
        "got int 1.",
    ),
    (
        lambda: filter_while_loop(lambda c: c < 1, lambda c: c, 0, progress=1),  # type: ignore[arg-type]
        TypeError,
        "filter_while_loop: `progress` must be a bool or a string (the bar's "
        "description); got int 1.",
    ),
    (
        lambda: filter_switch(0, 3),  # type: ignore[arg-type]
        TypeError,
        "filter_switch: `branches` must be a sequence of functions; got int 3.",
    ),
    (
        lambda: filter_switch(0, [jnp.sin, "b"]),  # type: ignore[arg-type]
        TypeError,
        "filter_switch: `branches[1]` must be callable; got str 'b'.",
    ),
    (
        lambda: filter_switch(0, []),
        ValueError,
        "filter_switch: `branches` is empty; give it a function.",
    ),
    (
        lambda: filter_switch(jnp.zeros(2, int), [jnp.sin], 1.0),
        TypeError,
        "filter_switch: `index` must be a scalar; got an array of shape (2,). Pass "
        "one index.",
    ),
    (
        lambda: filter_switch(0, [lambda x: (x, x), lambda x: (x,)], 1.0),
        TypeError,
        "filter_switch: the branches' outputs disagree at the top level: compared "
        "with `branches[0]`'s output, `branches[1]`'s had length 2 and now has "
        "length 1.",
    ),
    (
        lambda: filter_switch(0, [lambda: "a", lambda: "b"]),
        ValueError,
        "filter_switch: the branches' outputs disagree at the top level: compared "
        "with `branches[0]`'s output, `branches[1]`'s changed from str 'a' to str "
        "'b'.",
    ),
    (
        lambda: filter_switch(0, [lambda x: x], 1.0, operand=2.0),
        TypeError,
        "filter_switch: pass the operands either positionally or as `operand=`, not "
        "both; got `operand=` and 1 positional operand(s).",
    ),
    (
        lambda: filter_while_loop("c", lambda c: c, 0),  # type: ignore[arg-type]
        TypeError,
        "filter_while_loop: `cond_fun` must be callable; got str 'c'.",
    ),
    (
        lambda: filter_while_loop(
            lambda c: c[0] < 3,
            lambda c: (c[0] + 1,),
            (0, 1),  # type: ignore[arg-type]
        ),
        TypeError,
        "filter_while_loop: `body_fun` returned a carry that differs from `init_val` "
        "at the top level: it had length 2 and now has length 1. Keep the structure "
        "of `init_val` from step to step.",
    ),
    (
        lambda: filter_while_loop(
            lambda c: c[0] < 3,
            lambda c: (c[0] + 1, "b"),
            (0, "a"),  # type: ignore[arg-type]
        ),
        ValueError,
        "filter_while_loop: `body_fun` returned a carry that differs from `init_val` "
        "at path [1]: it changed from str 'a' to str 'b'.",
    ),
    (
        lambda: filter_fori_loop(0, 3, None, 0),  # type: ignore[arg-type]
        TypeError,
        "filter_fori_loop: `body_fun` must be callable; got NoneType None.",
    ),
    (
        lambda: filter_fori_loop(0, 3, lambda i, c: [c[0], "done"], [1, jnp.zeros(2)]),
        TypeError,
        "filter_fori_loop: `body_fun` returned a carry that differs from `init_val` "
        "at path [1]: it was an array of shape (2,) and dtype float32 and is now str "
        "'done'.",
    ),
    (
        lambda: filter_fori_loop(0, 3, lambda i, c: "b", "a"),
        ValueError,
        "filter_fori_loop: `body_fun` returned a carry that differs from `init_val` "
        "at the top level: it changed from str 'a' to str 'b'.",
    ),
    (
        lambda: jax.jit(lambda n: filter_fori_loop(0, n, _keep, 0.0, progress=True))(3),
        TypeError,
        "filter_fori_loop: `progress` needs concrete bounds, but `lower` or `upper` "
        "is traced. Pass static Python ints, or leave `progress` out.",
    ),
    (
        lambda: filter_map(None, jnp.ones(3)),  # type: ignore[arg-type]
        TypeError,
        "filter_map: `f` must be callable; got NoneType None.",
    ),
    (
        lambda: filter_map(_keep, jnp.ones(3), batch_size=2, progress=True),
        TypeError,
        "filter_map: `progress` cannot be combined with `batch_size`; drop one.",
    ),
    (
        _map_without_batch_size,
        TypeError,
        "filter_map: `batch_size` needs a JAX 0.4.31 or newer; this is jax ",
    ),
    (
        lambda: filter_map(_keep, {"mode": "eval"}),
        ValueError,
        "filter_map: `xs` holds no arrays to map over; give it one.",
    ),
    (
        lambda: filter_map(_keep, {"lr": jnp.float32(0.1)}),
        ValueError,
        "filter_map: the array at `xs` path ['lr'] is a scalar (shape ()), so it has "
        "no leading axis to map over.",
    ),
    (
        _map_retraced_with_new_labels,
        ValueError,
        "filter_map: the non-array part of `f`'s output differs between two traces "
        "of `f`: at path [1] it changed from str 'trace 1' to str 'trace 2'.",
    ),
    (
        functools.partial(_map_retraced_with_new_labels, lambda n: ["label"] * n),
        ValueError,
        "filter_map: the non-array part of `f`'s output differs between two traces "
        "of `f`: at path [1] it had length 1 and now has length 2. JAX may trace `f` "
        "more than once: return arrays for values that vary between traces.",
    ),
]

_FAMILY = [
    filter_scan,
    filter_cond,
    filter_switch,
    filter_while_loop,
    filter_fori_loop,
    filter_map,
]
_EXCEPTIONS = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "jax.errors.ConcretizationTypeError": _CONCRETE,
}


def _documented_errors() -> list[tuple[type[Exception], str]]:
    """The exception type and message opening that each `**Raises:**` quotes."""
    found = []
    for function in _FAMILY:
        doc = " ".join((function.__doc__ or "").split())  # Quotes may span lines.
        raises = doc.split("**Raises:**")[1].split("**Example:**")[0]
        for bullet in raises.split(" - `")[1:]:
            kind = _EXCEPTIONS[bullet.split("`")[0]]
            quotes = re.findall(r"``(.+?)``", bullet)
            found += [(kind, quote.strip()) for quote in quotes]
    return found


def _quoted(quote: str, kind: type[Exception], message: str) -> bool:
    """Whether `message` begins as `quote`, where `…` stands for any text (JAX puts
    its own text before ours in a `ConcretizationTypeError`)."""
    pattern = ".*?".join(re.escape(part) for part in quote.split("…"))
    if kind is _CONCRETE:
        return re.search(pattern, message) is not None
    return re.match(pattern, message) is not None


@pytest.mark.parametrize("index", range(len(_RAISES)))
def test_raises_sections_quote_the_messages_exactly(index):
    trigger, kind, text = _RAISES[index]
    with pytest.raises(kind) as info:
        trigger()
    message = str(info.value)
    if kind is _CONCRETE:
        assert text in message  # After JAX's own text.
    else:
        assert message.startswith(text)
    assert any(
        isinstance(info.value, documented) and _quoted(quote, documented, message)
        for documented, quote in _documented_errors()
    ), f"no `**Raises:**` section quotes {message!r}"


def test_every_quoted_message_is_raised_by_a_mistake():
    raised: list[tuple[type[BaseException], str]] = []
    for trigger, kind, text in _RAISES:
        try:
            trigger()
        except pytest.skip.Exception:  # This JAX cannot make the mistake.
            raised.append((kind, text))
        except Exception as err:
            raised.append((type(err), str(err)))
    documented = _documented_errors()
    assert len(documented) >= 40
    for kind, quote in documented:
        assert any(
            issubclass(raised_kind, kind) and _quoted(quote, kind, message)
            for raised_kind, message in raised
        ), f"no mistake raises the {kind.__name__} quoted as {quote!r}"


def test_a_second_failure_of_another_type_notes_the_first():
    def step(c, x):
        return ("s" if c.shape else "t", None)

    with pytest.raises(TypeError) as info:
        filter_scan(step, 0, None, length=2)
    assert "it was int 0 and is now str 't'" in str(info.value)
    assert (
        "filter_scan also ran with every number a Python value, which raised "
        "AttributeError: 'int' object has no attribute 'shape'"
    ) in info.value.__notes__


def test_a_failure_that_every_attempt_repeats_is_raised_without_notes():
    def step(c, x):
        raise ValueError("no step today")

    def body(c):
        return step(c, None)[0]

    calls = {
        "scan": lambda: filter_scan(step, (0, 1.5, True), None, length=2),
        "while": lambda: filter_while_loop(lambda c: True, body, (0, 1.5, True)),
    }
    for call in calls.values():
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == "no step today"
        notes = getattr(info.value, "__notes__", [])  # JAX may add one of its own.
        assert not [note for note in notes if "also ran" in note], notes


def test_when_every_attempt_fails_to_trace_laxs_own_error_is_raised():
    def step(c, x):  # Each attempt fails at another of these conversions.
        return c, (float(c[0]), int(c[1]), int(x))

    errors = []
    for scan in (filter_scan, jax.lax.scan):
        with pytest.raises(jax.errors.JAXTypeError) as info:
            scan(step, (1.5, True), jnp.ones(2))
        errors.append((type(info.value), str(info.value).splitlines()[0]))
    assert errors[0] == errors[1]


def test_an_error_that_says_more_than_a_tracing_error_is_raised():
    def step(c, x):  # With the int traced, this fails only for tracing it.
        raise ValueError(f"step {int(c[0])} says more")

    with pytest.raises(ValueError) as info:
        filter_scan(step, (0, True), None, length=2)
    assert str(info.value) == "step 0 says more"


def test_no_number_is_a_python_value_after_every_number_traced_fails_otherwise():
    def step(c, x):
        if c[0].shape is not None:  # Only a traced number has a shape.
            raise ValueError("not a tracing error")
        return c, x

    with pytest.raises(ValueError) as info:
        filter_scan(step, (0, True), None, length=2)
    assert str(info.value) == "not a tracing error"
    notes = getattr(info.value, "__notes__", [])
    assert [note for note in notes if "also ran" in note] == [
        "filter_scan also ran with bools traced and other numbers as Python values, "
        "which raised AttributeError: 'int' object has no attribute 'shape'"
    ]


#
# The rest of the family: filter_while_loop, filter_fori_loop, filter_switch,
# filter_map
#

FAMILY_MISTAKES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "while: cond_fun is not callable": lambda lax: lax["while_loop"](
        "c", lambda c: c, 0.0
    ),
    "while: body_fun is not callable": lambda lax: lax["while_loop"](
        lambda c: c < 1, None, 0.0
    ),
    "while: body changes the dtype": lambda lax: lax["while_loop"](
        lambda c: c < 1, lambda c: c.astype(jnp.int32), jnp.zeros(())
    ),
    "while: body changes the structure": lambda lax: lax["while_loop"](
        lambda c: c[0] < 1, lambda c: (c[0],), (jnp.zeros(()), jnp.zeros(()))
    ),
    "while: body returns a string": lambda lax: lax["while_loop"](
        lambda c: c < 1, lambda c: "done", 0.0
    ),
    "while: cond_fun returns a vector": lambda lax: lax["while_loop"](
        lambda c: c < 1, lambda c: c + 1, jnp.zeros(2)
    ),
    "while: cond_fun returns a float": lambda lax: lax["while_loop"](
        lambda c: c * 1.0, lambda c: c - 1, jnp.ones(())
    ),
    "fori: body_fun is not callable": lambda lax: lax["fori_loop"](0, 3, 3, 0.0),
    "fori: bounds of different types": lambda lax: lax["fori_loop"](
        jnp.int32(0), jnp.int16(3), lambda i, c: c, 0.0
    ),
    "fori: body changes the shape": lambda lax: lax["fori_loop"](
        0, 3, lambda i, c: jnp.ones(3), jnp.ones(2)
    ),
    "fori: unroll with traced bounds": lambda lax: jax.jit(
        lambda n: lax["fori_loop"](0, n, lambda i, c: c, 0.0, unroll=2)
    )(3),
    "switch: empty branches": lambda lax: lax["switch"](0, [], 1.0),
    "switch: a branch is not callable": lambda lax: lax["switch"](
        0, [jnp.sin, "cos"], 1.0
    ),
    "switch: vector index": lambda lax: lax["switch"](
        jnp.zeros(2, jnp.int32), [jnp.sin, jnp.cos], 1.0
    ),
    "switch: float index": lambda lax: lax["switch"](0.5, [jnp.sin, jnp.cos], 1.0),
    "switch: branch structures differ": lambda lax: lax["switch"](
        0, [lambda x: (x, x), lambda x: (x,)], 1.0
    ),
    "switch: branch dtypes differ": lambda lax: lax["switch"](
        0, [lambda x: x, lambda x: x.astype(jnp.int32)], jnp.ones(2)
    ),
    "switch: operand and positional operands": lambda lax: lax["switch"](
        0, [jnp.sin, jnp.cos], 1.0, operand=2.0
    ),
    "map: f is not callable": lambda lax: lax["map"]("f", jnp.ones(3)),
    "map: leading sizes differ": lambda lax: lax["map"](
        lambda x: x, (jnp.ones(3), jnp.ones(4))
    ),
    "map: a 0-d input": lambda lax: lax["map"](lambda x: x, jnp.ones(())),
    "map: no inputs": lambda lax: lax["map"](lambda x: x, None),
}

_LAX = {
    "while_loop": jax.lax.while_loop,
    "fori_loop": jax.lax.fori_loop,
    "switch": jax.lax.switch,
    "map": jax.lax.map,
}
_OURS = {
    "while_loop": filter_while_loop,
    "fori_loop": filter_fori_loop,
    "switch": filter_switch,
    "map": filter_map,
}


@pytest.mark.parametrize("mistake", FAMILY_MISTAKES)
def test_the_family_raises_what_lax_raises(mistake):
    make = FAMILY_MISTAKES[mistake]
    ours = _error_type(lambda: make(_OURS))
    assert issubclass(ours, _error_type(lambda: make(_LAX)))
    assert issubclass(ours, TypeError | ValueError)


FAMILY_CALLS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "while: a Python counter": lambda lax: lax["while_loop"](
        lambda c: c < 10, lambda c: c + 1, 0
    ),
    "while: a counter and an array": lambda lax: lax["while_loop"](
        lambda c: c[0] < 5, lambda c: (c[0] + 1, c[1] * 2.0), (0, jnp.ones(2))
    ),
    "while: shape of a number carry": lambda lax: lax["while_loop"](
        lambda c: c < 3.0, lambda c: c + jnp.ones(c.shape), 0.0
    ),
    "fori: Python bounds": lambda lax: lax["fori_loop"](0, 5, lambda i, c: c + i, 0.0),
    "fori: NumPy bounds": lambda lax: lax["fori_loop"](
        np.int32(1), np.int32(4), lambda i, c: c * i, 1
    ),
    "fori: float bounds": lambda lax: lax["fori_loop"](
        0.0, 3.0, lambda i, c: c + 1, 0.0
    ),
    "fori: empty range": lambda lax: lax["fori_loop"](3, 1, lambda i, c: c + i, 2.5),
    "fori: unroll": lambda lax: lax["fori_loop"](
        0, 6, lambda i, c: c + i, jnp.zeros(()), unroll=3
    ),
    "switch: operand keyword": lambda lax: lax["switch"](
        1, [jnp.sin, jnp.cos], operand=1.0
    ),
    "switch: index below range": lambda lax: lax["switch"](
        -4, [lambda: 1.0, lambda: 2.0]
    ),
    "switch: index above range": lambda lax: lax["switch"](
        jnp.int32(9), [lambda x: x, lambda x: -x], jnp.ones(2)
    ),
    "switch: one branch": lambda lax: lax["switch"](0, [lambda x: x * 2], 3.0),
    "switch: a tuple of branches": lambda lax: lax["switch"](
        1, (jnp.sin, jnp.cos), jnp.ones(2)
    ),
    "switch: a number and an array": lambda lax: lax["switch"](
        1, [lambda x: 2.0, lambda x: x * 2], jnp.float32(3.0)
    ),
    "map: a tuple of inputs": lambda lax: lax["map"](
        lambda xy: xy[0] * xy[1], (jnp.arange(3.0), jnp.ones(3))
    ),
    "map: Python numbers out": lambda lax: lax["map"](
        lambda x: (x, 1, 2.5), jnp.arange(3.0)
    ),
    "map: NumPy inputs": lambda lax: lax["map"](lambda x: x + 1, np.arange(4)),
}


@pytest.mark.parametrize("call", FAMILY_CALLS)
@pytest.mark.parametrize("jit", [False, True])
def test_the_family_accepts_every_call_lax_accepts(call, jit):
    make = FAMILY_CALLS[call]
    if jit:
        expected, actual = jax.jit(lambda: make(_LAX))(), jax.jit(lambda: make(_OURS))()
    else:
        expected, actual = make(_LAX), make(_OURS)
    _assert_same(actual, expected)


def test_runtime_errors_are_not_retried():
    calls = []

    def fail_on_the_third(x):
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return np.asarray(x)

    def step(c, x):
        shape = jax.ShapeDtypeStruct((), jnp.float32)
        return (io_callback(fail_on_the_third, shape, c[0] + x), c[1]), None

    with pytest.raises(RuntimeError):
        filter_scan(step, (jnp.float32(0), 7), jnp.arange(5.0))
    assert len(calls) == 3


class _Layers(eqx.Module):
    count: int

    def __call__(self, x):
        for _ in range(self.count):
            x = x + jnp.ones(3)  # A shape bug: `x` has 2 entries.
        return x


def test_the_real_error_is_raised_when_a_traced_retry_only_complains_of_tracing():
    with pytest.raises(TypeError, match="add got incompatible shapes"):
        filter_scan(lambda c, x: (c, c(x)), _Layers(2), jnp.ones((3, 2)))


def test_filter_while_loop_cond_fun_sees_the_whole_carry():
    def below_limit(carry):
        count, limit, label = carry
        assert label == "counter"  # The static leaves reach `cond_fun` too.
        return count < limit

    def count_up(carry):
        count, limit, label = carry
        return count + 1, limit, label

    count, limit, label = filter_while_loop(
        below_limit, count_up, (jnp.int32(0), 5, "counter")
    )
    expected = jax.lax.while_loop(
        lambda c: c[0] < c[1], lambda c: (c[0] + 1, c[1]), (jnp.int32(0), 5)
    )
    _assert_same(count, expected[0])
    assert (limit, label) == (5, "counter") and type(limit) is int


def test_filter_map_static_outputs_must_agree_between_traces():
    if "batch_size" not in inspect.signature(jax.lax.map).parameters:
        pytest.skip("this JAX's lax.map has no batch_size, which traces f twice")
    traces: list[None] = []

    def f(x):
        traces.append(None)
        return x * 2, f"trace {len(traces)}"

    with pytest.raises(ValueError, match="differs between two traces of `f`"):
        filter_map(f, jnp.arange(5.0), batch_size=2)
    assert len(traces) == 2


def test_loops_give_back_numbers_they_pass_through_as_python_values():
    count, flag, rate = filter_while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1], c[2]), (jnp.int32(0), True, 2.5)
    )
    assert flag is True and type(rate) is float and rate == 2.5
    _assert_same(count, jnp.int32(3))
    total, flag = filter_fori_loop(0, 3, lambda i, c: (c[0] + i, c[1]), (0, False))
    assert flag is False
    _assert_same(total, jax.lax.fori_loop(0, 3, lambda i, c: c + i, 0))


def test_python_float_typed_by_jax_in_a_custom_vjp() -> None:
    # A `jax.custom_vjp` forward function may get a Python float as JAX's own typed
    # float (a `float` subclass), which `jax.lax.scan` traces as an array.
    def make(scan: Any) -> Any:
        def loop(c: Any) -> Any:
            return scan(lambda c, x: (c * 1.01 + x, c), c, jnp.ones(3))[0]

        @jax.custom_vjp
        def wrapped(c: Any) -> Any:
            return loop(c)

        wrapped.defvjp(lambda c: (loop(c), None), lambda _, g: (g,))
        return wrapped

    assert jax.grad(make(filter_scan))(1.0) == jax.grad(make(jax.lax.scan))(1.0)
    assert make(filter_scan)(1.0) == make(jax.lax.scan)(1.0)


#
# Behaviour pinned by example (the property tests are in test_lerax_utils.py)
#


def _double(x: Any) -> Any:
    return 2 * x


class _Policy(eqx.Module):
    params: Any
    activation: Callable[..., Any]
    name: str = eqx.field(static=True)


def _program(fun: Callable[..., Any], *args: Any) -> str:
    # Older JAX prints the addresses of memoised thunks; they are not the program.
    return re.sub(r" at 0x[0-9a-f]+", "", str(jax.make_jaxpr(fun)(*args)))


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
        "in the carry may change: make it an array in `init` with `jnp.asarray`, or "
        "keep it out of the carry (close over it in `f`, or pass it in `xs`)."
    )


def test_a_carry_node_whose_own_data_changes_is_named_by_its_tree_structure():
    def swap(carry, _):  # The same node type, with another function in its aux data.
        return (carry[0] + 1, jax.tree_util.Partial(jnp.cos, *carry[1].args)), None

    init = (0.0, jax.tree_util.Partial(jnp.sin, jnp.ones(2)))
    with pytest.raises(TypeError) as info:  # As `jax.lax.scan` raises.
        filter_scan(swap, init, length=2)
    message = str(info.value)
    assert message.startswith(
        "filter_scan: `f` returned a carry that differs from `init` at path [1]: it "
        "changed structure from PyTreeDef(CustomNode(Partial["
    )
    assert re.search("sin at .*to PyTreeDef.*cos at", message)
    assert "Keep the structure of `init` from step to step." in message


class _EqRaises:
    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no comparison")


class _EqArray:
    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> Any:
        return np.array([True, True])


@pytest.mark.parametrize("static", [_EqRaises, _EqArray])
def test_a_new_static_carry_leaf_that_cannot_be_compared_has_changed(static):
    def remake(carry, _):
        return (carry[0] + 1, static()), None

    with pytest.raises(ValueError) as info:
        filter_scan(remake, (0.0, static()), length=2)
    message = str(info.value)
    assert message.startswith(
        "filter_scan: `f` returned a carry that differs from `init` at path [1]: it "
        f"changed from {static.__name__} <"
    )
    assert f"> to {static.__name__} <" in message and "Only arrays" in message


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
        "an array or number of the shape and dtype in `init`."
    )
    with pytest.raises(TypeError) as info:
        filter_scan(lambda c, x: ("done", None), 0, length=2)  # type: ignore[arg-type]
    assert str(info.value).startswith(
        "filter_scan: `f` returned a carry that differs from `init` at the top level: "
        "it was int 0 and is now str 'done'. Return an array or number of the shape"
    )


def test_filter_scan_array_carry_leaf_may_come_back_as_python_number():
    init = {"x": jnp.float32(3.0), "label": "a"}
    expected = jax.lax.scan(lambda c, _: (0.5, None), init["x"], None, length=2)[0]
    (final, _) = filter_scan(lambda c, _: ({**c, "x": 0.5}, None), init, length=2)
    assert_identical(final, {"x": expected, "label": "a"}, weak_types=True)


def test_filter_scan_changed_static_field_names_the_field():
    policy = _Policy(jnp.ones(2), jax.nn.relu, "actor")

    def retitle(carry, _):
        p = carry["policy"]
        return {"policy": _Policy(p.params, p.activation, "critic")}, None

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
        "it had keys ['a'] and now has ['a', 'b']. Keep the structure of `init` from "
        "step to step.\n\njax.lax.scan says: "
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
        "'trace 2'. JAX may trace `f` more than once: return arrays for values that "
        "vary between traces."
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
    xs = {"obs": jnp.ones((3, 2)), "actions": [jnp.ones(4), "static"], "k": 1.0}
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
    assert str(info.value).startswith(
        "filter_scan: cannot tell how many steps to run, because `xs` holds no "
        "arrays. Pass `length=`.\n\njax.lax.scan says: "
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
        # `int()` raises OverflowError on infinity and ValueError on NaN.
        (
            -math.inf,
            TypeError,
            _NOT_WHOLE + "integer or a 0-d integer array); got float -inf.",
        ),
        (
            math.nan,
            TypeError,
            _NOT_WHOLE + "integer or a 0-d integer array); got float nan.",
        ),
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
    assert str(info.value).startswith(
        "filter_scan: `f` must be callable; got str 'step'.\n\njax.lax.scan says: "
    )
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
        "Every branch must return the same structure, with arrays where values "
        "differ."
    )


def test_filter_cond_branch_returning_array_for_a_string_is_a_type_error():
    with pytest.raises(TypeError) as info:
        filter_cond(True, lambda x: (x, "a"), lambda x: (x, jnp.int32(0)), jnp.ones(()))
    assert str(info.value).startswith(
        "filter_cond: the branches' outputs disagree at path [1]: compared with "
        "`true_fun`'s output, `false_fun`'s was str 'a' and is now an array of "
        "shape () and dtype int32."
    )


def test_filter_cond_bad_arguments_are_errors():
    with pytest.raises(TypeError) as info:
        filter_cond(True, "left", jnp.cos, 1.0)  # type: ignore[arg-type]
    assert str(info.value).startswith(
        "filter_cond: `true_fun` must be callable; got str 'left'.\n\n"
        "jax.lax.cond says: "
    )
    with pytest.raises(TypeError) as info:
        filter_cond(jnp.array([True, False]), jnp.sin, jnp.cos, 1.0)
    assert str(info.value) == (
        "filter_cond: `pred` must be a scalar; got an array of shape (2,). Reduce it "
        "with `jnp.any` or `jnp.all`."
    )


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


@pytest.mark.parametrize("number", [-6, -5, 0, 256, 257])
@pytest.mark.parametrize("loop", ["scan", "fori_loop"])
def test_a_remade_int_is_promoted_alike_whether_or_not_python_shares_it(loop, number):
    """CPython shares the ints from -5 to 256, so `k * 1` may be the very object
    that came in. Either way it is a new value, promoted like an unshared one."""

    def body(c):
        a, b, k = c
        b = b if isinstance(a, float) else b + 1.0  # Changes once `a` is traced.
        return a + 1.0, b, k * 1

    def run(k):
        if loop == "scan":
            return filter_scan(lambda c, _: (body(c), None), (0.0, 0.0, k), length=3)[0]
        return filter_fori_loop(0, 3, lambda i, c: body(c), (0.0, 0.0, k))

    unshared = run(10**6)
    assert [type(x) for x in unshared] == [type(jnp.zeros(()))] * 3
    out = run(number)
    assert [type(x) for x in out] == [type(x) for x in unshared]
    assert_identical(out[2], jnp.asarray(number))
    assert_identical(out[:2], unshared[:2])


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


def test_filter_switch_gradients_and_numbers_match_lax_switch():
    def loss(x, switch):
        return switch(1, [lambda x: x * 2.0, lambda x: jnp.sin(x), lambda _: 3.0], x)

    assert_identical(
        jax.value_and_grad(loss)(0.3, filter_switch),
        jax.value_and_grad(loss)(0.3, jax.lax.switch),
    )
    same = filter_switch(jnp.asarray(2), [lambda: (1, "a"), lambda: (1, "a")])
    number = jax.lax.switch(jnp.asarray(2), [lambda: 1, lambda: 1])
    assert_identical(same, (number, "a"), weak_types=True)
    with pytest.raises(ValueError, match=r"compared with `branches\[0\]`'s output, "):
        filter_switch(0, [lambda: "a", lambda: "b"])


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
# Eager calls: the compile cache, bounded retracing, and jax.lax's messages
#

_compiles: list[str] = []
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _on_event(event: str, duration_secs: float, **kwargs: str | int) -> None:
    if event == _COMPILE_EVENT:
        _compiles.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _compiled_by(run: Callable[[], Any]) -> int:
    before = len(_compiles)
    jax.block_until_ready(run())
    return len(_compiles) - before


@pytest.fixture
def uncached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lerax_utils, "_CACHE_SIZE", 0)


def _same(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert type(x) is type(y)
        if eqx.is_array(x):
            assert (x.shape, x.dtype) == (y.shape, y.dtype)
            assert getattr(x, "weak_type", False) == getattr(y, "weak_type", False)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x == y or (x != x and y != y)


class _MLPPolicy(eqx.Module):
    mlp: eqx.nn.MLP
    name: str = eqx.field(static=True)


_POLICY = _MLPPolicy(eqx.nn.MLP(3, 3, 8, 2, key=jax.random.key(0)), "policy")


def _scan_step(carry: Any, x: Any) -> Any:
    policy, h, steps, label = carry
    h = jnp.tanh(policy.mlp(h) + x)
    return (policy, h, steps + 1, label), (h.sum(), label, 2.5)


def _while_cond(carry: Any) -> Any:
    return carry[0] < 10


def _while_body(carry: Any) -> Any:
    h, steps, label = carry
    return h * 1.5 + 1, steps + 1, label


def _fori_body(i: Any, carry: Any) -> Any:
    h, fixed, label = carry
    return h + i * fixed, fixed, label


def _first(x: Any, label: Any) -> Any:
    return x + 1, label, jnp.asarray(3)  # A number comes back as an array.


def _second(x: Any, label: Any) -> Any:
    return x * 2, label, jnp.asarray(3)  # A number comes back as an array.


def _third(x: Any, label: Any) -> Any:
    return -x, label, jnp.asarray(3)  # A number comes back as an array.


def _mapped(x: Any) -> Any:
    return {"n": jnp.sum(x["obs"] ** 2), "unit": x["unit"]}


# Each of the six functions, called eagerly on inputs built from `k`.
_CALLS: dict[str, Callable[[float], Any]] = {
    "scan": lambda k: filter_scan(
        _scan_step, (_POLICY, jnp.full(3, k), 0, "a"), jnp.ones((6, 3)) * k
    ),
    "scan with a bar": lambda k: filter_scan(
        _scan_step, (_POLICY, jnp.full(3, k), 0, "a"), jnp.ones((6, 3)), progress=True
    ),
    "cond": lambda k: filter_cond(k > 1, _first, _second, jnp.full(2, k), "b"),
    "switch": lambda k: filter_switch(
        int(k) % 3, [_first, _second, _third], jnp.full(2, k), "c"
    ),
    "while": lambda k: filter_while_loop(
        _while_cond, _while_body, (jnp.asarray(k), 0, "d")
    ),
    "while with a bar": lambda k: filter_while_loop(
        _while_cond, _while_body, (jnp.asarray(k), 0, "d"), progress=True
    ),
    "fori": lambda k: filter_fori_loop(0, 4, _fori_body, (jnp.asarray(k), 2.0, "e")),
    "fori with a bar": lambda k: filter_fori_loop(
        0, 4, _fori_body, (jnp.asarray(k), 2.0, "e"), progress="f"
    ),
    "map": lambda k: filter_map(_mapped, {"obs": jnp.ones((4, 2)) * k, "unit": "m"}),
    "map with a bar": lambda k: filter_map(
        _mapped, {"obs": jnp.ones((4, 2)) * k, "unit": "m"}, progress=True
    ),
}


@pytest.mark.parametrize("name", list(_CALLS))
def test_repeated_eager_calls_give_the_uncached_results_and_compile_once(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    call = _CALLS[name]
    expected = []
    with monkeypatch.context() as patch:
        patch.setattr(lerax_utils, "_CACHE_SIZE", 0)
        for k in (1.0, 2.0, 3.0):
            expected.append(call(k))
    call(0.5)  # Compiled here, if not already.
    for k, want in zip((1.0, 2.0, 3.0), expected, strict=True):
        assert _compiled_by(lambda k=k: call(k)) == 0
        _same(call(k), want)


def test_a_cached_call_prepares_its_selector_op_by_op() -> None:
    x = jnp.arange(2.0)
    for branches in ([_first, _second, _third], [_third, _first, _second]):
        for index in (jnp.int8(-4), jnp.int8(1), jnp.int8(9), jnp.int8(-4)):
            want = branches[min(max(int(index), 0), 2)](x, "s")
            _same(filter_switch(index, branches, x, "s"), want)
    for pred in (jnp.float32(0.5), jnp.float32(0.0), jnp.float32(-0.0)):
        want = (_first if pred else _second)(x, "c")
        _same(filter_cond(pred, _first, _second, x, "c"), want)
    # Each call's preparation runs op by op, outside its compiled program.
    entries = [entry for entry, _ in list(lerax_utils._PROGRAMS.entries.values())[-3:]]
    names = [[e.primitive.name for e in p.args[0].eqns] for _, p, *_ in entries]
    switch, cond = ["convert_element_type", "clamp"], ["ne", "convert_element_type"]
    assert names == [switch, switch, cond]


@given(
    selector=st.one_of(
        st.integers(-(2**31) - 2, -(2**31) + 2),
        st.integers(-3, 4),
        st.integers(2**31 - 2, 2**31 + 1),
        st.sampled_from([2**40, 2**70, -(2**63), True, False, 0.0, 0.5, math.nan]),
    )
)
def test_a_python_selector_picks_the_branch_jax_lax_picks(selector: Any) -> None:
    # Cached calls send a host `pred` or an int `index` with the call's arrays.
    def outcome(function: Callable[..., Any], *call: Any) -> Any:
        try:
            return function(selector, *call)
        except Exception as error:
            return type(error)

    x, branches = jnp.arange(2.0), [lambda x: x + 1, lambda x: x * 3, lambda x: -x]
    for ours, lax, *call in (
        (filter_switch, jax.lax.switch, branches, x),
        (filter_cond, jax.lax.cond, *branches[:2], x),
    ):
        want = outcome(lax, *call)
        for _ in range(2):  # A first and a cached call.
            got = outcome(ours, *call)
            if isinstance(want, type):
                assert got is want
            else:
                assert_identical(got, want, weak_types=True)


@pytest.mark.parametrize(
    "pred",
    [1e-45, 5e-324, np.float32(1e-45), np.float64(1e-300), np.array(1e-45, "f4")],
)
def test_a_host_pred_is_compared_on_the_host_as_lax_compares_it(pred: Any) -> None:
    # Nonzero to NumPy and Python, but zero to XLA, which flushes subnormals.
    x, grow, double = jnp.arange(3.0), (lambda x: x + 1), (lambda x: x * 2)
    want = jax.lax.cond(pred, grow, double, x)
    for _ in range(2):  # Compiled, then from the cache.
        _same(filter_cond(pred, grow, double, x), want)


def test_preludes_that_print_alike_but_compute_differently_are_not_shared() -> None:
    # A one-branch switch runs its branch at the top level, so the branch's own
    # `clamp` and `convert_element_type` on scalars land in the prelude. Its printed
    # text shows neither a literal's weak type nor a NaN's payload.
    x = jnp.asarray(0.5)  # Weakly typed.
    weak = lambda v: jax.lax.clamp(0.0, v, 1.0)  # noqa: E731
    strong = lambda v: jax.lax.clamp(np.float32(0.0), v, np.float32(1.0))  # noqa: E731
    for branch in (weak, strong, weak):
        _same(filter_switch(0, [branch], x), jax.lax.switch(0, [branch], x))
    nans = [
        np.array(bits, np.uint32).view(np.float32)[()]
        for bits in (0x7FC00001, 0x7FE00000)
    ]
    for nan in nans:
        branch = lambda v, nan=nan: jax.lax.clamp(nan, v, np.float32(2.0))  # noqa: E731
        got, want = filter_switch(0, [branch], x), jax.lax.switch(0, [branch], x)
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


_PRELUDE_UNDER_MESHES = """
import json, jax, jax.numpy as jnp, lerax_utils
from jax.sharding import AxisType
f, g = (lambda x: x + 1), (lambda x: x * 3)
two = jax.devices()[:2]
mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Explicit,), devices=two)
with jax.set_mesh(mesh):
    inside = lerax_utils.filter_cond(jnp.float32(2), f, g, jnp.arange(2.0)).tolist()
outside = lerax_utils.filter_cond(jnp.float32(2), f, g, jnp.arange(3.0)).tolist()
d0, d1 = jax.devices()[:2]
put = [lambda v, d=d: v.astype(jnp.float16, device=d) for d in (d0, d1)]
placed = [lerax_utils.filter_switch(0, [h], jnp.float32(1.5)).devices() for h in put]
placed = [str(devices) for devices in placed]
print(json.dumps([inside, outside, placed]))
"""


@pytest.mark.skipif(not hasattr(jax, "set_mesh"), reason="this JAX has no set_mesh")
def test_a_prelude_runs_only_in_the_context_it_was_traced_in() -> None:
    # Equations keep the mesh they were traced under (`eqn.ctx`), and a sharding
    # parameter that the printed text leaves out: neither may reach another call.
    inside, outside, placed = run_on_four_devices(_PRELUDE_UNDER_MESHES)
    assert inside == [1.0, 2.0] and outside == [1.0, 2.0, 3.0]
    assert placed == ["{CpuDevice(id=0)}", "{CpuDevice(id=1)}"]


def test_static_leaves_python_numbers_and_shapes_are_part_of_the_key() -> None:
    def step(carry: Any, x: Any) -> Any:
        h, scale, label = carry
        return (h * scale + x, scale, label), label

    for scale, label, n in [(2.0, "a", 3), (3.0, "a", 3), (2.0, "b", 3), (2.0, "a", 4)]:
        carry, ys = filter_scan(step, (jnp.zeros(n), scale, label), jnp.ones((2, n)))
        h = jnp.zeros(n)
        for _ in range(2):
            h = h * scale + 1
        np.testing.assert_array_equal(carry[0], h)
        assert carry[1:] == (scale, label) and type(carry[1]) is float
        assert ys == label
    # 0.0 and -0.0 are different Python numbers.
    for zero in (0.0, -0.0, 0.0):
        _, y = filter_scan(lambda c, x: (c, math.copysign(1.0, c)), zero, None, 1)
        assert np.asarray(y).tolist() == [math.copysign(1.0, zero)]


def test_static_leaves_that_take_no_weak_reference_are_cached_by_value() -> None:
    traces: list[Any] = []

    def step(carry: Any, x: Any) -> Any:
        traces.append(carry[1])
        return (carry[0] + x, carry[1]), None

    for static in (range(3), range(3), frozenset({1}), frozenset({1}), range(3)):
        filter_scan(step, (jnp.float32(0), static), jnp.ones(2))
    assert traces == [range(3), frozenset({1})]


def test_counter_in_the_carry_stays_promoted_without_retracing() -> None:
    traces: list[None] = []

    def step(carry: Any, x: Any) -> Any:
        traces.append(None)
        h, steps, fixed = carry
        return (h + x, steps + 1, fixed), steps * fixed

    for start in (0, 0, 0, 5):
        (h, steps, fixed), ys = filter_scan(step, (0.0, start, 7), jnp.ones(3))
        assert int(steps) == start + 3 and isinstance(steps, jax.Array)
        assert fixed == 7 and type(fixed) is int  # Passed through: a Python number.
        np.testing.assert_array_equal(ys, [7 * (start + i) for i in range(3)])
    assert len(traces) == 4  # Two for the first call, none for the next, two more.


def _cached_refs() -> list[Any]:
    """What the keys of the compiled programs kept refer to, weakly or not."""
    return [
        part() if isinstance(part, weakref.ref) else part
        for key in list(lerax_utils._PROGRAMS.entries)
        for part in key
    ]


class _Unhashable:
    __hash__ = None  # pyright: ignore[reportAssignmentType]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Unhashable)


@pytest.mark.parametrize("static", [_Unhashable, _EqRaises, _EqArray])
def test_static_leaves_that_cannot_be_compared_run_uncached(static: type) -> None:
    tag = static()

    def step(carry: Any, x: Any) -> Any:
        h, t = carry
        return (h + x, t), h

    for _ in range(2):
        (h, t), ys = filter_scan(step, (jnp.zeros(()), tag), jnp.arange(3.0))
        assert t is tag and float(h) == 3.0
        np.testing.assert_array_equal(ys, [0.0, 0.0, 1.0])
    assert not any(part is tag for part in _cached_refs())


def test_a_cache_entry_never_outlives_its_functions() -> None:
    weights = jnp.arange(1000.0)

    def make() -> Callable[..., Any]:
        return lambda c, x: (c + weights[:3] * x, None)

    step = make()
    alive = weakref.ref(step)
    filter_scan(step, jnp.zeros(3), jnp.ones(2))
    assert any(part is step for part in _cached_refs())
    del step
    gc.collect()
    assert alive() is None
    assert not any(part is None for part in _cached_refs())  # None whose function died.


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lerax_utils, "_CACHE_SIZE", 5)

    def step(c: Any, x: Any) -> Any:
        return c + x, None

    for n in range(1, 12):
        carry, _ = filter_scan(step, 0.0, jnp.ones(n))
        assert float(carry) == n
    assert len(lerax_utils._PROGRAMS.entries) <= 5


def test_the_cache_drops_the_least_recently_used_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lerax_utils, "_CACHE_SIZE", 3)
    traces: list[int] = []

    def step(c: Any, x: Any) -> Any:
        traces.append(x.shape[0] if x.ndim else 0)
        return c + x, None

    def run(n: int) -> list[int]:
        traces.clear()
        carry, _ = filter_scan(step, jnp.zeros(n), jnp.ones((2, n)))
        np.testing.assert_array_equal(carry, np.full(n, 2.0))
        return list(traces)

    for n in (1, 2, 3):
        assert run(n)  # Traced: each is new.
    assert run(1) == []  # Cached, and now the most recently used.
    assert run(4)  # New: it drops the least recently used, n=2.
    assert run(1) == []
    assert run(3) == []
    assert run(2)


def test_bound_methods_and_module_parameters_are_read_on_every_call() -> None:
    class Agent:
        def __init__(self, gain: float):
            self.gain = gain

        def step(self, c: Any, x: Any) -> Any:
            return c * self.gain + x, None

    agent = Agent(2.0)
    for _ in range(2):
        assert float(filter_scan(agent.step, 1.0, jnp.ones(2))[0]) == 7.0
    # An Equinox module's arrays are traced: new parameters need no new program.
    mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(1))
    arrays, rest = eqx.partition(mlp, eqx.is_array)
    for scale in (1.0, 2.0, 3.0):
        model = eqx.combine(jax.tree.map(lambda w, s=scale: w * s, arrays), rest)
        expected = jax.lax.scan(
            lambda c, x, m=model: (m(c), None), jnp.ones(2), None, 3
        )
        step = eqx.Partial(_apply, model)
        run = functools.partial(filter_scan, step, jnp.ones(2), None, 3)
        if scale > 1:
            assert _compiled_by(run) == 0
        _same(run(), expected)


def _apply(model: Any, c: Any, x: Any) -> Any:
    return model(c), None


class _ReadsItsArray(eqx.Module):
    """A step that needs its array's value: as `jax.lax` runs it, the array is one."""

    w: jax.Array
    read: Callable[[jax.Array], Any] = eqx.field(static=True)

    def __call__(self, c: Any, x: Any = None) -> Any:
        return c + self.read(self.w), x


@pytest.mark.parametrize(
    "read",
    [
        lambda w: float(w),  # ConcretizationTypeError, were `w` traced.
        lambda w: [1.0, 2.0, 3.0][w],  # TracerIntegerConversionError.
        lambda w: float(np.asarray(w)),  # TracerArrayConversionError.
        lambda w: 1.0 if w else 2.0,  # TracerBoolConversionError.
    ],
    ids=["float", "int", "numpy", "bool"],
)
def test_a_step_that_reads_its_arrays_as_values_runs_as_under_lax(read: Any) -> None:
    step = _ReadsItsArray(jnp.array(2), read)
    closure = lambda *args: step(*args)  # noqa: E731 (`jax.lax` hashes its functions)
    for _ in range(2):  # The second call would be the cached one.
        expected = jax.lax.scan(closure, 0.0, None, 3)
        _same(filter_scan(step, 0.0, None, length=3), expected)
        _same(
            filter_cond(True, step, step, 0.5), jax.lax.cond(True, *[closure] * 2, 0.5)
        )


@pytest.mark.parametrize("new_function", [False, True])
def test_closures_see_what_they_see_under_lax(new_function: bool) -> None:
    box = {"gain": 2.0, "weights": jnp.ones(2)}

    def make() -> tuple[Callable[..., Any], Callable[..., Any]]:
        def step(c: Any, x: Any) -> Any:
            return c * box["gain"] + box["weights"] * x, None

        def branch(c: Any) -> Any:
            return c * box["gain"] + box["weights"]

        return step, branch

    step, branch = make()
    for gain in (2.0, 3.0, 4.0):
        box["gain"], box["weights"] = gain, jnp.full(2, gain)
        if new_function:
            step, branch = make()
        ours = filter_scan(step, jnp.ones(2), jnp.ones(2))
        _same(ours, jax.lax.scan(step, jnp.ones(2), jnp.ones(2)))
        ours = filter_cond(True, branch, jnp.negative, jnp.ones(2))
        _same(ours, jax.lax.cond(True, branch, jnp.negative, jnp.ones(2)))


def test_four_threads_at_once_get_their_own_results() -> None:
    def step(carry: Any, x: Any) -> Any:
        h, label = carry
        return (h * 0.5 + x, label), h.sum()

    def reference(k: int) -> Any:
        return jax.lax.scan(
            lambda h, x: (h * 0.5 + x, h.sum()), jnp.full(3, k), jnp.ones((5, 3)) * k
        )

    expected = {k: reference(k) for k in range(8)}
    failures: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(20):
                (h, label), ys = filter_scan(
                    step, (jnp.full(3, k), f"t{k % 2}"), jnp.ones((5, 3)) * k
                )
                assert label == f"t{k % 2}"
                _same((h, ys), expected[k])
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures


_TRANSFORMED: dict[str, Callable[[jax.Array], Any]] = {
    "jit": jax.jit(
        lambda x: filter_scan(_scan_step, (_POLICY, x, 0, "a"), jnp.ones((4, 3)))[0][
            1:3
        ]
    ),
    "vmap": jax.vmap(lambda x: filter_cond(x > 0, _first, _second, x, "b")[0]),
    "grad": jax.grad(
        lambda x: filter_fori_loop(0, 3, _fori_body, (x, 2.0, "e"))[0].sum()
    ),
}


@pytest.mark.parametrize("name", list(_TRANSFORMED))
def test_under_transformations_the_program_is_unchanged(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _TRANSFORMED[name]
    x = jnp.ones(3)
    run(x)  # Fills the caches.
    cached = str(jax.make_jaxpr(run)(x))
    with monkeypatch.context() as patch:
        patch.setattr(lerax_utils, "_CACHE_SIZE", 0)
        uncached = str(jax.make_jaxpr(run)(x))
    assert cached == uncached


def test_errors_are_unchanged_and_never_cached() -> None:
    def step(carry: Any, x: Any) -> Any:
        return (carry, "changed"), None

    for _ in range(2):
        with pytest.raises(TypeError, match="differs from `init`"):
            filter_scan(step, 0.0, jnp.ones(2))
    ok = filter_scan(lambda c, x: (c + x, None), 0.0, jnp.ones(2))
    assert float(ok[0]) == 2.0


def test_ten_eager_conds_compile_at_most_four_programs() -> None:
    def f(x: Any) -> Any:
        return x + 1

    def g(x: Any) -> Any:
        return x + 2

    # JAX's `test_cond_excessive_compilation`: Python ints, then arrays.
    for operands in (list(range(10)), [jnp.asarray(x) for x in range(10)]):
        compiled = sum(
            _compiled_by(lambda x=x, y=y: filter_cond(x, f, g, y))
            for x, y in enumerate(operands)
        )
        assert compiled <= 4


_LAX_MISTAKES = {  # JAX's own tests make these mistakes; `lib` is `jax.lax`, or ours.
    "scan, f": lambda lib: lib.scan(42, 0.0, None, length=1),
    "cond, branches": lambda lib: lib.cond(True, 42, 42),
    "switch, branches": lambda lib: lib.switch(0, [42]),
    "switch, none": lambda lib: lib.switch(0, []),
    "while_loop, functions": lambda lib: lib.while_loop(42, 42, 0),
    "fori_loop, body": lambda lib: lib.fori_loop(0, 1, 42, 0),
    "map, f": lambda lib: lib.map(42, jnp.arange(3)),
    "scan, xs of ints": lambda lib: lib.scan(lambda c, x: (c, x), 0, [0, 1, 2]),
    "map, xs of ints": lambda lib: lib.map(lambda x: x, [1, 2, 3]),
    "scan, carry": lambda lib: lib.scan(_shrink_step, (0.0, 0.0), None, length=1),
    "while_loop, carry": lambda lib: lib.while_loop(bool, _shrink_state, (0.0, 0.0)),
    "fori_loop, carry": lambda lib: lib.fori_loop(0, 1, _shrink_loop, (0.0, 0.0)),
}


def _shrink_state(state: Any) -> Any:  # lax's message names `state`.
    return (state[0],)


def _shrink_step(state: Any, x: Any) -> Any:
    return _shrink_state(state), x


def _shrink_loop(i: Any, state: Any) -> Any:
    return _shrink_state(state)


@pytest.mark.parametrize("mistake", _LAX_MISTAKES)
def test_lax_message_for_a_mistake_is_part_of_ours(mistake: str) -> None:
    function = f"filter_{mistake.split(',')[0]}"
    ours = types.SimpleNamespace(**{function[7:]: getattr(lerax_utils, function)})
    with pytest.raises(Exception) as lax_error:
        _LAX_MISTAKES[mistake](jax.lax)
    with pytest.raises(lax_error.type) as our_error:
        _LAX_MISTAKES[mistake](ours)
    assert str(our_error.value).startswith(f"{function}: ")
    assert str(lax_error.value) in str(our_error.value)


@given(
    number=st.sampled_from([True, 0, -3, 2**31 - 1, 2**40, 0.1, -0.0, math.nan, 1j]),
    jitted=st.booleans(),
)
def test_operand_numbers_are_traced_as_jax_lax_traces_them(
    number: Any, jitted: bool
) -> None:
    # JAX's `test_cond_casting`: a number returned unchanged is lax's array too.
    def outcome(function: Any, selector: Any, branches: Any) -> Any:
        try:
            if jitted:
                return jax.jit(lambda s: function(s, *branches, number))(selector)
            return function(selector, *branches, number)
        except Exception as error:
            return type(error)

    identity, twice = (lambda x: x), (lambda x: x * 2)
    for ours, lax, *call in (
        (filter_cond, jax.lax.cond, True, (identity, twice)),
        (filter_switch, jax.lax.switch, 1, ([identity, twice],)),
        # One branch: lax calls it on the numbers themselves.
        (filter_switch, jax.lax.switch, 0, ([lambda x: x * 0.1 * 3],)),
    ):
        # Ours twice: the first and a cached call.
        first, reference, cached = (outcome(f, *call) for f in (ours, lax, ours))
        for out in (first, cached):
            if isinstance(reference, type):
                assert out is reference
            elif eqx.is_array(reference):
                assert_identical(out, reference, weak_types=True)
            else:  # A Python number, bit for bit (NaN too).
                assert type(out) is type(reference)
                assert np.asarray(out).tobytes() == np.asarray(reference).tobytes()


def test_operand_numbers_of_another_type_get_another_program() -> None:
    half = lambda n: n / 2  # noqa: E731  The same branches in every call.
    for number in (1, 1.5, True, 3, 2.5, 1j, False, np.float32(0.5), 7):
        got = filter_cond(True, half, half, number)
        assert_identical(got, jax.lax.cond(True, half, half, number), weak_types=True)
        got = filter_switch(1, [half, half], number)
        assert_identical(got, jax.lax.switch(1, [half, half], number), weak_types=True)


def test_a_number_operand_is_moved_to_the_device_as_by_jax_lax() -> None:
    def outcome(run: Callable[[], Any]) -> Any:
        try:
            return run()
        except Exception as error:
            return type(error)

    pred, double = jnp.asarray(True), (lambda x: x * 2)
    with jax.transfer_guard("disallow"):  # An implicit transfer: refused.
        lax = outcome(lambda: jax.lax.cond(pred, double, double, 1.5))
        for _ in range(2):  # A first and a cached call.
            assert outcome(lambda: filter_cond(pred, double, double, 1.5)) is lax
    assert isinstance(lax, type)


def test_branches_may_still_use_operand_numbers_as_python_values() -> None:
    # Where tracing fails, the numbers reach the branches whole, as before.
    def grow(n: Any, x: Any) -> Any:
        return x + n.bit_length()  # An AttributeError on a tracer.

    def positive(n: Any, x: Any) -> Any:
        return x + 3 if n > 0 else x  # A concretization error on a tracer.

    for branch in (grow, positive):
        for _ in range(2):  # A first and a cached call.
            assert int(filter_cond(True, branch, branch, 5, jnp.int32(1))) == 4
            assert int(filter_switch(0, [branch, branch], 5, jnp.int32(1))) == 4
            jitted = jax.jit(lambda x, b=branch: filter_cond(True, b, b, 5, x))
            assert int(jitted(1)) == 4


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.parametrize("name", ["scan", "cond", "switch", "while", "fori", "map"])
def test_memory_does_not_grow_over_a_thousand_eager_calls(name: str) -> None:
    call = _CALLS[name]
    for _ in range(50):
        jax.block_until_ready(call(1.0))
    gc.collect()
    before, arrays = _rss_bytes(), len(jax.live_arrays())
    out = None
    for _ in range(1000):
        out = call(1.0)
    jax.block_until_ready(out)
    del out
    gc.collect()
    assert len(jax.live_arrays()) <= arrays
    assert _rss_bytes() - before < 5 * 2**20


def test_chained_counters_are_traced_at_most_three_times() -> None:
    n, traces = 160, []

    def step(c: list[Any], x: Any) -> Any:
        traces.append(None)
        return [c[0] + 1] + [c[i] + c[i - 1] for i in range(1, n)], None

    final, _ = filter_scan(step, [0] * n, None, length=4)
    expected, _ = jax.lax.scan(step, [0] * n, None, length=4)
    assert len(traces) <= 3 + 1  # Ours, then `jax.lax.scan`'s one trace.
    _same(final, expected)


def test_numbers_needed_as_python_values_keep_working_over_two_rounds() -> None:
    traces = []

    def step(c: Any, x: Any) -> Any:
        traces.append(None)
        size, a, b, h = c
        return (size, a + 1, b + a, h + jnp.ones(size)), None

    (size, a, b, h), _ = filter_scan(step, (3, 0, 0, jnp.zeros(3)), None, length=4)
    assert size == 3 and type(size) is int
    assert (int(a), int(b)) == (4, 6)
    np.testing.assert_array_equal(h, jnp.full(3, 4.0))
    assert len(traces) <= 4


@pytest.mark.parametrize(
    "read",
    [
        lambda n: float(n),  # ConcretizationTypeError, were `n` traced.
        lambda n: len(range(n)),  # TracerIntegerConversionError.
        lambda n: float(np.asarray(n)),  # TracerArrayConversionError.
    ],
    ids=["float", "int", "numpy"],
)
def test_carry_numbers_read_as_python_values_whatever_tracing_them_raises(
    read: Any,
) -> None:
    def step(c: Any, x: Any) -> Any:
        flag, n = c
        value = read(n)  # With every number traced, this fails first.
        return (flag, n), value if flag else 0.0  # `if` needs a Python bool.

    (flag, n), ys = filter_scan(step, (True, 3), None, length=2)
    assert flag is True and type(n) is int and n == 3
    np.testing.assert_array_equal(ys, [read(3)] * 2)


def _nested(depth: int, traces: list[int]) -> Callable[..., Any]:
    """A loop body that counts its traces and runs the next level's loop, `depth`
    levels deep; each level promotes a counter of its own."""

    def body(i: Any, carry: Any) -> Any:
        traces[depth] += 1
        count, x = carry
        if depth + 1 < len(traces):
            _, x = filter_fori_loop(0, 2, _bodies[depth + 1], (0, x))
        return count + 1, x + 1.0

    return body


_bodies: list[Callable[..., Any]] = []


def test_nested_loops_retrace_a_bounded_number_of_times_per_level() -> None:
    traces = [0] * 4
    _bodies[:] = [_nested(depth, traces) for depth in range(4)]
    count, x = filter_fori_loop(0, 2, _bodies[0], (0, jnp.zeros(())))
    assert int(count) == 2 and float(x) == 2 + 4 + 8 + 16
    # Each level's body: twice for its own counter, then once per retrace of the
    # levels around it (2 ** (depth + 1) times before).
    assert traces == [2, 3, 4, 5]


_TWO = jnp.ones(2)
_ANY: Any = lambda c: True  # noqa: E731
_NOT_A_PAIR: Any = lambda c, x: c  # noqa: E731
_EMPTY_A: Any = {"a": None}
_AS_PAIR: Any = lambda c, x: (_Pair(*c), x)  # noqa: E731
# Mistakes that `jax.lax` also rejects: ours, the same with `jax.lax`, and the start
# of our message, which stays as it was.
_MISTAKES: dict[str, tuple[Callable[[], Any], Callable[[], Any], str]] = {
    "scan carry structure": (
        lambda: filter_scan(lambda c, x: ((c, c), x), 0.0, None, 2),
        lambda: jax.lax.scan(lambda c, x: ((c, c), x), 0.0, None, 2),
        "filter_scan: `f` returned a carry that differs from `init` at the top "
        "level: it was float 0.0 and is now a tuple. Keep the structure of `init` "
        "from step to step.",
    ),
    "scan carry None filled in": (
        lambda: filter_scan(lambda c, x: ({"a": 0.0}, x), _EMPTY_A, None, 2),
        lambda: jax.lax.scan(lambda c, x: ({"a": 0.0}, x), _EMPTY_A, None, 2),
        "filter_scan: `f` returned a carry that differs from `init` at path ['a']: "
        "it was a NoneType and is now float 0.0. Keep the structure of `init` from "
        "step to step.",
    ),
    "scan carry becomes a named tuple": (
        lambda: filter_scan(_AS_PAIR, (0.0, 1.0), None, 2),
        lambda: jax.lax.scan(_AS_PAIR, (0.0, 1.0), None, 2),
        "filter_scan: `f` returned a carry that differs from `init` at the top "
        "level: it was a tuple and is now a _Pair. Keep the structure of `init` "
        "from step to step.",
    ),
    "while carry structure": (
        lambda: filter_while_loop(_ANY, lambda c: [c], 0.0),
        lambda: jax.lax.while_loop(_ANY, lambda c: [c], 0.0),
        "filter_while_loop: `body_fun` returned a carry that differs from "
        "`init_val` at the top level: it was float 0.0 and is now a list.",
    ),
    "fori carry structure": (
        lambda: filter_fori_loop(0, 2, lambda i, c: [c], 0.0),
        lambda: jax.lax.fori_loop(0, 2, lambda i, c: [c], 0.0),
        "filter_fori_loop: `body_fun` returned a carry that differs from "
        "`init_val` at the top level: it was float 0.0 and is now a list.",
    ),
    "body output not a pair": (
        lambda: filter_scan(_NOT_A_PAIR, _TWO, None, 2),
        lambda: jax.lax.scan(_NOT_A_PAIR, _TWO, None, 2),
        "filter_scan: `f` must return a pair `(new_carry, y)`; got an array of "
        "shape (2,) and dtype float32.",
    ),
    "length disagreeing with xs": (
        lambda: filter_scan(lambda c, x: (c, x), 0.0, jnp.ones(5), 3),
        lambda: jax.lax.scan(lambda c, x: (c, x), 0.0, jnp.ones(5), 3),
        "filter_scan: `length=3` disagrees with the leading size 5 of the arrays "
        "in `xs`. Pass `length=5` or leave it out.",
    ),
    "traced length": (
        lambda: jax.jit(lambda n: filter_scan(lambda c, x: (c, x), 0, None, n))(3),
        lambda: jax.jit(lambda n: jax.lax.scan(lambda c, x: (c, x), 0, None, n))(3),
        "Abstract tracer value encountered where concrete value is expected: traced "
        "array with shape int32[]\nfilter_scan: `length` must be concrete, but it is "
        "traced.",
    ),
    "cond branch structure": (
        lambda: filter_cond(True, lambda x: (x, x), lambda x: x, _TWO),
        lambda: jax.lax.cond(True, lambda x: (x, x), lambda x: x, _TWO),
        "filter_cond: the branches' outputs disagree at the top level: compared "
        "with `true_fun`'s output, `false_fun`'s was a tuple and is now an array of "
        "shape (2,) and dtype float32.",
    ),
    "switch branch structure": (
        lambda: filter_switch(0, [lambda x: x, lambda x: [x]], _TWO),
        lambda: jax.lax.switch(0, [lambda x: x, lambda x: [x]], _TWO),
        "filter_switch: the branches' outputs disagree at the top level: compared "
        "with `branches[0]`'s output, `branches[1]`'s was an array of shape (2,) "
        "and dtype float32 and is now a list.",
    ),
}


def test_a_traced_unroll_gets_the_error_jax_lax_scan_gives() -> None:
    def run(scan: Callable[..., Any]) -> Any:
        step = lambda c, x: (c, x)  # noqa: E731
        return jax.jit(lambda u: scan(step, 0.0, None, 3, unroll=u))(2)

    with pytest.raises(Exception) as lax_error:
        run(jax.lax.scan)
    if not isinstance(lax_error.value, jax.errors.ConcretizationTypeError):
        return  # jax 0.4.26 lets the tracer escape instead, for no useful message.
    with pytest.raises(jax.errors.ConcretizationTypeError) as our_error:
        run(filter_scan)
    assert str(our_error.value) == str(lax_error.value)


@pytest.mark.parametrize("name", list(_MISTAKES))
def test_our_messages_hold_lax_messages(name: str) -> None:
    ours, theirs, start = _MISTAKES[name]
    with pytest.raises(Exception) as lax_error:
        theirs()
    with pytest.raises(type(lax_error.value)) as our_error:
        ours()
    assert type(our_error.value) is type(lax_error.value)
    message = str(our_error.value)
    if name == "traced length":  # JAX's own message comes first, and varies.
        assert start.split("\n")[1] in message
    else:
        assert message.startswith(start)
    lines = str(lax_error.value).splitlines()
    for line in lines[: 2 if name == "traced length" else 1]:
        assert line in message


@pytest.mark.parametrize("swap", [False, True])
def test_lax_message_in_ours_keeps_lax_branch_order(swap: bool) -> None:
    pair, leaf = (lambda x: (x, x)), (lambda x: x)
    true_fun, false_fun = (leaf, pair) if swap else (pair, leaf)
    with pytest.raises(TypeError) as lax_error:
        jax.lax.cond(True, true_fun, false_fun, _TWO)
    with pytest.raises(TypeError) as our_error:
        filter_cond(True, true_fun, false_fun, _TWO)
    # Every line but those that say where lax's stand-in functions are defined.
    lines = str(lax_error.value).splitlines()
    lines = [line for line in lines if not re.match(r"(true|false)_fun is ", line)]
    assert all(line in str(our_error.value) for line in lines)


class _Flagged(eqx.Module):
    flag: Any = eqx.field(static=True)


def test_numpy_arrays_of_another_shape_get_another_program() -> None:
    double, negate = (lambda x: x * 2), (lambda x: -x)
    total = lambda c, x: (c + x, c)  # noqa: E731
    for n in (3, 4, 3, 5):  # The same functions each time: cached calls.
        rows = np.arange(n, dtype=np.float32)
        assert_identical(filter_map(double, rows), jax.lax.map(double, rows))
        assert_identical(
            filter_cond(True, double, negate, rows),
            jax.lax.cond(True, double, negate, rows),
        )
        assert_identical(
            filter_scan(total, np.float32(0), rows),
            jax.lax.scan(total, np.float32(0), rows),
        )


def test_static_true_and_one_are_different_keys() -> None:
    branch = lambda x, m: (x, repr(m.flag))  # noqa: E731
    for flag in (1, True, 1, True):
        _, text = filter_cond(True, branch, branch, _TWO, _Flagged(flag))
        assert text == repr(flag)


def test_dataclasses_are_keyed_by_equality_or_identity_as_they_compare() -> None:
    @dataclasses.dataclass(eq=False)
    class Tag:  # Compares by identity.
        name: str

    @dataclasses.dataclass(frozen=True)
    class Label:  # Compares by its fields.
        name: str

    first, second = Tag("a"), Tag("a")
    branch = lambda x, t: (x, t is first)  # noqa: E731
    assert bool(filter_cond(True, branch, branch, _TWO, first)[1]) is True
    assert bool(filter_cond(True, branch, branch, _TWO, second)[1]) is False
    keep = lambda x, t: (x * 2, t)  # noqa: E731
    filter_cond(True, keep, keep, _TWO, Label("b"))
    assert _compiled_by(lambda: filter_cond(True, keep, keep, _TWO, Label("b"))) == 0


def test_a_bound_method_is_cached_while_its_object_lives() -> None:
    class Policy:
        def step(self, c: Any, x: Any) -> Any:
            return c * 3 + x, c

    policy, xs = Policy(), jnp.ones(2)
    filter_scan(policy.step, jnp.zeros(2), xs)
    call = lambda p=policy: filter_scan(p.step, jnp.zeros(2), xs)  # noqa: E731
    assert _compiled_by(call) == 0
    alive = weakref.ref(policy)
    del policy, call
    gc.collect()
    assert alive() is None  # Neither the cache nor the last call keeps it alive.


def test_weak_and_strong_arrays_are_different_keys() -> None:
    double = lambda x: x * 2  # noqa: E731
    for x in (jnp.asarray(1.0), jnp.float32(1.0), jnp.asarray(1.0)):
        _same(
            filter_cond(True, double, double, x), jax.lax.cond(True, double, double, x)
        )


def test_an_error_raised_by_a_body_is_final_and_traces_it_once() -> None:
    traces: list[None] = []

    def step(carry: Any, x: Any) -> Any:
        traces.append(None)
        raise RuntimeError("the simulator crashed")

    with pytest.raises(RuntimeError, match="the simulator crashed"):
        filter_scan(step, (0, 1.5), jnp.ones(3))
    assert len(traces) == 1


def test_a_cached_call_follows_the_configuration_it_runs_under():
    step = lambda c, x: (c + x, c)  # noqa: E731
    init, xs = jnp.float32(0), jnp.arange(2)
    filter_scan(step, init, xs)  # Cached under the default promotion rules.
    with jax.numpy_dtype_promotion("strict"), pytest.raises(Exception) as ours:
        filter_scan(step, init, xs)
    with jax.numpy_dtype_promotion("strict"), pytest.raises(Exception) as lax:
        jax.lax.scan(step, init, xs)
    assert type(ours.value) is type(lax.value)


class _Scale(eqx.Module):
    s: Any = eqx.field(static=True)

    def __call__(self, c: Any, x: Any) -> Any:
        return c, c * self.s


@pytest.mark.parametrize(("first", "then"), [(1, 1.0), (1.0, True), (0.0, -0.0)])
def test_static_fields_equal_by_eq_but_not_by_type_or_bits_get_their_own_program(
    monkeypatch, first, then
):
    xs = jnp.arange(2)
    filter_scan(_Scale(first), xs, None, length=2)
    ours = filter_scan(_Scale(then), xs, None, length=2)[1]
    monkeypatch.setattr(lerax_utils, "_CACHE_SIZE", 0)
    expected = filter_scan(_Scale(then), xs, None, length=2)[1]
    assert ours.dtype == expected.dtype
    assert np.asarray(ours).tobytes() == np.asarray(expected).tobytes()


@dataclasses.dataclass
class _Log:
    items: list[str] = dataclasses.field(default_factory=list)


def test_objects_made_while_tracing_are_new_on_every_call():
    branch = lambda x: (x, _Log())  # noqa: E731
    first = filter_cond(True, branch, branch, jnp.float32(1))[1]
    first.items.append("first call's")
    second = filter_cond(True, branch, branch, jnp.float32(2))[1]
    assert second is not first and second.items == []


def test_memory_stays_flat_when_every_call_brings_new_functions() -> None:
    # Lambdas written in a loop: no call is like an earlier one, so the bounded cache
    # must drop their programs. (Run op by op, each would stay in JAX's own cache of
    # compiled primitives, as `jax.lax.cond` with new lambdas does: 1.5 MB a call.)
    x = jnp.ones(100)
    for _ in range(lerax_utils._CACHE_SIZE + 20):  # The cache full, as in a long run.
        jax.block_until_ready(filter_cond(True, lambda a: a + 1, lambda a: a - 1, x))
    gc.collect()
    before = _rss_bytes()
    for _ in range(200):
        out = filter_cond(True, lambda a: a + 1, lambda a: a - 1, x)
        jax.block_until_ready(out)
    gc.collect()
    assert _rss_bytes() - before < 20 * 2**20


# The eager-call cache: entries whose objects died while it was locked all go at the
# next lookup.
def test_every_entry_whose_object_died_during_a_lookup_goes() -> None:
    cache = lerax_utils._Cache()

    class Referent:
        pass

    referents = [Referent() for _ in range(3)]
    for i, referent in enumerate(referents):
        cache.put(i, i + 1, [referent])
    with cache.lock:  # As when the collector runs inside a lookup.
        del referents[:2]
        gc.collect()
    assert cache.get(2) == 3
    assert list(cache.entries) == [2]


# The eager-call cache keys a static field's containers by type: a list and a tuple
# of the same items run different programs.
class _StaticField(eqx.Module):
    value: Any = eqx.field(static=True)


def test_a_static_list_and_tuple_of_the_same_items_are_different_calls() -> None:
    def kind(module: _StaticField, x: jax.Array) -> jax.Array:
        return x * (2.0 if type(module.value) is list else 3.0)

    for value, factor in (([1], 2.0), ((1,), 3.0), ([1], 2.0), ({"a": 1}, 3.0)):
        out = filter_cond(True, kind, kind, _StaticField(value), jnp.ones(()))
        assert float(out) == factor


def _uncached(call: Callable[[], Any]) -> Any:
    """`call()` with the eager cache off: the reference for a cached call."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lerax_utils, "_CACHE_SIZE", 0)
        return call()


# Static values next to one that equals them, or shares their hash or their repr.
_NEAR_STATICS = [
    (0.0, -0.0),
    (1, True),
    (1, 1.0),
    ([1], (1,)),
    ({"a": 1}, {"a": 2}),
    ({"a": 1}, {"b": 1}),
    (functools.partial(max, 1), functools.partial(max, 1, 2)),
    (functools.partial(dict, a=1), functools.partial(dict, b=1)),
    ("1", 1),
    (None, 0),
    (decimal.Decimal(1), fractions.Fraction(1)),  # Equal, and never weakly referenced.
]
_ARRAYS = st.builds(
    lambda n, dtype, numpy: (np.arange if numpy else jnp.arange)(n).astype(dtype),
    st.integers(1, 3),  # Not empty: the static factor shows.
    st.sampled_from([np.float32, np.int32, np.bool_]),
    st.booleans(),
)
_NUMBERS = st.sampled_from([1, 1.5, True, 2, 1j, -0.0])


def _keyed_branch(module: _StaticField, x: Any, n: Any) -> Any:
    factor = zlib.crc32(repr(module.value).encode()) % 97  # Static: traced in.
    return x * factor + jnp.sum(x), n * 2, module


@pytest.mark.parametrize("statics", _NEAR_STATICS + [p[::-1] for p in _NEAR_STATICS])
@settings(max_examples=6)  # Each a few new programs, for each pair.
@given(x=_ARRAYS, n=_NUMBERS, other=st.tuples(_ARRAYS, _NUMBERS))
def test_a_cached_call_gives_what_an_uncached_call_gives(
    statics: tuple[Any, Any], x: Any, n: Any, other: tuple[Any, Any]
) -> None:
    # After a call, calls that differ from it in one part of the key (a static value,
    # a shape, a dtype, a NumPy or JAX array, a number's type) get their own program.
    (static, near), (other_x, other_n) = statics, other
    calls = [(static, x, n), (near, x, n), (static, other_x, n), (static, x, other_n)]
    for static, x, n in calls:
        operands = (_StaticField(static), x, n)
        call = functools.partial(filter_cond, True, *[_keyed_branch] * 2, *operands)
        got = call()  # Cached, after the calls before it.
        assert_identical(got, _uncached(call), weak_types=True)


# Options equal in Python but of another type, each a call `jax.lax` takes or refuses.
def _near_options() -> dict[str, tuple[Callable[[Any], Any], int]]:
    def step(c: Any, x: Any) -> Any:  # One function for all calls: one cache key.
        return c + 1, c

    def add(i: Any, c: Any) -> Any:
        return c + i

    def below_two(c: Any) -> Any:
        return c < 2

    def count(c: Any) -> Any:
        return c + 1

    return {
        "scan length": (lambda n: filter_scan(step, 0.0, length=n), 2),
        "scan reverse": (lambda r: filter_scan(step, 0, jnp.ones(2), reverse=r), 0),
        "scan unroll": (lambda u: filter_scan(step, 0.0, jnp.ones(3), unroll=u), 1),
        "scan progress": (lambda p: filter_scan(step, 0, None, 2, progress=p), 1),
        "fori_loop upper": (lambda n: filter_fori_loop(0, n, add, 0), 3),
        "fori_loop lower": (lambda n: filter_fori_loop(n, 3, add, 0), 1),
        "map batch_size": (lambda b: filter_map(jnp.sin, jnp.ones(4), batch_size=b), 2),
        "while_loop progress": (
            lambda p: filter_while_loop(below_two, count, 0, progress=p),
            0,
        ),
    }


_NEAR_OPTIONS = _near_options()


class _Raised(NamedTuple):
    kind: type[Exception]
    message: str


def _outcome_of(call: Callable[[], Any]) -> Any:
    """What `call` gives, or what it raised."""
    try:
        return call()
    except Exception as err:
        return _Raised(type(err), str(err))


@pytest.mark.parametrize("case", sorted(_NEAR_OPTIONS))
@pytest.mark.parametrize("order", ["value first", "near value first"])
def test_options_of_another_type_are_other_calls(case: str, order: str) -> None:
    run, value = _NEAR_OPTIONS[case]
    nears = [float(value), bool(value), np.int64(value), complex(value)]
    for near in nears:
        for option in [value, near][:: 1 if order == "value first" else -1]:
            call = functools.partial(_outcome_of, functools.partial(run, option))
            got, want = call(), _uncached(call)
            if isinstance(want, _Raised):
                assert got == want, (option, got, want)
            else:
                assert_identical(got, want, weak_types=True)


def test_static_dicts_with_other_values_are_different_calls() -> None:
    def scale(module: _StaticField, x: jax.Array) -> jax.Array:
        return x * module.value["a"] + len(module.value)

    for value in ({"a": 1}, {"a": 2}, {"a": 1}, {"a": 1, "b": 0}, {"b": 0, "a": 3}):
        out = filter_cond(True, scale, scale, _StaticField(value), jnp.ones(()))
        assert float(out) == value["a"] + len(value)


# Partials compare by their keywords' values, whatever order they were given in;
# one more keyword ("c"), or another function of the same code, makes another one.
@pytest.mark.parametrize("changed", [None, "a", "b", "c", "func"])
def test_partials_compare_by_keyword_whatever_their_order(changed: str | None) -> None:
    def f(a: Any, b: Any, c: Any = None) -> None:
        pass

    def g(a: Any, b: Any, c: Any = None) -> None:
        pass

    new: dict[str, Any] = {"b": 2.0, "a": [1]}
    if changed in ("a", "b", "c"):
        new[changed] = -0.0
    old = functools.partial(f, a=[1], b=2.0)
    other = functools.partial(g if changed == "func" else f, **new)
    assert lerax_utils._static_leaves_equal(old, other) is (changed is None)
    assert lerax_utils._static_leaves_equal(other, old) is (changed is None)


# Eager calls under `jax.disable_jit` run the Python of their functions every time.
def test_every_call_under_disable_jit_runs_its_functions() -> None:
    calls: list[int] = []

    def branch(x: jax.Array) -> jax.Array:
        calls.append(1)
        return x + 1

    with jax.disable_jit():
        for _ in range(3):
            filter_cond(True, branch, branch, jnp.ones(2))
    assert len(calls) == 3


# A call after `jax_enable_x64` changes runs a program traced under the new setting.
def test_a_call_after_x64_changes_gets_a_program_of_the_new_dtypes() -> None:
    x = jnp.arange(3)

    def double(x: jax.Array) -> jax.Array:
        return x * 2.0

    dtypes = [filter_cond(True, double, double, x).dtype]
    jax.config.update("jax_enable_x64", True)
    try:
        dtypes.append(filter_cond(True, double, double, x).dtype)
    finally:
        jax.config.update("jax_enable_x64", False)
    dtypes.append(filter_cond(True, double, double, x).dtype)
    assert dtypes == [jnp.float32, jnp.float64, jnp.float32]


# Static leaves of different types are different, however `==` compares them.
@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("a", np.str_("a")),
        (b"a", np.bytes_(b"a")),
        (frozenset({1}), {1}),
        (np.float32(1), np.float64(1)),
    ],
)
def test_static_leaves_of_different_types_differ(old: Any, new: Any) -> None:
    assert old == new
    assert not lerax_utils._static_leaves_equal(old, new)
    assert not lerax_utils._static_leaves_equal(new, old)


@given(
    values=st.lists(st.sampled_from([0.0, -0.0, 1.0, 2.5]), min_size=1, max_size=4),
    index=st.integers(0, 3),
    traced=st.booleans(),
)
def test_numbers_from_branches_come_back_as_from_jax_lax(
    values: list[float], index: int, traced: bool
) -> None:
    # As `jax.lax.switch` and `cond` give them: arrays of the chosen branch's number
    # (a lone branch's own number, which lax calls directly), bit for bit.
    index = min(index, len(values) - 1)
    branches = [lambda v=v: v for v in values]
    calls: list[tuple[Any, ...]] = [(filter_switch, jax.lax.switch, index, [branches])]
    if len(values) == 2:
        calls.append((filter_cond, jax.lax.cond, index == 0, branches))
    for ours, lax, selector, functions in calls:
        out, reference = (
            jax.jit(lambda s, f=f, fs=functions: f(s, *fs))(selector)
            if traced
            else f(selector, *functions)
            for f in (ours, lax)
        )
        assert_identical(out, reference, weak_types=eqx.is_array(reference))


# A scan of length 0 runs no step and stacks nothing, as `jax.lax.scan` does.
@pytest.mark.parametrize("length", [0, np.int64(0)])
def test_filter_scan_of_length_zero_matches_lax_scan(length):
    def step(carry, x):
        return carry + 1, carry * 2

    ours = filter_scan(step, jnp.float32(2.0), None, length=length)
    theirs = jax.lax.scan(step, jnp.float32(2.0), None, length=0)
    assert_identical(ours, theirs, weak_types=True)


# A pred that `jax.lax.cond` refuses is refused eagerly too, first call and cached:
# only a scalar number is compared with 0 on the host (a list's `!= 0` is `True`).
class _ArrayLikeZero:
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.array(0)


@pytest.mark.parametrize(
    "pred",
    [[0], [1], [], (0,), None, np.longdouble(1), _ArrayLikeZero()],
    ids=["list0", "list1", "empty", "tuple0", "none", "longdouble", "array_like"],
)
def test_filter_cond_refuses_the_preds_that_lax_cond_refuses(pred: Any) -> None:
    with pytest.raises(TypeError):
        jax.lax.cond(pred, lambda x: x + 1.0, lambda x: x - 1.0, jnp.float32(0.0))
    for _ in range(2):
        with pytest.raises(TypeError):
            filter_cond(pred, lambda x: x + 1.0, lambda x: x - 1.0, jnp.float32(0.0))


# Bound methods compare by their object's identity: an equal instance's method is
# not the same function, and must not reuse the program traced for the other's.
def test_methods_of_equal_instances_do_not_share_a_program() -> None:
    class Loose:
        def __init__(self, k: float) -> None:
            self.k = k

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Loose)

        def __hash__(self) -> int:
            return 0

        def step(self, carry: Any, _: Any) -> Any:
            return carry + self.k, None

        def scale(self, x: Any) -> Any:
            return x * self.k

    one, five = Loose(1.0), Loose(5.0)
    x = jnp.float32(1.0)
    assert float(filter_scan(one.step, x, length=2)[0]) == 3.0
    assert float(filter_scan(five.step, x, length=2)[0]) == 11.0
    assert float(filter_cond(True, one.scale, one.scale, x)) == 1.0
    assert float(filter_cond(True, five.scale, five.scale, x)) == 5.0

    @dataclasses.dataclass(frozen=True)
    class Sign:
        s: float

        def inv(self, x: Any) -> Any:
            return 1.0 / (x * self.s)

    plus, minus = Sign(0.0), Sign(-0.0)
    assert plus == minus
    assert float(filter_cond(True, plus.inv, plus.inv, x)) == math.inf
    assert float(filter_cond(True, minus.inv, minus.inv, x)) == -math.inf


def test_methods_of_objects_that_die_never_reuse_their_programs() -> None:
    class Scale:
        def __init__(self, k: float) -> None:
            self.k = k

        def step(self, carry: Any, _: Any) -> Any:
            return carry * self.k, None

    # Each object dies after its call, and a later one may be given its id.
    x = jnp.float32(1.0)
    got = [float(filter_scan(Scale(k).step, x, length=1)[0]) for k in range(30)]
    assert got == list(range(30))


# A method of an object that cannot be weakly referenced (`__slots__`) is not cached
# by a strong reference that keeps the object, its class and function alive.
def test_a_method_of_a_slotted_object_is_not_kept_alive() -> None:
    def make() -> Any:
        class Slotted:
            __slots__ = ("v",)

            def step(self, carry: Any, _: Any) -> Any:
                return carry + 1.0, None

        return Slotted()

    obj = make()
    kind = weakref.ref(type(obj))
    assert float(filter_scan(obj.step, jnp.float32(0.0), length=3)[0]) == 3.0
    del obj
    gc.collect()
    assert kind() is None


# A call that raises before running lets go of its objects (the promotion hint).
def test_a_call_that_raises_early_does_not_keep_its_functions_alive() -> None:
    class Branch:
        def __call__(self, x: Any) -> Any:
            return x

    branch = Branch()
    alive = weakref.ref(branch)
    with pytest.raises(TypeError):
        filter_cond(True, branch, branch, jnp.float32(0.0), operand=1.0)
    del branch
    gc.collect()
    assert alive() is None
