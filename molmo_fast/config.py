"""Typed MolmoE configuration, read from / written to the HF MolmoE `config.json`.

The HF file carries many keys we do not model (training flags, init settings, auto_map). They are kept verbatim in
`MolmoEConfig.hf_extra` so `to_hf_json` writes back a file equal (as JSON) to the one read. Keys whose value changes
the architecture in ways we do not implement are validated against the single supported value.
"""

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molmo_fast.typecheck import matches, type_name

ASSETS = Path(__file__).parent / "assets"

# HF keys whose value must be exactly this for our implementation to be the reference model.
_SUPPORTED = {
    "activation_type": "swiglu",
    "alibi": False,
    "attention_layer_norm": True,
    "attention_layer_norm_with_affine": True,
    "attn_logit_softcapping": None,
    "bias_for_layer_norm": False,
    "block_type": "moe",
    "clip_qkv": None,
    "final_logit_softcapping": None,
    "image_padding_embed": "pad_and_partial_pad",
    "image_pooling_2d": "attention-meanq",
    "image_projector": "mlp",
    "include_bias": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "moe_shared_expert": False,
    "norm_after": False,
    "normalize_input_embeds": False,
    "qkv_bias": False,
    "response_attention_dropout": 0.0,
    "rope": True,
    "rope_impl": "llama",
    "scale_logits": False,
    "use_cls_feature": False,
    "weight_tying": False,
}
# The ViT's own dropouts are not implemented (MolmoE trains with them off).
_SUPPORTED_VISION = {"image_mlp_activations": "quick_gelu", "attention_dropout": 0.0, "residual_dropout": 0.0,
                     "image_dropout_rate": 0.0}
# HF key -> DropoutConfig field.
_DROPOUT_KEYS = {"residual_dropout": "residual", "response_residual_dropout": "response_residual",
                 "attention_dropout": "attention", "embedding_dropout": "embedding",
                 "image_feature_dropout": "image_feature"}


@dataclass
class VisionConfig:
    """CLIP ViT on pre-patchified crops."""

    image_size: tuple[int, int]  # (h, w) of one crop in pixels
    patch_size: int
    emb_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    mlp_dim: int
    num_pos: int
    norm_eps: float

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        h, w = self.patch_grid
        return h * w

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3


@dataclass
class ConnectorConfig:
    """ViT features -> LLM tokens: layer concat, pad embeddings, 2D attention pooling, SwiGLU projector."""

    vit_layers: tuple[int, ...]
    pool_h: int
    pool_w: int
    max_crops: int
    overlap_margins: tuple[int, int]
    crop_mode: str
    use_col_tokens: bool


@dataclass
class LLMConfig:
    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    vocab_size: int
    embedding_size: int
    additional_vocab_size: int
    rope_theta: float
    norm_eps: float
    max_sequence_length: int
    pad_token_id: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class MoEConfig:
    """Router + experts. `top_k` is the default number of active experts (and the static slot count K_max)."""

    num_experts: int
    top_k: int
    hidden_size: int  # per-expert SwiGLU width
    load_balancing_weight: float = 0.0
    z_loss_weight: float = 0.0
    normalize_weights: bool = False  # MolmoE parity: raw softmax probabilities, not renormalised
    impl: str = "auto"  # passed to molmo_fast.kernels.moe_mlp when it accepts it


@dataclass
class DropoutConfig:
    """Training-only dropout rates, as allenai/molmo applies them; all are inactive in eval mode."""

    residual: float = 0.0  # attention and MoE outputs, before each residual add
    response_residual: float = 0.0  # when > 0: the residual rate at response (loss) tokens, `residual` elsewhere
    attention: float = 0.0  # attention probabilities (SDPA dropout_p)
    embedding: float = 0.0  # input embeddings, after the image features are added
    image_feature: float = 0.0  # concatenated ViT features (after the pad embeddings), before pooling


@dataclass
class MolmoEConfig:
    vision: VisionConfig
    connector: ConnectorConfig
    llm: LLMConfig
    moe: MoEConfig
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    hf_extra: dict[str, Any] = field(default_factory=dict, repr=False)  # the HF dict as read (for round trip)

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "MolmoEConfig":
        def get(key, expected, container=d, prefix=""):
            if key not in container:
                raise ValueError(f"{source}: missing field '{prefix}{key}' (expected {type_name(expected)})")
            value = container[key]
            if not matches(value, expected):
                raise ValueError(f"{source}: field '{prefix}{key}' = {value!r}, expected {type_name(expected)}")
            return value

        def positive(key, container=d, prefix=""):
            value = get(key, int, container, prefix)
            if value <= 0:
                raise ValueError(f"{source}: field '{prefix}{key}' = {value!r}, expected a positive int")
            return value

        for key, want in _SUPPORTED.items():
            if key in d and d[key] != want:
                raise ValueError(f"{source}: field '{key}' = {d[key]!r} is not supported, expected {want!r}")
        vb = get("vision_backbone", dict)
        for key, want in _SUPPORTED_VISION.items():
            if key in vb and vb[key] != want:
                raise ValueError(
                    f"{source}: field 'vision_backbone.{key}' = {vb[key]!r} is not supported, expected {want!r}")

        v = "vision_backbone."
        size = get("image_default_input_size", list, vb, v)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"{source}: field '{v}image_default_input_size' = {size!r}, expected [h, w] ints")
        vision = VisionConfig(
            image_size=(size[0], size[1]),
            patch_size=positive("image_patch_size", vb, v),
            emb_dim=positive("image_emb_dim", vb, v),
            num_heads=positive("image_num_heads", vb, v),
            num_kv_heads=vb.get("image_num_key_value_heads", vb.get("image_num_heads")),
            head_dim=positive("image_head_dim", vb, v),
            num_layers=positive("image_num_layers", vb, v),
            mlp_dim=positive("image_mlp_dim", vb, v),
            num_pos=positive("image_num_pos", vb, v),
            norm_eps=float(get("image_norm_eps", float, vb, v)),
        )
        kv = vision.num_kv_heads
        if not isinstance(kv, int) or kv <= 0 or vision.num_heads % kv:
            raise ValueError(f"{source}: field '{v}image_num_key_value_heads' = {kv!r}, expected a divisor of "
                             f"image_num_heads {vision.num_heads}")

        vit_layers = get("vit_layers", list)
        for layer in vit_layers:
            if not isinstance(layer, int) or not -vision.num_layers <= layer < vision.num_layers:
                raise ValueError(f"{source}: field 'vit_layers' = {vit_layers!r}, expected ints indexing "
                                 f"{vision.num_layers} ViT layers")
        margins = get("overlap_margins", list)
        connector = ConnectorConfig(
            vit_layers=tuple(vit_layers),
            pool_h=positive("image_pooling_h"),
            pool_w=positive("image_pooling_w"),
            max_crops=positive("max_crops"),
            overlap_margins=(margins[0], margins[1]),
            crop_mode=get("crop_mode", str),
            use_col_tokens=get("use_col_tokens", bool),
        )

        d_model, n_heads = positive("d_model"), positive("n_heads")
        if d_model % n_heads:
            raise ValueError(f"{source}: field 'n_heads' = {n_heads!r}, expected a divisor of d_model {d_model}")
        head_dim = d.get("head_dim")
        if head_dim not in (None, d_model // n_heads):
            raise ValueError(f"{source}: field 'head_dim' = {head_dim!r} is not supported, expected null or "
                             f"d_model / n_heads = {d_model // n_heads}")
        n_kv_heads = _effective_kv_heads(d)
        if not isinstance(n_kv_heads, int) or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"{source}: field 'n_kv_heads' = {n_kv_heads!r}, expected null or a divisor of "
                             f"n_heads {n_heads}")
        vocab_size, embedding_size = positive("vocab_size"), positive("embedding_size")
        if embedding_size < vocab_size:
            raise ValueError(f"{source}: field 'embedding_size' = {embedding_size!r}, expected >= vocab_size "
                             f"{vocab_size}")
        additional = get("additional_vocab_size", int | None)
        llm = LLMConfig(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            n_layers=positive("n_layers"),
            vocab_size=vocab_size,
            embedding_size=embedding_size,
            additional_vocab_size=additional or 0,
            rope_theta=float(get("rope_theta", float)),
            norm_eps=float(get("layer_norm_eps", float)),
            max_sequence_length=positive("max_sequence_length"),
            pad_token_id=get("pad_token_id", int),
        )

        if d.get("mlp_hidden_size") is None:
            positive("mlp_ratio")
        mlp_hidden = _mlp_hidden(d)
        if not isinstance(mlp_hidden, int) or mlp_hidden <= 0 or mlp_hidden % 2:
            raise ValueError(f"{source}: field 'mlp_hidden_size' = {d.get('mlp_hidden_size')!r} (mlp_ratio = "
                             f"{d.get('mlp_ratio')!r}), expected null or a positive even int")
        num_experts = positive("moe_num_experts")
        top_k = positive("moe_top_k")
        if top_k > num_experts:
            raise ValueError(f"{source}: field 'moe_top_k' = {top_k!r}, expected <= moe_num_experts {num_experts}")
        moe = MoEConfig(
            num_experts=num_experts,
            top_k=top_k,
            hidden_size=mlp_hidden // 2,  # SwiGLU halves the configured hidden width
            load_balancing_weight=float(get("moe_loss_weight", float)),
            z_loss_weight=float(get("moe_zloss_weight", float)),
            # OLMoE's name; written by runs trained with renormalised routing (molmo_fast/train/elastic.py)
            normalize_weights=get("norm_topk_prob", bool) if "norm_topk_prob" in d else False,
        )
        rates = {}
        for key, name in _DROPOUT_KEYS.items():
            rate = get(key, float) if key in d else 0.0
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{source}: field '{key}' = {rate!r}, expected a rate in [0, 1)")
            rates[name] = float(rate)
        return cls(vision, connector, llm, moe, DropoutConfig(**rates), hf_extra=copy.deepcopy(d))

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "MolmoEConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read a JSON config ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        d = copy.deepcopy(self.hf_extra)
        v, c, llm, moe = self.vision, self.connector, self.llm, self.moe
        vb = d.setdefault("vision_backbone", {})
        vb.update(image_default_input_size=list(v.image_size), image_patch_size=v.patch_size,
                  image_emb_dim=v.emb_dim, image_num_heads=v.num_heads, image_head_dim=v.head_dim,
                  image_num_layers=v.num_layers, image_mlp_dim=v.mlp_dim, image_num_pos=v.num_pos,
                  image_norm_eps=v.norm_eps)
        if "image_num_key_value_heads" in vb or v.num_kv_heads != v.num_heads:
            vb["image_num_key_value_heads"] = v.num_kv_heads
        d.update(vit_layers=list(c.vit_layers), image_pooling_h=c.pool_h, image_pooling_w=c.pool_w,
                 max_crops=c.max_crops, overlap_margins=list(c.overlap_margins), crop_mode=c.crop_mode,
                 use_col_tokens=c.use_col_tokens)
        d.update(d_model=llm.d_model, n_heads=llm.n_heads, n_layers=llm.n_layers, vocab_size=llm.vocab_size,
                 embedding_size=llm.embedding_size,
                 # "no extra rows" may be spelled null or 0; keep the file's spelling
                 additional_vocab_size=llm.additional_vocab_size or d.get("additional_vocab_size"),
                 rope_theta=llm.rope_theta, layer_norm_eps=llm.norm_eps,
                 max_sequence_length=llm.max_sequence_length, pad_token_id=llm.pad_token_id)
        # Keep the file's own spelling (null / multi_query_attention / mlp_ratio) wherever it still resolves to
        # the same value, so an unchanged config writes back byte-for-byte as JSON.
        if _effective_kv_heads(d) != llm.n_kv_heads:
            d["n_kv_heads"], d["multi_query_attention"] = llm.n_kv_heads, None
        if _mlp_hidden(d) != 2 * moe.hidden_size:
            d["mlp_hidden_size"] = 2 * moe.hidden_size
        d.update(moe_num_experts=moe.num_experts, moe_top_k=moe.top_k, moe_loss_weight=moe.load_balancing_weight,
                 moe_zloss_weight=moe.z_loss_weight)
        if moe.normalize_weights or "norm_topk_prob" in d:
            d["norm_topk_prob"] = moe.normalize_weights
        for key, name in _DROPOUT_KEYS.items():
            rate = getattr(self.dropout, name)
            if key in d or rate:
                d[key] = rate
        for key, value in _SUPPORTED.items():
            d.setdefault(key, value)
        return d

    def to_hf_json(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def with_overrides(self, items: list[str], source: str = "--override") -> "MolmoEConfig":
        """This config with `KEY=VALUE` strings applied to its config.json fields (VALUE is JSON), for CLIs."""
        d = self.to_hf_dict()
        for item in items:
            key, _, value = item.partition("=")
            if key not in d:
                raise ValueError(f"{source} {item!r}: {key!r} is not a config.json field")
            d[key] = json.loads(value)
        return type(self).from_hf_dict(d, source=source)

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str) -> "MolmoEConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset name {name!r}, expected one of {sorted(PRESETS)}")
        d = json.loads((ASSETS / "molmoe-1b" / "config.json").read_text())
        overrides = copy.deepcopy(PRESETS[name])
        d.setdefault("vision_backbone", {}).update(overrides.pop("vision_backbone", {}))
        d.update(overrides)
        return cls.from_hf_dict(d, source=f"preset {name!r}")


# Presets are HF-format overrides of the shipped MolmoE-1B config.json (so every preset writes a complete file).
PRESETS: dict[str, dict[str, Any]] = {
    "molmoe-1b": {},
    "tiny": dict(
        d_model=64, n_heads=4, n_layers=2, moe_num_experts=8, moe_top_k=2, vocab_size=1000, embedding_size=1024,
        max_crops=4, overlap_margins=[2, 2], vit_layers=[-2, -3],
        vision_backbone=dict(image_default_input_size=[84, 84], image_emb_dim=32, image_num_heads=4,
                             image_head_dim=8, image_num_key_value_heads=4, image_num_layers=3, image_mlp_dim=64,
                             image_num_pos=37),
    ),
}


def _effective_kv_heads(d: dict[str, Any]):
    if d.get("multi_query_attention"):
        return 1
    return d["n_heads"] if d.get("n_kv_heads") is None else d["n_kv_heads"]


def _mlp_hidden(d: dict[str, Any]):
    """The SwiGLU input width before halving: `mlp_hidden_size` if set, else mlp_ratio * d_model."""
    return d["mlp_ratio"] * d["d_model"] if d.get("mlp_hidden_size") is None else d["mlp_hidden_size"]
