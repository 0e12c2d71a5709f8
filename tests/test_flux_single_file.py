"""FLUX.1 transformers from single-file checkpoints (BFL layout, ComfyUI layout, a lone diffusers file): the
conversion gives diffusers' tensors bit for bit, the loaded model gives diffusers' output, and files that are not a
complete FLUX.1 transformer are refused by name. The BFL fixtures come from tests/reference/gen_flux_single_file.py
(checked there against diffusers' own converter)."""

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from fastdm.models.convert import bfl_to_diffusers, detect_layout, infer_config, load_flux_single_file
from fastdm.models.convert.flux_single_file import _plan
from fastdm.models.denoisers.flux import FluxTransformer, FluxTransformerConfig, expected_weights
from fastdm.models.loading import read_config
from fastdm.runtime import safetensors
from fastdm.runtime.errors import ModelLayoutError
from fastdm.runtime.tensor import Tensor
from numerics import rel_l2

FIXTURES = Path(__file__).parent / "fixtures"
DEV, SCHNELL = "flux_transformer_tiny", "flux_transformer_tiny_schnell"
AXES = {DEV: (16, 24, 24), SCHNELL: (8, 12, 12)}  # the tiny fixtures' RoPE split (head dims 64 and 32)
INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")
COMFY = "model.diffusion_model."


def bfl_path(name: str) -> Path:
    return FIXTURES / f"{name}_bfl.safetensors"


def diffusers_path(name: str) -> Path:
    return FIXTURES / name / "diffusion_pytorch_model.safetensors"


def arrays(path: Path) -> dict[str, np.ndarray]:
    return {k: t.numpy() for k, t in safetensors.load(path, device="cpu").items()}


def run(model: FluxTransformer, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The model's output on the fixture inputs, and diffusers' expected output."""
    io = arrays(FIXTURES / f"{name}_io.safetensors")
    out = model(**{k: io[k] for k in INPUTS}, guidance=io.get("guidance"))
    return np.asarray(out.numpy(), dtype=np.float32), io["expected"]


def write(tensors: dict[str, np.ndarray], path: Path) -> Path:
    safetensors.save(tensors, path)
    return path


def comfyui_file(name: str, path: Path) -> Path:
    """The BFL fixture under ComfyUI's prefix, beside VAE and text-encoder tensors of other dtypes (a float16 one,
    an int64 one) that the loader must leave alone."""
    rng = np.random.default_rng(0)
    tensors = {COMFY + k: v for k, v in arrays(bfl_path(name)).items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = rng.standard_normal((8, 4, 3, 3)).astype(np.float16)
    tensors["text_encoders.clip_l.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)
    tensors["text_encoders.t5xxl.transformer.shared.weight"] = rng.standard_normal((11, 6)).astype(np.float32)
    return write(tensors, path)


# --------------------------------------------------------------------------------------------- convert
@pytest.mark.parametrize("name", [DEV, SCHNELL])
def test_conversion_reproduces_the_diffusers_tensors_exactly(name):
    bfl = safetensors.load(bfl_path(name), device="cpu")
    converted = bfl_to_diffusers(bfl)
    reference = arrays(diffusers_path(name))
    assert sorted(converted) == sorted(reference)
    for k, ref in reference.items():
        got = converted[k].numpy()
        assert got.dtype == ref.dtype and got.shape == ref.shape, k
        np.testing.assert_array_equal(got.view(np.uint16), ref.view(np.uint16), err_msg=k)  # bf16 bits


def test_conversion_leaves_the_input_alone_and_splits_into_copies():
    bfl = safetensors.load(bfl_path(SCHNELL), device="cpu")
    before = dict(bfl)
    converted = bfl_to_diffusers(bfl)
    assert bfl == before  # same names, same tensor objects
    assert converted["x_embedder.weight"] is bfl["img_in.weight"]  # renamed tensors are passed through
    linear1 = bfl["single_blocks.1.linear1.weight"].numpy()
    for piece in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        # a view would keep all of linear1 alive for as long as the piece lives
        assert not np.shares_memory(converted[f"single_transformer_blocks.1.{piece}.weight"].numpy(), linear1)


def test_final_adaln_halves_are_swapped():
    bfl = arrays(bfl_path(DEV))
    converted = bfl_to_diffusers({k: Tensor.from_numpy(v) for k, v in bfl.items()})
    for p in ("weight", "bias"):
        shift, scale = np.split(bfl[f"final_layer.adaLN_modulation.1.{p}"], 2, axis=0)
        out = converted[f"norm_out.linear.{p}"].numpy()
        np.testing.assert_array_equal(out, np.concatenate([scale, shift], axis=0))
        assert not np.array_equal(shift, scale)


def test_comfyui_state_dict_keeps_only_the_transformer(tmp_path):
    state = safetensors.load(comfyui_file(SCHNELL, tmp_path / "comfy.safetensors"), device="cpu")
    converted = bfl_to_diffusers(state)
    reference = arrays(diffusers_path(SCHNELL))
    assert sorted(converted) == sorted(reference)
    for k, ref in reference.items():
        np.testing.assert_array_equal(converted[k].numpy().view(np.uint16), ref.view(np.uint16), err_msg=k)


def test_diffusers_names_are_not_converted_again():
    with pytest.raises(ModelLayoutError, match="already has diffusers' names"):
        bfl_to_diffusers(safetensors.load(diffusers_path(SCHNELL), device="cpu"))


# ----------------------------------------------------------------------------- published FLUX.1 shapes
def published_bfl_shapes(in_channels: int, out_channels: int, guidance: bool) -> dict[str, tuple[int, ...]]:
    """The tensors of BFL's released FLUX.1 transformer files (flux1-dev / -schnell / -fill-dev.safetensors),
    written out from the published headers: width 3072, 19 double and 38 single blocks."""
    d = 3072
    lin = {"time_in.in_layer": (d, 256), "time_in.out_layer": (d, d), "vector_in.in_layer": (d, 768),
           "vector_in.out_layer": (d, d), "img_in": (d, in_channels), "txt_in": (d, 4096),
           "final_layer.linear": (out_channels, d), "final_layer.adaLN_modulation.1": (2 * d, d)}
    if guidance:
        lin.update({"guidance_in.in_layer": (d, 256), "guidance_in.out_layer": (d, d)})
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(19):
        for s in ("img", "txt"):
            lin.update({f"double_blocks.{i}.{s}_mod.lin": (6 * d, d), f"double_blocks.{i}.{s}_attn.qkv": (3 * d, d),
                        f"double_blocks.{i}.{s}_attn.proj": (d, d), f"double_blocks.{i}.{s}_mlp.0": (4 * d, d),
                        f"double_blocks.{i}.{s}_mlp.2": (d, 4 * d)})
            shapes[f"double_blocks.{i}.{s}_attn.norm.query_norm.scale"] = (128,)
            shapes[f"double_blocks.{i}.{s}_attn.norm.key_norm.scale"] = (128,)
    for i in range(38):
        lin.update({f"single_blocks.{i}.modulation.lin": (3 * d, d), f"single_blocks.{i}.linear1": (7 * d, d),
                    f"single_blocks.{i}.linear2": (d, 5 * d)})
        shapes[f"single_blocks.{i}.norm.query_norm.scale"] = (128,)
        shapes[f"single_blocks.{i}.norm.key_norm.scale"] = (128,)
    for name, (n_out, n_in) in lin.items():
        shapes[f"{name}.weight"] = (n_out, n_in)
        shapes[f"{name}.bias"] = (n_out,)
    return shapes


@pytest.mark.parametrize("variant, in_ch, out_ch, guidance, diffusers_cfg", [
    ("dev", 64, 64, True, dict(guidance_embeds=True)),
    ("schnell", 64, 64, False, dict(guidance_embeds=False)),
    ("fill", 384, 64, True, dict(guidance_embeds=True, in_channels=384, out_channels=64)),
])
def test_published_shapes_give_the_published_config(variant, in_ch, out_ch, guidance, diffusers_cfg):
    shapes = published_bfl_shapes(in_ch, out_ch, guidance)
    cfg = infer_config(shapes)
    # diffusers' config.json of black-forest-labs/FLUX.1-<variant>: defaults plus these fields
    assert cfg == FluxTransformerConfig(**diffusers_cfg), variant
    plan = _plan(cfg)
    assert {r.source: r.shape for r in plan} == shapes
    # what the plan produces is exactly what the model loads
    produced = {name: (rows,) + r.shape[1:] for r in plan for name, rows in r.targets}
    assert produced == expected_weights(cfg)


# ----------------------------------------------------------------------------------------------- load
@pytest.mark.parametrize("name", [DEV, SCHNELL])
def test_bfl_file_loads_without_config_and_matches_diffusers(name):
    model = load_flux_single_file(bfl_path(name), device="cpu", dtype="float32", axes_dims_rope=AXES[name])
    assert model.config == read_config(FluxTransformerConfig, FIXTURES / name)
    out, expected = run(model, name)
    assert rel_l2(out, expected) < 1e-4
    # the same weights as the diffusers folder: the same computation, bit for bit
    folder_model = FluxTransformer.from_pretrained(FIXTURES / name, device="cpu", dtype="float32")
    np.testing.assert_array_equal(out, run(folder_model, name)[0])


def test_comfyui_file_loads_only_the_transformer(tmp_path):
    path = comfyui_file(DEV, tmp_path / "flux1-dev-comfy.safetensors")
    model = load_flux_single_file(path, device="cpu", dtype=None, axes_dims_rope=AXES[DEV])
    assert model.dtype.name == "bfloat16"  # the float16 VAE tensor was not read, or the dtypes would mix
    assert model.config == read_config(FluxTransformerConfig, FIXTURES / DEV)
    f32 = load_flux_single_file(path, device="cpu", dtype="float32", axes_dims_rope=AXES[DEV])
    out, expected = run(f32, DEV)
    assert rel_l2(out, expected) < 1e-4


def test_lone_diffusers_file_loads_without_config():
    model = load_flux_single_file(diffusers_path(SCHNELL), dtype="float32", axes_dims_rope=AXES[SCHNELL])
    assert model.config == read_config(FluxTransformerConfig, FIXTURES / SCHNELL)
    out, expected = run(model, SCHNELL)
    assert rel_l2(out, expected) < 1e-4


def test_guidance_embedder_is_read_from_the_file():
    dev = load_flux_single_file(bfl_path(DEV), dtype="float32", axes_dims_rope=AXES[DEV])
    schnell = load_flux_single_file(bfl_path(SCHNELL), dtype="float32", axes_dims_rope=AXES[SCHNELL])
    assert dev.config.guidance_embeds and dev.guidance_embedder is not None
    assert not schnell.config.guidance_embeds and schnell.guidance_embedder is None


def test_unknown_rope_split_must_be_given():
    # the fixtures' head dim is 64; FLUX.1's 128 implies (16, 56, 56), any other size needs axes_dims_rope
    with pytest.raises(ModelLayoutError, match=r"head dim 64 .*axes_dims_rope"):
        load_flux_single_file(bfl_path(DEV))


# ------------------------------------------------------------------------------------------ detection
def test_detect_layout():
    bfl = list(arrays(bfl_path(SCHNELL)))
    assert detect_layout(bfl) == "bfl"
    assert detect_layout([COMFY + k for k in bfl] + ["first_stage_model.encoder.conv_in.weight"]) == "comfyui"
    assert detect_layout(arrays(diffusers_path(SCHNELL))) == "diffusers"
    with pytest.raises(ModelLayoutError, match="mixes FLUX transformer layouts"):
        detect_layout(bfl + [COMFY + k for k in bfl])


SDXL_KEYS = {  # a ComfyUI SDXL checkpoint: UNet under the same prefix, VAE, both text encoders
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (8,),
    "model.diffusion_model.middle_block.1.proj_in.weight": (8, 8),
    "model.diffusion_model.out.2.weight": (4, 8, 3, 3),
    "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (8,),
    "conditioner.embedders.1.model.ln_final.weight": (8,),
}


def test_non_flux_file_is_refused_with_what_it_holds(tmp_path):
    rng = np.random.default_rng(1)
    path = write({k: rng.standard_normal(s).astype(np.float16) for k, s in SDXL_KEYS.items()}, tmp_path / "sdxl.st")
    with pytest.raises(ModelLayoutError) as e:
        load_flux_single_file(path)
    msg = str(e.value)
    assert "no FLUX.1 transformer" in msg
    assert "double_blocks." in msg and "single_blocks." in msg  # what it looked for
    assert "model.diffusion_model.input_blocks.* (2)" in msg and "first_stage_model.decoder.conv_in.*" in msg


def test_chroma_like_file_is_named(tmp_path):
    tensors = {k: v for k, v in arrays(bfl_path(SCHNELL)).items() if not k.startswith("vector_in.")}
    tensors["distilled_guidance_layer.in_proj.bias"] = np.ones(4, dtype=ml_dtypes.bfloat16)
    with pytest.raises(ModelLayoutError, match=r"missing: vector_in\.in_layer\.weight.*Chroma"):
        load_flux_single_file(write(tensors, tmp_path / "chroma.safetensors"), axes_dims_rope=AXES[SCHNELL])


# ---------------------------------------------------------------------------------- truncated / broken
def edited(name: str, path: Path, edit, prefix: str = "") -> Path:
    tensors = {prefix + k: v for k, v in arrays(bfl_path(name)).items()}
    edit(tensors)
    return write(tensors, path)


@pytest.mark.parametrize("prefix", ["", COMFY])
def test_truncated_file_names_the_missing_tensors(tmp_path, prefix):
    gone = ["single_blocks.1.linear2.weight", "double_blocks.0.txt_attn.qkv.bias"]

    def drop(t):
        for g in gone:
            del t[prefix + g]

    path = edited(SCHNELL, tmp_path / "truncated.safetensors", drop, prefix)
    with pytest.raises(ModelLayoutError) as e:
        load_flux_single_file(path, axes_dims_rope=AXES[SCHNELL])
    msg = str(e.value)
    assert "missing 2 tensor(s)" in msg
    for g in gone:
        assert prefix + g in msg
    assert ("comfyui" if prefix else "bfl") in msg and "2 double + 2 single blocks" in msg


def test_missing_size_anchor_is_named(tmp_path):
    path = edited(DEV, tmp_path / "no_img_in.safetensors", lambda t: t.pop("img_in.weight"))
    with pytest.raises(ModelLayoutError, match=r"missing: img_in\.weight"):
        load_flux_single_file(path, axes_dims_rope=AXES[DEV])


def test_misshapen_tensor_is_named(tmp_path):
    name = "double_blocks.1.img_mlp.2.weight"

    def edit(t):
        t[name] = np.ascontiguousarray(t[name][:, :-1])

    path = edited(SCHNELL, tmp_path / "misshapen.safetensors", edit)
    with pytest.raises(ModelLayoutError, match=name.replace(".", r"\.") + r" is \(64, 255\), expected \(64, 256\)"):
        load_flux_single_file(path, axes_dims_rope=AXES[SCHNELL])


def test_scaled_fp8_extras_are_refused(tmp_path):
    def edit(t):
        t["double_blocks.0.img_attn.qkv.scale_weight"] = np.ones(1, dtype=np.float32)
        t["scaled_fp8"] = np.zeros(2, dtype=np.float32)

    path = edited(SCHNELL, tmp_path / "scaled.safetensors", edit)
    with pytest.raises(ModelLayoutError, match=r"2 unexpected tensor\(s\): double_blocks\.0\.img_attn\.qkv\.scale_"
                                               r"weight, scaled_fp8.*scaled-fp8"):
        load_flux_single_file(path, axes_dims_rope=AXES[SCHNELL])


def test_converter_refuses_a_truncated_state_dict():
    state = safetensors.load(bfl_path(DEV), device="cpu")
    del state["double_blocks.0.img_attn.norm.key_norm.scale"]
    with pytest.raises(ModelLayoutError, match=r"missing 1 tensor\(s\): double_blocks\.0\.img_attn\.norm\.key_norm"):
        bfl_to_diffusers(state)


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_bfl_file_on_gpu_bf16(tmp_path):
    from fastdm.runtime import dtypes

    bfl = safetensors.load(bfl_path(DEV), device="cuda")
    converted = bfl_to_diffusers(bfl)
    reference = arrays(diffusers_path(DEV))
    for k, ref in reference.items():  # split / swapped on the device: the same bits as on the host
        assert converted[k].is_cuda, k
        np.testing.assert_array_equal(converted[k].numpy().view(np.uint16), ref.view(np.uint16), err_msg=k)

    path = comfyui_file(DEV, tmp_path / "comfy.safetensors")
    model = load_flux_single_file(path, device="cuda", dtype="bfloat16", axes_dims_rope=AXES[DEV])
    io = arrays(FIXTURES / f"{DEV}_io.safetensors")
    out = model(**{k: Tensor.from_numpy(io[k], device="cuda") for k in INPUTS}, guidance=io["guidance"])
    assert out.is_cuda and out.dtype == dtypes.bfloat16
    err = rel_l2(np.asarray(out.numpy(), dtype=np.float32), io["expected"])
    assert err < 2e-2, f"rel_l2 {err:.3e}"  # the bound of test_flux_transformer's bf16 GPU test
