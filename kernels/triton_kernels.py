"""Triton kernels of the MoE MLP. Launch logic lives in `triton_moe.py`, launch configs in `configs.py`.

Rows are the expert-sorted pairs of `routing.py`; the grouped GEMM works on tiles of `BLOCK_M` rows inside
one expert's group (from `Tiles`) by `BLOCK_N` columns. Token rows are gathered by index inside the kernel
and results scattered to pair rows, so no [T*K, D] copy of x is made. The GEMM is persistent: about one
program per SM loops over the used tiles, whose count the routing writes on the device, so cost follows
the active pairs, never T*K_max, and the grid (fixed by the device) never depends on top-k.
"""

import triton
import triton.language as tl

from .configs import INTERPRET

# EPILOGUE of the grouped GEMM (kernels compare against the literal values).
PLAIN, SWIGLU_FWD, SWIGLU_BWD = 0, 1, 2
# *_ROWS: where an operand's row lives: at the sorted row, at its token (pair // K), or at its pair id.
SORTED, TOKEN, PAIR = 0, 1, 2
# Columns of H summed together in a router-weight-gradient partial; divides half of every config's BLOCK_N
# (the SWIGLU_BWD epilogue runs in column halves), so each config writes every partial column.
PART_CHUNK = 16 if INTERPRET else 32


@triton.jit
def _row_index(rows, pair, K_SLOTS, WHERE: tl.constexpr):
    """int64 row offsets (P * D overflows int32 at T=32768, K=16) for SORTED / TOKEN / PAIR."""
    index = rows.to(tl.int64)
    if WHERE == 1:
        index = (pair // K_SLOTS).to(tl.int64)
    if WHERE == 2:
        index = pair.to(tl.int64)
    return index


@triton.jit
def _tile_coords(tile, num_tiles, num_pid_n, GROUP_M: tl.constexpr):
    """Swizzle: GROUP_M consecutive row tiles (mostly one expert) sweep all N blocks together, so their
    gathered rows and the expert's weight slice are reused from L2 instead of re-read from HBM."""
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    group_size = tl.minimum(num_tiles - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_size, (tile % per_group) // group_size


@triton.jit
def grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, aux_ptr, act_ptr, pair_ptr, scale_ptr, part_ptr,
    tile_expert_ptr, tile_start_ptr, tile_end_ptr, tile_count_ptr,
    N, KRED, K_SLOTS, B_HALF,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_xm, stride_actm,
    A_ROWS: tl.constexpr, C_ROWS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_AUX: tl.constexpr,
    PART_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    """C[rows] = epilogue(A[rows] @ B[e]^T), B[e] viewed as [N, KRED] through strides.

    SWIGLU_FWD: two accumulators against B rows n and n + B_HALF (gate, up); C = silu(g) * u, and with
    STORE_AUX the pre-activation g|u goes to aux [rows, 2N] for the backward.
    SWIGLU_BWD: A = dy (token rows), so the accumulator is dy W_down[e] = dL/da / weight; aux holds g|u.
    It writes part[pair, chunk] = <a, acc> over PART_CHUNK columns (dL/dweight = sum of the chunks,
    since y = sum_k weight * W_down a), C [rows, 2N] = dg|du of dL/da = scale[pair] * acc, and
    act [rows, N] = scale[pair] * a: the right operand of dW_down, made once here, not per N block there.
    """
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.load(tile_count_ptr)
    for tile in range(tl.program_id(0), num_tiles * num_pid_n, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_tiles, num_pid_n, GROUP_M)
        row_start = tl.load(tile_start_ptr + pid_m)
        row_end = tl.load(tile_end_ptr + pid_m)
        expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        pair = tl.load(pair_ptr + rows, mask=row_mask, other=0)
        a_rows = _row_index(rows, pair, K_SLOTS, A_ROWS)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if EPILOGUE == 1:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, KRED, BLOCK_K):
            k_mask = offs_k < KRED - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            if EPILOGUE == 1:
                b_up = tl.load(b_ptrs + B_HALF * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc_up = tl.dot(a, b_up, acc_up)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        c_rows = _row_index(rows, pair, K_SLOTS, C_ROWS)
        mask = row_mask[:, None] & n_mask[None, :]
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        aux_ptrs = aux_ptr + rows.to(tl.int64)[:, None] * stride_xm + offs_n[None, :]
        if EPILOGUE == 0:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
        elif EPILOGUE == 1:
            gate = acc.to(aux_ptr.dtype.element_ty).to(tl.float32)  # round like the stored g|u the bwd sees
            up = acc_up.to(aux_ptr.dtype.element_ty).to(tl.float32)
            tl.store(c_ptrs, (gate * tl.sigmoid(gate) * up).to(c_ptr.dtype.element_ty), mask=mask)
            if STORE_AUX:
                tl.store(aux_ptrs, gate.to(aux_ptr.dtype.element_ty), mask=mask)
                tl.store(aux_ptrs + N, up.to(aux_ptr.dtype.element_ty), mask=mask)
        else:
            # In two column halves: half the epilogue's live values per thread (it spills otherwise).
            acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            weight = tl.load(scale_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
            _swiglu_bwd_half(acc_lo, pid_n * BLOCK_N, weight, rows, row_mask, pair, c_rows, N, c_ptr, aux_ptr,
                             act_ptr, part_ptr, stride_cm, stride_cn, stride_xm, stride_actm, PART_CHUNK, BLOCK_N // 2)
            _swiglu_bwd_half(acc_hi, pid_n * BLOCK_N + BLOCK_N // 2, weight, rows, row_mask, pair, c_rows, N, c_ptr,
                             aux_ptr, act_ptr, part_ptr, stride_cm, stride_cn, stride_xm, stride_actm, PART_CHUNK,
                             BLOCK_N // 2)


@triton.jit
def _swiglu_bwd_half(acc, col0, weight, rows, row_mask, pair, c_rows, N, c_ptr, aux_ptr, act_ptr, part_ptr,
                     stride_cm, stride_cn, stride_xm, stride_actm, PART_CHUNK: tl.constexpr, HALF_N: tl.constexpr):
    """The SWIGLU_BWD epilogue on acc [BLOCK_M, HALF_N], columns col0.. (see grouped_gemm_kernel)."""
    offs_n = col0 + tl.arange(0, HALF_N)
    mask = row_mask[:, None] & (offs_n < N)[None, :]
    aux_ptrs = aux_ptr + rows.to(tl.int64)[:, None] * stride_xm + offs_n[None, :]
    gate = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig  # gate itself is dead from here: d_gate = d_a * up * (sig + silu * (1 - sig))
    up = tl.load(aux_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    act = (silu * up).to(c_ptr.dtype.element_ty).to(tl.float32)  # rounded as the forward stored it
    part = tl.sum(tl.reshape(act * acc, (acc.shape[0], HALF_N // PART_CHUNK, PART_CHUNK)), axis=2)
    num_parts = tl.cdiv(N, PART_CHUNK)
    cols = col0 // PART_CHUNK + tl.arange(0, HALF_N // PART_CHUNK)
    part_ptrs = part_ptr + pair.to(tl.int64)[:, None] * num_parts + cols[None, :]
    tl.store(part_ptrs, part, mask=row_mask[:, None] & (cols[None, :] < num_parts))
    act_ptrs = act_ptr + rows.to(tl.int64)[:, None] * stride_actm + offs_n[None, :]
    tl.store(act_ptrs, (weight * act).to(act_ptr.dtype.element_ty), mask=mask)
    acc *= weight
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs + N * stride_cn, (acc * silu).to(c_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptrs, (acc * up * (sig + silu * (1.0 - sig))).to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_wgrad_kernel(
    l_ptr, r_ptr, dw_ptr, pair_ptr, offs_ptr,
    N, C, K_SLOTS,
    stride_lm, stride_ln, stride_rm, stride_rc, stride_we, stride_wn, stride_wc,
    L_ROWS: tl.constexpr, R_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dW[e] [N, C] = sum over expert e's rows of L[row, :N]^T R[row, :C] (the grouped X^T dY).

    Experts without rows write zeros; the loop length is the expert's row count, so cost tracks top-k.
    """
    # Expert-major order: programs running together share the expert's rows through L2.
    pid = tl.program_id(0)
    num_pid_c = tl.cdiv(C, BLOCK_C)
    per_expert = tl.cdiv(N, BLOCK_N) * num_pid_c
    expert = pid // per_expert
    pid_n = (pid % per_expert) // num_pid_c
    pid_c = pid % num_pid_c
    row_end = tl.load(offs_ptr + expert)
    row_start = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask = offs_n < N
    c_mask = offs_c < C
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    # The pair ids are loaded one block ahead (loop-carried), so this block's row gathers depend on no
    # load of the same iteration and the pipeliner can issue them num_stages - 1 blocks early.
    next_rows = row_start + tl.arange(0, BLOCK_R)
    pair = tl.load(pair_ptr + next_rows, mask=next_rows < row_end, other=0)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < row_end
        next_rows = rows + BLOCK_R
        next_pair = tl.load(pair_ptr + next_rows, mask=next_rows < row_end, other=0)
        l_rows = _row_index(rows, pair, K_SLOTS, L_ROWS)
        r_rows = _row_index(rows, pair, K_SLOTS, R_ROWS)
        l_tile = tl.load(
            l_ptr + l_rows[:, None] * stride_lm + offs_n[None, :] * stride_ln,
            mask=row_mask[:, None] & n_mask[None, :], other=0.0,
        )
        r_tile = tl.load(
            r_ptr + r_rows[:, None] * stride_rm + offs_c[None, :] * stride_rc,
            mask=row_mask[:, None] & c_mask[None, :], other=0.0,
        )
        acc = tl.dot(tl.trans(l_tile), r_tile, acc)
        pair = next_pair
    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None] * stride_wn + offs_c[None, :] * stride_wc
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & c_mask[None, :])


@triton.jit
def combine_kernel(
    o_ptr, idx_ptr, weight_ptr, y_ptr, K_SLOTS, D, E,
    stride_om, stride_yt, HAS_WEIGHT: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y[t] = sum over active k of (weight[t,k] *) o[t*K+k], in fp32, in one fixed order: deterministic.

    The K expert indices come in as one vector and the K row loads are issued together; inactive slots
    are never loaded (masked), so they cost nothing and may hold garbage.
    """
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    k = tl.arange(0, K_PAD)
    p = t * K_SLOTS + k
    e = tl.load(idx_ptr + p, mask=k < K_SLOTS, other=-1)
    active = (e >= 0) & (e < E)
    rows = tl.load(o_ptr + p[:, None] * stride_om + offs_d[None, :], mask=active[:, None] & d_mask[None, :], other=0.0)
    rows = rows.to(tl.float32)
    if HAS_WEIGHT:
        rows = rows * tl.load(weight_ptr + p, mask=active, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + t * stride_yt + offs_d, tl.sum(rows, axis=0).to(y_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _onehot_keys(idx_ptr, p0, P, E, e, CHUNK: tl.constexpr):
    """[CHUNK, E_PAD] one-hot of pairs p0.. by expert; inactive slots (index outside [0, E)) on lane E."""
    p = p0 + tl.arange(0, CHUNK)
    idx = tl.load(idx_ptr + p, mask=p < P, other=-1)
    key = tl.where((idx >= 0) & (idx < E), idx, E)
    return (key[:, None] == e[None, :]) & (p < P)[:, None]


@triton.jit
def route_count_kernel(idx_ptr, counts_ptr, P, E, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Histogram: counts[b, e] = pairs of block b (CHUNK pairs) routed to expert e (lane E: inactive)."""
    b = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    onehot = _onehot_keys(idx_ptr, b * CHUNK, P, E, e, CHUNK).to(tl.int32)
    tl.store(counts_ptr + b * E_PAD + e, tl.sum(onehot, axis=0))


@triton.jit
def route_scatter_kernel(idx_ptr, base_ptr, offs_ptr, pair_ptr, P, E, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Stable scatter: pair p of block b goes to row start[e] + base[b, e] + (earlier pairs of e in b)."""
    b = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    onehot = _onehot_keys(idx_ptr, b * CHUNK, P, E, e, CHUNK).to(tl.int32)
    start = tl.load(offs_ptr + e - 1, mask=(e > 0) & (e <= E), other=0)  # lane E starts after expert E - 1
    base = tl.load(base_ptr + b * E_PAD + e) + start
    rank = tl.cumsum(onehot, axis=0) - onehot
    row = tl.sum(onehot * (base[None, :] + rank), axis=1)
    p = b * CHUNK + tl.arange(0, CHUNK)
    tl.store(pair_ptr + row, p, mask=p < P)


@triton.jit
def plan_kernel(
    src_ptr, pair_ptr, offs_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, tile_count_ptr, P, E, NUM_TILES,
    SOURCE: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program builds the routing in place of a dozen small torch launches (decode latency).

    SOURCE 0: src = offs (backward), only the row-tile plan of `routing.make_tiles` is written.
    SOURCE 1: src = the per-block histograms of `route_count_kernel` [cdiv(P, CHUNK), E_PAD]; scanned in
    place to each block's exclusive per-expert base (for `route_scatter_kernel`), then offsets and plan.
    SOURCE 2: src = expert_idx (small P); histogram, scan and stable scatter in this one program.
    E_PAD > E: lane E counts the inactive pairs, which go last. The used tile count goes to tile_count.
    """
    e = tl.arange(0, E_PAD)
    e_mask = e < E
    if SOURCE == 0:
        ends = tl.load(src_ptr + e, mask=e_mask, other=0)
        starts = tl.load(src_ptr + e - 1, mask=e_mask & (e > 0), other=0)
    elif SOURCE == 1:
        counts = tl.zeros((E_PAD,), dtype=tl.int32)
        num_blocks = tl.cdiv(P, CHUNK)
        for b0 in range(0, num_blocks, 16):
            b = b0 + tl.arange(0, 16)
            ptrs = src_ptr + b[:, None] * E_PAD + e[None, :]
            block_counts = tl.load(ptrs, mask=(b < num_blocks)[:, None], other=0)
            tl.store(ptrs, tl.cumsum(block_counts, axis=0) - block_counts + counts[None, :],
                     mask=(b < num_blocks)[:, None])
            counts += tl.sum(block_counts, axis=0)
        ends = tl.cumsum(counts, axis=0)
        starts = ends - counts
    else:
        counts = tl.zeros((E_PAD,), dtype=tl.int32)
        for p0 in range(0, P, CHUNK):
            counts += tl.sum(_onehot_keys(src_ptr, p0, P, E, e, CHUNK).to(tl.int32), axis=0)
        ends = tl.cumsum(counts, axis=0)
        starts = ends - counts
        next_row = starts
        for p0 in range(0, P, CHUNK):
            onehot = _onehot_keys(src_ptr, p0, P, E, e, CHUNK).to(tl.int32)
            rank = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of the same expert in this chunk
            row = tl.sum(onehot * (next_row[None, :] + rank), axis=1)
            p = p0 + tl.arange(0, CHUNK)
            tl.store(pair_ptr + row, p, mask=p < P)
            next_row += tl.sum(onehot, axis=0)
    if SOURCE != 0:
        tl.store(offs_ptr + e, ends, mask=e_mask)
    tiles = tl.where(e_mask, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_end = tl.cumsum(tiles, axis=0)
    tile_base = starts - (tile_end - tiles) * BLOCK_M  # row_start of tile t of expert e = tile_base + t * BLOCK_M
    total = tl.sum(tiles, axis=0)
    tl.store(tile_count_ptr, total)
    for t0 in range(0, NUM_TILES, CHUNK):
        t = t0 + tl.arange(0, CHUNK)
        expert = tl.sum((tile_end[None, :] <= t[:, None]).to(tl.int32), axis=1)
        onehot = e[None, :] == expert[:, None]
        used = t < total
        row_start = tl.sum(tl.where(onehot, tile_base[None, :], 0), axis=1) + t * BLOCK_M
        row_end = tl.sum(tl.where(onehot, ends[None, :], 0), axis=1)
        t_mask = t < NUM_TILES
        tl.store(tile_expert_ptr + t, tl.where(used, expert, 0), mask=t_mask)
        tl.store(tile_start_ptr + t, tl.where(used, row_start, 0), mask=t_mask)
        tl.store(tile_end_ptr + t, tl.where(used, row_end, 0), mask=t_mask)


KERNELS = (grouped_gemm_kernel, grouped_wgrad_kernel, combine_kernel, route_count_kernel, route_scatter_kernel,
           plan_kernel)


def compiled_variants() -> int:
    """Compiled binaries held by this module's kernels (grows on a recompile)."""
    return sum(len(caches[0]) for kernel in KERNELS for caches in getattr(kernel, "device_caches", {}).values())
