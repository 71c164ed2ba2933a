"""Initialise MolmoE from parts, as Molmo's pre-training does: the LLM from an HF OLMoE checkpoint
(`allenai/OLMoE-1B-7B-0924` layout) and the ViT from an HF CLIP checkpoint (`openai/clip-vit-large-patch14-336`
layout). The connector and `wte.new_embedding` keep their fresh init.

One explicit key map per format (`{}` = layer index). Every tensor of the source is consumed or listed as
dropped; a leftover, missing or wrongly shaped tensor is an error naming it. CLIP's layers past the model's
`num_layers` are dropped (MolmoE keeps 23 of CLIP's 24).
"""

import re
from pathlib import Path

import torch
from torch import nn

from molmo_fast.model.hf_checkpoint import SafetensorsReader, match_template

_L = "model.layers.{}."
OLMOE_KEY_MAP: dict[str, str] = {
    "llm.wte.embedding": "model.embed_tokens.weight",
    "llm.blocks.{}.attn_norm.weight": _L + "input_layernorm.weight",
    "llm.blocks.{}.attn.out.weight": _L + "self_attn.o_proj.weight",
    "llm.blocks.{}.attn.q_norm.weight": _L + "self_attn.q_norm.weight",
    "llm.blocks.{}.attn.k_norm.weight": _L + "self_attn.k_norm.weight",
    "llm.blocks.{}.ffn_norm.weight": _L + "post_attention_layernorm.weight",
    "llm.blocks.{}.moe.router.weight": _L + "mlp.gate.weight",
    "llm.ln_f.weight": "model.norm.weight",
    "llm.lm_head.weight": "lm_head.weight",
}
# Ours <- several OLMoE tensors concatenated along dim 0 (per expert for the stacked expert weights).
OLMOE_CONCAT_MAP: dict[str, tuple[str, ...]] = {
    "llm.blocks.{}.attn.qkv.weight": (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight",
                                      _L + "self_attn.v_proj.weight"),
}
OLMOE_EXPERT_MAP: dict[str, tuple[str, ...]] = {
    "llm.blocks.{}.moe.w_gate_up": (_L + "mlp.experts.{}.gate_proj.weight", _L + "mlp.experts.{}.up_proj.weight"),
    "llm.blocks.{}.moe.w_down": (_L + "mlp.experts.{}.down_proj.weight",),
}

_C = "vision_model."
_CL = _C + "encoder.layers.{}."
CLIP_KEY_MAP: dict[str, str] = {
    "vit.class_embedding": _C + "embeddings.class_embedding",
    "vit.positional_embedding": _C + "embeddings.position_embedding.weight",
    "vit.pre_ln.weight": _C + "pre_layrnorm.weight",  # sic: the HF CLIP spelling
    "vit.pre_ln.bias": _C + "pre_layrnorm.bias",
}
for ours, theirs in (("attn_norm", "layer_norm1"), ("mlp_norm", "layer_norm2"), ("attn.wq", "self_attn.q_proj"),
                     ("attn.wk", "self_attn.k_proj"), ("attn.wv", "self_attn.v_proj"),
                     ("attn.wo", "self_attn.out_proj"), ("mlp.w1", "mlp.fc1"), ("mlp.w2", "mlp.fc2")):
    for leaf in ("weight", "bias"):
        CLIP_KEY_MAP[f"vit.blocks.{{}}.{ours}.{leaf}"] = _CL + f"{theirs}.{leaf}"
CLIP_PATCH = (_C + "embeddings.patch_embedding.weight", "vit.patch_embedding.weight")
# Tensors of a CLIP checkpoint that MolmoE has no use for (text tower, heads, the final norm).
CLIP_DROPPED = re.compile(r"^(text_model\.|text_projection|visual_projection|logit_scale|vision_model\.post_layernorm"
                          r"|vision_model\.embeddings\.position_ids)")


def _olmoe_state(model: nn.Module, reader) -> tuple[dict[str, torch.Tensor], set[str]]:
    state, used = {}, set()
    for name, param in model.state_dict().items():
        if not name.startswith("llm.") or name == "llm.wte.new_embedding":
            continue
        template, idx = match_template(name, [*OLMOE_KEY_MAP, *OLMOE_CONCAT_MAP, *OLMOE_EXPERT_MAP])
        if template in OLMOE_KEY_MAP:
            keys = [OLMOE_KEY_MAP[template].format(*idx)]
            tensor = reader.get(keys[0])
        elif template in OLMOE_CONCAT_MAP:
            keys = [t.format(*idx) for t in OLMOE_CONCAT_MAP[template]]
            tensor = torch.cat([reader.get(k) for k in keys])
        else:
            keys, per_expert = [], []
            for e in range(param.shape[0]):
                expert_keys = [t.format(*idx, e) for t in OLMOE_EXPERT_MAP[template]]
                keys += expert_keys
                per_expert.append(torch.cat([reader.get(k) for k in expert_keys]))
            tensor = torch.stack(per_expert)
        state[name] = tensor
        used.update(keys)
    return state, used


def _clip_state(model: nn.Module, reader) -> tuple[dict[str, torch.Tensor], set[str]]:
    state, used = {}, set()
    num_layers = len(model.vit.blocks)
    for name in model.state_dict():
        if not name.startswith("vit."):
            continue
        if name == CLIP_PATCH[1]:
            # CLIP's conv kernel [C, 3, p, p] -> our linear over patches flattened as (dy, dx, rgb).
            conv = reader.get(CLIP_PATCH[0])
            state[name] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)
            used.add(CLIP_PATCH[0])
            continue
        template, idx = match_template(name, CLIP_KEY_MAP)
        key = CLIP_KEY_MAP[template].format(*idx)
        state[name] = reader.get(key)
        used.add(key)
    layer = re.compile(re.escape(_C) + r"encoder\.layers\.(\d+)\.")
    for key in reader.keys():
        m = layer.match(key)
        if m and int(m.group(1)) >= num_layers:
            used.add(key)  # layers past the ones MolmoE keeps
    return state, used


@torch.no_grad()
def load_parts(model: nn.Module, llm_from: str | Path | None = None, vit_from: str | Path | None = None) -> None:
    """Copies the OLMoE LLM and/or CLIP ViT weights into `model` (materialised, on CPU) in place."""
    own = model.state_dict()
    for path, build, dropped in ((llm_from, _olmoe_state, None), (vit_from, _clip_state, CLIP_DROPPED)):
        if path is None:
            continue
        reader = SafetensorsReader(path)
        state, used = build(model, reader)
        leftover = sorted(k for k in reader.keys() - used if not (dropped and dropped.match(k)))
        if leftover:
            raise ValueError(f"{path}: unused tensors {leftover[:5]}{' ...' if len(leftover) > 5 else ''} "
                             f"({len(leftover)} in all): not the expected checkpoint layout or model size")
        for name, tensor in state.items():
            if tensor.shape != own[name].shape:
                raise ValueError(f"{path}: {name} has shape {list(tensor.shape)} in the checkpoint, the model "
                                 f"expects {list(own[name].shape)}")
            own[name].copy_(tensor.to(own[name].dtype))
