"""A Serializable round trip against a durable plain-Equinox round trip.

The model holds 256 MB of float32 parameters. One round trip is a save followed by a
load. The baseline writes with `eqx.tree_serialise_leaves` to an open file, flushes
and fsyncs it, then reads with `eqx.tree_deserialise_leaves`. After one warm-up round
of each, rounds alternate, and the script prints the ratio of the median round times
(target at most 1.15), the best and worst ratio of paired rounds, and the host memory
that loading allocates.

Usage: `python benchmarks/bench_serialize.py [--rounds N] [--megabytes M]`.
"""

import argparse
import os
import pathlib
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from lerax_utils import Serializable


class Big(Serializable):
    layers: list[jax.Array]

    def __init__(self, megabytes: int, seed: int = 0):
        count = 16
        size = megabytes * 1024 * 1024 // 4 // count
        keys = jax.random.split(jax.random.key(seed), count)
        self.layers = [jax.random.normal(k, (size,)) for k in keys]


def lerax_round_trip(model: Big, folder: pathlib.Path, megabytes: int) -> Big:
    model.serialize(folder / "model")
    return Big.deserialize(folder / "model", megabytes)


def equinox_round_trip(model: Big, folder: pathlib.Path, megabytes: int) -> Big:
    path = folder / "plain.eqx"
    with open(path, "wb") as file:
        eqx.tree_serialise_leaves(file, model)
        file.flush()
        os.fsync(file.fileno())
    skeleton = eqx.filter_eval_shape(Big, megabytes)
    return eqx.tree_deserialise_leaves(path, skeleton)


def round_seconds(
    round_trip: Callable[[Big, pathlib.Path, int], Big],
    model: Big,
    folder: pathlib.Path,
    megabytes: int,
) -> float:
    start = time.perf_counter()
    jax.block_until_ready(round_trip(model, folder, megabytes))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="checkpoint round trips")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--megabytes", type=int, default=256)
    args = parser.parse_args()
    model = Big(args.megabytes)
    contenders = {"Serializable": lerax_round_trip, "plain Equinox": equinox_round_trip}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory(dir=".") as name:
        folder = pathlib.Path(name)
        for round_trip in contenders.values():
            round_seconds(round_trip, model, folder, args.megabytes)  # Warm-up.
        for _ in range(args.rounds):
            for label, round_trip in contenders.items():
                seconds = round_seconds(round_trip, model, folder, args.megabytes)
                times[label].append(seconds)
        tracemalloc.start()
        loaded = Big.deserialize(folder / "model", args.megabytes)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert all(
            bool(jnp.array_equal(a, b))
            for a, b in zip(loaded.layers, model.layers, strict=True)
        )
    print(
        f"jax {jax.__version__}, equinox {eqx.__version__}; {args.megabytes} MB model"
    )
    for label, values in times.items():
        print(f"{label:14} {statistics.median(values):7.3f} s per round trip")
    ratio = statistics.median(times["Serializable"]) / statistics.median(
        times["plain Equinox"]
    )
    print(f"ratio, Serializable / plain Equinox: {ratio:.3f} (target <= 1.15)")
    paired = sorted(
        ours / theirs
        for ours, theirs in zip(
            times["Serializable"], times["plain Equinox"], strict=True
        )
    )
    print(f"round by round: best {paired[0]:.3f}, worst {paired[-1]:.3f}")
    # On a CPU the loaded arrays use the buffers the file was read into, so 1.00 here
    # means one copy of the data in all; on an accelerator they are freed one by one
    # as their leaves are copied to the device.
    share = peak / (args.megabytes * 1024 * 1024)
    print(f"peak host memory allocated while loading / model size: {share:.2f}")


if __name__ == "__main__":
    main()
