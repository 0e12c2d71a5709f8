"""Prompt tokenizers for the text encoders: CLIP (byte-level BPE) and T5 (SentencePiece Unigram).

Each is a `tokenizers.Tokenizer` assembled from a pipeline definition in tokenizers_cfg/ and the data of a model
folder as diffusers ships it (tokenizer/ with vocab.json + merges.txt; tokenizer_2/ with spiece.model and/or
tokenizer.json; tokenizer_config.json and special_tokens_map.json for the special tokens). Prompts come back as
numpy ids and attention masks padded / truncated to a fixed length, as the pipelines ask transformers for them
(`padding="max_length", truncation=True`): truncation keeps the closing special token.

Variants, for the cases where transformers versions disagree:
- CLIP "fast" (default): transformers >= 5 `CLIPTokenizer` and every `CLIPTokenizerFast`. "slow": transformers 4's
  Python `CLIPTokenizer` without ftfy (what diffusers loads there); it drops control/format characters such as the
  zero-width joiners inside emoji and makes every CJK ideograph its own word.
- T5 "sentencepiece" (default): transformers >= 5 `T5TokenizerFast`, transformers 4's `T5Tokenizer` and
  sentencepiece itself. "tokenizer_json": the folder's tokenizer.json run as it is (transformers 4's
  `T5TokenizerFast`), which keeps a '▁' token for trailing whitespace.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ... import tokenizers_cfg
from ...runtime.errors import InvalidArgumentError, ModelLayoutError

CLIP_VARIANTS = ("fast", "slow")
T5_VARIANTS = ("sentencepiece", "tokenizer_json")
CLIP_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                 "unk_token": "<|endoftext|>"}
T5_DEFAULTS = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


class TextTokenizer:
    """Prompts -> (ids, attention_mask), both int64 [B, max_length], as a diffusers pipeline gets them."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token: str, kind: str):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ModelLayoutError(f"the pad token {pad_token!r} is not in the {kind} vocabulary; fix pad_token in "
                                   "tokenizer_config.json / special_tokens_map.json")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_token, self.pad_id = pad_token, pad_id
        self.kind = kind

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """ids, attention_mask: [B, L] int64 (B = number of prompts, L = max_length or the default)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.max_length if max_length is None else int(max_length)
        if length < 2:
            raise InvalidArgumentError(f"max_length must leave room for the special tokens, got {length}")
        tok = self.tokenizer
        tok.enable_truncation(max_length=length)
        tok.enable_padding(length=length, pad_id=self.pad_id, pad_token=self.pad_token)
        encs = tok.encode_batch(list(prompts))
        ids = np.array([e.ids for e in encs], dtype=np.int64).reshape(len(encs), length)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64).reshape(len(encs), length)
        return ids, mask

    def num_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` with its special tokens, untruncated: more than max_length means it gets cut."""
        tok = self.tokenizer
        tok.no_truncation()
        tok.no_padding()
        return len(tok.encode(prompt).ids)


# ------------------------------------------------------------------------------------------------- folder data
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ModelLayoutError(f"{path} is not valid JSON ({e}); re-download the tokenizer files") from None


def _special_tokens(folder: Path, defaults: dict[str, str]) -> dict[str, str]:
    """bos/eos/pad/unk: tokenizer_config.json, overridden by special_tokens_map.json, else the family's defaults."""
    out = dict(defaults)
    for source in (_read_json(folder / "tokenizer_config.json"), _read_json(folder / "special_tokens_map.json")):
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = source.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    return out


def _added(token_ids: dict[str, int]) -> list[dict[str, Any]]:
    return [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
            for t, i in sorted(token_ids.items(), key=lambda kv: kv[1])]


def _template(post: dict[str, Any], rename: dict[str, str], ids: dict[str, int]) -> dict[str, Any]:
    """The definition's TemplateProcessing with its special tokens renamed to the folder's and their ids set."""
    def fix(items):
        out = []
        for item in items:
            if "SpecialToken" in item:
                name = rename.get(item["SpecialToken"]["id"], item["SpecialToken"]["id"])
                item = {"SpecialToken": dict(item["SpecialToken"], id=name)}
            out.append(item)
        return out

    single, pair = fix(post["single"]), fix(post["pair"])
    names = {i["SpecialToken"]["id"] for i in single + pair if "SpecialToken" in i}
    special = {n: {"id": n, "ids": [ids[n]], "tokens": [n]} for n in sorted(names)}
    return dict(post, single=single, pair=pair, special_tokens=special)


def _build(cfg: dict[str, Any], model: dict[str, Any], added: dict[str, int], post_rename: dict[str, str],
           kind: str) -> Tokenizer:
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(added),
            "normalizer": cfg["normalizer"], "pre_tokenizer": cfg["pre_tokenizer"],
            "post_processor": _template(cfg["post_processor"], post_rename, added),
            "decoder": cfg["decoder"], "model": model}
    try:
        return Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the tokenizers library raises plain Exceptions on malformed data
        raise ModelLayoutError(f"could not build the {kind} tokenizer from the model files: {e}") from None


# -------------------------------------------------------------------------------------------------------- CLIP
def load_clip_tokenizer(folder: str | Path, variant: str = "fast", max_length: int | None = None) -> TextTokenizer:
    """CLIP's tokenizer from a folder with vocab.json and merges.txt (e.g. FLUX.1-dev/tokenizer, SDXL tokenizer_2).

    The pad token is the folder's (FLUX/SD3: <|endoftext|>; SDXL's second tokenizer: "!"); max_length defaults
    to model_max_length of tokenizer_config.json, else 77.
    """
    if variant not in CLIP_VARIANTS:
        raise InvalidArgumentError(f"CLIP tokenizer variant {variant!r} is not one of {CLIP_VARIANTS}")
    folder = Path(folder)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        raise ModelLayoutError(f"{folder} lacks vocab.json and merges.txt: pass a CLIP tokenizer folder "
                               "(e.g. <model>/tokenizer)")
    vocab = _read_json(vocab_path)
    merges = [line for line in merges_path.read_text("utf-8").split("\n") if line and not line.startswith("#version")]
    special = _special_tokens(folder, CLIP_DEFAULTS)
    missing = [special[k] for k in ("bos_token", "eos_token", "pad_token") if special[k] not in vocab]
    if missing:
        raise ModelLayoutError(f"{folder}/vocab.json lacks the special tokens {missing}: not a CLIP vocabulary")
    cfg = tokenizers_cfg.load("clip" if variant == "fast" else "clip_slow")
    model = dict(cfg["model"], vocab=vocab, merges=merges, unk_token=special["unk_token"])
    # transformers registers bos/eos/pad as special added tokens: with SDXL's "!" padding, a "!" in the prompt
    # is then its own token (id 0) rather than part of a BPE word, and so it is here
    added = {special[k]: vocab[special[k]] for k in ("bos_token", "eos_token", "pad_token")}
    rename = {CLIP_DEFAULTS["bos_token"]: special["bos_token"], CLIP_DEFAULTS["eos_token"]: special["eos_token"]}
    tok = _build(cfg, model, added, rename, "CLIP")
    if max_length is None:
        max_length = int(_read_json(folder / "tokenizer_config.json").get("model_max_length", 77))
        max_length = max_length if 2 <= max_length <= 4096 else 77  # unset lengths are stored as ~1e30
    return TextTokenizer(tok, max_length, special["pad_token"], "CLIP")


# ---------------------------------------------------------------------------------------------------------- T5
@dataclass
class SentencePieceModel:
    """What a Unigram tokenizer needs from a sentencepiece .model file."""

    pieces: list[tuple[str, float]]
    unk_id: int
    precompiled_charsmap: bytes


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message: ints for varint/fixed, bytes for length-delimited."""
    pos, n = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            if pos >= n:
                raise InvalidArgumentError("truncated varint")
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    while pos < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            yield field, wire, buf[pos:pos + 8]
            pos += 8
        elif wire == 2:
            size = varint()
            if pos + size > n:
                raise InvalidArgumentError("truncated field")
            yield field, wire, buf[pos:pos + size]
            pos += size
        elif wire == 5:
            yield field, wire, buf[pos:pos + 4]
            pos += 4
        else:
            raise InvalidArgumentError(f"unsupported wire type {wire}")


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    """Pieces, scores, unk id and normalisation map of a sentencepiece ModelProto, without protobuf.

    ModelProto: 1 pieces {1 piece, 2 score (float), 3 type}, 2 trainer_spec {3 model_type, 35 byte_fallback,
    40 unk_id}, 3 normalizer_spec {2 precompiled_charsmap}.
    """
    path = Path(path)
    try:
        buf = path.read_bytes()
        pieces, trainer, normalizer = [], b"", b""
        for field, wire, value in _proto_fields(buf):
            if field == 1 and wire == 2:
                piece, score = "", 0.0
                for f, w, v in _proto_fields(value):
                    if f == 1 and w == 2:
                        piece = bytes(v).decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                pieces.append((piece, score))
            elif field == 2 and wire == 2:
                trainer = value
            elif field == 3 and wire == 2:
                normalizer = value
        model_type, byte_fallback, unk_id = 1, False, 0  # proto defaults: UNIGRAM, no byte fallback, unk 0
        for f, w, v in _proto_fields(trainer):
            if f == 3 and w == 0:
                model_type = v
            elif f == 35 and w == 0:
                byte_fallback = bool(v)
            elif f == 40 and w == 0:
                unk_id = _int32(v)
        charsmap = b""
        for f, w, v in _proto_fields(normalizer):
            if f == 2 and w == 2:
                charsmap = bytes(v)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLayoutError(f"{path} is not a sentencepiece model ({e}); re-download spiece.model") from None
    if model_type != 1:
        raise ModelLayoutError(f"{path} is a sentencepiece model of type {model_type}, not Unigram (1): fastdm's "
                               "T5 tokenizer reads Unigram models only")
    if byte_fallback:
        raise ModelLayoutError(f"{path} uses byte fallback, which T5 tokenizers do not; not a T5 spiece.model")
    if not pieces or not 0 <= unk_id < len(pieces):
        raise ModelLayoutError(f"{path} has no pieces or no valid unk id: re-download spiece.model")
    return SentencePieceModel(pieces, unk_id, charsmap)


def _t5_from_tokenizer_json(path: Path) -> SentencePieceModel:
    spec = _read_json(path)
    model = spec.get("model", {})
    if model.get("type") != "Unigram":
        raise ModelLayoutError(f"{path} does not hold a Unigram model (found {model.get('type')!r}): not a T5 "
                               "tokenizer")
    norms = spec.get("normalizer") or {}
    norms = norms.get("normalizers", [norms]) if norms.get("type") == "Sequence" else [norms]
    charsmap = next((n.get("precompiled_charsmap") for n in norms if n.get("type") == "Precompiled"), None)
    return SentencePieceModel([(p, float(s)) for p, s in model["vocab"]], int(model.get("unk_id", 0)),
                              base64.b64decode(charsmap) if charsmap else b"")


def load_t5_tokenizer(folder: str | Path, variant: str = "sentencepiece", max_length: int = 512) -> TextTokenizer:
    """T5's tokenizer from a folder with spiece.model and/or tokenizer.json (e.g. FLUX.1-dev/tokenizer_2).

    `</s>` is appended, padding uses the pad token (id 0), and `extra_ids` sentinels <extra_id_N> (tokenizer_config,
    default 100) follow the pieces when they come from spiece.model. max_length: FLUX.1-dev uses 512, schnell 256.
    """
    if variant not in T5_VARIANTS:
        raise InvalidArgumentError(f"T5 tokenizer variant {variant!r} is not one of {T5_VARIANTS}")
    folder = Path(folder)
    spiece, tok_json = folder / "spiece.model", folder / "tokenizer.json"
    special = _special_tokens(folder, T5_DEFAULTS)
    if variant == "tokenizer_json":
        if not tok_json.is_file():
            raise ModelLayoutError(f"{folder} has no tokenizer.json; use variant='sentencepiece' with spiece.model")
        try:
            tok = Tokenizer.from_file(str(tok_json))
        except Exception as e:
            raise ModelLayoutError(f"{tok_json} is not a tokenizers file ({e}); re-download it") from None
        return TextTokenizer(tok, max_length, special["pad_token"], "T5")

    if spiece.is_file():
        spm = read_sentencepiece_model(spiece)
        n_extra = int(_read_json(folder / "tokenizer_config.json").get("extra_ids", 100))
        known = {p for p, _ in spm.pieces}
        # transformers appends the sentinels in reverse: <extra_id_0> gets the last id
        spm.pieces += [(f"<extra_id_{i}>", 0.0) for i in range(n_extra - 1, -1, -1) if f"<extra_id_{i}>" not in known]
    elif tok_json.is_file():
        spm = _t5_from_tokenizer_json(tok_json)
    else:
        raise ModelLayoutError(f"{folder} has neither spiece.model nor tokenizer.json: pass a T5 tokenizer folder "
                               "(e.g. <model>/tokenizer_2)")
    ids = {p: i for i, (p, _) in enumerate(spm.pieces)}
    missing = [special[k] for k in ("eos_token", "pad_token", "unk_token") if special[k] not in ids]
    if missing:
        raise ModelLayoutError(f"the T5 vocabulary in {folder} lacks the special tokens {missing}")
    cfg = tokenizers_cfg.load("t5")
    normalizer = cfg["normalizer"]
    if spm.precompiled_charsmap:
        normalizer = dict(normalizer, precompiled_charsmap=base64.b64encode(spm.precompiled_charsmap).decode())
    else:
        normalizer = None  # a model without a character map normalises nothing
    cfg = dict(cfg, normalizer=normalizer)
    model = dict(cfg["model"], vocab=[[p, s] for p, s in spm.pieces], unk_id=spm.unk_id)
    added = {special[k]: ids[special[k]] for k in ("pad_token", "eos_token", "unk_token")}
    added.update({p: i for p, i in ids.items() if p.startswith("<extra_id_") and p.endswith(">")})
    tok = _build(cfg, model, added, {T5_DEFAULTS["eos_token"]: special["eos_token"]}, "T5")
    return TextTokenizer(tok, max_length, special["pad_token"], "T5")
