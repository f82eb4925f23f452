"""Small utilities for JAX and Equinox, in one file that needs only `jax`, `equinox`
and `numpy`: copy it into your project, or `pip install git+<repository url>`.

- `filter_scan`, `filter_cond`, `filter_switch`, `filter_while_loop`,
  `filter_fori_loop`, `filter_map`: the `jax.lax` control flow for any pytree, with
  a progress bar (`progress=`) even under `jit`.
- `unstack_pytree`, `stack_pytree`: split a batched pytree into one pytree per index,
  and join them back.
- `callback_wrapper`, `callback_with_numpy_wrapper`, `callback_with_list_wrapper`,
  `print_callback`: call host Python (logging, printing) from inside `jit`.
- `Serializable`, `save_pytree`, `load_pytree`: checked, atomic safetensors
  checkpoints of models that record their constructor arguments, or of any pytree.

It needs Python 3.11 or newer, and jax, equinox and numpy at the lower bounds that
`pyproject.toml` gives or newer. The examples assume `import equinox as eqx`,
`import jax`, `import jax.numpy as jnp` and `from lerax_utils import *`.
"""

__version__ = "0.2.0"

__all__ = [
    # Control flow
    "filter_cond",
    "filter_fori_loop",
    "filter_map",
    "filter_scan",
    "filter_switch",
    "filter_while_loop",
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
    "load_pytree",
    "save_pytree",
]

import atexit
import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import enum
import functools
import gc
import importlib
import inspect
import itertools
import json
import math
import operator
import os
import pathlib
import re
import secrets
import stat
import struct
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, ParamSpec, Self, TypeVar, cast

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.experimental import io_callback

_Carry = TypeVar("_Carry")
_X = TypeVar("_X")
_Y = TypeVar("_Y")
_Out = TypeVar("_Out")
_Tree = TypeVar("_Tree")
_Params = ParamSpec("_Params")
_Function = TypeVar("_Function", bound=Callable[..., Any])
_Model = TypeVar("_Model", bound="Serializable")

_KeyPath = tuple[Any, ...]

#
# Compatibility: every JAX, Equinox and NumPy feature test and private API, in one place
#
# Each entry names the release that changed it; `tests/test_compatibility.py` checks it.

# -- Control flow

# Whether no trace is active: in `jax.core` up to jax 0.4.x, then `jax._src.core`.
_trace_state_clean = (
    getattr(jax.core, "trace_state_clean", None)
    or importlib.import_module("jax._src.core").trace_state_clean
)
# Private (jax 0.4.26 to 0.10): the configuration that `jax.jit` keys its cache on.
_trace_context = importlib.import_module("jax._src.config").trace_context

# `jax.lax.scan`'s experimental `_split_transpose` (in jax 0.4.30 to 0.10 at least) may
# go in a later release. It never changes results, so it is passed only where taken.
_SCAN_TAKES_SPLIT_TRANSPOSE = (
    "_split_transpose" in inspect.signature(jax.lax.scan).parameters
)
# `jax.lax.map` takes `batch_size` from jax 0.4.31 on.
_MAP_TAKES_BATCH_SIZE = "batch_size" in inspect.signature(jax.lax.map).parameters
# `jax.lax.optimization_barrier` is public, and batchable, from jax 0.4.33 or so.
# Without it, what consumes a loop's outputs may round differently with a bar.
_HAS_OPTIMIZATION_BARRIER = hasattr(jax.lax, "optimization_barrier")
_optimization_barrier = getattr(jax.lax, "optimization_barrier", lambda x: x)


def _is_number_typed_by_jax(leaf: Any) -> bool:
    """A number of a subclass that JAX defines (jax 0.10's `TypedFloat`, say)."""
    kind = type(leaf)
    return (
        issubclass(kind, (int, float, complex))
        and kind not in (bool, int, float, complex)
        and kind.__module__.startswith("jax.")
    )


@functools.cache
def _custom_jvp_takes_keys() -> bool:
    """Whether a `jax.custom_jvp` may return PRNG keys (jax 0.4.26 may not)."""
    identity = jax.custom_jvp(lambda x, key: (x, key))
    identity.defjvp(lambda primals, tangents: (primals, tangents))
    key, zero = jax.random.key(0), np.zeros((), jax.dtypes.float0)
    try:
        jax.jvp(identity, (1.0, key), (1.0, zero))
    except TypeError:
        return False
    return True


# -- Batches of pytrees


# `jax.Array.committed` is public in newer jax; jax 0.4.26 has only `._committed`.
def _is_committed(leaf: jax.Array) -> bool:
    return getattr(leaf, "committed", getattr(leaf, "_committed", True))


# Whether no `jax.transfer_guard` (read by name) refuses or logs explicit transfers.
def _host_transfers_allowed() -> bool:
    guards = ("", "_device_to_host", "_host_to_device")
    levels = {getattr(jax.config, f"jax_transfer_guard{name}", None) for name in guards}
    return levels <= {None, "allow", "log", "disallow"}


# -- Host callbacks and progress bars

# `jax.debug.callback` takes `partitioned` in newer jax only (not in jax 0.4.26).
_DEBUG_CALLBACK_TAKES_PARTITIONED = (
    "partitioned" in inspect.signature(jax.debug.callback).parameters
)


# How many devices a tracer's `aval.sharding` spans, in newer jax that records one.
def _traced_mesh_size(tracer: Any) -> int | None:
    mesh = getattr(getattr(tracer.aval, "sharding", None), "mesh", None)
    size = getattr(mesh, "size", None)
    return size if isinstance(size, int) else None


# A platform gate: `fegetenv` and `fesetenv` from libm or the loaded libraries on
# Linux, where glibc and musl both take `(fenv_t *)-1` as the default; else `None`.
def _load_fenv() -> tuple[Any, Any] | None:
    for library in ("libm.so.6", None) if sys.platform.startswith("linux") else ():
        with contextlib.suppress(OSError, AttributeError):
            found = ctypes.CDLL(library)
            return found.fegetenv, found.fesetenv
    return None


_FENV = _load_fenv()

# -- Checkpoints


# The dtypes a checkpoint may hold are those of the installed JAX: int2 and uint2
# came in jax 0.4.3x, the float8 variants and float4 over several releases.
@functools.cache
def _checkpoint_dtypes() -> dict[str, np.dtype]:
    names = (*_SAFETENSORS_DTYPES, *_OTHER_DTYPES)
    return {name: np.dtype(getattr(jnp, name)) for name in names if hasattr(jnp, name)}


@functools.cache
def _key_impl_types() -> dict[str, tuple[Any, tuple[int, ...], np.dtype]]:
    """For each PRNG implementation: its key dtype, key data shape and data dtype."""
    found = {}
    for name in _KEY_IMPLS:
        data = jax.random.key_data(key := jax.random.key(0, impl=name))
        found[name] = (key.dtype, tuple(data.shape), np.dtype(data.dtype))
    return found


def _key_impl_name(dtype: Any) -> str | None:
    # Private: a key dtype's `_impl` (jax 0.4.16 on). `jax.random.key_impl` takes
    # only key arrays, and before jax 0.4.3x gives a spec whose `str` is no name.
    return getattr(getattr(dtype, "_impl", None), "name", None)


def _weak_array(array: jax.Array) -> jax.Array:
    # Private (jax 0.4.26 to 0.10): JAX has no public way to set the weak type.
    from jax._src.lax import lax as lax_internal

    weak = lax_internal._convert_element_type(array, array.dtype, weak_type=True)
    return cast(jax.Array, weak)


_SHAPE_HAS_WEAK_TYPE = hasattr(jax.ShapeDtypeStruct((), np.float32), "weak_type")
# `jnp.asarray` places a NumPy array as `jax.device_put` does, quicker (by copy), but
# not under `jax.set_mesh` (from jax 0.5 or so; jax 0.4.26 has no mesh to set).
_get_abstract_mesh = getattr(jax.sharding, "get_abstract_mesh", lambda: None)
# Private (jax 0.4.26 to 0.10): what `jax.device_put` calls for each NumPy array.
_batched_device_put: Any = getattr(
    importlib.import_module("jax._src.lib").xla_client, "batched_device_put", None
)
_ShapedArray = importlib.import_module("jax._src.core").ShapedArray
# Private: jax 0.4.26's transfer guards count only `jax.device_put`'s as explicit.
_explicit_puts: Any = contextlib.nullcontext
if _get_abstract_mesh() is None:
    _config = importlib.import_module("jax._src.config")
    _explicit_puts = _config.explicit_device_put_scope


def _check_rank(sharding: Any, shape: tuple[int, ...]) -> None:
    """Refuse, as `jax.device_put` does, a sharding made for another rank."""
    for name in ("check_compatible_aval", "is_compatible_aval"):  # 0.4.26's name;
        getattr(sharding, name, lambda _: None)(shape)  # its SDS never checks.


def _placed_shape(shape: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    """`shape` on `sharding`, weakly typed if it is (jax 0.4.26 has no `weak_type`)."""
    weak = _SHAPE_HAS_WEAK_TYPE and getattr(shape, "weak_type", False)
    extra = {"weak_type": True} if weak else {}
    _check_rank(sharding, shape.shape)
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding, **extra)


def _distributed_client() -> Any:
    """The `jax.distributed` key-value store client, or None before `initialize`."""
    # Private (jax 0.4.26 to 0.10): `multihost_utils` has no bounded key-value store.
    from jax._src import distributed

    return distributed.global_state.client


def _is_vmap_refusal(err: ValueError) -> bool:
    """Whether JAX refused an ordered `io_callback` because it is under `vmap`."""
    # JAX's message text: "Cannot `vmap` ordered IO callback." (jax 0.4.26 to 0.10).
    return "vmap" in str(err)


# NumPy 2 renders NumPy scalars as `np.int64(1)` where NumPy 1 wrote `1`.
_NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


# (end of compatibility)

#
# Pytree comparison: the checks behind every error message about a changed leaf
#

_PYTHON_SCALARS = (bool, int, float, complex)


def _is_python_number(leaf: Any) -> bool:
    """A plain Python number (a subclass such as an `IntEnum` stays a static value)."""
    return type(leaf) in _PYTHON_SCALARS


def _is_jax_value(leaf: Any) -> bool:
    """An array, or a number that JAX has typed: JAX traces both as arrays."""
    return eqx.is_array(leaf) or _is_number_typed_by_jax(leaf)


def _same_python_number(old: Any, new: Any) -> bool:
    """Python numbers of one type and value, floats by bits (NaN payloads, `-0.0`)."""
    same_type = type(old) is type(new) and type(old) in _PYTHON_SCALARS
    return same_type and _exact_key(old, []) == _exact_key(new, [])


def _is_key_array(array: Any) -> bool:
    """Whether `array` holds typed PRNG keys (`jax.random.key`, not raw uint32 data)."""
    kind = array.dtype  # NumPy's dtypes are never keys: quick to tell apart.
    return not isinstance(kind, np.dtype) and jnp.issubdtype(kind, jax.dtypes.prng_key)


def _describe_leaf(leaf: Any) -> str:
    if eqx.is_array(leaf):
        return f"an array of shape {tuple(leaf.shape)} and dtype {leaf.dtype}"
    return f"{type(leaf).__name__} {_repr(leaf)}"


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__} object whose repr raised>"


def _static_leaves_equal(old: Any, new: Any) -> bool:
    """Whether two non-array leaves are the same static value, type included."""
    if old is new:
        return True
    if type(old) is not type(new):
        return False
    if _is_python_number(old):
        return _same_python_number(old, new)
    if isinstance(old, functools.partial):
        if len(old.args) != len(new.args) or old.keywords.keys() != new.keywords.keys():
            return False
        olds = [old.func, *old.args, *old.keywords.values()]
        news = [new.func, *new.args, *map(new.keywords.get, old.keywords)]
        return all(map(_static_leaves_equal, olds, news))
    try:
        return bool(old == new)
    except Exception:  # An `__eq__` that raises or returns something ambiguous.
        return False


def _leaf_difference(old: Any, new: Any) -> str | None:
    """How `new` differs from `old`, or `None` if it may stand in its place."""
    old_is_array, new_is_array = eqx.is_array(old), eqx.is_array(new)
    if old_is_array != new_is_array:
        static = "" if old_is_array else "the static (non-array) "
        return f"was {static}{_describe_leaf(old)} and is now {_describe_leaf(new)}"
    if old_is_array or _static_leaves_equal(old, new):
        return None
    return f"changed from {_describe_leaf(old)} to {_describe_leaf(new)}"


def _where(path: str) -> str:
    return f"at path {path}" if path else "at the top level"


def _is_strict_child(root: Any) -> Callable[[Any], bool]:
    return lambda node: node is not root


@functools.cache
def _static_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("static"))


def _structure_difference(old: Any, new: Any, path: _KeyPath) -> tuple[str, str]:
    """Walk two trees of different structure down to the first node that differs."""
    old_def = jtu.tree_structure(old, is_leaf=_is_strict_child(old))
    new_def = jtu.tree_structure(new, is_leaf=_is_strict_child(new))
    where = jtu.keystr(path)
    if old_def == new_def:  # The same node: descend into the child that differs.
        children = jtu.tree_flatten_with_path(old, is_leaf=_is_strict_child(old))[0]
        new_children = jtu.tree_leaves(new, is_leaf=_is_strict_child(new))
        for (key, old_child), new_child in zip(children, new_children, strict=True):
            if jtu.tree_structure(old_child) != jtu.tree_structure(new_child):
                return _structure_difference(old_child, new_child, path + key)
        raise RuntimeError("internal error: no child of two equal nodes differs")
    if type(old) is not type(new):
        return where, f"was {_describe_node(old)} and is now {_describe_node(new)}"
    if isinstance(old, eqx.Module):
        for field in _static_fields(type(old)):
            old_value, new_value = getattr(old, field, None), getattr(new, field, None)
            if not _static_leaves_equal(old_value, new_value):
                return f"{where}.{field}", (
                    f"is a static field that changed from {_describe_leaf(old_value)} "
                    f"to {_describe_leaf(new_value)}"
                )
    if isinstance(old, dict):
        keys = sorted(old, key=repr), sorted(new, key=repr)
        return where, f"had keys {keys[0]} and now has {keys[1]}"
    if isinstance(old, list | tuple):
        return where, f"had length {len(old)} and now has length {len(new)}"
    return where, f"changed structure from {old_def} to {new_def}"


def _describe_node(node: Any) -> str:
    if jtu.treedef_is_leaf(jtu.tree_structure(node)) and node is not None:
        return _describe_leaf(node)
    return f"a {type(node).__name__}"


#
# Control flow: filter_scan, filter_cond, filter_switch, and the other filter_*s
#
# Each function splits its pytrees into the leaves that JAX traces and the rest,
# runs the `jax.lax` primitive on the traced part, and puts the two back together.


class _Split:
    """A pytree's flat leaves, traced where `is_traced` says or at `promoted`."""

    def __init__(self, tree: Any, is_traced: Callable[[Any], bool], promoted: Any = ()):
        self.tree = tree
        self.leaves, self.treedef = jtu.tree_flatten(tree)
        self.traced = [i in promoted or is_traced(x) for i, x in enumerate(self.leaves)]

    def traced_part(self, traced: bool = True) -> Any:  # `None` at the other leaves.
        pairs = zip(self.leaves, self.traced, strict=True)
        return self.treedef.unflatten([x if t == traced else None for x, t in pairs])

    def rebuild(self, traced_part: Any) -> Any:
        values = iter(jtu.tree_leaves(traced_part))
        pairs = zip(self.leaves, self.traced, strict=True)
        return self.treedef.unflatten([next(values) if t else x for x, t in pairs])

    def path(self, index: int) -> str:
        return jtu.keystr(jtu.tree_flatten_with_path(self.tree)[0][index][0])


def _outputs_traced(leaf: Any) -> bool:  # What JAX takes as outputs.
    return _is_jax_value(leaf) or _is_python_number(leaf)


# A wrapper with `fun`'s name, signature and source, for JAX's messages to name.
_named_after = functools.partial(functools.wraps, updated=())
_TRACING_ERRORS = (  # The errors that say only that a tracer was used as a value.
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)
_NO_OPERAND = object()  # The default of `operand=`, which `jax.lax` also takes.

_LAX_CALLABLES = {  # Each `jax.lax` function, given the functions we were given.
    "filter_scan": lambda f: jax.lax.scan(f, 0.0, None, 1),
    "filter_cond": lambda true_fun, false_fun: jax.lax.cond(True, true_fun, false_fun),
    "filter_switch": lambda *branches: jax.lax.switch(0, branches),
    "filter_while_loop": lambda cond, body: jax.lax.while_loop(cond, body, 0.0),
    "filter_fori_loop": lambda body: jax.lax.fori_loop(0, 1, body, 0.0),
    "filter_map": lambda f: jax.lax.map(f, jnp.zeros(1)),
}
_LAX_CALLS = {  # Each `jax.lax` function, on a body `b` or branches giving `o`, `n`.
    "filter_scan": lambda o, n, b: jax.lax.scan(b(lambda c, x: (n, x)), o, None, 1),
    "filter_while_loop": lambda o, n, b: jax.lax.while_loop(
        lambda c: True, b(lambda c: n), o
    ),
    "filter_fori_loop": lambda o, n, b: jax.lax.fori_loop(0, 1, b(lambda i, c: n), o),
    "filter_cond": lambda o, n, _: jax.lax.cond(True, lambda: o, lambda: n),
    "filter_switch": lambda o, n, _: jax.lax.switch(0, [lambda: o, lambda: n]),
}


def _check_callable(function: str, **functions: Any) -> None:
    for name, fun in functions.items():
        if not callable(fun):
            check = _LAX_CALLABLES.get(function, lambda *_: None)
            raise TypeError(
                f"{function}: `{name}` must be callable; got {_describe_leaf(fun)}."
                + _lax_says(function, run=functools.partial(check, *functions.values()))
            )


def _lax_says(function: str, *trees: Any, run: Any = None, body: Any = None) -> str:
    """`jax.lax`'s message for the mistake `run(*trees)` (or `_LAX_CALLS`) makes."""

    def stand_in(x: Any) -> Any:
        return jax.ShapeDtypeStruct(x.shape, x.dtype) if eqx.is_array(x) else 0.0

    name = _named_after(body) if body else lambda stand_in_body: stand_in_body
    run = run or (lambda *trees: _LAX_CALLS[function](*trees, name))
    try:
        jax.eval_shape(run, *jtu.tree_map(stand_in, trees))
    except Exception as error:
        return f"\n\njax.lax.{function[7:]} says: {error}"
    return ""


# Eager calls: a call whose functions (by identity), tree structures, static leaves
# (by equality) and array types match an earlier one's runs that call's compiled
# program. Inside a trace, the same keys remember which numbers a loop promoted.

_CACHE_SIZE = 64  # Entries kept in each cache; the least recently used go.
_UNCACHED = object()  # Also the entry of a call that cannot be traced.


class _Cache:
    """A bounded, thread-safe LRU map whose entries go when a weak referent dies."""

    def __init__(self) -> None:
        self.entries: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.dead: list[Any] = []  # Keys whose objects died while it was locked.

    def get(self, key: Any) -> Any:
        with self.lock:
            while self.dead:
                self.entries.pop(self.dead.pop(), None)
            if (found := self.entries.get(key)) is not None:
                self.entries.move_to_end(key)
            return found and found[0]

    def put(self, key: Any, value: Any, referents: list[Any]) -> None:
        def drop(_: Any) -> None:
            if self.lock.acquire(blocking=False):  # Never wait: this runs from gc.
                self.entries.pop(key, None)
                self.lock.release()
            else:
                self.dead.append(key)

        entry = (value, [weakref.ref(x, drop) for x in referents])
        with self.lock:
            self.entries[key] = entry
            self.entries.move_to_end(key)
            while len(self.entries) > _CACHE_SIZE:
                self.entries.popitem(last=False)


_PROGRAMS, _PROMOTIONS = _Cache(), _Cache()
_promotion_key = threading.local()  # Set for `_with_promoted_numbers`, per call.


def _structure_key(treedef: Any, referents: list[Any]) -> Any:
    """`treedef`, with its static fields by `_exact_key` (`1`, `1.0`, `True` differ)."""
    node = treedef.node_data()
    children = tuple(_structure_key(c, referents) for c in treedef.children())
    return None if node is None else (node[0], _exact_key(node[1], referents), children)


def _exact_key(value: Any, referents: list[Any]) -> Any:
    """A hashable stand-in for `value`: numbers by bits, objects by weak reference."""
    kind = type(value)
    if kind in (float, complex):
        return (kind, struct.pack("<dd", value.real, value.imag))
    if kind in (bool, int, str, bytes, type(None)):
        return (kind, value)
    if isinstance(value, tuple | list | dict):
        items = value.items() if isinstance(value, dict) else value
        return (kind, tuple(_exact_key(item, referents) for item in items))
    # A dataclass without its own `__eq__` compares by identity, as other objects.
    if dataclasses.is_dataclass(kind) and kind.__eq__ is not object.__eq__:
        fields = [getattr(value, field.name) for field in dataclasses.fields(value)]
        return (kind, tuple(_exact_key(field, referents) for field in fields))
    # A method by identity, as methods compare; uncached if its object has no weakref.
    if inspect.ismethod(value) and weakref.ref(value.__self__):
        referents += [value.__self__, value.__func__]  # Gone before an id is reused.
        return (kind, id(value.__self__), id(value.__func__))
    try:
        key = weakref.ref(value)
    except TypeError:
        hash(value)
        return (kind, value)
    referents.append(value)
    return key


def _eager_call(function: Any, bound: inspect.BoundArguments, static: Any) -> Any:
    """`function` called as `bound` by an earlier call's program, or `_UNCACHED`."""
    _promotion_key.value = None
    if _CACHE_SIZE <= 0:
        return _UNCACHED
    arguments = bound.arguments
    trees = {
        name: _as_array(name, value) if name in ("pred", "index") else value
        for name, value in arguments.items()
        if name not in static
    }

    def call(trees: dict[str, Any]) -> Any:
        call = inspect.BoundArguments(bound.signature, {**arguments, **trees})
        return function(*call.args, **call.kwargs)

    leaves, treedef = jtu.tree_flatten(trees)
    referents: list[Any] = []
    arrays: list[int] = []
    numbers: set[int] = set()  # The operands' numbers: traced, as by `jax.lax`.
    try:  # Uncached where a static leaf cannot be hashed, or compared safely.
        operands = {"operands", "operand"} & trees.keys()
        if operands and len(arguments.get("branches", ())) != 1:  # Lax calls a lone
            paths = jtu.tree_flatten_with_path(trees)[0]  # branch on the numbers.
            numbers = {
                i
                for i, (path, x) in enumerate(paths)
                if path[0].key in operands and _is_python_number(x)
            }
        options = (arguments.get(name, _UNCACHED) for name in static)
        key: Any = [function, _trace_context(), *((type(x), x) for x in options)]
        key.append(_structure_key(treedef, referents))
        for i, leaf in enumerate(leaves):
            if eqx.is_array(leaf) or i in numbers:
                arrays.append(i)
                aval = getattr(leaf, "aval", None)  # `result_type` refuses longdouble.
                typed = aval or i in numbers or (leaf.shape, jnp.result_type(leaf))
                key.append((type(leaf), getattr(leaf, "dtype", None), typed))
            elif _is_jax_value(leaf) or (
                not _is_python_number(leaf) and (leaf == leaf) is not True
            ):
                return _UNCACHED
            else:
                key.append(_exact_key(leaf, referents))
        key = tuple(key)
        hash(key)
        _promotion_key.value = (key, referents)  # For `_with_promoted_numbers`.
        if not _trace_state_clean() or jax.config.jax_disable_jit:  # pyright: ignore[reportAttributeAccessIssue]
            return _UNCACHED
        entry = _PROGRAMS.get(key)  # Raises for an `__eq__` that raises.
    except Exception:
        return _UNCACHED
    if entry is None:
        entry: Any = _UNCACHED  # Kept if tracing raises.
        try:
            entry = _compile_call(treedef, leaves, arrays, call)
        except Exception:
            if not numbers:  # Else run uncached, where they may reach branches whole.
                raise
        finally:
            _PROGRAMS.put(key, entry, referents)
    if entry is _UNCACHED:
        return _UNCACHED
    run, prepare, consts, out_def, places = entry
    try:
        xs = [leaves[i] for i in arrays]
        values = iter(run(consts, *xs, *(prepare(*xs) if prepare else ())))
    except BaseException:
        if "progress" in static:
            _end_open_lines()  # As `_tidy_on_error`, for a progress bar's line.
        raise
    return out_def.unflatten(
        [
            next(values) if p is None else leaves[p] if type(p) is int else p[0]
            for p in places
        ]
    )


def _cached_eagerly(*static: str) -> Callable[[_Function], _Function]:
    """Run eager calls through `_eager_call`."""

    def decorate(function: _Function) -> _Function:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def cached(*args: Any, **kwargs: Any) -> Any:
            try:
                out = _eager_call(function, signature.bind(*args, **kwargs), static)
                return function(*args, **kwargs) if out is _UNCACHED else out
            finally:  # Also after an error: the call's objects are let go.
                _promotion_key.value = None

        return cast(_Function, cached)

    return decorate


def _as_array(name: str, value: Any) -> Any:
    """A selector as `jax.lax` takes it: numbers as arrays, a host `pred` as `!= 0`."""
    try:
        pred = name == "pred" and np.ndim(value) == 0  # Not `[0]`: its `!= 0` is True.
        if pred and not isinstance(value, jax.Array | Sequence | None):  # As lax.
            value = value != 0 if jnp.result_type(value).kind in "iuf" else value
        if type(value) is (bool if pred else int):  # Sent with the call's arrays,
            return np.asarray(value, bool if pred else np.int32)  # wrapped as by lax.
        return jnp.asarray(value) if _is_python_number(value) else value
    except Exception:
        return value  # Left as it is, for `jax.lax` to complain of.


def _compile_call(treedef: Any, leaves: list[Any], arrays: list[int], call: Any) -> Any:
    """Trace `call` on `treedef.unflatten(leaves)` with its array leaves traced."""
    out: list[Any] = []
    traced = set(arrays)
    static = {id(leaf): i for i, leaf in enumerate(leaves) if i not in traced}

    def program(*traced: Any) -> list[Any]:
        inputs = list(leaves)
        for i, x in zip(arrays, traced, strict=True):
            inputs[i] = x
        out_leaves, out_def = jtu.tree_flatten(call(treedef.unflatten(inputs)))
        # Each output leaf: traced (`None`), an input's static leaf (its index), or
        # a value made while tracing (in a 1-tuple).
        places = [
            None if isinstance(x, jax.core.Tracer) else static.get(id(x), (x,))
            for x in out_leaves
        ]
        out[:] = [out_def, places]
        return [x for x, p in zip(out_leaves, places, strict=True) if p is None]

    try:
        closed = jax.make_jaxpr(program)(*(leaves[i] for i in arrays))
    except _TRACING_ERRORS:
        # Arrays in a function (a module's parameters) traced here: run uncached.
        return _UNCACHED
    immutable = (bool, int, float, complex, str, bytes, type(None))
    if any(type(p) is tuple and type(p[0]) not in immutable for p in out[1]):
        return _UNCACHED  # Each call must get its own new objects, as uncached.
    # The selector's preparation runs op by op, as in `jax.lax`, not in the program.
    jaxpr, prelude, rest = closed.jaxpr, [], []
    ready = {v for v in jaxpr.invars if v.aval.shape == ()}
    for eqn in jaxpr.eqns:
        early = all(hasattr(v, "val") or v in ready for v in eqn.invars)
        early &= eqn.primitive.name in ("ne", "convert_element_type", "clamp")
        (prelude if early else rest).append(eqn)
        ready.update(eqn.outvars if early else ())
    made = [v for eqn in prelude for v in eqn.outvars]
    info = getattr(jaxpr.debug_info, "with_unknown_names", lambda: None)()
    first = jaxpr.replace(eqns=prelude, outvars=made, constvars=[], debug_info=info)
    rest = jaxpr.replace(invars=[*jaxpr.invars, *made], eqns=rest, debug_info=info)
    run = jax.jit(lambda consts, *xs: jax.core.eval_jaxpr(rest, consts, *xs))
    prepare = functools.partial(jax.core.eval_jaxpr, first, []) if prelude else None
    return run, prepare, list(closed.consts), out[0], out[1]


class _PromoteCarryNumbers(Exception):
    """`args`: the carry's numbers a body changed, and those it may have changed."""


def _with_promoted_numbers(
    function: str, attempt: Callable[[frozenset[int]], _Out], tree: Any, lax_first=False
) -> _Out:
    """`attempt(promoted)`, with the Python numbers of `tree` at the flat indices
    `promoted` traced: first bools only (every number if `lax_first`), adding those a
    body changes; on an error, every number (`c.shape`), then none (`if training:`)."""
    leaves = jtu.tree_leaves(tree)
    bools = frozenset(i for i, leaf in enumerate(leaves) if type(leaf) is bool)
    numbers = frozenset(i for i, leaf in enumerate(leaves) if _is_python_number(leaf))
    starts = {  # In this order; a later description wins where two sets are equal.
        bools: "bools traced and other numbers as Python values",
        numbers: "every number traced",
        frozenset(): "every number a Python value",
    }
    last = numbers  # After every number is traced, only tracing errors try on.
    if lax_first:
        starts, last = {numbers: starts.pop(numbers), **starts}, None
    errors: dict[frozenset[int], Exception] = {}
    hint, _promotion_key.value = getattr(_promotion_key, "value", None), None
    with contextlib.suppress(Exception):  # An `__eq__` that raises: no hint.
        known = hint and _PROMOTIONS.get(hint[0])
        if known is not None:  # What this loop promoted when last traced: first.
            starts = {known: "the numbers it promoted before", **starts}
    for start in starts:
        promoted, rounds, narrow = start, 0, None
        while True:
            try:
                result = attempt(promoted)
                if hint:
                    _PROMOTIONS.put(hint[0], promoted, hint[1])
                return result
            except _PromoteCarryNumbers as request:
                changed, unproven = request.args
                rounds += 1
                if rounds == 2:  # Else each trace may find one more number.
                    narrow = promoted | changed
                    promoted |= unproven
                else:
                    promoted |= changed
            except RuntimeError:  # From the running computation: final.
                raise
            except Exception as error:
                if narrow is None:
                    errors[start] = error
                    break
                # Numbers needed as Python values: go one round at a time.
                promoted, narrow = narrow, None
        if start == last and not isinstance(errors[start], _TRACING_ERRORS):
            break
    # Failing all: `jax.lax`'s error (every number traced), unless it only complains
    # of tracing where another start's error says more.
    tried = [errors[numbers], *errors.values()]
    chosen = next((e for e in tried if not isinstance(e, _TRACING_ERRORS)), tried[0])
    for start, other in errors.items():
        if other is not chosen and str(other) != str(chosen):
            chosen.add_note(
                f"{function} also ran with {starts[start]}, which raised "
                f"{type(other).__name__}: {other}"
            )
    raise chosen


class _LoopCarry(_Split):
    """A loop carry: arrays and the numbers at the indices `promoted` are traced."""

    def __init__(self, init: Any, promoted: Any, function: str, body: Any) -> None:
        super().__init__(init, _is_jax_value, promoted)
        self.function, self.body = function, body
        # Numbers that every trace of the body passes on untouched stay as they were.
        self.untouched = set(promoted)
        self.body_inputs: list[Any] = []

    def enter(self, traced_part: Any) -> Any:
        tree = self.rebuild(traced_part)
        self.body_inputs = jtu.tree_leaves(tree)
        return tree

    def finish(self, traced_part: Any) -> Any:
        leaves = jtu.tree_leaves(self.rebuild(traced_part))
        for i in self.untouched:
            leaves[i] = self.leaves[i]
        return self.treedef.unflatten(leaves)

    def check(self, new_carry: Any) -> Any:
        """The traced part of the body's new carry, checked against `init`."""
        new_leaves, new_def = jtu.tree_flatten(new_carry)
        if new_def != self.treedef:
            path, message = _structure_difference(self.tree, new_carry, ())
            if message.startswith("is a static field"):
                raise TypeError(self._error(path, message, "static"))
            says = _lax_says(self.function, self.tree, new_carry, body=self.body)
            raise TypeError(self._error(path, message, "structure") + says)
        to_promote, unproven = set[int](), set[int]()
        inputs = self.body_inputs  # From `enter`, which each body calls first.
        self.untouched = {i for i in self.untouched if new_leaves[i] is inputs[i]}
        for i, (old, new, is_traced) in enumerate(
            zip(self.leaves, new_leaves, self.traced, strict=True)
        ):
            if not (is_traced or _is_python_number(old)):
                if (message := _leaf_difference(old, new)) is not None:
                    raise ValueError(self._error(self.path(i), message, "static"))
            elif not _outputs_traced(new):
                message = f"was {_describe_leaf(old)} and is now {_describe_leaf(new)}"
                raise TypeError(self._error(self.path(i), message, "traced"))
            elif not is_traced:
                if not _same_python_number(old, new):
                    to_promote.add(i)
                # Passed on as the very object that came in, and not one that Python
                # shares between equal values (small ints, bools), it is unchanged.
                shared = type(old) is bool or (type(old) is int and -5 <= old <= 256)
                if new is not inputs[i] or shared:
                    unproven.add(i)
        if to_promote:
            raise _PromoteCarryNumbers(to_promote, to_promote | unproven)
        pairs = zip(new_leaves, self.traced, strict=True)
        return new_def.unflatten([x if t else None for x, t in pairs])

    def _error(self, path: str, message: str, kind: str) -> str:
        scan = self.function == "filter_scan"
        body, init = ("f", "init") if scan else ("body_fun", "init_val")
        fix = {
            "structure": f"Keep the structure of `{init}` from step to step.",
            "traced": f"Return an array or number of the shape and dtype in `{init}`.",
            "static": "Only arrays and Python numbers in the carry may change: make "
            f"it an array in `{init}` with `jnp.asarray`, or keep it out of the carry "
            f"(close over it in `{body}`{', or pass it in `xs`' if scan else ''}).",
        }[kind]
        return (
            f"{self.function}: `{body}` returned a carry that differs from "
            f"`{init}` {_where(path)}: it {message}. {fix}"
        )


def _static_outputs_agree(function: str, what: str, traces: list[_Split]) -> None:
    """Each trace of `f` must give the same static outputs."""

    def differs(path: str, message: str) -> ValueError:
        return ValueError(
            f"{function}: the non-array part of {what} differs between two traces "
            f"of `f`: {_where(path)} it {message}. JAX may trace `f` more than "
            "once: return arrays for values that vary between traces."
        )

    first = traces[0].traced_part(traced=False)
    first_leaves, first_def = jtu.tree_flatten_with_path(first)
    for trace in traces[1:]:
        other = trace.traced_part(traced=False)
        leaves, other_def = jtu.tree_flatten(other)
        if other_def != first_def:
            raise differs(*_structure_difference(first, other, ()))
        for (path, old), new in zip(first_leaves, leaves, strict=True):
            if (message := _leaf_difference(old, new)) is not None:
                raise differs(jtu.keystr(path), message)


def _check_branches_agree(
    function: str, outputs: dict[str, _Split], name: str, out: Any
) -> None:
    """Branch `name`'s output `out` against the first branch's, in `outputs`."""
    first_name, first = next((k, split.tree) for k, split in outputs.items())

    def error(path: str, message: str) -> str:
        return (
            f"{function}: the branches' outputs disagree {_where(path)}: compared "
            f"with `{first_name}`'s output, `{name}`'s {message}. Every branch must "
            "return the same structure, with arrays where values differ."
        )

    first_leaves, first_def = jtu.tree_flatten_with_path(first)
    out_leaves, out_def = jtu.tree_flatten(out)
    if first_def != out_def:
        path, message = _structure_difference(first, out, ())
        # `jax.lax`'s message names the true branch first.
        pair = (out, first) if first_name == "false_fun" else (first, out)
        raise TypeError(error(path, message) + _lax_says(function, *pair))
    for (path, a), b in zip(first_leaves, out_leaves, strict=True):
        a_traced = _outputs_traced(a)
        if a_traced != _outputs_traced(b):
            message = f"was {_describe_leaf(a)} and is now {_describe_leaf(b)}"
            raise TypeError(error(jtu.keystr(path), message))
        # Where both are traced, `jax.lax` checks shapes and dtypes.
        if not a_traced and (message := _leaf_difference(a, b)) is not None:
            raise ValueError(error(jtu.keystr(path), message))


def _branch(
    function: str,
    selector: Any,
    branches: dict[str, Callable[..., Any]],
    operands: tuple[Any, ...],
    operand: Any,
) -> Any:
    """`jax.lax.cond` or `switch` on the traced parts, after the checks both make."""
    if operand is not _NO_OPERAND:  # `operand=x`, which `jax.lax` also takes.
        if operands:
            raise TypeError(
                f"{function}: pass the operands either positionally or as `operand=`, "
                f"not both; got `operand=` and {len(operands)} positional operand(s)."
            )
        operands = (operand,)
    cond = function == "filter_cond"
    if eqx.is_array(selector) and selector.shape != ():
        fix = "Reduce it with `jnp.any` or `jnp.all`." if cond else "Pass one index."
        raise TypeError(
            f"{function}: `{'pred' if cond else 'index'}` must be a scalar; got an "
            f"array of shape {tuple(selector.shape)}. {fix}"
        )

    def attempt(promoted: frozenset[int]) -> Any:
        inputs = _Split(operands, eqx.is_array, promoted)
        outputs: dict[str, _Split] = {}

        def wrap(name: str, fun: Callable[..., Any]) -> Callable[..., Any]:
            @_named_after(fun)
            def branch(*traced: Any) -> Any:
                out = _Split(fun(*inputs.rebuild(traced)), _outputs_traced)
                if outputs:
                    _check_branches_agree(function, outputs, name, out.tree)
                outputs[name] = out
                return out.traced_part()

            return branch

        wrapped = [wrap(name, fun) for name, fun in branches.items()]
        if cond:
            traced_out = jax.lax.cond(selector, *wrapped, *inputs.traced_part())
        else:
            traced_out = jax.lax.switch(selector, wrapped, *inputs.traced_part())
        return next(iter(outputs.values())).rebuild(traced_out)

    return _with_promoted_numbers(function, attempt, operands, lax_first=True)


@_cached_eagerly("length", "reverse", "unroll", "_split_transpose", "progress")
def filter_scan(
    f: Callable[[_Carry, _X], tuple[_Carry, _Y]],
    init: _Carry,
    xs: _X | None = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    _split_transpose: bool = False,
    *,
    progress: bool | str = False,
) -> tuple[_Carry, _Y]:
    """As `jax.lax.scan`, except that the carry, inputs and outputs may be any pytree.

    Arrays are traced, and so are the carry's bools, and its other Python numbers from
    the step that changes them. Other leaves are static: `f` returns them unchanged.
    On arrays this is `jax.lax.scan`'s own program, under `jit`, `vmap` and `grad`.

    **Arguments:** as `jax.lax.scan`, except:

    - `xs`: its arrays are sliced along their leading axis; its other leaves reach
        every step whole. Pass `length` when it holds no arrays.
    - `progress`: `True` or a description draws a progress bar on stderr, even in `jit`.

    **Returns:** `(final_carry, ys)`; the static leaves of `y` come once, unstacked.

    **Raises:** `jax.lax.scan`'s exception types, with messages that begin:

    - `TypeError`: ``filter_scan: `f` must be callable``, ``filter_scan: `f` must
        return a pair``, ``filter_scan: `f` returned a carry``, ``filter_scan:
        `length` must be a whole number``, ``filter_scan: `unroll` must be``,
        ``filter_scan: `progress` must be``.
    - `ValueError`: ``filter_scan: `f` returned a carry`` (a static leaf),
        ``filter_scan: every array in `xs` must``, ``filter_scan: `length=…`
        disagrees``, ``filter_scan: cannot tell how many steps``, ``filter_scan:
        the array at `xs` path … is a scalar`` (an `IndexError` too), ``filter_scan:
        `length` must be non-negative``, ``filter_scan: `unroll` must be``,
        ``filter_scan: the non-array part of `f`'s output``.
    - `jax.errors.ConcretizationTypeError`: ``filter_scan: `length` must be
        concrete``.

    **Example:**

    ```python
    mlp = eqx.nn.MLP(2, 2, width_size=8, depth=1, key=jax.random.key(0))
    step = lambda c, _: ((c[0], c[0](c[1]), c[2] + 1), c[1])  # (model, x, steps)
    (mlp, x, steps), xs = filter_scan(step, (mlp, jnp.ones(2), 0), length=5)
    print(xs.shape, steps)  # (5, 2) 5
    ```
    """
    _check_callable("filter_scan", f=f)
    description = _progress_description("filter_scan", progress)
    inputs = _Split(xs, _is_jax_value)
    if length is not None:
        try:
            n = int(length)  # A string then differs from `n`.
        except jax.errors.ConcretizationTypeError:
            raise jax.errors.ConcretizationTypeError(
                length,  # pyright: ignore[reportArgumentType]
                "filter_scan: `length` must be concrete, but it is traced. Pass a "
                "static Python int, or use `jax.lax.while_loop` for a traced length."
                + _lax_says(
                    "filter_scan",
                    run=lambda: jax.lax.scan(lambda c, x: (c, x), 0, None, length),
                ),
            ) from None
        except (TypeError, ValueError, OverflowError):
            n = None
        if n is None or bool(n != length):
            raise TypeError(
                "filter_scan: `length` must be a whole number (a Python int, a NumPy "
                f"integer or a 0-d integer array); got {_describe_leaf(length)}."
            )
        if n < 0:
            raise ValueError(f"filter_scan: `length` must be non-negative; got {n}.")
        length = n
    _check_leading_axes("filter_scan", inputs)
    sizes = {leaf.shape[0] for leaf in inputs.leaves if eqx.is_array(leaf)}
    if len(sizes) > 1:
        arrays = [(i, x) for i, x in enumerate(inputs.leaves) if eqx.is_array(x)]
        listing = ", ".join(f"{inputs.path(i)}: {x.shape[0]}" for i, x in arrays)
        raise ValueError(
            "filter_scan: every array in `xs` must have the same leading size, but the "
            f"leading sizes differ ({listing}). Slice or pad them to one length."
        )
    size = sizes.pop() if sizes else length
    if size is None:
        raise ValueError(
            "filter_scan: cannot tell how many steps to run, because `xs` holds no "
            "arrays. Pass `length=`."
            + _lax_says("filter_scan", run=lambda: jax.lax.scan(lambda *a: a, 0, xs))
        )
    if length is not None and length != size:
        raise ValueError(
            f"filter_scan: `length={length}` disagrees with the leading size {size} of "
            f"the arrays in `xs`. Pass `length={size}` or leave it out."
            + _lax_says(
                "filter_scan",
                np.broadcast_to(np.float32(0), (size,)),
                run=lambda xs: jax.lax.scan(lambda c, x: (c, x), None, xs, length),
            )
        )
    length = size
    # `jax.lax.scan` interprets bools, and rejects tracers itself.
    if not isinstance(unroll, bool | np.bool_ | jax.core.Tracer):
        must = "filter_scan: `unroll` must be a bool or a non-negative int; got"
        try:
            unroll = operator.index(unroll)
        except TypeError:
            raise TypeError(f"{must} {_describe_leaf(unroll)}.") from None
        if unroll < 0:
            raise ValueError(f"{must} {unroll}.")
    bar = _make_bar(description, length)
    options = {"length": length, "reverse": reverse, "unroll": unroll}
    if _SCAN_TAKES_SPLIT_TRANSPOSE:
        options["_split_transpose"] = _split_transpose

    def attempt(promoted: frozenset[int]) -> Any:
        carry = _LoopCarry(init, promoted, "filter_scan", f)
        outputs: list[_Split] = []
        pair_defs: list[Any] = []

        @_named_after(f)
        def step(traced_carry: Any, traced_x: Any) -> tuple[Any, Any]:
            out = f(carry.enter(traced_carry), inputs.rebuild(traced_x))
            # Any node with two children is a pair, as for `jax.lax.scan`.
            pair, pair_def = jtu.tree_flatten(out, is_leaf=lambda node: node is not out)
            if len(pair) != 2 or jtu.treedef_is_leaf(pair_def):
                raise TypeError(
                    "filter_scan: `f` must return a pair `(new_carry, y)`; got "
                    f"{_describe_leaf(out)}."
                    + _lax_says(
                        "filter_scan",
                        out,
                        run=lambda out: jax.lax.scan(lambda c, x: out, None, None, 1),
                    )
                )
            pair_defs.append(pair_def)
            outputs.append(_Split(pair[1], _outputs_traced))  # `y`
            return carry.check(pair[0]), outputs[-1].traced_part()

        final, ys = _scan(bar, step, carry.traced_part(), inputs.traced_part(), options)
        _static_outputs_agree("filter_scan", "`f`'s output `y`", outputs)
        # `jax.lax.scan` gives back the pair in the container that `f` used.
        return pair_defs[0].unflatten([carry.finish(final), outputs[0].rebuild(ys)])

    with _tidy_on_error(bar):
        return _with_promoted_numbers("filter_scan", attempt, init)


def _scan(
    bar: "_ProgressBar | None", step: Any, init: Any, xs: Any, options: Any
) -> tuple[Any, Any]:
    """`jax.lax.scan(step, init, xs, **options)`, reporting its progress to `bar`."""
    if bar is None:
        return jax.lax.scan(step, init, xs, **options)
    # A check in every step keeps XLA from simplifying the step, so where it can (not
    # under differentiation, which would sum cotangents in another order) this is an
    # outer scan over chunks, reporting between them, bit for bit one scan's results.
    length, unroll = options["length"], options["unroll"]
    with _progress_body():  # Loops traced inside `step` draw no bar.
        as_bool = isinstance(unroll, bool | np.bool_)
        steps = (length if unroll else 1) if as_bool else unroll  # Unrolled at once.
        if length == 1 or steps >= length:
            # XLA compiles a loop of one step (or wholly unrolled) into what surrounds
            # it, where any report inside would change the results' bits: one after it.
            out = jax.lax.scan(step, init, xs, **options)
            jax.debug.callback(_progress_callbacks(bar, 1, 1)[1])
            return out
        try:
            first_x = jax.tree.map(lambda x: x[0], xs)
        except Exception:  # An explicitly sharded scan axis, say: lax's error, then.
            return jax.lax.scan(step, init, xs, **options)
        trace = jax.make_jaxpr(step, return_shape=True)
        closed, (carry_shape, y_shape) = trace(init, first_x)
        init_leaves, carry_def = jtu.tree_flatten(init)
        carries = len(init_leaves)
        if jtu.tree_structure(carry_shape) != carry_def or any(
            (a.shape, a.dtype, a.weak_type) != (b.shape, b.dtype, b.weak_type)
            for a, b in zip(closed.in_avals, closed.out_avals[:carries], strict=False)
        ):  # Let `jax.lax.scan` promote the carry, or raise, as it does.
            return _scan_reporting_every_step(bar, step, init, xs, options)

        def replay(consts: list[Any], carry: list[Any], x: list[Any]) -> Any:
            out = jax.core.eval_jaxpr(closed.jaxpr, consts, *carry, *x)
            return out[:carries], out[carries:]

        def every_step(consts: list[Any], carry: list[Any], xs: list[Any]) -> Any:
            return _scan_reporting_every_step(
                bar, functools.partial(replay, consts), carry, xs, options
            )

        stride = _chunk_size(length)
        const_avals = [var.aval for var in closed.jaxpr.constvars]
        avals = (*closed.in_avals, *closed.out_avals, *const_avals)
        if (
            stride is None
            or steps != 1
            or closed.effects
            or (any(map(_is_key_array, avals)) and not _custom_jvp_takes_keys())
        ):
            scan: Callable[..., Any] = every_step
        else:
            chunks = length // stride
            inner = {**options, "unroll": 1, "length": stride}
            outer = {**options, "unroll": 1, "length": chunks}

            def in_chunks(consts: list[Any], init: list[Any], xs: list[Any]) -> Any:
                first, then = _progress_callbacks(bar, stride, chunks + 1)
                jax.debug.callback(first)

                def chunk(state: tuple[Any, Any], x: Any) -> tuple[Any, Any]:
                    index, carry = state
                    step = functools.partial(replay, consts)
                    carry, ys = jax.lax.scan(step, carry, x, **inner)
                    done, operand = _tied(index, [carry, ys])  # After its steps.
                    report = lambda _: jax.debug.callback(then)  # noqa: E731
                    jax.lax.cond(done >= 0, report, lambda _: None, operand)
                    return (index + 1, carry), ys

                index = jnp.zeros((), jnp.int32)
                xs = [x.reshape(chunks, stride, *x.shape[1:]) for x in xs]
                (_, carry), ys = jax.lax.scan(chunk, (index, init), xs, **outer)
                # Else XLA folds the reshapes into what consumes `ys` (a sum over two
                # axes instead of one, say), which then rounds differently.
                ys = [y.reshape(length, *y.shape[2:]) for y in ys]
                return carry, _optimization_barrier(ys)

            scan = jax.custom_jvp(in_chunks)
            scan.defjvp(lambda primals, dots: jax.jvp(every_step, primals, dots))
        final, ys = scan(list(closed.consts), init_leaves, jtu.tree_leaves(xs))
        return carry_def.unflatten(final), jtu.tree_structure(y_shape).unflatten(ys)


def _tied(index: jax.Array, tree: Any) -> tuple[jax.Array, Any]:
    """`index`, and a report's operand, made to depend on `tree` (numbers too)."""
    leaves = [x for x in map(jnp.asarray, jtu.tree_leaves(tree)) if x.size]
    if not leaves:
        return index, index
    smallest = min(leaves, key=lambda leaf: leaf.size)
    if _is_key_array(smallest):
        smallest = jax.random.key_data(smallest)
    if _HAS_OPTIMIZATION_BARRIER:
        return _optimization_barrier((index, smallest))[0], index
    return index, jnp.ravel(smallest)[0]


def _scan_reporting_every_step(
    bar: "_ProgressBar", step: Callable[..., Any], init: Any, xs: Any, options: Any
) -> tuple[Any, Any]:
    """`jax.lax.scan(step, init, xs, **options)`, checking a step count in each step."""
    length = options["length"]
    stride = _progress_stride(length)
    reported = {*range(0, length, stride), length - 1}
    callbacks = _progress_callbacks(bar, stride, len(reported))
    reports = [lambda _, c=c: jax.debug.callback(c) for c in callbacks]

    @_named_after(step)
    def counted(state: tuple[Any, Any], x: Any) -> tuple[Any, Any]:
        index, traced_carry = state
        # Tied to the carry, or differentiation hoists the reports out of outer loops.
        tied, operand = _tied(index, traced_carry)
        # 0: no report; 1: the first; 2: every `stride` steps, and the last.
        later = (tied % stride == 0) | (tied == length - 1)
        kind = jnp.where(tied == 0, 1, jnp.where(later, 2, 0))
        jax.lax.switch(kind, [lambda _: None, *reports], operand)
        new_carry, y = step(traced_carry, x)
        return (index + 1, new_carry), y

    index = jnp.zeros((), jnp.int32)
    (_, final), ys = jax.lax.scan(counted, (index, init), xs, **options)
    return final, ys


def _while_reporting(
    bar: "_ProgressBar", cond: Callable[..., Any], body: Callable[..., Any], init: Any
) -> Any:
    """`jax.lax.while_loop(cond, body, init)`, reporting to `bar` at powers of four,
    then every `_PROGRESS_WHILE_STRIDE` steps (in inner loops), and at its end."""
    stride, most = _PROGRESS_WHILE_STRIDE, _PROGRESS_MAX_COUNT

    def joined(join: Callable[..., Any], flag: Any, out: Any) -> Any:
        """`join(flag, out)`; anything but a boolean scalar `out` is left to lax."""
        if getattr(out, "shape", None) != () or getattr(out, "dtype", None) != np.bool_:
            return out
        return join(flag, out)

    @_progress_body()  # Loops traced inside `body` draw no bar.
    def chunk(state: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        count, first, traced = state  # `first`: the run's first chunk, even of none.
        step = jnp.where(count < stride, jnp.clip(3 * count, 1, stride - count), stride)
        stop = count + jnp.minimum(step, most - count)
        count, traced = jax.lax.while_loop(  # At `most`, it steps on unreported.
            lambda s: joined(
                jnp.logical_and, (s[0] < stop) | (s[0] == most), cond(s[1])
            ),
            lambda s: (s[0] + (s[0] < most), body(s[1])),
            (count, traced),
        )
        # Tied to the carry: else it may be hoisted out of an enclosing loop.
        report = lambda n, _, new: _progress_update(bar, int(n), bool(new))  # noqa: E731
        jax.debug.callback(report, *_tied(count, traced), first)
        return count, jnp.zeros_like(first), traced

    @_named_after(cond)
    @_progress_body()  # Loops traced inside `cond` draw no bar either.
    def run_chunk(state: tuple[Any, Any, Any]) -> Any:
        return joined(jnp.logical_or, state[1], cond(state[2]))

    state = (jnp.zeros((), jnp.int32), jnp.ones((), bool), init)
    count, _, final = jax.lax.while_loop(run_chunk, chunk, state)

    def end(due: Any) -> Any:  # In a loop: under `vmap`, `jax.lax.cond` runs both.
        jax.debug.callback(lambda: _progress_update(bar, None))
        return jnp.zeros_like(due)

    jax.lax.while_loop(lambda due: due, end, count >= 0)  # Once, after the loop.
    return final


class _ScalarToScanError(ValueError, IndexError):
    """A 0-d array in `xs`: `jax.lax.scan` and `jax.lax.map` raise an `IndexError`."""


def _check_leading_axes(function: str, inputs: _Split) -> None:
    for i, leaf in enumerate(inputs.leaves):
        if eqx.is_array(leaf) and leaf.ndim == 0:
            raise _ScalarToScanError(
                f"{function}: the array at `xs` path {inputs.path(i)} is a scalar "
                f"(shape ()), so it has no leading axis to {function[7:]} over. Give "
                "it a leading axis, or make it a Python scalar."
            )


@_cached_eagerly()
def filter_cond(
    pred: Any,
    true_fun: Callable[..., _Out],
    false_fun: Callable[..., _Out],
    *operands: Any,
    operand: Any = _NO_OPERAND,
) -> _Out:
    """As `jax.lax.cond`, except that the operands and outputs may be any pytree.

    The operands' arrays and Python numbers are traced, as by `jax.lax.cond`, and so
    are the numbers the branches return; where a branch raises on a traced number
    (`if n > 0:`), the numbers reach the branches whole. Other leaves reach the
    branches whole, and the branches must return equal values at them.

    **Raises:** `jax.lax.cond`'s exception types, with messages that begin:

    - `TypeError`: ``filter_cond: `true_fun` must be callable``, ``filter_cond:
        `pred` must be a scalar``, ``filter_cond: the branches' outputs disagree``,
        ``filter_cond: pass the operands either positionally or as `operand=` ``.
    - `ValueError`: ``filter_cond: the branches' outputs disagree`` (static values).

    **Example:**

    ```python
    grow, shrink = lambda x, s: (x + 1.0, s), lambda x, s: (x - 1.0, s)
    value, label = filter_cond(jnp.array(True), grow, shrink, jnp.zeros(3), "act")
    print(value, label)  # [1. 1. 1.] act
    ```
    """
    if not (callable(true_fun) and callable(false_fun)):
        if callable(false_fun) and len(operands) == 2 and callable(operands[1]):
            # The older `cond(pred, true_operand, true_fun, false_operand, false_fun)`.
            old_true, (false_operand, old_false) = false_fun, operands
            new_true, new_false = lambda x, _: old_true(x), lambda _, x: old_false(x)
            return filter_cond(pred, new_true, new_false, true_fun, false_operand)
        _check_callable("filter_cond", true_fun=true_fun, false_fun=false_fun)
    named = {"true_fun": true_fun, "false_fun": false_fun}
    return _branch("filter_cond", pred, named, operands, operand)


@_cached_eagerly()
def filter_switch(
    index: Any,
    branches: Sequence[Callable[..., _Out]],
    *operands: Any,
    operand: Any = _NO_OPERAND,
) -> _Out:
    """As `jax.lax.switch`, except that the operands and outputs may be any pytree,
    split as by `filter_cond`.

    **Raises:** `jax.lax.switch`'s exception types, with messages that begin:

    - `TypeError`: ``filter_switch: `branches` must be a sequence``, ``filter_switch:
        `branches[…]` must be callable``, ``filter_switch: `index` must be a
        scalar``, ``filter_switch: the branches' outputs disagree``, ``filter_switch:
        pass the operands either positionally or as `operand=` ``.
    - `ValueError`: ``filter_switch: `branches` is empty``, ``filter_switch: the
        branches' outputs disagree`` (static values).

    **Example:**

    ```python
    gaits = [lambda x, mode: (x + 1.0, mode), lambda x, mode: (x + 2.0, mode)]
    value, mode = filter_switch(jnp.array(1), gaits, jnp.zeros(2), "gait")
    print(value, mode)  # [2. 2.] gait
    ```
    """
    try:
        named = {f"branches[{i}]": fun for i, fun in enumerate(branches)}
    except TypeError:
        raise TypeError(
            "filter_switch: `branches` must be a sequence of functions; got "
            f"{_describe_leaf(branches)}."
        ) from None
    _check_callable("filter_switch", **named)
    if not named:
        raise ValueError(
            "filter_switch: `branches` is empty; give it a function."
            + _lax_says("filter_switch", run=lambda: jax.lax.switch(0, []))
        )
    return _branch("filter_switch", index, named, operands, operand)


@_cached_eagerly("progress")
def filter_while_loop(
    cond_fun: Callable[[_Carry], Any],
    body_fun: Callable[[_Carry], _Carry],
    init_val: _Carry,
    *,
    progress: bool | str = False,
) -> _Carry:
    """As `jax.lax.while_loop`, except that the carry may be any pytree, split as by
    `filter_scan`; `progress` draws a bar with no total: the count, time and rate.

    **Raises:** `jax.lax.while_loop`'s exception types, with messages that begin:

    - `TypeError`: ``filter_while_loop: `cond_fun` must be callable`` (or
        `body_fun`), ``filter_while_loop: `body_fun` returned a carry``,
        ``filter_while_loop: `progress` must be``.
    - `ValueError`: ``filter_while_loop: `body_fun` returned a carry`` (a static leaf).

    **Example:**

    ```python
    step = lambda c: (c[0] + 0.3, c[1] + 1, c[2])  # (position, steps, name)
    _, steps, name = filter_while_loop(lambda c: c[0] < 1, step, (0.0, 0, "a"))
    print(steps, name)  # 4 a
    ```
    """
    _check_callable("filter_while_loop", cond_fun=cond_fun, body_fun=body_fun)
    bar = _make_bar(_progress_description("filter_while_loop", progress), None)

    def attempt(promoted: frozenset[int]) -> Any:
        carry = _LoopCarry(init_val, promoted, "filter_while_loop", body_fun)

        @_named_after(cond_fun)
        def cond(traced: Any) -> Any:
            return cond_fun(carry.rebuild(traced))

        @_named_after(body_fun)
        def body(traced: Any) -> Any:
            return carry.check(body_fun(carry.enter(traced)))

        loop = functools.partial(_while_reporting, bar) if bar else jax.lax.while_loop
        return carry.finish(loop(cond, body, carry.traced_part()))

    with _tidy_on_error(bar):
        return _with_promoted_numbers("filter_while_loop", attempt, init_val)


@_cached_eagerly("lower", "upper", "unroll", "progress")
def filter_fori_loop(
    lower: Any,
    upper: Any,
    body_fun: Callable[[Any, _Carry], _Carry],
    init_val: _Carry,
    *,
    unroll: int | bool | None = None,
    progress: bool | str = False,
) -> _Carry:
    """As `jax.lax.fori_loop`, except that the carry may be any pytree, split as by
    `filter_scan`; `progress` as in `filter_scan`, with concrete bounds.

    **Raises:** `jax.lax.fori_loop`'s exception types, with messages that begin:

    - `TypeError`: ``filter_fori_loop: `body_fun` must be callable``,
        ``filter_fori_loop: `body_fun` returned a carry``, ``filter_fori_loop:
        `progress` needs concrete bounds``.
    - `ValueError`: ``filter_fori_loop: `body_fun` returned a carry`` (a static leaf).

    **Example:**

    ```python
    total, label = filter_fori_loop(0, 5, lambda i, c: (c[0] + i, c[1]), (0.0, "sum"))
    print(total, label)  # 10.0 sum
    ```
    """
    _check_callable("filter_fori_loop", body_fun=body_fun)
    description = _progress_description("filter_fori_loop", progress)
    bar, first, total = None, 0, 0
    if description is not None:
        # The checks of `jax.lax.fori_loop` on the bounds' types, first.
        jax.eval_shape(lambda: jax.lax.fori_loop(lower, upper, lambda i, c: c, 0))
        try:
            first, total = int(lower), max(0, int(upper) - int(lower))
        except TypeError as err:
            raise TypeError(
                "filter_fori_loop: `progress` needs concrete bounds, but `lower` or "
                "`upper` is traced. Pass static Python ints, or leave `progress` out."
            ) from err
        bar = _make_bar(description, total)

    def attempt(promoted: frozenset[int]) -> Any:
        carry = _LoopCarry(init_val, promoted, "filter_fori_loop", body_fun)

        @_named_after(body_fun)
        def body(i: Any, traced: Any) -> Any:
            return carry.check(body_fun(i, carry.enter(traced)))

        init = carry.traced_part()
        if bar is None:
            final = jax.lax.fori_loop(lower, upper, body, init, unroll=unroll)
            return carry.finish(final)

        # As `jax.lax.fori_loop` does: a scan whose carry holds the (weak) index.
        @_named_after(body_fun)
        def counted(state: tuple[Any, Any], _: Any) -> tuple[Any, None]:
            return (state[0] + 1, body(*state)), None

        options = {"length": total, "unroll": 1 if unroll is None else unroll}
        return carry.finish(_scan(bar, counted, (first, init), None, options)[0][1])

    with _tidy_on_error(bar):
        return _with_promoted_numbers("filter_fori_loop", attempt, init_val)


@_cached_eagerly("batch_size", "progress")
def filter_map(
    f: Callable[[_X], _Y],
    xs: _X,
    *,
    batch_size: int | None = None,
    progress: bool | str = False,
) -> _Y:
    """As `jax.lax.map`, except that `xs` and the outputs of `f` may be any pytree;
    `progress` as in `filter_scan`. `xs` is split as by `filter_scan`; the arrays and
    numbers that `f` returns are stacked, and its other leaves come once.

    **Raises:** `jax.lax.map`'s exception types, with messages that begin:

    - `TypeError`: ``filter_map: `f` must be callable``, ``filter_map: `progress`
        cannot be combined with `batch_size` ``, ``filter_map: `batch_size` needs``.
    - `ValueError`: ``filter_map: `xs` holds no arrays``, ``filter_map: the array at
        `xs` path … is a scalar`` (an `IndexError` too), ``filter_map: the non-array
        part of `f`'s output``.

    **Example:**

    ```python
    xs = {"obs": jnp.ones((3, 4)), "unit": "m"}
    sums, unit = filter_map(lambda x: (jnp.sum(x["obs"]), x["unit"]), xs)
    print(sums, unit)  # [4. 4. 4.] m
    ```
    """
    _check_callable("filter_map", f=f)
    description = _progress_description("filter_map", progress)
    if batch_size is not None and description is not None:
        raise TypeError(
            "filter_map: `progress` cannot be combined with `batch_size`; drop one."
        )
    if batch_size is not None and not _MAP_TAKES_BATCH_SIZE:
        raise TypeError(
            "filter_map: `batch_size` needs a JAX 0.4.31 or newer; this is jax "
            f"{jax.__version__}. Upgrade JAX, or leave `batch_size` out."
        )
    options = {} if batch_size is None else {"batch_size": batch_size}
    inputs = _Split(xs, _is_jax_value)
    _check_leading_axes("filter_map", inputs)
    if not any(inputs.traced):
        raise ValueError(
            "filter_map: `xs` holds no arrays to map over; give it one."
            + _lax_says("filter_map", run=lambda: jax.lax.map(lambda x: x, xs))
        )
    outputs: list[_Split] = []

    @_named_after(f)
    def mapped(traced_x: Any) -> Any:
        outputs.append(_Split(f(inputs.rebuild(traced_x)), _outputs_traced))
        if len(outputs) > 1:  # The newest against the first, before JAX compares.
            pair = [outputs[0], outputs[-1]]
            _static_outputs_agree("filter_map", "`f`'s output", pair)
        return outputs[-1].traced_part()

    traced_xs = inputs.traced_part()
    sizes = {jnp.shape(leaf)[:1] for leaf in jtu.tree_leaves(traced_xs)}
    one_size = len(sizes) == 1 and () not in sizes  # Else `jax.lax.map` raises.
    bar = _make_bar(description, sizes.pop()[0]) if one_size else None
    if bar is None:
        ys = jax.lax.map(mapped, traced_xs, **options)
    else:
        with _tidy_on_error(bar):
            options = {"length": bar.total, "unroll": 1}
            _, ys = _scan(bar, lambda c, x: (c, mapped(x)), None, traced_xs, options)
    return outputs[0].rebuild(ys)


#
# Batches of pytrees: unstack_pytree, stack_pytree
#


def unstack_pytree(tree: _Tree, *, axis: int = 0) -> list[_Tree]:
    """Split a batched pytree into one pytree per index along `axis`.

    As `jnp.unstack` on every array leaf at once, except that it returns a list of
    pytrees, each with the non-array leaves. NumPy leaves split into NumPy views; JAX
    slices keep their leaf's dtype, weak type, placement and sharding. `axis` is static.

    **Raises:**

    - `TypeError` if `axis` is not an int.
    - `ValueError` if the array leaves differ in size along `axis`, if `axis` is out
        of range for a leaf, or if `tree` has no array leaves.

    **Example:**

    ```python
    steps = unstack_pytree({"obs": jnp.zeros((3, 2)), "done": jnp.array([0, 0, 1])})
    print(len(steps), steps[2]["done"])  # 3 1
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
        shown = ", ".join(map(_repr, leaves[:3])) + (", ..." if len(leaves) > 3 else "")
        raise ValueError(
            "unstack_pytree: `tree` has no array leaves to slice (its leaves are "
            f"[{shown}]). Pass a tree with at least one array."
        )
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{path}: {size}" for path, size in sizes.items())
        raise ValueError(
            f"unstack_pytree: the array leaves' sizes along `axis={axis}` differ "
            f"({listing}). Slice them to one size, or unstack the parts separately."
        )
    length = next(iter(sizes.values()))
    columns: dict[int, Sequence[Any]] = {}
    jax_groups: dict[Any, list[int]] = {}
    for position, leaf_axis in axes.items():
        leaf = leaves[position]
        if isinstance(leaf, np.ndarray):
            moved = np.moveaxis(leaf, leaf_axis, 0)
            # `moved[i, ...]` is a view even when it has no dimensions left.
            columns[position] = [moved[index, ...] for index in range(length)]
        elif isinstance(leaf, jax.core.Tracer):
            columns[position] = [
                jax.lax.index_in_dim(leaf, index, leaf_axis, keepdims=False)
                for index in range(length)
            ]
        else:  # Concrete: grouped by sharding and by commitment, as programs give it.
            group = (leaf.sharding, _is_committed(leaf))
            jax_groups.setdefault(group, []).append(position)
    for positions in jax_groups.values():
        group = [leaves[position] for position in positions]
        sliced = _slice_columns(group, tuple(axes[i] for i in positions), length)
        columns.update(zip(positions, sliced, strict=True))
    by_leaf = [columns.get(i) or [leaf] * length for i, leaf in enumerate(leaves)]
    return [treedef.unflatten(row) for row in zip(*by_leaf, strict=True)]


# Ski rental: concrete JAX leaves are sliced on the host (~40 µs a slice) until that
# time, for a set of shapes, reaches the time to compile a program that slices them
# (on XLA:CPU 50 ms + 15 ms a row + 1 ms an output), which is then compiled.
_UNSTACK_HOST_SECONDS_PER_SLICE = 40e-6
_UNSTACK_COMPILE_SECONDS = (0.05, 0.015, 0.001)
_UNSTACK_SIGNATURES_KEPT = 4096  # Sets of shapes whose host time is remembered.
_unstack_host_seconds: collections.OrderedDict[Any, float] = collections.OrderedDict()
_unstack_host_seconds_lock = threading.Lock()


def _slice_columns(
    group: list[jax.Array], axes: tuple[int, ...], length: int
) -> list[list[jax.Array]]:
    """`columns[j][i]`: slice `i` of `group[j]` along `axes[j]`."""
    if length == 0:
        return [[] for _ in group]
    # A typed key counts as the two uint32 words of a default key.
    sizes = [8 if _is_key_array(x) else x.dtype.itemsize for x in group]
    row_bytes = sum(x.size * n for x, n in zip(group, sizes, strict=True)) // length
    # Rows a call: 8 a leaf, up to 32 rows and 32 KiB.
    count = max(1, min(8 * len(group), 32, 32 * 1024 // max(row_bytes, 1), length))
    # Through NumPy, slices are what a program gives, but for weak types and keys.
    sharding = group[0].sharding  # The group's, as is its commitment.
    if (
        _host_transfers_allowed()
        and sharding.is_fully_addressable
        and isinstance(
            sharding, jax.sharding.SingleDeviceSharding | jax.sharding.NamedSharding
        )
        and not any(x.aval.weak_type or _is_key_array(x) for x in group)
    ):
        signature = (tuple((x.shape, x.dtype, x.sharding) for x in group), axes)
        fixed, per_row, per_output = _UNSTACK_COMPILE_SECONDS
        compile_seconds = fixed + count * (per_row + len(group) * per_output)
        with _unstack_host_seconds_lock:  # `inf` once compiled.
            spent = _unstack_host_seconds.pop(signature, 0.0)
            spent += length * len(group) * _UNSTACK_HOST_SECONDS_PER_SLICE
            compiled = spent >= compile_seconds
            _unstack_host_seconds[signature] = math.inf if compiled else spent
            while len(_unstack_host_seconds) > _UNSTACK_SIGNATURES_KEPT:
                _unstack_host_seconds.popitem(last=False)
        if not compiled:  # Placed as the program would place them.
            committed = _is_committed(group[0])
            columns = []
            for leaf, axis in zip(group, axes, strict=True):
                host = np.moveaxis(np.asarray(jax.device_get(leaf)), axis, 0)
                place = _respec(leaf.sharding, axis, []) if committed else None
                slices = [host[index, ...] for index in range(length)]
                columns.append(jax.device_put(slices, place))
            return columns
    # Whole along `axis`: explicit meshes refuse slices that live on some devices only.
    group = [
        jax.device_put(x, _respec(x.sharding, a, [None]))
        if isinstance(x.sharding, jax.sharding.NamedSharding)
        and a < len(x.sharding.spec)
        and x.sharding.spec[a] is not None
        else x
        for x, a in zip(group, axes, strict=True)
    ]
    columns, done = [[] for _ in group], 0
    for start in _chunk_starts(length, count):
        chunk = _index_rows(group, start, axes=axes, count=count)
        for column, pieces in zip(columns, chunk, strict=True):
            column.extend(pieces[done - start :])
        done = start + count
    return columns


def _respec(sharding: Any, axis: int, part: list[Any]) -> Any:
    """`sharding`, with `part` in the place of `axis` in its spec if it is named."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = list(sharding.spec)
    spec_object = jax.sharding.PartitionSpec(*spec[:axis], *part, *spec[axis + 1 :])
    kind = sharding.memory_kind
    return jax.sharding.NamedSharding(sharding.mesh, spec_object, memory_kind=kind)


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
    """Join pytrees of one structure into one, stacking their array leaves on `axis`.

    As `jnp.stack` on every array leaf at once, except that it takes a list or tuple of
    pytrees and keeps the non-array leaves, which must be equal, of `trees[0]`. A leaf
    that is NumPy in every tree stays NumPy. `axis` is static.

    **Raises:**

    - `TypeError` if `trees` is not a list or tuple, or `axis` is not an int.
    - `ValueError` if `trees` is empty, if `axis` is out of range, or if a tree
        differs from `trees[0]` in structure, shape, dtype or a non-array leaf.

    **Example:**

    ```python
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
        raise ValueError("stack_pytree: `trees` is empty; pass at least one pytree.")
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
        if all(isinstance(leaf, np.ndarray | np.generic) for leaf in column):
            stacked[position] = np.stack(column, axis=axis)
        elif len(column) <= _STACK_CHUNK or any(
            isinstance(x, jax.core.Tracer) for x in column
        ):
            stacked[position] = jnp.stack(column, axis=axis)
        else:  # Filled in chunks of a fixed size: two small programs serve any length.
            at, out = axis % (column[0].ndim + 1), None
            for start in _chunk_starts(len(column), _STACK_CHUNK):
                chunk = column[start : start + _STACK_CHUNK]
                out = _stack_chunk_into(out, start, *chunk, axis=at, length=len(column))
            stacked[position] = out
    return treedef.unflatten(stacked)


def _stack_error(index: int, path: str, message: str) -> str:
    return (
        f"stack_pytree: trees[{index}] differs from trees[0] {_where(path)}: it "
        f"{message}. Match its structure, array shapes and dtypes, and static leaves."
    )


_STACK_CHUNK = 64


@functools.partial(jax.jit, static_argnames=("axis", "length"), donate_argnums=0)
def _stack_chunk_into(
    out: jax.Array | None, start: int, *chunk: jax.Array, axis: int, length: int
) -> jax.Array:
    """`out` (made for the first chunk) with `chunk` stacked into it at `start`."""
    stacked = jnp.stack(chunk, axis=axis)
    if out is None:  # A row broadcast (not `jnp.zeros`) keeps the other axes' sharding.
        shape = [*stacked.shape[:axis], length, *stacked.shape[axis + 1 :]]
        row = jax.lax.index_in_dim(stacked, 0, axis, keepdims=True)
        out = jnp.broadcast_to(row, shape)
    weak = out.aval.weak_type and stacked.aval.weak_type  # As `jnp.stack`'s result.
    out = jax.lax.dynamic_update_slice_in_dim(out, stacked, start, axis)
    return _weak_array(out) if weak else out  # (The update drops the weak type.)


def _chunk_starts(length: int, size: int) -> list[int]:
    """Starts of chunks of `size <= length` that cover `range(length)`, all full."""
    return [min(start, length - size) for start in range(0, length, size)]


def _check_axis_is_int(caller: str, axis: Any) -> None:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"{caller}: `axis` must be an int; got {_describe_leaf(axis)}.")


def _leaf_axis(function: str, axis: int, leaf: Any, path: str, ndim: int) -> int:
    """`axis` made non-negative for a result of `ndim` dimensions, or a ValueError."""
    if -ndim <= axis < ndim:
        return axis % ndim
    allowed = f"axes run from {-ndim} to {ndim - 1}" if ndim else "it has no axes"
    raise ValueError(
        f"{function}: `axis={axis}` is out of range for the array {_where(path)} "
        f"of shape {tuple(leaf.shape)} ({allowed}). Pick an axis all arrays have."
    )


#
# Host callbacks: callback_wrapper and friends, print_callback
#

# Functions whose body never runs: (tests of the function and of its result, names).
_BODY_NEVER_RUNS = (
    (inspect.isasyncgenfunction, inspect.isasyncgen, "an async generator", "iterate"),
    (inspect.iscoroutinefunction, inspect.isawaitable, "an `async def`", "await"),
    (inspect.isgeneratorfunction, inspect.isgenerator, "a generator", "iterate"),
)
_NEVER_RUNS_FIX = "Wrap instead a plain function that runs it to completion."


def _callable_name(func: Callable[..., Any]) -> str:
    func = getattr(func, "func", func)  # `functools.partial`: name what it wraps.
    name = getattr(func, "__name__", None)
    return name if isinstance(name, str) else type(func).__name__


def _keeping_subnormals(body: Callable[..., None], *args: Any) -> None:
    """`body(*args)` keeping the subnormal floats that XLA's CPU runtime flushes."""
    if _FENV is None or sys.float_info.min / 2 != 0.0:
        return body(*args)
    get_environment, set_environment = _FENV
    saved = ctypes.create_string_buffer(256)  # Larger than any `fenv_t`.
    get_environment(saved)
    set_environment(ctypes.c_void_p(-1))  # FE_DFL_ENV
    try:
        body(*args)
    finally:
        set_environment(saved)


def _host_caller(
    caller: str,
    fix: str,
    func: Callable[..., Any],
    ordered: bool | None,
    options: dict[str, bool],
    conversions: tuple[Callable[[Any, Any], Any], Callable[[Any], Any]],
) -> Callable[..., None]:
    """`func` for traced code to call; `ordered=None` orders calls on one device."""
    to_host, host_side = conversions
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # Python cannot tell (some builtins): unchecked.
        signature = None

    def call(*args: Any, **kwargs: Any) -> None:
        if signature is not None:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(
                    f"{caller}: the arguments do not fit the signature "
                    f"{_callable_name(func)}{signature}: {err}. {fix}"
                ) from err
        leaves, treedef = jtu.tree_flatten((args, kwargs))
        positions = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
        on_the_host = [
            i for i, x in enumerate(leaves) if isinstance(x, np.ndarray | np.generic)
        ]
        # No JAX array is kept (a tracer must not outlive its trace); a staged call
        # keeps NumPy arrays as they are now, as a traced program keeps its constants.
        template = [None if isinstance(x, jax.Array) else x for x in leaves]
        if not _trace_state_clean():
            template = [x.copy() if isinstance(x, np.ndarray) else x for x in template]
        arrays = [leaves[i] for i in positions]
        in_order = bool(ordered)
        if ordered is not False:  # Devices that each traced argument spans, if known.
            spans = {
                i: _traced_mesh_size(leaves[i])
                for i in positions
                if isinstance(leaves[i], jax.core.Tracer)
            }
            if ordered is None:  # `print_callback`: in order where JAX allows it.
                in_order = jax.device_count() == 1 or (
                    bool(spans)
                    and all(n is not None and n <= 1 for n in spans.values())
                )
            wide = [i for i, n in spans.items() if ordered and n is not None and n > 1]
            if wide:  # Refused now, naming the argument, as JAX would when compiling.
                path = jtu.tree_flatten_with_path((args, kwargs))[0][wide[0]][0]
                kind = "positional" if path[0] == jtu.SequenceKey(0) else "keyword"
                raise ValueError(
                    f"{caller}: made with `ordered=True`, and called inside `jit` "
                    f"with the {kind} argument at path {jtu.keystr(path[1:])}, an "
                    f"array of shape {tuple(leaves[wide[0]].shape)} that spans "
                    f"{spans[wide[0]]} devices; JAX orders callbacks on one device "
                    "only. Make the wrapper with `ordered=False`, or use one device."
                )
        # Typed PRNG keys cross to the host as their raw data, wrapped again there.
        impls = [jax.random.key_impl(x) if _is_key_array(x) else None for x in arrays]
        sent = [jax.random.key_data(x) if _is_key_array(x) else x for x in arrays]

        def call_func(*host_arrays: Any) -> None:
            row: list[Any] = list(template)
            for i, array, impl in zip(positions, host_arrays, impls, strict=True):
                row[i] = to_host(array, impl)
            for i in on_the_host:  # Copied again: `func` may change what it is given.
                copy = isinstance(row[i], np.ndarray)
                row[i] = host_side(row[i].copy() if copy else row[i])
            host_args, host_kwargs = treedef.unflatten(row)
            # Open bars' lines are blanked: what `func` prints gets lines of its own.
            with _progress_lock:
                for bar in _open_bars:
                    if bar.width:
                        _write_stderr("\r" + " " * bar.width + "\r")
                        bar.width, bar.last_draw = 0, -math.inf
            returned = func(*host_args, **host_kwargs)
            for _, is_kind, _, verb in _BODY_NEVER_RUNS:
                if is_kind(returned):  # Known only now: refused as when wrapping.
                    getattr(returned, "close", lambda: None)()  # Unwarned.
                    raise TypeError(
                        f"{caller}: `func` returned a {type(returned).__name__!r} "
                        f"object, which nothing here would {verb}, so its body never "
                        f"ran. {_NEVER_RUNS_FIX}"
                    )

        # The conversions too keep subnormals: `.tolist()` would flush them.
        on_host = functools.partial(_keeping_subnormals, call_func)
        jax.debug.callback(on_host, *sent, **options, ordered=in_order)

    return call


def _wrap_for_host(
    function: str, func: Callable[..., Any], ordered: bool, partitioned: bool
) -> Callable[..., None]:
    _check_callable(function, func=func)
    inner = func
    while isinstance(inner, functools.partial | eqx.Partial):
        inner = inner.func
    method = type(inner).__call__  # For an object with an `async def __call__`.
    for is_kind, _, kind, verb in _BODY_NEVER_RUNS:
        if is_kind(inner) or (not inspect.isroutine(inner) and is_kind(method)):
            creates = "a coroutine" if verb == "await" else kind
            raise TypeError(
                f"{function}: `func` ({_callable_name(inner)}) is {kind} function. "
                f"Calling it only creates {creates}, which nothing here would {verb}, "
                f"so its body would never run. {_NEVER_RUNS_FIX}"
            )
    for name, flag in (("ordered", ordered), ("partitioned", partitioned)):
        if not isinstance(flag, bool):
            raise TypeError(
                f"{function}: `{name}` must be a bool; got {_describe_leaf(flag)}."
            )
    if partitioned and not _DEBUG_CALLBACK_TAKES_PARTITIONED:
        raise ValueError(
            f"{function}: `partitioned=True` needs a newer jax than the installed "
            f"{jax.__version__}. Upgrade jax, or pass `partitioned=False`."
        )
    options = {"partitioned": partitioned} if _DEBUG_CALLBACK_TAKES_PARTITIONED else {}
    name = _callable_name(func)
    call = _host_caller(
        f"{name} (made by {function})",
        f"Pass the arguments that `{name}` itself takes.",
        func, ordered, options, _CONVERSIONS[function],
    )  # fmt: skip
    return functools.wraps(func)(call)


def _as_jax(array: Any, key_impl: Any) -> jax.Array:
    array = jnp.asarray(array)
    return array if key_impl is None else jax.random.wrap_key_data(array, impl=key_impl)


# How each wrapper hands `func` an array from the device, and a NumPy value.
_CONVERSIONS: dict[str, tuple[Callable[[Any, Any], Any], Callable[[Any], Any]]] = {
    "callback_wrapper": (_as_jax, lambda value: value),
    "callback_with_numpy_wrapper": (lambda array, _: np.asarray(array), np.asarray),
    "callback_with_list_wrapper": (
        lambda array, _: np.asarray(array).tolist(),
        lambda value: value.tolist(),
    ),
}


def callback_wrapper(
    func: Callable[_Params, Any], ordered: bool = False, partitioned: bool = False
) -> Callable[_Params, None]:
    """Wrap the host function `func` so that traced code can call it.

    As `jax.debug.callback(func, ...)`, except that the wrapper takes `func`'s own
    arguments, checked against its signature. JAX arrays reach `func` as `jax.Array`s
    (typed keys still typed), NumPy arrays as copies taken when the call is traced, and
    other leaves as passed. On Linux `func` sees subnormal floats, which XLA's CPU
    runtime flushes. What `func` prints lands above an open progress bar.

    **Raises:**

    - `TypeError` if `func` is not callable or makes a generator or coroutine, if
        `ordered` or `partitioned` is not a bool, or for arguments `func` refuses.
    - `ValueError` for `partitioned=True` where the installed JAX does not take it, and
        under `jit` for an ordered call with an argument on several devices.

    **Example:**

    ```python
    log = callback_wrapper(lambda tag, x: print(tag, x))
    jax.jit(lambda x: log("x", x * 2))(jnp.arange(3.0))
    jax.effects_barrier()  # x [0. 2. 4.]
    ```
    """
    return _wrap_for_host("callback_wrapper", func, ordered, partitioned)


def callback_with_numpy_wrapper(
    func: Callable[..., Any], ordered: bool = False, partitioned: bool = False
) -> Callable[..., None]:
    """As `callback_wrapper`, except that array arguments reach `func` as NumPy arrays
    (a typed PRNG key as its key data).

    **Example:**

    ```python
    log = callback_with_numpy_wrapper(lambda loss: print(type(loss).__name__, loss))
    log(jnp.sum(jnp.ones(2)))  # ndarray 2.0
    ```
    """
    return _wrap_for_host("callback_with_numpy_wrapper", func, ordered, partitioned)


def callback_with_list_wrapper(
    func: Callable[..., Any], ordered: bool = False, partitioned: bool = False
) -> Callable[..., None]:
    """As `callback_wrapper`, except that array arguments reach `func` as
    `.tolist()` gives them (a typed PRNG key as its key data).

    **Example:**

    ```python
    log = callback_with_list_wrapper(lambda step, x: print(step, x))
    log(0, jnp.arange(3.0))  # 0 [0.0, 1.0, 2.0]
    ```
    """
    return _wrap_for_host("callback_with_list_wrapper", func, ordered, partitioned)


_print_on_host = _host_caller(
    "print_callback",
    "Pass what `print` takes: positional arguments and `sep`, `end`, `file`, `flush`.",
    print, None, {}, _CONVERSIONS["callback_with_list_wrapper"],
)  # fmt: skip


def print_callback(*args: Any, **kwargs: Any) -> None:
    """`print`, callable from traced code: inside `jax.jit`, `filter_scan` and friends.

    As `jax.debug.print`, except that it takes the arguments of `print` rather than a
    format string, and prints arrays as their `.tolist()`. Calls print in program order
    unless they may span several devices, and above an open progress bar.

    **Raises:** `TypeError` if `print` would not take the arguments.

    **Example:**

    ```python
    jax.jit(lambda x: print_callback("x =", x, "sum =", x.sum()))(jnp.arange(3.0))
    jax.effects_barrier()  # x = [0.0, 1.0, 2.0] sum = 3.0
    ```
    """
    _print_on_host(*args, **kwargs)


#
# Progress bars: the `progress=` option of the loops
#

_PROGRESS_MAX_CALLBACKS = 200
_PROGRESS_MIN_INTERVAL = 0.1  # Seconds between two redraws of a line.
_PROGRESS_WHILE_STRIDE = 2048  # Steps between two reports of a while loop.
_PROGRESS_MAX_COUNT = 2**31 - 1  # A while loop's count stops there (int32's largest).
_progress_tracing = threading.local()  # `.depth`: loops with a bar being traced.
_progress_lock = threading.RLock()
_open_bars: "set[_ProgressBar]" = set()


def _progress_description(function: str, progress: Any) -> str | None:
    """The bar's description (`""` for none), or `None` for no bar."""
    if isinstance(progress, bool):
        return "" if progress else None
    if isinstance(progress, str):
        return progress
    raise TypeError(
        f"{function}: `progress` must be a bool or a string (the bar's description); "
        f"got {_describe_leaf(progress)}."
    )


def _progress_stride(total: int) -> int:
    """Report every `k`-th step: 5 times, once more per 2000 steps, up to the bound."""
    reports = min(max(min(total, 5), total // 2000), _PROGRESS_MAX_CALLBACKS - 1)
    return max(1, -(-total // reports))


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


@dataclasses.dataclass(eq=False)
class _ProgressBar:
    """One loop's bar on the host, reused by each run."""

    description: str
    total: int | None  # `None`: a while loop's.
    count: int = 0
    start: float = 0.0
    last_draw: float = -math.inf
    width: int = 0  # Of the last line: a shorter one must blank it out.
    reports: int = 0  # Of the current run, so far.
    started: bool = False  # Whether the current run's first report came.

    def draw(self, now: float, end: str) -> None:
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else math.nan
        count, times = f"{self.count} it", _format_seconds(elapsed)  # With no total.
        if self.total is not None:
            left = (self.total - self.count) / rate if rate > 0 else math.nan
            count = f"{100 * self.count // self.total:3d}% {self.count}/{self.total}"
            times += f"<{_format_seconds(left)}"
        label = f"{self.description}: " if self.description else ""
        rate_text = f"{rate:.2f} it/s" if math.isfinite(rate) else "? it/s"
        text = f"{label}{count} [{times}, {rate_text}]"
        _write_stderr("\r" + text.ljust(self.width) + end)
        self.width, self.last_draw = len(text), now


def _write_stderr(text: str) -> None:
    """A bar's write, after what was printed; a failing stream is skipped."""
    for stream, part in ((sys.stdout, ""), (sys.stderr, text)):
        with contextlib.suppress(Exception):
            stream.write(part)
            stream.flush()


@atexit.register
def _end_open_lines() -> None:
    """End the line of a bar left part-way (its loop stopped on an error)."""
    with _progress_lock:
        if _open_bars:
            _write_stderr("\n")
        _open_bars.clear()


def _progress_update(
    bar: _ProgressBar, count: int | None, restart: bool = False
) -> None:
    """On the host: `bar`'s loop reached step `count` (`None`: its end)."""
    now = time.monotonic()
    with _progress_lock:
        if bar not in _open_bars:
            _end_open_lines()
            _open_bars.add(bar)
            bar.width, restart = 0, True
        if restart:  # Over the line of a run that stopped on an error, if any.
            bar.start, bar.count, bar.last_draw = now, 0, -math.inf
        bar.count = max(bar.count, count or 0)  # Counts never go backwards.
        if count is None or bar.count == bar.total:
            bar.draw(now, "\n")
            _open_bars.discard(bar)
        elif now - bar.last_draw >= _PROGRESS_MIN_INTERVAL:
            bar.draw(now, "")


def _chunk_size(length: int) -> int | None:
    """Steps per chunk: a divisor of `length` near its stride, or `None`."""
    target = _progress_stride(length)
    smallest = max(-(-length // (_PROGRESS_MAX_CALLBACKS - 1)), target // 2)
    near = [size for size in _divisors(length) if smallest <= size <= 2 * target]
    return min(near, key=lambda size: (abs(size - target), size), default=None)


@functools.lru_cache(maxsize=256)
def _divisors(number: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(number) + 1) if number % d == 0]
    return small + [number // d for d in reversed(small) if d * d != number]


def _progress_callbacks(
    bar: _ProgressBar, stride: int, reports: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A loop's host calls: first, then every `stride` steps and last. Unordered and
    without operands, they count as they come; a second `first` starts a new run."""

    def report(first: bool) -> None:
        with _progress_lock:
            if first and bar.started:
                bar.reports = 0
            bar.started = bar.started or first
            index = bar.reports
            bar.reports += 1
            if bar.reports == reports:
                bar.reports, bar.started = 0, False
        count = bar.total if index == reports - 1 else index * stride
        _progress_update(bar, count, restart=index == 0)

    return functools.partial(report, True), functools.partial(report, False)


@contextlib.contextmanager
def _progress_body() -> Iterator[None]:
    """While a loop body with a bar is traced: loops inside it draw no bar."""
    _progress_tracing.depth = getattr(_progress_tracing, "depth", 0) + 1
    try:
        yield
    finally:
        _progress_tracing.depth -= 1


def _make_bar(description: str | None, total: int | None) -> _ProgressBar | None:
    if description is None or total == 0 or getattr(_progress_tracing, "depth", 0):
        return None
    return _ProgressBar(description, total)


@contextlib.contextmanager
def _tidy_on_error(bar: _ProgressBar | None) -> Iterator[None]:
    """End a part-drawn line when the loop raises (eagerly, a host error in a step)."""
    try:
        yield
    except BaseException:
        if bar is not None:
            with contextlib.suppress(Exception):
                jax.effects_barrier()
            _end_open_lines()
        raise


#
# Checkpoints: Serializable
#

# A checkpoint is a safetensors file with all else in `__metadata__` (FORMAT.md).
_FORMAT = "lerax_utils"
_FORMAT_VERSION = 3
_LENGTH = struct.Struct("<Q")
_MAX_HEADER_BYTES = 64 * 1024 * 1024
# JSON lists and objects in a part of a header, to bound parsing: ~6 per array leaf.
_MAX_CONTAINERS = 1 << 21
_MAX_DIMENSIONS = 64  # As NumPy.
_CRC_SLOT = b'"metadata_crc32":"'
_ZERO_CRC = "00000000"
_V1_MAGIC = b"LRXCKPT\x00"  # Files of format 1 (lerax_utils 0.1.0) start so.
_NUMPY_MAGIC = b"\x93NUMPY"  # Plain `eqx.tree_serialise_leaves` files start so.
_SUFFIX = ".eqx"
# Dtypes that safetensors names; every other dtype is stored as `U8` bytes.
_SAFETENSORS_DTYPES = dict(
    cast(list[str], pair.split(":"))
    for pair in (
        "bool:BOOL uint8:U8 int8:I8 uint16:U16 int16:I16 float16:F16 bfloat16:BF16 "
        "uint32:U32 int32:I32 float32:F32 uint64:U64 int64:I64 float64:F64 "
        "float8_e5m2:F8_E5M2 float8_e4m3fn:F8_E4M3"
    ).split()
)
_OTHER_DTYPES = tuple(
    "complex64 complex128 int4 uint4 int2 uint2 float8_e4m3fnuz float8_e5m2fnuz "
    "float8_e4m3b11fnuz float8_e3m4 float8_e4m3 float8_e8m0fnu float4_e2m1fn".split()
)
_NUMPY_ONLY_DTYPE = re.compile(
    r"[|<>][SU][1-9][0-9]{0,5}|[<>][mM]8\[(Y|M|W|D|h|m|s|ms|us|ns|ps|fs|as)\]"
    r"|>([iuf][248]|c(8|16))"
)
_KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# Dtypes narrower than their byte: the unused high bits of each byte must be zero.
_SUB_BYTE_DTYPES = ("int4", "uint4", "int2", "uint2", "float4_e2m1fn")
_MAX_INT_DIGITS = 4300  # Python's default limit on converting an int to text.
_Kinds = dict[str, tuple[str, dict[str, Any]]]  # A traced leaf's kind, by its path.


@dataclasses.dataclass(frozen=True, slots=True)
class _Arguments:
    """A recorded constructor call, equal to every other: it never changes a treedef."""

    recording: dict[str, Any] | None = dataclasses.field(compare=False, repr=False)


_NOT_RECORDED = _Arguments(None)
_ARGUMENTS_FIELD = "_lerax_arguments"
_PENDING = "_lerax_pending_arguments"


class Serializable(eqx.Module):
    """An `eqx.Module` that saves itself, and loads back from the path alone.

    `serialize` saves as `save_pytree` does, with the constructor's arguments (arrays
    as shapes and dtypes), from which `deserialize` rebuilds the skeleton. The
    recording never changes a model's tree structure, equality or `jit` cache entry.

    ```python
    class Policy(Serializable):
        mlp: eqx.nn.MLP

        def __init__(self, size, *, key):
            self.mlp = eqx.nn.MLP(size, 2, 32, 2, key=key)

    Policy(4, key=jax.random.key(0)).serialize("checkpoints/run.1")  # run.1.eqx
    policy = Policy.deserialize("checkpoints/run.1")  # Built as Policy(4, key=...).
    ```
    """

    _lerax_arguments: _Arguments = eqx.field(
        static=True, default=_NOT_RECORDED, init=False, repr=False
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # Only constructor calls have arguments: not unflattening, copying, unpickling.
        self = super().__new__(cls)
        if args or kwargs:
            recorded = {
                "args": [_record(value) for value in args],
                "kwargs": [[name, _record(value)] for name, value in kwargs.items()],
            }
            object.__setattr__(self, _PENDING, recorded)
        return self

    def __check_init__(self) -> None:
        # Equinox calls this once `__init__` has finished and every check passed.
        pending = vars(self).pop(_PENDING, None) or {"args": [], "kwargs": []}
        recording = {"class": type(self).__qualname__, **pending}
        object.__setattr__(self, _ARGUMENTS_FIELD, _Arguments(recording))

    def serialize(self, path: str | os.PathLike[str], no_suffix: bool = False) -> None:
        """Save this model to `path`, as `save_pytree` saves any pytree."""
        _save(path, self, no_suffix, "Serializable.serialize")

    @classmethod
    def deserialize(
        cls: type[_Model], path: str | os.PathLike[str], /, *args: Any, **kwargs: Any
    ) -> _Model:
        """Load a model saved by `serialize` (or by `save_pytree`).

        As `eqx.tree_deserialise_leaves`, except that the skeleton is
        `eqx.filter_eval_shape(cls, *args, **kwargs)` (NumPy arguments passed as
        copies and NumPy leaves kept), and must match the file's structure, static
        values, shapes and dtypes. Equinox's own files load too; nothing is unpickled.
        Given no arguments, it calls the constructor with the file's recorded values:
        for a file you do not trust, pass the arguments.

        **Raises:**

        - `FileNotFoundError` if neither `path` nor `path.eqx` exists.
        - `TypeError` if the constructor needs concrete values, or, given no
            arguments, the file could not record one (a function, say).
        - `ValueError` naming the file, if it is not a checkpoint of this class and
            format version, is damaged, or does not match the skeleton.
        """
        build = functools.partial(_skeleton, cls, args, kwargs)
        return _load(path, "Serializable.deserialize", build)

    @classmethod
    def deserialize_sharded(
        cls: type[_Model],
        path: str | os.PathLike[str],
        sharding: jax.sharding.Sharding | Callable[[Any], Any],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> _Model:
        """As `deserialize`, except that each process reads only its own devices'
        shards, straight into them: a model is never whole on one device or host.

        **Arguments:**

        - `sharding`: a `jax.sharding.Sharding` for every JAX array, or a callable
            from the skeleton to a pytree of shardings (or None) at its arrays
            (NumPy arrays in it load unsharded).

        **Raises:** as `deserialize`; `TypeError` or `ValueError` if `sharding` does
        not fit the skeleton.
        """
        build = functools.partial(_skeleton, cls, args, kwargs)
        return _load(
            path,
            "Serializable.deserialize",
            lambda layout, source: _with_shardings(build(layout, source), sharding),
        )


def save_pytree(
    path: str | os.PathLike[str], tree: Any, *, no_suffix: bool = False
) -> None:
    """Save any pytree to `path`, atomically, in a checked safetensors file.

    As `eqx.tree_serialise_leaves`, except that arrays and Python numbers are saved
    bit for bit with checksums, other leaves are described to be compared on load,
    and `path` never holds a torn file. `.eqx` is appended unless `no_suffix` or
    the name ends so; folders are created. Inside `jit`, the file is written when
    the computation runs (see `jax.effects_barrier`); under `grad`, the values are
    saved. Arrays that span processes are saved by calling it in every process.

    **Raises:**

    - `TypeError` if `path` is not a str or `os.PathLike`, `no_suffix` not a bool,
        or a leaf could not load exactly (a masked array, say).
    - `ValueError` if `path` is empty or names a folder or a FIFO, two array leaves
        have the same path, or the tree is batched by `vmap`; `TimeoutError` if a
        process of the save does not save in time.

    ```python
    save_pytree("checkpoints/state", ({"w": jnp.ones(3)}, 100))  # state.eqx
    state, step = load_pytree("checkpoints/state", ({"w": jnp.zeros(3)}, 0))
    ```
    """
    _save(path, tree, no_suffix, "save_pytree")


def load_pytree(path: str | os.PathLike[str], like: _Tree) -> _Tree:
    """Load a pytree saved by `save_pytree` (or by `Serializable.serialize`).

    As `Serializable.deserialize`, except that the skeleton is `like`: its array
    values are ignored (shapes do) and its multi-device shardings kept.
    """
    return _load(path, "load_pytree", lambda *_: _like_skeleton(like))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The main thread without garbage collection, which many small objects slow."""
    with contextlib.ExitStack() as restore:
        if gc.isenabled() and threading.current_thread() is threading.main_thread():
            gc.disable()
            restore.callback(gc.enable)
        yield


def _saving(function: str) -> tuple[str, str]:
    """How the messages of `function` name the call that saves, and what it saves."""
    if function.startswith("Serializable."):
        return "serialize", "model"
    return "save_pytree", "tree"


@_gc_paused()
def _save(path: Any, tree: Any, no_suffix: Any, function: str) -> None:
    try:
        target = _checkpoint_path(function, path, no_suffix)
        if target.is_symlink():  # Written through: the link stays a link.
            target = pathlib.Path(os.path.realpath(target))
        try:
            mode = os.stat(target).st_mode
        except OSError:  # None there yet (or a dangling link): the save creates it.
            mode = stat.S_IFREG
        if stat.S_ISDIR(mode):
            raise _names_a_folder(function, target)
        if not stat.S_ISREG(mode):
            raise ValueError(
                f"{function}: `path` '{target}' exists and is not a regular file (a "
                "FIFO, socket or device). Pass the name of a new or regular file."
            )
    except Exception as err:
        _fail_across_processes(err, tree, function)
        raise
    # Eagerly (no tracer, and no trace around), the file is written now.
    if not isinstance(jnp.zeros((), jnp.uint8), jax.core.Tracer) and not any(
        isinstance(leaf, jax.core.Tracer) for leaf in jtu.tree_leaves(tree)
    ):
        return _write_checkpoint(tree, target, function, {})
    # In a trace, traced leaves go to the host (keys as key data); others stay here.
    flat, treedef = jtu.tree_flatten_with_path(tree)
    leaves = [(_keystr(key_path), leaf) for key_path, leaf in flat]
    _check_saveable(leaves, function)  # Refuse at trace time, not in the callback.
    traced = {i: x for i, (_, x) in enumerate(leaves) if isinstance(x, jax.core.Tracer)}
    kinds = {leaves[index][0]: _jax_kind(leaf) for index, leaf in traced.items()}
    template = [None if i in traced else leaf for i, (_, leaf) in enumerate(leaves)]
    operands = [  # Saved, not differentiated.
        jax.lax.stop_gradient(jax.random.key_data(x) if _is_key_array(x) else x)
        for x in traced.values()
    ]

    def write(*arrays: Any) -> None:
        host = list(template)
        for index, array in zip(traced, arrays, strict=True):
            host[index] = np.asarray(array)
        _write_checkpoint(treedef.unflatten(host), target, function, kinds)

    try:
        io_callback(write, None, *operands, ordered=True)
    except ValueError as err:
        if not _is_vmap_refusal(err):
            raise
        save_call, what = _saving(function)
        raise ValueError(
            f"{function}: the {what} is batched by `vmap`, so one path cannot hold "
            f"it. Call `{save_call}` outside the vmap, on the stacked {what}."
        ) from err


def _checkpoint_path(function: str, path: Any, no_suffix: Any) -> pathlib.Path:
    if not isinstance(path, str | os.PathLike) or isinstance(os.fspath(path), bytes):
        raise TypeError(
            f"{function}: `path` must be a str or os.PathLike; got "
            f"{_describe_leaf(path)}."
        )
    if not isinstance(no_suffix, bool):
        raise TypeError(
            f"{function}: `no_suffix` must be a bool; got {_describe_leaf(no_suffix)}."
        )
    text = os.fspath(path)
    if not text:
        raise ValueError(
            f"{function}: `path` is empty. Pass a file name, such as 'checkpoints/run'."
        )
    if os.path.basename(text) in ("", ".", "..") or text.endswith(("/", os.sep)):
        raise _names_a_folder(function, text)
    return pathlib.Path(text + ("" if no_suffix or text.endswith(_SUFFIX) else _SUFFIX))


def _names_a_folder(function: str, path: str | pathlib.Path) -> ValueError:
    return ValueError(
        f"{function}: `path` '{path}' names a folder, not a file. "
        f"Pass a file name inside it, such as '{pathlib.Path(path) / 'model'}'."
    )


@dataclasses.dataclass(frozen=True)
class _Source:  # A checkpoint being read, and the function the user called to read it.
    path: str
    function: str

    def error(self, problem: str, kind: type[Exception] = ValueError) -> Exception:
        return kind(f"{self.function}: the file '{self.path}' {problem}.")


@_gc_paused()
def _load(
    path: Any, function: str, build: Callable[["_Layout | None", _Source], Any]
) -> Any:
    """Read a checkpoint into the skeleton that `build` makes from its header."""
    exact = _checkpoint_path(function, path, no_suffix=True)
    suffixed = _checkpoint_path(function, path, no_suffix=False)
    found = exact if exact.is_file() else suffixed
    if not found.is_file():
        tried = f"'{exact}'" if exact == suffixed else f"'{exact}' or '{suffixed}'"
        raise FileNotFoundError(
            f"{function}: no checkpoint at {tried}. Check the path given "
            f"to `{_saving(function)[0]}`."
        )
    source = _Source(str(found), function)
    with open(found, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        layout, skeleton = _read_header(file, source, size, build)
        if layout is None:  # A plain `eqx.tree_serialise_leaves` file.
            file.seek(0)
            try:
                model = eqx.tree_deserialise_leaves(file, skeleton)
            except Exception as err:
                problem = f"could not be read as a plain Equinox file: {err}"
                raise source.error(problem) from err
            if file.tell() != size:
                raise source.error(
                    f"has {size - file.tell()} trailing bytes after its Equinox data"
                )

            def place(leaf: Any, like: Any) -> Any:  # On the sharding `like` asks for.
                sharding = _leaf_sharding(like)
                kept = sharding is None or not isinstance(leaf, jax.Array)
                return leaf if kept else jax.device_put(leaf, sharding)

            return jtu.tree_map(place, model, skeleton)
        leaves, treedef = jtu.tree_flatten(skeleton)
        with _explicit_puts():  # In jax 0.4.26, as `jax.device_put`'s were.
            values = iter(_read_leaves(file, layout, source))
        return treedef.unflatten(
            [next(values) if _is_saved_leaf(leaf) else leaf for leaf in leaves]
        )


def _skeleton(
    cls: type, args: Any, kwargs: Any, layout: "_Layout | None", source: _Source
) -> Any:
    """`eqx.filter_eval_shape(cls, *args, **kwargs)`, or with the file's arguments."""
    name, recorded = cls.__qualname__, layout.arguments if layout else {}
    from_file = not args and not kwargs
    recorded_here = from_file and "" in recorded
    if layout is not None:  # A recording holds an array's shape, not its kind.
        layout.kinds_known = not from_file
    if from_file:
        args, kwargs = _recorded_call(cls, recorded.get(""), source, layout)
    dynamic, static = eqx.partition(  # NumPy values stay concrete: `int(n)` works.
        (args, kwargs), lambda x: isinstance(x, jax.Array | jax.ShapeDtypeStruct)
    )
    static = jtu.tree_map(  # The caller's own arrays are never changed.
        lambda x: x.copy() if isinstance(x, np.ndarray) else x, static
    )
    kept = []

    def without_values(x: Any) -> Any:  # A NumPy array that takes no memory.
        is_numpy = isinstance(x, np.ndarray)
        return np.broadcast_to(np.zeros((), x.dtype), x.shape) if is_numpy else x

    def build(dynamic: Any) -> Any:
        call_args, call_kwargs = eqx.combine(dynamic, static)
        model = cls(*call_args, **call_kwargs)
        traced, concrete = eqx.partition(model, lambda x: isinstance(x, jax.Array))
        kept.append(jtu.tree_map(without_values, concrete))
        return traced

    try:
        shapes = jax.eval_shape(build, dynamic)
    except _TRACING_ERRORS as err:
        raise TypeError(
            f"Serializable.deserialize: could not build a skeleton of {name}: its "
            "constructor needs a concrete value under `eqx.filter_eval_shape` "
            f"({type(err).__name__}). Keep JAX values as JAX arrays in it (no "
            "`np.asarray`, `float()` or `if` on them)."
        ) from err
    except Exception as err:
        if not recorded_here and not (from_file and isinstance(err, TypeError)):
            raise
        problem = (
            f"records constructor arguments with which `{name}` failed to build "
            f"({type(err).__name__}: {err})"
            if recorded_here
            else f"records no constructor arguments, and `{name}()` failed ({err})"
        )
        raise source.error(
            f"{problem}. Pass the constructor arguments: "
            f"`{name}.deserialize(path, *args, **kwargs)`",
            TypeError,
        ) from err
    skeleton = eqx.combine(shapes, kept[0])
    if not recorded_here or layout is None:
        return skeleton
    # A Python number that the file holds as a 0-d array is one in the skeleton too.
    raw = {str(e.get("path")): e for e in layout.entries if isinstance(e, dict)}

    def as_saved(path: _KeyPath, leaf: Any) -> Any:
        try:  # Entries are checked once the skeleton is built.
            entry = _checked_entry(_is_python_number(leaf) and raw.get(_keystr(path)))
        except _Malformed:  # None there, or refused when the header is checked.
            return leaf
        if entry["kind"] in ("scalar", "key") or entry["shape"]:
            return leaf
        dtype = cast(np.dtype, _numpy_dtype(entry["dtype"]))
        if _is_numpy_only(dtype):
            return leaf
        return jax.ShapeDtypeStruct((), jax.dtypes.canonicalize_dtype(dtype))

    return jtu.tree_map_with_path(as_saved, skeleton)


def _like_skeleton(like: Any) -> Any:
    """`like` as `eqx.filter_eval_shape` sees it, but with its concrete JAX arrays."""

    def describe(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray | np.generic) and not _is_numpy_only(leaf.dtype):
            dtype = jax.dtypes.canonicalize_dtype(leaf.dtype)
            return jax.ShapeDtypeStruct(leaf.shape, dtype)
        return _placed_shape(leaf, None) if isinstance(leaf, jax.core.Tracer) else leaf

    return jtu.tree_map(describe, like)


def _is_numpy_only(dtype: np.dtype) -> bool:
    return dtype.kind in "SUMm" or dtype.byteorder == ">"


# The one codec of every value in the metadata (FORMAT.md has its table).
_DEPTH = 32
_RECORD_BUDGET = 1 << 16  # Values and string characters per recorded argument.
_TOO_MANY_DIGITS = 10**_MAX_INT_DIGITS
_BITS = re.compile(r"[0-9a-f]{16}")


class _Unrecordable(Exception):
    """An argument that a recording cannot hold; its message says what it is."""


class _Malformed(Exception):
    pass


def _encode_value(value: Any, budget: list[int] | None = None, depth: int = 0) -> Any:
    """`value` in the codec: with a `budget` (values and string characters left),
    recorded to be rebuilt, or `_Unrecordable`; without, described to be compared."""
    kind = type(value)
    if budget is not None:
        budget[0] -= 1 + (len(value) if kind is str else 0)
        if budget[0] < 0 or depth > _DEPTH:
            raise _Unrecordable("a value too large or too deeply nested to record")
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        if abs(value) < _TOO_MANY_DIGITS:
            return value
        if budget is not None:
            raise _Unrecordable(f"an int of more than {_MAX_INT_DIGITS} digits")
        return ["int", hex(value)]  # JSON and Python refuse it in decimal.
    if kind is float:  # By its IEEE 754 bits: NaN payloads and -0.0 too.
        return ["float", struct.pack(">d", value).hex()]
    if kind is complex:
        bits = struct.pack(">dd", value.real, value.imag).hex()
        return ["complex", bits[:16], bits[16:]]
    if depth > _DEPTH:  # A deeper or cyclic value: its type alone.
        return ["object", kind.__qualname__]
    if budget is None and isinstance(value, enum.Enum):
        return ["enum", kind.__qualname__, value.name]
    if isinstance(value, np.generic) and _numpy_dtype(value.dtype.name) is not None:
        return ["numpy", [], value.dtype.name, value.tobytes().hex()]  # By value.
    if budget is not None and (
        isinstance(value, jax.ShapeDtypeStruct) or eqx.is_array(value)
    ):
        if isinstance(value, np.ndarray) and kind is not np.ndarray:
            raise _Unrecordable(f"a {kind.__name__}")
        shape, dtype = [int(size) for size in value.shape], value.dtype
        if _is_key_array(value):
            impl = _key_impl_name(dtype)
            if impl not in _KEY_IMPLS:
                raise _Unrecordable(f"a PRNG key of the implementation {impl!r}")
            return ["key", shape, impl]
        if _numpy_dtype(_dtype_name(dtype)) is None:
            raise _Unrecordable(f"an array of dtype {dtype}")
        return ["array", shape, _dtype_name(dtype)]
    if isinstance(value, list | tuple | dict | set | frozenset) and (
        budget is None or kind in (list, tuple, dict)
    ):  # By its type's name, with a description's dict or set sorted.
        inner = functools.partial(_encode_value, budget=budget, depth=depth + 1)
        if isinstance(value, dict):
            items = [[inner(part) for part in pair] for pair in value.items()]
        else:
            items = [inner(item) for item in value]
        if budget is None and isinstance(value, dict | set | frozenset):
            items.sort(key=_json)
        return [kind.__qualname__, items]
    if budget is not None:
        name = getattr(value, "__name__", None) if callable(value) else None
        if isinstance(name, str):
            raise _Unrecordable(f"the function {name}")
        raise _Unrecordable(f"an object of type {kind.__qualname__}")
    if isinstance(value, type):
        return ["type", value.__qualname__]
    if isinstance(value, np.dtype):
        return ["dtype", _dtype_name(value)]
    if isinstance(value, np.generic | np.ndarray) and not value.dtype.hasobject:
        shape, dtype = list(value.shape), _dtype_name(value.dtype)
        return ["numpy", shape, dtype, value.tobytes().hex()]
    if dataclasses.is_dataclass(value):
        fields = [
            [item.name, _encode_value(getattr(value, item.name, None), None, depth + 1)]
            for item in dataclasses.fields(value)
        ]
        return ["dataclass", kind.__qualname__, fields]
    if isinstance(value, functools.partial | slice | range):  # By their parts.
        names = ("func", "args", "keywords", "start", "stop", "step")
        parts = [getattr(value, name) for name in names if hasattr(value, name)]
        return [kind.__qualname__, [_encode_value(p, None, depth + 1) for p in parts]]
    if isinstance(value, bytes | bytearray):
        return [kind.__qualname__, value.hex()]
    if callable(value):
        # `__name__` first: JAX has changed `__qualname__`s (`jax.numpy.tanh`).
        name = getattr(value, "__name__", None) or getattr(value, "__qualname__", None)
        return ["function", name or kind.__qualname__]
    return ["object", kind.__qualname__]


def _decode_value(value: Any, depth: int = 0) -> Any:
    """A recorded argument or a Python number back from the codec, or `_Malformed`."""
    if value is None or type(value) in (bool, int, str):
        return value
    if depth > _DEPTH or not (type(value) is list and value):
        raise _Malformed
    tag, *body = value
    if tag in ("float", "complex") and len(body) == (1 if tag == "float" else 2):
        if all(type(bits) is str and _BITS.fullmatch(bits) for bits in body):
            parts = [struct.unpack(">d", bytes.fromhex(bits))[0] for bits in body]
            return parts[0] if tag == "float" else complex(*parts)
    if tag in ("list", "tuple", "dict") and len(body) == 1 and type(body[0]) is list:
        inner = functools.partial(_decode_value, depth=depth + 1)
        if tag != "dict":
            items = [inner(item) for item in body[0]]
            return items if tag == "list" else tuple(items)
        if all(type(item) is list and len(item) == 2 for item in body[0]):
            try:
                return {inner(key): inner(item) for key, item in body[0]}
            except TypeError:  # An unhashable key.
                raise _Malformed from None
    if tag in ("array", "key") and len(body) == 2 and _is_shape(body[0]):
        shape, name = tuple(body[0]), body[1]
        if tag == "key" and name in _key_impl_types():
            return jax.ShapeDtypeStruct(shape, _key_impl_types()[name][0])
        dtype = _numpy_dtype(name) if tag == "array" else None
        if dtype is not None and _is_numpy_only(dtype):
            return np.broadcast_to(np.zeros((), dtype), shape)  # Nothing allocated.
        if dtype is not None:
            return jax.ShapeDtypeStruct(shape, jax.dtypes.canonicalize_dtype(dtype))
    if tag == "numpy" and len(body) == 3 and body[0] == [] and type(body[2]) is str:
        dtype = _numpy_dtype(body[1])
        if dtype is not None and not _is_numpy_only(dtype):
            with contextlib.suppress(ValueError):  # Not hex, or not one item.
                return np.frombuffer(bytes.fromhex(body[2]), dtype).reshape(())[()]
    if tag == "unrecordable" and len(body) == 1 and type(body[0]) is str:
        raise _Unrecordable(body[0])
    raise _Malformed


# Recorded constructor arguments: `arguments` is `[path, recording]` of each.


def _record(value: Any) -> Any:
    """A constructor argument in the codec, or what it was if it cannot be."""
    try:
        return _encode_value(value, [_RECORD_BUDGET])
    except _Unrecordable as reason:
        return ["unrecordable", str(reason)]
    except Exception:  # A value whose attributes raise: never stop a constructor.
        return ["unrecordable", f"an object of type {type(value).__qualname__}"]


def _recorded_call(
    cls: type, recording: Any, source: _Source, layout: "_Layout | None"
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments to rebuild `cls` with, from the recording at the file's top."""
    if recording is None or layout is None:
        return (), {}  # Tried as `cls()`; a failure says that nothing was recorded.
    if recording["class"] != cls.__qualname__:
        raise source.error(
            f"holds a {recording['class']}, not a {cls.__qualname__}. Call "
            f"`{recording['class']}.deserialize`, or pass the constructor arguments"
        )
    positional, missing = recording["args"], []

    def decode(name: str, value: Any) -> Any:
        try:
            decoded = _decode_value(value)
        except _Malformed:
            raise source.error(
                "has a malformed header (its recorded arguments)"
            ) from None
        except _Unrecordable as reason:
            missing.append(f"`{name}` (it was {reason})")
            return None
        for leaf in jtu.tree_leaves(decoded):  # Not built bigger than the file.
            if hasattr(leaf, "shape") and leaf.dtype.itemsize * leaf.size > layout.size:
                raise source.error(
                    f"records the argument `{name}` as an array of shape {leaf.shape}"
                    ", larger than the whole file. Pass the constructor arguments"
                )
        return decoded

    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        parameters = []
    names = [p.name for p in parameters if p.kind <= p.POSITIONAL_OR_KEYWORD]
    names += [f"positional argument {i}" for i in range(len(names), len(positional))]
    args = [decode(*pair) for pair in zip(names, positional, strict=False)]
    kwargs = {name: decode(name, value) for name, value in recording["kwargs"]}
    if missing:
        which = ", ".join(missing[:-1]) + " and " * (len(missing) > 1) + missing[-1]
        raise source.error(
            f"could not record the argument{'s' * (len(missing) > 1)} {which} of "
            f"{cls.__qualname__}. Pass the constructor arguments: "
            f"`{cls.__qualname__}.deserialize(path, *args, **kwargs)`",
            TypeError,
        )
    return tuple(args), kwargs


# Writing


@functools.cache  # NumPy's `dtype.name` is slow.
def _dtype_name(dtype: np.dtype) -> str:
    """A dtype's name in a checkpoint: NumPy's name, or `str` where JAX lacks it."""
    return dtype.str if _is_numpy_only(dtype) else dtype.name


def _numpy_dtype(name: Any) -> np.dtype | None:
    """The dtype a checkpoint names, or None if it names none it may hold."""
    if not isinstance(name, str):
        return None
    found = _checkpoint_dtypes().get(name)
    if found is None and _NUMPY_ONLY_DTYPE.fullmatch(name):
        found = np.dtype(name)
    return found


def _write_checkpoint(
    model: Any, target: pathlib.Path, function: str, kinds: _Kinds
) -> None:
    try:
        header, blocks = _encode(model, kinds, function)
    except Exception as err:
        _fail_across_processes(err, model, function)
        raise
    if any(isinstance(block, jax.Array) for block in blocks):
        return _write_from_processes(header, blocks, target, function)

    def write_data(file: IO[bytes], temporary: pathlib.Path) -> list[int]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as checksummer:
            checksums = []
            for block in blocks:  # Both `crc32` and `write` release the GIL.
                checksums.append(_checksum(checksummer, block.data))
                file.write(block.data)
            return [checksum() for checksum in checksums]

    _write_atomically(target, header, write_data)


_CLOSER = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # Starts on first use.


def _write_atomically(
    target: pathlib.Path,
    header: bytes,
    write_data: Callable[[IO[bytes], pathlib.Path], list[int]],
) -> None:
    """Write beside `target`, then rename over it; `write_data` gives the CRC-32s."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stem = os.fsdecode(os.fsencode(target.name)[:64])  # Short, whatever the target.
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        temporary = target.parent / f".{stem}.{secrets.token_hex(4)}.tmp"
        with contextlib.suppress(FileExistsError):
            descriptor = os.open(temporary, flags, 0o666)  # As `open()`: umask applies.
            break
    try:
        with os.fdopen(descriptor, "r+b") as file:
            file.write(_LENGTH.pack(len(header)))
            file.write(header)  # Its CRC slots still hold zeros.
            crcs = "".join(f"{crc:08x}" for crc in write_data(file, temporary))
            filled = bytearray(header)
            at = header.index(b'"crc32":"') + len(b'"crc32":"')
            filled[at : at + len(crcs)] = crcs.encode()
            at = header.index(_CRC_SLOT) + len(_CRC_SLOT)
            filled[at : at + 8] = f"{zlib.crc32(filled):08x}".encode()
            file.seek(_LENGTH.size)
            file.write(filled)
            file.flush()
            os.fsync(file.fileno())
        # The new file takes the old one's mode; the old is closed (freed) in a thread.
        try:
            previous = os.open(target, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:  # None there, or not readable.
            previous = None
        try:
            with contextlib.suppress(FileNotFoundError):
                kept = os.fstat(previous) if previous is not None else os.stat(target)
                os.chmod(temporary, stat.S_IMODE(kept.st_mode))
            os.replace(temporary, target)
        finally:
            if previous is not None:
                _CLOSER.submit(os.close, previous)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # The rename is durable too, where it can be.
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


# Each process calls `serialize`: process 0 writes the header and other leaves to a
# temporary file, whose name it publishes; each process writes its replica-0 shards
# there; process 0 checksums, fills in the header and renames. Waits are bounded.
_PROCESS_TIMEOUT_S = 600.0
_FAILED = "!"  # A published value that starts so is the message of a failure.
_SAVE_NUMBERS = itertools.count(1)  # Every process counts its saves, failed ones too.
_Region = tuple[tuple[int, int], ...]  # A shard's `(start, stop)` along each axis.


def _next_save(function: str) -> tuple[Any, str]:
    """The key-value store, and this save's folder in it."""
    client = _distributed_client()
    if client is None:
        raise ValueError(
            f"{function}: the {_saving(function)[1]} spans processes without "
            "`jax.distributed`. Call `jax.distributed.initialize` in every process."
        )
    return client, f"lerax_utils/serialize/{next(_SAVE_NUMBERS)}"


def _await(client: Any, key: str, waiting_for: str, function: str) -> str:
    """The value published at `key`; raises if it is a failure or does not come."""
    try:
        value = client.blocking_key_value_get(key, int(_PROCESS_TIMEOUT_S * 1000))
    except Exception as err:  # The runtime's own error, on its deadline.
        save_call, what = _saving(function)
        raise TimeoutError(
            f"{function}: process {jax.process_index()} waited "
            f"{_PROCESS_TIMEOUT_S:g} s for {waiting_for}, in vain. Every process "
            f"must call `{save_call}` on the same {what}, in the same order as the "
            f"other saves of arrays that span processes ({err})."
        ) from err
    if value.startswith(_FAILED):
        raise ValueError(f"{function}: {value[len(_FAILED) :]}")
    return value


def _failure(process: int, err: BaseException, function: str) -> str:
    """What a process publishes when it fails."""
    text = str(err).removeprefix(f"{function}: ")
    return (
        f"{_FAILED}process {process} failed to write its part of the checkpoint, so "
        f"nothing was saved: {type(err).__name__}: {text}"
    )


def _fail_across_processes(err: BaseException, tree: Any, function: str) -> None:
    """If `tree` spans processes, tell the others of a failure, so they raise too."""
    if jax.process_count() > 1 and any(
        isinstance(leaf, jax.Array)
        and not isinstance(leaf, jax.core.Tracer)
        and not leaf.is_fully_addressable
        for leaf in jtu.tree_leaves(tree)
    ):
        client, prefix = _next_save(function)
        me = jax.process_index()
        client.key_value_set(f"{prefix}/header/{me}", _failure(me, err, function))


def _write_from_processes(
    header: bytes, blocks: list[Any], target: pathlib.Path, function: str
) -> None:
    """Write one checkpoint from every process, as described above."""
    client, prefix = _next_save(function)
    me, count = jax.process_index(), jax.process_count()
    data_at = _LENGTH.size + len(header)
    offsets = list(itertools.accumulate([b.nbytes for b in blocks], initial=data_at))
    # All agree on the path, the header and process 0's leaves before any writes.
    local = [None if isinstance(b, jax.Array) else zlib.crc32(b.data) for b in blocks]
    agreed = zlib.crc32(_json([str(target), local]).encode(), zlib.crc32(header))
    client.key_value_set(f"{prefix}/header/{me}", f"{agreed:08x}")
    headers = {
        _await(client, f"{prefix}/header/{i}", f"process {i}'s header", function)
        for i in range(count)
    }
    if len(headers) != 1:
        what = _saving(function)[1]
        raise ValueError(
            f"{function}: the processes passed different paths or {what}s (structure, "
            "shapes, dtypes, static values, Python numbers or arrays that do not span "
            f"processes). Every process must save the same {what} to the same path."
        )
    if me != 0:
        waiting_for = "process 0 to create the file"
        where = _await(client, f"{prefix}/temporary", waiting_for, function)
        try:
            _write_shards(pathlib.Path(where), blocks, offsets)
        except BaseException as err:
            client.key_value_set(f"{prefix}/written/{me}", _failure(me, err, function))
            raise
        client.key_value_set(f"{prefix}/written/{me}", "ok")
        _await(client, f"{prefix}/done", "process 0 to finish the file", function)
        return
    published = False

    def write_data(file: IO[bytes], temporary: pathlib.Path) -> list[int]:
        nonlocal published
        for block, offset in zip(blocks, offsets, strict=False):
            if not isinstance(block, jax.Array):
                file.seek(offset)
                file.write(block.data)
        file.truncate(offsets[-1])
        file.flush()
        client.key_value_set(f"{prefix}/temporary", str(temporary))
        published = True
        _write_shards(temporary, blocks, offsets)
        for i in range(1, count):
            _await(client, f"{prefix}/written/{i}", f"process {i}'s shards", function)
        source = _Source(str(temporary), function)
        for index, (block, offset) in enumerate(zip(blocks, offsets, strict=False)):
            if local[index] is None:
                entry: dict[str, Any] = {"path": "", "dtype": _dtype_name(block.dtype)}
                entry.update(shape=list(block.shape), offset=offset)
                local[index] = _stream_into_shards(file, entry, {}, source)
        return cast(list[int], local)

    try:
        _write_atomically(target, header, write_data)
    except BaseException as err:
        message = _failure(0, err, function)
        if not published:
            client.key_value_set(f"{prefix}/temporary", message)
        client.key_value_set(f"{prefix}/done", message)
        raise
    client.key_value_set(f"{prefix}/done", "ok")


def _write_shards(
    temporary: pathlib.Path, blocks: list[Any], offsets: list[int]
) -> None:
    """Write this process's replica-0 shards into the shared file, durably."""
    with os.fdopen(os.open(temporary, os.O_WRONLY), "wb") as file:  # Not truncated.
        for block, offset in zip(blocks, offsets, strict=False):
            if not isinstance(block, jax.Array):
                continue
            for shard in block.addressable_shards:
                if shard.replica_id != 0 or shard.data.size == 0:
                    continue
                region = _region(shard.index, block.shape)
                data = np.asarray(shard.data)
                # Axes after `split` are whole in the shard, so each step along the
                # axes up to `split` is one contiguous run of the file.
                split = max(block.ndim - 1, 0)
                while split > 0 and region[split] == (0, block.shape[split]):
                    split -= 1
                starts = [start for start, _ in region]
                for outer in np.ndindex(*data.shape[:split]):
                    corner = [*np.add(starts[:split], outer), *starts[split:]]
                    at = np.ravel_multi_index(corner, block.shape) * data.itemsize
                    file.seek(offset + int(at))
                    run = np.ascontiguousarray(data[outer]).reshape(-1)
                    file.write(run.view(np.uint8).data)
        file.flush()
        os.fsync(file.fileno())


def _encode(model: Any, kinds: _Kinds, function: str) -> tuple[bytes, list[Any]]:
    """The header, with zeros in its CRC slots, and each array's bytes (as uint8)."""
    leaves, tensors, blocks, offset, saved, modules = [], {}, [], 0, [], []
    structure = _structure(model, saved, modules)
    _check_saveable(saved, function)
    for path, leaf in saved:
        if type(leaf) in _PYTHON_SCALARS:
            value = _encode_value(leaf)
            leaves.append({"path": path, "kind": "scalar", "value": value})
            continue
        if path in kinds:  # A traced leaf, now on the host (its path is its own).
            (kind, extra), data = kinds[path], np.asarray(leaf, order="C")
        elif isinstance(leaf, jax.Array):
            kind, extra = _jax_kind(leaf)
            data = jax.random.key_data(leaf) if kind == "key" else leaf
            if data.is_fully_addressable:  # Else each process writes its own shards.
                data = np.asarray(data, order="C")  # Gathers sharded arrays.
        else:  # NumPy: its bytes little-endian, as safetensors has them.
            kind = "numpy_scalar" if isinstance(leaf, np.generic) else "numpy"
            swap = leaf.dtype.newbyteorder("<") if leaf.dtype.byteorder == ">" else None
            extra, data = {}, np.asarray(leaf, dtype=swap, order="C")
        # A NumPy leaf keeps its own dtype, big-endian where its bytes were swapped.
        dtype = leaf.dtype if kind.startswith("numpy") else data.dtype
        entry: dict[str, Any] = {"path": path, "kind": kind}
        entry.update(dtype=_dtype_name(dtype), shape=list(data.shape), **extra)
        block = data if isinstance(data, jax.Array) else data.reshape(-1).view(np.uint8)
        tensors[path] = _tensor_entry(entry, offset, block.nbytes)
        offset += block.nbytes
        leaves.append(entry)
        blocks.append(block)
    metadata = {
        "format": _FORMAT,
        "format_version": str(_FORMAT_VERSION),
        "library_version": __version__,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "leaves": _json(leaves),
        "structure": _json(structure),
    }
    recordings = [
        [where, recorded]
        for where, node in modules
        if (recorded := getattr(node, _ARGUMENTS_FIELD).recording) is not None
    ]
    if recordings:
        metadata["arguments"] = _json(recordings)
    metadata["crc32"] = _ZERO_CRC * len(blocks)  # Filled in once the data is written.
    metadata["metadata_crc32"] = _ZERO_CRC
    header = _json({"__metadata__": metadata, **tensors}).encode()
    parts = [metadata.get(k, "").encode() for k in ("leaves", "structure", "arguments")]
    for part in (header, *parts):
        if (count := _count_containers(part)) > _MAX_CONTAINERS:  # As a reader would.
            raise ValueError(
                f"{function}: the {_saving(function)[1]} needs {count} JSON lists and "
                f"objects in a part of its header, more than the {_MAX_CONTAINERS} "
                "allowed. Stack its leaves into fewer, larger arrays (`stack_pytree`)."
            )
    return header + b" " * (-(_LENGTH.size + len(header)) % 8), blocks


def _keystr(key_path: _KeyPath) -> str:
    """`jax.tree_util.keystr`, with NumPy scalar keys as NumPy 1.x writes them."""
    text = jtu.keystr(key_path)
    if _NUMPY_2 and "np." in text:  # Perhaps a NumPy key, as in `np.int64(1)`.
        if any(isinstance(getattr(k, "key", None), np.generic) for k in key_path):
            with np.printoptions(legacy="1.25"):
                return jtu.keystr(key_path)
    return text


def _jax_kind(leaf: Any) -> tuple[str, dict[str, Any]]:
    """How a JAX array or tracer is saved: its kind, and its entry's extra fields."""
    if _is_key_array(leaf):
        return "key", {"impl": _key_impl_name(leaf.dtype), "key_shape": [*leaf.shape]}
    weak = getattr(getattr(leaf, "aval", None), "weak_type", False)  # jnp.asarray(2.0)
    return "jax", {"weak_type": True} if weak else {}


def _check_saveable(leaves: list[tuple[str, Any]], function: str) -> None:
    """Refuse leaves (`(path, leaf)`) that would save a file that cannot load."""
    names = set()
    for path, leaf in leaves:
        if (problem := _unsaveable(leaf)) is not None:
            raise TypeError(f"{function}: the leaf at path {path} is {problem}.")
        if eqx.is_array(leaf):
            if path in names:
                raise ValueError(
                    f"{function}: two array leaves have the same path "
                    f"{path} (`jax.tree_util.keystr`), so the checkpoint would name "
                    "one tensor twice. Give the dict keys distinct reprs."
                )
            names.add(path)


def _unsaveable(leaf: Any) -> str | None:
    """What a leaf is, and the fix, if a checkpoint cannot restore it exactly."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return "a jax.ShapeDtypeStruct, which holds no values. Save arrays with values"
    if type(leaf) is int and abs(leaf) >= _TOO_MANY_DIGITS:
        return (
            f"a Python int of more than {_MAX_INT_DIGITS} digits. Save it as "
            "a NumPy array of its bytes, or as a static field"
        )
    if isinstance(leaf, jax.Array):
        impl = _key_impl_name(leaf.dtype) if _is_key_array(leaf) else None
        if impl is None or impl in _KEY_IMPLS:
            return None
        return (
            f"a PRNG key of the custom implementation {impl!r}; "
            f"a checkpoint holds keys of {', '.join(_KEY_IMPLS)} only. Save "
            "`jax.random.key_data(key)` instead and wrap it after loading"
        )
    if not isinstance(leaf, np.ndarray | np.generic):
        return None
    if isinstance(leaf, np.ma.MaskedArray):
        return "a masked array, whose mask would be lost. Save `x.data` and `x.mask`"
    if isinstance(leaf, np.ndarray) and type(leaf) is not np.ndarray:
        return (
            f"a {type(leaf).__name__}, which would load as a plain ndarray. "
            "Save `np.asarray(x)`"
        )
    if leaf.dtype.hasobject:
        return "an array of Python objects, which needs pickle. Make the field static"
    if leaf.dtype.fields is not None or leaf.dtype.subdtype is not None:
        return f"an array of structured dtype {leaf.dtype}. Save each field apart"
    if _numpy_dtype(_dtype_name(leaf.dtype)) is None:
        return (
            f"an array of dtype {leaf.dtype}, which a checkpoint cannot restore "
            "exactly. Convert it to a dtype of JAX, a string or a dated dtype "
            "with a unit"
        )
    return None


def _count_containers(text: bytes) -> int:
    """The JSON lists and objects in `text` (its `[` and `{` outside strings), or, if
    that many could not pass `_MAX_CONTAINERS`, every `[` and `{` in it."""
    if (every := text.count(b"[") + text.count(b"{")) <= _MAX_CONTAINERS:
        return every  # The usual case, in two quick passes.
    # In linear time, even for a string left open: without the escapes (`\\`, then
    # `\"`), a byte is in a string where an odd number of quotes come before it.
    text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    chars = np.frombuffer(text, np.uint8)
    outside = ~np.logical_xor.accumulate(chars == ord('"'))
    return int(np.count_nonzero(outside & ((chars == ord("[")) | (chars == ord("{")))))


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), check_circular=False)  # Acyclic.


def _tensor_entry(entry: dict[str, Any], offset: int, nbytes: int) -> dict[str, Any]:
    """An array's entry in the safetensors table: its own dtype, or bytes."""
    dtype, shape = _SAFETENSORS_DTYPES.get(entry["dtype"]), entry["shape"]
    if dtype is None:  # The item size is a last dimension, if more than one byte.
        itemsize = cast(np.dtype, _numpy_dtype(entry["dtype"])).itemsize
        dtype, shape = "U8", shape + [itemsize] if itemsize > 1 else shape
    return {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}


def _structure(tree: Any, saved: list[Any], modules: list[Any]) -> list[list[Any]]:
    """`[path, description]` of every node and leaf, the same in every process;
    `saved` gains `(path, leaf)` for each leaf whose value a file holds, in order,
    and `modules` `(path, node)` for each `Serializable`."""
    entries: list[list[Any]] = []

    def visit(node: Any, path: _KeyPath) -> None:
        where, kind = _keystr(path), type(node)  # The whole path, for NumPy keys.
        if _is_saved_leaf(node):
            scalar = kind in _PYTHON_SCALARS
            entries.append([where, ["scalar", kind.__name__] if scalar else "array"])
            saved.append((where, node))
            return
        if issubclass(kind, Serializable):  # Even one with no arrays.
            modules.append((where, node))
        children, node_def = jtu.tree_flatten_with_path(
            node, is_leaf=_is_strict_child(node)
        )
        if jtu.treedef_is_leaf(node_def) and node is not None:
            entries.append([where, _encode_value(node)])
            return
        description: dict[str, Any] = {"node": kind.__qualname__}
        if issubclass(kind, eqx.Module):
            description["static"] = {
                name: _encode_value(getattr(node, name, None))
                for name in _static_fields(kind)
                if name != _ARGUMENTS_FIELD  # Recorded apart, under `arguments`.
            }
        elif issubclass(kind, dict):  # Keys in JAX's (sorted) order, not insertion's.
            keys = [getattr(key[0], "key", key[0]) for key, _ in children]
            description["keys"] = [_encode_value(key) for key in keys]
        elif (aux := node_def.node_data()[1]) is not None:
            description["aux"] = _encode_value(aux)  # Another node's static data.
        entries.append([where, description])
        for key, child in children:
            visit(child, path + key)

    visit(tree, ())
    return entries


# Reading

_Entry = dict[str, Any]  # A leaf's entry in the header, checked.
_ARRAY_LIKE = (jax.ShapeDtypeStruct, jax.Array, np.ndarray, np.generic)


@dataclasses.dataclass
class _Layout:
    """A checkpoint's header, checked."""

    entries: list[_Entry]  # Arrays gain "offset", "nbytes" and "crc"; all, "sharding".
    structure: str  # JSON, parsed only where the skeleton's differs.
    arguments: dict[str, Any]  # Recordings, by the path of their `Serializable`.
    size: int  # The file's, in bytes.
    kinds_known: bool = False  # Whether the skeleton tells NumPy leaves from JAX.


def _read_header(
    file: IO[bytes], source: _Source, size: int, build: Callable[..., Any]
) -> tuple[_Layout | None, Any]:
    """The checked header and the skeleton built from it (no header: plain Equinox)."""
    start = file.read(_LENGTH.size + 1)
    if start.startswith(_NUMPY_MAGIC):
        return None, build(None, source)
    if start.startswith(_V1_MAGIC):
        _check_version("1", source)
    if len(start) <= _LENGTH.size:
        raise source.error(f"is truncated ({size} bytes)")
    if start[_LENGTH.size :] != b"{":
        raise source.error(
            f"is not a lerax_utils checkpoint: it starts with {start[:8]!r}, which "
            "is not a safetensors header length followed by `{`"
        )
    (length,) = _LENGTH.unpack(start[: _LENGTH.size])
    if length > _MAX_HEADER_BYTES:
        raise source.error(
            f"declares a header of {length} bytes, more than the "
            f"{_MAX_HEADER_BYTES} allowed; the file is corrupt"
        )
    if _LENGTH.size + length > size:
        raise source.error(f"is truncated inside its header ({size} bytes)")
    file.seek(_LENGTH.size)
    header_bytes = file.read(length)
    header = _parse_json(header_bytes, source)
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not (isinstance(metadata, dict) and metadata.get("format") == _FORMAT):
        raise source.error(
            "is a safetensors file but not a lerax_utils checkpoint (its "
            "`__metadata__` names no format 'lerax_utils'). Read it with `safetensors`"
        )
    _check_version(metadata.get("format_version"), source)
    stored = metadata.get("metadata_crc32", "")
    slot = _CRC_SLOT + str(stored).encode(errors="surrogatepass") + b'"'
    if not (
        all(isinstance(value, str) for value in metadata.values())
        and re.fullmatch("[0-9a-f]{8}", stored)
        and header_bytes.count(slot) == 1
    ):
        raise source.error("has a malformed header")
    zeroed = header_bytes.replace(slot, _CRC_SLOT + _ZERO_CRC.encode() + b'"')
    if zlib.crc32(zeroed) != int(stored, 16):
        raise source.error("has a corrupt header (its checksum fails)")
    # A lone surrogate (from a `\ud800` escape) becomes bytes that are not UTF-8.
    leaves, recorded = (
        _parse_json(metadata.get(key, empty).encode(errors="surrogatepass"), source)
        for key, empty in (("leaves", ""), ("arguments", "[]"))
    )
    arguments: dict[str, Any] = {}  # Recordings, checked to be well formed.
    for item in recorded if isinstance(recorded, list) else [None]:
        match item:
            case [str(where), {"class": str(), "args": list(), "kwargs": list()}] if (
                where not in arguments
                and len(item[1]) == 3
                and all(
                    type(pair) is list and len(pair) == 2 and type(pair[0]) is str
                    for pair in item[1]["kwargs"]
                )
            ):
                arguments[where] = item[1]
            case _:
                raise source.error("has a malformed header (its recorded arguments)")
    if not isinstance(leaves, list):
        raise source.error("has a malformed header")
    layout = _Layout(leaves, metadata.get("structure", ""), arguments, size)
    skeleton = build(layout, source)
    # Structure and static values, then the leaves' count, paths and types.
    name = "the skeleton" if source.function.startswith("Serializable.") else "`like`"
    fix = "Pass a `like` with the structure, shapes and dtypes of the saved tree"
    if name == "the skeleton":
        fix = "Pass the constructor arguments the model was saved with"
    expected, modules = [], []  # `(path, leaf)` of each, as `_structure` finds them.
    described = _structure(skeleton, expected, modules)
    if _json(described) != layout.structure:  # Else the same, byte for byte.
        saved = _parse_json(layout.structure.encode(errors="surrogatepass"), source)
        if not isinstance(saved, list):
            raise source.error("has a malformed header")
        difference = _structure_difference_in_file(saved, described, name)
        if difference is not None:
            path, message = difference
            problem = f"does not match {name} {_where(path)}: {message}. {fix}"
            raise source.error(problem)
    wanted = [path for path, _ in expected]
    if len(layout.entries) == len(wanted):  # Never more entries decoded than leaves.
        try:  # In time linear in the header's length.
            layout.entries = entries = [_checked_entry(entry) for entry in leaves]
        except _Malformed as err:
            where = f" (the leaf at path {err})" if err.args else ""
            raise source.error(f"has a malformed header{where}") from None
        crcs = metadata.get("crc32", "")
        arrays = [entry for entry in entries if entry["kind"] != "scalar"]
        if not (
            re.fullmatch("[0-9a-f]*", crcs)
            and len(crcs) == 8 * len(arrays)
            and len(header) - 1 == len(arrays)  # Its tensor table and `__metadata__`.
        ):
            raise source.error("has a malformed header")
        offset = data_start = _LENGTH.size + length
        for index, entry in enumerate(arrays):
            table = _tensor_entry(entry, offset - data_start, entry["nbytes"])
            if header.get(entry["path"]) != table:  # `__metadata__` never matches.
                raise source.error(
                    f"has a malformed header: the tensor table's entry for the leaf at "
                    f"path {entry['path']} is not {_json(table)}"
                )
            entry.update(offset=offset, crc=int(crcs[8 * index : 8 * index + 8], 16))
            offset += entry["nbytes"]
        if size < offset:
            raise source.error(
                f"is truncated: it has {size} bytes, and its header needs {offset}"
            )
        if size > offset:
            raise source.error(
                f"has {size - offset} trailing bytes after the data its header "
                "describes; it was not written by `serialize` in one piece"
            )
    paths = [e.get("path") if isinstance(e, dict) else None for e in layout.entries]
    if paths != wanted:
        pairs = itertools.zip_longest(paths, wanted)
        first = next((q if p is None else p for p, q in pairs if p != q), "")
        raise source.error(
            f"holds {len(paths)} leaves, and {name} has {len(wanted)}; they "
            f"first differ at path {first}. {fix}"
        )
    for entry, (path, leaf) in zip(layout.entries, expected, strict=True):
        problem = _leaf_mismatch(entry, leaf, name, fix, layout.kinds_known)
        if problem is not None:
            raise source.error(f"holds at path {path} {problem}")
        entry["sharding"] = _leaf_sharding(leaf)  # None where it is placed as JAX does.
    for where, node in modules:  # The skeleton, built here, takes the recordings.
        if (recording := arguments.get(where)) is not None:
            object.__setattr__(node, _ARGUMENTS_FIELD, _Arguments(recording))
    return layout, skeleton


def _parse_json(text: bytes, source: _Source) -> Any:
    """JSON, with the number of containers bounded first."""
    if _count_containers(text) > _MAX_CONTAINERS:
        raise source.error(
            f"has a header with more than {_MAX_CONTAINERS} lists and objects; the "
            "file is corrupt"
        )
    try:
        return json.loads(text.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:
        raise source.error(f"has an unreadable header ({err})") from err


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a checkpoint header")


def _check_version(version: Any, source: _Source) -> None:
    if not (isinstance(version, str) and re.fullmatch("[0-9]{1,9}", version)):
        raise source.error("has a malformed header")
    number = int(version)
    if number != _FORMAT_VERSION:
        age, fix = "newer", "Upgrade lerax_utils to load it"
        if number < _FORMAT_VERSION:
            age, fix = "older", "Load it with the lerax_utils that wrote it, save it "
            fix += "with `eqx.tree_serialise_leaves`, and load that file"
        raise source.error(
            f"has format version {number}, {age} than the {_FORMAT_VERSION} this "
            f"lerax_utils {__version__} reads. {fix}"
        )


def _checked_entry(entry: Any) -> _Entry:
    """A copy of a leaf entry with its byte count, or `_Malformed(its path)`."""
    if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
        raise _Malformed
    kind = entry.get("kind")
    if kind == "scalar":
        try:
            value = _decode_value(entry.get("value"))
        except (_Malformed, _Unrecordable):
            value = None
        if type(value) not in _PYTHON_SCALARS:
            raise _Malformed(entry["path"])
        return {"path": entry["path"], "kind": kind, "value": value}
    dtype, shape = _numpy_dtype(entry.get("dtype")), cast(Any, entry.get("shape"))
    if (
        kind not in ("jax", "numpy", "numpy_scalar", "key")
        or dtype is None
        or not _is_shape(shape)
        or math.prod(filter(None, shape)) * dtype.itemsize > sys.maxsize
        or (_is_numpy_only(dtype) and kind in ("jax", "key"))
        or (kind == "numpy_scalar" and shape)
        or ("weak_type" in entry and (entry["weak_type"] is not True or kind != "jax"))
    ):
        raise _Malformed(entry["path"])
    checked = {"path": entry["path"], "kind": kind, "dtype": entry["dtype"]}
    checked.update(shape=shape, nbytes=math.prod(shape) * dtype.itemsize)
    if "weak_type" in entry:
        checked["weak_type"] = True
    if kind == "key":
        impl, key_shape = entry.get("impl"), cast(Any, entry.get("key_shape"))
        types = _key_impl_types().get(impl) if isinstance(impl, str) else None
        if not (
            types is not None
            and _is_shape(key_shape)
            and shape == key_shape + list(types[1])
            and dtype == types[2]
        ):
            raise _Malformed(entry["path"])
        checked.update(impl=impl, key_shape=key_shape)
    return checked


def _is_shape(shape: Any) -> bool:
    return (
        isinstance(shape, list)
        and len(shape) <= _MAX_DIMENSIONS
        and all(type(d) is int and 0 <= d < 2**62 for d in shape)
    )


def _is_saved_leaf(leaf: Any) -> bool:
    """Whether a leaf's value lives in the file (else the skeleton provides it)."""
    kind = type(leaf)  # `isinstance` is slow on Equinox modules, which are no arrays.
    if kind in _PYTHON_SCALARS or issubclass(kind, _ARRAY_LIKE):
        return True
    return not issubclass(kind, eqx.Module) and isinstance(leaf, _ARRAY_LIKE)


def _leaf_mismatch(
    entry: _Entry, leaf: Any, skeleton: str, fix: str, kinds_known: bool
) -> str | None:
    """How a saved leaf differs from the skeleton's, or None if it fits."""
    kind, canonical = entry["kind"], jax.dtypes.canonicalize_dtype
    if (  # The JAX array saved, not narrowed by JAX: the skeleton's weak type.
        kind == "jax"
        and isinstance(leaf, jax.Array | jax.ShapeDtypeStruct)
        and tuple(entry["shape"]) == leaf.shape
        and (dtype := cast(Any, _numpy_dtype(entry["dtype"]))) == leaf.dtype
        and (dtype.itemsize < 8 or canonical(dtype) == dtype)
    ):
        entry["weak_type"] = getattr(leaf, "weak_type", "weak_type" in entry)
        return None
    if kind == "scalar":
        value = entry["value"]
        if type(leaf) is type(value):
            return None
        return (
            f"the Python {type(value).__name__} {value!r}, where {skeleton} has "
            f"{_describe_leaf(leaf)}. {fix}"
        )
    if not isinstance(leaf, jax.ShapeDtypeStruct | jax.Array | np.ndarray | np.generic):
        return f"an array, where {skeleton} has {_describe_leaf(leaf)}. {fix}"
    if kind == "key":
        shape, dtype = tuple(entry["key_shape"]), _key_impl_types()[entry["impl"]][0]
    else:
        shape, dtype = tuple(entry["shape"]), cast(Any, _numpy_dtype(entry["dtype"]))
        if dtype.byteorder == ">" and getattr(leaf.dtype, "byteorder", "") != ">":
            dtype = dtype.newbyteorder("=")  # Byte order is no type: loaded natively.
            entry["dtype"] = _dtype_name(dtype)
    # JAX would narrow it (`jax_enable_x64` is off; only 64-bit types): not exact.
    narrowed = kind == "jax" and dtype.itemsize >= 8 and dtype != canonical(dtype)
    same_shape, numpy_entry = shape == tuple(leaf.shape), kind.startswith("numpy")
    numpy_leaf = isinstance(leaf, np.ndarray | np.generic)
    # A NumPy array and the JAX array made of it (`jnp.asarray`) stand for each other,
    # as in `eqx.filter_eval_shape`, unless the skeleton knows which it holds.
    if (
        same_shape
        and not narrowed
        and (
            dtype == leaf.dtype
            or (numpy_entry and not kinds_known and not _is_numpy_only(dtype))
            and canonical(dtype) == leaf.dtype  # Skeleton: the entry as JAX has it.
            or (numpy_leaf and kind != "key" and not _is_numpy_only(leaf.dtype))
            and dtype == canonical(leaf.dtype)  # File: the NumPy leaf as JAX has it.
        )
    ):
        return None
    pair = " ".join(sorted({str(dtype), str(leaf.dtype)}))
    x64 = ("float32 float64", "int32 int64", "uint32 uint64", "complex128 complex64")
    if same_shape and narrowed and dtype == leaf.dtype:
        fix = f"JAX narrows {dtype} without `jax_enable_x64`: set it as when saving"
    elif same_shape and pair in x64 and kind == "jax":
        fix = "The dtypes differ only in width: the file was probably saved with "
        fix += "`jax_enable_x64` set otherwise than now. Set it as when saving, or "
        fix += "save the leaf as a NumPy array, which keeps its dtype"
    saved = "a NumPy array" if numpy_entry and kinds_known and not numpy_leaf else ""
    return (
        f"{saved or 'an array'} of shape {shape} and dtype {dtype}, but {skeleton} has "
        f"shape {tuple(leaf.shape)} and dtype {leaf.dtype}. {fix}"
    )


def _structure_difference_in_file(
    saved: list[Any], wanted: list[Any], skeleton: str
) -> tuple[str, str] | None:
    """The first `(path, message)` where two `_structure` descriptions differ."""
    canonical = functools.partial(json.dumps, sort_keys=True)  # `True` is not `1`.
    if canonical(saved) == canonical(wanted):
        return None
    for saved_entry, (path, want) in zip(saved, wanted, strict=False):
        if canonical(saved_entry) == canonical([path, want]):
            continue
        match saved_entry:
            case [str() as elsewhere, _] if elsewhere != path:
                return path, f"the file has a node at path {elsewhere} instead"
            case [str(), {"node": node, "static": dict(static)} as was] if (
                isinstance(want, dict)
                and set(was) == set(want)
                and node == want["node"]
            ):
                for field, value in want["static"].items():
                    if field in static and canonical(static[field]) != canonical(value):
                        return f"{path}.{field}", (
                            f"the static field is {static[field]!r} in the file "
                            f"and {value!r} in {skeleton}"
                        )
                # Only a field one side lacks differs: a class gained or lost it.
                continue
            case [str(), {"node": _} as was] if isinstance(want, dict) and canonical(
                {k: v for k, v in want.items() if k != "aux"}
            ) == canonical(was):
                continue  # Written before other nodes' static data was described.
            case [str(), was]:
                return path, f"the file has {was!r}, {skeleton} has {want!r}"
        return path, "the file's structure description is malformed"
    if len(saved) != len(wanted):
        longer = saved if len(saved) > len(wanted) else wanted
        side = "the file" if longer is saved else skeleton
        extra = longer[min(len(saved), len(wanted))]
        where = extra[0] if isinstance(extra, list) and extra else ""
        return str(where), f"only {side} has a node here"
    return None


def _read_leaves(file: IO[bytes], layout: _Layout, source: _Source) -> list[Any]:
    """Every leaf's value, each array read whole or into the sharding it is given."""
    leaves = layout.entries
    values: list[Any] = []
    pending: list[tuple[int, Any, Callable[[], int]]] = []
    put = _array_placer()

    def finish(index: int, data: Any, checksum: Callable[[], int]) -> None:
        entry = leaves[index]
        _check_crc(entry, checksum(), source)
        _check_bits(entry, data, source)
        values[index] = _restore_kind(data, entry, put)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as checksummer:
        for index, entry in enumerate(leaves):
            if entry["kind"] == "scalar":
                values.append(entry["value"])
                continue
            sharding = entry["sharding"]
            if sharding is not None and entry["kind"] in ("jax", "key"):
                values.append(_read_sharded(file, entry, sharding, source))
                continue
            dtype = cast(np.dtype, _numpy_dtype(entry["dtype"]))
            if dtype.byteorder == ">":  # Stored little-endian.
                dtype = dtype.newbyteorder("<")
            data = _aligned_empty(entry["shape"], dtype)
            view = data.reshape(-1).view(np.uint8)
            file.seek(entry["offset"])
            if file.readinto(view.data) != entry["nbytes"]:  # type: ignore[attr-defined]
                raise source.error("is truncated inside its data")
            values.append(None)
            # Checked in a helper thread while the next is read: two held at most.
            pending.append((index, data, _checksum(checksummer, view.data)))
            if len(pending) == 2:
                finish(*pending.pop(0))
        for item in pending:
            finish(*item)
    return values


# Smaller arrays are checksummed in line, and read into unaligned buffers.
_SMALL_BYTES = 1 << 16
# A sharded load streams each array through one buffer of at most this many bytes.
_CHUNK_BYTES = 16 * 1024 * 1024


def _checksum(pool: concurrent.futures.Executor, data: memoryview) -> Callable[[], int]:
    """The CRC-32 of `data`, computed now if it is small, else meanwhile in `pool`."""
    if data.nbytes < _SMALL_BYTES:
        return functools.partial(int, zlib.crc32(data))
    return pool.submit(zlib.crc32, data).result


def _aligned_empty(shape: list[int], dtype: np.dtype) -> np.ndarray:
    """An empty array on a 64-byte boundary, which `jax.device_put` need not copy."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _SMALL_BYTES:  # Copied to the device anyway.
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _with_shardings(skeleton: Any, sharding: Any) -> Any:
    """The skeleton with each JAX array leaf asking for its sharding."""
    name = "Serializable.deserialize_sharded"
    leaves, treedef = jtu.tree_flatten_with_path(skeleton)
    if isinstance(sharding, jax.sharding.Sharding):
        chosen = [sharding] * len(leaves)
    elif callable(sharding):
        tree = sharding(skeleton)
        try:
            chosen = treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{name}: the pytree returned by `sharding` does not have the "
                f"structure of the skeleton ({err}); give a Sharding or None per array."
            ) from err
    else:
        raise TypeError(
            f"{name}: `sharding` must be a jax.sharding.Sharding or a callable that "
            f"maps the skeleton to a pytree of them; got {_describe_leaf(sharding)}."
        )
    placed = []
    for (key_path, leaf), choice in zip(leaves, chosen, strict=True):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            placed.append(leaf)  # Not a JAX array: loaded as `deserialize` does.
            continue
        if choice is not None and not isinstance(choice, jax.sharding.Sharding):
            raise TypeError(
                f"{name}: `sharding` gave {_describe_leaf(choice)} for the array "
                f"leaf at path {_keystr(key_path)}; give a jax.sharding.Sharding, or "
                "None to load it unsharded."
            )
        try:
            placed.append(_placed_shape(leaf, choice))
        except ValueError as err:
            raise _sharding_error(name, _keystr(key_path), leaf.shape, err) from err
    return treedef.unflatten(placed)


def _sharding_error(
    function: str, path: str, shape: tuple[int, ...], err: Exception
) -> ValueError:
    return ValueError(
        f"{function}: the sharding asked for the leaf at path {path} does not fit "
        f"its shape {tuple(shape)}: {str(err).rstrip('.')}. Pass a sharding that "
        "fits it, or None for this leaf."
    )


def _leaf_sharding(leaf: Any) -> jax.sharding.Sharding | None:
    """The sharding a skeleton's leaf asks for (a concrete array's if multi-device)."""
    if not isinstance(leaf, jax.ShapeDtypeStruct | jax.Array):  # Tracers are gone.
        return None
    sharding = leaf.sharding
    if isinstance(leaf, jax.Array) and len(sharding.device_set) == 1:
        return None
    return sharding if isinstance(sharding, jax.sharding.Sharding) else None


def _region(index: Any, shape: Sequence[int]) -> _Region:
    """A shard's `(start, stop)` along each axis, from the slices JAX gives."""
    bounds = []
    for axis, size in enumerate(shape):
        part = index[axis] if axis < len(index) else slice(None)
        start, stop, step = part.indices(size)
        if step != 1:
            raise ValueError(f"a shard with step {step} along axis {axis}")
        bounds.append((start, max(start, stop)))
    return tuple(bounds)


def _read_sharded(
    file: IO[bytes], entry: _Entry, sharding: jax.sharding.Sharding, source: _Source
) -> jax.Array:
    """One array leaf on `sharding`, its local shards read, checked, placed in turn."""
    dtype = cast(np.dtype, _numpy_dtype(entry["dtype"]))
    shape = tuple(entry["shape"])  # A key's data, whose own axes no shard splits.
    global_shape = tuple(entry.get("key_shape", shape))
    try:
        _check_rank(sharding, global_shape)
        sharding.shard_shape(global_shape)  # Refuses an axis it does not divide.
        indices = sharding.addressable_devices_indices_map(global_shape)
        regions = {device: _region(index, shape) for device, index in indices.items()}
    except Exception as err:
        raise _sharding_error(
            source.function, entry["path"], global_shape, err
        ) from err
    distinct = list(dict.fromkeys(regions.values()))  # A replicated shard once.
    if len(distinct) > 1:
        _check_crc(entry, _stream_into_shards(file, entry, {}, source), source)
    on_devices: dict[Any, jax.Array] = {}
    for region in distinct:
        host = _aligned_empty([stop - start for start, stop in region], dtype)
        box = region if len(distinct) > 1 else None
        crc = _stream_into_shards(file, entry, {region: host}, source, box)
        if box is None:
            _check_crc(entry, crc, source)
        for device, wanted in regions.items():
            if wanted == region:
                shard = jax.device_put(host, device)
                if entry["kind"] == "key":
                    shard = jax.random.wrap_key_data(shard, impl=entry["impl"])
                on_devices[device] = shard
        del host
    array = jax.make_array_from_single_device_arrays(
        global_shape, sharding, [on_devices[device] for device in regions]
    )
    return _weak_array(array) if entry.get("weak_type") else array


def _stream_into_shards(
    file: IO[bytes],
    entry: _Entry,
    shards: dict[_Region, np.ndarray],
    source: _Source,
    box: _Region | None = None,
) -> int:
    """Stream a tensor in file order into the shards (by region) it overlaps: all of
    it, checked, for its CRC-32; or with `box`, only what overlaps it, unchecked."""
    # A piece is a run of whole sub-arrays along one axis (`level`): the fewest
    # leading axes such that one step along `level` fits in the buffer.
    shape = tuple(entry["shape"])
    if not shape:  # A 0-d array streams as one of shape (1,).
        shape = (1,)
        shards = {((0, 1),): shards[()].reshape(1)} if shards else {}
    dtype = cast(np.dtype, _numpy_dtype(entry["dtype"]))
    itemsize = dtype.itemsize
    nbytes = math.prod(shape) * itemsize
    level = next(
        axis
        for axis in range(len(shape))
        if math.prod(shape[axis + 1 :]) * itemsize <= max(_CHUNK_BYTES, itemsize)
    )
    step_bytes = math.prod(shape[level + 1 :]) * itemsize
    steps = max(1, _CHUNK_BYTES // max(step_bytes, 1))
    buffer = np.empty(min(nbytes, steps * max(step_bytes, 1)), np.uint8)
    ranges = box or tuple((0, size) for size in shape)
    low, high = ranges[level]
    crc = 0
    for outer in itertools.product(*(range(a, b) for a, b in ranges[:level])):
        if not nbytes:
            break
        base = sum(i * math.prod(shape[a + 1 :]) for a, i in enumerate(outer))
        for first in range(low, high, steps):
            count = min(steps, high - first)
            size = count * step_bytes
            file.seek(entry["offset"] + base * itemsize + first * step_bytes)
            view = buffer[:size]
            if file.readinto(view.data) != size:  # type: ignore[attr-defined]
                raise source.error("is truncated inside its data")
            piece = view.view(dtype).reshape((count, *shape[level + 1 :]))
            if box is None:
                crc = zlib.crc32(view.data, crc)
                _check_bits(entry, piece, source)
            for region, shard in shards.items():
                # Copy `piece` (indices `outer` on the leading axes, `first` onward
                # along `level`, whole along the rest) where it overlaps the shard.
                if not all(
                    a <= i < b for i, (a, b) in zip(outer, region, strict=False)
                ):
                    continue
                start, stop = region[level]
                lo, hi = max(start, first), min(stop, first + count)
                if lo >= hi:
                    continue
                part = piece[
                    (slice(lo - first, hi - first),)
                    + tuple(slice(a, b) for a, b in region[level + 1 :])
                ]
                target = tuple(i - a for i, (a, _) in zip(outer, region, strict=False))
                shard[(*target, slice(lo - start, hi - start))] = part
    return crc


def _check_crc(entry: _Entry, crc: int, source: _Source) -> None:
    if crc != entry["crc"]:
        where = f"the leaf at path {entry['path']}"
        raise source.error(f"has corrupt data for {where} (its checksum fails)")


def _check_bits(entry: _Entry, data: np.ndarray, source: _Source) -> None:
    """Refuse a loaded array whose bytes are no values of its dtype."""
    kind, sub_byte = data.dtype.kind, entry["dtype"] in _SUB_BYTE_DTYPES
    if kind not in "bU" and not sub_byte:
        return  # Any bytes are values.
    view = data.reshape(-1).view(np.uint8)
    if kind == "b" and view.size and view.max() > 1:
        problem = "a boolean byte other than 0 or 1"
    elif sub_byte and not np.array_equal(
        data.astype(np.float32).astype(data.dtype).reshape(-1).view(np.uint8), view
    ):
        problem = f"a {entry['dtype']} byte whose unused high bits are not zero"
    elif kind == "U" and view.size and view.view("<u4").max() > 0x10FFFF:
        problem = "a character that is not Unicode (a code point above U+10FFFF)"
    else:
        return
    raise source.error(
        f"holds invalid data for the leaf at path {entry['path']}: {problem}"
    )


def _array_placer() -> Callable[[np.ndarray, bool], jax.Array]:
    """Puts loaded arrays where `jnp.asarray` does; once JAX has placed one small
    array, the others go straight to its sharding (in a third of the time)."""
    no_mesh_set = getattr(_get_abstract_mesh(), "empty", True)  # None in jax 0.4.26.
    debug = jax.debug_nans.value or jax.debug_infs.value  # Checked by
    direct = _batched_device_put is not None and not debug  # `jnp.asarray` alone.
    placed: list[Any] = []  # The first small array's sharding and device.
    avals: dict[tuple[Any, ...], Any] = {}

    def put(data: np.ndarray, weak: bool) -> jax.Array:
        if not (no_mesh_set and data.nbytes < _SMALL_BYTES):
            array = jax.device_put(data)  # Large, or under a mesh.
        elif placed:
            if (aval := avals.get(key := (data.shape, data.dtype, weak))) is None:
                aval = avals[key] = _ShapedArray(*key)
            return _batched_device_put(aval, placed[0], [data], placed[1:], False)
        else:
            array = jnp.asarray(data)  # In a trace, a tracer: so are all the rest.
            sharding = getattr(array, "sharding", None)
            if direct and isinstance(sharding, jax.sharding.SingleDeviceSharding):
                placed.extend([sharding, *array.devices()])
        return _weak_array(array) if weak else array

    return put


def _restore_kind(data: np.ndarray, entry: _Entry, put: Callable[..., Any]) -> Any:
    """A loaded NumPy array as the kind of leaf it was saved from."""
    if entry["kind"] == "jax":  # A weak type is restored, as `jnp.asarray(2.0)` has.
        return put(data, entry.get("weak_type", False))
    if entry["kind"] == "key":
        return jax.random.wrap_key_data(jax.device_put(data), impl=entry["impl"])
    dtype = cast(np.dtype, _numpy_dtype(entry["dtype"]))
    if entry["kind"] == "numpy_scalar" and dtype.kind in "SU":
        # `data[()]` would drop trailing NULs. `data` is little-endian until cast.
        if dtype.kind == "S":
            return np.bytes_(data.tobytes())
        return np.str_(data.tobytes().decode("utf-32-le", "surrogatepass"))
    if dtype.byteorder == ">":
        data = data.astype(dtype)
    return data[()] if entry["kind"] == "numpy_scalar" else data
