"""Shared numerics for tests: error measures and random inputs."""

import numpy as np

# Relative L2 error bounds by compute dtype (DESIGN.md: bf16 ~1e-2).
TOL = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 1.5e-2}


def rel_l2(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in `out` gives inf (never passes)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        return float("inf")
    denom = np.linalg.norm(ref.ravel())
    return float(np.linalg.norm((out - ref).ravel()) / (denom if denom > 0 else 1.0))


def randn(rng: np.random.Generator, *shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)
