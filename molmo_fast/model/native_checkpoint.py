"""The allenai/molmo native checkpoint layout (megablocks MoE) <-> molmo_fast names.

Native experts are concatenated along dim 0: `ffn.experts.mlp.w1` / `v1` [E*H, D] hold gate_proj / up_proj of
expert e in rows e*H:(e+1)*H, and `w2` [E*H, D] holds down_proj TRANSPOSED ([H, D] per expert).
"""

from pathlib import Path

import torch

from molmo_fast.model.hf_checkpoint import HF_KEY_MAP, CheckpointMismatchError, match_template

_B = "transformer.blocks.{}."
NATIVE_KEY_MAP: dict[str, str] = {
    # The vision tower and connector are stored as in HF, without the leading "model.".
    **{ours: hf.removeprefix("model.") for ours, hf in HF_KEY_MAP.items() if hf.startswith("model.vision_backbone.")},
    "llm.wte.embedding": "transformer.wte.embedding",
    "llm.wte.new_embedding": "transformer.wte.new_embedding",
    "llm.blocks.{}.attn_norm.weight": _B + "attn_norm.weight",
    "llm.blocks.{}.attn.qkv.weight": _B + "att_proj.weight",
    "llm.blocks.{}.attn.q_norm.weight": _B + "q_norm.weight",
    "llm.blocks.{}.attn.k_norm.weight": _B + "k_norm.weight",
    "llm.blocks.{}.attn.out.weight": _B + "attn_out.weight",
    "llm.blocks.{}.ffn_norm.weight": _B + "ff_norm.weight",
    "llm.blocks.{}.moe.router.weight": _B + "ffn.router.layer.weight",
    "llm.ln_f.weight": "transformer.ln_f.weight",
    "llm.lm_head.weight": "transformer.ff_out.weight",
}
NATIVE_GATE, NATIVE_UP, NATIVE_DOWN = _B + "ffn.experts.mlp.w1", _B + "ffn.experts.mlp.v1", _B + "ffn.experts.mlp.w2"
_EXPERT_PARAMS = ("llm.blocks.{}.moe.w_gate_up", "llm.blocks.{}.moe.w_down")


def _read(source: str | Path | dict) -> dict[str, torch.Tensor]:
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def load_native_state_dict(param_shapes: dict[str, torch.Size], source: str | Path | dict, dtype=None,
                           device=None) -> dict[str, torch.Tensor]:
    native = _read(source)
    device = torch.device(device or "cpu")

    def take(key: str, want_shape) -> torch.Tensor:
        if key not in native:
            raise CheckpointMismatchError(f"native checkpoint is missing tensor {key!r}")
        t = native.pop(key)
        if tuple(t.shape) != tuple(want_shape):
            raise CheckpointMismatchError(
                f"native tensor {key!r} has shape {list(t.shape)}, expected {list(want_shape)}")
        return t.to(device=device, dtype=dtype or t.dtype)

    state = {}
    for name, shape in param_shapes.items():
        template, groups = match_template(name, list(NATIVE_KEY_MAP) + list(_EXPERT_PARAMS))
        if template in NATIVE_KEY_MAP:
            state[name] = take(NATIVE_KEY_MAP[template].format(*groups), shape)
        elif template.endswith("w_gate_up"):
            E, H2, D = shape
            gate = take(NATIVE_GATE.format(*groups), (E * H2 // 2, D)).view(E, H2 // 2, D)
            up = take(NATIVE_UP.format(*groups), (E * H2 // 2, D)).view(E, H2 // 2, D)
            state[name] = torch.cat([gate, up], dim=1)
        else:
            E, D, H = shape
            down_t = take(NATIVE_DOWN.format(*groups), (E * H, D)).view(E, H, D)
            state[name] = down_t.transpose(1, 2).contiguous()
    if native:
        raise CheckpointMismatchError(f"native checkpoint has {len(native)} tensors with no place in the model, "
                                      f"e.g. {sorted(native)[:5]}")
    return state


def to_native_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the native layout (the inverse of `load_native_state_dict`)."""
    native = {}
    for name, tensor in state.items():
        template, groups = match_template(name, list(NATIVE_KEY_MAP) + list(_EXPERT_PARAMS))
        if template in NATIVE_KEY_MAP:
            native[NATIVE_KEY_MAP[template].format(*groups)] = tensor
        elif template.endswith("w_gate_up"):
            E, H2, D = tensor.shape
            gate, up = tensor.chunk(2, dim=1)
            native[NATIVE_GATE.format(*groups)] = gate.reshape(E * H2 // 2, D)
            native[NATIVE_UP.format(*groups)] = up.reshape(E * H2 // 2, D)
        else:
            E, D, H = tensor.shape
            native[NATIVE_DOWN.format(*groups)] = tensor.transpose(1, 2).reshape(E * H, D)
    return native
