"""filter_scan against a hand-partitioned `jax.lax.scan`, measured side by side.

The carry is an `eqx.nn.MLP` (with its activation functions as non-array leaves) and a
hidden state, over 1,000 steps. Both versions are timed in one process, interleaved,
and the script prints the ratio of medians for:

- run time of the compiled loop (target 1.00: it is the same program);
- trace + lower + compile time for a fresh function (target at most 1.10).

Usage: `python benchmarks/bench_filter_scan.py [--repeats N]`.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from lerax_utils import filter_scan

STEPS = 1_000


def step(carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    mlp, hidden = carry
    hidden = jnp.tanh(mlp(hidden + x))
    decay = jax.tree.map(lambda w: 0.999 * w, eqx.filter(mlp, eqx.is_array))
    mlp = eqx.combine(decay, eqx.filter(mlp, eqx.is_array, inverse=True))
    return (mlp, hidden), jnp.sum(hidden)


def with_filter_scan(init: Any, xs: jax.Array) -> Any:
    return filter_scan(step, init, xs)


def by_hand(init: Any, xs: jax.Array) -> Any:
    init_arrays, init_static = eqx.partition(init, eqx.is_array)

    def body(carry_arrays: Any, x: jax.Array) -> Any:
        carry, y = step(eqx.combine(carry_arrays, init_static), x)
        return eqx.filter(carry, eqx.is_array), y

    final, ys = jax.lax.scan(body, init_arrays, xs)
    return eqx.combine(final, init_static), ys


def make_program(scan: Callable[..., Any], static: Any) -> Callable[..., Any]:
    """A fresh function of the carry's arrays, for `jax.jit` to trace from scratch."""

    def program(arrays: Any, xs: jax.Array) -> Any:
        carry, ys = scan(eqx.combine(arrays, static), xs)
        return eqx.filter(carry, eqx.is_array), ys

    return program


def compile_seconds(
    scan: Callable[..., Any], arrays: Any, static: Any, xs: Any
) -> float:
    """Trace, lower and compile a fresh jitted function (no cache can help)."""
    start = time.perf_counter()
    jax.jit(make_program(scan, static)).lower(arrays, xs).compile()
    return time.perf_counter() - start


def run_seconds(compiled: Callable[..., Any], arrays: Any, xs: jax.Array) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(arrays, xs))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="filter_scan against lax.scan")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compile-repeats", type=int, default=10)
    args = parser.parse_args()

    mlp = eqx.nn.MLP(8, 8, width_size=64, depth=2, key=jax.random.key(0))
    init = (mlp, jnp.zeros(8))
    xs = jax.random.normal(jax.random.key(1), (STEPS, 8))
    arrays, static = eqx.partition(init, eqx.is_array)
    contenders = {"filter_scan": with_filter_scan, "hand-partitioned": by_hand}

    compiled = {}
    for name, scan in contenders.items():
        compiled[name] = jax.jit(make_program(scan, static)).lower(arrays, xs).compile()
        run_seconds(compiled[name], arrays, xs)  # Warm up.

    compile_times: dict[str, list[float]] = {name: [] for name in contenders}
    run_times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.compile_repeats):
        for name, scan in contenders.items():
            compile_times[name].append(compile_seconds(scan, arrays, static, xs))
    for _ in range(args.repeats):
        for name in contenders:
            run_times[name].append(run_seconds(compiled[name], arrays, xs))

    print(f"jax {jax.__version__}, equinox {eqx.__version__}, {jax.devices()[0]}")
    print(f"carry: eqx.nn.MLP(8, 8, width_size=64, depth=2), {STEPS} steps")
    print(f"{'':18}{'run (ms)':>12}{'trace+compile (ms)':>22}")
    for name in contenders:
        run_ms = 1e3 * statistics.median(run_times[name])
        compile_ms = 1e3 * statistics.median(compile_times[name])
        print(f"{name:18}{run_ms:12.3f}{compile_ms:22.1f}")
    run_ratio = statistics.median(run_times["filter_scan"]) / statistics.median(
        run_times["hand-partitioned"]
    )
    compile_ratio = statistics.median(compile_times["filter_scan"]) / statistics.median(
        compile_times["hand-partitioned"]
    )
    print(f"run-time ratio, filter_scan / hand:      {run_ratio:.3f} (target 1.00)")
    print(
        f"trace+compile ratio, filter_scan / hand: {compile_ratio:.3f} (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
