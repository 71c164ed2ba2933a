"""Elastic top-k training (molmo_fast/train/elastic.py): the seeded k policy, its checkpoint state, the recorded
routing, and its effect inside the training step."""

import json
import signal
from collections import Counter

import gin
import numpy as np
import pytest
import torch
from test_train_distributed import KILL_AT_STEP, REPO, _args, _losses, _run
from test_train_unit import fake_shard_set

from molmo_fast.config import MolmoEConfig
from molmo_fast.model.moe import RoutingPolicy, route
from molmo_fast.train.elastic import CONFIG_KEY, ElasticConfig, KSampler, Pass, record, step_metrics

KS = (1, 2, 4, 8)


def _draws(cfg, steps=range(1, 201), n_layers=4, top_k=8):
    sampler = KSampler(cfg, n_layers, top_k)
    return [sampler.passes(s) for s in steps]


def test_fixed_default_trains_the_model_k_and_is_marked_default():
    cfg = ElasticConfig()
    assert cfg.is_default
    assert all(p == [Pass((8, 8, 8, 8))] for p in _draws(cfg, range(1, 5)))
    assert not ElasticConfig(ks=(2,)).is_default and _draws(ElasticConfig(ks=(2,)), [3])[0] == [Pass((2,) * 4)]


def test_sample_draws_one_k_per_step_from_the_list_reproducibly():
    cfg = ElasticConfig(mode="sample", ks=KS, seed=7)
    draws = _draws(cfg)
    assert draws == _draws(ElasticConfig(mode="sample", ks=KS, seed=7))  # same seed: every rank, every restart
    assert draws != _draws(ElasticConfig(mode="sample", ks=KS, seed=8))
    ks = [p[0].top_k for p in draws]
    assert all(len(p) == 1 and len(set(k)) == 1 for p, k in zip(draws, ks, strict=True))  # one k shared by all layers
    counts = Counter(k[0] for k in ks)
    assert set(counts) == set(KS) and min(counts.values()) > 25  # ~50 each of 200: uniform by default
    # The draw of step s does not depend on which steps were drawn before (a resumed run skips the early ones).
    assert _draws(cfg, [150])[0] == draws[149]


def test_sample_probabilities_are_respected():
    draws = _draws(ElasticConfig(mode="sample", ks=KS, probs=(0, 3, 0, 1)), range(1, 401))
    counts = Counter(p[0].top_k[0] for p in draws)
    assert set(counts) == {2, 8} and 0.65 < counts[2] / 400 < 0.85


def test_sample_per_layer_draws_each_layer_independently():
    draws = _draws(ElasticConfig(mode="sample_per_layer", ks=KS), n_layers=6)
    layer_ks = np.array([p[0].top_k for p in draws])  # [steps, layers]
    assert layer_ks.shape == (200, 6) and set(layer_ks.flatten()) == set(KS)
    assert (layer_ks.min(1) != layer_ks.max(1)).mean() > 0.9  # layers disagree in almost every step
    assert all(set(layer_ks[:, layer]) == set(KS) for layer in range(6))


def test_sandwich_trains_largest_smallest_and_n_sampled():
    draws = _draws(ElasticConfig(mode="sandwich", ks=KS, n_sampled=2))
    assert all(len(p) == 4 and p[0].top_k == (8,) * 4 and p[1].top_k == (1,) * 4 for p in draws)
    sampled = Counter(q.top_k[0] for p in draws for q in p[2:])
    assert set(sampled) == set(KS)
    assert len(_draws(ElasticConfig(mode="sandwich", ks=KS, n_sampled=0), [1])[0]) == 2


def test_kind_budgets_are_drawn_per_pass_and_bracket_the_sandwich():
    draws = _draws(ElasticConfig(mode="sandwich", ks=KS, n_sampled=1, kind_ks={"image": [1, 2, 4], "text": 8}))
    for p in draws:
        assert dict(p[0].kinds) == {"image": 4, "text": 8} and dict(p[1].kinds) == {"image": 1, "text": 8}
    assert {dict(p[2].kinds)["image"] for p in draws} == {1, 2, 4}
    m = step_metrics(ElasticConfig(mode="sample", ks=KS, kind_ks={"image": 2}), [Pass((4, 4), (("image", 2),))], [0])
    assert m == {"train/top_k": 4.0, "train/top_k_image": 2.0}


@pytest.mark.parametrize("bad, field", [
    ({"mode": "elastic"}, "ElasticConfig.mode"),
    ({"mode": "sample"}, "ElasticConfig.ks"),
    ({"mode": "sandwich", "ks": (4,)}, "ElasticConfig.ks"),
    ({"mode": "fixed", "ks": (1, 2)}, "ElasticConfig.ks"),
    ({"mode": "sample", "ks": (0, 2)}, "ElasticConfig.ks"),
    ({"mode": "sample", "ks": KS, "probs": (1, 1)}, "ElasticConfig.probs"),
    ({"mode": "sample", "ks": KS, "probs": (0, 0, 0, 0)}, "ElasticConfig.probs"),
    ({"mode": "sandwich", "ks": KS, "n_sampled": -1}, "ElasticConfig.n_sampled"),
    ({"kind_ks": {"generated": 2}}, "ElasticConfig.kind_ks"),
])
def test_bad_settings_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ElasticConfig(**bad)


def test_ks_above_the_model_slot_count_are_refused():
    with pytest.raises(ValueError, match=r"ElasticConfig\.ks.*moe_top_k = 2"):
        KSampler(ElasticConfig(mode="sample", ks=KS), n_layers=2, top_k=2)
    with pytest.raises(ValueError, match=r"kind_ks\['image'\]"):
        KSampler(ElasticConfig(kind_ks={"image": 16}), n_layers=2, top_k=8)


def test_sampler_state_is_json_and_the_checkpoint_seed_wins():
    cfg = ElasticConfig(mode="sample_per_layer", ks=KS, seed=11)
    state = json.loads(json.dumps(KSampler(cfg, 4, 8).state_dict()))  # what train_state.json holds
    resumed = KSampler(ElasticConfig(mode="sample_per_layer", ks=KS, seed=99), 4, 8)
    resumed.load_state_dict(state)
    assert [resumed.passes(s) for s in range(1, 50)] == _draws(cfg, range(1, 50))


def test_step_metrics_report_mean_k_per_layer_and_sandwich_losses_by_k():
    cfg = ElasticConfig(mode="sandwich", ks=KS, n_sampled=2)
    passes = [Pass((8, 8)), Pass((1, 1)), Pass((8, 8)), Pass((2, 2))]
    m = step_metrics(cfg, passes, [1.0, 4.0, 2.0, 3.0])
    assert m == {"train/top_k": 4.75, "train/loss_k1": 4.0, "train/loss_k2": 3.0, "train/loss_k8": 1.5}
    m = step_metrics(ElasticConfig(mode="sample_per_layer", ks=KS), [Pass((1, 4, 8))], [0.0])
    assert m == {"train/top_k": pytest.approx(13 / 3), "train/top_k/layer0": 1, "train/top_k/layer1": 4,
                 "train/top_k/layer2": 8}


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_renormalised_routing_sums_to_one_over_the_active_experts(k):
    logits_TE = torch.randn(64, 16, generator=torch.Generator().manual_seed(k)) * 3
    idx_TK, w_TK = route(logits_TE, 8, torch.tensor(k), RoutingPolicy("topk_renorm"))
    active_TK = idx_TK >= 0
    assert (active_TK.sum(1) == k).all() and (w_TK[~active_TK] == 0).all() and (w_TK[active_TK] > 0).all()
    torch.testing.assert_close(w_TK.sum(1), torch.ones(64))
    probs_TE = logits_TE.softmax(-1)
    # Same experts as plain top-k, weights = their probabilities over the mass of the active set.
    raw_TK = probs_TE.gather(1, idx_TK.clamp_min(0)) * active_TK
    torch.testing.assert_close(w_TK, raw_TK / raw_TK.sum(1, keepdim=True))


def test_record_writes_the_training_routing_and_loading_sets_it(golden_dir, tmp_path):
    from molmo_fast.model.molmoe import MolmoE

    released = json.loads((golden_dir / "tiny_model" / "config.json").read_text())
    mcfg = MolmoEConfig.from_hf_dict(released)
    record(mcfg, ElasticConfig())  # the default policy changes nothing: the released file round-trips
    assert mcfg.to_hf_dict() == released
    assert {m.policy.kind for m in (b.moe for b in MolmoE(mcfg).llm.blocks)} == {"topk"}

    record(mcfg, ElasticConfig(mode="sample", ks=(1, 2), renorm=True, kind_ks={"image": [1, 2]}))
    (tmp_path / "config.json").write_text(json.dumps(mcfg.to_hf_dict()))
    loaded = MolmoEConfig.from_hf_json(tmp_path)
    assert loaded.moe.normalize_weights and loaded.hf_extra["norm_topk_prob"] is True
    assert loaded.hf_extra[CONFIG_KEY] == {"mode": "sample", "ks": [1, 2], "probs": [], "n_sampled": 1,
                                           "kind_ks": {"image": [1, 2]}, "renorm": True, "seed": 2024}
    assert {b.moe.policy.kind for b in MolmoE(loaded).llm.blocks} == {"topk_renorm"}
    assert loaded.to_hf_dict() == json.loads((tmp_path / "config.json").read_text())



def test_elastic_recipes_parse_and_fit_their_models(tmp_path):
    """gin/demo_moe_elastic.gin is gin/demo_moe.gin plus the policy; gin/pixmo_finetune_elastic.gin starts from an
    HF checkpoint with the sandwich rule (only config-time checks here: it needs the real data and weights)."""
    from molmo_fast.train.config import load_config

    demo = load_config([str(REPO / "gin" / "demo_moe_elastic.gin")])
    fixed = load_config([str(REPO / "gin" / "demo_moe.gin")])
    assert (demo.elastic.mode, demo.elastic.ks, demo.elastic.renorm) == ("sample", KS, True)
    assert fixed.elastic.is_default and demo.train.run_dir == "runs/demo_moe_elastic"
    for part in ("model", "data", "optim"):
        assert demo.to_dict()[part] == fixed.to_dict()[part], part
    assert {**demo.to_dict()["train"], "run_dir": ""} == {**fixed.to_dict()["train"], "run_dir": ""}
    mcfg = demo.model.build_config()
    KSampler(demo.elastic, mcfg.llm.n_layers, mcfg.moe.top_k)  # every k fits the model's K_max

    text = (REPO / "gin" / "pixmo_finetune_elastic.gin").read_text()
    params = [f"INIT_CHECKPOINT = '{tmp_path / 'init'}'", f"FINETUNE_SHARDS_ROOT = '{tmp_path / 'data'}'"]
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "config.json").write_text("{}")
    base = (REPO / "gin" / "pixmo_finetune.gin").read_text()
    for names in ("DEMO", "AUX", "POINTING"):
        for name in base.split(f"\n{names} = [")[1].split("]")[0].split(","):
            fake_shard_set(tmp_path / "data" / name.strip().strip('"\n '))
    assert "Required macros: none" in text.split("\n\n")[0]
    ft = load_config([str(REPO / "gin" / "pixmo_finetune_elastic.gin")], params)
    assert (ft.elastic.mode, ft.elastic.ks, ft.elastic.n_sampled, ft.elastic.renorm) == ("sandwich", KS, 1, True)
    assert ft.model.init_from == str(tmp_path / "init") and ft.train.run_dir == "runs/pixmo_finetune_elastic"
    released = MolmoEConfig.from_name("molmoe-1b")
    KSampler(ft.elastic, released.llm.n_layers, released.moe.top_k)
    gin.clear_config()  # the recipe's bindings would reach the gin-configurable dataclasses of later tests

# ---------------------------------------------------------------------------- in the trainer (tiny model, CLI runs)
# Records, for every MoE forward (activation-checkpoint recomputes included), the layer and the number of active
# experts of its tokens, computed from the routing output itself.
RECORD_K = """
import json, os, sys
from molmo_fast.model import moe
forward, layers = moe.MoE.forward, {}
log = open(os.environ["K_LOG"], "a")
def recording_forward(self, x_BSD, top_k, token_kind_BS):
    y, logits, idx = forward(self, x_BSD, top_k, token_kind_BS)
    layer = layers.setdefault(id(self), len(layers))
    active_T, kind_T = (idx >= 0).sum(-1), token_kind_BS.reshape(-1)
    by_kind = {moe.TOKEN_KINDS[c]: active_T[kind_T == c].unique().tolist() for c in (0, 1)}
    log.write(json.dumps([layer, by_kind]) + "\\n")
    log.flush()
    return y, logits, idx
moe.MoE.forward = recording_forward
from molmo_fast.train.__main__ import main
main(sys.argv[1:])
"""
NO_DROPOUT = {"ModelConfig.hf_overrides": "{'vocab_size': 50280, 'embedding_size': 50304, 'residual_dropout': 0.0}"}
TINY_LAYERS, TINY_TOP_K = 2, 2  # the tiny preset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from molmo_fast.data.sources.synthetic import ensure_synthetic_shards

    out = tmp_path_factory.mktemp("data") / "synthetic_charts"
    ensure_synthetic_shards(out, "synthetic_charts", 64, seed=0, shard_size=16)
    return out


def _elastic(mode: str, ks, **more) -> dict:
    out = {"ElasticConfig.mode": repr(mode), "ElasticConfig.ks": repr(list(ks))}
    out.update({f"ElasticConfig.{k}": repr(v) for k, v in more.items()})
    return out


def _metric(run_dir, name: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in rows if name in r}


def test_the_moe_layers_run_the_drawn_k_in_every_pass_and_recompute(tmp_path, shards, monkeypatch):
    """sample_per_layer + a sampled image budget, with accumulation and activation checkpointing: each MoE forward,
    and its recompute in backward, routes every text token to exactly the k the seeded sampler drew for that step
    and layer, and every image token to the smaller of that k and the drawn image budget."""
    cfg = ElasticConfig(mode="sample_per_layer", ks=(1, 2), kind_ks={"image": [1, 2]}, seed=5)
    monkeypatch.setenv("K_LOG", str(tmp_path / "k.jsonl"))
    _run(_args(tmp_path / "run", shards, **{"TrainConfig.max_steps": 4, "TrainConfig.activation_checkpointing": True},
               **_elastic("sample_per_layer", (1, 2), kind_ks={"image": [1, 2]}, seed=5)), script=RECORD_K)
    seen = [tuple(json.loads(line)) for line in (tmp_path / "k.jsonl").read_text().splitlines()]
    sampler, expected = KSampler(cfg, TINY_LAYERS, TINY_TOP_K), []
    for step in range(1, 5):
        (p,) = sampler.passes(step)
        image_k = dict(p.kinds)["image"]
        for _micro in range(2):  # global batch 4 = micro-batch 2 x 2 accumulation
            forward = [(layer, {"text": [k], "image": [min(k, image_k)]}) for layer, k in enumerate(p.top_k)]
            expected += forward + forward[::-1]  # the backward recomputes the blocks last to first
    assert seen == expected
    draws = [sampler.passes(s)[0] for s in range(1, 5)]
    assert len({p.top_k for p in draws}) > 1 and len({p.kinds for p in draws}) > 1  # k really changed
    assert _metric(tmp_path / "run", "train/top_k/layer1") == {s: p.top_k[1] for s, p in enumerate(draws, 1)}
    assert _metric(tmp_path / "run", "train/top_k_image") == {s: dict(p.kinds)["image"] for s, p in enumerate(draws, 1)}


def test_sandwich_averages_the_losses_of_its_passes(tmp_path, shards):
    """Step 1 (same weights in every run): the sandwich's loss at each k equals a fixed-k run's loss, and the step's
    loss is the mean over its passes (largest, smallest, sampled)."""
    steps = {"TrainConfig.max_steps": 1, **NO_DROPOUT}
    _run(_args(tmp_path / "sandwich", shards, **steps, **_elastic("sandwich", (1, 2), n_sampled=1, seed=3)))
    fixed = {}
    for k in (1, 2):
        _run(_args(tmp_path / f"k{k}", shards, **steps, **_elastic("fixed", (k,))))
        fixed[k] = _losses(tmp_path / f"k{k}")[1]
    assert abs(fixed[1] - fixed[2]) > 1e-4  # the tolerance below tells the two apart
    run = tmp_path / "sandwich"
    for k in (1, 2):
        assert _metric(run, f"train/loss_k{k}")[1] == pytest.approx(fixed[k], abs=1e-5)
    passes = KSampler(ElasticConfig(mode="sandwich", ks=(1, 2), seed=3), TINY_LAYERS, TINY_TOP_K).passes(1)
    assert _losses(run)[1] == pytest.approx(sum(fixed[p.top_k[0]] for p in passes) / 3, abs=1e-5)
    assert _metric(run, "train/top_k")[1] == pytest.approx(sum(p.k for p in passes) / 3)


@pytest.mark.distributed
def test_kill_9_then_resume_repeats_the_sampled_run(tmp_path, shards):
    def args(run):
        return _args(run, shards, **_elastic("sample", (1, 2), seed=9))

    _run(args(tmp_path / "reference"))
    proc = _run(args(tmp_path / "killed"), script=KILL_AT_STEP.format(step=5), check=False)
    assert proc.returncode == -signal.SIGKILL and max(_losses(tmp_path / "killed")) == 4
    _run(args(tmp_path / "killed") + ["--resume", "latest", "--gin_param", "ElasticConfig.seed = 1"])
    for name in ("train/loss", "train/top_k"):
        assert _metric(tmp_path / "killed", name) == _metric(tmp_path / "reference", name), name
    assert len(set(_metric(tmp_path / "reference", "train/top_k").values())) == 2


@pytest.mark.distributed
def test_two_ranks_sample_the_same_k_and_match_one_process(tmp_path, shards):
    sampling = {"TrainConfig.max_steps": 4, **NO_DROPOUT, **_elastic("sample", (1, 2), seed=4)}
    _run(_args(tmp_path / "one", shards, **sampling))
    _run(_args(tmp_path / "two", shards, **sampling), nproc=2)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)
    expected = {s: float(KSampler(ElasticConfig(mode="sample", ks=(1, 2), seed=4), 2, 2).passes(s)[0].top_k[0])
                for s in a}
    assert _metric(tmp_path / "two", "train/top_k") == _metric(tmp_path / "one", "train/top_k") == expected
    assert len(set(expected.values())) == 2


def test_changing_k_between_passes_never_recompiles_compiled_blocks():
    from torch._dynamo.testing import CompileCounter

    from molmo_fast.model.molmoe import MolmoE
    from molmo_fast.train.elastic import apply

    mcfg = MolmoEConfig.from_name("tiny")
    model = MolmoE.from_config_on_meta(mcfg).init_weights(seed=0).train()
    counter = CompileCounter()
    for block in model.llm.blocks:  # as parallelize(compile_blocks=True) does, with a counting backend
        block.forward = torch.compile(block.forward, backend=counter)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    sampler = KSampler(ElasticConfig(mode="sample_per_layer", ks=(1, 2), seed=1), TINY_LAYERS, TINY_TOP_K)
    seen = set()
    for step in range(1, 9):
        for p in sampler.passes(step):
            apply(model, p)
            model(input_ids=ids).logits.sum().backward()
            seen.add(p.top_k)
            if step == 1:
                frames = counter.frame_count
    assert len(seen) > 2 and counter.frame_count == frames >= 1


def test_sandwich_step_trains_on_the_mean_of_its_passes_gradients(tmp_path):
    """train_step with three passes (k = 2, 1, 1) applies the mean of the gradients each k alone gives, reports each
    pass's loss and their mean, and leaves the model at its own k."""
    import torch.distributed as dist
    from test_train_step import _cfg, _model, _rows, _split

    from molmo_fast import knobs
    from molmo_fast.runtime.device import Env
    from molmo_fast.runtime.loss import loss_positions
    from molmo_fast.train.optim import build_optimizer
    from molmo_fast.train.trainer import micro_batch_loss, train_step

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg, env = _cfg(tmp_path), Env(0, 1, torch.device("cpu"))
        cfg.elastic = ElasticConfig(mode="sandwich", ks=(1, 2), n_sampled=1)
        cfg.optim.max_grad_norm = 1e9  # compare the raw gradients, not clipped ones
        passes = [Pass((2, 2)), Pass((1, 1)), Pass((1, 1))]
        model = _model()
        optimizer, groups = build_optimizer(model, cfg.optim)
        used = {}
        optimizer.step = lambda: used.update({n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None})
        out = train_step(model, optimizer, groups, _split(_rows(4), 2), 1, cfg, env, passes=passes)
        assert [b.moe.k for b in model.llm.blocks] == [TINY_TOP_K] * TINY_LAYERS

        reference = _model()
        micro = _split(_rows(4), 2)
        for b in micro:
            b.update(loss_positions(b))
        divisor = sum(b["loss_tokens"] for b in micro)
        grads, losses = {}, {}
        for k in (1, 2):
            knobs.set_top_k(reference, k)
            reference.zero_grad()
            total = sum(micro_batch_loss(reference, b, divisor, cfg.train.lm_zloss_weight, 2, False)[0] for b in micro)
            total.backward()
            losses[k] = float(total.detach())
            grads[k] = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
    finally:
        dist.destroy_process_group()
    assert out.pass_losses == pytest.approx([losses[2], losses[1], losses[1]], rel=1e-5)
    assert out.losses["loss"] == pytest.approx((losses[2] + 2 * losses[1]) / 3, rel=1e-5)
    assert "llm.lm_head.weight" in used and used.keys() <= grads[1].keys()  # (the frozen embedding has none)
    assert not torch.allclose(grads[1]["llm.lm_head.weight"],
                                                                  grads[2]["llm.lm_head.weight"])
    for name, g in used.items():
        torch.testing.assert_close(g, (grads[2][name] + 2 * grads[1][name]) / 3, rtol=1e-4, atol=1e-7)
