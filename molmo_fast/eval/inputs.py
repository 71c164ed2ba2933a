"""A task's batches: its shard set through the data pipeline's `EvalLoader` with the task's prompt style, and the
batch tensors the model takes. Shared by generation and loss mode."""

from dataclasses import dataclass
from pathlib import Path

import torch

from molmo_fast.data.loader import EvalLoader, LoaderConfig
from molmo_fast.data.preprocessor import Preprocessor
from molmo_fast.eval.config import EvalConfig
from molmo_fast.eval.tasks import Task


@dataclass
class TaskPreprocess:
    """What the loader's workers call: the task's prompt style, then the checkpoint's preprocessor (picklable)."""

    task: Task
    preprocessor: Preprocessor

    def __call__(self, example: dict, rng=None, for_inference: bool = False) -> dict:
        return self.preprocessor(self.task.prompt_example(example), rng=rng, for_inference=for_inference)


def task_loader(task: Task, pre: Preprocessor, cfg: EvalConfig, shard_dir: Path, rank: int, world: int,
                for_inference: bool) -> EvalLoader:
    """This rank's share of the task's examples (the first `cfg.max_examples`), in equal batch counts per rank."""
    return EvalLoader(shard_dir, TaskPreprocess(task, pre),
                      LoaderConfig(cfg.batch_size, task.sequence_length, num_workers=cfg.num_workers),
                      rank, world, for_inference=for_inference, limit=cfg.max_examples)


_TEXT_KEYS = ("input_ids", "labels", "loss_masks", "position_ids", "subsegment_ids")


def model_inputs(batch: dict, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Batch tensors on `device`, with the collator's fixed-length padding trimmed to the longest sequence of the
    batch (sequences are left-aligned, so nothing valid is cut)."""
    length = int((batch["input_ids"] != -1).sum(1).max())
    out = {k: batch[k][:, :length].to(device) for k in _TEXT_KEYS if k in batch}
    out.update(images=batch["images"].to(device, dtype), image_masks=batch["image_masks"].to(device, dtype),
               image_input_idx=batch["image_input_idx"].to(device))
    return out
