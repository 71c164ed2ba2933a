"""Collate preprocessed examples into a fixed-shape batch (Molmo's MMCollator with pad="to_max").

Text keys are padded/truncated to `sequence_length`, image keys to `max_crops`, all with -1 (loss_masks with 0), so
every batch of a run has one shape: no recompiles, and FSDP ranks run identical programs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

# preprocessor key -> batch key, dtype, pad value
TEXT_KEYS = {
    "input_tokens": ("input_ids", torch.int64, -1),
    "target_tokens": ("labels", torch.int64, -1),
    "loss_masks": ("loss_masks", torch.float32, 0.0),
    "position_ids": ("position_ids", torch.int64, -1),
    "subsegment_ids": ("subsegment_ids", torch.int64, -1),
}
NUMPY_DTYPES = {torch.int64: np.int64, torch.float32: np.float32}
IMAGE_KEYS = {
    "images": torch.float32,
    "image_masks": torch.float32,
    "image_input_idx": torch.int64,
}


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """In a DataLoader worker, allocate straight in shared memory (as torch's default_collate does): the batch then
    crosses to the main process without one more copy of a 10-100 MB image tensor."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    return proto.new(proto._typed_storage()._new_shared(math.prod(shape), device="cpu")).view(shape)


def _stack_padded(rows: list[np.ndarray], length: int, pad: float, dtype: torch.dtype) -> torch.Tensor:
    """[B, length, *trailing]: each row's values, then `pad`. Each element is written once (images are large)."""
    out = _empty((len(rows), length, *rows[0].shape[1:]), dtype)
    for i, values in enumerate(rows):
        n = len(values)
        out[i, :n] = torch.from_numpy(np.ascontiguousarray(values))
        out[i, n:] = pad
    return out


@dataclass
class Collator:
    """`collator(examples) -> batch`; truncated examples get `metadata["truncated"] = True` and are counted.

    `max_crops=None` pads crops to the largest example of the batch instead of a fixed count.
    """

    sequence_length: int
    max_crops: int | None = None
    num_examples: int = 0
    num_truncated: int = 0

    def __post_init__(self) -> None:
        if self.sequence_length < 1:
            raise ValueError(f"Collator.sequence_length must be >= 1, got {self.sequence_length}")
        if self.max_crops is not None and self.max_crops < 1:
            raise ValueError(f"Collator.max_crops must be >= 1 or None, got {self.max_crops}")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("Collator got an empty list of examples")
        S = self.sequence_length
        B = len(examples)
        metadata = [dict(ex.get("metadata") or {}) for ex in examples]
        truncated = [False] * B

        batch: dict[str, Any] = {}
        has_subsegments = any("subsegment_ids" in ex for ex in examples)
        for key, (name, dtype, pad) in TEXT_KEYS.items():
            if key == "subsegment_ids" and not has_subsegments:
                continue
            rows = []
            for i, ex in enumerate(examples):
                if key == "subsegment_ids" and key not in ex:
                    # Molmo gives examples without subsegments all-ones, i.e. one conversation
                    values = np.ones(len(ex["input_tokens"]), dtype=np.int64)
                else:
                    values = np.asarray(ex[key])
                if len(values) > S:
                    truncated[i] = True
                    values = values[:S]
                rows.append(values.astype(NUMPY_DTYPES[dtype], copy=False))
            batch[name] = _stack_padded(rows, S, pad, dtype)

        N = self.max_crops if self.max_crops is not None else max(len(ex["images"]) for ex in examples)
        for key, dtype in IMAGE_KEYS.items():
            rows = []
            trailing = np.asarray(examples[0][key]).shape[1:]
            for i, ex in enumerate(examples):
                values = np.asarray(ex[key])
                if values.shape[1:] != trailing:
                    raise ValueError(f"Collator: {key} of example {i} has shape {values.shape}, others {trailing}")
                if len(values) > N:
                    truncated[i] = True
                    values = values[:N]
                if key == "image_input_idx":
                    # Features whose target token was cut off by text truncation must be dropped, not scattered
                    # out of bounds.
                    values = np.where(values >= S, -1, values)
                rows.append(values.astype(NUMPY_DTYPES[dtype], copy=False))
            batch[key] = _stack_padded(rows, N, -1, dtype)

        for i, flag in enumerate(truncated):
            if flag:
                metadata[i]["truncated"] = True
        self.num_examples += B
        self.num_truncated += sum(truncated)
        batch["metadata"] = metadata
        return batch
