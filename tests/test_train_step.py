"""The trainer's step function on its own: a plain (unsharded) tiny MolmoE in a one-process gloo group."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from molmo_fast import knobs
from molmo_fast.config import MolmoEConfig
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.runtime.device import Env
from molmo_fast.train.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from molmo_fast.train.optim import build_optimizer
from molmo_fast.train.trainer import TrainingDiverged, router_stats, train_step


@pytest.fixture(scope="module", autouse=True)
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _cfg(tmp_path) -> Config:
    lr = {"vit": 1e-3, "connector": 1e-3, "llm": 1e-3}
    return Config(model=ModelConfig(), data=DataConfig(synthetic={"synthetic_charts": 8}),
                  optim=OptimConfig(lr=lr, warmup={"vit": 1, "connector": 1, "llm": 1}),
                  train=TrainConfig(run_dir=str(tmp_path), max_steps=10, global_batch_size=4, micro_batch_size=2))


def _model() -> MolmoE:
    mcfg = MolmoEConfig.from_name("tiny")
    mcfg.dropout.residual = 0.0  # two models must see the same network
    return MolmoE.from_config_on_meta(mcfg).init_weights(seed=0).train()


def _rows(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (n, 12), generator=g)
    loss_masks = torch.zeros(n, 12)
    loss_masks[:, 6:] = 1.0
    loss_masks[0, 6:9] = 0.0  # rows with different loss-token counts: the divisor must be the global count
    return {"input_ids": ids, "labels": ids, "loss_masks": loss_masks}


def _split(batch: dict, parts: int) -> list[dict]:
    n = len(batch["input_ids"]) // parts
    return [{k: v[i * n:(i + 1) * n] for k, v in batch.items()} for i in range(parts)]


def test_accumulated_micro_batches_step_like_one_batch(tmp_path):
    cfg, env = _cfg(tmp_path), Env(0, 1, torch.device("cpu"))
    a, b = _model(), _model()
    opt_a, groups_a = build_optimizer(a, cfg.optim)
    opt_b, groups_b = build_optimizer(b, cfg.optim)
    out_a = train_step(a, opt_a, groups_a, _split(_rows(4), 2), 1, cfg, env)
    out_b = train_step(b, opt_b, groups_b, _split(_rows(4), 1), 1, cfg, env)
    assert out_a.loss_tokens == out_b.loss_tokens == 21.0 and out_a.tokens == 48
    assert out_a.losses["loss"] == pytest.approx(out_b.losses["loss"], rel=1e-5)
    assert out_a.grad_norms["total"] == pytest.approx(out_b.grad_norms["total"], rel=1e-4)
    assert 0.0 <= out_a.losses["correct"] <= 1.0 and set(out_a.lrs) == {"vit", "connector", "llm"}
    before = _model().state_dict()
    changed = [k for k, v in a.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the optimizer stepped
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-4, atol=1e-6)


def test_a_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    cfg, env = _cfg(tmp_path), Env(0, 1, torch.device("cpu"))
    model = _model()
    with torch.no_grad():
        model.llm.lm_head.weight[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    optimizer, groups = build_optimizer(model, cfg.optim)
    with pytest.raises(TrainingDiverged, match="step 3: non-finite loss"):
        train_step(model, optimizer, groups, _split(_rows(4), 2), 3, cfg, env)
    assert not optimizer.state  # no Adam step was taken
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all(), k


def test_router_stats_route_as_each_layer_does():
    model = _model()
    knobs.set_top_k(model, 1)  # one expert per token: the expert load is the router's argmax histogram
    batch = _rows(2)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], output_router_logits=True)
    stats = router_stats(model, out.router_logits, batch)
    expected = []
    for logits_TE in out.router_logits:
        load_E = torch.bincount(logits_TE.argmax(-1), minlength=logits_TE.shape[-1]).float()
        expected.append(float((load_E / load_E.sum()).max()))
    assert stats["moe/max_expert_frac"] == pytest.approx(sum(expected) / len(expected), rel=1e-6)


def test_validation_generates_with_the_sharded_training_model_and_leaves_it_training(tmp_path):
    from molmo_fast.runtime.parallelize import parallelize
    from molmo_fast.train.config import load_config
    from molmo_fast.train.data import write_preprocessor_dir
    from molmo_fast.train.validation import validate

    repo = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    cfg = load_config([str(repo / "gin" / "tiny.gin")], [
        f"TrainConfig.run_dir = '{run_dir}'", "DataConfig.synthetic = {'synthetic_charts': 8}",
        "TrainConfig.max_steps = 4", "TrainConfig.global_batch_size = 2", "TrainConfig.eval_every = 2",
        "TrainConfig.eval_tasks = 'synthetic_charts'", "TrainConfig.eval_max_examples = 3",
        "TrainConfig.eval_batch_size = 2", f"TrainConfig.eval_data_dir = '{tmp_path / 'eval_data'}'",
        "OptimConfig.lr = {'vit': 1e-3, 'connector': 1e-3, 'llm': 1e-3}",
        "OptimConfig.warmup = {'vit': 1, 'connector': 1, 'llm': 1}"])
    write_preprocessor_dir(cfg.data, run_dir / "preprocessor")
    model = MolmoE.from_config_on_meta(cfg.model.build_config()).init_weights(seed=0)
    parallelize(model, torch.device("cpu"), bf16=False, activation_checkpointing=False, compile_blocks=False)
    model.train()
    scalars = validate(model, cfg, Env(0, 1, torch.device("cpu")), run_dir, step=2)
    assert model.training
    task_dir = run_dir / "eval" / "step_2" / "synthetic_charts"
    rows = [json.loads(line) for line in (task_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["prediction"], str) for r in rows)
    score = sum(r["score"]["relaxed_correctness"] for r in rows) / 3
    assert scalars["eval/synthetic_charts/relaxed_correctness"] == pytest.approx(score)
