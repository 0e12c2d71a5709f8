"""safetensors I/O, implemented from the format (no dependency on the `safetensors` package).

    ckpt = open_checkpoint("/models/FLUX.1-dev/transformer")   # a file, an *.index.json or a folder
    ckpt.keys(); ckpt.shape(name); ckpt.dtype(name); ckpt.numpy(name)   # zero-copy read-only view
    weights = load(ckpt, device="cuda", dtype="bf16")          # name -> Tensor
    save({"w": tensor}, "out.safetensors"); save_sharded(tensors, "out/", max_shard_bytes=5 << 30)
"""

from .format import FORMAT_DTYPES, MAX_HEADER_BYTES
from .loader import load
from .reader import Checkpoint, SafetensorsFile, open_checkpoint
from .writer import save, save_sharded

__all__ = ["FORMAT_DTYPES", "MAX_HEADER_BYTES", "Checkpoint", "SafetensorsFile", "load", "open_checkpoint", "save",
           "save_sharded"]
