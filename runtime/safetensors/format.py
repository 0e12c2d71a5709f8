"""The safetensors format itself: the dtype table, header parsing with full validation, header building.

A file is: 8 bytes (little-endian u64) header length N, N bytes of UTF-8 JSON, then the data buffer. The JSON maps
each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data buffer) and may
hold "__metadata__", a str -> str map. The reference implementation (huggingface/safetensors) requires the tensors
to tile the data buffer exactly, in any order, and writes tensors sorted by dtype (widest first) then name, with
the header padded by spaces to a multiple of 8 bytes. Every rule below follows it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .. import dtypes
from ..dtypes import DType
from ..errors import SafetensorsError, UnsupportedDtypeError

MAX_HEADER_BYTES = 100_000_000  # the reference implementation refuses larger headers
METADATA_KEY = "__metadata__"

# DLPack codes (dlpack.h DLDataTypeCode) of the types below that fastdm's dtypes module does not define yet.
_DL_COMPLEX, _DL_F8_E4M3FNUZ, _DL_F8_E5M2FNUZ, _DL_F8_E8M0FNU = 5, 11, 13, 14

# Checkpoint element types that runtime/dtypes.py does not list (no kernel takes them): numpy still views them.
EXTRA_DTYPES: dict[str, DType] = {
    "F8_E8M0": DType("float8_e8m0fnu", np.dtype(ml_dtypes.float8_e8m0fnu), "F8_E8M0", -1, (_DL_F8_E8M0FNU, 8)),
    "F8_E4M3FNUZ": DType("float8_e4m3fnuz", np.dtype(ml_dtypes.float8_e4m3fnuz), "F8_E4M3FNUZ", -1,
                         (_DL_F8_E4M3FNUZ, 8)),
    "F8_E5M2FNUZ": DType("float8_e5m2fnuz", np.dtype(ml_dtypes.float8_e5m2fnuz), "F8_E5M2FNUZ", -1,
                         (_DL_F8_E5M2FNUZ, 8)),
    "C64": DType("complex64", np.dtype(np.complex64), "C64", -1, (_DL_COMPLEX, 64)),
}


@dataclass(frozen=True)
class FormatDtype:
    """One dtype string of the format: its bit width, its rank in the reference's Dtype enum (the writer orders
    tensors by it, widest first), and the fastdm DType (None for packed sub-byte types numpy cannot view)."""

    name: str
    bits: int
    rank: int
    dtype: DType | None


def _format_dtypes() -> dict[str, FormatDtype]:
    # (name, bits) in the order of the reference's Dtype enum (safetensors 0.6+).
    order = [("BOOL", 8), ("F4", 4), ("F6_E2M3", 6), ("F6_E3M2", 6), ("U8", 8), ("I8", 8), ("F8_E5M2", 8),
             ("F8_E4M3", 8), ("F8_E8M0", 8), ("F8_E4M3FNUZ", 8), ("F8_E5M2FNUZ", 8), ("I16", 16), ("U16", 16),
             ("F16", 16), ("BF16", 16), ("I32", 32), ("U32", 32), ("F32", 32), ("C64", 64), ("F64", 64),
             ("I64", 64), ("U64", 64)]
    known = {d.safetensors: d for d in dtypes.ALL}
    known.update(EXTRA_DTYPES)
    return {name: FormatDtype(name, bits, rank, known.get(name)) for rank, (name, bits) in enumerate(order)}


FORMAT_DTYPES: dict[str, FormatDtype] = _format_dtypes()
_BY_NUMPY: dict[np.dtype, FormatDtype] = {f.dtype.np: f for f in FORMAT_DTYPES.values() if f.dtype is not None}


def format_dtype_of(dt: DType | np.dtype, what: str) -> FormatDtype:
    """The format dtype for a fastdm DType or numpy dtype; `what` names the tensor for the error message."""
    npdt = dt.np if isinstance(dt, DType) else np.dtype(dt)
    if npdt.byteorder == ">":
        npdt = npdt.newbyteorder("<")
    try:
        return _BY_NUMPY[npdt]
    except KeyError:
        raise UnsupportedDtypeError(
            f"{what}: dtype {npdt} has no safetensors equivalent; convert it first "
            f"(e.g. .astype(np.float32)). Supported: {', '.join(sorted(str(d) for d in _BY_NUMPY))}") from None


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: `begin`/`end` are absolute byte offsets in the file."""

    name: str
    fmt: FormatDtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]  # in file order (ascending offsets)
    metadata: dict[str, str] | None
    data_start: int  # absolute offset of the data buffer (8 + header length)


def _bad(path: str, msg: str) -> SafetensorsError:
    return SafetensorsError(f"{path}: {msg}")


def _no_duplicates(path: str):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise _bad(path, f"the header lists {k!r} twice; the file is corrupt, re-save or re-download it")
            out[k] = v
        return out
    return hook


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_header(path: str, f, file_size: int) -> Header:
    """Read and validate the header of the open binary file `f` (size `file_size` bytes)."""
    redo = "re-download or re-save it"
    if file_size < 8:
        raise _bad(path, f"file is {file_size} bytes, shorter than the 8-byte header length; it is truncated "
                   f"or not a safetensors file ({redo})")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        raise _bad(path, f"header length field says {n} bytes, above the format's limit of {MAX_HEADER_BYTES}: "
                   f"the file is corrupt or not a safetensors file ({redo})")
    if 8 + n > file_size:
        raise _bad(path, f"header needs {n} bytes but the file has only {file_size - 8} after the length field: "
                   f"the file is truncated ({redo})")
    raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(path, f"header is not valid UTF-8 ({e}); the file is corrupt ({redo})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates(path))
    except json.JSONDecodeError as e:
        raise _bad(path, f"header is not valid JSON ({e}); the file is corrupt or truncated ({redo})") from None
    if not isinstance(obj, dict):
        raise _bad(path, f"header is a JSON {type(obj).__name__}, not an object; the file is corrupt ({redo})")

    metadata = obj.pop(METADATA_KEY, None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise _bad(path, f"{METADATA_KEY} must map strings to strings, got {metadata!r:.200} ({redo})")

    data_start = 8 + n
    data_len = file_size - data_start
    spans = []
    for name, info in obj.items():
        what = f"tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise _bad(path, f"{what}: header entry must have dtype, shape and data_offsets, got "
                       f"{info!r:.200} ({redo})")
        dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in FORMAT_DTYPES:
            raise UnsupportedDtypeError(
                f"{path}: {what} has dtype {dt!r}, which is not a safetensors dtype fastdm knows "
                f"({', '.join(FORMAT_DTYPES)}); convert the checkpoint to one of them (e.g. BF16) or upgrade fastdm")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise _bad(path, f"{what}: shape must be a list of non-negative integers, got {shape!r:.200} ({redo})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _bad(path, f"{what}: data_offsets must be [begin, end] with 0 <= begin <= end, got "
                       f"{offsets!r:.200} ({redo})")
        fmt = FORMAT_DTYPES[dt]
        numel = math.prod(shape)
        if numel * fmt.bits % 8:
            raise _bad(path, f"{what}: {numel} elements of {dt} do not fill whole bytes ({redo})")
        need = numel * fmt.bits // 8
        if offsets[1] - offsets[0] != need:
            raise _bad(path, f"{what}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but shape "
                       f"{shape} of {dt} needs {need}; the header is corrupt ({redo})")
        if offsets[1] > data_len:
            raise _bad(path, f"{what}: data_offsets {offsets} reach past the end of the data ({data_len} bytes "
                       f"in the file): the file is truncated or its header is corrupt ({redo})")
        spans.append((offsets[0], offsets[1], name, Entry(name, fmt, tuple(shape), data_start + offsets[0],
                                                          data_start + offsets[1])))

    # The reference requires the tensors to tile [0, data_len) exactly: no overlap, no gap, nothing after.
    spans.sort(key=lambda s: (s[0], s[1]))
    pos, prev = 0, None
    for begin, end, name, _ in spans:
        if begin < pos:
            raise _bad(path, f"tensors {prev!r} and {name!r} overlap (bytes {begin}..{pos} of the data); the "
                       f"header is corrupt ({redo})")
        if begin > pos:
            raise _bad(path, f"bytes {pos}..{begin} of the data belong to no tensor (before {name!r}); the "
                       f"header is corrupt ({redo})")
        pos, prev = end, name
    if pos != data_len:
        raise _bad(path, f"the tensors cover {pos} bytes of data but the file holds {data_len}: the file has "
                   f"trailing bytes or a corrupt header ({redo})")
    return Header({s[2]: s[3] for s in spans}, metadata, data_start)


def build_header(tensors: list[tuple[str, FormatDtype, tuple[int, ...], int]],
                 metadata: dict[str, str] | None) -> tuple[bytes, list[tuple[str, int, int]]]:
    """Lay out tensors (name, format dtype, shape, nbytes) as the reference writer does: sorted widest dtype
    first, then by name. Returns the bytes before the data (length field + padded JSON) and, in data order,
    (name, begin, end) relative to the data buffer."""
    if metadata is not None:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise SafetensorsError(f"metadata must map strings to strings; these entries do not: {bad!r:.300}")
    order = sorted(tensors, key=lambda t: (-t[1].rank, t[0]))
    obj: dict[str, object] = {}
    if metadata is not None:
        obj[METADATA_KEY] = metadata
    layout, pos = [], 0
    for name, fmt, shape, nbytes in order:
        if name == METADATA_KEY:
            raise SafetensorsError(f"{METADATA_KEY!r} is reserved by the format and cannot name a tensor")
        obj[name] = {"dtype": fmt.name, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        layout.append((name, pos, pos + nbytes))
        pos += nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keeps the data buffer 8-byte aligned
    return struct.pack("<Q", len(text)) + text, layout
