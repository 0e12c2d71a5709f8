"""SDXL UNet: parity with diffusers' UNet2DConditionModel on a tiny random SDXL-shaped checkpoint, the weight list
at full SDXL size, and the loader's and forward's errors. Fixtures come from tests/reference/gen_sdxl_unet.py
(run with the reference venv)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastdm.models.denoisers.unet2d import UNet2DCondition, UNet2DConditionConfig, expected_weights
from fastdm.models.loading import read_config
from fastdm.runtime import safetensors
from fastdm.runtime.errors import InvalidArgumentError, ModelLayoutError, ShapeError
from fastdm.runtime.tensor import Tensor
from numerics import rel_l2

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "sdxl_unet_tiny"
IO = FIXTURES / "sdxl_unet_tiny_io.safetensors"
INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
SDXL_BASE_TENSORS, SDXL_BASE_PARAMS = 1680, 2_567_463_684  # diffusers' SDXL base UNet state dict


def io_arrays() -> dict[str, np.ndarray]:
    return {k: t.numpy() for k, t in safetensors.load(IO, device="cpu").items()}


def run(model: UNet2DCondition, io: dict, **override) -> np.ndarray:
    args = {k: io[k] for k in INPUTS} | override
    return np.asarray(model(**args).numpy(), dtype=np.float32)


@pytest.fixture(scope="module")
def model() -> UNet2DCondition:
    return UNet2DCondition.from_pretrained(TINY, device="cpu", dtype="float32")


def test_matches_diffusers_on_cpu(model):
    io = io_arrays()
    out = run(model, io)
    assert out.shape == io["expected"].shape == (2, 4, 16, 16)
    assert rel_l2(out, io["expected"]) < 1e-4


def test_two_heads_per_transformer():
    """The same weights read with attention_head_dim [1, 2] (2 heads of 32: diffusers' attention_head_dim is a head
    count) give diffusers' output for that config, which differs from the 1-head output by about 1e-1."""
    io = io_arrays()
    raw = json.loads((TINY / "config.json").read_text())
    config = read_config(UNet2DConditionConfig, dict(raw, attention_head_dim=[1, 2]))
    model = UNet2DCondition(config, safetensors.load(TINY, device="cpu", dtype="float32"))
    assert model.up_blocks[0].attentions[0].blocks[0].heads == 2
    assert rel_l2(run(model, io), io["expected_heads2"]) < 1e-4


def test_odd_latent_size_and_scalar_timestep(model):
    """13 x 11 latents: the downsample rounds up (7 x 6) and the upsampler goes back to the skip's 13 x 11."""
    io = io_arrays()
    out = run(model, io, sample=io["odd_sample"], timestep=float(io["odd_timestep"][0]))
    assert out.shape == (2, 4, 13, 11)
    assert rel_l2(out, io["expected_odd"]) < 1e-4


def first_sample(io: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[:1] for k, v in io.items()}


def test_batch_of_one_matches(model):
    io = first_sample(io_arrays())
    assert rel_l2(run(model, io), io["expected"]) < 1e-4


def test_from_weights_dict_and_pipeline_root(tmp_path, model):
    """A model built from an in-memory dict equals the loaded one; a pipeline root resolves to unet/."""
    io = io_arrays()
    weights = safetensors.load(TINY, device="cpu", dtype="float32")
    n = len(weights)
    built = UNet2DCondition(read_config(UNet2DConditionConfig, TINY), dict(weights))
    assert len(weights) == n  # the caller's dict is untouched when a copy is passed
    np.testing.assert_array_equal(run(built, io), run(model, io))

    shutil.copytree(TINY, tmp_path / "unet")
    rooted = UNet2DCondition.from_pretrained(tmp_path, device="cpu", dtype="float32")
    np.testing.assert_array_equal(run(rooted, io), run(model, io))


# ------------------------------------------------------------------------------------------- full size
def full_size() -> tuple[dict, dict[str, tuple[int, ...]]]:
    """SDXL base's UNet config and diffusers' state-dict shapes at that size, recorded by the generator."""
    with safetensors.SafetensorsFile(IO) as f:
        meta = f.metadata
    shapes = {k: tuple(v) for k, v in json.loads(meta["full_size_shapes"]).items()}
    return json.loads(meta["full_size_config"]), shapes


def test_full_size_weight_list_equals_diffusers():
    """At SDXL size (shapes only, nothing allocated) the expected weights are exactly diffusers' state dict."""
    raw, diffusers_shapes = full_size()
    cfg = read_config(UNet2DConditionConfig, raw)
    shapes = expected_weights(cfg)
    assert len(shapes) == len(diffusers_shapes) == SDXL_BASE_TENSORS
    assert sum(math.prod(s) for s in shapes.values()) == SDXL_BASE_PARAMS  # 2.567B
    assert shapes == diffusers_shapes
    # SDXL's attention_head_dim [5, 10, 20] are head counts: 64-wide heads, 70 transformer blocks
    plans = [p.attn for p in cfg.down_plans() + [cfg.mid_plan()] + cfg.up_plans() if p.attn is not None]
    assert {(a.channels, a.heads, a.head_dim) for a in plans} == {(640, 10, 64), (1280, 20, 64)}
    assert sum(n.endswith("attn2.to_k.weight") for n in shapes) == 70


# ---------------------------------------------------------------------------------------------- errors
def _rewrite_checkpoint(dst: Path, edit) -> Path:
    """Copy the fixture folder, passing its tensors (name -> numpy) through `edit` before writing them back."""
    shutil.copytree(TINY, dst)
    path = dst / "diffusion_pytorch_model.safetensors"
    tensors = {k: t.numpy().copy() for k, t in safetensors.load(path, device="cpu").items()}
    edit(tensors)
    safetensors.save(tensors, path)
    return dst


def test_folder_missing_a_tensor_is_named(tmp_path):
    gone = "up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_v.weight"
    folder = _rewrite_checkpoint(tmp_path / "broken", lambda t: t.pop(gone))
    with pytest.raises(ModelLayoutError, match=r"missing 1 tensor\(s\): " + gone.replace(".", r"\.")):
        UNet2DCondition.from_pretrained(folder, device="cpu", dtype="float32")


def test_folder_with_misshapen_tensor_is_named(tmp_path):
    name = "down_blocks.1.resnets.0.conv_shortcut.weight"

    def edit(t):
        t[name] = t[name][:, :-1].copy()

    folder = _rewrite_checkpoint(tmp_path / "broken", edit)
    with pytest.raises(ModelLayoutError, match=name.replace(".", r"\.") + r" is \(64, 31, 1, 1\), expected "
                                               r"\(64, 32, 1, 1\)"):
        UNet2DCondition.from_pretrained(folder, device="cpu", dtype="float32")


def test_config_that_disagrees_with_weights(tmp_path):
    folder = tmp_path / "more_layers"
    shutil.copytree(TINY, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["transformer_layers_per_block"] = [1, 3]
    (folder / "config.json").write_text(json.dumps(cfg))
    # 4 transformers (down, mid, 2 up) gain a block of 20 tensors
    with pytest.raises(ModelLayoutError,
                       match=r"missing 80 tensor\(s\): down_blocks\.1\.attentions\.0\.transformer_blocks\.2\."):
        UNet2DCondition.from_pretrained(folder, device="cpu", dtype="float32")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLayoutError, match="config.json"):
        UNet2DCondition.from_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize("key, value", [("use_linear_projection", False), ("class_embed_type", "timestep"),
                                        ("resnet_time_scale_shift", "scale_shift"), ("time_cond_proj_dim", 256)])
def test_unimplemented_config_options_are_refused(key, value):
    raw = json.loads((TINY / "config.json").read_text())
    with pytest.raises(ModelLayoutError, match=key):
        read_config(UNet2DConditionConfig, dict(raw, **{key: value}))


def test_config_with_wrong_block_types_or_heads():
    raw = json.loads((TINY / "config.json").read_text())
    with pytest.raises(ModelLayoutError, match="AttnDownBlock2D"):
        read_config(UNet2DConditionConfig, dict(raw, down_block_types=["DownBlock2D", "AttnDownBlock2D"]))
    with pytest.raises(ModelLayoutError, match="number of heads"):
        read_config(UNet2DConditionConfig, dict(raw, attention_head_dim=[1, 3]))


def test_mixed_dtypes_are_refused():
    weights = safetensors.load(TINY, device="cpu")  # stored bf16
    weights["conv_out.bias"] = Tensor.from_numpy(weights["conv_out.bias"].numpy().astype(np.float32))
    with pytest.raises(ModelLayoutError, match="mixes tensor dtypes"):
        UNet2DCondition(read_config(UNet2DConditionConfig, TINY), weights)


def test_wrong_inputs_are_refused(model):
    io = io_arrays()
    with pytest.raises(ShapeError, match="sample"):
        run(model, io, sample=io["sample"][:, :3])
    with pytest.raises(ShapeError, match="encoder_hidden_states"):
        run(model, io, encoder_hidden_states=io["encoder_hidden_states"][..., :-1])
    with pytest.raises(ShapeError, match="timestep"):
        run(model, io, timestep=np.array([1.0, 2.0, 3.0], np.float32))
    with pytest.raises(ShapeError, match="time_ids"):
        run(model, io, time_ids=io["time_ids"][:, :5])
    with pytest.raises(ShapeError, match="text_embeds"):
        run(model, io, text_embeds=io["text_embeds"][:, :-1])
    with pytest.raises(InvalidArgumentError, match="text_embeds"):
        run(model, io, text_embeds=None)


@pytest.mark.gpu
def test_matches_diffusers_on_gpu_bf16():
    from fastdm.runtime import dtypes

    model = UNet2DCondition.from_pretrained(TINY, device="cuda", dtype="bfloat16")
    full = io_arrays()
    cases = [("B=2", full, {}), ("B=1", first_sample(full), {}),
             ("odd 13x11", full, {"sample": full["odd_sample"], "timestep": float(full["odd_timestep"][0])})]
    for label, io, override in cases:
        expected = full["expected_odd"] if override else io["expected"]
        args = {k: io[k] for k in INPUTS} | override
        args = {k: Tensor.from_numpy(v, device="cuda") if isinstance(v, np.ndarray) else v for k, v in args.items()}
        out = model(**args)
        assert out.is_cuda and out.dtype == dtypes.bfloat16
        err = rel_l2(np.asarray(out.numpy(), dtype=np.float32), expected)
        # every op output rounded to bf16 (emulated on the CPU, weights and inputs as here) gives 8.3e-3
        assert err < 2e-2, f"{label}: rel_l2 {err:.3e}"


def test_group_norms_after_an_add_take_its_statistics(model, monkeypatch):
    """Every resnet's norm2 takes its statistics from the time-embedding add, every transformer's GroupNorm and the
    second norm1 of a down block without attention from the resnet's residual add, every up-block resnet's norm1
    from the concatenation of its input and skip, and conv_norm_out from the last up block's last residual add
    (when that block ends in a resnet); the output is unchanged."""
    from fastdm.runtime import ops

    blocks = [*model.down_blocks, model.mid_block, *model.up_blocks]
    expected = sum(len(b.resnets) + len(b.attentions) for b in blocks)
    expected += sum(len(b.resnets) - 1 for b in model.down_blocks if not b.attentions)
    expected += sum(len(b.resnets) for b in model.up_blocks)
    last = model.up_blocks[-1]
    expected += last.upsampler is None and not last.attentions  # conv_norm_out
    real, given = ops.group_norm, []

    def spy(x, num_groups, *args, stats=None, **kwargs):
        given.append(stats is not None)
        return real(x, num_groups, *args, stats=stats, **kwargs)

    monkeypatch.setattr(ops, "group_norm", spy)
    io = io_arrays()
    assert rel_l2(run(model, io), io["expected"]) < 1e-4
    assert sum(given) == expected, (sum(given), expected, len(given))
