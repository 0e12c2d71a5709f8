"""Text-to-image pipelines, one per model family, and `Pipeline.from_pretrained`, which reads a diffusers pipeline
folder's model_index.json and builds the fastdm pipeline that its `_class_name` names.

    pipe = Pipeline.from_pretrained("/models/FLUX.1-dev")            # a FluxPipeline, on the GPU when there is one
    images = pipe("a frog holding a sign that says hello", seed=0)   # a list of PIL images
    print(pipe.timings)                                              # load / encode / per-step / decode / total
    sdxl = Pipeline.from_pretrained("/models/stable-diffusion-xl-base-1.0")   # a StableDiffusionXLPipeline
    images = sdxl("an astronaut riding a horse", negative_prompt="blurry", scheduler="dpmpp_2m_karras")
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ...runtime import cuda, dtypes
from ...runtime.dtypes import DType
from ...runtime.errors import InvalidArgumentError, ModelLayoutError, NoGpuError, UnsupportedDtypeError
from ...runtime.tensor import Tensor
from ..vae import to_pil
from ..vae.image import to_numpy

MODEL_INDEX = "model_index.json"


# --------------------------------------------------------------------------------------------- model folders
def read_model_index(folder: str | Path) -> dict[str, Any]:
    """The parsed model_index.json of a diffusers pipeline folder; ModelLayoutError when `folder` is not one."""
    folder = Path(folder)
    if not folder.exists():
        raise ModelLayoutError(f"{folder} does not exist: pass the folder of a diffusers pipeline checkpoint "
                               "(e.g. a download of black-forest-labs/FLUX.1-dev)")
    if folder.name == MODEL_INDEX:
        raise ModelLayoutError(f"{folder} is the index file; pass the folder that holds it ({folder.parent})")
    if not folder.is_dir():
        raise ModelLayoutError(f"{folder} is a file, not a diffusers pipeline folder (with model_index.json). "
                               "Single files: an SDXL .safetensors loads with Pipeline.from_pretrained(file, "
                               "tokenizer_folder=...); a FLUX transformer file with "
                               "Pipeline.from_pretrained(flux_folder, transformer=file)")
    path = folder / MODEL_INDEX
    if not path.is_file():
        hint = (" It looks like a single component (it has config.json): pass the pipeline folder above it."
                if (folder / "config.json").is_file() else "")
        raise ModelLayoutError(f"{folder} has no {MODEL_INDEX}, so it is not a diffusers pipeline folder.{hint} "
                               "Pass the root of the checkpoint (the folder holding model_index.json, transformer/, "
                               "vae/, ...)")
    try:
        index = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLayoutError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ModelLayoutError(f"{path} has no \"_class_name\" naming the pipeline; re-download the checkpoint")
    return index


def component_folder(folder: str | Path, index: Mapping[str, Any], name: str, classes: tuple[str, ...] = ()) -> Path:
    """folder/<name>, checked against model_index.json: the component is listed (with one of `classes`, when
    given) and its folder exists."""
    folder = Path(folder)
    entry = index.get(name)
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
        raise ModelLayoutError(f"{folder}/{MODEL_INDEX} lists no '{name}' component, which a "
                               f"{index.get('_class_name')} needs; the checkpoint is incomplete or of another kind")
    if classes and entry[1] not in classes:
        raise ModelLayoutError(f"{folder}/{MODEL_INDEX}: component '{name}' is a {entry[1]}; fastdm's "
                               f"{index.get('_class_name')} takes {' or '.join(classes)} there")
    path = folder / name
    if not path.is_dir():
        raise ModelLayoutError(f"{folder} has no {name}/ folder, although {MODEL_INDEX} lists it: the download is "
                               f"incomplete; fetch {name}/ again")
    return path


# ---------------------------------------------------------------------------------------- device and dtype
def check_image_size(height: Any, width: Any, multiple: int, family: str, why: str) -> None:
    """height and width: integers, at least and a multiple of `multiple`; the message names the nearest valid
    sizes. `family` ("FLUX", "SDXL") and `why` (the reason for the multiple) go into the message."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InvalidArgumentError(f"{name} must be an integer number of pixels, got {v!r}")
        if v < multiple:
            raise InvalidArgumentError(f"{name} {v} is too small: {family} images are at least {multiple} pixels and "
                                       f"a multiple of {multiple}; use {multiple}")
        if v % multiple:
            lo = v // multiple * multiple
            raise InvalidArgumentError(f"{name} {v} is not a multiple of {multiple} ({why}): use {lo} or "
                                       f"{lo + multiple}")


def gpu_ready() -> bool:
    """A GPU is visible and the kernel library loads (never raises)."""
    try:
        from ... import kernels

        return cuda.is_available() and kernels.available()
    except Exception:
        return False


def resolve_device(device: Any = None) -> Any:
    """"cuda" when a GPU and the kernel library are available, else "cpu"; an explicit device is checked."""
    if device is None:
        return cuda.device("cuda") if gpu_ready() else cuda.CPU
    if str(device).strip().lower() == "cpu" or device is cuda.CPU:
        return cuda.CPU
    if not gpu_ready():
        raise NoGpuError(f"device {str(device)!r} was asked for, but no CUDA GPU is visible or the fastdm kernel "
                         "library is not built (install with nvcc on the PATH); use device='cpu' to run the numpy "
                         "reference")
    try:
        return cuda.device(device)
    except ValueError:
        raise InvalidArgumentError(f"unknown device {device!r}: use 'cuda', 'cuda:N' or 'cpu'") from None


def resolve_dtype(dtype: Any, device: Any) -> DType:
    """bfloat16 on a GPU, float32 on the CPU (whose ops compute in float32 anyway), unless `dtype` says otherwise."""
    if dtype is None:
        return dtypes.bfloat16 if device.type == "cuda" else dtypes.float32
    dt = dtypes.dtype(dtype)
    if dt not in (dtypes.float32, dtypes.bfloat16, dtypes.float16):
        raise UnsupportedDtypeError(f"dtype {dt.name} is not a compute dtype; use bfloat16, float16 or float32")
    if device.type == "cuda" and dt == dtypes.float32:
        raise UnsupportedDtypeError("float32 does not run on the GPU (its attention kernels take bfloat16 and "
                                    "float16); use dtype bfloat16 there, or device='cpu' for float32")
    return dt


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (timings are then wall-clock truths); nothing to do on the CPU."""
    if device.type == "cuda":
        device.synchronize()


# ------------------------------------------------------------------------------------------------- timings
@dataclass
class Timings:
    """Seconds spent in each stage of the last call (load: from_pretrained), and the GPU's peak memory."""

    load_s: float = 0.0
    encode_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    decode_s: float = 0.0
    total_s: float = 0.0
    peak_memory_bytes: int | None = None  # bytes fastdm held at the busiest moment of the call; None on the CPU

    @property
    def mean_step_s(self) -> float:
        return sum(self.step_s) / len(self.step_s) if self.step_s else 0.0


class CallClock(NamedTuple):
    """The clocks of one pipeline call: `total` runs from its start, `step` is lapped after each stage."""

    total: Stopwatch
    step: Stopwatch


class Stopwatch:
    """Wall-clock seconds since start, read after the device's queue drains."""

    def __init__(self, device: Any):
        self.device = device
        self.start = time.perf_counter()

    def lap(self) -> float:
        synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


# ---------------------------------------------------------------------------------------------- pipelines
class Pipeline:
    """Base class of fastdm's pipelines. `Pipeline.from_pretrained(folder)` returns the pipeline that the folder's
    model_index.json names (FluxPipeline, ...); `<Family>Pipeline.from_pretrained` also checks the family."""

    CLASS_NAMES: tuple[str, ...] = ()  # the diffusers `_class_name`s a subclass runs

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: Any = None, dtype: Any = None, **options: Any) -> Pipeline:
        """Load a diffusers pipeline folder. device: "cuda" (default where a GPU and the kernel library are
        available), "cuda:N" or "cpu"; dtype: bfloat16 on a GPU, float32 on the CPU by default. `options` are the
        pipeline class's own (e.g. free_text_encoders=True for FLUX)."""
        start = time.perf_counter()
        if Path(folder).is_file() and Path(folder).suffix == ".safetensors":
            return cls._from_single_file(Path(folder), device, dtype, start, **options)
        target, index = cls._class_for(folder)
        dev = resolve_device(device)
        pipe = target._load(Path(folder), index, dev, resolve_dtype(dtype, dev), **options)
        synchronize(dev)
        pipe.timings.load_s = time.perf_counter() - start
        return pipe

    @classmethod
    def _from_single_file(cls, path: Path, device: Any, dtype: Any, start: float,
                          tokenizer_folder: str | Path | None = None) -> Pipeline:
        """An SDXL pipeline from one Stability-layout file (sd_xl_base_1.0.safetensors); the tokenizers come from
        `tokenizer_folder` or $FASTDM_SDXL_TOKENIZERS. A single FLUX file holds only the transformer: the SDXL
        loader's error says to pass the FLUX folder with transformer=<file>."""
        from ..convert.sdxl_single_file import build_pipeline

        dev = resolve_device(device)
        pipe = build_pipeline(path, dev, resolve_dtype(dtype, dev), tokenizer_folder=tokenizer_folder)
        if not isinstance(pipe, cls):
            raise ModelLayoutError(f"{path} holds an SDXL checkpoint, not a {cls.__name__}; load it with "
                                   "fastdm.Pipeline.from_pretrained")
        synchronize(dev)
        pipe.timings.load_s = time.perf_counter() - start
        return pipe

    @classmethod
    def check_call(cls, folder: str | Path, **call_args: Any) -> None:
        """Check arguments of a later call (e.g. height, width) against the folder's model without loading its
        weights, raising what the call would raise; a CLI uses it to fail fast before a long load."""
        target, index = cls._class_for(folder)
        target._check_call(Path(folder), index, **call_args)

    @classmethod
    def class_for(cls, folder: str | Path) -> type[Pipeline]:
        """The pipeline class that would load `folder` (from its model_index.json, nothing loaded); raises what
        from_pretrained raises for a folder that is not a supported pipeline."""
        return cls._class_for(folder)[0]

    @classmethod
    def _class_for(cls, folder: str | Path) -> tuple[type[Pipeline], dict[str, Any]]:
        index = read_model_index(folder)
        name = index["_class_name"]
        target = PIPELINES.get(name)
        if target is None:
            known = ", ".join(sorted(PIPELINES))
            raise ModelLayoutError(f"{folder} holds a {name}, which fastdm does not run; supported pipelines: {known}")
        if cls is not Pipeline and not issubclass(target, cls):
            raise ModelLayoutError(f"{folder} holds a {name}, not a {cls.__name__}; load it with "
                                   f"fastdm.Pipeline.from_pretrained, which picks the right class")
        return target, index

    # each pipeline class implements these two
    @classmethod
    def _load(cls, folder: Path, index: dict[str, Any], device: Any, dtype: DType, **options: Any) -> Pipeline:
        raise NotImplementedError(f"{cls.__name__} does not load from a folder")

    @classmethod
    def _check_call(cls, folder: Path, index: dict[str, Any], **call_args: Any) -> None:
        raise NotImplementedError(f"{cls.__name__} has no argument check")

    def __init__(self, device: Any, dtype: DType):
        self.device = device
        self.dtype = dtype
        self.timings = Timings()

    def _begin_call(self, seed: Any) -> CallClock:
        """The start of a call: check and record `seed` (a fresh random one when None), clear the timings and
        restart the GPU's peak-memory counters. Returns the clocks that _finish_call reads."""
        if seed is None:
            seed = secrets.randbits(63)
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InvalidArgumentError(f"seed must be an integer, got {seed!r}")
        self.last_seed = int(seed)
        t = self.timings
        t.encode_s, t.step_s, t.decode_s, t.total_s, t.peak_memory_bytes = 0.0, [], 0.0, 0.0, None
        if self.device.type == "cuda":
            from ...runtime import graphs, memory

            memory.allocator(self.device).reset_peak()
            graphs.reset_graph_memory_peak(self.device)
        return CallClock(Stopwatch(self.device), Stopwatch(self.device))

    def _finish_call(self, clock: CallClock, latents: Tensor, decode: Callable[[Tensor], Tensor],
                     output_type: str) -> Any:
        """The end of a call, after the denoising loop: CUDA-graph memory back to the card (the denoiser's graph
        has finished), then the latents as numpy (output_type "latent") or decode(latents) as PIL images / numpy,
        and the total time and peak memory in the timings."""
        t = self.timings
        if self.device.type == "cuda":
            from ...runtime import graphs

            graphs.trim_graph_memory(self.device)
        if output_type == "latent":
            out = latents.numpy()
        else:
            images = decode(latents)  # [B, 3, H, W]
            out = to_pil(images) if output_type == "pil" else to_numpy(images)
            t.decode_s = clock.step.lap()
        t.total_s = clock.total.lap()
        if self.device.type == "cuda":
            from ...runtime import graphs, memory

            # The allocator's peak plus the peak of CUDA-graph memory (a replayed graph's activations are graph
            # allocations, outside the allocator). The two may fall at different moments, so an upper bound.
            t.peak_memory_bytes = (memory.allocator(self.device).stats().peak
                                   + graphs.graph_memory_used(self.device, peak=True))
        return out


from .flux import FluxPipeline  # noqa: E402  (these subclass Pipeline, defined above)
from .sdxl import StableDiffusionXLPipeline  # noqa: E402

PIPELINES: dict[str, type[Pipeline]] = {name: cls for cls in (FluxPipeline, StableDiffusionXLPipeline)
                                        for name in cls.CLASS_NAMES}

__all__ = ["FluxPipeline", "PIPELINES", "Pipeline", "StableDiffusionXLPipeline", "Timings", "component_folder",
           "read_model_index", "resolve_device", "resolve_dtype"]
