"""Progress bars: the `progress=` option of filter_scan, filter_fori_loop,
filter_map and filter_while_loop.

The bar is drawn by a host callback. The tests read what it wrote to stderr (after
`jax.effects_barrier()`, since callbacks may run on another thread), or count the
reports that reach the host by patching `lerax_utils._progress_update`.
"""

import contextlib
import functools
import io
import math
import os
import re
import subprocess
import sys
from typing import Any, cast

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import run_on_four_devices
from hypothesis import example, given, settings

import lerax_utils
from lerax_utils import (
    callback_wrapper,
    filter_fori_loop,
    filter_map,
    filter_scan,
    filter_while_loop,
    print_callback,
)

_COUNT = re.compile(r"(\d+)/(\d+) \[")
_LINE = re.compile(
    r"^(?:(?P<label>.+): )?(?P<percent>[ \d]{3})% (?P<count>\d+)/(?P<total>\d+) "
    r"\[(?P<elapsed>\d\d:\d\d|\d+:\d\d:\d\d)<(?P<left>\d\d:\d\d|\d+:\d\d:\d\d|\?), "
    r"(?P<rate>[\d.]+|\?) it/s\]\s*$"
)
_WHILE_LINE = re.compile(  # A while loop's: no total.
    r"^(?:(?P<label>.+): )?(?P<count>\d+) it \[(?P<elapsed>\d\d:\d\d|\d+:\d\d:\d\d), "
    r"(?P<rate>[\d.]+|\?) it/s\]\s*$"
)


def _drawn(err: str) -> list[str]:
    """The lines a terminal would have shown, each redraw (`\\r`) a line of its own."""
    return [part for part in re.split(r"[\r\n]", err) if part.strip()]


def _counts(err: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in _COUNT.findall(err)]


@pytest.fixture
def reports(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every report that reaches the host, as `(count, total)`; nothing is drawn."""
    seen: list[tuple[int, int]] = []

    def record(bar: Any, count: int, restart: bool = False) -> None:
        seen.append((count, bar.total))

    monkeypatch.setattr(lerax_utils, "_progress_update", record)
    return seen


def _step(c: Any, x: Any) -> Any:
    return c * 0.5 + x, c


def _identical(a: Any, b: Any) -> bool:
    """Same structure, and at each leaf the same type, dtype, shape and bits."""
    leaves_a, def_a = jax.tree.flatten(a)
    leaves_b, def_b = jax.tree.flatten(b)
    if def_a != def_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if type(x) is not type(y):
            return False
        if eqx.is_array(x):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
        elif x != y:
            return False
    return True


#
# What is drawn
#


@pytest.mark.parametrize("length", [1, 2, 7, 250, 1000])
def test_final_line_shows_total_and_counts_never_go_back(
    capsys: pytest.CaptureFixture[str], length: int
) -> None:
    jax.jit(lambda: filter_scan(_step, 0.0, jnp.ones(length), progress=True))()
    jax.effects_barrier()
    err = capsys.readouterr().err
    counts = _counts(err)
    assert counts[-1] == (length, length)
    assert [c for c, _ in counts] == sorted(c for c, _ in counts)
    assert all(total == length for _, total in counts)
    assert err.endswith("\n") and err.count("\n") == 1
    last = _LINE.match(_drawn(err)[-1])
    assert last is not None, _drawn(err)[-1]
    assert last["percent"] == "100" and last["left"] in ("00:00", "?")


def test_description_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    filter_fori_loop(0, 30, lambda i, c: c + i, jnp.zeros(()), progress="epochs")
    jax.effects_barrier()
    lines = _drawn(capsys.readouterr().err)
    matches = [_LINE.match(line) for line in lines]
    assert all(m is not None and m["label"] == "epochs" for m in matches), lines
    assert matches[0]["count"] == "0" and matches[0]["percent"] == "  0"  # type: ignore[index]
    assert matches[-1]["count"] == "30" and matches[-1]["total"] == "30"  # type: ignore[index]


@pytest.mark.parametrize("progress", [True, ""])
def test_an_empty_description_draws_a_bar_without_a_label(
    capsys: pytest.CaptureFixture[str], progress: bool | str
) -> None:
    filter_scan(_step, 0.0, jnp.ones(10), progress=progress)
    jax.effects_barrier()
    lines = _drawn(capsys.readouterr().err)  # Redraws in between depend on timing.
    assert [lines[0].split(" [")[0], lines[-1].split(" [")[0]] == [
        "  0% 0/10",
        "100% 10/10",
    ]
    assert all(_LINE.match(line)["label"] is None for line in lines), lines  # type: ignore[index]
    filter_while_loop(lambda i: i < 3, lambda i: i + 1, 0, progress=progress)
    jax.effects_barrier()
    lines = _drawn(capsys.readouterr().err)
    assert [lines[0].split(" [")[0], lines[-1].split(" [")[0]] == ["1 it", "3 it"]
    assert all(_WHILE_LINE.match(line)["label"] is None for line in lines), lines  # type: ignore[index]


def test_redraws_are_rate_limited(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a long interval only the first and the final line are drawn.
    monkeypatch.setattr(lerax_utils, "_PROGRESS_MIN_INTERVAL", 1e9)
    filter_scan(_step, 0.0, jnp.ones(1000), progress=True)
    jax.effects_barrier()
    assert _counts(capsys.readouterr().err) == [(0, 1000), (1000, 1000)]


def test_shorter_line_blanks_out_the_longer(capsys: pytest.CaptureFixture[str]) -> None:
    bar = lerax_utils._ProgressBar("x", 10)
    lerax_utils._progress_update(bar, 0)
    bar.width = 200  # As if a long line had been drawn before.
    lerax_utils._progress_update(bar, 10)
    last = capsys.readouterr().err.split("\r")[-1]
    assert len(last) == 201 and last.endswith("\n")


def test_a_late_report_never_takes_the_count_back(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unordered host calls may arrive out of order: the bar keeps the highest count.
    monkeypatch.setattr(lerax_utils, "_PROGRESS_MIN_INTERVAL", 0.0)
    bar = lerax_utils._ProgressBar("x", 10)
    for count in (0, 6, 4, 10):
        lerax_utils._progress_update(bar, count)
    assert [c for c, _ in _counts(capsys.readouterr().err)] == [0, 6, 6, 10]


def test_a_bar_whose_line_another_bar_ended_is_drawn_again_at_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two loops whose reports interleave: each takes a fresh line when it reports
    # again, however soon, as a new bar.
    monkeypatch.setattr(lerax_utils, "_PROGRESS_MIN_INTERVAL", 3600.0)
    first = lerax_utils._ProgressBar("first", 10)
    second = lerax_utils._ProgressBar("second", 10)
    try:
        for bar, count in [(first, 3), (second, 2), (first, 5), (second, 6)]:
            lerax_utils._progress_update(bar, count)
    finally:
        lerax_utils._end_open_lines()
    err = capsys.readouterr().err
    assert err.count("\n") == 4
    assert _counts(err) == [(3, 10), (2, 10), (5, 10), (6, 10)]


def test_a_callback_blanks_an_open_line_before_it_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lerax_utils, "_PROGRESS_MIN_INTERVAL", 3600.0)
    bar = lerax_utils._ProgressBar("x", 10)
    try:
        lerax_utils._progress_update(bar, 0)
        width = len(_drawn(capsys.readouterr().err)[-1])
        print_callback("hi")
        print_callback("again")  # The line is blank already: nothing more to blank.
        jax.effects_barrier()
        captured = capsys.readouterr()
        # The blanked bar is drawn at the next report, however soon it comes.
        lerax_utils._progress_update(bar, 1)
        redrawn = capsys.readouterr().err
    finally:
        lerax_utils._end_open_lines()
    assert captured.out == "hi\nagain\n"
    assert captured.err == "\r" + " " * width + "\r"
    assert _counts(redrawn) == [(1, 10)]


#
# How often the host is called
#


@pytest.mark.parametrize("length", [1, 2, 198, 199, 200, 201, 4321, 100_000])
@pytest.mark.parametrize("unroll", [1, 2])
def test_host_calls_are_bounded(
    reports: list[tuple[int, int]], length: int, unroll: int
) -> None:
    def run() -> Any:
        return filter_scan(
            lambda c, x: (c + x, None), jnp.float32(0), jnp.ones(length),
            unroll=unroll, progress=True,
        )  # fmt: skip

    chunked = _chunked(str(jax.make_jaxpr(run)()))
    chunked_here = unroll == 1 and lerax_utils._chunk_size(length) is not None
    assert chunked == (length > 1 and chunked_here)
    jax.jit(run)()
    jax.effects_barrier()
    counts = [c for c, _ in reports]
    assert len(counts) <= lerax_utils._PROGRESS_MAX_CALLBACKS
    assert counts == sorted(set(counts))
    assert counts == _expected_counts(length, chunked, unroll)


@pytest.mark.parametrize("length", [2, 199])
@pytest.mark.parametrize("flag", [True, False, np.True_])  # `np.False_`: not in 0.4.26.
def test_a_bool_unroll_reports_as_its_number_of_steps(
    reports: list[tuple[int, int]], length: int, flag: Any
) -> None:
    def run(unroll: Any) -> Any:
        return filter_scan(
            lambda c, x: (c + x, None), jnp.float32(0), jnp.ones(length),
            unroll=unroll, progress=True,
        )  # fmt: skip

    for unroll in (flag, length if flag else 1):  # Whole, or one step at a time.
        jax.jit(lambda unroll=unroll: run(unroll))()
        jax.effects_barrier()
    assert reports[: len(reports) // 2] == reports[len(reports) // 2 :]


def _expected_counts(length: int, chunked: bool, unroll: int = 1) -> list[int]:
    """A loop in chunks reports before each chunk and at the end; one scan reports
    every `stride` steps and at its last step. One step (or a loop unrolled whole)
    reports only at the end."""
    if length == 1 or unroll >= length:
        return [length]
    if chunked:
        stride = cast(int, lerax_utils._chunk_size(length))
        return [*range(0, length, stride), length]
    return [*range(0, length - 1, lerax_utils._progress_stride(length)), length]


@given(st.integers(1, 10**6))
def test_chunk_size_divides_the_length(length: int) -> None:
    size = lerax_utils._chunk_size(length)
    divisors = (
        [d for d in range(1, length + 1) if length % d == 0] if length < 5000 else None
    )
    if divisors is not None:
        assert sorted(lerax_utils._divisors(length)) == divisors
    if size is not None:
        assert length % size == 0
        assert length // size + 1 <= lerax_utils._PROGRESS_MAX_CALLBACKS


@given(st.integers(1, 4999))
@example(39)  # Its nearest divisor (13) is above the stride (8).
def test_chunk_size_is_the_divisor_nearest_the_stride(length: int) -> None:
    stride = lerax_utils._progress_stride(length)
    calls = lerax_utils._PROGRESS_MAX_CALLBACKS
    fits = [  # Within half and twice the stride, in few enough chunks.
        size
        for size in range(1, length + 1)
        if length % size == 0 and stride // 2 <= size <= 2 * stride
        and length // size + 1 <= calls
    ]  # fmt: skip
    nearest = min(fits, key=lambda size: (abs(size - stride), size), default=None)
    assert lerax_utils._chunk_size(length) == nearest


# Of two divisors as near the stride, the smaller: the bar then reports at least as
# often as the stride asks (9 steps at stride 2: every step, not every third).
@given(st.integers(1, 10**6))
@example(9)
def test_a_tie_between_chunk_sizes_goes_to_the_smaller(length: int) -> None:
    size = lerax_utils._chunk_size(length)
    target = lerax_utils._progress_stride(length)
    if size is None:
        return
    twin = 2 * target - size  # As near the stride, on its other side.
    assert not (
        max(1, target // 2) <= twin < size
        and length % twin == 0
        and length // twin + 1 <= lerax_utils._PROGRESS_MAX_CALLBACKS
    ), (length, size, twin)


@given(st.integers(1, 10**12))
def test_stride_bounds_the_calls(length: int) -> None:
    stride = lerax_utils._progress_stride(length)
    assert stride >= 1
    assert math.ceil(length / stride) + 1 <= lerax_utils._PROGRESS_MAX_CALLBACKS


def test_reverse_counts_up(reports: list[tuple[int, int]]) -> None:
    _, ys = filter_scan(_step, 1.0, jnp.arange(500.0), reverse=True, progress=True)
    jax.effects_barrier()
    counts = [c for c, _ in reports]
    assert counts[0] == 0 and counts[-1] == 500 and counts == sorted(counts)
    ref = jax.lax.scan(_step, 1.0, jnp.arange(500.0), reverse=True)[1]
    assert np.array_equal(ys, ref)


def test_vmap_draws_one_bar(reports: list[tuple[int, int]]) -> None:
    def run(x: Any) -> Any:
        return filter_scan(_step, x, jnp.ones(300), progress=True)

    jax.jit(run)(jnp.zeros(()))
    jax.effects_barrier()
    alone = list(reports)
    reports.clear()
    out = jax.jit(jax.vmap(run))(jnp.arange(5.0))
    jax.effects_barrier()
    assert reports == alone
    ref = jax.vmap(lambda x: jax.lax.scan(_step, x, jnp.ones(300)))(jnp.arange(5.0))
    assert _identical(out, ref)


def test_vmap_of_fori_and_map_draw_one_bar(reports: list[tuple[int, int]]) -> None:
    jax.vmap(lambda x: filter_fori_loop(0, 50, lambda i, c: c + i, x, progress=True))(
        jnp.arange(3.0)
    )
    jax.vmap(lambda x: filter_map(jnp.sin, x, progress=True))(jnp.ones((4, 60)))
    jax.effects_barrier()
    assert [c for c, t in reports if c == t] == [50, 60]
    assert len(reports) == len(set(reports))


def _jax_keeps_callbacks_in_scan_under_grad() -> bool:
    """Old JAX (0.4.26) drops `jax.debug.callback` from a scan body under `grad`."""
    seen: list[int] = []

    def loss(w: Any) -> Any:
        def body(c: Any, x: Any) -> Any:
            i, c = c
            jax.debug.callback(lambda i: seen.append(1), i)
            return (i + 1, c * w + x), None

        return jax.lax.scan(body, (jnp.int32(0), 1.0), jnp.ones(2))[0][1]

    jax.grad(loss)(0.5)
    jax.effects_barrier()
    return bool(seen)


def test_grad_sees_one_forward_pass(reports: list[tuple[int, int]]) -> None:
    def loss(w: Any, progress: bool) -> Any:
        carry, ys = filter_scan(
            lambda c, x: (jnp.tanh(c * w + x), c), jnp.ones(3), jnp.ones(100),
            progress=progress,
        )  # fmt: skip
        return jnp.sum(carry) + jnp.sum(ys)

    with_bar = jax.jit(jax.value_and_grad(loss), static_argnums=1)(0.7, True)
    jax.effects_barrier()
    without = jax.jit(jax.value_and_grad(loss), static_argnums=1)(0.7, False)
    assert _identical(with_bar, without)
    if not _jax_keeps_callbacks_in_scan_under_grad():
        assert reports == []  # No bar, as JAX drops the callback; same results.
        return
    assert [c for c, _ in reports][-1] == 100
    assert [c for c, _ in reports].count(0) == 1


_DIFFERENTIATED = {
    "grad": jax.grad,
    "vjp": lambda f: lambda w: jax.vjp(f, w)[1](1.0),
    "linearize": lambda f: lambda w: jax.linearize(f, w)[1](1.0),
}


@pytest.mark.parametrize("transform", sorted(_DIFFERENTIATED))
def test_reverse_mode_reports_every_run_inside_an_outer_loop(
    transform: str, reports: list[tuple[int, int]]
) -> None:
    def loss(w: Any, progress: bool = True) -> Any:
        def outer(c: Any, _: Any) -> Any:
            step = lambda c, x: (jnp.tanh(c * w + x), c)  # noqa: E731
            return filter_scan(step, c, jnp.ones(10), progress=progress)[0], None

        return jnp.sum(jax.lax.scan(outer, jnp.ones(3), None, length=4)[0])

    differentiated = _DIFFERENTIATED[transform]
    with_bar = jax.block_until_ready(differentiated(loss)(0.7))
    jax.effects_barrier()
    without = differentiated(functools.partial(loss, progress=False))(0.7)
    assert _identical(with_bar, without)
    if not _jax_keeps_callbacks_in_scan_under_grad():
        return  # JAX drops the callbacks: no bar, and the same results.
    counts = [c for c, _ in reports]
    assert counts.count(0) == 4 and counts.count(10) == 4


def test_inner_bar_is_suppressed(reports: list[tuple[int, int]]) -> None:
    def outer(c: Any, _: Any) -> Any:
        c = filter_fori_loop(0, 10, lambda i, a: a + 1.0, c, progress="inner")
        c, _ = filter_scan(lambda a, _: (a + 1, None), c, length=7, progress=True)
        return c, None

    jax.jit(lambda: filter_scan(outer, 0.0, length=20, progress="outer"))()
    jax.effects_barrier()
    assert {t for _, t in reports} == {20}
    reports.clear()
    # Outside a bar, the inner loop draws its own.
    filter_scan(outer, 0.0, length=2)
    jax.effects_barrier()
    assert [c for c, t in reports if c == t] == [10, 7, 10, 7]


#
# Errors and tidiness
#


def _raise_at_50(i: Any) -> None:
    if int(i) == 50:
        raise RuntimeError("boom")


def _fails_at_step_50(c: Any, x: Any) -> Any:
    """A step whose host callback raises at x == 50."""
    jax.debug.callback(_raise_at_50, x)
    return c + x, None


@pytest.mark.parametrize("progress", [False, True])
def test_loops_with_number_carries_run_without_jit_as_lax(progress: bool) -> None:
    with jax.disable_jit():  # The carries stay Python numbers, with a bar too.
        scans = [
            filter_scan(_step, 0.0, jnp.arange(5.0), progress=progress),
            jax.lax.scan(_step, 0.0, jnp.arange(5.0)),
        ]
        add = lambda i, c: c * 0.5 + i  # noqa: E731
        fori = [filter_fori_loop(0, 5, add, 1.0, progress=progress)]
        fori.append(jax.lax.fori_loop(0, 5, add, 1.0))
    assert _identical(*scans)
    assert _identical(*map(jnp.asarray, fori))  # With a bar, an array: as under jit.


@pytest.mark.parametrize("no_jit", [False, True])  # Without jit, raised in the loop.
def test_exception_ends_the_line_eagerly(
    capsys: pytest.CaptureFixture[str], no_jit: bool
) -> None:
    with pytest.raises(Exception, match="boom"), jax.disable_jit(no_jit):
        filter_scan(_fails_at_step_50, 0.0, jnp.arange(100.0), progress=True)
        jax.effects_barrier()
    jax.effects_barrier()
    err = capsys.readouterr().err
    assert err.startswith("\r") and err.endswith("\n") and err.count("\n") == 1
    assert lerax_utils._open_bars == set()


def test_exception_under_jit_ends_the_line_before_the_next(
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = jax.jit(lambda xs: filter_scan(_fails_at_step_50, 0.0, xs, progress="first"))
    with pytest.raises(Exception, match="boom"):
        run(jnp.arange(100.0))
        jax.effects_barrier()
    jax.effects_barrier()
    filter_scan(_step, 0.0, jnp.ones(3), progress="second")
    jax.effects_barrier()
    err = capsys.readouterr().err
    first, second = err.split("second", 1)
    assert first.rstrip("\r").endswith("\n")
    assert err.endswith("\n")


@pytest.mark.parametrize("bad", [None, 1.5, b"x", ["x"]])
def test_progress_must_be_bool_or_str(bad: Any) -> None:
    for call in (
        lambda: filter_scan(_step, 0.0, jnp.ones(2), progress=bad),
        lambda: filter_fori_loop(0, 2, lambda i, c: c, 0.0, progress=bad),
        lambda: filter_map(jnp.sin, jnp.ones(2), progress=bad),
        lambda: filter_while_loop(lambda c: c < 2, lambda c: c + 1, 0, progress=bad),
    ):
        with pytest.raises(TypeError, match="`progress` must be a bool or a string"):
            call()


def test_fori_progress_needs_concrete_bounds() -> None:
    with pytest.raises(TypeError, match="`progress` needs concrete bounds"):
        jax.jit(lambda n: filter_fori_loop(0, n, lambda i, c: c + i, 0, progress=True))(
            3
        )
    # Without a bar, traced bounds are fine.
    assert jax.jit(lambda n: filter_fori_loop(0, n, lambda i, c: c + i, 0))(4) == 6


def test_map_progress_with_batch_size_is_refused() -> None:
    with pytest.raises(TypeError, match="cannot be combined with `batch_size`"):
        filter_map(jnp.sin, jnp.ones(4), batch_size=2, progress=True)


def test_empty_loop_draws_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert filter_scan(_step, 1.0, jnp.ones(0), progress=True)[0] == 1.0
    assert filter_fori_loop(5, 5, lambda i, c: c + i, 2, progress=True) == 2
    jax.effects_barrier()
    assert capsys.readouterr().err == ""


#
# The program: unchanged without a bar, same results with one
#


def _jaxpr(fun: Any, *args: Any) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", str(jax.make_jaxpr(fun)(*args)))


def test_progress_false_adds_nothing() -> None:
    xs = jnp.ones((6, 2))
    assert _jaxpr(lambda x: filter_scan(_step, x[0], x, progress=False), xs) == _jaxpr(
        lambda x: jax.lax.scan(_step, x[0], x), xs
    )
    assert _jaxpr(
        lambda x: filter_scan(_step, x[0], x, reverse=True, progress=False), xs
    ) == _jaxpr(lambda x: jax.lax.scan(_step, x[0], x, reverse=True), xs)
    assert _jaxpr(
        lambda x: filter_fori_loop(0, 6, lambda i, c: c + i, x, progress=False), xs
    ) == _jaxpr(lambda x: jax.lax.fori_loop(0, 6, lambda i, c: c + i, x), xs)
    assert _jaxpr(lambda x: filter_map(jnp.sin, x, progress=False), xs) == _jaxpr(
        lambda x: jax.lax.map(jnp.sin, x), xs
    )
    cond, body = lambda c: c[0, 0] < 5, lambda c: c + 1
    assert _jaxpr(
        lambda x: filter_while_loop(cond, body, x, progress=False), xs
    ) == _jaxpr(lambda x: jax.lax.while_loop(cond, body, x), xs)
    # And with a bar, a callback is added.
    assert "debug_callback" in _jaxpr(
        lambda x: filter_scan(_step, x[0], x, progress=True), xs
    )


_carries = st.sampled_from(
    [
        lambda: jnp.arange(3.0),
        lambda: (jnp.ones((2, 2)), 0, "label"),
        lambda: {"w": jnp.linspace(-1, 1, 4), "n": jnp.int32(3), "s": None},
    ]
)


@settings(max_examples=6)
@given(
    make=_carries,
    length=st.integers(1, 600),
    reverse=st.booleans(),
    progress=st.sampled_from([True, "run"]),
)
def test_results_bit_identical_with_and_without_bar(
    make: Any, length: int, reverse: bool, progress: Any
) -> None:
    def step(carry: Any, x: Any) -> Any:
        new = jax.tree.map(
            lambda a: jnp.sin(a * 1.01 + x).astype(a.dtype) if eqx.is_array(a) else a,
            carry,
        )
        return new, jax.tree.map(lambda a: a * x if eqx.is_array(a) else a, new)

    def every_loop(carry: Any, xs: Any, bar: Any) -> Any:
        return (
            filter_scan(step, carry, xs, reverse=reverse, progress=bar),
            filter_fori_loop(
                2, 2 + length % 40, lambda i, c: step(c, i * 0.1)[0], carry,
                progress=bar,
            ),
            filter_map(lambda x: step(carry, x)[1], xs, progress=bar),
        )  # fmt: skip

    @eqx.filter_jit
    def both(carry_arrays: Any, xs: Any) -> Any:
        carry = eqx.combine(carry_arrays, static)
        return every_loop(carry, xs, progress), every_loop(carry, xs, False)

    carry_arrays, static = eqx.partition(make(), eqx.is_array)
    with_bar, without = both(carry_arrays, jnp.linspace(0.0, 1.0, length))
    jax.effects_barrier()
    assert _identical(with_bar, without)


def test_fori_counts_from_lower(reports: list[tuple[int, int]]) -> None:
    total = filter_fori_loop(3, 53, lambda i, c: c + i, 0, progress=True)
    jax.effects_barrier()
    assert total == sum(range(3, 53))
    counts = [c for c, _ in reports]
    assert counts[0] == 0 and counts[-1] == 50 == reports[-1][1]
    assert counts == sorted(counts)


@pytest.mark.parametrize("lower, upper", [(5, 2), (4, 4), (-3, -7)])
def test_fori_bounds_that_run_no_step_draw_no_bar(
    lower: int, upper: int, reports: list[tuple[int, int]]
) -> None:
    body = lambda i, c: c + i  # noqa: E731
    want = jax.lax.fori_loop(lower, upper, body, 1.5)
    run = lambda c: filter_fori_loop(lower, upper, body, c, progress=True)  # noqa: E731
    for call in (run, jax.jit(run)):
        assert _identical(call(1.5), want)
    jax.effects_barrier()
    assert reports == []


def test_trace_time_errors_pass_through_with_a_bar(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(TypeError, match="must return a pair"):
        jax.jit(lambda x: filter_scan(lambda c, _: c, x, length=3, progress=True))(1.0)
    jax.effects_barrier()
    assert capsys.readouterr().err == ""
    assert getattr(lerax_utils._progress_tracing, "depth", 0) == 0


#
# How the loop runs: in chunks, and as one scan under differentiation
#


def _chunked(jaxpr: str) -> bool:
    """Whether a loop with a bar ran in chunks: a scan inside a scan, in a custom_jvp
    that differentiates the one-scan form."""
    return "custom_jvp_call" in jaxpr and jaxpr.count("scan[") >= 2


@settings(max_examples=10)
@given(
    length=st.integers(1, 700),
    reverse=st.booleans(),
    unroll=st.sampled_from([1, 3]),
    batched=st.booleans(),
)
def test_gradients_bit_identical_with_and_without_bar(
    length: int, reverse: bool, unroll: int, batched: bool
) -> None:
    # `w` is closed over and used three times per step: its cotangent is a sum over
    # every step, whose order the bar must not change.
    def loss(w: Any, h0: Any, xs: Any, progress: bool) -> Any:
        def step(h: Any, x: Any) -> Any:
            h = jnp.tanh(w @ h + x * w[0] + jnp.sin(w[1]))
            return h * w[2, 0], jnp.sum(h * w[0])

        h, ys = filter_scan(
            step, h0, xs, reverse=reverse, unroll=unroll, progress=progress
        )
        return jnp.sum(h) + jnp.sum(ys * jnp.cos(ys))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    if batched:
        grad = jax.vmap(grad, in_axes=(None, 0, None, None))
    run = jax.jit(grad, static_argnums=3)
    w = jnp.linspace(-0.7, 0.6, 9, dtype=jnp.float32).reshape(3, 3)
    h0 = jnp.linspace(0.1, 0.3, 6 if batched else 3).reshape((2, 3) if batched else 3)
    xs = jnp.sin(jnp.arange(length * 3, dtype=jnp.float32)).reshape(length, 3)
    with_bar = run(w, h0, xs, True)
    jax.effects_barrier()
    without = run(w, h0, xs, False)
    if not batched:
        assert _identical(with_bar, without)
        if _HAS_BARRIER:
            # Undifferentiated, the loop runs in chunks, and the sums that consume
            # its outputs must still round as without the bar.
            forward = jax.jit(loss, static_argnums=3)
            assert _identical(forward(w, h0, xs, True), forward(w, h0, xs, False))
        return
    # Batched, `w @ h` is a matrix product, which XLA may round differently in two
    # different programs (as it does for `jax.lax.scan` with and without any host
    # call in its step): the README and the docstrings say so.
    assert jax.tree.structure(with_bar) == jax.tree.structure(without)
    for a, b in zip(jax.tree.leaves(with_bar), jax.tree.leaves(without), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [1, 10, 997, 1000, 2003])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_loop_matches_lax_scan(
    reports: list[tuple[int, int]], length: int, reverse: bool
) -> None:
    def step(c: Any, x: Any) -> Any:
        return (c[0] * 0.5 + x, c[1] + 1), {"y": c[0] * x, "n": c[1]}

    init = (jnp.float32(1.0), jnp.int32(0))
    xs = jnp.cos(jnp.arange(length, dtype=jnp.float32))
    ours = jax.jit(lambda: filter_scan(step, init, xs, reverse=reverse, progress=True))
    chunked = _chunked(str(jax.make_jaxpr(ours)()))
    assert chunked == (length > 1 and lerax_utils._chunk_size(length) is not None)
    out = ours()
    jax.effects_barrier()
    assert _identical(out, jax.lax.scan(step, init, xs, reverse=reverse))
    assert [c for c, _ in reports] == _expected_counts(length, chunked)


def _print_step(c: Any, x: Any) -> Any:
    jax.debug.callback(lambda: None)
    return c + x, c


@pytest.mark.parametrize(
    ("step", "init"),
    [
        (_print_step, jnp.float32(0.0)),  # The step has an effect of its own.
        (lambda c, x: (c + x, c), 0.0),  # A weak carry that becomes strong.
    ],
)
def test_one_scan_form_where_chunks_do_not_apply(
    reports: list[tuple[int, int]], step: Any, init: Any
) -> None:
    xs = jnp.arange(300, dtype=jnp.float32)
    ours = jax.jit(lambda: filter_scan(step, init, xs, progress=True))
    assert not _chunked(str(jax.make_jaxpr(ours)()))
    out = ours()
    jax.effects_barrier()
    assert _identical(out, jax.jit(lambda: jax.lax.scan(step, init, xs))())
    assert [c for c, _ in reports][0] == 0 and reports[-1] == (300, 300)


def test_prng_key_in_carry_under_grad() -> None:
    def step(carry: Any, x: Any) -> Any:
        key, h = carry
        key, sub = jax.random.split(key)
        h = jnp.tanh(h * 0.9 + x + jax.random.normal(sub, h.shape))
        return (key, h), h.sum()

    def loss(w: Any, progress: bool) -> Any:
        (key, h), ys = filter_scan(
            lambda c, x: step(c, x * w), (jax.random.key(0), jnp.ones(3)),
            jnp.arange(50.0), progress=progress,
        )  # fmt: skip
        return h.sum() + ys.sum(), jax.random.key_data(key)

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    with_bar = run(0.3, True)
    jax.effects_barrier()
    assert _identical(with_bar, run(0.3, False))
    forward = jax.jit(loss, static_argnums=1)
    assert _identical(forward(0.3, True), forward(0.3, False))


# Older jax has no public, batchable `jax.lax.optimization_barrier`, and there sums of
# a chunked loop's outputs may round differently.
_HAS_BARRIER = hasattr(jax.lax, "optimization_barrier")


@pytest.mark.skipif(not _HAS_BARRIER, reason="no jax.lax.optimization_barrier")
@pytest.mark.parametrize("length", [100, 1001])
def test_sums_of_outputs_round_as_without_bar(length: int) -> None:
    # XLA would fold the chunked outputs' reshape into the sum below and round it
    # differently (seen with this MLP at these lengths), unless the loop keeps its
    # outputs apart.
    mlp = eqx.nn.MLP(16, 16, width_size=32, depth=2, key=jax.random.key(0))

    def step(carry: Any, x: Any) -> Any:
        model, hidden = carry
        hidden = jnp.tanh(model(hidden + x))
        model = jax.tree.map(lambda w: 0.999 * w if eqx.is_array(w) else w, model)
        return (model, hidden), jnp.sum(hidden)

    @eqx.filter_jit
    def total(model: Any, xs: Any, progress: bool) -> Any:
        (_, hidden), ys = filter_scan(
            step, (model, jnp.zeros(16)), xs, progress=progress
        )
        return jnp.sum(hidden) + jnp.sum(ys)

    xs = jax.random.normal(jax.random.key(length), (length, 16))
    with_bar = total(mlp, xs, True)
    jax.effects_barrier()
    assert _identical(with_bar, total(mlp, xs, False))


#
# Found by review: unroll, map sizes, fori bound types, several devices
#


@pytest.mark.parametrize(("length", "unroll"), [(64, 2), (1001, 7), (30, True)])
def test_unroll_results_bit_identical(length: int, unroll: Any) -> None:
    # Chunks would group the unrolled steps differently, and XLA would round them
    # differently: with `unroll`, the loop is one scan.
    a = jax.random.normal(jax.random.key(1), (16,))

    def step(c: Any, _: Any) -> Any:
        return c * 0.9 + jnp.sin(c).sum() * a / 16, None

    def run(c: Any, progress: bool) -> Any:
        return filter_scan(step, c, length=length, unroll=unroll, progress=progress)

    c0 = jax.random.normal(jax.random.key(2), (16,))
    forward = jax.jit(run, static_argnums=1)
    with_bar = forward(c0, True)
    jax.effects_barrier()
    assert _identical(with_bar, forward(c0, False))
    lax = jax.jit(lambda c: jax.lax.scan(step, c, None, length=length, unroll=unroll))
    assert _identical(with_bar, lax(c0))


def test_map_with_bar_refuses_inputs_of_different_lengths() -> None:
    xs = (jnp.arange(5.0), jnp.arange(6.0))
    with pytest.raises(ValueError) as without:
        filter_map(lambda x: x[0] + x[1], xs)
    with pytest.raises(ValueError) as with_bar:
        filter_map(lambda x: x[0] + x[1], xs, progress=True)
    assert str(with_bar.value) == str(without.value)


def test_fori_with_bar_checks_bound_types_as_lax() -> None:
    with pytest.raises(TypeError) as lax:
        jax.lax.fori_loop(np.uint8(0), 20, lambda i, c: c + 1, 0)
    with pytest.raises(TypeError) as ours:
        filter_fori_loop(np.uint8(0), 20, lambda i, c: c + 1, 0, progress=True)
    assert str(ours.value) == str(lax.value)


_SHARDED_BAR = """
import contextlib, io, json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import lerax_utils
from lerax_utils import filter_scan
mesh = Mesh(np.array(jax.devices()), ("d",))
x = jax.device_put(jnp.ones(8), NamedSharding(mesh, P("d")))
lines = {}
for name, length in [("chunks", 100), ("one scan", 97)]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        for _ in range(2):
            run = jax.jit(lambda x: filter_scan(
                lambda c, _: (c * 1.01, None), x, length=length, progress="s"))
            jax.block_until_ready(run(x))
            jax.effects_barrier()
    lines[name] = [part.strip() for part in err.getvalue().split("\\n") if part.strip()]
print(json.dumps({"lines": lines, "open": len(lerax_utils._open_bars)}))
"""


def test_several_devices_end_every_line_with_the_total() -> None:
    # Host calls from a computation on several devices come in no set order.
    report = run_on_four_devices(_SHARDED_BAR)
    assert report["open"] == 0
    for name, total in [("chunks", 100), ("one scan", 97)]:
        lines = report["lines"][name]
        assert len(lines) == 2, lines  # One per run, each ended.
        for line in lines:
            assert line.split("\r")[-1].startswith(f"s: 100% {total}/{total} ")


_EXPLICIT_BAR = """
import contextlib, io, json
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from lerax_utils import filter_map, filter_scan
mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
init = jax.device_put(jnp.linspace(0.0, 1.0, 64), NamedSharding(mesh, P("d")))
xs = jax.device_put(jnp.ones((1000, 64)) / 7, NamedSharding(mesh, P(None, "d")))
step = lambda c, x: (jnp.tanh(c * 0.9 + x), c * 2)
same, lines = [], []
with (getattr(jax, "set_mesh", None) or jax.sharding.use_mesh)(mesh):
    for length in (1000, 997):  # Chunks, and one scan.
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            ours = jax.jit(lambda c, x: filter_scan(step, c, x, progress="e"))(
                init, xs[:length])
            mapped = jax.jit(lambda x: filter_map(jnp.sin, x, progress="m"))(
                xs[:length])
            jax.effects_barrier()
        lax = jax.jit(lambda c, x: jax.lax.scan(step, c, x))(init, xs[:length])
        same.append(all(
            bool((a == b).all()) and a.sharding == b.sharding
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(lax))
        ) and bool((mapped == jnp.sin(xs[:length])).all()))
        lines.append([p.split("\\r")[-1] for p in err.getvalue().split("\\n") if p])
errors = []
along_steps = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("d")))
for run in (
    lambda bar: filter_scan(lambda c, x: (c + x, x), jnp.zeros(4), along_steps,
                            progress=bar),
    lambda bar: filter_map(jnp.sin, along_steps, progress=bar),
):
    with (getattr(jax, "set_mesh", None) or jax.sharding.use_mesh)(mesh):
        for bar in (False, True):
            try:
                jax.jit(lambda: run(bar))()
                errors.append(None)
            except Exception as error:
                errors.append([type(error).__name__, str(error)])
print(json.dumps({"same": same, "lines": lines, "errors": errors}))
"""


def test_explicitly_sharded_loops_with_a_bar_match_lax() -> None:
    # A report waits for its chunk's arrays without slicing them: a slice of an
    # explicitly sharded array may not be taken.
    if not hasattr(jax.sharding, "AxisType"):
        pytest.skip(f"jax {jax.__version__} has no explicit-sharding meshes")
    report = run_on_four_devices(_EXPLICIT_BAR)
    assert report["same"] == [True, True]
    for length, lines in zip((1000, 997), report["lines"], strict=True):
        assert [line.split(" [")[0] for line in lines] == [
            f"e: 100% {length}/{length}",
            f"m: 100% {length}/{length}",
        ]
    # A scan axis sharded across devices: JAX's own error, with the bar or without.
    without, with_bar, map_without, map_with_bar = report["errors"]
    assert without is not None and without == with_bar
    assert map_without is not None and map_without == map_with_bar


def test_run_after_a_failed_run_counts_from_zero(
    reports: list[tuple[int, int]],
) -> None:
    run = jax.jit(lambda xs: filter_scan(_fails_at_step_50, 0.0, xs, progress=True))
    with pytest.raises(Exception, match="boom"):
        run(jnp.arange(100.0))
        jax.effects_barrier()
    jax.effects_barrier()
    reports.clear()
    run(jnp.arange(100.0) + 100)  # The same program; no step fails now.
    jax.effects_barrier()
    assert [c for c, _ in reports] == _expected_counts(100, chunked=False)


class _BrokenPipe:
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def _closed() -> Any:
    stream = io.StringIO()
    stream.close()
    return stream


@pytest.mark.parametrize("stream", [None, _closed, _BrokenPipe])
@pytest.mark.parametrize("jit", [False, True])
def test_unusable_stderr_never_stops_the_run(
    monkeypatch: pytest.MonkeyPatch, stream: Any, jit: bool
) -> None:
    monkeypatch.setattr(sys, "stderr", stream and stream())
    run = functools.partial(filter_scan, _step, 0.0, progress="s")
    run = jax.jit(run) if jit else run
    for length in (3, 3, 1000):  # A second run ends the line of the one before.
        assert _identical(
            run(jnp.ones(length)), jax.lax.scan(_step, 0.0, jnp.ones(length))
        )
    with pytest.raises(Exception, match="boom"):  # A bar left open, ended at exit.
        filter_scan(_fails_at_step_50, 0.0, jnp.arange(100.0), progress=True)
        jax.effects_barrier()
    jax.effects_barrier()
    lerax_utils._end_open_lines()


@pytest.mark.parametrize("stream", [None, _closed, _BrokenPipe])
def test_an_unusable_stdout_still_lets_the_bar_be_drawn(
    monkeypatch: pytest.MonkeyPatch, stream: Any
) -> None:
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream and stream())
    monkeypatch.setattr(sys, "stderr", terminal)
    out = filter_scan(_step, 0.0, jnp.ones(3), progress="s")
    jax.effects_barrier()
    assert _identical(out, jax.lax.scan(_step, 0.0, jnp.ones(3)))
    assert _counts(terminal.getvalue())[-1] == (3, 3)


class _Buffered:
    """A stream that shows what was written only when flushed, as a pipe does."""

    def __init__(self, shown: list[str]) -> None:
        self.shown, self.pending = shown, ""

    def write(self, text: str) -> int:
        self.pending += text
        return len(text)

    def flush(self) -> None:
        self.shown.append(self.pending)
        self.pending = ""


def test_the_bar_shows_what_was_printed_before_it_and_then_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shown: list[str] = []
    monkeypatch.setattr(sys, "stdout", _Buffered(shown))
    monkeypatch.setattr(sys, "stderr", _Buffered(shown))
    print("before")
    filter_scan(_step, 0.0, jnp.ones(3), progress="s")
    jax.effects_barrier()
    assert "".join(shown).startswith("before\n")
    assert _counts("".join(shown))[-1] == (3, 3)


def test_closed_stderr_file_descriptor_never_stops_the_run() -> None:
    script = """
import jax, jax.numpy as jnp
from lerax_utils import filter_scan
step = lambda c, x: (c + x, c)
run = jax.jit(lambda xs: filter_scan(step, 0.0, xs, progress=True))
print(float(run(jnp.ones(100))[0]))
def boom(x):
    assert x != 50
fails = lambda c, x: (c + x, jax.debug.callback(boom, x))
try:  # A bar left open, its line ended at exit.
    jax.jit(lambda xs: filter_scan(fails, 0.0, xs, progress=True))(jnp.arange(99.0))
    jax.effects_barrier()
except Exception:
    print("raised")
"""
    command = ["sh", "-c", 'exec "$0" -c "$1" 2>&-', sys.executable, script]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env
    )
    assert (result.returncode, result.stdout) == (0, "100.0\nraised\n")


def test_the_line_of_a_bar_left_open_is_ended_at_exit() -> None:
    script = "import lerax_utils as L\nL._progress_update(L._ProgressBar('x', 4), 1)\n"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, capture_output=True, timeout=120, env=env)
    err = result.stderr.decode()  # Not as text, which would turn `\r` into `\n`.
    assert result.returncode == 0, err
    assert err.startswith("\rx:  25% 1/4 [") and err.endswith("]\n")
    assert err.count("\n") == 1


@pytest.mark.parametrize("wrapper", ["print_callback", "callback_wrapper"])
def test_printed_lines_get_lines_of_their_own_and_the_bar_is_redrawn(
    monkeypatch: pytest.MonkeyPatch, wrapper: str
) -> None:
    terminal = io.StringIO()  # Both streams, as a terminal shows them.
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    show = print_callback if wrapper == "print_callback" else callback_wrapper(print)

    def step(c: Any, x: Any) -> Any:
        show("update", x)
        return c + x, None

    jax.jit(lambda xs: filter_scan(step, 0.0, xs, progress="training"))(jnp.arange(9.0))
    jax.effects_barrier()
    lines = _drawn(terminal.getvalue())
    updates = [i for i, line in enumerate(lines) if "update" in line]
    assert [lines[i] for i in updates] == [f"update {float(x)}" for x in range(9)]
    # Every line is printed or the bar's, never both; after printing, the bar's next
    # report draws it again (the last report may come before the last print).
    assert all(i in updates or _LINE.match(line) for i, line in enumerate(lines))
    final = [i for i, line in enumerate(lines) if line.startswith("training: 100%")]
    assert len(final) == 1 and updates[0] < final[0]
    assert any(_LINE.match(line) for line in lines[updates[0] + 1 : final[0]])
    assert terminal.getvalue().endswith("\n")


def test_callbacks_that_print_nothing_do_not_redraw_the_bar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    seen: list[float] = []
    log = callback_wrapper(lambda x: seen.append(float(x)))

    def step(c: Any, x: Any) -> Any:
        log(x)
        return c + x, None

    jax.jit(lambda xs: filter_scan(step, 0.0, xs, progress=True))(jnp.arange(100.0))
    jax.effects_barrier()
    assert seen == [float(x) for x in range(100)]
    # Drawn at the loop's own reports (6 at most here), not after every callback.
    assert 1 <= len(_counts(terminal.getvalue())) <= 6


# The percentage: the whole part of the share done, from 0 to 100.
@given(
    st.integers(1, 10**9).flatmap(lambda t: st.tuples(st.integers(0, t), st.just(t)))
)
def test_the_percentage_is_the_whole_part_of_the_share_done(
    count_total: tuple[int, int],
) -> None:
    count, total = count_total
    bar = lerax_utils._ProgressBar("x", total, count=count)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        bar.draw(10.0, "")
    assert err.getvalue().startswith(
        f"\rx: {100 * count // total:3d}% {count}/{total} ["
    )


# The time left: the steps left at the rate so far (a power of two of seconds a step,
# so that every figure is exact).
@given(
    st.integers(1, 10**6).flatmap(lambda t: st.tuples(st.integers(1, t), st.just(t))),
    st.integers(0, 6).map(lambda e: 2**e),
)
def test_the_time_left_is_the_steps_left_at_the_rate_so_far(
    count_total: tuple[int, int], seconds_a_step: int
) -> None:
    (count, total), fmt = count_total, lerax_utils._format_seconds
    bar = lerax_utils._ProgressBar("x", total, count=count)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        bar.draw(float(count * seconds_a_step), "")
    elapsed, left = count * seconds_a_step, (total - count) * seconds_a_step
    assert err.getvalue() == (
        f"\rx: {100 * count // total:3d}% {count}/{total} "
        f"[{fmt(elapsed)}<{fmt(left)}, {1 / seconds_a_step:.2f} it/s]"
    )


@pytest.mark.parametrize("total", [10, None])
@pytest.mark.parametrize("count", [0, 3])
def test_with_no_time_elapsed_the_rate_and_the_time_left_are_unknown(
    count: int, total: int | None
) -> None:
    bar = lerax_utils._ProgressBar("x", total, count=count, start=5.0)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        bar.draw(5.0, "")
    shown = f"{count} it [00:00, ? it/s]"
    if total is not None:
        shown = f"{100 * count // total:3d}% {count}/{total} [00:00<?, ? it/s]"
    assert err.getvalue() == "\rx: " + shown


#
# filter_while_loop: a bar with no total
#


def _episode(limit: Any, x: Any, progress: bool | str = True) -> Any:
    """Runs until the step count reaches `limit` (traced or not)."""
    return filter_while_loop(
        lambda c: c[1] < limit,
        lambda c: (_step(c[0], 1.0)[0], c[1] + 1),
        (x, 0),
        progress=progress,
    )


def _while_reports(n: int) -> list[Any]:
    """The counts a loop of `n` steps reports (a first even with none), then its end
    (`None`)."""
    stride = lerax_utils._PROGRESS_WHILE_STRIDE
    points = [4**k for k in range(stride.bit_length())] + list(range(stride, n, stride))
    return [*sorted({p for p in points if p < n}), n, None]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 64, 1000, 2048, 5000, 20_000])
def test_while_reports_powers_of_four_then_every_stride(
    reports: list[Any], n: int
) -> None:
    jax.jit(_episode)(n, jnp.zeros(3))
    jax.effects_barrier()
    assert reports == [(c, None) for c in _while_reports(n)]
    counts = [0, *(c for c, _ in reports[:-1])]
    assert counts == sorted(counts) and counts[-1] == n
    assert len(reports) <= 14 + n // lerax_utils._PROGRESS_WHILE_STRIDE
    reports.clear()
    _episode(n, jnp.zeros(3))  # Eagerly (the program runs from the cache).
    jax.effects_barrier()
    assert reports == [(c, None) for c in _while_reports(n)]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 97, 3000])
def test_while_results_bit_identical_with_and_without_bar(n: int) -> None:
    x = jnp.linspace(-2.0, 2.0, 37)

    def run(progress: bool, n: Any, x: Any) -> Any:
        def body(c: Any) -> Any:
            y = jnp.tanh(c[0]) * 0.75 + c[0] * 0.5 + 0.1
            return jnp.sin(y) * y, c[1] + 1

        return filter_while_loop(lambda c: c[1] < n, body, (x, 0), progress=progress)

    for bar in (False, True):  # Jitted, with the length traced; vmapped; eager.
        with_bar, without = functools.partial(run, bar), functools.partial(run, False)
        assert _identical(jax.jit(with_bar)(n, x), jax.jit(without)(n, x))
        lengths = jnp.arange(37) % (n + 1)
        vmapped = [jax.jit(jax.vmap(f))(lengths, x) for f in (with_bar, without)]
        assert _identical(*vmapped)
        # Eagerly with the length traced: XLA inlines a loop that it can tell runs
        # once, and the chunked loop it cannot, so there the bits may differ.
        assert _identical(with_bar(jnp.asarray(n), x), without(jnp.asarray(n), x))
    jax.effects_barrier()


def test_while_line_has_no_total(capsys: pytest.CaptureFixture[str]) -> None:
    jax.jit(functools.partial(_episode, progress="episode"))(3000, jnp.zeros(3))
    jax.effects_barrier()
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1
    lines = [_WHILE_LINE.match(line) for line in _drawn(err)]
    assert all(lines), _drawn(err)
    assert lines[-1] is not None and lines[-1]["label"] == "episode"
    assert lines[-1]["count"] == "3000" and not _COUNT.search(err)
    _episode(0, jnp.zeros(3))  # No step: a line that says so.
    jax.effects_barrier()
    err = capsys.readouterr().err
    last = _WHILE_LINE.match(_drawn(err)[-1])
    assert last is not None and last["count"] == "0" and last["label"] is None
    assert err.endswith("\n") and err.count("\n") == 1


def test_while_under_vmap_draws_one_bar(capsys: pytest.CaptureFixture[str]) -> None:
    limits = jnp.array([3, 5000, 0, 100])
    _, steps = jax.jit(jax.vmap(lambda n: _episode(n, 0.0)))(limits)
    jax.effects_barrier()
    err = capsys.readouterr().err
    assert np.array_equal(steps, limits)
    assert err.endswith("\n") and err.count("\n") == 1
    last = _WHILE_LINE.match(_drawn(err)[-1])
    assert last is not None and last["count"] == "5000"


def test_while_bar_inside_a_bar_and_a_bar_inside_it_are_suppressed(
    reports: list[Any],
) -> None:
    def outer(c: Any, _: Any) -> Any:
        return _episode(10, c, progress="inner")[0], None

    jax.jit(lambda: filter_scan(outer, 0.0, length=20, progress="outer"))()
    jax.effects_barrier()
    assert {t for _, t in reports} == {20}
    reports.clear()

    def body(c: Any) -> Any:
        x = filter_fori_loop(0, 10, lambda i, a: a + 1.0, c[0], progress=True)
        return x, c[1] + 1

    jax.jit(
        lambda: filter_while_loop(lambda c: c[1] < 5, body, (0.0, 0), progress=True)
    )()
    jax.effects_barrier()
    assert reports == [(c, None) for c in _while_reports(5)]


def test_while_exception_ends_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    def body(c: Any) -> Any:
        jax.debug.callback(_raise_at_50, c[1])
        return c[0] + 1.0, c[1] + 1

    def run() -> Any:
        return filter_while_loop(lambda c: c[1] < 100, body, (0.0, 0), progress="a")

    with pytest.raises(Exception, match="boom"):
        run()
        jax.effects_barrier()
    jax.effects_barrier()
    err = capsys.readouterr().err
    assert err.startswith("\r") and err.endswith("\n") and err.count("\n") == 1
    assert lerax_utils._open_bars == set()
    # Under `jit` the error comes later: the next bar ends the line.
    with pytest.raises(Exception, match="boom"):
        jax.jit(run)()
        jax.effects_barrier()
    _episode(3, 0.0, progress="b")
    jax.effects_barrier()
    first, second = capsys.readouterr().err.split("b:", 1)
    assert first.rstrip("\r").endswith("\n") and second.endswith("\n")


def test_while_run_after_a_jitted_error_counts_from_zero(
    capsys: pytest.CaptureFixture[str],
) -> None:
    failing = [True]

    def check(i: Any) -> None:
        if failing:
            _raise_at_50(i)

    def body(c: Any) -> Any:
        jax.debug.callback(check, c[1])
        return c[0] + 1.0, c[1] + 1

    def run(n: Any) -> Any:
        return filter_while_loop(lambda c: c[1] < n, body, (0.0, 0), progress="a")

    with pytest.raises(Exception, match="boom"):
        jax.jit(run)(3000)
        jax.effects_barrier()
    failing.clear()
    for n in (3, 0):  # The same program, with and without steps.
        capsys.readouterr()
        jax.jit(run)(n)
        jax.effects_barrier()
        last = _WHILE_LINE.match(_drawn(capsys.readouterr().err)[-1])
        assert last is not None and last["count"] == str(n)


_CONDS_NOT_BOOLEAN = {
    "int": lambda c: (c < 3).astype(jnp.int32),
    "float": lambda c: (c < 3).astype(jnp.float32),
    "None": lambda c: None,
    "tuple": lambda c: (c < 3,),
    "str": lambda c: "yes",
}


@pytest.mark.parametrize("kind", list(_CONDS_NOT_BOOLEAN))
def test_while_bar_refuses_a_cond_that_is_not_boolean_as_lax_does(kind: str) -> None:
    cond = _CONDS_NOT_BOOLEAN[kind]
    with pytest.raises(TypeError) as by_lax:
        jax.lax.while_loop(cond, lambda c: c + 1, jnp.int32(0))
    with pytest.raises(TypeError) as by_ours:
        filter_while_loop(cond, lambda c: c + 1, jnp.int32(0), progress=True)
    assert str(by_ours.value) == str(by_lax.value)


def test_while_count_stops_at_its_largest_and_the_steps_go_on(
    reports: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lerax_utils, "_PROGRESS_MAX_COUNT", 100)  # int32's, else.
    x = jnp.linspace(-1.0, 1.0, 5)
    steps = jax.jit(lambda: _episode(300, x))()
    without = jax.jit(lambda: _episode(300, x, progress=False))()
    jax.effects_barrier()
    assert _identical(steps, without) and int(steps[1]) == 300
    assert reports == [(c, None) for c in [1, 4, 16, 64, 100, None]]


@settings(max_examples=10)
@given(
    length=st.integers(1, 400),
    flag=st.booleans(),
    count=st.integers(-1000, 1000),
    scale=st.floats(allow_nan=False),
)
def test_numbers_a_loop_passes_on_stay_python_numbers_with_a_bar(
    length: int, flag: bool, count: int, scale: float
) -> None:
    # The carry's bools are traced from the start; passed on unchanged, each comes
    # back the Python value it was, with a bar as without one.
    init = (flag, count, scale, jnp.zeros(()))
    expected = (flag, count, scale, jnp.full((), float(length)))

    def body(carry: Any) -> Any:
        return (*carry[:3], carry[3] + 1)

    with contextlib.redirect_stderr(io.StringIO()):
        for progress in (False, True, "bar"):
            outs = [
                filter_scan(
                    lambda c, _: (body(c), None), init, length=length, progress=progress
                )[0],
                filter_fori_loop(
                    0, length, lambda i, c: body(c), init, progress=progress
                ),
            ]
            jax.effects_barrier()
            for out in outs:
                assert eqx.tree_equal(out, expected, typematch=True), (progress, out)


@given(
    hours=st.integers(0, 1000),
    minutes=st.integers(0, 59),
    seconds=st.integers(0, 59),
    fraction=st.floats(0, 0.99),
)
@example(hours=1, minutes=0, seconds=0, fraction=0.0)
@example(hours=1, minutes=1, seconds=1, fraction=0.5)
def test_a_bars_times_show_hours_only_when_there_are_any(
    hours: int, minutes: int, seconds: int, fraction: float
) -> None:
    # `[h:]mm:ss` of the whole seconds: the hours only when there are any.
    total = hours * 3600 + minutes * 60 + seconds
    shown = f"{minutes:02d}:{seconds:02d}"
    assert lerax_utils._format_seconds(total + fraction) == (
        f"{hours}:{shown}" if hours else shown
    )
    assert lerax_utils._format_seconds(math.inf) == "?"
    assert lerax_utils._format_seconds(math.nan) == "?"


def test_while_bar_suppresses_a_bar_inside_its_cond(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def cond(c: Any) -> Any:
        inner = filter_while_loop(lambda u: u < 4, lambda u: u + 1, 0, progress="in")
        return c < 3 + 0 * inner

    assert filter_while_loop(cond, lambda c: c + 1, 0, progress="out") == 3
    jax.effects_barrier()
    err = capsys.readouterr().err
    last = _WHILE_LINE.match(_drawn(err)[-1])
    assert "in:" not in err and err.count("\n") == 1
    assert last is not None and last["label"] == "out" and last["count"] == "3"
