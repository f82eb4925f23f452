"""unstack_pytree and stack_pytree against their obvious baselines, side by side.

Each line prints a ratio, lerax_utils / baseline (medians of interleaved runs), the
two times behind it, and its target:

- Repeat calls on JAX input, against `jnp.unstack` per leaf then `jax.tree.transpose`
  (target <= 1.1), on four trees: 10 leaves of (1000, 4) float32, one long thin leaf,
  one wide leaf, and a tree of mixed dtypes. Also the naive `jnp.take` per index, for
  scale.
- Many shapes, the reinforcement-learning case: 60 episodes of lengths 40 to 99, three
  passes, against the loop a user would write,
  `[jax.tree.map(lambda v: v[i], episode) for i in range(n)]` (target <= 1.0, in time
  and in peak memory). Each side runs in a fresh process, so that neither finds the
  other's programs compiled and peak RSS is its own; the processes alternate.
- First call on a shape never seen before, against `jnp.unstack`'s first call on a
  same-sized shape never seen before (target <= 0.05). The next line shows the floor
  that a compiled program sets: compiling the smallest program that slices every
  leaf (one row of each), as a multiple of a repeat call.
- NumPy input: plain NumPy slicing per leaf and index (target <= 1.5).
- stack_pytree: `jax.tree.map(jnp.stack)` over the 1,000 trees (target <= 1.1).
- Memory: bytes of the new JAX arrays, against the bytes of the data (target <= 1).

Usage: `python benchmarks/bench_pytree_stacking.py [--repeats N]`.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lerax_utils import stack_pytree, unstack_pytree

SLICES = 1_000
LEAVES = 10


def batched_tree(width: int, *, numpy: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    tree = {
        f"leaf{i}": rng.standard_normal((SLICES, width)).astype(np.float32)
        for i in range(LEAVES)
    }
    return tree if numpy else {k: jnp.asarray(v) for k, v in tree.items()}


def repeat_call_trees() -> dict[str, Any]:
    rng = np.random.default_rng(1)

    def normal(*shape: int, dtype: Any = np.float32) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape).astype(dtype))

    return {
        "10 leaves (1000, 4) float32": {f"leaf{i}": normal(1000, 4) for i in range(10)},
        "long thin: (2000,) float32": {"x": normal(2000)},
        "wide: (1000, 1024) float32": {"x": normal(1000, 1024)},
        "mixed dtypes, 5 leaves of 1000": {
            "f32": normal(1000, 4),
            "bf16": normal(1000, 8, dtype=jnp.bfloat16),
            "f16": normal(1000, 3, dtype=np.float16),
            "i32": jnp.asarray(rng.integers(-9, 9, (1000,), dtype=np.int32)),
            "bool": jnp.asarray(rng.random((1000, 2)) > 0.5),
        },
    }


def unstack_then_transpose(tree: Any) -> Any:
    per_leaf = jax.tree.map(lambda leaf: list(jnp.unstack(leaf)), tree)
    outer = jax.tree.structure(tree)
    length = jax.tree.leaves(tree)[0].shape[0]
    inner = jax.tree.structure([0] * length)
    return jax.tree.transpose(outer, inner, per_leaf)


def take_per_index(tree: Any) -> Any:
    return [
        jax.tree.map(lambda leaf, i=i: jnp.take(leaf, i, axis=0), tree)
        for i in range(SLICES)
    ]


def numpy_slicing(tree: Any) -> Any:
    return [{key: leaf[i] for key, leaf in tree.items()} for i in range(SLICES)]


def stack_with_tree_map(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def seconds(function: Callable[[Any], Any], argument: Any) -> float:
    start = time.perf_counter()
    jax.block_until_ready(function(argument))
    return time.perf_counter() - start


def ratio_of_medians(
    ours: Callable[[Any], Any],
    baseline: Callable[[Any], Any],
    argument: Any,
    repeats: int,
) -> tuple[float, float, float]:
    """Time both, interleaved, after warm-up calls.

    unstack_pytree slices a new shape on the host until that time would pay for a
    compile, which takes a few calls; eight warm-up calls reach the compiled program
    on every tree here, so the times are those of repeat calls.
    """
    for _ in range(8):
        seconds(ours, argument)
    seconds(baseline, argument)
    our_times, baseline_times = [], []
    for _ in range(repeats):
        our_times.append(seconds(ours, argument))
        baseline_times.append(seconds(baseline, argument))
    our_median = statistics.median(our_times)
    baseline_median = statistics.median(baseline_times)
    return our_median / baseline_median, our_median, baseline_median


# The many-shapes workload, run in a child process: `python this.py --episodes KIND`.
EPISODE_LENGTHS = range(40, 100)
PASSES = 3


def naive_loop(episode: Any) -> list[Any]:
    length = episode["rew"].shape[0]
    return [jax.tree.map(lambda v, i=i: v[i], episode) for i in range(length)]


def peak_rss_mib() -> float:
    """This process's peak resident memory (`VmHWM`; unlike `ru_maxrss`, it does not
    count the parent's memory at the time of the fork)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_episodes(kind: str) -> None:
    rng = np.random.default_rng(2)
    episodes = [
        {
            "obs": jnp.asarray(rng.standard_normal((n, 4)).astype(np.float32)),
            "rew": jnp.asarray(rng.standard_normal(n).astype(np.float32)),
            "done": jnp.asarray(np.arange(n) == n - 1),
        }
        for n in EPISODE_LENGTHS
    ]
    split = unstack_pytree if kind == "ours" else naive_loop
    jax.block_until_ready(split({"rew": jnp.zeros(3), "obs": jnp.zeros((3, 4))}))
    start = time.perf_counter()
    for _ in range(PASSES):
        for episode in episodes:
            jax.block_until_ready(split(episode))
    elapsed = time.perf_counter() - start
    print(json.dumps({"seconds": elapsed, "peak_mib": peak_rss_mib()}))


def episodes_in_child(kind: str) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--episodes", kind],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def many_shapes(rounds: int) -> tuple[tuple[float, float, float], ...]:
    ours, naive = [], []
    for _ in range(rounds):
        ours.append(episodes_in_child("ours"))
        naive.append(episodes_in_child("naive"))
    our_seconds = statistics.median(run["seconds"] for run in ours)
    naive_seconds = statistics.median(run["seconds"] for run in naive)
    our_peak = max(run["peak_mib"] for run in ours)
    naive_peak = max(run["peak_mib"] for run in naive)
    return (
        (our_seconds / naive_seconds, our_seconds, naive_seconds),
        (our_peak / naive_peak, our_peak, naive_peak),
    )


FRESH_WIDTHS = range(13, 16)


def first_call_ratio() -> tuple[float, float, float]:
    """First calls on shapes never seen before: ours against `jnp.unstack`'s.

    Each width is new to both; the medians over the widths are compared.
    """
    ours, baseline = [], []
    for width in FRESH_WIDTHS:
        ours.append(seconds(unstack_pytree, batched_tree(width)))
        baseline.append(seconds(unstack_then_transpose, batched_tree(width + 20)))
    first, first_baseline = statistics.median(ours), statistics.median(baseline)
    return first / first_baseline, first, first_baseline


def one_row_of_each(leaves: Any, index: Any) -> Any:
    return jax.tree.map(lambda leaf: leaf[index], leaves)


def compile_floor(repeat: float) -> tuple[float, float, float]:
    """`compile / repeat`, where `compile` builds `one_row_of_each` for new shapes."""
    compiles = []
    for width in range(100, 105):
        tree = jax.block_until_ready(batched_tree(width))
        start = time.perf_counter()
        jax.jit(one_row_of_each).lower(tree, 0).compile()
        compiles.append(time.perf_counter() - start)
    compile_seconds = statistics.median(compiles)
    return compile_seconds / repeat, compile_seconds, repeat


def new_bytes(function: Callable[[Any], Any], argument: Any) -> tuple[int, Any]:
    """Bytes of the JAX arrays that `function` leaves alive, beyond those before it."""
    jax.block_until_ready(argument)
    before = {id(array) for array in jax.live_arrays()}
    result = jax.block_until_ready(function(argument))
    created = [array for array in jax.live_arrays() if id(array) not in before]
    return sum(array.nbytes for array in created), result


def report(
    name: str, ratio: float, ours: float, baseline: float, target: str, unit: str = "ms"
) -> None:
    scale = 1e3 if unit == "ms" else 1.0
    print(
        f"{name:48} {ratio:6.3f}  ({scale * ours:8.1f} {unit} vs "
        f"{scale * baseline:8.1f} {unit})  target {target}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="unstack/stack_pytree benchmarks")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--episodes", choices=["ours", "naive"])
    args = parser.parse_args()
    if args.episodes:
        run_episodes(args.episodes)
        return
    print(f"jax {jax.__version__}, {jax.devices()[0]}")
    print(f"{'':48} {'ratio':>6}")

    repeat = 0.0
    for name, tree in repeat_call_trees().items():
        ratio, ours, baseline = ratio_of_medians(
            unstack_pytree, unstack_then_transpose, tree, args.repeats
        )
        report(f"repeat / unstack+transpose: {name}", ratio, ours, baseline, "<= 1.1")
        repeat = repeat or ours
    tree = batched_tree(8)
    report(
        "repeat / jnp.take per index (10 x (1000, 8))",
        *ratio_of_medians(unstack_pytree, take_per_index, tree, args.repeats),
        "(for scale)",
    )
    seconds_line, memory_line = many_shapes(args.rounds)
    report("60 episodes x 3 passes / naive v[i] loop", *seconds_line, "<= 1.0", "s")
    report("  peak RSS / naive v[i] loop's", *memory_line, "<= 1.0", "MiB")
    report(
        "first call / jnp.unstack's first (new shapes)",
        *first_call_ratio(),
        "<= 0.05",
    )
    report(
        "  floor: (compile one row of each) / repeat",
        *compile_floor(repeat),
        "(none)",
    )
    numpy_tree = batched_tree(8, numpy=True)
    report(
        "unstack_pytree / NumPy slicing (NumPy input)",
        *ratio_of_medians(unstack_pytree, numpy_slicing, numpy_tree, args.repeats),
        "<= 1.5",
    )
    trees = unstack_pytree(tree)
    report(
        "stack_pytree / jax.tree.map(jnp.stack)",
        *ratio_of_medians(stack_pytree, stack_with_tree_map, trees, args.repeats),
        "<= 1.1",
    )

    data_bytes = sum(leaf.nbytes for leaf in tree.values())
    unstack_bytes, slices = new_bytes(unstack_pytree, tree)
    stack_bytes, _ = new_bytes(stack_pytree, slices)
    for name, created in (("unstack", unstack_bytes), ("stack", stack_bytes)):
        share = created / data_bytes
        print(f"{name + '_pytree new bytes / data bytes':48} {share:6.2f}  target <= 1")


if __name__ == "__main__":
    main()
