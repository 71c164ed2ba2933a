"""Inference front door, like the HF `MolmoProcessor.process`: prompt text + PIL images -> batched torch tensors.

`Processor(text, images)` builds `" User: {text} Assistant:"`, puts the image tokens first and EOS as BOS,
exactly as the reference; with several images each image's `image_input_idx` points at its own tokens (the
reference forgets that offset). A list of texts is left-padded with -1 into one batch. Sequence assembly is the
training `Preprocessor`'s, so training and inference inputs cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from molmo_fast.data.formatter import chat_user
from molmo_fast.data.image_preprocessing import ImageConfig
from molmo_fast.data.preprocessor import Preprocessor
from molmo_fast.data.tokenizer import Tokenizer

IMAGE_KEYS = ("images", "image_masks", "image_input_idx")


def _as_image_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (Image.Image, np.ndarray)):
        return [images]
    return list(images)


class Processor:
    """`processor(text=..., images=...) -> {"input_ids": [B, S] int64, "images": [B, N, P, D] float32,
    "image_masks": [B, N, P] float32, "image_input_idx": [B, N, T] int32}` (image keys only when any image)."""

    def __init__(self, preprocessor: Preprocessor):
        self.preprocessor = preprocessor

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Processor":
        """`path` holds release files (preprocessor_config.json; tokenizer files, else the shipped ones;
        optional special_tokens.json with the model's image-token ids)."""
        return cls(Preprocessor.from_pretrained(path))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.preprocessor.tokenizer

    @property
    def image_config(self) -> ImageConfig:
        return self.preprocessor.image_config

    @property
    def max_crops(self) -> int:
        return self.preprocessor.max_crops

    @max_crops.setter
    def max_crops(self, value: int) -> None:
        self.preprocessor.max_crops = value

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str | Sequence[str], images=None) -> dict[str, torch.Tensor]:
        if isinstance(text, str):
            rows = [self._encode(text, _as_image_list(images))]
        else:
            texts = list(text)
            per_row = [None] * len(texts) if images is None else list(images)
            if len(per_row) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(per_row)} image entries (one per text expected)")
            rows = [self._encode(t, _as_image_list(im)) for t, im in zip(texts, per_row)]
        return _left_pad(rows)

    def _encode(self, text: str, images: list) -> dict[str, np.ndarray]:
        return self.preprocessor.encode([[chat_user(text)]], images, for_inference=True)


def _left_pad(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Left-pad input_ids with -1 (shifting image_input_idx along) and pad crops with -1."""
    seq = max(len(r["input_tokens"]) for r in rows)
    crops = max(len(r["images"]) for r in rows)
    out = {"input_ids": torch.full((len(rows), seq), -1, dtype=torch.int64)}
    if crops:
        first = rows[0]
        for key in IMAGE_KEYS:
            dtype = torch.from_numpy(first[key]).dtype
            out[key] = torch.full((len(rows), crops, *first[key].shape[1:]), -1, dtype=dtype)
    for b, r in enumerate(rows):
        pad = seq - len(r["input_tokens"])
        out["input_ids"][b, pad:] = torch.from_numpy(r["input_tokens"])
        if not crops:
            continue
        n = len(r["images"])
        idx = r["image_input_idx"]
        out["images"][b, :n] = torch.from_numpy(r["images"])
        out["image_masks"][b, :n] = torch.from_numpy(r["image_masks"])
        out["image_input_idx"][b, :n] = torch.from_numpy(np.where(idx >= 0, idx + pad, idx))
    return out
