"""MoE MLP forward/backward for float32 CPU tensors: per-expert matmuls into reused memory.

On CPU `grouped_mm` is itself a loop of per-expert matmuls, so the cost worth removing is allocation and op count:
every temporary here lives in a `workspace` (reused across calls; see `cpu_memory.py`), the matmuls write straight
into row ranges of sorted-order buffers (`out=`), the elementwise SwiGLU work runs once over all rows (fused aten
silu / silu_backward; the buffers fit this machine class's L3), and the outputs that outlive the call (the saved
gate|up pre-activation h, the weight gradients) come from `pooled_empty`. Tokens gather their K rows back in slot
order and sum them (deterministic, like `grouped_mm.combine`); `index_add_` is avoided, it runs as a scatter_add
that costs more than the matmuls on CPU. Saved state is the Triton path's: routing and h in sorted row order.

Forward strategies (the backward is always the per-expert loop):
- "loop": one matmul per expert with routed rows.
- "gathered": gather the routed experts' weights per pair and run two batched matvecs (`vecdot`, not `bmm`: at
  these sizes bmm's oneDNN setup costs more than the arithmetic): a fixed dozen small ops whatever the expert
  count, for decode-sized inputs where per-expert dispatch outweighs copying the weights.
`choose_strategy` picks by shape; bench/RESULTS.md ("CPU MoE path") has the measurements behind it.
"""

import torch

from .cpu_memory import pooled_empty, workspace
from .routing import Routing, route

STRATEGIES = ("loop", "gathered")
GATHERED_MAX_WEIGHT_BYTES = 1 << 18  # "gathered" while the gathered weights (pairs x expert size) stay this small


def choose_strategy(num_pairs: int, D: int, H: int, dtype: torch.dtype) -> str:
    """The measured-faster forward strategy for `num_pairs` active (token, slot) pairs of experts [2H, D] + [D, H]."""
    gathered_bytes = num_pairs * 3 * D * H * torch.empty((), dtype=dtype).element_size()
    return "gathered" if gathered_bytes <= GATHERED_MAX_WEIGHT_BYTES else "loop"


def _ws(name: str, *shape: int) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    return workspace(name, numel, torch.float32).view(shape)


class _Pairs:
    """The active (token, slot) pairs in sorted (by expert) order, with the host-side expert row ranges."""

    def __init__(self, routing: Routing, weight_TK: torch.Tensor):
        offs = routing.offs_E.tolist()
        self.n = offs[-1] if offs else 0
        self.ranges = [(e, s, t) for e, (s, t) in enumerate(zip([0, *offs[:-1]], offs)) if t > s]
        self.pair_P = routing.sorted_pair_P[: self.n].long()
        self.tok_P = self.pair_P // weight_TK.shape[1]
        self.w_P1 = weight_TK.reshape(-1).float().index_select(0, self.pair_P).unsqueeze(1)
        # Sorted row of every pair; inactive pairs read row n, which `combine` keeps at zero.
        self.row_of_pair = torch.full((weight_TK.numel(),), self.n, dtype=torch.long)
        self.row_of_pair.index_copy_(0, self.pair_P, torch.arange(self.n))


def combine(rows_P1D: torch.Tensor, pairs: _Pairs, T: int, K: int) -> torch.Tensor:
    """out[t] = sum over slots k (in order) of rows[sorted row of pair t*K+k]; rows has one spare row, zeroed here."""
    D = rows_P1D.shape[1]
    rows_P1D[pairs.n].zero_()
    gathered_PD = torch.index_select(rows_P1D, 0, pairs.row_of_pair, out=_ws("gather", T * K, D))
    return gathered_PD.clone() if K == 1 else gathered_PD.view(T, K, D).sum(1)


def _fwd_loop(x_TD, w_gate_up_EHD, w_down_EDH, pairs: _Pairs, h_P2H, o_P1D):
    H = w_down_EDH.shape[2]
    x_PD = torch.index_select(x_TD, 0, pairs.tok_P, out=_ws("x", pairs.n, x_TD.shape[1]))
    for e, s, t in pairs.ranges:
        torch.mm(x_PD[s:t], w_gate_up_EHD[e].t(), out=h_P2H[s:t])
    a_PH = torch.ops.aten.silu.out(h_P2H[:, :H], out=_ws("a", pairs.n, H)).mul_(h_P2H[:, H:])
    for e, s, t in pairs.ranges:
        torch.mm(a_PH[s:t], w_down_EDH[e].t(), out=o_P1D[s:t])


def _fwd_gathered(x_TD, w_gate_up_EHD, w_down_EDH, expert_P, pairs: _Pairs, h_P2H, o_P1D):
    P, (_, H2, D), H = pairs.n, w_gate_up_EHD.shape, w_down_EDH.shape[2]
    x_PD = torch.index_select(x_TD, 0, pairs.tok_P, out=_ws("x", P, D))
    w_P2HD = torch.index_select(w_gate_up_EHD, 0, expert_P, out=_ws("w1", P, H2, D))
    torch.linalg.vecdot(w_P2HD, x_PD.unsqueeze(1), out=h_P2H)
    a_PH = torch.ops.aten.silu.out(h_P2H[:, :H], out=_ws("a", P, H)).mul_(h_P2H[:, H:])
    w_PDH = torch.index_select(w_down_EDH, 0, expert_P, out=_ws("w2", P, D, H))
    torch.linalg.vecdot(w_PDH, a_PH.unsqueeze(1), out=o_P1D[:P])


def moe_fwd(x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, save: bool = True, strategy: str | None = None):
    """Returns (y_TD, routing, h_P2H); h (pooled; rows past the active pairs zero) is kept only when `save`."""
    T, D = x_TD.shape
    E, H2, _ = w_gate_up_EHD.shape
    K = expert_idx_TK.shape[1]
    routing = route(expert_idx_TK, E)
    pairs = _Pairs(routing, weight_TK)
    if save:  # zeroed tail: the op's outputs stay a function of its inputs (opcheck, compile)
        h_P2H = pooled_empty((T * K, H2), torch.float32)
        h_P2H[pairs.n :].zero_()
    else:
        h_P2H = _ws("h", pairs.n, H2)
    o_P1D = _ws("o", pairs.n + 1, D)
    strategy = strategy or choose_strategy(pairs.n, D, H2 // 2, x_TD.dtype)
    if strategy not in STRATEGIES:
        raise ValueError(f"cpu moe: strategy={strategy!r}, expected one of {STRATEGIES}")
    if strategy == "gathered":
        expert_P = expert_idx_TK.reshape(-1).index_select(0, pairs.pair_P)
        _fwd_gathered(x_TD, w_gate_up_EHD, w_down_EDH, expert_P, pairs, h_P2H[: pairs.n], o_P1D)
    else:
        _fwd_loop(x_TD, w_gate_up_EHD, w_down_EDH, pairs, h_P2H[: pairs.n], o_P1D)
    o_P1D[: pairs.n].mul_(pairs.w_P1)
    return combine(o_P1D, pairs, T, K), routing, h_P2H if save else None


def moe_bwd(dy_TD, x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, routing: Routing, h_P2H):
    """Returns (dx_TD, dw_gate_up_EHD, dw_down_EDH, dweight_TK)."""
    T, D = x_TD.shape
    E, H2, _ = w_gate_up_EHD.shape
    H, K = H2 // 2, expert_idx_TK.shape[1]
    pairs = _Pairs(routing, weight_TK)
    P = pairs.n
    gate, up = h_P2H[:P, :H], h_P2H[:P, H:]
    dy_PD = torch.index_select(dy_TD, 0, pairs.tok_P, out=_ws("dy", P, D))
    g_PH = _ws("g", P, H)  # dL/d(routing weight * a): dy W_down[e]
    for e, s, t in pairs.ranges:
        torch.mm(dy_PD[s:t], w_down_EDH[e], out=g_PH[s:t])
    silu_PH = torch.ops.aten.silu.out(gate, out=_ws("silu", P, H))
    a_PH = torch.mul(silu_PH, up, out=_ws("a", P, H))
    dweight_P = torch.linalg.vecdot(a_PH, g_PH, out=_ws("dweight", P))
    da_PH = g_PH.mul_(pairs.w_P1)
    dh_P2H = _ws("dh", P, H2)
    torch.mul(da_PH, silu_PH, out=dh_P2H[:, H:])
    torch.ops.aten.silu_backward.grad_input(torch.mul(da_PH, up, out=silu_PH), gate, grad_input=dh_P2H[:, :H])
    do_PD = dy_PD.mul_(pairs.w_P1)
    x_PD = torch.index_select(x_TD, 0, pairs.tok_P, out=_ws("x", P, D))
    dw_gate_up_EHD = pooled_empty(tuple(w_gate_up_EHD.shape), torch.float32)
    dw_down_EDH = pooled_empty(tuple(w_down_EDH.shape), torch.float32)
    dx_P1D = _ws("o", P + 1, D)
    routed = [False] * E
    for e, s, t in pairs.ranges:
        routed[e] = True
        torch.mm(do_PD[s:t].t(), a_PH[s:t], out=dw_down_EDH[e])
        torch.mm(dh_P2H[s:t].t(), x_PD[s:t], out=dw_gate_up_EHD[e])
        torch.mm(dh_P2H[s:t], w_gate_up_EHD[e], out=dx_P1D[s:t])
    for e in range(E):
        if not routed[e]:
            dw_down_EDH[e].zero_()
            dw_gate_up_EHD[e].zero_()
    dweight_TK = weight_TK.new_zeros(T, K, dtype=torch.float32)
    dweight_TK.view(-1).index_copy_(0, pairs.pair_P, dweight_P)
    return combine(dx_P1D, pairs, T, K), dw_gate_up_EHD, dw_down_EDH, dweight_TK.to(weight_TK.dtype)
