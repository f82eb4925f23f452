"""Checkpoint cost per leaf: `save_pytree` + `load_pytree` against two baselines.

- safetensors: `safetensors.numpy.save_file` of every leaf as a NumPy array, an fsync
  of the file, then `load_file` with every leaf put on the device by `jnp.asarray`,
  as a user would. A tree that is not a dict is saved as its array leaves by path
  (`jax.tree_util.keystr`), and rebuilt from them.
- durable Equinox: `eqx.tree_serialise_leaves` to an open file, a flush and an
  fsync, then `eqx.tree_deserialise_leaves` into the same tree.

Trees: 1,000, 10,000 and 100,000 leaves of 4 float32 values each, 1,000 leaves each
of another shape (`1000d`: 1 x 1 to 32 x 32 float32), a model with its optimizer
state (`mlp+adam`: an `eqx.nn.MLP` of 201 layers of width 8 and its `optax.adam`
state: 1,210 leaves in 617 other nodes), and one array of 512 MB. For
each tree, after a warm-up round of each side, the sides alternate for `--rounds`
rounds; the script prints the median round trip of each side, the ratios of the
medians (targets: at most 1.5 against safetensors for the small leaves, 1.1 for the
large array, and 1.0 against Equinox everywhere), and the best and worst ratios of
paired rounds.

Usage: `python benchmarks/bench_checkpoint_leaves.py [--rounds N] [--sizes ...]`.
"""

import argparse
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from lerax_utils import load_pytree, save_pytree

Tree = Any


def ours(tree: Tree, folder: pathlib.Path) -> Tree:
    save_pytree(folder / "ours", tree)
    return load_pytree(folder / "ours", tree)


def safetensors(tree: Tree, folder: pathlib.Path) -> Tree:
    if not isinstance(tree, dict):  # Its arrays by path; the rest kept in memory.
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        by_path = {jax.tree_util.keystr(key): leaf for key, leaf in flat}
        loaded = safetensors(
            {path: x for path, x in by_path.items() if eqx.is_array(x)}, folder
        )
        return treedef.unflatten([loaded.get(p, x) for p, x in by_path.items()])
    path = str(folder / "theirs.safetensors")
    save_file({key: np.asarray(leaf) for key, leaf in tree.items()}, path)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return {key: jnp.asarray(value) for key, value in load_file(path).items()}


def equinox(tree: Tree, folder: pathlib.Path) -> Tree:
    path = folder / "plain.eqx"
    with open(path, "wb") as file:
        eqx.tree_serialise_leaves(file, tree)
        file.flush()
        os.fsync(file.fileno())
    return eqx.tree_deserialise_leaves(path, tree)


SIDES: dict[str, Callable[[Tree, pathlib.Path], Tree]] = {
    "lerax_utils": ours,
    "safetensors": safetensors,
    "Equinox": equinox,
}


class Model(eqx.Module):  # A training state, as a user would save it.
    model: eqx.nn.MLP
    optimizer_state: optax.OptState
    step: int


def make_tree(size: str) -> Tree:
    rng = np.random.default_rng(0)
    if size == "mlp+adam":
        model = eqx.nn.MLP(8, 8, 8, 200, key=jax.random.key(0))
        state = optax.adam(1e-3).init(eqx.filter(model, eqx.is_array))
        return Model(model, state, 0)
    if size == "512MB":
        return {"w": jnp.asarray(rng.standard_normal(128 * 1024 * 1024, np.float32))}
    if size.endswith("d"):  # Each leaf of another shape, up to 32 x 32.
        shapes = [(1 + index // 32, 1 + index % 32) for index in range(int(size[:-1]))]
        values = [rng.standard_normal(shape, np.float32) for shape in shapes]
    else:
        values = list(rng.standard_normal((int(size), 4), np.float32))
    return {f"leaf{index}": jnp.asarray(row) for index, row in enumerate(values)}


def seconds(side: Callable[[Tree, pathlib.Path], Tree], tree: Tree, folder) -> float:
    start = time.perf_counter()
    loaded = jax.block_until_ready(side(tree, folder))
    elapsed = time.perf_counter() - start
    if not eqx.tree_equal(loaded, tree):  # Every side loads what it saved.
        raise RuntimeError("a round trip changed a value")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description="checkpoint cost per leaf")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["1000", "1000d", "mlp+adam", "10000", "100000", "512MB"],
    )
    args = parser.parse_args()
    print(f"jax {jax.__version__}, equinox {eqx.__version__}, {args.rounds} rounds")
    for size in args.sizes:
        tree = make_tree(size)
        times: dict[str, list[float]] = {name: [] for name in SIDES}
        with tempfile.TemporaryDirectory(dir=".") as name:
            folder = pathlib.Path(name)
            for side in SIDES.values():
                seconds(side, tree, folder)  # Warm-up.
            for _ in range(args.rounds):
                for label, side in SIDES.items():
                    times[label].append(seconds(side, tree, folder))
        medians = {label: statistics.median(values) for label, values in times.items()}
        cells = ", ".join(f"{label} {value:.3f} s" for label, value in medians.items())
        print(f"{size} {'array' if size == '512MB' else 'leaves'}: {cells}")
        for baseline, target in (
            ("safetensors", "1.1" if size == "512MB" else "1.5"),
            ("Equinox", "1.0"),
        ):
            paired = sorted(
                a / b
                for a, b in zip(times["lerax_utils"], times[baseline], strict=True)
            )
            print(
                f"  / {baseline}: {medians['lerax_utils'] / medians[baseline]:.2f} "
                f"(rounds: best {paired[0]:.2f}, worst {paired[-1]:.2f}; "
                f"target <= {target})"
            )


if __name__ == "__main__":
    main()
