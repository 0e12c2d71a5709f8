"""Tokenizer pipeline definitions (normalizer, pre-tokenizer, model options, post-processor, decoder) per family,
in the JSON of the `tokenizers` library. The model's own data (vocabulary, merges, character maps) comes from the
model folder; models/text_encoders/tokenizers.py puts the two together."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from ..runtime.errors import InvalidArgumentError

NAMES = ("clip", "clip_slow", "t5")


def load(name: str) -> dict[str, Any]:
    """The pipeline definition `name` (one of NAMES) as a dict, without its `_doc` entry."""
    if name not in NAMES:
        raise InvalidArgumentError(f"no tokenizer pipeline {name!r}; there are {', '.join(NAMES)}")
    cfg = json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text("utf-8"))
    cfg.pop("_doc", None)
    return cfg
