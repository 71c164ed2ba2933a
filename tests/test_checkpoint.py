import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from molmo_fast.config import MolmoEConfig
from molmo_fast.model.hf_checkpoint import INDEX_FILE
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.model.native_checkpoint import NATIVE_DOWN, NATIVE_GATE, to_native_state_dict


@pytest.fixture(scope="module")
def tiny_dir(golden_dir):
    return golden_dir / "tiny_model"


@pytest.fixture(scope="module")
def model(tiny_dir):
    return MolmoE.from_pretrained(tiny_dir)


def assert_same_weights(a: MolmoE, b: MolmoE):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_loads_everything_off_meta(model):
    assert not any(t.is_meta for t in model.state_dict().values())
    assert not any(b.is_meta for b in model.buffers())
    moe = model.llm.blocks[0].moe
    E, H, D = model.config.moe.num_experts, model.config.moe.hidden_size, model.config.llm.d_model
    assert moe.w_gate_up.shape == (E, 2 * H, D) and moe.w_down.shape == (E, D, H)
    assert isinstance(moe.w_gate_up, torch.nn.Parameter) and not model.training


def test_expert_stacking_matches_hf_keys(model, tiny_dir):
    hf = load_file(tiny_dir / "model.safetensors")
    moe = model.llm.blocks[1].moe
    H = model.config.moe.hidden_size
    for e in (0, model.config.moe.num_experts - 1):
        prefix = f"model.transformer.blocks.1.mlp.experts.{e}."
        assert torch.equal(moe.w_gate_up[e, :H], hf[prefix + "gate_proj.weight"])
        assert torch.equal(moe.w_gate_up[e, H:], hf[prefix + "up_proj.weight"])
        assert torch.equal(moe.w_down[e], hf[prefix + "down_proj.weight"])


def test_save_writes_reference_layout(model, tiny_dir, tmp_path):
    model.save_pretrained(tmp_path)
    original, saved = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert original.keys() == saved.keys()
    for k in original:
        assert torch.equal(original[k], saved[k]), k
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((tiny_dir / "config.json").read_text())
    assert json.loads((tmp_path / "generation_config.json").read_text()) == \
        json.loads((tiny_dir / "generation_config.json").read_text())


def test_round_trip_bit_identical(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert_same_weights(model, MolmoE.from_pretrained(tmp_path))


def test_sharded_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size=200_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / s).stat().st_size <= 200_000 + 64_000 for s in shards)  # + header, one big tensor
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    again = MolmoE.from_pretrained(tmp_path)
    assert_same_weights(model, again)
    again.save_pretrained(tmp_path / "again", max_shard_size="200KB")
    assert_same_weights(model, MolmoE.from_pretrained(tmp_path / "again"))
    model.save_pretrained(tmp_path)  # re-saving unsharded over a sharded export leaves no stale shards
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]
    assert_same_weights(model, MolmoE.from_pretrained(tmp_path))


def test_dtype_and_device_on_load(tiny_dir):
    m = MolmoE.from_pretrained(tiny_dir, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    out = m(torch.tensor([[999, 5, 7, 9]]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def _copy_with(tiny_dir, tmp_path, edit):
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    tensors = load_file(tiny_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_missing_key_is_named(tiny_dir, tmp_path):
    key = "model.transformer.blocks.1.mlp.experts.3.up_proj.weight"
    path = _copy_with(tiny_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        MolmoE.from_pretrained(path)


def test_leftover_key_is_named(tiny_dir, tmp_path):
    path = _copy_with(tiny_dir, tmp_path, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model\.extra\.weight"):
        MolmoE.from_pretrained(path)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    key = "model.transformer.blocks.0.attn.att_proj.weight"
    path = _copy_with(tiny_dir, tmp_path, lambda t: t.update({key: t[key][:-1]}))
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r".*shape"):
        MolmoE.from_pretrained(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny_dir, tmp_path, value):
    key = "model.transformer.blocks.1.mlp.experts.5.down_proj.weight"

    def poison(t):
        t[key] = t[key].clone()
        t[key][0, 0] = value

    path = _copy_with(tiny_dir, tmp_path, poison)
    with pytest.raises(ValueError, match=re.escape(f"model.safetensors: tensor {key!r} holds 1 NaN / inf values")):
        MolmoE.from_pretrained(path)


def test_integer_weights_are_refused_naming_the_tensor(tiny_dir, tmp_path):
    key = "lm_head.weight"
    path = _copy_with(tiny_dir, tmp_path, lambda t: t.update({key: t[key].to(torch.int64)}))
    with pytest.raises(ValueError, match=re.escape(f"tensor {key!r} has dtype torch.int64, expected a floating")):
        MolmoE.from_pretrained(path, dtype=torch.float32)


def test_native_non_finite_weights_are_refused(model, tiny_dir):
    native = to_native_state_dict(model.state_dict())
    native["transformer.ln_f.weight"] = torch.full_like(native["transformer.ln_f.weight"], float("nan"))
    with pytest.raises(ValueError, match=r"'transformer\.ln_f\.weight' holds \d+ NaN"):
        MolmoE.from_native(native, MolmoEConfig.from_hf_json(tiny_dir))


def test_truncated_safetensors_and_bad_json_name_the_file(tiny_dir, tmp_path):
    path = _copy_with(tiny_dir, tmp_path, lambda t: None)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        MolmoE.from_pretrained(path)
    (path / "model.safetensors").write_bytes(data)
    (path / "generation_config.json").write_text('{"eos_token_id": 1,')
    with pytest.raises(ValueError, match=r"generation_config\.json: cannot read the generation config"):
        MolmoE.from_pretrained(path)
    (path / "generation_config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"generation_config\.json: the generation config must be a JSON object"):
        MolmoE.from_pretrained(path)


def test_native_layout_import(model, tiny_dir):
    native = to_native_state_dict(model.state_dict())
    E, H, D = model.config.moe.num_experts, model.config.moe.hidden_size, model.config.llm.d_model
    assert native[NATIVE_GATE.format(0)].shape == (E * H, D)
    hf = load_file(tiny_dir / "model.safetensors")
    # megablocks w2 holds down_proj transposed, expert e in rows e*H:(e+1)*H
    assert torch.equal(native[NATIVE_DOWN.format(1)][2 * H: 3 * H],
                       hf["model.transformer.blocks.1.mlp.experts.2.down_proj.weight"].t())
    assert "transformer.ff_out.weight" in native and "vision_backbone.pad_embed" in native
    config = MolmoEConfig.from_hf_json(tiny_dir / "config.json")
    loaded = MolmoE.from_native({k: v.clone() for k, v in native.items()}, config)
    assert_same_weights(model, loaded)
    ids = torch.tensor([[999, 3, 1030, 1100, 42]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    native["transformer.blocks.0.ffn.experts.bias"] = torch.zeros(1)
    with pytest.raises(ValueError, match="ffn.experts.bias"):
        MolmoE.from_native(native, config)


def test_native_from_file(model, tiny_dir, tmp_path):
    torch.save(to_native_state_dict(model.state_dict()), tmp_path / "model.pt")
    loaded = MolmoE.from_native(tmp_path / "model.pt", MolmoEConfig.from_hf_json(tiny_dir), dtype=torch.float32)
    assert_same_weights(model, loaded)


def test_init_weights_from_meta():
    cfg = MolmoEConfig.from_name("tiny")
    a = MolmoE.from_config_on_meta(cfg).init_weights(seed=3)
    b = MolmoE.from_config_on_meta(cfg).init_weights(seed=3)
    assert_same_weights(a, b)
    assert torch.equal(a.llm.blocks[0].attn_norm.weight, torch.ones(cfg.llm.d_model))
    assert a.llm.blocks[0].moe.w_gate_up.std().item() == pytest.approx(0.02, rel=0.15)
    assert int(a.llm.blocks[0].moe.top_k) == cfg.moe.top_k
    # FSDP-style materialisation: meta -> to_empty -> load weights; the runtime top-k buffer must survive.
    c = MolmoE.from_config_on_meta(cfg)
    c.llm.blocks[1].moe.set_top_k(1)
    c.to_empty(device="cpu")
    c.load_state_dict(a.state_dict())
    assert [int(b.moe.top_k) for b in c.llm.blocks] == [cfg.moe.top_k, 1]
    out = a(torch.tensor([[999, 4, 5]]))
    assert torch.isfinite(out.logits).all()
