"""Reading a component folder of a diffusers checkpoint: config.json into a config dataclass, the weights through
runtime.safetensors, and one check that the weights are the ones the config describes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..runtime import safetensors
from ..runtime.errors import ModelLayoutError
from ..runtime.tensor import Tensor

C = TypeVar("C")


def component_folder(folder: str | Path, subfolder: str) -> Path:
    """The folder holding the component's config.json: `folder` itself, or `folder/subfolder` when `folder` is the
    root of a pipeline checkpoint (e.g. FLUX.1-dev/ -> FLUX.1-dev/transformer/)."""
    folder = Path(folder)
    for cand in (folder, folder / subfolder):
        if (cand / "config.json").is_file():
            return cand
    raise ModelLayoutError(
        f"{folder} has no config.json (nor {subfolder}/config.json): pass the diffusers component folder, e.g. "
        f"<checkpoint>/{subfolder}, that holds config.json and the *.safetensors weights")


def read_config(cls: type[C], source: str | Path | Mapping[str, Any]) -> C:
    """A config dataclass from a folder's config.json (or an already parsed dict). Keys the dataclass does not
    declare (_class_name, _diffusers_version, options fastdm does not use) are ignored; missing ones keep their
    defaults, as diffusers does."""
    if isinstance(source, Mapping):
        raw, where = dict(source), "the config dict"
    else:
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLayoutError(f"{path} does not exist: a diffusers component folder holds a config.json") from None
        except json.JSONDecodeError as e:
            raise ModelLayoutError(f"{path} is not valid JSON ({e}); re-download or re-export the checkpoint") from None
        where = str(path)
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in raw.items() if k in names})
    except TypeError as e:  # a field without default is absent
        raise ModelLayoutError(f"{where} does not describe a {cls.__name__}: {e}") from None


def load_weights(folder: str | Path, expected: Mapping[str, tuple[int, ...]], what: str, device: Any = "cpu",
                 dtype: Any = None) -> dict[str, Tensor]:
    """Every tensor of the folder's safetensors checkpoint (one file or a sharded index) on `device`, cast to
    `dtype` (None keeps the stored dtype). Names and shapes are checked against `expected` from the header,
    before any byte is read or uploaded."""
    ckpt = safetensors.open_checkpoint(folder)
    try:
        check_weights({n: ckpt.shape(n) for n in ckpt.keys()}, expected, what, str(folder))
        return safetensors.load(ckpt, device=device, dtype=dtype)
    finally:
        ckpt.close()  # loaded CPU tensors keep their own mappings


def check_weights(shapes: Mapping[str, Sequence[int]], expected: Mapping[str, tuple[int, ...]], what: str,
                  source: str) -> None:
    """Raise ModelLayoutError unless `shapes` (name -> shape) has exactly the `expected` names and shapes."""
    missing = [n for n in expected if n not in shapes]
    unexpected = sorted(n for n in shapes if n not in expected)
    misshapen = [f"{n} is {tuple(shapes[n])}, expected {tuple(expected[n])}"
                 for n in expected if n in shapes and tuple(shapes[n]) != tuple(expected[n])]
    if not (missing or unexpected or misshapen):
        return

    def listing(items: list[str]) -> str:
        shown = ", ".join(items[:8])
        return shown + (f" (and {len(items) - 8} more)" if len(items) > 8 else "")

    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {listing(missing)}")
    if misshapen:
        problems.append(f"{len(misshapen)} misshapen: {listing(misshapen)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {listing(unexpected)}")
    raise ModelLayoutError(
        f"{source} is not a {what} checkpoint matching its config: " + "; ".join(problems) + ". Check that "
        "config.json belongs to these weights (layer counts, widths) and that the weights use diffusers' names; "
        "convert other layouts (original / single-file checkpoints) to the diffusers layout first.")


def check_model_weights(weights: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], what: str,
                        source: str) -> None:
    """What a model's constructor checks of the weights dict it is given: every expected tensor present with its
    shape, nothing unexpected (check_weights), and one dtype throughout (check_one_dtype)."""
    check_weights({n: t.shape for n, t in weights.items()}, expected, what, source)
    check_one_dtype(weights, source)


def check_one_dtype(weights: Mapping[str, Tensor], source: str) -> None:
    """Models compute in one dtype: refuse a weights dict that mixes several, naming them."""
    stored = sorted({t.dtype.name for t in weights.values()})
    if len(stored) > 1:
        raise ModelLayoutError(f"{source} mixes tensor dtypes ({', '.join(stored)}); load it with one compute dtype, "
                               "e.g. from_pretrained(..., dtype='bfloat16')")
