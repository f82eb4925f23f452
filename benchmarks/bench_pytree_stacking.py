"""unstack_pytree and stack_pytree against their obvious baselines, side by side.

The workload is a tree of 10 leaves, split into (or joined from) 1,000 slices. Each
line prints the ratio of medians, lerax_utils / baseline, and its target:

- JAX input: `jnp.unstack` per leaf, then `jax.tree.transpose` (target <= 1.0); also
  the naive `jnp.take` per index, for scale.
- NumPy input: plain NumPy slicing per leaf and index (target <= 1.5).
- First call on a new shape, against a repeat call on that shape (target <= 3). The
  next line shows the floor under that ratio: on a new shape, even the smallest
  program that slices every leaf (one row of each) has to be compiled, so no first
  call can beat `1 + compile / repeat`.
- stack_pytree: `jax.tree.map(jnp.stack)` over the 1,000 trees (target <= 1.1).
- Memory: bytes of the new JAX arrays, against the bytes of the data (target <= 1).

Usage: `python benchmarks/bench_pytree_stacking.py [--repeats N]`.
"""

import argparse
import statistics
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


def unstack_then_transpose(tree: Any) -> Any:
    per_leaf = jax.tree.map(lambda leaf: list(jnp.unstack(leaf)), tree)
    outer = jax.tree.structure(tree)
    inner = jax.tree.structure([0] * SLICES)
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
    """Time both, interleaved, after one warm-up call each (which compiles)."""
    seconds(ours, argument)
    seconds(baseline, argument)
    our_times, baseline_times = [], []
    for _ in range(repeats):
        our_times.append(seconds(ours, argument))
        baseline_times.append(seconds(baseline, argument))
    our_median = statistics.median(our_times)
    baseline_median = statistics.median(baseline_times)
    return our_median / baseline_median, our_median, baseline_median


FRESH_WIDTHS = range(13, 22)


def first_call_ratio(repeats: int) -> tuple[float, float, float]:
    """First unstacks on shapes never seen before, against repeats on those shapes.

    Nine fresh shapes; the medians of the first and the repeat times are compared.
    """
    firsts, repeat_medians = [], []
    for width in FRESH_WIDTHS:
        tree = batched_tree(width)
        firsts.append(seconds(unstack_pytree, tree))
        repeat_medians.append(
            statistics.median(seconds(unstack_pytree, tree) for _ in range(repeats))
        )
    first, repeat = statistics.median(firsts), statistics.median(repeat_medians)
    return first / repeat, first, repeat


def one_row_of_each(leaves: Any, index: Any) -> Any:
    return jax.tree.map(lambda leaf: leaf[index], leaves)


def compile_floor(repeat: float) -> tuple[float, float, float]:
    """`1 + compile / repeat`, where `compile` builds `one_row_of_each` for new shapes.

    Widths that `first_call_ratio` never uses, so neither measurement warms the other.
    """
    compiles = []
    for width in range(100, 100 + len(FRESH_WIDTHS)):
        tree = jax.block_until_ready(batched_tree(width))
        start = time.perf_counter()
        jax.jit(one_row_of_each).lower(tree, 0).compile()
        compiles.append(time.perf_counter() - start)
    compile_seconds = statistics.median(compiles)
    return 1 + compile_seconds / repeat, compile_seconds, repeat


def new_bytes(function: Callable[[Any], Any], argument: Any) -> tuple[int, Any]:
    """Bytes of the JAX arrays that `function` leaves alive, beyond those before it."""
    jax.block_until_ready(argument)
    before = {id(array) for array in jax.live_arrays()}
    result = jax.block_until_ready(function(argument))
    created = [array for array in jax.live_arrays() if id(array) not in before]
    return sum(array.nbytes for array in created), result


def report(name: str, ratio: float, ours: float, baseline: float, target: str) -> None:
    print(
        f"{name:44} {ratio:6.2f}  ({1e3 * ours:8.1f} ms vs {1e3 * baseline:8.1f} ms)"
        f"  target {target}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="unstack/stack_pytree benchmarks")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, {jax.devices()[0]}; {SLICES} slices x {LEAVES} leaves"
    )
    print(f"{'':44} {'ratio':>6}")

    tree = batched_tree(8)
    report(
        "unstack_pytree / jnp.unstack + transpose",
        *ratio_of_medians(unstack_pytree, unstack_then_transpose, tree, args.repeats),
        "<= 1.0",
    )
    report(
        "unstack_pytree / jnp.take per index",
        *ratio_of_medians(unstack_pytree, take_per_index, tree, args.repeats),
        "(for scale)",
    )
    numpy_tree = batched_tree(8, numpy=True)
    report(
        "unstack_pytree / NumPy slicing (NumPy input)",
        *ratio_of_medians(unstack_pytree, numpy_slicing, numpy_tree, args.repeats),
        "<= 1.5",
    )
    first_ratio, first, repeat = first_call_ratio(args.repeats)
    report(
        "unstack_pytree first call / repeat call", first_ratio, first, repeat, "<= 3"
    )
    report(
        "  floor: 1 + (compile one row of each) / repeat",
        *compile_floor(repeat),
        "(none)",
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
        print(f"{name + '_pytree new bytes / data bytes':44} {share:6.2f}  target <= 1")


if __name__ == "__main__":
    main()
