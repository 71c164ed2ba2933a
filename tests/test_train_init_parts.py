"""Initialising MolmoE from an HF OLMoE LLM + an HF CLIP ViT (Molmo's pre-training init)."""

import pytest
import torch
from safetensors.torch import save_file

from molmo_fast.config import MolmoEConfig
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.train.init_parts import load_parts


def _olmoe_files(src: MolmoE) -> dict[str, torch.Tensor]:
    """`src`'s LLM written the way transformers' OlmoeForCausalLM names it (one tensor per expert and projection)."""
    sd, d = src.state_dict(), src.config.llm.d_model
    out = {"model.embed_tokens.weight": sd["llm.wte.embedding"], "model.norm.weight": sd["llm.ln_f.weight"],
           "lm_head.weight": sd["llm.lm_head.weight"]}
    for i in range(src.config.llm.n_layers):
        b, L = f"llm.blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].split(d)
        out.update({L + "self_attn.q_proj.weight": q, L + "self_attn.k_proj.weight": k,
                    L + "self_attn.v_proj.weight": v, L + "self_attn.o_proj.weight": sd[b + "attn.out.weight"],
                    L + "self_attn.q_norm.weight": sd[b + "attn.q_norm.weight"],
                    L + "self_attn.k_norm.weight": sd[b + "attn.k_norm.weight"],
                    L + "input_layernorm.weight": sd[b + "attn_norm.weight"],
                    L + "post_attention_layernorm.weight": sd[b + "ffn_norm.weight"],
                    L + "mlp.gate.weight": sd[b + "moe.router.weight"]})
        for e, (gate_up, down) in enumerate(zip(sd[b + "moe.w_gate_up"], sd[b + "moe.w_down"])):
            gate, up = gate_up.chunk(2)
            out.update({L + f"mlp.experts.{e}.gate_proj.weight": gate, L + f"mlp.experts.{e}.up_proj.weight": up,
                        L + f"mlp.experts.{e}.down_proj.weight": down})
    return {k: v.clone().contiguous() for k, v in out.items()}


def _clip_files(src: MolmoE) -> dict[str, torch.Tensor]:
    """`src`'s ViT in HF CLIPModel names, plus one extra layer and a text tower that MolmoE must drop."""
    sd, v = src.state_dict(), src.config.vision
    p = v.patch_size
    conv = sd["vit.patch_embedding.weight"].view(v.emb_dim, p, p, 3).permute(0, 3, 1, 2)
    out = {"vision_model.embeddings.class_embedding": sd["vit.class_embedding"],
           "vision_model.embeddings.position_embedding.weight": sd["vit.positional_embedding"],
           "vision_model.embeddings.patch_embedding.weight": conv,
           "vision_model.pre_layrnorm.weight": sd["vit.pre_ln.weight"],
           "vision_model.pre_layrnorm.bias": sd["vit.pre_ln.bias"],
           "vision_model.post_layernorm.weight": torch.ones(v.emb_dim),
           "text_model.embeddings.token_embedding.weight": torch.zeros(4, 8), "logit_scale": torch.ones(())}
    names = {"attn_norm": "layer_norm1", "mlp_norm": "layer_norm2", "attn.wq": "self_attn.q_proj",
             "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.out_proj",
             "mlp.w1": "mlp.fc1", "mlp.w2": "mlp.fc2"}
    for i in range(v.num_layers + 1):
        for ours, theirs in names.items():
            for leaf in ("weight", "bias"):
                key = f"vit.blocks.{min(i, v.num_layers - 1)}.{ours}.{leaf}"
                out[f"vision_model.encoder.layers.{i}.{theirs}.{leaf}"] = sd[key]
    return {k: v.clone().contiguous() for k, v in out.items()}


def test_llm_and_vit_come_from_their_checkpoints_connector_stays(tmp_path):
    cfg = MolmoEConfig.from_name("tiny")
    src = MolmoE.from_config_on_meta(cfg).init_weights(seed=1)
    (tmp_path / "olmoe").mkdir()
    (tmp_path / "clip").mkdir()
    save_file(_olmoe_files(src), tmp_path / "olmoe" / "model.safetensors")
    save_file(_clip_files(src), tmp_path / "clip" / "model.safetensors")

    model = MolmoE.from_config_on_meta(cfg).init_weights(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_parts(model, llm_from=tmp_path / "olmoe", vit_from=tmp_path / "clip")
    after, want = model.state_dict(), src.state_dict()
    for name in after:
        if name.startswith("connector.") or name == "llm.wte.new_embedding":
            assert torch.equal(after[name], before[name]), name  # random init kept
        else:
            assert torch.equal(after[name], want[name]), name

    # The patch-embedding permutation is right: same ViT output as the source model.
    crops = torch.randn(2, cfg.vision.num_patches, cfg.vision.patch_dim)
    with torch.no_grad():
        assert torch.allclose(model.vit(crops, num_layers=cfg.vision.num_layers)[-1],
                              src.vit(crops, num_layers=cfg.vision.num_layers)[-1])


def test_unexpected_tensors_are_an_error_naming_them(tmp_path):
    cfg = MolmoEConfig.from_name("tiny")
    src = MolmoE.from_config_on_meta(cfg).init_weights(seed=1)
    files = _olmoe_files(src)
    files["model.layers.0.mlp.shared_expert.weight"] = torch.zeros(2, 2)
    (tmp_path / "olmoe").mkdir()
    save_file(files, tmp_path / "olmoe" / "model.safetensors")
    with pytest.raises(ValueError, match="shared_expert"):
        load_parts(MolmoE.from_config_on_meta(cfg).init_weights(seed=2), llm_from=tmp_path / "olmoe")
