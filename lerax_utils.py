"""Small utilities for JAX and Equinox: loops and branches over any pytree.

`lerax_utils` is one file with no dependencies beyond `jax`, `equinox` and `numpy`.

- `filter_scan`: `jax.lax.scan` whose carry, inputs and outputs may hold anything
  (Equinox modules with function fields, strings, Python scalars, PRNG keys). Arrays
  are traced; Python numbers are traced once they change; every other leaf is static.
- `filter_cond`: `jax.lax.cond` for any pytree. Only the chosen branch runs.
- `filter_while_loop`, `filter_fori_loop`, `filter_switch`, `filter_map`: the rest of
  the `jax.lax` control-flow family, by the same rules. `filter_scan`,
  `filter_fori_loop` and `filter_map` take `progress=` to draw a progress bar on
  stderr while they run, even under `jit`.
- `unstack_pytree`, `stack_pytree`: split a batched pytree into one pytree per index
  along an axis, and join such pytrees back.
- `callback_wrapper`, `callback_with_numpy_wrapper`, `callback_with_list_wrapper`,
  `print_callback`: call host Python (logging, printing, plotting) from inside `jit`.
- `Serializable`: an `eqx.Module` base class whose models save and load themselves, in
  a checked, versioned safetensors file, atomically, even from inside `jit`; they
  record their constructor arguments, so loading needs only the path.
- `save_pytree`, `load_pytree`: the same checkpoints for any pytree, such as a whole
  training state `(model, opt_state, key, step)`.

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
import contextvars
import ctypes
import dataclasses
import enum
import functools
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
# Each entry names the release that changed it; `tests/test_compatibility.py` fails
# loudly when a new release changes one of them again.

# -- Control flow

# -- Batches of pytrees

# -- Host callbacks and progress bars

# -- Checkpoints

# (end of compatibility)

#
# Pytree comparison: the checks behind every error message about a changed leaf
#

_PYTHON_SCALARS = (bool, int, float, complex)


def _is_python_number(leaf: Any) -> bool:
    """Whether `leaf` is a plain Python bool, int, float or complex (not a subclass
    such as an `IntEnum`, which stays an ordinary static value)."""
    return type(leaf) in _PYTHON_SCALARS


def _is_jax_value(leaf: Any) -> bool:
    """An array, or a Python number that JAX itself has typed (such as the
    `TypedFloat` a `jax.custom_vjp` forward function gets for a Python float): JAX
    traces both as arrays of their dtype."""
    kind = type(leaf)
    return eqx.is_array(leaf) or (
        issubclass(kind, (int, float, complex))
        and kind not in _PYTHON_SCALARS
        and kind.__module__.startswith("jax.")
    )


def _same_python_number(old: Any, new: Any) -> bool:
    """Whether `old` and `new` are Python numbers of the same type and value, floats
    compared by their bits: two NaNs with the same payload are the same, and `0.0`
    and `-0.0` are not."""
    if type(old) is not type(new) or type(old) not in _PYTHON_SCALARS:
        return False
    if type(old) is float:
        return struct.pack("<d", old) == struct.pack("<d", new)
    if type(old) is complex:
        return _same_python_number(old.real, new.real) and _same_python_number(
            old.imag, new.imag
        )
    return old == new


def _is_key_array(array: Any) -> bool:
    """Whether `array` holds typed PRNG keys (`jax.random.key`, not raw uint32 data)."""
    return jnp.issubdtype(array.dtype, jax.dtypes.prng_key)


def _safe_repr(value: Any) -> str:
    """`repr(value)`, or a placeholder naming its type if that `__repr__` raises."""
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__} object whose repr raised>"


def _describe_leaf(leaf: Any) -> str:
    if eqx.is_array(leaf):
        return f"an array of shape {tuple(leaf.shape)} and dtype {leaf.dtype}"
    return f"{type(leaf).__name__} {_safe_repr(leaf)}"


def _static_leaves_equal(old: Any, new: Any) -> bool:
    """Whether two non-array leaves are the same static value, type included.

    Python numbers compare by bits (see `_same_python_number`), and
    `functools.partial` objects by their function, arguments and keywords.
    """
    if old is new:
        return True
    if type(old) is not type(new):
        return False
    if _is_python_number(old):
        return _same_python_number(old, new)
    if isinstance(old, functools.partial):
        return (
            _static_leaves_equal(old.func, new.func)
            and len(old.args) == len(new.args)
            and all(map(_static_leaves_equal, old.args, new.args))
            and old.keywords.keys() == new.keywords.keys()
            and all(
                _static_leaves_equal(value, new.keywords[name])
                for name, value in old.keywords.items()
            )
        )
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
# Control flow: filter_scan, filter_cond, filter_while_loop, filter_fori_loop,
# filter_switch, filter_map
#
# Each function splits its pytrees into the leaves that JAX traces and the rest,
# which stay Python values, runs the `jax.lax` primitive on the traced part, and puts
# the two back together. The machinery below is shared by all of them.


class _Split:
    """A pytree as a flat list of leaves, and which of them JAX traces.

    A leaf's place in the user's tree is its index in the list, so the traced part
    (`None` at static places) and the rebuilt tree line up with the original.
    """

    def __init__(self, tree: Any, is_traced: Callable[[int, Any], bool]):
        self.tree = tree
        self.leaves, self.treedef = jtu.tree_flatten(tree)
        self.traced = [is_traced(i, leaf) for i, leaf in enumerate(self.leaves)]

    def traced_part(self) -> Any:
        """The traced leaves, with `None` in place of every static one."""
        return self.treedef.unflatten(
            [x if t else None for x, t in zip(self.leaves, self.traced, strict=True)]
        )

    def static_part(self) -> Any:
        """The static leaves, with `None` in place of every traced one."""
        return self.treedef.unflatten(
            [None if t else x for x, t in zip(self.leaves, self.traced, strict=True)]
        )

    def rebuild(self, traced_part: Any) -> Any:
        """The whole tree: traced leaves from `traced_part`, in order, and static
        leaves from here."""
        values = iter(jtu.tree_leaves(traced_part))
        return self.treedef.unflatten(
            [
                next(values) if t else x
                for x, t in zip(self.leaves, self.traced, strict=True)
            ]
        )

    def path(self, index: int) -> str:
        return jtu.keystr(jtu.tree_flatten_with_path(self.tree)[0][index][0])


def _arrays_traced(index: int, leaf: Any) -> bool:
    return _is_jax_value(leaf)


def _outputs_traced(index: int, leaf: Any) -> bool:
    """Outputs that JAX itself accepts are traced: arrays, and Python numbers (which
    it makes weakly typed arrays)."""
    return _is_jax_value(leaf) or _is_python_number(leaf)


def _named_after(fun: Callable[..., Any]) -> Callable[[_Function], _Function]:
    """Give a wrapper `fun`'s name, signature and source location, so that JAX's own
    messages about the wrapper speak of the user's function and parameter names."""

    def name(wrapper: _Function) -> _Function:
        functools.update_wrapper(wrapper, fun, updated=())
        return wrapper

    return name


def _check_callable(function: str, name: str, fun: Any) -> None:
    if not callable(fun):
        raise TypeError(
            f"{function}: `{name}` must be callable; got {_describe_leaf(fun)}."
        )


def _lax_says(function: str, run: Callable[..., Any], *args: Any) -> str:
    """`jax.lax`'s own message for the same mistake, made by `run(*args)` on stand-ins
    of the same structure, to follow ours (code that matches it keeps working)."""
    try:
        jax.eval_shape(run, *args)
    except Exception as error:
        return f"\n\njax.lax.{function} says: {error}"
    return ""


def _stand_in(tree: Any) -> Any:
    return jtu.tree_map(lambda x: x if eqx.is_array(x) else 0.0, tree)


#
# Eager calls: the compiled program of a call, kept for the next call like it
#
# Outside any trace, `jax.lax` keeps a loop's traced program by its functions'
# identity. So do we, for a whole call: a call whose functions (by identity), tree
# structures, static leaves (by equality) and array types match an earlier one's
# runs that call's compiled program, so a closure is read when first traced, as
# under `jax.lax`. Inside a trace, the same keys remember which Python numbers a loop
# promoted, so that a loop traced again (inside an outer loop) starts from them.

_CACHE_SIZE = 64  # Calls kept, in each of the two caches; least recently used go.
_UNCACHED = object()
_UNTRACEABLE = object()  # A call whose tracing raised: it runs uncached, as before.
# Private: whether no trace is active (public as `jax.core.trace_state_clean` in
# jax 0.4.26, since moved).
_trace_state_clean = (
    getattr(jax.core, "trace_state_clean", None)
    or importlib.import_module("jax._src.core").trace_state_clean
)


class _Cache:
    """A bounded, thread-safe map; an entry goes as soon as one of the objects its
    key refers to weakly dies."""

    def __init__(self) -> None:
        self.entries: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.dead: list[Any] = []  # Keys whose objects died while it was locked.

    def get(self, key: Any) -> Any:
        with self.lock:
            while self.dead:
                self.entries.pop(self.dead.pop(), None)
            found = self.entries.get(key)
            if found is not None:
                self.entries.move_to_end(key)
                return found[0]
            return None

    def put(self, key: Any, value: Any, referents: list[Any]) -> None:
        drop = functools.partial(self._drop, key)
        entry = (value, [weakref.ref(x, drop) for x in referents])
        with self.lock:
            self.entries[key] = entry
            self.entries.move_to_end(key)
            while len(self.entries) > _CACHE_SIZE:
                self.entries.popitem(last=False)

    def _drop(self, key: Any, _: Any) -> None:
        if self.lock.acquire(blocking=False):  # Never wait: this runs from gc.
            self.entries.pop(key, None)
            self.lock.release()
        else:
            self.dead.append(key)


_PROGRAMS, _PROMOTIONS = _Cache(), _Cache()
_promotion_key = threading.local()  # Set for `_with_promoted_numbers`, per call.


def _call_key(trees: Any) -> tuple[list[Any], list[Any], list[Any]] | None:
    """The parts of a call's key, its leaves, and the objects that the key refers to
    weakly; `None` if a static leaf cannot be hashed, or compares to itself as
    anything but `True`."""
    leaves, treedef = jtu.tree_flatten(trees)
    parts: list[Any] = [treedef]
    referents = []
    for leaf in leaves:
        if type(leaf) in (float, complex):  # By bits, as `_same_python_number`.
            parts.append((type(leaf), struct.pack("<dd", leaf.real, leaf.imag)))
        elif _is_python_number(leaf):
            parts.append((type(leaf), leaf))
        elif eqx.is_array(leaf):
            parts.append(getattr(leaf, "aval", None) or (leaf.shape, leaf.dtype))
        elif _is_jax_value(leaf):
            return None
        else:
            try:
                hash(leaf)
                if (leaf == leaf) is not True:
                    return None
            except Exception:
                return None
            try:
                ref = weakref.WeakMethod if inspect.ismethod(leaf) else weakref.ref
                parts.append(ref(leaf))
                referents.append(leaf)
            except TypeError:  # Not weakly referable: a value, kept as it is.
                parts.append(leaf)
    return parts, leaves, referents


def _eager_call(
    function: str, trees: tuple[Any, ...], options: tuple[Any, ...], call: Any
) -> Any:
    """`call(*trees)`, run by the compiled program of an earlier call like it, or
    `_UNCACHED` where the caller must run it itself (inside a trace, or with a static
    leaf that cannot be compared safely). `options` are static, compared with their
    types."""
    _promotion_key.value = None
    found = _call_key(trees) if _CACHE_SIZE > 0 else None
    if found is None:
        return _UNCACHED
    parts, leaves, referents = found
    try:
        key = (function, *((type(x), x) for x in options), *parts)
        hash(key)
    except Exception:
        return _UNCACHED
    _promotion_key.value = (key, referents)  # For `_with_promoted_numbers`.
    if not _trace_state_clean() or jax.config.jax_disable_jit:  # pyright: ignore[reportAttributeAccessIssue]
        return _UNCACHED
    arrays = [i for i, leaf in enumerate(leaves) if eqx.is_array(leaf)]
    try:
        entry = _PROGRAMS.get(key)
    except Exception:  # An `__eq__` that raises, between two static leaves.
        return _UNCACHED
    if entry is None:
        try:
            entry = _compile_call(trees, leaves, arrays, call)
        except Exception:
            _PROGRAMS.put(key, _UNTRACEABLE, referents)
            raise
        _PROGRAMS.put(key, entry, referents)
    if entry is _UNTRACEABLE:
        return _UNCACHED
    run, consts, out_def, places = entry
    try:
        values = iter(run(consts, *(leaves[i] for i in arrays)))
    except BaseException:
        if function in ("filter_scan", "filter_fori_loop", "filter_map"):
            _end_open_lines()  # As `_tidy_on_error`, for a progress bar's line.
        raise
    return out_def.unflatten(
        [
            next(values) if p is None else leaves[p] if type(p) is int else p[0]
            for p in places
        ]
    )


def _cached_eagerly(*static: str) -> Callable[[_Function], _Function]:
    """Run eager calls of the decorated function through `_eager_call`: the arguments
    named in `static` are compared whole, the others split into leaves."""

    def decorate(function: _Function) -> _Function:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def cached(*args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs).arguments
            trees = {
                name: _as_array(value) if name in ("pred", "index") else value
                for name, value in arguments.items()
                if name not in static
            }

            def call(trees: dict[str, Any]) -> Any:
                bound = inspect.BoundArguments(signature, {**arguments, **trees})
                return function(*bound.args, **bound.kwargs)

            options = tuple(arguments.get(name, _UNCACHED) for name in static)
            out = _eager_call(function.__name__, (trees,), options, call)
            return function(*args, **kwargs) if out is _UNCACHED else out

        return cast(_Function, cached)

    return decorate


def _as_array(value: Any) -> Any:
    """A Python number as the weakly typed array `jax.lax` makes of it (an index or
    predicate is traced, so one program serves every value)."""
    try:
        return jnp.asarray(value) if _is_python_number(value) else value
    except Exception:
        return value  # Left as it is, for `jax.lax` to complain of.


def _compile_call(trees: Any, leaves: list[Any], arrays: list[int], call: Any) -> Any:
    """Trace `call` with the array leaves of `trees` traced; its closure's arrays
    are arguments of the compiled program, as `jax.lax` passes them."""
    treedef, out = jtu.tree_structure(trees), []
    static = {id(leaf): i for i, leaf in enumerate(leaves) if not eqx.is_array(leaf)}

    def program(*traced: Any) -> list[Any]:
        inputs = list(leaves)
        for i, x in zip(arrays, traced, strict=True):
            inputs[i] = x
        out_leaves, out_def = jtu.tree_flatten(call(*treedef.unflatten(inputs)))
        # Each output leaf: traced (`None`), an input's static leaf (its index), or
        # a value made while tracing (in a 1-tuple).
        out.append(out_def)
        out.append(
            [
                None if isinstance(x, jax.core.Tracer) else static.get(id(x), (x,))
                for x in out_leaves
            ]
        )
        return [x for x in out_leaves if isinstance(x, jax.core.Tracer)]

    try:
        closed = jax.make_jaxpr(program)(*(leaves[i] for i in arrays))
    except Exception as error:
        # Only arrays in a function (a module's parameters), traced here and not
        # uncached, can make the difference; then the call runs uncached.
        if not _complains_of_tracing(error):
            raise
        return _UNTRACEABLE
    run = jax.jit(lambda consts, *xs: jax.core.eval_jaxpr(closed.jaxpr, consts, *xs))
    return run, list(closed.consts), out[0], out[1]


#
# Loop carries: Python numbers are static until the body changes them
#


@dataclasses.dataclass(frozen=True)
class _LoopNames:
    """How messages name a loop's parts: `filter_scan`, `f`, `init`, and where else
    a static value could live."""

    function: str
    body: str
    init: str
    elsewhere: str


class _PromoteCarryNumbers(Exception):
    """Raised from inside a trace of a loop body: these carry leaves are Python numbers
    that the body changed, so they must be traced; `unproven` adds those it may have
    changed (all but those it passed on as they came). Never reaches the user."""

    def __init__(self, indices: frozenset[int], unproven: frozenset[int]):
        super().__init__(indices)
        self.indices, self.unproven = indices, unproven | indices


def _with_promoted_numbers(
    function: str, attempt: Callable[[frozenset[int]], _Out], tree: Any
) -> _Out:
    """Run `attempt(promoted)`, with the Python numbers of `tree` at the flat indices
    `promoted` traced and the others kept as Python values.

    Bools start traced, exactly as `jax.lax` traces them, because Python and JAX give
    different answers for the same code on them (`~True` is -2 in Python). Other
    numbers start as Python values; a loop body that changes one asks for it to be
    traced (`_PromoteCarryNumbers`), and the attempt is repeated, so nothing is traced
    twice when no number changes.

    An attempt that raises while trace time is still going on is repeated with every
    number traced (code written for `jax.lax` may need them as arrays: `c.shape`, or
    int32 arithmetic), and if that raises too, with every number a Python value (code
    such as `if self.training:` needs them so). The first attempt that succeeds
    stands. If none does, the error raised with every number traced is the one
    `jax.lax` would raise, and it is raised, unless it only complains that a value was
    traced, in which case an error from an attempt with Python values is the real one.
    Errors of the running computation (`RuntimeError`) are never retried.
    """
    leaves = jtu.tree_leaves(tree)
    bools = frozenset(i for i, leaf in enumerate(leaves) if type(leaf) is bool)
    numbers = frozenset(i for i, leaf in enumerate(leaves) if _is_python_number(leaf))
    starts = {
        bools: "every number traced"
        if bools == numbers
        else "bools traced and other numbers as Python values"
        if bools
        else "every number a Python value"
    }
    starts.setdefault(numbers, "every number traced")
    starts.setdefault(frozenset(), "every number a Python value")
    errors: dict[frozenset[int], Exception] = {}
    hint, _promotion_key.value = getattr(_promotion_key, "value", None), None
    with contextlib.suppress(Exception):  # An `__eq__` that raises: no hint.
        known = hint and _PROMOTIONS.get(hint[0])
        if known:  # What this loop promoted when last traced: try that first.
            starts = {known: "the numbers it promoted before", **starts}
    for start in starts:
        promoted, rounds, narrow = start, 0, None
        try:
            while True:
                try:
                    result = attempt(promoted)
                    if hint:
                        _PROMOTIONS.put(hint[0], promoted, hint[1])
                    return result
                except _PromoteCarryNumbers as request:
                    rounds += 1
                    if rounds == 2:  # Else each trace may find one more number.
                        narrow = promoted | request.indices
                        promoted |= request.unproven
                    else:
                        promoted |= request.indices
                except Exception as error:  # Numbers needed as Python values: go
                    if narrow is None or isinstance(error, RuntimeError):
                        raise
                    promoted, narrow = narrow, None  # one round at a time.
        except RuntimeError:
            raise
        except Exception as error:
            errors[start] = error
            if start == numbers and not _complains_of_tracing(error):
                break
    as_lax = errors[numbers]
    chosen = next(
        (e for e in [as_lax, *errors.values()] if not _complains_of_tracing(e)), as_lax
    )
    for start, other in errors.items():
        if other is not chosen and str(other) != str(chosen):
            chosen.add_note(
                f"{function} also ran with {starts[start]}, which raised "
                f"{type(other).__name__}: {other}"
            )
    raise chosen


def _complains_of_tracing(error: Exception) -> bool:
    """Whether `error` says only that a traced value was used as a Python value."""
    return isinstance(
        error,
        jax.errors.ConcretizationTypeError
        | jax.errors.TracerIntegerConversionError
        | jax.errors.TracerArrayConversionError,
    )


class _LoopCarry(_Split):
    """A loop carry: its arrays are traced, and so are the Python numbers at the flat
    indices `promoted`; every other leaf is static."""

    def __init__(self, init: Any, promoted: frozenset[int], names: _LoopNames):
        super().__init__(init, lambda i, leaf: _is_jax_value(leaf) or i in promoted)
        self.names = names
        # Traced numbers that every trace of the body passes through untouched come
        # back as the Python values they were.
        self.passed_through = set(promoted)
        self.body_inputs: list[Any] = []

    def enter(self, traced_part: Any) -> Any:
        """The carry as the body sees it, from the traced part that JAX passes in."""
        tree = self.rebuild(traced_part)
        self.body_inputs = jtu.tree_leaves(tree)
        return tree

    def finish(self, traced_part: Any) -> Any:
        """The final carry, from the traced part that JAX returns."""
        leaves = jtu.tree_leaves(self.rebuild(traced_part))
        for i in self.passed_through:
            leaves[i] = self.leaves[i]
        return self.treedef.unflatten(leaves)

    def check(self, new_carry: Any) -> Any:
        """Check the body's new carry against `init`, and return its traced part.

        Traced places may hold any array or Python number (`jax.lax` then checks
        shapes and dtypes). A Python number that changed asks for a new trace with
        that leaf traced. Every other leaf must be unchanged.
        """
        new_leaves, new_def = jtu.tree_flatten(new_carry)
        if new_def != self.treedef:
            path, message = _structure_difference(self.tree, new_carry, ())
            kind = "static" if message.startswith("is a static field") else "structure"
            old, new = _stand_in(self.tree), _stand_in(new_carry)
            lax = {
                "filter_scan": lambda: jax.lax.scan(
                    lambda c, x: (new, x), old, None, 1
                ),
                "filter_while_loop": lambda: jax.lax.while_loop(
                    lambda c: True, lambda c: new, old
                ),
                "filter_fori_loop": lambda: jax.lax.fori_loop(
                    0, 1, lambda i, c: new, old
                ),
            }[self.names.function]
            raise TypeError(
                self._error(path, message, kind)
                + (_lax_says(self.names.function[7:], lax) if kind != "static" else "")
            )
        to_promote: set[int] = set()
        self.passed_through = {
            i
            for i in self.passed_through
            if self.body_inputs and new_leaves[i] is self.body_inputs[i]
        }
        for i, (old, new, is_traced) in enumerate(
            zip(self.leaves, new_leaves, self.traced, strict=True)
        ):
            if is_traced or _is_python_number(old):
                if not _outputs_traced(i, new):
                    message = (
                        f"was {_describe_leaf(old)} and is now {_describe_leaf(new)}"
                    )
                    raise TypeError(self._error(self.path(i), message, "traced"))
                if not is_traced and not _same_python_number(old, new):
                    to_promote.add(i)
                continue
            message = _leaf_difference(old, new)
            if message is not None:
                raise ValueError(self._error(self.path(i), message, "static"))
        if to_promote:
            # Passed on as the very object that came in, and not one that Python
            # shares between equal values (small ints, bools), it is unchanged.
            unproven = {
                i
                for i, (old, new) in enumerate(
                    zip(self.leaves, new_leaves, strict=True)
                )
                if not self.traced[i]
                and _is_python_number(old)
                and not (
                    new is self.body_inputs[i]
                    and type(old) is not bool
                    and not (type(old) is int and -5 <= old <= 256)
                )
            }
            raise _PromoteCarryNumbers(frozenset(to_promote), frozenset(unproven))
        return new_def.unflatten(
            [x if t else None for x, t in zip(new_leaves, self.traced, strict=True)]
        )

    def _error(self, path: str, message: str, kind: str) -> str:
        names = self.names
        fix = {
            "structure": (
                f"The carry must keep the structure of `{names.init}` from step to "
                "step."
            ),
            "traced": (
                "Return an array or a Python number there, with the same shape and "
                f"dtype as in `{names.init}`."
            ),
            "static": (
                "Only arrays and Python numbers in the carry may change from step to "
                "step. If this value must change, make it an array in "
                f"`{names.init}` with `jnp.asarray`; otherwise keep it out of the "
                f"carry ({names.elsewhere})."
            ),
        }[kind]
        return (
            f"{names.function}: `{names.body}` returned a carry that differs from "
            f"`{names.init}` {_where(path)}: it {message}. {fix}"
        )


#
# Outputs: arrays and numbers are traced; the rest must agree between traces
#


def _static_outputs_agree(
    function: str, what: str, fun: str, traces: list[_Split]
) -> None:
    """JAX may trace a function more than once; each trace must give the same static
    outputs."""
    first = traces[0].static_part()
    for trace in traces[1:]:
        difference = _tree_difference(first, trace.static_part())
        if difference is not None:
            path, message = difference
            raise ValueError(
                f"{function}: the non-array part of {what} differs between two traces "
                f"of `{fun}`: {_where(path)} it {message}. JAX may trace `{fun}` more "
                "than once, and each trace must give the same static outputs. Return "
                "arrays for values that vary, or make the static values independent of "
                f"how often `{fun}` is called."
            )


class _Branches:
    """The branches of a `cond` or `switch`, wrapped to take the traced operands and
    return the traced part of their outputs, which must agree between branches."""

    def __init__(
        self, function: str, operands: tuple[Any, ...], promoted: frozenset[int]
    ):
        self.function = function
        self.operands = _Split(
            operands, lambda i, leaf: eqx.is_array(leaf) or i in promoted
        )
        self.outputs: dict[str, _Split] = {}

    def wrap(self, name: str, fun: Callable[..., Any]) -> Callable[..., Any]:
        @_named_after(fun)
        def branch(*traced: Any) -> Any:
            out = _Split(fun(*self.operands.rebuild(traced)), _outputs_traced)
            if self.outputs:
                first_name, first = next(iter(self.outputs.items()))
                self._check_agree(first_name, first.tree, name, out.tree)
            self.outputs[name] = out
            return out.traced_part()

        return branch

    def traced_operands(self) -> tuple[Any, ...]:
        return self.operands.traced_part()

    def rebuild(self, traced_out: Any) -> Any:
        """The output, from what `jax.lax` returned. A Python number that every traced
        branch returns unchanged stays that number."""
        first, *others = self.outputs.values()
        values = iter(jtu.tree_leaves(traced_out))
        leaves = []
        for i, (leaf, is_traced) in enumerate(
            zip(first.leaves, first.traced, strict=True)
        ):
            if not is_traced:
                leaves.append(leaf)
                continue
            value = next(values)
            same = others and all(
                _same_python_number(leaf, other.leaves[i]) for other in others
            )
            leaves.append(leaf if same else value)
        return first.treedef.unflatten(leaves)

    def _check_agree(self, first_name: str, first: Any, name: str, out: Any) -> None:
        first_leaves, first_def = jtu.tree_flatten_with_path(first)
        out_leaves, out_def = jtu.tree_flatten(out)
        if first_def != out_def:
            path, message = _structure_difference(first, out, ())
            a, b = _stand_in(first), _stand_in(out)
            if self.function == "filter_switch":
                lax = lambda: jax.lax.switch(0, [lambda: a, lambda: b])  # noqa: E731
            elif first_name == "true_fun":
                lax = lambda: jax.lax.cond(True, lambda: a, lambda: b)  # noqa: E731
            else:
                lax = lambda: jax.lax.cond(True, lambda: b, lambda: a)  # noqa: E731
            raise TypeError(
                self._error(first_name, name, path, message)
                + _lax_says(self.function[7:], lax)
            )
        for (path, a), b in zip(first_leaves, out_leaves, strict=True):
            a_traced, b_traced = _outputs_traced(0, a), _outputs_traced(0, b)
            if a_traced and b_traced:
                continue  # `jax.lax` checks shapes and dtypes.
            if a_traced or b_traced:
                message = (
                    f"is {_describe_leaf(b)}, where `{first_name}` returns "
                    f"{_describe_leaf(a)}"
                )
                raise TypeError(
                    self._error(first_name, name, jtu.keystr(path), message)
                )
            message = _leaf_difference(a, b)
            if message is not None:
                raise ValueError(
                    self._error(first_name, name, jtu.keystr(path), message)
                )

    def _error(self, first_name: str, name: str, path: str, message: str) -> str:
        return (
            f"{self.function}: the branches' outputs disagree {_where(path)}: compared "
            f"with `{first_name}`'s output, `{name}`'s {message}. Every branch must "
            "return the same structure, arrays or Python numbers in the same places, "
            "and equal static values elsewhere; return arrays for values that differ "
            "between branches."
        )


_NO_OPERAND = object()


def _one_operand_form(
    function: str, operands: tuple[Any, ...], operand: Any
) -> tuple[Any, ...]:
    """`operand=x`, which `jax.lax.cond` and `jax.lax.switch` accept instead of
    positional operands."""
    if operand is _NO_OPERAND:
        return operands
    if operands:
        raise TypeError(
            f"{function}: pass the operands either positionally or as `operand=`, not "
            f"both; got `operand=` and {len(operands)} positional operand(s)."
        )
    return (operand,)


#
# filter_scan
#

_SCAN_TAKES_SPLIT_TRANSPOSE = (
    "_split_transpose" in inspect.signature(jax.lax.scan).parameters
)
_SCAN_NAMES = _LoopNames(
    "filter_scan", "f", "init", "close over it in `f`, or pass it in `xs`"
)


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
    """As `jax.lax.scan`, except that `init`, `xs` and the outputs of `f` may be any
    pytree. Array leaves are traced; Python numbers are traced once they change; every
    other leaf is static.

    Use it to loop with an Equinox module in the carry: its parameters are traced and
    its activation functions, strings and hyperparameters ride along unchanged.

    **Arguments:**

    - `f`: the step, `f(carry, x) -> (new_carry, y)`; the pair may be a tuple or a
        list. It may be a plain function, a bound method or an `eqx.Partial`.
    - `init`: the initial carry. Its leaves are of three kinds.
        - Arrays (JAX, NumPy, typed PRNG keys) are traced, as in `jax.lax.scan`.
        - Python numbers (`int`, `float`, `complex`) that `f` gives back unchanged
          (same type, same bits) stay Python values inside the loop and in the
          final carry. A number that `f` changes (to another number or to an
          array) is traced exactly as `jax.lax.scan` traces it, as a weakly typed
          array, and the final carry holds an array there. `f` is then traced a
          second time; nothing is traced twice when no number changes. Python
          bools are traced, as `jax.lax.scan` traces them, since `~True` is -2 in
          Python; a step that needs them as Python values (`if self.training:`)
          gets them so on a second trace. If a trace with numbers as Python values
          raises, `f` is traced again with every number traced, as
          `jax.lax.scan` would.
        - Every other leaf (functions, strings, `None`-free static fields of modules)
          is static: `new_carry` must hold an equal value there.
    - `xs`: the inputs, sliced along the leading axis of every array leaf. Non-array
        leaves are passed unchanged to every step. `None` if there are no inputs.
    - `length`: the number of steps, a concrete whole number (a Python int, a NumPy
        integer or a 0-d array). Required when `xs` holds no arrays; otherwise it must
        equal their leading size.
    - `reverse`, `unroll`: as `jax.lax.scan`.
    - `_split_transpose`: as `jax.lax.scan`; ignored by versions of JAX that no
        longer accept it (it never changes results).
    - `progress`: ours alone. `True` draws a progress bar on stderr while the loop
        runs, even under `jax.jit`; a string draws one with that description. See
        "Progress bars" below. `False` (the default) adds nothing to the program.

    **Returns:**

    `(final_carry, ys)`. Array and Python-number leaves of `y` are stacked along a new
    leading axis, as `jax.lax.scan` stacks them; other leaves are returned once,
    unstacked, as `eqx.filter_vmap` returns a batch of modules.

    **Raises:**

    The exception types are those of `jax.lax.scan` for the same mistakes:

    - `TypeError` if `f` is not callable or does not return a pair, if the carry
        changes structure, if a traced carry leaf comes back as something that is not
        an array or a number, or (from JAX) if it changes shape or dtype.
    - `ValueError` if `xs` has inconsistent leading sizes, if `length` disagrees with
        them or is negative, or if `unroll` is negative; also if a static carry leaf
        changes, which is ours alone. Messages name the leaf path.
    - `jax.errors.ConcretizationTypeError` if `length` is traced.

    Under `jax.jit`, `jax.vmap` and `jax.grad` it behaves as `jax.lax.scan`: on a tree
    whose leaves are all arrays it builds exactly the same program.

    **Progress bars.** With `progress`, the loop reports its step count to the host
    every `k` steps (`k` chosen from `length`, so at most 200 reports however long
    the loop) and the host redraws one line, at most 10 times a second: count/total,
    percent, elapsed time, time left and rate. The line ends when the count reaches
    `length`; with `reverse=True` it counts up all the same. The loop runs as chunks
    of `k` steps with a report between them (under differentiation, as one scan that
    checks its count in every step), and its results are bit for bit those without
    the bar, but for XLA's rounding of matrix products, which may differ between two
    programs (see the README). Under `jax.vmap` one bar is drawn, not one per batch
    element. A loop with a bar traced inside the body of another loop with a bar
    draws none: only the outermost bar is shown. A loop of length 0 draws nothing.
    If the loop stops on an error, its line is ended (eagerly at once; under `jit`
    when the next bar starts, or at exit).

    **Example:**

    ```python
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from lerax_utils import filter_scan

    mlp = eqx.nn.MLP(2, 2, width_size=8, depth=1, key=jax.random.key(0))

    def step(state, _):
        model, x, steps = state
        x = model(x)
        return (model, x, steps + 1), x

    (mlp, x, steps), xs = filter_scan(step, (mlp, jnp.ones(2), 0), length=5)
    print(xs.shape, steps)  # (5, 2) 5
    ```
    """
    _check_callable("filter_scan", "f", f)
    description = _progress_description("filter_scan", progress)
    length = _scan_length(xs, length)
    unroll = _scan_unroll(unroll)
    bar = _make_bar(description, length)
    options = (
        {"_split_transpose": _split_transpose} if _SCAN_TAKES_SPLIT_TRANSPOSE else {}
    )
    inputs = _Split(xs, _arrays_traced)

    def attempt(promoted: frozenset[int]) -> Any:
        carry = _LoopCarry(init, promoted, _SCAN_NAMES)
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
                        "scan",
                        lambda: jax.lax.scan(
                            lambda c, x: _stand_in(out), None, None, 1
                        ),
                    )
                )
            pair_defs.append(pair_def)
            new_carry, y = pair
            outputs.append(_Split(y, _outputs_traced))
            return carry.check(new_carry), outputs[-1].traced_part()

        if bar is None:
            final, ys = jax.lax.scan(
                step,
                carry.traced_part(),
                inputs.traced_part(),
                length=length,
                reverse=reverse,
                unroll=unroll,
                **options,
            )
        else:
            final, ys = _scan_with_bar(
                bar, step, carry.traced_part(), inputs.traced_part(), length,
                reverse, unroll, options,
            )  # fmt: skip
        _static_outputs_agree("filter_scan", "`f`'s output `y`", "f", outputs)
        final, ys = carry.finish(final), outputs[0].rebuild(ys)
        # `jax.lax.scan` gives back the pair in the container that `f` used.
        return pair_defs[0].unflatten([final, ys])

    with _tidy_on_error(bar):
        return _with_promoted_numbers("filter_scan", attempt, init)


def _scan_with_bar(
    bar: "_ProgressBar",
    step: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any,
    length: int,
    reverse: bool,
    unroll: Any,
    options: dict[str, Any],
) -> tuple[Any, Any]:
    """`jax.lax.scan(step, init, xs, ...)`, reporting its progress to `bar`.

    A check in every step costs more than the bar is worth (a branch around a host
    call keeps XLA from simplifying the step), so where it can the loop runs in
    chunks: an outer scan over chunks of `_chunk_size(length)` steps reports
    between them, and its results are one `jax.lax.scan`'s, bit for bit. Under
    differentiation the chunks would sum the cotangents of the arrays that `step`
    closes over in another order, so there the loop is one scan that checks its
    step count in every step (`_scan_reporting_every_step`), whose gradients are
    `jax.lax.scan`'s. That form also serves where chunks do not apply: a length
    with no divisor near the stride, an `unroll` (which groups the steps), a step
    with effects of its own or one that changes its carry's type (which
    `jax.lax.scan` answers by promoting weak types, or with an error), and PRNG
    keys where JAX cannot pass them through a `jax.custom_jvp`.
    """
    with _progress_body():  # Loops traced inside `step` draw no bar.
        as_bool = isinstance(unroll, bool | np.bool_)
        whole = bool(unroll) if as_bool else unroll >= length
        one_step_at_a_time = (not unroll) if as_bool else unroll == 1
        if length == 1 or whole:
            # XLA inlines a loop of one step (or one wholly unrolled) and compiles it
            # together with what surrounds it, so any report inside would change the
            # results' bits. One report, after it.
            out = jax.lax.scan(
                step, init, xs, length=length, reverse=reverse, unroll=unroll, **options
            )
            last = _progress_callbacks(bar, 1, 1)[2]
            jax.debug.callback(last)
            return out
        try:
            first_x = jax.tree.map(lambda x: x[0], xs)
        except Exception:  # An explicitly sharded scan axis, say: lax's error, then.
            return jax.lax.scan(
                step, init, xs, length=length, reverse=reverse, unroll=unroll, **options
            )
        closed, (carry_shape, y_shape) = jax.make_jaxpr(step, return_shape=True)(
            init, first_x
        )
        init_leaves, carry_def = jtu.tree_flatten(init)
        carries = len(init_leaves)
        in_avals, out_avals = closed.in_avals[:carries], closed.out_avals[:carries]
        if jtu.tree_structure(carry_shape) != carry_def or any(
            (a.shape, a.dtype, a.weak_type) != (b.shape, b.dtype, b.weak_type)
            for a, b in zip(in_avals, out_avals, strict=True)
        ):  # Let `jax.lax.scan` promote the carry, or raise, as it does.
            return _scan_reporting_every_step(
                bar, step, init, xs, length, reverse, unroll, options
            )

        def replay(consts: list[Any], carry: list[Any], x: list[Any]) -> Any:
            out = jax.core.eval_jaxpr(closed.jaxpr, consts, *carry, *x)
            return out[:carries], out[carries:]

        def every_step(consts: list[Any], carry: list[Any], xs: list[Any]) -> Any:
            return _scan_reporting_every_step(
                bar, functools.partial(replay, consts), carry, xs, length, reverse,
                unroll, options,
            )  # fmt: skip

        stride = _chunk_size(length)
        const_avals = [var.aval for var in closed.jaxpr.constvars]
        keys = any(
            jnp.issubdtype(aval.dtype, jax.dtypes.prng_key)
            for aval in (*closed.in_avals, *closed.out_avals, *const_avals)
        )
        if (
            stride is None
            or not one_step_at_a_time
            or closed.effects
            or (keys and not _custom_jvp_takes_keys())
        ):
            consts, xs_leaves = list(closed.consts), jtu.tree_leaves(xs)
            final, ys = every_step(consts, init_leaves, xs_leaves)
        else:

            def in_chunks(consts: list[Any], carry: list[Any], xs: list[Any]) -> Any:
                return _scan_in_chunks(
                    bar, functools.partial(replay, consts), carry, xs, length, stride,
                    reverse, options,
                )  # fmt: skip

            scan = jax.custom_jvp(in_chunks)
            scan.defjvp(lambda primals, dots: jax.jvp(every_step, primals, dots))
            final, ys = scan(list(closed.consts), init_leaves, jtu.tree_leaves(xs))
        return carry_def.unflatten(final), jtu.tree_structure(y_shape).unflatten(ys)


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


def _scan_in_chunks(
    bar: "_ProgressBar",
    step: Callable[[Any, Any], tuple[Any, Any]],
    init: list[Any],
    xs: list[Any],
    length: int,
    stride: int,
    reverse: bool,
    options: dict[str, Any],
) -> tuple[Any, Any]:
    """The steps in chunks of `stride` (which divides `length`), with a host call
    before the first chunk and one after each."""
    chunks = length // stride
    first, then, last = _progress_callbacks(bar, stride, chunks + 1)
    jax.debug.callback(first)

    def chunk(state: tuple[Any, Any], x: Any) -> tuple[Any, Any]:
        index, carry = state
        carry, ys = jax.lax.scan(
            step, carry, x, length=stride, reverse=reverse, **options
        )
        # Tied to this chunk's arrays, so that it runs after its steps.
        done, operand = _after_arrays_of([carry, ys], index)
        jax.lax.cond(
            done == chunks - 1,
            lambda _: jax.debug.callback(last),
            lambda _: jax.debug.callback(then),
            operand,
        )
        return (index + 1, carry), ys

    (_, carry), ys = jax.lax.scan(
        chunk,
        (jnp.zeros((), jnp.int32), init),
        [x.reshape(chunks, stride, *x.shape[1:]) for x in xs],
        length=chunks,
        reverse=reverse,
        **options,
    )
    # Else XLA folds the reshapes into what consumes `ys` (a sum over two axes
    # instead of one, say), which then rounds differently than without the bar.
    return carry, _optimization_barrier([y.reshape(length, *y.shape[2:]) for y in ys])


def _after_arrays_of(tree: list[Any], index: jax.Array) -> tuple[jax.Array, Any]:
    """`index`, and an operand for the branch that reports, which XLA computes only
    once the arrays of `tree` are computed.

    An optimization barrier ties `index` to the smallest array, read whole, so that
    it works on any sharding (a slice of an explicitly sharded array may not be
    taken). Without one (old JAX), a value of that array is the branch's operand.
    """
    leaves = [leaf for leaf in jtu.tree_leaves(tree) if leaf.size]
    if not leaves:
        return index, index
    smallest = min(leaves, key=lambda leaf: leaf.size)
    if _is_key_array(smallest):
        smallest = jax.random.key_data(smallest)
    if _HAS_OPTIMIZATION_BARRIER:
        return _optimization_barrier((index, smallest))[0], index
    return index, jnp.ravel(smallest)[0]


# Public (and batchable) since jax 0.4.33 or so. Without it, consumers of a chunked
# loop's outputs may round differently than without the bar (the README says so).
_HAS_OPTIMIZATION_BARRIER = hasattr(jax.lax, "optimization_barrier")
_optimization_barrier = getattr(jax.lax, "optimization_barrier", lambda x: x)


def _scan_reporting_every_step(
    bar: "_ProgressBar",
    step: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any,
    length: int,
    reverse: bool,
    unroll: Any,
    options: dict[str, Any],
) -> tuple[Any, Any]:
    """`jax.lax.scan(step, ...)` with a step counter in the carry, which `step` never
    sees, reporting to `bar`. The counter counts up whatever the direction."""
    stride = _progress_stride(length)
    reported = {*range(0, length, stride), length - 1}
    first, then, last = _progress_callbacks(bar, stride, len(reported))

    @_named_after(step)
    def counted(state: tuple[Any, Any], x: Any) -> tuple[Any, Any]:
        index, traced_carry = state
        # 0: no report; 1: the first; 2: every `stride` steps; 3: the last.
        kind = jnp.where(
            index == length - 1,
            3,
            jnp.where(index == 0, 1, jnp.where(index % stride == 0, 2, 0)),
        )
        jax.lax.switch(
            kind,
            [
                lambda: None,
                lambda: jax.debug.callback(first),
                lambda: jax.debug.callback(then),
                lambda: jax.debug.callback(last),
            ],
        )
        new_carry, y = step(traced_carry, x)
        return (index + 1, new_carry), y

    (_, final), ys = jax.lax.scan(
        counted,
        (jnp.zeros((), jnp.int32), init),
        xs,
        length=length,
        reverse=reverse,
        unroll=unroll,
        **options,
    )
    return final, ys


def _scan_length(xs: Any, length: Any) -> int:
    """The number of steps, checked against the leading sizes of `xs`'s arrays."""
    if length is not None:
        length = _whole_number("length", length)
        if length < 0:
            raise ValueError(
                f"filter_scan: `length` must be non-negative; got {length}."
            )
    sizes: dict[str, int] = {}
    for path, leaf in jtu.tree_flatten_with_path(xs)[0]:
        if not eqx.is_array(leaf):
            continue
        if leaf.ndim == 0:
            raise _ScalarToScanError(
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
            + _lax_says(
                "scan",
                lambda xs: jax.lax.scan(lambda c, x: (c, x), None, xs, length),
                jax.ShapeDtypeStruct((size,), np.float32),
            )
        )
    return size


class _ScalarToScanError(ValueError, IndexError):
    """A 0-d array in `xs`. A `ValueError`, and an `IndexError` as well, since that is
    what `jax.lax.scan` and `jax.lax.map` raise for it."""


def _whole_number(name: str, value: Any) -> int:
    """A concrete whole number from a Python or NumPy number or a 0-d array."""
    if isinstance(value, str | bytes):
        whole = None
    else:
        try:
            whole = int(value)
        except jax.errors.ConcretizationTypeError:
            raise jax.errors.ConcretizationTypeError(
                value,
                f"filter_scan: `{name}` must be concrete, but it is traced. Pass a "
                "Python int, or compute it outside `jax.jit` (mark it static with "
                "`static_argnums`). For a loop whose length is only known inside the "
                "computation, use `jax.lax.while_loop`."
                + _lax_says(
                    "scan", lambda: jax.lax.scan(lambda c, x: (c, x), 0, None, value)
                ),
            ) from None
        except (TypeError, ValueError, OverflowError):
            whole = None
    if whole is None or bool(whole != value):
        raise TypeError(
            f"filter_scan: `{name}` must be a whole number (a Python int, a NumPy "
            f"integer or a 0-d integer array); got {_describe_leaf(value)}."
        )
    return whole


def _scan_unroll(unroll: Any) -> Any:
    """`unroll` as `jax.lax.scan` takes it: a bool, or a whole number it checks."""
    if isinstance(unroll, bool | np.bool_ | jax.core.Tracer):
        return unroll  # `jax.lax.scan` interprets bools, and rejects tracers itself.
    try:
        as_int = operator.index(unroll)
    except TypeError:
        raise TypeError(
            "filter_scan: `unroll` must be a bool or a non-negative int; got "
            f"{_describe_leaf(unroll)}."
        ) from None
    if as_int < 0:
        raise ValueError(
            f"filter_scan: `unroll` must be a bool or a non-negative int; got {as_int}."
        )
    return as_int


#
# filter_cond, filter_switch
#


@_cached_eagerly()
def filter_cond(
    pred: Any,
    true_fun: Callable[..., _Out],
    false_fun: Callable[..., _Out],
    *operands: Any,
    operand: Any = _NO_OPERAND,
) -> _Out:
    """As `jax.lax.cond`, except that the operands and outputs may be any pytree.

    Array leaves of `operands` are traced; every other leaf, Python numbers included,
    is passed to both branches unchanged. Only the chosen branch runs: under `jax.jit`
    this is a real `cond`, not a computation of both branches followed by a select.

    **Arguments:**

    - `pred`: a scalar boolean or number (array or Python value), as for
        `jax.lax.cond`.
    - `true_fun`, `false_fun`: called as `fun(*operands)`. They must return pytrees of
        the same structure. At each leaf, both return arrays or Python numbers (of the
        same shape and dtype, as `jax.lax.cond` requires), or equal static values.
    - `*operands`: the arguments to the branches. `operand=x` is accepted instead, as
        `jax.lax.cond` accepts it, and so is its older five-argument form.

    **Returns:**

    The output of the chosen branch. Where both branches return the same Python
    number (same type, same bits), it stays that number; where they return different
    numbers, or a number and an array, the output there is the array that
    `jax.lax.cond` makes.

    **Raises:**

    - `TypeError` if a branch is not callable, if `pred` is not a scalar, or if the
        branches return different structures or an array or number where the other
        returns something else (the same types as `jax.lax.cond`).
    - `ValueError` if the branches return different static values (ours alone). The
        message names the leaf path.

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
    if not (callable(true_fun) and callable(false_fun)):
        if callable(false_fun) and len(operands) == 2 and callable(operands[1]):
            # The older form `cond(pred, true_operand, true_fun, false_operand,
            # false_fun)`, which `jax.lax.cond` still accepts.
            true_operand, old_true_fun, false_operand, old_false_fun = (
                true_fun,
                false_fun,
                *operands,
            )
            return filter_cond(
                pred,
                lambda x, _: old_true_fun(x),
                lambda _, x: old_false_fun(x),
                true_operand,
                false_operand,
            )
        _check_callable("filter_cond", "true_fun", true_fun)
        _check_callable("filter_cond", "false_fun", false_fun)
    operands = _one_operand_form("filter_cond", operands, operand)
    _check_scalar(
        "filter_cond",
        "pred",
        pred,
        "Reduce it first, for example with `jnp.any` or `jnp.all`.",
    )

    def attempt(promoted: frozenset[int]) -> Any:
        branches = _Branches("filter_cond", operands, promoted)
        out = jax.lax.cond(
            pred,
            branches.wrap("true_fun", true_fun),
            branches.wrap("false_fun", false_fun),
            *branches.traced_operands(),
        )
        return branches.rebuild(out)

    return _with_promoted_numbers("filter_cond", attempt, operands)


def _check_scalar(function: str, name: str, value: Any, fix: str) -> None:
    if eqx.is_array(value) and value.shape != ():
        raise TypeError(
            f"{function}: `{name}` must be a scalar; got an array of shape "
            f"{tuple(value.shape)}. {fix}"
        )


@_cached_eagerly()
def filter_switch(
    index: Any,
    branches: Sequence[Callable[..., _Out]],
    *operands: Any,
    operand: Any = _NO_OPERAND,
) -> _Out:
    """As `jax.lax.switch`, except that the operands and outputs may be any pytree.

    Array leaves of `operands` are traced; every other leaf, Python numbers included,
    is passed to every branch unchanged. Under `jax.jit` only the chosen branch runs.

    **Arguments:**

    - `index`: a scalar integer (array or Python value). As in `jax.lax.switch`, it is
        clamped to `0, ..., len(branches) - 1`.
    - `branches`: a non-empty sequence of functions, each called as
        `branch(*operands)`. They must return pytrees of the same structure; at each
        leaf, arrays or Python numbers (of the same shape and dtype, as
        `jax.lax.switch` requires) or equal static values.
    - `*operands`: the arguments to the branches; `operand=x` is accepted instead, as
        `jax.lax.switch` accepts it.

    **Returns:**

    The output of the chosen branch. Where every branch returns the same Python number
    (same type, same bits) it stays that number; elsewhere a number becomes the array
    that `jax.lax.switch` makes.

    **Raises:**

    - `TypeError` if `branches` is not a sequence of callables, if `index` is not a
        scalar integer, or if the branches return different structures or an array or
        number where another returns something else (the types of `jax.lax.switch`).
    - `ValueError` if `branches` is empty, or if the branches return different static
        values (ours alone). The message names the leaf path.

    **Example:**

    ```python
    import jax.numpy as jnp
    from lerax_utils import filter_switch

    def walk(x, mode):
        return x + 1.0, mode

    def run(x, mode):
        return x + 2.0, mode

    def rest(x, mode):
        return x, mode

    value, mode = filter_switch(jnp.array(1), [walk, run, rest], jnp.zeros(2), "gait")
    print(value, mode)  # [2. 2.] gait
    ```
    """
    try:
        branches = tuple(branches)
    except TypeError:
        raise TypeError(
            "filter_switch: `branches` must be a sequence of functions; got "
            f"{_describe_leaf(branches)}."
        ) from None
    for i, branch in enumerate(branches):
        _check_callable("filter_switch", f"branches[{i}]", branch)
    if not branches:
        raise ValueError(
            "filter_switch: `branches` is empty; give at least one function."
        )
    operands = _one_operand_form("filter_switch", operands, operand)
    _check_scalar("filter_switch", "index", index, "Pass a single integer index.")

    def attempt(promoted: frozenset[int]) -> Any:
        wrapped = _Branches("filter_switch", operands, promoted)
        out = jax.lax.switch(
            index,
            [wrapped.wrap(f"branches[{i}]", fun) for i, fun in enumerate(branches)],
            *wrapped.traced_operands(),
        )
        return wrapped.rebuild(out)

    return _with_promoted_numbers("filter_switch", attempt, operands)


#
# filter_while_loop, filter_fori_loop
#

_WHILE_NAMES = _LoopNames(
    "filter_while_loop", "body_fun", "init_val", "close over it in `body_fun`"
)
_FORI_NAMES = _LoopNames(
    "filter_fori_loop", "body_fun", "init_val", "close over it in `body_fun`"
)


@_cached_eagerly()
def filter_while_loop(
    cond_fun: Callable[[_Carry], Any],
    body_fun: Callable[[_Carry], _Carry],
    init_val: _Carry,
) -> _Carry:
    """As `jax.lax.while_loop`, except that the carry may be any pytree. Array leaves
    are traced; Python numbers are traced once `body_fun` changes them; every other
    leaf is static.

    Use it to run until a condition holds with a module in the carry, for example an
    episode until it is done, with the policy and its function fields inside.

    **Arguments:**

    - `cond_fun`: `cond_fun(carry)` returns a scalar boolean: whether to run another
        step.
    - `body_fun`: `body_fun(carry)` returns the next carry, of the same structure.
    - `init_val`: the initial carry, split as in `filter_scan`: arrays are traced;
        Python numbers that `body_fun` gives back unchanged stay Python values, and
        those it changes are traced as `jax.lax.while_loop` traces them; other leaves
        are static and must come back unchanged.

    **Returns:**

    The final carry.

    **Raises:**

    - `TypeError` if a function is not callable, or if the carry changes structure or
        a traced leaf comes back as something that is not an array or a number (and,
        from JAX, if it changes shape or dtype, or `cond_fun` does not return a scalar
        boolean).
    - `ValueError` if a static leaf of the carry changes. The message names the leaf
        path.

    As `jax.lax.while_loop`, it can be differentiated forwards (`jax.jvp`) but not in
    reverse; use `filter_fori_loop` with concrete bounds, or `filter_scan`, for that.

    **Example:**

    ```python
    import jax.numpy as jnp
    from lerax_utils import filter_while_loop

    def not_done(carry):
        position, steps, name = carry
        return position < 1.0

    def step(carry):
        position, steps, name = carry
        return position + 0.3, steps + 1, name

    position, steps, name = filter_while_loop(not_done, step, (jnp.zeros(()), 0, "a"))
    print(steps, name)  # 4 a
    ```
    """
    _check_callable("filter_while_loop", "cond_fun", cond_fun)
    _check_callable("filter_while_loop", "body_fun", body_fun)

    def attempt(promoted: frozenset[int]) -> Any:
        carry = _LoopCarry(init_val, promoted, _WHILE_NAMES)

        @_named_after(cond_fun)
        def cond(traced: Any) -> Any:
            return cond_fun(carry.rebuild(traced))

        @_named_after(body_fun)
        def body(traced: Any) -> Any:
            return carry.check(body_fun(carry.enter(traced)))

        return carry.finish(jax.lax.while_loop(cond, body, carry.traced_part()))

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
    """As `jax.lax.fori_loop`, except that the carry may be any pytree, split as in
    `filter_while_loop`.

    **Arguments:**

    - `lower`, `upper`: the bounds, `lower <= i < upper`, as for `jax.lax.fori_loop`.
        With concrete bounds the loop is a scan, which can be differentiated in
        reverse; with traced bounds it is a while loop.
    - `body_fun`: `body_fun(i, carry)` returns the next carry, of the same structure.
    - `init_val`: the initial carry (see `filter_while_loop`).
    - `unroll`: as `jax.lax.fori_loop`; only with concrete bounds.
    - `progress`: ours alone, only with concrete bounds: `True` or a description
        draws a progress bar over the `upper - lower` steps, as in `filter_scan`.

    **Returns:**

    The final carry.

    **Raises:**

    As `filter_while_loop`, with `body_fun` named in the messages; JAX's own errors for
    the bounds (`TypeError` for bounds of different integer types) pass through.
    `TypeError` if `progress` is asked for with traced bounds, whose trip count is
    unknown until the loop runs.

    **Example:**

    ```python
    import jax.numpy as jnp
    from lerax_utils import filter_fori_loop

    def accumulate(i, carry):
        total, label = carry
        return total + i, label

    total, label = filter_fori_loop(0, 5, accumulate, (jnp.zeros(()), "sum"))
    print(total, label)  # 10.0 sum
    ```
    """
    _check_callable("filter_fori_loop", "body_fun", body_fun)
    description = _progress_description("filter_fori_loop", progress)
    bar, first, total = None, 0, 0
    if description is not None:
        # The checks of `jax.lax.fori_loop` on the bounds' types, first.
        jax.eval_shape(lambda: jax.lax.fori_loop(lower, upper, lambda i, c: c, 0))
        try:
            first, total = int(lower), int(upper) - int(lower)
        except TypeError as err:
            raise TypeError(
                "filter_fori_loop: `progress` needs concrete bounds, so that the "
                "number of steps is known before the loop runs, but `lower` or "
                "`upper` is traced. Pass Python ints as the bounds (mark them static "
                "under `jax.jit`), or leave `progress` out."
            ) from err
        bar = _make_bar(description, total)

    def attempt(promoted: frozenset[int]) -> Any:
        carry = _LoopCarry(init_val, promoted, _FORI_NAMES)

        @_named_after(body_fun)
        def body(i: Any, traced: Any) -> Any:
            return carry.check(body_fun(i, carry.enter(traced)))

        if bar is None:
            final = jax.lax.fori_loop(
                lower, upper, body, carry.traced_part(), unroll=unroll
            )
            return carry.finish(final)

        # As `jax.lax.fori_loop` runs a loop of known length: a scan whose carry
        # holds the index, a Python int (so weakly typed).
        @_named_after(body_fun)
        def counted(state: tuple[Any, Any], _: Any) -> tuple[Any, None]:
            i, traced = state
            return (i + 1, body(i, traced)), None

        (_, final), _ = _scan_with_bar(
            bar, counted, (first, carry.traced_part()), None, total, False,
            1 if unroll is None else unroll, {},
        )  # fmt: skip
        return carry.finish(final)

    with _tidy_on_error(bar):
        return _with_promoted_numbers("filter_fori_loop", attempt, init_val)


#
# filter_map
#

_MAP_TAKES_BATCH_SIZE = "batch_size" in inspect.signature(jax.lax.map).parameters


@_cached_eagerly("batch_size", "progress")
def filter_map(
    f: Callable[[_X], _Y],
    xs: _X,
    *,
    batch_size: int | None = None,
    progress: bool | str = False,
) -> _Y:
    """As `jax.lax.map`, except that `xs` and the outputs of `f` may be any pytree.

    Array leaves of `xs` are sliced along their leading axis and traced; other leaves
    are passed unchanged to every call. Array and Python-number leaves of the outputs
    are stacked, as `jax.lax.map` stacks them; other leaves are returned once.

    **Arguments:**

    - `f`: called as `f(x)` on each slice.
    - `xs`: the inputs. Its arrays must share their leading size.
    - `batch_size`: as `jax.lax.map` (which takes it from jax 0.4.31 on): map over
        batches of this many slices, each batch with `jax.vmap`.
    - `progress`: ours alone: `True` or a description draws a progress bar over the
        slices, as in `filter_scan`. Not with `batch_size`.

    **Returns:**

    The stacked outputs.

    **Raises:**

    - `TypeError` if `f` is not callable, or `batch_size` is given to a JAX whose
        `jax.lax.map` does not take it, or with `progress`.
    - `ValueError` if `xs` holds no arrays, or if the static part of `f`'s output
        differs between traces. JAX's own errors (different leading sizes) pass
        through.

    **Example:**

    ```python
    import jax.numpy as jnp
    from lerax_utils import filter_map

    def describe(x):
        return {"norm": jnp.linalg.norm(x["obs"]), "unit": x["unit"]}

    out = filter_map(describe, {"obs": jnp.ones((3, 4)), "unit": "m"})
    print(out["norm"], out["unit"])  # [2. 2. 2.] m
    ```
    """
    _check_callable("filter_map", "f", f)
    description = _progress_description("filter_map", progress)
    options = {}
    if batch_size is not None and description is not None:
        raise TypeError(
            "filter_map: `progress` cannot be combined with `batch_size`. Leave one "
            "of them out."
        )
    if batch_size is not None:
        if not _MAP_TAKES_BATCH_SIZE:
            raise TypeError(
                "filter_map: `batch_size` needs a JAX whose `jax.lax.map` takes it "
                f"(0.4.31 or newer); this is jax {jax.__version__}. Upgrade JAX, or "
                "leave `batch_size` out."
            )
        options["batch_size"] = batch_size
    inputs = _Split(xs, _arrays_traced)
    for i, leaf in enumerate(inputs.leaves):
        if eqx.is_array(leaf) and leaf.ndim == 0:
            raise _ScalarToScanError(
                f"filter_map: the array at `xs` path {inputs.path(i)} is a scalar "
                "(shape ()), so it has no leading axis to map over. Give it a leading "
                "axis, or make it a Python scalar to pass it unchanged to every call."
            )
    if not any(inputs.traced):
        raise ValueError(
            "filter_map: `xs` holds no arrays, so there is nothing to map over. Give "
            "it at least one array with a leading axis."
        )
    outputs: list[_Split] = []

    @_named_after(f)
    def mapped(traced_x: Any) -> Any:
        outputs.append(_Split(f(inputs.rebuild(traced_x)), _outputs_traced))
        return outputs[-1].traced_part()

    traced_xs = inputs.traced_part()
    bar = None
    if description is not None:
        sizes = {jnp.shape(leaf)[:1] for leaf in jtu.tree_leaves(traced_xs)}
        if len(sizes) == 1 and () not in sizes:  # Else `jax.lax.map` raises.
            bar = _make_bar(description, sizes.pop()[0])
    if bar is None:
        ys = jax.lax.map(mapped, traced_xs, **options)
    else:
        with _tidy_on_error(bar):
            _, ys = _scan_with_bar(
                bar, lambda c, x: (c, mapped(x)), None, traced_xs,
                jtu.tree_leaves(traced_xs)[0].shape[0], False, 1, {},
            )  # fmt: skip
    _static_outputs_agree("filter_map", "`f`'s output", "f", outputs)
    return outputs[0].rebuild(ys)


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
    JAX array leaves anywhere in the arguments (nested pytrees and keywords
    included), traced or not, are sent to the host through `jax.debug.callback`.
    NumPy arrays and NumPy scalars never touch a device: they are handed over on the
    host, with their dtype and bits unchanged (so a `float64` or an `int64` stays
    exact even with 64-bit mode off). Every other leaf (strings, `None`, Python
    numbers, functions, any object) reaches `func` unchanged, as the same object. So
    `log(step=3, loss=loss)` hands `func` the int `3`, not an array. On Linux,
    `func` runs with subnormal floats intact, although XLA's CPU runtime flushes
    them to zero while it runs the computation around the callback.

    The arguments are checked against `func`'s signature at the call (at trace time
    under `jit`), so a call that `func` itself would refuse raises `TypeError` there,
    not later when the computation runs.

    It behaves the same eagerly and under `jax.jit`, `eqx.filter_jit`, `jax.grad`
    (it sees the forward pass), and inside `filter_scan`, `jax.lax.scan` and
    `jax.lax.cond` bodies; under `jax.vmap` it calls `func` once per batch element.

    **Arguments:**

    - `func`: the host function. Its return value is ignored.
    - `ordered`: if `True`, calls happen in program order. JAX supports ordered
        callbacks only in computations on a single device: eagerly, arrays spread
        over several devices are gathered and the call happens at once, but inside
        `jit` an argument that spans several devices raises `ValueError`.
    - `partitioned`: passed to `jax.debug.callback`, where the installed JAX
        supports it: the callback may then run on each device with its shard of the
        arguments. With older JAX, `partitioned=True` raises `ValueError`.

    **Returns:**

    A function with the parameters of `func` that returns `None`, with `func`'s
    `__name__` and `__doc__`, and `func` as its `__wrapped__`.

    **Raises:**

    `TypeError` at once if `func` is not callable, or is a generator function, an
    `async def` function or an async generator function (calling those only creates
    an object that nothing would iterate or await, so their body would never run).
    The wrapped function raises `TypeError` if its arguments do not fit `func`'s
    signature. An exception raised by `func` is not caught: JAX reports it, eagerly
    at the call and otherwise when the computation runs (as a runtime error that
    names the original exception).

    Callbacks run asynchronously under `jit`. Call `jax.effects_barrier()` to wait
    for every pending callback, for example before reading a log file or exiting.
"""

# (test, what `func` is, what calling it creates): such functions never run their body.
_BODY_NEVER_RUNS = (
    (
        inspect.isasyncgenfunction,
        "an async generator function",
        "an async generator, which nothing here would iterate",
    ),
    (
        inspect.iscoroutinefunction,
        "an `async def` function",
        "a coroutine, which nothing here would await",
    ),
    (
        inspect.isgeneratorfunction,
        "a generator function",
        "a generator, which nothing here would iterate",
    ),
)


def _callable_name(func: Callable[..., Any]) -> str:
    func = getattr(func, "func", func)  # `functools.partial`: name what it wraps.
    name = getattr(func, "__name__", None)
    return name if isinstance(name, str) else type(func).__name__


def _check_host_function(function: str, func: Callable[..., Any]) -> None:
    if not callable(func):
        raise TypeError(
            f"{function}: `func` must be callable; got {_describe_leaf(func)}."
        )
    call = type(func).__call__  # For an object with an `async def __call__`.
    for is_kind, kind, creates in _BODY_NEVER_RUNS:
        if is_kind(func) or (not inspect.isroutine(func) and is_kind(call)):
            raise TypeError(
                f"{function}: `func` ({_callable_name(func)}) is {kind}. Calling it "
                f"only creates {creates}, so its body would never run. Wrap a plain "
                "function that does the work instead, for example one that runs it "
                "to completion."
            )


def _signature_or_none(func: Callable[..., Any]) -> inspect.Signature | None:
    """`func`'s signature, or `None` where Python cannot tell (some builtins)."""
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def _load_fenv() -> tuple[Any, Any] | None:
    """`fegetenv` and `fesetenv` from the C library, on Linux (where glibc and musl
    both take `(fenv_t *)-1` as the default environment), else `None`."""
    if not sys.platform.startswith("linux"):
        return None
    for library in ("libm.so.6", None):  # `None`: what the process has loaded.
        try:
            found = ctypes.CDLL(library)
            return found.fegetenv, found.fesetenv
        except (OSError, AttributeError):
            continue
    return None


_FENV = _load_fenv()
_DEFAULT_FENV = ctypes.c_void_p(-1)  # FE_DFL_ENV
_SMALLEST_NORMAL = sys.float_info.min


def _keeping_subnormals(body: Callable[[], None]) -> None:
    """Run `body()` with subnormal floats intact.

    XLA's CPU runtime runs a computation, and so the callbacks it makes, with the
    processor set to flush subnormal floats to zero. Python arithmetic, `.tolist()`
    and even `repr` then see them as 0.0 (`print` of 1e-310 shows `0.0`), so a
    logger would silently record a wrong number. Where the C library lets us,
    `body` runs in the default floating-point environment, and XLA's is restored
    after it.
    """
    if _FENV is None or _SMALLEST_NORMAL / 2 != 0.0:
        body()
        return
    get_environment, set_environment = _FENV
    saved = ctypes.create_string_buffer(256)  # Larger than any `fenv_t`.
    get_environment(saved)
    set_environment(_DEFAULT_FENV)
    try:
        body()
    finally:
        set_environment(saved)


def _send_to_host(
    caller: str,
    fix: str,
    func: Callable[..., Any],
    signature: inspect.Signature | None,
    ordered: bool | None,
    options: dict[str, bool],
    to_host: Callable[[Any, Any], Any],
    host_side: Callable[[Any], Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Call `func(*args, **kwargs)` on the host, from traced code or eagerly.

    JAX arrays and tracers travel through `jax.debug.callback` and are converted
    there by `to_host`; NumPy leaves stay on the host and are converted by
    `host_side`; every other leaf is passed as it is. `ordered=None` (for
    `print_callback`) orders the calls unless the computation may span several
    devices. `caller` names the function the user called in error messages, and
    `fix` says how to fix a call that does not fit `signature`.
    """
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(
                f"{caller}: the arguments do not fit the signature "
                f"{_callable_name(func)}{signature}: {err}. {fix}"
            ) from err
    leaves, treedef = jtu.tree_flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
    on_the_host = [
        i for i, leaf in enumerate(leaves) if isinstance(leaf, np.ndarray | np.generic)
    ]
    arrays = [leaves[i] for i in positions]
    template = list(leaves)  # Holds no array: a tracer must not outlive its trace.
    for position in positions:
        template[position] = None
    if ordered is None:
        ordered = _may_order(arrays)
    elif ordered:
        _check_ordered_on_one_device(caller, (args, kwargs), leaves, positions)
    # Typed PRNG keys cross to the host as raw key data: send the data, and wrap it
    # again there. Keyed by the index in `arrays`, as `on_host` looks them up.
    key_impls = {
        index: jax.random.key_impl(array)
        for index, array in enumerate(arrays)
        if _is_key_array(array)
    }
    arrays = [
        jax.random.key_data(array) if index in key_impls else array
        for index, array in enumerate(arrays)
    ]

    def call_func(host_arrays: tuple[Any, ...]) -> None:
        row = list(template)
        for index, (position, array) in enumerate(
            zip(positions, host_arrays, strict=True)
        ):
            row[position] = to_host(array, key_impls.get(index))
        for position in on_the_host:
            row[position] = host_side(row[position])
        host_args, host_kwargs = treedef.unflatten(row)
        func(*host_args, **host_kwargs)

    def on_host(*host_arrays: Any) -> None:
        # The conversions too: `.tolist()` would flush subnormal floats.
        _keeping_subnormals(functools.partial(call_func, host_arrays))

    jax.debug.callback(on_host, *arrays, **options, ordered=ordered)


def _spread_over(array: Any) -> int | None:
    """How many devices `array` spans. For a tracer, the size of the mesh in its
    abstract sharding (0 for none), or `None` where JAX does not record one."""
    if isinstance(array, jax.core.Tracer):
        mesh = getattr(getattr(array.aval, "sharding", None), "mesh", None)
        size = getattr(mesh, "size", None)
        return size if isinstance(size, int) else None
    return len(array.sharding.device_set)


def _check_ordered_on_one_device(
    caller: str, arguments: Any, leaves: list[Any], positions: list[int]
) -> None:
    """Inside `jit`, refuse an ordered callback with an argument that spans several
    devices, which JAX would refuse later, when compiling, naming no function.
    Eagerly the call happens at once, with sharded arrays gathered, so all is well."""
    for position in positions:
        array = leaves[position]
        if not isinstance(array, jax.core.Tracer):
            continue
        devices = _spread_over(array)
        if devices is not None and devices > 1:
            path = jtu.tree_flatten_with_path(arguments)[0][position][0]
            kind = "positional" if path[0] == jtu.SequenceKey(0) else "keyword"
            raise ValueError(
                f"{caller}: made with `ordered=True`, and called inside `jit` with "
                f"the {kind} argument at path {jtu.keystr(path[1:])}, an array of "
                f"shape {tuple(array.shape)} that spans {devices} devices; JAX runs "
                "ordered callbacks only in computations on one device. Make the "
                "wrapper with `ordered=False` (calls may then arrive in any order), "
                "or keep this computation on one device."
            )


def _may_order(arrays: list[Any]) -> bool:
    """Whether `print_callback` may ask for an ordered callback: always with a single
    device; otherwise only when traced arguments show a computation on one device.
    (Eagerly the call happens at once, so the choice does not matter there.)"""
    if jax.device_count() == 1:
        return True
    tracers = [array for array in arrays if isinstance(array, jax.core.Tracer)]
    counts = [_spread_over(tracer) for tracer in tracers]
    return bool(counts) and all(count is not None and count <= 1 for count in counts)


def _wrap_for_host(
    function: str,
    func: Callable[..., Any],
    ordered: bool,
    partitioned: bool,
    to_host: Callable[[Any, Any], Any],
    host_side: Callable[[Any], Any],
) -> Callable[..., None]:
    """Make `func` callable from traced code, converting arrays with `to_host` and
    NumPy values with `host_side`."""
    _check_host_function(function, func)
    for name, flag in (("ordered", ordered), ("partitioned", partitioned)):
        if not isinstance(flag, bool):
            raise TypeError(
                f"{function}: `{name}` must be a bool; got {_describe_leaf(flag)}."
            )
    options = {}
    if _DEBUG_CALLBACK_TAKES_PARTITIONED:
        options["partitioned"] = partitioned
    elif partitioned:
        raise ValueError(
            f"{function}: `partitioned=True` needs a `jax.debug.callback` that takes "
            f"`partitioned`, and the installed jax {jax.__version__} does not. "
            "Upgrade jax, or pass `partitioned=False`."
        )
    name = _callable_name(func)
    caller = f"{name} (made by {function})"
    fix = f"Pass the arguments that `{name}` itself takes."
    signature = _signature_or_none(func)

    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> None:
        _send_to_host(
            caller, fix, func, signature, ordered, options, to_host, host_side, args,
            kwargs,
        )  # fmt: skip

    return wrapped


# Conversions. On the host side of `jax.debug.callback`, `array` is what arrived and
# `key_impl` is the PRNG implementation when the leaf was a typed key (which travels
# as its raw key data). NumPy leaves never leave the host; the `_numpy_as_*`
# functions convert them there.


def _as_jax(array: Any, key_impl: Any) -> jax.Array:
    array = jnp.asarray(array)
    return array if key_impl is None else jax.random.wrap_key_data(array, impl=key_impl)


def _as_numpy(array: Any, key_impl: Any) -> np.ndarray:
    return np.asarray(array)


def _as_list(array: Any, key_impl: Any) -> Any:
    return np.asarray(array).tolist()


def _numpy_as_is(value: np.ndarray | np.generic) -> Any:
    return value


def _numpy_as_ndarray(value: np.ndarray | np.generic) -> np.ndarray:
    return np.asarray(value)


def _numpy_as_list(value: np.ndarray | np.generic) -> Any:
    return value.tolist()


def callback_wrapper(
    func: Callable[_Params, Any], ordered: bool = False, partitioned: bool = False
) -> Callable[_Params, None]:
    """Wrap `func` so that it can be called from inside `jax.jit`, with JAX array
    arguments as `jax.Array`s and NumPy ones as the very same objects.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import numpy as np
    from lerax_utils import callback_wrapper

    seen = []
    log = callback_wrapper(lambda tag, x, scale: seen.append((tag, x, scale)))
    scale = np.float64(0.1)

    @jax.jit
    def step(x):
        log("x", x * 2, scale)
        return x + 1

    step(jnp.arange(3.0))
    jax.effects_barrier()  # Wait for the callback before reading `seen`.
    tag, x, received = seen[0]
    assert tag == "x" and isinstance(x, jax.Array) and x.tolist() == [0.0, 2.0, 4.0]
    assert received is scale  # NumPy values never go through the device.
    ```
    """
    return _wrap_for_host(
        "callback_wrapper", func, ordered, partitioned, _as_jax, _numpy_as_is
    )


def callback_with_numpy_wrapper(
    func: Callable[..., Any], ordered: bool = False, partitioned: bool = False
) -> Callable[..., None]:
    """As `callback_wrapper`, but array arguments reach `func` as `numpy.ndarray`s
    (typed PRNG keys as their raw key data; a NumPy scalar as a 0-d array of its
    dtype).

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import numpy as np
    from lerax_utils import callback_with_numpy_wrapper

    metrics = []
    log = callback_with_numpy_wrapper(lambda **values: metrics.append(values))

    @jax.jit
    def step(params):
        log(loss=jnp.sum(params**2), steps=np.int64(3_000_000_000))
        return params * 0.5

    step(jnp.array([1.0, 2.0]))
    jax.effects_barrier()
    loss, steps = metrics[0]["loss"], metrics[0]["steps"]
    assert loss.dtype == np.float32 and loss == 5.0
    assert steps.dtype == np.int64 and steps == 3_000_000_000  # Not cast to 32 bits.
    ```
    """
    return _wrap_for_host(
        "callback_with_numpy_wrapper",
        func,
        ordered,
        partitioned,
        _as_numpy,
        _numpy_as_ndarray,
    )


def callback_with_list_wrapper(
    func: Callable[..., Any], ordered: bool = False, partitioned: bool = False
) -> Callable[..., None]:
    """As `callback_wrapper`, but array arguments, JAX and NumPy alike, reach `func`
    as nested Python lists (via `.tolist()`, so a 0-d array or a NumPy scalar becomes
    a Python number).

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    from lerax_utils import callback_with_list_wrapper

    history = []
    log = callback_with_list_wrapper(
        lambda step, loss: history.append((step, loss)), ordered=True
    )

    @jax.jit
    def train_step(step, params):
        log(step, jnp.sum(params**2))
        return params * 0.5

    params = jnp.array([1.0, 2.0])
    for step in range(3):
        params = train_step(step, params)
    jax.effects_barrier()
    assert history == [(0, 5.0), (1, 1.25), (2, 0.3125)]  # In order: ordered=True.
    ```
    """
    return _wrap_for_host(
        "callback_with_list_wrapper",
        func,
        ordered,
        partitioned,
        _as_list,
        _numpy_as_list,
    )


for _wrapper in (
    callback_wrapper,
    callback_with_numpy_wrapper,
    callback_with_list_wrapper,
):
    _summary, _example = (_wrapper.__doc__ or "").split("    **Example:**", 1)
    _wrapper.__doc__ = (
        f"{_summary.rstrip()}\n{_CALLBACK_NOTES}\n    **Example:**{_example}"
    )

_PRINT_SIGNATURE = _signature_or_none(print)
_PRINT_FIX = (
    "Pass what `print` takes: any positional arguments, and the keywords `sep`, "
    "`end`, `file` and `flush`."
)


def print_callback(*args: Any, **kwargs: Any) -> None:
    """`print`, from anywhere: eagerly, or inside `jax.jit`, `filter_scan` and friends.

    Array arguments are printed as lists (a 0-d array as a plain number). NumPy
    arrays and scalars never touch a device, so they print exactly as `print` would
    print their `.tolist()` (a `float64` keeps all its digits). Keyword arguments are
    those of `print` (`sep`, `end`, `file`, `flush`), and arguments that `print`
    would refuse raise `TypeError` at the call. Under `jit` the printing happens when
    the computation runs; `jax.effects_barrier()` waits for it.

    Calls print in program order, with one exception. JAX refuses ordered callbacks
    in a computation on several devices, so inside `jit` on a machine with several
    devices, `print_callback` prints unordered unless its traced arguments show that
    the computation stays on one device. Lines from different calls may then
    interleave or come out of order. Eagerly, arrays sharded over several devices
    are gathered and printed at once, in order.

    **Raises:**

    `TypeError` if `print` would not take the arguments.

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
    _send_to_host(
        "print_callback", _PRINT_FIX, print, _PRINT_SIGNATURE, None, {}, _as_list,
        _numpy_as_list, args, kwargs,
    )  # fmt: skip


#
# Progress bars: the `progress=` option of filter_scan, filter_fori_loop, filter_map
#
# A loop with a bar reports to the host through `jax.debug.callback` every `k` steps
# (and at the end), with `k` chosen from the length so that a loop makes at most
# `_PROGRESS_MAX_CALLBACKS` host calls however long it is: it runs as chunks of `k`
# steps (`_scan_in_chunks`), or, under differentiation, as one scan that checks its
# step count in every step (`_scan_reporting_every_step`). The count is never batched:
# under `jax.vmap` the loop draws one bar, not one per batch element. While a loop
# with a bar is being traced, loops traced inside its body draw none (the outer bar
# alone is shown). On the host, a bar redraws its line (`\r`) at most `1 /
# _PROGRESS_MIN_INTERVAL` times a second, and ends it with a newline when the count
# reaches the total.

_PROGRESS_MAX_CALLBACKS = 200
_PROGRESS_MIN_REPORTS = 5
_PROGRESS_STEPS_PER_REPORT = 2000
_PROGRESS_MIN_INTERVAL = 0.1  # Seconds between two redraws of a line.
# How many loops with a bar are being traced around this point, per thread.
_progress_tracing = threading.local()
_progress_lock = threading.Lock()
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
    """Report every `k`-th step: the steps `0, k, 2k, ...` and the last one make at
    most `_PROGRESS_MAX_CALLBACKS` calls.

    A host call costs tens of microseconds, as much as thousands of small steps, so
    a loop reports `_PROGRESS_MIN_REPORTS` times (every 20%), and once more per
    `_PROGRESS_STEPS_PER_REPORT` steps beyond that, up to the bound.
    """
    reports = max(
        min(total, _PROGRESS_MIN_REPORTS), total // _PROGRESS_STEPS_PER_REPORT
    )
    reports = min(reports, _PROGRESS_MAX_CALLBACKS - 1)
    return max(1, -(-total // reports))


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class _ProgressBar:
    """One loop's bar: what it shows, and its state on the host. A compiled loop
    reuses it on every run; a report of count 0 starts a new run."""

    def __init__(self, description: str, total: int):
        self.description = description
        self.total = total
        self.count = 0
        self.start = 0.0
        self.last_draw = -math.inf
        self.width = 0  # Of the last line: a shorter one must blank it out.
        self.reports = 0  # Of the current run, so far.
        self.started = False  # Whether the current run's first report came.

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else math.nan
        left = (self.total - self.count) / rate if rate > 0 else math.nan
        percent = 100 * self.count // self.total
        label = f"{self.description}: " if self.description else ""
        rate_text = f"{rate:.2f} it/s" if math.isfinite(rate) else "? it/s"
        return (
            f"{label}{percent:3d}% {self.count}/{self.total} "
            f"[{_format_seconds(elapsed)}<{_format_seconds(left)}, {rate_text}]"
        )

    def draw(self, now: float, end: str) -> None:
        text = self.line(now)
        stream = sys.stderr
        stream.write("\r" + text.ljust(self.width) + end)
        stream.flush()
        self.width = len(text)
        self.last_draw = now


def _end_open_lines() -> None:
    """End the line of every bar left part-way (a loop that stopped on an error), so
    that what is written next starts on a line of its own."""
    with _progress_lock:
        if _open_bars:
            sys.stderr.write("\n")
            sys.stderr.flush()
        _open_bars.clear()


atexit.register(_end_open_lines)


def _progress_update(bar: _ProgressBar, count: int) -> None:
    """On the host: the loop of `bar` has reached step `count`."""
    now = time.monotonic()
    with _progress_lock:
        if count == 0 or bar not in _open_bars:
            if _open_bars:
                sys.stderr.write("\n")
            _open_bars.clear()
            _open_bars.add(bar)
            bar.start, bar.count, bar.width, bar.last_draw = now, 0, 0, -math.inf
        bar.count = max(bar.count, count)  # Counts never go backwards.
        if bar.count >= bar.total:
            bar.draw(now, "\n")
            _open_bars.discard(bar)
        elif now - bar.last_draw >= _PROGRESS_MIN_INTERVAL:
            bar.draw(now, "")


def _chunk_size(length: int) -> int | None:
    """Steps per chunk, for a loop run in chunks: the divisor of `length` nearest to
    `_progress_stride(length)`, or `None` if none is within a factor of two of it
    (or within the bound on host calls)."""
    target = _progress_stride(length)
    fewest = -(-length // (_PROGRESS_MAX_CALLBACKS - 1))
    near = [
        size
        for size in _divisors(length)
        if max(fewest, target // 2) <= size <= 2 * target
    ]
    return min(near, key=lambda size: (abs(size - target), size), default=None)


@functools.lru_cache(maxsize=256)
def _divisors(number: int) -> list[int]:
    """Every divisor of `number` (at least 1), by trial division."""
    divisors, factor = [1], 2
    while factor * factor <= number:
        power = 0
        while number % factor == 0:
            number //= factor
            power += 1
        divisors = [d * factor**k for d in divisors for k in range(power + 1)]
        factor += 1 if factor == 2 else 2
    if number > 1:
        divisors += [d * number for d in divisors]
    return divisors


def _progress_callbacks(
    bar: _ProgressBar, stride: int, reports: int
) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """The host calls of a loop that reports `reports` times a run: first at its
    start, then every `stride` steps, last at its end.

    They take no operands and are unordered, as either would cost several times
    more, so they may reach the host in any order (and do: XLA runs a report as
    soon as nothing holds it back). So a run's reports are counted as they come:
    the `n`-th shows `n * stride` steps, and the run's last one the total. A second
    `first` before a run is complete starts a new run: the one before stopped on
    an error.
    """

    def report(kind: str) -> Callable[[], None]:
        def call() -> None:
            with _progress_lock:
                if kind == "first":
                    if bar.started:
                        bar.reports = 0
                    bar.started = True
                index = bar.reports
                bar.reports += 1
                if bar.reports == reports:
                    bar.reports, bar.started = 0, False
            _progress_update(bar, bar.total if index == reports - 1 else index * stride)

        return call

    return report("first"), report("then"), report("last")


@contextlib.contextmanager
def _progress_body() -> Iterator[None]:
    """While a loop body with a bar is traced: loops inside it draw no bar."""
    depth = getattr(_progress_tracing, "depth", 0)
    _progress_tracing.depth = depth + 1
    try:
        yield
    finally:
        _progress_tracing.depth = depth


def _make_bar(description: str | None, total: int) -> _ProgressBar | None:
    if description is None or total <= 0 or getattr(_progress_tracing, "depth", 0):
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

# A checkpoint is a safetensors file (the README documents it byte by byte):
#   header length N (u64) | header: UTF-8 JSON, padded with spaces so that 8 + N is a
#   multiple of 8 | every array leaf's bytes, back to back, in flattening order.
# The JSON maps each array leaf's path to its safetensors dtype, shape and offsets; all
# else of ours is in its `__metadata__` (str -> str), with a CRC-32 per tensor and one
# of the header itself. Files of format 1 (the first release) are still read:
#   magic (8 bytes) | format version (u32) | header length (u64) | header CRC-32 (u32)
#   | header (UTF-8 JSON) | the array leaves' bytes | one CRC-32 (u32) per array leaf.
_FORMAT = "lerax_utils"
_FORMAT_VERSION = 2
_LENGTH = struct.Struct("<Q")
_MAX_HEADER_BYTES = 64 * 1024 * 1024
# JSON lists and objects in each part of a header (the `[` and `{` outside its
# strings), which bound the memory and time to parse it: about 6 per array leaf.
_MAX_CONTAINERS = 1 << 21
_MAX_DIMENSIONS = 64  # As NumPy.
_CRC_SLOT = b'"metadata_crc32":"'
_ZERO_CRC = "00000000"
_V1_MAGIC = b"LRXCKPT\x00"
_V1_PREFIX = struct.Struct("<8sIQI")
_V1_CHECKSUM = struct.Struct("<I")
_NUMPY_MAGIC = b"\x93NUMPY"  # Plain `eqx.tree_serialise_leaves` files start so.
_SUFFIX = ".eqx"
# Dtypes that safetensors names; every other dtype is stored as `U8` bytes, with its
# true name in our metadata.
_SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "float16": "F16",
    "bfloat16": "BF16",
    "uint32": "U32",
    "int32": "I32",
    "float32": "F32",
    "uint64": "U64",
    "int64": "I64",
    "float64": "F64",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
}
_OTHER_DTYPES = (
    "complex64",
    "complex128",
    "int4",
    "uint4",
    "int2",
    "uint2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e4m3b11fnuz",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e8m0fnu",
    "float4_e2m1fn",
)
_KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# Dtypes narrower than their byte: the unused high bits of each byte must be zero.
_SUB_BYTE_DTYPES = ("int4", "uint4", "int2", "uint2", "float4_e2m1fn")
_MAX_INT_DIGITS = 4300  # Python's default limit on converting an int to text.


@functools.cache
def _checkpoint_dtypes() -> dict[str, np.dtype]:
    """Every dtype a checkpoint may hold, by name: those of the installed JAX."""
    found = {}
    for name in (*_SAFETENSORS_DTYPES, *_OTHER_DTYPES):
        kind = getattr(jnp, name, None)
        if kind is not None:
            found[name] = np.dtype(kind)
    return found


@functools.cache
def _key_impl_types() -> dict[str, tuple[Any, tuple[int, ...], np.dtype]]:
    """For each PRNG implementation: its key dtype, key data shape and data dtype."""
    found = {}
    for name in _KEY_IMPLS:
        key = jax.random.key(0, impl=name)
        data = jax.random.key_data(key)
        found[name] = (key.dtype, tuple(data.shape), np.dtype(data.dtype))
    return found


@dataclasses.dataclass(frozen=True)
class _Api:
    """How the checkpoint functions that the user called are named in messages."""

    save: str
    load: str
    save_call: str  # What to call instead, in a message about a vmap.
    tree: str
    skeleton: str
    built: str
    fix: str


_SERIALIZABLE_API = _Api(
    save="Serializable.serialize",
    load="Serializable.deserialize",
    save_call="serialize",
    tree="model",
    skeleton="the skeleton",
    built="the skeleton built from the constructor arguments",
    fix="Pass the constructor arguments the model was saved with",
)
_PYTREE_API = _Api(
    save="save_pytree",
    load="load_pytree",
    save_call="save_pytree",
    tree="tree",
    skeleton="`like`",
    built="`like`",
    fix="Pass a `like` with the structure, shapes and dtypes of the saved tree",
)
# The function the user called, for the messages of the helpers below it: those of
# `Serializable` unless `save_pytree` or `load_pytree` set it. A save inside a trace
# sets it again in its host callback, which runs in another thread.
_API: contextvars.ContextVar[_Api] = contextvars.ContextVar(
    "lerax_utils_checkpoint_api", default=_SERIALIZABLE_API
)


@contextlib.contextmanager
def _calling(api: _Api) -> Iterator[None]:
    token = _API.set(api)
    try:
        yield
    finally:
        _API.reset(token)


class _Arguments:
    """The constructor arguments a `Serializable` was made with, ready for JSON.

    A static field holds it, so it follows the model through every pytree operation.
    It is history, not identity: every recording equals every other one, so two
    models built with different arguments (different PRNG keys, different Python
    numbers that become traced) keep the same tree structure, stack, and share
    compiled code, as they did before arguments were recorded.
    """

    __slots__ = ("recording",)

    def __init__(self, recording: dict[str, Any] | None) -> None:
        self.recording = recording

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Arguments)

    def __hash__(self) -> int:
        return hash(_Arguments)

    def __repr__(self) -> str:
        return "<recorded constructor arguments>"


_NOT_RECORDED = _Arguments(None)
_ARGUMENTS_FIELD = "_lerax_arguments"
_PENDING = "_lerax_pending_arguments"


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
    policy = Policy.deserialize("checkpoints/run.1")  # recorded: 4, key of shape ()
    policy = Policy.deserialize("checkpoints/run.1", 4, key=jax.random.key(1))
    ```

    A checkpoint is a safetensors file: any safetensors reader lists its arrays by
    leaf path. Its metadata holds the format version, the library version, a
    description of the structure and static values that is the same in every
    process, the Python numbers, the recorded constructor arguments, and CRC-32
    checksums of every array and of the header. Loading checks all of it against a
    skeleton of the model, so a file never loads into the wrong model silently. No
    pickle is involved: loading never runs code from the file.

    Each model records the arguments its constructor was called with, in a static
    field that survives `eqx.tree_at`, `filter_scan`, optax updates and
    `stack_pytree`: JSON values (None, bools, ints, floats, strings, and lists,
    tuples and dicts of them) as they are, arrays and PRNG keys as their shape and
    dtype only. Recordings always compare equal, so models built with different
    keys or numbers still have the same tree structure. An argument that cannot be
    recorded (a function, another object) is noted by its type and does not stop a
    save; a model made without its constructor records nothing.
    """

    _lerax_arguments: _Arguments = eqx.field(
        static=True, default=_NOT_RECORDED, init=False, repr=False
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # Only the outermost constructor call gets here: a `super().__init__(...)`
        # inside `__init__` does not, nor does unflattening a pytree. Copying and
        # unpickling get here without arguments, and without `__init__`: they must
        # leave nothing behind.
        self = super().__new__(cls)
        if args or kwargs:
            object.__setattr__(self, _PENDING, _record_call(args, kwargs))
        return self

    def __check_init__(self) -> None:
        # Equinox calls this once `__init__` has finished and every check passed.
        pending = vars(self).pop(_PENDING, None) or {"args": [], "kwargs": []}
        recording = {"class": type(self).__qualname__, **pending}
        object.__setattr__(self, _ARGUMENTS_FIELD, _Arguments(recording))

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
        raises leaves the old file as it was and no temporary file behind. A new
        file gets the mode `open()` would give it (the umask applies); an
        overwritten one keeps its mode.

        Eagerly, the file is complete when `serialize` returns. Inside any trace
        (`jax.jit`, `eqx.filter_jit`, a `filter_scan` body, a `filter_cond` branch),
        even for a model with no traced leaves, it is written by an ordered host
        callback when the computation runs, in program order; call
        `jax.effects_barrier()` before reading it. Arrays sharded over several
        devices are gathered; arrays that span several processes
        (`jax.distributed`) are saved by calling `serialize` in every process (see
        the README). Under `jax.vmap` or `eqx.filter_vmap` with batched
        leaves it raises: one path cannot hold a population member by member. Under
        `jax.grad` the values are saved and not differentiated (jax 0.4.26 refuses
        this with its own `ValueError: IO callbacks do not support JVP`), with two
        limits of JAX: inside a `jax.lax.scan` body that is differentiated nothing
        is written, silently (JAX drops the ordered callback), and under
        `jax.grad(jax.checkpoint(...))` JAX raises its own `NotImplementedError`.

        `model.serialize(path)` is `save_pytree(path, model)`, except that messages
        name `Serializable.serialize`.

        **Raises:**

        - `TypeError` if `path` is not a `str` or `os.PathLike`, `no_suffix` is not
            a bool, or a leaf cannot be restored exactly (a masked, object or
            structured NumPy array, or one of a dtype that neither JAX nor the
            NumPy strings and dates have, a `jax.ShapeDtypeStruct`, a Python int of
            more than 4300 digits, or a PRNG key of a custom implementation).
        - `ValueError` if `path` is empty, names a folder or an existing file that
            is not a regular file (a FIFO), two array leaves have the same path, the
            header would exceed the limits `deserialize` reads, or the model is
            batched by `vmap`.
        """
        with _calling(_SERIALIZABLE_API):
            _save(path, self, no_suffix)

    @classmethod
    def deserialize(
        cls: type[_Model], path: str | os.PathLike[str], /, *args: Any, **kwargs: Any
    ) -> _Model:
        """Load a model saved by `serialize` (or by `save_pytree`).

        **Arguments:**

        - `path`: the path given to `serialize`, with either value of `no_suffix`:
            `path` itself if that file exists, else `path` with `.eqx` appended.
        - `*args`, `**kwargs`: the constructor's arguments, or none at all to use
            the ones recorded in the file. They build a skeleton of the model with
            `eqx.filter_eval_shape`, so no parameters are allocated or initialised;
            the file must match it. Arguments passed here win over the recorded
            ones. Recorded arrays and PRNG keys reach the constructor as shapes and
            dtypes (as under `eqx.filter_eval_shape`), recorded NumPy strings and
            dates as zeros of their shape and dtype. With recorded arguments, a
            Python number of the skeleton that the file holds as a 0-d array (one
            traced by a `filter_scan` after construction) is taken as that array.

        **Returns:**

        An instance of the class `deserialize` is called on, with the saved arrays
        (NumPy arrays and scalars stay NumPy, with their saved dtype) and the saved
        Python numbers in place. Every other leaf comes from the skeleton, after a
        check that it equals the saved description. The model keeps the recording
        of the arguments that the file holds, so saving it again writes the same
        file.

        **Raises:**

        - `FileNotFoundError` if neither candidate file exists.
        - `TypeError` if the skeleton cannot be built, because the constructor needs
            concrete values of its array arguments; or, without arguments, if the
            file recorded an argument that it could not hold (a function, an
            object), or recorded none (a file of an older lerax_utils or of plain
            Equinox, or a model made without its constructor) and the constructor
            needs some. The message names the argument.
        - `ValueError` if the file is not a checkpoint (empty, a text file, random
            bytes, a safetensors file of another program), is truncated or has
            trailing bytes, was written by a newer format version, is corrupt (a
            checksum fails) or malformed, or does not match the skeleton: a
            different leaf count, structure, static value, shape or dtype. The
            message names the first differing leaf path and both sides. Without
            arguments, also if the file holds a model of another class.

        Files written by plain `eqx.tree_serialise_leaves` load too, with Equinox's
        own checks only, as do files of format 1 (lerax_utils 0.1.0).
        """
        # Messages name `Serializable` by default (see `_API`).
        source = _find_checkpoint(path)
        skeleton = _skeleton(cls, args, kwargs, str(source))
        with open(source, "rb") as file:
            return _read_checkpoint(file, skeleton, str(source))

    @classmethod
    def deserialize_sharded(
        cls: type[_Model],
        path: str | os.PathLike[str],
        sharding: jax.sharding.Sharding | Callable[[Any], Any],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> _Model:
        """As `deserialize`, except that the JAX arrays are created with shardings.

        Each process reads from the file only the shards of its own devices, straight
        into them: a model sharded over several devices is never whole on one, nor in
        host memory. Every checksum is still verified, by streaming each array through
        a buffer of at most 16 MB.

        **Arguments:**

        - `path`: as for `deserialize`.
        - `sharding`: either one `jax.sharding.Sharding` for every JAX array and PRNG
            key leaf, or a callable that takes the skeleton (its arrays are
            `jax.ShapeDtypeStruct`s) and returns a pytree of the same structure with a
            `Sharding`, or None to load as `deserialize` does, at each array leaf.
            NumPy leaves stay NumPy arrays on the host whatever their sharding.
        - `*args`, `**kwargs`: the constructor's arguments, as for `deserialize`.
            `sharding` comes before them, so it never collides with a constructor
            keyword.

        **Returns:**

        As `deserialize`, with each JAX array's `.sharding` the one asked for.

        **Raises:**

        As `deserialize`, and:

        - `TypeError` if `sharding` is neither a `Sharding` nor callable, or the
            callable gives something else than a `Sharding` or None at an array leaf.
        - `ValueError` if the callable's pytree has another structure than the
            skeleton, or a sharding does not fit its leaf's shape (a mesh axis that
            does not divide the dimension it shards).

        With several processes (`jax.distributed`), every process calls it with the
        same global sharding, as for any JAX computation on global arrays.

        ```python
        mesh = Mesh(np.array(jax.devices()), ("data",))
        by_rows = NamedSharding(mesh, PartitionSpec("data"))
        model = Model.deserialize_sharded("checkpoints/run", by_rows, 32)
        ```
        """
        source = _find_checkpoint(path)
        skeleton = _with_shardings(_skeleton(cls, args, kwargs, str(source)), sharding)
        with open(source, "rb") as file:
            return _read_checkpoint(file, skeleton, str(source))


def save_pytree(
    path: str | os.PathLike[str], tree: Any, *, no_suffix: bool = False
) -> None:
    """Save any pytree to `path`, atomically, as `Serializable.serialize` saves a model.

    **Arguments:**

    - `path`: where to save. `.eqx` is appended unless the name already ends in
        `.eqx`; missing parent folders are created.
    - `tree`: any pytree, for example a whole training state
        `(model, opt_state, key, step)`: Equinox modules, optax states, JAX and
        NumPy arrays, typed PRNG keys, Python numbers, and static values.
    - `no_suffix`: if `True`, save to exactly `path`.

    The file format, the checks, the atomic write (a temporary file, fsync, rename)
    and the behaviour inside `jax.jit`, a `filter_scan` body or a `filter_cond`
    branch (an ordered host callback writes it when the computation runs; call
    `jax.effects_barrier()` before reading it) are those of
    `Serializable.serialize`. `Serializable` models inside `tree` keep their
    recorded constructor arguments in the file.

    **Raises:**

    As `Serializable.serialize`, naming `save_pytree`.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import numpy as np
    from lerax_utils import load_pytree, save_pytree

    state = {"w": jnp.ones(3), "seen": np.arange(2), "key": jax.random.key(0)}
    save_pytree("checkpoints/state", (state, 100))  # checkpoints/state.eqx
    state, step = load_pytree("checkpoints/state", (state, 0))
    print(step)  # 100
    ```
    """
    with _calling(_PYTREE_API):
        _save(path, tree, no_suffix)


def load_pytree(path: str | os.PathLike[str], like: _Tree) -> _Tree:
    """Load a pytree saved by `save_pytree` (or by `Serializable.serialize`).

    **Arguments:**

    - `path`: the path given to `save_pytree`, with either value of `no_suffix`:
        `path` itself if that file exists, else `path` with `.eqx` appended.
    - `like`: a pytree of the structure that was saved: the tree itself or one like
        it (array values are ignored), or its shapes from `eqx.filter_eval_shape`,
        with `jax.ShapeDtypeStruct` leaves. Its array leaves become shapes and
        dtypes as under `eqx.filter_eval_shape` (NumPy strings and dates stay as
        they are), and the file is checked against it exactly as
        `Serializable.deserialize` checks a file against its skeleton: structure,
        static values, leaf count, shapes and dtypes. A JAX array leaf sharded over
        several devices passes its sharding on, as a `jax.ShapeDtypeStruct` leaf
        does.

    **Returns:**

    A pytree of the structure of `like`, with the saved arrays (JAX arrays, PRNG
    keys of their saved impl, NumPy arrays and scalars with their saved dtype) and
    the saved Python numbers; every other leaf comes from `like`, after a check that
    it equals the saved description. `Serializable` models in it keep the recorded
    constructor arguments that the file holds.

    **Raises:**

    As `Serializable.deserialize`, naming `load_pytree`: `FileNotFoundError` if
    neither candidate file exists, `ValueError` if the file is not a checkpoint, is
    damaged, or does not match `like`.
    """
    with _calling(_PYTREE_API):
        checkpoint = _find_checkpoint(path)
        skeleton = _like_skeleton(like, str(checkpoint))
        with open(checkpoint, "rb") as opened:
            return _read_checkpoint(opened, skeleton, str(checkpoint))


def _save(path: Any, tree: Any, no_suffix: Any) -> None:
    """The body of `save_pytree` and `Serializable.serialize`."""
    api = _API.get()
    try:
        target = _checkpoint_path(api.save, path, no_suffix)
        _check_target(target)
    except Exception as err:
        if _spans_processes(tree):
            _fail_across_processes(err)
        raise
    leaves, treedef = jtu.tree_flatten_with_path(tree)
    traced = [isinstance(leaf, jax.core.Tracer) for _, leaf in leaves]
    if not any(traced) and not _inside_a_trace():
        _write_checkpoint(tree, target)
        return
    # Inside a trace: the traced leaves travel to the host (typed keys as their
    # key data); the others are known now, checked now, and stay here.
    _check_saveable(leaves)  # Refuse at trace time, not in the callback.
    for key_path, leaf in leaves:
        if isinstance(leaf, np.ndarray | np.generic):
            _host_array(_keystr(key_path), leaf)
    template = [
        None if t else leaf for (_, leaf), t in zip(leaves, traced, strict=True)
    ]
    operands, kinds = [], {}
    for index, ((_, leaf), is_traced) in enumerate(zip(leaves, traced, strict=True)):
        if not is_traced:
            continue
        if _is_key_array(leaf):
            kinds[index] = ("key", _key_impl_name(leaf))
            leaf = jax.random.key_data(leaf)
        else:
            kinds[index] = ("jax_weak" if _is_weak(leaf) else "jax", None)
        operands.append(jax.lax.stop_gradient(leaf))  # Saved, not differentiated.

    def write(*arrays: Any) -> None:
        host = list(template)
        for index, array in zip(kinds, arrays, strict=True):
            host[index] = np.asarray(array)
        with _calling(api):
            _write_checkpoint(treedef.unflatten(host), target, kinds)

    try:
        io_callback(write, None, *operands, ordered=True)
    except ValueError as err:
        if "vmap" not in str(err):
            raise
        raise ValueError(
            f"{api.save}: the {api.tree} is batched by `jax.vmap` or "
            "`eqx.filter_vmap`, and one path cannot hold every member of a "
            f"batch. Call `{api.save_call}` outside the vmap, on the stacked "
            f"{api.tree}."
        ) from err


def _checkpoint_path(function: str, path: Any, no_suffix: Any) -> pathlib.Path:
    if not isinstance(path, str | os.PathLike) or isinstance(os.fspath(path), bytes):
        raise TypeError(
            f"{function}: `path` must be a str or os.PathLike; got "
            f"{_describe_leaf(path)}."
        )
    if not isinstance(no_suffix, bool):
        raise TypeError(
            f"{function}: `no_suffix` must be True or False; got "
            f"{_describe_leaf(no_suffix)}."
        )
    text = os.fspath(path)
    if not text:
        raise ValueError(
            f"{function}: `path` is empty. Pass a file name, such as 'checkpoints/run'."
        )
    checked = pathlib.Path(text)
    if os.path.basename(text) in ("", ".", "..") or text.endswith(("/", os.sep)):
        raise ValueError(
            f"{function}: `path` '{text}' names a folder, not a file. "
            f"Pass a file name inside it, such as '{checked / 'model'}'."
        )
    if no_suffix or checked.name.endswith(_SUFFIX):
        return checked
    return checked.with_name(checked.name + _SUFFIX)


def _check_target(target: pathlib.Path) -> None:
    """Refuse a target that exists and is not a regular file (a folder, a FIFO)."""
    try:
        mode = os.stat(target).st_mode
    except OSError:  # None there yet (or a dangling link): the save creates it.
        return
    function = _API.get().save
    if stat.S_ISDIR(mode):
        raise ValueError(
            f"{function}: `path` '{target}' names a folder, not a file. "
            f"Pass a file name inside it, such as '{target / 'model'}'."
        )
    if not stat.S_ISREG(mode):
        raise ValueError(
            f"{function}: `path` '{target}' exists and is not a regular "
            "file (a FIFO, socket or device). Pass the name of a new or regular file."
        )


def _find_checkpoint(path: str | os.PathLike[str]) -> pathlib.Path:
    api = _API.get()
    exact = _checkpoint_path(api.load, path, no_suffix=True)
    suffixed = _checkpoint_path(api.load, path, no_suffix=False)
    for candidate in (exact, suffixed):
        if candidate.is_file():
            return candidate
    tried = f"'{exact}'" if exact == suffixed else f"'{exact}' or '{suffixed}'"
    raise FileNotFoundError(
        f"{api.load}: no checkpoint at {tried}. Check the path given "
        f"to `{api.save_call}`."
    )


def _inside_a_trace() -> bool:
    """Whether JAX is tracing here, even if no argument is a tracer."""
    return isinstance(jnp.zeros((), jnp.uint8), jax.core.Tracer)


_CONCRETE_VALUE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


def _skeleton(cls: type, args: Any, kwargs: Any, source: str | None = None) -> Any:
    """As `eqx.filter_eval_shape(cls, *args, **kwargs)`, except that NumPy arrays
    JAX cannot describe (strings, dates, big-endian) stay concrete, on both sides,
    and `jax.ShapeDtypeStruct` arguments stand for arrays.

    With the checkpoint `source`: without arguments, those recorded in it are used;
    and each `Serializable` in the skeleton takes the recording that the file holds
    for its path, so that the loaded model carries it.
    """
    metadata = _checkpoint_metadata(source) if source is not None else {}
    recorded = _parse_arguments(metadata.get("arguments"), cast(str, source))
    from_file = source is not None and not args and not kwargs
    if from_file:
        args, kwargs = _recorded_call(cls, recorded.get(""), cast(str, source))
    dynamic, static = eqx.partition((args, kwargs), _is_dynamic_argument)
    kept = []

    def build(dynamic: Any) -> Any:
        call_args, call_kwargs = eqx.combine(dynamic, static)
        traced, concrete = eqx.partition(
            cls(*call_args, **call_kwargs), _is_jax_describable
        )
        kept.append(concrete)
        return traced

    try:
        shapes = jax.eval_shape(build, dynamic)
    except _CONCRETE_VALUE_ERRORS as err:
        raise TypeError(
            f"Serializable.deserialize: could not build a skeleton of "
            f"{cls.__qualname__}: its constructor, called with the given arguments "
            "under `eqx.filter_eval_shape` (arrays as shapes and dtypes, without "
            f"values), needs a concrete value ({type(err).__name__}). Keep JAX "
            "values as JAX arrays in the constructor (no `np.asarray`, `float()` or "
            "`if` on them), or compute such values after loading."
        ) from err
    except Exception as err:
        if from_file and "" in recorded:
            raise TypeError(
                f"{_API.get().load}: the file '{source}' records constructor "
                f"arguments with which `{cls.__qualname__}` failed to build "
                f"({type(err).__name__}: {err}). Pass the constructor arguments: "
                f"`{cls.__qualname__}.deserialize(path, *args, **kwargs)`."
            ) from err
        if not from_file or not isinstance(err, TypeError):
            raise
        raise TypeError(
            f"Serializable.deserialize: the file '{source}' records no constructor "
            "arguments for its top level (it was written by an older lerax_utils or "
            "by plain Equinox, from a model made without its constructor, or by "
            "`save_pytree` of another pytree), and "
            f"`{cls.__qualname__}()` failed ({err}). Pass the constructor arguments: "
            f"`{cls.__qualname__}.deserialize(path, *args, **kwargs)`."
        ) from err
    skeleton = eqx.combine(shapes, kept[0])
    if from_file and "" in recorded:
        skeleton = _numbers_as_saved(skeleton, metadata, cast(str, source))
    return _graft_arguments(skeleton, recorded)


def _is_dynamic_argument(leaf: Any) -> bool:
    return _is_jax_describable(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def _like_skeleton(like: Any, source: str) -> Any:
    """The skeleton `load_pytree` checks a file against: `like` with its arrays as
    `eqx.filter_eval_shape` describes them, a sharding over several devices kept."""
    dynamic, static = eqx.partition(like, _is_dynamic_argument)
    shapes = jax.eval_shape(lambda tree: tree, dynamic)

    def keep_sharding(shape: Any, leaf: Any) -> Any:
        sharding = getattr(leaf, "sharding", None)
        if (
            isinstance(leaf, jax.ShapeDtypeStruct)
            or not isinstance(leaf, jax.Array)
            or isinstance(leaf, jax.core.Tracer)
            or sharding is None
            or len(sharding.device_set) < 2
        ):
            return leaf if isinstance(leaf, jax.ShapeDtypeStruct) else shape
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)

    shapes = jtu.tree_map(keep_sharding, shapes, dynamic)
    metadata = _checkpoint_metadata(source)
    recorded = _parse_arguments(metadata.get("arguments"), source)
    return _graft_arguments(eqx.combine(shapes, static), recorded)


def _is_jax_describable(leaf: Any) -> bool:
    """An array leaf whose dtype JAX has (as opposed to NumPy strings, dates...)."""
    return eqx.is_array(leaf) and not (
        isinstance(leaf, np.ndarray | np.generic) and _is_numpy_only(leaf.dtype)
    )


def _is_numpy_only(dtype: np.dtype) -> bool:
    return dtype.kind in "SUMm" or dtype.byteorder == ">"


# Recorded constructor arguments
#
# In the file, the metadata entry `arguments` lists `[path, recording]` for every
# `Serializable` in the tree that has one, where a recording is
# `{"class": qualified name, "args": [...], "kwargs": [[name, value], ...]}`. A
# value is None, a bool, int, float (finite) or str as itself, or an object with
# one tag: {"float": bits} (not finite), {"complex": [bits, bits]},
# {"list": [...]}, {"tuple": [...]}, {"dict": [[key, value], ...]},
# {"array": [shape, dtype]}, {"numpy": [shape, dtype.str]} (a dtype JAX lacks),
# {"key": [key shape, impl]}, or {"unrecordable": what it was}. Decoding builds
# only these: no name in the file is ever imported or called.

_RECORD_BUDGET = 1 << 16  # Values and string characters per argument.
_RECORD_DEPTH = 32
_TOO_MANY_DIGITS = 10**_MAX_INT_DIGITS


class _Unrecordable(Exception):
    """An argument that a recording cannot hold; its message says what it is."""


def _record_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `args` and `kwargs` of a recording."""
    return {
        "args": [_record_argument(value) for value in args],
        "kwargs": [[name, _record_argument(value)] for name, value in kwargs.items()],
    }


def _record_argument(value: Any) -> Any:
    budget = [_RECORD_BUDGET]

    def encode(value: Any, depth: int) -> Any:
        kind = type(value)
        budget[0] -= 1 + (len(value) if kind is str else 0)
        if budget[0] < 0 or depth > _RECORD_DEPTH:
            raise _Unrecordable("a value too large or too deeply nested to record")
        if value is None or kind is bool or kind is str:
            return value
        number: Any = value  # Exactly an int, a float or a complex below.
        if kind is int:
            if abs(number) >= _TOO_MANY_DIGITS:
                raise _Unrecordable(f"an int of more than {_MAX_INT_DIGITS} digits")
            return number
        if kind is float:
            return number if math.isfinite(number) else {"float": _float_bits(number)}
        if kind is complex:
            return {"complex": [_float_bits(number.real), _float_bits(number.imag)]}
        if kind is list or kind is tuple:
            return {kind.__name__: [encode(item, depth + 1) for item in value]}
        if kind is dict:
            items = cast(dict[Any, Any], value).items()
            return {
                "dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in items]
            }
        if isinstance(value, jax.ShapeDtypeStruct) or eqx.is_array(value):
            return _record_array(value)
        name = getattr(value, "__name__", None)
        if callable(value) and isinstance(name, str):
            raise _Unrecordable(f"the function {name}")
        raise _Unrecordable(f"an object of type {kind.__qualname__}")

    try:
        return encode(value, 0)
    except _Unrecordable as reason:
        return {"unrecordable": str(reason)}
    except Exception:  # A value whose attributes raise: never stop a constructor.
        return {"unrecordable": f"an object of type {type(value).__qualname__}"}


def _record_array(value: Any) -> Any:
    if isinstance(value, np.ndarray) and type(value) is not np.ndarray:
        raise _Unrecordable(f"a {type(value).__name__}")
    numpy = isinstance(value, np.ndarray | np.generic)
    tag, name = _recorded_dtype(value.dtype, numpy)
    if tag is None:
        raise _Unrecordable(name)
    return {tag: [[int(size) for size in value.shape], name]}


@functools.lru_cache(maxsize=512)
def _recorded_dtype(dtype: Any, numpy: bool) -> tuple[str | None, str]:
    """How a recording names an array's dtype: `(tag, name)`, or `(None, why not)`."""
    if numpy and _is_numpy_only(dtype):
        if _NUMPY_ONLY_DTYPE.fullmatch(dtype.str):
            return "numpy", dtype.str
        return None, f"an array of dtype {dtype}"
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        impl = getattr(getattr(dtype, "_impl", None), "name", None)
        if impl not in _KEY_IMPLS:
            return None, f"a PRNG key of the implementation {impl!r}"
        return "key", cast(str, impl)
    name = np.dtype(dtype).name
    if name not in _checkpoint_dtypes():
        return None, f"an array of dtype {dtype}"
    return "array", name


class _Malformed(Exception):
    pass


def _recorded_call(
    cls: type, recording: Any, source: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments to rebuild `cls` with, from the recording at the file's top."""
    if recording is None:
        return (), {}  # Tried as `cls()`; a failure says that nothing was recorded.
    if recording["class"] != cls.__qualname__:
        raise _checkpoint_error(
            source,
            f"holds a model of class {recording['class']}, not {cls.__qualname__}. "
            f"Call `{recording['class']}.deserialize`, or pass the constructor "
            "arguments",
        )
    arguments = [(None, value) for value in recording["args"]]
    arguments += [(name, value) for name, value in recording["kwargs"]]
    args, kwargs, missing = [], {}, []
    for index, (name, value) in enumerate(arguments):
        try:
            rebuilt = _rebuild_argument(value, 0)
        except _Malformed:
            raise _checkpoint_error(
                source, "has a malformed header (its recorded arguments)"
            ) from None
        except _Unrecordable as reason:
            which = _argument_name(cls, index) if name is None else name
            missing.append(f"`{which}` (it was {reason})")
            continue
        if name is None:
            args.append(rebuilt)
        else:
            kwargs[name] = rebuilt
    if missing:
        which = f"argument {missing[0]}" if len(missing) == 1 else "arguments "
        if len(missing) > 1:
            which += ", ".join(missing[:-1]) + " and " + missing[-1]
        raise TypeError(
            f"Serializable.deserialize: the file '{source}' could not record the "
            f"{which} of {cls.__qualname__}, so the model cannot be rebuilt from "
            "the file alone. Pass the constructor arguments: "
            f"`{cls.__qualname__}.deserialize(path, *args, **kwargs)`."
        )
    return tuple(args), kwargs


def _argument_name(cls: type, index: int) -> str:
    """The name of the constructor's positional parameter number `index`."""
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        parameters = []
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
    names = [p.name for p in parameters if p.kind in positional]
    return names[index] if index < len(names) else f"positional argument {index}"


def _rebuild_argument(value: Any, depth: int) -> Any:
    """Inverse of `_record_argument`, with arrays as shapes; raises `_Malformed`."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if depth > _RECORD_DEPTH or not (type(value) is dict and len(value) == 1):
        raise _Malformed
    ((tag, body),) = value.items()
    if tag == "unrecordable":
        raise _Unrecordable(body if type(body) is str else "not recorded")
    if tag == "float" and type(body) is str and _BITS.fullmatch(body):
        return _decode_scalar(["float", body], _FORMAT_VERSION)
    if tag == "complex" and type(body) is list and len(body) == 2:
        if all(type(part) is str and _BITS.fullmatch(part) for part in body):
            return _decode_scalar(["complex", *body], _FORMAT_VERSION)
    if tag in ("list", "tuple") and type(body) is list:
        items = [_rebuild_argument(item, depth + 1) for item in body]
        return items if tag == "list" else tuple(items)
    if tag == "dict" and type(body) is list:
        if all(type(item) is list and len(item) == 2 for item in body):
            pairs = [
                (_rebuild_argument(k, depth + 1), _rebuild_argument(v, depth + 1))
                for k, v in body
            ]
            try:
                return dict(pairs)
            except TypeError:  # An unhashable key.
                raise _Malformed from None
    if tag in ("array", "numpy", "key") and type(body) is list and len(body) == 2:
        shape, name = body
        if not _is_shape(shape) or type(name) is not str:
            raise _Malformed
        if tag == "array" and name in _checkpoint_dtypes():
            dtype = jax.dtypes.canonicalize_dtype(_checkpoint_dtypes()[name])
            return jax.ShapeDtypeStruct(tuple(shape), dtype)
        if tag == "numpy" and _NUMPY_ONLY_DTYPE.fullmatch(name):
            # A constant view: nothing of the shape is allocated.
            return np.broadcast_to(np.zeros((), np.dtype(name)), tuple(shape))
        if tag == "key" and name in _key_impl_types():
            return jax.ShapeDtypeStruct(tuple(shape), _key_impl_types()[name][0])
    raise _Malformed


def _serializables(tree: Any, path: _KeyPath = ()) -> Iterator[tuple[_KeyPath, Any]]:
    """Every `Serializable` in `tree` (itself included), with its key path."""
    if isinstance(tree, Serializable) and not path:
        yield (), tree
    inner = jtu.tree_flatten_with_path(
        tree, is_leaf=lambda node: node is not tree and isinstance(node, Serializable)
    )[0]
    for key, node in inner:
        if isinstance(node, Serializable) and node is not tree:
            yield path + key, node
            yield from _serializables(node, path + key)


def _recordings(tree: Any) -> list[list[Any]]:
    """`[leaf path, recording]` of every `Serializable` in `tree` that has one."""
    found = []
    for key_path, node in _serializables(tree):
        recording = getattr(node, _ARGUMENTS_FIELD, _NOT_RECORDED).recording
        if recording is not None:
            found.append([_keystr(key_path), recording])
    return found


def _graft_arguments(skeleton: Any, recorded: dict[str, Any]) -> Any:
    """`skeleton` (built here, so free to change) with the file's recordings."""
    if recorded:
        for key_path, node in _serializables(skeleton):
            recording = recorded.get(_keystr(key_path))
            if recording is not None:
                object.__setattr__(node, _ARGUMENTS_FIELD, _Arguments(recording))
    return skeleton


def _checkpoint_metadata(source: str) -> dict[str, Any]:
    """The checked `__metadata__` of a checkpoint; empty for other files."""
    with open(source, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        start = file.read(_LENGTH.size + 1)
        if not start:
            raise _checkpoint_error(source, "is empty")
        if start.startswith(_NUMPY_MAGIC) or _V1_MAGIC.startswith(
            start[: len(_V1_MAGIC)]
        ):
            return {}
        # Only the metadata: the leaves and the structure are checked when the file
        # is read.
        return _read_metadata(file, start, source, size)[2]


def _numbers_as_saved(skeleton: Any, metadata: dict[str, Any], source: str) -> Any:
    """`skeleton` with each Python number that the file holds as a 0-d array (a
    number that a `filter_scan` or `filter_cond` traced after construction) as
    that array's shape and dtype: the recorded call cannot know of the change."""
    text = metadata.get("leaves", "").encode(errors="surrogatepass")
    entries = _parse_json(text, source)
    saved = {}
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            saved[entry["path"]] = entry  # Checked when the file is read.

    def as_saved(key_path: _KeyPath, leaf: Any) -> Any:
        entry = saved.get(_keystr(key_path)) if _is_python_number(leaf) else None
        if entry is None or entry.get("kind") not in ("jax", "numpy", "numpy_scalar"):
            return leaf
        dtype = _numpy_dtype(entry.get("dtype"))
        if entry.get("shape") != [] or dtype is None or _is_numpy_only(dtype):
            return leaf
        return jax.ShapeDtypeStruct((), jax.dtypes.canonicalize_dtype(dtype))

    return jtu.tree_map_with_path(as_saved, skeleton)


def _parse_arguments(text: Any, source: str) -> dict[str, Any]:
    """The `arguments` metadata entry, checked to be well formed."""
    if text is None:
        return {}
    parsed = _parse_json(str(text).encode(errors="surrogatepass"), source)
    found: dict[str, Any] = {}
    items: list[Any] = parsed if isinstance(parsed, list) else [None]
    for item in items:
        well_formed = (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and item[0] not in found
            and isinstance(item[1], dict)
            and set(item[1]) == {"class", "args", "kwargs"}
            and isinstance(item[1]["class"], str)
            and isinstance(item[1]["args"], list)
            and isinstance(item[1]["kwargs"], list)
            and all(
                isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                for pair in item[1]["kwargs"]
            )
        )
        if not well_formed:
            raise _checkpoint_error(
                source, "has a malformed header (its recorded arguments)"
            )
        found[item[0]] = item[1]
    return found


# Writing


def _host_array(path: str, leaf: Any) -> "np.ndarray | _Spanning":
    """A NumPy copy or view of an array leaf, refusing what cannot load exactly.

    An array that spans several processes stays where it is: each process writes
    its own shards (`_write_from_processes`).
    """
    if isinstance(leaf, jax.Array):
        if _is_key_array(leaf):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable:
            return _Spanning(leaf)
        return np.asarray(leaf, order="C")  # Gathers sharded arrays.
    problem = None
    if isinstance(leaf, np.ma.MaskedArray):
        problem = (
            "a masked array, whose mask would be lost. Save `x.data` and "
            "`x.mask` as two leaves, or `x.filled()`"
        )
    elif isinstance(leaf, np.ndarray) and type(leaf) is not np.ndarray:
        problem = (
            f"a {type(leaf).__name__}, which would load as a plain ndarray. "
            "Save `np.asarray(x)`"
        )
    elif leaf.dtype.hasobject:
        problem = (
            "an array of Python objects, which a checkpoint cannot hold without "
            "pickle. Make the field static, or convert its items to numbers"
        )
    elif leaf.dtype.fields is not None or leaf.dtype.subdtype is not None:
        problem = (
            f"an array of structured dtype {leaf.dtype}. Save each of its fields "
            "as an array of its own"
        )
    elif _numpy_dtype(_dtype_name(leaf.dtype)) is None:
        problem = (
            f"an array of dtype {leaf.dtype}, which a checkpoint cannot restore "
            "exactly. Convert it to a dtype of JAX, a string or a dated dtype "
            "with a unit"
        )
    if problem is not None:
        raise TypeError(f"{_API.get().save}: the leaf at path {path} is {problem}.")
    if leaf.dtype.byteorder == ">":  # Stored little-endian, as safetensors wants.
        return np.asarray(leaf, dtype=leaf.dtype.newbyteorder("<"), order="C")
    return np.asarray(leaf, order="C")


def _dtype_name(dtype: np.dtype) -> str:
    """A dtype's name in a checkpoint: NumPy's name, or `str` where JAX lacks it."""
    return dtype.str if _is_numpy_only(dtype) else dtype.name


_NUMPY_ONLY_DTYPE = re.compile(
    r"[|<>][SU][1-9][0-9]{0,5}|[<>][mM]8\[(Y|M|W|D|h|m|s|ms|us|ns|ps|fs|as)\]"
    r"|>([iuf][248]|c(8|16))"
)


def _numpy_dtype(name: Any) -> np.dtype | None:
    """The dtype a checkpoint names, or None if it names none it may hold."""
    if not isinstance(name, str):
        return None
    found = _checkpoint_dtypes().get(name)
    if found is None and _NUMPY_ONLY_DTYPE.fullmatch(name):
        found = np.dtype(name)
    return found


def _write_checkpoint(
    model: Any,
    target: pathlib.Path,
    kinds: dict[int, tuple[str, str | None]] | None = None,
) -> None:
    try:
        header, blocks = _encode(model, kinds or {})
    except Exception as err:
        if _spans_processes(model):
            _fail_across_processes(err)
        raise
    if any(isinstance(block, _Spanning) for block in blocks):
        _write_from_processes(header, blocks, target)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _create_temporary(target)
    try:
        with (
            os.fdopen(descriptor, "wb") as file,
            concurrent.futures.ThreadPoolExecutor(max_workers=1) as checksummer,
        ):
            file.write(_LENGTH.pack(len(header)))
            file.write(header)  # Its CRC slots still hold zeros.
            checksums = []
            for block in blocks:  # Both `crc32` and `write` release the GIL.
                checksums.append(checksummer.submit(zlib.crc32, block.data))
                file.write(block.data)
            file.seek(_LENGTH.size)
            file.write(_filled_header(header, [c.result() for c in checksums]))
            file.flush()
            os.fsync(file.fileno())
        _replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(target.parent)


def _filled_header(header: bytes, checksums: list[int]) -> bytes:
    """The header with the arrays' CRC-32s and then its own in their slots."""
    crc_at = header.index(b'"crc32":"') + len(b'"crc32":"')
    slot_at = header.index(_CRC_SLOT) + len(_CRC_SLOT)
    filled = bytearray(header)
    crcs = "".join(f"{checksum:08x}" for checksum in checksums)
    filled[crc_at : crc_at + len(crcs)] = crcs.encode()
    filled[slot_at : slot_at + 8] = f"{zlib.crc32(filled):08x}".encode()
    return bytes(filled)


def _replace(temporary: pathlib.Path, target: pathlib.Path) -> None:
    """Rename the finished temporary file over `target`, keeping the target's mode."""
    # Holding the old file open past the rename moves the freeing of its blocks
    # out of this call, to a helper thread that closes it.
    try:
        previous = os.open(
            target,
            os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0),
        )
    except OSError:  # None there, or not readable.
        previous = None
    try:
        with contextlib.suppress(FileNotFoundError):
            kept = os.fstat(previous) if previous is not None else os.stat(target)
            os.chmod(temporary, stat.S_IMODE(kept.st_mode))
        os.replace(temporary, target)
    finally:
        if previous is not None:
            _closer().submit(os.close, previous)


# Several processes (`jax.distributed`). An array that spans processes cannot be
# fetched whole by any of them, so every process calls `serialize`, and:
#   1. process 0 creates the temporary file, writes the header (its checksums still
#      zeros) and every leaf that is not such an array, and publishes the file's
#      name in the distributed runtime's key-value store;
#   2. every process writes the shards of its own devices whose `replica_id` is 0
#      (so each byte once) at their offsets, flushes them to disk, and says so;
#   3. process 0 streams the finished data to compute each tensor's CRC-32, fills
#      in the header, renames the file over the target and says so; every process
#      returns only then.
# Every wait is bounded by `_PROCESS_TIMEOUT_S`, and a failure in any process is
# published, so the others raise instead of waiting.
_PROCESS_TIMEOUT_S = 600.0
_FAILED = "!"  # A published value that starts so is the message of a failure.
_saves_across_processes = [0]
_Region = tuple[tuple[int, int], ...]  # A shard's `(start, stop)` along each axis.


@dataclasses.dataclass
class _Spanning:
    """An array leaf (key data for keys) that spans several processes."""

    array: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _client() -> Any:
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise ValueError(
            f"{_API.get().save}: the {_API.get().tree} holds arrays that span "
            "several processes, but `jax.distributed` is not initialized here. Call "
            "`jax.distributed.initialize` in every process first."
        )
    return client


def _publish(client: Any, key: str, value: str) -> None:
    client.key_value_set(key, value)


def _await(client: Any, key: str, waiting_for: str) -> str:
    """The value published at `key`; raises if it is a failure or does not come."""
    try:
        value = client.blocking_key_value_get(key, int(_PROCESS_TIMEOUT_S * 1000))
    except Exception as err:  # The runtime's own error, on its deadline.
        raise TimeoutError(
            f"{_API.get().save}: process {jax.process_index()} waited "
            f"{_PROCESS_TIMEOUT_S:g} s for {waiting_for}, in vain. Every process "
            f"must call `{_API.get().save_call}` on the same {_API.get().tree}, in "
            "the same order as the other saves of arrays that span processes "
            f"({err})."
        ) from err
    if value.startswith(_FAILED):
        raise ValueError(f"{_API.get().save}: {value[len(_FAILED) :]}")
    return value


def _next_prefix() -> str:
    """The key-value store's folder for this process's next save across processes:
    every process counts its saves, failed ones included, so the folders pair up."""
    _saves_across_processes[0] += 1
    return f"lerax_utils/serialize/{_saves_across_processes[0]}"


def _spans_processes(tree: Any) -> bool:
    return jax.process_count() > 1 and any(
        isinstance(leaf, jax.Array)
        and not isinstance(leaf, jax.core.Tracer)
        and not leaf.is_fully_addressable
        for leaf in jtu.tree_leaves(tree)
    )


def _fail_across_processes(err: BaseException) -> None:
    """Before a save across processes raises ahead of the exchange (a bad path or
    leaf here only), tell the others, so that they raise too and their next saves
    pair up with this process's next one."""
    me = jax.process_index()
    _publish(_client(), f"{_next_prefix()}/header/{me}", _FAILED + _failure(me, err))


def _write_from_processes(
    header: bytes, blocks: list[Any], target: pathlib.Path
) -> None:
    """Write one checkpoint from every process, as described above."""
    client = _client()
    me, count = jax.process_index(), jax.process_count()
    prefix = _next_prefix()
    data_at = _LENGTH.size + len(header)
    offsets = list(itertools.accumulate([b.nbytes for b in blocks], initial=data_at))
    # Each process checks that all describe the same model (structure, shapes,
    # dtypes, static values, Python numbers, and the values of the leaves that do
    # not span processes, which process 0 writes) before any writes.
    local = [None if isinstance(b, _Spanning) else zlib.crc32(b.data) for b in blocks]
    agreed = zlib.crc32(_json([str(target), local]).encode(), zlib.crc32(header))
    _publish(client, f"{prefix}/header/{me}", f"{agreed:08x}")
    headers = {
        _await(client, f"{prefix}/header/{other}", f"process {other}'s header")
        for other in range(count)
    }
    if len(headers) != 1:
        raise ValueError(
            f"{_API.get().save}: the processes passed different paths or different "
            f"{_API.get().tree}s (their structure, shapes, dtypes, static values, "
            "Python numbers or the values of arrays that do not span processes "
            f"differ). Every process must save the same {_API.get().tree} to the "
            "same path."
        )
    if me != 0:
        where = _await(client, f"{prefix}/temporary", "process 0 to create the file")
        try:
            _write_shards(pathlib.Path(where), blocks, offsets)
        except BaseException as err:
            _publish(client, f"{prefix}/written/{me}", _FAILED + _failure(me, err))
            raise
        _publish(client, f"{prefix}/written/{me}", "ok")
        _await(client, f"{prefix}/done", "process 0 to finish the file")
        return
    temporary = None
    published = False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = _create_temporary(target)
        with os.fdopen(descriptor, "wb") as file:
            file.write(_LENGTH.pack(len(header)))
            file.write(header)
            for block, offset in zip(blocks, offsets, strict=False):
                if not isinstance(block, _Spanning):
                    file.seek(offset)
                    file.write(block.data)
            file.truncate(offsets[-1])
        _publish(client, f"{prefix}/temporary", str(temporary))
        published = True
        _write_shards(temporary, blocks, offsets)
        for other in range(1, count):
            _await(client, f"{prefix}/written/{other}", f"process {other}'s shards")
        with open(temporary, "r+b") as file:
            checksums = [
                _stream_crc(file, offset, block.nbytes) if crc is None else crc
                for block, offset, crc in zip(blocks, offsets, local, strict=False)
            ]
            file.seek(_LENGTH.size)
            file.write(_filled_header(header, checksums))
            file.flush()
            os.fsync(file.fileno())
        _replace(temporary, target)
        _fsync_folder(target.parent)
    except BaseException as err:
        if temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        message = _FAILED + _failure(0, err)
        if not published:
            _publish(client, f"{prefix}/temporary", message)
        _publish(client, f"{prefix}/done", message)
        raise
    _publish(client, f"{prefix}/done", "ok")


def _failure(process: int, err: BaseException) -> str:
    text = str(err).removeprefix(f"{_API.get().save}: ")
    return (
        f"process {process} failed to write its part of the checkpoint, so nothing "
        f"was saved: {type(err).__name__}: {text}"
    )


def _write_shards(
    temporary: pathlib.Path, blocks: list[Any], offsets: list[int]
) -> None:
    """Write this process's replica-0 shards of the spanning arrays at their
    offsets in the shared temporary file, and flush them to disk."""
    flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    descriptor = os.open(temporary, flags)
    try:
        for block, offset in zip(blocks, offsets, strict=False):
            if not isinstance(block, _Spanning):
                continue
            shape, itemsize = block.shape, block.dtype.itemsize
            for shard in block.array.addressable_shards:
                if shard.replica_id != 0:
                    continue
                region = _region(shard.index, shape)
                data = np.ascontiguousarray(np.asarray(shard.data))
                _write_region(descriptor, offset, shape, itemsize, region, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_region(
    descriptor: int,
    offset: int,
    shape: tuple[int, ...],
    itemsize: int,
    region: _Region,
    data: np.ndarray,
) -> None:
    """Write `data`, the box `region` of a C-ordered tensor at `offset`, in runs."""
    # Axes after `split` are whole in the box, so each step along the leading
    # axes up to `split` is one contiguous run of the file.
    split = len(shape) - 1
    while split > 0 and region[split] == (0, shape[split]):
        split -= 1
    strides = [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]
    if data.size == 0:
        return
    if not shape:
        os.pwrite(descriptor, data.tobytes(), offset)
        return
    for outer in np.ndindex(*data.shape[:split]):
        first = (
            sum((i + region[axis][0]) * strides[axis] for axis, i in enumerate(outer))
            + region[split][0] * strides[split]
        )
        run = np.ascontiguousarray(data[outer]).reshape(-1).view(np.uint8).data
        written = 0
        while written < run.nbytes:
            written += os.pwrite(
                descriptor, run[written:], offset + first * itemsize + written
            )


def _stream_crc(file: IO[bytes], offset: int, nbytes: int) -> int:
    """The CRC-32 of `nbytes` of `file` from `offset`, through a bounded buffer."""
    buffer = np.empty(min(nbytes, _CHUNK_BYTES), np.uint8)
    crc = 0
    file.seek(offset)
    done = 0
    while done < nbytes:
        view = buffer[: min(buffer.size, nbytes - done)]
        if file.readinto(view.data) != view.size:  # type: ignore[attr-defined]
            raise ValueError("the temporary file is shorter than written")
        crc = zlib.crc32(view.data, crc)
        done += view.size
    return crc


@functools.cache
def _closer() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1)


def _create_temporary(target: pathlib.Path) -> tuple[int, pathlib.Path]:
    """Open a new file beside `target`, as `open()` would create it (umask applies).

    Its name stays short whatever the length of the target's.
    """
    stem = os.fsdecode(os.fsencode(target.name)[:64])
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        temporary = target.parent / f".{stem}.{secrets.token_hex(4)}.tmp"
        with contextlib.suppress(FileExistsError):
            return os.open(temporary, flags, 0o666), temporary


def _fsync_folder(folder: pathlib.Path) -> None:
    """Make the rename durable too, where the platform allows it."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _encode(
    model: Any, kinds: dict[int, tuple[str, str | None]]
) -> tuple[bytes, list[Any]]:
    """The header, with zeros in its CRC slots, and each array's bytes (as uint8)."""
    leaves: list[dict[str, Any]] = []
    tensors: dict[str, Any] = {}
    blocks = []
    offset = 0
    flat = jtu.tree_flatten_with_path(model)[0]
    _check_saveable(flat)
    for index, (key_path, leaf) in enumerate(flat):
        path = _keystr(key_path)
        if index in kinds:  # A traced leaf, now on the host.
            kind, impl = kinds[index]
            data = np.asarray(leaf, order="C")
        elif eqx.is_array(leaf):
            impl = None
            if isinstance(leaf, jax.Array):
                kind = "jax_weak" if _is_weak(leaf) else "jax"
                if _is_key_array(leaf):
                    kind, impl = "key", _key_impl_name(leaf)
            else:
                kind = "numpy_scalar" if isinstance(leaf, np.generic) else "numpy"
            data = _host_array(path, leaf)
        elif type(leaf) in _PYTHON_SCALARS:
            leaves.append(
                {"path": path, "kind": "scalar", "value": _encode_scalar(leaf)}
            )
            continue
        else:
            continue  # Described by the structure; restored from the skeleton.
        entry: dict[str, Any] = {
            "path": path,
            "kind": "jax" if kind == "jax_weak" else kind,
            "dtype": _dtype_name(_original_dtype(leaf, data)),
            "shape": list(data.shape),
        }
        if kind == "jax_weak":
            entry["weak_type"] = True
        if impl is not None:
            impl_shape = _key_impl_types()[impl][1]
            entry.update(
                impl=impl, key_shape=entry["shape"][: data.ndim - len(impl_shape)]
            )
        block = data if isinstance(data, _Spanning) else data.reshape(-1).view(np.uint8)
        stored_dtype, stored_shape = _stored_type(entry["dtype"], entry["shape"])
        tensors[path] = {
            "dtype": stored_dtype,
            "shape": stored_shape,
            "data_offsets": [offset, offset + block.nbytes],
        }
        offset += block.nbytes
        leaves.append(entry)
        blocks.append(block)
    metadata = {
        "format": _FORMAT,
        "format_version": str(_FORMAT_VERSION),
        "library_version": __version__,
        "class": _qualified_name(type(model)),
        "leaves": _json(leaves),
        "structure": _json(_structure(model, _describe_static)),
    }
    recordings = _recordings(model)
    if recordings:
        metadata["arguments"] = _json(recordings)
    metadata["crc32"] = _ZERO_CRC * len(blocks)  # Filled in once the data is written.
    metadata["metadata_crc32"] = _ZERO_CRC
    header = _json({"__metadata__": metadata, **tensors}).encode()
    parts = [header, metadata["leaves"].encode(), metadata["structure"].encode()]
    parts.append(metadata.get("arguments", "").encode())
    api = _API.get()
    for part in parts:
        count = _count_containers(part)
        if count > _MAX_CONTAINERS:  # As the reader would refuse it.
            raise ValueError(
                f"{api.save}: the {api.tree} needs {count} JSON lists and "
                f"objects in one part of its checkpoint header, more than the "
                f"{_MAX_CONTAINERS} a checkpoint may hold. Stack its leaves into "
                "fewer, larger arrays (`stack_pytree`)."
            )
    return header + b" " * (-(_LENGTH.size + len(header)) % 8), blocks


def _keystr(key_path: _KeyPath) -> str:
    """`jax.tree_util.keystr`, with NumPy scalar keys rendered as NumPy 1.x does.

    NumPy 2 renders `np.int64(1)` as `np.int64(1)`, NumPy 1 as `1`; a leaf path
    names a tensor in the file, so it must not depend on the NumPy version.
    """
    if _NUMPY_2 and any(
        isinstance(getattr(key, "key", None), np.generic) for key in key_path
    ):
        with np.printoptions(legacy="1.25"):
            return jtu.keystr(key_path)
    return jtu.keystr(key_path)


_NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


def _is_weak(leaf: Any) -> bool:
    """Whether a JAX array or tracer is weakly typed (as `jnp.asarray(2.0)`)."""
    return bool(getattr(getattr(leaf, "aval", None), "weak_type", False))


def _check_saveable(flat: list[tuple[_KeyPath, Any]]) -> None:
    """Refuse leaves that would save a file that cannot load, naming the leaf."""
    names: dict[str, Any] = {}
    for key_path, leaf in flat:
        path = _keystr(key_path)
        problem = None
        if isinstance(leaf, jax.ShapeDtypeStruct):
            problem = (
                "a jax.ShapeDtypeStruct, a shape and dtype without values. Save a "
                "model whose arrays hold values"
            )
        elif type(leaf) is int and abs(leaf) >= 10**_MAX_INT_DIGITS:
            problem = (
                f"a Python int of more than {_MAX_INT_DIGITS} digits. Save it as "
                "a NumPy array of its bytes, or as a static field"
            )
        elif (
            eqx.is_array(leaf)
            and _is_key_array(leaf)
            and _key_impl_name(cast(jax.Array, leaf)) not in _KEY_IMPLS
        ):
            impl = _key_impl_name(cast(jax.Array, leaf))
            problem = (
                f"a PRNG key of the custom implementation {impl!r}; "
                f"a checkpoint holds keys of {', '.join(_KEY_IMPLS)} only. Save "
                "`jax.random.key_data(key)` instead and wrap it after loading"
            )
        if problem is not None:
            raise TypeError(f"{_API.get().save}: the leaf at path {path} is {problem}.")
        if eqx.is_array(leaf):
            if path in names:
                raise ValueError(
                    f"{_API.get().save}: two array leaves have the same path "
                    f"{path} (`jax.tree_util.keystr`), so the checkpoint would name "
                    "one tensor twice. Give the dict keys distinct reprs."
                )
            names[path] = leaf


def _count_containers(text: bytes) -> int:
    """The JSON lists and objects in `text`: its `[` and `{` outside strings."""
    outside = _JSON_STRING.sub(b"", text)
    return outside.count(b"[") + outside.count(b"{")


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def _original_dtype(leaf: Any, data: "np.ndarray | _Spanning") -> np.dtype:
    """The dtype to restore: the leaf's own where NumPy's bytes were swapped."""
    if isinstance(leaf, np.ndarray | np.generic) and leaf.dtype.byteorder == ">":
        return leaf.dtype
    return data.dtype


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _stored_type(dtype: str, shape: list[int]) -> tuple[str, list[int]]:
    """The safetensors dtype and shape of a tensor: its own, or bytes."""
    if dtype in _SAFETENSORS_DTYPES:
        return _SAFETENSORS_DTYPES[dtype], shape
    itemsize = cast(np.dtype, _numpy_dtype(dtype)).itemsize
    return "U8", shape + [itemsize] if itemsize > 1 else shape


def _key_impl_name(key: jax.Array) -> str:
    impl = jax.random.key_impl(key)
    if isinstance(impl, str):
        return impl
    # Older JAX returns a spec object whose `str` is a short tag, not a name.
    return getattr(getattr(impl, "_impl", None), "name", str(impl))


def _float_bits(value: float) -> str:
    return f"{struct.unpack('<Q', struct.pack('<d', value))[0]:016x}"


def _encode_scalar(value: Any) -> list[Any]:
    """A Python number as text that restores it bit for bit (NaN payloads too)."""
    if isinstance(value, bool | int):
        return [type(value).__name__, str(value)]
    if isinstance(value, float):
        return ["float", _float_bits(value)]
    return ["complex", _float_bits(value.real), _float_bits(value.imag)]


_INTEGER = re.compile(r"-?(0|[1-9][0-9]{0,4299})")
_BITS = re.compile(r"[0-9a-f]{16}")


def _decode_scalar(encoded: Any, version: int) -> Any:
    """Inverse of `_encode_scalar` (or of format 1's); ValueError if malformed."""
    if not (isinstance(encoded, list) and encoded):
        raise ValueError(f"unknown encoding of a Python number: {encoded!r}")
    kind, *parts = encoded
    if not all(isinstance(part, str) for part in parts):
        raise ValueError(f"unknown encoding of a Python number: {encoded!r}")
    if kind == "bool" and parts in (["True"], ["False"]):
        return parts == ["True"]
    if kind == "int" and len(parts) == 1 and _INTEGER.fullmatch(parts[0]):
        return int(parts[0])
    if kind in ("float", "complex") and len(parts) == (1 if kind == "float" else 2):
        if version == 1:
            values = [float.fromhex(part) for part in parts]
        elif all(_BITS.fullmatch(part) for part in parts):
            values = [
                struct.unpack("<d", int(p, 16).to_bytes(8, "little"))[0] for p in parts
            ]
        else:
            raise ValueError(f"unknown encoding of a Python number: {encoded!r}")
        return values[0] if kind == "float" else complex(*values)
    raise ValueError(f"unknown encoding of a Python number: {encoded!r}")


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


def _structure(tree: Any, describe: Callable[[Any], Any]) -> list[list[Any]]:
    """A description of `tree` without its array and scalar values.

    One `[path, description]` pair per node and leaf, in flattening order. It uses
    type and function names, never a `repr` or an address, so the same model gives
    the same description in every process and on every machine.
    """
    entries: list[list[Any]] = []

    def visit(node: Any, path: _KeyPath) -> None:
        where = _keystr(path)
        if eqx.is_array(node) or isinstance(node, jax.ShapeDtypeStruct):
            entries.append([where, "array"])
            return
        if isinstance(node, _PYTHON_SCALARS) and (
            describe is _describe_static_v1 or type(node) in _PYTHON_SCALARS
        ):
            entries.append([where, ["scalar", type(node).__name__]])
            return
        children, node_def = jtu.tree_flatten_with_path(
            node, is_leaf=_is_strict_child(node)
        )
        if jtu.treedef_is_leaf(node_def) and node is not None:
            entries.append([where, describe(node)])
            return
        description: dict[str, Any] = {"node": type(node).__qualname__}
        if isinstance(node, eqx.Module):
            description["static"] = {
                name: describe(getattr(node, name, None))
                for name in _static_fields(node)
                if name != _ARGUMENTS_FIELD  # Recorded apart, under `arguments`.
            }
        elif isinstance(node, dict):  # Keys in JAX's (sorted) order, not insertion's.
            keys = [getattr(key[0], "key", key[0]) for key, _ in children]
            description["keys"] = [describe(key) for key in keys]
        entries.append([where, description])
        for key, child in children:
            visit(child, path + key)

    visit(tree, ())
    return entries


def _describe_static(value: Any, depth: int = 0) -> Any:
    """A JSON description of a static value that is the same in every process.

    Values are described exactly (float bits, dict items in a canonical order, the
    fields of a dataclass), functions and other objects by their names.
    """
    if type(value) is int and abs(value) >= 10**_MAX_INT_DIGITS:
        return ["int", hex(value)]  # JSON and Python refuse it in decimal.
    if value is None or type(value) in (bool, int, str):
        return value
    if depth > 32:  # A deeper or cyclic value: its type alone.
        return ["object", type(value).__qualname__]
    if type(value) is float:
        return ["float", _float_bits(value)]
    if type(value) is complex:
        return ["complex", _float_bits(value.real), _float_bits(value.imag)]
    if isinstance(value, enum.Enum):
        return ["enum", type(value).__qualname__, value.name]
    if isinstance(value, list | tuple):
        items = [_describe_static(item, depth + 1) for item in value]
        return [type(value).__qualname__, items]
    if isinstance(value, dict | set | frozenset):
        if isinstance(value, dict):
            items = [
                [_describe_static(k, depth + 1), _describe_static(v, depth + 1)]
                for k, v in value.items()
            ]
        else:
            items = [_describe_static(item, depth + 1) for item in value]
        return [type(value).__qualname__, sorted(items, key=_json)]
    if isinstance(value, type):
        return ["type", value.__qualname__]
    if isinstance(value, np.dtype):
        return ["dtype", _dtype_name(value)]
    if isinstance(value, np.generic | np.ndarray) and not value.dtype.hasobject:
        dtype = _dtype_name(value.dtype)
        return ["numpy", dtype, list(value.shape), value.tobytes().hex()]
    if dataclasses.is_dataclass(value):
        fields = [
            [field.name, _describe_static(getattr(value, field.name, None), depth + 1)]
            for field in dataclasses.fields(value)
        ]
        return ["dataclass", type(value).__qualname__, fields]
    if callable(value):
        # `__name__`, not `__qualname__`: JAX has changed the latter between releases
        # (`jax.numpy.tanh` became `tanh`).
        name = getattr(value, "__name__", None) or getattr(value, "__qualname__", None)
        return ["function", name or type(value).__qualname__]
    return ["object", type(value).__qualname__]


def _describe_static_v1(value: Any) -> Any:
    """`_describe_static` of format 1, to compare format-1 files with."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return ["float", value.hex()]
    if isinstance(value, list | tuple):
        return [type(value).__name__, [_describe_static_v1(item) for item in value]]
    if isinstance(value, dict):
        items = [
            [_describe_static_v1(k), _describe_static_v1(v)] for k, v in value.items()
        ]
        return ["dict", items]
    if isinstance(value, enum.Enum):
        return ["enum", type(value).__qualname__, value.name]
    if isinstance(value, type):
        return ["type", value.__qualname__]
    if isinstance(value, np.dtype):
        return ["dtype", value.name]
    if callable(value):
        name = getattr(value, "__name__", None) or getattr(value, "__qualname__", None)
        return ["function", name or type(value).__qualname__]
    return ["object", type(value).__qualname__]


# Reading


@dataclasses.dataclass
class _Layout:
    """What a checkpoint's header says, checked to be well formed."""

    version: int
    entries: list[dict[str, Any]]  # Arrays gain "offset", "nbytes" and "crc".
    structure: list[Any]
    data_end: int  # Where the arrays end (format 1: where the CRC-32s start).
    # Recorded constructor arguments, by the path of their `Serializable`.
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)


def _checkpoint_error(source: str, problem: str) -> ValueError:
    return ValueError(f"{_API.get().load}: the file '{source}' {problem}.")


def _read_checkpoint(file: IO[bytes], skeleton: Any, source: str) -> Any:
    size = os.fstat(file.fileno()).st_size
    start = file.read(_LENGTH.size + 1)
    if not start:
        raise _checkpoint_error(source, "is empty")
    if start.startswith(_NUMPY_MAGIC):
        file.seek(0)
        return _place(_read_equinox_file(file, skeleton, source, size), skeleton)
    if _V1_MAGIC.startswith(start[: len(_V1_MAGIC)]):
        layout = _read_v1_header(file, source, size)
    else:
        layout = _read_header(file, start, source, size)
    _check_against_skeleton(source, layout, skeleton)
    skeleton_leaves, treedef = jtu.tree_flatten(skeleton)
    saved = functools.partial(_is_saved_leaf, version=layout.version)
    shardings = [_leaf_sharding(leaf) for leaf in skeleton_leaves if saved(leaf)]
    values = _read_leaves(file, layout, source, shardings)
    loaded = iter(values)
    return treedef.unflatten(
        [next(loaded) if saved(leaf) else leaf for leaf in skeleton_leaves]
    )


def _read_header(file: IO[bytes], start: bytes, source: str, size: int) -> _Layout:
    """Read and check the header of a format-2 (safetensors) file."""
    length, header, metadata, version = _read_metadata(file, start, source, size)
    # A lone surrogate (from a `\ud800` escape) becomes bytes that are not UTF-8.
    leaves = _parse_json(
        metadata.get("leaves", "").encode(errors="surrogatepass"), source
    )
    structure = _parse_json(
        metadata.get("structure", "").encode(errors="surrogatepass"), source
    )
    entries = _check_entries(leaves, structure, version, source, size)
    arguments = _parse_arguments(metadata.get("arguments"), source)
    crcs = metadata.get("crc32", "")
    arrays = [entry for entry in entries if entry["kind"] != "scalar"]
    tensors = {name: value for name, value in header.items() if name != "__metadata__"}
    if not (
        re.fullmatch("[0-9a-f]*", crcs)
        and len(crcs) == 8 * len(arrays)
        and len(tensors) == len(arrays)
    ):
        raise _checkpoint_error(source, "has a malformed header")
    offset = 0
    for index, entry in enumerate(arrays):
        dtype, shape = _stored_type(entry["dtype"], entry["shape"])
        wanted = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + entry["nbytes"]],
        }
        if tensors.get(entry["path"]) != wanted:
            raise _checkpoint_error(
                source,
                f"has a malformed header: the tensor table's entry for the leaf at "
                f"path {entry['path']} is not {_json(wanted)}",
            )
        entry.update(
            offset=_LENGTH.size + length + offset,
            crc=int(crcs[8 * index : 8 * index + 8], 16),
        )
        offset += entry["nbytes"]
    data_end = _LENGTH.size + length + offset
    _check_size(source, size, data_end)
    return _Layout(version, entries, structure, data_end, arguments)


def _read_metadata(
    file: IO[bytes], start: bytes, source: str, size: int
) -> tuple[int, dict[str, Any], dict[str, Any], int]:
    """The header length, the header, its checked `__metadata__` and the format
    version of a format-2 file, the header's checksum verified."""
    if len(start) <= _LENGTH.size:
        raise _checkpoint_error(source, f"is truncated ({size} bytes)")
    if start[_LENGTH.size :] != b"{":
        raise _checkpoint_error(
            source,
            f"is not a lerax_utils checkpoint: it starts with {start[:8]!r}, which "
            "is neither a safetensors header length followed by `{` nor the "
            f"format-1 magic {_V1_MAGIC!r}",
        )
    (length,) = _LENGTH.unpack(start[: _LENGTH.size])
    header_bytes = _read_header_bytes(file, length, _LENGTH.size, source, size)
    header = _parse_json(header_bytes, source)
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not (isinstance(metadata, dict) and metadata.get("format") == _FORMAT):
        raise _checkpoint_error(
            source,
            "is a safetensors file but not a lerax_utils checkpoint: its "
            "`__metadata__` does not name the format 'lerax_utils'. Read it with the "
            "`safetensors` package",
        )
    version = _check_version(metadata.get("format_version"), source)
    stored = metadata.get("metadata_crc32")
    slot = _CRC_SLOT + str(stored).encode(errors="surrogatepass") + b'"'
    at = header_bytes.find(slot)
    if not (
        isinstance(stored, str)
        and re.fullmatch("[0-9a-f]{8}", stored)
        and at >= 0
        and header_bytes.find(slot, at + 1) < 0
        and all(isinstance(value, str) for value in metadata.values())
    ):
        raise _checkpoint_error(source, "has a malformed header")
    zeroed = header_bytes[:at] + _CRC_SLOT + _ZERO_CRC.encode() + b'"'
    if zlib.crc32(zeroed + header_bytes[at + len(slot) :]) != int(stored, 16):
        raise _checkpoint_error(source, "has a corrupt header (its checksum fails)")
    return length, header, metadata, version


def _read_header_bytes(
    file: IO[bytes], length: int, start: int, source: str, size: int
) -> bytes:
    if length > _MAX_HEADER_BYTES:
        raise _checkpoint_error(
            source,
            f"declares a header of {length} bytes, more than the "
            f"{_MAX_HEADER_BYTES} allowed; the file is corrupt",
        )
    if start + length > size:
        raise _checkpoint_error(
            source, f"is truncated inside its header ({size} bytes)"
        )
    file.seek(start)
    return file.read(length)


def _parse_json(text: bytes, source: str) -> Any:
    """JSON, with the nesting and the number of containers bounded first."""
    if _count_containers(text) > _MAX_CONTAINERS:
        raise _checkpoint_error(
            source,
            f"has a header with more than {_MAX_CONTAINERS} lists and objects; the "
            "file is corrupt",
        )
    try:
        return json.loads(text.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:
        raise _checkpoint_error(source, f"has an unreadable header ({err})") from err


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a checkpoint header")


def _check_version(version: Any, source: str) -> int:
    if not (isinstance(version, str) and re.fullmatch("[0-9]{1,9}", version)):
        raise _checkpoint_error(source, "has a malformed header")
    number = int(version)
    if number > _FORMAT_VERSION:
        raise _checkpoint_error(
            source,
            f"has format version {number}, newer than the {_FORMAT_VERSION} this "
            f"lerax_utils {__version__} reads. Upgrade lerax_utils to load it",
        )
    if number != _FORMAT_VERSION:
        raise _checkpoint_error(source, f"has an unknown format version {number}")
    return number


def _check_size(source: str, size: int, expected: int) -> None:
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


def _read_v1_header(file: IO[bytes], source: str, size: int) -> _Layout:
    """Read and check the header of a format-1 file."""
    file.seek(0)
    start = file.read(_V1_PREFIX.size)
    if len(start) < _V1_PREFIX.size:
        raise _checkpoint_error(source, f"is truncated ({size} bytes)")
    _, version, length, header_crc = _V1_PREFIX.unpack(start)
    if version != 1:
        raise _checkpoint_error(
            source,
            f"has an unknown format version {version} after the format-1 magic; "
            "the file is corrupt",
        )
    header_bytes = _read_header_bytes(file, length, _V1_PREFIX.size, source, size)
    if zlib.crc32(header_bytes) != header_crc:
        raise _checkpoint_error(source, "has a corrupt header (its checksum fails)")
    header = _parse_json(header_bytes, source)
    leaves = header.get("leaves") if isinstance(header, dict) else None
    structure: Any = header.get("structure") if isinstance(header, dict) else None
    entries = _check_entries(leaves, structure, 1, source, size)
    arrays = [entry for entry in entries if entry["kind"] != "scalar"]
    offset = _V1_PREFIX.size + length
    for entry in arrays:
        entry["offset"] = offset
        offset += entry["nbytes"]
    _check_size(source, size, offset + _V1_CHECKSUM.size * len(arrays))
    file.seek(offset)
    crcs = _V1_CHECKSUM.iter_unpack(file.read(_V1_CHECKSUM.size * len(arrays)))
    for entry, (crc,) in zip(arrays, crcs, strict=True):
        entry["crc"] = crc
    return _Layout(1, entries, structure, offset)


_ARRAY_KINDS = ("jax", "numpy", "numpy_scalar", "key")


def _check_entries(
    leaves: Any, structure: Any, version: int, source: str, size: int
) -> list[dict[str, Any]]:
    """The leaf entries, each checked to be well formed and to fit in the file.

    Each check is cheap and bounded, so a header of any content is refused or
    accepted in time linear in its length.
    """
    if not (isinstance(leaves, list) and isinstance(structure, list)):
        raise _checkpoint_error(source, "has a malformed header")
    entries = []
    for entry in leaves:
        checked = _checked_entry(entry, version, size)
        if checked is None:
            path = entry.get("path") if isinstance(entry, dict) else None
            where = f" (the leaf at path {path})" if isinstance(path, str) else ""
            raise _checkpoint_error(source, f"has a malformed header{where}")
        entries.append(checked)
    return entries


def _checked_entry(entry: Any, version: int, size: int) -> dict[str, Any] | None:
    """A copy of a leaf entry with its sizes derived, or None if it is malformed."""
    if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
        return None
    kind = entry.get("kind")
    if kind == "scalar":
        try:
            value = _decode_scalar(entry.get("value"), version)
        except (ValueError, OverflowError):
            return None
        return {"path": entry["path"], "kind": kind, "value": value}
    allowed = _ARRAY_KINDS if version > 1 else ("jax", "numpy", "key")
    dtype = _numpy_dtype(entry.get("dtype"))
    shape: Any = entry.get("shape")
    if kind not in allowed or dtype is None or not _is_shape(shape):
        return None
    if _is_numpy_only(dtype) and (version == 1 or kind in ("jax", "key")):
        return None
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > size or (version == 1 and entry.get("nbytes") != nbytes):
        return None
    checked = {"path": entry["path"], "kind": kind, "dtype": entry["dtype"]}
    checked.update(shape=shape, nbytes=nbytes)
    if kind == "numpy_scalar" and shape:
        return None
    if "weak_type" in entry:
        if entry["weak_type"] is not True or kind != "jax" or version == 1:
            return None
        checked["weak_type"] = True
    if kind == "key":
        impl, key_shape = entry.get("impl"), entry.get("key_shape")
        key_shape = cast(list[int], key_shape)
        types = _key_impl_types().get(impl) if isinstance(impl, str) else None
        if types is None or not _is_shape(key_shape):
            return None
        if shape != key_shape + list(types[1]) or dtype != types[2]:
            return None
        checked.update(impl=impl, key_shape=key_shape)
    return checked


def _is_shape(shape: Any) -> bool:
    return (
        isinstance(shape, list)
        and len(shape) <= _MAX_DIMENSIONS
        and all(type(d) is int and 0 <= d < 2**62 for d in shape)
    )


def _is_saved_leaf(leaf: Any, version: int = _FORMAT_VERSION) -> bool:
    """Whether a leaf's value lives in the file (else the skeleton provides it)."""
    if isinstance(leaf, jax.ShapeDtypeStruct) or eqx.is_array(leaf):
        return True
    if version == 1:
        return isinstance(leaf, _PYTHON_SCALARS)
    return type(leaf) in _PYTHON_SCALARS


def _check_against_skeleton(source: str, layout: _Layout, skeleton: Any) -> None:
    """Structure and static values, then the leaf count, then each leaf's type."""
    api = _API.get()
    describe = _describe_static if layout.version > 1 else _describe_static_v1
    difference = _structure_difference_in_file(
        layout.structure, _structure(skeleton, describe)
    )
    if difference is not None:
        path, message = difference
        raise _checkpoint_error(
            source,
            f"does not match {api.skeleton} {_where(path)}: {message}. {api.fix}",
        )
    expected = [
        (_keystr(path), leaf)
        for path, leaf in jtu.tree_flatten_with_path(skeleton)[0]
        if _is_saved_leaf(leaf, layout.version)
    ]
    leaves = layout.entries
    if len(leaves) != len(expected):
        paths = [entry["path"] for entry in leaves]
        first = next(
            (p for p, (q, _) in zip(paths, expected, strict=False) if p != q),
            paths[len(expected)] if len(paths) > len(expected) else expected[-1][0],
        )
        raise _checkpoint_error(
            source,
            f"holds {len(leaves)} leaves, but {api.built} has {len(expected)}; they "
            f"first differ at path {first}. {api.fix}",
        )
    for entry, (path, leaf) in zip(leaves, expected, strict=True):
        if entry["path"] != path:
            raise _checkpoint_error(
                source,
                f"has a leaf at path {entry['path']} where {api.skeleton} "
                f"has one at {path}. {api.fix}",
            )
        problem = _leaf_mismatch(entry, leaf, layout.version)
        if problem is not None:
            raise _checkpoint_error(source, f"holds at path {path} {problem}")


_X64_PAIRS = (
    ("float64", "float32"),
    ("int64", "int32"),
    ("uint64", "uint32"),
    ("complex128", "complex64"),
)


def _leaf_mismatch(entry: dict[str, Any], leaf: Any, version: int) -> str | None:
    """How a saved leaf differs from the skeleton's, or None if it fits."""
    skeleton, fix = _API.get().skeleton, _API.get().fix
    if entry["kind"] == "scalar":
        value = entry["value"]
        fits = isinstance(leaf, _PYTHON_SCALARS) and (
            type(leaf) is type(value) or version == 1
        )
        if fits:
            return None
        return (
            f"the Python {type(value).__name__} {value!r}, where {skeleton} has "
            f"{_describe_leaf(leaf)}. {fix}"
        )
    if isinstance(leaf, np.ndarray | np.generic) and _is_numpy_only(leaf.dtype):
        saved = (tuple(entry["shape"]), entry["dtype"])
        if saved == (leaf.shape, _dtype_name(leaf.dtype)):
            return None
        return (
            f"an array of shape {saved[0]} and dtype {saved[1]}, but {skeleton} has "
            f"shape {leaf.shape} and dtype {_dtype_name(leaf.dtype)}. {fix}"
        )
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        return f"an array, where {skeleton} has {_describe_leaf(leaf)}. {fix}"
    if entry["kind"] == "key":
        shape, dtype = tuple(entry["key_shape"]), _key_impl_types()[entry["impl"]][0]
    else:
        shape = tuple(entry["shape"])
        dtype = cast(np.dtype, _numpy_dtype(entry["dtype"]))
    if shape == tuple(leaf.shape) and (
        dtype == leaf.dtype
        or (
            entry["kind"] in ("numpy", "numpy_scalar")
            and not _is_numpy_only(dtype)
            and jax.dtypes.canonicalize_dtype(dtype) == leaf.dtype
        )
    ):
        return None
    message = (
        f"an array of shape {shape} and dtype {dtype}, but {skeleton} has shape "
        f"{tuple(leaf.shape)} and dtype {leaf.dtype}"
    )
    pair = {str(dtype), str(leaf.dtype)}
    if shape == tuple(leaf.shape) and any(pair == set(p) for p in _X64_PAIRS):
        return (
            f"{message}. The dtypes differ only in width: the file was probably "
            "saved with `jax_enable_x64` set otherwise than now. Set it as when "
            "saving"
            + (
                ", or save the leaf as a NumPy array, which keeps its dtype"
                if entry["kind"] == "jax"
                else ""
            )
        )
    return f"{message}. {fix}"


def _structure_difference_in_file(
    saved: list[Any], wanted: list[Any]
) -> tuple[str, str] | None:
    """The first `(path, message)` where two `_structure` descriptions differ."""
    skeleton = _API.get().skeleton
    for saved_entry, wanted_entry in zip(saved, wanted, strict=False):
        if _json_sorted(saved_entry) == _json_sorted(wanted_entry):
            continue
        if not (
            isinstance(saved_entry, list)
            and len(saved_entry) == 2
            and isinstance(saved_entry[0], str)
        ):
            return wanted_entry[0], "the file's structure description is malformed"
        path, (was, want) = wanted_entry[0], (saved_entry[1], wanted_entry[1])
        if saved_entry[0] != path:
            return path, f"the file has a node at path {saved_entry[0]} instead"
        if (
            isinstance(was, dict)
            and isinstance(was.get("static"), dict)
            and isinstance(want, dict)
            and "static" in want
            and was.get("node") == want["node"]
            and set(was) == set(want)
        ):
            for field, value in want["static"].items():
                if field in was["static"] and _json_sorted(
                    was["static"][field]
                ) != _json_sorted(value):
                    return f"{path}.{field}", (
                        f"the static field is {was['static'][field]!r} in the file "
                        f"and {value!r} in {skeleton}"
                    )
            # Only a field that one side lacks differs: the class gained or lost a
            # static field between versions (Equinox's MLP gained `scan`).
            continue
        return path, f"the file has {was!r}, {skeleton} has {want!r}"
    if len(saved) != len(wanted):
        longer = saved if len(saved) > len(wanted) else wanted
        side = "the file" if longer is saved else skeleton
        extra = longer[min(len(saved), len(wanted))]
        where = extra[0] if isinstance(extra, list) and extra else ""
        return str(where), f"only {side} has a node here"
    return None


def _json_sorted(value: Any) -> str:
    """Canonical JSON: `True` and `1` differ, as do `1` and `1.0`."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _read_leaves(
    file: IO[bytes],
    layout: _Layout,
    source: str,
    shardings: Sequence[jax.sharding.Sharding | None] = (),
) -> list[Any]:
    """Read every leaf's value, checking each array against its CRC-32.

    Each checksum runs in a helper thread while the next leaf is read, and a leaf
    leaves host memory as soon as it is checked, so at most two are held at once.
    A JAX array or key leaf with a sharding in `shardings` (one per entry) is read
    shard by shard instead (`_read_sharded`).
    """
    leaves = layout.entries
    values: list[Any] = []
    pending: list[tuple[int, Any, concurrent.futures.Future[int]]] = []

    def finish(index: int, data: Any, checksum: concurrent.futures.Future[int]) -> None:
        entry = leaves[index]
        if checksum.result() != entry["crc"]:
            raise _checkpoint_error(
                source,
                f"has corrupt data for the leaf at path {entry['path']} "
                "(its checksum fails)",
            )
        problem = _invalid_bits(data, entry)
        if problem is not None:
            raise _checkpoint_error(
                source,
                f"holds invalid data for the leaf at path {entry['path']}: {problem}",
            )
        try:
            values[index] = _restore_kind(data, entry)
        except UnicodeDecodeError as err:
            raise _checkpoint_error(
                source,
                f"holds invalid data for the leaf at path {entry['path']}: a "
                f"character that is not Unicode ({err})",
            ) from err

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as checksummer:
        for index, entry in enumerate(leaves):
            if entry["kind"] == "scalar":
                values.append(entry["value"])
                continue
            sharding = shardings[index] if shardings else None
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
                raise _checkpoint_error(source, "is truncated inside its data")
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


# Loading into shardings. Each array is streamed through one buffer of at most this
# many bytes, in file order, for its checksum; each piece is copied from the buffer
# into the shards of this process's devices that it overlaps. So a process holds its
# own shards and one buffer, never a whole array it does not own.
_CHUNK_BYTES = 16 * 1024 * 1024


def _with_shardings(skeleton: Any, sharding: Any) -> Any:
    """The skeleton with each JAX array leaf asking for its sharding.

    `sharding` is one `Sharding` for every such leaf, or a callable that maps the
    skeleton to a pytree of shardings (or None) of its structure.
    """
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
                f"structure of the skeleton ({err}). Return one with a Sharding or "
                "None at each of its array leaves, for example "
                "`jax.tree_util.tree_map(choose, skeleton)`."
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
        weak = {"weak_type": True} if getattr(leaf, "weak_type", False) else {}
        try:
            placed.append(
                jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=choice, **weak)
            )
        except ValueError as err:
            raise _sharding_error(name, _keystr(key_path), leaf.shape, err) from err
    return treedef.unflatten(placed)


def _sharding_error(
    function: str, path: str, shape: tuple[int, ...], err: Exception
) -> ValueError:
    return ValueError(
        f"{function}: the sharding asked for the leaf at path {path} does not fit "
        f"its shape {tuple(shape)}: {str(err).rstrip('.')}. Pass a sharding of at "
        "most as many axes as the leaf whose mesh axes divide the dimensions they "
        "shard, or None for this leaf."
    )


def _leaf_sharding(leaf: Any) -> jax.sharding.Sharding | None:
    """The sharding a skeleton leaf asks for: that of a `jax.ShapeDtypeStruct` or of a
    concrete `jax.Array`, or None."""
    if isinstance(leaf, jax.ShapeDtypeStruct | jax.Array) and not isinstance(
        leaf, jax.core.Tracer
    ):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.Sharding):
            return sharding
    return None


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
    file: IO[bytes],
    entry: dict[str, Any],
    sharding: jax.sharding.Sharding,
    source: str,
) -> jax.Array:
    """One array leaf, created with `sharding`, each local shard read from the file.

    First the whole tensor streams through a bounded buffer for its CRC-32 and the
    checks of its bits, so a corrupt file fails before any device array exists.
    Then each shard this process holds is read alone, put on its devices and freed:
    host memory holds one shard and the buffer at a time. Where this process holds
    one shard (one device, or a replicated array), both happen in one pass.
    """
    path = entry["path"]
    dtype = cast(np.dtype, _numpy_dtype(entry["dtype"]))
    shape = tuple(entry["shape"])  # Of the stored data: key data for a key.
    is_key = entry["kind"] == "key"
    global_shape = tuple(entry["key_shape"]) if is_key else shape
    try:
        sharding.shard_shape(global_shape)  # Refuses an axis it does not divide.
        indices = sharding.addressable_devices_indices_map(global_shape)
        regions = {
            device: _region(index, global_shape)
            + tuple((0, size) for size in shape[len(global_shape) :])
            for device, index in indices.items()
        }
    except Exception as err:
        raise _sharding_error(_API.get().load, path, global_shape, err) from err
    distinct = list(dict.fromkeys(regions.values()))  # A replicated shard once.
    if len(distinct) > 1:
        _stream_into_shards(file, entry, shape, dtype, {}, source)
    on_devices: dict[Any, jax.Array] = {}
    for region in distinct:
        host = _aligned_empty([stop - start for start, stop in region], dtype)
        # One shard (one device, or replicated): checked and read in one pass.
        box = region if len(distinct) > 1 else None
        _stream_into_shards(file, entry, shape, dtype, {region: host}, source, box)
        for device, wanted in regions.items():
            if wanted == region:
                shard = jax.device_put(host, device)
                if is_key:
                    shard = jax.random.wrap_key_data(shard, impl=entry["impl"])
                on_devices[device] = shard
        del host
    array = jax.make_array_from_single_device_arrays(
        global_shape, sharding, [on_devices[device] for device in regions]
    )
    if entry.get("weak_type"):
        array = _weak_array(array)
    return array


def _stream_into_shards(
    file: IO[bytes],
    entry: dict[str, Any],
    shape: tuple[int, ...],
    dtype: np.dtype,
    shards: dict[_Region, np.ndarray],
    source: str,
    box: _Region | None = None,
) -> None:
    """Read a tensor in file order through one buffer and copy each piece into the
    shards (keyed by region) that it overlaps.

    Without `box`, the whole tensor is read and its CRC-32 and bits are checked.
    With it, only the pieces that overlap `box` are read, unchecked.

    A piece is a run of whole sub-arrays along one axis (`level`): the fewest
    leading axes such that one step along `level` fits in the buffer.
    """
    itemsize = dtype.itemsize
    level = next(
        (
            axis
            for axis in range(len(shape))
            if math.prod(shape[axis + 1 :]) * itemsize <= max(_CHUNK_BYTES, itemsize)
        ),
        len(shape),
    )
    step_bytes = math.prod(shape[level + 1 :]) * itemsize
    steps = max(1, _CHUNK_BYTES // max(step_bytes, 1))
    buffer = np.empty(min(entry["nbytes"], steps * max(step_bytes, 1)), np.uint8)
    ranges = box if box is not None else tuple((0, size) for size in shape)
    low, high = ranges[level] if level < len(shape) else (0, 1)
    inner = shape[level + 1 :]
    crc = 0
    for outer in itertools.product(*(range(a, b) for a, b in ranges[:level])):
        if not entry["nbytes"]:
            break
        base = sum(i * math.prod(shape[a + 1 :]) for a, i in enumerate(outer))
        for first in range(low, high, steps):
            count = min(steps, high - first)
            nbytes = count * step_bytes
            file.seek(entry["offset"] + base * itemsize + first * step_bytes)
            view = buffer[:nbytes]
            if file.readinto(view.data) != nbytes:  # type: ignore[attr-defined]
                raise _checkpoint_error(source, "is truncated inside its data")
            piece = view.view(dtype).reshape((count, *inner))
            if box is None:
                crc = zlib.crc32(view.data, crc)
                problem = _invalid_bits(piece, entry)
                if problem is not None:
                    raise _checkpoint_error(
                        source,
                        f"holds invalid data for the leaf at path {entry['path']}: "
                        f"{problem}",
                    )
            if level == len(shape):  # A 0-d array: one element.
                for shard in shards.values():
                    shard[...] = piece.reshape(())
                continue
            _copy_piece(piece, outer, first, level, shards)
    if box is None and crc != entry["crc"]:
        raise _checkpoint_error(
            source,
            f"has corrupt data for the leaf at path {entry['path']} (its checksum "
            "fails)",
        )


def _copy_piece(
    piece: np.ndarray,
    outer: tuple[int, ...],
    first: int,
    level: int,
    shards: dict[_Region, np.ndarray],
) -> None:
    """Copy `piece` (indices `outer` on the leading axes, `first` onward along
    `level`, whole along the rest) into each shard it overlaps."""
    count = piece.shape[0]
    for region, shard in shards.items():
        if not all(a <= i < b for i, (a, b) in zip(outer, region, strict=False)):
            continue
        start, stop = region[level]
        low, high = max(start, first), min(stop, first + count)
        if low >= high:
            continue
        source = piece[
            (slice(low - first, high - first),)
            + tuple(slice(a, b) for a, b in region[level + 1 :])
        ]
        target = tuple(i - a for i, (a, _) in zip(outer, region, strict=False))
        shard[(*target, slice(low - start, high - start))] = source


def _place(tree: Any, skeleton: Any) -> Any:
    """`tree` with each JAX array put on the sharding its skeleton leaf asks for."""

    def place(leaf: Any, like: Any) -> Any:
        sharding = _leaf_sharding(like)
        if sharding is None or not isinstance(leaf, jax.Array):
            return leaf
        return jax.device_put(leaf, sharding)

    return jtu.tree_map(place, tree, skeleton)


def _invalid_bits(data: np.ndarray, entry: dict[str, Any]) -> str | None:
    """Why a loaded array's bytes are no values of its dtype, or None if they are."""
    view = data.reshape(-1).view(np.uint8)
    if data.dtype == np.bool_ and view.size and view.max() > 1:
        return "a boolean byte other than 0 or 1"
    if entry["dtype"] in _SUB_BYTE_DTYPES:
        canonical = data.astype(np.float32).astype(data.dtype)
        if not np.array_equal(canonical.reshape(-1).view(np.uint8), view):
            return f"a {entry['dtype']} byte whose unused high bits are not zero"
    return None


def _restore_kind(data: np.ndarray, entry: dict[str, Any]) -> Any:
    """A loaded NumPy array as the kind of leaf it was saved from."""
    if entry["kind"] == "jax":
        array = jax.device_put(data)
        if entry.get("weak_type"):  # As `jnp.asarray(2.0)`: restore the exact aval.
            array = _weak_array(array)
        return array
    if entry["kind"] == "key":
        return jax.random.wrap_key_data(jax.device_put(data), impl=entry["impl"])
    dtype = cast(np.dtype, _numpy_dtype(entry["dtype"]))
    if dtype.byteorder == ">":
        data = data.astype(dtype)
    if entry["kind"] == "numpy_scalar":
        # `data[()]` would drop trailing NULs of a bytes or str scalar.
        if dtype.kind == "S":
            return np.bytes_(data.tobytes())
        if dtype.kind == "U":
            raw = data.astype(dtype.newbyteorder("<")).tobytes()
            return np.str_(raw.decode("utf-32-le", "surrogatepass"))
        return data[()]
    return data


def _weak_array(array: jax.Array) -> jax.Array:
    """`array`, weakly typed. JAX has no public way to set the flag."""
    from jax._src.lax import lax as lax_internal

    weak = lax_internal._convert_element_type(array, array.dtype, weak_type=True)
    return cast(jax.Array, weak)


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
