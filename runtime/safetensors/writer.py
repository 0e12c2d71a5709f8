"""Writing .safetensors files (byte-identical layout to the reference writer) and sharded checkpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..dtypes import DType
from ..errors import SafetensorsError
from .format import FormatDtype, build_header, format_dtype_of

INDEX_NAME = "{name}.safetensors.index.json"
SHARD_NAME = "{name}-{i:05d}-of-{n:05d}.safetensors"


def _describe(name: str, t) -> tuple[str, FormatDtype, tuple[int, ...], int]:
    """(name, format dtype, shape, nbytes) of a Tensor or numpy array, without touching its data."""
    if not isinstance(name, str):
        raise SafetensorsError(f"tensor names must be strings, got {name!r}")
    what = f"tensor {name!r}"
    if isinstance(t, (np.ndarray, np.generic)):
        fmt = format_dtype_of(t.dtype, what)
        return name, fmt, tuple(t.shape), t.size * t.dtype.itemsize
    dt = getattr(t, "dtype", None)
    if isinstance(dt, DType) and hasattr(t, "numpy"):
        fmt = format_dtype_of(dt, what)
        shape = tuple(t.shape)
        numel = 1
        for d in shape:
            numel *= d
        return name, fmt, shape, numel * dt.itemsize
    raise SafetensorsError(f"{what}: expected a fastdm Tensor or a numpy array, got {type(t).__name__}")


def _host_bytes(t) -> np.ndarray:
    """The tensor's bytes as a flat little-endian C-order uint8 array (downloads GPU tensors)."""
    arr = np.asarray(t) if isinstance(t, (np.ndarray, np.generic)) else t.numpy()
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def save(tensors: Mapping[str, object], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name -> fastdm Tensor or numpy array) to one .safetensors file. The file appears
    complete or not at all (written to a temporary name, then renamed)."""
    specs = [_describe(name, t) for name, t in tensors.items()]
    head, layout = build_header(specs, metadata)
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for name, begin, end in layout:
                if end > begin:
                    data = _host_bytes(tensors[name])
                    if data.size != end - begin:
                        raise SafetensorsError(f"tensor {name!r}: has {data.size} bytes, its shape and dtype say "
                                               f"{end - begin}; it changed while being saved")
                    f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_sharded(tensors: Mapping[str, object], folder: str | os.PathLike, max_shard_bytes: int,
                 metadata: dict[str, str] | None = None, name: str = "model") -> Path:
    """Write `tensors` as `{name}-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` each (a larger
    single tensor gets a shard of its own) plus `{name}.safetensors.index.json`, the transformers/diffusers
    layout (diffusers components use name="diffusion_pytorch_model"). Tensors keep their order; `metadata` goes
    into every shard. Returns the index path."""
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise SafetensorsError(f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size, total = 0, 0
    for key, t in tensors.items():
        nbytes = _describe(key, t)[3]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
        total += nbytes
    n = len(shards)
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        fname = SHARD_NAME.format(name=name, i=i, n=n)
        save({k: tensors[k] for k in keys}, folder / fname, metadata)
        weight_map.update(dict.fromkeys(keys, fname))
    index = folder / INDEX_NAME.format(name=name)
    body = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
    tmp = index.with_name(index.name + f".{os.getpid()}.tmp")
    tmp.write_text(body + "\n", encoding="utf-8")
    os.replace(tmp, index)
    return index
