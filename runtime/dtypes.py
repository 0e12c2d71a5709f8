"""Element types: one DType object per type, with its numpy, safetensors, DLPack and kernel-ABI names.

numpy has no bfloat16 or float8; ml_dtypes supplies them, so every DType maps to a real numpy dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import UnsupportedDtypeError

# DLPack type codes (dlpack.h: DLDataTypeCode)
_DL_INT, _DL_UINT, _DL_FLOAT, _DL_BFLOAT, _DL_BOOL = 0, 1, 2, 4, 6
_DL_FLOAT8_E4M3FN, _DL_FLOAT8_E5M2 = 10, 12


@dataclass(frozen=True)
class DType:
    name: str  # fastdm's name, e.g. "bfloat16"
    np: np.dtype  # numpy dtype (ml_dtypes for bf16/fp8)
    safetensors: str  # dtype string in a .safetensors header
    code: int  # element type code of the kernel ABI (kernels/common.cuh); -1 where no kernel takes it
    dlpack: tuple[int, int]  # (DLDataTypeCode, bits)

    @property
    def itemsize(self) -> int:
        return self.np.itemsize

    @property
    def is_floating(self) -> bool:
        return self.name in ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float64")

    def __repr__(self) -> str:
        return f"fastdm.{self.name}"


float32 = DType("float32", np.dtype(np.float32), "F32", 0, (_DL_FLOAT, 32))
float16 = DType("float16", np.dtype(np.float16), "F16", 1, (_DL_FLOAT, 16))
bfloat16 = DType("bfloat16", np.dtype(ml_dtypes.bfloat16), "BF16", 2, (_DL_BFLOAT, 16))
float8_e4m3fn = DType("float8_e4m3fn", np.dtype(ml_dtypes.float8_e4m3fn), "F8_E4M3", 3, (_DL_FLOAT8_E4M3FN, 8))
float8_e5m2 = DType("float8_e5m2", np.dtype(ml_dtypes.float8_e5m2), "F8_E5M2", 4, (_DL_FLOAT8_E5M2, 8))
int8 = DType("int8", np.dtype(np.int8), "I8", 5, (_DL_INT, 8))
int32 = DType("int32", np.dtype(np.int32), "I32", 6, (_DL_INT, 32))
int64 = DType("int64", np.dtype(np.int64), "I64", 7, (_DL_INT, 64))
uint8 = DType("uint8", np.dtype(np.uint8), "U8", 8, (_DL_UINT, 8))
# Types that appear in checkpoints but that no kernel takes directly.
float64 = DType("float64", np.dtype(np.float64), "F64", -1, (_DL_FLOAT, 64))
int16 = DType("int16", np.dtype(np.int16), "I16", -1, (_DL_INT, 16))
uint16 = DType("uint16", np.dtype(np.uint16), "U16", -1, (_DL_UINT, 16))
uint32 = DType("uint32", np.dtype(np.uint32), "U32", -1, (_DL_UINT, 32))
uint64 = DType("uint64", np.dtype(np.uint64), "U64", -1, (_DL_UINT, 64))
bool_ = DType("bool", np.dtype(np.bool_), "BOOL", -1, (_DL_BOOL, 8))

ALL: tuple[DType, ...] = (
    float32, float16, bfloat16, float8_e4m3fn, float8_e5m2, int8, int32, int64, uint8,
    float64, int16, uint16, uint32, uint64, bool_,
)
_BY_NAME = {d.name: d for d in ALL}
_BY_NAME.update({"bf16": bfloat16, "fp16": float16, "half": float16, "fp32": float32, "float": float32,
                 "fp8_e4m3": float8_e4m3fn, "fp8_e5m2": float8_e5m2})
_BY_NP = {d.np: d for d in ALL}
_BY_ST = {d.safetensors: d for d in ALL}
_BY_DL = {d.dlpack: d for d in ALL}


def dtype(x: DType | str | np.dtype | type) -> DType:
    """Normalise a DType, a name ("bf16", "float16", ...) or a numpy dtype to a DType."""
    if isinstance(x, DType):
        return x
    if isinstance(x, str) and x in _BY_NAME:
        return _BY_NAME[x]
    try:
        return _BY_NP[np.dtype(x)]
    except (TypeError, KeyError):
        names = ", ".join(sorted({d.name for d in ALL}))
        raise UnsupportedDtypeError(f"unknown dtype {x!r}; fastdm knows: {names}") from None


def from_safetensors(name: str) -> DType:
    try:
        return _BY_ST[name]
    except KeyError:
        raise UnsupportedDtypeError(
            f"safetensors dtype {name!r} is not supported; supported: {', '.join(sorted(_BY_ST))}") from None


def from_dlpack(type_code: int, bits: int, lanes: int = 1) -> DType:
    if lanes != 1 or (type_code, bits) not in _BY_DL:
        raise UnsupportedDtypeError(f"DLPack dtype (code={type_code}, bits={bits}, lanes={lanes}) is not supported")
    return _BY_DL[(type_code, bits)]
