"""Example -> model arrays: formatter, tokenizer and multi-crop images assembled into one token sequence.

Sequence layout (Molmo): `[BOS = EOS] [image blocks ...] conv_0 [conv_1 ...]`, images always first. Training
alignment: input = [BOS] + tokens[:-1], target = tokens (logits at i predict target i; the loss does not shift).
Several conversations on one image (`message_list`) share one copy of the image tokens; `subsegment_ids` give the
image tokens IMAGE_SUBSEGMENT and conversation k the id k, and `position_ids` restart after the image for each
conversation, so with the mask `subseg[i] <= subseg[j]` every conversation sees the image and itself only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from molmo_fast.data.formatter import DEFAULT_FORMATTER, Formatter
from molmo_fast.data.image_preprocessing import ImageConfig, ImageCrops, crop_image
from molmo_fast.data.tokenizer import Tokenizer

IMAGE_SUBSEGMENT = 10000


def to_rgb_array(image) -> np.ndarray:
    """PIL image of any mode, or a uint8 [H, W] / [H, W, 1|3|4] array -> uint8 RGB [H, W, 3].

    As the reference, EXIF orientation is ignored and alpha dropped. 16-bit images keep their top 8 bits (PIL's
    own conversion would clip every value above 255 to white)."""
    if isinstance(image, Image.Image):
        if image.mode.startswith("I;16"):
            image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
        elif image.mode == "La":  # premultiplied alpha: PIL converts it only to LA
            image = image.convert("LA")
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype == np.uint8 and arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected a PIL image or a uint8 [H, W], [H, W, 1|3|4] array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(np.broadcast_to(arr, (*arr.shape[:2], 3)) if arr.shape[2] == 1 else arr[..., :3])


@dataclass
class TokenSequence:
    """Token sequence (before the BOS shift) with per-token loss mask, subsegment and position."""

    tokens: np.ndarray
    loss_masks: np.ndarray
    subsegments: np.ndarray
    positions: np.ndarray


class Preprocessor:
    """`preprocessor(example, rng=None, for_inference=False) -> dict of numpy arrays` (see the module doc)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_config: ImageConfig,
        formatter: Formatter = DEFAULT_FORMATTER,
        root_subsegment_weighting: bool = False,
    ):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.formatter = formatter
        self.root_subsegment_weighting = root_subsegment_weighting

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "Preprocessor":
        """From a directory of release files: `preprocessor_config.json` (else the crop settings of the model
        `config.json`), tokenizer files (else the shipped ones), optional `special_tokens.json`."""
        return cls(Tokenizer.from_dir(path), ImageConfig.from_json(path), **kwargs)

    @property
    def max_crops(self) -> int:
        return self.image_config.max_crops

    @max_crops.setter
    def max_crops(self, value: int) -> None:
        self.image_config = self.image_config.with_max_crops(int(value))

    def __call__(self, example: dict, rng: np.random.Generator | None = None,
                 for_inference: bool = False) -> dict[str, np.ndarray]:
        conversations = self.formatter(example, rng, for_inference)
        images = [] if example.get("image") is None else [example["image"]]
        out = self.encode(conversations, images, for_inference, multi="message_list" in example)
        weight = (example.get("metadata") or {}).get("weight")
        if weight is not None:
            out["loss_masks"] *= np.float32(weight)
        return out

    def crop(self, image) -> ImageCrops:
        return crop_image(to_rgb_array(image), self.image_config, self.tokenizer.image_ids)

    def encode(self, conversations: Sequence[Sequence[str]], images: Sequence = (), for_inference: bool = False,
               multi: bool | None = None) -> dict[str, np.ndarray]:
        """Conversations of final message strings (user, assistant, ...) + images -> model arrays.
        `multi` (default: more than one conversation) adds `subsegment_ids`."""
        if for_inference and len(conversations) != 1:
            raise ValueError(f"inference takes exactly one conversation, got {len(conversations)}")
        crops = [self.crop(im) for im in images]
        seq = self._sequence(conversations, crops)
        bos = self.tokenizer.bos_id
        if for_inference:
            input_tokens = np.concatenate([[bos], seq.tokens])
            target_tokens = np.full(len(input_tokens), -1, dtype=np.int64)
            loss_masks = np.zeros(len(input_tokens), dtype=np.float32)
            subsegments = np.concatenate([seq.subsegments[:1], seq.subsegments])
            positions = np.arange(len(input_tokens))
        else:
            input_tokens = np.concatenate([[bos], seq.tokens[:-1]])
            target_tokens = np.where(seq.loss_masks > 0, seq.tokens, -1)
            loss_masks = seq.loss_masks
            subsegments, positions = seq.subsegments, seq.positions
        if self.root_subsegment_weighting and len(conversations) > 1:
            loss_masks = loss_masks * np.float32(np.sqrt(1.0 / len(conversations)))
        out = {
            "input_tokens": input_tokens.astype(np.int64),
            "target_tokens": target_tokens.astype(np.int64),
            "loss_masks": loss_masks.astype(np.float32),
            "position_ids": positions.astype(np.int64),
            **self._image_arrays(crops),
        }
        if multi if multi is not None else len(conversations) > 1:
            out["subsegment_ids"] = subsegments.astype(np.int64)
        return out

    def _sequence(self, conversations: Sequence[Sequence[str]], crops: Sequence[ImageCrops]) -> TokenSequence:
        image_tokens = np.concatenate([c.tokens for c in crops] or [np.zeros(0, np.int64)])
        n_img = len(image_tokens)
        tokens, masks, subsegs, positions = [image_tokens], [np.zeros(n_img, np.float32)], [], []
        subsegs.append(np.full(n_img, IMAGE_SUBSEGMENT, np.int64))
        positions.append(np.arange(n_img))
        for k, conv in enumerate(conversations):
            conv_tokens, conv_masks = [], []
            for m, message in enumerate(conv):
                ids = self.tokenizer.encode(message)
                is_answer = m % 2 == 1
                if is_answer:
                    ids = ids + [self.tokenizer.eos_id]
                conv_tokens.extend(ids)
                conv_masks.extend([float(is_answer)] * len(ids))
            tokens.append(np.array(conv_tokens, np.int64))
            masks.append(np.array(conv_masks, np.float32))
            subsegs.append(np.full(len(conv_tokens), k, np.int64))
            positions.append(n_img + np.arange(len(conv_tokens)))
        return TokenSequence(np.concatenate(tokens), np.concatenate(masks), np.concatenate(subsegs),
                         np.concatenate(positions))

    def _image_arrays(self, crops: Sequence[ImageCrops]) -> dict[str, np.ndarray]:
        """Stack the crops of all images; each image's token indices point at its own block (+1 for BOS)."""
        cfg = self.image_config
        if not crops:
            return {
                "images": np.zeros((0, cfg.patches_per_crop, cfg.patch_dim), np.float32),
                "image_masks": np.zeros((0, cfg.patches_per_crop), np.float32),
                "image_input_idx": np.zeros((0, cfg.tokens_per_crop), np.int32),
            }
        offsets = 1 + np.cumsum([0] + [len(c.tokens) for c in crops[:-1]])
        idx = [np.where(c.input_idx >= 0, c.input_idx + off, c.input_idx) for c, off in zip(crops, offsets)]
        return {
            "images": np.concatenate([c.images for c in crops]),
            "image_masks": np.concatenate([c.masks for c in crops]),
            "image_input_idx": np.concatenate(idx).astype(np.int32),
        }
