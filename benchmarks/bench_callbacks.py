"""Per-call overhead of callback_with_numpy_wrapper against a raw jax.debug.callback.

Two comparisons, each a pair of functions that make one callback converting its
argument to NumPy:

- `jit, JAX array`: jitted functions called 300 times per round on a JAX array,
  waiting for the callbacks with `jax.effects_barrier()` (target at most 1.15);
- `eager, NumPy`: eager calls, 300 per round, with a float64 NumPy array and a NumPy
  scalar. The wrapper hands them over on the host; the raw callback sends them
  through the device (and, with 64-bit mode off, casts them to 32 bits). The
  wrapper should be faster.

Rounds alternate between the contenders of all pairs, and the script prints the
ratio of the median round times for each pair.

Usage: `python benchmarks/bench_callbacks.py [--rounds N]`.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lerax_utils import callback_with_numpy_wrapper

CALLS = 300
received: list[Any] = []


def keep_last(*arrays: np.ndarray) -> None:
    received[:] = arrays


log = callback_with_numpy_wrapper(keep_last)


def raw_keep_last(*arrays: Any) -> None:
    keep_last(*(np.asarray(array) for array in arrays))


@jax.jit
def with_wrapper(x: jax.Array) -> jax.Array:
    log(x)
    return x + 1


@jax.jit
def with_raw_callback(x: jax.Array) -> jax.Array:
    jax.debug.callback(raw_keep_last, x)
    return x + 1


def jitted_round(function: Callable[[jax.Array], jax.Array]) -> Callable[[], float]:
    def run() -> float:
        x = jnp.zeros(16)
        start = time.perf_counter()
        for _ in range(CALLS):
            x = function(x)
        jax.block_until_ready(x)
        jax.effects_barrier()
        return time.perf_counter() - start

    return run


def eager_round(function: Callable[..., Any]) -> Callable[[], float]:
    values = (np.linspace(0.0, 1.0, 16), np.int64(3_000_000_000))

    def run() -> float:
        start = time.perf_counter()
        for _ in range(CALLS):
            function(*values)
        jax.effects_barrier()
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description="callback overhead")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    pairs = {
        "jit, JAX array": {
            "callback_with_numpy_wrapper": jitted_round(with_wrapper),
            "raw": jitted_round(with_raw_callback),
        },
        "eager, NumPy": {
            "callback_with_numpy_wrapper": eager_round(log),
            "raw": eager_round(lambda *a: jax.debug.callback(raw_keep_last, *a)),
        },
    }
    times = {(pair, name): [] for pair, rounds in pairs.items() for name in rounds}
    for rounds in pairs.values():
        for run in rounds.values():
            run()  # Compile and warm up.
    for _ in range(args.rounds):
        for pair, rounds in pairs.items():
            for name, run in rounds.items():
                times[pair, name].append(run())
    print(f"jax {jax.__version__}, {jax.devices()[0]}; {CALLS} calls a round")
    for (pair, name), values in times.items():
        per_call = 1e6 * statistics.median(values) / CALLS
        print(f"{pair:16} {name:28} {per_call:8.1f} us per call")
    for pair, target in (("jit, JAX array", "<= 1.15"), ("eager, NumPy", "< 1")):
        ratio = statistics.median(
            times[pair, "callback_with_numpy_wrapper"]
        ) / statistics.median(times[pair, "raw"])
        print(f"{pair}: ratio, wrapper / raw jax.debug.callback: {ratio:.3f} "
              f"(target {target})")  # fmt: skip


if __name__ == "__main__":
    main()
