"""The cost of a progress bar: a 10,000-step jitted `filter_scan` with a small MLP in
the carry, run with `progress=True` and without, interleaved in one process.

The bar reports to the host at most 200 times per loop, so its cost should be within
noise: the target is a ratio of medians (with / without) of at most 1.05. The bar is
drawn to stderr; this script sends it to a null stream while timing.

Usage: `python benchmarks/bench_progress.py [--repeats N] [--steps N]`.
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

from lerax_utils import filter_scan


def main() -> None:
    parser = argparse.ArgumentParser(description="The cost of a progress bar.")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10_000)
    args = parser.parse_args()
    mlp = eqx.nn.MLP(16, 16, width_size=32, depth=2, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (args.steps, 16))

    def make(progress: bool) -> Any:
        @eqx.filter_jit
        def run(mlp: Any, xs: jax.Array) -> Any:
            return filter_scan(mlp_step, (mlp, jnp.zeros(16)), xs, progress=progress)

        return run

    runs = {"with bar": make(True), "without": make(False)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with contextlib.redirect_stderr(io.StringIO()):
        for run in runs.values():  # Compile, and warm up.
            jax.block_until_ready(run(mlp, xs))
            jax.effects_barrier()
        for _ in range(args.repeats):
            for name, run in runs.items():  # Interleaved.
                start = time.perf_counter()
                jax.block_until_ready(run(mlp, xs))
                jax.effects_barrier()  # The bar's last line is part of the cost.
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = [a / b for a, b in zip(times["with bar"], times["without"], strict=True)]
    print(f"{args.steps}-step jitted filter_scan, MLP carry, {args.repeats} repeats")
    for name, median in medians.items():
        print(f"  {name:9s} median {median * 1e3:8.2f} ms")
    print(
        f"  ratio of medians (with / without): "
        f"{medians['with bar'] / medians['without']:.3f} (target <= 1.05); "
        f"paired ratios: best {min(ratios):.3f}, worst {max(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
