"""MoE MLP forward/backward on `torch.nn.functional.grouped_mm` (the CPU path and the torch baseline).

Same saved state as the Triton path (see `op.py`): routing and the gate|up pre-activation `h` in sorted
row order. Rows beyond the last active pair hold garbage after grouped_mm, so every use of them goes
through `torch.where`, never a multiply by zero.
"""

import torch
import torch.nn.functional as F

from .routing import Routing, active_mask, route


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grouped_mm for any shape: it needs 16-byte aligned strides, so zero-pad the odd dims (tests only)."""
    align = 16 // a.element_size()
    if b.dim() == 2:  # a [M, P] (a transposed view) @ b [P, N] grouped along P: weight gradients
        m, n = a.shape[0], b.shape[1]
        m_pad, n_pad = _round_up(m, align) - m, _round_up(n, align) - n
        if m_pad or n_pad:  # padded a comes out column-major: its only stride is then M, now aligned
            a = F.pad(a.t(), (0, m_pad)).t()
            b = F.pad(b, (0, n_pad))
        return F.grouped_mm(a, b, offs=offs)[:, :m, :n]
    k, n = b.shape[1:]
    k_pad, n_pad = _round_up(k, align) - k, _round_up(n, align) - n
    if k_pad or n_pad:
        a = F.pad(a, (0, k_pad))
        b = F.pad(b, (0, n_pad, 0, k_pad))
    return F.grouped_mm(a.contiguous(), b, offs=offs)[:, :n]


def _valid_rows(routing: Routing) -> torch.Tensor:
    P = routing.sorted_pair_P.numel()
    return torch.arange(P, device=routing.offs_E.device) < routing.offs_E[-1]


def combine(o_PD: torch.Tensor, expert_idx_TK: torch.Tensor, weight_TK: torch.Tensor | None, E: int):
    """y[t] = sum over active k of weight[t,k] * o[t*K+k] in fp32; deterministic (no scatter-add)."""
    T, K = expert_idx_TK.shape
    active_TK1 = active_mask(expert_idx_TK, E).unsqueeze(-1)
    o_TKD = o_PD.view(T, K, o_PD.shape[-1]).float()
    if weight_TK is not None:
        o_TKD = o_TKD * weight_TK.unsqueeze(-1).float()
    return torch.where(active_TK1, o_TKD, 0.0).sum(1)


def _swiglu_parts(h_P2H: torch.Tensor):
    gate, up = h_P2H.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    return gate, up, sig


def moe_fwd(x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, save: bool = True):
    """Returns (y_TD, routing, h_P2H); `save` is unused: h is computed here either way."""
    E, K = w_gate_up_EHD.shape[0], expert_idx_TK.shape[1]
    routing = route(expert_idx_TK, E)
    tok_P = routing.sorted_pair_P.long() // K
    h_P2H = _gmm(x_TD[tok_P], w_gate_up_EHD.transpose(1, 2), routing.offs_E)
    gate, up, sig = _swiglu_parts(h_P2H)
    a_PH = (gate * sig * up).to(x_TD.dtype)
    o_sorted_PD = _gmm(a_PH, w_down_EDH.transpose(1, 2), routing.offs_E)
    o_PD = o_sorted_PD.new_empty(o_sorted_PD.shape).index_copy_(0, routing.sorted_pair_P.long(), o_sorted_PD)
    y_TD = combine(o_PD, expert_idx_TK, weight_TK, E).to(x_TD.dtype)
    return y_TD, routing, h_P2H


def moe_bwd(dy_TD, x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, routing, h_P2H):
    """Returns (dx_TD, dw_gate_up_EHD, dw_down_EDH, dweight_TK)."""
    E, K = w_gate_up_EHD.shape[0], expert_idx_TK.shape[1]
    T, D = x_TD.shape
    dtype = x_TD.dtype
    dy_TD = dy_TD.contiguous()
    valid_P1 = _valid_rows(routing).unsqueeze(-1)
    pair_P = routing.sorted_pair_P.long()
    tok_P = pair_P // K

    # y = sum_k weight * W_down a, so with g = dy W_down[e]: dL/dweight = <a, g> and dL/da = weight * g.
    dy_PD = torch.where(valid_P1, dy_TD[tok_P], 0.0)
    g_PH = _gmm(dy_PD, w_down_EDH, routing.offs_E).float()
    gate, up, sig = _swiglu_parts(h_P2H)
    silu = gate * sig
    a_PH = torch.where(valid_P1, silu * up, 0.0).to(dtype)
    dweight_sorted_P = (a_PH.float() * g_PH).sum(-1)
    dweight_P = dweight_sorted_P.new_empty(dweight_sorted_P.shape).index_copy_(0, pair_P, dweight_sorted_P)
    dweight_TK = torch.where(active_mask(expert_idx_TK, E), dweight_P.view(T, K), 0.0).to(weight_TK.dtype)

    w_P1 = weight_TK.reshape(-1)[pair_P].float().unsqueeze(-1)
    da_PH = g_PH * w_P1
    do_PD = (dy_PD.float() * w_P1).to(dtype)
    dgate = da_PH * up * sig * (1 + gate * (1 - sig))
    dh_P2H = torch.where(valid_P1, torch.cat([dgate, da_PH * silu], dim=-1), 0.0).to(dtype)
    x_PD = torch.where(valid_P1, x_TD[tok_P], 0.0)

    dw_down_EDH = _gmm(do_PD.t(), a_PH, routing.offs_E).to(w_down_EDH.dtype)
    dw_gate_up_EHD = _gmm(dh_P2H.t(), x_PD, routing.offs_E).to(w_gate_up_EHD.dtype)
    dx_sorted_PD = _gmm(dh_P2H, w_gate_up_EHD, routing.offs_E)
    dx_PD = dx_sorted_PD.new_empty(dx_sorted_PD.shape).index_copy_(0, pair_P, dx_sorted_PD)
    dx_TD = combine(dx_PD, expert_idx_TK, None, E).to(dtype)
    return dx_TD, dw_gate_up_EHD, dw_down_EDH, dweight_TK
