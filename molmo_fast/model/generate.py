"""Greedy generation with a KV cache (HF `generate` semantics for MolmoE).

Prompts may be left- or right-padded with -1: positions come from the validity mask, the first new token is
predicted from each row's last valid position, and images are only used at prefill. Rows that emitted EOS are
padded with the pad id afterwards; generation stops early once every row has finished.
With `sync_ranks`, "every row" means every row of every rank in the process group: under FSDP each decode step
is a collective, so ranks must stop on the same step.
"""

import torch
import torch.distributed as dist

from molmo_fast.model.attention import KVCache
from molmo_fast.model.moe import GENERATED, PAD


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, images: torch.Tensor | None = None,
             image_masks: torch.Tensor | None = None, image_input_idx: torch.Tensor | None = None,
             max_new_tokens: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None,
             top_k=None, output_logits: bool = False, sync_ranks: bool = False,
             group: dist.ProcessGroup | None = None):
    """Returns ids [B, S + n] (n <= max_new_tokens), plus the per-step logits [B, n, V] with `output_logits`.

    `eos_token_id` / `pad_token_id` / `max_new_tokens` default to `model.generation_config`; `top_k` is the MoE
    top-k override of `MolmoE.forward`. `sync_ranks=True` (needs an initialised process group; `group` defaults
    to the world) all-reduces the "all rows finished" flag every step, so every rank returns the same n."""
    if sync_ranks and not dist.is_initialized():
        raise ValueError("generate(sync_ranks=True) needs an initialised torch.distributed process group")
    gen_cfg = model.generation_config
    eos = eos_token_id if eos_token_id is not None else gen_cfg.get("eos_token_id")
    pad = pad_token_id if pad_token_id is not None else gen_cfg.get("pad_token_id", model.config.llm.pad_token_id)
    max_new_tokens = max_new_tokens if max_new_tokens is not None else gen_cfg.get("max_new_tokens", 20)
    B, S = input_ids.shape
    input_ids = input_ids.long()
    valid = input_ids != -1
    position_ids = (valid.cumsum(-1) - 1).clamp_min(0)
    last = (valid * torch.arange(1, S + 1, device=valid.device)).argmax(-1, keepdim=True)  # last valid index
    # One host check before prefill: right-padded (or unpadded) prompts prefill with mask-free causal SDPA.
    right_padded = bool((valid[:, :-1] >= valid[:, 1:]).all())
    cache = KVCache(len(model.llm.blocks), capacity=S + max_new_tokens)
    out = model(input_ids, images, image_masks, image_input_idx, position_ids=position_ids,
                past_key_values=cache, use_cache=True, top_k=top_k, logits_at=last, right_padded=right_padded)
    logits = out.logits[:, -1]
    next_pos = valid.sum(-1, keepdim=True)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new_tokens, step_logits = [], []
    for step in range(max_new_tokens):
        if output_logits:
            step_logits.append(logits.float())
        token = logits.argmax(-1)
        if eos is not None:
            token = token.masked_fill(finished, pad)
            finished = finished | (token == eos)
        new_tokens.append(token)
        if step == max_new_tokens - 1 or (eos is not None and _all_finished(finished, sync_ranks, group)):
            break
        kind = torch.where(finished, PAD, GENERATED).to(torch.int8).unsqueeze(1)  # finished rows' tokens: padding
        out = model(token.unsqueeze(1), position_ids=next_pos, past_key_values=cache, use_cache=True, top_k=top_k,
                    token_kind=kind)
        next_pos = next_pos + 1
        logits = out.logits[:, -1]
    ids = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else input_ids
    if output_logits:
        return ids, torch.stack(step_logits, dim=1) if step_logits else logits.new_zeros(B, 0, logits.shape[-1])
    return ids


def _all_finished(finished: torch.Tensor, sync_ranks: bool, group: dist.ProcessGroup | None) -> bool:
    if not sync_ranks:
        return bool(finished.all())
    pending = (~finished).any().to(torch.int32)  # 0-dim, on the rows' device (gloo for CPU, NCCL for CUDA)
    dist.all_reduce(pending, op=dist.ReduceOp.MAX, group=group)
    return not bool(pending)
