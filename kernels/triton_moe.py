"""Forward and backward of the MoE MLP on the Triton kernels (see `triton_kernels.py` for the design).

Forward: route -> [gather x, gate|up GEMM, SwiGLU epilogue] -> [down GEMM, scatter to pair rows] ->
combine over K. Backward: [gather dy, down^T GEMM, epilogue: dweight partials, SwiGLU backward with the
router weight, and weight * a for dW_down] -> dh, then dX (gate_up^T GEMM scattered to pair rows, combined
over K) and the grouped weight gradients. Saved for backward: routing and g|u only (no [T*K, D] tensor).
Every launch's config is fixed by `configs.choose` from static shapes, never by timing or by top-k.
"""

import torch
import triton

from . import configs
from . import triton_kernels as tk
from .routing import Routing, Tiles, active_mask, max_tiles


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Rows per tile from the static expected pairs per expert (T * K_max / E): never from top-k."""
    per_expert = max(1, num_pairs // num_experts)
    return min(128, max(16, triton.next_power_of_2(per_expert)))


# (epilogue, A rows, C rows) of each grouped-GEMM launch; names as in `configs.GEMM_LAUNCHES`.
GEMM_LAUNCHES = {
    "gate_up": (tk.SWIGLU_FWD, tk.TOKEN, tk.SORTED),
    "down": (tk.PLAIN, tk.SORTED, tk.PAIR),
    "down_bwd": (tk.SWIGLU_BWD, tk.TOKEN, tk.SORTED),
    "dx": (tk.PLAIN, tk.SORTED, tk.PAIR),
}

assert set(GEMM_LAUNCHES) == set(configs.GEMM_LAUNCHES)
assert all(c["BLOCK_N"] // 2 % tk.PART_CHUNK == 0 for n in GEMM_LAUNCHES for c in configs.candidates(n)), "PART_CHUNK"


def _gemm(launch, a, b, c, tiles, *, T, pair, n, kred, k_slots, b_strides, b_half=0, aux=None, act=None,
          store_aux=False, block_m=16, scale=None, part=None):
    """One persistent grouped GEMM launch; pointers an epilogue does not use get `pair` (never touched)."""
    epilogue, a_rows, c_rows = GEMM_LAUNCHES[launch]
    cfg = configs.choose(launch, a.dtype, block_m, T, a.device)
    shared = configs.shared_bytes(launch, cfg, a.element_size(), block_m)
    work = tiles.expert.numel() * triton.cdiv(n, cfg["BLOCK_N"])  # an upper bound: idle programs do nothing
    grid = (max(1, min(work, configs.num_programs(a.device, shared))),)
    aux = pair if aux is None else aux
    act = pair if act is None else act
    tk.grouped_gemm_kernel[grid](
        a, b, c, aux, act, pair, pair if scale is None else scale, pair if part is None else part,
        tiles.expert, tiles.row_start, tiles.row_end, tiles.count,
        n, kred, k_slots, b_half,
        a.stride(0), a.stride(1), *b_strides, c.stride(0), c.stride(1), aux.stride(0), act.stride(0),
        A_ROWS=a_rows, C_ROWS=c_rows, EPILOGUE=epilogue, STORE_AUX=store_aux, PART_CHUNK=tk.PART_CHUNK,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


# Up to this many pairs the routing is one single-program launch (decode latency); above, the histogram,
# the scan and the scatter run over blocks of ROUTE_CHUNK pairs in three launches.
SMALL_PAIRS = 1024
ROUTE_CHUNK = 128


def _route(expert_idx_TK, num_experts: int, block_m: int) -> tuple[Routing, Tiles]:
    """Forward routing: pairs bucketed by expert (stable), offsets and the row-tile plan; no host sync."""
    P, E = expert_idx_TK.numel(), num_experts
    routing = Routing(expert_idx_TK.new_empty(P, dtype=torch.int32), expert_idx_TK.new_empty(E, dtype=torch.int32))
    if P <= SMALL_PAIRS:
        return routing, _launch_plan(2, expert_idx_TK, routing, block_m)
    e_pad, blocks = triton.next_power_of_2(E + 1), triton.cdiv(P, ROUTE_CHUNK)
    counts_BE = expert_idx_TK.new_empty(blocks, e_pad, dtype=torch.int32)
    tk.route_count_kernel[(blocks,)](expert_idx_TK, counts_BE, P, E, E_PAD=e_pad, CHUNK=ROUTE_CHUNK)
    tiles = _launch_plan(1, counts_BE, routing, block_m)  # counts_BE now holds each block's base rows
    tk.route_scatter_kernel[(blocks,)](
        expert_idx_TK, counts_BE, routing.offs_E, routing.sorted_pair_P, P, E, E_PAD=e_pad, CHUNK=ROUTE_CHUNK,
    )
    return routing, tiles


def _plan(routing: Routing, block_m: int) -> Tiles:
    """Backward: the row-tile plan again, from the saved offsets."""
    return _launch_plan(0, routing.offs_E, routing, block_m)


def _launch_plan(source: int, src, routing: Routing, block_m: int) -> Tiles:
    E, P = routing.offs_E.numel(), routing.sorted_pair_P.numel()
    n = max_tiles(P, E, block_m)
    tiles = Tiles(*(routing.offs_E.new_empty(size) for size in (n, n, n, 1)))
    tk.plan_kernel[(1,)](
        src, routing.sorted_pair_P, routing.offs_E, tiles.expert, tiles.row_start, tiles.row_end, tiles.count,
        P, E, n, SOURCE=source, BLOCK_M=block_m, E_PAD=triton.next_power_of_2(E + 1), CHUNK=ROUTE_CHUNK,
        num_warps=8,  # [CHUNK, E_PAD] one-hot tiles: 4 warps would spill them
    )
    return tiles


def _combine(o_PD, expert_idx_TK, weight_TK, E, out_TD):
    T, K = expert_idx_TK.shape
    D = o_PD.shape[1]
    k_pad = triton.next_power_of_2(K)
    block_d = min(max(128, 4096 // k_pad), triton.next_power_of_2(D))  # K_PAD x BLOCK_D rows in flight
    tk.combine_kernel[(T, triton.cdiv(D, block_d))](
        o_PD, expert_idx_TK, weight_TK if weight_TK is not None else o_PD, out_TD, K, D, E,
        o_PD.stride(0), out_TD.stride(0), HAS_WEIGHT=weight_TK is not None, K_PAD=k_pad, BLOCK_D=block_d,
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
        "gate_up", x_TD, w_gate_up_EHD, a_PH, tiles, T=T, aux=h_P2H, pair=pair, n=H, kred=D, k_slots=K,
        b_strides=w_gate_up_EHD.stride(), b_half=H, store_aux=save, block_m=block_m,
    )
    o_PD = x_TD.new_empty(P, D)
    _gemm(
        "down", a_PH, w_down_EDH, o_PD, tiles, T=T, pair=pair, n=D, kred=H, k_slots=K,
        b_strides=w_down_EDH.stride(), block_m=block_m,
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

    # dy @ W_down[e]; the epilogue makes dgate|dup (from the saved g|u), the dweight partials and w * a.
    dh_P2H = x_TD.new_empty(P, H2)
    wa_PH = x_TD.new_empty(P, H)
    part_PC = x_TD.new_empty(P, triton.cdiv(H, tk.PART_CHUNK), dtype=torch.float32)
    s = w_down_EDH.stride()
    _gemm(
        "down_bwd", dy_TD, w_down_EDH, dh_P2H, tiles, T=T, aux=h_P2H, act=wa_PH, pair=pair, scale=weight_TK,
        part=part_PC, n=H, kred=D, k_slots=K, b_strides=(s[0], s[2], s[1]), block_m=block_m,
    )
    # Inactive pairs' rows were never written: select, don't multiply.
    dweight_TK = part_PC.view(T, K, part_PC.shape[-1]).sum(-1)
    dweight_TK = torch.where(active_mask(expert_idx_TK, E), dweight_TK, 0.0).to(weight_TK.dtype)
    dx_PD = x_TD.new_empty(P, D)
    s = w_gate_up_EHD.stride()
    _gemm(
        "dx", dh_P2H, w_gate_up_EHD, dx_PD, tiles, T=T, pair=pair, n=D, kred=H2, k_slots=K,
        b_strides=(s[0], s[2], s[1]), block_m=block_m,
    )
    dx_TD = _combine(dx_PD, expert_idx_TK, None, E, x_TD.new_empty(T, D))

    dw_down_EDH = w_down_EDH.new_empty(w_down_EDH.shape)
    _wgrad("dw_down", dy_TD, wa_PH, dw_down_EDH, routing, T=T, k_slots=K, l_rows=tk.TOKEN, r_rows=tk.SORTED)
    dw_gate_up_EHD = w_gate_up_EHD.new_empty(w_gate_up_EHD.shape)
    _wgrad("dw_gate_up", dh_P2H, x_TD, dw_gate_up_EHD, routing, T=T, k_slots=K, l_rows=tk.SORTED, r_rows=tk.TOKEN)
    return dx_TD, dw_gate_up_EHD, dw_down_EDH, dweight_TK


def _wgrad(launch, left, right, dw_ENC, routing: Routing, *, T, k_slots, l_rows, r_rows):
    E, N, C = dw_ENC.shape
    cfg = configs.choose(launch, left.dtype, 0, T, left.device)
    grid = (E * triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(C, cfg["BLOCK_C"]),)
    tk.grouped_wgrad_kernel[grid](
        left, right, dw_ENC, routing.sorted_pair_P, routing.offs_E,
        N, C, k_slots, left.stride(0), left.stride(1), right.stride(0), right.stride(1), *dw_ENC.stride(),
        L_ROWS=l_rows, R_ROWS=r_rows, BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"], BLOCK_R=cfg["BLOCK_R"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
