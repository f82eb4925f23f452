"""Eager calls of the control-flow family: a bounded cache of compiled programs,
bounded retracing for Python numbers, and `jax.lax`'s messages inside ours."""

import functools
import gc
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lerax_utils
from lerax_utils import (
    filter_cond,
    filter_fori_loop,
    filter_map,
    filter_scan,
    filter_switch,
    filter_while_loop,
)

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


class _Policy(eqx.Module):
    mlp: eqx.nn.MLP
    name: str = eqx.field(static=True)


_POLICY = _Policy(eqx.nn.MLP(3, 3, 8, 2, key=jax.random.key(0)), "policy")


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
    return x + 1, label, 3


def _second(x: Any, label: Any) -> Any:
    return x * 2, label, 3


def _third(x: Any, label: Any) -> Any:
    return -x, label, 3


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

    # JAX's `test_cond_excessive_compilation`, with an array operand.
    compiled = sum(
        _compiled_by(lambda x=x: filter_cond(x, f, g, jnp.asarray(x)))
        for x in range(10)
    )
    assert compiled <= 4


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
# Mistakes that `jax.lax` also rejects: ours, the same with `jax.lax`, and the start
# of our message, which stays as it was.
_MISTAKES: dict[str, tuple[Callable[[], Any], Callable[[], Any], str]] = {
    "scan carry structure": (
        lambda: filter_scan(lambda c, x: ((c, c), x), 0.0, None, 2),
        lambda: jax.lax.scan(lambda c, x: ((c, c), x), 0.0, None, 2),
        "filter_scan: `f` returned a carry that differs from `init` at the top "
        "level: it was float 0.0 and is now a tuple. The carry must keep the "
        "structure of `init` from step to step.",
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


@pytest.mark.parametrize("name", list(_MISTAKES))
def test_our_messages_hold_lax_messages(name: str) -> None:
    ours, theirs, start = _MISTAKES[name]
    with pytest.raises(Exception) as lax_error:
        theirs()
    with pytest.raises(type(lax_error.value)) as our_error:
        ours()
    assert type(our_error.value) is type(lax_error.value)
    message = str(our_error.value)
    assert message.startswith(start)
    lines = str(lax_error.value).splitlines()
    for line in lines[: 2 if name == "traced length" else 1]:
        assert line in message
