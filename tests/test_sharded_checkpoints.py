"""Checkpoints loaded straight into shardings.

The shard reader is checked on one device against NumPy slicing, for random shapes,
dtypes, boxes and buffer sizes. Then, in a process with four CPU devices, models are
loaded with 1-D and 2-D meshes, sharded along different axes or replicated, with one
`Sharding` or a callable: every array must equal an unsharded load bit for bit, carry
the sharding asked for, and hold on each device exactly its shard; corrupt data is
still refused.
"""

import io
import json
import pathlib
import textwrap
import zlib
from typing import Any, cast

import equinox as eqx
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lerax_utils
from lerax_utils import Serializable
from test_lerax_utils import _forge, run_on_four_devices

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

    (tmp_path / "bad.eqx").write_bytes(_forge(bytes(bad), edit))
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
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def four_devices() -> dict[str, Any]:
    return run_on_four_devices(_FOUR, "0", timeout=240)


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
    assert message.endswith(
        "Pass a sharding of at most as many axes as the leaf whose mesh axes "
        "divide the dimensions they shard, or None for this leaf."
    )


def test_the_report_is_json(four_devices):
    assert json.loads(json.dumps(four_devices)) == four_devices
    assert pathlib.Path(lerax_utils.__file__).name == "lerax_utils.py"
