import json

import pytest

from molmo_fast.config import ASSETS, DropoutConfig, MolmoEConfig

REAL = ASSETS / "molmoe-1b" / "config.json"


def test_real_config_numbers():
    cfg = MolmoEConfig.from_hf_json(REAL)
    assert (cfg.llm.d_model, cfg.llm.n_layers, cfg.llm.n_heads, cfg.llm.n_kv_heads) == (2048, 16, 16, 16)
    assert cfg.llm.head_dim == 128
    assert (cfg.llm.vocab_size, cfg.llm.embedding_size, cfg.llm.additional_vocab_size) == (50280, 50304, 128)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.hidden_size) == (64, 8, 1024)
    assert (cfg.moe.load_balancing_weight, cfg.moe.z_loss_weight, cfg.moe.normalize_weights) == (0.0, 0.0, False)
    assert cfg.vision.num_layers == 23 and cfg.vision.emb_dim == 1024 and cfg.vision.patch_grid == (24, 24)
    assert cfg.connector.vit_layers == (-2, -9) and cfg.connector.max_crops == 12
    assert cfg.llm.rope_theta == 10000.0 and cfg.llm.norm_eps == 1e-5


@pytest.mark.parametrize("path", [REAL, "golden"])
def test_round_trip_is_exact(path, golden_dir, tmp_path):
    path = golden_dir / "tiny_model" / "config.json" if path == "golden" else path
    cfg = MolmoEConfig.from_hf_json(path)
    cfg.to_hf_json(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(path.read_text())
    assert MolmoEConfig.from_hf_json(tmp_path) == cfg


def test_presets(golden_dir):
    assert MolmoEConfig.from_name("molmoe-1b") == MolmoEConfig.from_hf_json(REAL)
    tiny = MolmoEConfig.from_name("tiny")
    golden = MolmoEConfig.from_hf_json(golden_dir / "tiny_model" / "config.json")
    for part in ("vision", "connector", "llm", "moe"):
        assert getattr(tiny, part) == getattr(golden, part)
    with pytest.raises(ValueError, match="unknown preset"):
        MolmoEConfig.from_name("molmoe-7b")


def test_dropout_rates(tmp_path):
    cfg = MolmoEConfig.from_hf_json(REAL)
    assert cfg.dropout == DropoutConfig(residual=0.1)  # the release's training dropout
    cfg.dropout.response_residual, cfg.dropout.image_feature = 0.1, 0.2
    cfg.to_hf_json(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["response_residual_dropout"], written["image_feature_dropout"]) == (0.1, 0.2)
    assert MolmoEConfig.from_hf_json(tmp_path).dropout == cfg.dropout
    d = json.loads(REAL.read_text())
    for key in ("residual_dropout", "attention_dropout", "embedding_dropout"):
        del d[key]
    assert MolmoEConfig.from_hf_dict(d).dropout == DropoutConfig()  # absent = off, and not written back
    assert "residual_dropout" not in MolmoEConfig.from_hf_dict(d).to_hf_dict()
    d["vision_backbone"]["residual_dropout"] = 0.1  # the ViT's own dropout is not implemented
    with pytest.raises(ValueError, match=r"vision_backbone\.residual_dropout"):
        MolmoEConfig.from_hf_dict(d)


def test_gqa_and_edits_round_trip(tmp_path):
    d = json.loads(REAL.read_text())
    d["n_kv_heads"] = 4
    cfg = MolmoEConfig.from_hf_dict(d)
    assert cfg.llm.n_kv_heads == 4
    cfg.moe.top_k = 4
    cfg.to_hf_json(tmp_path / "config.json")
    again = MolmoEConfig.from_hf_json(tmp_path / "config.json")
    assert again.llm.n_kv_heads == 4 and again.moe.top_k == 4


def _write(tmp_path, **edits):
    d = json.loads(REAL.read_text())
    for key, value in edits.items():
        if value is KeyError:
            del d[key]
        else:
            d[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("edits, needles", [
    (dict(d_model=KeyError), ["'d_model'", "missing"]),
    (dict(d_model="big"), ["'d_model'", "'big'", "int"]),
    (dict(n_layers=0), ["'n_layers'", "0", "positive"]),
    (dict(layer_norm_type="default"), ["'layer_norm_type'", "'default'", "'rms'"]),
    (dict(rope_impl="cockatoo"), ["'rope_impl'", "'cockatoo'", "'llama'"]),
    (dict(n_kv_heads=3), ["'n_kv_heads'", "3", "divisor"]),
    (dict(moe_top_k=65), ["'moe_top_k'", "65", "moe_num_experts"]),
    (dict(vit_layers=[-2, -30]), ["'vit_layers'", "-30"]),
    (dict(weight_tying=True), ["'weight_tying'", "True", "False"]),
    (dict(residual_dropout=1.0), ["'residual_dropout'", "1.0", "[0, 1)"]),
    (dict(attention_dropout="some"), ["'attention_dropout'", "'some'", "float"]),
    (dict(response_attention_dropout=0.1), ["'response_attention_dropout'", "0.1", "0.0"]),
])
def test_bad_fields_name_field_file_value(tmp_path, edits, needles):
    path = _write(tmp_path, **edits)
    with pytest.raises(ValueError) as err:
        MolmoEConfig.from_hf_json(path)
    msg = str(err.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg


def test_bad_vision_field(tmp_path):
    d = json.loads(REAL.read_text())
    d["vision_backbone"]["image_mlp_activations"] = "gelu"
    with pytest.raises(ValueError, match=r"vision_backbone\.image_mlp_activations.*'gelu'.*'quick_gelu'"):
        MolmoEConfig.from_hf_dict(d, source="x.json")


def test_typecheck_matches_annotations():
    from typing import Any

    from molmo_fast.typecheck import matches, type_name

    assert matches(1, float) and not matches(True, int) and not matches(1, bool) and not matches("1", int)
    assert matches([1, 2], tuple[int, int]) and not matches((1,), tuple[int, int]) and matches((), tuple[int, ...])
    assert matches({"a": 1}, dict[str, int]) and not matches({"a": "1"}, dict[str, int]) and matches({1: 2}, dict)
    assert matches(None, int | None) and matches(["x"], str | list[str]) and not matches([1], str | list[str])
    assert matches(object(), Any) and not matches(None, str)
    assert type_name(int | list[int] | None) == "int or list[int] or None"
    assert type_name(tuple[int, ...]) == "tuple[int, ...]"
