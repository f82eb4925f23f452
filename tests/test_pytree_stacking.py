"""unstack_pytree and stack_pytree on sharded arrays, in a process with four devices.

Each case runs in a child process started with four CPU devices, on an `Auto` mesh
and on an `Explicit` one (jax 0.4.26 has no explicit meshes: that case is skipped
there). Every array is split along the sharded axis and along another one, both on
the host and by the compiled program, and joined back with stack_pytree.
"""

import textwrap

import jax
import pytest

from test_lerax_utils import run_on_four_devices

_SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import lerax_utils
    from lerax_utils import stack_pytree, unstack_pytree

    kind = sys.argv[1]
    assert len(jax.devices()) == 4
    if kind == "explicit":
        mesh = jax.make_mesh(
            (4,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,)
        )
    else:
        mesh = Mesh(np.array(jax.devices()), ("d",))
    failures = []
    cases = 0

    def check(label, ok):
        if not ok:
            failures.append(label)

    def equivalent(array, spec):
        expected = NamedSharding(mesh, P(*spec))
        return array.sharding.is_equivalent_to(expected, array.ndim)

    rng = np.random.default_rng(0)
    for shape, spec in [
        ((8, 4, 2), ("d",)),
        ((8, 4, 2), (None, "d")),
        ((72, 4), ("d", None)),
        ((72, 4), (None, "d")),
    ]:
        values = rng.standard_normal(shape).astype(np.float32)
        codes = (values > 0).astype(np.int32)
        tree = {
            "x": jax.device_put(values, NamedSharding(mesh, P(*spec))),
            "c": jax.device_put(codes, NamedSharding(mesh, P(*spec))),
            "tag": "t",
        }
        for axis in (0, 1):
            full = list(spec) + [None] * (len(shape) - len(spec))
            kept = full[:axis] + full[axis + 1 :]
            for path, per_slice in (("host", 0.0), ("compiled", float("inf"))):
                cases += 1
                label = f"{shape} {spec} axis={axis} {path}"
                lerax_utils._UNSTACK_HOST_SECONDS_PER_SLICE = per_slice
                lerax_utils._unstack_host_seconds.clear()
                pieces = unstack_pytree(tree, axis=axis)
                check(label + " count", len(pieces) == shape[axis])
                for i, piece in enumerate(pieces):
                    for name, data in (("x", values), ("c", codes)):
                        leaf = piece[name]
                        want = np.take(data, i, axis=axis)
                        check(
                            f"{label} {name}[{i}] value",
                            leaf.dtype == want.dtype
                            and np.array_equal(np.asarray(leaf), want),
                        )
                        check(f"{label} {name}[{i}] sharding", equivalent(leaf, kept))
                    check(f"{label} tag", piece["tag"] == "t")
                back = stack_pytree(pieces, axis=axis)
                for name, data in (("x", values), ("c", codes)):
                    check(
                        f"{label} stacked {name}",
                        np.array_equal(np.asarray(back[name]), data)
                        and equivalent(
                            back[name], kept[:axis] + [None] + kept[axis:]
                        ),
                    )
    print(json.dumps({"cases": cases, "failures": failures}))
    """
)


def _has_explicit_meshes() -> bool:
    return hasattr(jax.sharding, "AxisType")


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_unstack_and_stack_pytree_on_sharded_arrays(kind):
    if kind == "explicit" and not _has_explicit_meshes():
        pytest.skip(f"jax {jax.__version__} has no explicit-sharding meshes")
    report = run_on_four_devices(_SHARDED, kind)
    assert report == {"cases": 16, "failures": []}
