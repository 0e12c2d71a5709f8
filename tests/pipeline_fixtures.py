"""Shared by the pipeline tests: the committed tiny pipelines' I/O fixtures and editable copies of their folders."""

import json
import shutil
from pathlib import Path

from safetensors import safe_open


def io_metadata(io_path: Path) -> dict:
    """The string metadata of a pipeline I/O fixture (its cases, the generator's torch CPU capability, ...)."""
    with safe_open(str(io_path), "np") as f:
        return f.metadata()


def noise_kernel(meta: dict) -> str:
    """The Box-Muller kernel torch ran when the fixture was drawn: every x86 AVX2/AVX-512 CPU runs the same one."""
    return "default" if meta["cpu_capability"] == "DEFAULT" else "avx2"


def pipeline_copy(tiny: Path, tmp_path: Path, skip: str | None = None) -> Path:
    """tmp_path/model: tiny's model_index.json copied (editable), its components linked (skip: left out)."""
    root = tmp_path / "model"
    root.mkdir()
    shutil.copy(tiny / "model_index.json", root / "model_index.json")
    for part in tiny.iterdir():
        if part.is_dir() and part.name != skip:
            (root / part.name).symlink_to(part.resolve(), target_is_directory=True)
    return root


def edit_index(root: Path, **changes) -> None:
    """Sets (or, for None, removes) entries of root/model_index.json."""
    index = json.loads((root / "model_index.json").read_text())
    for k, v in changes.items():
        if v is None:
            index.pop(k, None)
        else:
            index[k] = v
    (root / "model_index.json").write_text(json.dumps(index))
