"""runtime/dtypes.py: names, the numpy / safetensors / DLPack / kernel-ABI maps, and errors for unknown types."""

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from fastdm.runtime import dtypes
from fastdm.runtime.errors import UnsupportedDtypeError

ROOT = Path(__file__).resolve().parents[1]


def test_every_dtype_maps_back_from_each_of_its_names():
    for d in dtypes.ALL:
        assert dtypes.dtype(d) is d
        assert dtypes.dtype(d.name) is d
        assert dtypes.dtype(d.np) is d
        assert dtypes.from_safetensors(d.safetensors) is d
        assert dtypes.from_dlpack(*d.dlpack) is d
        assert d.itemsize == d.np.itemsize
        assert d.dlpack[1] == 8 * d.itemsize  # DLPack counts bits; bool is stored as one byte


def test_maps_are_one_to_one():
    for attr in ("name", "np", "safetensors", "dlpack"):
        values = [getattr(d, attr) for d in dtypes.ALL]
        assert len(set(values)) == len(values), attr
    codes = [d.code for d in dtypes.ALL if d.code >= 0]
    assert len(set(codes)) == len(codes)


def test_aliases_and_numpy_scalar_types():
    assert dtypes.dtype("bf16") is dtypes.bfloat16
    assert dtypes.dtype("fp16") is dtypes.float16
    assert dtypes.dtype("half") is dtypes.float16
    assert dtypes.dtype("fp32") is dtypes.float32
    assert dtypes.dtype("float") is dtypes.float32
    assert dtypes.dtype("fp8_e4m3") is dtypes.float8_e4m3fn
    assert dtypes.dtype("fp8_e5m2") is dtypes.float8_e5m2
    assert dtypes.dtype(np.float16) is dtypes.float16
    assert dtypes.dtype(ml_dtypes.bfloat16) is dtypes.bfloat16
    assert dtypes.dtype(np.dtype(ml_dtypes.float8_e4m3fn)) is dtypes.float8_e4m3fn
    assert dtypes.dtype(np.bool_) is dtypes.bool_
    assert dtypes.dtype("int64") is dtypes.int64


def test_known_external_names():
    # The strings other software writes: safetensors headers and DLPack type codes (dlpack.h).
    assert dtypes.from_safetensors("BF16") is dtypes.bfloat16
    assert dtypes.from_safetensors("F8_E4M3") is dtypes.float8_e4m3fn
    assert dtypes.from_safetensors("F8_E5M2") is dtypes.float8_e5m2
    assert dtypes.from_safetensors("BOOL") is dtypes.bool_
    assert dtypes.from_dlpack(2, 32) is dtypes.float32  # kDLFloat
    assert dtypes.from_dlpack(4, 16) is dtypes.bfloat16  # kDLBfloat
    assert dtypes.from_dlpack(0, 8) is dtypes.int8  # kDLInt
    assert dtypes.from_dlpack(1, 8) is dtypes.uint8  # kDLUInt
    assert dtypes.from_dlpack(6, 8) is dtypes.bool_  # kDLBool
    assert dtypes.float8_e4m3fn.dlpack == (10, 8)  # kDLFloat8_e4m3fn
    assert dtypes.float8_e5m2.dlpack == (12, 8)  # kDLFloat8_e5m2


def test_floating_flags():
    floating = {d.name for d in dtypes.ALL if d.is_floating}
    assert floating == {"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float64"}
    assert repr(dtypes.bfloat16) == "fastdm.bfloat16"


def test_kernel_codes_match_the_c_abi():
    # kernels/common.cuh declares FdmDtype; the Python codes must agree with it.
    text = (ROOT / "kernels" / "common.cuh").read_text()
    enum = dict(re.findall(r"FDM_(\w+)\s*=\s*(\d+)", text))
    expected = {"F32": dtypes.float32, "F16": dtypes.float16, "BF16": dtypes.bfloat16, "F8E4M3": dtypes.float8_e4m3fn,
                "F8E5M2": dtypes.float8_e5m2, "I8": dtypes.int8, "I32": dtypes.int32, "I64": dtypes.int64,
                "U8": dtypes.uint8}
    for name, d in expected.items():
        assert int(enum[name]) == d.code, name


@pytest.mark.parametrize("bad", ["bfloat17", "complex64", "", "F32", "Float32", "int4"])
def test_unknown_names_raise(bad):
    with pytest.raises(UnsupportedDtypeError, match="fastdm knows"):
        dtypes.dtype(bad)


def test_unknown_numpy_and_external_types_raise():
    with pytest.raises(UnsupportedDtypeError):
        dtypes.dtype(np.complex64)
    with pytest.raises(UnsupportedDtypeError):
        dtypes.dtype(np.dtype(">f4"))  # non-native byte order is not a fastdm dtype
    with pytest.raises(UnsupportedDtypeError, match="F4"):
        dtypes.from_safetensors("F4")
    with pytest.raises(UnsupportedDtypeError):
        dtypes.from_dlpack(5, 64)  # kDLComplex
    with pytest.raises(UnsupportedDtypeError):
        dtypes.from_dlpack(2, 32, lanes=4)  # vector types
