"""MoE MLP forward/backward for float32 CPU tensors: per-expert matmuls into reused memory.

On CPU `grouped_mm` is itself a loop of per-expert matmuls, so the cost worth removing is memory traffic and
allocation: here every temporary is a per-expert row block in a `workspace` (cache-sized, reused across calls),
the gathers and scatters are `index_select(out=)` / `index_add_` into preallocated tensors, and the outputs that
outlive the call (the saved gate|up pre-activation h, the weight gradients) come from `pooled_empty` (see
`cpu_memory.py`). Saved state is the Triton path's: routing and h in sorted row order (see `op.py`).

Strategies (forward; the backward is always the per-expert loop):
- "loop": one matmul per expert row block (at most `ROW_BLOCK` rows).
- "bmm": gather the routed experts' weights per pair and run two batched matvecs: a fixed dozen ops whatever
  the expert count, for decode-sized inputs where per-expert Python dispatch outweighs the weight copy.
`choose_strategy` picks by shape; bench/RESULTS.md ("CPU MoE path") has the measurements behind it.
"""

import torch

from .cpu_memory import pooled_empty, workspace
from .routing import Routing, route

STRATEGIES = ("loop", "bmm")
ROW_BLOCK = 512  # rows per matmul: keeps the per-block temporaries in L2 and the workspace small
BMM_MAX_WEIGHT_BYTES = 1 << 20  # "bmm" when the gathered weights (pairs x expert size) stay this small


def choose_strategy(num_pairs: int, D: int, H: int, dtype: torch.dtype) -> str:
    """The measured-faster forward strategy for `num_pairs` active (token, slot) pairs of experts [2H, D] + [D, H]."""
    gathered_bytes = num_pairs * 3 * D * H * torch.empty((), dtype=dtype).element_size()
    return "bmm" if gathered_bytes <= BMM_MAX_WEIGHT_BYTES else "loop"


def _blocks(offs: list[int]):
    """(expert, first row, end row) row blocks of at most ROW_BLOCK sorted rows, experts with no rows skipped."""
    start = 0
    for e, end in enumerate(offs):
        for s in range(start, end, ROW_BLOCK):
            yield e, s, min(s + ROW_BLOCK, end)
        start = end


def _ws(name: str, rows: int, cols: int) -> torch.Tensor:
    return workspace(name, rows * cols, torch.float32).view(rows, cols)


def _active_pairs(routing: Routing, weight_TK: torch.Tensor):
    """Host expert offsets, and per active sorted row: pair id, token, routing weight [P, 1] (fp32)."""
    offs = routing.offs_E.tolist()
    pair_P = routing.sorted_pair_P[: offs[-1] if offs else 0].long()
    w_P1 = weight_TK.reshape(-1).float().index_select(0, pair_P).unsqueeze(1)
    return offs, pair_P, pair_P // weight_TK.shape[1], w_P1


def _swiglu(h_N2H: torch.Tensor, out_NH: torch.Tensor) -> torch.Tensor:
    H = out_NH.shape[1]
    gate, up = h_N2H[:, :H], h_N2H[:, H:]
    return torch.sigmoid(gate, out=out_NH).mul_(gate).mul_(up)


def _fwd_loop(x_TD, w_gate_up_EHD, w_down_EDH, offs, tok_P, w_P1, h_P2H, y_TD):
    H = w_down_EDH.shape[2]
    rows = min(ROW_BLOCK, tok_P.numel())
    x_ND, a_NH, o_ND = _ws("x", rows, x_TD.shape[1]), _ws("a", rows, H), _ws("o", rows, x_TD.shape[1])
    h_scratch = h_P2H is None
    for e, s, t in _blocks(offs):
        n = t - s
        tok = tok_P[s:t]
        torch.index_select(x_TD, 0, tok, out=x_ND[:n])
        h_N2H = _ws("h", n, 2 * H) if h_scratch else h_P2H[s:t]
        torch.mm(x_ND[:n], w_gate_up_EHD[e].t(), out=h_N2H)
        a = _swiglu(h_N2H, a_NH[:n])
        torch.mm(a, w_down_EDH[e].t(), out=o_ND[:n])
        y_TD.index_add_(0, tok, o_ND[:n].mul_(w_P1[s:t]))


def _fwd_bmm(x_TD, w_gate_up_EHD, w_down_EDH, expert_P, tok_P, w_P1, h_P2H, y_TD):
    P, (_, H2, D), H = tok_P.numel(), w_gate_up_EHD.shape, w_down_EDH.shape[2]
    if h_P2H is None:
        h_P2H = _ws("h", P, H2)
    x_PD = torch.index_select(x_TD, 0, tok_P, out=_ws("x", P, D))
    w_P2HD = torch.index_select(w_gate_up_EHD, 0, expert_P, out=workspace("w1", P * H2 * D, torch.float32).view(P, H2, D))
    torch.bmm(w_P2HD, x_PD.unsqueeze(2), out=h_P2H[:P].view(P, H2, 1))
    a_PH = _swiglu(h_P2H[:P], _ws("a", P, H))
    w_PDH = torch.index_select(w_down_EDH, 0, expert_P, out=workspace("w2", P * D * H, torch.float32).view(P, D, H))
    o_PD = torch.bmm(w_PDH, a_PH.unsqueeze(2), out=_ws("o", P, D).view(P, D, 1)).view(P, D)
    y_TD.index_add_(0, tok_P, o_PD.mul_(w_P1))


def moe_fwd(x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, save: bool = True, strategy: str | None = None):
    """Returns (y_TD, routing, h_P2H); h (pooled, rows past the active pairs unwritten) only when `save`."""
    T, D = x_TD.shape
    E, H2, _ = w_gate_up_EHD.shape
    routing = route(expert_idx_TK, E)
    offs, pair_P, tok_P, w_P1 = _active_pairs(routing, weight_TK)
    h_P2H = pooled_empty((expert_idx_TK.numel(), H2), torch.float32) if save else None
    y_TD = x_TD.new_zeros(T, D)
    strategy = strategy or choose_strategy(pair_P.numel(), D, H2 // 2, x_TD.dtype)
    if pair_P.numel() == 0:
        pass
    elif strategy == "bmm":
        expert_P = expert_idx_TK.reshape(-1).index_select(0, pair_P)
        _fwd_bmm(x_TD, w_gate_up_EHD, w_down_EDH, expert_P, tok_P, w_P1, h_P2H, y_TD)
    elif strategy == "loop":
        _fwd_loop(x_TD, w_gate_up_EHD, w_down_EDH, offs, tok_P, w_P1, h_P2H, y_TD)
    else:
        raise ValueError(f"cpu moe: strategy={strategy!r}, expected one of {STRATEGIES}")
    return y_TD, routing, h_P2H


def _dgate(gate, up, sig, da, out):
    """d silu(gate) * up / d gate * da = da * up * sig * (1 + gate * (1 - sig)), in place in `out`."""
    return torch.neg(sig, out=out).add_(1).mul_(gate).add_(1).mul_(sig).mul_(up).mul_(da)


def moe_bwd(dy_TD, x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, routing: Routing, h_P2H):
    """Returns (dx_TD, dw_gate_up_EHD, dw_down_EDH, dweight_TK)."""
    T, D = x_TD.shape
    E, H2, _ = w_gate_up_EHD.shape
    H = H2 // 2
    offs, pair_P, tok_P, w_P1 = _active_pairs(routing, weight_TK)
    n_act = pair_P.numel()
    dx_TD = x_TD.new_zeros(T, D)
    dw_gate_up_EHD = pooled_empty(tuple(w_gate_up_EHD.shape), torch.float32)
    dw_down_EDH = pooled_empty(tuple(w_down_EDH.shape), torch.float32)
    dweight_P = weight_TK.new_zeros(expert_idx_TK.numel(), dtype=torch.float32)
    rows = min(ROW_BLOCK, n_act)
    dy_ND, x_ND, dx_ND = _ws("dy", rows, D), _ws("x", rows, D), _ws("o", rows, D)
    g_NH, sig_NH, tmp_NH, a_NH = _ws("g", rows, H), _ws("sig", rows, H), _ws("tmp", rows, H), _ws("a", rows, H)
    dh_N2H = _ws("dh", rows, H2)
    dweight_sorted_P = _ws("dweight", 1, n_act)[0]
    first_block = [True] * E
    for e, s, t in _blocks(offs):
        n, tok, w_N1 = t - s, tok_P[s:t], w_P1[s:t]
        gate, up = h_P2H[s:t, :H], h_P2H[s:t, H:]
        dy, g, sig, tmp, a, dh = dy_ND[:n], g_NH[:n], sig_NH[:n], tmp_NH[:n], a_NH[:n], dh_N2H[:n]
        torch.index_select(dy_TD, 0, tok, out=dy)
        torch.mm(dy, w_down_EDH[e], out=g)  # dL/d(weight * a) before the routing weight
        torch.sigmoid(gate, out=sig)
        silu = torch.mul(gate, sig, out=tmp)
        torch.mul(silu, up, out=a)
        torch.mul(silu, g, out=dh[:, H:])  # d up, still missing the routing weight
        torch.linalg.vecdot(a, g, out=dweight_sorted_P[s:t])
        g.mul_(w_N1)
        dh[:, H:].mul_(w_N1)
        _dgate(gate, up, sig, g, out=dh[:, :H])
        dy.mul_(w_N1)
        torch.index_select(x_TD, 0, tok, out=x_ND[:n])
        if first_block[e]:
            torch.mm(dy.t(), a, out=dw_down_EDH[e])
            torch.mm(dh.t(), x_ND[:n], out=dw_gate_up_EHD[e])
            first_block[e] = False
        else:
            dw_down_EDH[e].addmm_(dy.t(), a)
            dw_gate_up_EHD[e].addmm_(dh.t(), x_ND[:n])
        dx_TD.index_add_(0, tok, torch.mm(dh, w_gate_up_EHD[e], out=dx_ND[:n]))
    for e in range(E):
        if first_block[e]:  # no rows routed: zero gradient
            dw_down_EDH[e].zero_()
            dw_gate_up_EHD[e].zero_()
    dweight_P.index_copy_(0, pair_P, dweight_sorted_P)
    return dx_TD, dw_gate_up_EHD, dw_down_EDH, dweight_P.view(expert_idx_TK.shape).to(weight_TK.dtype)
