"""safetensors I/O on the CPU: round trips of every dtype, byte-level agreement with the reference `safetensors`
package in both directions, sharded checkpoints, and the error raised for each kind of broken file."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors as st_ref
import safetensors.numpy as st_np
from fastdm.runtime import dtypes
from fastdm.runtime.errors import SafetensorsError, ShapeError, UnsupportedDtypeError
from fastdm.runtime.safetensors import (
    FORMAT_DTYPES,
    Checkpoint,
    SafetensorsFile,
    load,
    open_checkpoint,
    save,
    save_sharded,
)

# Every format dtype numpy can view, with the name the reference package's TensorSpec uses for it.
NUMPY_DTYPES = {
    "BOOL": (np.bool_, "bool"), "U8": (np.uint8, "uint8"), "I8": (np.int8, "int8"),
    "I16": (np.int16, "int16"), "U16": (np.uint16, "uint16"), "F16": (np.float16, "float16"),
    "BF16": (ml_dtypes.bfloat16, "bfloat16"), "I32": (np.int32, "int32"), "U32": (np.uint32, "uint32"),
    "F32": (np.float32, "float32"), "F64": (np.float64, "float64"), "I64": (np.int64, "int64"),
    "U64": (np.uint64, "uint64"), "F8_E4M3": (ml_dtypes.float8_e4m3fn, "float8_e4m3fn"),
    "F8_E5M2": (ml_dtypes.float8_e5m2, "float8_e5m2"), "F8_E8M0": (ml_dtypes.float8_e8m0fnu, "float8_e8m0fnu"),
    "F8_E4M3FNUZ": (ml_dtypes.float8_e4m3fnuz, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (ml_dtypes.float8_e5m2fnuz, "float8_e5m2fnuz"), "C64": (np.complex64, "complex64"),
}
SHAPES = [(3, 5, 7), (), (0, 4), (1,), (2, 0, 3), (13,)]


def rand_array(rng: np.random.Generator, st_name: str, shape) -> np.ndarray:
    """Random bytes of every bit pattern (bool: 0/1 only), viewed as the dtype."""
    dt = np.dtype(NUMPY_DTYPES[st_name][0])
    n = int(np.prod(shape, dtype=np.int64))
    if dt == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 256, size=n * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def ref_serialize(tensors: dict[str, np.ndarray], metadata=None) -> bytes:
    """The reference package's bytes for these arrays (any dtype, via its low-level serializer)."""
    names = {np.dtype(v[0]): v[1] for v in NUMPY_DTYPES.values()}
    arrs = {k: np.array(v, order="C") for k, v in tensors.items()}  # ascontiguousarray makes 0-d 1-d
    if hasattr(st_ref, "TensorSpec"):  # safetensors >= 0.8
        spec = {k: st_ref.TensorSpec(dtype=names[a.dtype], shape=list(a.shape), data_ptr=a.ctypes.data,
                                     data_len=a.nbytes) for k, a in arrs.items()}
    else:
        spec = {k: {"dtype": names[a.dtype], "shape": list(a.shape), "data": a.tobytes()} for k, a in arrs.items()}
    out = bytes(st_ref.serialize(spec, metadata=metadata))
    del arrs
    return out


def ref_deserialize(path) -> dict[str, tuple[str, list[int], bytes]]:
    with open(path, "rb") as f:
        return {k: (v["dtype"], list(v["shape"]), bytes(v["data"])) for k, v in st_ref.deserialize(f.read())}


def write_raw(path, header, data: bytes = b"", pad: bool = True) -> str:
    """A file with a hand-made header (dict or raw bytes) and data buffer."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
    return str(path)


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("st_name", list(NUMPY_DTYPES))
def test_round_trip_every_dtype(tmp_path, st_name):
    rng = np.random.default_rng(list(NUMPY_DTYPES).index(st_name))
    tensors = {f"t{i}": rand_array(rng, st_name, s) for i, s in enumerate(SHAPES)}
    path = tmp_path / "a.safetensors"
    save(tensors, path, metadata={"format": "pt", "note": "ünïcode"})
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata == {"format": "pt", "note": "ünïcode"}
        for name, ref in tensors.items():
            assert f.dtype(name).safetensors == st_name
            assert f.dtype(name).np == ref.dtype
            assert f.shape(name) == ref.shape
            got = f.numpy(name)
            assert same_bytes(got, ref), name
            assert not got.flags.writeable and not got.flags.owndata  # a view of the mapped file
    # The reference package sees the same dtypes, shapes and bytes.
    back = ref_deserialize(path)
    for name, ref in tensors.items():
        assert back[name] == (st_name, list(ref.shape), ref.tobytes())


def test_cpu_load_is_zero_copy_and_matches(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"w": rand_array(rng, "BF16", (17, 33)), "i": rand_array(rng, "I64", (5,)),
               "s": rand_array(rng, "F32", ()), "e": rand_array(rng, "F16", (0, 3))}
    save(tensors, tmp_path / "m.safetensors")
    out = load(tmp_path / "m.safetensors")
    assert list(out) == list(open_checkpoint(tmp_path / "m.safetensors").keys())
    for name, ref in tensors.items():
        arr = out[name].numpy()
        assert same_bytes(arr, ref)
        assert out[name].dtype == dtypes.dtype(ref.dtype)
        assert out[name].shape == ref.shape
    assert not out["w"].numpy().flags.owndata


def test_layout_is_byte_identical_to_reference(tmp_path):
    rng = np.random.default_rng(2)
    # Mixed dtypes and names whose sorted order differs from insertion order: the reference sorts by dtype
    # (widest first) then name, and pads the header with spaces to 8 bytes.
    tensors = {"zeta": rand_array(rng, "U8", (3,)), "alpha": rand_array(rng, "F32", (2, 3)),
               "mid.bias": rand_array(rng, "BF16", (5,)), "b": rand_array(rng, "I64", ()),
               "fp8": rand_array(rng, "F8_E4M3", (7,)), "a": rand_array(rng, "BF16", (1, 1)),
               "flag": rand_array(rng, "BOOL", (4,)), "é": rand_array(rng, "F16", (0,))}
    for metadata in (None, {"format": "pt"}):
        save(tensors, tmp_path / "ours.safetensors", metadata=metadata)
        ours = (tmp_path / "ours.safetensors").read_bytes()
        assert ours == ref_serialize(tensors, metadata)
        assert (8 + struct.unpack("<Q", ours[:8])[0]) % 8 == 0


def test_reference_numpy_loader_reads_ours(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {f"{n}.w": rand_array(rng, n, (4, 9)) for n in ("F32", "F16", "I64", "U8", "BOOL", "F64", "I8")}
    save(tensors, tmp_path / "ours.safetensors")
    back = st_np.load_file(str(tmp_path / "ours.safetensors"))
    assert set(back) == set(tensors)
    for name, ref in tensors.items():
        assert same_bytes(back[name], ref)


def test_ours_reads_reference_files(tmp_path):
    rng = np.random.default_rng(4)
    plain = {f"{n}.w": rand_array(rng, n, (6, 5)) for n in ("F32", "F16", "I32", "U8", "BOOL", "F64")}
    plain["scalar"] = rand_array(rng, "F32", ())
    st_np.save_file(plain, str(tmp_path / "plain.safetensors"), metadata={"format": "np"})
    special = {"bf": rand_array(rng, "BF16", (3, 7)), "e4": rand_array(rng, "F8_E4M3", (11,)),
               "e5": rand_array(rng, "F8_E5M2", (2, 2)), "f": rand_array(rng, "F32", (3,))}
    (tmp_path / "special.safetensors").write_bytes(ref_serialize(special, {"k": "v"}))
    for fname, tensors, meta in (("plain", plain, {"format": "np"}), ("special", special, {"k": "v"})):
        ck = open_checkpoint(tmp_path / f"{fname}.safetensors")
        assert isinstance(ck, Checkpoint) and ck.metadata == meta
        assert set(ck.keys()) == set(tensors)
        for name, ref in tensors.items():
            assert same_bytes(ck.numpy(name), ref), (fname, name)


def test_save_accepts_strided_and_big_endian_arrays(tmp_path):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    tensors = {"t": base.T, "s": base[::2, 1::3], "be": base.astype(">f4")}
    save(tensors, tmp_path / "x.safetensors")
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        np.testing.assert_array_equal(f.numpy("t"), base.T)
        np.testing.assert_array_equal(f.numpy("s"), base[::2, 1::3])
        np.testing.assert_array_equal(f.numpy("be"), base)
        assert f.dtype("be") == dtypes.float32


def test_save_leaves_no_partial_file(tmp_path):
    with pytest.raises(UnsupportedDtypeError, match="'bad'"):
        save({"ok": np.ones(3, np.float32), "bad": np.ones(3, np.complex128)}, tmp_path / "x.safetensors")
    with pytest.raises(SafetensorsError, match="metadata"):
        save({"ok": np.ones(3, np.float32)}, tmp_path / "x.safetensors", metadata={"n": 1})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ sharded
def make_model(rng) -> dict[str, np.ndarray]:
    out = {}
    for i in range(7):
        out[f"blocks.{i}.attn.qkv.weight"] = rand_array(rng, "BF16", (96, 32))
        out[f"blocks.{i}.attn.qkv.bias"] = rand_array(rng, "F32", (96,))
        out[f"blocks.{i}.scale"] = rand_array(rng, "F8_E4M3", (3, 5))
    out["pos_ids"] = rand_array(rng, "I64", (9,))
    out["big"] = rand_array(rng, "F32", (40, 50))  # 8000 bytes: bigger than a shard
    out["empty"] = rand_array(rng, "F16", (0, 8))
    return out


def test_sharded_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    tensors = make_model(rng)
    index = save_sharded(tensors, tmp_path / "ck", max_shard_bytes=7000, metadata={"format": "pt"})
    assert index == tmp_path / "ck" / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    shards = sorted({v for v in idx["weight_map"].values()})
    n = len(shards)
    assert n >= 4
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(idx["weight_map"]) == set(tensors)
    assert idx["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    for s in shards:  # no shard over the limit unless it holds one oversized tensor
        keys = [k for k, v in idx["weight_map"].items() if v == s]
        assert sum(tensors[k].nbytes for k in keys) <= 7000 or len(keys) == 1
        assert st_ref.safe_open(str(tmp_path / "ck" / s), framework="np").metadata() == {"format": "pt"}

    for src in (index, tmp_path / "ck", str(index)):
        ck = open_checkpoint(src)
        assert sorted(ck.files) == [str(tmp_path / "ck" / s) for s in shards]
        assert set(ck.keys()) == set(tensors)
        assert ck.metadata["total_size"] == idx["metadata"]["total_size"]
        for name, ref in tensors.items():
            assert ck.shape(name) == ref.shape and ck.dtype(name) == dtypes.dtype(ref.dtype)
            assert same_bytes(ck.numpy(name), ref)
        ck.close()

    some = ["blocks.3.attn.qkv.bias", "pos_ids", "big"]
    out = load(tmp_path / "ck", names=some)
    assert list(out) == some
    for name in some:
        assert same_bytes(out[name].numpy(), tensors[name])


def test_shard_folder_without_index(tmp_path):
    rng = np.random.default_rng(7)
    tensors = make_model(rng)
    index = save_sharded(tensors, tmp_path, max_shard_bytes=20000, name="diffusion_pytorch_model")
    assert index.name == "diffusion_pytorch_model.safetensors.index.json"
    index.unlink()
    ck = open_checkpoint(tmp_path)  # a complete prefix-0000i-of-0000n set still opens
    assert set(ck.keys()) == set(tensors)
    ck.close()
    last = sorted(tmp_path.glob("*.safetensors"))[-1]
    last.unlink()
    with pytest.raises(SafetensorsError, match="missing"):
        open_checkpoint(tmp_path)


def test_dtype_conversion_cpu(tmp_path):
    rng = np.random.default_rng(8)
    tensors = {"w": rng.standard_normal((9, 7)).astype(np.float32), "h": rand_array(rng, "F16", (4,)),
               "ids": rand_array(rng, "I64", (3,)), "mask": rand_array(rng, "BOOL", (3,)),
               "b": rng.standard_normal(5).astype(ml_dtypes.bfloat16)}
    save(tensors, tmp_path / "m.safetensors")
    out = load(tmp_path / "m.safetensors", dtype="bf16")
    assert out["w"].dtype == dtypes.bfloat16
    assert same_bytes(out["w"].numpy(), tensors["w"].astype(ml_dtypes.bfloat16))
    assert same_bytes(out["h"].numpy(), tensors["h"].astype(ml_dtypes.bfloat16))
    assert same_bytes(out["b"].numpy(), tensors["b"])
    assert out["ids"].dtype == dtypes.int64 and same_bytes(out["ids"].numpy(), tensors["ids"])
    assert out["mask"].dtype == dtypes.bool_ and same_bytes(out["mask"].numpy(), tensors["mask"])


def test_expected_shapes(tmp_path):
    rng = np.random.default_rng(9)
    save({"a": rand_array(rng, "F32", (4, 6)), "b": rand_array(rng, "F32", (6,))}, tmp_path / "m.safetensors")
    out = load(tmp_path / "m.safetensors", expected_shapes={"a": (4, 6), "b": [6], "not_loaded": (1,)},
               names=["a", "b"])
    assert out["a"].shape == (4, 6)
    with pytest.raises(ShapeError, match=r"m\.safetensors") as e:
        load(tmp_path / "m.safetensors", expected_shapes={"a": (6, 4), "b": (6,)})
    assert "'a'" in str(e.value) and "[6, 4]" in str(e.value) and "[4, 6]" in str(e.value)


# -------------------------------------------------------------------------------------------- broken files
def good_file(tmp_path, name="good.safetensors") -> tuple[str, bytes]:
    rng = np.random.default_rng(10)
    path = tmp_path / name
    save({"a": rand_array(rng, "F32", (8, 8)), "b": rand_array(rng, "BF16", (16,))}, path)
    return str(path), path.read_bytes()


def test_truncated_data(tmp_path):
    path, raw = good_file(tmp_path)
    with open(path, "wb") as f:
        f.write(raw[:-5])
    with pytest.raises(SafetensorsError, match=r"good\.safetensors.*truncated"):
        SafetensorsFile(path)
    with pytest.raises(SafetensorsError, match=r"good\.safetensors"):
        load(path)


def test_truncated_header(tmp_path):
    path, raw = good_file(tmp_path)
    n = struct.unpack("<Q", raw[:8])[0]
    for cut in (n // 2 + 8, 5):
        with open(path, "wb") as f:
            f.write(raw[:cut])
        with pytest.raises(SafetensorsError, match=r"good\.safetensors.*truncated"):
            SafetensorsFile(path)


def test_trailing_bytes(tmp_path):
    path, raw = good_file(tmp_path)
    with open(path, "wb") as f:
        f.write(raw + b"\0" * 8)
    with pytest.raises(SafetensorsError, match=r"good\.safetensors.*trailing"):
        SafetensorsFile(path)


def test_overlapping_offsets(tmp_path):
    hdr = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path = write_raw(tmp_path / "ov.safetensors", hdr, bytes(24))
    with pytest.raises(SafetensorsError, match=r"ov\.safetensors.*overlap"):
        SafetensorsFile(path)


def test_gap_between_tensors(tmp_path):
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}
    path = write_raw(tmp_path / "gap.safetensors", hdr, bytes(24))
    with pytest.raises(SafetensorsError, match=r"gap\.safetensors.*belong to no tensor"):
        SafetensorsFile(path)


def test_offsets_out_of_range(tmp_path):
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path = write_raw(tmp_path / "oor.safetensors", hdr, bytes(12))
    with pytest.raises(SafetensorsError, match=r"oor\.safetensors.*'b'.*past the end"):
        SafetensorsFile(path)
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}
    with pytest.raises(SafetensorsError, match=r"oor\.safetensors.*'a'.*data_offsets"):
        SafetensorsFile(write_raw(tmp_path / "oor.safetensors", hdr, bytes(8)))


def test_size_does_not_match_shape(tmp_path):
    hdr = {"a": {"dtype": "BF16", "shape": [3, 3], "data_offsets": [0, 16]}}
    path = write_raw(tmp_path / "sz.safetensors", hdr, bytes(16))
    with pytest.raises(SafetensorsError, match=r"sz\.safetensors.*'a'.*needs 18"):
        SafetensorsFile(path)


def test_unknown_dtype(tmp_path):
    hdr = {"ok": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "w": {"dtype": "F12", "shape": [2], "data_offsets": [4, 8]}}
    path = write_raw(tmp_path / "dt.safetensors", hdr, bytes(8))
    with pytest.raises(UnsupportedDtypeError, match=r"dt\.safetensors.*'w'.*'F12'"):
        SafetensorsFile(path)
    with pytest.raises(UnsupportedDtypeError, match=r"dt\.safetensors"):
        load(path)


def test_packed_dtype_is_listed_but_not_viewable(tmp_path):
    hdr = {"q": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]},
           "s": {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [3, 5]}}
    path = write_raw(tmp_path / "mx.safetensors", hdr, bytes([1, 2, 3, 127, 128]))
    with SafetensorsFile(path) as f:
        assert f.keys() == ["q", "s"] and f.shape("q") == (2, 3)
        assert f.numpy("s").dtype == ml_dtypes.float8_e8m0fnu
        with pytest.raises(UnsupportedDtypeError, match=r"mx\.safetensors.*'q'.*F4"):
            f.numpy("q")
    with pytest.raises(UnsupportedDtypeError, match=r"mx\.safetensors.*'q'"):
        load(path)
    with pytest.raises(UnsupportedDtypeError, match=r"mx\.safetensors.*'s'.*float8_e8m0fnu"):
        load(path, names=["s"])  # numpy can view it, but fastdm Tensors cannot hold it
    odd = {"q": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}
    with pytest.raises(SafetensorsError, match="whole bytes"):
        SafetensorsFile(write_raw(tmp_path / "odd.safetensors", odd, bytes(2)))


@pytest.mark.parametrize("header,what", [
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]', "not valid JSON"),
    (b"[1, 2, 3]", "not an object"),
    (b"\xff\xfe{}", "UTF-8"),
    (b'{"a": {"dtype": "F32", "shape": [1]}}', "data_offsets"),
    (b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "shape"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "twice"),
    (b'{"__metadata__": {"n": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "__metadata__"),
])
def test_bad_header(tmp_path, header, what):
    path = write_raw(tmp_path / "bad.safetensors", header, bytes(4))
    with pytest.raises(SafetensorsError, match=rf"bad\.safetensors.*{what}"):
        SafetensorsFile(path)


def test_header_too_large(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}" + bytes(6))
    with pytest.raises(SafetensorsError, match=r"huge\.safetensors.*limit"):
        SafetensorsFile(path)


def test_missing_shard(tmp_path):
    save_sharded(make_model(np.random.default_rng(11)), tmp_path, max_shard_bytes=7000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(SafetensorsError, match=rf"index\.json.*{victim.name}.*missing"):
        open_checkpoint(tmp_path)
    with pytest.raises(SafetensorsError, match=victim.name):
        load(tmp_path / "model.safetensors.index.json")


def test_index_points_at_missing_tensor(tmp_path):
    index = save_sharded(make_model(np.random.default_rng(12)), tmp_path, max_shard_bytes=7000)
    idx = json.loads(index.read_text())
    idx["weight_map"]["ghost.weight"] = idx["weight_map"]["pos_ids"]
    index.write_text(json.dumps(idx))
    with pytest.raises(SafetensorsError, match=r"'ghost\.weight'.*model-\d+-of-\d+\.safetensors"):
        open_checkpoint(index)


def test_bad_index_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(SafetensorsError, match=r"model\.safetensors\.index\.json.*JSON"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(SafetensorsError, match="weight_map"):
        open_checkpoint(tmp_path)


def test_missing_tensor_names_file_and_suggests(tmp_path):
    path, _ = good_file(tmp_path)
    with pytest.raises(SafetensorsError, match=r"good\.safetensors.*'c'"):
        load(path, names=["a", "c"])
    with SafetensorsFile(path) as f, pytest.raises(SafetensorsError, match="did you mean 'a'"):
        f.numpy("aa")
    with pytest.raises(SafetensorsError, match="2 requested tensors"):
        load(path, names=["x", "y", "a"])


def test_folder_problems(tmp_path):
    with pytest.raises(SafetensorsError, match="no .safetensors file"):
        open_checkpoint(tmp_path)
    good_file(tmp_path, "one.safetensors")
    assert open_checkpoint(tmp_path).files == [str(tmp_path / "one.safetensors")]
    good_file(tmp_path, "two.safetensors")
    with pytest.raises(SafetensorsError, match="several .safetensors files"):
        open_checkpoint(tmp_path)
    with pytest.raises(SafetensorsError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(SafetensorsError, match="folder"):
        SafetensorsFile(tmp_path)


def test_format_dtype_table_is_complete():
    # Every dtype the format defines (safetensors 0.6+), and every fastdm dtype maps to one of them.
    assert set(FORMAT_DTYPES) == {"BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3",
                                  "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32",
                                  "U32", "F32", "C64", "F64", "I64", "U64"}
    for d in dtypes.ALL:
        assert FORMAT_DTYPES[d.safetensors].dtype == d


def test_views_outlive_close(tmp_path):
    path, _ = good_file(tmp_path)
    f = SafetensorsFile(path)
    arr = f.numpy("a")
    expect = arr.copy()
    f.close()
    os.remove(path)
    np.testing.assert_array_equal(arr, expect)
    with pytest.raises(SafetensorsError, match="closed"):
        f.numpy("b")
