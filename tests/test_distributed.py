"""Two processes under `jax.distributed`, on CPU, two devices each.

Both processes run one script: a sharded `filter_scan` under `jit`, a save of a model
whose arrays span the processes (every process calls `serialize`; one file), a
sharded load in both that reads only each process's shards, saves that must fail in
both, partitioned callbacks and `unstack_pytree` of a process-spanning array. Every
wait is bounded: the processes' own waits by a short timeout, and theirs by the
subprocess timeout, after which both are killed and the test fails.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import jax
import pytest

from test_lerax_utils import ROOT

_WORKER = textwrap.dedent(
    r"""
    import json, pathlib, sys, traceback
    process, port, folder = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
    import jax
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    else:  # Older JAX names the option otherwise.
        jax.config.update("jax_cpu_enable_gloo_collectives", True)
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=process,
        initialization_timeout=60,
    )
    import equinox as eqx, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import lerax_utils
    from lerax_utils import Serializable, callback_wrapper, filter_scan, unstack_pytree

    lerax_utils._PROCESS_TIMEOUT_S = 60.0
    local = len(jax.local_devices())
    assert jax.process_count() == 2 and local == int(sys.argv[4])
    devices = np.array(jax.devices())
    line = Mesh(devices, ("x",))
    grid = Mesh(devices.reshape(2, local), ("p", "q"))  # "p" spans the processes.
    report = {"process": process, "local_devices": local}

    def global_array(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])

    def attempt(name, function):
        try:
            report[name] = function()
        except Exception as err:
            report[name] = f"raised {type(err).__name__}: {err}"
            traceback.print_exc()

    # 1. filter_scan with a sharded carry, under jit, against jax.lax.scan.
    def scan():
        start = np.arange(8.0, dtype=np.float32)
        w = global_array(start, NamedSharding(line, P("x")))
        def step(carry, x):
            return {"w": carry["w"] * 0.5 + x, "tag": carry["tag"]}, carry["w"].sum()
        run = eqx.filter_jit(
            lambda w: filter_scan(step, {"w": w, "tag": "t"}, jnp.ones(3))
        )
        carry, sums = run(w)
        final, totals = jax.lax.scan(
            lambda c, x: (c * 0.5 + x, c.sum()), start, np.ones(3, np.float32)
        )
        return bool(
            carry["tag"] == "t"
            and not carry["w"].is_fully_addressable
            and all(
                np.array_equal(s.data, np.asarray(final)[s.index])
                for s in carry["w"].addressable_shards
            )
            and all(np.array_equal(s.data, totals) for s in sums.addressable_shards)
        )
    attempt("scan", scan)

    # 2. A model whose arrays span both processes, saved from both.
    rng = np.random.default_rng(0)  # The same values in both processes.
    values = {
        "rows": rng.normal(size=(8, 6)).astype(np.float32),
        "columns": rng.normal(size=(6, 8)).astype(jnp.bfloat16),
        "blocks": rng.integers(-9, 9, size=(4, 4, 2)).astype(np.int32),
        "copies": rng.normal(size=(3, 5)).astype(np.float32),
        "flags": rng.integers(0, 2, size=(4,)).astype(bool),
    }
    shardings = {
        "rows": NamedSharding(line, P("x")),
        "columns": NamedSharding(line, P(None, "x")),
        "blocks": NamedSharding(grid, P("q", "p")),
        "copies": NamedSharding(grid, P()),  # Replicated over both processes.
        "flags": NamedSharding(grid, P("p")),
    }
    keys = jax.random.split(jax.random.key(3), 4)
    key_data = np.asarray(jax.random.key_data(keys))

    class Model(Serializable):
        arrays: dict
        keys: jax.Array
        scale: jax.Array
        host: np.ndarray
        rate: float

        def __init__(self, rate=0.25):
            self.arrays = {n: jnp.zeros(v.shape, v.dtype) for n, v in values.items()}
            self.keys = jax.random.split(jax.random.key(0), 4)
            self.scale = jnp.asarray(1.0)
            self.host = np.zeros(3, np.int16)
            self.rate = rate

    key_sharding = NamedSharding(line, P("x"))
    model = Model()
    model = eqx.tree_at(
        lambda m: (m.arrays, m.keys, m.scale, m.host),
        model,
        (
            {n: global_array(v, shardings[n]) for n, v in values.items()},
            jax.random.wrap_key_data(
                global_array(key_data, NamedSharding(line, P("x", None)))
            ),
            jnp.asarray(2.0),
            np.arange(3, dtype=np.int16),
        ),
    )
    def save():
        model.serialize(folder / "model")
        # Back in every process only once the file is complete.
        return sorted(p.name for p in folder.iterdir())
    attempt("save", save)

    def wanted(skeleton):
        return eqx.tree_at(
            lambda m: (m.arrays, m.keys, m.scale, m.host),
            skeleton,
            (dict(shardings), key_sharding, None, None),
        )

    def loaded_right(loaded):
        good = loaded.rate == 0.25 and type(loaded.host) is np.ndarray
        good = good and np.array_equal(loaded.host, np.arange(3))
        good = good and loaded.scale.aval.weak_type and float(loaded.scale) == 2.0
        for name, value in values.items():
            array = loaded.arrays[name]
            good = good and array.sharding == shardings[name]
            good = good and array.dtype == value.dtype
            good = good and all(
                np.asarray(s.data).tobytes() == value[s.index].tobytes()
                for s in array.addressable_shards
            )
        data = jax.random.key_data(loaded.keys)
        good = good and loaded.keys.sharding.is_equivalent_to(key_sharding, 1)
        good = good and all(
            np.array_equal(s.data, key_data[s.index]) for s in data.addressable_shards
        )
        return bool(good)

    def load_sharded():
        loaded = Model.deserialize_sharded(folder / "model", wanted)
        spans = not loaded.arrays["rows"].is_fully_addressable
        return loaded_right(loaded) and spans
    attempt("load_sharded", load_sharded)

    def load_whole():
        loaded = Model.deserialize(folder / "model")
        return bool(
            all(
                np.asarray(loaded.arrays[n]).tobytes() == v.tobytes()
                for n, v in values.items()
            )
            and np.array_equal(jax.random.key_data(loaded.keys), key_data)
        )
    attempt("load_whole", load_whole)

    def saved_twice():
        twice = eqx.tree_at(lambda m: m.rate, model, 0.5)
        twice.serialize(folder / "model")
        return Model.deserialize_sharded(folder / "model", wanted).rate
    attempt("saved_twice", saved_twice)

    def rows_now():
        return global_array(values["rows"], shardings["rows"])

    # Inside jit, JAX runs the ordered callback on device 0 (process 0) with the
    # whole array: process 0 writes the file, and waits for it at effects_barrier.
    class Row(Serializable):
        w: jax.Array

    def in_jit():
        rows = global_array(values["rows"], shardings["rows"])
        jax.jit(lambda w: Row(w).serialize(folder / "jitted"))(rows)
        jax.effects_barrier()
        lerax_utils._distributed_client().wait_at_barrier("test/in_jit", 60000)
        loaded = Row.deserialize_sharded(
            folder / "jitted", shardings["rows"], jnp.zeros((8, 6))
        )
        return all(
            np.asarray(s.data).tobytes() == values["rows"][s.index].tobytes()
            for s in loaded.w.addressable_shards
        )
    attempt("in_jit", in_jit)

    # 3. Processes that pass different models: both refuse, nothing is written.
    def different():
        other = eqx.tree_at(lambda m: m.rate, model, 0.5 + process)
        other.serialize(folder / "different")
        return "saved"
    attempt("different", different)

    def different_host_values():
        host = np.arange(3, dtype=np.int16) + process
        eqx.tree_at(lambda m: m.host, model, host).serialize(folder / "different")
        return "saved"
    attempt("different_host_values", different_host_values)

    # A process that fails while writing its shards: the others raise too.
    def one_fails():
        write = lerax_utils._write_shards
        def broken(*args):
            raise OSError("disk full (planted)")
        if process == 1:
            lerax_utils._write_shards = broken
        try:
            model.serialize(folder / "failed")
        finally:
            lerax_utils._write_shards = write
        return "saved"
    attempt("one_fails", one_fails)

    # Processes that pass different paths: both refuse, nothing is written.
    def different_paths():
        lerax_utils.save_pytree(folder / f"path{process}", {"w": rows_now()})
        return "saved"
    attempt("different_paths", different_paths)

    # A process that fails before the exchange (a leaf only it has is refused):
    # the other raises too, and the next save pairs up as it should.
    def early_failure():
        bad = np.ma.array([1]) if process == 1 else np.zeros(1)
        lerax_utils.save_pytree(folder / "early", {"w": rows_now(), "x": bad})
        return "saved"
    attempt("early_failure", early_failure)

    def after_failure():
        lerax_utils.save_pytree(folder / "after", {"w": rows_now()})
        shape = jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=shardings["rows"])
        like = {"w": shape}
        loaded = lerax_utils.load_pytree(folder / "after", like)["w"]
        return all(
            np.asarray(s.data).tobytes() == values["rows"][s.index].tobytes()
            for s in loaded.addressable_shards
        )
    attempt("after_failure", after_failure)

    # 4. A process that does not call serialize: the other one times out.
    def alone():
        lerax_utils._PROCESS_TIMEOUT_S = 2.0
        if process == 0:
            model.serialize(folder / "alone")
            return "saved"
        return "skipped"
    attempt("alone", alone)
    client = lerax_utils._distributed_client()
    client.key_value_set(f"test/alone/{process}", "done")
    client.blocking_key_value_get(f"test/alone/{1 - process}", 60000)
    report["files"] = sorted(p.name for p in folder.iterdir())

    # 5. Partitioned callbacks and unstack_pytree of a process-spanning array.
    rows = global_array(values["rows"], shardings["rows"])
    def callbacks():
        seen = []
        log = callback_wrapper(lambda x: seen.append(np.asarray(x)), partitioned=True)
        jax.block_until_ready(jax.jit(lambda x: (log(x), x * 2)[1])(rows))
        jax.effects_barrier()
        mine = sorted(tuple(s.index[0].indices(8)) for s in rows.addressable_shards)
        expected = sorted(values["rows"][slice(*m[:2])].tobytes() for m in mine)
        return [
            [a.shape for a in seen],
            [list(m) for m in mine],
            sorted(a.tobytes() for a in seen) == expected,
        ]
    if lerax_utils._DEBUG_CALLBACK_TAKES_PARTITIONED:
        attempt("callbacks", callbacks)
    def unstack():
        parts = unstack_pytree(rows)
        return [
            len(parts),
            all(
                np.asarray(s.data).tobytes() == values["rows"][i][s.index].tobytes()
                for i, part in enumerate(parts)
                for s in part.addressable_shards
            ),
        ]
    attempt("unstack", unstack)
    print(json.dumps(report, default=str))
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# JAX's older CPU collectives (`jax_cpu_enable_gloo_collectives`, as in jax 0.4.26)
# abort the process (`Gloo context initialization failed`) when a process has more
# than one device, so there each process gets one.
_DEVICES_PER_PROCESS = (
    2 if "jax_cpu_collectives_implementation" in jax.config.values else 1
)


def _run_two_processes(folder: str, timeout: float = 240) -> list[dict[str, Any]]:
    """Start both processes, wait for both within `timeout`, kill both otherwise."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={_DEVICES_PER_PROCESS}",
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
    }
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            [
                *(sys.executable, "-c", _WORKER),
                *(str(i), port, folder, str(_DEVICES_PER_PROCESS)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            left = max(deadline - time.monotonic(), 1)
            outputs.append(process.communicate(timeout=left))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    reports = []
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-5000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("distributed")
    return _run_two_processes(str(folder))


def test_each_process_reports(two_processes):
    assert [report["process"] for report in two_processes] == [0, 1]
    for report in two_processes:
        assert report["local_devices"] == _DEVICES_PER_PROCESS


def test_a_sharded_filter_scan_under_jit(two_processes):
    assert [report["scan"] for report in two_processes] == [True, True]


def test_both_processes_save_one_file_and_return_when_it_is_complete(two_processes):
    for report in two_processes:
        assert report["save"] == ["model.eqx"]


def test_both_processes_load_their_own_shards(two_processes):
    for report in two_processes:
        assert report["load_sharded"] is True
        assert report["load_whole"] is True
        assert report["saved_twice"] == 0.5


def test_a_save_inside_jit_is_written_by_process_0(two_processes):
    assert [report["in_jit"] for report in two_processes] == [True, True]


def test_different_models_are_refused_in_every_process(two_processes):
    message = (
        "raised ValueError: Serializable.serialize: the processes passed different "
        "paths or different models (their structure, shapes, dtypes, static values, "
        "Python numbers or the values of arrays that do not span processes differ). "
        "Every process must save the same model to the same path."
    )
    for case in ("different", "different_host_values"):
        assert [report[case] for report in two_processes] == [message, message]


def test_different_paths_are_refused_in_every_process(two_processes):
    message = (
        "raised ValueError: save_pytree: the processes passed different paths or "
        "different trees (their structure, shapes, dtypes, static values, Python "
        "numbers or the values of arrays that do not span processes differ). Every "
        "process must save the same tree to the same path."
    )
    assert [report["different_paths"] for report in two_processes] == [message] * 2


def test_a_process_that_fails_early_keeps_the_next_saves_paired(two_processes):
    first, second = (report["early_failure"] for report in two_processes)
    assert first.startswith(
        "raised ValueError: save_pytree: process 1 failed to write its part of the "
        "checkpoint, so nothing was saved: TypeError: the leaf at path ['x'] is a "
        "masked array"
    )
    assert second.startswith(
        "raised TypeError: save_pytree: the leaf at path ['x'] is a masked array"
    )
    assert [report["after_failure"] for report in two_processes] == [True, True]


def test_a_process_that_fails_makes_every_process_raise(two_processes):
    first, second = (report["one_fails"] for report in two_processes)
    assert first == (
        "raised ValueError: Serializable.serialize: process 1 failed to write its "
        "part of the checkpoint, so nothing was saved: OSError: disk full (planted)"
    )
    assert second == "raised OSError: disk full (planted)"


def test_a_process_that_does_not_save_times_the_other_out(two_processes):
    first, second = (report["alone"] for report in two_processes)
    assert first.startswith(
        "raised TimeoutError: Serializable.serialize: process 0 waited 2 s for "
        "process 1's header, in vain. Every process must call `serialize` on the "
        "same model, in the same order as the other saves of arrays that span "
        "processes ("
    )
    assert second == "skipped"
    for report in two_processes:  # No file, and no temporary file, left behind.
        assert report["files"] == ["after.eqx", "jitted.eqx", "model.eqx"]


def test_partitioned_callbacks_of_a_process_spanning_array(two_processes):
    for report in two_processes:
        if "callbacks" not in report:
            pytest.skip("this JAX has no partitioned debug callbacks")
        shapes, mine, same = report["callbacks"]
        local = _DEVICES_PER_PROCESS
        assert shapes == [[8 // (2 * local), 6]] * local  # One call per local shard.
        assert len(mine) == local and same is True


def test_unstack_pytree_of_a_process_spanning_array(two_processes):
    for report in two_processes:
        assert report["unstack"] == [8, True]
