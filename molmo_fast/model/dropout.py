"""Residual dropout with an optional separate rate at response tokens (allenai/molmo's `Dropout(p, mask_p)`).

Plain dropout elsewhere in the model is `F.dropout(x, p, self.training)` at the call site; only the residual branch
needs a module, because its rate depends on which tokens carry the loss.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ResidualDropout(nn.Module):
    """Drops elements of a residual branch [B, S, D] in training. With `response_p > 0`, tokens where
    `response_mask_BS` is true are dropped at `response_p` and the others at `p`; otherwise every token at `p`."""

    def __init__(self, p: float, response_p: float = 0.0):
        super().__init__()
        self.p, self.response_p = p, response_p

    def forward(self, x_BSD: torch.Tensor, response_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or self.response_p == 0.0:
            return F.dropout(x_BSD, self.p, self.training)
        if response_mask_BS is None:
            raise ValueError("response_residual_dropout > 0 needs `response_mask` (the batch's loss_masks > 0) "
                             "in training")
        # Keep probabilities in float32: 0.9 is not representable in bf16 and the rate would drift.
        keep_BS1 = torch.where(response_mask_BS.bool().unsqueeze(-1), 1.0 - self.response_p, 1.0 - self.p)
        kept_BSD = torch.rand(x_BSD.shape, device=x_BSD.device) < keep_BS1
        return x_BSD * (kept_BSD / keep_BS1).to(x_BSD.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, response_p={self.response_p}"
