"""Writes the tiny FLUX transformers of gen_flux_transformer.py again in the original Black Forest Labs layout
(the layout of flux1-dev.safetensors / flux1-schnell.safetensors), for the single-file loader's tests.

Run with the reference venv (torch + diffusers), from the repo root, after gen_flux_transformer.py:
    .venv-ref/bin/python tests/reference/gen_flux_single_file.py

Writes tests/fixtures/flux_transformer_tiny_bfl.safetensors and flux_transformer_tiny_schnell_bfl.safetensors:
the same bf16 tensors as the diffusers fixtures, renamed and re-fused as BFL's flux/model.py names them.

The BFL names here are written out by hand from BFL's module tree, as the inverse of diffusers' loader; the file is
then checked with diffusers itself: its convert_flux_transformer_checkpoint_to_diffusers must give back the diffusers
state dict bit for bit, and FluxTransformer2DModel.from_single_file on it must reproduce the fixture's output. That
converter hard-codes FLUX.1's width (inner_dim = 3072) for splitting linear1, so the check runs a copy of its source
with the tiny width substituted; nothing else is changed.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import single_file_model, single_file_utils
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
VARIANTS = ("flux_transformer_tiny", "flux_transformer_tiny_schnell")
INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> BFL flux.model.Flux state dict."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def move(bfl: str, diffusers: str) -> None:
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = sd.pop(f"{diffusers}.{p}")

    def fuse(bfl: str, diffusers: list[str]) -> None:
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = torch.cat([sd.pop(f"{n}.{p}") for n in diffusers], dim=0)

    embed = "time_text_embed."
    for bfl, dif in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                     ("guidance_in", "guidance_embedder")):
        if f"{embed}{dif}.linear_1.weight" in sd:
            move(f"{bfl}.in_layer", f"{embed}{dif}.linear_1")
            move(f"{bfl}.out_layer", f"{embed}{dif}.linear_2")
    move("img_in", "x_embedder")
    move("txt_in", "context_embedder")

    n_double = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(n_double):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        move(dst + "img_mod.lin", src + "norm1.linear")
        move(dst + "txt_mod.lin", src + "norm1_context.linear")
        fuse(dst + "img_attn.qkv", [src + "attn.to_q", src + "attn.to_k", src + "attn.to_v"])
        fuse(dst + "txt_attn.qkv", [src + "attn.add_q_proj", src + "attn.add_k_proj", src + "attn.add_v_proj"])
        out[dst + "img_attn.norm.query_norm.scale"] = sd.pop(src + "attn.norm_q.weight")
        out[dst + "img_attn.norm.key_norm.scale"] = sd.pop(src + "attn.norm_k.weight")
        out[dst + "txt_attn.norm.query_norm.scale"] = sd.pop(src + "attn.norm_added_q.weight")
        out[dst + "txt_attn.norm.key_norm.scale"] = sd.pop(src + "attn.norm_added_k.weight")
        move(dst + "img_attn.proj", src + "attn.to_out.0")
        move(dst + "txt_attn.proj", src + "attn.to_add_out")
        move(dst + "img_mlp.0", src + "ff.net.0.proj")
        move(dst + "img_mlp.2", src + "ff.net.2")
        move(dst + "txt_mlp.0", src + "ff_context.net.0.proj")
        move(dst + "txt_mlp.2", src + "ff_context.net.2")

    n_single = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks."))
    for i in range(n_single):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        move(dst + "modulation.lin", src + "norm.linear")
        fuse(dst + "linear1", [src + "attn.to_q", src + "attn.to_k", src + "attn.to_v", src + "proj_mlp"])
        move(dst + "linear2", src + "proj_out")
        out[dst + "norm.query_norm.scale"] = sd.pop(src + "attn.norm_q.weight")
        out[dst + "norm.key_norm.scale"] = sd.pop(src + "attn.norm_k.weight")

    move("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):  # diffusers' norm_out emits (scale, shift); BFL's final adaLN emits (shift, scale)
        scale, shift = sd.pop(f"norm_out.linear.{p}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale], dim=0)

    if sd:
        raise SystemExit(f"diffusers tensors left unmapped: {sorted(sd)}")
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_converter(inner_dim: int):
    """diffusers' BFL -> diffusers converter with its hard-coded FLUX.1 width replaced by `inner_dim`."""
    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    if src.count("inner_dim = 3072") != 1:
        raise SystemExit("diffusers' converter changed: update the width substitution in this script")
    scope = dict(vars(single_file_utils))
    exec(compile(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), "<flux converter>", "exec"), scope)
    return scope["convert_flux_transformer_checkpoint_to_diffusers"]


def verify(name: str, bfl_path: Path, reference: dict[str, torch.Tensor]) -> None:
    folder = FIXTURES / name
    inner_dim = reference["x_embedder.weight"].shape[0]
    convert = diffusers_converter(inner_dim)

    back = convert(load_file(str(bfl_path)))
    if sorted(back) != sorted(reference):
        raise SystemExit(f"{name}: diffusers' converter gives other names: {sorted(set(back) ^ set(reference))}")
    for k, v in reference.items():
        if back[k].dtype != v.dtype or not torch.equal(back[k], v):
            raise SystemExit(f"{name}: {k} differs after diffusers' conversion")

    # The whole single-file path of diffusers (key detection, conversion, load) on the file, run on the fixture
    # inputs: the output must be the fixture's expected output.
    mapping = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    saved = mapping["checkpoint_mapping_fn"]
    mapping["checkpoint_mapping_fn"] = convert
    try:
        model = FluxTransformer2DModel.from_single_file(str(bfl_path), config=str(folder), torch_dtype=torch.float32,
                                                        local_files_only=True).eval()
    finally:
        mapping["checkpoint_mapping_fn"] = saved
    io = load_file(str(FIXTURES / f"{name}_io.safetensors"))
    kwargs = {k: io[k] for k in INPUTS}
    if "guidance" in io:
        kwargs["guidance"] = io["guidance"]
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    err = float((out - io["expected"]).norm() / io["expected"].norm())
    if err > 1e-6:
        raise SystemExit(f"{name}: from_single_file output differs from the fixture (rel {err:.2e})")
    print(f"{name}: {bfl_path.name} ({bfl_path.stat().st_size / 1e6:.2f} MB): diffusers' converter gives the "
          f"fixture's state dict exactly; from_single_file output rel err {err:.1e}")


def main() -> None:
    for name in VARIANTS:
        reference = load_file(str(FIXTURES / name / "diffusion_pytorch_model.safetensors"))
        path = FIXTURES / f"{name}_bfl.safetensors"
        save_file(to_bfl(reference), str(path), metadata={"format": "pt"})
        verify(name, path, reference)


if __name__ == "__main__":
    main()
