"""Forward and backward of the MoE MLP on the Triton kernels (see `triton_kernels.py` for the design).

Forward: route -> [gather x, gate|up GEMM, SwiGLU epilogue] -> [down GEMM, scatter to pair rows] ->
combine over K. Backward: [gather dy, down^T GEMM, epilogue: dweight partials and SwiGLU backward
with the router weight] -> dh, then dX (gate_up^T GEMM scattered to pair rows, combined over K) and
the grouped weight gradients. Saved for backward: routing and g|u only (no [T*K, D] tensor).
"""

import torch
import triton

from . import triton_kernels as tk
from .routing import Routing, Tiles, active_mask, max_tiles, sort_pairs


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Rows per tile from the static expected pairs per expert (T * K_max / E): never from top-k."""
    per_expert = max(1, num_pairs // num_experts)
    return min(128, max(16, triton.next_power_of_2(per_expert)))


def _gemm(a, b, c, tiles, *, aux, pair, n, kred, k_slots, b_strides, b_half=0, a_rows=tk.SORTED,
          c_rows=tk.SORTED, epilogue=tk.PLAIN, store_aux=False, block_m=16, scale=None, part=None):
    """One grouped GEMM launch; pointers an epilogue does not use get `pair` (never read or written)."""
    num_tiles = tiles.expert.numel()
    grid = lambda meta: (num_tiles * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    tk.grouped_gemm_kernel[grid](
        a, b, c, aux, pair, pair if scale is None else scale, pair if part is None else part,
        tiles.expert, tiles.row_start, tiles.row_end,
        num_tiles, n, kred, k_slots, b_half,
        a.stride(0), a.stride(1), *b_strides, c.stride(0), c.stride(1), aux.stride(0),
        A_ROWS=a_rows, C_ROWS=c_rows, EPILOGUE=epilogue, STORE_AUX=store_aux, PART_CHUNK=tk.PART_CHUNK,
        BLOCK_M=block_m,
    )


# Up to this many pairs the routing is one counting-sort launch; above, torch.sort (several launches,
# but a single-program sort would serialise a large batch).
SMALL_PAIRS = 1024


def _route(expert_idx_TK, num_experts: int, block_m: int) -> tuple[Routing, Tiles]:
    """Forward routing: pairs bucketed by expert, offsets and the row-tile plan; no host sync."""
    P = expert_idx_TK.numel()
    offs_E = expert_idx_TK.new_empty(num_experts, dtype=torch.int32)
    if P <= SMALL_PAIRS:
        routing = Routing(expert_idx_TK.new_empty(P, dtype=torch.int32), offs_E)
        return routing, _launch_plan(2, expert_idx_TK, routing, block_m)
    key_sorted_P, sorted_pair_P = sort_pairs(expert_idx_TK, num_experts)
    routing = Routing(sorted_pair_P, offs_E)
    return routing, _launch_plan(1, key_sorted_P, routing, block_m)


def _plan(routing: Routing, block_m: int) -> Tiles:
    """Backward: the row-tile plan again, from the saved offsets."""
    return _launch_plan(0, routing.offs_E, routing, block_m)


def _launch_plan(source: int, src, routing: Routing, block_m: int) -> Tiles:
    E, P = routing.offs_E.numel(), routing.sorted_pair_P.numel()
    n = max_tiles(P, E, block_m)
    tiles = Tiles(*(routing.offs_E.new_empty(n) for _ in range(3)))
    tk.plan_kernel[(1,)](
        src, routing.sorted_pair_P, routing.offs_E, tiles.expert, tiles.row_start, tiles.row_end, P, E, n,
        SOURCE=source, BLOCK_M=block_m, E_PAD=triton.next_power_of_2(E + 1), CHUNK=128,
    )
    return tiles


def _combine(o_PD, expert_idx_TK, weight_TK, E, out_TD):
    T, K = expert_idx_TK.shape
    D = o_PD.shape[1]
    block_d = min(1024, triton.next_power_of_2(D))
    tk.combine_kernel[(T, triton.cdiv(D, block_d))](
        o_PD, expert_idx_TK, weight_TK if weight_TK is not None else o_PD, out_TD, K, D, E,
        o_PD.stride(0), out_TD.stride(0), HAS_WEIGHT=weight_TK is not None, BLOCK_D=block_d,
    )
    return out_TD


def moe_fwd(x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, save: bool = True):
    """Returns (y_TD, routing, h_P2H or None)."""
    T, D = x_TD.shape
    E, H2, _ = w_gate_up_EHD.shape
    H, K = H2 // 2, expert_idx_TK.shape[1]
    P = T * K
    expert_idx_TK = expert_idx_TK.contiguous()
    weight_TK = weight_TK.contiguous()
    block_m = block_m_for(P, E)
    routing, tiles = _route(expert_idx_TK, E, block_m)
    pair = routing.sorted_pair_P

    a_PH = x_TD.new_empty(P, H)
    h_P2H = x_TD.new_empty(P, H2) if save else a_PH
    _gemm(
        x_TD, w_gate_up_EHD, a_PH, tiles, aux=h_P2H, pair=pair, n=H, kred=D, k_slots=K,
        b_strides=w_gate_up_EHD.stride(), b_half=H, a_rows=tk.TOKEN, epilogue=tk.SWIGLU_FWD,
        store_aux=save, block_m=block_m,
    )
    o_PD = x_TD.new_empty(P, D)
    s = w_down_EDH.stride()
    _gemm(
        a_PH, w_down_EDH, o_PD, tiles, aux=a_PH, pair=pair, n=D, kred=H, k_slots=K,
        b_strides=(s[0], s[1], s[2]), c_rows=tk.PAIR, block_m=block_m,
    )
    y_TD = _combine(o_PD, expert_idx_TK, weight_TK, E, x_TD.new_empty(T, D))
    return y_TD, routing, h_P2H if save else None


def moe_bwd(dy_TD, x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, routing: Routing, h_P2H):
    """Returns (dx_TD, dw_gate_up_EHD, dw_down_EDH, dweight_TK)."""
    T, D = x_TD.shape
    E, H2, _ = w_gate_up_EHD.shape
    H, K = H2 // 2, expert_idx_TK.shape[1]
    P = T * K
    dy_TD = dy_TD.contiguous()
    expert_idx_TK = expert_idx_TK.contiguous()
    weight_TK = weight_TK.contiguous()
    block_m = block_m_for(P, E)
    tiles = _plan(routing, block_m)
    pair = routing.sorted_pair_P

    # dy @ W_down[e]; the epilogue makes dgate|dup (from the saved g|u) and the dweight partials.
    dh_P2H = x_TD.new_empty(P, H2)
    part_PC = x_TD.new_empty(P, triton.cdiv(H, tk.PART_CHUNK), dtype=torch.float32)
    s = w_down_EDH.stride()
    _gemm(
        dy_TD, w_down_EDH, dh_P2H, tiles, aux=h_P2H, pair=pair, scale=weight_TK, part=part_PC, n=H, kred=D,
        k_slots=K, b_strides=(s[0], s[2], s[1]), a_rows=tk.TOKEN, epilogue=tk.SWIGLU_BWD, block_m=block_m,
    )
    # Inactive pairs' rows were never written: select, don't multiply.
    dweight_TK = part_PC.view(T, K, part_PC.shape[-1]).sum(-1)
    dweight_TK = torch.where(active_mask(expert_idx_TK, E), dweight_TK, 0.0).to(weight_TK.dtype)
    dx_PD = x_TD.new_empty(P, D)
    s = w_gate_up_EHD.stride()
    _gemm(
        dh_P2H, w_gate_up_EHD, dx_PD, tiles, aux=dh_P2H, pair=pair, n=D, kred=H2, k_slots=K,
        b_strides=(s[0], s[2], s[1]), c_rows=tk.PAIR, block_m=block_m,
    )
    dx_TD = _combine(dx_PD, expert_idx_TK, None, E, x_TD.new_empty(T, D))

    dw_down_EDH = w_down_EDH.new_empty(w_down_EDH.shape)
    _wgrad(dy_TD, h_P2H, dw_down_EDH, routing, scale=weight_TK, k_slots=K,
           l_rows=tk.TOKEN, r_rows=tk.SORTED, r_swiglu=True)
    dw_gate_up_EHD = w_gate_up_EHD.new_empty(w_gate_up_EHD.shape)
    _wgrad(dh_P2H, x_TD, dw_gate_up_EHD, routing, scale=None, k_slots=K,
           l_rows=tk.SORTED, r_rows=tk.TOKEN, r_swiglu=False)
    return dx_TD, dw_gate_up_EHD, dw_down_EDH, dweight_TK


def _wgrad(l, r, dw_ENC, routing: Routing, *, scale, k_slots, l_rows, r_rows, r_swiglu):
    E, N, C = dw_ENC.shape
    grid = lambda meta: (E * triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(C, meta["BLOCK_C"]),)  # noqa: E731
    tk.grouped_wgrad_kernel[grid](
        l, r, dw_ENC, routing.sorted_pair_P, scale if scale is not None else l, routing.offs_E,
        N, C, k_slots, l.stride(0), l.stride(1), r.stride(0), r.stride(1), *dw_ENC.stride(),
        L_ROWS=l_rows, R_ROWS=r_rows, SCALE_R=scale is not None, R_SWIGLU=r_swiglu,
    )
