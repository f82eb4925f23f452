"""filter_scan and filter_cond as supersets of jax.lax.scan and jax.lax.cond.

Each mistake below is made once with `jax.lax` and once with ours: both must raise
the same exception type. Each call form that `jax.lax` accepts must give the same
result with ours.
"""

import inspect
import pathlib
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

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


_README_TRIGGERS: list[Callable[[], Any]] = [
    lambda: filter_scan(
        lambda c, _: ({**c, "tag": "b"}, None), {"tag": "a", "x": 0.0}, None, length=1
    ),
    lambda: filter_scan(
        lambda c, _: ({"policy": _Named(c["policy"].params, "critic")}, None),
        {"policy": _Named(jnp.ones(2), "actor")},
        None,
        length=1,
    ),
    lambda: filter_scan(
        lambda c, _: ([c[0], "done"], None), [1, jnp.zeros(2)], None, length=1
    ),
    lambda: filter_scan(
        lambda c, _: ({"a": c["a"], "b": 1}, None), {"a": 1}, None, length=1
    ),
    lambda: filter_scan(lambda c, x: c, "s", None, length=1),  # type: ignore[arg-type]
    lambda: filter_scan("step", 0, None, length=1),  # type: ignore[arg-type]
    lambda: filter_scan(
        _identity_step, 0, {"obs": jnp.ones((3, 2)), "actions": [jnp.ones(4)]}
    ),
    lambda: filter_scan(_identity_step, 0, jnp.ones(3), length=4),
    lambda: filter_scan(_identity_step, 0, {"mode": "eval"}),
    lambda: filter_scan(_identity_step, 0, {"lr": jnp.float32(0.1)}, length=3),
    lambda: filter_scan(_identity_step, 0, None, length=2.5),  # type: ignore[arg-type]
    lambda: jax.jit(lambda n: filter_scan(_identity_step, 0.0, None, length=n))(3),
    lambda: filter_scan(_identity_step, 0, None, length=-1),
    lambda: filter_scan(_identity_step, 0.0, jnp.ones(2), unroll="2"),  # type: ignore[arg-type]
    _retraced_with_new_labels,
    lambda: filter_cond(True, "left", jnp.cos, 1.0),  # type: ignore[arg-type]
    lambda: filter_cond(jnp.array([True, False]), jnp.sin, jnp.cos, 1.0),
    lambda: filter_cond(
        True, lambda x: (x, "a"), lambda x: (x, jnp.int32(0)), jnp.ones(())
    ),
    lambda: filter_cond(True, lambda x: (x, x), lambda x: (x,), 1.0),
    lambda: filter_cond(
        True, lambda x: {"a": x, "m": "train"}, lambda x: {"a": x, "m": "eval"}, 1.0
    ),
    lambda: filter_cond(True, lambda x: x, lambda x: x, 1.0, operand=2.0),
]

_EXCEPTIONS = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "jax.errors.ConcretizationTypeError": jax.errors.ConcretizationTypeError,
}


def _readme_error_rows() -> list[tuple[type[BaseException], str]]:
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("## filter_scan")
    end = readme.index("## unstack_pytree and stack_pytree")
    rows = re.findall(r"^\| `([\w.]+)`[^|]*\| ``(.+?)`` \|", readme[start:end], re.M)
    return [(_EXCEPTIONS[name], text.removeprefix("... ")) for name, text in rows]


def test_readme_error_tables_quote_the_messages_exactly():
    rows = _readme_error_rows()
    assert len(rows) == len(_README_TRIGGERS)
    for (expected_type, text), trigger in zip(rows, _README_TRIGGERS, strict=True):
        with pytest.raises(expected_type) as info:
            trigger()
        assert text in str(info.value)
        if not text.startswith(("filter_scan: `length` must be concrete",)):
            assert str(info.value).startswith(text)


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
