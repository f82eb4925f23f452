"""Checkpoints: `Serializable`, `save_pytree` and `load_pytree` (the property-based
round trips stay in `test_lerax_utils.py`).

Our files are read back by the real `safetensors` package; files of older formats and
of other programs are refused, and plain Equinox files loaded; damaged and crafted
headers are refused with a ValueError, quickly and with bounded memory; and a byte
flipped, cut or inserted in any region of a file never loads silently. Writes are
atomic and durable, inside `jit` too. Whole training states round-trip, and models
rebuild from the constructor arguments recorded in their file.

Sharded loads are checked on one device against NumPy slicing, then in a process with
four CPU devices. Two processes under `jax.distributed` (two CPU devices each) save
one file from arrays that span them and load their own shards; every wait is bounded,
by the processes' own short timeout and by the subprocess timeout after which both
are killed.
"""

import collections
import copy
import dataclasses
import enum
import functools
import inspect
import io
import json
import os
import pathlib
import pickle
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest.mock
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import equinox as eqx
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors
import safetensors.numpy
from _helpers import (
    ROOT,
    Agent,
    Checkpointed,
    WithStatic,
    agent,
    assert_exact,
    assert_identical,
    bad_file,
    checkpoint_bytes,
    forge,
    is_key,
    load_error,
    run_on_four_devices,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lerax_utils
from lerax_utils import (
    Serializable,
    filter_cond,
    filter_scan,
    load_pytree,
    save_pytree,
    stack_pytree,
    unstack_pytree,
)

_ALL_DTYPES = sorted(lerax_utils._checkpoint_dtypes())
_WIDE = ("float64", "int64", "uint64", "complex128")
_SUB_BYTE = {
    "int4": list(range(-8, 8)),
    "uint4": list(range(16)),
    "int2": list(range(-2, 2)),
    "uint2": list(range(4)),
    "float4_e2m1fn": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0],
}


@st.composite
def any_array(draw: st.DrawFn) -> Any:
    """An array of any dtype JAX supports, with arbitrary bits where every bit
    pattern is a value; as a JAX or a NumPy array."""
    name = draw(st.sampled_from(_ALL_DTYPES))
    dtype = lerax_utils._checkpoint_dtypes()[name]
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
    count = int(np.prod(shape))
    if name == "bool":
        value = np.array(draw(st.lists(st.booleans(), min_size=count, max_size=count)))
    elif name in _SUB_BYTE:
        items = st.sampled_from(_SUB_BYTE[name])
        value = np.array(draw(st.lists(items, min_size=count, max_size=count)))
    else:
        size = count * dtype.itemsize
        raw = draw(st.binary(min_size=size, max_size=size))
        value = np.frombuffer(raw, np.uint8).view(dtype)
    value = value.astype(dtype).reshape(shape)
    if name in _WIDE or draw(st.booleans()):  # JAX narrows 64-bit values.
        return np.array(value)
    return jnp.asarray(value)


@st.composite
def any_key(draw: st.DrawFn) -> Any:
    impl = draw(st.sampled_from(["threefry2x32", "rbg", "unsafe_rbg"]))
    key = jax.random.key(draw(st.integers(0, 2**16)), impl=impl)
    return (
        jax.random.split(key, draw(st.integers(1, 3))) if draw(st.booleans()) else key
    )


def _stored_bytes(leaf: Any) -> bytes:
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf).tobytes()


# The safetensors names of the dtypes it has (its README); all others are bytes.
_SAFETENSORS_NAMES = {
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
_NUMPY_NAMES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "U64": np.uint64,
    "I32": np.int32,
    "U32": np.uint32,
    "I16": np.int16,
    "U16": np.uint16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@given(leaves=st.lists(st.one_of(any_array(), any_key()), min_size=1, max_size=5))
def test_safetensors_reads_every_tensor_we_write(tmp_path_factory, leaves):
    folder = tmp_path_factory.mktemp("interop")
    model = Checkpointed(leaves)
    model.serialize(folder / "model")
    path = folder / "model.eqx"
    assert_exact(Checkpointed.deserialize(path, leaves), model)
    raw = path.read_bytes()
    tensors = dict(safetensors.deserialize(raw))
    assert sorted(tensors) == sorted(f".params[{i}]" for i in range(len(leaves)))
    entries = json.loads(safetensors.safe_open(path, "numpy").metadata()["leaves"])
    by_numpy = safetensors.numpy.load(
        _only_numpy_dtypes(raw)
    )  # The reference reader's own checks, and NumPy arrays.
    for index, leaf in enumerate(leaves):
        name = f".params[{index}]"
        tensor, entry = tensors[name], entries[index]
        assert bytes(tensor["data"]) == _stored_bytes(leaf), name
        data = np.asarray(
            jax.random.key_data(leaf)
            if isinstance(leaf, jax.Array)
            and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            else leaf
        )
        assert entry["dtype"] == data.dtype.name
        safetensors_name = _SAFETENSORS_NAMES.get(data.dtype.name, "U8")
        assert tensor["dtype"] == safetensors_name
        itemsize = data.dtype.itemsize
        expected_shape = list(data.shape)
        if safetensors_name == "U8" and data.dtype != np.uint8 and itemsize > 1:
            expected_shape.append(itemsize)
        assert tensor["shape"] == expected_shape
        if tensor["dtype"] in _NUMPY_NAMES:
            read = by_numpy[name]
            assert read.dtype == _NUMPY_NAMES[tensor["dtype"]]
            assert read.tobytes() == data.tobytes()
            if safetensors_name != "U8" or data.dtype == np.uint8:
                assert read.dtype == data.dtype


def test_the_readers_the_readme_names_read_what_it_says(tmp_path):
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`safetensors.numpy.load_file` (as of safetensors 0.8) refuses" in readme
    leaves = {"f": np.arange(3.0, dtype=np.float32), "b": jnp.ones(2, jnp.bfloat16)}
    save_pytree(tmp_path / "plain", leaves)
    read = safetensors.numpy.load_file(tmp_path / "plain.eqx")
    expected = jax.tree.map(np.asarray, leaves)
    assert_exact({k: read[f"['{k}']"] for k in leaves}, expected)
    eight = {"e": jnp.arange(3.0).astype(jnp.float8_e4m3fn)}
    save_pytree(tmp_path / "eight", eight)
    tensors = dict(safetensors.deserialize((tmp_path / "eight.eqx").read_bytes()))
    assert bytes(tensors["['e']"]["data"]) == np.asarray(eight["e"]).tobytes()
    with pytest.raises(AttributeError):
        safetensors.numpy.load_file(tmp_path / "eight.eqx")


def test_every_dtype_is_stored_under_its_safetensors_name_or_as_bytes(tmp_path):
    leaves = {name: np.zeros((2, 3), dtype) for name, dtype in _dtypes().items()}
    Checkpointed(leaves).serialize(tmp_path / "all")
    raw = (tmp_path / "all.eqx").read_bytes()
    tensors = dict(safetensors.deserialize(raw))
    for name, leaf in leaves.items():
        tensor = tensors[f".params['{name}']"]
        stored = _SAFETENSORS_NAMES.get(name, "U8")
        item = [leaf.itemsize] if stored == "U8" and leaf.itemsize > 1 else []
        assert (tensor["dtype"], tensor["shape"]) == (stored, [2, 3, *item]), name
    loaded = Checkpointed.deserialize(tmp_path / "all", leaves)
    assert_exact(loaded, Checkpointed(leaves))


# Many JAX leaves to a file, every dtype and some weakly typed: each loads as what
# `jnp.asarray` makes of its saved value, with its aval, bytes, sharding and commitment.
def test_jax_leaves_of_every_dtype_load_as_jnp_asarray_makes_them(tmp_path):
    tree = {"weak": jnp.asarray(2.0), "weak int": jnp.asarray(3) * jnp.ones(2, int)}
    for name, dtype in _dtypes().items():
        if dtype == jax.dtypes.canonicalize_dtype(dtype):  # Else narrowed, refused.
            for shape in [(), (0,), (2, 3)]:
                tree[f"{name} {shape}"] = jnp.asarray(np.ones(shape).astype(dtype))
    save_pytree(tmp_path / "t", tree)
    loaded = load_pytree(tmp_path / "t", tree)
    committed = lerax_utils._is_committed
    for key, saved in tree.items():
        got, made = loaded[key], jnp.asarray(np.asarray(saved))
        assert got.aval == saved.aval and got.aval.weak_type == saved.aval.weak_type
        assert np.asarray(got).tobytes() == np.asarray(saved).tobytes(), key
        assert (got.sharding, committed(got)) == (made.sharding, committed(made)), key


# What JAX checks as `jnp.asarray` places an array (NaNs and Infs where asked, and the
# transfer guard), it checks for every loaded leaf, not the first alone.
@pytest.mark.parametrize(
    "context, bad",
    [
        (lambda: jax.debug_nans(True), np.nan),
        (lambda: jax.debug_infs(True), np.inf),
        (lambda: jax.transfer_guard("disallow"), 1.0),
    ],
)
def test_loads_are_checked_as_jnp_asarray_is(tmp_path, context, bad):
    value = np.array([1.0, bad], np.float32)
    tree = {"a": jnp.ones(3), "b": jnp.asarray(value), "c": jnp.ones(2)}
    save_pytree(tmp_path / "t", tree)

    def outcome(call: Callable[[], Any]) -> str:
        try:
            call()
        except Exception as err:  # JAX's own error types differ between versions.
            return type(err).__name__
        return "placed"

    with context():
        asarray = [
            outcome(lambda x=x: jnp.asarray(np.asarray(x))) for x in tree.values()
        ]
        loaded = outcome(lambda: load_pytree(tmp_path / "t", tree))
    assert loaded == next((o for o in asarray if o != "placed"), "placed")


def _dtypes() -> dict[str, np.dtype]:
    """Every dtype of JAX, found independently of lerax_utils."""
    found = {}
    for name in [*_SAFETENSORS_NAMES, *_OTHER_NAMES]:
        if hasattr(jnp, name):
            found[name] = np.dtype(getattr(jnp, name))
    return found


_OTHER_NAMES = [
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
]


def _only_numpy_dtypes(raw: bytes) -> bytes:
    """The same file with the tensors NumPy cannot hold (BF16, F8) relabelled as
    bytes, so that `safetensors.numpy.load` reads the rest."""
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    for name, tensor in header.items():
        if name != "__metadata__" and tensor["dtype"] not in _NUMPY_NAMES:
            start, end = tensor["data_offsets"]
            tensor.update(dtype="U8", shape=[end - start])
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


def test_a_safetensors_file_of_another_program_is_refused(tmp_path):
    for metadata in (None, {"format": "pt"}):
        path = tmp_path / "other.eqx"
        safetensors.numpy.save_file(
            {".params": np.ones(3, np.float32)}, str(path), metadata=metadata
        )
        assert load_error(path, jnp.ones(3), cls=Checkpointed) == (
            f"Serializable.deserialize: the file '{path}' is a safetensors file but "
            "not a lerax_utils checkpoint (its `__metadata__` names no format "
            "'lerax_utils'). Read it with `safetensors`."
        )


def test_plain_equinox_files_keep_loading(tmp_path):
    import equinox as eqx

    model = Checkpointed({"w": jnp.arange(6.0), "n": 3}, temperature=2.0)
    eqx.tree_serialise_leaves(tmp_path / "plain.eqx", model)
    loaded = Checkpointed.deserialize(tmp_path / "plain", {"w": jnp.ones(6), "n": 0})
    assert_identical(loaded, model)


# Damaged and crafted headers: every one is a ValueError that names the file.


def _small_bytes(tmp_path: pathlib.Path) -> bytes:
    model = Checkpointed({"k": jax.random.key(0), "n": 3, "w": jnp.arange(4.0)})
    model.serialize(tmp_path / "small")
    return (tmp_path / "small.eqx").read_bytes()


_SMALL_SKELETON = {"k": jax.random.key(1), "n": 0, "w": jnp.zeros(4)}


def _set_key(field: str, value: Any) -> Any:
    def edit(leaves, structure, header):
        leaves[0][field] = value

    return edit


def _set_metadata(field: str, text: str) -> Any:
    def edit(leaves, structure, header):
        header["__metadata__"][field] = text

    return edit


def _deep_structure(leaves, structure, header):
    structure.append([".x", json.loads("[" * 900 + "]" * 900)])


def _nodeless(leaves, structure, header):
    del structure[0][1]["node"]


def _many_dimensions(leaves, structure, header):
    leaves[2]["shape"] = [1] * 400_000


def _many_keys(leaves, structure, header):
    leaves.extend([dict(leaves[0], path=f".k{i}") for i in range(100_000)])


_CRAFTED = {
    "key dtype float32": _set_key("dtype", "float32"),
    "key dtype |V8": _set_key("dtype", "|V8"),
    "key shape [4]": _set_key("shape", [4]),
    "key impl unknown": _set_key("impl", "os.system"),
    "key shape of keys a str": _set_key("key_shape", "ab"),
    "key shape of keys an int": _set_key("key_shape", 2),
    "key impl a list": _set_key("impl", ["threefry2x32"]),
    "a leaf entry as a list": lambda leaves, s, h: leaves.__setitem__(1, [".n"]),
    "a leaf entry's path an int": lambda leaves, s, h: leaves[1].update(path=1),
    "array dtype subarray": lambda leaves, s, h: leaves[2].update(dtype="(2,)f4"),
    "structure is a str": _set_metadata("structure", '"tree"'),
    "structure is a list of ints": _set_metadata("structure", "[1, 2]"),
    "structure is an int": _set_metadata("structure", "7"),
    "a node without its name": _nodeless,
    "static fields as a str": lambda leaves, s, h: s[0][1].update(static="x"),
    "static fields as a list": lambda leaves, s, h: s[0][1].update(static=[1]),
    "static fields as an int": lambda leaves, s, h: s[0][1].update(static=5),
    "a description as an int": lambda leaves, s, h: s[1].__setitem__(1, 5),
    "nesting 900 deep": _deep_structure,
    "400k dimensions": _many_dimensions,
    "100k key entries": _many_keys,
    "leaves not JSON": _set_metadata("leaves", "[{"),
    "leaves nested 100k deep": _set_metadata("leaves", "[" * 100_000),
    "22M empty structure entries": _set_metadata("structure", "[" + "[]," * 1_500_000),
    "an int with 5000 digits": lambda leaves, s, h: h["__metadata__"].update(
        leaves=json.dumps(leaves).replace('"value": 3', '"value": ' + "9" * 5000)
    ),
    "an int by an unknown tag": lambda leaves, s, h: leaves[1].update(
        value=["int", "3"]
    ),
    "a number as an object": lambda leaves, s, h: leaves[1].update(value={"int": 3}),
    "a float of bad bits": lambda leaves, s, h: leaves[1].update(value=["float", "x"]),
    "a bool spelt otherwise": lambda leaves, s, h: leaves[1].update(
        value=["bool", "false"]
    ),
    "a number marked unrecordable": lambda leaves, s, h: leaves[1].update(
        value=["unrecordable", "a function"]
    ),
    "a NumPy number not in hex": lambda leaves, s, h: leaves[1].update(
        value=["numpy", [], "int32", "zz"]
    ),
    "a NumPy number of two items": lambda leaves, s, h: leaves[1].update(
        value=["numpy", [], "int32", "0" * 16]
    ),
    "an extra tensor": lambda leaves, s, h: h.update(
        {"x": {"dtype": "U8", "shape": [0], "data_offsets": [40, 40]}}
    ),
    "a tensor table entry moved": lambda leaves, s, h: h[".params['w']"].update(
        data_offsets=[0, 16]
    ),
    "a CRC in capitals": lambda leaves, s, h: h["__metadata__"].update(
        crc32=h["__metadata__"]["crc32"].upper()
    ),
}


def test_an_array_entry_where_the_structure_has_a_number_is_refused(tmp_path):
    Checkpointed({"n": jnp.asarray(3)}).serialize(tmp_path / "good")

    def as_number(leaves, structure, header):
        structure[2][1] = ["scalar", "int"]  # Its leaves entry stays an array's.

    good = (tmp_path / "good.eqx").read_bytes()
    path = bad_file(tmp_path, forge(good, as_number))
    assert load_error(path, {"n": 0}, cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' holds at path .params['n'] an "
        "array, where the skeleton has int 0" + _FIX
    )


@pytest.mark.parametrize("name", list(_CRAFTED))
def test_a_crafted_header_is_a_value_error(tmp_path, name):
    path = bad_file(tmp_path, forge(_small_bytes(tmp_path), _CRAFTED[name]))
    error = load_error(path, _SMALL_SKELETON, cls=Checkpointed)
    assert error.startswith(f"Serializable.deserialize: the file '{path}' "), error


_NAMED = " (the leaf at path .params['n'])"  # Where the entry has a path to name.


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("a float of bad bits", _NAMED),
        ("a number marked unrecordable", _NAMED),
        ("a number as an object", _NAMED),
        ("a leaf entry as a list", ""),
        ("a leaf entry's path an int", ""),
    ],
)
def test_a_malformed_entry_names_its_leaf_if_it_has_a_path(tmp_path, name, where):
    path = bad_file(tmp_path, forge(_small_bytes(tmp_path), _CRAFTED[name]))
    assert load_error(path, _SMALL_SKELETON, cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' has a malformed header{where}."
    )


def _box(field: str) -> Any:  # One class name, with `field` its one field.
    return type("_Box", (eqx.Module,), {"__annotations__": {field: jax.Array}})


def test_a_renamed_field_is_named_at_the_skeletons_path(tmp_path):
    save_pytree(tmp_path / "box", _box("first")(jnp.ones(2)))
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "box", _box("second")(jnp.ones(2)))
    assert str(info.value).startswith(
        f"load_pytree: the file '{tmp_path / 'box.eqx'}' does not match `like` at "
        "path .second: the file has a node at path .first instead."
    )


def test_a_node_where_like_has_an_array_is_named(tmp_path):
    save_pytree(tmp_path / "t", {"a": {"b": jnp.ones(1)}})
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "t", {"a": jnp.ones(1)})
    assert str(info.value) == (
        f"load_pytree: the file '{tmp_path / 't.eqx'}' does not match `like` at path "
        "['a']: the file has {'node': 'dict', 'keys': ['b']}, `like` has 'array'. "
        "Pass a `like` with the structure, shapes and dtypes of the saved tree."
    )


def test_a_64_mib_header_is_parsed(tmp_path):
    good = _small_bytes(tmp_path)

    def huge(leaves, structure, header):
        header["__metadata__"]["note"] = "x" * (64 * 1024 * 1024 - 4096)

    path = bad_file(tmp_path, forge(good, huge))
    assert 64 * 1024 * 1024 - 4096 < path.stat().st_size < 64 * 1024 * 1024
    loaded = Checkpointed.deserialize(path, _SMALL_SKELETON)
    assert_identical(loaded.params["w"], jnp.arange(4.0))


# A byte flipped, cut or inserted in each region of a file.


def _regions(raw: bytes) -> dict[str, range]:
    (length,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + length]
    metadata_end = 8 + text.index(b'},"') + 1
    json_end = 8 + len(text.rstrip(b" "))
    return {
        "length": range(0, 8),
        "metadata": range(8, metadata_end),
        "tensor table": range(metadata_end, json_end),
        "padding": range(json_end, 8 + length),
        "data": range(8 + length, len(raw)),
    }


@pytest.mark.parametrize(
    "region", ["length", "metadata", "tensor table", "padding", "data"]
)
def test_no_damage_in_any_region_loads_silently(tmp_path, region):
    good = _small_bytes(tmp_path)
    span = _regions(good)[region]
    assert len(span) > 0
    step = max(1, len(span) // 40)
    damaged = []
    for offset in span[::step]:
        for flip in (0x01, 0x02, 0x20, 0x80, 0xFF):
            corrupt = bytearray(good)
            corrupt[offset] ^= flip
            damaged.append(bytes(corrupt))
        damaged.append(good[:offset] + good[offset + 1 :])  # A byte cut.
        damaged.append(good[:offset] + b" " + good[offset:])  # A byte inserted.
        damaged.append(good[:offset])  # Truncated there.
    for content in damaged:
        path = bad_file(tmp_path, content)
        with pytest.raises(ValueError, match="Serializable.deserialize: the file"):
            Checkpointed.deserialize(path, _SMALL_SKELETON)


_HASH_SEED_WRITER = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    sys.path.insert(0, "tests")
    from _helpers import WithStatic
    tags = frozenset({"actor", "critic", "value", "policy", "target", "entropy"})
    WithStatic(jnp.ones(2), {"tags": tags, "n": 1}).serialize(sys.argv[1])
    """
)


def test_a_set_is_described_the_same_under_every_hash_seed(tmp_path):
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run(
            [sys.executable, "-c", _HASH_SEED_WRITER, str(tmp_path / seed)],
            cwd=ROOT,
            env=env,
            check=True,
            timeout=120,
        )
    files = [(tmp_path / f"{seed}.eqx").read_bytes() for seed in ("1", "2", "3")]
    assert files[0] == files[1] == files[2]
    tags = frozenset({"actor", "critic", "value", "policy", "target", "entropy"})
    loaded = WithStatic.deserialize(tmp_path / "1", jnp.ones(2), {"n": 1, "tags": tags})
    assert loaded.options == {"tags": tags, "n": 1}


def test_a_shape_of_too_many_dimensions_is_refused_before_any_work(tmp_path):
    path = bad_file(tmp_path, forge(_small_bytes(tmp_path), _many_dimensions))
    assert load_error(path, _SMALL_SKELETON, cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' has a malformed header (the "
        "leaf at path .params['w'])."
    )


def test_a_header_of_too_many_lists_is_refused_before_parsing(tmp_path):
    limit = lerax_utils._MAX_CONTAINERS
    many = _set_metadata("structure", "[" + "[]," * limit + "[]]")
    path = bad_file(tmp_path, forge(_small_bytes(tmp_path), many))
    assert load_error(path, _SMALL_SKELETON, cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' has a header with more than "
        f"{limit} lists and objects; the file is corrupt."
    )


def test_a_header_of_far_too_many_entries_is_refused_before_they_are_decoded(
    tmp_path, monkeypatch
):
    save_pytree(tmp_path / "good", {"w": jnp.ones(2)})
    extra = 200_000

    def pad(leaves: Any, structure: Any, header: Any) -> None:
        for i in range(extra):  # Empty arrays, each with a valid table entry.
            leaves.append({"path": f"['x{i}']", "kind": "numpy", "dtype": "float32"})
            leaves[-1]["shape"] = [0]
            header[f"['x{i}']"] = {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}
        header["__metadata__"]["crc32"] += "00000000" * extra

    path = bad_file(tmp_path, forge((tmp_path / "good.eqx").read_bytes(), pad))
    decoded = []
    checked_entry = lerax_utils._checked_entry
    monkeypatch.setattr(
        lerax_utils, "_checked_entry", lambda e: decoded.append(e) or checked_entry(e)
    )
    with pytest.raises(ValueError) as info:
        load_pytree(path, {"w": jnp.zeros(2)})
    assert str(info.value) == (
        f"load_pytree: the file '{path}' holds {extra + 1} leaves, and `like` has 1; "
        "they first differ at path ['x0']. Pass a `like` with the structure, shapes "
        "and dtypes of the saved tree."
    )
    assert decoded == []


_WRITER = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    sys.path.insert(0, "tests")
    from _helpers import Checkpointed
    model = Checkpointed(jnp.full(200_000, float(sys.argv[2])))
    print("ready", flush=True)
    for _ in range(100):
        model.serialize(sys.argv[1])
    """
)


def test_two_writers_and_a_reader_only_ever_see_whole_checkpoints(tmp_path):
    path = tmp_path / "shared.eqx"
    Checkpointed(jnp.full(200_000, 0.0)).serialize(path)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), value],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for value in ("1", "2")
    ]
    seen = []
    deadline = time.monotonic() + 120
    try:
        for writer in writers:
            assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        while any(w.poll() is None for w in writers) and time.monotonic() < deadline:
            loaded = Checkpointed.deserialize(path, jnp.zeros(200_000))
            values = np.unique(np.asarray(loaded.params)).tolist()
            assert len(values) == 1 and values[0] in (0.0, 1.0, 2.0)
            seen.append(values[0])
    finally:
        for writer in writers:
            writer.kill()
            writer.wait(timeout=30)
            if writer.stdout is not None:
                writer.stdout.close()
    assert seen  # The reader overlapped the writers.
    if all(writer.returncode == 0 for writer in writers):  # Neither was killed.
        assert [p.name for p in tmp_path.iterdir()] == ["shared.eqx"]


# Found in review: silent wrong values, saves that could not load, crashes.


def _weak_or_strong(value: float, shape: tuple[int, ...], weak: bool) -> jax.Array:
    array = jnp.full(shape, value)  # Weakly typed, as from a Python float.
    return array if weak else jnp.asarray(array, jnp.float32)


@given(
    flags=st.lists(st.booleans(), min_size=1, max_size=4),
    skeleton_flags=st.lists(st.booleans(), min_size=4, max_size=4),
    traced=st.booleans(),
    concrete=st.booleans(),
)
def test_weak_types_load_as_the_skeleton_says(
    tmp_path_factory, flags, skeleton_flags, traced, concrete
):
    leaves = [_weak_or_strong(i + 0.5, (i % 2,) * i, w) for i, w in enumerate(flags)]
    assert [leaf.weak_type for leaf in leaves] == flags
    path = tmp_path_factory.mktemp("weak") / "model"
    model = Checkpointed(leaves)
    if traced:
        eqx.filter_jit(lambda m: m.serialize(path))(model)
        jax.effects_barrier()
    else:
        model.serialize(path)
    skeleton = [
        _weak_or_strong(0.0, leaf.shape, w)
        for leaf, w in zip(leaves, skeleton_flags, strict=False)
    ]
    if concrete:  # A `like` of arrays, which carry their weak types.
        loaded = load_pytree(path, Checkpointed(skeleton))
    else:
        loaded = Checkpointed.deserialize(path, skeleton)
    # The skeleton's weak types, where its shapes carry them (not in jax 0.4.26).
    told = concrete or hasattr(jax.eval_shape(lambda: skeleton[0]), "weak_type")
    wanted = skeleton_flags[: len(flags)] if told else flags
    assert [leaf.weak_type for leaf in loaded.params] == wanted
    x = jnp.ones((), jnp.bfloat16)
    assert [(x * leaf).dtype for leaf in loaded.params] == [
        (x * leaf).dtype for leaf in skeleton
    ] or not told
    assert_identical(loaded, model)  # Values and dtypes; weak types checked above.


def test_a_weak_flag_other_than_true_is_malformed(tmp_path):
    Checkpointed([jnp.asarray(2.0)]).serialize(tmp_path / "good")

    def edit(leaves, structure, header):
        leaves[0]["weak_type"] = 1

    path = bad_file(tmp_path, forge((tmp_path / "good.eqx").read_bytes(), edit))
    assert load_error(path, [jnp.asarray(2.0)], cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' has a malformed header (the "
        "leaf at path .params[0])."
    )


@pytest.mark.parametrize(
    ("saved", "other"),
    [
        (np.dtype(jnp.int4), np.dtype(jnp.uint4)),
        (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)),
        (np.dtype(jnp.float8_e4m3fn), np.dtype(jnp.float8_e5m2)),
    ],
    ids=["int4", "bfloat16", "float8"],
)
def test_static_dtypes_of_the_same_width_are_told_apart(tmp_path, saved, other):
    Checkpointed(jnp.zeros(1), label=saved).serialize(tmp_path / "model")
    loaded = Checkpointed.deserialize(tmp_path / "model", jnp.zeros(1), label=saved)
    assert type(loaded.label) is type(saved) and repr(loaded.label) == repr(saved)
    message = load_error(
        tmp_path / "model", jnp.zeros(1), cls=Checkpointed, label=other
    )
    assert "at path .label: the static field is" in message


def test_bytes_and_str_scalars_keep_their_trailing_nuls(tmp_path):
    leaves = [np.bytes_(b"a\0"), np.str_("b\0\0"), np.bytes_(b"\0"), np.str_("\0")]
    Checkpointed(leaves).serialize(tmp_path / "model")
    loaded = Checkpointed.deserialize(tmp_path / "model", leaves)
    for got, want in zip(loaded.params, leaves, strict=True):
        assert type(got) is type(want)
        assert (got.dtype, got.tobytes()) == (want.dtype, want.tobytes())


def _with_data(good: bytes, edit_data: Callable[[bytearray], None]) -> bytes:
    """A checkpoint with its data edited and every checksum made valid again."""
    (length,) = struct.unpack("<Q", good[:8])
    data = bytearray(good[8 + length :])
    edit_data(data)
    header = json.loads(good[8 : 8 + length])
    spans = [
        value["data_offsets"]
        for name, value in header.items()
        if name != "__metadata__"
    ]
    crcs = "".join(f"{zlib.crc32(data[a:b]):08x}" for a, b in sorted(spans))

    def edit(leaves, structure, header):
        header["__metadata__"]["crc32"] = crcs

    return forge(good[: 8 + length] + bytes(data), edit)


@pytest.mark.parametrize(
    ("leaf", "byte", "problem"),
    [
        (np.array([True, False]), 2, "a boolean byte other than 0 or 1"),
        (jnp.array([True, False]), 255, "a boolean byte other than 0 or 1"),
        (np.array([1, -2], jnp.int4), 0x7F, "a int4 byte whose unused high bits"),
        (np.array([1, 2], jnp.uint4), 0x10, "a uint4 byte whose unused high bits"),
    ]
    + (
        [(np.array([1, 0], jnp.uint2), 0x04, "a uint2 byte whose unused high bits")]
        if hasattr(jnp, "uint2")
        else []
    ),
    ids=["bool", "jax bool", "int4", "uint4", "uint2"][
        : 5 if hasattr(jnp, "uint2") else 4
    ],
)
def test_bytes_that_are_no_value_of_their_dtype_are_refused(
    tmp_path, leaf, byte, problem
):
    Checkpointed([leaf]).serialize(tmp_path / "good")
    good = (tmp_path / "good.eqx").read_bytes()
    (length,) = struct.unpack("<Q", good[:8])
    assert len(good) == 8 + length + 2

    def edit(data):
        data[1] = byte

    path = bad_file(tmp_path, _with_data(good, edit))
    assert load_error(path, [leaf], cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' holds invalid data for the leaf "
        f"at path .params[0]: {problem} are not zero."
        if "high bits" in problem
        else f"Serializable.deserialize: the file '{path}' holds invalid data for the "
        f"leaf at path .params[0]: {problem}."
    )
    if leaf.dtype != np.bool_:  # Every valid value still loads.
        values = np.arange(16 if "4" in str(leaf.dtype) else 4).astype(leaf.dtype)
        Checkpointed([values]).serialize(tmp_path / "all")
        assert_exact(
            Checkpointed.deserialize(tmp_path / "all", [values]).params, [values]
        )


def test_a_str_scalar_of_no_unicode_character_is_refused(tmp_path):
    Checkpointed([np.str_("a")]).serialize(tmp_path / "good")

    def edit(data):
        data[:4] = struct.pack("<I", 0x110000)

    path = bad_file(tmp_path, _with_data((tmp_path / "good.eqx").read_bytes(), edit))
    message = load_error(path, [np.str_("a")], cls=Checkpointed)
    assert message.startswith(
        f"Serializable.deserialize: the file '{path}' holds invalid data for the leaf "
        "at path .params[0]: a character that is not Unicode"
    )


# Every code point, U+10FFFF and the surrogates included, loads back (NumPy drops a
# trailing NUL from a str array, so none is drawn).
@given(
    st.lists(
        st.text(
            st.characters(codec=None, exclude_characters="\0"), min_size=1, max_size=3
        ),
        min_size=1,
    )
)
@example(["\U0010ffff", "\ud800"])
def test_str_arrays_of_every_code_point_round_trip(texts):
    tree = {"array": np.array(texts), "scalar": np.str_(texts[0])}
    with tempfile.TemporaryDirectory() as folder:
        save_pytree(pathlib.Path(folder) / "texts", tree)
        loaded = load_pytree(pathlib.Path(folder) / "texts", tree)
    assert loaded["array"].dtype == tree["array"].dtype
    assert loaded["array"].tolist() == texts
    assert type(loaded["scalar"]) is np.str_ and loaded["scalar"] == texts[0]


def test_a_str_array_of_a_code_point_above_unicode_is_refused(tmp_path):
    leaf = np.array(["ab", "c"])
    Checkpointed([leaf]).serialize(tmp_path / "good")

    def edit(data):
        data[4:8] = struct.pack("<I", 0x110000)

    path = bad_file(tmp_path, _with_data((tmp_path / "good.eqx").read_bytes(), edit))
    assert load_error(path, [leaf], cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' holds invalid data for the leaf "
        "at path .params[0]: a character that is not Unicode (a code point above "
        "U+10FFFF)."
    )


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ([2**61, 2**61], jnp.float32),
        ([0, 2**61, 2**61], jnp.float32),
        ([0, 2**61, 2], jnp.float32),  # Its element count fits, its bytes do not.
        ([0, 2**62], jnp.int8),  # A dimension of 2**62 or more.
        ([0] * 65, jnp.int8),  # More dimensions than NumPy allows.
        ([0, -1], jnp.int8),
    ],
)
def test_a_shape_too_big_for_any_array_is_refused_naming_the_file(
    tmp_path, shape, dtype
):
    tree = {"v": jnp.ones(2), "w": jnp.zeros(0, dtype)}
    save_pytree(tmp_path / "good", tree)

    def edit(leaves, structure, header):
        leaves[1]["shape"] = header["['w']"]["shape"] = shape

    path = bad_file(tmp_path, forge((tmp_path / "good.eqx").read_bytes(), edit))
    like = {"v": jnp.ones(2), "w": jax.ShapeDtypeStruct(tuple(shape), dtype)}
    with pytest.raises(ValueError) as info:
        load_pytree(path, like)
    assert str(info.value) == (
        f"load_pytree: the file '{path}' has a malformed header (the leaf at path "
        "['w'])."
    )


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab,:'),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(alphabet='[{"\\a'), inner),
    max_leaves=20,
)


def _containers(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(map(_containers, value))
    if isinstance(value, dict):
        return 1 + sum(map(_containers, value.values()))
    return 0


@given(_JSON)
def test_json_containers_are_counted_outside_strings(value):
    text = json.dumps(value, ensure_ascii=False).encode()
    with pytest.MonkeyPatch.context() as patch:  # Never counted roughly.
        patch.setattr(lerax_utils, "_MAX_CONTAINERS", -1)
        assert lerax_utils._count_containers(text) == _containers(value)


# Escapes: a string ending in backslashes, or holding escaped quotes, still closes
# where JSON closes it, so the containers after it are counted.
_ESCAPED_TEXT = st.lists(st.sampled_from(["\\", '"', "[", "{", "a"]), max_size=6)


@given(
    st.recursive(
        st.none() | _ESCAPED_TEXT.map("".join),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(_ESCAPED_TEXT.map("".join), inner, max_size=3)
        ),
        max_leaves=12,
    )
)
@example(["\\", []])
@example({"\\\\": [{}], '\\"': [[]]})
def test_escaped_backslashes_and_quotes_hide_no_container(value):
    text = json.dumps(value).encode()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lerax_utils, "_MAX_CONTAINERS", -1)
        assert lerax_utils._count_containers(text) == _containers(value)


def test_a_header_left_open_is_refused_in_time_linear_in_its_size(tmp_path):
    # `{"` and 2 MiB of escaped quotes: scanning from every quote to the end took
    # time quadratic in the size (about an hour here); the bound only stops a hang.
    text = b'{"' + b'\\"' * 2**20
    path = bad_file(tmp_path, struct.pack("<Q", len(text)) + text)
    code = (
        "import sys, jax.numpy as jnp, lerax_utils\n"
        "try:\n    lerax_utils.load_pytree(sys.argv[1], jnp.zeros(1))\n"
        "except ValueError as err:\n    print(err)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert run.stdout.startswith(
        f"load_pytree: the file '{path}' has an unreadable header (Unterminated string"
    ), run.stderr


def test_a_header_too_large_to_load_is_refused_at_save(tmp_path, monkeypatch):
    monkeypatch.setattr(lerax_utils, "_MAX_CONTAINERS", 40)
    with pytest.raises(ValueError) as info:
        Checkpointed([jnp.zeros(1)] * 20).serialize(tmp_path / "model")
    assert str(info.value).startswith("Serializable.serialize: the model needs ")
    assert "more than the 40 allowed. Stack its leaves" in str(info.value)
    assert not list(tmp_path.iterdir())
    # Brackets inside strings are no lists: a model with many of them saves and loads.
    label = "[{" * 100
    Checkpointed([jnp.zeros(1)], label=label).serialize(tmp_path / "model")
    Checkpointed.deserialize(tmp_path / "model", [jnp.zeros(1)], label=label)


def test_a_header_of_exactly_the_allowed_lists_saves_and_loads(tmp_path, monkeypatch):
    model = Checkpointed([jnp.zeros(1)] * 20)
    monkeypatch.setattr(lerax_utils, "_MAX_CONTAINERS", 40)
    with pytest.raises(ValueError) as info:
        model.serialize(tmp_path / "model")
    needed = int(re.findall("needs ([0-9]+) JSON lists", str(info.value))[0])
    monkeypatch.setattr(lerax_utils, "_MAX_CONTAINERS", needed - 1)
    with pytest.raises(ValueError, match=f"needs {needed} JSON lists and objects"):
        model.serialize(tmp_path / "model")
    monkeypatch.setattr(lerax_utils, "_MAX_CONTAINERS", needed)
    model.serialize(tmp_path / "model")
    assert_identical(Checkpointed.deserialize(tmp_path / "model", model.params), model)
    monkeypatch.setattr(lerax_utils, "_MAX_CONTAINERS", needed - 1)
    assert load_error(tmp_path / "model", model.params, cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{tmp_path / 'model.eqx'}' has a header "
        f"with more than {needed - 1} lists and objects; the file is corrupt."
    )


def test_a_model_of_100_000_leaves_saves_and_loads(tmp_path):
    leaves = {
        "arrays": [np.full((), i, np.float32) for i in range(50_000)],
        "numbers": [float(i) for i in range(50_000)],
    }
    Checkpointed(leaves).serialize(tmp_path / "model")
    loaded = Checkpointed.deserialize(tmp_path / "model", leaves)
    assert loaded.params["numbers"] == leaves["numbers"]
    assert [float(a) for a in loaded.params["arrays"]] == list(range(50_000))


@pytest.mark.parametrize("array", [jnp.asarray, np.asarray], ids=["jax", "numpy"])
def test_colliding_leaf_paths_are_refused_at_save(tmp_path, array):
    model = Checkpointed({float("nan"): array([0.0]), float("nan"): array([1.0])})
    with pytest.raises(ValueError) as info:
        model.serialize(tmp_path / "model")
    assert str(info.value) == (
        "Serializable.serialize: two array leaves have the same path .params[nan] "
        "(`jax.tree_util.keystr`), so the checkpoint would name one tensor twice. "
        "Give the dict keys distinct reprs."
    )
    with pytest.raises(ValueError):  # Inside a trace too, at trace time.
        eqx.filter_jit(lambda m: m.serialize(tmp_path / "model"))(model)
    assert not list(tmp_path.iterdir())


def _refused_at_save(tmp_path: pathlib.Path, params: Any, traced: bool) -> str:
    model = Checkpointed(params)
    with pytest.raises(TypeError) as info:
        if traced:
            eqx.filter_jit(lambda m: m.serialize(tmp_path / "model"))(model)
        else:
            model.serialize(tmp_path / "model")
    assert not list(tmp_path.iterdir())
    return str(info.value)


@pytest.mark.parametrize("traced", [False, True])
def test_leaves_that_could_not_load_are_refused_at_save(tmp_path, traced):
    big = 10**4300
    assert _refused_at_save(tmp_path, [1, -big], traced) == (
        "Serializable.serialize: the leaf at path .params[1] is a Python int of more "
        "than 4300 digits. Save it as a NumPy array of its bytes, or as a static "
        "field."
    )
    Checkpointed([big - 1, 1 - big]).serialize(tmp_path / "ok")  # 4300 digits: fine.
    loaded = Checkpointed.deserialize(tmp_path / "ok", [0, 0])
    assert loaded.params == [big - 1, 1 - big]
    (tmp_path / "ok.eqx").unlink()
    if not traced:  # A ShapeDtypeStruct is no value JAX can trace.
        struct_leaf = jax.ShapeDtypeStruct((2,), jnp.float32)
        assert _refused_at_save(tmp_path, {"w": struct_leaf}, traced) == (
            "Serializable.serialize: the leaf at path .params['w'] is a "
            "jax.ShapeDtypeStruct, which holds no values. Save arrays with values."
        )


def test_a_huge_static_int_saves_and_is_compared(tmp_path):
    big: Any = 10**5000
    Checkpointed(jnp.zeros(1), label=big).serialize(tmp_path / "model")
    assert (
        Checkpointed.deserialize(tmp_path / "model", jnp.zeros(1), label=big).label
        == big
    )
    message = load_error(
        tmp_path / "model", jnp.zeros(1), cls=Checkpointed, label=big + 1
    )
    assert "at path .label: the static field is" in message


def test_keys_of_a_custom_prng_impl_are_refused_at_save(tmp_path):
    extend = pytest.importorskip("jax.extend")
    define = getattr(getattr(extend, "random", None), "define_prng_impl", None)
    if define is None:
        pytest.skip("this JAX cannot define PRNG implementations")
    impl = define(
        key_shape=(2,),
        seed=lambda s: jnp.stack([s.astype(jnp.uint32)] * 2),
        split=lambda k, shape: jnp.broadcast_to(k, (*shape, 2)),
        random_bits=lambda k, bit_width, shape: jnp.zeros(shape, jnp.uint32),
        fold_in=lambda k, d: k,
        name="custom_for_test",
        tag="cft",
    )
    for traced in (False, True):
        message = _refused_at_save(tmp_path, [jax.random.key(0, impl=impl)], traced)
        assert message.startswith(
            "Serializable.serialize: the leaf at path .params[0] is a PRNG key of the "
            "custom implementation "
        )
    WithFunction(2, scale=jax.random.key(0, impl=impl)).serialize(tmp_path / "m")
    with pytest.raises(TypeError) as info:  # As an argument: recorded as unrecordable.
        WithFunction.deserialize(tmp_path / "m")
    assert (
        "argument `scale` (it was a PRNG key of the implementation 'custom_for_test')"
    ) in str(info.value)


def test_paths_that_are_no_regular_file_are_refused_up_front(tmp_path):
    model = Checkpointed(jnp.zeros(1))
    (tmp_path / "folder").mkdir()
    (tmp_path / "named.eqx").mkdir()
    cases = [
        (tmp_path / "folder", True, "names a folder, not a file"),
        (tmp_path / "named", False, "names a folder, not a file"),
        (f"{tmp_path}/runs/.", False, "names a folder, not a file"),
        (f"{tmp_path}/runs/..", False, "names a folder, not a file"),
    ]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        cases.append((tmp_path / "fifo", True, "exists and is not a regular file"))
    for path, exact, problem in cases:
        with pytest.raises(ValueError) as info:
            model.serialize(path, no_suffix=exact)
        assert str(info.value).startswith("Serializable.serialize: `path` '")
        assert problem in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["folder", "named.eqx"] + (["fifo"] if hasattr(os, "mkfifo") else [])
    )
    assert not (tmp_path / "runs.eqx").exists()
    assert list((tmp_path / "folder").iterdir()) == []


def test_a_save_through_a_symbolic_link_replaces_its_target(tmp_path):
    (tmp_path / "run-100.eqx").write_bytes(b"older")
    os.symlink("run-100.eqx", tmp_path / "latest.eqx")
    save_pytree(tmp_path / "latest", {"w": jnp.arange(3.0)})
    assert os.readlink(tmp_path / "latest.eqx") == "run-100.eqx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.eqx", "run-100.eqx"]
    loaded = load_pytree(tmp_path / "run-100", {"w": jnp.zeros(3)})
    assert_exact(loaded, {"w": jnp.arange(3.0)})


def test_undecodable_file_names_save_and_load(tmp_path):
    name = tmp_path / os.fsdecode(b"bad\xff")
    model = Checkpointed(jnp.arange(3.0))
    model.serialize(name)
    assert_exact(Checkpointed.deserialize(name, jnp.zeros(3)), model)
    assert [p.name for p in tmp_path.iterdir()] == [name.name + ".eqx"]


def test_lone_surrogates_in_a_header_are_refused_naming_the_file(tmp_path):
    Checkpointed({"w": jnp.zeros(1)}).serialize(tmp_path / "good")

    def edit(leaves, structure, header):
        leaves[0]["path"] = "\ud800"  # Raw in the text, not as an escape.
        header["__metadata__"]["leaves"] = json.dumps(leaves, ensure_ascii=False)

    path = bad_file(tmp_path, forge((tmp_path / "good.eqx").read_bytes(), edit))
    message = load_error(path, {"w": jnp.zeros(1)}, cls=Checkpointed)
    assert message.startswith(
        f"Serializable.deserialize: the file '{path}' has an unreadable header"
    )


def test_numpy_scalar_keys_give_the_same_paths_under_numpy_1_and_2(tmp_path):
    params = {
        "ints": {np.int64(1): jnp.zeros(1), np.int64(2): 0.5},
        "nested": {np.int64(3): {(np.int64(4),): jnp.ones(1)}},  # The whole path.
        "strs": {np.str_("a"): jnp.ones(2)},
    }
    Checkpointed(params).serialize(tmp_path / "model")
    path = tmp_path / "model.eqx"
    # What NumPy 1.x renders, so a file loads under either major version.
    assert sorted(dict(safetensors.deserialize(path.read_bytes()))) == [
        ".params['ints'][1]",
        ".params['nested'][3][(4,)]",
        ".params['strs']['a']",
    ]
    entries = json.loads(safetensors.safe_open(path, "numpy").metadata()["leaves"])
    assert [entry["path"] for entry in entries] == [
        ".params['ints'][1]",
        ".params['ints'][2]",
        ".params['nested'][3][(4,)]",
        ".params['strs']['a']",
        ".temperature",
    ]
    assert_exact(Checkpointed.deserialize(path, params), Checkpointed(params))
    recorded = Checkpointed({np.int64(3): {(np.int64(4),): 0.5}})  # No arguments:
    recorded.serialize(tmp_path / "recorded")  # the Python number is found by path.
    assert_exact(Checkpointed.deserialize(tmp_path / "recorded"), recorded)
    # Inside `jit`, each traced leaf keeps its kind: the file is the eager one.
    keys = {np.int64(3): {(np.int64(4),): jax.random.key(1)}, np.int64(5): jnp.ones(2)}
    jax.jit(lambda tree: save_pytree(tmp_path / "traced", tree))(keys)
    jax.effects_barrier()
    save_pytree(tmp_path / "eager", keys)
    traced = (tmp_path / "traced.eqx").read_bytes()
    assert traced == (tmp_path / "eager.eqx").read_bytes()


class _Scale(Serializable):
    factor: float = eqx.field(static=True)

    def __init__(self, factor):
        self.factor = factor


class _HalfScaled(Serializable):
    weight: jax.Array
    scale: _Scale

    def __init__(self, width):
        self.weight = jnp.ones(width)
        self.scale = _Scale(width / 2)


# A `Serializable` with no arrays records its constructor arguments too.
def test_a_serializable_of_static_fields_alone_loads_with_no_arguments(tmp_path):
    _Scale(2.5).serialize(tmp_path / "root")
    assert _Scale.deserialize(tmp_path / "root").factor == 2.5
    arguments = json.loads(_metadata_of(_HalfScaled(3))["arguments"])
    assert [where for where, _ in arguments] == ["", ".scale"]
    _HalfScaled(3).serialize(tmp_path / "nested")
    assert_exact(_HalfScaled.deserialize(tmp_path / "nested"), _HalfScaled(3))


#
# Whole training runs: save_pytree, load_pytree, recorded constructor arguments
#


class Regressor(Serializable):
    """A model with a static tuple, a float, a typed key and an MLP."""

    mlp: eqx.nn.MLP
    key: jax.Array
    scale: float
    sizes: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, sizes=(3, 2), scale=0.5, *, key):
        self.mlp = eqx.nn.MLP(sizes[0], sizes[1], 8, 2, key=key)
        self.key = key
        self.scale = scale
        self.sizes = sizes


_OPTIMIZER = optax.adam(1e-2)


def _train_state(seed: int = 0, steps: int = 3) -> Any:
    """`(model, opt_state, key, step, extra)` after `steps` exact optax updates."""
    model = Regressor(key=jax.random.key(seed))
    opt_state = _OPTIMIZER.init(eqx.filter(model, eqx.is_inexact_array))
    key = jax.random.key(seed + 1)
    extra = {"seen": np.arange(3, dtype=np.int64), "loss": 0.25}
    state = (model, opt_state, key, 0, extra)
    for _ in range(steps):
        state = _update(state)
    return state


@eqx.filter_jit
def _jitted_update(model, opt_state, key):
    key, sample = jax.random.split(key)
    x = jax.random.normal(sample, (4, 3))

    def loss(model):
        return jnp.mean(jax.vmap(model.mlp)(x) ** 2) * model.scale

    grads = eqx.filter_grad(loss)(model)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = _OPTIMIZER.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, key


def _update(state: Any) -> Any:
    model, opt_state, key, step, extra = state
    model, opt_state, key = _jitted_update(model, opt_state, key)
    return model, opt_state, key, step + 1, extra


def _fresh_like() -> Any:
    """The structure of a training state, as shapes, from a fresh start."""

    def fresh():
        model = Regressor(key=jax.random.key(0))
        opt_state = _OPTIMIZER.init(eqx.filter(model, eqx.is_inexact_array))
        extra = {"seen": np.zeros(3, np.int64), "loss": 0.0}
        return model, opt_state, jax.random.key(0), 0, extra

    return eqx.filter_eval_shape(fresh)


def _recording(model: Any) -> Any:
    return model._lerax_arguments.recording


def test_a_training_state_with_adam_round_trips_and_resumes_bit_exactly(tmp_path):
    state = _train_state()
    save_pytree(tmp_path / "state", state)
    for like in (_fresh_like(), _train_state(seed=5, steps=0)):
        loaded = load_pytree(tmp_path / "state", like)
        assert_exact(loaded, state)
        assert loaded[3] == 3 and type(loaded[3]) is int
        assert loaded[4]["seen"].dtype == np.int64  # NumPy stays NumPy, exactly.
        assert _recording(loaded[0]) == _recording(state[0])
        # Training on from the loaded state is training on from the saved one.
        assert_exact(_update(_update(loaded)), _update(_update(state)))
    # The same bytes whichever function saved, and when saved again after loading.
    state[0].serialize(tmp_path / "model")
    save_pytree(tmp_path / "tree", state[0])
    assert (tmp_path / "model.eqx").read_bytes() == (tmp_path / "tree.eqx").read_bytes()
    save_pytree(tmp_path / "again", load_pytree(tmp_path / "state", _fresh_like()))
    assert (tmp_path / "again.eqx").read_bytes() == (
        tmp_path / "state.eqx"
    ).read_bytes()


def test_save_pytree_keeps_the_suffix_rule_and_takes_no_suffix_by_keyword(tmp_path):
    tree = {"w": jnp.arange(3.0), "n": 2}
    save_pytree(tmp_path / "run.1", tree)
    save_pytree(tmp_path / "run.2", tree)
    save_pytree(tmp_path / "exact.name", tree, no_suffix=True)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["exact.name", "run.1.eqx", "run.2.eqx"]
    for name in ("run.1", "run.2.eqx", "exact.name"):
        assert_exact(load_pytree(tmp_path / name, tree), tree)
    with pytest.raises(TypeError):
        save_pytree(tmp_path / "x", tree, True)  # type: ignore[misc]


def test_a_save_creates_every_missing_folder_above_the_file(tmp_path):
    tree = {"w": jnp.arange(3.0), "n": 2}
    save_pytree(tmp_path / "runs" / "seed0" / "step100", tree)
    assert (tmp_path / "runs" / "seed0" / "step100.eqx").is_file()
    assert_exact(load_pytree(tmp_path / "runs" / "seed0" / "step100", tree), tree)


class _Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class _Gain(float):
    pass


def test_subclasses_of_python_numbers_are_static_leaves(tmp_path):
    tree = {"level": _Level.HIGH, "gain": _Gain(0.5), "x": jnp.ones(2)}
    save_pytree(tmp_path / "t", tree)
    loaded = load_pytree(tmp_path / "t", tree)
    assert loaded["level"] is _Level.HIGH
    assert type(loaded["gain"]) is _Gain and loaded["gain"] == 0.5
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "t", dict(tree, level=_Level.LOW))
    assert str(info.value).endswith(
        "at path ['level']: the file has ['enum', '_Level', 'HIGH'], `like` has "
        "['enum', '_Level', 'LOW']. Pass a `like` with the structure, shapes and "
        "dtypes of the saved tree."
    )


def test_save_pytree_inside_jit_writes_in_program_order_when_run(tmp_path):
    path = tmp_path / "state"

    @jax.jit
    def run(tree):
        for step in range(3):
            tree = jax.tree_util.tree_map(lambda x: x + 1, tree)
            save_pytree(path, (tree, step))
        return tree

    tree = {"w": jnp.zeros(2), "k": jnp.arange(3)}
    run.lower(tree)  # Tracing writes nothing.
    assert not path.with_suffix(".eqx").exists()
    run(tree)
    jax.effects_barrier()
    loaded, step = load_pytree(path, (tree, 0))
    assert step == 2
    assert_exact(loaded, {"w": jnp.full(2, 3.0), "k": jnp.arange(3) + 3})


@functools.total_ordering
class _SameRepr:  # Dict keys whose paths read the same: `[K]`.
    def __init__(self, number):
        self.number = number

    def __repr__(self):
        return "K"

    def __eq__(self, other):
        return isinstance(other, _SameRepr) and self.number == other.number

    def __lt__(self, other):
        return self.number < other.number

    def __hash__(self):
        return self.number


# Paths name arrays uniquely, not numbers: a traced array and a Python number at
# the same path each save as what they are.
def test_a_traced_array_and_a_number_at_one_path_save_inside_jit(tmp_path):
    path = tmp_path / "same"
    tree = {_SameRepr(0): jnp.arange(2.0), _SameRepr(1): 2.5}
    jax.jit(lambda x: save_pytree(path, {_SameRepr(0): x, _SameRepr(1): 2.5}))(
        jnp.arange(2.0)
    )
    jax.effects_barrier()
    assert_exact(load_pytree(path, tree), tree)
    save_pytree(tmp_path / "eager", tree)
    assert (tmp_path / "eager.eqx").read_bytes() == path.with_suffix(
        ".eqx"
    ).read_bytes()


def test_save_pytree_messages_name_save_pytree_and_load_pytree(tmp_path):
    with pytest.raises(TypeError) as info:
        save_pytree(3, {})  # type: ignore[arg-type]
    assert str(info.value) == (
        "save_pytree: `path` must be a str or os.PathLike; got int 3."
    )
    with pytest.raises(TypeError) as info:
        save_pytree(tmp_path / "x", {"m": np.ma.masked_array([1.0])})
    assert str(info.value).startswith(
        "save_pytree: the leaf at path ['m'] is a masked array"
    )
    with pytest.raises(ValueError) as info:
        save_pytree(tmp_path, {}, no_suffix=True)
    assert str(info.value).startswith(f"save_pytree: `path` '{tmp_path}' names")
    with pytest.raises(ValueError) as info:
        jax.vmap(lambda x: save_pytree(tmp_path / "v", x))(jnp.zeros(2))
    assert str(info.value) == (
        "save_pytree: the tree is batched by `vmap`, so one path cannot hold it. "
        "Call `save_pytree` outside the vmap, on the stacked tree."
    )
    with pytest.raises(FileNotFoundError) as info:
        load_pytree(tmp_path / "nothing", {})
    assert str(info.value) == (
        f"load_pytree: no checkpoint at '{tmp_path}/nothing' or "
        f"'{tmp_path}/nothing.eqx'. Check the path given to `save_pytree`."
    )
    save_pytree(tmp_path / "tree", {"w": jnp.zeros((2, 3)), "n": 1})
    path = tmp_path / "tree.eqx"
    prefix = f"load_pytree: the file '{path}' "
    fix = ". Pass a `like` with the structure, shapes and dtypes of the saved tree."
    with pytest.raises(ValueError) as info:
        load_pytree(path, {"w": jnp.zeros((3, 2)), "n": 0})
    assert str(info.value) == (
        prefix + "holds at path ['w'] an array of shape (2, 3) and dtype float32, "
        "but `like` has shape (3, 2) and dtype float32" + fix
    )
    with pytest.raises(ValueError) as info:
        load_pytree(path, {"w": jnp.zeros((2, 3)), "n": 0, "x": None, "y": 1})
    assert str(info.value) == (
        prefix + "does not match `like` at the top level: the file has "
        "{'node': 'dict', 'keys': ['n', 'w']}, `like` has "
        "{'node': 'dict', 'keys': ['n', 'w', 'x', 'y']}" + fix
    )
    with pytest.raises(ValueError) as info:
        load_pytree(path, {"w": jnp.zeros((2, 3)), "n": 0.0})
    assert str(info.value) == (
        prefix + "does not match `like` at path ['n']: the file has ['scalar', "
        "'int'], `like` has ['scalar', 'float']" + fix
    )
    # The messages of `Serializable` still name it.
    with pytest.raises(ValueError, match="^Serializable.deserialize: the file"):
        Regressor.deserialize(path, key=jax.random.key(0))


def test_a_save_inside_jit_that_fails_when_run_names_save_pytree(tmp_path, monkeypatch):
    monkeypatch.setattr(lerax_utils, "_MAX_CONTAINERS", 40)
    save = jax.jit(lambda tree: save_pytree(tmp_path / "tree", tree))
    with pytest.raises(Exception) as info:  # JAX's runtime error, wrapping ours.
        save([jnp.zeros(1)] * 20)
        jax.effects_barrier()
    assert "ValueError: save_pytree: the tree needs 62 JSON lists" in str(info.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("form", ["concrete", "shapes", "numpy", "traced"])
def test_like_may_be_values_or_shapes_and_is_compared_as_a_skeleton(tmp_path, form):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "k": jax.random.key(3), "s": "tag"}
    save_pytree(tmp_path / "tree", tree)
    like = {"w": jnp.zeros((2, 3)), "k": jax.random.key(0), "s": "tag"}
    if form == "shapes":
        like = eqx.filter_eval_shape(lambda: like)
    if form == "numpy":  # A NumPy leaf stands for the JAX array JAX would make.
        like = {**like, "w": np.zeros((2, 3), np.float32)}
    load = functools.partial(load_pytree, tmp_path / "tree")
    if form == "traced":  # Inside `jit`, where `like`'s arrays are tracers.
        load = eqx.filter_jit(load)
    assert_exact(load(like), tree)
    with pytest.raises(ValueError, match="static field|the file has 'tag'"):
        load({**like, "s": "other"})


def test_deserialize_without_arguments_rebuilds_the_model_from_the_file(tmp_path):
    model = Regressor((3, 4), -0.0, key=jax.random.key(7))
    model.serialize(tmp_path / "model")
    loaded = Regressor.deserialize(tmp_path / "model")
    assert_exact(loaded, model)
    assert eqx.tree_equal(loaded, model)
    assert loaded.sizes == (3, 4) and type(loaded.sizes) is tuple
    assert (
        _recording(loaded)
        == _recording(model)
        == {
            "class": "Regressor",
            "args": [["tuple", [3, 4]], ["float", "8000000000000000"]],
            "kwargs": [["key", ["key", [], "threefry2x32"]]],
        }
    )
    # Saved again, the loaded model gives the same file.
    loaded.serialize(tmp_path / "again")
    assert (tmp_path / "again.eqx").read_bytes() == (
        tmp_path / "model.eqx"
    ).read_bytes()


def test_explicit_arguments_win_and_the_file_keeps_checking_them(tmp_path):
    model = Regressor((3, 4), 0.5, key=jax.random.key(7))
    model.serialize(tmp_path / "model")
    # Other values where only shapes matter: they build the skeleton.
    loaded = Regressor.deserialize(
        tmp_path / "model", (3, 4), 9.0, key=jax.random.key(1)
    )
    assert_exact(loaded, model)
    assert _recording(loaded) == _recording(model)  # The file's history stays.
    with pytest.raises(ValueError, match="static field is"):
        Regressor.deserialize(tmp_path / "model", (3, 5), key=jax.random.key(1))


def _exact(value: Any) -> Any:
    """An exact, hashable description of a value: types, float bits and all."""
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_exact(item) for item in value))
    if isinstance(value, dict):  # Sorted, as JAX orders a dict's keys.
        items = sorted((_exact(k), _exact(v)) for k, v in value.items())
        return ("dict", tuple(items))
    if isinstance(value, float | complex):
        parts = (complex(value).real, complex(value).imag)
        return (type(value).__name__, struct.pack("<2d", *parts).hex())
    if isinstance(value, jax.ShapeDtypeStruct) or eqx.is_array(value):
        return ("array", tuple(value.shape), str(value.dtype))
    return (type(value).__name__, value)


class Recorder(Serializable):
    """Keeps an exact description of the arguments it was built with."""

    weight: jax.Array
    seen: Any = eqx.field(static=True)

    def __init__(self, *args, **kwargs):
        self.weight = jnp.zeros(2)
        self.seen = _exact((args, kwargs))


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.complex_numbers(allow_nan=True)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=8,
)
_argument_values = _json_values | st.sampled_from(
    [
        jnp.zeros((2, 3), jnp.bfloat16),
        np.zeros(4, np.int8),
        jax.random.split(jax.random.key(0, impl="rbg"), 2),
        jax.ShapeDtypeStruct((5,), jnp.uint8),
        np.array(["ab", "c"]),
        np.datetime64("2024-01-02", "D"),
    ]
)


@given(
    args=st.lists(_argument_values, max_size=3),
    kwargs=st.dictionaries(st.sampled_from(["a", "b", "key"]), _argument_values),
    nan_bits=st.integers(1, 2**51 - 1),
)
def test_recorded_arguments_rebuild_exactly(tmp_path_factory, args, kwargs, nan_bits):
    nan = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000000 | nan_bits))[0]
    args = [*args, nan]  # A NaN payload comes back too.
    model = Recorder(*args, **kwargs)
    path = tmp_path_factory.mktemp("recorded") / "model"
    model.serialize(path)
    # The constructor sees the same values (arrays as shapes and dtypes), or the
    # static field it computes from them would not match the file.
    loaded = Recorder.deserialize(path)
    assert loaded.seen == model.seen
    assert _recording(loaded) == _recording(model)


def test_the_recording_survives_what_a_model_goes_through(tmp_path):
    models = [Regressor(key=jax.random.key(seed)) for seed in range(3)]
    original = _recording(models[0])
    # Built with different keys, still the same structure: they stack.
    population = stack_pytree(models)
    assert _recording(unstack_pytree(population)[2]) == original
    model = eqx.tree_at(lambda m: m.scale, models[1], 2.0)
    model = _update(
        (
            model,
            _OPTIMIZER.init(eqx.filter(model, eqx.is_inexact_array)),
            jax.random.key(0),
            0,
            None,
        )
    )[0]

    def body(model, x):  # Built again inside the loop, from a traced key.
        key = jax.random.fold_in(model.key, x)
        return Regressor(model.sizes, model.scale, key=key), None

    model, _ = filter_scan(body, model, jnp.arange(3))
    other = Regressor(scale=2.0, key=jax.random.key(9))
    model = filter_cond(True, lambda: model, lambda: other)
    rebuilt = {**original, "args": [["tuple", [3, 2]], ["float", "4000000000000000"]]}
    assert _recording(model) in (original, rebuilt)
    model.serialize(tmp_path / "model")
    assert_exact(Regressor.deserialize(tmp_path / "model"), model)


def test_a_number_traced_after_construction_loads_without_arguments(tmp_path):
    model = Regressor(key=jax.random.key(0))  # `scale` is the Python float 0.5.

    def anneal(model, _):
        return eqx.tree_at(lambda m: m.scale, model, model.scale * 0.5), None

    model, _ = filter_scan(anneal, model, None, length=3)
    assert isinstance(model.scale, jax.Array)  # Traced, so now an array.
    model.serialize(tmp_path / "model")
    assert_exact(Regressor.deserialize(tmp_path / "model"), model)
    # Arguments passed explicitly build a skeleton that is compared as it is.
    with pytest.raises(ValueError, match="the file has 'array', the skeleton has"):
        Regressor.deserialize(tmp_path / "model", key=jax.random.key(0))


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_copies_keep_the_recording_and_stay_equal(how):
    model = Recorder((3, 4), 0.25, key=jax.random.key(1))
    copied = {
        "copy": copy.copy,
        "deepcopy": copy.deepcopy,
        "pickle": lambda x: pickle.loads(pickle.dumps(x)),
    }[how](model)
    assert jax.tree_util.tree_structure(copied) == jax.tree_util.tree_structure(model)
    assert eqx.tree_equal(copied, model)
    assert _recording(copied) == _recording(model)
    assert sorted(vars(copied)) == sorted(vars(model))  # Nothing left behind.


class Tiny(Serializable):
    n: int


def test_recordings_never_change_the_tree_structure_or_equality():
    # The same model, built with the defaults or with them spelled out.
    a = Regressor(key=jax.random.key(0))
    b = Regressor((3, 2), 0.5, key=jax.random.key(0))
    assert _recording(a) != _recording(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert eqx.tree_equal(a, b) and hash(jax.tree_util.tree_structure(a)) == hash(
        jax.tree_util.tree_structure(b)
    )
    assert "_lerax_arguments" not in repr(a)
    # Equal models hash alike, and share compiled code.
    small, same = Tiny(1), Tiny(n=1)
    assert _recording(small) != _recording(same)
    assert small == same and hash(small) == hash(same)
    traces = []
    read = jax.jit(lambda model: traces.append(None) or model.n, static_argnums=0)
    assert read(small) == read(same) == 1
    assert len(traces) == 1
    structure = json.loads(_metadata_of(a)["structure"])
    assert structure[0] == [
        "",
        {"node": "Regressor", "static": {"sizes": ["tuple", [3, 2]]}},
    ]


def _metadata_of(model: Any) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as folder:
        model.serialize(pathlib.Path(folder) / "model")
        with safetensors.safe_open(pathlib.Path(folder) / "model.eqx", "numpy") as f:
            return f.metadata()


def _surgery(model: Regressor, *, all_fields: bool) -> Regressor:
    """A model made without calling its constructor: every field set by hand, or
    every field but the recording (which then is the class's default)."""
    made = object.__new__(Regressor)
    for field in dataclasses.fields(Regressor):
        if field.name != "_lerax_arguments":
            object.__setattr__(made, field.name, getattr(model, field.name))
        elif all_fields:
            object.__setattr__(made, field.name, getattr(Regressor, field.name))
    return made


@pytest.mark.parametrize("all_fields", [False, True])
def test_a_model_made_without_its_constructor_saves_and_asks_for_arguments(
    tmp_path, all_fields
):
    model = _surgery(Regressor(key=jax.random.key(2)), all_fields=all_fields)
    assert _recording(model) is None
    model.serialize(tmp_path / "model")
    with pytest.raises(TypeError) as info:
        Regressor.deserialize(tmp_path / "model")
    path = tmp_path / "model.eqx"
    assert str(info.value).startswith(
        f"Serializable.deserialize: the file '{path}' records no constructor "
        "arguments, and `Regressor()` failed"
    )
    assert str(info.value).endswith(
        "Pass the constructor arguments: `Regressor.deserialize(path, *args, "
        "**kwargs)`."
    )
    loaded = Regressor.deserialize(tmp_path / "model", key=jax.random.key(0))
    if all_fields:
        assert_exact(loaded, model)
    else:  # Equinox flattens a field missing from the instance otherwise.
        leaves = jax.tree_util.tree_leaves
        assert_exact(leaves(loaded), leaves(model))


class _Mode(enum.Enum):
    TRAIN = 1
    EVAL = 2


class _NameRaises:
    """A callable whose `__name__` raises, as some proxies' attributes do."""

    def __call__(self, x: Any) -> Any:
        return x

    @property
    def __name__(self) -> str:  # type: ignore[override]
        raise RuntimeError("no name")


class _Pair(NamedTuple):
    first: int
    second: int


class WithFunction(Serializable):
    weight: jax.Array
    act: Callable[..., Any] = eqx.field(static=True)

    def __init__(self, width, act=jnp.tanh, *, scale=None):
        self.weight = jnp.ones(width)
        self.act = act


@pytest.mark.parametrize(
    ("args", "kwargs", "which"),
    [
        ((2, jnp.tanh), {}, "argument `act` (it was the function tanh)"),
        (
            (2,),
            {"scale": object()},
            "argument `scale` (it was an object of type object)",
        ),
        (
            (2,),
            {"scale": eqx.nn.Identity()},  # Callable, but no function.
            "argument `scale` (it was an object of type Identity)",
        ),
        (
            (2,),
            {"scale": _Mode.TRAIN},  # Compared by name when static, not rebuilt.
            "argument `scale` (it was an object of type _Mode)",
        ),
        (
            (2,),
            {"scale": _NameRaises()},
            "argument `scale` (it was an object of type _NameRaises)",
        ),
        (
            (2,),  # Subclasses of tuple and dict would be rebuilt as the base.
            {"scale": [_Pair(1, 2), collections.OrderedDict(a=1)]},
            "argument `scale` (it was an object of type _Pair)",
        ),
        (
            (2,),
            {"scale": collections.OrderedDict(a=1)},
            "argument `scale` (it was an object of type OrderedDict)",
        ),
        (
            (2,),
            {"scale": np.ma.masked_array([1.0, 2.0], [False, True])},
            "argument `scale` (it was a MaskedArray)",
        ),
        (
            (2, jax.nn.relu),
            {"scale": [1, lambda x: x]},
            "arguments `act` (it was the function relu) and `scale` (it was the "
            "function <lambda>)",
        ),
    ],
)
def test_an_unrecordable_argument_saves_and_is_named_when_loading(
    tmp_path, args, kwargs, which
):
    model = WithFunction(*args, **kwargs)
    model.serialize(tmp_path / "model")
    with pytest.raises(TypeError) as info:
        WithFunction.deserialize(tmp_path / "model")
    assert str(info.value) == (
        f"Serializable.deserialize: the file '{tmp_path / 'model.eqx'}' could not "
        f"record the {which} of WithFunction. Pass the constructor arguments: "
        "`WithFunction.deserialize(path, *args, **kwargs)`."
    )
    loaded = WithFunction.deserialize(tmp_path / "model", *args)
    assert_exact(loaded, model)


_ONE = "3ff0000000000000"  # The bits of 1.0.


@pytest.mark.parametrize(
    "value",
    [
        ["list", _ONE, _ONE],
        ["float", _ONE, _ONE],
        ["complex", _ONE],
        ["float", 3000000000000000],  # Its digits are hex digits, but not a string.
        ["dict", ["ab"]],  # An item of two characters, not a pair.
        ["numpy", [1], "float64", _ONE],  # A recorded NumPy value is a scalar.
        ["array", [2], "float32", "and more"],
    ],
)
def test_a_recorded_value_of_another_form_is_malformed(tmp_path, value):
    WithFunction(2, scale=1.0).serialize(tmp_path / "good")

    def edit(leaves, structure, header):
        metadata = header["__metadata__"]
        compact = json.dumps(value, separators=(",", ":"))
        recorded = metadata["arguments"].replace(f'["float","{_ONE}"]', compact)
        assert recorded != metadata["arguments"]
        metadata["arguments"] = recorded

    path = bad_file(tmp_path, forge((tmp_path / "good.eqx").read_bytes(), edit))
    with pytest.raises(ValueError) as info:
        WithFunction.deserialize(path)
    assert str(info.value) == (
        f"Serializable.deserialize: the file '{path}' has a malformed header (its "
        "recorded arguments)."
    )


_SIZED_CALLS: list[Any] = []


class _Sized(Serializable):
    """A model whose constructor needs its NumPy scalars as Python-like numbers."""

    weight: jax.Array

    def __init__(self, n, scalars):
        _SIZED_CALLS.append(scalars)
        self.weight = jnp.zeros(int(n))


def test_numpy_scalar_arguments_come_back_by_value_and_type(tmp_path):
    nan = np.frombuffer(bytes.fromhex("0100c07f"), np.float32)[0]  # A NaN payload.
    scalars = (np.float32(0.5), np.bool_(True), np.float64(-0.0), nan)
    scalars += (np.uint8(255), np.complex64(1 - 2j), np.array(1.5, jnp.bfloat16)[()])
    _Sized(np.int64(4), scalars).serialize(tmp_path / "m")
    _SIZED_CALLS.clear()
    loaded = _Sized.deserialize(tmp_path / "m")
    assert loaded.weight.shape == (4,)
    assert [type(x) for x in _SIZED_CALLS[0]] == [type(x) for x in scalars]
    assert [x.tobytes() for x in _SIZED_CALLS[0]] == [x.tobytes() for x in scalars]


def test_nested_models_keep_each_their_own_recording(tmp_path):
    class Outer(Serializable):
        inner: Regressor
        other: Any

        def __init__(self, n):
            self.inner = Regressor((3, 2), float(n), key=jax.random.key(n))
            self.other = [Regressor(scale=n + 0.5, key=jax.random.key(n + 1))]

    model = Outer(3)
    save_pytree(tmp_path / "tree", {"model": model, "step": 1})
    like = {"model": Outer(7), "step": 0}  # Recorded otherwise, same structure.
    loaded = load_pytree(tmp_path / "tree", like)["model"]
    assert_exact(loaded, model)
    for got, want, other in [
        (loaded, model, like["model"]),
        (loaded.inner, model.inner, like["model"].inner),
        (loaded.other[0], model.other[0], like["model"].other[0]),
    ]:
        assert _recording(got) == _recording(want) != _recording(other)
    assert _recording(loaded.inner)["args"] == [
        ["tuple", [3, 2]],
        ["float", "4008000000000000"],
    ]


def test_older_files_without_recordings_still_load(tmp_path):
    # A file of this format written before arguments were recorded.
    model = Regressor(key=jax.random.key(4))
    model.serialize(tmp_path / "model")

    def drop(leaves, structure, header):
        del header["__metadata__"]["arguments"]

    path = bad_file(tmp_path, forge((tmp_path / "model.eqx").read_bytes(), drop))
    with pytest.raises(TypeError, match="records no constructor arguments"):
        Regressor.deserialize(path)
    loaded = Regressor.deserialize(path, key=jax.random.key(0))
    assert_exact(loaded, model)
    assert _recording(loaded) == _recording(Regressor(key=jax.random.key(0)))
    # A class whose constructor needs no argument loads as before.
    Recorder().serialize(tmp_path / "recorder")
    plain = forge((tmp_path / "recorder.eqx").read_bytes(), drop)
    assert Recorder.deserialize(bad_file(tmp_path, plain)).seen == Recorder().seen


def _nested_lists(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = ["list", [value]]
    return value


def _with_recording(good: bytes, recording: Any) -> bytes:
    def edit(leaves, structure, header):
        header["__metadata__"]["arguments"] = json.dumps([["", recording]])

    return forge(good, edit)


@pytest.mark.parametrize(
    "recording",
    [
        {"class": "Recorder", "args": [["import", "os"]], "kwargs": []},
        {"class": "Recorder", "args": [["pickle", "gASV"]], "kwargs": []},
        {"class": "Recorder", "args": [[1, 2]], "kwargs": []},
        {"class": "Recorder", "args": [{"list": [1]}], "kwargs": []},
        {"class": "Recorder", "args": [1.5], "kwargs": []},
        {"class": "Recorder", "args": [["array", [-1], "float32"]], "kwargs": []},
        {"class": "Recorder", "args": [["array", [1], "object"]], "kwargs": []},
        {"class": "Recorder", "args": [["key", [1], "mine"]], "kwargs": []},
        {"class": "Recorder", "args": [["dict", [[["list", []], 1]]]], "kwargs": []},
        {"class": "Recorder", "args": [["dict", [[1, 2, 3]]]], "kwargs": []},
        {"class": "Recorder", "args": [["numpy", [], "<U1", "61000000"]], "kwargs": []},
        {"class": "Recorder", "args": [["numpy", [], "object", "00"]], "kwargs": []},
        {"class": "Recorder", "args": [["float", "nan"]], "kwargs": []},
        {"class": "Recorder", "args": [_nested_lists(40)], "kwargs": []},
        {"class": "Recorder", "args": [], "kwargs": [[1, 2]]},
        {"class": "Recorder", "args": []},
    ],
)
def test_crafted_recordings_are_refused_and_never_run(tmp_path, recording):
    Recorder().serialize(tmp_path / "good")
    path = bad_file(
        tmp_path, _with_recording((tmp_path / "good.eqx").read_bytes(), recording)
    )
    modules = set(sys.modules)
    with pytest.raises(ValueError) as info:
        Recorder.deserialize(path)
    assert str(info.value).startswith(
        f"Serializable.deserialize: the file '{path}' has a malformed header"
    )
    assert set(sys.modules) == modules  # Nothing was imported.


def test_a_recording_of_another_class_is_refused_before_calling_anything(tmp_path):
    Regressor(key=jax.random.key(0)).serialize(tmp_path / "model")
    with pytest.raises(ValueError) as info:
        Recorder.deserialize(tmp_path / "model")
    assert str(info.value) == (
        f"Serializable.deserialize: the file '{tmp_path / 'model.eqx'}' holds a "
        "Regressor, not a Recorder. Call `Regressor.deserialize`, or pass the "
        "constructor arguments."
    )


#
# Found by review: argument names of the loaders, failing recorded calls
#


class _Named(Serializable):
    w: jax.Array
    path: str = eqx.field(static=True)
    sharding: Any = eqx.field(static=True)

    def __init__(self, n: int, *, path: str = "", sharding: Any = None):
        self.w = jnp.arange(float(n))
        self.path, self.sharding = path, sharding


def test_constructor_keywords_named_like_the_loaders_arguments(tmp_path: Any) -> None:
    model = _Named(3, path="p", sharding="s")
    model.serialize(tmp_path / "m")
    loaded = _Named.deserialize(tmp_path / "m", 3, path="p", sharding="s")
    assert eqx.tree_equal(loaded, model)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = _Named.deserialize_sharded(
        tmp_path / "m", one_device, 3, path="p", sharding="s"
    )
    assert eqx.tree_equal(placed, model) and placed.w.sharding == one_device


_FAIL_TO_BUILD = [False]


class _Flaky(Serializable):
    w: jax.Array

    def __init__(self, n: int):
        if _FAIL_TO_BUILD[0]:
            raise ValueError("cannot build now")
        self.w = jnp.zeros(n)


def test_a_recorded_call_that_fails_is_named(tmp_path: Any) -> None:
    _Flaky(2).serialize(tmp_path / "f")
    _FAIL_TO_BUILD[0] = True
    try:
        with pytest.raises(TypeError) as info:
            _Flaky.deserialize(tmp_path / "f")
    finally:
        _FAIL_TO_BUILD[0] = False
    assert str(info.value) == (
        f"Serializable.deserialize: the file '{tmp_path / 'f.eqx'}' records "
        "constructor arguments with which `_Flaky` failed to build (ValueError: "
        "cannot build now). Pass the constructor arguments: "
        "`_Flaky.deserialize(path, *args, **kwargs)`."
    )


class _Tagged(Serializable):
    weight: jax.Array
    numbers: Any
    rate: float = eqx.field(static=True)

    def __init__(self, rate, numbers):
        self.weight = jnp.zeros(2)
        self.numbers = numbers
        self.rate = rate


def test_every_value_in_the_metadata_is_in_the_one_codec():
    numbers = {"b": True, "c": 1j, "n": 3, "x": 0.5}
    metadata = _metadata_of(_Tagged(0.5, numbers))
    half, one = ["float", "3fe0000000000000"], "3ff0000000000000"
    values = [entry.get("value") for entry in json.loads(metadata["leaves"])]
    assert values == [None, True, ["complex", "0000000000000000", one], 3, half]
    structure = dict(json.loads(metadata["structure"]))
    assert structure[""]["static"] == {"rate": half}
    (path, recording), *others = json.loads(metadata["arguments"])
    assert (path, others) == ("", [])
    assert recording["args"] == [
        half,
        [
            "dict",
            [["b", True], ["c", ["complex", "0000000000000000", one]]]
            + [["n", 3], ["x", half]],
        ],
    ]


# The skeleton's structure is compared with the file's as text first, then as JSON:
# another writer's spacing and key order change nothing, and a real change refuses.
def test_a_structure_in_other_spacing_and_key_order_loads_the_same(tmp_path):
    model = agent(squash=jax.nn.relu)
    model.serialize(tmp_path / "a")
    good = (tmp_path / "a.eqx").read_bytes()

    def respace(leaves, structure, header):
        text = json.dumps(structure, indent=1, sort_keys=True)
        header["__metadata__"]["structure"] = text

    path = bad_file(tmp_path, forge(good, respace))
    key = jax.random.key(0)
    assert_exact(Agent.deserialize(path, 4, key=key, squash=jax.nn.relu), model)
    assert_exact(lerax_utils.load_pytree(path, model), model)

    def change_squash(leaves, structure, header):
        respace(leaves, structure, header)
        text = header["__metadata__"]["structure"].replace('"relu"', '"gelu"')
        header["__metadata__"]["structure"] = text

    path = bad_file(tmp_path, forge(good, change_squash))
    assert load_error(path, squash=jax.nn.relu) == (
        f"Serializable.deserialize: the file '{path}' does not match the skeleton "
        "at path .squash: the static field is ['function', 'gelu'] in the file and "
        "['function', 'relu'] in the skeleton. Pass the constructor arguments the "
        "model was saved with."
    )


# Saving and loading: paths, atomic writes, messages, and calls inside traces


def test_serialize_appends_the_suffix_so_runs_never_collide(tmp_path):
    first, second = agent(seed=1), agent(seed=2)
    first.serialize(tmp_path / "runs" / "run.1")  # Missing folders are created.
    second.serialize(tmp_path / "runs" / "run.2")
    first.serialize(tmp_path / "runs" / "final.eqx")
    second.serialize(str(tmp_path / "runs" / "exact.name"), no_suffix=True)
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == ["exact.name", "final.eqx", "run.1.eqx", "run.2.eqx"]
    key = jax.random.key(9)
    assert_identical(Agent.deserialize(tmp_path / "runs" / "run.1", 4, key=key), first)
    assert_identical(Agent.deserialize(tmp_path / "runs" / "run.2", 4, key=key), second)
    assert_identical(Agent.deserialize(tmp_path / "runs/final.eqx", 4, key=key), first)
    assert_identical(
        Agent.deserialize(tmp_path / "runs/exact.name", 4, key=key), second
    )


def test_a_missing_file_names_each_candidate_path_once(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Agent.deserialize(tmp_path / "nothing", 4, key=jax.random.key(0))
    assert str(info.value) == (
        f"Serializable.deserialize: no checkpoint at '{tmp_path}/nothing' or "
        f"'{tmp_path}/nothing.eqx'. Check the path given to `serialize`."
    )
    # A path that has the suffix already names one candidate, once.
    with pytest.raises(FileNotFoundError) as info:
        load_pytree(tmp_path / "nothing.eqx", {})
    assert str(info.value) == (
        f"load_pytree: no checkpoint at '{tmp_path}/nothing.eqx'. Check the path "
        "given to `save_pytree`."
    )
    (tmp_path / "folder").mkdir()  # Folders at both paths are no checkpoints.
    (tmp_path / "folder.eqx").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_pytree(tmp_path / "folder", {})
    assert str(info.value) == (
        f"load_pytree: no checkpoint at '{tmp_path}/folder' or '{tmp_path}/"
        "folder.eqx'. Check the path given to `save_pytree`."
    )


class _BytesPath:  # An os.PathLike of bytes, which the file names cannot use.
    def __fspath__(self) -> bytes:
        return b"model"

    def __repr__(self) -> str:
        return "_BytesPath()"


@pytest.mark.parametrize(
    ("path", "described"),
    [
        (3, "int 3"),
        (b"model", "bytes b'model'"),
        (_BytesPath(), "_BytesPath _BytesPath()"),
    ],
)
def test_paths_that_are_not_str_paths_are_refused_by_every_entry(
    tmp_path, monkeypatch, path, described
):
    monkeypatch.chdir(tmp_path)
    calls = {
        "Serializable.serialize": lambda: agent().serialize(path),
        "Serializable.deserialize": lambda: type(agent()).deserialize(path),
        "save_pytree": lambda: save_pytree(path, {"w": jnp.ones(2)}),
        "load_pytree": lambda: load_pytree(path, {"w": jnp.ones(2)}),
    }
    for function, call in calls.items():
        with pytest.raises(TypeError) as info:
            call()
        assert str(info.value) == (
            f"{function}: `path` must be a str or os.PathLike; got {described}."
        )
    assert not list(tmp_path.iterdir())


_FUNCTION_WRITER = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    sys.path.insert(0, "tests")
    from _helpers import Agent
    Agent(4, key=jax.random.key(0), squash=jnp.tanh).serialize(sys.argv[1])
    """
)


def test_checkpoint_with_a_function_in_a_static_field_loads_in_another_process(
    tmp_path,
):
    for name in ("a", "b"):
        subprocess.run(
            [sys.executable, "-c", _FUNCTION_WRITER, str(tmp_path / name)],
            cwd=ROOT,
            check=True,
        )
    # Two processes, two memory layouts: the files are still identical.
    assert (tmp_path / "a.eqx").read_bytes() == (tmp_path / "b.eqx").read_bytes()
    loaded = Agent.deserialize(tmp_path / "a", 4, key=jax.random.key(5))
    assert_identical(loaded, agent(squash=jnp.tanh))


def _read_header(path: pathlib.Path) -> tuple[int, dict[str, Any], bytes]:
    """Parse a checkpoint as FORMAT.md describes it: the header length, the JSON
    header, and the data."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length]), data[8 + length :]


def _metadata_crc(header_text: bytes) -> int:
    """FORMAT.md's header checksum: the header with its own slot set to zeros."""
    slot = re.search(rb'"metadata_crc32":"([0-9a-f]{8})"', header_text)
    assert slot is not None
    zeroed = header_text[: slot.start(1)] + b"00000000" + header_text[slot.end(1) :]
    return zlib.crc32(zeroed)


def test_checkpoint_is_a_safetensors_file_laid_out_as_format_md_says(tmp_path):
    model = agent()
    model.serialize(tmp_path / "agent")
    raw = (tmp_path / "agent.eqx").read_bytes()
    length, header, data = _read_header(tmp_path / "agent.eqx")
    assert (8 + length) % 8 == 0  # Padded with spaces, as the reference writer does.
    assert (
        raw[8 + len(json.dumps(header, separators=(",", ":"))) : 8 + length].strip(b" ")
        == b""
    )
    metadata = header.pop("__metadata__")
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["format"] == "lerax_utils"
    assert metadata["format_version"] == "3"
    assert metadata["library_version"] == lerax_utils.__version__
    assert metadata["class"] == "_helpers.Agent"
    assert int(metadata["metadata_crc32"], 16) == _metadata_crc(raw[8 : 8 + length])
    leaves = jax.tree_util.tree_flatten_with_path(model)[0]
    arrays = [(jax.tree_util.keystr(p), x) for p, x in leaves if eqx.is_array(x)]
    entries = json.loads(metadata["leaves"])
    assert [entry["path"] for entry in entries] == [p for p, _ in arrays]
    assert list(header) == [p for p, _ in arrays]  # One tensor per array leaf.
    crcs = metadata["crc32"]
    assert len(crcs) == 8 * len(arrays)
    offset = 0
    for index, (entry, (path, array)) in enumerate(zip(entries, arrays, strict=True)):
        data_array = jax.random.key_data(array) if is_key(array) else array
        tensor = header[path]
        assert tensor["shape"] == list(data_array.shape) == entry["shape"]
        assert entry["dtype"] == str(data_array.dtype)
        assert tensor["dtype"] == ("U32" if is_key(array) else "F32")
        start, end = tensor["data_offsets"]
        assert start == offset  # Back to back, no holes.
        offset = end
        assert data[start:end] == np.asarray(data_array).tobytes()
        assert int(crcs[8 * index : 8 * index + 8], 16) == zlib.crc32(data[start:end])
    assert offset == len(data)
    key_entry = entries[-1]
    assert (key_entry["kind"], key_entry["impl"]) == ("key", "threefry2x32")
    assert key_entry["key_shape"] == [2]
    structure = metadata["structure"]
    assert "0x" not in structure and " at " not in structure  # No addresses.
    assert [
        "",
        {"node": "Agent", "static": {"squash": ["function", "tanh"]}},
    ] in json.loads(structure)


_FIX = ". Pass the constructor arguments the model was saved with."


def test_deserialize_checks_the_file_against_the_skeleton(tmp_path):
    path = tmp_path / "agent.eqx"
    agent().serialize(path)
    prefix = f"Serializable.deserialize: the file '{path}' "
    assert load_error(path, 5) == (
        prefix + "does not match the skeleton at path .mlp.width_size: the static "
        "field is 4 in the file and 5 in the skeleton" + _FIX
    )
    assert load_error(path, squash=jax.nn.relu) == (
        prefix + "does not match the skeleton at path .squash: the static field is "
        "['function', 'tanh'] in the file and ['function', 'relu'] in the skeleton"
        + _FIX
    )


def test_a_static_function_is_compared_by_name_not_qualified_name(
    tmp_path, monkeypatch
):
    # JAX has renamed where its functions live (`jax.numpy.tanh`), never what.
    def act(x: Any) -> Any:
        return x

    WithFunction(2, act).serialize(tmp_path / "model")
    monkeypatch.setattr(act, "__qualname__", "elsewhere.act")
    assert WithFunction.deserialize(tmp_path / "model", 2, act).act is act


def test_deserialize_names_the_first_leaf_whose_shape_or_dtype_differs(tmp_path):
    path = tmp_path / "model"
    Checkpointed({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}).serialize(path)
    prefix = f"Serializable.deserialize: the file '{path}.eqx' "
    error = load_error(
        path, {"w": jnp.ones((2, 4)), "b": jnp.zeros(3)}, cls=Checkpointed
    )
    assert error == (
        prefix + "holds at path .params['w'] an array of shape (2, 3) and dtype "
        "float32, but the skeleton has shape (2, 4) and dtype float32" + _FIX
    )
    error = load_error(
        path, {"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.int32)}, cls=Checkpointed
    )
    assert error == (
        prefix + "holds at path .params['b'] an array of shape (3,) and dtype "
        "float32, but the skeleton has shape (3,) and dtype int32" + _FIX
    )
    error = load_error(path, {"w": jnp.ones((2, 3))}, cls=Checkpointed)
    assert error == (
        prefix + "does not match the skeleton at path .params: the file has "
        "{'node': 'dict', 'keys': ['b', 'w']}, the skeleton has {'node': 'dict', "
        "'keys': ['w']}" + _FIX
    )


def test_deserialize_rejects_a_different_leaf_count(tmp_path, monkeypatch):
    path = tmp_path / "model.eqx"
    Checkpointed([jnp.ones(2), jnp.ones(2)]).serialize(path)
    # Skip the structure check to reach the count check, as a file with a
    # hand-edited structure would.
    monkeypatch.setattr(lerax_utils, "_structure_difference_in_file", lambda *a: None)
    error = load_error(path, [jnp.ones(2)], cls=Checkpointed)
    assert error == (
        f"Serializable.deserialize: the file '{path}' holds 3 leaves, and the "
        "skeleton has 2; they first differ at path .params[1]" + _FIX
    )
    save_pytree(tmp_path / "two", [jnp.ones(2)] * 2)
    with pytest.raises(ValueError) as info:  # The file's leaves all come first.
        load_pytree(tmp_path / "two", [jnp.ones(2)] * 3)
    assert str(info.value).startswith(
        f"load_pytree: the file '{tmp_path / 'two.eqx'}' holds 2 leaves, and `like` "
        "has 3; they first differ at path [2]. "
    )


def test_a_leaf_entry_that_is_not_an_object_is_counted_before_it_is_read(tmp_path):
    Checkpointed(jnp.ones(2)).serialize(tmp_path / "m")
    good = (tmp_path / "m.eqx").read_bytes()
    path = bad_file(tmp_path, forge(good, lambda leaves, _, __: leaves.append(7)))
    with pytest.raises(ValueError) as info:  # No arguments: the file's are used.
        Checkpointed.deserialize(path)
    assert str(info.value).startswith(
        f"Serializable.deserialize: the file '{path}' holds 3 leaves, and the "
        "skeleton has 2;"
    )


def test_deserialize_rejects_files_that_are_not_checkpoints(tmp_path):
    good = checkpoint_bytes(tmp_path)
    length = struct.unpack("<Q", good[:8])[0]
    newer = forge(
        good,
        lambda leaves, structure, header: header["__metadata__"].update(
            format_version="4"
        ),
    )
    cases = {
        b"": "is truncated (0 bytes)",
        good[:8]: "is truncated (8 bytes)",
        good[:9]: "is truncated inside its header (9 bytes)",
        b"step,loss\n1,0.5\n": "is not a lerax_utils checkpoint: it starts with "
        "b'step,los', which is not a safetensors header length followed by `{`",
        bytes(range(200)): "is not a lerax_utils checkpoint: it starts with "
        "b'\\x00\\x01\\x02\\x03\\x04\\x05\\x06\\x07', which is not a safetensors "
        "header length followed by `{`",
        newer: "has format version 4, newer than the 3 this lerax_utils "
        f"{lerax_utils.__version__} reads. Upgrade lerax_utils to load it",
        struct.pack("<Q", 2**40) + good[8:]: "declares a header of "
        f"{2**40} bytes, more than the {64 * 1024 * 1024} allowed; the file is corrupt",
        # The largest header allowed, and one byte more.
        struct.pack("<Q", 64 * 1024 * 1024) + b"{}": "is truncated inside its "
        "header (10 bytes)",
        struct.pack("<Q", 64 * 1024 * 1024 + 1) + b"{}": "declares a header of "
        f"{64 * 1024 * 1024 + 1} bytes, more than the {64 * 1024 * 1024} allowed; "
        "the file is corrupt",
        good + b"\x00": "has 1 trailing bytes after the data its header describes; "
        "it was not written by `serialize` in one piece",
        good[: 8 + length] + good[9 + length :]: "is truncated: it has "
        f"{len(good) - 1} bytes, and its header needs {len(good)}",
    }
    for content, problem in cases.items():
        path = bad_file(tmp_path, content)
        assert (
            load_error(path)
            == f"Serializable.deserialize: the file '{path}' {problem}."
        )


def test_deserialize_rejects_a_file_truncated_at_any_byte(tmp_path):
    model = Checkpointed({"k": jax.random.key(0), "n": 3, "w": jnp.arange(3.0)})
    model.serialize(tmp_path / "small")
    good = (tmp_path / "small.eqx").read_bytes()
    for size in range(1, len(good)):
        path = bad_file(tmp_path, good[:size])
        with pytest.raises(ValueError) as info:
            Checkpointed.deserialize(path, model.params)
        error = str(info.value)
        assert error.startswith(f"Serializable.deserialize: the file '{path}' is ")
        assert "truncated" in error, (size, error)


def test_deserialize_never_allocates_from_a_forged_header(tmp_path):
    good = checkpoint_bytes(tmp_path)

    def object_dtype(leaves, structure, header):
        leaves[0]["dtype"] = "object"

    path = bad_file(tmp_path, forge(good, object_dtype))
    assert load_error(path) == (
        f"Serializable.deserialize: the file '{path}' has a malformed header (the "
        "leaf at path .mlp.layers[0].weight)."
    )


def test_deserialize_loads_plain_equinox_files(tmp_path):
    model = Checkpointed({"w": jnp.arange(6.0).reshape(2, 3), "n": 3}, temperature=2.0)
    eqx.tree_serialise_leaves(tmp_path / "legacy.eqx", model)
    loaded = Checkpointed.deserialize(
        tmp_path / "legacy", {"w": jnp.ones((2, 3)), "n": 0}
    )
    assert_identical(loaded, model)
    truncated = (tmp_path / "legacy.eqx").read_bytes()[:-3]
    path = bad_file(tmp_path, truncated)
    error = load_error(path, {"w": jnp.ones((2, 3)), "n": 0}, cls=Checkpointed)
    assert error.startswith(
        f"Serializable.deserialize: the file '{path}' could not be read as a plain "
        "Equinox file: "
    )


def test_a_failed_serialize_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "agent.eqx"
    agent(seed=1).serialize(path)
    before = path.read_bytes()
    broken = Checkpointed([jnp.ones(3), jnp.ones(4)])
    broken.params[1].delete()  # Reading it fails in the middle of the save.
    with pytest.raises(RuntimeError, match="deleted"):
        broken.serialize(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["agent.eqx"]


_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    sys.path.insert(0, "tests")
    from _helpers import Checkpointed
    models = [Checkpointed(jnp.full(2_000_000, float(i))) for i in range(2)]
    print("ready", flush=True)
    i = 0
    while True:
        models[i % 2].serialize(sys.argv[1])
        i += 1
    """
)


def test_a_killed_writer_never_leaves_a_torn_checkpoint(tmp_path):
    path = tmp_path / "model.eqx"
    Checkpointed(jnp.full(2_000_000, 0.0)).serialize(path)
    rng = np.random.default_rng(0)
    for _ in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", _KILLED_WRITER, str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        ) as writer:
            assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.05, 0.5))
            writer.send_signal(signal.SIGKILL)
        loaded = Checkpointed.deserialize(path, jnp.zeros(2_000_000))
        values = set(np.unique(np.asarray(loaded.params)).tolist())
        assert values in ({0.0}, {1.0})


def test_serialize_inside_jit_writes_when_the_computation_runs(tmp_path):
    path = tmp_path / "every_ten"

    @eqx.filter_jit
    def train(model):
        def step(model, i):
            model = Checkpointed(model.params + 1.0)
            filter_cond(i % 10 == 9, lambda: model.serialize(path), lambda: None)
            return model, None

        return filter_scan(step, model, jnp.arange(25))[0]

    final = train(Checkpointed(jnp.zeros(3)))
    jax.effects_barrier()
    assert_identical(final.params, jnp.full(3, 25.0))
    saved = Checkpointed.deserialize(path, jnp.zeros(3))
    assert_identical(saved.params, jnp.full(3, 20.0))  # The last multiple of ten.


def test_serialize_eagerly_completes_before_returning(tmp_path):
    model = agent(seed=4)
    model.serialize(tmp_path / "now")
    loaded = Agent.deserialize(tmp_path / "now", 4, key=jax.random.key(0))
    assert_identical(loaded, model)


def test_deserialize_returns_the_class_it_is_called_on(tmp_path):
    agent().serialize(tmp_path / "agent")
    loaded: Agent = Agent.deserialize(tmp_path / "agent", 4, key=jax.random.key(0))
    assert type(loaded) is Agent


def test_a_saved_false_loads_as_false_and_true_as_true(tmp_path):
    model = Checkpointed({"off": False, "on": True}, temperature=0.5)
    model.serialize(tmp_path / "flags")
    loaded = Checkpointed.deserialize(tmp_path / "flags", {"off": True, "on": False})
    assert loaded.params["off"] is False
    assert loaded.params["on"] is True


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_typed_keys_of_every_impl_round_trip_with_their_impl(tmp_path, impl):
    keys = jax.random.split(jax.random.key(3, impl=impl), 2)
    model = Checkpointed({"keys": keys, "one": jax.random.key(4, impl=impl)})
    model.serialize(tmp_path / "keys")
    loaded = Checkpointed.deserialize(tmp_path / "keys", model.params)
    assert_identical(loaded, model)
    assert lerax_utils._key_impl_name(loaded.params["keys"].dtype) == impl
    other = "rbg" if impl == "threefry2x32" else "threefry2x32"
    skeleton = {"keys": jax.random.split(jax.random.key(0, impl=other), 2)}
    skeleton["one"] = model.params["one"]
    error = load_error(tmp_path / "keys", skeleton, cls=Checkpointed)
    saved, wanted = keys.dtype, skeleton["keys"].dtype
    assert error == (
        f"Serializable.deserialize: the file '{tmp_path}/keys.eqx' holds at path "
        f".params['keys'] an array of shape (2,) and dtype {saved}, but the skeleton "
        f"has shape (2,) and dtype {wanted}" + _FIX
    )


def test_files_of_older_formats_are_refused_naming_their_version(tmp_path):
    good = checkpoint_bytes(tmp_path)
    older = {
        version: forge(
            good,
            lambda leaves, structure, header, version=version: header[
                "__metadata__"
            ].update(format_version=str(version)),
        )
        for version in (0, 1, 2)
    }
    older[1] = b"LRXCKPT\x00" + struct.pack("<IQI", 1, 2, 0) + b"{}"  # Format 1.
    for version, content in older.items():
        path = bad_file(tmp_path, content)
        assert load_error(path) == (
            f"Serializable.deserialize: the file '{path}' has format version "
            f"{version}, older than the 3 this lerax_utils {lerax_utils.__version__} "
            "reads. Load it with the lerax_utils that wrote it, save it with "
            "`eqx.tree_serialise_leaves`, and load that file."
        )


def test_writes_inside_one_jitted_loop_land_in_program_order(tmp_path):
    path = tmp_path / "latest"

    def save_many(x):
        for i in range(24):  # Independent writes: only their order ties them.
            Checkpointed(x + i).serialize(path)
        return x

    # The order is enforced, not lucky: every write is an ordered effect (the CPU
    # runtime happens to run even unordered callbacks in order, so the effect is
    # checked in the program itself).
    program = jax.make_jaxpr(save_many)(jnp.zeros(64)).jaxpr
    callbacks = [eqn for eqn in program.eqns if "callback" in eqn.primitive.name]
    assert len(callbacks) == 24
    assert all(eqn.params["ordered"] for eqn in callbacks)
    run = jax.jit(save_many)
    for attempt in range(6):
        run(jnp.full(64, float(attempt)))
        jax.effects_barrier()
        loaded = Checkpointed.deserialize(path, jnp.zeros(64))
        assert_identical(loaded.params, jnp.full(64, attempt + 23.0))


@pytest.mark.skipif(not hasattr(os, "pread"), reason="no os.pread")
def test_the_whole_file_is_written_when_it_is_synced(tmp_path, monkeypatch):
    synced, sync = [], os.fsync

    def recorded(descriptor: int) -> None:
        if not stat.S_ISDIR(os.fstat(descriptor).st_mode):  # Not its folder.
            synced.append(os.pread(descriptor, 1 << 20, 0))
        sync(descriptor)

    monkeypatch.setattr(os, "fsync", recorded)
    save_pytree(tmp_path / "t", {"w": jnp.arange(3.0), "n": 2})
    assert synced == [(tmp_path / "t.eqx").read_bytes()]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc/self/fd")
def test_saves_and_loads_leave_no_file_open(tmp_path):
    tree = {"w": jnp.arange(3.0), "n": np.arange(2)}
    save_pytree(tmp_path / "t", tree)
    lerax_utils._CLOSER.submit(lambda: None).result()  # What it was given is closed.
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        save_pytree(tmp_path / "t", tree)
        load_pytree(tmp_path / "t", tree)
    lerax_utils._CLOSER.submit(lambda: None).result()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_save_that_fails_after_creating_its_temporary_removes_it(
    tmp_path, monkeypatch
):
    path = tmp_path / "agent.eqx"
    agent(seed=1).serialize(path)
    before = path.read_bytes()

    def failing(*args):
        raise OSError(5, "Input/output error")

    # The file's fsync, and the checksum of its data (computed while it is written).
    for module, name in [(os, "fsync"), (zlib, "crc32")]:
        with monkeypatch.context() as patch:
            patch.setattr(module, name, failing)
            with pytest.raises(OSError, match="Input/output error"):
                agent(seed=2).serialize(path)
        assert path.read_bytes() == before
        assert [p.name for p in tmp_path.iterdir()] == ["agent.eqx"]


def test_new_checkpoints_honour_the_umask_and_overwrites_keep_their_mode(tmp_path):
    for umask in (0o000, 0o002, 0o022, 0o027, 0o077):
        old = os.umask(umask)
        try:
            agent().serialize(tmp_path / f"new{umask}")
            with open(tmp_path / f"reference{umask}", "wb"):
                pass
        finally:
            os.umask(old)
        expected = (tmp_path / f"reference{umask}").stat().st_mode
        assert (tmp_path / f"new{umask}.eqx").stat().st_mode == expected
    kept = tmp_path / "kept.eqx"
    agent().serialize(kept)
    for mode in (0o604, 0o200):  # Even a file its owner cannot read.
        kept.chmod(mode)
        agent(seed=1).serialize(kept)
        assert kept.stat().st_mode & 0o7777 == mode


def test_serialize_fsyncs_the_file_then_renames_it_then_fsyncs_the_folder(
    tmp_path, monkeypatch
):
    calls: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        name = os.readlink(f"/proc/self/fd/{descriptor}")
        content = pathlib.Path(name).read_bytes() if os.path.isfile(name) else b""
        calls.append(("fsync", name, str(len(content))))
        real_fsync(descriptor)

    def replace(source, target):
        calls.append(("replace", str(source), str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    agent().serialize(tmp_path / "agent")
    monkeypatch.undo()
    final = (tmp_path / "agent.eqx").read_bytes()
    assert [call[0] for call in calls] == ["fsync", "replace", "fsync"]
    assert calls[0][1] == calls[1][1]  # The temporary file, complete when synced.
    assert calls[0][2] == str(len(final))
    assert calls[1][2] == str(tmp_path / "agent.eqx")
    assert calls[2][1] == str(tmp_path)


def test_any_name_the_filesystem_accepts_saves(tmp_path):
    names = ["n" * 251 + ".eqx", "é" * 125 + ".eqx", "m" * 255]
    for name in names:
        assert len(name.encode()) <= 255
        model = Checkpointed(jnp.arange(3.0))
        model.serialize(tmp_path / name, no_suffix=True)
        loaded = Checkpointed.deserialize(tmp_path / name, jnp.zeros(3))
        assert_identical(loaded, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("", "`path` is empty. Pass a file name, such as 'checkpoints/run'."),
        (
            ".",
            "`path` '.' names a folder, not a file. Pass a file name inside it, "
            "such as 'model'.",
        ),
        (
            "/",
            "`path` '/' names a folder, not a file. Pass a file name inside it, "
            "such as '/model'.",
        ),
        (
            "runs/",
            "`path` 'runs/' names a folder, not a file. Pass a file name "
            "inside it, such as 'runs/model'.",
        ),
    ],
)
def test_serialize_and_deserialize_refuse_a_path_that_names_no_file(path, problem):
    for method, call in [
        ("serialize", lambda: agent().serialize(path)),
        ("deserialize", lambda: Agent.deserialize(path, 4, key=jax.random.key(0))),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == f"Serializable.{method}: {problem}"


def test_serialize_refuses_a_no_suffix_that_is_not_a_bool(tmp_path):
    with pytest.raises(TypeError) as info:
        agent().serialize(tmp_path / "a", no_suffix="False")  # type: ignore[arg-type]
    assert str(info.value) == (
        "Serializable.serialize: `no_suffix` must be a bool; got str 'False'."
    )
    assert list(tmp_path.iterdir()) == []


def _float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def test_python_floats_keep_their_nan_payload_and_sign(tmp_path):
    bits = [0x7FF8000000000123, 0xFFF8000000000001, 0x8000000000000000, 1]
    values = [_float(b) for b in bits]
    model = Checkpointed(values, temperature=_float(0x7FF800000000ABCD))
    model.serialize(tmp_path / "nan")
    loaded = Checkpointed.deserialize(tmp_path / "nan", [0.0] * 4)
    assert_exact(loaded, model)
    loaded_bits = [struct.unpack("<Q", struct.pack("<d", v))[0] for v in loaded.params]
    assert loaded_bits == bits


def test_static_dicts_compare_as_mappings(tmp_path):
    WithStatic(jnp.ones(2), {"lr": 0.5, "decay": 0.9}).serialize(tmp_path / "s")
    loaded = WithStatic.deserialize(
        tmp_path / "s", jnp.ones(2), {"decay": 0.9, "lr": 0.5}
    )
    assert loaded.options == {"lr": 0.5, "decay": 0.9}
    error = load_error(
        tmp_path / "s", jnp.ones(2), {"decay": 0.9, "lr": 0.25}, cls=WithStatic
    )
    assert error.startswith(
        f"Serializable.deserialize: the file '{tmp_path}/s.eqx' does not match the "
        "skeleton at path .options: the static field is "
    )


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float
    schedule: Any = None


def test_plain_fields_holding_objects_are_compared(tmp_path):
    model = Checkpointed({"w": jnp.ones(2), "config": Config(0.5, ("cosine", 3))})
    model.serialize(tmp_path / "c")
    loaded = Checkpointed.deserialize(
        tmp_path / "c", {"w": jnp.ones(2), "config": Config(0.5, ("cosine", 3))}
    )
    assert loaded.params["config"] == Config(0.5, ("cosine", 3))
    for other in [Config(0.1, ("cosine", 3)), Config(0.5, ("cosine", 4)), "0.5"]:
        error = load_error(
            tmp_path / "c", {"w": jnp.ones(2), "config": other}, cls=Checkpointed
        )
        assert error.startswith(
            f"Serializable.deserialize: the file '{tmp_path}/c.eqx' does not match "
            "the skeleton at path .params['config']: the file has ['dataclass', "
            "'Config', "
        ), error


def test_a_static_true_does_not_stand_for_1(tmp_path):
    WithStatic(jnp.ones(2), True).serialize(tmp_path / "flag")
    error = load_error(tmp_path / "flag", jnp.ones(2), 1, cls=WithStatic)
    assert error == (
        f"Serializable.deserialize: the file '{tmp_path}/flag.eqx' does not match the "
        "skeleton at path .options: the static field is True in the file and 1 in "
        "the skeleton" + _FIX
    )


def test_serialize_refuses_a_batched_model_under_vmap(tmp_path):
    @eqx.filter_vmap
    def save(x):
        Checkpointed(x).serialize(tmp_path / "population")
        return x

    with pytest.raises(ValueError) as info:
        save(jnp.arange(6.0).reshape(3, 2))
    assert str(info.value) == (
        "Serializable.serialize: the model is batched by `vmap`, so one path cannot "
        "hold it. Call `serialize` outside the vmap, on the stacked model."
    )
    assert list(tmp_path.iterdir()) == []


def _jax_takes_io_callbacks_of_constants_under_grad() -> bool:
    """Old JAX (0.4.26) refuses an IO callback under `grad`, even of a stop_gradient."""
    from jax.experimental import io_callback

    def loss(x):
        io_callback(lambda _: None, None, jax.lax.stop_gradient(x), ordered=True)
        return x

    try:
        jax.grad(loss)(1.0)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("jitted", [False, True])
def test_saving_under_grad_saves_the_values_and_leaves_the_gradient(tmp_path, jitted):
    def loss(w):
        Checkpointed(w).serialize(tmp_path / "g")
        save_pytree(tmp_path / "tree", {"w": w, "n": 3})
        return (w**2).sum()

    grad = jax.jit(jax.grad(loss)) if jitted else jax.grad(loss)
    if not _jax_takes_io_callbacks_of_constants_under_grad():
        with pytest.raises(ValueError, match=r"^IO callbacks do not support JVP\."):
            grad(jnp.arange(3.0))
        return
    assert_identical(grad(jnp.arange(3.0)), jnp.arange(3.0) * 2)
    jax.effects_barrier()
    saved = Checkpointed.deserialize(tmp_path / "g", jnp.zeros(3))
    assert_identical(saved.params, jnp.arange(3.0))
    tree = load_pytree(tmp_path / "tree", {"w": jnp.zeros(3), "n": 3})
    assert_identical(tree["w"], jnp.arange(3.0))


def test_a_concrete_model_saved_inside_jit_is_written_only_when_run(tmp_path):
    model = Checkpointed(jnp.arange(3.0))
    path = tmp_path / "closed"

    @jax.jit
    def maybe_save(flag):
        filter_cond(flag, lambda: model.serialize(path), lambda: None)
        return flag

    maybe_save.lower(True)  # Tracing alone writes nothing.
    maybe_save(False)
    jax.effects_barrier()
    assert list(tmp_path.iterdir()) == []
    maybe_save(True)
    jax.effects_barrier()
    assert_identical(Checkpointed.deserialize(path, jnp.zeros(3)), model)


def test_numpy_leaves_keep_their_exact_dtype_whatever_x64(tmp_path):
    params = {
        "f64": np.linspace(0.0, 1.0, 3),
        "i64": np.arange(3, dtype=np.int64) * 2**40,
        "u64": np.array([2**63 + 5], np.uint64),
        "c128": np.array([1 + 1e-300j]),
        "scalar": np.float64(0.1),
        "int_scalar": np.int64(2**40),
        "f32_scalar": np.float32(1.5),
    }
    model = Checkpointed(params)
    model.serialize(tmp_path / "wide")
    loaded = Checkpointed.deserialize(tmp_path / "wide", params)
    assert_exact(loaded, model)


_REFUSED = [
    (
        np.ma.masked_array([1.0, 2.0], mask=[False, True]),
        "a masked array, whose mask would be lost. Save `x.data` and `x.mask`",
    ),
    (
        np.zeros(2).view(np.recarray),  # As any other subclass of ndarray.
        "a recarray, which would load as a plain ndarray. Save `np.asarray(x)`",
    ),
    (
        unittest.mock.NonCallableMock(spec=np.ndarray),  # An array to `isinstance`.
        "a NonCallableMock, which would load as a plain ndarray. Save `np.asarray(x)`",
    ),
    (
        np.array([None, 1], dtype=object),
        "an array of Python objects, which needs pickle. Make the field static",
    ),
    (
        np.zeros(2, [("a", "f4")]),
        "an array of structured dtype [('a', '<f4')]. Save each field apart",
    ),
    (
        np.zeros(0, "<U1000000"),
        "an array of dtype <U1000000, which a checkpoint cannot restore exactly. "
        "Convert it to a dtype of JAX, a string or a dated dtype with a unit",
    ),
    (
        np.zeros(1, "datetime64"),
        "an array of dtype datetime64, which a checkpoint cannot restore exactly. "
        "Convert it to a dtype of JAX, a string or a dated dtype with a unit",
    ),
    (
        np.datetime64("NaT"),  # A NumPy scalar, as an array.
        "an array of dtype datetime64, which a checkpoint cannot restore exactly. "
        "Convert it to a dtype of JAX, a string or a dated dtype with a unit",
    ),
]


@pytest.mark.parametrize(("leaf", "problem"), _REFUSED)
def test_serialize_refuses_leaves_that_could_never_load(tmp_path, leaf, problem):
    with pytest.raises(TypeError) as info:
        Checkpointed({"x": leaf}).serialize(tmp_path / "m")
    assert str(info.value) == (
        f"Serializable.serialize: the leaf at path .params['x'] is {problem}."
    )
    assert list(tmp_path.iterdir()) == []


def test_serialize_inside_jit_refuses_such_a_leaf_when_tracing(tmp_path):
    masked = np.ma.masked_array([1.0], mask=[True])

    @jax.jit
    def save(x):
        Checkpointed({"x": x, "m": masked}).serialize(tmp_path / "m")
        return x

    with pytest.raises(TypeError) as info:
        save.lower(jnp.ones(1))
    assert str(info.value).startswith(
        "Serializable.serialize: the leaf at path .params['m'] is a masked array"
    )


class _Biased(Serializable):
    bias: np.ndarray

    def __init__(self, size):
        self.bias = np.zeros(size, np.float32)


def test_big_endian_leaves_load_exactly_into_a_native_skeleton(tmp_path):
    values = np.array([1.5, -0.0, np.nan, 3e-45], ">f4")
    eqx.tree_at(lambda m: m.bias, _Biased(4), values).serialize(tmp_path / "m")
    loaded = _Biased.deserialize(tmp_path / "m")
    assert loaded.bias.dtype == np.float32
    assert loaded.bias.tobytes() == values.astype(np.float32).tobytes()
    tree = {
        "ints": np.array([2**40, -1], ">i8"),
        "pairs": np.array([1 - 2j, np.nan], ">c16"),
        "text": np.array(["ab", "ç"], ">U2"),
    }
    save_pytree(tmp_path / "t", tree)
    like = {name: x.astype(x.dtype.newbyteorder("=")) for name, x in tree.items()}
    loaded = load_pytree(tmp_path / "t", like)
    for name, native in like.items():
        assert loaded[name].dtype == native.dtype
        assert loaded[name].tobytes() == native.tobytes()
    with pytest.raises(ValueError) as info:  # Another type is still refused.
        load_pytree(tmp_path / "t", dict(like, ints=np.zeros(2, np.float32)))
    assert str(info.value) == (
        f"load_pytree: the file '{tmp_path / 't.eqx'}' holds at path ['ints'] an "
        "array of shape (2,) and dtype int64, but `like` has shape (2,) and dtype "
        "float32. Pass a `like` with the structure, shapes and dtypes of the saved "
        "tree."
    )


def test_arrays_of_as_many_dimensions_as_numpy_allows_round_trip(tmp_path):
    most = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
    tree = {
        "numpy": np.arange(2, dtype=np.int16).reshape((1,) * (most - 1) + (2,)),
        "jax": jnp.arange(2.0).reshape((2,) + (1,) * (most - 1)),
    }
    save_pytree(tmp_path / "deep", tree)
    assert_identical(load_pytree(tmp_path / "deep", tree), tree)


def test_numpy_strings_dates_and_big_endian_arrays_round_trip(tmp_path):
    params = {
        "text": np.array(["ab", "ç"]),
        "bytes": np.array([b"xy", b"z"]),
        "days": np.array(["2020-01-01", "NaT"], "datetime64[D]"),
        "delays": np.array([5, -3], "timedelta64[ms]"),
        "big": np.array([1.0, -2.5, np.nan], ">f4"),
        "big_ints": np.arange(3, dtype=">i8") - 2**40,
        "word": np.str_("hello"),
        "minute": np.datetime64("2021-05-06T07:08", "m"),
        "w": jnp.ones(2),
        "widest_text": np.array(["wide"], "<U999999"),  # The longest item allowed.
        "widest_bytes": np.zeros(0, "S999999"),
    }
    model = Checkpointed(params)
    model.serialize(tmp_path / "m")
    skeleton = dict(params, text=np.array(["zz", "q"]))  # Only the values differ.
    loaded = Checkpointed.deserialize(tmp_path / "m", skeleton)
    assert_exact(loaded, model)
    assert loaded.params["big"].dtype.str == ">f4"
    tensors = dict(safetensors.deserialize((tmp_path / "m.eqx").read_bytes()))
    for name in ("big", "big_ints", "text", "days"):
        little = params[name].astype(params[name].dtype.newbyteorder("<"))
        assert bytes(tensors[f".params['{name}']"]["data"]) == little.tobytes()
    error = load_error(
        tmp_path / "m", dict(params, text=np.array(["abc"])), cls=Checkpointed
    )
    assert error == (
        f"Serializable.deserialize: the file '{tmp_path}/m.eqx' holds at path "
        ".params['text'] an array of shape (2,) and dtype <U2, but the skeleton has "
        "shape (1,) and dtype <U3" + _FIX
    )


_NUMPY_ONLY = ["<U1", "<U3", ">U2", "S1", "S4", ">f4", ">i8", ">c16", ">u2"]
_NUMPY_ONLY += ["datetime64[D]", "datetime64[ns]", "timedelta64[ms]"]


@given(
    leaves=st.lists(
        hnp.arrays(
            st.sampled_from(_NUMPY_ONLY).map(np.dtype),
            hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_numpy_only_dtypes_round_trip_empty_or_not(tmp_path_factory, leaves):
    path = tmp_path_factory.mktemp("numpy_only") / "m"
    save_pytree(path, leaves)
    assert_exact(load_pytree(path, leaves), leaves)


class Converts(Serializable):
    """A model whose constructor needs concrete values."""

    weight: Any

    def __init__(self, n, how):
        uses = {
            "numpy": lambda: np.asarray(n),
            "float": lambda: float(n),
            "index": lambda: [1.0, 2.0, 3.0][n],
            "bool": lambda: 1.0 if n else 0.0,
        }
        self.weight = np.asarray(uses[how]())


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("numpy", "TracerArrayConversionError"),
        ("float", "ConcretizationTypeError"),
        ("index", "TracerIntegerConversionError"),
        ("bool", "TracerBoolConversionError"),
    ],
)
def test_deserialize_names_a_constructor_that_needs_concrete_values(
    tmp_path, how, error
):
    Converts(jnp.array(2), how).serialize(tmp_path / "c")
    with pytest.raises(TypeError) as info:
        Converts.deserialize(tmp_path / "c", jnp.array(2), how)
    assert str(info.value) == (
        "Serializable.deserialize: could not build a skeleton of Converts: its "
        "constructor needs a concrete value under `eqx.filter_eval_shape` "
        f"({error}). Keep JAX values as JAX arrays in it (no `np.asarray`, "
        "`float()` or `if` on them)."
    )


# The width hint only where the shapes agree.
@pytest.mark.parametrize(
    ("shape", "fix"),
    [
        (
            3,
            "The dtypes differ only in width: the file was probably saved with "
            "`jax_enable_x64` set otherwise than now. Set it as when saving, or save "
            "the leaf as a NumPy array, which keeps its dtype.",
        ),
        (2, "Pass the constructor arguments the model was saved with."),
    ],
)
def test_a_dtype_that_differs_only_in_width_names_x64(tmp_path, shape, fix):
    Checkpointed(jnp.zeros(3)).serialize(tmp_path / "narrow")
    jax.config.update("jax_enable_x64", True)
    try:
        skeleton = jnp.zeros(shape, float)
        error = load_error(tmp_path / "narrow", skeleton, cls=Checkpointed)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert error == (
        f"Serializable.deserialize: the file '{tmp_path}/narrow.eqx' holds at path "
        ".params an array of shape (3,) and dtype float32, but the skeleton has "
        f"shape ({shape},) and dtype float64. {fix}"
    )


# A JAX leaf saved wide never loads narrowed.
@pytest.mark.parametrize("wide", ["float64", "int64", "uint64", "complex128"])
def test_a_wide_jax_leaf_never_loads_narrowed(tmp_path, wide):
    jax.config.update("jax_enable_x64", True)
    try:
        save_pytree(tmp_path / "wide", {"j": jnp.zeros(3, wide), "n": np.zeros(3)})
    finally:
        jax.config.update("jax_enable_x64", False)
    narrow = jax.dtypes.canonicalize_dtype(wide)
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "wide", {"j": jnp.zeros(3, narrow), "n": np.zeros(3)})
    assert str(info.value) == (
        f"load_pytree: the file '{tmp_path}/wide.eqx' holds at path ['j'] an array of "
        f"shape (3,) and dtype {wide}, but `like` has shape (3,) and dtype {narrow}. "
        "The dtypes differ only in width: the file was probably saved with "
        "`jax_enable_x64` set otherwise than now. Set it as when saving, or save the "
        "leaf as a NumPy array, which keeps its dtype."
    )


# Saves and loads pause the garbage collector and leave it as they found it.
@pytest.mark.parametrize("enabled", [True, False])
def test_saves_and_loads_leave_the_garbage_collector_as_they_found_it(
    tmp_path, enabled
):
    import gc

    seen = []
    real_keystr = lerax_utils._keystr

    def spy(key_path):
        seen.append(gc.isenabled())
        return real_keystr(key_path)

    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(lerax_utils, "_keystr", spy)
            save_pytree(tmp_path / "t", {"a": jnp.ones(2)})
            load_pytree(tmp_path / "t", {"a": jnp.ones(2)})
            with pytest.raises(ValueError):
                load_pytree(tmp_path / "t", {"b": jnp.ones(2)})
        assert seen and not any(seen)
        assert gc.isenabled() is enabled
        seen.clear()  # Another thread's save leaves the collector running.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(lerax_utils, "_keystr", spy)
            thread = threading.Thread(
                target=save_pytree, args=(tmp_path / "u", {"a": jnp.ones(2)})
            )
            thread.start()
            thread.join(timeout=60)
        assert seen and all(flag is enabled for flag in seen)
    finally:
        gc.enable()


# Small and large leaves are placed alike, and as before, whatever mesh is set.
@pytest.mark.skipif(not hasattr(jax, "set_mesh"), reason="this JAX has no set_mesh")
def test_leaves_of_every_size_load_placed_alike_under_set_mesh(tmp_path):
    tree = {"small": jnp.ones(3), "large": jnp.ones(40_000), "weak": jnp.asarray(2.0)}
    save_pytree(tmp_path / "t", tree)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    with jax.set_mesh(mesh):
        loaded = load_pytree(tmp_path / "t", tree)
    assert_exact(loaded, tree)
    for leaf in (loaded["small"], loaded["large"]):
        assert isinstance(leaf.sharding, jax.sharding.SingleDeviceSharding)
        assert not leaf.committed


# A NumPy `like` stands for the JAX array JAX makes of it, a float64 one included.
def test_a_wide_numpy_like_stands_for_the_jax_array_jax_makes_of_it(tmp_path):
    tree = {"w": jnp.arange(3.0), "n": jnp.arange(2)}
    save_pytree(tmp_path / "t", tree)
    like = {"w": np.zeros(3), "n": np.zeros(2, np.int64)}
    assert_exact(load_pytree(tmp_path / "t", like), tree)


# A forged scalar never loads as another Python type, not even a bool for an int.
def test_a_forged_bool_never_loads_where_like_has_an_int(tmp_path):
    save_pytree(tmp_path / "n", {"n": 1})

    def to_bool(leaves, structure, header):
        leaves[0]["value"] = True

    path = bad_file(tmp_path, forge((tmp_path / "n.eqx").read_bytes(), to_bool))
    with pytest.raises(ValueError) as info:
        load_pytree(path, {"n": 1})
    assert str(info.value) == (
        f"load_pytree: the file '{path}' holds at path ['n'] the Python bool True, "
        "where `like` has int 1. Pass a `like` with the structure, shapes and dtypes "
        "of the saved tree."
    )


# Of two corrupt leaves, the first in the file is the one named.
def test_of_two_corrupt_leaves_the_first_is_named(tmp_path):
    save_pytree(tmp_path / "t", {"a": jnp.ones(4), "b": jnp.ones(4), "c": jnp.ones(4)})
    raw = bytearray((tmp_path / "t.eqx").read_bytes())
    raw[-33] ^= 1  # In "a": "b" and "c" hold the last 32 bytes.
    raw[-17] ^= 1  # In "b".
    path = bad_file(tmp_path, bytes(raw))
    with pytest.raises(ValueError) as info:
        load_pytree(path, {"a": jnp.ones(4), "b": jnp.ones(4), "c": jnp.ones(4)})
    assert str(info.value) == (
        f"load_pytree: the file '{path}' has corrupt data for the leaf at path ['a'] "
        "(its checksum fails)."
    )


# On a CPU, a large leaf becomes a JAX array in the very buffer it was read into.
@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="host memory is the device's"
)
def test_a_large_leaf_loads_without_a_copy(tmp_path, monkeypatch):
    tree = {"w": jnp.arange(1 << 18, dtype=jnp.float32)}  # 1 MiB.
    save_pytree(tmp_path / "t", tree)
    buffers, aligned_empty = [], lerax_utils._aligned_empty

    def spy(shape, dtype):
        buffers.append(aligned_empty(shape, dtype))
        return buffers[-1]

    monkeypatch.setattr(lerax_utils, "_aligned_empty", spy)
    loaded = load_pytree(tmp_path / "t", tree)
    assert_exact(loaded, tree)
    assert [b.ctypes.data for b in buffers] == [loaded["w"].unsafe_buffer_pointer()]


class EitherKind(Serializable):
    """A model whose one leaf is a NumPy float64 or a JAX float32 array."""

    weight: Any

    def __init__(self, as_numpy: bool):
        self.weight = np.arange(3.0) if as_numpy else jnp.arange(3.0)


# The skeleton decides: NumPy float64 never loads where the model has JAX float32.
def test_a_numpy_leaf_loads_only_where_the_constructor_makes_one(tmp_path):
    wide = EitherKind(as_numpy=True)
    wide.weight[1] = 1 / 3  # Not a float32 value.
    wide.serialize(tmp_path / "wide")
    assert_exact(EitherKind.deserialize(tmp_path / "wide", True), wide)
    error = load_error(tmp_path / "wide", False, cls=EitherKind)
    assert error == (
        f"Serializable.deserialize: the file '{tmp_path}/wide.eqx' holds at path "
        ".weight a NumPy array of shape (3,) and dtype float64, but the skeleton has "
        "shape (3,) and dtype float32. Pass the constructor arguments the model was "
        "saved with."
    )


class MadeByNumpy(Serializable):
    count: Any
    weight: Any

    def __init__(self, weight=None):
        self.count = np.array(0)
        self.weight = np.zeros(3) if weight is None else weight


# A NumPy leaf of the constructor that training made a JAX array loads as saved.
def test_a_numpy_leaf_that_became_a_jax_array_loads_as_saved(tmp_path):
    trained = eqx.tree_at(
        lambda m: (m.count, m.weight), MadeByNumpy(), (jnp.asarray(1), jnp.ones(3))
    )
    trained.serialize(tmp_path / "m")
    assert_exact(MadeByNumpy.deserialize(tmp_path / "m"), trained)
    assert_exact(MadeByNumpy.deserialize(tmp_path / "m", np.zeros(3)), trained)
    on_host = jax.device_get(
        trained
    )  # NumPy float32 where the constructor has float64.
    on_host.serialize(tmp_path / "h")
    assert_exact(MadeByNumpy.deserialize(tmp_path / "h", np.zeros(3)), on_host)


# A `like` that asks for a dtype JAX now narrows gets no narrowed array.
def test_a_jax_leaf_never_loads_into_a_dtype_jax_narrows(tmp_path):
    jax.config.update("jax_enable_x64", True)
    try:
        save_pytree(tmp_path / "wide", {"j": jnp.full(2, 1 / 3)})
    finally:
        jax.config.update("jax_enable_x64", False)
    like = {"j": jax.ShapeDtypeStruct((2,), np.float64)}
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "wide", like)
    assert str(info.value) == (
        f"load_pytree: the file '{tmp_path}/wide.eqx' holds at path ['j'] an array of "
        "shape (2,) and dtype float64, but `like` has shape (2,) and dtype float64. "
        "JAX narrows float64 without `jax_enable_x64`: set it as when saving."
    )


class Stores(Serializable):
    weight: Any

    def __init__(self, weight):
        self.weight = weight


# A recording holds an argument's shape, not its kind: a NumPy float64 leaf still loads.
def test_a_no_argument_load_keeps_a_wide_numpy_leaf(tmp_path):
    model = Stores(np.array([1 / 3, 2.0]))
    model.serialize(tmp_path / "m")
    assert_exact(Stores.deserialize(tmp_path / "m"), model)
    assert_exact(Stores.deserialize(tmp_path / "m", np.zeros(2)), model)
    error = load_error(tmp_path / "m", jnp.zeros(2), cls=Stores)
    assert "dtype float64, but the skeleton has shape (2,) and dtype float32" in error


class FromNumpy(Serializable):
    """A model whose constructor reads a NumPy argument on the host."""

    weight: Any
    count: int = eqx.field(static=True)

    def __init__(self, weight):
        self.weight, self.count = weight, int(np.asarray(weight).sum())


# NumPy arguments reach the constructor as NumPy values, as at save time.
def test_numpy_arguments_reach_the_constructor_concretely(tmp_path):
    model = FromNumpy(np.arange(4, dtype=np.int64))
    model.serialize(tmp_path / "m")
    argument = np.arange(4, dtype=np.int64)
    assert_exact(FromNumpy.deserialize(tmp_path / "m", argument), model)
    Halves(np.ones(3)).serialize(tmp_path / "h")
    argument = np.ones(3)
    Halves.deserialize(tmp_path / "h", argument)
    assert argument.tolist() == [1.0, 1.0, 1.0]  # The caller's array is unchanged.


class Halves(Serializable):
    weight: Any

    def __init__(self, weight):
        weight *= 0.5
        self.weight = jnp.asarray(weight)


def test_a_forged_key_or_scalar_never_loads_into_another_type(tmp_path):
    Checkpointed({"k": jax.random.key(0), "n": 3}).serialize(tmp_path / "good")
    good = (tmp_path / "good.eqx").read_bytes()
    skeleton = {"k": jax.random.key(1), "n": 0}

    def key_of_shape_1(leaves, structure, header):
        leaves[0]["shape"] = [1, 2]
        header[".params['k']"]["shape"] = [1, 2]

    def key_as_float(leaves, structure, header):
        leaves[0]["dtype"] = "float32"
        header[".params['k']"]["dtype"] = "F32"

    for edit in (key_of_shape_1, key_as_float):
        path = bad_file(tmp_path, forge(good, edit))
        assert load_error(path, skeleton, cls=Checkpointed) == (
            f"Serializable.deserialize: the file '{path}' has a malformed header "
            "(the leaf at path .params['k'])."
        )

    def float_for_int(leaves, structure, header):
        leaves[1]["value"] = ["float", "400c000000000000"]

    path = bad_file(tmp_path, forge(good, float_for_int))
    assert load_error(path, skeleton, cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' holds at path .params['n'] the "
        "Python float 3.5, where the skeleton has int 0" + _FIX
    )


_FOUR_DEVICES = textwrap.dedent(
    """
    import json, sys, tempfile
    import equinox as eqx, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    import lerax_utils
    from lerax_utils import (
        Serializable, callback_wrapper, filter_scan, stack_pytree, unstack_pytree
    )

    assert len(jax.devices()) == 4
    mesh = Mesh(np.array(jax.devices()), ("d",))
    by_row = NamedSharding(mesh, PartitionSpec("d"))
    by_column = NamedSharding(mesh, PartitionSpec(None, "d"))
    report = {}

    # filter_scan with a sharded carry, under jit.
    weights = jax.device_put(jnp.arange(8.0), by_row)
    def step(carry, x):
        return {"w": carry["w"] * 0.5 + x, "tag": carry["tag"]}, carry["w"].sum()
    run = eqx.filter_jit(lambda w: filter_scan(step, {"w": w, "tag": "t"}, jnp.ones(3)))
    (carry, sums) = run(weights)
    plain = np.arange(8.0, dtype=np.float32)
    expected = jax.lax.scan(lambda c, x: (c * 0.5 + x, c.sum()), plain, np.ones(3))
    report["scan"] = bool(
        np.array_equal(carry["w"], expected[0]) and np.array_equal(sums, expected[1])
        and carry["tag"] == "t" and len(carry["w"].sharding.device_set) == 4
    )

    # unstack_pytree and stack_pytree on an array sharded along its columns.
    grid = np.arange(32.0, dtype=np.float32).reshape(8, 4)
    table = jax.device_put(grid, by_column)
    rows = unstack_pytree({"t": table})
    back = stack_pytree(rows)["t"]
    report["unstack"] = bool(
        len(rows) == 8
        and all(np.array_equal(r["t"], grid[i]) for i, r in enumerate(rows))
        and all(len(r["t"].sharding.device_set) == 4 for r in rows)
        and np.array_equal(back, grid)
    )

    # Callbacks with partitioned=True: one call per shard.
    shapes = []
    if lerax_utils._DEBUG_CALLBACK_TAKES_PARTITIONED:
        record = lambda x, tag: shapes.append((x.shape, tag))
        log = callback_wrapper(record, partitioned=True)
        jax.jit(lambda x: (log(x, "shard"), x)[1])(weights)
        jax.effects_barrier()
        report["partitioned"] = sorted(shapes) == [((2,), "shard")] * 4
    else:
        try:
            callback_wrapper(print, partitioned=True)
        except ValueError:
            report["partitioned"] = True

    # serialize gathers sharded arrays; deserialize loads them back.
    class Sharded(Serializable):
        table: jax.Array
    with tempfile.TemporaryDirectory() as folder:
        Sharded(table).serialize(folder + "/sharded")
        loaded = Sharded.deserialize(folder + "/sharded", jnp.zeros((8, 4)))
    report["serialize"] = bool(np.array_equal(loaded.table, grid))

    # load_pytree: a `like` leaf sharded over the devices is loaded with its
    # sharding; one on a single device, as `jax.device_put` places it.
    with tempfile.TemporaryDirectory() as folder:
        lerax_utils.save_pytree(folder + "/tree", {"t": table, "n": 3})
        tree = lerax_utils.load_pytree(folder + "/tree", {"t": table, "n": 0})
        on_one = jax.device_put(jnp.zeros((8, 4)), jax.devices()[2])
        single = lerax_utils.load_pytree(folder + "/tree", {"t": on_one, "n": 0})
    report["pytree"] = bool(
        np.array_equal(tree["t"], grid) and tree["n"] == 3
        and tree["t"].sharding == table.sharding
        and np.array_equal(single["t"], grid)
        and single["t"].sharding == jax.device_put(grid).sharding
    )
    print(json.dumps(report, sort_keys=True))
    """
)


def test_on_four_cpu_devices():
    """Sharded arrays through every capability, in a process with four devices."""
    report = run_on_four_devices(_FOUR_DEVICES)
    assert report == {
        "partitioned": True,
        "pytree": True,
        "scan": True,
        "serialize": True,
        "unstack": True,
    }


# Loading into shardings


_DTYPES = ["float32", "bfloat16", "int4", "uint8", "bool", "complex64", "float64"]


@st.composite
def shards_of_an_array(draw: st.DrawFn) -> Any:
    """A tensor, a few boxes inside it (as shards are) and a buffer size."""
    name = draw(st.sampled_from([n for n in _DTYPES if hasattr(jnp, n)]))
    dtype = np.dtype(getattr(jnp, name))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    raw = draw(
        st.binary(
            min_size=math_prod(shape) * dtype.itemsize,
            max_size=math_prod(shape) * dtype.itemsize,
        )
    )
    data = np.frombuffer(raw, np.uint8)
    if name == "bool":
        data = data & 1
    elif name == "int4":
        data = data & 7  # Non-negative int4 values: high bits zero.
    array = data.view(dtype).reshape(shape)
    regions = [tuple((0, size) for size in shape)]  # The whole tensor, and boxes.
    for _ in range(draw(st.integers(0, 3))):
        region = []
        for size in shape:
            start = draw(st.integers(0, max(size - 1, 0)))
            region.append((start, draw(st.integers(min(start + 1, size), size))))
        regions.append(tuple(region))
    chunk = draw(st.sampled_from([1, 2, 3, 7, 16, 64, 1 << 20]))
    return array, regions, chunk


def math_prod(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


@settings(max_examples=200)
@given(shards_of_an_array(), st.integers(0, 3))
def test_each_shard_is_read_as_numpy_slices_it(case, padding):
    """Shards streamed through any buffer size are NumPy's slices of the tensor."""
    array, regions, chunk = case
    raw = array.tobytes()
    file = _CountingFile(b"\xff" * padding + raw + b"\xee" * 3)
    entry = {
        "path": ".x",
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "offset": padding,
    }
    source = lerax_utils._Source("f", "load")
    shards = {
        region: np.full([b - a for a, b in region], 0, array.dtype)
        for region in regions
    }
    alone = {region: np.full_like(shard, 0) for region, shard in shards.items()}
    old = lerax_utils._CHUNK_BYTES
    lerax_utils._CHUNK_BYTES = chunk
    try:
        # All at once, checked; then each shard alone, reading only around it.
        crc = lerax_utils._stream_into_shards(file, entry, shards, source)
        assert crc == zlib.crc32(raw)
        for region, shard in alone.items():
            file.count = 0
            lerax_utils._stream_into_shards(
                file, entry, {region: shard}, source, region
            )
            # Only the rows of the shard along the first axis are read.
            if array.ndim:
                row = int(np.prod(array.shape[1:])) * array.dtype.itemsize
                assert file.count <= (region[0][1] - region[0][0]) * row
    finally:
        lerax_utils._CHUNK_BYTES = old
    for region, shard in [*shards.items(), *alone.items()]:
        expected = array[tuple(slice(a, b) for a, b in region)]
        assert shard.shape == expected.shape
        assert shard.tobytes() == expected.tobytes()


class _CountingFile(io.BytesIO):
    """A file in memory that counts the bytes read from it."""

    count = 0

    def readinto(self, buffer: Any) -> int:
        done = super().readinto(buffer)
        self.count += done
        return done


@given(shards_of_an_array(), st.data())
def test_a_flipped_bit_fails_the_streamed_checksum(case, data):
    array, regions, chunk = case
    raw = bytearray(array.tobytes())
    if not raw:
        return
    crc = zlib.crc32(raw)
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= 1 << data.draw(st.integers(0, 7))
    entry = {"path": ".x", "dtype": array.dtype.name, "shape": list(array.shape)}
    entry.update(offset=0, crc=crc)
    source = lerax_utils._Source("f", "load")
    shards = {r: np.zeros([b - a for a, b in r], array.dtype) for r in regions}
    old = lerax_utils._CHUNK_BYTES
    lerax_utils._CHUNK_BYTES = chunk
    try:
        with pytest.raises(ValueError, match=r"'f' (has corrupt|holds invalid) data"):
            file = io.BytesIO(bytes(raw))
            crc = lerax_utils._stream_into_shards(file, entry, shards, source)
            lerax_utils._check_crc(entry, crc, source)
    finally:
        lerax_utils._CHUNK_BYTES = old


class _Small(Serializable):
    w: jax.Array
    n: np.ndarray
    t: float

    def __init__(self):
        self.w = jnp.arange(6.0).reshape(2, 3)
        self.n = np.arange(3)
        self.t = 0.5


def test_one_device_sharding_loads_as_deserialize(tmp_path):
    model = _Small()
    model.serialize(tmp_path / "m")
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    loaded = _Small.deserialize_sharded(tmp_path / "m", sharding)
    assert eqx.tree_equal(loaded, model, typematch=True)
    assert loaded.w.sharding == sharding
    assert type(loaded.n) is np.ndarray


@given(leaves=st.lists(st.one_of(any_array(), any_key()), min_size=1, max_size=4))
def test_a_one_device_sharded_load_is_the_plain_load(tmp_path_factory, leaves):
    path = tmp_path_factory.mktemp("one") / "model"
    model = Checkpointed(leaves, temperature=0.25)
    model.serialize(path)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loaded = Checkpointed.deserialize_sharded(path, sharding, leaves)
    assert_exact(loaded, Checkpointed.deserialize(path, leaves))
    assert_exact(loaded, model)
    for leaf in loaded.params:
        assert not isinstance(leaf, jax.Array) or leaf.sharding == sharding


def test_wrong_sharding_arguments_are_refused(tmp_path):
    _Small().serialize(tmp_path / "m")
    with pytest.raises(
        TypeError,
        match=r"^Serializable.deserialize_sharded: `sharding` must be a "
        r"jax.sharding.Sharding or a callable that maps the skeleton to a pytree "
        r"of them; got str 'x'.$",
    ):
        _Small.deserialize_sharded(tmp_path / "m", cast(Any, "x"))
    with pytest.raises(
        TypeError,
        match=r"^Serializable.deserialize_sharded: `sharding` gave int 3 for the "
        r"array leaf at path .w; give a jax.sharding.Sharding, or None to load it "
        r"unsharded.$",
    ):
        _Small.deserialize_sharded(
            tmp_path / "m", lambda s: jax.tree_util.tree_map(lambda _: 3, s)
        )
    with pytest.raises(
        ValueError,
        match=r"^Serializable.deserialize_sharded: the pytree returned by "
        r"`sharding` does not have the structure of the skeleton",
    ):
        _Small.deserialize_sharded(tmp_path / "m", lambda s: [None])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    spec = jax.sharding.PartitionSpec("d", None, None)  # Three axes; `w` has two.
    sharding = jax.sharding.NamedSharding(mesh, spec)
    with pytest.raises(
        ValueError,
        match=r"^Serializable.deserialize_sharded: the sharding asked for the leaf at "
        r"path .w does not fit its shape \(2, 3\): .+\. Pass a sharding that fits "
        r"it, or None for this leaf.$",
    ):
        _Small.deserialize_sharded(tmp_path / "m", sharding)
    try:  # jax 0.4.26 makes this shape; later versions refuse it themselves.
        like = jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=sharding)
    except ValueError:
        return
    save_pytree(tmp_path / "t", {"w": _Small().w})
    with pytest.raises(
        ValueError,
        match=r"^load_pytree: the sharding asked for the leaf at path \['w'\] does "
        r"not fit its shape \(2, 3\): .+\. Pass a sharding that fits it, or None "
        r"for this leaf.$",
    ):
        load_pytree(tmp_path / "t", {"w": like})


def test_arrays_alike_and_unlike_load_exactly_where_jnp_asarray_puts_them(tmp_path):
    """Many JAX arrays of one shape and dtype, beside others that differ in dtype, weak
    type or size alone, each come back with their own bits, dtype, weak type and
    placement."""
    rng = np.random.default_rng(0)

    def random_bits(dtype: Any, shape: tuple[int, ...]) -> jax.Array:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = rng.integers(0, 256, size, dtype=np.uint8)  # NaNs with payloads too.
        return jnp.asarray(raw.view(dtype).reshape(shape))

    tree = {
        "a": [random_bits(np.float32, (3, 2)) for _ in range(7)],
        "b": [
            random_bits(t, s) for t, s in [(jnp.bfloat16, (3, 2)), (np.float32, (3, 1))]
        ],
        "weak": [jnp.asarray(float(i)) for i in range(3)],
        "strong": [jnp.float32(i) for i in range(3)],  # As "weak" but for the type.
        "empty": [jnp.zeros((2, 0)) for _ in range(3)],
        "alone": random_bits(np.int8, (7,)),
        "large": [jnp.full((1 << 14,), i, jnp.float32) for i in range(2)],
    }
    save_pytree(tmp_path / "t", tree)
    loaded = load_pytree(tmp_path / "t", tree)
    assert_identical(loaded, tree, weak_types=True)
    for array in jax.tree_util.tree_leaves(loaded):
        assert array.sharding == jnp.asarray(np.asarray(array)).sharding


class _Bits(Serializable):
    flags: jax.Array
    small: jax.Array

    def __init__(self):
        self.flags = jnp.array([True, False, True, True])
        self.small = jnp.asarray(np.array([1, -2, 3, -4], dtype=jnp.int4))


@pytest.mark.parametrize(
    ("leaf", "byte", "problem"),
    [
        (".flags", 2, "a boolean byte other than 0 or 1"),
        (".small", 0x13, "a int4 byte whose unused high bits are not zero"),
    ],
)
def test_invalid_bits_with_valid_checksums_are_refused(tmp_path, leaf, byte, problem):
    """A crafted file whose checksums were recomputed still fails the bit checks."""
    _Bits().serialize(tmp_path / "m")
    good = (tmp_path / "m.eqx").read_bytes()
    length = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + length])
    start = 8 + length + header[leaf]["data_offsets"][0]
    bad = bytearray(good)
    bad[start + 1] = byte
    data_at = 8 + length

    def crc(name: str) -> str:
        first, last = header[name]["data_offsets"]
        return f"{zlib.crc32(bad[data_at + first : data_at + last]):08x}"

    crcs = crc(".flags") + crc(".small")

    def edit(leaves: Any, structure: Any, header: Any) -> None:
        header["__metadata__"]["crc32"] = crcs

    (tmp_path / "bad.eqx").write_bytes(forge(bytes(bad), edit))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError) as info:
        _Bits.deserialize_sharded(tmp_path / "bad", sharding)
    assert str(info.value) == (
        f"Serializable.deserialize: the file '{tmp_path / 'bad.eqx'}' holds invalid "
        f"data for the leaf at path {leaf}: {problem}."
    )


def test_a_callable_gets_the_skeleton_and_none_loads_unsharded(tmp_path):
    model = _Small()
    model.serialize(tmp_path / "m")
    seen = []

    def choose(skeleton: Any) -> Any:
        seen.append(skeleton)
        return jax.tree_util.tree_map(lambda _: None, skeleton)

    loaded = _Small.deserialize_sharded(tmp_path / "m", choose)
    assert eqx.tree_equal(loaded, model, typematch=True)
    (skeleton,) = seen
    assert isinstance(skeleton.w, jax.ShapeDtypeStruct)
    assert (skeleton.w.shape, skeleton.w.dtype) == ((2, 3), jnp.float32)


_FOUR = textwrap.dedent(
    r"""
    import json, pathlib, sys, tempfile
    import equinox as eqx, jax, jax.numpy as jnp, numpy as np
    import lerax_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lerax_utils import Serializable

    class Model(Serializable):
        w: jax.Array
        h: jax.Array
        q: jax.Array
        flags: jax.Array
        c: jax.Array
        keys: jax.Array
        scale: jax.Array
        table: np.ndarray
        rate: float

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.w = jax.random.normal(k1, (8, 12))
            self.h = jax.random.normal(k2, (4, 8, 6)).astype(jnp.bfloat16)
            self.q = jnp.asarray(
                (np.arange(96) % 16 - 8).astype(jnp.int4).reshape(8, 12)
            )
            self.flags = jax.random.bernoulli(k3, 0.5, (8, 4))
            self.c = jnp.asarray(np.arange(16.0) + 1j).astype(jnp.complex64)
            self.keys = jax.random.split(key, 8)
            self.scale = jnp.asarray(2.0)
            self.table = np.arange(5, dtype=np.int16)
            self.rate = 0.1

    def host_bytes(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return [np.asarray(s.data).tobytes() for s in x.addressable_shards]

    def check(loaded, reference, wanted):
        def others(tree):
            return jax.tree_util.tree_map(
                lambda a: 0 if isinstance(a, jax.Array) else a, tree
            )

        ok = eqx.tree_equal(others(loaded), others(reference), typematch=True)
        if not ok:
            return "non-array leaves differ"
        for (path, a), b, want in zip(
            jax.tree_util.tree_flatten_with_path(loaded)[0],
            jax.tree_util.tree_leaves(reference),
            jax.tree_util.tree_leaves(wanted, is_leaf=lambda x: x is None),
        ):
            name = jax.tree_util.keystr(path)
            if not isinstance(a, jax.Array):
                continue
            avals = [(x.shape, x.dtype, x.aval.weak_type) for x in (a, b)]
            if avals[0] != avals[1]:
                return f"{name}: aval {a.aval} != {b.aval}"
            want = want if want is not None else b.sharding
            is_key = jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
            same = (
                a.sharding.is_equivalent_to(want, a.ndim) if is_key
                else a.sharding == want
            )
            if not same:
                return f"{name}: sharding {a.sharding} != {want}"
            data = jax.random.key_data(b) if is_key else b
            whole = np.asarray(data)
            for shard in (jax.random.key_data(a) if is_key else a).addressable_shards:
                if np.asarray(shard.data).tobytes() != whole[shard.index].tobytes():
                    return f"{name}: shard {shard.index} on {shard.device} differs"
        return "ok"

    folder = pathlib.Path(tempfile.mkdtemp())
    model = Model(jax.random.key(0))
    model.serialize(folder / "m")
    reference = Model.deserialize(folder / "m", jax.random.key(1))
    devices = np.array(jax.devices())
    line = Mesh(devices, ("x",))
    grid = Mesh(devices.reshape(2, 2), ("a", "b"))

    def by_rank(mesh, specs):
        def choose(skeleton):
            return jax.tree_util.tree_map(
                lambda s: None if specs.get(getattr(s, "ndim", None)) is None
                else NamedSharding(mesh, specs[s.ndim]),
                skeleton,
            )
        return choose

    cases = {
        "line, axis 0": by_rank(line, {1: P("x"), 2: P("x"), 3: P("x")}),
        "line, axis 1": by_rank(line, {1: P("x"), 2: P(None, "x"), 3: P(None, "x")}),
        "line, last axis": by_rank(line, {1: P("x"), 2: P(None, "x")}),
        "grid, both axes": by_rank(
            grid, {1: P("a"), 2: P("a", "b"), 3: P("b", "a")}
        ),
        "grid, swapped": by_rank(
            grid, {1: P("b"), 2: P("b", "a"), 3: P(None, "a", "b")}
        ),
        "grid, one axis of two": by_rank(
            grid, {1: P(("a", "b")), 2: P(None, ("b", "a"))}
        ),
        "grid, replicated on one": by_rank(grid, {2: P("a"), 3: P(None, None, "b")}),
        "replicated, one sharding": NamedSharding(grid, P()),
        "one device, one sharding": jax.sharding.SingleDeviceSharding(jax.devices()[2]),
    }
    report = {}
    for chunk in (lerax_utils._CHUNK_BYTES, 5):
        lerax_utils._CHUNK_BYTES = chunk
        for name, sharding in cases.items():
            key = jax.random.key(1)
            loaded = Model.deserialize_sharded(folder / "m", sharding, key)
            if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
                skeleton = eqx.filter_eval_shape(Model, jax.random.key(1))
                wanted = sharding(skeleton)
            else:
                wanted = jax.tree_util.tree_map(
                    lambda leaf: sharding if isinstance(leaf, jax.Array) else None,
                    reference,
                )
            report[f"{name} ({chunk})"] = check(loaded, reference, wanted)

    # Random shapes, dtypes and specs against NumPy.
    class Leaf(Serializable):
        x: jax.Array

        def __init__(self, x):
            self.x = jnp.asarray(x)

    rng = np.random.default_rng(int(sys.argv[1]))
    names = ["float32", "bfloat16", "int8", "uint32", "float16", "int4", "bool"]
    randoms = []
    for _ in range(12):
        rank = int(rng.integers(1, 4))
        mesh = [line, grid][int(rng.integers(2))]
        axes = list(mesh.axis_names) + [None] * 2
        spec, shape, used = [], [], set()
        for _ in range(rank):
            axis = axes[int(rng.integers(len(axes)))]
            if axis in used:
                axis = None
            used.add(axis)
            factor = 1 if axis is None else mesh.shape[axis]
            spec.append(axis)
            shape.append(factor * int(rng.integers(1, 4)))
        dtype = np.dtype(getattr(jnp, names[int(rng.integers(len(names)))]))
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize)
        raw = raw.astype(np.uint8)
        if dtype == np.bool_:
            raw &= 1
        if dtype.name == "int4":
            raw &= 7
        value = raw.view(dtype).reshape(shape)

        Leaf(value).serialize(folder / "r")
        sharding = NamedSharding(mesh, P(*spec))
        for chunk in (3, 1 << 20):
            lerax_utils._CHUNK_BYTES = chunk
            loaded = Leaf.deserialize_sharded(folder / "r", sharding, value)
            good = loaded.x.sharding == sharding and loaded.x.dtype == dtype and all(
                np.asarray(s.data).tobytes() == value[s.index].tobytes()
                for s in loaded.x.addressable_shards
            )
            randoms.append([str(dtype), shape, str(P(*spec)), bool(good)])
    report["random"] = randoms

    # Corruption is still detected, in the bytes of a sharded leaf.
    lerax_utils._CHUNK_BYTES = 64
    layout = json.loads(
        (folder / "m.eqx").read_bytes()[8 : 8 + int.from_bytes(
            (folder / "m.eqx").read_bytes()[:8], "little")]
    )
    start = 8 + int.from_bytes((folder / "m.eqx").read_bytes()[:8], "little")
    errors = {}
    for name, at in (("w", 200), ("flags", 17), ("q", 50)):
        data = bytearray((folder / "m.eqx").read_bytes())
        data[start + layout["." + name]["data_offsets"][0] + at] ^= 0x12
        (folder / "bad.eqx").write_bytes(bytes(data))
        try:
            Model.deserialize_sharded(
                folder / "bad", by_rank(grid, {2: P("a", "b"), 3: P("a")}),
                jax.random.key(1),
            )
            errors[name] = "loaded"
        except ValueError as err:
            errors[name] = str(err)
    report["corrupt"] = errors
    try:
        Model.deserialize_sharded(
            folder / "m", by_rank(line, {2: P(None, "x"), 3: P(None, None, "x")}),
            jax.random.key(1),
        )
        report["indivisible"] = "loaded"
    except ValueError as err:
        report["indivisible"] = str(err)
    weak = jax.device_put(jnp.full((8,), 2.0), NamedSharding(line, P("x")))
    lerax_utils.save_pytree(folder / "weak", {"w": weak})
    report["weak"] = [
        lerax_utils.load_pytree(folder / "weak", {"w": like})["w"].weak_type
        for like in (weak, jnp.asarray(weak, jnp.float32))
    ]
    # Where `jax.default_device` names a device, leaves load onto it, uncommitted.
    small = {"w": jnp.ones(3), "n": jnp.arange(4), "s": jnp.asarray(2.0)}
    lerax_utils.save_pytree(folder / "small", small)
    report["placed"] = {}
    for label, device in (("any", None), ("third", jax.devices()[2])):
        with jax.default_device(device):
            loaded = lerax_utils.load_pytree(folder / "small", small)
            made = {k: jnp.asarray(np.asarray(v)) for k, v in small.items()}
        report["placed"][label] = [
            [str(loaded[k].sharding), lerax_utils._is_committed(loaded[k])]
            == [str(made[k].sharding), lerax_utils._is_committed(made[k])]
            for k in small
        ]
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def four_devices() -> dict[str, Any]:
    return run_on_four_devices(_FOUR, "0", timeout=240)


def test_plain_loads_place_leaves_on_the_default_device(four_devices):
    assert four_devices["placed"] == {"any": [True] * 3, "third": [True] * 3}


def test_a_sharded_like_decides_the_weak_type(four_devices):
    # Its own arrays tell it, even where `jax.ShapeDtypeStruct` has no weak type.
    assert four_devices["weak"] == [True, False]


_CASES = [
    "line, axis 0",
    "line, axis 1",
    "line, last axis",
    "grid, both axes",
    "grid, swapped",
    "grid, one axis of two",
    "grid, replicated on one",
    "replicated, one sharding",
    "one device, one sharding",
]


@pytest.mark.parametrize("case", _CASES)
def test_sharded_loads_equal_unsharded_loads_bit_for_bit(four_devices, case):
    """Each array has the sharding asked for and each shard the file's bytes."""
    chunks = [key for key in four_devices if key.startswith(case + " (")]
    assert len(chunks) == 2
    for key in chunks:
        assert four_devices[key] == "ok", key


def test_random_shapes_dtypes_and_specs_load_exactly(four_devices):
    randoms = four_devices["random"]
    assert len(randoms) == 24
    assert [case for case in randoms if not case[-1]] == []


def test_corrupt_shards_are_refused(four_devices):
    errors = four_devices["corrupt"]
    source = "' has corrupt data for the leaf at path "
    assert source + ".w (its checksum fails)." in errors["w"]
    assert errors["flags"].endswith(
        "holds invalid data for the leaf at path .flags: a boolean byte other than "
        "0 or 1."
    ) or errors["flags"].endswith(source + ".flags (its checksum fails).")
    assert errors["q"].endswith(
        "holds invalid data for the leaf at path .q: a int4 byte whose unused high "
        "bits are not zero."
    ) or errors["q"].endswith(source + ".q (its checksum fails).")
    for message in errors.values():
        assert message.startswith("Serializable.deserialize: the file '")


def test_a_sharding_that_does_not_divide_a_shape_is_refused(four_devices):
    message = four_devices["indivisible"]
    assert message.startswith(
        "Serializable.deserialize: the sharding asked for the leaf at path "
    )
    assert "does not fit its shape (" in message
    assert message.endswith("Pass a sharding that fits it, or None for this leaf.")


def test_the_report_is_json(four_devices):
    assert json.loads(json.dumps(four_devices)) == four_devices
    assert pathlib.Path(lerax_utils.__file__).name == "lerax_utils.py"


# Several processes (`jax.distributed`)


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


def _two_processes(
    script: str, folder: str, timeout: float
) -> list[tuple[int, str, str]]:
    """Run `script` as processes 0 and 1 of a `jax.distributed` pair; each one's
    return code, stdout and stderr. Both are killed if they outlast `timeout`."""
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
                *(sys.executable, "-c", script),
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
    return [
        (process.returncode, out, err)
        for process, (out, err) in zip(processes, outputs, strict=True)
    ]


def _run_two_processes(folder: str, timeout: float = 240) -> list[dict[str, Any]]:
    """The two processes' reports; each must succeed."""
    reports = []
    for code, out, err in _two_processes(_WORKER, folder, timeout):
        assert code == 0, err[-5000:]
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
        "paths or models (structure, shapes, dtypes, static values, Python numbers or "
        "arrays that do not span processes). Every process must save the same model "
        "to the same path."
    )
    for case in ("different", "different_host_values"):
        assert [report[case] for report in two_processes] == [message, message]


def test_different_paths_are_refused_in_every_process(two_processes):
    message = (
        "raised ValueError: save_pytree: the processes passed different paths or trees "
        "(structure, shapes, dtypes, static values, Python numbers or arrays that do "
        "not span processes). Every process must save the same tree to the same path."
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


#
# What a mutation campaign planted and the tests above missed: sub-byte junk bits, a
# streamed checksum that restarts, trailing bytes, static floats JSON cannot hold,
# empty bool leaves, and crafted entries, recordings and sharded loads.
#


def _one_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


# 1. Sub-byte dtypes: a byte whose unused high bits are set is no value.

_SUB_BYTE_JUNK = [
    (name, junk)
    for name, junk in [
        ("int4", 0x71),
        ("uint4", 0x10),
        ("int2", 0x05),
        ("uint2", 0x04),
        ("float4_e2m1fn", 0xF0),
    ]
    if hasattr(jnp, name)
]


@pytest.mark.parametrize("sharded", [False, True], ids=["whole", "sharded"])
@pytest.mark.parametrize(
    ("name", "junk"), _SUB_BYTE_JUNK, ids=[n for n, _ in _SUB_BYTE_JUNK]
)
def test_sub_byte_bytes_with_high_bits_set_are_refused_on_every_read_path(
    tmp_path, name, junk, sharded
):
    # From NumPy: jax 0.4.26 cannot broadcast a 4-bit zero.
    leaf = jnp.asarray(np.zeros(3, np.uint8).view(getattr(jnp, name)))
    Checkpointed([leaf]).serialize(tmp_path / "good")
    good = (tmp_path / "good.eqx").read_bytes()

    def edit(data: bytearray) -> None:
        data[1] = junk

    path = bad_file(tmp_path, _with_data(good, edit))
    expected = (
        f"Serializable.deserialize: the file "
        f"'{path}' holds invalid data for the leaf at path .params[0]: a {name} "
        "byte whose unused high bits are not zero."
    )
    with pytest.raises(ValueError) as info:
        if sharded:
            Checkpointed.deserialize_sharded(path, _one_device(), [leaf])
        else:
            Checkpointed.deserialize(path, [leaf])
    assert str(info.value) == expected


@pytest.mark.parametrize(
    ("name", "junk"), _SUB_BYTE_JUNK, ids=[n for n, _ in _SUB_BYTE_JUNK]
)
def test_every_value_of_a_sub_byte_dtype_loads_exactly(tmp_path, name, junk):
    dtype = getattr(jnp, name)
    count = 4 if name.endswith("2") else 16
    every = np.arange(count, dtype=np.uint8).view(dtype)  # Each bit pattern once.
    tree = [every, jnp.asarray(every)]
    save_pytree(tmp_path / "all", tree)
    assert_exact(load_pytree(tmp_path / "all", tree)[0], every)
    loaded = load_pytree(tmp_path / "all", tree)[1]
    assert np.asarray(loaded).tobytes() == every.tobytes()


# 2. A streamed checksum covers the whole tensor, however many buffers it takes.


@pytest.mark.parametrize("shape", [(40,), (3, 7), (5, 1, 4), ()])
def test_a_sharded_load_through_a_small_buffer_checks_the_whole_tensor(
    tmp_path, monkeypatch, shape
):
    """`lerax_utils._CHUNK_BYTES`, the streaming buffer's size, is lowered so that
    small tensors stream in many pieces."""
    monkeypatch.setattr(lerax_utils, "_CHUNK_BYTES", 8)
    value = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) - 7.5
    tree = {"w": jnp.asarray(value), "b": jnp.asarray(value > 0)}
    save_pytree(tmp_path / "t", tree)
    sharding = _one_device()
    like = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )
    loaded = load_pytree(tmp_path / "t", like)
    assert_exact(jax.tree_util.tree_map(np.asarray, loaded), jax.device_get(tree))


def test_an_array_over_the_16_mib_buffer_loads_sharded(tmp_path):
    count = 16 * 1024 * 1024 // 4 + 1000  # Two buffers' worth of float32s.
    value = np.arange(count, dtype=np.uint32).view(np.float32)
    save_pytree(tmp_path / "big", jnp.asarray(value))
    sharding = _one_device()
    like = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    loaded = load_pytree(tmp_path / "big", like)
    assert loaded.sharding == sharding
    assert np.asarray(loaded).tobytes() == value.tobytes()


# 3. A plain Equinox file ends where its data does.


@pytest.mark.parametrize("extra", [b"\x00", b"junk" * 10])
def test_a_plain_equinox_file_with_trailing_bytes_is_refused(tmp_path, extra):
    tree = {"w": jnp.arange(3.0), "n": jnp.arange(2, dtype=jnp.int16)}
    model = Checkpointed(tree)
    for name, saved in [("tree", tree), ("model", model)]:
        eqx.tree_serialise_leaves(tmp_path / f"{name}.eqx", saved)
        raw = (tmp_path / f"{name}.eqx").read_bytes()
        (tmp_path / f"{name}_long.eqx").write_bytes(raw + extra)
    assert_exact(load_pytree(tmp_path / "tree", tree), tree)
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "tree_long", tree)
    assert str(info.value) == (
        f"load_pytree: the file '{tmp_path / 'tree_long.eqx'}' has {len(extra)} "
        "trailing bytes after its Equinox data."
    )
    assert_exact(Checkpointed.deserialize(tmp_path / "model", tree).params, tree)
    assert load_error(tmp_path / "model_long", tree, cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{tmp_path / 'model_long.eqx'}' has "
        f"{len(extra)} trailing bytes after its Equinox data."
    )


# 4. A skeleton with a static leaf more than the file, at the end.


@pytest.mark.parametrize(
    ("saved", "like", "where"),
    [
        ([jnp.ones(2), "a"], [jnp.ones(2), "a", "b"], "[2]"),
        ({"x": [jnp.ones(2), ("s",)]}, {"x": [jnp.ones(2), ("s", "t")]}, "['x'][1][1]"),
        ([jnp.ones(2)], [jnp.ones(2), None, "b"], "[1]"),
    ],
)
def test_a_skeleton_with_an_extra_static_leaf_at_the_end_is_refused(
    tmp_path, saved, like, where
):
    save_pytree(tmp_path / "t", saved)
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "t", like)
    assert str(info.value) == (
        f"load_pytree: the file '{tmp_path / 't.eqx'}' does not match `like` at path "
        f"{where}: only `like` has a node here. Pass a `like` with the structure, "
        "shapes and dtypes of the saved tree."
    )
    with pytest.raises(ValueError, match="only the file has a node here"):
        save_pytree(tmp_path / "u", like)
        load_pytree(tmp_path / "u", saved)


@pytest.mark.parametrize("extra", [5, [], "x"])
def test_a_malformed_structure_entry_past_the_skeletons_is_refused(tmp_path, extra):
    save_pytree(tmp_path / "t", [jnp.ones(2)])
    good = (tmp_path / "t.eqx").read_bytes()
    path = bad_file(
        tmp_path, forge(good, lambda _, structure, __: structure.append(extra))
    )
    with pytest.raises(ValueError) as info:
        load_pytree(path, [jnp.ones(2)])
    assert str(info.value) == (
        f"load_pytree: the file '{path}' does not match `like` at the top level: only "
        "the file has a node here. Pass a `like` with the structure, shapes and dtypes "
        "of the saved tree."
    )


# 5. Static floats: inf, nan and -0.0 save a file that loads, compared by their bits.


class _Scaled(eqx.Module):
    weight: jax.Array
    scale: Any = eqx.field(static=True)


_STATIC_FLOATS = [
    float("inf"),
    float("-inf"),
    float("nan"),
    _float(0x7FF8000000000123),  # A NaN with a payload.
    -0.0,
    0.0,
    1e-310,
]


@pytest.mark.parametrize("scale", _STATIC_FLOATS + [(float("nan"), [-0.0])])
def test_static_floats_of_every_kind_save_and_load(tmp_path, scale):
    model = _Scaled(jnp.ones(2), scale)
    save_pytree(tmp_path / "m", model)
    loaded = load_pytree(tmp_path / "m", model)
    assert loaded.scale is scale
    assert_exact(loaded.weight, model.weight)


@pytest.mark.parametrize(
    ("saved", "other"),
    [(0.0, -0.0), (float("nan"), _float(0x7FF8000000000123)), (float("inf"), 1e308)],
)
def test_static_floats_that_differ_in_their_bits_are_refused(tmp_path, saved, other):
    save_pytree(tmp_path / "m", _Scaled(jnp.ones(2), saved))
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "m", _Scaled(jnp.ones(2), other))
    assert str(info.value).startswith(
        f"load_pytree: the file '{tmp_path / 'm.eqx'}' does not match `like` at path "
        f".scale: the static field is ['float', "
    )


@pytest.mark.parametrize(
    ("saved", "other"),
    [
        (frozenset({1, "a", None}), frozenset({1, "b", None})),
        ({1, "a", (2.5, 3)}, {1, "a", (2.5, 4)}),
        ({"a": 1, "b": None}, {"b": None, "a": 2}),
        (bytearray(b"ab"), bytearray(b"cd")),  # Bytes, by value too.
        (b"ab", b"ac"),
    ],
)
def test_static_collections_of_mixed_types_save_and_are_compared(
    tmp_path, saved, other
):
    save_pytree(tmp_path / "m", _Scaled(jnp.ones(2), saved))
    assert load_pytree(tmp_path / "m", _Scaled(jnp.ones(2), saved)).scale == saved
    with pytest.raises(ValueError, match=r"at path \.scale: the static field is \["):
        load_pytree(tmp_path / "m", _Scaled(jnp.ones(2), other))


# 6. Empty arrays, of bool and every other dtype, on every read path.

_EMPTY_DTYPES = [
    name
    for name in [
        "bool",
        "uint8",
        "int4",
        "uint4",
        "int2",
        "uint2",
        "float4_e2m1fn",
        "float8_e4m3fn",
        "bfloat16",
        "complex64",
    ]
    if hasattr(jnp, name)
]


@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 3, 1)])
@pytest.mark.parametrize("name", _EMPTY_DTYPES)
def test_empty_arrays_of_every_dtype_round_trip(tmp_path, name, shape):
    empty = np.zeros(shape, getattr(jnp, name))
    tree = {"numpy": empty, "jax": jnp.asarray(empty), "full": jnp.ones(2, bool)}
    save_pytree(tmp_path / "e", tree)
    loaded = load_pytree(tmp_path / "e", tree)
    assert_exact(loaded["numpy"], empty)
    sharding = _one_device()
    like = dict(tree, jax=jax.ShapeDtypeStruct(shape, empty.dtype, sharding=sharding))
    for got in [loaded["jax"], load_pytree(tmp_path / "e", like)["jax"]]:
        assert isinstance(got, jax.Array)
        assert (got.shape, got.dtype) == (shape, empty.dtype)


# 7. `functools.partial`s compare by function, every argument, and their count.


def _f(*args: Any) -> Any:
    return args


@pytest.mark.parametrize(
    ("first", "second"),
    [((1,), (1, 2)), ((1, 2), (1,)), ((), (0,))],
)
def test_partials_of_different_lengths_differ_in_filter_cond_and_filter_scan(
    first, second
):
    one, other = functools.partial(_f, *first), functools.partial(_f, *second)
    disagree = "^filter_cond: the branches' outputs disagree at path \\[1\\]"
    with pytest.raises(ValueError, match=disagree):
        filter_cond(
            jnp.array(True), lambda: (jnp.ones(1), one), lambda: (jnp.zeros(1), other)
        )
    with pytest.raises(ValueError, match="^filter_scan: `f` returned a carry that"):
        filter_scan(lambda c, x: (other, None), one, None, length=1)
    same = functools.partial(_f, *first)
    carry = filter_scan(lambda c, x: (same, None), one, None, length=1)[0]
    assert (carry.func, carry.args, carry.keywords) == (_f, first, {})


@pytest.mark.parametrize(
    ("saved", "other"),
    [
        (functools.partial(_f, 1), functools.partial(_f, 1, 2)),
        (functools.partial(_f, 1), functools.partial(_f, 2)),
        (
            functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
            functools.partial(jax.nn.leaky_relu, negative_slope=0.01),
        ),
        (functools.partial(_f, 1), functools.partial(jnp.tanh, 1)),
        (slice(0, 2), slice(0, 3)),
        (slice(0, 2), slice(0, 2, 1)),
        (range(3), range(4)),
        (range(3), slice(0, 3)),
        (b"ab", b"ac"),
        (b"ab", bytearray(b"ab")),
    ],
)
def test_static_values_are_compared_by_their_parts(tmp_path, saved, other):
    save_pytree(tmp_path / "p", _Scaled(jnp.ones(2), saved))
    assert load_pytree(tmp_path / "p", _Scaled(jnp.ones(2), saved)).scale is saved
    with pytest.raises(ValueError, match="does not match `like` at path .scale"):
        load_pytree(tmp_path / "p", _Scaled(jnp.ones(2), other))


# Found by a blind mutation campaign on the checkpoint section: bugs that no test
# caught. Each test below fails with one of them planted.


@pytest.mark.parametrize(
    ("saved", "other"),
    [
        (np.array(["ab", "cd"]), np.array(["abc", "d"])),
        (np.array([b"ab"]), np.array(["ab"])),
        (np.array([1], "datetime64[D]"), np.array([1], "datetime64[s]")),
        (np.array([1], ">i4"), np.array([1], ">i8")),
    ],
)
def test_numpy_only_arrays_of_another_dtype_are_refused(tmp_path, saved, other):
    save_pytree(tmp_path / "n", {"a": saved})
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "n", {"a": other})
    assert str(info.value) == (
        f"load_pytree: the file '{tmp_path / 'n.eqx'}' holds at path ['a'] an array "
        f"of shape {saved.shape} and dtype {saved.dtype}, but `like` has shape "
        f"{other.shape} and dtype {other.dtype}. Pass a `like` with the "
        "structure, shapes and dtypes of the saved tree."
    )


class _NumpyTagged(eqx.Module):
    weight: jax.Array
    tag: Any = eqx.field(static=True)


@pytest.mark.parametrize(
    ("saved", "other"),
    [
        (np.float32(0), np.int32(0)),
        (np.uint8(1), np.int8(1)),
        (np.float16(1), np.float16(2)),
        (np.str_("relu"), np.str_("tanh")),  # Scalars of dtypes that JAX lacks.
        (np.bytes_(b"v1"), np.bytes_(b"v2")),
        (np.datetime64("2026-01-01"), np.datetime64("2026-01-02")),
    ],
)
@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
def test_static_numpy_values_are_compared_by_dtype_and_bytes(tmp_path, saved, other):
    save_pytree(tmp_path / "m", _NumpyTagged(jnp.ones(2), saved))
    assert load_pytree(tmp_path / "m", _NumpyTagged(jnp.ones(2), saved)).tag is saved
    with pytest.raises(ValueError, match=r"at path \.tag: the static field is "):
        load_pytree(tmp_path / "m", _NumpyTagged(jnp.ones(2), other))


class _Counted(eqx.Module):
    weight: jax.Array
    count: int = eqx.field(static=True)


@pytest.mark.parametrize("sign", [1, -1])
# The most digits Python writes as text (4300), one more, and many more.
@pytest.mark.parametrize(
    "size", [10**4300 - 1, 10**4300, 10**5000], ids=["4300", "4301", "5001"]
)
def test_huge_static_ints_of_either_sign_save_and_are_compared(tmp_path, sign, size):
    big = sign * size
    save_pytree(tmp_path / "m", _Counted(jnp.ones(2), big))
    assert load_pytree(tmp_path / "m", _Counted(jnp.ones(2), big)).count == big
    with pytest.raises(ValueError, match=r"at path \.count: the static field is "):
        load_pytree(tmp_path / "m", _Counted(jnp.ones(2), big - 1))


class _Labelled(Serializable):
    weight: jax.Array
    label: str = eqx.field(static=True)

    def __init__(self, label):
        self.weight = jnp.ones(2)
        self.label = label


def test_a_file_that_records_one_model_twice_is_refused(tmp_path):
    _Labelled("a").serialize(tmp_path / "good")
    good = (tmp_path / "good.eqx").read_bytes()
    recording = {"class": "_Labelled", "args": ["a"], "kwargs": []}
    assert _Labelled.deserialize(tmp_path / "good").label == "a"

    def edit(leaves: Any, structure: Any, header: Any) -> None:
        twice = [["", recording], ["", dict(recording, args=["b"])]]
        header["__metadata__"]["arguments"] = json.dumps(twice)

    path = bad_file(tmp_path, forge(good, edit))
    with pytest.raises(ValueError) as info:
        _Labelled.deserialize(path)
    assert str(info.value) == (
        f"Serializable.deserialize: the file '{path}' has a malformed header (its "
        "recorded arguments)."
    )


def test_a_string_argument_too_long_to_record_is_named_when_loading(tmp_path):
    long = "x" * (1 << 16)
    _Labelled(long).serialize(tmp_path / "m")
    with pytest.raises(TypeError) as info:
        _Labelled.deserialize(tmp_path / "m")
    assert str(info.value) == (
        f"Serializable.deserialize: the file '{tmp_path / 'm.eqx'}' could not record "
        "the argument `label` (it was a value too large or too deeply nested to "
        "record) of _Labelled. Pass the constructor arguments: "
        "`_Labelled.deserialize(path, *args, **kwargs)`."
    )
    assert _Labelled.deserialize(tmp_path / "m", long).label == long
    longest = long[1:]  # The string, counted as one value and its characters.
    _Labelled(longest).serialize(tmp_path / "s")
    assert _Labelled.deserialize(tmp_path / "s").label == longest


def _in_lists(depth: int, inner: Any) -> Any:
    for _ in range(depth):
        inner = [inner]
    return inner


def test_arguments_nested_32_deep_are_recorded_and_one_deeper_are_named(tmp_path):
    _Labelled(_in_lists(32, 0.5)).serialize(tmp_path / "m")  # A tagged float inside.
    assert _Labelled.deserialize(tmp_path / "m").label == _in_lists(32, 0.5)
    deeper = _in_lists(33, 0)
    _Labelled(deeper).serialize(tmp_path / "m")
    with pytest.raises(TypeError, match="too large or too deeply nested"):
        _Labelled.deserialize(tmp_path / "m")
    assert _Labelled.deserialize(tmp_path / "m", deeper).label == deeper


@pytest.mark.parametrize("other", [1, "0", None])
def test_a_static_value_nested_32_deep_is_compared_to_its_innermost_item(
    tmp_path, other
):
    _Labelled(_in_lists(32, 0)).serialize(tmp_path / "m")
    with pytest.raises(ValueError, match="Pass the constructor arguments the model"):
        _Labelled.deserialize(tmp_path / "m", _in_lists(32, other))


def test_a_module_description_with_another_key_is_refused(tmp_path):
    save_pytree(tmp_path / "good", _Scaled(jnp.ones(2), 0.5))
    good = (tmp_path / "good.eqx").read_bytes()

    def edit(leaves: Any, structure: Any, header: Any) -> None:
        structure[0][1]["extra"] = 1

    path = bad_file(tmp_path, forge(good, edit))
    with pytest.raises(ValueError) as info:
        load_pytree(path, _Scaled(jnp.ones(2), 0.5))
    assert str(info.value).startswith(
        f"load_pytree: the file '{path}' does not match `like` at the top level: the "
        "file has {"
    )


def _small(tmp_path: Any) -> bytes:
    model = Checkpointed({"k": jax.random.key(0), "n": 3, "w": jnp.arange(4.0)})
    model.serialize(tmp_path / "small")
    return (tmp_path / "small.eqx").read_bytes()


_SMALL = {"k": jax.random.key(1), "n": 0, "w": jnp.zeros(4)}


def _tensor(path: str, **change: Any) -> Any:
    def edit(leaves: Any, structure: Any, header: Any) -> None:
        header[path].update(change)

    return edit


def _entry(index: int, **change: Any) -> Any:
    def edit(leaves: Any, structure: Any, header: Any) -> None:
        leaves[index].update(change)

    return edit


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            _tensor(".params['w']", dtype="I32"),
            "has a malformed header: the tensor table's entry for the leaf at path "
            ".params['w'] is not "
            '{"dtype":"F32","shape":[4],"data_offsets":[8,24]}.',
        ),
        (
            _tensor(".params['w']", shape=[2, 2]),
            "has a malformed header: the tensor table's entry for the leaf at path "
            ".params['w'] is not ",
        ),
        (_entry(2, kind="numpy_scalar"), "has a malformed header (the leaf at path "),
        (_entry(2, kind="numpy", weak_type=True), "has a malformed header (the leaf "),
        (_entry(0, dtype="int32"), "has a malformed header (the leaf at path "),
        (_entry(2, shape=[-4]), "has a malformed header (the leaf at path "),
    ],
    ids=["table dtype", "table shape", "scalar shape", "weak numpy", "key dtype", "-4"],
)
def test_a_crafted_entry_is_refused_as_malformed(tmp_path, edit, problem):
    path = bad_file(tmp_path, forge(_small(tmp_path), edit))
    assert load_error(path, _SMALL, cls=Checkpointed).startswith(
        f"Serializable.deserialize: the file '{path}' {problem}"
    )


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_header_with_a_json_constant_is_unreadable(tmp_path, constant):
    def edit(leaves: Any, structure: Any, header: Any) -> None:
        text = json.dumps(leaves).replace('"value": 3', f'"value": {constant}')
        header["__metadata__"]["leaves"] = text

    path = bad_file(tmp_path, forge(_small(tmp_path), edit))
    assert load_error(path, _SMALL, cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' has an unreadable header "
        f"({constant} is not allowed in a checkpoint header)."
    )


_PLAIN_FILE_SHARDED = r"""
import json, pathlib, sys
import equinox as eqx, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lerax_utils import load_pytree

folder = pathlib.Path(sys.argv[1])
tree = {"w": jnp.arange(8.0), "n": jnp.arange(4)}
eqx.tree_serialise_leaves(folder / "plain.eqx", tree)
rows = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P("x"))
like = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=rows), "n": tree["n"]}
loaded = load_pytree(folder / "plain", like)
print(json.dumps([
    loaded["w"].sharding == rows,
    np.asarray(loaded["w"]).tolist() == list(range(8)),
    np.asarray(loaded["n"]).tolist() == list(range(4)),
]))
"""


def test_a_plain_equinox_file_loads_into_the_shardings_asked_for(tmp_path):
    assert run_on_four_devices(_PLAIN_FILE_SHARDED, str(tmp_path)) == [True] * 3


@pytest.mark.parametrize("shape", [(6,), ()])
def test_a_corrupt_array_loaded_onto_one_device_fails_its_checksum(tmp_path, shape):
    tree = {"w": jnp.arange(float(np.prod(shape))).reshape(shape)}
    save_pytree(tmp_path / "t", tree)
    raw = bytearray((tmp_path / "t.eqx").read_bytes())
    raw[-1] ^= 0x40  # The last byte of the only array.
    path = bad_file(tmp_path, bytes(raw))
    like = {"w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=_one_device())}
    with pytest.raises(ValueError) as info:
        load_pytree(path, like)
    assert str(info.value) == (
        f"load_pytree: the file '{path}' has corrupt data for the leaf at path "
        "['w'] (its checksum fails)."
    )


def _model_class(with_b: bool) -> Any:
    class Model(eqx.Module):  # One qualified name, with a static field or without.
        x: jax.Array
        a: int = eqx.field(static=True)
        if with_b:
            b: str = eqx.field(static=True, default="new")

    return Model


@pytest.mark.parametrize("saved_with_b", [False, True])
def test_a_class_that_gained_or_lost_a_static_field_still_loads(tmp_path, saved_with_b):
    saved = _model_class(saved_with_b)(jnp.arange(2.0), 1)
    save_pytree(tmp_path / "m", saved)
    like = _model_class(not saved_with_b)(jnp.zeros(2), 1)
    loaded = load_pytree(tmp_path / "m", like)
    assert type(loaded) is type(like) and loaded.a == 1
    assert_identical(loaded.x, saved.x)
    assert getattr(loaded, "b", None) == getattr(like, "b", None)


class _Train:
    class Config:
        pass


class _Eval:
    class Config:  # The same name as `_Train.Config`, not the same class.
        pass


@pytest.mark.parametrize(
    ("saved", "other"), [(int, float), (_Train.Config, _Eval.Config)]
)
def test_static_classes_are_compared_by_qualified_name(tmp_path, saved, other):
    save_pytree(tmp_path / "m", _Scaled(jnp.ones(2), saved))
    assert load_pytree(tmp_path / "m", _Scaled(jnp.ones(2), saved)).scale is saved
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "m", _Scaled(jnp.ones(2), other))
    assert str(info.value).startswith(
        f"load_pytree: the file '{tmp_path / 'm.eqx'}' does not match `like` at path "
        f".scale: the static field is ['type', '{saved.__qualname__}'] in the file "
        f"and ['type', '{other.__qualname__}'] in `like`."
    )


def test_static_enum_members_are_compared_by_name(tmp_path):
    save_pytree(tmp_path / "m", _Scaled(jnp.ones(2), _Mode.TRAIN))
    assert load_pytree(tmp_path / "m", _Scaled(jnp.ones(2), _Mode.TRAIN)).scale is (
        _Mode.TRAIN
    )
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "m", _Scaled(jnp.ones(2), _Mode.EVAL))
    assert str(info.value).startswith(
        f"load_pytree: the file '{tmp_path / 'm.eqx'}' does not match `like` at path "
        ".scale: the static field is ['enum', '_Mode', 'TRAIN'] in the file and "
        "['enum', '_Mode', 'EVAL'] in `like`."
    )


@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
def test_static_numpy_values_are_compared_by_value_and_dtype(tmp_path):
    save_pytree(tmp_path / "m", _Scaled(jnp.ones(2), np.array([1, 2], np.int16)))
    same = _Scaled(jnp.ones(2), np.array([1, 2], np.int16))
    assert load_pytree(tmp_path / "m", same).scale is same.scale
    for other in (np.array([1, 3], np.int16), np.array([1, 2], np.int32)):
        with pytest.raises(ValueError) as info:
            load_pytree(tmp_path / "m", _Scaled(jnp.ones(2), other))
        assert str(info.value).startswith(
            f"load_pytree: the file '{tmp_path / 'm.eqx'}' does not match `like` at "
            f"path .scale: the static field is ['numpy', [2], 'int16', '01000200'] in "
            f"the file and ['numpy', [2], '{other.dtype}', '{other.tobytes().hex()}'] "
            "in `like`."
        )


_CORRUPT_SHARDS = """
import json, pathlib, sys
import jax, jax.numpy as jnp, numpy as np
from lerax_utils import load_pytree, save_pytree

folder, failures = pathlib.Path(sys.argv[1]), []
for devices in (2, 3, 4):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    value = jnp.arange(devices * 6, dtype=jnp.float32).reshape(devices * 2, 3)
    like = {"a": jax.device_put(jnp.zeros_like(value), sharding)}
    for shard in range(devices):
        path = folder / f"{devices}-{shard}.eqx"
        save_pytree(path, {"a": value})
        loaded = load_pytree(path, like)["a"]
        if not (loaded.sharding == sharding and np.array_equal(loaded, value)):
            failures.append(f"{devices} devices: the intact file loads otherwise")
        raw = bytearray(path.read_bytes())  # The data ends the file.
        raw[len(raw) - value.nbytes + shard * value.nbytes // devices] ^= 1
        path.write_bytes(bytes(raw))
        try:
            load_pytree(path, like)
            failures.append(f"{devices} devices: shard {shard}, corrupt, loaded")
        except ValueError as err:
            expected = (
                f"load_pytree: the file '{path}' has corrupt data for the leaf at "
                "path ['a'] (its checksum fails)."
            )
            if str(err) != expected:
                failures.append(str(err))
print(json.dumps(failures))
"""


def test_a_sharded_load_refuses_a_corrupt_byte_in_any_shard(tmp_path):
    # Each device reads only its own shard, and the whole array's CRC is still
    # checked, whichever shard holds the corrupt byte.
    assert run_on_four_devices(_CORRUPT_SHARDS, str(tmp_path)) == []


class _Outer:
    class Inner(Serializable):
        weight: jax.Array

        def __init__(self, size: int):
            self.weight = jnp.arange(float(size))


def _local_model_class() -> type[Serializable]:
    class Local(Serializable):
        weight: jax.Array

        def __init__(self, size: int):
            self.weight = jnp.arange(float(size))

    return Local


@pytest.mark.parametrize("make", [lambda: _Outer.Inner, _local_model_class])
def test_a_nested_class_loads_from_the_file_alone(tmp_path, make):
    # A class inside a class or a function is recorded by its qualified name.
    cls = make()
    model = cls(3)
    model.serialize(tmp_path / "model")
    loaded = cls.deserialize(tmp_path / "model")
    assert type(loaded) is cls
    assert eqx.tree_equal(loaded, model, typematch=True)


# A process killed during a multi-process save.


_DEAD_PEER = textwrap.dedent(
    r"""
    import os, pathlib, signal, sys
    process, port, folder = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
    import jax
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    else:
        jax.config.update("jax_cpu_enable_gloo_collectives", True)
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=process,
        initialization_timeout=60, heartbeat_timeout_seconds=5,
    )
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import lerax_utils

    value = np.arange(4.0 * jax.device_count(), dtype=np.float32)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P("x"))
    rows = jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])
    if process == 1:  # Killed while writing its shards.
        lerax_utils._write_shards = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    lerax_utils.save_pytree(folder / "run", {"rows": rows})
    print("saved")
    """
)


@pytest.mark.skipif(
    "heartbeat_timeout_seconds"
    not in inspect.signature(jax.distributed.initialize).parameters,
    reason="this JAX's coordination service takes no heartbeat timeout",
)
def test_a_peer_killed_during_a_save_leaves_the_old_file_intact(tmp_path):
    save_pytree(tmp_path / "run", {"rows": np.zeros(3)})
    before = (tmp_path / "run.eqx").read_bytes()
    (code0, out0, _), (code1, _, err1) = _two_processes(
        _DEAD_PEER, str(tmp_path), timeout=180
    )
    assert code1 == -signal.SIGKILL, err1[-3000:]
    # The survivor is ended by the coordination service (SIGABRT, at its heartbeat
    # timeout), never having renamed its temporary file over the old one.
    assert code0 == -signal.SIGABRT and "saved" not in out0
    assert (tmp_path / "run.eqx").read_bytes() == before
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left[1] == "run.eqx" and re.fullmatch(r"\.run\.eqx\.\w+\.tmp", left[0])


class _WithNames(Serializable):
    count: jax.Array
    names: np.ndarray

    def __init__(self, names: Any):
        self.names = np.array(names)  # A copy: its whole size, allocated.
        self.count = jnp.asarray(len(self.names))


@pytest.mark.parametrize("size", [4_000, 10**8, 10**12, "fewer items than bytes"])
def test_a_recorded_argument_larger_than_the_file_is_not_built(tmp_path, size):
    _WithNames(np.array(["ab", "cd"])).serialize(tmp_path / "good")
    assert _WithNames.deserialize(tmp_path / "good").names.tolist() == ["ab", "cd"]
    if size == "fewer items than bytes":  # Its bytes count: 8 a `<U2` item.
        size = (tmp_path / "good.eqx").stat().st_size // 2

    def enlarge(leaves, structure, header):
        metadata = header["__metadata__"]
        metadata["arguments"] = metadata["arguments"].replace("[2]", f"[{size}]", 1)

    path = tmp_path / "forged.eqx"
    path.write_bytes(forge((tmp_path / "good.eqx").read_bytes(), enlarge))
    with pytest.raises(ValueError) as info:
        _WithNames.deserialize(path)
    assert str(info.value) == (
        f"Serializable.deserialize: the file '{path}' records the argument `names` "
        f"as an array of shape ({size},), larger than the whole file. Pass the "
        "constructor arguments."
    )


class _Activation:
    """A pytree node whose static data (its activation's name) JAX keeps as aux."""

    def __init__(self, weight: Any, name: str):
        self.weight, self.name = weight, name


jax.tree_util.register_pytree_node(
    _Activation,
    lambda a: ((a.weight,), a.name),
    lambda name, c: _Activation(c[0], name),
)


def test_static_data_that_contains_itself_saves_and_loads(tmp_path):
    loop: list[Any] = []
    loop.append(loop)  # Described by its type from some depth on.
    node = _Activation(jnp.ones(2), loop)  # type: ignore[arg-type]
    save_pytree(tmp_path / "n", node)
    assert load_pytree(tmp_path / "n", node).name is loop


class _Actor(eqx.Module):
    w: jax.Array
    n: int = eqx.field(static=True, default=1)


class _Critic(eqx.Module):  # The same fields as `_Actor`, under another name.
    w: jax.Array
    n: int = eqx.field(static=True, default=1)


@pytest.mark.parametrize("wrap", [lambda m: m, lambda m: {"m": [m]}])
def test_a_module_of_another_class_with_the_same_fields_is_refused(tmp_path, wrap):
    save_pytree(tmp_path / "a", wrap(_Actor(jnp.ones(2))))
    with pytest.raises(ValueError) as info:
        load_pytree(tmp_path / "a", wrap(_Critic(jnp.zeros(2))))
    where = "the top level" if wrap(0) == 0 else "path ['m'][0]"
    assert str(info.value) == (
        f"load_pytree: the file '{tmp_path}/a.eqx' does not match `like` at {where}: "
        "the file has {'node': '_Actor', 'static': {'n': 1}}, `like` has "
        "{'node': '_Critic', 'static': {'n': 1}}. Pass a `like` with the structure, "
        "shapes and dtypes of the saved tree."
    )


@pytest.mark.parametrize(
    ("saved", "other"),
    [
        (_Activation(jnp.ones(2), "relu"), _Activation(jnp.ones(2), "tanh")),
        (
            jax.tree_util.Partial(jnp.tanh, jnp.ones(2)),
            jax.tree_util.Partial(jnp.sin, jnp.ones(2)),
        ),
    ],
)
def test_the_static_data_of_any_pytree_node_is_compared(tmp_path, saved, other):
    save_pytree(tmp_path / "n", saved)
    loaded = load_pytree(tmp_path / "n", saved)
    assert jax.tree.structure(loaded) == jax.tree.structure(saved)
    assert_identical(jax.tree.leaves(loaded), jax.tree.leaves(saved))
    with pytest.raises(ValueError, match="does not match `like` at the top level"):
        load_pytree(tmp_path / "n", other)

    def undescribed(leaves, structure, header):  # As written before it was described.
        del structure[0][1]["aux"]

    path = tmp_path / "older.eqx"
    path.write_bytes(forge((tmp_path / "n.eqx").read_bytes(), undescribed))
    assert jax.tree.structure(load_pytree(path, other)) == jax.tree.structure(other)
