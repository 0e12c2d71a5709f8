"""FLUX.1 transformers from single-file checkpoints: the original Black Forest Labs layout (flux1-dev.safetensors,
flux1-schnell.safetensors: `double_blocks.0.img_attn.qkv.weight`, ...), the same under ComfyUI's
`model.diffusion_model.` prefix (possibly beside VAE / text-encoder tensors in the same file), and a lone diffusers
`diffusion_pytorch_model.safetensors`. The config comes from the tensor shapes, so no config.json is needed.

BFL -> diffusers, all in `_plan`:
- `time_in` / `vector_in` / `guidance_in` `.in_layer`, `.out_layer` ->
  `time_text_embed.{timestep,text,guidance}_embedder.linear_1`, `.linear_2`; `img_in` -> `x_embedder`; `txt_in` ->
  `context_embedder`.
- double block: `img_mod.lin` / `txt_mod.lin` -> `norm1.linear` / `norm1_context.linear`; `img_attn.qkv` = [q | k | v]
  rows -> `attn.to_{q,k,v}` (`txt_attn.qkv` -> `attn.add_{q,k,v}_proj`); `*.norm.{query,key}_norm.scale` -> the q/k
  RMSNorm weights; `img_attn.proj` / `txt_attn.proj` -> `attn.to_out.0` / `attn.to_add_out`; `{img,txt}_mlp.{0,2}` ->
  `ff` / `ff_context` `.net.0.proj`, `.net.2`.
- single block: `modulation.lin` -> `norm.linear`; `linear1` = [q | k | v | mlp_in] rows -> `attn.to_{q,k,v}` and
  `proj_mlp`; `linear2` -> `proj_out`.
- `final_layer.linear` -> `proj_out`; `final_layer.adaLN_modulation.1` emits (shift, scale) where diffusers' `norm_out
  .linear` emits (scale, shift): its two row halves are swapped.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ...runtime import ops, safetensors
from ...runtime.errors import ModelLayoutError
from ...runtime.tensor import Tensor
from ..denoisers.flux import MLP_RATIO, TIME_PROJ_DIM, FluxTransformer, FluxTransformerConfig, expected_weights

Layout = Literal["diffusers", "bfl", "comfyui"]
COMFYUI_PREFIX = "model.diffusion_model."
FLUX1_AXES_DIMS_ROPE = (16, 56, 56)  # every published FLUX.1 (head dim 128); RoPE has no weights to read it from

# Name starts that only a FLUX-style transformer has, one set per naming scheme.
_BFL_MARKS = ("double_blocks.", "single_blocks.", "final_layer.")
_DIFFUSERS_MARKS = ("single_transformer_blocks.", "x_embedder.")

# Tensors whose shapes give the config, per naming scheme.
_ANCHORS = {
    "bfl": dict(x="img_in.weight", ctx="txt_in.weight", pooled="vector_in.in_layer.weight",
                out="final_layer.linear.weight", guidance="guidance_in.in_layer.weight",
                double="double_blocks.", single="single_blocks.", qk_norm=".query_norm.scale"),
    "diffusers": dict(x="x_embedder.weight", ctx="context_embedder.weight",
                      pooled="time_text_embed.text_embedder.linear_1.weight", out="proj_out.weight",
                      guidance="time_text_embed.guidance_embedder.linear_1.weight",
                      double="transformer_blocks.", single="single_transformer_blocks.", qk_norm=".attn.norm_q.weight"),
}

# Files that look like FLUX.1 by name but are another model or encoding: said in the error, not guessed around.
_RELATIVES = {
    "distilled_guidance_layer.": "Chroma (a FLUX.1-schnell derivative without vector_in), which fastdm does not load",
    "single_stream_modulation.": "FLUX.2, whose transformer fastdm does not load",
    "scaled_fp8": "a ComfyUI scaled-fp8 checkpoint (weights with .scale_weight); use the bf16 file",
}


# ------------------------------------------------------------------------------------------- detection
def _strip(key: str) -> str:
    return key[len(COMFYUI_PREFIX):] if key.startswith(COMFYUI_PREFIX) else key


def _summary(keys: Sequence[str], limit: int = 8) -> str:
    """The groups of names in a file (the name up to its first block index, three parts at most), largest first."""
    groups: Counter[str] = Counter()
    for k in keys:
        parts = k.split(".")
        head = []
        for p in parts[:-1][:3]:
            if p.isdigit():
                break
            head.append(p)
        groups[".".join(head or parts[:1]) + ".*" if len(parts) > 1 else k] += 1
    shown = ", ".join(f"{g} ({n})" for g, n in groups.most_common(limit))
    return shown + (f" and {len(groups) - limit} more groups" if len(groups) > limit else "")


def _relatives(keys: Iterable[str]) -> str:
    """' It looks like X.' for a known FLUX.1 look-alike among `keys`, else ''."""
    for k in keys:
        for mark, what in _RELATIVES.items():
            if mark in k:
                return f" It looks like {what}."
    return ""


def detect_layout(keys: Iterable[str]) -> Layout:
    """Which naming a FLUX.1 transformer checkpoint uses: "bfl" (double_blocks.*, single_blocks.*, ...), "comfyui"
    (the same under model.diffusion_model.) or "diffusers" (transformer_blocks.*, single_transformer_blocks.*).
    Raises ModelLayoutError when the names are no FLUX transformer's, or mix two layouts."""
    keys = list(keys)
    found: dict[str, str] = {}
    for k in keys:
        if k.startswith(COMFYUI_PREFIX) and _strip(k).startswith(_BFL_MARKS):
            found.setdefault("comfyui", k)
        elif k.startswith(_BFL_MARKS):
            found.setdefault("bfl", k)
        elif k.startswith(_DIFFUSERS_MARKS):
            found.setdefault("diffusers", k)
    if len(found) == 1:
        return next(iter(found))  # type: ignore[return-value]
    if found:
        mixed = "; ".join(f"{layout} (e.g. {k})" for layout, k in found.items())
        raise ModelLayoutError(f"the checkpoint mixes FLUX transformer layouts: {mixed}. Keep one copy of the "
                               "transformer in the file (re-export it), or load the diffusers folder instead")
    raise ModelLayoutError(
        f"the checkpoint holds no FLUX.1 transformer: none of its {len(keys)} tensor names starts with "
        f"{', '.join(_BFL_MARKS)} (BFL layout, e.g. double_blocks.0.img_attn.qkv.weight), the same under "
        f"{COMFYUI_PREFIX} (ComfyUI) or {', '.join(_DIFFUSERS_MARKS)} (diffusers). It holds: "
        f"{_summary(keys) or 'no tensors'}.{_relatives(keys)} Pass the FLUX.1 transformer file (e.g. "
        "flux1-dev.safetensors), or load this model with its own loader")


# ---------------------------------------------------------------------------------------------- config
def _block_count(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for k in shapes if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _infer_fields(shapes: Mapping[str, Sequence[int]], layout: Layout) -> dict[str, Any]:
    """Every FluxTransformerConfig field but axes_dims_rope (RoPE has no weights to read it from)."""
    a = _ANCHORS["diffusers" if layout == "diffusers" else "bfl"]
    qk = sorted(k for k in shapes if k.endswith(a["qk_norm"]))
    needed = [a["x"], a["ctx"], a["pooled"], a["out"]]
    missing = [n for n in needed if n not in shapes] + ([] if qk else [f"*{a['qk_norm']}"])
    bad = [n for n in needed if n in shapes and len(shapes[n]) != 2] + [n for n in qk[:1] if len(shapes[n]) != 1]
    if missing or bad:
        names = list(shapes)
        raise ModelLayoutError(
            f"the {layout} checkpoint lacks the tensors that give a FLUX.1 transformer's size"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (not the shape of a linear weight / norm scale: {', '.join(bad)})" if bad else "")
            + f". It holds: {_summary(names)}.{_relatives(names)} Pass a complete FLUX.1 transformer checkpoint")
    width, in_channels = (int(n) for n in shapes[a["x"]])
    head_dim = int(shapes[qk[0]][0])
    if head_dim <= 0 or head_dim % 2 or width % head_dim:
        raise ModelLayoutError(f"{qk[0]} has {head_dim} values, which is no even head dim dividing the width {width} "
                               f"of {a['x']}; the checkpoint is not a FLUX.1 transformer")
    out_dim = int(shapes[a["out"]][0])
    return dict(
        patch_size=1,  # FLUX packs 2x2 latent patches outside the transformer: in_channels is already 4x16
        in_channels=in_channels,
        out_channels=None if out_dim == in_channels else out_dim,
        num_layers=_block_count(shapes, a["double"]),
        num_single_layers=_block_count(shapes, a["single"]),
        attention_head_dim=head_dim,
        num_attention_heads=width // head_dim,
        joint_attention_dim=int(shapes[a["ctx"]][1]),
        pooled_projection_dim=int(shapes[a["pooled"]][1]),
        guidance_embeds=a["guidance"] in shapes,
    )


def infer_config(shapes: Mapping[str, Sequence[int]], layout: Layout = "bfl",
                 axes_dims_rope: Sequence[int] | None = None) -> FluxTransformerConfig:
    """The FluxTransformerConfig of a checkpoint from its tensor shapes (names without the ComfyUI prefix).
    `axes_dims_rope` is needed only when the head dim is not FLUX.1's 128."""
    fields = _infer_fields(shapes, layout)
    if axes_dims_rope is None:
        if fields["attention_head_dim"] != sum(FLUX1_AXES_DIMS_ROPE):
            raise ModelLayoutError(
                f"the checkpoint has head dim {fields['attention_head_dim']} (FLUX.1 has 128), so its RoPE axes split "
                f"is unknown: pass axes_dims_rope=(...) summing to {fields['attention_head_dim']}")
        axes_dims_rope = FLUX1_AXES_DIMS_ROPE
    return FluxTransformerConfig(**fields, axes_dims_rope=tuple(axes_dims_rope))


# ----------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class _Rule:
    """One BFL tensor: its expected shape and the diffusers tensors its rows become, in row order."""

    source: str
    shape: tuple[int, ...]
    targets: tuple[tuple[str, int], ...]  # (diffusers name, rows)
    swap_halves: bool = False  # (shift, scale) rows -> (scale, shift)


def _plan(cfg: FluxTransformerConfig) -> list[_Rule]:
    """Every tensor of a BFL FLUX.1 checkpoint of this config and where it goes in diffusers' names."""
    d, hd, mlp = cfg.inner_dim, cfg.attention_head_dim, MLP_RATIO * cfg.inner_dim
    rules: list[_Rule] = []

    def linear(source: str, n_in: int, *targets: tuple[str, int], swap: bool = False) -> None:
        n_out = sum(rows for _, rows in targets)
        for param, shape in (("weight", (n_out, n_in)), ("bias", (n_out,))):
            rules.append(_Rule(f"{source}.{param}", shape, tuple((f"{t}.{param}", r) for t, r in targets), swap))

    def scale(source: str, target: str) -> None:
        rules.append(_Rule(source, (hd,), ((target, hd),)))

    embedders = [("time_in", "timestep_embedder", TIME_PROJ_DIM), ("vector_in", "text_embedder",
                                                                  cfg.pooled_projection_dim)]
    if cfg.guidance_embeds:
        embedders.append(("guidance_in", "guidance_embedder", TIME_PROJ_DIM))
    for source, target, n_in in embedders:
        linear(f"{source}.in_layer", n_in, (f"time_text_embed.{target}.linear_1", d))
        linear(f"{source}.out_layer", d, (f"time_text_embed.{target}.linear_2", d))
    linear("img_in", cfg.in_channels, ("x_embedder", d))
    linear("txt_in", cfg.joint_attention_dim, ("context_embedder", d))

    for i in range(cfg.num_layers):
        s, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for stream, norm, qkv, out, ff in (("img", "norm1", ("to_q", "to_k", "to_v"), "to_out.0", "ff"),
                                           ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"),
                                            "to_add_out", "ff_context")):
            linear(f"{s}{stream}_mod.lin", d, (f"{t}{norm}.linear", 6 * d))
            linear(f"{s}{stream}_attn.qkv", d, *((f"{t}attn.{p}", d) for p in qkv))
            linear(f"{s}{stream}_attn.proj", d, (f"{t}attn.{out}", d))
            linear(f"{s}{stream}_mlp.0", d, (f"{t}{ff}.net.0.proj", mlp))
            linear(f"{s}{stream}_mlp.2", mlp, (f"{t}{ff}.net.2", d))
        scale(f"{s}img_attn.norm.query_norm.scale", f"{t}attn.norm_q.weight")
        scale(f"{s}img_attn.norm.key_norm.scale", f"{t}attn.norm_k.weight")
        scale(f"{s}txt_attn.norm.query_norm.scale", f"{t}attn.norm_added_q.weight")
        scale(f"{s}txt_attn.norm.key_norm.scale", f"{t}attn.norm_added_k.weight")

    for i in range(cfg.num_single_layers):
        s, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        linear(f"{s}modulation.lin", d, (f"{t}norm.linear", 3 * d))
        linear(f"{s}linear1", d, (f"{t}attn.to_q", d), (f"{t}attn.to_k", d), (f"{t}attn.to_v", d),
               (f"{t}proj_mlp", mlp))
        linear(f"{s}linear2", d + mlp, (f"{t}proj_out", d))
        scale(f"{s}norm.query_norm.scale", f"{t}attn.norm_q.weight")
        scale(f"{s}norm.key_norm.scale", f"{t}attn.norm_k.weight")

    linear("final_layer.adaLN_modulation.1", d, ("norm_out.linear", 2 * d), swap=True)
    linear("final_layer.linear", d, ("proj_out", cfg.out_dim))
    return rules


def _describe(cfg: FluxTransformerConfig) -> str:
    return (f"{cfg.num_layers} double + {cfg.num_single_layers} single blocks, width {cfg.inner_dim} = "
            f"{cfg.num_attention_heads} heads x {cfg.attention_head_dim}, in {cfg.in_channels} channels, "
            f"{'with' if cfg.guidance_embeds else 'without'} guidance embedder")


def _check(shapes: Mapping[str, Sequence[int]], expected: Mapping[str, tuple[int, ...]], cfg: FluxTransformerConfig,
           layout: Layout, source: str) -> None:
    """Raise ModelLayoutError unless `shapes` has exactly the `expected` names and shapes (names without prefix;
    the message shows the file's own names)."""
    prefix = COMFYUI_PREFIX if layout == "comfyui" else ""
    missing = [n for n in expected if n not in shapes]
    unexpected = sorted(n for n in shapes if n not in expected)
    misshapen = [f"{prefix}{n} is {tuple(shapes[n])}, expected {expected[n]}"
                 for n in expected if n in shapes and tuple(shapes[n]) != expected[n]]
    if not (missing or unexpected or misshapen):
        return

    def listing(items: list[str], add_prefix: bool = True) -> str:
        shown = ", ".join((prefix if add_prefix else "") + n for n in items[:8])
        return shown + (f" (and {len(items) - 8} more)" if len(items) > 8 else "")

    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {listing(missing)}")
    if misshapen:
        problems.append(f"{len(misshapen)} misshapen: {listing(misshapen, add_prefix=False)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {listing(unexpected)}")
    raise ModelLayoutError(
        f"{source} is not a complete FLUX.1 transformer in the {layout} layout (its shapes say: {_describe(cfg)}): "
        + "; ".join(problems) + f".{_relatives(shapes)} The file may be truncated or hold another model: re-download "
        "it, or pass the FLUX.1 transformer checkpoint")


def _transformer_shapes(keys: Iterable[str], shape_of, layout: Layout) -> dict[str, tuple[int, ...]]:
    """name (ComfyUI prefix removed) -> shape of the transformer's tensors; other components' tensors are left out."""
    if layout == "comfyui":
        return {k[len(COMFYUI_PREFIX):]: tuple(shape_of(k)) for k in keys if k.startswith(COMFYUI_PREFIX)}
    return {k: tuple(shape_of(k)) for k in keys}


# ------------------------------------------------------------------------------------------- convert
def _convert(state: dict[str, Tensor], cfg: FluxTransformerConfig) -> dict[str, Tensor]:
    """BFL names -> diffusers names; `state` (checked against the plan) is emptied as it goes, so on a GPU each
    fused tensor is freed as soon as its pieces are copied out."""
    out: dict[str, Tensor] = {}
    for rule in _plan(cfg):
        t = state.pop(rule.source)
        if rule.swap_halves:
            half = rule.shape[0] // 2
            out[rule.targets[0][0]] = ops.concat([t.narrow(0, half, half), t.narrow(0, 0, half)], axis=0)
        elif len(rule.targets) == 1:
            out[rule.targets[0][0]] = t
        else:
            start = 0
            for name, rows in rule.targets:
                # A copy, not a view: a view would keep the whole fused tensor alive for as long as one piece
                # lives (the single block's proj_mlp rows would hold on to all of linear1).
                out[name] = ops.concat([t.narrow(0, start, rows)], axis=0)
                start += rows
    return out


def bfl_to_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A FLUX.1 transformer state dict in the BFL layout (or ComfyUI's: tensors outside `model.diffusion_model.` are
    dropped) with diffusers' FluxTransformer2DModel names. Fused tensors are split into copies; the others are passed
    through. The caller's dict is not changed. Raises ModelLayoutError naming missing, unexpected or misshapen
    tensors."""
    layout = detect_layout(state)
    if layout == "diffusers":
        raise ModelLayoutError("the state dict already has diffusers' names (transformer_blocks.*, x_embedder.*); "
                               "pass it to FluxTransformer directly")
    shapes = _transformer_shapes(state, lambda k: state[k].shape, layout)
    fields = _infer_fields(shapes, layout)
    # RoPE has no weights: a one-axis split is as good as the true one for naming and shaping the tensors
    cfg = FluxTransformerConfig(**fields, axes_dims_rope=(fields["attention_head_dim"],))
    _check(shapes, {r.source: r.shape for r in _plan(cfg)}, cfg, layout, "the state dict")
    prefix = COMFYUI_PREFIX if layout == "comfyui" else ""
    return _convert({n: state[prefix + n] for n in shapes}, cfg)


# ---------------------------------------------------------------------------------------------- load
def load_flux_single_file(path: str | os.PathLike, device: Any = "cpu", dtype: Any = None,
                          axes_dims_rope: Sequence[int] | None = None) -> FluxTransformer:
    """A FluxTransformer from one checkpoint file (or a sharded *.safetensors.index.json) in the BFL, ComfyUI or
    diffusers layout, without a config.json: the config is read from the tensor shapes. Only the transformer's
    tensors are read from a ComfyUI file that also holds a VAE or text encoders. `dtype` None keeps the stored
    dtype; `axes_dims_rope` is needed only for a head dim other than FLUX.1's 128."""
    source = os.fspath(path)
    ckpt = safetensors.open_checkpoint(path)
    try:
        try:
            layout = detect_layout(ckpt.keys())
            shapes = _transformer_shapes(ckpt.keys(), ckpt.shape, layout)
            cfg = infer_config(shapes, layout, axes_dims_rope)
        except ModelLayoutError as e:
            raise ModelLayoutError(f"{source}: {e}") from None
        if layout == "diffusers":
            expected = expected_weights(cfg)
        else:
            expected = {r.source: r.shape for r in _plan(cfg)}
        _check(shapes, expected, cfg, layout, source)  # from the header, before a byte is read
        prefix = COMFYUI_PREFIX if layout == "comfyui" else ""
        loaded = safetensors.load(ckpt, device=device, dtype=dtype, names=[prefix + n for n in shapes])
    finally:
        ckpt.close()  # loaded CPU tensors keep their own mappings
    state = {n[len(prefix):]: t for n, t in loaded.items()}
    del loaded  # `state` is the only reference: converting it frees each fused tensor once split
    weights = state if layout == "diffusers" else _convert(state, cfg)
    return FluxTransformer(cfg, weights, source=source)
