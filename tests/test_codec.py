"""The safetensors codec: round trips, compatibility with the safetensors library, strict decoding."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy as stn
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedfleet.errors import ProtocolError
from fedfleet.protocol import codec
from fedfleet.types import TensorSpec, schema_of

DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint8", "bool")
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)

# Any text (lone surrogates included: JSON escapes them) except the reserved metadata key.
any_names = st.text(max_size=12).filter(lambda s: s != "__metadata__")
# The safetensors library (Rust) only takes valid Unicode: no surrogate code points.
unicode_names = st.text(st.characters(exclude_categories=("Cs",)), max_size=12).filter(
    lambda s: s != "__metadata__")


@st.composite
def weight_dicts(draw: st.DrawFn, names: st.SearchStrategy[str] = any_names) -> dict[str, np.ndarray]:
    keys = draw(st.lists(names, unique=True, max_size=5))
    return {k: draw(hnp.arrays(st.sampled_from(DTYPES), SHAPES)) for k in keys}


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same names, dtypes, shapes and bytes (bit-exact, so NaN payloads and -0.0 count)."""
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name


def body(header: object = None, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    """A safetensors body from a header object (or raw header bytes) and a data section."""
    if raw is None:
        raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def f32(shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


# --- round trips ---------------------------------------------------------------------------------

@given(weights=weight_dicts(), metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_encode_decode_round_trip(weights: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    encoded = codec.encode(weights, metadata)
    decoded, meta = codec.decode(encoded)
    assert list(decoded) == list(weights)  # the order of the file is the order of the dict
    assert_same_tensors(decoded, weights)
    assert meta == metadata


@given(weights=weight_dicts())
def test_header_describes_the_body_and_is_aligned(weights: dict[str, np.ndarray]) -> None:
    encoded = codec.encode(weights)
    header = codec.parse_header(encoded)
    assert header.total_bytes == len(encoded)
    assert header.size % 8 == 0  # tensor data starts 8-byte aligned
    assert header.data_bytes == sum(a.nbytes for a in weights.values())
    assert header.specs == schema_of(weights)


@given(weights=weight_dicts())
def test_encode_parts_joined_equals_encode(weights: dict[str, np.ndarray]) -> None:
    parts = codec.encode_parts(weights, {"k": "v"})
    assert len(parts) == 1 + len(weights)
    assert b"".join(parts) == codec.encode(weights, {"k": "v"})


def test_encode_parts_does_not_copy_contiguous_arrays() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    parts = codec.encode_parts({"w": array})
    assert np.shares_memory(np.frombuffer(parts[1], dtype=np.uint8), array)


@pytest.mark.parametrize("make", [
    pytest.param(lambda a: a.T, id="transposed"),
    pytest.param(lambda a: a[:, ::2], id="strided"),
    pytest.param(lambda a: a.astype(">f4"), id="big-endian"),
    pytest.param(lambda a: np.asfortranarray(a), id="fortran-order"),
])
def test_non_contiguous_and_big_endian_inputs_decode_to_the_same_values(make) -> None:
    source = make(np.arange(24, dtype=np.float32).reshape(4, 6) * 0.5 - 3)
    decoded, _ = codec.decode(codec.encode({"w": source}))
    assert decoded["w"].dtype == np.dtype("<f4")
    assert decoded["w"].shape == source.shape
    np.testing.assert_array_equal(decoded["w"], source)


def test_decode_accepts_bytes_bytearray_and_memoryview() -> None:
    weights = {"a": np.arange(5, dtype=np.int32), "b": np.ones((2, 2), dtype=np.float64)}
    encoded = codec.encode(weights, {"m": "1"})
    for data in (encoded, bytearray(encoded), memoryview(encoded)):
        decoded, meta = codec.decode(data)
        assert_same_tensors(decoded, weights)
        assert meta == {"m": "1"}


def test_empty_weights_round_trip() -> None:
    decoded, meta = codec.decode(codec.encode({}))
    assert decoded == {}
    assert meta == {}


@pytest.mark.parametrize("dtype", ["complex64", "float128" if hasattr(np, "float128") else "complex128",
                                   "<U3", "object", "datetime64[s]"])
def test_encode_rejects_dtypes_safetensors_cannot_carry(dtype: str) -> None:
    array = np.zeros(2, dtype=dtype)
    with pytest.raises(ProtocolError, match=r"'bad'.*cannot carry"):
        codec.encode({"fine": np.zeros(1, np.float32), "bad": array})


# --- compatibility with the safetensors library --------------------------------------------------

@given(weights=weight_dicts(unicode_names))
@settings(max_examples=60)
def test_safetensors_library_reads_what_we_write(weights: dict[str, np.ndarray]) -> None:
    assert_same_tensors(stn.load(codec.encode(weights, {"fedfleet": "{}"})), weights)


@given(weights=weight_dicts(unicode_names))
@settings(max_examples=60)
def test_we_read_what_the_safetensors_library_writes(weights: dict[str, np.ndarray]) -> None:
    decoded, meta = codec.decode(stn.save(weights))
    assert_same_tensors(decoded, weights)
    assert meta == {}


def test_metadata_is_compatible_both_ways(tmp_path: Path) -> None:
    weights = {"x": np.arange(3, dtype=np.uint8)}
    metadata = {"fedfleet": '{"round": 3}', "ключ": "значение"}
    ours = tmp_path / "ours.safetensors"
    ours.write_bytes(codec.encode(weights, metadata))
    with safetensors.safe_open(str(ours), framework="numpy") as fh:
        assert fh.metadata() == metadata
        assert fh.get_tensor("x").tobytes() == weights["x"].tobytes()
    _, meta = codec.decode(stn.save(weights, metadata=metadata))
    assert meta == metadata


# --- strict decoding of malformed input ----------------------------------------------------------

GOOD_ENTRY = f32([2], 0, 8)
MALFORMED = [
    pytest.param(b"", "has 0 bytes, fewer than the 8-byte", id="empty-body"),
    pytest.param(b"\x01\x02\x03", "has 3 bytes, fewer than the 8-byte", id="short-body"),
    pytest.param(struct.pack("<Q", 0) + b"{}", "header length 0 is outside", id="header-length-0"),
    pytest.param(struct.pack("<Q", codec.MAX_HEADER_BYTES + 1) + b"{}",
                 f"header length {codec.MAX_HEADER_BYTES + 1} is outside", id="header-length-huge"),
    pytest.param(struct.pack("<Q", 2**64 - 1) + b"{}", f"header length {2**64 - 1} is outside",
                 id="header-length-max-u64"),
    pytest.param(struct.pack("<Q", 100) + b'{"a": {', "truncated header", id="truncated-header"),
    pytest.param(body(raw=b"{not json}"), "header is not JSON", id="non-json-header"),
    pytest.param(body(raw=b"\xff\xfe{}"), "header is not JSON", id="non-utf8-header"),
    pytest.param(body(raw=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested too deeply",
                 id="deeply-nested-header"),
    pytest.param(body([1, 2]), "header is not a JSON object", id="header-list"),
    pytest.param(body("a"), "header is not a JSON object", id="header-string"),
    pytest.param(body(None), "header is not a JSON object", id="header-null"),
    pytest.param(body({"a": 5}), "tensor 'a': header entry must have exactly", id="entry-not-object"),
    pytest.param(body({"a": {"dtype": "F32", "shape": [0]}}), "tensor 'a': header entry must have exactly",
                 id="entry-missing-key"),
    pytest.param(body({"a": {**f32([0], 0, 0), "extra": 1}}), "tensor 'a': header entry must have exactly",
                 id="entry-extra-key"),
    pytest.param(body({"a": {**GOOD_ENTRY, "dtype": "F8"}}, bytes(8)), "tensor 'a': unsupported dtype 'F8'",
                 id="dtype-unknown"),
    pytest.param(body({"a": {**GOOD_ENTRY, "dtype": "BF16"}}, bytes(8)), "tensor 'a': unsupported dtype 'BF16'",
                 id="dtype-bf16"),
    pytest.param(body({"a": {**GOOD_ENTRY, "dtype": "f32"}}, bytes(8)), "tensor 'a': unsupported dtype 'f32'",
                 id="dtype-lowercase"),
    pytest.param(body({"a": {**GOOD_ENTRY, "dtype": 4}}, bytes(8)), "tensor 'a': unsupported dtype 4",
                 id="dtype-not-string"),
    pytest.param(body({"a": f32([-1], 0, 0)}), "tensor 'a': shape must be a list of non-negative ints",
                 id="shape-negative"),
    pytest.param(body({"a": f32([2, -2], 0, 0)}), "tensor 'a': shape must be a list of non-negative ints",
                 id="shape-negative-inner"),
    pytest.param(body({"a": {**GOOD_ENTRY, "shape": 2}}, bytes(8)), "tensor 'a': shape must be a list",
                 id="shape-not-list"),
    pytest.param(body({"a": {**GOOD_ENTRY, "shape": [2.0]}}, bytes(8)), "tensor 'a': shape must be a list",
                 id="shape-float"),
    pytest.param(body({"a": {**GOOD_ENTRY, "shape": [True, True]}}, bytes(4)), "tensor 'a': shape must be",
                 id="shape-bool"),
    pytest.param(body({"a": {**GOOD_ENTRY, "data_offsets": [0]}}, bytes(8)),
                 "tensor 'a': data_offsets must be two non-negative ints", id="offsets-one"),
    pytest.param(body({"a": {**GOOD_ENTRY, "data_offsets": [0, 4, 8]}}, bytes(8)),
                 "tensor 'a': data_offsets must be two non-negative ints", id="offsets-three"),
    pytest.param(body({"a": {**GOOD_ENTRY, "data_offsets": [-8, 0]}}, bytes(8)),
                 "tensor 'a': data_offsets must be two non-negative ints", id="offsets-negative"),
    pytest.param(body({"a": {**GOOD_ENTRY, "data_offsets": "0,8"}}, bytes(8)),
                 "tensor 'a': data_offsets must be two non-negative ints", id="offsets-string"),
    pytest.param(body({"a": f32([1], 4, 8)}, bytes(8)), "tensor 'a': data_offsets 4 leave a gap or overlap "
                 "(expected 0)", id="offsets-leading-gap"),
    pytest.param(body({"a": f32([1], 0, 4), "b": f32([1], 8, 12)}, bytes(12)),
                 "tensor 'b': data_offsets 8 leave a gap or overlap (expected 4)", id="offsets-gap"),
    pytest.param(body({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, bytes(12)),
                 "tensor 'b': data_offsets 4 leave a gap or overlap (expected 8)", id="offsets-overlap"),
    pytest.param(body({"a": f32([2], 0, 8), "b": f32([2], 0, 8)}, bytes(8)),
                 "leave a gap or overlap (expected 8)", id="offsets-same-range"),
    pytest.param(body({"a": f32([2], 0, 4)}, bytes(4)),
                 "tensor 'a': 4 bytes do not fit dtype float32 and shape [2] (8 bytes)", id="offsets-too-short"),
    pytest.param(body({"a": f32([2], 0, 12)}, bytes(12)),
                 "tensor 'a': 12 bytes do not fit dtype float32 and shape [2] (8 bytes)", id="offsets-too-long"),
    pytest.param(body({"a": f32([2], 8, 0)}, bytes(8)), "tensor 'a'", id="offsets-reversed"),
    pytest.param(body({"__metadata__": {"k": 1}}), "__metadata__ must map strings to strings",
                 id="metadata-int-value"),
    pytest.param(body({"__metadata__": {"k": None}}), "__metadata__ must map strings to strings",
                 id="metadata-null-value"),
    pytest.param(body({"__metadata__": {"k": ["v"]}}), "__metadata__ must map strings to strings",
                 id="metadata-list-value"),
    pytest.param(body({"__metadata__": {"k": {"n": "v"}}}), "__metadata__ must map strings to strings",
                 id="metadata-object-value"),
    pytest.param(body({"__metadata__": [["k", "v"]]}), "__metadata__ must map strings to strings",
                 id="metadata-list"),
    pytest.param(body({"__metadata__": "k=v"}), "__metadata__ must map strings to strings",
                 id="metadata-string"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED)
def test_malformed_bodies_raise_protocol_error_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode(data)
    assert message in str(info.value)
    assert info.value.status == 400


def test_metadata_that_is_not_an_object_is_rejected_even_when_empty() -> None:
    # The safetensors format (and library) require __metadata__ to be a string → string map; an empty
    # list, empty string, 0 or false is no more a map than a non-empty one.
    for metadata in ([], "", 0, False):
        with pytest.raises(safetensors.SafetensorError):
            stn.load(body({"__metadata__": metadata}))
        with pytest.raises(ProtocolError, match="__metadata__ must map strings to strings"):
            codec.decode(body({"__metadata__": metadata}))


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**70], [2**63], [2**62, 0, 2**62]],
                         ids=["product-wraps-int64", "dim-over-int64", "dim-2**63", "zero-size-huge-dims"])
def test_shapes_too_large_for_any_buffer_raise_protocol_error(shape: list[int]) -> None:
    # An upload from the network must never raise anything but ProtocolError (HTTP 4xx, not 500).
    with pytest.raises(ProtocolError, match="'a'"):
        codec.decode(body({"a": f32(shape, 0, 0)}))


def test_truncated_data_section_is_rejected() -> None:
    data = body({"a": GOOD_ENTRY}, bytes(7))
    with pytest.raises(ProtocolError, match=f"{len(data)} bytes, header describes {len(data) + 1}"):
        codec.decode(data)


def test_trailing_bytes_after_the_data_section_are_rejected() -> None:
    data = body({"a": GOOD_ENTRY}, bytes(9))
    with pytest.raises(ProtocolError, match=f"{len(data)} bytes, header describes {len(data) - 1}"):
        codec.decode(data)


def test_trailing_byte_after_a_valid_encoding_is_rejected() -> None:
    encoded = codec.encode({"w": np.ones(3, np.float32)})
    with pytest.raises(ProtocolError, match="header describes"):
        codec.decode(encoded + b"\x00")
    with pytest.raises(ProtocolError, match="header describes"):
        codec.decode(encoded[:-1])


def test_tensors_may_be_listed_in_any_order_in_the_header() -> None:
    a, b = np.array([1.5, 2.5], np.float32), np.array([7, 8, 9], np.int64)
    header = {"b": {"dtype": "I64", "shape": [3], "data_offsets": [8, 32]}, "a": f32([2], 0, 8)}
    decoded, _ = codec.decode(body(header, a.tobytes() + b.tobytes()))
    assert list(decoded) == ["a", "b"]  # data order
    assert_same_tensors(decoded, {"a": a, "b": b})


def test_header_length_and_parse_header_work_on_a_prefix() -> None:
    encoded = codec.encode({"w": np.zeros((3, 4), np.float64)})
    n = codec.header_length(encoded[:8])
    header = codec.parse_header(encoded[: 8 + n])  # no tensor bytes needed
    assert header.size == 8 + n
    assert header.specs == (TensorSpec("w", "float64", (3, 4)),)
    assert header.total_bytes == len(encoded)


# --- check_schema and check_finite ---------------------------------------------------------------

EXPECTED = (TensorSpec("w", "float32", (2, 3)), TensorSpec("b", "float32", (3,)))


def header_of(weights: dict[str, np.ndarray]) -> codec.Header:
    return codec.parse_header(codec.encode(weights))


def test_check_schema_accepts_a_match_in_any_order() -> None:
    codec.check_schema(header_of({"b": np.zeros(3, np.float32), "w": np.zeros((2, 3), np.float32)}),
                       EXPECTED)


@pytest.mark.parametrize(("weights", "message"), [
    pytest.param({"w": np.zeros((2, 3), np.float32)}, "missing tensor 'b'", id="missing"),
    pytest.param({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32),
                  "c": np.zeros(1, np.float32)}, "unexpected tensor 'c'", id="extra"),
    pytest.param({"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float32)},
                 "tensor 'w' has dtype float64, expected float32", id="wrong-dtype"),
    pytest.param({"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)},
                 "tensor 'w' has shape [3, 2], expected [2, 3]", id="wrong-shape"),
    pytest.param({"w": np.zeros((2, 3), np.float32), "b": np.zeros((), np.float32)},
                 "tensor 'b' has shape [], expected [3]", id="scalar-for-vector"),
])
def test_check_schema_rejects_with_422_naming_the_tensor(weights: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.check_schema(header_of(weights), EXPECTED)
    assert message in str(info.value)
    assert info.value.status == 422


def test_check_finite_accepts_finite_and_integer_tensors() -> None:
    codec.check_finite({"f": np.array([1.0, -2.0, 0.0], np.float32), "i": np.array([2**62], np.int64),
                        "z": np.zeros((0,), np.float16)})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_check_finite_names_the_tensor_with_nan_or_inf(bad: float, dtype: str) -> None:
    poisoned = np.ones((2, 2), dtype)
    poisoned[1, 0] = bad
    with pytest.raises(ProtocolError) as info:
        codec.check_finite({"good": np.ones(3, dtype), "layer.poisoned": poisoned})
    assert "'layer.poisoned'" in str(info.value)
    assert "'good'" not in str(info.value)
    assert info.value.status == 422


def test_check_finite_catches_float16_overflow_to_inf() -> None:
    with np.errstate(over="ignore"):
        overflowed = np.array([60000.0], np.float16) * np.float16(2)  # float16 max is 65504
    assert np.isinf(overflowed).all()
    with pytest.raises(ProtocolError, match="'h'"):
        codec.check_finite({"h": overflowed})
