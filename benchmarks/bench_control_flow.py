"""The control-flow family against `jax.lax`, measured side by side.

Each workload pairs one of our calls with its baseline: the hand-partitioned
`jax.lax` call a user would otherwise write, or, where `jax.lax` runs the same code
unchanged (a Python counter in the carry), `jax.lax` itself. Both are timed in one
process, interleaved, and the script prints the ratio of medians for:

- run time of the compiled program (target 1.00: it is the same program);
- trace + lower + compile time of a fresh function (target at most 1.10). For the
  counter, this includes the second trace that makes the counter traced.

It also says whether both sides trace to the same program (`jax.make_jaxpr`), in which
case any run-time difference is noise. Then it prints the best and worst ratio over
the workloads.

Usage: `python benchmarks/bench_control_flow.py [--repeats N] [--compile-repeats N]`.
"""

import argparse
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from lerax_utils import (
    filter_cond,
    filter_fori_loop,
    filter_map,
    filter_scan,
    filter_switch,
    filter_while_loop,
)


def _hand_partitioned_scan(step: Callable[..., Any], init: Any, xs: Any) -> Any:
    """What a user writes without filter_scan: partition, scan the arrays, combine."""
    init_arrays, init_static = eqx.partition(init, eqx.is_array)

    def body(carry_arrays: Any, x: Any) -> Any:
        carry, y = step(eqx.combine(carry_arrays, init_static), x)
        return eqx.filter(carry, eqx.is_array), y

    final, ys = jax.lax.scan(body, init_arrays, xs)
    return eqx.combine(final, init_static), ys


def mlp_step(carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    mlp, hidden = carry
    hidden = jnp.tanh(mlp(hidden + x))
    decay = jax.tree.map(lambda w: 0.999 * w, eqx.filter(mlp, eqx.is_array))
    mlp = eqx.combine(decay, eqx.filter(mlp, eqx.is_array, inverse=True))
    return (mlp, hidden), jnp.sum(hidden)


def _wide_step(carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    arrays, labels = carry
    arrays = [jnp.sin(a + x) for a in arrays]
    return (arrays, labels), arrays[0]


def _counter_step(carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    hidden, steps = carry
    hidden = jnp.tanh(hidden * 0.9 + x)
    return (hidden, steps + 1), hidden[0] * steps


class Workload:
    """One call of ours and its baseline, as functions of the inputs' arrays."""

    def __init__(
        self,
        name: str,
        ours: Callable[[Any], Any],
        baseline: Callable[[Any], Any],
        inputs: Any,
    ):
        self.name = name
        self.arrays, self.static = eqx.partition(inputs, eqx.is_array)
        self.contenders = {"ours": ours, "baseline": baseline}

    def program(self, which: str) -> Callable[[Any], Any]:
        """A fresh function of the arrays, for `jax.jit` to trace from scratch."""
        call = self.contenders[which]

        def program(arrays: Any) -> Any:
            return eqx.filter(call(eqx.combine(arrays, self.static)), eqx.is_array)

        return program

    def same_program(self) -> bool:
        """Whether both trace to the same program (then run times differ by noise)."""
        texts = [
            re.sub(
                r" at 0x[0-9a-f]+",
                "",
                str(jax.make_jaxpr(self.program(w))(self.arrays)),
            )
            for w in self.contenders
        ]
        return texts[0] == texts[1]

    def compile_seconds(self, which: str) -> float:
        start = time.perf_counter()
        jax.jit(self.program(which)).lower(self.arrays).compile()
        return time.perf_counter() - start


def workloads() -> list[Workload]:
    mlp = eqx.nn.MLP(8, 8, width_size=64, depth=2, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (1_000, 8))
    wide = (
        [jnp.full((4,), float(i)) for i in range(64)],
        [f"leaf {i}" for i in range(64)],
    )
    return [
        Workload(
            "scan: eqx.nn.MLP carry, 1,000 steps (vs by hand)",
            lambda a: filter_scan(mlp_step, (a[0], a[1]), a[2]),
            lambda a: _hand_partitioned_scan(mlp_step, (a[0], a[1]), a[2]),
            (mlp, jnp.zeros(8), xs),
        ),
        Workload(
            "scan: 64 arrays + 64 strings, 100 steps (vs by hand)",
            lambda a: filter_scan(_wide_step, a[0], a[1]),
            lambda a: _hand_partitioned_scan(_wide_step, a[0], a[1]),
            (wide, jnp.ones((100, 4))),
        ),
        Workload(
            "scan: Python counter in the carry, 1,000 steps (vs lax.scan)",
            lambda a: filter_scan(_counter_step, (a[0], 0), a[1]),
            lambda a: jax.lax.scan(_counter_step, (a[0], 0), a[1]),
            (jnp.zeros(8), xs),
        ),
        Workload(
            "while_loop: eqx.nn.MLP carry, 1,000 steps (vs by hand)",
            lambda a: filter_while_loop(_not_done, _policy_step, (a[0], a[1], 0)),
            lambda a: _while_by_hand(a[0], a[1]),
            (mlp, jnp.zeros(8)),
        ),
        Workload(
            "fori_loop: eqx.nn.MLP carry, 1,000 steps (vs by hand)",
            lambda a: filter_fori_loop(
                0, 1_000, lambda i, c: _policy_step((*c, 0))[:2], (a[0], a[1])
            ),
            lambda a: _by_hand(
                jax.lax.fori_loop,
                0,
                1_000,
                carry=(a[0], a[1]),
                body=lambda i, c: _policy_step((*c, 0))[:2],
            ),
            (mlp, jnp.zeros(8)),
        ),
        Workload(
            "switch: eqx.nn.MLP operand, 3 branches (vs by hand)",
            lambda a: filter_switch(a[0], _SWITCH_BRANCHES, a[1], a[2]),
            lambda a: _hand_partitioned_switch(a[0], a[1], a[2]),
            (jnp.asarray(1), mlp, jnp.ones(8)),
        ),
        Workload(
            "map: eqx.nn.MLP over 1,000 inputs (vs by hand)",
            lambda a: filter_map(lambda x: (a[0](x["obs"]), x["tag"]), a[1]),
            lambda a: _hand_partitioned_map(a[0], a[1]),
            (mlp, {"obs": xs, "tag": "batch"}),
        ),
        Workload(
            "cond: eqx.nn.MLP operand and a label (vs by hand)",
            lambda a: filter_cond(a[0], lambda m, x, s: (m(x), s), _exploit, *a[1:]),
            lambda a: _hand_partitioned_cond(a[0], *a[1:]),
            (jnp.asarray(True), mlp, jnp.ones(8), "act"),
        ),
    ]


def _by_hand(
    loop: Callable[..., Any], *args: Any, carry: Any, body: Callable[..., Any]
) -> Any:
    """Partition a loop carry, run `loop(*args, body, arrays)`, combine."""
    arrays, static = eqx.partition(carry, eqx.is_array)

    def body_on_arrays(*inputs: Any) -> Any:
        *index, arrays = inputs
        out = body(*index, eqx.combine(arrays, static))
        return eqx.filter(out, eqx.is_array)

    return eqx.combine(loop(*args, body_on_arrays, arrays), static)


def _policy_step(carry: Any) -> Any:
    mlp, hidden, steps = carry
    return mlp, jnp.tanh(mlp(hidden)) + 0.01, steps + 1


def _not_done(carry: Any) -> Any:
    return carry[2] < 1_000


def _while_by_hand(mlp: Any, hidden: jax.Array) -> Any:
    arrays, static = eqx.partition(mlp, eqx.is_array)

    def body(c: Any) -> Any:
        out = _policy_step((eqx.combine(c[0], static), c[1], c[2]))
        return eqx.filter(out[0], eqx.is_array), out[1], out[2]

    final = jax.lax.while_loop(_not_done, body, (arrays, hidden, jnp.asarray(0)))
    return eqx.combine(final[0], static), final[1], final[2]


def _exploit(mlp: Any, x: jax.Array, label: str) -> Any:
    return (-mlp(x), label)


_SWITCH_BRANCHES = [
    lambda mlp, x: mlp(x),
    lambda mlp, x: -mlp(x),
    lambda mlp, x: mlp(-x),
]


def _hand_partitioned_switch(index: Any, mlp: Any, x: jax.Array) -> Any:
    arrays, static = eqx.partition(mlp, eqx.is_array)
    branches = [
        lambda a, x, branch=branch: branch(eqx.combine(a, static), x)
        for branch in _SWITCH_BRANCHES
    ]
    return jax.lax.switch(index, branches, arrays, x)


def _hand_partitioned_map(mlp: Any, xs: Any) -> Any:
    arrays, static = eqx.partition(xs, eqx.is_array)
    ys = jax.lax.map(lambda x: mlp(eqx.combine(x, static)["obs"]), arrays)
    return ys, xs["tag"]


def _hand_partitioned_cond(pred: Any, mlp: Any, x: jax.Array, label: str) -> Any:
    arrays, static = eqx.partition(mlp, eqx.is_array)

    def explore(arrays: Any, x: jax.Array) -> jax.Array:
        return eqx.combine(arrays, static)(x)

    def exploit(arrays: Any, x: jax.Array) -> jax.Array:
        return -eqx.combine(arrays, static)(x)

    return jax.lax.cond(pred, explore, exploit, arrays, x), label


def main() -> None:
    parser = argparse.ArgumentParser(description="filter_scan against lax.scan")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compile-repeats", type=int, default=10)
    args = parser.parse_args()

    print(f"jax {jax.__version__}, equinox {eqx.__version__}, {jax.devices()[0]}")
    print(f"{'':62}{'run':>8}{'compile':>9}{'same program':>14}")
    run_ratios, compile_ratios = [], []
    for workload in workloads():
        compiled = {
            which: jax.jit(workload.program(which)).lower(workload.arrays).compile()
            for which in workload.contenders
        }
        runs: dict[str, list[float]] = {which: [] for which in compiled}
        compiles: dict[str, list[float]] = {which: [] for which in compiled}
        for _ in range(args.compile_repeats):
            for which in compiled:  # Interleaved, so that noise hits both alike.
                compiles[which].append(workload.compile_seconds(which))
        for which in compiled:
            jax.block_until_ready(compiled[which](workload.arrays))  # Warm up.
        for _ in range(args.repeats):
            for which in compiled:
                start = time.perf_counter()
                jax.block_until_ready(compiled[which](workload.arrays))
                runs[which].append(time.perf_counter() - start)
        run_ratio = statistics.median(runs["ours"]) / statistics.median(
            runs["baseline"]
        )
        compile_ratio = statistics.median(compiles["ours"]) / statistics.median(
            compiles["baseline"]
        )
        run_ratios.append(run_ratio)
        compile_ratios.append(compile_ratio)
        same = "yes" if workload.same_program() else "no"
        print(f"{workload.name:62}{run_ratio:8.3f}{compile_ratio:9.3f}{same:>14}")
    print(
        f"run-time ratio, ours / baseline:      best {min(run_ratios):.3f}, "
        f"worst {max(run_ratios):.3f} (target 1.00)"
    )
    print(
        f"trace+compile ratio, ours / baseline: best {min(compile_ratios):.3f}, "
        f"worst {max(compile_ratios):.3f} (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
