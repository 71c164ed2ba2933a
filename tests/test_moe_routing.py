import pytest
import torch
import torch.nn.functional as F

from molmo_fast import knobs
from molmo_fast.config import MolmoEConfig
from molmo_fast.model.moe import MoE, RoutingPolicy, expert_load, load_balancing_loss, route, router_z_loss
from molmo_fast.model.molmoe import MolmoE

T, E, K = 40, 8, 4


@pytest.fixture
def logits():
    return torch.randn(T, E, generator=torch.Generator().manual_seed(0)) * 2


def test_topk_parity_no_renormalisation(logits):
    idx, w = route(logits, K, K)
    probs = logits.softmax(-1)
    ref_w, ref_idx = probs.topk(K, dim=-1)
    assert torch.equal(idx, ref_idx) and torch.allclose(w, ref_w)
    assert (w.sum(-1) < 1).all()


def test_renormalised_topk(logits):
    idx, w = route(logits, K, K, RoutingPolicy("topk_renorm"))
    assert torch.equal(idx, logits.topk(K, dim=-1).indices)
    torch.testing.assert_close(w.sum(-1), torch.ones(T))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_is_data_with_static_shape(logits, k):
    for k_arg in (k, torch.tensor(k)):
        idx, w = route(logits, K, k_arg)
        assert idx.shape == (T, K)
        assert (idx[:, k:] == -1).all() and (w[:, k:] == 0).all()
        assert torch.equal(idx[:, :k], logits.topk(k, dim=-1).indices)


def test_per_token_k(logits):
    k_T = torch.arange(T) % K + 1
    idx, w = route(logits, K, k_T)
    assert torch.equal((idx >= 0).sum(-1), k_T) and torch.equal((w > 0).sum(-1), k_T)


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
def test_top_p_smallest_set(logits, p):
    idx, _ = route(logits, K, K, RoutingPolicy("top_p", p))
    sorted_p = logits.softmax(-1).sort(-1, descending=True).values
    for t in range(T):
        need = int((sorted_p[t].cumsum(0) < p).sum()) + 1  # smallest prefix reaching mass p
        n = min(need, K)
        assert (idx[t] >= 0).sum() == n
        assert torch.equal(idx[t, :n], logits[t].topk(n).indices)


def test_threshold(logits):
    idx, w = route(logits, K, K, RoutingPolicy("threshold", 0.2))
    probs = logits.softmax(-1)
    expect = ((probs >= 0.2).sum(-1).clamp(1, K))
    assert torch.equal((idx >= 0).sum(-1), expect)
    assert ((w >= 0.2) | (w == 0) | (torch.arange(K) == 0)).all()


def test_bad_policy():
    with pytest.raises(ValueError, match="nope"):
        RoutingPolicy("nope")
    with pytest.raises(ValueError, match="top_p"):
        RoutingPolicy("top_p", 0.0)
    with pytest.raises(ValueError, match="threshold"):
        RoutingPolicy.parse("threshold:1.5")
    with pytest.raises(ValueError, match="no parameter"):
        RoutingPolicy.parse("topk:3")
    assert RoutingPolicy.parse("top_p") == RoutingPolicy("top_p", 1.0)
    assert str(RoutingPolicy.parse("top_p:0.90")) == "top_p:0.9"


def test_aux_losses_and_load(logits):
    idx, _ = route(logits, K, 2)
    load = expert_load(idx, E)
    assert torch.equal(load, torch.bincount(idx[idx >= 0], minlength=E)) and load.sum() == 2 * T
    uniform = torch.zeros(T, E)
    balanced = torch.arange(T * 2).reshape(T, 2) % E
    assert load_balancing_loss(uniform, balanced).item() == pytest.approx(1.0)
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 20.0
    assert load_balancing_loss(collapsed, torch.zeros(T, 2, dtype=torch.long)).item() == pytest.approx(E, rel=1e-3)
    manual = E * (load.float() / load.sum() * logits.softmax(-1).mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(logits, idx), manual)
    torch.testing.assert_close(router_z_loss(logits), torch.logsumexp(logits, -1).pow(2).mean())
    valid = torch.arange(T) < T // 2
    torch.testing.assert_close(router_z_loss(logits, valid), router_z_loss(logits[: T // 2]))
    half = T // 2
    torch.testing.assert_close(load_balancing_loss(logits, idx, valid), load_balancing_loss(logits[:half], idx[:half]))


def dense_reference(moe: MoE, x_TD, k):
    probs = moe.router(x_TD).softmax(-1)
    w, idx = probs.topk(k, dim=-1)
    y = torch.zeros_like(x_TD)
    H = moe.w_down.shape[-1]
    for t in range(x_TD.shape[0]):
        for j in range(k):
            e = idx[t, j]
            gate, up = moe.w_gate_up[e, :H] @ x_TD[t], moe.w_gate_up[e, H:] @ x_TD[t]
            y[t] += w[t, j] * (moe.w_down[e] @ (F.silu(gate) * up))
    return y


@pytest.fixture(scope="module")
def model():
    return MolmoE.from_config_on_meta(MolmoEConfig.from_name("tiny")).init_weights(seed=1).eval()


@torch.no_grad()
@pytest.mark.parametrize("impl", ["auto", "loop", "grouped_mm"])
def test_moe_block_matches_dense_reference(model, impl):
    moe = model.llm.blocks[0].moe
    moe.impl = impl
    x = torch.randn(1, 12, model.config.llm.d_model)
    for k in (moe.k_max, 1):
        y, _, _ = moe(x, top_k=k)
        torch.testing.assert_close(y[0], dense_reference(moe, x[0], k), atol=1e-5, rtol=1e-4)
    moe.impl = "auto"


def test_unknown_impl_rejected():
    cfg = MolmoEConfig.from_name("tiny")
    cfg.moe.impl = "cuda-magic"
    with pytest.raises(ValueError, match="cuda-magic"):
        MolmoE.from_config_on_meta(cfg)


@torch.no_grad()
def test_runtime_top_k_knobs(model):
    ids = torch.tensor([[999, 5, 17, 1003, 1050, 300, 2]])
    base = model(ids).logits
    knobs.set_top_k(model, 1)
    k1 = model(ids).logits
    assert not torch.allclose(k1, base)
    assert torch.equal(model(ids, top_k=1).logits, k1)
    knobs.set_top_k(model, [1, model.config.moe.top_k])
    mixed = model(ids).logits
    knobs.set_top_k(model, model.config.moe.top_k)
    assert torch.equal(model(ids).logits, base)
    assert torch.equal(model(ids, top_k=[1, model.config.moe.top_k]).logits, mixed)
    per_token = torch.full(ids.shape, model.config.moe.top_k)
    assert torch.equal(model(ids, top_k=per_token).logits, base)
    with pytest.raises(ValueError, match="top_k"):
        knobs.set_top_k(model, model.config.moe.num_experts + 1)
    knobs.set_top_k(model, model.config.moe.top_k + 1)  # above K_max: grows the static slot count
    assert model.llm.blocks[0].moe.k_max == model.config.moe.top_k + 1
    assert not torch.allclose(model(ids).logits, base)
    knobs.set_top_k(model, model.config.moe.top_k)
    assert torch.equal(model(ids).logits, base)


def test_top_k_change_does_not_recompile(model):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    moe = model.llm.blocks[0].moe
    compiled = torch.compile(moe, backend=counter, fullgraph=True)
    x = torch.randn(1, 6, model.config.llm.d_model)
    with torch.no_grad():
        outs = []
        for k in (2, 1, 2):
            moe.top_k.fill_(k)
            outs.append(compiled(x)[0])
    moe.top_k.fill_(model.config.moe.top_k)
    assert counter.frame_count == 1
    assert not torch.allclose(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@torch.no_grad()
def test_skip_blocks_and_describe(model):
    ids = torch.tensor([[999, 5, 17, 300]])
    base = model(ids).logits
    knobs.set_skip_blocks(model, range(model.config.llm.n_layers))
    expected = model.llm.lm_head(model.llm.ln_f(model.llm.wte(ids)))
    assert torch.equal(model(ids).logits, expected)
    knobs.Knobs.parse(["skip_blocks=1", "top_k=1", "routing=top_p:0.5", "max_new_tokens=3", "max_crops=2"]).apply(model)
    info = knobs.describe(model)
    assert info["skip_blocks"] == [1] and info["moe_top_k"] == [1] * model.config.llm.n_layers
    assert info["moe_routing"][0] == "top_p" and info["moe_top_p"][0] == 0.5
    assert info["max_new_tokens"] == 3 and info["max_crops"] == 2
    assert info["params_active"] < info["params_total"]
    assert model.generate(ids).shape[1] == ids.shape[1] + 3
    knobs.Knobs(top_k=model.config.moe.top_k, routing="topk", skip_blocks=[]).apply(model)
    assert torch.equal(model(ids).logits, base)
    with pytest.raises(ValueError, match="skip_blocks"):
        knobs.set_skip_blocks(model, [model.config.llm.n_layers])
    with pytest.raises(ValueError, match="knob"):
        knobs.Knobs.parse(["topk=3"])
    with pytest.raises(ValueError, match="max_crops=many"):
        knobs.Knobs.parse(["max_crops=many"])
    assert knobs.Knobs.parse(["top_k=2", "skip_blocks=0,1"]) == knobs.Knobs(top_k=2, skip_blocks=[0, 1])


def test_aux_loss_in_training(model):
    cfg = MolmoEConfig.from_name("tiny")
    cfg.moe.load_balancing_weight, cfg.moe.z_loss_weight = 0.01, 0.001
    m = MolmoE.from_config_on_meta(cfg).init_weights(seed=2).train()
    ids = torch.tensor([[-1, 999, 5, 17, 300], [999, 4, 8, 9, 10]])
    out = m(ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.aux_loss.backward()
    assert m.llm.blocks[0].moe.router.weight.grad.abs().sum() > 0
    assert model.train()(ids).aux_loss is None  # weights 0 by default
    model.eval()


def test_active_params_follow_top_k_and_skipped_blocks(model):
    cfg = model.config
    per_expert = 3 * cfg.moe.hidden_size * cfg.llm.d_model
    full = model.num_parameters(active=True)
    assert model.num_parameters() - full == (cfg.moe.num_experts - cfg.moe.top_k) * per_expert * cfg.llm.n_layers
    try:
        knobs.set_top_k(model, 1)
        assert full - model.num_parameters(active=True) == (cfg.moe.top_k - 1) * per_expert * cfg.llm.n_layers
        knobs.set_skip_blocks(model, [0])
        block_0 = sum(p.numel() for p in model.llm.blocks[0].parameters())
        assert knobs.describe(model)["params_active"] == model.num_parameters() - block_0 - (
            cfg.moe.num_experts - 1) * per_expert * (cfg.llm.n_layers - 1)
    finally:
        knobs.Knobs(top_k=cfg.moe.top_k, skip_blocks=[]).apply(model)
