"""Where a batch's loss is and the masked token losses there: one definition for training and eval's loss mode."""

import torch
import torch.nn.functional as F


def loss_positions(batch: dict) -> dict[str, torch.Tensor]:
    """Where a micro-batch's loss is, computed on its host copy so the device never syncs for it.

    The LM head runs at the loss positions only (`logits_at`): every loss term is masked to them, and in Molmo's
    data they are a small part of the sequence (answers, not images or prompts), so this skips most of the
    largest matmul and of the [tokens, vocab] logits memory. Rows are left-packed with their loss positions and
    padded with weight-0 slots up to the longest row: `loss_at`, `loss_weight`, `loss_labels` [B, n], plus
    `response_mask` [B, S] (tokens that carry loss) and `loss_tokens` (the summed weights, 0-dim).
    """
    mask_BS = batch["loss_masks"].clamp_min(0) * (batch["labels"] >= 0)
    has_loss_BS = mask_BS > 0
    n = max(int(has_loss_BS.sum(1).max()), 1)
    at_Bn = torch.argsort(has_loss_BS.to(torch.int8), dim=1, descending=True, stable=True)[:, :n]
    return {"loss_at": at_Bn, "loss_weight": mask_BS.gather(1, at_Bn),
            "loss_labels": batch["labels"].gather(1, at_Bn).clamp_min(0), "response_mask": has_loss_BS,
            "loss_tokens": mask_BS.sum(dtype=torch.float32)}


def masked_token_sums(logits_BnV: torch.Tensor, labels_Bn: torch.Tensor,
                      weight_Bn: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weighted sums over the loss positions (0-dim tensors, not yet normalised): `ce` (cross-entropy), `zloss`
    (squared log-partition), `correct` (argmax hits) and `weight`. Callers divide by their own normaliser: the
    trainer by the global loss-token count, eval by the summed weight."""
    logits = logits_BnV.float().flatten(0, 1)
    labels, weight = labels_Bn.flatten(), weight_Bn.flatten().float()
    return {"ce": (F.cross_entropy(logits, labels, reduction="none") * weight).sum(),
            "zloss": (torch.logsumexp(logits, dim=-1).pow(2) * weight).sum(),
            "correct": ((logits.argmax(-1) == labels).float() * weight).sum(),
            "weight": weight.sum()}
