"""Slow, obviously-correct MoE MLP references. Every fast path in this package must agree with these.

Legend: T tokens, D model width, E experts, H expert hidden width, K routing slots per token (an upper
bound on top-k; slot k of token t is inactive when expert_idx[t, k] < 0).
"""

import torch
import torch.nn.functional as F


def moe_mlp_loop(
    x_TD: torch.Tensor,
    w_gate_up_EHD: torch.Tensor,
    w_down_EDH: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    expert_weight_TK: torch.Tensor,
) -> torch.Tensor:
    """Eager per-expert loop (what the HF remote code does): y[t] = sum_k w[t,k] * expert_{idx[t,k]}(x[t])."""
    E, H2, _ = w_gate_up_EHD.shape
    y_TD = torch.zeros_like(x_TD)
    for e in range(E):
        t_idx, k_idx = torch.nonzero(expert_idx_TK == e, as_tuple=True)
        if t_idx.numel() == 0:
            continue
        x_ND = x_TD[t_idx]
        gate_NH, up_NH = (x_ND @ w_gate_up_EHD[e].t()).split(H2 // 2, dim=-1)
        out_ND = (F.silu(gate_NH) * up_NH) @ w_down_EDH[e].t()
        w_N1 = expert_weight_TK[t_idx, k_idx].unsqueeze(-1).to(out_ND.dtype)
        y_TD.index_add_(0, t_idx, out_ND * w_N1)
    return y_TD
