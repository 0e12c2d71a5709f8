"""load(): tensors of a checkpoint as fastdm Tensors on the CPU (zero-copy views) or on a GPU (staged upload)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .. import dtypes
from ..dtypes import DType
from ..errors import SafetensorsError, ShapeError, UnsupportedDtypeError
from .format import Entry
from .reader import Checkpoint, SafetensorsFile, open_checkpoint


@dataclass(frozen=True)
class LoadItem:
    """One tensor to load: where its bytes are and what it becomes."""

    name: str
    file: SafetensorsFile
    entry: Entry
    src: DType  # dtype in the file
    out: DType  # dtype asked for (== src when no conversion)


def _is_cpu(device) -> bool:
    return (isinstance(device, str) and device == "cpu") or getattr(device, "type", None) == "cpu"


def plan(ckpt: Checkpoint, names: Iterable[str] | None, dtype: DType | str | None,
         expected_shapes: Mapping[str, Iterable[int]] | None) -> list[LoadItem]:
    """Resolve names to file locations and target dtypes; raise for every problem before any byte moves."""
    want = ckpt.keys() if names is None else list(dict.fromkeys(names))
    missing = [n for n in want if n not in ckpt]
    if missing:
        if len(missing) == 1:
            ckpt.file_of(missing[0])  # raises with a "did you mean" hint
        shown = ", ".join(map(repr, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise SafetensorsError(f"{ckpt.source}: {len(missing)} requested tensors are not in the checkpoint "
                               f"({shown}); check the names, or that this checkpoint is the model you meant")
    target = dtypes.dtype(dtype) if dtype is not None else None
    items, wrong = [], []
    for name in want:
        f = ckpt.file_of(name)
        e = f.entry(name)
        if expected_shapes is not None and name in expected_shapes:
            exp = tuple(int(d) for d in expected_shapes[name])
            if exp != e.shape:
                wrong.append(f"{name!r} in {f.path}: file has {list(e.shape)}, expected {list(exp)}")
        src = f.dtype(name)  # raises for packed sub-byte types
        if src not in dtypes.ALL:
            raise UnsupportedDtypeError(
                f"{f.path}: tensor {name!r} is {src.name}, which fastdm tensors cannot hold yet; leave it out "
                f"(names=...) or read its bytes with open_checkpoint(...).numpy({name!r})")
        out = target if target is not None and src.is_floating and target != src else src
        items.append(LoadItem(name, f, e, src, out))
    if wrong:
        raise ShapeError(f"{len(wrong)} tensor(s) do not have the shapes the model expects: " + "; ".join(wrong[:8])
                         + ("; ..." if len(wrong) > 8 else "")
                         + ". The checkpoint does not match the model config: check the model variant and config.")
    return items


def load(source: str | os.PathLike | Checkpoint | SafetensorsFile, device="cpu", dtype: DType | str | None = None,
         names: Iterable[str] | None = None,
         expected_shapes: Mapping[str, Iterable[int]] | None = None) -> dict:
    """Load tensors (all, or `names`) into a dict name -> Tensor.

    source: a .safetensors file, a *.safetensors.index.json, a folder with one of them, or an open
      Checkpoint / SafetensorsFile. device: "cpu" (read-only views of the mapped files, no copy) or a GPU
      ("cuda", "cuda:1", a Device): bytes stream through pinned staging buffers with async copies.
    dtype: convert floating-point tensors to it (integer and bool tensors keep theirs); on the CPU with numpy,
      on a GPU with ops.cast on the device after the upload.
    expected_shapes: name -> shape; a loaded tensor listed there with another shape raises ShapeError.
    """
    owned = not isinstance(source, (Checkpoint, SafetensorsFile))
    ckpt = open_checkpoint(source)
    try:
        items = plan(ckpt, names, dtype, expected_shapes)
        if _is_cpu(device):
            from ..tensor import Tensor

            out = {}
            for it in items:
                arr = it.file.numpy(it.name)
                out[it.name] = Tensor.from_numpy(arr if it.out == it.src else arr.astype(it.out.np))
            return out
        from .upload import upload

        return upload(items, device)
    finally:
        if owned:
            ckpt.close()  # CPU views keep their mappings alive on their own
