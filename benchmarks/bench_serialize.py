"""A Serializable round trip against a durable plain-Equinox round trip.

The model holds 256 MB of float32 parameters. One round trip is a save followed by a
load. The baseline writes with `eqx.tree_serialise_leaves` to an open file, flushes
and fsyncs it, then reads with `eqx.tree_deserialise_leaves`. After one warm-up round
of each, rounds alternate, and the script prints the ratio of the median round times
(target at most 1.15), the best and worst ratio of paired rounds, and the host memory
that loading allocates.

Then it measures the host memory of a sharded load, in a fresh process with four CPU
devices: `Big.deserialize_sharded` with every layer split over the four, against the
plain way (`Big.deserialize`, then `jax.device_put` onto the same sharding). Peak
resident memory comes from Linux's `VmHWM`, reset just before the load. On a CPU the
loaded shards live in host memory themselves, so the figure that matters is the
peak above what the loaded model keeps resident afterwards: the target is at most
the largest shard plus the 16 MB read buffer.

Usage: `python benchmarks/bench_serialize.py [--rounds N] [--megabytes M]`.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
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


def _memory_kb(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def sharded_load_child(path: str, megabytes: int, how: str) -> None:
    """In a process with four CPU devices: load `path` sharded, print the memory."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(jax.devices(), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    with tempfile.TemporaryDirectory(dir=".") as name:  # Warm-up on a tiny model.
        Big(1).serialize(pathlib.Path(name) / "tiny")
        tiny = Big.deserialize_sharded(pathlib.Path(name) / "tiny", sharding, 1)
        jax.block_until_ready(
            jax.device_put(Big.deserialize(name + "/tiny", 1), sharding)
        )
        jax.block_until_ready(tiny)
    del tiny
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # Resets VmHWM.
    before = _memory_kb("VmRSS")
    if how == "sharded":
        loaded = Big.deserialize_sharded(path, sharding, megabytes)
    else:
        loaded = jax.device_put(Big.deserialize(path, megabytes), sharding)
    jax.block_until_ready(loaded)
    after, peak = _memory_kb("VmRSS"), _memory_kb("VmHWM")
    largest = max(
        shard.data.nbytes
        for layer in loaded.layers
        for shard in layer.addressable_shards
    )
    assert all(layer.sharding == sharding for layer in loaded.layers)
    print(
        json.dumps(
            {
                "before": before * 1024,
                "after": after * 1024,
                "peak": peak * 1024,
                "largest_shard": largest,
            }
        )
    )


def sharded_load_memory(path: pathlib.Path, megabytes: int, how: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run(
        [sys.executable, __file__, "--child", how, str(path), str(megabytes)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="checkpoint round trips")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        how, path, megabytes = args.child
        sharded_load_child(path, int(megabytes), how)
        return
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
        del loaded
        memory = {
            how: sharded_load_memory(folder / "model.eqx", args.megabytes, how)
            for how in ("sharded", "plain")
        }
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
    mb = 1024 * 1024
    largest = memory["sharded"]["largest_shard"]
    print(
        f"sharded load over 4 CPU devices: largest shard {largest / mb:.1f} MB, "
        "read buffer 16 MB"
    )
    for how, label in (("sharded", "deserialize_sharded"), ("plain", "plain+put")):
        figures = memory[how]
        above = (figures["peak"] - figures["after"]) / mb
        kept = (figures["after"] - figures["before"]) / mb
        print(
            f"  {label:19} peak above the loaded model {above:7.1f} MB "
            f"(loaded model resident: {kept:6.1f} MB)"
        )
    above = memory["sharded"]["peak"] - memory["sharded"]["after"]
    target = largest + 16 * mb
    print(
        f"  target: peak above the loaded model <= largest shard + buffer "
        f"({target / mb:.1f} MB): {'met' if above <= target else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
