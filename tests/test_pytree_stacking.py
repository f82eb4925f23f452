"""unstack_pytree and stack_pytree: placement, the choice between slicing on the host
and by a compiled program, errors, and sharded arrays.

The sharded cases run in a child process started with four CPU devices, on an `Auto`
mesh and on an `Explicit` one (jax 0.4.26 has no explicit meshes: that case is skipped
there). Every array is split along the sharded axis and along another one, both on
the host and by the compiled program, and joined back with stack_pytree. The
property tests (round trips, slicing against NumPy) are in `test_lerax_utils.py`.
"""

import gc
import math
import textwrap
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import UNSTACK_PATHS, assert_identical, run_on_four_devices, slicing_by

import lerax_utils
from lerax_utils import filter_scan, stack_pytree, unstack_pytree


class Policy(eqx.Module):
    """A small module with an array field, a function field and static fields."""

    params: Any
    activation: Callable[..., Any]
    name: str = eqx.field(static=True)
    scale: float = eqx.field(static=True, default=1.0)


def test_unstack_pytree_keeps_numpy_leaves_as_views():
    data = np.arange(12.0).reshape(3, 4)
    slices = unstack_pytree({"x": data, "scalars": np.arange(3)}, axis=0)
    for index, piece in enumerate(slices):
        assert type(piece["x"]) is np.ndarray and type(piece["scalars"]) is np.ndarray
        assert np.shares_memory(piece["x"], data)
        assert piece["scalars"].shape == () and piece["scalars"] == index
    columns = unstack_pytree(data, axis=-1)
    assert all(np.shares_memory(column, data) for column in columns)


def test_the_lowest_negative_axis_is_in_range():
    data = jnp.arange(6.0).reshape(2, 3)
    rows = unstack_pytree({"x": data, "n": np.arange(6).reshape(2, 3)}, axis=-2)
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[1]["x"], data[1])
    np.testing.assert_array_equal(rows[1]["n"], [3, 4, 5])
    stacked = stack_pytree([jnp.ones(3), jnp.zeros(3)], axis=-2)
    np.testing.assert_array_equal(stacked, [[1.0] * 3, [0.0] * 3])


def test_unstack_pytree_keeps_jax_leaves_on_their_device():
    device = jax.devices()[-1]
    tree = {"a": jax.device_put(jnp.arange(6.0).reshape(3, 2), device)}
    for piece in unstack_pytree(tree):
        assert isinstance(piece["a"], jax.Array)
        assert piece["a"].devices() == {device}


@pytest.mark.parametrize("path", UNSTACK_PATHS)
@pytest.mark.parametrize("length", [1, 7, 32, 37, 70])
def test_unstack_pytree_agrees_on_first_and_later_calls(path, length):
    # The compiled program slices several rows per call; the last chunk overlaps
    # the one before it when `length` is not a multiple of the chunk.
    data = np.arange(length * 6, dtype=np.float32).reshape(length, 2, 3)
    tree = {"a": jnp.asarray(data), "b": [jnp.asarray(data[:, 0] > 5)]}
    expected = [
        {"a": jnp.asarray(data[i]), "b": [jnp.asarray(data[i, 0] > 5)]}
        for i in range(length)
    ]
    with slicing_by(path):
        for _ in range(3):
            assert_identical(unstack_pytree(tree), expected)
            assert_identical(unstack_pytree(tree, axis=0), expected)


@pytest.mark.parametrize("path", UNSTACK_PATHS)
def test_unstack_pytree_slices_rows_larger_than_one_call_takes(path):
    # Rows of 40 KB, over the bytes the compiled program slices in one call.
    data = np.arange(3 * 10_000, dtype=np.float32).reshape(3, 10_000)
    with slicing_by(path):
        for _ in range(2):
            expected = [jnp.asarray(row) for row in data]
            assert_identical(unstack_pytree(jnp.asarray(data)), expected)


def test_unstack_pytree_compiles_once_slicing_on_the_host_cost_as_much(monkeypatch):
    # Two leaves of 10 rows, all sliced in one call: the compile costs an estimated
    # 1 + 10 * (2 + 2 * 3) = 81 s, and each call on the host 10 * 2 * 1 = 20 s.
    monkeypatch.setattr(lerax_utils, "_UNSTACK_COMPILE_SECONDS", (1.0, 2.0, 3.0))
    monkeypatch.setattr(lerax_utils, "_UNSTACK_HOST_SECONDS_PER_SLICE", 1.0)
    tree = [jnp.zeros((10, 2)), jnp.ones((10, 2))]
    expected = [[jnp.zeros(2), jnp.ones(2)]] * 10
    spent = []
    lerax_utils._unstack_host_seconds.clear()
    try:
        for _ in range(6):
            assert_identical(unstack_pytree(tree), expected)
            spent.extend(lerax_utils._unstack_host_seconds.values())
    finally:
        lerax_utils._unstack_host_seconds.clear()
    assert spent == [20.0, 40.0, 60.0, 80.0, math.inf, math.inf]


def test_a_numpy_integer_axis_works_as_the_int_does():
    trees = [{"a": jnp.arange(6.0).reshape(2, 3) + i, "s": "tag"} for i in range(4)]
    stacked = stack_pytree(trees, axis=1)
    assert_identical(stack_pytree(trees, axis=np.int64(1)), stacked)  # type: ignore[arg-type]
    assert_identical(unstack_pytree(stacked, axis=np.int32(1)), trees)  # type: ignore[arg-type]


def _committed(x: Any) -> Any:
    return getattr(x, "committed", getattr(x, "_committed", None))


@pytest.mark.parametrize("path", UNSTACK_PATHS)
def test_unstack_pytree_keeps_weak_types_and_commitment(path):
    device = jax.devices()[-1]
    weak = jax.lax.broadcast(jnp.asarray(1.5), (3, 2))  # a weakly typed float32
    assert weak.aval.weak_type
    tree = {
        "weak": weak,
        "free": jnp.arange(6, dtype=jnp.int32).reshape(3, 2),
        "placed": jax.device_put(np.arange(3.0, dtype=np.float32), device),
        "keys": jax.random.split(jax.random.key(1), 3),
    }
    # Each leaf alone (so each may take its own path), and all four together.
    parts = [{key: leaf} for key, leaf in tree.items()] + [tree]
    for part in parts:
        with slicing_by(path):
            slices = unstack_pytree(part)
        for index, piece in enumerate(slices):
            if "weak" in piece:
                assert piece["weak"].aval.weak_type
                assert piece["weak"].dtype == jnp.float32
            if "free" in piece:
                assert not piece["free"].aval.weak_type
                assert _committed(piece["free"]) is _committed(tree["free"]) is False
            if "placed" in piece:
                assert _committed(piece["placed"]) is True
                assert piece["placed"].devices() == {device}
            expected = {key: leaf[index] for key, leaf in part.items()}
            assert_identical(piece, expected, weak_types=True)


@pytest.mark.parametrize("guard", ["disallow", "log_explicit"])
def test_unstack_pytree_respects_transfer_guards(guard):
    # The host path's transfers are explicit: allowed under "disallow", which only
    # refuses implicit ones; under "log_explicit" the compiled program is used.
    tree = {"a": jnp.arange(12.0).reshape(4, 3), "b": jnp.arange(4)}
    expected = [{"a": tree["a"][i], "b": tree["b"][i]} for i in range(4)]
    with slicing_by("host"), jax.transfer_guard(guard):
        slices = unstack_pytree(tree)
    assert_identical(slices, expected)


def _programs_compiled(function: Any) -> int:
    """How many programs the jitted `function` has compiled so far."""
    return function._cache_size()


def _unstack_programs() -> int:
    return _programs_compiled(lerax_utils._index_rows)


@pytest.mark.parametrize("named", [False, True])
def test_unstack_pytree_compiles_once_host_time_would_reach_the_compile_time(named):
    # Costs in made-up units: a slice costs 1 on the host, so a call (4 rows x 2
    # leaves) costs 8; the program (4 rows per call) is estimated at 4 + 4 x (1 + 2
    # x 1) = 16. So call 1 slices on the host, call 2 brings the host total to 16
    # and compiles one program, and every later call reuses it.
    tree = {"a": jnp.zeros((4, 97)), "b": jnp.ones((4, 5), jnp.int32)}
    if named:  # On a one-device mesh: sliced on the host alike.
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
        spec = jax.sharding.PartitionSpec("d")
        tree = jax.device_put(tree, jax.sharding.NamedSharding(mesh, spec))
    expected = [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(4)]
    saved = lerax_utils._UNSTACK_COMPILE_SECONDS
    with slicing_by("host"):
        lerax_utils._UNSTACK_HOST_SECONDS_PER_SLICE = 1.0
        lerax_utils._UNSTACK_COMPILE_SECONDS = (4.0, 1.0, 1.0)
        try:
            programs = []
            for _ in range(4):
                assert_identical(unstack_pytree(tree), expected)
                programs.append(_unstack_programs())
            spent = list(lerax_utils._unstack_host_seconds.values())
        finally:
            lerax_utils._UNSTACK_COMPILE_SECONDS = saved
    before = programs[0]
    assert programs == [before, before + 1, before + 1, before + 1]
    assert spent == [math.inf]


def test_unstack_pytree_remembers_a_bounded_number_of_shapes():
    saved = lerax_utils._UNSTACK_SIGNATURES_KEPT
    lerax_utils._UNSTACK_SIGNATURES_KEPT = 3
    trees = [jnp.zeros((2, width)) for width in range(101, 106)]
    try:
        with slicing_by("scheduled"):
            for tree in trees[:4]:
                unstack_pytree(tree)
            unstack_pytree(trees[1])  # Seen again: now the most recent.
            unstack_pytree(trees[4])
            kept = [key[0][0][0] for key in lerax_utils._unstack_host_seconds]
    finally:
        lerax_utils._UNSTACK_SIGNATURES_KEPT = saved
    assert kept == [(2, 104), (2, 102), (2, 105)]


@pytest.mark.parametrize("enabled", [True, False])
def test_unstack_pytree_leaves_the_garbage_collector_alone(enabled):
    tree = {"a": jnp.arange(6.0).reshape(3, 2), "b": np.arange(3)}
    was_enabled = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        for path in UNSTACK_PATHS:
            with slicing_by(path):
                unstack_pytree(tree)
            assert gc.isenabled() is enabled
    finally:
        (gc.enable if was_enabled else gc.disable)()


def test_unstack_pytree_of_zero_length_is_empty():
    assert unstack_pytree({"a": jnp.zeros((0, 3)), "b": np.zeros(0)}) == []


@pytest.mark.parametrize("count", [2, 65])
def test_stack_pytree_of_numpy_scalars_is_what_np_stack_gives(count):
    # NumPy scalars and 0-d arrays stack into a NumPy array; a JAX leaf among them
    # makes the column a JAX array, as `jnp.stack` makes it.
    trees = [
        {
            "scalars": np.float64(i) / 3,
            "mixed": np.int8(i) if i % 2 else np.array(i, np.int8),
            "jax": np.float32(i) if i else jnp.float32(0),
        }
        for i in range(count)
    ]
    expected: dict[str, Any] = {
        key: np.stack([t[key] for t in trees]) for key in ("scalars", "mixed")
    }
    expected["jax"] = jnp.stack([t["jax"] for t in trees])
    assert_identical(stack_pytree(trees), expected)


@pytest.mark.parametrize("count", [64, 65, 150])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_stack_pytree_of_many_trees_matches_numpy(count, axis):
    trees = [
        {
            "w": jnp.full((2, 3), i, jnp.float32),
            "k": jax.random.split(jax.random.key(i), 2),
            "tag": "t",
        }
        for i in range(count)
    ]
    stacked = stack_pytree(trees, axis=axis)
    expected_w = np.stack([np.asarray(t["w"]) for t in trees], axis=axis)
    assert isinstance(stacked["w"], jax.Array)
    assert_identical(stacked["w"], jnp.asarray(expected_w))
    # Key data has a trailing axis of its own, so count the key axis from the front.
    key_data = [jax.random.key_data(t["k"]) for t in trees]
    expected_k = np.stack(key_data, axis=axis % 2)
    assert_identical(stacked["k"], jax.random.wrap_key_data(jnp.asarray(expected_k)))
    assert stacked["tag"] == "t"
    assert_identical(unstack_pytree(stacked, axis=axis), trees)


@pytest.mark.parametrize("count", [1, 64, 65, 200])
@pytest.mark.parametrize("strong", [(), (0,), (-1,), "all"])
def test_stack_pytree_keeps_weak_types_as_jnp_stack(count, strong):
    leaves = [jnp.asarray(float(i)) for i in range(count)]  # Weakly typed.
    for i in range(count) if strong == "all" else strong:
        leaves[i] = jnp.float32(leaves[i])
    assert_identical(stack_pytree(leaves), jnp.stack(leaves), weak_types=True)


def test_stack_pytree_compiles_two_programs_for_any_number_of_trees():
    # Per result shape, one program fills the first chunk and one every later chunk:
    # the last chunk overlaps the one before it rather than being shorter.
    for count in (65, 100, 150):
        trees = [{"w": jnp.full((3, 7), i, jnp.float32)} for i in range(count)]
        before = _programs_compiled(lerax_utils._stack_chunk_into)
        stacked = stack_pytree(trees)
        after = _programs_compiled(lerax_utils._stack_chunk_into)
        assert_identical(stacked["w"], jnp.asarray(np.stack([t["w"] for t in trees])))
        assert after - before == 2


def test_unstack_and_stack_pytree_inside_jit():
    tree = {"a": jnp.arange(12.0).reshape(3, 4), "name": "batch"}

    @jax.jit
    def roundtrip(a):
        slices = unstack_pytree({"a": a, "name": "batch"}, axis=1)
        assert len(slices) == 4  # The length is static under `jit`.
        return stack_pytree(slices, axis=1)["a"], slices[2]["a"]

    stacked, third = roundtrip(tree["a"])
    assert_identical(stacked, tree["a"])
    assert_identical(third, tree["a"][:, 2])


def test_stack_pytree_makes_a_population_filter_vmap_can_run():
    keys = jax.random.split(jax.random.key(0), 5)

    def make(key):
        return eqx.nn.MLP(3, 2, width_size=8, depth=2, key=key)

    population = stack_pytree([make(key) for key in keys])
    assert_identical(population, eqx.filter_vmap(make)(keys))
    x = jnp.ones(3)
    outputs = eqx.filter_vmap(lambda model: model(x))(population)
    assert_identical(outputs, jnp.stack([make(key)(x) for key in keys]))


def test_unstack_pytree_splits_a_filter_scan_rollout_into_steps():
    policy = Policy(jnp.ones(2), jnp.tanh, "actor")

    def step(state, _):
        new = Policy(policy.activation(state.params) + 1.0, state.activation, "actor")
        return new, new

    _, rollout = filter_scan(step, policy, length=4)
    states = unstack_pytree(rollout)
    expected = policy
    for state in states:
        expected = step(expected, None)[0]
        assert_identical(state, expected)


class _ReprRaises:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_unstack_pytree_errors():
    cases = [
        (
            {"obs": jnp.ones((3, 2)), "act": [jnp.ones(4)]},
            0,
            "unstack_pytree: the array leaves' sizes along `axis=0` differ "
            "(['act'][0]: 4, ['obs']: 3). Slice them to one size, or unstack the parts "
            "separately.",
        ),
        (
            {"obs": jnp.ones((3, 2)), "reward": jnp.ones(3)},
            1,
            "unstack_pytree: `axis=1` is out of range for the array at path "
            "['reward'] of shape (3,) (axes run from -1 to 0). Pick an axis all arrays "
            "have.",
        ),
        (
            {"step": jnp.float32(1.0)},
            0,
            "unstack_pytree: `axis=0` is out of range for the array at path ['step'] "
            "of shape () (it has no axes). Pick an axis all arrays have.",
        ),
        (
            {"lr": 0.1, "name": "adam"},
            0,
            "unstack_pytree: `tree` has no array leaves to slice (its leaves are "
            "[0.1, 'adam']). Pass a tree with at least one array.",
        ),
        (
            (1, 2, 3),  # Three leaves are shown whole, and more are cut short.
            0,
            "unstack_pytree: `tree` has no array leaves to slice (its leaves are "
            "[1, 2, 3]). Pass a tree with at least one array.",
        ),
        (
            (1, 2, 3, 4),
            0,
            "unstack_pytree: `tree` has no array leaves to slice (its leaves are "
            "[1, 2, 3, ...]). Pass a tree with at least one array.",
        ),
        (
            (_ReprRaises(), "label"),
            0,
            "unstack_pytree: `tree` has no array leaves to slice (its leaves are "
            "[<_ReprRaises object whose repr raised>, 'label']). Pass a tree with at "
            "least one array.",
        ),
    ]
    for tree, axis, message in cases:
        with pytest.raises(ValueError) as info:
            unstack_pytree(tree, axis=axis)
        assert str(info.value) == message
    for axis, got in ((0.0, "float 0.0"), (True, "bool True"), ("0", "str '0'")):
        with pytest.raises(TypeError) as info:  # A bool is refused, unlike NumPy.
            unstack_pytree({"a": jnp.ones((2, 2))}, axis=axis)  # type: ignore[arg-type]
        assert str(info.value) == f"unstack_pytree: `axis` must be an int; got {got}."
        with pytest.raises(TypeError) as info:
            stack_pytree([{"a": jnp.ones(2)}] * 2, axis=axis)  # type: ignore[arg-type]
        assert str(info.value) == f"stack_pytree: `axis` must be an int; got {got}."


_STACK_ERROR_END = ". Match its structure, array shapes and dtypes, and static leaves."


@pytest.mark.parametrize(
    ("second", "detail"),
    [
        (
            {"w": jnp.ones(3), "f": jax.nn.relu},
            "at path ['w']: it has shape (3,) and dtype float32, where trees[0] has "
            "shape (2,) and dtype float32",
        ),
        (
            {"w": jnp.ones(2, jnp.int32), "f": jax.nn.relu},
            "at path ['w']: it has shape (2,) and dtype int32, where trees[0] has "
            "shape (2,) and dtype float32",
        ),
        (
            {"w": jnp.ones(2), "f": "relu"},
            f"at path ['f']: it changed from {type(jax.nn.relu).__name__} "
            f"{jax.nn.relu!r} to str 'relu'",
        ),
        (
            {"w": jnp.ones(2), "g": jax.nn.relu},
            "at the top level: it had keys ['f', 'w'] and now has ['g', 'w']",
        ),
        (
            {"w": 1.0, "f": jax.nn.relu},
            "at path ['w']: it was an array of shape (2,) and dtype float32 and is now "
            "float 1.0",
        ),
        (
            {"w": jnp.ones(2), "f": jnp.ones(1)},
            "at path ['f']: it was the static (non-array) "
            f"{type(jax.nn.relu).__name__} {jax.nn.relu!r} and is now an array of "
            "shape (1,) and dtype float32",
        ),
        (
            {"w": np.zeros((2, 1), np.int8), "f": jax.nn.relu},
            "at path ['w']: it has shape (2, 1) and dtype int8, where trees[0] has "
            "shape (2,) and dtype float32",
        ),
        (
            {"w": np.zeros(2, np.float32), "f": np.zeros(3, np.int16)},
            "at path ['f']: it was the static (non-array) "
            f"{type(jax.nn.relu).__name__} {jax.nn.relu!r} and is now an array of "
            "shape (3,) and dtype int16",
        ),
    ],
)
def test_stack_pytree_rejects_mismatched_trees(second, detail):
    first = {"w": jnp.ones(2), "f": jax.nn.relu}
    with pytest.raises(ValueError) as info:
        stack_pytree([first, first, second])
    expected = f"stack_pytree: trees[2] differs from trees[0] {detail}"
    assert str(info.value) == expected + _STACK_ERROR_END


def test_stack_pytree_argument_errors():
    with pytest.raises(ValueError) as info:
        stack_pytree([])
    assert str(info.value) == (
        "stack_pytree: `trees` is empty; pass at least one pytree."
    )
    with pytest.raises(TypeError) as info:
        stack_pytree({"w": jnp.ones(2)})  # type: ignore[arg-type]
    assert str(info.value) == (
        "stack_pytree: `trees` must be a list or tuple of pytrees; got dict. Wrap a "
        "single pytree in a list."
    )
    with pytest.raises(TypeError) as info:  # A sequence, but of characters.
        stack_pytree("ab")  # type: ignore[arg-type]
    assert str(info.value) == (
        "stack_pytree: `trees` must be a list or tuple of pytrees; got str. Wrap a "
        "single pytree in a list."
    )
    with pytest.raises(ValueError) as info:
        stack_pytree([{"w": jnp.ones(2)}], axis=2)
    assert str(info.value) == (
        "stack_pytree: `axis=2` is out of range for the array at path ['w'] of shape "
        "(2,) (axes run from -2 to 1). Pick an axis all arrays have."
    )


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
        for axis in (0, 1, -1):
            full = list(spec) + [None] * (len(shape) - len(spec))
            at = axis % len(shape)  # The axis, non-negative.
            kept = full[:at] + full[at + 1 :]
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
                        and equivalent(back[name], kept[:at] + [None] + kept[at:]),
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
    assert report == {"cases": 24, "failures": []}
