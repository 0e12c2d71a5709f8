"""SDXL from a single-file checkpoint in Stability's layout (sd_xl_base_1.0.safetensors): the conversion gives the
diffusers / transformers tensors bit for bit, the UNet and the whole pipeline built from it compute what the
folder-loaded ones compute, the SDXL base plan has sd_xl_base_1.0's names and shapes, and files that are not a
complete SDXL are refused by name. Fixture: tests/reference/gen_sdxl_single_file.py (checked there against
diffusers' own converters)."""

from pathlib import Path

import numpy as np
import pytest
from fastdm.models.convert.sdxl_single_file import (
    PREFIXES,
    SDXL_BASE,
    TOKENIZER_ENV,
    SDXLConfigs,
    build_pipeline,
    ldm_to_diffusers,
    load_sdxl_single_file,
    load_sdxl_tokenizers,
    plan,
)
from fastdm.models.denoisers.unet2d import UNet2DCondition
from fastdm.models.pipelines import Pipeline
from fastdm.runtime import cuda, dtypes, safetensors
from fastdm.runtime.errors import ModelLayoutError, SafetensorsError

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-sdxl"
SINGLE = FIXTURES / "sdxl_tiny_single_file.safetensors"
FOLDER_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
                "text_encoder": "text_encoder/model.safetensors", "text_encoder_2": "text_encoder_2/model.safetensors"}


@pytest.fixture(scope="module")
def tiny_configs() -> SDXLConfigs:
    return SDXLConfigs.from_folder(TINY)


def arrays(path: Path) -> dict[str, np.ndarray]:
    return {k: t.numpy() for k, t in safetensors.load(path, device="cpu").items()}


def folder_state(component: str) -> dict[str, np.ndarray]:
    """The diffusers folder's tensors of a component, by the names the fastdm models take."""
    sd = arrays(TINY / FOLDER_FILES[component])
    if component.startswith("text_encoder"):  # transformers 5 saves CLIPTextModel without "text_model."
        sd = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}
    return sd


def assert_bits_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:8])
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape and g.dtype == w.dtype, (what, k, g.shape, w.shape, g.dtype, w.dtype)
        assert g.tobytes() == w.tobytes(), (what, k)


def write(tensors: dict[str, np.ndarray], path: Path) -> Path:
    safetensors.save(tensors, path)
    return path


# ------------------------------------------------------------------------------------------------ conversion
def test_file_converts_to_the_folder_tensors_exactly(tiny_configs):
    loaded = load_sdxl_single_file(SINGLE, device="cpu", configs=tiny_configs)
    assert set(loaded.weights) == set(FOLDER_FILES)
    for c in FOLDER_FILES:
        assert_bits_equal({k: t.numpy() for k, t in loaded.weights[c].items()}, folder_state(c), c)


def test_in_memory_state_dict_converts_the_same(tiny_configs):
    state = safetensors.load(SINGLE, device="cpu")
    before = set(state)
    out = ldm_to_diffusers(state, tiny_configs)
    assert set(state) == before  # the caller's dict is left alone
    for c in FOLDER_FILES:
        assert_bits_equal({k: t.numpy() for k, t in out[c].items()}, folder_state(c), c)


def test_dtype_cast_and_vae_dtype(tiny_configs):
    loaded = load_sdxl_single_file(SINGLE, device="cpu", dtype="float32", configs=tiny_configs, vae_dtype="bfloat16")
    assert {t.dtype for t in loaded.weights["unet"].values()} == {dtypes.float32}
    assert {t.dtype for t in loaded.weights["vae"].values()} == {dtypes.bfloat16}
    want = folder_state("text_encoder_2")["text_projection.weight"].astype(np.float32)
    np.testing.assert_array_equal(loaded.weights["text_encoder_2"]["text_projection.weight"].numpy(), want)


# ----------------------------------------------------------------------------------------------- numerics
def test_unet_from_single_file_matches_folder_unet(tiny_configs):
    loaded = load_sdxl_single_file(SINGLE, device="cpu", dtype="float32", configs=tiny_configs)
    from_file = UNet2DCondition(loaded.parsed["unet"], loaded.weights["unet"], source=str(SINGLE))
    from_folder = UNet2DCondition.from_pretrained(TINY / "unet", device="cpu", dtype="float32")
    cfg = from_folder.config
    rng = np.random.default_rng(7)
    b, h, w, s = 2, 9, 11, 5  # odd latent size and text length
    sample = rng.standard_normal((b, cfg.in_channels, h, w)).astype(np.float32)
    ctx = rng.standard_normal((b, s, cfg.cross_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((b, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim))
    time_ids = np.array([[72, 88, 0, 0, 72, 88], [64, 64, 3, 5, 72, 88]], dtype=np.float32)
    t = np.array([981.0, 17.0], dtype=np.float32)
    got = from_file(sample, t, ctx, pooled.astype(np.float32), time_ids).numpy()
    want = from_folder(sample, t, ctx, pooled.astype(np.float32), time_ids).numpy()
    assert got.shape == (b, cfg.out_channels, h, w) and np.isfinite(got).all()
    assert np.abs(want).max() > 1e-3  # a live output, not zeros
    np.testing.assert_array_equal(got, want)


def test_pipeline_from_single_file_matches_folder_pipeline(tiny_configs):
    kw = dict(prompt=["a red fox in snow!", "tiny castle"], negative_prompt="blurry", height=64, width=72,
              num_inference_steps=3, seed=11, output_type="latent")
    pipe = build_pipeline(SINGLE, cuda.CPU, dtypes.float32, tokenizer_folder=TINY, configs=tiny_configs)
    ref = Pipeline.from_pretrained(TINY, device="cpu", dtype="float32")
    got, want = pipe(**kw), ref(**kw)
    assert got.shape == (2, 4, 8, 9) and np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)
    assert pipe.default_sample_size == 8 and pipe.scheduler_config["_class_name"] == "EulerDiscreteScheduler"


# ---------------------------------------------------------------------------------------- SDXL base plan
def test_sdxl_base_plan_has_the_published_names_and_shapes():
    """Names and shapes of sd_xl_base_1.0.safetensors (2515 tensors: these 2513 + position_ids + logit_scale)."""
    p = plan(SDXL_BASE)
    assert {c: len(r) for c, r in p.items()} == {"unet": 1680, "vae": 248, "text_encoder": 196,
                                                 "text_encoder_2": 389}
    shapes = {c: {r.source: r.shape for r in rules} for c, rules in p.items()}
    targets = {c: {r.source: [n for n, _ in r.targets] for r in rules} for c, rules in p.items()}
    u, v, g = shapes["unet"], shapes["vae"], shapes["text_encoder_2"]
    assert u["input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert u["label_emb.0.0.weight"] == (1280, 2816)
    assert u["input_blocks.3.0.op.weight"] == (320, 320, 3, 3)  # level 0 has no attention
    assert u["input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
    assert u["input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight"] == (640, 2048)
    assert u["input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight"] == (10240, 1280)
    assert "input_blocks.8.1.transformer_blocks.10.norm1.weight" not in u
    assert u["middle_block.1.proj_in.weight"] == (1280, 1280)
    assert u["output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)  # upsampler after an attention
    assert u["output_blocks.5.2.conv.weight"] == (640, 640, 3, 3)
    assert u["output_blocks.8.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert u["out.2.weight"] == (4, 320, 3, 3)
    assert targets["unet"]["output_blocks.2.2.conv.weight"] == ["up_blocks.0.upsamplers.0.conv.weight"]
    assert targets["unet"]["input_blocks.7.0.emb_layers.1.bias"] == ["down_blocks.2.resnets.0.time_emb_proj.bias"]
    assert v["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert v["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert targets["vae"]["decoder.up.3.upsample.conv.weight"] == ["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    assert targets["vae"]["encoder.mid.attn_1.proj_out.weight"] == ["encoder.mid_block.attentions.0.to_out.0.weight"]
    assert g["transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert g["text_projection"] == (1280, 1280) and g["positional_embedding"] == (77, 1280)
    assert targets["text_encoder_2"]["transformer.resblocks.0.attn.in_proj_bias"] == [
        f"text_model.encoder.layers.0.self_attn.{q}_proj.bias" for q in "qkv"]
    assert shapes["text_encoder"]["text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)


# ------------------------------------------------------------------------------------------------ errors
def test_tiny_file_against_sdxl_base_configs_is_refused():
    with pytest.raises(ModelLayoutError, match=r"SDXL base 1\.0 configs.*misshapen.*input_blocks\.0\.0\.weight is "
                                               r"\(32, 4, 3, 3\), expected \(320, 4, 3, 3\)"):
        load_sdxl_single_file(SINGLE)


def test_flux_file_is_refused_by_name():
    with pytest.raises(ModelLayoutError, match=r"no UNet \(model\.diffusion_model\.\*\).*double_blocks.*FLUX\.1"):
        load_sdxl_single_file(FIXTURES / "flux_transformer_tiny_bfl.safetensors")


def test_file_cut_short_is_refused(tmp_path):
    data = SINGLE.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) * 2 // 3])  # an interrupted download
    with pytest.raises(SafetensorsError, match="truncated"):  # from the header, before any data is read
        load_sdxl_single_file(cut, configs=SDXLConfigs.from_folder(TINY))


def test_partial_file_names_missing_and_misshapen(tmp_path, tiny_configs):
    t = arrays(SINGLE)
    unet = PREFIXES["unet"]
    dropped = [k for k in t if k.startswith(unet + "output_blocks.2.")]
    assert dropped
    for k in dropped:
        del t[k]
    t[PREFIXES["text_encoder_2"] + "text_projection"] = t[PREFIXES["text_encoder_2"] + "text_projection"].T.copy()
    t[PREFIXES["vae"] + "encoder.extra.weight"] = np.ones(3, dtype=np.float32)
    path = write(t, tmp_path / "partial.safetensors")
    with pytest.raises(ModelLayoutError) as e:
        load_sdxl_single_file(path, configs=tiny_configs)
    msg = str(e.value)
    assert f"UNet: {len(dropped)} missing: {unet}output_blocks.2." in msg
    assert "OpenCLIP-bigG text encoder: 1 misshapen: conditioner.embedders.1.model.text_projection is (32, 16), " \
           "expected (16, 32)" in msg
    assert "VAE: 1 unexpected: first_stage_model.encoder.extra.weight" in msg
    with pytest.raises(ModelLayoutError, match="missing"):
        ldm_to_diffusers(safetensors.load(path, device="cpu"), tiny_configs)


def test_component_absent_is_named(tmp_path, tiny_configs):
    t = {k: v for k, v in arrays(SINGLE).items() if not k.startswith(PREFIXES["text_encoder_2"])}
    t["conditioner.embedders.0.model.ln_final.weight"] = np.ones(16, dtype=np.float32)  # the refiner's bigG slot
    path = write(t, tmp_path / "no_bigg.safetensors")
    with pytest.raises(ModelLayoutError, match=r"no OpenCLIP-bigG text encoder \(conditioner\.embedders\.1\.model\.\*\)"
                                               r".*SDXL refiner"):
        load_sdxl_single_file(path, configs=tiny_configs)


def test_tokenizers_need_a_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    with pytest.raises(ModelLayoutError, match=TOKENIZER_ENV):
        load_sdxl_tokenizers()
    with pytest.raises(ModelLayoutError, match="tokenizer/vocab.json and tokenizer_2/vocab.json"):
        load_sdxl_tokenizers(tmp_path)
    monkeypatch.setenv(TOKENIZER_ENV, str(TINY))
    tok, tok_2 = load_sdxl_tokenizers()
    ids, _ = tok("hello!")
    ids_2, _ = tok_2("hello!")
    assert ids[0, -1] == tok.token_id("<|endoftext|>") and ids_2[0, -1] == tok_2.token_id("!")  # pads differ


def test_pipeline_from_pretrained_takes_the_single_file(tmp_path):
    """fastdm.Pipeline.from_pretrained(file) goes to the SDXL single-file loader with SDXL base's configs, which
    refuse the tiny file (other shapes) by naming the misshapen tensors."""
    from fastdm import Pipeline

    with pytest.raises(ModelLayoutError, match="misshapen|shape"):
        Pipeline.from_pretrained(SINGLE, device="cpu", tokenizer_folder=TINY)
