"""Training building blocks in-process: gin config resolution and errors, LR schedule, param groups, clipping."""

import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from molmo_fast.train.config import OptimConfig, load_config
from molmo_fast.train.optim import build_optimizer, clip_grad_norms, lr_at, param_group, set_learning_rates

REPO = Path(__file__).resolve().parents[1]
BASE = ["TrainConfig.run_dir = '/tmp/unused'", "DataConfig.shards = {'a': '/tmp/a'}"]


def test_config_resolves_to_plain_picklable_dataclasses():
    cfg = load_config([str(REPO / "gin" / "tiny.gin")], BASE + ["TrainConfig.max_steps = 7"])
    assert cfg.train.max_steps == 7 and cfg.data.sequence_length == 256
    clone = pickle.loads(pickle.dumps(cfg))  # what DataLoader workers receive under spawn
    assert clone.to_dict() == cfg.to_dict()
    assert cfg.model.build_config().llm.vocab_size == 50280
    assert "TrainConfig.max_steps = 7" in cfg.gin_config


@pytest.mark.parametrize("binding, named", [
    ("TrainConfig.bogus_field = 1", "bogus_field"),
    ("NoSuchThing.x = 1", "NoSuchThing"),
    ("TrainConfig.max_steps = 0", "TrainConfig.max_steps"),
    ("OptimConfig.lr = {'vit': 1.0}", "OptimConfig.lr"),
])
def test_bad_binding_fails_at_load_naming_it(binding, named):
    with pytest.raises(SystemExit, match=named):
        load_config([str(REPO / "gin" / "tiny.gin")], BASE + [binding])


def test_cli_bad_binding_fails_before_training(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "molmo_fast.train", "--gin_file", "gin/demo.gin", "--gin_param",
                           f"RUN_DIR = '{run_dir}'", "--gin_param", "TrainConfig.lerning_rate = 1e-3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "lerning_rate" in proc.stderr
    assert not run_dir.exists()  # nothing was started


def test_bad_model_override_is_named():
    cfg = load_config([str(REPO / "gin" / "tiny.gin")], BASE + ["ModelConfig.hf_overrides = {'d_modle': 8}"])
    with pytest.raises(ValueError, match="d_modle"):
        cfg.model.build_config()


@pytest.mark.parametrize("name", ["demo", "tiny", "molmoe_1b", "pixmo", "pixmo_finetune"])
def test_every_gin_file_parses_and_lists_its_macros(name):
    text = (REPO / "gin" / f"{name}.gin").read_text()
    assert text.startswith("#") and "Required macros" in text.split("\n\n")[0]
    macros = {"PIXMO_CAP_SHARDS": "'/tmp/pixmo'", "FINETUNE_SHARDS_ROOT": "'/tmp/ft'",
              "INIT_CHECKPOINT": "'/tmp/init'", "RUN_DIR": "'/tmp/unused'"}
    params = [f"{k} = {v}" for k, v in macros.items() if f"{k} = %gin.REQUIRED" in text]
    if "TrainConfig.run_dir" not in text:  # model/size mixins: the recipe supplies data and run dir
        params += BASE
    cfg = load_config([str(REPO / "gin" / f"{name}.gin")], params)
    assert cfg.train.global_batch_size > 0


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    peak, warmup, total = 2e-4, 10, 110
    assert lr_at(1, peak, warmup, total, 0.1) == pytest.approx(peak / 10)
    assert lr_at(warmup, peak, warmup, total, 0.1) == pytest.approx(peak)
    assert lr_at(60, peak, warmup, total, 0.1) == pytest.approx(0.1 * peak + 0.9 * peak * 0.5)
    assert lr_at(total, peak, warmup, total, 0.1) == pytest.approx(0.1 * peak)
    values = [lr_at(s, peak, warmup, total, 0.1) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


class _Toy(nn.Module):
    """Parameter names shaped like MolmoE's: vit.*, connector.*, llm.* (with the frozen base embedding)."""

    def __init__(self):
        super().__init__()
        self.vit = nn.Linear(4, 4)
        self.connector = nn.Linear(4, 4)
        self.llm = nn.Module()
        self.llm.wte = nn.Module()
        self.llm.wte.embedding = nn.Parameter(torch.ones(3, 4))
        self.llm.wte.new_embedding = nn.Parameter(torch.ones(2, 4))
        self.llm.head = nn.Linear(4, 4)


def test_param_groups_freezing_and_per_group_lr():
    cfg = OptimConfig(lr={"vit": 1.0, "connector": 2.0, "llm": 3.0}, warmup={"vit": 0, "connector": 4, "llm": 0})
    model = _Toy()
    assert param_group("llm.wte.new_embedding", cfg) == "connector"
    opt, groups = build_optimizer(model, cfg)
    assert not model.llm.wte.embedding.requires_grad  # Molmo freezes the base token table
    assert {g: len(ps) for g, ps in groups.items()} == {"vit": 2, "connector": 3, "llm": 2}
    lrs = set_learning_rates(opt, 2, 100, 0.1)
    assert lrs["connector"] == pytest.approx(1.0) and lrs["vit"] == pytest.approx(1.0 * (0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * 2 / 100))))
    with pytest.raises(ValueError, match="match no parameter"):
        build_optimizer(_Toy(), OptimConfig(freeze=("nothing.here",)))


def test_clipping_is_per_component():
    cfg = OptimConfig()
    model = _Toy()
    _, groups = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0) if p is model.vit.weight else torch.full_like(p, 1e-3)
    norms = clip_grad_norms(groups, max_norm=1.0)
    assert norms["vit"] == pytest.approx(40.0)
    # Only the exploding component was scaled; the others keep their (small) gradients.
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in groups["vit"]])) == pytest.approx(1.0, rel=1e-4)
    assert model.connector.weight.grad[0, 0].item() == pytest.approx(1e-3)


@pytest.mark.parametrize("lb_weight", [0.0, 0.5])
def test_loss_is_normalised_by_the_divisor_and_adds_moe_aux_only_when_weighted(lb_weight):
    from molmo_fast.config import MolmoEConfig
    from molmo_fast.model.molmoe import MolmoE
    from molmo_fast.train.trainer import micro_batch_loss

    mcfg = MolmoEConfig.from_name("tiny")
    mcfg.moe.load_balancing_weight = lb_weight
    mcfg.dropout.residual = 0.0  # the reference forward below must see the same network
    model = MolmoE.from_config_on_meta(mcfg).init_weights(seed=0).train()
    cfg = load_config([str(REPO / "gin" / "tiny.gin")], BASE + ["TrainConfig.lm_zloss_weight = 0.25"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 12), generator=g)
    loss_masks = torch.zeros(2, 12)
    loss_masks[0, 8:] = 1.0
    loss_masks[1, 5:7] = 0.5  # fractional weights (e.g. root-subsegment weighting) count as weights
    batch = {"input_ids": ids, "labels": ids, "loss_masks": loss_masks}
    loss, parts, _ = micro_batch_loss(model, batch, torch.tensor(10.0), cfg, n_micro=2, want_router=False)

    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(2, 12)
    assert parts["lm_loss"] == pytest.approx(float((ce * loss_masks).sum() / 10.0), rel=1e-5)
    expected = parts["lm_loss"] + 0.25 * parts["zloss"]
    if lb_weight:
        assert parts["moe_aux_loss"] > 0
        expected = expected + parts["moe_aux_loss"]
    else:
        assert "moe_aux_loss" not in parts
    assert loss.detach().item() == pytest.approx(float(expected), rel=1e-5)


def test_fan_in_vision_init_touches_only_vit_and_connector_linears():
    from molmo_fast.config import MolmoEConfig
    from molmo_fast.model.molmoe import MolmoE
    from molmo_fast.train.trainer import fan_in_init

    model = MolmoE.from_config_on_meta(MolmoEConfig.from_name("tiny")).init_weights(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fan_in_init(model, ("vit.", "connector."), seed=0)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(("vit.", "connector.")) and k.endswith(".weight") for k in changed)
    w = model.connector.projector.w2.weight  # the SwiGLU output projection that starves at std 0.02
    assert w.std().item() == pytest.approx(w.shape[1] ** -0.5, rel=0.2)
