"""Writes the tiny SDXL pipeline of tests/fixtures/tiny-sdxl (a diffusers folder) as ONE checkpoint in Stability's
original single-file layout (the layout of sd_xl_base_1.0.safetensors), for the single-file loader's tests.

Run with the reference venv (torch + diffusers), from the repo root, after gen_tiny_sdxl_pipeline.py:
    .venv-ref/bin/python tests/reference/gen_sdxl_single_file.py

Writes tests/fixtures/sdxl_tiny_single_file.safetensors: the folder's bf16 tensors, renamed (and, for bigG, fused /
transposed; for the VAE's attention, reshaped to 1x1 convs) as the sgm code base names them, plus the two buffers a
real file carries beside them (CLIP-L's position_ids, bigG's logit_scale).

The Stability names are written out by hand from sgm's module tree, as the inverse of diffusers' loader; the file is
then checked with diffusers itself: convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint and convert_open_clip_checkpoint must give back every tensor of the folder bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = FIXTURES / "tiny-sdxl"
OUT = FIXTURES / "sdxl_tiny_single_file.safetensors"
UNET, VAE, CLIP_L, BIGG = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                           "conditioner.embedders.1.model.")
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def config(name: str) -> dict:
    return json.loads((TINY / name / "config.json").read_text())


def unet_to_ldm(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel names -> sgm's openaimodel.UNetModel names."""
    n = len(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    lpb = lpb if isinstance(lpb, list) else [lpb] * n
    prefix: dict[str, str] = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
                              "time_embedding.linear_2.": "time_embed.2.", "add_embedding.linear_1.": "label_emb.0.0.",
                              "add_embedding.linear_2.": "label_emb.0.2.", "conv_norm_out.": "out.0.",
                              "conv_out.": "out.2.", "mid_block.resnets.0.": "middle_block.0.",
                              "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.1.": "middle_block.2."}
    k = 1
    for i in range(n):
        for j in range(lpb[i]):
            prefix[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            prefix[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
            k += 1
        if i < n - 1:
            prefix[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{k}.0.op."
            k += 1
    m = 0
    for i in range(n):
        level = n - 1 - i
        attn = cfg["up_block_types"][i].startswith("CrossAttn")
        for j in range(lpb[level] + 1):
            prefix[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{m}.0."
            prefix[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{m}.1."
            m += 1
        if i < n - 1:
            prefix[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{m - 1}.{2 if attn else 1}.conv."
    out = {}
    for name, t in sd.items():
        dif = max((p for p in prefix if name.startswith(p)), key=len)
        rest = name[len(dif):]
        if ".resnets." in dif:
            layer, param = rest.rsplit(".", 1)
            rest = f"{RESNET[layer]}.{param}"
        out[UNET + prefix[dif] + rest] = t
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> ldm's AutoencoderKL names (mid attention as 1x1 convs)."""
    n = len(cfg["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for name, t in sd.items():
        new = name
        for i in range(n):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")
        new = new.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        new = new.replace("conv_shortcut.", "nin_shortcut.").replace("conv_norm_out.", "norm_out.")
        if ".mid_block.attentions.0." in new:
            side, rest = new.split(".mid_block.attentions.0.")
            layer, param = rest.rsplit(".", 1)
            new = f"{side}.mid.attn_1.{attn[layer]}.{param}"
            if t.ndim == 2:
                t = t[:, :, None, None]
        out[VAE + new] = t
    return out


def bigg_to_openclip(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection names -> open_clip's text tower names (fused in_proj, transposed
    text_projection)."""
    out = {BIGG + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           BIGG + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           BIGG + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           BIGG + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           BIGG + "text_projection": sd["text_projection.weight"].T.contiguous(),
           BIGG + "logit_scale": torch.tensor(4.6052, dtype=torch.bfloat16)}
    for i in range(cfg["num_hidden_layers"]):
        s, d = f"text_model.encoder.layers.{i}.", f"{BIGG}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{d}attn.in_proj_{p}"] = torch.cat([sd[f"{s}self_attn.{q}_proj.{p}"] for q in "qkv"], dim=0)
            for dif, ldm in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{d}{ldm}.{p}"] = sd[f"{s}{dif}.{p}"]
    return out


def main() -> None:
    sds = {"unet": load_file(TINY / "unet" / "diffusion_pytorch_model.safetensors"),
           "vae": load_file(TINY / "vae" / "diffusion_pytorch_model.safetensors"),
           "text_encoder": load_file(TINY / "text_encoder" / "model.safetensors"),
           "text_encoder_2": load_file(TINY / "text_encoder_2" / "model.safetensors")}
    for c, sd in sds.items():
        dtypes = {t.dtype for t in sd.values()}
        assert dtypes == {torch.bfloat16}, (c, dtypes)
    unet_cfg, vae_cfg, bigg_cfg = config("unet"), config("vae"), config("text_encoder_2")
    clip_sd = {k if k.startswith("text_model.") else "text_model." + k: t for k, t in sds["text_encoder"].items()}
    single = {**unet_to_ldm(sds["unet"], unet_cfg), **vae_to_ldm(sds["vae"], vae_cfg),
              **{CLIP_L + k: t for k, t in clip_sd.items()},
              CLIP_L + "text_model.embeddings.position_ids": torch.arange(77, dtype=torch.int64)[None],
              **bigg_to_openclip(sds["text_encoder_2"], bigg_cfg)}
    n_weights = sum(len(sd) for sd in sds.values())
    fused = 4 * bigg_cfg["num_hidden_layers"]  # 6 q/k/v tensors become 2 in_proj ones per layer
    assert len(single) == n_weights - fused + 2, (len(single), n_weights)  # nothing lost or merged by mistake
    save_file({k: v.contiguous() for k, v in single.items()}, str(OUT))

    # --- check: diffusers' own converters map the file back to the folder's tensors exactly
    ckpt = load_file(str(OUT))
    lpb = unet_cfg["layers_per_block"]
    assert isinstance(lpb, int) or len(set(lpb)) == 1  # diffusers' converter reads one int
    diffusers_unet_cfg = dict(unet_cfg, layers_per_block=lpb if isinstance(lpb, int) else lpb[0])
    got = {"unet": sfu.convert_ldm_unet_checkpoint(ckpt, diffusers_unet_cfg),
           "vae": sfu.convert_ldm_vae_checkpoint(ckpt, vae_cfg),
           "text_encoder": sfu.convert_ldm_clip_checkpoint(ckpt),
           "text_encoder_2": sfu.convert_open_clip_checkpoint(
               CLIPTextModelWithProjection(CLIPTextConfig(**bigg_cfg)), ckpt, prefix=BIGG)}
    got["text_encoder"].pop("text_model.embeddings.position_ids")
    want = dict(sds, text_encoder=clip_sd)
    for c in want:
        assert set(got[c]) == set(want[c]), (c, sorted(set(got[c]) ^ set(want[c]))[:10])
        for k, t in want[c].items():
            assert got[c][k].shape == t.shape and torch.equal(got[c][k], t), (c, k)
    print(f"wrote {OUT} ({OUT.stat().st_size / 2**20:.2f} MiB, {len(single)} tensors); diffusers' converters give "
          f"back all {n_weights} tensors of {TINY.name} exactly")


if __name__ == "__main__":
    main()
