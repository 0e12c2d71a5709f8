"""SDXL from one single-file checkpoint in Stability's original layout (sd_xl_base_1.0.safetensors and fine-tunes
saved the same way): the four components live side by side under their sgm prefixes and are renamed to diffusers /
transformers names here, in one place.

- UNet, `model.diffusion_model.` (LDM names): `input_blocks.0.0` -> `conv_in`; `input_blocks.k.0` / `.1` -> the
  down blocks' resnets / attentions in order (k counts every resnet and every downsampler, `input_blocks.k.0.op`);
  `middle_block.{0,1,2}` -> `mid_block.resnets.0`, `.attentions.0`, `.resnets.1`; `output_blocks.m.0` / `.1` -> the
  up blocks' resnets / attentions, the level's upsampler in its last entry (`.2.conv` after an attention, else
  `.1.conv`); `time_embed.{0,2}`, `label_emb.0.{0,2}`, `out.{0,2}` -> `time_embedding.linear_{1,2}`,
  `add_embedding.linear_{1,2}`, `conv_norm_out` / `conv_out`. Inside a resnet: `in_layers.{0,2}` -> `norm1` /
  `conv1`, `emb_layers.1` -> `time_emb_proj`, `out_layers.{0,3}` -> `norm2` / `conv2`, `skip_connection` ->
  `conv_shortcut`. Transformer names are diffusers' already.
- VAE, `first_stage_model.`: `{encoder,decoder}.mid.block_{1,2}` -> `mid_block.resnets.{0,1}`; `mid.attn_1.{norm,
  q,k,v,proj_out}` -> `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (1x1 convs [C, C, 1, 1] there,
  linears [C, C] here); `encoder.down.i.block.j` / `.downsample` -> `encoder.down_blocks.i.resnets.j` /
  `.downsamplers.0`; `decoder.up.i` is diffusers' `decoder.up_blocks.{n-1-i}` (LDM counts from the lowest
  resolution); `nin_shortcut` -> `conv_shortcut`; `norm_out` -> `conv_norm_out`.
- CLIP-L, `conditioner.embedders.0.transformer.`: transformers names already (`text_model.*`).
- OpenCLIP-bigG, `conditioner.embedders.1.model.`: `token_embedding.weight`, `positional_embedding`, `ln_final` ->
  `text_model.embeddings.*`, `.final_layer_norm`; `transformer.resblocks.i.{ln_1,ln_2,attn.out_proj,mlp.c_fc,
  mlp.c_proj}` -> `text_model.encoder.layers.i.{layer_norm1,layer_norm2,self_attn.out_proj,mlp.fc1,mlp.fc2}`;
  `attn.in_proj_{weight,bias}` = [q | k | v] rows -> `self_attn.{q,k,v}_proj`; `text_projection` [D, P] (applied
  as x @ P) -> `text_projection.weight` [P, D], its transpose.

The single file has no configs: the published SDXL base ones are built in (`SDXL_BASE`) and every tensor's shape is
checked against them from the header, before a byte is read. Nor has it tokenizers: see `load_sdxl_tokenizers`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...runtime import ops, safetensors
from ...runtime.errors import ModelLayoutError
from ...runtime.tensor import Tensor
from ..denoisers import unet2d
from ..denoisers.unet2d import UNet2DConditionConfig
from ..loading import read_config
from ..text_encoders import clip
from ..text_encoders.clip import CLIPTextConfig
from ..vae import autoencoder_kl
from ..vae.autoencoder_kl import AutoencoderKLConfig

Component = Literal["unet", "vae", "text_encoder", "text_encoder_2"]
COMPONENTS: tuple[Component, ...] = ("unet", "vae", "text_encoder", "text_encoder_2")
PREFIXES: dict[Component, str] = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}
WHAT: dict[Component, str] = {"unet": "UNet", "vae": "VAE", "text_encoder": "CLIP-L text encoder",
                              "text_encoder_2": "OpenCLIP-bigG text encoder"}
# Stored beside the weights, recomputed by the models: skipped when present.
IGNORED: dict[Component, frozenset[str]] = {
    "unet": frozenset(), "vae": frozenset(),
    "text_encoder": frozenset({"text_model.embeddings.position_ids"}),
    "text_encoder_2": frozenset({"logit_scale", "attn_mask"}),  # CLIP's image-text temperature; a causal mask
}
TOKENIZER_ENV = "FASTDM_SDXL_TOKENIZERS"

# Name starts of relatives that are not SDXL base: said in the error, not guessed around.
_RELATIVES = (
    ("model.diffusion_model.double_blocks.", "a FLUX.1 checkpoint (ComfyUI layout); load it with "
                                             "fastdm.models.convert.load_flux_single_file"),
    ("double_blocks.", "a FLUX.1 transformer (BFL layout); load it with fastdm.models.convert.load_flux_single_file"),
    ("model.diffusion_model.joint_blocks.", "Stable Diffusion 3, which this loader does not read"),
    ("cond_stage_model.", "Stable Diffusion 1.x / 2.x (one text encoder under cond_stage_model.), which fastdm does "
                          "not run"),
    ("conditioner.embedders.0.model.", "the SDXL refiner (bigG alone, as embedders.0), which this loader does not "
                                       "read"),
)

# ------------------------------------------------------------------------------------------------ configs
# The published configs of stabilityai/stable-diffusion-xl-base-1.0 (fields the loaders read; the rest are the
# classes' defaults, as they are for SDXL base).
SDXL_BASE_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "flip_sin_to_cos": True, "freq_shift": 0, "norm_num_groups": 32,
    "norm_eps": 1e-5, "act_fn": "silu", "upcast_attention": False,
}
SDXL_BASE_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 1024, "scaling_factor": 0.13025,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
}
SDXL_BASE_CLIP_L: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
    "layer_norm_eps": 1e-5, "eos_token_id": 2,  # the published config's (see clip.LEGACY_EOS_TOKEN_ID)
}
SDXL_BASE_BIGG: dict[str, Any] = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "projection_dim": 1280,
    "layer_norm_eps": 1e-5, "eos_token_id": 2,
}
SDXL_BASE_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class SDXLConfigs:
    """The raw config dicts (diffusers config.json / transformers config.json contents) of the four components and
    the scheduler that a single file is read against."""

    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    text_encoder: Mapping[str, Any]
    text_encoder_2: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    force_zeros_for_empty_prompt: bool = True
    name: str = "SDXL base 1.0"

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> SDXLConfigs:
        """The configs of a diffusers SDXL pipeline folder (unet/config.json, ..., scheduler/scheduler_config.json),
        for a single file of a model whose shapes are not SDXL base's."""
        import json

        folder = Path(folder)

        def read(path: Path) -> dict[str, Any]:
            try:
                return json.loads(path.read_text("utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ModelLayoutError(f"cannot read {path} ({e}): pass a diffusers SDXL pipeline folder") from None

        index = read(folder / "model_index.json")
        return cls(unet=read(folder / "unet" / "config.json"), vae=read(folder / "vae" / "config.json"),
                   text_encoder=read(folder / "text_encoder" / "config.json"),
                   text_encoder_2=read(folder / "text_encoder_2" / "config.json"),
                   scheduler=read(folder / "scheduler" / "scheduler_config.json"),
                   force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
                   name=str(folder))

    def parsed(self) -> dict[Component, Any]:
        """Each component's fastdm config dataclass (raises ModelLayoutError for a config fastdm cannot run)."""
        return {"unet": read_config(UNet2DConditionConfig, self.unet),
                "vae": read_config(AutoencoderKLConfig, self.vae),
                "text_encoder": read_config(CLIPTextConfig, self.text_encoder),
                "text_encoder_2": read_config(CLIPTextConfig, self.text_encoder_2)}


SDXL_BASE = SDXLConfigs(unet=SDXL_BASE_UNET, vae=SDXL_BASE_VAE, text_encoder=SDXL_BASE_CLIP_L,
                        text_encoder_2=SDXL_BASE_BIGG, scheduler=SDXL_BASE_SCHEDULER)


# -------------------------------------------------------------------------------------------------- plan
Op = Literal["copy", "split", "squeeze", "transpose"]


@dataclass(frozen=True)
class Rule:
    """One stored tensor (name without the component prefix), its expected shape, and the diffusers tensors it
    becomes: one, or several row ranges in order ("split")."""

    source: str
    shape: tuple[int, ...]
    targets: tuple[tuple[str, int], ...]  # (diffusers / transformers name, rows)
    op: Op = "copy"


_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_prefixes(cfg: UNet2DConditionConfig) -> dict[str, tuple[str, bool]]:
    """diffusers prefix -> (LDM prefix, is a resnet), for every block of the UNet."""
    out: dict[str, tuple[str, bool]] = {}
    k = 1  # input_blocks.0 is conv_in
    for plan in cfg.down_plans():
        for j in range(len(plan.resnets)):
            out[f"{plan.prefix}resnets.{j}."] = (f"input_blocks.{k}.0.", True)
            if plan.attn is not None:
                out[f"{plan.prefix}attentions.{j}."] = (f"input_blocks.{k}.1.", False)
            k += 1
        if plan.resample:
            out[f"{plan.prefix}downsamplers.0.conv."] = (f"input_blocks.{k}.0.op.", False)
            k += 1
    out["mid_block.resnets.0."] = ("middle_block.0.", True)
    out["mid_block.attentions.0."] = ("middle_block.1.", False)
    out["mid_block.resnets.1."] = ("middle_block.2.", True)
    m = 0
    for plan in cfg.up_plans():
        for j in range(len(plan.resnets)):
            out[f"{plan.prefix}resnets.{j}."] = (f"output_blocks.{m}.0.", True)
            if plan.attn is not None:
                out[f"{plan.prefix}attentions.{j}."] = (f"output_blocks.{m}.1.", False)
            m += 1
        if plan.resample:  # in the level's last entry, after its resnet (and attention)
            out[f"{plan.prefix}upsamplers.0.conv."] = (f"output_blocks.{m - 1}.{2 if plan.attn else 1}.conv.", False)
    for dif, ldm in (("conv_in.", "input_blocks.0.0."), ("time_embedding.linear_1.", "time_embed.0."),
                     ("time_embedding.linear_2.", "time_embed.2."), ("add_embedding.linear_1.", "label_emb.0.0."),
                     ("add_embedding.linear_2.", "label_emb.0.2."), ("conv_norm_out.", "out.0."),
                     ("conv_out.", "out.2.")):
        out[dif] = (ldm, False)
    return out


def _by_prefix(name: str, prefixes: Mapping[str, Any]) -> tuple[str, Any]:
    """The longest of `prefixes` that starts `name`."""
    best = max((p for p in prefixes if name.startswith(p)), key=len, default=None)
    if best is None:  # expected_weights and the prefix table disagree: a bug here, not in the file
        raise RuntimeError(f"no LDM name for {name}")
    return best, prefixes[best]


def _unet_plan(cfg: UNet2DConditionConfig) -> list[Rule]:
    prefixes = _unet_prefixes(cfg)
    rules = []
    for name, shape in unet2d.expected_weights(cfg).items():
        dif, (ldm, resnet) = _by_prefix(name, prefixes)
        rest = name[len(dif):]
        if resnet:
            layer, param = rest.rsplit(".", 1)
            rest = f"{_RESNET_LDM[layer]}.{param}"
        rules.append(Rule(ldm + rest, shape, ((name, shape[0]),)))
    return rules


_VAE_ATTN_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_plan(cfg: AutoencoderKLConfig) -> list[Rule]:
    n = len(cfg.block_out_channels)
    prefixes: dict[str, str] = {}
    for side in ("encoder", "decoder"):
        prefixes[f"{side}.mid_block.resnets.0."] = f"{side}.mid.block_1."
        prefixes[f"{side}.mid_block.resnets.1."] = f"{side}.mid.block_2."
        prefixes[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
        prefixes[f"{side}.conv_norm_out."] = f"{side}.norm_out."
    for i in range(n):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    rules = []
    for name, shape in autoencoder_kl.expected_weights(cfg).items():
        matches = [p for p in prefixes if name.startswith(p)]
        if not matches:  # conv_in, conv_out, quant_conv, post_quant_conv: the same names
            rules.append(Rule(name, shape, ((name, shape[0]),)))
            continue
        dif = max(matches, key=len)
        ldm, rest = prefixes[dif], name[len(dif):]
        if dif.endswith("attentions.0."):
            layer, param = rest.rsplit(".", 1)
            stored = shape + (1, 1) if param == "weight" and layer != "group_norm" else shape  # 1x1 convs
            rules.append(Rule(f"{ldm}{_VAE_ATTN_LDM[layer]}.{param}", stored, ((name, shape[0]),),
                              "squeeze" if stored != shape else "copy"))
        else:
            rules.append(Rule(ldm + rest.replace("conv_shortcut.", "nin_shortcut."), shape, ((name, shape[0]),)))
    return rules


def _clip_l_plan(cfg: CLIPTextConfig) -> list[Rule]:
    return [Rule(name, shape, ((name, shape[0]),)) for name, shape in clip.expected_weights(cfg, False).items()]


_BIGG_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _bigg_plan(cfg: CLIPTextConfig) -> list[Rule]:
    d, p = cfg.hidden_size, cfg.projection_dim
    t = clip.PREFIX
    rules = [Rule("token_embedding.weight", (cfg.vocab_size, d),
                  ((f"{t}embeddings.token_embedding.weight", cfg.vocab_size),)),
             Rule("positional_embedding", (cfg.max_position_embeddings, d),
                  ((f"{t}embeddings.position_embedding.weight", cfg.max_position_embeddings),)),
             Rule("ln_final.weight", (d,), ((f"{t}final_layer_norm.weight", d),)),
             Rule("ln_final.bias", (d,), ((f"{t}final_layer_norm.bias", d),)),
             Rule("text_projection", (d, p), (("text_projection.weight", p),), "transpose")]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"transformer.resblocks.{i}.", f"{t}encoder.layers.{i}."
        for param, shape in (("weight", (3 * d, d)), ("bias", (3 * d,))):
            rules.append(Rule(f"{src}attn.in_proj_{param}", shape,
                              tuple((f"{dst}self_attn.{q}_proj.{param}", d) for q in "qkv"), "split"))
        for dif, ldm in _BIGG_LAYER.items():
            n_out, n_in = {"mlp.fc1": (cfg.intermediate_size, d), "mlp.fc2": (d, cfg.intermediate_size)}.get(
                dif, (d, d))
            if dif.startswith("layer_norm"):
                rules += [Rule(f"{src}{ldm}.{q}", (d,), ((f"{dst}{dif}.{q}", d),)) for q in ("weight", "bias")]
            else:
                rules += [Rule(f"{src}{ldm}.weight", (n_out, n_in), ((f"{dst}{dif}.weight", n_out),)),
                          Rule(f"{src}{ldm}.bias", (n_out,), ((f"{dst}{dif}.bias", n_out),))]
    return rules


def plan(configs: SDXLConfigs = SDXL_BASE) -> dict[Component, list[Rule]]:
    """Every tensor of a single-file SDXL checkpoint of these configs (names without the component prefix), with
    its expected shape and where it goes."""
    cfg = configs.parsed()
    return {"unet": _unet_plan(cfg["unet"]), "vae": _vae_plan(cfg["vae"]),
            "text_encoder": _clip_l_plan(cfg["text_encoder"]), "text_encoder_2": _bigg_plan(cfg["text_encoder_2"])}


# ------------------------------------------------------------------------------------------------ checks
def _summary(keys: Sequence[str], limit: int = 8) -> str:
    """The groups of names in a file (the name up to its first block index, three parts at most), largest first."""
    groups: Counter[str] = Counter()
    for k in keys:
        head = []
        for part in k.split(".")[:-1][:3]:
            if part.isdigit():
                break
            head.append(part)
        groups[".".join(head) + ".*" if head else k] += 1
    shown = ", ".join(f"{g} ({n})" for g, n in groups.most_common(limit))
    return shown + (f" and {len(groups) - limit} more groups" if len(groups) > limit else "")


def _relative(keys: Iterable[str]) -> str:
    keys = list(keys)
    for mark, what in _RELATIVES:
        if any(k.startswith(mark) for k in keys):
            return f" It looks like {what}."
    return ""


def check_shapes(shapes: Mapping[str, Sequence[int]], plans: Mapping[Component, list[Rule]], source: str,
                 config_name: str = SDXL_BASE.name) -> None:
    """Raise ModelLayoutError unless `shapes` (every name of the file -> shape) holds exactly the planned tensors of
    each component under its prefix (plus the ignorable buffers); names outside the four prefixes are not read."""
    keys = list(shapes)
    absent = [c for c in COMPONENTS if not any(k.startswith(PREFIXES[c]) for k in keys)]
    if absent:
        listed = ", ".join(f"{WHAT[c]} ({PREFIXES[c]}*)" for c in absent)
        raise ModelLayoutError(
            f"{source} is not an SDXL single-file checkpoint in Stability's layout: it has no {listed}. It holds: "
            f"{_summary(keys) or 'no tensors'}.{_relative(keys)} Pass a file such as sd_xl_base_1.0.safetensors, or "
            "a diffusers SDXL folder")
    problems = []
    for c in COMPONENTS:
        prefix = PREFIXES[c]
        expected = {r.source: r.shape for r in plans[c]}
        have = {k[len(prefix):]: tuple(s) for k, s in shapes.items() if k.startswith(prefix)}
        missing = [prefix + n for n in expected if n not in have]
        misshapen = [f"{prefix}{n} is {have[n]}, expected {expected[n]}" for n in expected
                     if n in have and have[n] != expected[n]]
        unexpected = sorted(prefix + n for n in have if n not in expected and n not in IGNORED[c])
        for items, what in ((misshapen, "misshapen"), (missing, "missing"), (unexpected, "unexpected")):
            if items:
                shown = ", ".join(items[:6]) + (f" (and {len(items) - 6} more)" if len(items) > 6 else "")
                problems.append(f"{WHAT[c]}: {len(items)} {what}: {shown}")
    if problems:
        raise ModelLayoutError(
            f"{source} does not match the {config_name} configs it is read against: " + "; ".join(problems) +
            f".{_relative(keys)} A truncated or partial file, or another model (a fine-tune with other sizes needs "
            "its own configs: configs=SDXLConfigs.from_folder(<its diffusers folder>))")


# ----------------------------------------------------------------------------------------------- convert
def convert(state: dict[str, Tensor], rules: Sequence[Rule]) -> dict[str, Tensor]:
    """One component's tensors (stored names without prefix, already checked against `rules`) with diffusers /
    transformers names. `state` is emptied as it goes, so a fused tensor is freed once its pieces are copied."""
    out: dict[str, Tensor] = {}
    for rule in rules:
        t = state.pop(rule.source)
        if rule.op == "split":
            start = 0
            for name, rows in rule.targets:
                # a copy, not a view: a view would keep the whole fused in_proj alive
                out[name] = ops.concat([t.narrow(0, start, rows)], axis=0)
                start += rows
        elif rule.op == "squeeze":
            out[rule.targets[0][0]] = t.reshape(*t.shape[:2])  # [C, C, 1, 1] -> [C, C]
        elif rule.op == "transpose":
            out[rule.targets[0][0]] = t.transpose(0, 1).contiguous()  # [D, P] -> [P, D]
        else:
            out[rule.targets[0][0]] = t
    return out


def ldm_to_diffusers(state: Mapping[str, Tensor], configs: SDXLConfigs = SDXL_BASE,
                     source: str = "the state dict") -> dict[Component, dict[str, Tensor]]:
    """A single-file SDXL state dict (Stability's names) -> {component: state dict in diffusers / transformers
    names}. The caller's dict is not changed; ModelLayoutError names missing, misshapen or unexpected tensors."""
    plans = plan(configs)
    check_shapes({k: t.shape for k, t in state.items()}, plans, source, configs.name)
    out = {}
    for c in COMPONENTS:
        prefix = PREFIXES[c]
        out[c] = convert({r.source: state[prefix + r.source] for r in plans[c]}, plans[c])
    return out


# -------------------------------------------------------------------------------------------------- load
@dataclass
class SDXLSingleFile:
    """What a single file gives: each component's weights (diffusers / transformers names, on the device) and the
    configs they were read against. Build the models with e.g. `UNet2DCondition(parsed["unet"], weights["unet"])`,
    or everything with `build_pipeline`."""

    weights: dict[Component, dict[str, Tensor]]
    configs: SDXLConfigs
    parsed: dict[Component, Any] = field(default_factory=dict)  # the config dataclasses
    source: str = ""


def load_sdxl_single_file(path: str | os.PathLike, device: Any = "cpu", dtype: Any = None,
                          configs: SDXLConfigs = SDXL_BASE, vae_dtype: Any = None) -> SDXLSingleFile:
    """Read an SDXL single-file checkpoint (sd_xl_base_1.0.safetensors layout) and convert it to diffusers names.
    The header is checked against `configs` (SDXL base by default) before any data is read; each component is
    then loaded on `device` in `dtype` (None keeps the stored dtype) and renamed, one at a time. `vae_dtype`
    overrides the VAE's dtype (pipelines never run SDXL's VAE in float16)."""
    source = os.fspath(path)
    plans = plan(configs)
    ckpt = safetensors.open_checkpoint(path)
    weights: dict[Component, dict[str, Tensor]] = {}
    try:
        check_shapes({k: ckpt.shape(k) for k in ckpt.keys()}, plans, source, configs.name)
        for c in COMPONENTS:
            prefix = PREFIXES[c]
            loaded = safetensors.load(ckpt, device=device, dtype=vae_dtype if c == "vae" and vae_dtype else dtype,
                                      names=[prefix + r.source for r in plans[c]])
            state = {n[len(prefix):]: t for n, t in loaded.items()}
            del loaded  # `state` is the only reference: converting frees each fused tensor once split
            weights[c] = convert(state, plans[c])
    finally:
        ckpt.close()  # loaded CPU tensors keep their own mappings
    return SDXLSingleFile(weights, configs, configs.parsed(), source)


def _tokenizer_folder(tokenizer_folder: str | os.PathLike | None) -> Path:
    folder = tokenizer_folder if tokenizer_folder is not None else os.environ.get(TOKENIZER_ENV)
    if not folder:
        raise ModelLayoutError(
            "an SDXL single-file checkpoint holds no tokenizers: pass tokenizer_folder=<folder with tokenizer/ and "
            f"tokenizer_2/ (vocab.json + merges.txt each)>, e.g. a download of only those two folders of "
            f"stabilityai/stable-diffusion-xl-base-1.0, or set {TOKENIZER_ENV} to it")
    folder = Path(folder)
    missing = [s for s in ("tokenizer", "tokenizer_2") if not (folder / s / "vocab.json").is_file()]
    if missing:
        lacks = " and ".join(s + "/vocab.json" for s in missing)
        raise ModelLayoutError(f"the SDXL tokenizer folder {folder} lacks {lacks}: it must hold tokenizer/ and "
                               "tokenizer_2/ as an SDXL diffusers download does")
    return folder


def load_sdxl_tokenizers(tokenizer_folder: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """SDXL's two CLIP tokenizers from `tokenizer_folder` (or the FASTDM_SDXL_TOKENIZERS environment variable): a
    folder with tokenizer/ and tokenizer_2/, which differ in their pad token ("!" for the second)."""
    from ..text_encoders.tokenizers import load_clip_tokenizer

    folder = _tokenizer_folder(tokenizer_folder)
    return load_clip_tokenizer(folder / "tokenizer"), load_clip_tokenizer(folder / "tokenizer_2")


def build_pipeline(path: str | os.PathLike, device: Any, dtype: Any, tokenizer_folder: str | os.PathLike | None = None,
                   configs: SDXLConfigs = SDXL_BASE) -> Any:
    """A StableDiffusionXLPipeline from a single file, on a resolved `device` in a compute `dtype` (see
    pipelines.resolve_device / resolve_dtype); the tokenizers come from `tokenizer_folder` (see
    load_sdxl_tokenizers), checked before the weights are read."""
    from ..denoisers.unet2d import UNet2DCondition
    from ..pipelines.sdxl import StableDiffusionXLPipeline, vae_dtype_for
    from ..text_encoders.clip import CLIPTextModel, CLIPTextModelWithProjection
    from ..vae import AutoencoderKL

    tokenizer, tokenizer_2 = load_sdxl_tokenizers(tokenizer_folder)
    loaded = load_sdxl_single_file(path, device=device, dtype=dtype, configs=configs,
                                   vae_dtype=vae_dtype_for(dtype, device))
    w, p, src = loaded.weights, loaded.parsed, loaded.source
    size = configs.unet.get("sample_size", 128)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return StableDiffusionXLPipeline(
        scheduler_config=configs.scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        text_encoder=CLIPTextModel(p["text_encoder"], w["text_encoder"], source=src),
        text_encoder_2=CLIPTextModelWithProjection(p["text_encoder_2"], w["text_encoder_2"], source=src),
        unet=UNet2DCondition(p["unet"], w["unet"], source=src), vae=AutoencoderKL(p["vae"], w["vae"], source=src),
        device=device, dtype=dtype, force_zeros_for_empty_prompt=configs.force_zeros_for_empty_prompt,
        default_sample_size=int(size), folder=Path(src))
