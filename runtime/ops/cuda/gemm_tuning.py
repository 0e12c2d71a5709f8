"""sm90 GEMM configurations measured on this machine: scripts/tune_gemm.py times every configuration of the kernel
library (kSm90Configs in kernels/gemm.cuh) on the exact problems a model runs and keeps each winner that beats the
library's own choice (its winners table and rule, kernels/gemm.cu) in a JSON cache. The first linear on a Hopper GPU
hands the cache's entries for that card to the library (fdm_gemm_sm90_set_tuned), which then prefers them.

The cache is ~/.cache/fastdm/gemm_sm90.json, or the file FASTDM_GEMM_TUNING names; FASTDM_GEMM_TUNING=off ignores it.
    {"version": 1, "cards": {"<card>": {"<M>x<N>x<K>[-gated]": {"config": 16, "ms": 0.586, "auto_ms": 0.651}}}}
A card is its name, SM count and L2 size ("NVIDIA H100 80GB HBM3|132|50"): entries of other cards stay in the file
and are not loaded. A gated entry is a linear_gated_residual whose batch is one sequence of M rows.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastdm import kernels

from ... import cuda, dtypes
from ...errors import InvalidArgumentError
from ...graphs import Graph
from ...tensor import Tensor

CACHE_VERSION = 1
_loaded: set[int] = set()  # device ordinals whose entries were handed to the library


@dataclass(frozen=True)
class Problem:
    """M x K -> N: x [M, K], weight [N, K]; gated: linear_gated_residual over one sequence of M rows."""

    M: int
    N: int
    K: int
    gated: bool = False

    @property
    def key(self) -> str:
        return f"{self.M}x{self.N}x{self.K}" + ("-gated" if self.gated else "")

    @classmethod
    def parse(cls, text: str) -> Problem:
        """'MxNxK' or 'MxNxK-gated'."""
        body, _, tail = text.strip().partition("-")
        parts = body.split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts) or tail not in ("", "gated"):
            raise InvalidArgumentError(f"GEMM problem {text!r} is not MxNxK or MxNxK-gated with positive sizes "
                                       "(e.g. 4608x9216x3072)")
        m, n, k = map(int, parts)
        return cls(m, n, k, tail == "gated")


def cache_path() -> Path | None:
    """The cache file, or None when FASTDM_GEMM_TUNING=off."""
    env = os.environ.get("FASTDM_GEMM_TUNING", "").strip()
    if env.lower() in ("off", "0", "no", "false"):
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastdm" / "gemm_sm90.json"


def card_key(device: cuda.Device) -> str:
    return f"{device.name}|{device.multiprocessor_count}|{device.l2_cache_size >> 20}"


def read_cache(path: Path) -> dict:
    """The cache's contents ({"version", "cards"}); an empty one if the file does not exist."""
    if not path.exists():
        return {"version": CACHE_VERSION, "cards": {}}
    fix = "delete it, or run scripts/tune_gemm.py again to rewrite it (or set FASTDM_GEMM_TUNING=off)"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"GEMM tuning cache {path} cannot be read ({e}); {fix}") from e
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("cards"), dict):
        raise InvalidArgumentError(f"GEMM tuning cache {path} is not a version {CACHE_VERSION} cache; {fix}")
    count = kernels.library().fdm_gemm_sm90_config_count() if kernels.available() else None
    for card, entries in data["cards"].items():
        if not isinstance(entries, dict):
            raise InvalidArgumentError(f"GEMM tuning cache {path}: card {card!r} holds no entries; {fix}")
        for key, entry in entries.items():
            try:
                Problem.parse(key)
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"GEMM tuning cache {path}: {e}; {fix}") from e
            config = entry.get("config") if isinstance(entry, dict) else None
            if not isinstance(config, int) or config < 0 or (count is not None and config >= count):
                raise InvalidArgumentError(f"GEMM tuning cache {path}: {card!r} {key} has no valid configuration "
                                           f"({entry!r}); {fix}")
    return data


def write_cache(path: Path, data: dict) -> None:
    """Replace the cache file at once (a write to a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def ensure_loaded(device: cuda.Device) -> None:
    """Hand the cache's entries for `device`'s card to the kernel library, once per device and process (a no-op
    off Hopper, without a cache file, or with FASTDM_GEMM_TUNING=off)."""
    if device.index in _loaded:
        return
    _loaded.add(device.index)
    path = cache_path()
    if path is None or device.compute_capability != (9, 0) or not path.exists():
        return
    for key, entry in read_cache(path)["cards"].get(card_key(device), {}).items():
        p = Problem.parse(key)
        kernels.call("fdm_gemm_sm90_set_tuned", p.M, p.N, p.K, int(p.gated), entry["config"])


@dataclass
class Measured:
    problem: Problem
    auto_config: int
    auto_ms: float
    best_config: int
    best_ms: float


def _capture(fn, reps: int) -> Graph:
    """A graph of `reps` back-to-back fn() calls (replayed, host overhead stays out, as in a model run under a graph
    or ahead of the GPU), replayed once to warm up."""
    fn()  # eagerly first: lazy workspaces are made outside the capture (and stay allocated for the graph)
    graph = Graph.capture(lambda: [fn() for _ in range(reps)])
    graph.replay()
    return graph


def _replay_ms(graph: Graph, reps: int) -> float:
    """Device time of one call in one replay of a graph of `reps` calls."""
    start = cuda.Event().record(graph.stream)
    graph.replay()
    end = cuda.Event().record(graph.stream)
    end.synchronize()
    return start.elapsed_ms(end) / reps


def measure(problem: Problem, device: cuda.Device, reps: int = 10, batches: int = 5,
            configs: list[int] | None = None) -> Measured:
    """Time the library's automatic choice and every configuration (or `configs`) on `problem`, bf16, random data."""
    from . import gemm  # the ops; imported here, as gemm imports this module

    if device.compute_capability != (9, 0) or not kernels.library().fdm_has_sm90():
        raise InvalidArgumentError("GEMM tuning needs a compute capability 9.0 GPU and a kernel library built for "
                                   "sm_90a")
    rng = np.random.default_rng(0)
    bf16 = dtypes.bfloat16.np

    def upload(*shape, scale=1.0):
        return Tensor.from_numpy((rng.standard_normal(shape, dtype=np.float32) * scale).astype(bf16), device=device)

    m, n, k = problem.M, problem.N, problem.K
    x, w, b = upload(m, k), upload(n, k, scale=k ** -0.5), upload(n)
    if problem.gated:
        x = x.view(1, m, k)
        gate, residual, out = upload(1, n), upload(1, m, n), upload(1, m, n)

        def run():
            gemm.linear_gated_residual(x, w, b, gate, residual, out=out)
    else:
        out = upload(m, n)

        def run():
            gemm.linear(x, w, b, out=out)

    lib = kernels.library()
    # The library's own choice (winners table or rule) is the one to beat: forget an earlier tuned entry.
    kernels.call("fdm_gemm_sm90_set_tuned", m, n, k, int(problem.gated), -1)
    kernels.call("fdm_gemm_sm90_set_config", -1)
    kernels.call("fdm_gemm_set_path", 1)  # sm90 only: a configuration that cannot take the problem fails
    # One graph per candidate (a graph keeps the configuration it was captured with), then `batches` rounds that
    # replay every candidate once each: the card's clocks drift by several percent over a long run (it settles at
    # its power cap), and interleaved rounds let the drift hit every candidate alike instead of deciding the winner.
    try:
        graphs = {"auto": _capture(run, reps)}
        auto_config = lib.fdm_gemm_sm90_last_config()
        for config in range(lib.fdm_gemm_sm90_config_count()) if configs is None else configs:
            kernels.call("fdm_gemm_sm90_set_config", config)
            try:
                graphs[config] = _capture(run, reps)
            except Exception:  # noqa: BLE001 - a configuration that cannot take this problem is skipped
                continue
    finally:
        kernels.call("fdm_gemm_sm90_set_config", -1)
        kernels.call("fdm_gemm_set_path", 0)
    samples = {key: [] for key in graphs}
    for _ in range(batches):
        for key, graph in graphs.items():
            samples[key].append(_replay_ms(graph, reps))
    times = {key: statistics.median(values) for key, values in samples.items()}
    auto_ms = times.pop("auto")
    best_config, best_ms = auto_config, auto_ms
    for config, ms in times.items():
        if ms < best_ms:
            best_config, best_ms = config, ms
    return Measured(problem, auto_config, auto_ms, best_config, best_ms)


def record(results: list[Measured], device: cuda.Device, path: Path, margin: float = 0.03) -> int:
    """Write into the cache (and hand to the library) each result whose best configuration beats the library's own
    choice by more than `margin`; drop the cache's entry for the others (measure() has already made the library
    forget them). Returns the number kept."""
    data = read_cache(path)
    entries = data["cards"].setdefault(card_key(device), {})
    kept = 0
    for r in results:
        if r.best_config != r.auto_config and r.best_ms < r.auto_ms * (1 - margin):
            entries[r.problem.key] = {"config": r.best_config, "ms": round(r.best_ms, 5),
                                      "auto_ms": round(r.auto_ms, 5)}
            kernels.call("fdm_gemm_sm90_set_tuned", r.problem.M, r.problem.N, r.problem.K, int(r.problem.gated),
                         r.best_config)
            kept += 1
        elif r.problem.key in entries:
            del entries[r.problem.key]
    write_cache(path, data)
    return kept
