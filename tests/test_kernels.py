"""MoE op parity (forward and every gradient) against a float64 loop reference, on CPU.

The Triton path runs in Triton's interpreter (float32 only: its bf16 tl.dot is not trustworthy);
bf16/fp16 and timing checks are in test_kernels_gpu.py.
"""

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from molmo_fast.kernels import moe_mlp, moe_mlp_loop
from molmo_fast.kernels.routing import make_tiles, route

# tests/conftest.py turns the interpreter on for CPU-only machines; with a GPU, test_kernels_gpu.py covers Triton.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
IMPLS = ["grouped_mm", pytest.param("triton", marks=needs_interpreter)]


def _weights(E, D, H, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w_gate_up_EHD = torch.randn(E, 2 * H, D, generator=g, dtype=dtype) / D**0.5
    w_down_EDH = torch.randn(E, D, H, generator=g, dtype=dtype) / H**0.5
    return w_gate_up_EHD, w_down_EDH


def _routing(T, E, K, counts_T, seed=1, experts=None):
    """Distinct experts per token (from `experts` if given), the first counts_T[t] slots active, rest -1."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(E) if experts is None else torch.tensor(experts)
    idx_TK = torch.stack([pool[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)])
    slot_TK = torch.arange(K).expand(T, K)
    idx_TK = torch.where(slot_TK < torch.as_tensor(counts_T).unsqueeze(1), idx_TK, -1)
    weight_TK = torch.rand(T, K, generator=g)
    return idx_TK, weight_TK


class _Poison:
    """Fill every new_empty allocation with NaN (ints with a huge value) so unwritten elements show."""

    def __enter__(self):
        self.orig = torch.Tensor.new_empty

        def poisoned(t, *args, **kwargs):
            out = self.orig(t, *args, **kwargs)
            return out.fill_(float("nan") if out.is_floating_point() else 2**30)

        torch.Tensor.new_empty = poisoned

    def __exit__(self, *exc):
        torch.Tensor.new_empty = self.orig


def _check(impl, x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK, atol=2e-4):
    inputs = [x_TD, w_gate_up_EHD, w_down_EDH, weight_TK]
    ref = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = moe_mlp_loop(ref[0], ref[1], ref[2], idx_TK, ref[3])
    dy_TD = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads_ref = torch.autograd.grad(y_ref, ref, dy_TD)

    ours = [t.detach().requires_grad_() for t in inputs]  # detach keeps a non-contiguous layout
    with _Poison():
        y = moe_mlp(ours[0], ours[1], ours[2], idx_TK, ours[3], impl=impl)
        grads = torch.autograd.grad(y, ours, dy_TD.float())
    for name, got, want in zip(["y", "dx", "dw_gate_up", "dw_down", "dweight"], [y, *grads], [y_ref, *grads_ref]):
        assert got.dtype == torch.float32, name
        assert torch.isfinite(got).all(), f"{name}: unwritten (poisoned) elements"
        scale = want.abs().max().clamp(min=1.0)
        err = ((got.double() - want).abs().max() / scale).item()
        assert err < atol, f"{impl} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "T,E,K,case",
    [
        (13, 4, 1, "k1"),  # k=1, T not a multiple of any block
        (5, 4, 4, "kE"),  # every expert for every token
        (1, 8, 4, "T1"),
        (13, 8, 4, "ragged"),  # per-token k in 0..K, tokens without experts, experts without tokens
        (16, 6, 3, "idle_experts"),  # only experts {1, 4, 5} are ever routed to
        (40, 4, 2, "hot_experts"),  # 40 rows on each of experts {0, 2}: several row tiles per expert
    ],
)
def test_parity(impl, T, E, K, case):
    D, H = 32, 16
    w_gate_up_EHD, w_down_EDH = _weights(E, D, H)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    counts_T = [K] * T
    experts = None
    if case == "ragged":
        counts_T = [(3 * t) % (K + 1) for t in range(T)]
        assert 0 in counts_T and K in counts_T
    if case == "idle_experts":
        experts = [1, 4, 5]
    if case == "hot_experts":
        experts = [0, 2]
    idx_TK, weight_TK = _routing(T, E, K, counts_T, experts=experts)
    _check(impl, x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("D,H", [(18, 10), (48, 40)])  # unaligned for grouped_mm; several, ragged N blocks
def test_non_contiguous_and_odd_dims(impl, D, H):
    T, E, K = 7, 5, 2
    w_gate_up_EHD, w_down_EDH = _weights(E, D, H, seed=4)
    x_TD = torch.randn(D, T, generator=torch.Generator().manual_seed(5)).t()
    assert not x_TD.is_contiguous()
    idx_TK, weight_TK = _routing(T, E, K, [2, 1, 0, 2, 2, 1, 2], seed=6)
    _check(impl, x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    w_gate_up_EHD, w_down_EDH = _weights(4, 32, 16)
    inputs = [torch.randn(0, 32), w_gate_up_EHD, w_down_EDH, torch.rand(0, 2)]
    inputs = [t.requires_grad_() for t in inputs]
    y_TD = moe_mlp(inputs[0], inputs[1], inputs[2], torch.zeros(0, 2, dtype=torch.long), inputs[3], impl=impl)
    assert y_TD.shape == (0, 32)
    grads = torch.autograd.grad(y_TD.sum(), inputs)
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, inputs))


@needs_interpreter
def test_grouped_mm_matches_triton_and_loop_without_grad():
    T, E, K, D, H = 9, 4, 2, 32, 16
    w_gate_up_EHD, w_down_EDH = _weights(E, D, H, seed=8)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(9))
    idx_TK, weight_TK = _routing(T, E, K, [2, 0, 1, 2, 2, 1, 0, 2, 1], seed=10)
    with torch.no_grad():
        ys = [
            moe_mlp(x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK, impl=impl)
            for impl in ("loop", "grouped_mm", "triton")
        ]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], atol=1e-5, rtol=1e-5)
    assert ys[0][1].abs().max() == 0  # token 1 has no active slot


def test_routing_tiles_cover_each_active_pair_once():
    idx_TK = torch.tensor([[2, -1, 0], [2, 2, -1], [-1, -1, -1], [0, 3, 2]])
    routing = route(idx_TK, num_experts=4)
    assert routing.offs_E.tolist() == [2, 2, 6, 7]
    tiles = make_tiles(routing, block_m=2)
    covered = []
    for e, s, end in zip(tiles.expert.tolist(), tiles.row_start.tolist(), tiles.row_end.tolist()):
        rows = list(range(s, min(s + 2, end)))
        assert all(idx_TK.flatten()[routing.sorted_pair_P[r]] == e for r in rows)
        covered += rows
    assert sorted(covered) == list(range(7))


@needs_interpreter
@pytest.mark.parametrize("small", [True, False])  # one-program counting sort / histogram -> scan -> scatter
@pytest.mark.parametrize("T,K,E,block_m", [(13, 4, 8, 16), (40, 2, 4, 16), (1, 4, 8, 16), (300, 8, 64, 32)])
def test_triton_routing_matches_torch_reference(T, K, E, block_m, small, monkeypatch):
    from molmo_fast.kernels import triton_moe

    monkeypatch.setattr(triton_moe, "SMALL_PAIRS", T * K if small else 0)
    idx_TK = torch.randint(-1, E, (T, K), generator=torch.Generator().manual_seed(T))
    want = route(idx_TK, E)
    want_tiles = make_tiles(want, block_m)
    got, got_tiles = triton_moe._route(idx_TK, E, block_m)
    assert torch.equal(got.sorted_pair_P, want.sorted_pair_P) and torch.equal(got.offs_E, want.offs_E)
    for tiles in (got_tiles, triton_moe._plan(want, block_m)):  # the backward rebuilds it from offsets
        for name in ("expert", "row_start", "row_end", "count"):
            assert torch.equal(getattr(tiles, name), getattr(want_tiles, name)), name


def test_bad_inputs_name_the_problem():
    w_gate_up_EHD, w_down_EDH = _weights(4, 32, 16)
    x_TD = torch.randn(3, 32)
    idx_TK, weight_TK = _routing(3, 4, 2, [2, 2, 2])
    with pytest.raises(ValueError, match="impl="):
        moe_mlp(x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK, impl="cuda")
    with pytest.raises(ValueError, match="w_down"):
        moe_mlp(x_TD, w_gate_up_EHD, w_down_EDH[:, :, :8], idx_TK, weight_TK)
    with pytest.raises(ValueError, match="expert_weight"):
        moe_mlp(x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK[:, :1])
    with pytest.raises(ValueError, match="dtype"):
        moe_mlp(x_TD.double(), w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK)


def test_autocast_casts_inputs_and_keeps_param_grads_fp32():
    T, E, K, D, H = 8, 4, 2, 32, 16
    w_gate_up_EHD, w_down_EDH = _weights(E, D, H, seed=13)
    params = [w_gate_up_EHD.requires_grad_(), w_down_EDH.requires_grad_()]
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(14))
    idx_TK, weight_TK = _routing(T, E, K, [2] * T, seed=15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_TD = moe_mlp(x_TD, *params, idx_TK, weight_TK, impl="grouped_mm")
    assert y_TD.dtype == torch.bfloat16
    grads = torch.autograd.grad(y_TD.float().sum(), params)
    assert all(g.dtype == torch.float32 for g in grads)
    y_ref = moe_mlp_loop(x_TD, w_gate_up_EHD.detach(), w_down_EDH.detach(), idx_TK, weight_TK)
    torch.testing.assert_close(y_TD.float(), y_ref, atol=3e-2, rtol=3e-2)


class _MoEBlock(torch.nn.Module):
    """Softmax router, top-K_max, then a data mask keeps the first k_T[t] slots (k as a tensor)."""

    def __init__(self, D, H, E, impl):
        super().__init__()
        w_gate_up_EHD, w_down_EDH = _weights(E, D, H, seed=11)
        self.router = torch.nn.Linear(D, E, bias=False)
        self.w_gate_up_EHD = torch.nn.Parameter(w_gate_up_EHD)
        self.w_down_EDH = torch.nn.Parameter(w_down_EDH)
        self.impl = impl

    def forward(self, x_TD, k_T, k_max: int):
        probs_TE = self.router(x_TD).softmax(-1)
        weight_TK, idx_TK = probs_TE.topk(k_max, dim=-1)
        active_TK = torch.arange(k_max, device=x_TD.device) < k_T.unsqueeze(1)
        idx_TK = torch.where(active_TK, idx_TK, -1)
        return moe_mlp(x_TD, self.w_gate_up_EHD, self.w_down_EDH, idx_TK, weight_TK, impl=self.impl)


def test_compile_fullgraph_no_recompile_across_k():
    """On the CPU path (the op is opaque to dynamo, so this holds for every impl; the GPU test covers Triton)."""
    torch._dynamo.reset()
    T, D, H, E, K = 6, 32, 16, 8, 4
    torch.manual_seed(12)
    block = _MoEBlock(D, H, E, "grouped_mm")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    x_TD = torch.randn(T, D)
    settings = [torch.full((T,), 1), torch.full((T,), K), torch.tensor([0, 1, 2, 3, 4, 2]), torch.full((T,), 2)]
    for k_T in settings:
        xs = [x_TD.clone().requires_grad_() for _ in range(2)]
        y_eager = block(xs[0], k_T, K)
        y_comp = compiled(xs[1], k_T, K)
        torch.testing.assert_close(y_comp, y_eager)
        dy = torch.randn_like(y_eager)
        g_eager = torch.autograd.grad(y_eager, [xs[0], block.w_gate_up_EHD, block.router.weight], dy)
        g_comp = torch.autograd.grad(y_comp, [xs[1], block.w_gate_up_EHD, block.router.weight], dy)
        for a, b in zip(g_comp, g_eager):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for {len(settings)} k settings"
