"""Training building blocks in-process: gin config resolution and errors, LR schedule, param groups, clipping."""

import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from molmo_fast.train.config import OptimConfig, load_config
from molmo_fast.train.optim import build_optimizer, clip_grad_norms, lr_at, param_group, set_learning_rates

REPO = Path(__file__).resolve().parents[1]


def fake_shard_set(path: Path) -> Path:
    """What the config check looks at: shard files listed by a sizes.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "shard-000000.tar").write_bytes(b"")
    (path / "sizes.json").write_text('{"shard-000000.tar": 1}')
    return path


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    return fake_shard_set(tmp_path_factory.mktemp("data") / "a")


# What a recipe supplies on top of a mixin (tiny.gin, molmoe_1b.gin): the fields without defaults.
RECIPE = ["TrainConfig.max_steps = 10", "TrainConfig.global_batch_size = 8",
          "OptimConfig.lr = {'vit': 1e-3, 'connector': 1e-3, 'llm': 1e-3}",
          "OptimConfig.warmup = {'vit': 1, 'connector': 1, 'llm': 1}"]
LR, WARMUP = {"vit": 1.0, "connector": 2.0, "llm": 3.0}, {"vit": 0, "connector": 4, "llm": 0}


@pytest.fixture
def BASE(shard_set) -> list[str]:
    return ["TrainConfig.run_dir = '/tmp/unused'", f"DataConfig.shards = {{'a': '{shard_set}'}}", *RECIPE]


def test_config_resolves_to_plain_picklable_dataclasses(BASE):
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
    ("ModelConfig.init_from = '/nonexistent/ckpt'", "ModelConfig.init_from"),
    ("ModelConfig.init_scheme = 'xavier'", "ModelConfig.init_scheme"),
    ("TrainConfig.eval_every = 5", "in-loop validation.*EvalConfig.tasks is required"),
    ("TrainConfig.eval_every = -1", "TrainConfig.eval_every"),
])
def test_bad_binding_fails_at_load_naming_it(binding, named, BASE):
    with pytest.raises(SystemExit, match=named):
        load_config([str(REPO / "gin" / "tiny.gin")], BASE + [binding])


def test_in_loop_validation_tasks_are_checked_at_load(BASE, tmp_path):
    every = "TrainConfig.eval_every = 5"
    with pytest.raises(SystemExit, match="TrainConfig.eval_tasks = 'chart_qa'.*python -m molmo_fast.data.build"):
        load_config([str(REPO / "gin" / "tiny.gin")], BASE + [every, "TrainConfig.eval_tasks = 'chart_qa'",
                                                              f"TrainConfig.eval_data_dir = '{tmp_path}'"])
    with pytest.raises(SystemExit, match="unknown eval task 'chartqa'"):
        load_config([str(REPO / "gin" / "tiny.gin")], BASE + [every, "TrainConfig.eval_tasks = 'chartqa'"])
    cfg = load_config([str(REPO / "gin" / "tiny.gin")], BASE + [every, "TrainConfig.eval_tasks = 'synthetic'"])
    assert cfg.train.eval_every == 5  # synthetic sets are generated when first needed


def test_mixture_settings_that_the_mixture_would_reject_fail_at_load(BASE, shard_set):
    two_sets = f"DataConfig.shards = {{'a': '{shard_set}', 'b': '{shard_set}'}}"
    for binding, named in (("DataConfig.rates = {'a': 1.0}", "DataConfig.rates"),
                           ("DataConfig.rates = {'a': 0.0, 'b': 0.0}", "DataConfig.rates"),
                           ("DataConfig.groups = {'x': (1.0, ['a', 'b']), 'y': (1.0, ['b'])}", "DataConfig.groups"),
                           ("DataConfig.size_overrides = {'c': 10}", "DataConfig.size_overrides")):
        with pytest.raises(SystemExit, match=named):
            load_config([str(REPO / "gin" / "tiny.gin")], BASE + [two_sets, binding])
    cfg = load_config([str(REPO / "gin" / "tiny.gin")], BASE + [two_sets, "DataConfig.rates = {'a': 1.0, 'b': 0.0}"])
    assert cfg.data.rates == {"a": 1.0, "b": 0.0}


def test_cli_bad_binding_fails_before_training(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "molmo_fast.train", "--gin_file", "gin/demo.gin", "--gin_param",
                           f"RUN_DIR = '{run_dir}'", "--gin_param", "TrainConfig.lerning_rate = 1e-3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "lerning_rate" in proc.stderr
    assert not run_dir.exists()  # nothing was started


def test_bad_model_override_is_named(BASE):
    cfg = load_config([str(REPO / "gin" / "tiny.gin")], BASE + ["ModelConfig.hf_overrides = {'d_modle': 8}"])
    with pytest.raises(ValueError, match="d_modle"):
        cfg.model.build_config()


@pytest.mark.parametrize("name", ["demo", "tiny", "molmoe_1b", "pixmo", "pixmo_finetune"])
def test_every_gin_file_parses_and_lists_its_macros(name, BASE, tmp_path):
    text = (REPO / "gin" / f"{name}.gin").read_text()
    header = text.split("\n\n")[0]
    assert text.startswith("#") and "Required macros" in header
    required = re.findall(r"^(\w+) = %gin.REQUIRED$", text, re.M)
    assert ("Required macros: none" in header) == (not required)
    for macro in required:  # each one named in the header, and not binding it fails naming it
        assert f"#   {macro}:" in header
        with pytest.raises(SystemExit, match=rf"gin macro {macro} is required"):
            load_config([str(REPO / "gin" / f"{name}.gin")], ["RUN_DIR = '/tmp/unused'"])
    # Recipes bind the run dir through RUN_DIR; model/size mixins leave run dir and data to the recipe.
    params = ["RUN_DIR = '/tmp/unused'"] if re.search(r"^TrainConfig.run_dir =", text, re.M) else BASE
    if name == "pixmo":
        params.append(f"PIXMO_CAP_SHARDS = '{fake_shard_set(tmp_path / 'pixmo_cap')}'")
    if name == "pixmo_finetune":
        (tmp_path / "init").mkdir()
        (tmp_path / "init" / "config.json").write_text("{}")
        for macro in ("DEMO", "AUX", "POINTING"):
            for set_name in re.search(rf"^{macro} = \[(.*?)\]", text, re.M | re.S).group(1).split(","):
                fake_shard_set(tmp_path / "data" / set_name.strip().strip('"'))
        params += [f"FINETUNE_SHARDS_ROOT = '{tmp_path / 'data'}'", f"INIT_CHECKPOINT = '{tmp_path / 'init'}'"]
    cfg = load_config([str(REPO / "gin" / f"{name}.gin")], params)
    assert cfg.train.global_batch_size > 0
    if name in ("pixmo", "pixmo_finetune"):
        assert cfg.model.preset == "molmoe-1b"  # the include resolved


@pytest.mark.parametrize("recipe, field, default", [("pixmo", "DataConfig.shards['pixmo_cap']", "data/pixmo_cap"),
                                                     ("pixmo_finetune", "DataConfig.shards['vqa_v2']", "data/vqa_v2")])
def test_recipe_defaults_fail_fast_naming_the_missing_shards_from_any_cwd(tmp_path, recipe, field, default):
    """The users' exact command (the header's), run where nothing was built (and outside the repo, so includes
    must resolve through the gin directory): it stops at config time, before a run dir or a model exists."""
    args = ["--gin_file", str(REPO / "gin" / f"{recipe}.gin")]
    if recipe == "pixmo_finetune":
        (tmp_path / "runs" / "pixmo" / "hf").mkdir(parents=True)
        (tmp_path / "runs" / "pixmo" / "hf" / "config.json").write_text("{}")
        args += ["--gin_param", "INIT_CHECKPOINT = 'runs/pixmo/hf'"]
    proc = subprocess.run([sys.executable, "-m", "molmo_fast.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert field in proc.stderr and repr(default) in proc.stderr
    source = default.split("/")[1]
    assert f"python -m molmo_fast.data.build --source {source} --out {default}" in proc.stderr
    assert "Path not found" not in proc.stderr  # gin's search-path misses stay quiet
    assert not (tmp_path / "runs" / recipe).exists()


@pytest.mark.parametrize("breakage", ["missing", "empty", "stale"])
def test_a_shard_set_that_is_not_built_is_named_at_load(tmp_path, breakage):
    path = tmp_path / "caps"
    if breakage != "missing":
        path.mkdir()
    if breakage == "stale":  # sizes.json lists a shard that is gone (an interrupted rebuild)
        (path / "sizes.json").write_text('{"shard-000000.tar": 3}')
    good = fake_shard_set(tmp_path / "good")
    params = ["RUN_DIR = '/tmp/unused'", f"DataConfig.shards = {{'good': '{good}', 'pixmo_cap': '{path}'}}"]
    with pytest.raises(SystemExit, match=r"DataConfig.shards\['pixmo_cap'\]") as info:
        load_config([str(REPO / "gin" / "demo.gin")], params)
    assert str(path) in str(info.value) and f"--source pixmo_cap --out {path}" in str(info.value)
    assert "'good'" not in str(info.value)


def test_includes_resolve_from_any_cwd(tmp_path, monkeypatch):
    """A user's gin file elsewhere includes a repo recipe by name and a sibling file by its relative name."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "extra.gin").write_text("TrainConfig.max_steps = 3\n")
    (tmp_path / "conf" / "mine.gin").write_text("include 'demo.gin'\ninclude 'extra.gin'\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(["../conf/mine.gin"], ["RUN_DIR = 'runs/x'"])
    assert cfg.train.max_steps == 3  # the sibling include
    assert cfg.data.sequence_length == 48 and cfg.model.preset == "tiny"  # demo.gin and its own include
    with pytest.raises(SystemExit, match="nothing_like_this.gin"):
        load_config(["../conf/mine.gin", "nothing_like_this.gin"])


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
    cfg = OptimConfig(lr=LR, warmup=WARMUP)
    model = _Toy()
    assert param_group("llm.wte.new_embedding", cfg) == "connector"
    opt, groups = build_optimizer(model, cfg)
    assert not model.llm.wte.embedding.requires_grad  # Molmo freezes the base token table
    assert {g: len(ps) for g, ps in groups.items()} == {"vit": 2, "connector": 3, "llm": 2}
    lrs = set_learning_rates(opt, 2, 100, 0.1)
    assert lrs["connector"] == pytest.approx(1.0) and lrs["vit"] == pytest.approx(1.0 * (0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * 2 / 100))))
    with pytest.raises(ValueError, match="match no parameter"):
        build_optimizer(_Toy(), OptimConfig(lr=LR, warmup=WARMUP, freeze=("nothing.here",)))


def test_clipping_is_per_component():
    cfg = OptimConfig(lr=LR, warmup=WARMUP)
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
    from molmo_fast.runtime.loss import loss_positions
    from molmo_fast.train.trainer import micro_batch_loss

    mcfg = MolmoEConfig.from_name("tiny")
    mcfg.moe.load_balancing_weight = lb_weight
    mcfg.dropout.residual = 0.0  # the reference forward below must see the same network
    model = MolmoE.from_config_on_meta(mcfg).init_weights(seed=0).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 12), generator=g)
    loss_masks = torch.zeros(2, 12)
    loss_masks[0, 8:] = 1.0
    loss_masks[1, 5:7] = 0.5  # fractional weights (e.g. root-subsegment weighting) count as weights
    batch = {"input_ids": ids, "labels": ids, "loss_masks": loss_masks}
    batch.update(loss_positions(batch))
    assert batch["loss_at"].shape == (2, 4) and float(batch["loss_tokens"]) == pytest.approx(5.0)
    loss, parts, _ = micro_batch_loss(model, batch, torch.tensor(10.0), 0.25, n_micro=2, want_router=False)

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


def _tiny_model(**init):
    from molmo_fast.config import MolmoEConfig
    from molmo_fast.model.molmoe import MolmoE

    return MolmoE.from_config_on_meta(MolmoEConfig.from_name("tiny")).init_weights(seed=0, **init)


def test_fan_in_init_scheme_changes_only_vit_and_connector_linears():
    default, fan_in = _tiny_model().state_dict(), _tiny_model(scheme="fan_in")
    changed = {k for k, v in fan_in.state_dict().items() if not torch.equal(v, default[k])}
    assert changed and all(k.startswith(("vit.", "connector.")) and k.endswith(".weight") for k in changed)
    w = fan_in.connector.projector.w2.weight  # the SwiGLU output projection that starves at std 0.02
    assert w.std().item() == pytest.approx(w.shape[1] ** -0.5, rel=0.2)
    with pytest.raises(ValueError, match="scheme"):
        _tiny_model(scheme="xavier")


def test_training_forward_returns_no_views():
    """FSDP2 warns (and can skip the pre-backward all-gather under in-place ops) when a sharded module returns a
    view; the root returns the logits and the image features."""
    model = _tiny_model().train()
    cfg = model.config
    tokens = model.connector.tokens_per_crop
    images = torch.randn(2, 2, cfg.vision.num_patches, cfg.vision.patch_dim)
    idx = torch.arange(2 * tokens).view(1, 2, tokens).expand(2, -1, -1).contiguous()
    out = model(input_ids=torch.randint(0, 100, (2, 2 * tokens + 4)), images=images, image_input_idx=idx,
                image_masks=torch.ones(2, 2, cfg.vision.num_patches), logits_at=torch.zeros(2, 1, dtype=torch.long))
    assert out.image_features.shape == (2, 2, tokens, cfg.llm.d_model)
    assert out.image_features._base is None and out.logits._base is None


def test_flops_count_lm_head_per_loss_position_and_no_embedding():
    from molmo_fast.train.metrics import FlopCounter

    model = _tiny_model()
    count = FlopCounter(model)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count.n_llm + numel(model.vit) + count.n_connector + count.n_head + numel(model.llm.wte) == \
        model.num_parameters(active=True)
    unused = model.vit.blocks[max(model.vit_layer_idx) + 1:]  # blocks after the deepest one the connector reads
    assert count.n_vit == numel(model.vit) - sum(numel(b) for b in unused)
    assert count(1, 16, 0, 5) - count(1, 16, 0, 0) == 30 * model.llm.lm_head.weight.numel()
    per_crop = count(1, 16, 1, 0) - count(1, 16, 0, 0)
    assert count(1, 16, 3, 0) - count(1, 16, 0, 0) == pytest.approx(3 * per_crop)
    assert per_crop > 6 * count.n_vit * model.config.vision.num_patches


def test_resume_purges_metrics_past_the_checkpoint_and_a_line_cut_by_kill_9(tmp_path):
    import json

    from molmo_fast.train.metrics import MetricsLogger

    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 4, "train/lo')
    logger = MetricsLogger(tmp_path, enabled=True, purge_step=3)
    logger.log(3, {"train/loss": 0.5})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["train/loss"] == 0.5


def test_saving_after_a_resume_from_an_earlier_checkpoint_drops_the_abandoned_newer_ones(tmp_path):
    import torch.distributed as dist

    from molmo_fast.runtime.checkpoints import checkpoint_dirs, find_checkpoint
    from molmo_fast.train.checkpoint import save_checkpoint

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Linear(2, 2)
        opt = torch.optim.AdamW(model.parameters())
        for step in (2, 4, 6):
            save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2)
        assert [s for s, _ in checkpoint_dirs(tmp_path)] == [4, 6]
        # Resumed from step_4 (a rollback) and saved step 5: a later `--resume latest` must come back to step 5.
        save_checkpoint(tmp_path, 5, model, opt, {}, keep_last=2)
        assert [s for s, _ in checkpoint_dirs(tmp_path)] == [4, 5]
        assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_5"
    finally:
        dist.destroy_process_group()


def test_fsdp_reduces_gradients_only_on_the_last_micro_batch_with_unchanged_numerics():
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from molmo_fast.train.trainer import gradient_sync_steps

    micro_batches = [{"x": torch.randn(3, 4, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    for i, batch in gradient_sync_steps(plain, micro_batches, defer=True):  # not FSDP-wrapped: the batches, in order
        assert batch is micro_batches[i]
        plain(batch["x"]).square().sum().backward()

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
        model.load_state_dict(plain.state_dict())
        fully_shard(model, mesh=dist.init_device_mesh("cpu", (1,)))
        flags = []
        set_sync = model.set_requires_gradient_sync

        def spy(requires_gradient_sync, **kwargs):
            flags.append(requires_gradient_sync)
            set_sync(requires_gradient_sync, **kwargs)

        model.set_requires_gradient_sync = spy
        model.zero_grad()
        for _, batch in gradient_sync_steps(model, micro_batches, defer=False):  # the default: FSDP's own sync
            model(batch["x"]).square().sum().backward()
        assert flags == []
        for p_plain, p_fsdp in zip(plain.parameters(), model.parameters()):
            torch.testing.assert_close(p_fsdp.grad.full_tensor(), p_plain.grad, rtol=0, atol=1e-6)
        for _ in range(2):  # the flag is set again for every step, not only the first
            model.zero_grad()
            for _, batch in gradient_sync_steps(model, micro_batches, defer=True):
                model(batch["x"]).square().sum().backward()
        assert flags == [False, False, True] * 2
        for p_plain, p_fsdp in zip(plain.parameters(), model.parameters()):
            torch.testing.assert_close(p_fsdp.grad.full_tensor(), p_plain.grad, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()
