"""Small utilities for JAX and Equinox: loops and branches over any pytree.

`lerax_utils` is one file with no dependencies beyond `jax`, `equinox` and `numpy`.

- `filter_scan`: `jax.lax.scan` whose carry, inputs and outputs may hold anything
  (Equinox modules with function fields, strings, Python scalars, PRNG keys). Arrays
  are traced; every other leaf is static.
- `filter_cond`: `jax.lax.cond` for any pytree. Only the chosen branch runs.
- `unstack_pytree`, `stack_pytree`: split a batched pytree into one pytree per index
  along an axis, and join such pytrees back.
- `callback_wrapper`, `callback_with_numpy_wrapper`, `callback_with_list_wrapper`,
  `print_callback`: call host Python (logging, printing, plotting) from inside `jit`.
- `Serializable`: an `eqx.Module` base class whose models save and load themselves, in
  a checked, versioned format, atomically, even from inside `jit`.

**Installing.** Either `pip install git+<repository url>`, or vendor it: copy this file
into your project (for example as `yourpackage/_lerax_utils.py`) and import from there.
The file is self-contained, so the copy needs nothing else from this repository.

**Supported versions.** Python 3.11 or newer, with the jax, equinox and numpy versions
given as lower bounds in `pyproject.toml`.
"""

__version__ = "0.1.0"

__all__ = [
    # Control flow
    "filter_cond",
    "filter_scan",
    # Batches of pytrees
    "stack_pytree",
    "unstack_pytree",
    # Host callbacks
    "callback_with_list_wrapper",
    "callback_with_numpy_wrapper",
    "callback_wrapper",
    "print_callback",
    # Checkpoints
    "Serializable",
]

import collections
import concurrent.futures
import contextlib
import dataclasses
import enum
import functools
import inspect
import json
import math
import os
import pathlib
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Sequence
from typing import IO, Any, ParamSpec, TypeVar

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

_Carry = TypeVar("_Carry")
_X = TypeVar("_X")
_Y = TypeVar("_Y")
_Out = TypeVar("_Out")
_Tree = TypeVar("_Tree")
_Params = ParamSpec("_Params")
_Model = TypeVar("_Model", bound="Serializable")

_KeyPath = tuple[Any, ...]

#
# Pytree comparison: the checks behind every error message about a changed leaf
#

_PYTHON_SCALARS = (bool, int, float, complex)


def _is_key_array(array: Any) -> bool:
    """Whether `array` holds typed PRNG keys (`jax.random.key`, not raw uint32 data)."""
    return jnp.issubdtype(array.dtype, jax.dtypes.prng_key)


def _describe_leaf(leaf: Any) -> str:
    if eqx.is_array(leaf):
        return f"an array of shape {tuple(leaf.shape)} and dtype {leaf.dtype}"
    return f"{type(leaf).__name__} {leaf!r}"


def _static_leaves_equal(old: Any, new: Any) -> bool:
    """Whether two non-array leaves are the same static value, type included."""
    if old is new:
        return True
    if type(old) is not type(new):
        return False
    try:
        return bool(old == new)
    except Exception:  # An `__eq__` that raises or returns something ambiguous.
        return False


def _leaf_difference(old: Any, new: Any) -> str | None:
    """Describe how `new` differs from `old`, or `None` if it may stand in its place.

    Array leaves may hold any values; non-array leaves must be equal.
    """
    old_is_array = eqx.is_array(old)
    new_is_array = eqx.is_array(new)
    if old_is_array and new_is_array:
        return None
    if old_is_array:
        return f"was {_describe_leaf(old)} and is now {_describe_leaf(new)}"
    if new_is_array:
        return (
            f"was the static (non-array) {_describe_leaf(old)} and is now "
            f"{_describe_leaf(new)}"
        )
    if _static_leaves_equal(old, new):
        return None
    return f"changed from {_describe_leaf(old)} to {_describe_leaf(new)}"


def _describe_node(node: Any) -> str:
    if jtu.treedef_is_leaf(jtu.tree_structure(node)) and node is not None:
        return _describe_leaf(node)
    return f"a {type(node).__name__}"


def _where(path: str) -> str:
    return f"at path {path}" if path else "at the top level"


def _is_strict_child(root: Any) -> Callable[[Any], bool]:
    return lambda node: node is not root


def _node_difference(old: Any, new: Any) -> tuple[str, str] | None:
    """Compare the top nodes of two pytrees: `(key suffix, message)`, or None."""
    old_def = jtu.tree_structure(old, is_leaf=_is_strict_child(old))
    new_def = jtu.tree_structure(new, is_leaf=_is_strict_child(new))
    if old_def == new_def:
        return None
    if type(old) is not type(new):
        return "", f"was {_describe_node(old)} and is now {_describe_node(new)}"
    if isinstance(old, eqx.Module):
        for field in _static_fields(old):
            old_value = getattr(old, field, None)
            new_value = getattr(new, field, None)
            if not _static_leaves_equal(old_value, new_value):
                return f".{field}", (
                    f"is a static field that changed from {_describe_leaf(old_value)} "
                    f"to {_describe_leaf(new_value)}"
                )
    if isinstance(old, dict):
        return (
            "",
            f"had keys {sorted(old, key=repr)} and now has {sorted(new, key=repr)}",
        )
    if isinstance(old, list | tuple):
        return "", f"had length {len(old)} and now has length {len(new)}"
    return "", f"changed structure from {old_def} to {new_def}"


def _static_fields(module: eqx.Module) -> list[str]:
    return [f.name for f in dataclasses.fields(module) if f.metadata.get("static")]


def _tree_difference(old: Any, new: Any) -> tuple[str, str] | None:
    """Find the first place where `new` may not stand in for `old`.

    Returns `(path, message)`, where `path` is rendered by `jax.tree_util.keystr`, or
    `None` when both trees have the same structure and the same non-array leaves.
    """
    old_leaves, old_def = jtu.tree_flatten_with_path(old)
    new_leaves, new_def = jtu.tree_flatten(new)
    if old_def == new_def:
        for (path, old_leaf), new_leaf in zip(old_leaves, new_leaves, strict=True):
            message = _leaf_difference(old_leaf, new_leaf)
            if message is not None:
                return jtu.keystr(path), message
        return None
    return _structure_difference(old, new, ())


def _structure_difference(old: Any, new: Any, path: _KeyPath) -> tuple[str, str]:
    """Walk two trees of different structure down to the first node that differs."""
    found = _node_difference(old, new)
    if found is not None:
        suffix, message = found
        return jtu.keystr(path) + suffix, message
    old_children = jtu.tree_flatten_with_path(old, is_leaf=_is_strict_child(old))[0]
    new_children = jtu.tree_leaves(new, is_leaf=_is_strict_child(new))
    for (key, old_child), new_child in zip(old_children, new_children, strict=True):
        if jtu.tree_structure(old_child) != jtu.tree_structure(new_child):
            return _structure_difference(old_child, new_child, path + key)
    # Same node and same child structures means the same structure overall.
    raise RuntimeError("internal error: trees of different structure compared equal")


#
# Control flow: filter_scan, filter_cond
#

_SCAN_TAKES_SPLIT_TRANSPOSE = (
    "_split_transpose" in inspect.signature(jax.lax.scan).parameters
)


def filter_scan(
    f: Callable[[_Carry, _X], tuple[_Carry, _Y]],
    init: _Carry,
    xs: _X | None = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    _split_transpose: bool = False,
) -> tuple[_Carry, _Y]:
    """As `jax.lax.scan`, except that `init`, `xs` and the outputs of `f` may be any
    pytree. Array leaves are traced; every other leaf is static.

    Use it to loop with an Equinox module in the carry: its parameters are traced and
    its activation functions, strings and Python scalars ride along unchanged.

    **Arguments:**

    - `f`: the step, `f(carry, x) -> (new_carry, y)`. It may be a plain function, a
        bound method or an `eqx.Partial`.
    - `init`: the initial carry. JAX arrays, NumPy arrays and typed PRNG key arrays are
        traced (NumPy arrays come back as JAX arrays). Every other leaf is static:
        `new_carry` must hold the same value there, and the same structure overall.
    - `xs`: the inputs, sliced along the leading axis of every array leaf. Non-array
        leaves are passed unchanged to every step. `None` if there are no inputs.
    - `length`: the number of steps. Required when `xs` holds no arrays; otherwise it
        must equal their leading size.
    - `reverse`, `unroll`: as `jax.lax.scan`.
    - `_split_transpose`: as `jax.lax.scan`; ignored by versions of JAX that no
        longer accept it (it never changes results).

    **Returns:**

    `(final_carry, ys)`. Array leaves of `y` are stacked along a new leading axis; its
    non-array leaves are returned once, unstacked, as `eqx.filter_vmap` returns a
    batch of modules.

    **Raises:**

    - `ValueError` if a static carry leaf changes, if a Python scalar in the carry
        comes back as an array, if `xs` has inconsistent leading sizes, or if `length`
        disagrees with `xs`. The message names the leaf path.
    - `TypeError` if `f` is not callable or does not return a pair.

    Under `jax.jit`, `jax.vmap` and `jax.grad` it behaves as `jax.lax.scan`: on a tree
    whose leaves are all arrays it builds exactly the same program.

    **Example:**

    ```python
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from lerax_utils import filter_scan

    mlp = eqx.nn.MLP(2, 2, width_size=8, depth=1, key=jax.random.key(0))

    def step(state, _):
        model, x = state
        x = model(x)
        return (model, x), x

    (mlp, x), xs = filter_scan(step, (mlp, jnp.ones(2)), length=5)
    print(xs.shape)  # (5, 2)
    ```
    """
    if not callable(f):
        raise TypeError(f"filter_scan: `f` must be callable; got {_describe_leaf(f)}.")
    length = _scan_length(xs, length)

    init_traced, init_static = eqx.partition(init, eqx.is_array)
    xs_traced, xs_static = eqx.partition(xs, eqx.is_array)
    ys_per_trace: list[Any] = []

    def step(carry_traced: Any, x_traced: Any) -> tuple[Any, Any]:
        carry = eqx.combine(carry_traced, init_static)
        x = eqx.combine(x_traced, xs_static)
        out = f(carry, x)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(
                "filter_scan: `f` must return a pair `(new_carry, y)`; got "
                f"{_describe_leaf(out)}."
            )
        new_carry, y = out
        ys_per_trace.append(y)
        return _traced_part_of_new_carry(init, new_carry), eqx.filter(y, eqx.is_array)

    options = (
        {"_split_transpose": _split_transpose} if _SCAN_TAKES_SPLIT_TRANSPOSE else {}
    )
    final_traced, ys_traced = jax.lax.scan(
        step,
        init_traced,
        xs_traced,
        length=length,
        reverse=reverse,
        unroll=unroll,
        **options,
    )
    for later in ys_per_trace[1:]:
        difference = _tree_difference(ys_per_trace[0], later)
        if difference is not None:
            path, message = difference
            raise ValueError(
                f"filter_scan: the non-array part of `f`'s output `y` differs between "
                f"two traces of `f`: {_where(path)} it {message}. JAX may trace `f` "
                "more than once, and each trace must give the same static outputs. "
                "Return arrays for values that vary, or make the static values "
                "independent of how often `f` is called."
            )
    ys_static = eqx.filter(ys_per_trace[0], eqx.is_array, inverse=True)
    return eqx.combine(final_traced, init_static), eqx.combine(ys_traced, ys_static)


def _scan_length(xs: Any, length: int | None) -> int:
    """The number of steps, checked against the leading sizes of `xs`'s arrays."""
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(
                f"filter_scan: `length` must be a Python int or None; got "
                f"{_describe_leaf(length)}."
            )
        if length < 0:
            raise ValueError(
                f"filter_scan: `length` must be non-negative; got {length}."
            )
    sizes: dict[str, int] = {}
    for path, leaf in jtu.tree_flatten_with_path(xs)[0]:
        if not eqx.is_array(leaf):
            continue
        if leaf.ndim == 0:
            raise ValueError(
                f"filter_scan: the array at `xs` path {jtu.keystr(path)} is a scalar "
                "(shape ()), so it has no leading axis to scan over. Give it a "
                "leading axis of size `length`, or make it a Python scalar to pass it "
                "unchanged to every step."
            )
        sizes[jtu.keystr(path)] = leaf.shape[0]
    if not sizes:
        if length is None:
            raise ValueError(
                "filter_scan: cannot tell how many steps to run, because `xs` holds no "
                "arrays. Pass `length=`."
            )
        return length
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{path}: {size}" for path, size in sizes.items())
        raise ValueError(
            "filter_scan: every array in `xs` must have the same leading size, but the "
            f"leading sizes differ ({listing}). Slice or pad them to one length."
        )
    (size,) = distinct
    if length is not None and length != size:
        raise ValueError(
            f"filter_scan: `length={length}` disagrees with the leading size {size} of "
            f"the arrays in `xs`. Pass `length={size}` or leave it out."
        )
    return size


def _traced_part_of_new_carry(init: Any, new_carry: Any) -> Any:
    """Check `f`'s new carry against `init`, then keep the leaves that are traced.

    Where `init` holds an array, `new_carry` may hold an array or a Python scalar (as
    `jax.lax.scan` allows, which then checks shapes and dtypes). Elsewhere it must hold
    the same static value. The result has `None` at static positions, exactly as
    `eqx.partition(init, eqx.is_array)` does.
    """
    init_leaves, carry_def = jtu.tree_flatten_with_path(init)
    new_leaves, new_def = jtu.tree_flatten(new_carry)
    if new_def != carry_def:
        path, message = _structure_difference(init, new_carry, ())
        raise ValueError(_carry_error(path, message, old=None))
    traced_leaves = []
    for (path, old), new in zip(init_leaves, new_leaves, strict=True):
        if eqx.is_array(old) and isinstance(new, _PYTHON_SCALARS):
            message = None
        else:
            message = _leaf_difference(old, new)
        if message is not None:
            raise ValueError(_carry_error(jtu.keystr(path), message, old))
        traced_leaves.append(new if eqx.is_array(old) else None)
    return carry_def.unflatten(traced_leaves)


def _carry_error(path: str, message: str, old: Any) -> str:
    if eqx.is_array(old):
        fix = (
            "Return an array (or a Python number) there, with the same shape and dtype "
            "as in `init`."
        )
    else:
        fix = (
            "Only array leaves of the carry may change from step to step. If this "
            "value must change, make it an array in `init` with `jnp.asarray`; "
            "otherwise keep it out of the carry (close over it in `f`, or pass it in "
            "`xs`)."
        )
    return (
        "filter_scan: `f` returned a carry that differs from `init` "
        f"{_where(path)}: it {message}. {fix}"
    )


def filter_cond(
    pred: Any,
    true_fun: Callable[..., _Out],
    false_fun: Callable[..., _Out],
    *operands: Any,
) -> _Out:
    """As `jax.lax.cond`, except that the operands and outputs may be any pytree.

    Array leaves of `operands` are traced; every other leaf is passed to both branches
    unchanged. Only the chosen branch runs: under `jax.jit` this is a real `cond`, not
    a computation of both branches followed by a select.

    **Arguments:**

    - `pred`: a scalar boolean (or integer) array, or a Python bool.
    - `true_fun`, `false_fun`: called as `fun(*operands)`. They must return pytrees of
        the same structure, arrays of the same shape and dtype, and equal non-array
        leaves.
    - `*operands`: the arguments to the branches.

    **Returns:**

    The output of the chosen branch.

    **Raises:**

    - `TypeError` if a branch is not callable.
    - `ValueError` if `pred` is not a scalar, or the branches return different
        structures or different non-array leaves. The message names the leaf path.

    **Example:**

    ```python
    import jax.numpy as jnp
    from lerax_utils import filter_cond

    def explore(x, label):
        return x + 1.0, label

    def exploit(x, label):
        return x - 1.0, label

    value, label = filter_cond(jnp.array(True), explore, exploit, jnp.zeros(3), "act")
    print(value, label)  # [1. 1. 1.] act
    ```
    """
    for name, fun in (("true_fun", true_fun), ("false_fun", false_fun)):
        if not callable(fun):
            raise TypeError(
                f"filter_cond: `{name}` must be callable; got {_describe_leaf(fun)}."
            )
    if eqx.is_array(pred) and pred.shape != ():
        raise ValueError(
            f"filter_cond: `pred` must be a scalar; got an array of shape "
            f"{tuple(pred.shape)}. Reduce it first, for example with `jnp.any` or "
            "`jnp.all`."
        )
    operands_traced, operands_static = eqx.partition(operands, eqx.is_array)
    outputs: dict[str, Any] = {}

    def branch(name: str, fun: Callable[..., Any]) -> Callable[[Any], Any]:
        def run(traced: Any) -> Any:
            outputs[name] = fun(*eqx.combine(traced, operands_static))
            return eqx.filter(outputs[name], eqx.is_array)

        return run

    def check_branches_agree() -> None:
        if len(outputs) < 2:  # Only one branch was traced (e.g. `disable_jit`).
            return
        difference = _tree_difference(outputs["true_fun"], outputs["false_fun"])
        if difference is not None:
            path, message = difference
            raise ValueError(
                f"filter_cond: the branches' outputs disagree {_where(path)}: "
                f"compared with `true_fun`'s output, `false_fun`'s {message}. Both "
                "branches must return the same structure and the same non-array "
                "leaves; return arrays for values that differ between branches."
            )

    try:
        out_traced = jax.lax.cond(
            pred,
            branch("true_fun", true_fun),
            branch("false_fun", false_fun),
            operands_traced,
        )
    except TypeError:
        # `lax.cond` rejects branches whose array parts differ in structure; comparing
        # the whole outputs usually explains why, with a path.
        check_branches_agree()
        raise
    check_branches_agree()
    out_static = eqx.filter(next(iter(outputs.values())), eqx.is_array, inverse=True)
    return eqx.combine(out_traced, out_static)


#
# Batches of pytrees: unstack_pytree, stack_pytree
#


def unstack_pytree(tree: _Tree, *, axis: int = 0) -> list[_Tree]:
    """Split a batched pytree into one pytree per index along `axis`.

    The inverse of `stack_pytree`. Use it to turn the stacked outputs of `filter_scan`
    or `eqx.filter_vmap` into one pytree per step or per member.

    **Arguments:**

    - `tree`: a pytree whose array leaves all have the same size along `axis`.
        Non-array leaves (functions, strings, Python scalars) are copied into every
        slice.
    - `axis`: the axis to split along. Negative values count from the end of each
        leaf, as in NumPy.

    **Returns:**

    A list of `n` pytrees with the structure of `tree`, where `n` is the size of
    `axis`; an empty list if `n` is 0. NumPy leaves are split into NumPy views (no
    copy, no device transfer). JAX leaves are split into new JAX arrays with the
    leaf's dtype and weak type, placed as `leaf[i]` would place them:

    - a leaf committed to one device: slices committed to that device;
    - an uncommitted leaf: uncommitted slices on the default device;
    - a leaf with a `NamedSharding` (auto or explicit mesh): slices with the same
        mesh and the leaf's partition spec less the entry for `axis`. The other axes
        stay sharded as they were; if `axis` itself was sharded, each slice is
        whole on every device that held part of it (replicated along those mesh
        axes), since one index of it lived on some devices only.

    **Raises:**

    `ValueError`, naming the leaf paths and sizes, if the leaves disagree on the size
    along `axis`, if `axis` is out of range for a leaf, or if `tree` has no array
    leaves (then the number of slices is undefined). `TypeError` if `axis` is not an
    int.

    It works inside `jax.jit`, where the number of slices is static. Outside `jit`,
    JAX leaves of a set of shapes seen for the first time (or only a few times) are
    sliced without compiling anything: each leaf is read to the host once and its
    slices are put back on its devices in one batched `jax.device_put`. Once the
    time spent that way on a set of shapes would exceed the time to compile a small
    program that takes up to 32 slices of every leaf per call, that program is
    compiled and used from then on. So episodes of many lengths compile nothing, while a
    shape unstacked again and again runs at the speed of `jnp.unstack`; no program
    with one output per slice is ever compiled. Weakly typed leaves, PRNG keys,
    leaves with other kinds of sharding, and the leaves on the same devices as them,
    always use the program. It does not touch the garbage collector.

    **Example:**

    ```python
    import jax.numpy as jnp
    from lerax_utils import unstack_pytree

    batch = {"obs": jnp.zeros((3, 2)), "done": jnp.array([False, False, True])}
    steps = unstack_pytree(batch)
    print(len(steps), steps[2]["done"])  # 3 True
    ```
    """
    _check_axis_is_int("unstack_pytree", axis)
    paths_and_leaves, treedef = jtu.tree_flatten_with_path(tree)
    leaves = [leaf for _, leaf in paths_and_leaves]
    axes: dict[int, int] = {}
    sizes: dict[str, int] = {}
    for position, (path, leaf) in enumerate(paths_and_leaves):
        if eqx.is_array(leaf):
            where = jtu.keystr(path)
            axes[position] = _leaf_axis("unstack_pytree", axis, leaf, where, leaf.ndim)
            sizes[where] = leaf.shape[axes[position]]
    if not sizes:
        raise ValueError(
            "unstack_pytree: `tree` has no array leaves, so the number of slices is "
            f"undefined (its leaves are {_short_list(leaves)}). Pass a tree with at "
            "least one array."
        )
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{path}: {size}" for path, size in sizes.items())
        raise ValueError(
            f"unstack_pytree: every array leaf must have the same size along "
            f"`axis={axis}`, but the sizes differ ({listing}). Slice them to one size, "
            "or unstack the parts separately."
        )
    length = next(iter(sizes.values()))
    columns = _unstack_columns(leaves, axes, length)
    if len(columns) == len(leaves):  # Every leaf is an array.
        ordered = [columns[position] for position in range(len(leaves))]
        return [treedef.unflatten(row) for row in zip(*ordered, strict=True)]
    positions = list(columns)
    slices = []
    for values in zip(*columns.values(), strict=True):
        row = list(leaves)
        for position, value in zip(positions, values, strict=True):
            row[position] = value
        slices.append(treedef.unflatten(row))
    return slices


def _unstack_columns(
    leaves: list[Any], axes: dict[int, int], length: int
) -> dict[int, Sequence[Any]]:
    """Split each array leaf into its `length` slices, keyed by leaf position."""
    columns: dict[int, Sequence[Any]] = {}
    jax_groups: dict[Any, list[int]] = {}
    for position, axis in axes.items():
        leaf = leaves[position]
        if isinstance(leaf, np.ndarray):
            moved = np.moveaxis(leaf, axis, 0)
            # `moved[i, ...]` is a view even when it has no dimensions left.
            columns[position] = [moved[index, ...] for index in range(length)]
        elif isinstance(leaf, jax.core.Tracer):
            columns[position] = [
                jax.lax.index_in_dim(leaf, index, axis, keepdims=False)
                for index in range(length)
            ]
        else:  # A concrete JAX array: slice it with the others on the same devices.
            # (A program's outputs are all committed to their devices if any input
            # is, so committed and uncommitted leaves are sliced apart.)
            group = (leaf.sharding, _is_committed(leaf))
            jax_groups.setdefault(group, []).append(position)
    for positions in jax_groups.values():
        group = [leaves[position] for position in positions]
        group_axes = tuple(axes[position] for position in positions)
        group_columns = _slice_columns(group, group_axes, length)
        for position, column in zip(positions, group_columns, strict=True):
            columns[position] = column
    return columns


# Concrete JAX leaves are sliced in one of two ways, whichever costs less so far:
#
# - On the host: one transfer of each leaf to NumPy, then one batched `device_put` of
#   its slices. Nothing is compiled, but every slice costs a transfer (tens of µs).
# - By a compiled program that returns up to `_UNSTACK_ROWS_PER_CALL` consecutive
#   slices of every leaf per call (a few µs a slice), after a compile of 0.1 to 0.6 s
#   per set of shapes.
#
# A set of shapes is sliced on the host until the time spent on it there would pass
# the estimated compile time; from then on it is compiled (the "ski rental" rule).
# Shapes seen once or a few times (episodes of many lengths) never compile, and no
# set of shapes costs more than about twice the cheaper of the two ways. The estimate
# is kept for the last `_UNSTACK_SIGNATURES_KEPT` sets of shapes only.
# Rows per call, as measured fastest on XLA:CPU against `jnp.unstack`: 8 for a single
# leaf, 8 more per extra leaf up to 32 (10 narrow leaves: 32; one wide or one long
# thin leaf: 8), and no more rows than fit `_UNSTACK_BYTES_PER_CALL`.
_UNSTACK_ROWS_PER_LEAF = 8
_UNSTACK_ROWS_PER_CALL = 32
_UNSTACK_BYTES_PER_CALL = 32 * 1024
_UNSTACK_HOST_SECONDS_PER_SLICE = 40e-6
# Compile time measured on XLA:CPU: about 50 ms, plus 15 ms per row, plus 1 ms per
# output (`rows x leaves`).
_UNSTACK_COMPILE_SECONDS = (0.05, 0.015, 0.001)
_UNSTACK_SIGNATURES_KEPT = 4096
_unstack_host_seconds: collections.OrderedDict[Any, float] = collections.OrderedDict()
_unstack_host_seconds_lock = threading.Lock()


def _slice_columns(
    group: list[jax.Array], axes: tuple[int, ...], length: int
) -> list[list[jax.Array]]:
    """`columns[j][i]`: slice `i` of `group[j]` along `axes[j]`."""
    if length == 0:
        return [[] for _ in group]
    row_bytes = sum(_byte_size(leaf) for leaf in group) // length
    count = min(_UNSTACK_ROWS_PER_LEAF * len(group), _UNSTACK_ROWS_PER_CALL)
    count = min(count, _UNSTACK_BYTES_PER_CALL // max(row_bytes, 1), length)
    count = max(1, count)
    if _host_transfers_allowed() and all(_slices_on_host(leaf) for leaf in group):
        signature = (
            tuple((leaf.shape, leaf.dtype, leaf.sharding) for leaf in group),
            axes,
        )
        host_seconds = length * len(group) * _UNSTACK_HOST_SECONDS_PER_SLICE
        fixed, per_row, per_output = _UNSTACK_COMPILE_SECONDS
        compile_seconds = fixed + count * (per_row + len(group) * per_output)
        if not _pays_to_compile(signature, host_seconds, compile_seconds):
            return _slice_columns_on_host(group, axes, length)
    group = [_unshard_axis(leaf, axis) for leaf, axis in zip(group, axes, strict=True)]
    columns = [[] for _ in group]
    done = 0
    for start in _chunk_starts(length, count):
        chunk = _index_rows(group, start, axes=axes, count=count)
        for column, pieces in zip(columns, chunk, strict=True):
            column.extend(pieces[done - start :])
        done = start + count
    return columns


def _byte_size(leaf: jax.Array) -> int:
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return leaf.size * 8  # Roughly: the two uint32 words of a default key.
    return leaf.size * leaf.dtype.itemsize


def _pays_to_compile(
    signature: Any, host_seconds: float, compile_seconds: float
) -> bool:
    """Whether to compile for `signature` now, by the ski-rental rule above.

    Records the host time this call adds when it does not compile; `inf` marks a
    signature that has been compiled.
    """
    with _unstack_host_seconds_lock:
        spent = _unstack_host_seconds.pop(signature, 0.0) + host_seconds
        compile_now = spent >= compile_seconds
        _unstack_host_seconds[signature] = math.inf if compile_now else spent
        while len(_unstack_host_seconds) > _UNSTACK_SIGNATURES_KEPT:
            _unstack_host_seconds.popitem(last=False)
    return compile_now


def _host_transfers_allowed() -> bool:
    """Whether no `jax.transfer_guard` would refuse (or log) the host path.

    Its transfers are explicit (`jax.device_get`, `jax.device_put`), so only the
    `*_explicit` levels concern it.
    """
    guards = ("", "_device_to_host", "_host_to_device")
    levels = {getattr(jax.config, f"jax_transfer_guard{name}", None) for name in guards}
    return levels <= {None, "allow", "log", "disallow"}


def _slices_on_host(leaf: jax.Array) -> bool:
    """Whether slicing `leaf` through NumPy gives exactly what a program would."""
    return (
        not leaf.aval.weak_type  # pyright: ignore[reportAttributeAccessIssue]
        and not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        and leaf.is_fully_addressable
        and isinstance(leaf.sharding, _HOST_SLICED_SHARDINGS)
    )


_HOST_SLICED_SHARDINGS = (
    jax.sharding.SingleDeviceSharding,
    jax.sharding.NamedSharding,
)


def _slice_columns_on_host(
    group: list[jax.Array], axes: tuple[int, ...], length: int
) -> list[list[jax.Array]]:
    """The slices of `group`, by way of NumPy.

    Slices of a committed leaf are committed to where `_slice_sharding` says; those
    of an uncommitted leaf are uncommitted, on the default device, as a compiled
    program (or `leaf[i]`) would leave them.
    """
    columns = []
    for leaf, axis in zip(group, axes, strict=True):
        host = np.moveaxis(np.asarray(jax.device_get(leaf)), axis, 0)
        sharding = _slice_sharding(leaf.sharding, axis) if _is_committed(leaf) else None
        columns.append(
            jax.device_put([host[index, ...] for index in range(length)], sharding)
        )
    return columns


def _is_committed(leaf: jax.Array) -> bool:
    """Whether `leaf` is committed to its devices (jax 0.4.26 has no public name)."""
    return getattr(leaf, "committed", getattr(leaf, "_committed", True))


def _slice_sharding(sharding: Any, axis: int) -> Any:
    """Where a slice along `axis` goes: the sharding of the other axes, kept."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = list(sharding.spec)
    if axis < len(spec):
        del spec[axis]
    return _named_sharding(sharding, spec)


def _named_sharding(sharding: Any, spec: list[Any]) -> Any:
    spec_object = jax.sharding.PartitionSpec(*spec)
    if sharding.memory_kind is None:
        return jax.sharding.NamedSharding(sharding.mesh, spec_object)
    return jax.sharding.NamedSharding(
        sharding.mesh, spec_object, memory_kind=sharding.memory_kind
    )


def _unshard_axis(leaf: jax.Array, axis: int) -> jax.Array:
    """`leaf`, gathered along `axis` if a named sharding splits it there.

    A slice along a split axis would live on some of the devices only, and explicit
    meshes refuse to slice such an axis at all; so the leaf is first laid out with
    that axis whole on every device, and the other axes as they were.
    """
    sharding = leaf.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return leaf
    spec = list(sharding.spec)
    if axis >= len(spec) or spec[axis] is None:
        return leaf
    spec[axis] = None
    return jax.device_put(leaf, _named_sharding(sharding, spec))


@functools.partial(jax.jit, static_argnames=("axes", "count"))
def _index_rows(
    leaves: list[jax.Array], start: int, *, axes: tuple[int, ...], count: int
) -> list[list[jax.Array]]:
    """Slices `start` to `start + count` of every leaf, along each leaf's axis."""
    return [
        [
            jax.lax.dynamic_index_in_dim(leaf, start + offset, axis, keepdims=False)
            for offset in range(count)
        ]
        for leaf, axis in zip(leaves, axes, strict=True)
    ]


def stack_pytree(trees: Sequence[_Tree], *, axis: int = 0) -> _Tree:
    """Join pytrees of the same structure into one, stacking array leaves on `axis`.

    The inverse of `unstack_pytree`: use it to build a population of models to
    `eqx.filter_vmap` over, or to batch per-step states.

    **Arguments:**

    - `trees`: a non-empty list or tuple of pytrees with the same structure, the same
        shape and dtype at each array leaf, and equal non-array leaves.
    - `axis`: where the new axis goes in each stacked leaf, as in `numpy.stack`.
        Negative values count from the end of the result.

    **Returns:**

    One pytree with the structure of `trees[0]`. Array leaves gain an axis of size
    `len(trees)`; non-array leaves are taken from `trees[0]`. A leaf that is a NumPy
    array in every tree stays NumPy; otherwise the result is a JAX array.

    **Raises:**

    `ValueError` if `trees` is empty, if `axis` is out of range, or if a tree differs
    from `trees[0]` in structure, array shape or dtype, or a non-array leaf; the
    message names the tree's index and the leaf path. `TypeError` if `trees` is not a
    list or tuple, or `axis` is not an int.

    It works inside `jax.jit`. Outside `jit`, more than 64 JAX leaves are copied into
    their result 64 at a time by two small compiled programs per result shape: one
    for the first chunk, one for every later chunk (a last, short chunk overlaps the
    one before it instead). So stacking thousands of trees compiles nothing large,
    and the data is copied once. The result lives where `jnp.stack` would put it:
    slices with a `NamedSharding` give a result sharded as they are, with the new
    axis whole on every device.

    **Example:**

    ```python
    import equinox as eqx
    import jax
    from lerax_utils import stack_pytree

    keys = jax.random.split(jax.random.key(0), 4)
    population = stack_pytree([eqx.nn.Linear(3, 2, key=k) for k in keys])
    print(population.weight.shape)  # (4, 2, 3)
    ```
    """
    _check_axis_is_int("stack_pytree", axis)
    if not isinstance(trees, Sequence) or isinstance(trees, str):
        raise TypeError(
            "stack_pytree: `trees` must be a list or tuple of pytrees; got "
            f"{type(trees).__name__}. Wrap a single pytree in a list."
        )
    if len(trees) == 0:
        raise ValueError(
            "stack_pytree: `trees` is empty, so there is no structure to stack into. "
            "Pass at least one pytree."
        )
    first_paths_and_leaves, treedef = jtu.tree_flatten_with_path(trees[0])
    first = [leaf for _, leaf in first_paths_and_leaves]
    columns: dict[int, list[Any]] = {}
    for position, (path, leaf) in enumerate(first_paths_and_leaves):
        if eqx.is_array(leaf):
            _leaf_axis("stack_pytree", axis, leaf, jtu.keystr(path), leaf.ndim + 1)
            columns[position] = [leaf]
    for index in range(1, len(trees)):
        leaves, other_def = jtu.tree_flatten(trees[index])
        if other_def != treedef:
            path, message = _structure_difference(trees[0], trees[index], ())
            raise ValueError(_stack_error(index, path, message))
        for position, (old, new) in enumerate(zip(first, leaves, strict=True)):
            message = _leaf_difference(old, new)
            if message is None and position in columns:
                if (new.shape, new.dtype) != (old.shape, old.dtype):
                    message = (
                        f"has shape {tuple(new.shape)} and dtype {new.dtype}, where "
                        f"trees[0] has shape {tuple(old.shape)} and dtype {old.dtype}"
                    )
                columns[position].append(new)
            if message is not None:
                path = jtu.keystr(first_paths_and_leaves[position][0])
                raise ValueError(_stack_error(index, path, message))
    stacked = list(first)
    for position, column in columns.items():
        stacked[position] = _stack_column(column, axis)
    return treedef.unflatten(stacked)


def _stack_error(index: int, path: str, message: str) -> str:
    return (
        f"stack_pytree: trees[{index}] differs from trees[0] {_where(path)}: it "
        f"{message}. Every tree must have the same structure, the same shape and "
        "dtype at each array leaf, and equal non-array leaves."
    )


_STACK_CHUNK = 64


def _stack_column(column: list[Any], axis: int) -> Any:
    if all(isinstance(leaf, np.ndarray | np.generic) for leaf in column):
        return np.stack(column, axis=axis)
    axis = axis if axis >= 0 else axis + column[0].ndim + 1
    length = len(column)
    if length <= _STACK_CHUNK or any(isinstance(x, jax.core.Tracer) for x in column):
        return jnp.stack(column, axis=axis)
    # Fill the result in fixed-size chunks, so only two small programs are compiled.
    starts = _chunk_starts(length, _STACK_CHUNK)
    out = _stack_first_chunk(*column[:_STACK_CHUNK], length=length, axis=axis)
    for start in starts[1:]:
        chunk = column[start : start + _STACK_CHUNK]
        out = _stack_chunk_into(out, start, *chunk, axis=axis)
    return out


@functools.partial(jax.jit, static_argnames=("length", "axis"))
def _stack_first_chunk(*chunk: jax.Array, length: int, axis: int) -> jax.Array:
    stacked = jnp.stack(chunk, axis=axis)
    shape = list(stacked.shape)
    shape[axis] = length
    # Every row is overwritten by a later chunk. Broadcasting a row (rather than
    # `jnp.zeros`) keeps the other axes' sharding, which explicit meshes require.
    first_row = jax.lax.index_in_dim(stacked, 0, axis, keepdims=True)
    out = jnp.broadcast_to(first_row, shape)
    return jax.lax.dynamic_update_slice_in_dim(out, stacked, 0, axis)


@functools.partial(jax.jit, static_argnames="axis", donate_argnums=0)
def _stack_chunk_into(
    out: jax.Array, start: int, *chunk: jax.Array, axis: int
) -> jax.Array:
    stacked = jnp.stack(chunk, axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(out, stacked, start, axis)


def _chunk_starts(length: int, size: int) -> list[int]:
    """Starts of chunks of `size` items that cover `range(length)` (`size <= length`).

    A last, short chunk overlaps the one before it instead, so every chunk has the
    same size and one compiled program serves them all.
    """
    return [min(start, length - size) for start in range(0, length, size)]


def _check_axis_is_int(function: str, axis: Any) -> None:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(
            f"{function}: `axis` must be an int; got {_describe_leaf(axis)}."
        )


def _leaf_axis(function: str, axis: int, leaf: Any, path: str, ndim: int) -> int:
    """`axis` made non-negative for a result of `ndim` dimensions, or a ValueError."""
    if -ndim <= axis < ndim:
        return axis % ndim
    allowed = f"axes run from {-ndim} to {ndim - 1}" if ndim else "it has no axes"
    raise ValueError(
        f"{function}: `axis={axis}` is out of range for the array {_where(path)}, "
        f"which has shape {tuple(leaf.shape)} ({allowed}). Pick an axis that every "
        "array leaf has."
    )


def _short_list(leaves: list[Any], limit: int = 3) -> str:
    shown = ", ".join(repr(leaf) for leaf in leaves[:limit])
    return f"[{shown}{', ...' if len(leaves) > limit else ''}]"


#
# Host callbacks: callback_wrapper and friends, print_callback
#

_DEBUG_CALLBACK_TAKES_PARTITIONED = (
    "partitioned" in inspect.signature(jax.debug.callback).parameters
)

_CALLBACK_NOTES = """
    Array leaves anywhere in the arguments (nested pytrees and keywords included) are
    sent to the host through `jax.debug.callback`; every other leaf (strings, `None`,
    Python numbers, functions, any object) reaches `func` unchanged, as the same
    object. So `log(step=3, loss=loss)` hands `func` the int `3`, not an array.

    It behaves the same eagerly and under `jax.jit`, `eqx.filter_jit`, `jax.grad`
    (it sees the forward pass), and inside `filter_scan`, `jax.lax.scan` and
    `jax.lax.cond` bodies; under `jax.vmap` it calls `func` once per batch element.

    **Arguments:**

    - `func`: the host function. Its return value is ignored.
    - `ordered`: if `True`, calls happen in program order. JAX supports ordered
        callbacks only in computations on a single device; on several devices it
        refuses them, and an eager call with arrays spread over several devices
        raises `ValueError` here.
    - `partitioned`: passed to `jax.debug.callback`, where the installed JAX
        supports it: the callback may then run on each device with its shard of the
        arguments. With older JAX, `partitioned=True` raises `ValueError`.

    **Returns:**

    A function with the parameters of `func` that returns `None`, with `func`'s
    `__name__` and `__doc__`, and `func` as its `__wrapped__`.

    **Raises:**

    `TypeError` at once if `func` is not callable. An exception raised by `func`
    is not caught: JAX reports it, eagerly at the call and otherwise when the
    computation runs (as a runtime error that names the original exception).

    Callbacks run asynchronously under `jit`. Call `jax.effects_barrier()` to wait
    for every pending callback, for example before reading a log file or exiting.
"""


def _wrap_for_host(
    function: str,
    func: Callable[..., Any],
    ordered: bool,
    partitioned: bool,
    to_host: Callable[[Any, Any], Any],
) -> Callable[..., None]:
    """Make `func` callable from traced code, converting arrays with `to_host`."""
    if not callable(func):
        raise TypeError(
            f"{function}: `func` must be callable; got {_describe_leaf(func)}."
        )
    for name, flag in (("ordered", ordered), ("partitioned", partitioned)):
        if not isinstance(flag, bool):
            raise TypeError(
                f"{function}: `{name}` must be a bool; got {_describe_leaf(flag)}."
            )
    options = {"ordered": ordered}
    if _DEBUG_CALLBACK_TAKES_PARTITIONED:
        options["partitioned"] = partitioned
    elif partitioned:
        raise ValueError(
            f"{function}: `partitioned=True` needs a `jax.debug.callback` that takes "
            f"`partitioned`, and the installed jax {jax.__version__} does not. "
            "Upgrade jax, or pass `partitioned=False`."
        )

    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> None:
        leaves, treedef = jtu.tree_flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(leaves) if eqx.is_array(leaf)]
        arrays = [leaves[i] for i in positions]
        if ordered:
            _check_single_device(function, arrays)
        template = [None if eqx.is_array(leaf) else leaf for leaf in leaves]
        # Under `jit`, typed PRNG keys cross to the host as raw key data: send the
        # data, and wrap it again there.
        key_impls = {
            index: jax.random.key_impl(array)
            for index, array in enumerate(arrays)
            if _is_key_array(array)
        }
        arrays = [
            jax.random.key_data(array) if index in key_impls else array
            for index, array in enumerate(arrays)
        ]

        def on_host(*host_arrays: Any) -> None:
            row = list(template)
            for index, (position, array) in enumerate(
                zip(positions, host_arrays, strict=True)
            ):
                row[position] = to_host(array, key_impls.get(index))
            host_args, host_kwargs = treedef.unflatten(row)
            func(*host_args, **host_kwargs)

        jax.debug.callback(on_host, *arrays, **options)

    return wrapped


def _check_single_device(function: str, arrays: list[Any]) -> None:
    for array in arrays:
        if isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer):
            devices = array.sharding.device_set
            if len(devices) > 1:
                raise ValueError(
                    f"{function}: `ordered=True` callbacks need every array on one "
                    f"device, but an argument of shape {tuple(array.shape)} is spread "
                    f"over {len(devices)} devices, and JAX refuses ordered callbacks "
                    "on several devices. Pass `ordered=False`, or gather the array "
                    "onto one device first."
                )


# Host-side conversions: `array` is what reached the host, and `key_impl` is the PRNG
# implementation when the leaf was a typed key (which travels as its raw key data).


def _as_jax(array: Any, key_impl: Any) -> jax.Array:
    array = jnp.asarray(array)
    return array if key_impl is None else jax.random.wrap_key_data(array, impl=key_impl)


def _as_numpy(array: Any, key_impl: Any) -> np.ndarray:
    return np.asarray(array)


def _as_list(array: Any, key_impl: Any) -> Any:
    return np.asarray(array).tolist()


def callback_wrapper(
    func: Callable[_Params, Any], ordered: bool = False, partitioned: bool = False
) -> Callable[_Params, None]:
    """Wrap `func` so that it can be called from inside `jax.jit`, with array
    arguments as `jax.Array`s.
    """
    return _wrap_for_host("callback_wrapper", func, ordered, partitioned, _as_jax)


def callback_with_numpy_wrapper(
    func: Callable[..., Any], ordered: bool = False, partitioned: bool = False
) -> Callable[..., None]:
    """As `callback_wrapper`, but array arguments reach `func` as `numpy.ndarray`s
    (typed PRNG keys as their raw key data).
    """
    return _wrap_for_host(
        "callback_with_numpy_wrapper", func, ordered, partitioned, _as_numpy
    )


def callback_with_list_wrapper(
    func: Callable[..., Any], ordered: bool = False, partitioned: bool = False
) -> Callable[..., None]:
    """As `callback_wrapper`, but array arguments reach `func` as nested Python lists
    (via `.tolist()`, so a 0-d array becomes a Python number).
    """
    return _wrap_for_host(
        "callback_with_list_wrapper", func, ordered, partitioned, _as_list
    )


for _wrapper in (
    callback_wrapper,
    callback_with_numpy_wrapper,
    callback_with_list_wrapper,
):
    _wrapper.__doc__ = (_wrapper.__doc__ or "") + _CALLBACK_NOTES


_print_in_order = callback_with_list_wrapper(print, ordered=True)


def print_callback(*args: Any, **kwargs: Any) -> None:
    """`print`, from anywhere: eagerly, or inside `jax.jit`, `filter_scan` and friends.

    Array arguments are printed as lists (a 0-d array as a plain number), and calls
    print in program order. Keyword arguments are those of `print` (`sep`, `end`,
    `file`, `flush`). Under `jit` the printing happens when the computation runs;
    `jax.effects_barrier()` waits for it.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    from lerax_utils import print_callback

    @jax.jit
    def step(x):
        print_callback("x =", x, "sum =", x.sum())
        return x + 1

    step(jnp.arange(3.0))
    jax.effects_barrier()  # x = [0.0, 1.0, 2.0] sum = 3.0
    ```
    """
    _print_in_order(*args, **kwargs)


#
# Checkpoints: Serializable
#

# The file layout (the README documents it byte by byte):
#   magic (8 bytes) | format version (u32) | header length (u64) | header CRC-32 (u32)
#   | header (UTF-8 JSON) | the array leaves' raw bytes, in header order
#   | one CRC-32 (u32) per array leaf, in the same order.
_MAGIC = b"LRXCKPT\x00"
_FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQI")
_CHECKSUM = struct.Struct("<I")
_MAX_HEADER_BYTES = 64 * 1024 * 1024
_NUMPY_MAGIC = b"\x93NUMPY"  # Plain `eqx.tree_serialise_leaves` files start so.
_SUFFIX = ".eqx"


class Serializable(eqx.Module):
    """An `eqx.Module` base class whose models save and load themselves.

    ```python
    import equinox as eqx
    import jax
    from lerax_utils import Serializable

    class Policy(Serializable):
        mlp: eqx.nn.MLP

        def __init__(self, size, *, key):
            self.mlp = eqx.nn.MLP(size, 2, 32, 2, key=key)

    Policy(4, key=jax.random.key(0)).serialize("checkpoints/run.1")  # run.1.eqx
    policy = Policy.deserialize("checkpoints/run.1", 4, key=jax.random.key(1))
    ```

    A checkpoint holds a versioned header (the format version, the library version,
    every leaf's path, shape and dtype, and a description of the static structure
    that is the same in every process) followed by the raw array data, with CRC-32
    checksums for both. Loading checks all of it against a skeleton of the model, so
    a file never loads into the wrong model silently. No pickle is involved: loading
    never runs code from the file.
    """

    def serialize(self, path: str | os.PathLike[str], no_suffix: bool = False) -> None:
        """Save this model to `path`, atomically.

        **Arguments:**

        - `path`: where to save. `.eqx` is appended unless the name already ends in
            `.eqx`, so `run.1` and `run.2` are saved as `run.1.eqx` and `run.2.eqx`.
            Missing parent folders are created.
        - `no_suffix`: if `True`, save to exactly `path`.

        The file is written to a temporary file in the same folder, flushed to disk,
        and then renamed over `path`: whenever the process stops, even killed
        mid-write, `path` holds either the old checkpoint or the new one. A save that
        raises leaves the old file as it was and no temporary file behind.

        Eagerly, the file is complete when `serialize` returns. Inside `jax.jit`,
        `eqx.filter_jit` or a `filter_scan` body it is written by an ordered host
        callback when the computation runs; call `jax.effects_barrier()` before
        reading it. Arrays sharded over several devices are gathered.

        **Raises:**

        `TypeError` if `path` is not a `str` or `os.PathLike`.
        """
        target = _checkpoint_path("serialize", path, no_suffix)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jtu.tree_leaves(self)):
            write = functools.partial(_write_checkpoint, target=target)
            callback_wrapper(write, ordered=True)(self)
        else:
            _write_checkpoint(self, target)

    @classmethod
    def deserialize(
        cls: type[_Model], path: str | os.PathLike[str], *args: Any, **kwargs: Any
    ) -> _Model:
        """Load a model saved by `serialize`.

        **Arguments:**

        - `path`: the path given to `serialize`, with either value of `no_suffix`:
            `path` itself if that file exists, else `path` with `.eqx` appended.
        - `*args`, `**kwargs`: the constructor's arguments. They build a skeleton of
            the model with `eqx.filter_eval_shape`, so no parameters are allocated or
            initialised; the file must match it.

        **Returns:**

        An instance of the class `deserialize` is called on, with the saved arrays
        (NumPy arrays stay NumPy arrays) and the saved Python numbers in place.

        **Raises:**

        - `FileNotFoundError` if neither candidate file exists.
        - `ValueError` if the file is not a checkpoint (empty, a text file, random
            bytes, a wrong magic number), is truncated or has trailing bytes, was
            written by a newer format version, is corrupt (a checksum fails), or does
            not match the skeleton: a different leaf count, structure, static field,
            shape or dtype. The message names the first differing leaf path and
            both sides.

        Files written by plain `eqx.tree_serialise_leaves` load too, with Equinox's
        own checks only.
        """
        source = _find_checkpoint(path)
        skeleton = eqx.filter_eval_shape(cls, *args, **kwargs)
        with open(source, "rb") as file:
            return _read_checkpoint(file, skeleton, str(source))


def _checkpoint_path(
    method: str, path: str | os.PathLike[str], no_suffix: bool
) -> pathlib.Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"Serializable.{method}: `path` must be a str or os.PathLike; got "
            f"{_describe_leaf(path)}."
        )
    path = pathlib.Path(path)
    if no_suffix or path.name.endswith(_SUFFIX):
        return path
    return path.with_name(path.name + _SUFFIX)


def _find_checkpoint(path: str | os.PathLike[str]) -> pathlib.Path:
    exact = _checkpoint_path("deserialize", path, no_suffix=True)
    suffixed = _checkpoint_path("deserialize", path, no_suffix=False)
    for candidate in (exact, suffixed):
        if candidate.is_file():
            return candidate
    tried = f"'{exact}'" if exact == suffixed else f"'{exact}' or '{suffixed}'"
    raise FileNotFoundError(
        f"Serializable.deserialize: no checkpoint at {tried}. Check the path given "
        "to `serialize`."
    )


# Writing


def _write_checkpoint(model: Any, target: pathlib.Path) -> None:
    header, blocks = _encode(model)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    prefix = _PREFIX.pack(
        _MAGIC, _FORMAT_VERSION, len(header_bytes), zlib.crc32(header_bytes)
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        with (
            os.fdopen(descriptor, "wb") as file,
            concurrent.futures.ThreadPoolExecutor(max_workers=1) as checksummer,
        ):
            file.write(prefix)
            file.write(header_bytes)
            checksums = []
            for block in blocks:  # Both `crc32` and `write` release the GIL.
                checksums.append(checksummer.submit(zlib.crc32, block.data))
                file.write(block.data)
            for checksum in checksums:
                file.write(_CHECKSUM.pack(checksum.result()))
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, target.stat().st_mode if target.exists() else 0o644)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(target.parent)


def _fsync_folder(folder: pathlib.Path) -> None:
    """Make the rename durable too, where the platform allows it."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _encode(model: Any) -> tuple[dict[str, Any], list[Any]]:
    """The header, and the raw bytes of each array leaf (as uint8 views)."""
    leaves: list[dict[str, Any]] = []
    blocks = []
    for path, leaf in jtu.tree_flatten_with_path(model)[0]:
        entry: dict[str, Any] = {"path": jtu.keystr(path)}
        if eqx.is_array(leaf):
            if isinstance(leaf, jax.Array) and _is_key_array(leaf):
                entry.update(
                    kind="key", impl=_key_impl_name(leaf), key_shape=list(leaf.shape)
                )
                leaf = jax.random.key_data(leaf)
            else:
                entry["kind"] = "numpy" if isinstance(leaf, np.ndarray) else "jax"
            data = np.asarray(leaf, order="C")  # Gathers sharded arrays.
            block = data.reshape(-1).view(np.uint8)
            entry.update(
                dtype=data.dtype.name, shape=list(data.shape), nbytes=block.nbytes
            )
            blocks.append(block)
        elif isinstance(leaf, _PYTHON_SCALARS):
            entry.update(kind="scalar", value=_encode_scalar(leaf))
        else:
            continue  # Static: described by the structure, restored by the skeleton.
        leaves.append(entry)
    header = {
        "library": "lerax_utils",
        "library_version": __version__,
        "class": _qualified_name(type(model)),
        "leaves": leaves,
        "structure": _structure(model),
    }
    return header, blocks


def _key_impl_name(key: jax.Array) -> str:
    impl = jax.random.key_impl(key)
    if isinstance(impl, str):
        return impl
    # Older JAX returns a spec object whose `str` is a short tag, not a name.
    return getattr(getattr(impl, "_impl", None), "name", str(impl))


def _encode_scalar(value: Any) -> list[Any]:
    if isinstance(value, bool | int):
        return [type(value).__name__, str(value)]
    if isinstance(value, float):
        return ["float", value.hex()]
    return ["complex", value.real.hex(), value.imag.hex()]


def _decode_scalar(encoded: Any) -> Any:
    kind, *parts = encoded
    if kind == "bool" and parts in (["True"], ["False"]):
        return parts == ["True"]
    if kind == "int" and len(parts) == 1:
        return int(parts[0])
    if kind == "float" and len(parts) == 1:
        return float.fromhex(parts[0])
    if kind == "complex" and len(parts) == 2:
        return complex(float.fromhex(parts[0]), float.fromhex(parts[1]))
    raise ValueError(f"unknown encoding of a Python number: {encoded!r}")


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


def _structure(tree: Any) -> list[list[Any]]:
    """A description of `tree` without its array and scalar values.

    One `[path, description]` pair per node and leaf, in flattening order. It uses
    type and function names, never a `repr` or an address, so the same model gives
    the same description in every process and on every machine.
    """
    entries: list[list[Any]] = []

    def visit(node: Any, path: _KeyPath) -> None:
        where = jtu.keystr(path)
        if eqx.is_array(node) or isinstance(node, jax.ShapeDtypeStruct):
            entries.append([where, "array"])
            return
        if isinstance(node, _PYTHON_SCALARS):
            entries.append([where, ["scalar", type(node).__name__]])
            return
        children, node_def = jtu.tree_flatten_with_path(
            node, is_leaf=_is_strict_child(node)
        )
        if jtu.treedef_is_leaf(node_def) and node is not None:
            entries.append([where, _describe_static(node)])
            return
        description: dict[str, Any] = {"node": type(node).__qualname__}
        if isinstance(node, eqx.Module):
            description["static"] = {
                name: _describe_static(getattr(node, name, None))
                for name in _static_fields(node)
            }
        elif isinstance(node, dict):  # Keys in JAX's (sorted) order, not insertion's.
            keys = [getattr(key[0], "key", key[0]) for key, _ in children]
            description["keys"] = [_describe_static(key) for key in keys]
        entries.append([where, description])
        for key, child in children:
            visit(child, path + key)

    visit(tree, ())
    return entries


def _describe_static(value: Any) -> Any:
    """A JSON description of a static value that is the same in every process."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return ["float", value.hex()]
    if isinstance(value, list | tuple):
        return [type(value).__name__, [_describe_static(item) for item in value]]
    if isinstance(value, dict):
        items = [[_describe_static(k), _describe_static(v)] for k, v in value.items()]
        return ["dict", items]
    if isinstance(value, enum.Enum):
        return ["enum", type(value).__qualname__, value.name]
    if isinstance(value, type):
        return ["type", value.__qualname__]
    if isinstance(value, np.dtype):
        return ["dtype", value.name]
    if callable(value):
        # `__name__`, not `__qualname__`: JAX has changed the latter between releases
        # (`jax.numpy.tanh` became `tanh`).
        name = getattr(value, "__name__", None) or getattr(value, "__qualname__", None)
        return ["function", name or type(value).__qualname__]
    return ["object", type(value).__qualname__]


# Reading


def _read_checkpoint(file: IO[bytes], skeleton: Any, source: str) -> Any:
    size = os.fstat(file.fileno()).st_size
    start = file.read(_PREFIX.size)
    if not start:
        raise _checkpoint_error(source, "is empty")
    if start.startswith(_NUMPY_MAGIC):
        file.seek(0)
        return _read_equinox_file(file, skeleton, source, size)
    if not _MAGIC.startswith(start[: len(_MAGIC)]):
        raise _checkpoint_error(
            source,
            f"is not a lerax_utils checkpoint: it starts with {start[:8]!r}, not "
            f"{_MAGIC!r}",
        )
    if len(start) < _PREFIX.size:
        raise _checkpoint_error(source, f"is truncated ({size} bytes)")
    _, version, header_length, header_crc = _PREFIX.unpack(start)
    if version > _FORMAT_VERSION:
        raise _checkpoint_error(
            source,
            f"has format version {version}, newer than the {_FORMAT_VERSION} this "
            f"lerax_utils {__version__} reads. Upgrade lerax_utils to load it",
        )
    if version < 1:
        raise _checkpoint_error(source, f"has an unknown format version {version}")
    if header_length > _MAX_HEADER_BYTES:
        raise _checkpoint_error(
            source,
            f"declares a header of {header_length} bytes, more than the "
            f"{_MAX_HEADER_BYTES} allowed; the file is corrupt",
        )
    if _PREFIX.size + header_length > size:
        raise _checkpoint_error(
            source, f"is truncated inside its header ({size} bytes)"
        )
    header_bytes = file.read(header_length)
    if zlib.crc32(header_bytes) != header_crc:
        raise _checkpoint_error(source, "has a corrupt header (its checksum fails)")
    leaves, structure = _parse_header(header_bytes, source)
    _check_against_skeleton(source, leaves, structure, skeleton)
    arrays = [entry for entry in leaves if entry["kind"] != "scalar"]
    data_end = _PREFIX.size + header_length + sum(entry["nbytes"] for entry in arrays)
    expected = data_end + _CHECKSUM.size * len(arrays)
    if size < expected:
        raise _checkpoint_error(
            source,
            f"is truncated: it has {size} bytes, and its header needs {expected}",
        )
    if size > expected:
        raise _checkpoint_error(
            source,
            f"has {size - expected} trailing bytes after the data its header "
            "describes; it was not written by `serialize` in one piece",
        )
    values = _read_leaves(file, leaves, data_end, source)
    skeleton_leaves, treedef = jtu.tree_flatten(skeleton)
    loaded = iter(values)
    return treedef.unflatten(
        [next(loaded) if _is_saved_leaf(leaf) else leaf for leaf in skeleton_leaves]
    )


_ARRAY_ENTRY_FIELDS = {
    "path": str,
    "kind": str,
    "dtype": str,
    "shape": list,
    "nbytes": int,
}
_ENTRY_FIELDS = {
    "scalar": {"path": str, "kind": str, "value": list},
    "jax": _ARRAY_ENTRY_FIELDS,
    "numpy": _ARRAY_ENTRY_FIELDS,
    "key": {**_ARRAY_ENTRY_FIELDS, "impl": str, "key_shape": list},
}


def _parse_header(header_bytes: bytes, source: str) -> tuple[list[Any], list[Any]]:
    """The header's leaf entries and structure, checked to be well formed."""
    try:
        header = json.loads(header_bytes)
    except ValueError as err:
        raise _checkpoint_error(source, f"has an unreadable header ({err})") from err
    leaves = header.get("leaves") if isinstance(header, dict) else None
    structure = header.get("structure") if isinstance(header, dict) else None
    if not (
        isinstance(leaves, list)
        and isinstance(structure, list)
        and all(_entry_is_well_formed(entry) for entry in leaves)
    ):
        raise _checkpoint_error(source, "has a malformed header")
    return leaves, structure


def _entry_is_well_formed(entry: Any) -> bool:
    """Whether a leaf entry has the fields of its kind, and sizes that agree."""
    kind = entry.get("kind") if isinstance(entry, dict) else None
    fields = _ENTRY_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None or not all(
        isinstance(entry.get(name), expected) for name, expected in fields.items()
    ):
        return False
    try:
        if kind == "scalar":
            _decode_scalar(entry["value"])
            return True
        dtype = jnp.dtype(entry["dtype"])
        if kind == "key":
            jax.random.key(0, impl=entry["impl"])
    except (TypeError, ValueError, IndexError):
        return False
    shape = entry["shape"]
    if dtype.hasobject or not all(type(d) is int and d >= 0 for d in shape):
        return False
    if kind == "key" and shape[: len(entry["key_shape"])] != entry["key_shape"]:
        return False
    return entry["nbytes"] == math.prod(shape) * dtype.itemsize


def _is_saved_leaf(leaf: Any) -> bool:
    """Whether a leaf's value lives in the file (else the skeleton provides it)."""
    saved_types = (jax.ShapeDtypeStruct, *_PYTHON_SCALARS)
    return isinstance(leaf, saved_types) or eqx.is_array(leaf)


def _checkpoint_error(source: str, problem: str) -> ValueError:
    return ValueError(f"Serializable.deserialize: the file '{source}' {problem}.")


_FIX = "Pass the constructor arguments the model was saved with"


def _check_against_skeleton(
    source: str, leaves: list[Any], structure: list[Any], skeleton: Any
) -> None:
    """Structure and static fields, then the leaf count, then shapes and dtypes."""
    difference = _structure_difference_in_file(structure, _structure(skeleton))
    if difference is not None:
        path, message = difference
        raise _checkpoint_error(
            source, f"does not match the skeleton {_where(path)}: {message}. {_FIX}"
        )
    expected = [
        (jtu.keystr(path), leaf)
        for path, leaf in jtu.tree_flatten_with_path(skeleton)[0]
        if _is_saved_leaf(leaf)
    ]
    if len(leaves) != len(expected):
        paths = [entry["path"] for entry in leaves]
        first = next(
            (p for p, (q, _) in zip(paths, expected, strict=False) if p != q),
            paths[len(expected)] if len(paths) > len(expected) else expected[-1][0],
        )
        raise _checkpoint_error(
            source,
            f"holds {len(leaves)} leaves, but the skeleton built from the constructor "
            f"arguments has {len(expected)}; they first differ at path {first}. {_FIX}",
        )
    for entry, (path, leaf) in zip(leaves, expected, strict=True):
        if entry["path"] != path:
            raise _checkpoint_error(
                source,
                f"has a leaf at path {entry['path']} where the skeleton "
                f"has one at {path}. {_FIX}",
            )
        if entry["kind"] == "scalar":
            if not isinstance(leaf, _PYTHON_SCALARS):
                raise _checkpoint_error(
                    source,
                    f"holds a Python number at path {path}, where the "
                    f"skeleton has {_describe_leaf(leaf)}. {_FIX}",
                )
            continue
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            raise _checkpoint_error(
                source,
                f"holds an array at path {path}, where the skeleton has "
                f"{_describe_leaf(leaf)}. {_FIX}",
            )
        saved = _saved_array_type(entry)
        if saved != (tuple(leaf.shape), leaf.dtype):
            raise _checkpoint_error(
                source,
                f"holds at path {path} an array of shape {saved[0]} and dtype "
                f"{saved[1]}, but the skeleton has shape {tuple(leaf.shape)} and "
                f"dtype {leaf.dtype}. {_FIX}",
            )


def _structure_difference_in_file(
    saved: list[Any], wanted: list[Any]
) -> tuple[str, str] | None:
    """The first `(path, message)` where two `_structure` descriptions differ."""
    for saved_entry, wanted_entry in zip(saved, wanted, strict=False):
        if saved_entry == wanted_entry:
            continue
        if not (isinstance(saved_entry, list) and len(saved_entry) == 2):
            return wanted_entry[0], "the file's structure description is malformed"
        path, (was, want) = wanted_entry[0], (saved_entry[1], wanted_entry[1])
        if saved_entry[0] != path:
            return path, f"the file has a node at path {saved_entry[0]} instead"
        both_modules = all(isinstance(d, dict) and "static" in d for d in (was, want))
        if both_modules and was["node"] == want["node"]:
            for field, value in want["static"].items():
                if field in was["static"] and was["static"][field] != value:
                    return f"{path}.{field}", (
                        f"the static field is {was['static'][field]!r} in the file "
                        f"and {value!r} in the skeleton"
                    )
            # Only a field that one side lacks differs: the class gained or lost a
            # static field between versions (Equinox's MLP gained `scan`).
            continue
        return path, f"the file has {was!r}, the skeleton has {want!r}"
    if len(saved) != len(wanted):
        longer = saved if len(saved) > len(wanted) else wanted
        side = "file" if longer is saved else "skeleton"
        extra = longer[min(len(saved), len(wanted))]
        return str(extra[0]), f"only the {side} has a node here"
    return None


def _saved_array_type(entry: dict[str, Any]) -> tuple[tuple[int, ...], Any]:
    """The shape and dtype of the array a header entry describes."""
    if entry["kind"] == "key":
        return tuple(entry["key_shape"]), jax.random.key(0, impl=entry["impl"]).dtype
    return tuple(entry["shape"]), jnp.dtype(entry["dtype"])


def _read_leaves(
    file: IO[bytes], leaves: list[dict[str, Any]], data_end: int, source: str
) -> list[Any]:
    """Read every leaf's value, checking each array against its CRC-32.

    Each checksum runs in a helper thread while the next leaf is read, and a leaf
    leaves host memory as soon as it is checked, so at most two are held at once.
    """
    start = file.tell()
    file.seek(data_end)
    checksums = iter(value for (value,) in _CHECKSUM.iter_unpack(file.read()))
    file.seek(start)
    values: list[Any] = []
    pending: list[tuple[int, Any, concurrent.futures.Future[int]]] = []

    def finish(index: int, data: Any, checksum: concurrent.futures.Future[int]) -> None:
        entry = leaves[index]
        if checksum.result() != next(checksums):
            raise _checkpoint_error(
                source,
                f"has corrupt data for the leaf at path {entry['path']} "
                "(its checksum fails)",
            )
        values[index] = _restore_kind(data, entry)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as checksummer:
        for index, entry in enumerate(leaves):
            if entry["kind"] == "scalar":
                values.append(_decode_scalar(entry["value"]))
                continue
            data = _aligned_empty(entry["shape"], jnp.dtype(entry["dtype"]))
            view = data.reshape(-1).view(np.uint8)
            file.readinto(view.data)  # type: ignore[attr-defined]
            values.append(None)
            pending.append((index, data, checksummer.submit(zlib.crc32, view.data)))
            if len(pending) == 2:
                finish(*pending.pop(0))
        for item in pending:
            finish(*item)
    return values


def _aligned_empty(shape: list[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary.

    `jax.device_put` can then hand it to the CPU backend without a copy.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _restore_kind(data: np.ndarray, entry: dict[str, Any]) -> Any:
    """A loaded NumPy array as the kind of leaf it was saved from."""
    if entry["kind"] == "jax":
        return jax.device_put(data)
    if entry["kind"] == "key":
        return jax.random.wrap_key_data(jax.device_put(data), impl=entry["impl"])
    return data


def _read_equinox_file(file: IO[bytes], skeleton: Any, source: str, size: int) -> Any:
    """A file of plain `eqx.tree_serialise_leaves`: Equinox's own checks only."""
    try:
        model = eqx.tree_deserialise_leaves(file, skeleton)
    except Exception as err:
        raise _checkpoint_error(
            source, f"could not be read as a plain Equinox file: {err}"
        ) from err
    if file.tell() != size:
        raise _checkpoint_error(
            source, f"has {size - file.tell()} trailing bytes after its Equinox data"
        )
    return model
