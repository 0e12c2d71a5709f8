"""fastdm: diffusion-model inference without PyTorch."""

from pathlib import Path as _Path

# In a source checkout the subpackages (runtime/, models/, ...) sit beside this folder rather than inside it
# (setup.py maps them in at install time); let `import fastdm.runtime` find them there too.
if not (_Path(__file__).parent / "runtime").is_dir() and (_Path(__file__).parent.parent / "runtime").is_dir():
    __path__.append(str(_Path(__file__).parent.parent))  # noqa: F821  (__path__ is set for packages)

from .runtime import dtypes  # noqa: E402
from .runtime.dtypes import bfloat16, float16, float32  # noqa: E402
from .runtime.errors import FastdmError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["FastdmError", "Pipeline", "bfloat16", "dtypes", "float16", "float32"]


def __getattr__(name: str):
    # The pipelines import every model family; load them on first use so `import fastdm` stays light.
    if name == "Pipeline":
        from .models.pipelines import Pipeline

        return Pipeline
    raise AttributeError(f"module 'fastdm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"Pipeline"})
