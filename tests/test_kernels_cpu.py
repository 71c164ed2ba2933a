"""The CPU MoE path (kernels/cpu_moe.py): every strategy against the float64 loop reference, the strategy choice,
and the memory reuse that keeps a training step free of fresh page-faulting allocations."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from molmo_fast.kernels import cpu_memory, cpu_moe, moe_mlp, moe_mlp_loop

STRATEGIES = list(cpu_moe.STRATEGIES)


def _weights(E, D, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * H, D, generator=g) / D**0.5, torch.randn(E, D, H, generator=g) / H**0.5


def _routing(T, E, K, counts_T, seed=1, experts=None):
    """Distinct experts per token (from `experts` if given), the first counts_T[t] slots active, rest -1."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(E) if experts is None else torch.tensor(experts)
    idx_TK = torch.stack([pool[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)]).reshape(T, K)
    idx_TK = torch.where(torch.arange(K) < torch.as_tensor(counts_T).reshape(T, 1), idx_TK, -1)
    return idx_TK, torch.rand(T, K, generator=g)


@pytest.fixture
def force_strategy(monkeypatch):
    def force(strategy):
        monkeypatch.setattr(cpu_moe, "choose_strategy", lambda *args: strategy)

    return force


def _check(x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK, atol=2e-5):
    inputs = [x_TD, w_gate_up_EHD, w_down_EDH, weight_TK]
    ref = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = moe_mlp_loop(ref[0], ref[1], ref[2], idx_TK, ref[3])
    dy_TD = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads_ref = torch.autograd.grad(y_ref, ref, dy_TD)
    ours = [t.detach().requires_grad_() for t in inputs]
    y = moe_mlp(ours[0], ours[1], ours[2], idx_TK, ours[3], impl="cpu")
    grads = torch.autograd.grad(y, ours, dy_TD.float())
    for name, got, want in zip(["y", "dx", "dw_gate_up", "dw_down", "dweight"], [y, *grads], [y_ref, *grads_ref]):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        scale = want.abs().max().clamp(min=1.0)
        err = ((got.double() - want).abs().max() / scale).item()
        assert err < atol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "T,E,K,case",
    [
        (13, 4, 1, "k1"),
        (5, 4, 4, "kE"),  # every expert for every token
        (1, 8, 4, "T1"),
        (13, 8, 4, "ragged"),  # per-token k in 0..K, tokens without experts
        (16, 6, 3, "idle_experts"),  # experts without tokens get a zero gradient
        (40, 4, 2, "hot_experts"),  # 40 rows on each of experts {0, 2}, none on the others
    ],
)
def test_parity(strategy, T, E, K, case, force_strategy):
    force_strategy(strategy)
    D, H = 24, 16
    w_gate_up_EHD, w_down_EDH = _weights(E, D, H)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    counts_T = [(3 * t) % (K + 1) for t in range(T)] if case == "ragged" else [K] * T
    experts = {"idle_experts": [1, 4, 5], "hot_experts": [0, 2]}.get(case)
    idx_TK, weight_TK = _routing(T, E, K, counts_T, experts=experts)
    _check(x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_active_pair_and_empty_batch(strategy, force_strategy):
    force_strategy(strategy)
    w_gate_up_EHD, w_down_EDH = _weights(4, 8, 6)
    for T in (0, 3):
        inputs = [t.clone().requires_grad_() for t in (torch.randn(T, 8), w_gate_up_EHD, w_down_EDH, torch.rand(T, 2))]
        y = moe_mlp(inputs[0], inputs[1], inputs[2], torch.full((T, 2), -1), inputs[3], impl="cpu")
        assert y.shape == (T, 8) and not y.any()
        grads = torch.autograd.grad(y, inputs, torch.randn(T, 8))
        assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, inputs))


def test_strategies_agree_without_grad_and_are_deterministic(force_strategy):
    T, E, K, D, H = 9, 4, 2, 16, 8
    w_gate_up_EHD, w_down_EDH = _weights(E, D, H, seed=8)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(9))
    idx_TK, weight_TK = _routing(T, E, K, [2, 0, 1, 2, 2, 1, 0, 2, 1], seed=10)
    ys = []
    for strategy in STRATEGIES * 2:
        force_strategy(strategy)
        with torch.no_grad():
            ys.append(moe_mlp(x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK, impl="cpu"))
    torch.testing.assert_close(ys[0], ys[1], atol=1e-6, rtol=1e-6)
    assert torch.equal(ys[0], ys[2]) and torch.equal(ys[1], ys[3])  # bitwise repeatable
    assert ys[0][1].abs().max() == 0  # token 1 has no active slot


def test_choose_strategy_by_gathered_weight_bytes():
    assert cpu_moe.choose_strategy(2, 64, 32, torch.float32) == "gathered"  # tiny decode: 48 KiB of gathered weights
    assert cpu_moe.choose_strategy(1, 2048, 1024, torch.float32) == "loop"  # one MolmoE expert is 24 MiB
    assert cpu_moe.choose_strategy(16384, 512, 512, torch.float32) == "loop"
    limit_pairs = cpu_moe.GATHERED_MAX_WEIGHT_BYTES // (3 * 64 * 32 * 4)
    assert cpu_moe.choose_strategy(limit_pairs, 64, 32, torch.float32) == "gathered"
    assert cpu_moe.choose_strategy(limit_pairs + 1, 64, 32, torch.float32) == "loop"


def test_auto_resolves_to_cpu_path_for_float32_only(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_moe, "moe_fwd", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(KeyError))
    w_gate_up_EHD, w_down_EDH = _weights(4, 8, 6)
    idx_TK, weight_TK = _routing(3, 4, 2, [2, 2, 2])
    with pytest.raises(KeyError):
        moe_mlp(torch.randn(3, 8), w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK)
    assert calls == [1]
    bf16 = [t.bfloat16() for t in (torch.randn(3, 8), w_gate_up_EHD, w_down_EDH)]
    moe_mlp(*bf16, idx_TK, weight_TK.bfloat16())  # auto takes grouped_mm for bf16 on CPU
    with pytest.raises(ValueError, match="impl='cpu' needs float32"):
        moe_mlp(*bf16, idx_TK, weight_TK.bfloat16(), impl="cpu")


def test_memory_is_reused_across_calls():
    """Second training call: the same workspace storages, and the saved activation and weight grads land in
    storages freed by the first call (no new large allocation), while live outputs never share memory."""
    T, E, K, D, H = 48, 8, 2, 32, 16  # h [T*K, 2H] and the grads differ in size: one pool list each
    w_gate_up_EHD, w_down_EDH = (w.requires_grad_() for w in _weights(E, D, H))
    x_TD = torch.randn(T, D, requires_grad=True)
    idx_TK, weight_TK = _routing(T, E, K, [K] * T)
    cpu_memory.empty_cache()

    def step():
        y = moe_mlp(x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK, impl="cpu")
        y.square().sum().backward()
        ptrs = {w.grad.data_ptr() for w in (w_gate_up_EHD, w_down_EDH)}
        w_gate_up_EHD.grad = w_down_EDH.grad = x_TD.grad = None
        return ptrs

    first = step()
    workspace_ptrs = {k: v.data_ptr() for k, v in cpu_memory._local.buffers.items()}
    pooled = cpu_memory.pooled_bytes()
    assert pooled >= (T * K * 2 * H + 3 * E * D * H) * 4  # h and both weight grads came from the pool
    assert step() == first
    assert cpu_memory.pooled_bytes() == pooled
    assert {k: v.data_ptr() for k, v in cpu_memory._local.buffers.items()} == workspace_ptrs

    # Outputs still alive are never handed out again: two live forward passes save into distinct storages.
    def loss(scale):
        return moe_mlp(scale * x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK, impl="cpu").square().sum()

    both = loss(1.0) + loss(2.0)
    assert cpu_memory.pooled_bytes() == pooled + T * K * 2 * H * 4
    (got,) = torch.autograd.grad(both, w_down_EDH)
    want = torch.autograd.grad(loss(1.0), w_down_EDH)[0] + torch.autograd.grad(loss(2.0), w_down_EDH)[0]
    torch.testing.assert_close(got, want)


def test_custom_op_contract_and_compile_without_recompiles():
    """opcheck (schema, fake tensors, autograd registration) on the cpu path, and torch.compile(fullgraph) giving
    eager's values and grads with one frame across routings of different k."""
    T, E, K, D, H = 6, 8, 4, 16, 8
    w_gate_up_EHD, w_down_EDH = (torch.nn.Parameter(w) for w in _weights(E, D, H, seed=11))
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(12), requires_grad=True)
    idx_TK, weight_TK = _routing(T, E, K, [1, 4, 0, 3, 2, 4])
    args = (x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK.requires_grad_(), "cpu", True)
    torch.library.opcheck(torch.ops.molmo_fast.moe_mlp_fwd.default, args)  # strategies share the op's contract

    def call(x_TD, idx_TK, weight_TK):
        return moe_mlp(x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK, impl="cpu")

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(call, backend=counter, fullgraph=True)
    for counts in ([1] * T, [K] * T, [0, 1, 2, 3, 4, 2]):
        idx_TK, weight_TK = _routing(T, E, K, counts, seed=sum(counts))
        y_eager, y_comp = call(x_TD, idx_TK, weight_TK), compiled(x_TD, idx_TK, weight_TK)
        torch.testing.assert_close(y_comp, y_eager)
        dy = torch.randn_like(y_eager)
        for a, b in zip(torch.autograd.grad(y_comp, [x_TD, w_gate_up_EHD], dy),
                        torch.autograd.grad(y_eager, [x_TD, w_gate_up_EHD], dy)):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1


def test_cpu_layer_bench_smoke(tmp_path, monkeypatch):
    """bench/moe_kernels.py --device cpu: every impl and mode side by side, with faults, RSS and ratios."""
    import importlib.util
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location("moe_kernels_bench_cpu", bench_dir / "moe_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--device", "cpu", "--dims", "16", "8", "4", "--T", "8", "--k", "2", "--steps", "1",
                             "--warmup", "0", "--out", str(tmp_path / "cpu.json")])
    finally:
        torch.set_num_threads(threads)
    rows = {(r["impl"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(i, m) for i in ("hf_loop", "molmo_fast", "grouped_mm", "dense") for m in ("fwd", "fwd+bwd")}
    for (impl, _), r in rows.items():
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["minor_faults"] >= 0 and r["peak_rss_mib"] > 0
        assert impl == "dense" or r["rel_err"] < 1e-5
    assert rows[("hf_loop", "fwd")]["x_vs_hf_loop"] == 1.0 and rows[("dense", "fwd")]["x_dense_time"] == 1.0
