"""AdamW over three parameter groups (vit / connector / llm), per-group warmup + cosine, per-group clipping.

Molmo trains the three components at very different learning rates (connector 2e-4, ViT 6e-6, LLM 2e-5 when
pre-training) and clips each component's gradient norm separately, so one noisy component cannot shrink the
updates of the others.
"""

import fnmatch
import math
from collections.abc import Iterable

import torch
from torch import nn

from molmo_fast.train.config import GROUPS, OptimConfig


def param_group(name: str, cfg: OptimConfig) -> str:
    """The component a parameter belongs to, from its fully qualified name."""
    if any(fnmatch.fnmatchcase(name, p) for p in cfg.connector_params):
        return "connector"
    if any(fnmatch.fnmatchcase(name, p) for p in cfg.vit_params):
        return "vit"
    return "llm"


def freeze_params(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Turn off gradients for parameters whose name matches a pattern; every pattern must match something."""
    patterns = tuple(patterns)
    frozen, used = [], set()
    for name, p in model.named_parameters():
        hits = [pat for pat in patterns if fnmatch.fnmatchcase(name, pat)]
        if hits:
            p.requires_grad_(False)
            frozen.append(name)
            used.update(hits)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ValueError(f"OptimConfig.freeze: pattern(s) {unused} match no parameter of the model")
    return frozen


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> tuple[torch.optim.AdamW, dict[str, list[nn.Parameter]]]:
    """AdamW with one param group per non-empty component; returns the optimizer and the trainable params by group."""
    freeze_params(model, cfg.freeze)
    by_group: dict[str, list[nn.Parameter]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_group[param_group(name, cfg)].append(p)
    by_group = {g: ps for g, ps in by_group.items() if ps}
    param_groups = [
        dict(params=ps, name=g, lr=0.0, peak_lr=cfg.lr[g], warmup=cfg.warmup[g], weight_decay=cfg.weight_decay)
        for g, ps in by_group.items()
    ]
    optimizer = torch.optim.AdamW(param_groups, lr=0.0, betas=cfg.betas, eps=cfg.eps)
    return optimizer, by_group


def lr_at(step: int, peak: float, warmup: int, max_steps: int, final_ratio: float) -> float:
    """Linear warmup from 0, then a cosine from `peak` down to `final_ratio * peak` at `max_steps` (1-based step)."""
    if step <= warmup:
        return peak * step / max(warmup, 1)
    span = max(max_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    floor = final_ratio * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, max_steps: int,
                       final_ratio: float) -> dict[str, float]:
    """Sets each group's lr for (1-based) `step`; the schedule is a pure function of the step, so resume is exact."""
    lrs = {}
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, group["peak_lr"], group["warmup"], max_steps, final_ratio)
        lrs[group["name"]] = group["lr"]
    return lrs


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def clip_grad_norms(by_group: dict[str, list[nn.Parameter]], max_norm: float) -> dict[str, torch.Tensor]:
    """Clips each component to `max_norm` on its own; returns the pre-clip norms (and their total) as 0-dim tensors."""
    norms = {}
    for group, params in by_group.items():
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            continue
        norm = _full(torch.nn.utils.get_total_norm(grads))
        norms[group] = norm
        if max_norm > 0:
            torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    norms["total"] = torch.linalg.vector_norm(torch.stack(list(norms.values()))) if norms else torch.zeros(())
    return norms
