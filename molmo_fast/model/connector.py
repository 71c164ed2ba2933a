"""Vision connector: ViT features -> LLM-width image tokens.

Stage order: pad embeddings by patch mask (`pad_and_partial_pad`) -> image feature dropout (training only) ->
non-overlapping pool_h x pool_w windows -> attention pooling with the window mean as the query (`attention-meanq`:
biases, no residual, no norm) -> SwiGLU projector to d_model.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from molmo_fast.config import MolmoEConfig
from molmo_fast.model.vit import VitAttention


class Projector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)
        self.w3 = nn.Linear(in_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Connector(nn.Module):
    def __init__(self, cfg: MolmoEConfig):
        super().__init__()
        v, c = cfg.vision, cfg.connector
        feat_dim = v.emb_dim * len(c.vit_layers)
        self.patch_grid = v.patch_grid
        self.pool_hw = (c.pool_h, c.pool_w)
        self.feature_dropout = cfg.dropout.image_feature
        self.pad_embed = nn.Parameter(torch.empty(2, feat_dim))
        self.pool = VitAttention(feat_dim, v)  # same attention as the ViT's, queried by the window mean
        self.projector = Projector(v.emb_dim, cfg.moe.hidden_size, cfg.llm.d_model)

    @property
    def tokens_per_crop(self) -> int:
        (h, w), (ph, pw) = self.patch_grid, self.pool_hw
        return math.ceil(h / ph) * math.ceil(w / pw)

    def forward(self, feats_NPC: torch.Tensor, masks_NP: torch.Tensor | None,
                crops_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """feats [crops, patches, C], masks [crops, patches] -> image tokens [*crops_shape, tokens_per_crop, d_model]
        (`crops_shape` defaults to (crops,)). The projector writes that shape directly, so the result is a fresh
        tensor, not a view (FSDP2 must not see a view as a module output)."""
        if masks_NP is not None:
            # Row 0: fully padded patch; row 1: partially padded patch -- and, via `< 1`, the preprocessor's
            # all -1 mask rows (its legacy off-by-one), which the reference weights were trained with.
            full = (masks_NP == 0).unsqueeze(-1)
            partial = ((masks_NP < 1) & (masks_NP != 0)).unsqueeze(-1)
            pad = self.pad_embed.to(feats_NPC.dtype)
            feats_NPC = feats_NPC + full * pad[0] + partial * pad[1]
        feats_NPC = F.dropout(feats_NPC, self.feature_dropout, self.training)
        N, _, C = feats_NPC.shape
        (h, w), (ph, pw) = self.patch_grid, self.pool_hw
        grid = feats_NPC.view(N, h, w, C)
        if h % ph or w % pw:
            grid = F.pad(grid, (0, 0, 0, (-w) % pw, 0, (-h) % ph))
            h, w = grid.shape[1], grid.shape[2]
        windows = grid.view(N, h // ph, ph, w // pw, pw, C).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(N * (h // ph) * (w // pw), ph * pw, C)
        pooled = self.pool(windows, query=windows.mean(dim=1, keepdim=True))
        return self.projector(pooled.view(*(crops_shape or (N,)), (h // ph) * (w // pw), -1))
