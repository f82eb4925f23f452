"""Host callbacks on four CPU devices: printing and logging sharded arrays.

Each test runs a script in a fresh process with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` (the device count is fixed when
JAX starts), as the four-device test in `test_lerax_utils.py` does, and bounds the
wait with a timeout.
"""

import functools
import inspect
import io
import re
import textwrap
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import (
    WRAPPERS,
    assert_delivered,
    assert_identical,
    bits,
    expected_on_host,
    is_key,
    run_on_four_devices,
)
from hypothesis import given
from hypothesis import strategies as st

import lerax_utils
from lerax_utils import (
    callback_with_list_wrapper,
    callback_with_numpy_wrapper,
    callback_wrapper,
    filter_cond,
    filter_scan,
    print_callback,
)

_PRELUDE = """
import contextlib, io, json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from lerax_utils import callback_with_list_wrapper, callback_wrapper, print_callback
from lerax_utils import callback_with_numpy_wrapper
assert len(jax.devices()) == 4
mesh = Mesh(np.array(jax.devices()), ("d",))
x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, PartitionSpec("d")))
report = {}

def spans(x):  # What a tracer records of its sharding, if anything.
    mesh = getattr(getattr(x.aval, "sharding", None), "mesh", None)
    report["recorded"] = getattr(mesh, "size", None) == 4
    return x

jax.jit(spans)(x)

def printed(run):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run()
        jax.effects_barrier()
    return out.getvalue()

def error(run):
    try:
        run()
        jax.effects_barrier()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None
"""


def _run_on_four_devices(script: str) -> dict:
    code = _PRELUDE + textwrap.dedent(script) + "\nprint(json.dumps(report))\n"
    return run_on_four_devices(code, timeout=240)


def test_print_callback_prints_sharded_arrays_eagerly_and_under_jit():
    report = _run_on_four_devices(
        """
        report["eager"] = printed(lambda: [print_callback("x", x, i) for i in range(3)])
        def step(x):
            print_callback("x", x, "sum", x.sum())
            return x * 2
        report["jit"] = printed(lambda: jax.jit(step)(x))
        def loop(x):
            def body(c, i):
                print_callback("i", i, "c", c.sum())
                return c + 1, None
            return jax.lax.scan(body, x, jnp.arange(5))[0]
        report["scan"] = printed(lambda: jax.jit(loop)(x))
        text = lambda x: print_callback("hi") or x
        report["text"] = printed(lambda: jax.jit(text)(x))
        constant = lambda x: print_callback(jnp.zeros(2)) or x
        report["constant"] = error(lambda: jax.jit(constant)(x))
        """
    )
    row = [float(i) for i in range(8)]
    # Eagerly: gathered and printed at once, in order.
    assert report["eager"] == "".join(f"x {row} {i}\n" for i in range(3))
    # Under jit on four devices: printed unordered, each line whole.
    assert report["jit"] == f"x {row} sum 28.0\n"
    lines = [f"i {i} c {28.0 + 8 * i}\n" for i in range(5)]
    assert sorted(report["scan"].splitlines(keepends=True)) == lines
    assert report["text"] == "hi\n"  # No traced argument: printed unordered.
    if report["recorded"]:
        # Only constants traced: nothing shows the sharding (as the docstring says).
        assert report["constant"].startswith(
            "ValueError: The following ordered effects are not supported for more "
            "than 1 device"
        )
    else:  # Older JAX: nothing ever shows it, so print_callback is unordered.
        assert report["constant"] is None


def test_ordered_wrappers_gather_eagerly_and_explain_the_fix_under_jit():
    report = _run_on_four_devices(
        """
        seen = []
        def log_metrics(step, metrics):
            seen.append((step, metrics))
        log = callback_with_list_wrapper(log_metrics, ordered=True)
        log("eager", x)
        report["eager"] = seen[:]
        def step(x, y):
            log(1, {"loss": x.sum()})
            return x
        report["error"] = error(lambda: jax.jit(step)(x, 1.0))
        seen.clear()
        wrappers = [callback_wrapper, callback_with_numpy_wrapper]
        for make in wrappers + [callback_with_list_wrapper]:  # Unordered by default.
            unordered = make(lambda v: seen.append(np.asarray(v).tolist()))
            jax.jit(lambda x: (unordered(x), x)[1])(x)
        jax.effects_barrier()
        report["unordered"] = seen[:]
        """
    )
    row = [float(i) for i in range(8)]
    assert report["eager"] == [["eager", row]]
    assert report["unordered"] == [row] * 3
    if report["recorded"]:  # Tracers record their sharding: our message.
        assert report["error"] == (
            "ValueError: log_metrics (made by callback_with_list_wrapper): made with "
            "`ordered=True`, and called inside `jit` with the positional argument at "
            "path [1]['loss'], an array of shape () that spans 4 devices; JAX orders "
            "callbacks on one device only. Make the wrapper with `ordered=False`, or "
            "use one device."
        )
    else:  # Older JAX: its own message, which the docstring quotes with the fix.
        assert report["error"].startswith(
            "ValueError: The following ordered effects are not supported for more "
            "than 1 device"
        )


def test_an_ordered_call_with_an_array_on_two_devices_is_refused_under_jit():
    report = _run_on_four_devices(
        """
        pair = Mesh(np.array(jax.devices()[:2]), ("d",))
        y = jax.device_put(jnp.arange(4.0), NamedSharding(pair, PartitionSpec("d")))
        log = callback_wrapper(lambda v: None, ordered=True)
        report["error"] = error(lambda: jax.jit(log)(y))
        report["keyword"] = error(lambda: jax.jit(lambda y: log(v={"w": y}))(y))
        """
    )
    calls = {"error": "positional argument at path [0]"}
    calls["keyword"] = "keyword argument at path ['v']['w']"
    for call, where in calls.items():
        error = report[call]
        if report["recorded"]:  # Tracers record their sharding: our message.
            assert f"with the {where}, an array of shape (4,) that spans 2" in error
        else:  # Older JAX: its own message.
            assert error.startswith(
                "ValueError: The following ordered effects are not supported for "
                "more than 1 device"
            )


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


@pytest.mark.parametrize("kind", [*sorted(WRAPPERS), "print_callback"])
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
        record = WRAPPERS[kind](lambda i, _: arrived.append(i), ordered=True)

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
    assert len(seen) == 1 and bits(seen[0]) == bits(np.asarray(jnp.sin(x) * 2.0))


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

    for wrapper in WRAPPERS.values():
        wrapped = wrapper(log_metrics)
        assert wrapped.__name__ == "log_metrics"
        assert wrapped.__doc__ == "Write one line of metrics."
        assert wrapped.__wrapped__ is log_metrics  # type: ignore[attr-defined]
        assert wrapped(1, jnp.float32(0.5)) is None


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_callback_wrappers_check_their_arguments_at_once(name):
    wrapper = WRAPPERS[name]
    function = wrapper.__name__
    with pytest.raises(TypeError) as info:
        wrapper("print")  # type: ignore[arg-type]
    assert str(info.value) == f"{function}: `func` must be callable; got str 'print'."
    with pytest.raises(TypeError) as info:
        wrapper(print, ordered="yes")  # type: ignore[arg-type]
    assert str(info.value) == f"{function}: `ordered` must be a bool; got str 'yes'."
    with pytest.raises(TypeError) as info:
        wrapper(print, partitioned=1)  # type: ignore[arg-type]
    assert str(info.value) == f"{function}: `partitioned` must be a bool; got int 1."
    with pytest.raises(TypeError) as info:  # A partial is named by what it wraps.
        wrapper(functools.partial(_log_pair, 1))()
    assert str(info.value) == (
        f"_log_pair (made by {function}): the arguments do not fit the signature "
        "_log_pair(b: Any) -> None: missing a required argument: 'b'. Pass the "
        "arguments that `_log_pair` itself takes."
    )


def _log_pair(a: Any, b: Any) -> None:
    del a, b


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
            "callback_wrapper: `partitioned=True` needs a newer jax than the "
            f"installed {jax.__version__}. Upgrade jax, or pass `partitioned=False`."
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


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_callbacks_keep_no_tracer_alive_after_tracing(kind):
    log = WRAPPERS[kind](lambda *args: None)
    with jax.checking_leaks():
        jax.jit(lambda x: log(x, np.ones(2), "tag", x.sum()) or x)(jnp.ones(3))
        jax.jit(lambda x: print_callback(x, np.ones(2), file=io.StringIO()) or x)(
            jnp.ones(3)
        )
    jax.effects_barrier()


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


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_every_numpy_dtype_in_either_byte_order_reaches_func_exactly(kind):
    values = _extreme_numpy_values()
    received = []
    wrapped = WRAPPERS[kind](lambda *a: received.append(a))
    wrapped(*values)
    jax.jit(lambda x: wrapped(*values) or x)(jnp.ones(()))
    jax.effects_barrier()
    expected = tuple(expected_on_host(kind, v, traced=False) for v in values)
    assert len(received) == 2
    for got in received:
        assert_delivered(got, expected)
        if kind == "jax":  # Arrays as copies, made when the call was traced or made.
            pairs = zip(got, values, strict=True)
            assert all((a is e) != isinstance(e, np.ndarray) for a, e in pairs)
    printed, reference = io.StringIO(), io.StringIO()
    print(*(v.tolist() for v in values), file=reference)
    jax.jit(lambda x: print_callback(*values, file=printed) or x)(jnp.ones(()))
    jax.effects_barrier()
    assert printed.getvalue() == reference.getvalue()


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_typed_keys_after_other_arguments_still_arrive_as_typed_keys(jit, impl):
    key = jax.random.key(42, impl=impl)
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
        assert is_key(got)
        assert str(jax.random.key_impl(got)) == str(jax.random.key_impl(key))
        assert bits(got) == bits(key)
    assert received[1][1].dtype == np.float64  # The NumPy value, as it was.
    assert not is_key(received[1][2]) and received[1][2].tolist() == [1.0, 1.0]
    assert received[2][2].tolist() == jax.random.key_data(key).tolist()


@pytest.mark.parametrize("name", sorted(WRAPPERS))
@pytest.mark.parametrize("jit", [False, True])
def test_a_call_that_func_refuses_raises_where_it_is_written(name, jit):
    calls = []

    def log_metrics(step, loss):
        calls.append((step, loss))

    wrapped = WRAPPERS[name](log_metrics)
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
    return WRAPPERS[kind].__name__


def test_print_callback_refuses_what_print_refuses_at_the_call():
    with pytest.raises(TypeError):
        print("x", ordered=True)  # type: ignore[call-overload]
    with pytest.raises(TypeError) as info:
        jax.jit(lambda x: print_callback("x", x, ordered=True))(jnp.ones(2))
    assert str(info.value) == (
        "print_callback: the arguments do not fit the signature print(*args, sep=' ', "
        "end='\\n', file=None, flush=False): got an unexpected keyword argument "
        "'ordered'. Pass what `print` takes: positional arguments and `sep`, `end`, "
        "`file`, `flush`."
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


class _GeneratorCall:
    def __call__(self, x):
        yield x


class _Awaitable:  # Awaitable, as an `asyncio.Future` is, but not a coroutine.
    def __await__(self):
        yield


def _never_runs(name: str, shown: str, kind: str, creates: str) -> str:
    """The exact refusal of a `func` whose body a call would never run."""
    return (
        f"{name_of(name)}: `func` ({shown}) is {kind}. Calling it only creates "
        f"{creates}, so its body would never run. Wrap instead a plain function "
        "that runs it to completion."
    )


@pytest.mark.parametrize("name", sorted(WRAPPERS))
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
        (eqx.Partial(_coroutine, 1), "_coroutine", "an `async def` function",
         "a coroutine, which nothing here would await"),
        (functools.partial(functools.partial(_AsyncCall())), "_AsyncCall",
         "an `async def` function", "a coroutine, which nothing here would await"),
        (functools.partial(_GeneratorCall(), 1), "_GeneratorCall",
         "a generator function", "a generator, which nothing here would iterate"),
    ],
)  # fmt: skip
def test_functions_whose_body_would_never_run_are_refused(
    name, func, shown, kind, creates
):
    with pytest.raises(TypeError) as info:
        WRAPPERS[name](func)
    assert str(info.value) == _never_runs(name, shown, kind, creates)


@pytest.mark.parametrize("name", sorted(WRAPPERS))
@pytest.mark.parametrize(
    ("func", "returned", "verb"),
    [
        (lambda x: _coroutine(x), "coroutine", "await"),
        (lambda x: _Awaitable(), "_Awaitable", "await"),
        (lambda x: _generator(x), "generator", "iterate"),
        (lambda x: _async_generator(x), "async_generator", "iterate"),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_a_call_that_returns_what_never_runs_raises_on_the_host(
    name, func, returned, verb, jit
):
    call = WRAPPERS[name](func)
    message = (
        f"<lambda> (made by {name_of(name)}): `func` returned a {returned!r} object, "
        f"which nothing here would {verb}, so its body never ran. Wrap instead a "
        "plain function that runs it to completion."
    )
    with pytest.raises(TypeError if not jit else Exception, match=re.escape(message)):
        (jax.jit(call) if jit else call)(jnp.ones(()))
        jax.effects_barrier()


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_numpy_values_are_read_when_the_call_is_staged(name):
    # As a NumPy constant closed over in a jitted function is read when it is traced.
    scale, seen = np.array([1.0]), []

    def record(value):
        seen.append(np.array(value).tolist())
        if isinstance(value, np.ndarray):
            value[0] = -1.0  # Not seen by the next run of the same program.

    log = WRAPPERS[name](record)
    run = jax.jit(lambda x: (log(scale), x * scale[0])[1])
    run(1.0)
    scale[0] = 2.0
    assert run(1.0) == 1.0
    jax.effects_barrier()
    assert seen == [[1.0], [1.0]]
    log(scale)  # Eagerly: read when called.
    scale[0] = 3.0
    jax.effects_barrier()
    assert seen[-1] == [2.0]


_BODIES_THAT_NEVER_RUN = [  # (function, what it is, what a call creates, the verb)
    (_generator, "a generator", "a generator", "iterate"),
    (_coroutine, "an `async def`", "a coroutine", "await"),
    (_async_generator, "an async generator", "an async generator", "iterate"),
]


@given(
    body=st.sampled_from(_BODIES_THAT_NEVER_RUN),
    layers=st.lists(st.booleans(), max_size=4),
    kind=st.sampled_from(sorted(WRAPPERS)),
)
def test_a_body_that_never_runs_is_refused_inside_any_partials(
    body: Any, layers: list[bool], kind: str
) -> None:
    # However many `functools.partial` and `eqx.Partial` layers wrap it, in any order.
    func, what, creates, verb = body
    wrapped = func
    for index, equinox in enumerate(layers):
        wrapped = (eqx.Partial if equinox else functools.partial)(wrapped, index)
    with pytest.raises(TypeError) as caught:
        WRAPPERS[kind](wrapped)
    assert str(caught.value) == _never_runs(
        kind,
        func.__name__,
        f"{what} function",
        f"{creates}, which nothing here would {verb}",
    )
