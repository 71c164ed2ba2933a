"""LLM self-attention: fused qkv projection, full-width QK-norm, llama RoPE, SDPA, optional GQA, KV cache.

Masks are built once per forward by `build_attention_mask` and shared by all blocks; a `None` mask means plain
causal attention (`is_causal=True`, which lets SDPA pick its flash / memory-efficient kernels).
"""

import torch
import torch.nn.functional as F
from torch import nn

from molmo_fast.config import LLMConfig


class RMSNorm(nn.Module):
    """w * x / rms(x), computed in float32 and cast back (reference numerics, also under bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


def rope_cos_sin(position_ids_BS: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin [B, 1, S, head_dim] for rotate-half RoPE (angles duplicated over the two halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids_BS.device,
                                             dtype=torch.float32) / head_dim))
    angles = position_ids_BS.float().unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rope(x_BHSd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x_BHSd.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x_BHSd.dtype)


class KVCache:
    """Preallocated per-layer keys/values [B, n_kv_heads, capacity, head_dim], updated in place, plus which of the
    `length` filled positions are real tokens. Growing past `capacity` reallocates (amortised doubling), so callers
    that know the final length (generation) pass it up front and never copy."""

    def __init__(self, num_layers: int, capacity: int = 0):
        self.capacity = capacity
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_valid_BS: torch.Tensor | None = None
        self._pending_valid_BK: torch.Tensor | None = None  # between prepare() and commit()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v [B, H, S, d] after the filled part; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        cache_k, cache_v = self.keys[layer], self.values[layer]
        if cache_k is None or cache_k.shape[2] < end:
            capacity = max(self.capacity, end, 2 * start)
            new_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            new_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if cache_k is not None:
                new_k[:, :, :start], new_v[:, :, :start] = cache_k[:, :, :start], cache_v[:, :, :start]
            cache_k, cache_v = self.keys[layer], self.values[layer] = new_k, new_v
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        return cache_k[:, :, :end], cache_v[:, :, :end]

    @property
    def has_past(self) -> bool:
        return self.length > 0

    def prepare(self, valid_BS: torch.Tensor, subsegment_ids_BS: torch.Tensor | None = None,
                right_padded: bool = False) -> torch.Tensor | None:
        """Before the blocks: note this step's validity after the past's; return the attention mask."""
        if not self.length:
            self._pending_valid_BK = valid_BS
            return self_attention_mask(valid_BS, subsegment_ids_BS, right_padded)
        self._pending_valid_BK = torch.cat([self.key_valid_BS, valid_BS], dim=1)
        return build_attention_mask(self._pending_valid_BK, valid_BS.shape[1], subsegment_ids_BS)

    def commit(self) -> None:
        """After the blocks: the step's keys are now part of the past."""
        self.length, self.key_valid_BS = self._pending_valid_BK.shape[1], self._pending_valid_BK


def self_attention_mask(valid_BS: torch.Tensor, subsegment_ids_BS: torch.Tensor | None,
                        right_padded: bool) -> torch.Tensor | None:
    """Mask of a forward without a past. None when `right_padded` (and no subsegments): every valid query's keys
    0..i are valid, so plain causal attention is exact where it matters."""
    if right_padded and subsegment_ids_BS is None:
        return None
    return build_attention_mask(valid_BS, valid_BS.shape[1], subsegment_ids_BS)


def build_attention_mask(key_valid_BK: torch.Tensor, q_len: int, subsegment_ids_BS: torch.Tensor | None,
                         ) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, q_len, K] (True = attend) for the last `q_len` of K positions (the rest: cache).

    Causal + key padding (+ subsegments: query i sees key j iff subseg[i] <= subseg[j]). Every query may see
    itself so fully padded rows stay finite (their outputs are never used).
    """
    K = key_valid_BK.shape[1]
    past_len = K - q_len
    q_pos = torch.arange(past_len, K, device=key_valid_BK.device).unsqueeze(1)
    k_pos = torch.arange(K, device=key_valid_BK.device).unsqueeze(0)
    mask = (k_pos <= q_pos).unsqueeze(0) & key_valid_BK.unsqueeze(1)
    if subsegment_ids_BS is not None:
        if past_len:
            raise ValueError("subsegment_ids cannot be combined with a KV cache")
        mask = mask & (subsegment_ids_BS.unsqueeze(2) <= subsegment_ids_BS.unsqueeze(1))
    mask = mask | (k_pos == q_pos).unsqueeze(0)
    return mask.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, dropout_p: float = 0.0):
        super().__init__()
        self.dropout_p = dropout_p  # on the attention probabilities, training only
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=False)  # rows: [q; k; v]
        self.q_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.k_norm = RMSNorm(kv_dim, cfg.norm_eps)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, S, D = x_BSD.shape
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x_BSD).split([D, kv_dim, kv_dim], dim=-1)
        # QK-norm spans the full projection width, before the head split (OLMoE).
        q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             dropout_p=self.dropout_p if self.training else 0.0,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.out(out.transpose(1, 2).reshape(B, S, D))
