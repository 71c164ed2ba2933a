"""OLMoE decoder: embeddings (with additional vocab), pre-norm attention + MoE blocks, final norm, LM head.

Image features are added (not substituted) to the embeddings at `image_input_idx` before the first block.
Dropout (training only, rates from `MolmoEConfig.dropout`): embeddings after the image features are added, the
attention probabilities, and each block's attention / MoE output before its residual add.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from molmo_fast.config import MolmoEConfig
from molmo_fast.model.attention import Attention, KVCache, RMSNorm, build_attention_mask, rope_cos_sin
from molmo_fast.model.dropout import ResidualDropout
from molmo_fast.model.moe import PAD, MoE, load_balancing_loss, router_z_loss, token_kinds


class Embedding(nn.Module):
    """Lookup over [embedding; new_embedding] without materialising the concatenation."""

    def __init__(self, embedding_size: int, additional: int, d_model: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(embedding_size, d_model))
        self.new_embedding = nn.Parameter(torch.empty(additional, d_model)) if additional else None

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        ids_BS = ids_BS.clamp_min(0)  # -1 padding reads row 0 (masked downstream)
        n = self.embedding.shape[0]
        base = F.embedding(ids_BS.clamp_max(n - 1), self.embedding)
        if self.new_embedding is None:
            return base
        extra = F.embedding((ids_BS - n).clamp(0, self.new_embedding.shape[0] - 1), self.new_embedding)
        return torch.where((ids_BS >= n).unsqueeze(-1), extra, base)


class Block(nn.Module):
    def __init__(self, cfg: MolmoEConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.llm.d_model, cfg.llm.norm_eps)
        self.attn = Attention(cfg.llm, cfg.dropout.attention)
        self.ffn_norm = RMSNorm(cfg.llm.d_model, cfg.llm.norm_eps)
        self.moe = MoE(cfg.llm, cfg.moe)
        self.dropout = ResidualDropout(cfg.dropout.residual, cfg.dropout.response_residual)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, top_k=None, response_mask=None, token_kind=None):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, mask, cache, layer), response_mask)
        y, router_logits, expert_idx = self.moe(self.ffn_norm(x), top_k, token_kind)
        return x + self.dropout(y, response_mask), router_logits, expert_idx


@dataclass
class LLMOutput:
    logits: torch.Tensor
    past_key_values: KVCache | None
    router_logits: list[torch.Tensor] | None
    aux_loss: torch.Tensor | None


class LLM(nn.Module):
    def __init__(self, cfg: MolmoEConfig):
        super().__init__()
        self.cfg = cfg
        llm = cfg.llm
        self.wte = Embedding(llm.embedding_size, llm.additional_vocab_size, llm.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(llm.n_layers))
        self.ln_f = RMSNorm(llm.d_model, llm.norm_eps)
        self.lm_head = nn.Linear(llm.d_model, llm.embedding_size, bias=False)
        self.skip_blocks: frozenset[int] = frozenset()  # runtime knob; Python-level so skipped blocks cost nothing

    def forward(self, input_ids_BS: torch.Tensor, image_features_BMD: torch.Tensor | None = None,
                image_input_idx_BM: torch.Tensor | None = None, position_ids_BS: torch.Tensor | None = None,
                subsegment_ids_BS: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, output_router_logits: bool = False,
                top_k: int | list | torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                right_padded: bool = False, response_mask_BS: torch.Tensor | None = None,
                token_kind_BS: torch.Tensor | None = None) -> LLMOutput:
        """`token_kind_BS` (molmo_fast.model.moe kinds) defaults to image at `image_input_idx`, text elsewhere."""
        valid_BS = input_ids_BS != -1
        if token_kind_BS is None:
            token_kind_BS = token_kinds(input_ids_BS, image_input_idx_BM)
        else:
            token_kind_BS = token_kind_BS.to(torch.int8).masked_fill(~valid_BS, PAD)
        x = self.wte(input_ids_BS)
        if image_features_BMD is not None:
            # Features whose index is negative (dropped / batch padding) are added to position 0 with weight 0,
            # which keeps the scatter free of data-dependent shapes.
            keep = (image_input_idx_BM >= 0).unsqueeze(-1)
            idx = image_input_idx_BM.clamp_min(0).long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x = x.scatter_add(1, idx, (image_features_BMD * keep).to(x.dtype))
        x = F.dropout(x, self.cfg.dropout.embedding, self.training)
        cache = past_key_values if past_key_values is not None or not use_cache else KVCache(len(self.blocks))
        past_valid = cache.key_valid_BS if cache is not None and cache.length else None
        if position_ids_BS is None:
            if past_valid is not None:
                raise ValueError("position_ids are required when decoding with past_key_values")
            position_ids_BS = (valid_BS.cumsum(-1) - 1).clamp_min(0)
        cos, sin = rope_cos_sin(position_ids_BS, self.cfg.llm.head_dim, self.cfg.llm.rope_theta)
        key_valid = valid_BS if past_valid is None else torch.cat([past_valid, valid_BS], dim=1)
        if right_padded and past_valid is None and subsegment_ids_BS is None:
            # Every valid query's keys 0..i are valid, so plain causal attention is exact where it matters.
            mask = None
        else:
            mask = build_attention_mask(key_valid, valid_BS.shape[1], subsegment_ids_BS)

        per_layer_k = top_k if isinstance(top_k, (list, tuple)) else [top_k] * len(self.blocks)
        weights = self.cfg.moe
        want_aux = self.training and (weights.load_balancing_weight > 0 or weights.z_loss_weight > 0)
        router_logits, aux_loss = [], None
        for i, block in enumerate(self.blocks):
            if i in self.skip_blocks:
                continue
            x, logits_TE, idx_TK = block(x, cos, sin, mask, cache, i, per_layer_k[i], response_mask_BS, token_kind_BS)
            if output_router_logits:
                router_logits.append(logits_TE)
            if want_aux:
                valid_T = valid_BS.reshape(-1)
                loss = (weights.load_balancing_weight * load_balancing_loss(logits_TE, idx_TK, valid_T)
                        + weights.z_loss_weight * router_z_loss(logits_TE, valid_T))
                aux_loss = loss if aux_loss is None else aux_loss + loss
        if cache is not None:
            cache.length, cache.key_valid_BS = key_valid.shape[1], key_valid
        if logits_at is not None:  # e.g. only each row's last prompt token during generation
            x = x.gather(1, logits_at.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        logits = self.lm_head(self.ln_f(x))
        return LLMOutput(logits, cache, router_logits if output_router_logits else None, aux_loss)
