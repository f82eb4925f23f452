"""Checkpoints against other readers and hostile files, and of whole training runs.

Our files are read back by the real `safetensors` package; files of older formats and
of other programs are refused, and plain Equinox files loaded; damaged and crafted
headers are refused with a ValueError, quickly and with bounded memory; and a byte
flipped, cut or inserted in any region of a file never loads silently. Whole training
states (a model, its optax state, a key and a step) round-trip through `save_pytree`
and `load_pytree`, and models rebuild from the constructor arguments recorded in
their file.
"""

import copy
import dataclasses
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given
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
from test_lerax_utils import (
    ROOT,
    Checkpointed,
    _assert_exact,
    _bad_file,
    _forge,
    _load_error,
    assert_identical,
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
    _assert_exact(Checkpointed.deserialize(path, leaves), model)
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
    _assert_exact(loaded, Checkpointed(leaves))


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
        assert _load_error(path, jnp.ones(3), cls=Checkpointed) == (
            f"Serializable.deserialize: the file '{path}' is a safetensors file but "
            "not a lerax_utils checkpoint: its `__metadata__` does not name the "
            "format 'lerax_utils'. Read it with the `safetensors` package."
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


@pytest.mark.parametrize("name", list(_CRAFTED))
def test_a_crafted_header_is_a_value_error(tmp_path, name):
    path = _bad_file(tmp_path, _forge(_small_bytes(tmp_path), _CRAFTED[name]))
    error = _load_error(path, _SMALL_SKELETON, cls=Checkpointed)
    assert error.startswith(f"Serializable.deserialize: the file '{path}' "), error


def test_a_64_mib_header_is_parsed(tmp_path):
    good = _small_bytes(tmp_path)

    def huge(leaves, structure, header):
        header["__metadata__"]["note"] = "x" * (64 * 1024 * 1024 - 4096)

    path = _bad_file(tmp_path, _forge(good, huge))
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
        path = _bad_file(tmp_path, content)
        with pytest.raises(ValueError, match="Serializable.deserialize: the file"):
            Checkpointed.deserialize(path, _SMALL_SKELETON)


_HASH_SEED_WRITER = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    from test_lerax_utils import WithStatic
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
    from test_lerax_utils import WithStatic

    tags = frozenset({"actor", "critic", "value", "policy", "target", "entropy"})
    loaded = WithStatic.deserialize(tmp_path / "1", jnp.ones(2), {"n": 1, "tags": tags})
    assert loaded.options == {"tags": tags, "n": 1}


def test_a_shape_of_too_many_dimensions_is_refused_before_any_work(tmp_path):
    path = _bad_file(tmp_path, _forge(_small_bytes(tmp_path), _many_dimensions))
    assert _load_error(path, _SMALL_SKELETON, cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' has a malformed header (the "
        "leaf at path .params['w'])."
    )


def test_a_header_of_too_many_lists_is_refused_before_parsing(tmp_path):
    limit = lerax_utils._MAX_CONTAINERS
    many = _set_metadata("structure", "[" + "[]," * limit + "[]]")
    path = _bad_file(tmp_path, _forge(_small_bytes(tmp_path), many))
    assert _load_error(path, _SMALL_SKELETON, cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' has a header with more than "
        f"{limit} lists and objects; the file is corrupt."
    )


_WRITER = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    from test_lerax_utils import Checkpointed
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
)
def test_weak_types_load_as_saved(tmp_path_factory, flags, skeleton_flags, traced):
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
    loaded = Checkpointed.deserialize(path, skeleton)
    assert [leaf.weak_type for leaf in loaded.params] == flags  # The saved avals.
    x = jnp.ones((), jnp.bfloat16)
    assert [(x * leaf).dtype for leaf in loaded.params] == [
        (x * leaf).dtype for leaf in leaves
    ]
    assert_identical(loaded, model, weak_types=True)


def test_a_weak_flag_other_than_true_is_malformed(tmp_path):
    Checkpointed([jnp.asarray(2.0)]).serialize(tmp_path / "good")

    def edit(leaves, structure, header):
        leaves[0]["weak_type"] = 1

    path = _bad_file(tmp_path, _forge((tmp_path / "good.eqx").read_bytes(), edit))
    assert _load_error(path, [jnp.asarray(2.0)], cls=Checkpointed) == (
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
    message = _load_error(
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

    return _forge(good[: 8 + length] + bytes(data), edit)


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

    path = _bad_file(tmp_path, _with_data(good, edit))
    assert _load_error(path, [leaf], cls=Checkpointed) == (
        f"Serializable.deserialize: the file '{path}' holds invalid data for the leaf "
        f"at path .params[0]: {problem} are not zero."
        if "high bits" in problem
        else f"Serializable.deserialize: the file '{path}' holds invalid data for the "
        f"leaf at path .params[0]: {problem}."
    )
    if leaf.dtype != np.bool_:  # Every valid value still loads.
        values = np.arange(16 if "4" in str(leaf.dtype) else 4).astype(leaf.dtype)
        Checkpointed([values]).serialize(tmp_path / "all")
        _assert_exact(
            Checkpointed.deserialize(tmp_path / "all", [values]).params, [values]
        )


def test_a_str_scalar_of_no_unicode_character_is_refused(tmp_path):
    Checkpointed([np.str_("a")]).serialize(tmp_path / "good")

    def edit(data):
        data[:4] = struct.pack("<I", 0x110000)

    path = _bad_file(tmp_path, _with_data((tmp_path / "good.eqx").read_bytes(), edit))
    message = _load_error(path, [np.str_("a")], cls=Checkpointed)
    assert message.startswith(
        f"Serializable.deserialize: the file '{path}' holds invalid data for the leaf "
        "at path .params[0]: a character that is not Unicode"
    )


def test_a_header_too_large_to_load_is_refused_at_save(tmp_path, monkeypatch):
    monkeypatch.setattr(lerax_utils, "_MAX_CONTAINERS", 40)
    with pytest.raises(ValueError) as info:
        Checkpointed([jnp.zeros(1)] * 20).serialize(tmp_path / "model")
    assert str(info.value).startswith("Serializable.serialize: the model needs ")
    assert "more than the 40 a checkpoint may hold" in str(info.value)
    assert not list(tmp_path.iterdir())
    # Brackets inside strings are no lists: a model with many of them saves and loads.
    label = "[{" * 100
    Checkpointed([jnp.zeros(1)], label=label).serialize(tmp_path / "model")
    Checkpointed.deserialize(tmp_path / "model", [jnp.zeros(1)], label=label)


def test_a_model_of_100_000_leaves_saves_and_loads(tmp_path):
    leaves = {
        "arrays": [np.full((), i, np.float32) for i in range(50_000)],
        "numbers": [float(i) for i in range(50_000)],
    }
    Checkpointed(leaves).serialize(tmp_path / "model")
    loaded = Checkpointed.deserialize(tmp_path / "model", leaves)
    assert loaded.params["numbers"] == leaves["numbers"]
    assert [float(a) for a in loaded.params["arrays"]] == list(range(50_000))


def test_colliding_leaf_paths_are_refused_at_save(tmp_path):
    model = Checkpointed({float("nan"): jnp.zeros(1), float("nan"): jnp.ones(1)})
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
            "jax.ShapeDtypeStruct, a shape and dtype without values. Save a model "
            "whose arrays hold values."
        )


def test_a_huge_static_int_saves_and_is_compared(tmp_path):
    big: Any = 10**5000
    Checkpointed(jnp.zeros(1), label=big).serialize(tmp_path / "model")
    assert (
        Checkpointed.deserialize(tmp_path / "model", jnp.zeros(1), label=big).label
        == big
    )
    message = _load_error(
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


def test_undecodable_file_names_save_and_load(tmp_path):
    name = tmp_path / os.fsdecode(b"bad\xff")
    model = Checkpointed(jnp.arange(3.0))
    model.serialize(name)
    _assert_exact(Checkpointed.deserialize(name, jnp.zeros(3)), model)
    assert [p.name for p in tmp_path.iterdir()] == [name.name + ".eqx"]


def test_lone_surrogates_in_a_header_are_refused_naming_the_file(tmp_path):
    Checkpointed({"w": jnp.zeros(1)}).serialize(tmp_path / "good")

    def edit(leaves, structure, header):
        leaves[0]["path"] = "\ud800"  # Raw in the text, not as an escape.
        header["__metadata__"]["leaves"] = json.dumps(leaves, ensure_ascii=False)

    path = _bad_file(tmp_path, _forge((tmp_path / "good.eqx").read_bytes(), edit))
    message = _load_error(path, {"w": jnp.zeros(1)}, cls=Checkpointed)
    assert message.startswith(
        f"Serializable.deserialize: the file '{path}' has an unreadable header"
    )


def test_numpy_scalar_keys_give_the_same_paths_under_numpy_1_and_2(tmp_path):
    params = {
        "ints": {np.int64(1): jnp.zeros(1), np.int64(2): 0.5},
        "strs": {np.str_("a"): jnp.ones(2)},
    }
    Checkpointed(params).serialize(tmp_path / "model")
    path = tmp_path / "model.eqx"
    # What NumPy 1.x renders, so a file loads under either major version.
    assert sorted(dict(safetensors.deserialize(path.read_bytes()))) == [
        ".params['ints'][1]",
        ".params['strs']['a']",
    ]
    entries = json.loads(safetensors.safe_open(path, "numpy").metadata()["leaves"])
    assert [entry["path"] for entry in entries] == [
        ".params['ints'][1]",
        ".params['ints'][2]",
        ".params['strs']['a']",
        ".temperature",
    ]
    _assert_exact(Checkpointed.deserialize(path, params), Checkpointed(params))


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
        _assert_exact(loaded, state)
        assert loaded[3] == 3 and type(loaded[3]) is int
        assert loaded[4]["seen"].dtype == np.int64  # NumPy stays NumPy, exactly.
        assert _recording(loaded[0]) == _recording(state[0])
        # Training on from the loaded state is training on from the saved one.
        _assert_exact(_update(_update(loaded)), _update(_update(state)))
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
        _assert_exact(load_pytree(tmp_path / name, tree), tree)
    with pytest.raises(TypeError):
        save_pytree(tmp_path / "x", tree, True)  # type: ignore[misc]


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
    _assert_exact(loaded, {"w": jnp.full(2, 3.0), "k": jnp.arange(3) + 3})


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
        "save_pytree: the tree is batched by `jax.vmap` or `eqx.filter_vmap`, and "
        "one path cannot hold every member of a batch. Call `save_pytree` outside "
        "the vmap, on the stacked tree."
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


@pytest.mark.parametrize("form", ["concrete", "shapes", "numpy"])
def test_like_may_be_values_or_shapes_and_is_compared_as_a_skeleton(tmp_path, form):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "k": jax.random.key(3), "s": "tag"}
    save_pytree(tmp_path / "tree", tree)
    like = {"w": jnp.zeros((2, 3)), "k": jax.random.key(0), "s": "tag"}
    if form == "shapes":
        like = eqx.filter_eval_shape(lambda: like)
    if form == "numpy":  # A NumPy leaf stands for the JAX array JAX would make.
        like = {**like, "w": np.zeros((2, 3), np.float32)}
    _assert_exact(load_pytree(tmp_path / "tree", like), tree)
    with pytest.raises(ValueError, match="static field|the file has 'tag'"):
        load_pytree(tmp_path / "tree", {**like, "s": "other"})


def test_deserialize_without_arguments_rebuilds_the_model_from_the_file(tmp_path):
    model = Regressor((3, 4), -0.0, key=jax.random.key(7))
    model.serialize(tmp_path / "model")
    loaded = Regressor.deserialize(tmp_path / "model")
    _assert_exact(loaded, model)
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
    _assert_exact(loaded, model)
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
    _assert_exact(Regressor.deserialize(tmp_path / "model"), model)


def test_a_number_traced_after_construction_loads_without_arguments(tmp_path):
    model = Regressor(key=jax.random.key(0))  # `scale` is the Python float 0.5.

    def anneal(model, _):
        return eqx.tree_at(lambda m: m.scale, model, model.scale * 0.5), None

    model, _ = filter_scan(anneal, model, None, length=3)
    assert isinstance(model.scale, jax.Array)  # Traced, so now an array.
    model.serialize(tmp_path / "model")
    _assert_exact(Regressor.deserialize(tmp_path / "model"), model)
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
        "arguments for its top level"
    )
    assert str(info.value).endswith(
        "Pass the constructor arguments: `Regressor.deserialize(path, *args, "
        "**kwargs)`."
    )
    loaded = Regressor.deserialize(tmp_path / "model", key=jax.random.key(0))
    if all_fields:
        _assert_exact(loaded, model)
    else:  # Equinox flattens a field missing from the instance otherwise.
        leaves = jax.tree_util.tree_leaves
        _assert_exact(leaves(loaded), leaves(model))


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
        f"record the {which} of WithFunction, so the model cannot be rebuilt from "
        "the file alone. Pass the constructor arguments: "
        "`WithFunction.deserialize(path, *args, **kwargs)`."
    )
    loaded = WithFunction.deserialize(tmp_path / "model", *args)
    _assert_exact(loaded, model)


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
    _assert_exact(loaded, model)
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

    path = _bad_file(tmp_path, _forge((tmp_path / "model.eqx").read_bytes(), drop))
    with pytest.raises(TypeError, match="records no constructor arguments"):
        Regressor.deserialize(path)
    loaded = Regressor.deserialize(path, key=jax.random.key(0))
    _assert_exact(loaded, model)
    assert _recording(loaded) == _recording(Regressor(key=jax.random.key(0)))
    # A class whose constructor needs no argument loads as before.
    Recorder().serialize(tmp_path / "recorder")
    plain = _forge((tmp_path / "recorder.eqx").read_bytes(), drop)
    assert Recorder.deserialize(_bad_file(tmp_path, plain)).seen == Recorder().seen


def _nested_lists(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = ["list", [value]]
    return value


def _with_recording(good: bytes, recording: Any) -> bytes:
    def edit(leaves, structure, header):
        header["__metadata__"]["arguments"] = json.dumps([["", recording]])

    return _forge(good, edit)


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
        {"class": "Recorder", "args": [["float", "nan"]], "kwargs": []},
        {"class": "Recorder", "args": [_nested_lists(40)], "kwargs": []},
        {"class": "Recorder", "args": [], "kwargs": [[1, 2]]},
        {"class": "Recorder", "args": []},
    ],
)
def test_crafted_recordings_are_refused_and_never_run(tmp_path, recording):
    Recorder().serialize(tmp_path / "good")
    path = _bad_file(
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
        "model of class Regressor, not Recorder. Call `Regressor.deserialize`, or "
        "pass the constructor arguments."
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
