"""Loss mode: teacher-forced cross-entropy and token accuracy of a task's reference answers, computed as in training
(LM head at the loss positions only, the same masked sums)."""

from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from molmo_fast.data.preprocessor import Preprocessor
from molmo_fast.eval.config import EvalConfig
from molmo_fast.eval.inputs import model_inputs, task_loader
from molmo_fast.eval.tasks import Task
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.runtime.device import to_device
from molmo_fast.runtime.loss import loss_positions, masked_token_sums


@torch.no_grad()
def loss_task(task: Task, model: MolmoE, pre: Preprocessor, cfg: EvalConfig, shard_dir: Path, rank: int, world: int,
              device: torch.device) -> dict[str, float]:
    """Teacher-forced cross-entropy and argmax accuracy over the loss-masked tokens (both weighted by the loss
    mask, as in training), summed over ranks."""
    loader = task_loader(task, pre, cfg, shard_dir, rank, world, for_inference=False)
    dtype = next(model.parameters()).dtype
    sums = torch.zeros(5, dtype=torch.float64)  # weighted CE, weight, weighted correct, loss tokens, examples
    for batch in tqdm(loader, desc=f"{task.name} (loss)", disable=rank != 0, unit="batch"):
        inputs = model_inputs(batch, "cpu", dtype)
        real = torch.tensor([not m.get("padding") for m in batch["metadata"]])
        inputs["loss_masks"] = inputs["loss_masks"] * real[:, None]
        # As in training: the LM head runs at the loss positions only, located on the host copy.
        at = to_device(loss_positions(inputs), device)
        inputs = to_device(inputs, device)
        out = model(inputs["input_ids"], inputs["images"], inputs["image_masks"], inputs["image_input_idx"],
                    position_ids=inputs["position_ids"].clamp_min(0), subsegment_ids=inputs.get("subsegment_ids"),
                    logits_at=at["loss_at"], right_padded=True)
        token = masked_token_sums(out.logits, at["loss_labels"], at["loss_weight"])
        sums += torch.stack([token["ce"], token["weight"], token["correct"], (at["loss_weight"] > 0).sum(),
                             real.sum().to(device)]).double().cpu()
    if world > 1:
        dist.all_reduce(sums)
    ce_sum, weight, correct, tokens, n = sums.tolist()
    return {"loss": ce_sum / max(weight, 1e-9), "accuracy": correct / max(weight, 1e-9), "tokens": tokens, "n": n}
