"""Reading: one memory-mapped .safetensors file, and a checkpoint over a file, a sharded index or a folder."""

from __future__ import annotations

import difflib
import json
import mmap
import os
import re
from pathlib import Path

import numpy as np

from ..dtypes import DType
from ..errors import SafetensorsError, UnsupportedDtypeError
from .format import Entry, parse_header

INDEX_SUFFIX = ".safetensors.index.json"
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


def _missing(where: str, name: str, keys) -> SafetensorsError:
    close = difflib.get_close_matches(name, list(keys), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return SafetensorsError(f"{where}: no tensor named {name!r}{hint} Check the name, or that this checkpoint "
                            "is the model you meant.")


class SafetensorsFile:
    """One .safetensors file. The header is parsed and validated on open; the data is memory-mapped read-only,
    so `numpy(name)` costs nothing until the bytes are touched."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            f = open(self.path, "rb")  # noqa: SIM115  (kept open: the loader reads through its descriptor)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: no such file; check the path") from None
        except IsADirectoryError:
            raise SafetensorsError(f"{self.path} is a folder; open it with open_checkpoint(), which finds the "
                                   "file or index inside") from None
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot open ({e.strerror}); check the path and permissions") \
                from None
        try:
            size = os.fstat(f.fileno()).st_size
            self._header = parse_header(self.path, f, size)
            self._mmap: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            f.close()
            raise
        self._file = f

    # ---------------------------------------------------------------------------------------------- queries
    @property
    def metadata(self) -> dict[str, str]:
        """The file's `__metadata__` (empty when it has none)."""
        return dict(self._header.metadata or {})

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._header.entries)

    def __contains__(self, name: object) -> bool:
        return name in self._header.entries

    def __len__(self) -> int:
        return len(self._header.entries)

    def entry(self, name: str) -> Entry:
        """Where and what tensor `name` is (dtype, shape, absolute byte range in the file)."""
        try:
            return self._header.entries[name]
        except KeyError:
            raise _missing(self.path, name, self._header.entries) from None

    def dtype(self, name: str) -> DType:
        e = self.entry(name)
        if e.fmt.dtype is None:
            raise self._packed_error(e)
        return e.fmt.dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def numpy(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's bytes in the mapped file (no copy)."""
        e = self.entry(name)
        if e.fmt.dtype is None:
            raise self._packed_error(e)
        if self._mmap is None:
            raise SafetensorsError(f"{self.path}: the file was closed; open it again to read {name!r}")
        return np.frombuffer(self._mmap, dtype=e.fmt.dtype.np, count=e.numel, offset=e.begin).reshape(e.shape)

    def fileno(self) -> int:
        return self._file.fileno()

    def _packed_error(self, e: Entry) -> UnsupportedDtypeError:
        return UnsupportedDtypeError(
            f"{self.path}: tensor {e.name!r} is {e.fmt.name}, a packed {e.fmt.bits}-bit type that numpy cannot "
            "view and fastdm does not support yet; leave it out (names=...) or use a checkpoint without it")

    # -------------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the file. Arrays already returned by numpy() stay valid (they keep the mapping alive)."""
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # views exist; the mapping goes away with the last of them
            self._mmap = None
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


class Checkpoint:
    """Tensors spread over one or more .safetensors files (see open_checkpoint). Same queries as
    SafetensorsFile; `files` lists the paths in the order they were opened."""

    def __init__(self, source: str, shards: list[SafetensorsFile], where: dict[str, SafetensorsFile],
                 metadata: dict):
        self.source = source
        self._shards = shards
        self._where = where
        self._metadata = metadata

    @property
    def files(self) -> list[str]:
        return [s.path for s in self._shards]

    @property
    def metadata(self) -> dict:
        """A single file's `__metadata__`, or the `metadata` object of a sharded checkpoint's index."""
        return dict(self._metadata)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def file_of(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise _missing(self.source, name, self._where) from None

    def dtype(self, name: str) -> DType:
        return self.file_of(name).dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file_of(name).shape(name)

    def numpy(self, name: str) -> np.ndarray:
        return self.file_of(name).numpy(name)

    def close(self) -> None:
        for s in self._shards:
            s.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self)} tensors in {len(self._shards)} file(s))"


def _from_files(source: str, paths: list[Path], metadata: dict | None = None) -> Checkpoint:
    shards: list[SafetensorsFile] = []
    where: dict[str, SafetensorsFile] = {}
    try:
        for p in paths:
            f = SafetensorsFile(p)
            shards.append(f)
            for name in f.keys():
                if name in where:
                    raise SafetensorsError(f"{source}: tensor {name!r} is in both {where[name].path} and {f.path}; "
                                           "remove the stale file or load one explicitly")
                where[name] = f
    except BaseException:
        for s in shards:
            s.close()
        raise
    return Checkpoint(source, shards, where, shards[0].metadata if metadata is None else metadata)


def _from_index(index: Path) -> Checkpoint:
    src = str(index)
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SafetensorsError(f"{src}: no such index file; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{src}: index is not valid JSON ({e}); re-download it") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise SafetensorsError(f"{src}: index has no 'weight_map' object mapping tensor names to shard files; "
                               "re-download it")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{src}: index 'metadata' must be an object, got {type(metadata).__name__}")

    counts: dict[str, int] = {}
    for shard in weight_map.values():
        counts[shard] = counts.get(shard, 0) + 1
    for shard, n in counts.items():
        if not (index.parent / shard).is_file():
            raise SafetensorsError(f"{src}: shard {shard!r} (holding {n} tensors) is missing from {index.parent}; "
                                   "download it, or re-save the checkpoint")
    opened: dict[str, SafetensorsFile] = {}
    try:
        for shard in counts:
            opened[shard] = SafetensorsFile(index.parent / shard)
        where: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            f = opened[shard]
            if name not in f:
                raise SafetensorsError(f"{src}: the index puts tensor {name!r} in {f.path}, which has no such "
                                       "tensor; the index and shards do not match (download them again together)")
            where[name] = f
    except BaseException:
        for f in opened.values():
            f.close()
        raise
    return Checkpoint(src, list(opened.values()), where, metadata)


def _from_folder(folder: Path) -> Checkpoint:
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) == 1:
        return _from_index(indexes[0])
    if len(indexes) > 1:
        raise SafetensorsError(f"{folder}: holds several indexes ({', '.join(p.name for p in indexes)}); pass "
                               "the one you mean")
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(files) == 1:
        return _from_files(str(folder), files)
    if not files:
        raise SafetensorsError(f"{folder}: no .safetensors file or *{INDEX_SUFFIX} in this folder; pass the "
                               "folder that holds the weights")
    # Shards without their index (prefix-0000i-of-0000n): usable when the set is complete.
    parts = [_SHARD_RE.match(p.name) for p in files]
    if all(parts) and len({(m["prefix"], int(m["n"])) for m in parts}) == 1:
        n = int(parts[0]["n"])
        have = {int(m["i"]) for m in parts}
        lost = sorted(set(range(1, n + 1)) - have)
        if lost:
            raise SafetensorsError(f"{folder}: shard(s) {lost} of {n} are missing and there is no index; "
                                   "download the missing shards")
        if have == set(range(1, n + 1)):
            return _from_files(str(folder), files)
    raise SafetensorsError(f"{folder}: holds several .safetensors files ({', '.join(p.name for p in files[:6])}"
                           f"{', ...' if len(files) > 6 else ''}) and no index; pass the file you mean")


def open_checkpoint(path: str | os.PathLike | Checkpoint | SafetensorsFile) -> Checkpoint:
    """Open a checkpoint: a .safetensors file, a *.safetensors.index.json (sharded: its weight_map names the file
    of each tensor), or a folder holding one file or one index."""
    if isinstance(path, Checkpoint):
        return path
    if isinstance(path, SafetensorsFile):
        return Checkpoint(path.path, [path], dict.fromkeys(path.keys(), path), path.metadata)
    p = Path(path)
    if p.is_dir():
        return _from_folder(p)
    if p.name.endswith(".json"):
        return _from_index(p)
    if not p.exists():
        raise SafetensorsError(f"{p}: no such file or folder; check the path")
    return _from_files(str(p), [p])
