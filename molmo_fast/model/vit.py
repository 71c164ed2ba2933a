"""CLIP ViT over pre-patchified crops (patch vectors ordered (dy, dx, rgb), see the preprocessor).

Stage order: linear patch embedding -> prepend CLS -> + positional embedding -> pre-LN -> resblocks. There is no
final LayerNorm; callers pick hidden states of chosen blocks (`vit_layers`).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from molmo_fast.config import VisionConfig


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (the reference never normalises in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class VitAttention(nn.Module):
    """Bidirectional MHA with biases; `num_kv_heads < num_heads` shares each k/v head across a group of q heads."""

    def __init__(self, in_dim: int, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(in_dim, cfg.num_heads * cfg.head_dim)
        self.wk = nn.Linear(in_dim, cfg.num_kv_heads * cfg.head_dim)
        self.wv = nn.Linear(in_dim, cfg.num_kv_heads * cfg.head_dim)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over x [N, L, in_dim]; with `query` [N, Lq, in_dim], that query attends over x."""
        query = x if query is None else query
        N, L, _ = x.shape
        Lq = query.shape[1]
        q = self.wq(query).view(N, Lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(N, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(N, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.wo(out.transpose(1, 2).reshape(N, Lq, self.num_heads * self.head_dim))


class VitMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.emb_dim, cfg.mlp_dim)
        self.w2 = nn.Linear(cfg.mlp_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        return self.w2(h * torch.sigmoid(1.702 * h))  # quick_gelu, as in OpenAI CLIP


class VitBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn_norm = LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.attn = VitAttention(cfg.emb_dim, cfg)
        self.mlp_norm = LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.mlp = VitMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.class_embedding = nn.Parameter(torch.empty(cfg.emb_dim))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.num_pos, cfg.emb_dim))
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.emb_dim, bias=False)
        self.pre_ln = LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(VitBlock(cfg) for _ in range(cfg.num_layers))

    def _positional_embedding(self) -> torch.Tensor:
        pos = self.positional_embedding
        old = int(math.isqrt(pos.shape[0] - 1))
        h, w = self.cfg.patch_grid
        if (old, old) == (h, w):
            return pos
        # A crop grid other than the trained one: bicubic (antialiased) resize of the patch rows, CLS row kept.
        grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])

    def forward(self, patches_NPC: torch.Tensor, num_layers: int | None = None,
                keep: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Returns the output of each of the first `num_layers` blocks (all by default), CLS token included.
        `keep` (block indices >= 0, instead of `num_layers`): only those outputs, in `keep`'s order; no block after
        the last kept one runs and the other hidden states are freed as soon as the next block has read them."""
        N = patches_NPC.shape[0]
        x = self.patch_embedding(patches_NPC.to(self.patch_embedding.weight.dtype))
        cls = self.class_embedding.to(x.dtype).expand(N, 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding().to(x.dtype)
        x = self.pre_ln(x)
        wanted = list(range(num_layers or len(self.blocks))) if keep is None else list(keep)
        hidden = {}
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            x = block(x)
            if i in wanted:
                hidden[i] = x
        return [hidden[i] for i in wanted]
