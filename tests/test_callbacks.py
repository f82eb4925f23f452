"""Host callbacks on four CPU devices: printing and logging sharded arrays.

Each test runs a script in a fresh process with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` (the device count is fixed when
JAX starts), as the four-device test in `test_lerax_utils.py` does, and bounds the
wait with a timeout.
"""

import textwrap

from test_lerax_utils import run_on_four_devices

_PRELUDE = """
import contextlib, io, json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from lerax_utils import callback_with_list_wrapper, callback_wrapper, print_callback
assert len(jax.devices()) == 4
mesh = Mesh(np.array(jax.devices()), ("d",))
x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, PartitionSpec("d")))
report = {}

def spans(x):  # What a tracer records of its sharding, if anything.
    mesh = getattr(getattr(x.aval, "sharding", None), "mesh", None)
    report["recorded"] = getattr(mesh, "size", None) == 4
    return x

jax.jit(spans)(x)

def printed(run):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run()
        jax.effects_barrier()
    return out.getvalue()

def error(run):
    try:
        run()
        jax.effects_barrier()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None
"""


def _run_on_four_devices(script: str) -> dict:
    code = _PRELUDE + textwrap.dedent(script) + "\nprint(json.dumps(report))\n"
    return run_on_four_devices(code, timeout=240)


def test_print_callback_prints_sharded_arrays_eagerly_and_under_jit():
    report = _run_on_four_devices(
        """
        report["eager"] = printed(lambda: [print_callback("x", x, i) for i in range(3)])
        def step(x):
            print_callback("x", x, "sum", x.sum())
            return x * 2
        report["jit"] = printed(lambda: jax.jit(step)(x))
        def loop(x):
            def body(c, i):
                print_callback("i", i, "c", c.sum())
                return c + 1, None
            return jax.lax.scan(body, x, jnp.arange(5))[0]
        report["scan"] = printed(lambda: jax.jit(loop)(x))
        text = lambda x: print_callback("hi") or x
        report["text"] = printed(lambda: jax.jit(text)(x))
        constant = lambda x: print_callback(jnp.zeros(2)) or x
        report["constant"] = error(lambda: jax.jit(constant)(x))
        """
    )
    row = [float(i) for i in range(8)]
    # Eagerly: gathered and printed at once, in order.
    assert report["eager"] == "".join(f"x {row} {i}\n" for i in range(3))
    # Under jit on four devices: printed unordered, each line whole.
    assert report["jit"] == f"x {row} sum 28.0\n"
    lines = [f"i {i} c {28.0 + 8 * i}\n" for i in range(5)]
    assert sorted(report["scan"].splitlines(keepends=True)) == lines
    assert report["text"] == "hi\n"  # No traced argument: printed unordered.
    if report["recorded"]:
        # Only constants traced: nothing shows the sharding (as the README says).
        assert report["constant"].startswith(
            "ValueError: The following ordered effects are not supported for more "
            "than 1 device"
        )
    else:  # Older JAX: nothing ever shows it, so print_callback is unordered.
        assert report["constant"] is None


def test_ordered_wrappers_gather_eagerly_and_explain_the_fix_under_jit():
    report = _run_on_four_devices(
        """
        seen = []
        def log_metrics(step, metrics):
            seen.append((step, metrics))
        log = callback_with_list_wrapper(log_metrics, ordered=True)
        log("eager", x)
        report["eager"] = seen[:]
        def step(x, y):
            log(1, {"loss": x.sum()})
            return x
        report["error"] = error(lambda: jax.jit(step)(x, 1.0))
        unordered = callback_wrapper(lambda v: seen.append(v.tolist()))
        seen.clear()
        jax.jit(lambda x: (unordered(x), x)[1])(x)
        jax.effects_barrier()
        report["unordered"] = seen[:]
        """
    )
    row = [float(i) for i in range(8)]
    assert report["eager"] == [["eager", row]]
    assert report["unordered"] == [row]
    if report["recorded"]:  # Tracers record their sharding: our message.
        assert report["error"] == (
            "ValueError: log_metrics (made by callback_with_list_wrapper): made with "
            "`ordered=True`, and called inside `jit` with the positional argument at "
            "path [1]['loss'], an array of shape () that spans 4 devices; JAX runs "
            "ordered callbacks only in computations on one device. Make the wrapper "
            "with `ordered=False` (calls may then arrive in any order), or keep this "
            "computation on one device."
        )
    else:  # Older JAX: its own message, which the README quotes with the fix.
        assert report["error"].startswith(
            "ValueError: The following ordered effects are not supported for more "
            "than 1 device"
        )
