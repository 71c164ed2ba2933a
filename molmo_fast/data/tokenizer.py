"""Thin wrapper over the MolmoE (GPT-NeoX BPE) tokenizer with the ids the preprocessing needs.

MolmoE has no BOS token: the EOS id is prepended instead. The five image special tokens are resolved by encoding
their strings (the release's added_tokens.json lists stale ids). A `special_tokens.json` next to the tokenizer
(golden tiny-model format) overrides the image/eos/pad ids, for models whose vocab differs from the tokenizer's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tokenizers

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "molmoe-1b"

IMAGE_START = "<im_start>"
IMAGE_END = "<im_end>"
IMAGE_PATCH = "<im_patch>"
IMAGE_COL = "<im_col>"
IMAGE_PROMPT = "<|image|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


@dataclass(frozen=True)
class ImageTokenIds:
    start: int
    end: int
    patch: int
    col: int
    prompt: int


class Tokenizer:
    """encode/decode text; `eos_id` doubles as BOS; `image_ids` are the image special tokens."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        image_ids: ImageTokenIds | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ):
        self._tok = tokenizer
        self.image_ids = image_ids or ImageTokenIds(
            *(self._single_id(s) for s in (IMAGE_START, IMAGE_END, IMAGE_PATCH, IMAGE_COL, IMAGE_PROMPT))
        )
        self.eos_id = self._single_id(EOS_TOKEN) if eos_id is None else eos_id
        self.pad_id = self._single_id(PAD_TOKEN) if pad_id is None else pad_id

    @property
    def bos_id(self) -> int:
        return self.eos_id

    @property
    def special_ids(self) -> frozenset[int]:
        i = self.image_ids
        return frozenset({i.start, i.end, i.patch, i.col, i.prompt, self.eos_id, self.pad_id})

    def _single_id(self, text: str) -> int:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"tokenizer encodes special token {text!r} to {ids}, expected exactly one id")
        return ids[0]

    @classmethod
    def from_dir(cls, path: str | Path | None = None) -> "Tokenizer":
        """Load `tokenizer.json` from `path` (falling back to the shipped MolmoE-1B files) and apply
        `path/special_tokens.json` overrides when present."""
        path = Path(path) if path is not None else ASSET_DIR
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            tok_file = ASSET_DIR / "tokenizer.json"
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
        special_file = path / "special_tokens.json"
        if not special_file.is_file():
            return cls(tok)
        spec = json.loads(special_file.read_text())
        names = (IMAGE_START, IMAGE_END, IMAGE_PATCH, IMAGE_COL, IMAGE_PROMPT)
        missing = [n for n in names if n not in spec.get("special_tokens", {})]
        if missing or "eos_token_id" not in spec:
            raise ValueError(f"{special_file}: expected 'special_tokens' with {list(names)} and 'eos_token_id'")
        image_ids = ImageTokenIds(*(int(spec["special_tokens"][n]) for n in names))
        return cls(tok, image_ids=image_ids, eos_id=int(spec["eos_token_id"]), pad_id=spec.get("pad_token_id"))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if int(i) >= 0]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)
