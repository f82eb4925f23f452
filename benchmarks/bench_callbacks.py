"""Per-call overhead of callback_with_numpy_wrapper against a raw jax.debug.callback.

Both jitted functions make one callback that converts its array to NumPy; each is
called 300 times per round, waiting for the callbacks with `jax.effects_barrier()`.
Rounds alternate between the two, and the script prints the ratio of the median
round times (target at most 1.15).

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


def keep_last(array: np.ndarray) -> None:
    received[:] = [array]


log = callback_with_numpy_wrapper(keep_last)


@jax.jit
def with_wrapper(x: jax.Array) -> jax.Array:
    log(x)
    return x + 1


@jax.jit
def with_raw_callback(x: jax.Array) -> jax.Array:
    jax.debug.callback(lambda array: keep_last(np.asarray(array)), x)
    return x + 1


def round_seconds(function: Callable[[jax.Array], jax.Array], x: jax.Array) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        x = function(x)
    jax.block_until_ready(x)
    jax.effects_barrier()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="callback overhead")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    x = jnp.zeros(16)
    contenders = {"callback_with_numpy_wrapper": with_wrapper, "raw": with_raw_callback}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for function in contenders.values():
        round_seconds(function, x)  # Compile and warm up.
    for _ in range(args.rounds):
        for name, function in contenders.items():
            times[name].append(round_seconds(function, x))
    print(f"jax {jax.__version__}, {jax.devices()[0]}; {CALLS} calls a round")
    for name, values in times.items():
        per_call = 1e6 * statistics.median(values) / CALLS
        print(f"{name:28} {per_call:8.1f} us per call")
    ratio = statistics.median(times["callback_with_numpy_wrapper"]) / statistics.median(
        times["raw"]
    )
    print(f"ratio, wrapper / raw jax.debug.callback: {ratio:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
