"""Eager calls of the control-flow family against `jax.lax`, side by side.

Outside `jax.jit`, in a Python loop, each of the six functions is called again and
again with the same step functions, on a scalar carry and on an `eqx.nn.MLP` carry
(200 steps), next to the same computation written with `jax.lax` (the module
partitioned by hand). The script prints, per workload:

- repeated calls: our time per call over `jax.lax`'s (target at most 1.5);
- first call (fresh functions, so a trace and a compile): ours over ours without
  the cache of compiled programs, which is how every call ran before it (target at
  most 1.05).

Then the worst ratio of each kind and, where `flax` is installed (the `bench` extra),
the module-carry scan next to `flax.nnx.scan` with an `nnx` MLP of the same sizes in
its carry (target: ours at or below nnx's). Timings on a shared machine are noisy:
run it on a quiet one, and compare ratios, not times.

Usage: `python benchmarks/bench_eager_calls.py [--repeats N] [--calls N]
[--first-rounds N]`.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp

import lerax_utils
from lerax_utils import (
    filter_cond,
    filter_fori_loop,
    filter_map,
    filter_scan,
    filter_switch,
    filter_while_loop,
)

STEPS = 200
MLP = eqx.nn.MLP(4, 4, 16, 2, key=jax.random.key(0))
PARAMS, STATIC = eqx.partition(MLP, eqx.is_array)
H, XS, ROWS = jnp.ones(4), jnp.ones(STEPS), jnp.ones((STEPS, 4))


def workloads() -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """Each workload as (ours, lax's), built from fresh functions."""

    def scalar(c: Any, x: Any) -> Any:
        return c * 0.9 + x, c

    def mlp_step(carry: Any, x: Any) -> Any:
        mlp, h = carry
        return (mlp, jnp.tanh(mlp(h) + x)), h[0]

    def lax_mlp_step(carry: Any, x: Any) -> Any:
        (params, h), y = mlp_step((eqx.combine(carry[0], STATIC), carry[1]), x)
        return (eqx.filter(params, eqx.is_array), h), y

    def count(c: Any) -> Any:
        return c[0] < STEPS

    def apply(mlp: Any, h: Any) -> Any:
        return mlp(h)

    def lax_apply(params: Any, h: Any) -> Any:
        return eqx.combine(params, STATIC)(h)

    def negate(mlp: Any, h: Any) -> Any:
        return -h

    def fori_scalar(i: Any, c: Any) -> Any:
        return scalar(c, i)[0]

    def fori_mlp(i: Any, c: Any) -> Any:
        return mlp_step(c, 1.0)[0]

    def lax_fori_mlp(i: Any, c: Any) -> Any:
        return lax_mlp_step(c, 1.0)[0]

    def while_scalar(c: Any) -> Any:
        return c[0] + 1, c[1] * 0.9

    def while_mlp(c: Any) -> Any:
        return c[0] + 1, mlp_step(c[1], 1.0)[0]

    def lax_while_mlp(c: Any) -> Any:
        return c[0] + 1, lax_mlp_step(c[1], 1.0)[0]

    def double(x: Any) -> Any:
        return x * 2.0

    def apply_mlp(h: Any) -> Any:
        return MLP(h)

    def lax_mlp(x: Any) -> Any:
        return lax_apply(PARAMS, x)

    branches = [lambda c, x: c + x, lambda c, x: c - x, lambda c, x: c * x]
    mlp_branches = [apply, negate, lambda mlp, h: h]
    lax_branches = [lax_apply, negate, lambda params, h: h]
    return {
        "scan, scalar": (
            lambda: filter_scan(scalar, 0.0, XS),
            lambda: jax.lax.scan(scalar, 0.0, XS),
        ),
        "scan, MLP": (
            lambda: filter_scan(mlp_step, (MLP, H), XS),
            lambda: jax.lax.scan(lax_mlp_step, (PARAMS, H), XS),
        ),
        "fori_loop, scalar": (
            lambda: filter_fori_loop(0, STEPS, fori_scalar, 0.0),
            lambda: jax.lax.fori_loop(0, STEPS, fori_scalar, 0.0),
        ),
        "fori_loop, MLP": (
            lambda: filter_fori_loop(0, STEPS, fori_mlp, (MLP, H)),
            lambda: jax.lax.fori_loop(0, STEPS, lax_fori_mlp, (PARAMS, H)),
        ),
        "while_loop, scalar": (
            lambda: filter_while_loop(count, while_scalar, (0, 1.0)),
            lambda: jax.lax.while_loop(count, while_scalar, (0, 1.0)),
        ),
        "while_loop, MLP": (
            lambda: filter_while_loop(count, while_mlp, (0, (MLP, H))),
            lambda: jax.lax.while_loop(count, lax_while_mlp, (0, (PARAMS, H))),
        ),
        "cond, scalar": (
            lambda: filter_cond(True, branches[0], branches[1], 1.0, H),
            lambda: jax.lax.cond(True, branches[0], branches[1], 1.0, H),
        ),
        "cond, MLP": (
            lambda: filter_cond(True, apply, negate, MLP, H),
            lambda: jax.lax.cond(True, lax_apply, negate, PARAMS, H),
        ),
        "switch, scalar": (
            lambda: filter_switch(1, branches, 1.0, H),
            lambda: jax.lax.switch(1, branches, 1.0, H),
        ),
        "switch, MLP": (
            lambda: filter_switch(0, mlp_branches, MLP, H),
            lambda: jax.lax.switch(0, lax_branches, PARAMS, H),
        ),
        "map, scalar": (
            lambda: filter_map(double, XS),
            lambda: jax.lax.map(double, XS),
        ),
        "map, MLP": (
            lambda: filter_map(apply_mlp, ROWS),
            lambda: jax.lax.map(lax_mlp, ROWS),
        ),
    }


def per_call(run: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = run()
    jax.block_until_ready(out)  # pyright: ignore[reportPossiblyUnboundVariable]
    return (time.perf_counter() - start) / calls


def first_call(name: str, cached: bool) -> float:
    lerax_utils._CACHE_SIZE = 64 if cached else 0
    try:
        ours = workloads()[name][0]  # Fresh functions: a trace and a compile.
        start = time.perf_counter()
        jax.block_until_ready(ours())
        return time.perf_counter() - start
    finally:
        lerax_utils._CACHE_SIZE = 64


def nnx_scan_per_call(calls: int) -> float | None:
    """`flax.nnx.scan`'s eager time per call on the "scan, MLP" workload."""
    try:
        from flax import nnx  # pyright: ignore[reportMissingImports]
    except ImportError:
        return None

    class Policy(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.layers = nnx.List(
                [nnx.Linear(4, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)]
            )
            self.out = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, h: Any) -> Any:
            for layer in self.layers:
                h = jax.nn.relu(layer(h))
            return self.out(h)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def step(carry: Any, x: Any) -> Any:
        policy, h = carry
        return (policy, jnp.tanh(policy(h) + x)), h[0]

    policy = Policy(nnx.Rngs(0))
    jax.block_until_ready(step((policy, H), XS))
    return per_call(lambda: step((policy, H), XS), calls)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--first-rounds", type=int, default=3)  # In each repeat.
    args = parser.parse_args()
    repeated, first = {}, {}
    print(f"{'workload':<20} {'ours':>9} {'jax.lax':>9} {'ratio':>6}   first call")
    for name, (ours, lax) in workloads().items():
        jax.block_until_ready((ours(), lax()))  # Compiled once, before timing.
        ours_t, lax_t, new_t, old_t = [], [], [], []
        for _ in range(args.repeats):
            ours_t.append(per_call(ours, args.calls))
            lax_t.append(per_call(lax, args.calls))
            for i in range(args.first_rounds):  # Each side goes first in turn.
                for cached in (i % 2 == 0, i % 2 == 1):
                    (new_t if cached else old_t).append(first_call(name, cached))
        ours_m, lax_m = statistics.median(ours_t), statistics.median(lax_t)
        repeated[name] = ours_m / lax_m
        first[name] = statistics.median(new_t) / statistics.median(old_t)
        print(
            f"{name:<20} {ours_m * 1e3:7.3f}ms {lax_m * 1e3:7.3f}ms "
            f"{repeated[name]:6.2f}   {first[name]:.3f} of uncached"
        )
    worst = max(repeated, key=repeated.__getitem__)
    print(f"worst repeated-call ratio: {repeated[worst]:.2f} ({worst}; target 1.5)")
    worst = max(first, key=first.__getitem__)
    print(f"worst first-call ratio: {first[worst]:.3f} ({worst}; target 1.05)")
    nnx_times = [nnx_scan_per_call(args.calls) for _ in range(args.repeats)]
    if None not in nnx_times:
        ours, lax = workloads()["scan, MLP"]
        ours_m = statistics.median(per_call(ours, args.calls) for _ in nnx_times)
        nnx_m = statistics.median(cast(list[float], nnx_times))
        print(
            f"scan, MLP: ours {ours_m * 1e3:.3f}ms, flax.nnx.scan {nnx_m * 1e3:.3f}ms, "
            f"ratio {ours_m / nnx_m:.2f} (target 1.0)"
        )


if __name__ == "__main__":
    main()
