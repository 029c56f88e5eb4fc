"""safetensors encoding and strict decoding of tensors on the wire. Never pickle.

The writer joins a JSON header and the arrays' own buffers, with no intermediate copy per tensor, so
the coordinator can serialise the global model once per round and serve those bytes as they are.
The reader parses the header on its own first (``parse_header``), so an upload can be checked
against the expected schema before its tensor bytes are read, then streamed into a buffer.
Files written here are read by the ``safetensors`` library and the other way round (see tests).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedfleet.errors import ProtocolError
from fedfleet.types import Schema, TensorSpec, Weights, all_finite

# safetensors dtype codes <-> numpy little-endian dtypes (bfloat16 has no numpy dtype).
_TO_NUMPY = {
    "F64": "float64", "F32": "float32", "F16": "float16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
_TO_CODE = {v: k for k, v in _TO_NUMPY.items()}
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_ELEMENTS = 2**48  # even ignoring zero dimensions: numpy cannot shape anything larger
_ALIGN = 8


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: where each tensor lies in the data section."""

    size: int  # bytes of the 8-byte prefix plus the JSON header
    specs: Schema
    offsets: tuple[tuple[int, int], ...]  # (begin, end) within the data section, per spec
    metadata: dict[str, str]

    @property
    def data_bytes(self) -> int:
        return self.offsets[-1][1] if self.offsets else 0

    @property
    def total_bytes(self) -> int:
        return self.size + self.data_bytes


def encode_parts(weights: Weights, metadata: Mapping[str, str] | None = None) -> list[bytes | memoryview]:
    """The safetensors file as a list of buffers: header first, then each tensor's bytes, zero-copy."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    buffers: list[memoryview] = []
    offset = 0
    for name, array in weights.items():
        code = _TO_CODE.get(array.dtype.name)
        if code is None:
            raise ProtocolError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot carry")
        # np.require, unlike ascontiguousarray, keeps 0-d arrays 0-d.
        array = np.require(array, dtype=array.dtype.newbyteorder("<"), requirements="C")
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        buffers.append(memoryview(array.reshape(-1).view(np.uint8).data))
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _ALIGN)
    return [struct.pack("<Q", len(raw)) + raw, *buffers]


def encode(weights: Weights, metadata: Mapping[str, str] | None = None) -> bytes:
    return b"".join(encode_parts(weights, metadata))


def header_length(prefix: bytes) -> int:
    """Length of the JSON header given the first 8 bytes of a body."""
    if len(prefix) < 8:
        raise ProtocolError(f"body is not safetensors: it has {len(prefix)} bytes, fewer than the 8-byte "
                            "header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0 or n > MAX_HEADER_BYTES:
        raise ProtocolError(f"body is not safetensors: header length {n} is outside 1..{MAX_HEADER_BYTES}")
    return int(n)


def parse_header(head: bytes) -> Header:
    """Parse and check the 8-byte length plus JSON header at the start of a safetensors body."""
    n = header_length(head)
    if len(head) < 8 + n:
        raise ProtocolError(f"body is not safetensors: truncated header ({len(head) - 8} of {n} bytes)")
    try:
        raw = json.loads(head[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"body is not safetensors: header is not JSON ({exc})") from exc
    except RecursionError as exc:
        raise ProtocolError("body is not safetensors: header JSON is nested too deeply") from exc
    if not isinstance(raw, dict):
        raise ProtocolError("body is not safetensors: header is not a JSON object")
    metadata = raw.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ProtocolError("safetensors __metadata__ must map strings to strings")
    entries = []
    for name, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ProtocolError(f"tensor {name!r}: header entry must have exactly dtype, shape, data_offsets")
        dtype = _TO_NUMPY.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise ProtocolError(f"tensor {name!r}: unsupported dtype {entry['dtype']!r}")
        shape, offs = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise ProtocolError(f"tensor {name!r}: shape must be a list of non-negative ints, got {shape!r}")
        if math.prod(d for d in shape if d) > MAX_ELEMENTS:
            raise ProtocolError(f"tensor {name!r}: shape {shape!r} is too large for any buffer")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_count(o) for o in offs)):
            raise ProtocolError(f"tensor {name!r}: data_offsets must be two non-negative ints, got {offs!r}")
        entries.append((offs[0], offs[1], TensorSpec(name, dtype, tuple(shape))))
    entries.sort(key=lambda e: (e[0], e[1]))
    expected_begin = 0
    for begin, end, spec in entries:
        if begin != expected_begin:
            raise ProtocolError(f"tensor {spec.name!r}: data_offsets {begin} leave a gap or overlap "
                                f"(expected {expected_begin})")
        if end - begin != spec.nbytes:
            raise ProtocolError(f"tensor {spec.name!r}: {end - begin} bytes do not fit dtype {spec.dtype} "
                                f"and shape {list(spec.shape)} ({spec.nbytes} bytes)")
        expected_begin = end
    return Header(8 + n, tuple(e[2] for e in entries), tuple((e[0], e[1]) for e in entries), metadata)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_schema(header: Header, expected: Schema) -> None:
    """Raise ProtocolError (422) naming the first tensor that is missing, extra, or of wrong dtype/shape."""
    want = {s.name: s for s in expected}
    got = {s.name: s for s in header.specs}
    missing = [n for n in want if n not in got]
    if missing:
        raise ProtocolError(f"update is missing tensor {missing[0]!r} (expected {sorted(want)})", status=422)
    extra = [n for n in got if n not in want]
    if extra:
        raise ProtocolError(f"update has unexpected tensor {extra[0]!r} (expected {sorted(want)})", status=422)
    for name, spec in want.items():
        g = got[name]
        if g.dtype != spec.dtype:
            raise ProtocolError(f"tensor {name!r} has dtype {g.dtype}, expected {spec.dtype}", status=422)
        if g.shape != spec.shape:
            raise ProtocolError(f"tensor {name!r} has shape {list(g.shape)}, expected {list(spec.shape)}",
                                status=422)


def views(header: Header, data: bytes | bytearray | memoryview) -> Weights:
    """Arrays viewing ``data`` (the data section) for each tensor of ``header``, in header order."""
    out: Weights = {}
    for spec, (begin, end) in zip(header.specs, header.offsets, strict=True):
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        out[spec.name] = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                       offset=begin).reshape(spec.shape)
    return out


def decode(body: bytes | bytearray | memoryview) -> tuple[Weights, dict[str, str]]:
    """Decode a whole safetensors body into (weights, metadata); the arrays view ``body``."""
    mv = memoryview(body)
    header = parse_header(bytes(mv[:8 + header_length(bytes(mv[:8]))]))
    if len(mv) != header.total_bytes:
        raise ProtocolError(f"body is not safetensors: {len(mv)} bytes, header describes {header.total_bytes}")
    return views(header, mv[header.size:]), header.metadata


def check_finite(weights: Weights) -> None:
    """Raise ProtocolError (422) naming the first floating tensor holding NaN or Inf."""
    name = all_finite(weights)
    if name is not None:
        raise ProtocolError(f"tensor {name!r} contains NaN or Inf values", status=422, reason="non_finite")
