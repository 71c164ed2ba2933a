"""Triton kernels of the MoE MLP. Launch logic lives in `triton_moe.py`.

Rows are the expert-sorted pairs of `routing.py`; a grouped-GEMM program owns one tile of `BLOCK_M`
rows inside one expert's group (from `Tiles`) and one `BLOCK_N` column block. Token rows are gathered
by index inside the kernel and results scattered to pair rows, so no [T*K, D] copy of x is made.
Unused tiles exit at once: the grid is an upper bound fixed by (T, K, E), never by top-k.
Autotune keys are static dims only, so a k change never re-tunes or recompiles.
"""

import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# EPILOGUE of the grouped GEMM (kernels compare against the literal values).
PLAIN, SWIGLU_FWD, SWIGLU_BWD = 0, 1, 2
# *_ROWS: where an operand's row lives: at the sorted row, at its token (pair // K), or at its pair id.
SORTED, TOKEN, PAIR = 0, 1, 2
# Columns of H summed together in a router-weight-gradient partial; divides every config's BLOCK_N, so
# each config writes every partial column and the autotuner can never leave stale ones behind.
PART_CHUNK = 16 if _INTERPRET else 64


def _gemm_configs():
    """Few configs on purpose: every one is compiled per (shape, epilogue) key, and a cold --quick bench
    must stay under 3 minutes. 128-wide: large-T GEMMs; 64-wide: more CTAs for mid T; BLOCK_K=128:
    decode, where 16-row tiles are weight-read bound. SWIGLU_FWD keeps two accumulators, so no wider."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4)]  # 2 PART_CHUNKs per block
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(128, 64, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3)]
    ]


assert all(cfg.kwargs["BLOCK_N"] % PART_CHUNK == 0 for cfg in _gemm_configs()), "PART_CHUNK must divide BLOCK_N"


def _wgrad_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_C": 16, "BLOCK_R": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_C": bc, "BLOCK_R": br}, num_warps=w, num_stages=s)
        for bn, bc, br, w, s in [(128, 128, 64, 8, 3), (64, 128, 32, 4, 4)]
    ]


@triton.jit
def _row_index(rows, pair, K_SLOTS, WHERE: tl.constexpr):
    """int64 row offsets (P * D overflows int32 at T=32768, K=16) for SORTED / TOKEN / PAIR."""
    index = rows.to(tl.int64)
    if WHERE == 1:
        index = (pair // K_SLOTS).to(tl.int64)
    if WHERE == 2:
        index = pair.to(tl.int64)
    return index


@triton.autotune(configs=_gemm_configs(), key=["N", "KRED", "BLOCK_M", "EPILOGUE", "A_ROWS", "C_ROWS"])
@triton.jit
def grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, aux_ptr, pair_ptr, scale_ptr, part_ptr,
    tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    NUM_TILES, N, KRED, K_SLOTS, B_HALF,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_xm,
    A_ROWS: tl.constexpr, C_ROWS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_AUX: tl.constexpr,
    PART_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    """C[rows] = epilogue(A[rows] @ B[e]^T), B[e] viewed as [N, KRED] through strides.

    SWIGLU_FWD: two accumulators against B rows n and n + B_HALF (gate, up); C = silu(g) * u, and with
    STORE_AUX the pre-activation g|u goes to aux [rows, 2N] for the backward.
    SWIGLU_BWD: A = dy (token rows), so the accumulator is dy W_down[e] = dL/da / weight; aux holds g|u.
    It writes part[pair, chunk] = <a, acc> over PART_CHUNK columns (dL/dweight = sum of the chunks,
    since y = sum_k weight * W_down a) and C [rows, 2N] = dg|du of dL/da = scale[pair] * acc.
    """
    # Swizzle: GROUP_M consecutive row tiles (mostly one expert) sweep all N blocks together, so their
    # gathered rows and the expert's weight slice are reused from L2 instead of re-read from HBM.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(NUM_TILES - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    row_start = tl.load(tile_start_ptr + pid_m)
    row_end = tl.load(tile_end_ptr + pid_m)
    if row_start >= row_end:
        return
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
    if EPILOGUE == 0:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        gate = acc.to(aux_ptr.dtype.element_ty).to(tl.float32)  # round like the stored g|u the bwd sees
        up = acc_up.to(aux_ptr.dtype.element_ty).to(tl.float32)
        tl.store(c_ptrs, (gate * tl.sigmoid(gate) * up).to(c_ptr.dtype.element_ty), mask=mask)
        if STORE_AUX:
            aux_ptrs = aux_ptr + rows.to(tl.int64)[:, None] * stride_xm + offs_n[None, :]
            tl.store(aux_ptrs, gate.to(aux_ptr.dtype.element_ty), mask=mask)
            tl.store(aux_ptrs + N, up.to(aux_ptr.dtype.element_ty), mask=mask)
    else:
        aux_ptrs = aux_ptr + rows.to(tl.int64)[:, None] * stride_xm + offs_n[None, :]
        gate = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(aux_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        a = (gate * sig * up).to(c_ptr.dtype.element_ty).to(tl.float32)  # rounded as the forward stored it
        part = tl.sum(tl.reshape(a * acc, (BLOCK_M, BLOCK_N // PART_CHUNK, PART_CHUNK)), axis=2)
        num_parts = tl.cdiv(N, PART_CHUNK)
        cols = pid_n * (BLOCK_N // PART_CHUNK) + tl.arange(0, BLOCK_N // PART_CHUNK)
        part_ptrs = part_ptr + pair.to(tl.int64)[:, None] * num_parts + cols[None, :]
        tl.store(part_ptrs, part, mask=row_mask[:, None] & (cols[None, :] < num_parts))
        acc *= tl.load(scale_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        d_gate = acc * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(c_ptrs, d_gate.to(c_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptrs + N * stride_cn, (acc * gate * sig).to(c_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_wgrad_configs(), key=["N", "C", "L_ROWS", "R_ROWS", "R_SWIGLU", "SCALE_R"])
@triton.jit
def grouped_wgrad_kernel(
    l_ptr, r_ptr, dw_ptr, pair_ptr, scale_ptr, offs_ptr,
    N, C, K_SLOTS,
    stride_lm, stride_ln, stride_rm, stride_rc, stride_we, stride_wn, stride_wc,
    L_ROWS: tl.constexpr, R_ROWS: tl.constexpr, SCALE_R: tl.constexpr, R_SWIGLU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dW[e] [N, C] = sum over expert e's rows of L[row, :N]^T R[row, :C] (the grouped X^T dY).

    R_SWIGLU reads R as g|u [rows, 2C] and uses silu(g) * u; SCALE_R multiplies R rows by scale[pair].
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
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < row_end
        pair = tl.load(pair_ptr + rows, mask=row_mask, other=0)
        l_rows = _row_index(rows, pair, K_SLOTS, L_ROWS)
        r_rows = _row_index(rows, pair, K_SLOTS, R_ROWS)
        l_tile = tl.load(
            l_ptr + l_rows[:, None] * stride_lm + offs_n[None, :] * stride_ln,
            mask=row_mask[:, None] & n_mask[None, :], other=0.0,
        )
        r_ptrs = r_ptr + r_rows[:, None] * stride_rm + offs_c[None, :] * stride_rc
        r_mask = row_mask[:, None] & c_mask[None, :]
        if R_SWIGLU:
            gate = tl.load(r_ptrs, mask=r_mask, other=0.0).to(tl.float32)
            up = tl.load(r_ptrs + C * stride_rc, mask=r_mask, other=0.0).to(tl.float32)
            r_tile = gate * tl.sigmoid(gate) * up
        else:
            r_tile = tl.load(r_ptrs, mask=r_mask, other=0.0)
        if SCALE_R:
            r_tile = r_tile.to(tl.float32) * tl.load(scale_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        r_tile = r_tile.to(l_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(l_tile), r_tile, acc)
    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None] * stride_wn + offs_c[None, :] * stride_wc
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & c_mask[None, :])


@triton.jit
def combine_kernel(
    o_ptr, idx_ptr, weight_ptr, y_ptr, K_SLOTS, D, E,
    stride_om, stride_yt, HAS_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y[t] = sum over active k of (weight[t,k] *) o[t*K+k], in fp32, in slot order: deterministic.

    Inactive slots are never loaded (masked), so they cost nothing and may hold garbage.
    """
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(K_SLOTS):
        p = t * K_SLOTS + k
        e = tl.load(idx_ptr + p)
        d_end = tl.where((e >= 0) & (e < E), D, 0)  # a scalar bound: masks the whole row of an inactive slot
        row = tl.load(o_ptr + p * stride_om + offs_d, mask=offs_d < d_end, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            row = row * tl.load(weight_ptr + p).to(tl.float32)
        acc += row
    tl.store(y_ptr + t * stride_yt + offs_d, acc.to(y_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _upper_bound(keys_ptr, value, P):
    """Per lane: how many of the P sorted keys are <= value (a vectorised binary search)."""
    lo = tl.zeros(value.shape, dtype=tl.int32)
    hi = tl.zeros(value.shape, dtype=tl.int32) + P
    for _ in range(31):
        active = lo < hi
        mid = (lo + hi) // 2
        key = tl.load(keys_ptr + mid, mask=active, other=0)
        right = key <= value
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def plan_kernel(
    src_ptr, pair_ptr, offs_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, P, E, NUM_TILES,
    SOURCE: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program builds the routing in place of a dozen small torch launches (decode latency).

    SOURCE 0: src = offs (backward), only the row-tile plan of `routing.make_tiles` is written.
    SOURCE 1: src = expert-sorted keys; offsets by binary search, then the plan.
    SOURCE 2: src = expert_idx (small P); a stable counting sort also writes the sorted pair ids.
    E_PAD > E: lane E counts the inactive pairs, which go last.
    """
    e = tl.arange(0, E_PAD)
    e_mask = e < E
    if SOURCE == 0:
        ends = tl.load(src_ptr + e, mask=e_mask, other=0)
        starts = tl.load(src_ptr + e - 1, mask=e_mask & (e > 0), other=0)
    elif SOURCE == 1:
        ends = _upper_bound(src_ptr, e, P)
        # starts[e] = ends[e - 1]: a register shift through a one-hot matrix (E_PAD^2 is tiny) saves a
        # second chain of dependent global loads.
        starts = tl.sum(tl.where(e[:, None] - 1 == e[None, :], ends[None, :], 0), axis=1)
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


@triton.jit
def _onehot_keys(idx_ptr, p0, P, E, e, CHUNK: tl.constexpr):
    """[CHUNK, E_PAD] one-hot of pairs p0.. by expert; inactive slots (index outside [0, E)) on lane E."""
    p = p0 + tl.arange(0, CHUNK)
    idx = tl.load(idx_ptr + p, mask=p < P, other=-1)
    key = tl.where((idx >= 0) & (idx < E), idx, E)
    return (key[:, None] == e[None, :]) & (p < P)[:, None]


def compiled_variants() -> int:
    """Compiled binaries plus autotune decisions held by this module's kernels (grows on a recompile)."""
    total = 0
    for kernel in (grouped_gemm_kernel, grouped_wgrad_kernel, combine_kernel, plan_kernel):
        total += len(getattr(kernel, "cache", {}))  # autotuner: one entry per tuning key
        jit = getattr(kernel, "fn", kernel)
        for caches in getattr(jit, "device_caches", {}).values():
            total += len(caches[0])
    return total
