"""The cost of a progress bar: a 10,000-step jitted `filter_scan` with a small MLP in
the carry, run with `progress=True` and without, interleaved in one process; then
the same on a cheap elementwise step, where a bar's cost per step weighs most.

The bar reports to the host at most 200 times per loop, so its cost should be within
noise: the target is a ratio of medians (with / without) of at most 1.05. The bar is
drawn to stderr; this script sends it to a null stream while timing.

A second row, 100,000 steps, shows the cost on a longer loop (more reports, but a
fixed cost spread over more steps).

A third program, timed alongside, is the loop with one host call that never runs (in
a branch never taken): the floor for any bar drawn through JAX's host callbacks. JAX
dispatches every program that holds a host callback through its Python path, and on
CPU runs it synchronously; that alone costs about as much as the target allows.

Where `jax-tqdm` is installed (the `bench` extra), its `scan_tqdm` bar on the same
loop (written with `jax.lax.scan` and the module partitioned by hand) is timed
alongside too: the target is our bar at most 0.5x its time.

Last, `filter_while_loop`'s bar (no total: the count, time and rate) on the same step
run as a while loop of the same length, with and without the bar; no target is set.

Usage: `python benchmarks/bench_progress.py [--repeats N] [--steps N [N ...]]`.
"""

import argparse
import contextlib
import io
import statistics
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from bench_control_flow import mlp_step

from lerax_utils import filter_scan, filter_while_loop


def elementwise_step(c: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A cheap step (the one issue 24 names), where a bar's per-step cost shows."""
    c = jnp.tanh(c) * 0.75 + c * 0.5 + x
    return c, jnp.sin(c) * c


def workloads(steps: int) -> dict[str, tuple[Any, Any, jax.Array]]:
    """Each workload as (step, initial carry, xs)."""
    mlp = eqx.nn.MLP(16, 16, width_size=32, depth=2, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (steps, 16))
    return {
        "MLP carry": (mlp_step, (mlp, jnp.zeros(16)), xs),
        "elementwise carry": (elementwise_step, jnp.zeros(16), xs),
    }


def measure(steps: int, repeats: int, workload: str) -> None:
    step, init, xs = workloads(steps)[workload]

    def make(progress: bool) -> Any:
        @eqx.filter_jit
        def run(init: Any, xs: jax.Array) -> Any:
            return filter_scan(step, init, xs, progress=progress)

        return run

    def never_called() -> None:
        raise AssertionError("the floor's host call ran")

    @eqx.filter_jit
    def floor(init: Any, xs: jax.Array) -> Any:
        jax.lax.cond(
            jnp.isnan(xs[0, 0]), lambda: jax.debug.callback(never_called), lambda: None
        )
        return filter_scan(step, init, xs)

    runs = {"with bar": make(True), "without": make(False), "floor": floor}
    try:
        from jax_tqdm import scan_tqdm  # pyright: ignore[reportMissingImports]
    except ImportError:
        scan_tqdm = None
    if scan_tqdm is not None:
        static = eqx.filter(init, eqx.is_array, inverse=True)

        @scan_tqdm(steps)
        def tqdm_step(carry: Any, indexed_x: Any) -> Any:
            new_carry, y = step(eqx.combine(carry, static), indexed_x[1])
            return eqx.filter(new_carry, eqx.is_array), y

        @eqx.filter_jit
        def with_jax_tqdm(init: Any, xs: jax.Array) -> Any:
            carry = eqx.filter(init, eqx.is_array)
            return jax.lax.scan(tqdm_step, carry, (jnp.arange(steps), xs))

        runs["jax-tqdm"] = with_jax_tqdm
    times: dict[str, list[float]] = {name: [] for name in runs}
    with contextlib.redirect_stderr(io.StringIO()):
        for run in runs.values():  # Compile, and warm up.
            jax.block_until_ready(run(init, xs))
            jax.effects_barrier()
        for _ in range(repeats):
            for name, run in runs.items():  # Interleaved.
                start = time.perf_counter()
                jax.block_until_ready(run(init, xs))
                jax.effects_barrier()  # The bar's last line is part of the cost.
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = [a / b for a, b in zip(times["with bar"], times["without"], strict=True)]
    print(f"{steps}-step jitted filter_scan, {workload}, {repeats} repeats")
    for name, median in medians.items():
        print(f"  {name:9s} median {median * 1e3:8.2f} ms")
    target = " (target <= 1.05)" if steps == 10_000 else " (target <= 1.10)"
    print(
        f"  ratio of medians (with / without): "
        f"{medians['with bar'] / medians['without']:.3f}{target}; "
        f"paired ratios: best {min(ratios):.3f}, worst {max(ratios):.3f}"
    )
    if "jax-tqdm" in medians:
        print(
            f"  with bar / jax-tqdm: {medians['with bar'] / medians['jax-tqdm']:.3f} "
            f"(target <= 0.5); jax-tqdm / without: "
            f"{medians['jax-tqdm'] / medians['without']:.3f}"
        )
    print(
        f"  floor (a host call that never runs / without): "
        f"{medians['floor'] / medians['without']:.3f}; "
        f"with bar / floor: {medians['with bar'] / medians['floor']:.3f}"
    )


def measure_while(steps: int, repeats: int) -> None:
    mlp = eqx.nn.MLP(16, 16, width_size=32, depth=2, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (steps, 16))

    def make(progress: bool) -> Any:
        def body(state: Any) -> Any:
            carry, i = state
            return mlp_step(carry, xs[i])[0], i + 1

        @eqx.filter_jit
        def run(mlp: Any) -> Any:
            init = ((mlp, jnp.zeros(16)), 0)
            return filter_while_loop(
                lambda s: s[1] < steps, body, init, progress=progress
            )

        return run

    runs = {"with bar": make(True), "without": make(False)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with contextlib.redirect_stderr(io.StringIO()):
        for run in runs.values():
            jax.block_until_ready(run(mlp))
            jax.effects_barrier()
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                jax.block_until_ready(run(mlp))
                jax.effects_barrier()
                times[name].append(time.perf_counter() - start)
    with_bar, without = (statistics.median(times[n]) for n in ("with bar", "without"))
    print(f"{steps}-step jitted filter_while_loop, MLP carry, {repeats} repeats")
    print(f"  with bar {with_bar * 1e3:.2f} ms, without {without * 1e3:.2f} ms")
    print(f"  ratio of medians (with / without): {with_bar / without:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description="The cost of a progress bar.")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--steps", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    for workload in ("MLP carry", "elementwise carry"):
        for steps in args.steps:
            repeats = args.repeats if steps <= 10_000 else max(args.repeats // 5, 5)
            measure(steps, repeats, workload)
    for steps in args.steps:
        measure_while(
            steps, args.repeats if steps <= 10_000 else max(args.repeats // 5, 5)
        )


if __name__ == "__main__":
    main()
