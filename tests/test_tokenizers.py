"""models/text_encoders/tokenizers.py against transformers' tokenizers (fixtures from
tests/reference/gen_tokenizers.py): real CLIP and T5 vocabularies, ids and masks identical on a varied prompt set."""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastdm.models.text_encoders.tokenizers import (
    load_clip_tokenizer,
    load_t5_tokenizer,
    read_sentencepiece_model,
)
from fastdm.runtime.errors import ModelLayoutError

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
CLIP_PAD0 = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
             "unk_token": "<|endoftext|>", "model_max_length": 77}


@pytest.fixture(scope="module")
def expected():
    z = np.load(FIXTURES / "expected.npz")
    return z, json.loads(str(z["meta"]))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """FLUX.1-style tokenizer folders: clip (as stored), clip with SDXL's '!' padding, T5 with tokenizer.json +
    spiece.model (FLUX.1 tokenizer_2), T5 with spiece.model only."""
    root = tmp_path_factory.mktemp("tok")
    pad0 = root / "clip_pad0"
    pad0.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(FIXTURES / "clip" / f, pad0 / f)
    (pad0 / "tokenizer_config.json").write_text(json.dumps(CLIP_PAD0))
    (pad0 / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "normalized": True}}))
    t5_json = root / "t5_json"
    shutil.copytree(FIXTURES / "t5", t5_json)
    (t5_json / "tokenizer.json").write_bytes(lzma.decompress((t5_json / "tokenizer.json.xz").read_bytes()))
    t5_only_json = root / "t5_only_json"
    t5_only_json.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(t5_json / f, t5_only_json / f)
    return {"clip": FIXTURES / "clip", "clip_pad0": pad0, "t5_json": t5_json, "t5_spiece": FIXTURES / "t5",
            "t5_only_json": t5_only_json}


_CACHE: dict = {}


def _t5(folder: Path, variant: str = "sentencepiece"):
    """Building the 32k-piece T5 tokenizer takes a while: once per folder and variant."""
    key = (str(folder), variant)
    if key not in _CACHE:
        _CACHE[key] = load_t5_tokenizer(folder, variant=variant)
    return _CACHE[key]


def _check(tok, z, meta, ref: str, length: int | None = None, skip_prompts=()) -> None:
    if ref + "/ids" not in z.files:
        pytest.skip(f"the fixture was generated without reference {ref}")
    ids, mask = tok(meta["prompts"], max_length=length)
    want_ids, want_mask = z[ref + "/ids"], z[ref + "/mask"]
    assert ids.dtype == np.int64 and ids.shape == want_ids.shape
    keep = [i for i, p in enumerate(meta["prompts"]) if p not in skip_prompts]
    ids, mask, want_ids, want_mask = ids[keep], mask[keep], want_ids[keep], want_mask[keep]
    bad = [i for i in range(len(ids)) if not np.array_equal(ids[i], want_ids[i])]
    assert not bad, [(ids[i][:20].tolist(), want_ids[i][:20].tolist()) for i in bad]
    np.testing.assert_array_equal(mask, want_mask)


@pytest.mark.parametrize("ref,folder", [("clip_v5", "clip"), ("clip_v4_fast", "clip"), ("clip_v5_pad0", "clip_pad0"),
                                        ("clip_v4_fast_pad0", "clip_pad0")])
def test_clip_fast_matches_transformers(expected, folders, ref, folder):
    _check(load_clip_tokenizer(folders[folder]), *expected, ref)


@pytest.mark.parametrize("ref,folder", [("clip_v4_slow", "clip"), ("clip_v4_slow_pad0", "clip_pad0")])
def test_clip_slow_matches_transformers4_python_tokenizer(expected, folders, ref, folder):
    _check(load_clip_tokenizer(folders[folder], variant="slow"), *expected, ref)


@pytest.mark.parametrize("suffix", ["", "_short"])
@pytest.mark.parametrize("folder", ["t5_json", "t5_spiece", "t5_only_json"])
@pytest.mark.parametrize("ref", ["t5_v5_json", "t5_v5_spiece", "t5_v4_fast_spiece", "t5_v4_slow"])
def test_t5_matches_transformers(expected, folders, folder, ref, suffix):
    z, meta = expected
    # transformers 4's sentencepiece T5Tokenizer splits "<|endoftext|>"-like text around its special tokens its
    # own way; every other prompt agrees
    skip = [p for p in meta["prompts"] if "</s>" in p] if ref == "t5_v4_slow" else []
    _check(_t5(folders[folder]), z, meta, ref + suffix, meta["t5_lengths"][suffix], skip)


@pytest.mark.parametrize("suffix", ["", "_short"])
def test_t5_tokenizer_json_variant_matches_transformers4_fast(expected, folders, suffix):
    z, meta = expected
    tok = _t5(folders["t5_json"], variant="tokenizer_json")
    _check(tok, z, meta, "t5_v4_fast_json" + suffix, meta["t5_lengths"][suffix])


def test_t5_matches_sentencepiece(expected, folders):
    z, meta = expected
    tok = _t5(folders["t5_spiece"])
    for prompt, sp_ids in zip(meta["prompts"], meta["sentencepiece_ids"], strict=True):
        if "<" in prompt:  # sentencepiece knows no added tokens (</s>, sentinels) in text
            continue
        ids, mask = tok(prompt, max_length=1024)
        assert ids[0, : mask.sum()].tolist() == sp_ids + [1], prompt


def test_spiece_reader(folders):
    spm = read_sentencepiece_model(folders["t5_spiece"] / "spiece.model")
    assert len(spm.pieces) == 32000 and spm.unk_id == 2
    assert spm.pieces[:3] == [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab = json.loads((folders["t5_json"] / "tokenizer.json").read_text())["model"]["vocab"]
    assert spm.pieces == [(p, s) for p, s in vocab[:32000]]
    assert len(spm.precompiled_charsmap) > 1000


def test_clip_layout_and_lengths(folders):
    tok = load_clip_tokenizer(folders["clip"])
    assert tok.vocab_size == 49408 and tok.max_length == 77 and tok.pad_id == 49407
    assert load_clip_tokenizer(folders["clip_pad0"]).pad_id == 0
    ids, mask = tok(["a photo of a cat", "a dog"])
    assert ids.shape == (2, 77) and ids[0, 0] == 49406 and ids[0, 6] == 49407 and mask[0].sum() == 7
    assert tok.num_tokens("word " * 100) == 102
    ids, mask = tok("word " * 100)
    assert ids[0, -1] == 49407 and mask.all()  # truncated to 77 with the end token kept
    ids, _ = tok("a photo", max_length=10)
    assert ids.shape == (1, 10)


def test_t5_layout(folders):
    tok = load_t5_tokenizer(folders["t5_spiece"], max_length=256)
    assert tok.vocab_size == 32100 and tok.pad_id == 0
    assert tok.token_id("<extra_id_0>") == 32099 and tok.token_id("<extra_id_99>") == 32000
    ids, mask = tok("a frog")
    assert ids.shape == (1, 256) and ids[0, mask[0].sum() - 1] == 1 and (ids[0, mask[0].sum():] == 0).all()


def test_user_errors(tmp_path, folders):
    with pytest.raises(ModelLayoutError, match="vocab.json"):
        load_clip_tokenizer(tmp_path)
    with pytest.raises(ModelLayoutError, match="spiece.model"):
        load_t5_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="variant"):
        load_clip_tokenizer(folders["clip"], variant="ftfy")
    with pytest.raises(ModelLayoutError, match="tokenizer.json"):
        load_t5_tokenizer(folders["t5_spiece"], variant="tokenizer_json")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spiece.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(ModelLayoutError, match="sentencepiece"):
        load_t5_tokenizer(bad)
    pad = tmp_path / "pad"
    shutil.copytree(folders["clip"], pad)
    (pad / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<nope>"}))
    with pytest.raises(ModelLayoutError, match="pad"):
        load_clip_tokenizer(pad)
