"""The HF MolmoE checkpoint layout (`allenai/MolmoE-1B-0924` remote code) <-> molmo_fast parameter names.

One explicit key map, `{}` = layer index. Experts are stored per expert in HF and stacked here:
`w_gate_up [E, 2H, D]` = cat(gate_proj, up_proj) rows per expert, `w_down [E, D, H]` = down_proj per expert.
Loading is lazy (safetensors `safe_open`, tensor by tensor); every HF tensor must be consumed exactly once.
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_V = "model.vision_backbone."
_VIT = _V + "image_vit."
_RB = _VIT + "transformer.resblocks.{}."
_B = "model.transformer.blocks.{}."

HF_KEY_MAP: dict[str, str] = {
    "vit.class_embedding": _VIT + "class_embedding",
    "vit.positional_embedding": _VIT + "positional_embedding",
    "vit.patch_embedding.weight": _VIT + "patch_embedding.weight",
    "vit.pre_ln.weight": _VIT + "pre_ln.weight",
    "vit.pre_ln.bias": _VIT + "pre_ln.bias",
    "vit.blocks.{}.attn_norm.weight": _RB + "attention_norm.weight",
    "vit.blocks.{}.attn_norm.bias": _RB + "attention_norm.bias",
    "vit.blocks.{}.attn.wq.weight": _RB + "attention.wq.weight",
    "vit.blocks.{}.attn.wq.bias": _RB + "attention.wq.bias",
    "vit.blocks.{}.attn.wk.weight": _RB + "attention.wk.weight",
    "vit.blocks.{}.attn.wk.bias": _RB + "attention.wk.bias",
    "vit.blocks.{}.attn.wv.weight": _RB + "attention.wv.weight",
    "vit.blocks.{}.attn.wv.bias": _RB + "attention.wv.bias",
    "vit.blocks.{}.attn.wo.weight": _RB + "attention.wo.weight",
    "vit.blocks.{}.attn.wo.bias": _RB + "attention.wo.bias",
    "vit.blocks.{}.mlp_norm.weight": _RB + "ffn_norm.weight",
    "vit.blocks.{}.mlp_norm.bias": _RB + "ffn_norm.bias",
    "vit.blocks.{}.mlp.w1.weight": _RB + "feed_forward.w1.weight",
    "vit.blocks.{}.mlp.w1.bias": _RB + "feed_forward.w1.bias",
    "vit.blocks.{}.mlp.w2.weight": _RB + "feed_forward.w2.weight",
    "vit.blocks.{}.mlp.w2.bias": _RB + "feed_forward.w2.bias",
    "connector.pad_embed": _V + "pad_embed",
    "connector.pool.wq.weight": _V + "image_pooling_2d.wq.weight",
    "connector.pool.wq.bias": _V + "image_pooling_2d.wq.bias",
    "connector.pool.wk.weight": _V + "image_pooling_2d.wk.weight",
    "connector.pool.wk.bias": _V + "image_pooling_2d.wk.bias",
    "connector.pool.wv.weight": _V + "image_pooling_2d.wv.weight",
    "connector.pool.wv.bias": _V + "image_pooling_2d.wv.bias",
    "connector.pool.wo.weight": _V + "image_pooling_2d.wo.weight",
    "connector.pool.wo.bias": _V + "image_pooling_2d.wo.bias",
    "connector.projector.w1.weight": _V + "image_projector.w1.weight",
    "connector.projector.w2.weight": _V + "image_projector.w2.weight",
    "connector.projector.w3.weight": _V + "image_projector.w3.weight",
    "llm.wte.embedding": "model.transformer.wte.embedding",
    "llm.wte.new_embedding": "model.transformer.wte.new_embedding",
    "llm.blocks.{}.attn_norm.weight": _B + "attn.attn_norm.weight",
    "llm.blocks.{}.attn.qkv.weight": _B + "attn.att_proj.weight",
    "llm.blocks.{}.attn.q_norm.weight": _B + "attn.q_norm.weight",
    "llm.blocks.{}.attn.k_norm.weight": _B + "attn.k_norm.weight",
    "llm.blocks.{}.attn.out.weight": _B + "attn.attn_out.weight",
    "llm.blocks.{}.ffn_norm.weight": _B + "mlp.ff_norm.weight",
    "llm.blocks.{}.moe.router.weight": _B + "mlp.gate.weight",
    "llm.ln_f.weight": "model.transformer.ln_f.weight",
    "llm.lm_head.weight": "lm_head.weight",
}
# Stacked expert tensors: per expert, the listed HF tensors (second `{}` = expert) concatenated along dim 0.
HF_EXPERT_MAP: dict[str, tuple[str, ...]] = {
    "llm.blocks.{}.moe.w_gate_up": (_B + "mlp.experts.{}.gate_proj.weight", _B + "mlp.experts.{}.up_proj.weight"),
    "llm.blocks.{}.moe.w_down": (_B + "mlp.experts.{}.down_proj.weight",),
}


class CheckpointMismatchError(KeyError, ValueError):
    """A checkpoint tensor is missing, left over or mis-shaped (catchable as KeyError or ValueError)."""

    __str__ = Exception.__str__  # KeyError would quote the whole message


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def check_weight(t: torch.Tensor, name: str, source: str | Path) -> None:
    """Every parameter is a float: an integer tensor or a NaN / inf value is a broken checkpoint, refused by name
    before it can turn every output into NaN."""
    if not t.is_floating_point():
        raise CheckpointMismatchError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected a floating-point "
                                      f"dtype")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointMismatchError(f"{source}: tensor {name!r} holds {bad} NaN / inf values of {t.numel()}")


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object file of a checkpoint; errors name the file and what it is for."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the {what} ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _open(path: Path):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:  # e.g. a truncated download: the header promises more than the file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def match_template(key: str, templates) -> tuple[str, tuple[str, ...]]:
    """The template in `templates` that `key` instantiates, with the values of its `{}` placeholders."""
    for template in templates:
        m = re.fullmatch(re.escape(template).replace(r"\{\}", r"(\d+)"), key)
        if m:
            return template, m.groups()
    raise KeyError(f"parameter {key!r} has no entry in the checkpoint key map")


class SafetensorsReader:
    """Lazy access to `model.safetensors` or an indexed set of shards in a directory."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        if (directory / INDEX_FILE).exists():
            weight_map = read_json(directory / INDEX_FILE, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{directory / INDEX_FILE}: expected a 'weight_map' object of tensor -> file")
            files = {name: directory / shard for name, shard in weight_map.items()}
        elif (directory / SINGLE_FILE).exists():
            with _open(directory / SINGLE_FILE) as f:
                files = {name: directory / SINGLE_FILE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self.files = files
        self._handles = {}

    def keys(self) -> set[str]:
        return set(self.files)

    def _handle(self, key: str):
        if key not in self.files:
            raise CheckpointMismatchError(f"checkpoint is missing tensor {key!r}")
        path = self.files[key]
        if path not in self._handles:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed for tensor {key!r} by {INDEX_FILE}, but missing")
            self._handles[path] = _open(path)
        return self._handles[path]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)


def load_hf_state_dict(param_shapes: dict[str, torch.Size], reader, dtype=None, device=None) -> dict:
    """Our state dict, materialised tensor by tensor from an HF-layout reader; errors name the offending key."""
    device = torch.device(device or "cpu")
    consumed, state = set(), {}

    def fetch(hf_key, want_shape):
        got = reader.shape(hf_key)
        if got != tuple(want_shape):
            raise CheckpointMismatchError(
                f"checkpoint tensor {hf_key!r} has shape {list(got)}, expected {list(want_shape)}")
        consumed.add(hf_key)
        t = reader.get(hf_key)
        check_weight(t, hf_key, reader.files[hf_key])
        return t.to(device=device, dtype=dtype or t.dtype)

    for name, shape in param_shapes.items():
        template, groups = match_template(name, list(HF_KEY_MAP) + list(HF_EXPERT_MAP))
        if template in HF_KEY_MAP:
            state[name] = fetch(HF_KEY_MAP[template].format(*groups), shape)
            continue
        E, rows, _ = shape
        parts = HF_EXPERT_MAP[template]
        out = None
        for e in range(E):
            offset = 0
            for part in parts:
                hf_key = part.format(*groups, e)
                piece_shape = (rows // len(parts), *shape[2:])
                piece = fetch(hf_key, piece_shape)
                if out is None:
                    out = torch.empty(shape, dtype=dtype or piece.dtype, device=device)
                out[e, offset: offset + piece.shape[0]].copy_(piece)
                offset += piece.shape[0]
        state[name] = out
    leftover = reader.keys() - consumed
    if leftover:
        raise CheckpointMismatchError(f"checkpoint has {len(leftover)} tensors with no place in the model, "
                                      f"e.g. {sorted(leftover)[:5]}")
    return state


def hf_tensors(state: dict[str, torch.Tensor], copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs for our state dict. Expert slices are copies unless `copy=False` (safetensors refuses
    tensors that share storage, so views are only good for inspecting shapes)."""
    for name, tensor in state.items():
        template, groups = match_template(name, list(HF_KEY_MAP) + list(HF_EXPERT_MAP))
        if template in HF_KEY_MAP:
            yield HF_KEY_MAP[template].format(*groups), tensor
            continue
        parts = HF_EXPERT_MAP[template]
        for e in range(tensor.shape[0]):
            for part, piece in zip(parts, tensor[e].chunk(len(parts), dim=0)):
                yield part.format(*groups, e), piece.clone() if copy else piece


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size = {size!r}, expected bytes or a string like '5GB' / '500MB'")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[m.group(2)])


def save_hf_safetensors(state: dict[str, torch.Tensor], directory: str | Path, max_shard_size: int | str) -> None:
    """Write the HF layout as one file, or as shards plus `model.safetensors.index.json` above the threshold."""
    directory = Path(directory)
    limit = parse_size(max_shard_size)
    # A stale index or shard set from an earlier save would shadow (or mix with) the new weights.
    for old in [directory / INDEX_FILE, directory / SINGLE_FILE, *directory.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    shards, sizes, current, current_size = [], [], [], 0
    for hf_key, tensor in hf_tensors(state, copy=False):  # plan the shards from sizes only
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_size + nbytes > limit:
            shards.append(current)
            sizes.append(current_size)
            current, current_size = [], 0
        current.append(hf_key)
        current_size += nbytes
    shards.append(current)
    total = sum(sizes) + current_size
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    shard_of = {key: names[i] for i, keys in enumerate(shards) for key in keys}
    pending: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    remaining = {name: len(keys) for name, keys in zip(names, shards)}
    for hf_key, tensor in hf_tensors(state):
        name = shard_of[hf_key]
        pending[name][hf_key] = tensor.detach().to("cpu").contiguous()
        remaining[name] -= 1
        if remaining[name] == 0:
            save_file(pending.pop(name), directory / name, metadata={"format": "pt"})
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(shard_of.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
