"""MolmoE: CLIP ViT -> connector -> OLMoE decoder, with HF / native checkpoint I/O.

Forward stage order: crops [B, N, P, 588] -> ViT hidden states -> concat of `vit_layers` (CLS dropped, padding
crops zeroed) -> connector -> image tokens [B, N, T, d_model] -> added to the token embeddings at
`image_input_idx` -> decoder -> logits [B, S, embedding_size].
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from molmo_fast.config import MolmoEConfig
from molmo_fast.model.attention import KVCache, RMSNorm
from molmo_fast.model.connector import Connector
from molmo_fast.model.generate import generate
from molmo_fast.model.hf_checkpoint import SafetensorsReader, load_hf_state_dict, save_hf_safetensors
from molmo_fast.model.llm import LLM
from molmo_fast.model.vit import VisionTransformer

INIT_SCHEMES = ("default", "fan_in")


@dataclass
class MolmoEOutput:
    logits: torch.Tensor  # [B, S, embedding_size]
    past_key_values: KVCache | None = None
    router_logits: list[torch.Tensor] | None = None  # per LLM layer, [B*S, E]
    aux_loss: torch.Tensor | None = None  # weighted MoE aux losses (training with non-zero weights only)
    image_features: torch.Tensor | None = None  # [B, N, T, d_model]


class MolmoE(nn.Module):
    """`MolmoE(config)` allocates uninitialised weights: follow with `init_weights(seed)`, or build with
    `from_pretrained` / `from_native` (which construct on the meta device and materialise only loaded tensors)."""

    def __init__(self, config: MolmoEConfig):
        super().__init__()
        self.config = config
        self.vit = VisionTransformer(config.vision)
        self.connector = Connector(config)
        self.llm = LLM(config)
        n = config.vision.num_layers
        self.vit_layer_idx = [layer % n for layer in config.connector.vit_layers]
        self.generation_config = {"eos_token_id": None, "pad_token_id": config.llm.pad_token_id}
        self.max_crops = config.connector.max_crops  # preprocessing budget a Processor should use (a knob)

    # ---------------------------------------------------------------- forward
    def encode_images(self, images: torch.Tensor, image_masks: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, N, P, patch_dim] -> (vit_features [B, N, P, C], image_features [B, N, T, d_model])."""
        if images.dim() != 4:
            raise ValueError(f"images must be [batch, crops, patches, patch_dim], got shape {list(images.shape)}")
        B, N, P, C = images.shape
        crops = images.reshape(B * N, P, C)
        is_pad_crop = (crops == -1).all(dim=-1).all(dim=-1)  # batch-padding crops are all -1
        if self.training:
            # Static shapes for compile: run every crop, zero the padding ones afterwards.
            feats = self._vit_features(crops) * (~is_pad_crop).to(crops.dtype).view(-1, 1, 1)
        else:
            # Inference batches mix images with different crop counts; the ViT dominates prefill, so run it on
            # the real crops only (one host sync) and leave the padding crops' features at zero.
            keep = (~is_pad_crop).nonzero().squeeze(1)
            real = self._vit_features(crops[keep])
            feats = real.new_zeros(B * N, *real.shape[1:]).index_copy(0, keep, real)
        masks = image_masks.reshape(B * N, P) if image_masks is not None else None
        return feats.view(B, N, P, -1), self.connector(feats, masks, crops_shape=(B, N))

    def _vit_features(self, crops_NPC: torch.Tensor) -> torch.Tensor:
        """Concat of the `vit_layers` hidden states, CLS dropped: [N, P, C * len(vit_layers)]."""
        return torch.cat(self.vit(crops_NPC, keep=self.vit_layer_idx), dim=-1)[:, 1:]

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                image_masks: torch.Tensor | None = None, image_input_idx: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, subsegment_ids: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                output_router_logits: bool = False, top_k: int | list | torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, right_padded: bool = False,
                response_mask: torch.Tensor | None = None, token_kind: torch.Tensor | None = None) -> MolmoEOutput:
        """`top_k` overrides the MoE top-k for this call: an int, a per-layer list, or a per-token [B, S] tensor.
        `logits_at` [B, n] computes logits only at those positions (-> [B, n, embedding_size]).
        `right_padded=True` states that every row is its tokens followed only by -1 padding (collated training
        batches); without subsegment_ids or a filled cache, attention then runs as plain causal SDPA (no mask,
        flash kernels on GPU) -- exact at every valid position, padding positions' outputs differ.
        `response_mask` [B, S] (loss_masks > 0) selects where `response_residual_dropout` applies in training.
        `token_kind` [B, S] (molmo_fast.model.moe.TOKEN_KINDS ids) picks each token's per-kind top-k cap; default:
        image at `image_input_idx`, text elsewhere (generate passes "generated" for the tokens it feeds back).
        A given `past_key_values` cache is updated in place."""
        image_features = flat_features = flat_idx = None
        if images is not None and images.shape[1] > 0:
            if image_input_idx is None:
                raise ValueError("images given without image_input_idx")
            _, image_features = self.encode_images(images, image_masks)
            B, N, T, D = image_features.shape
            flat_features = image_features.reshape(B, N * T, D)
            flat_idx = image_input_idx.reshape(B, N * T)
        out = self.llm(input_ids, flat_features, flat_idx, position_ids, subsegment_ids, past_key_values,
                       use_cache, output_router_logits, top_k, logits_at, right_padded, response_mask, token_kind)
        return MolmoEOutput(out.logits, out.past_key_values, out.router_logits, out.aux_loss, image_features)

    generate = generate

    # ---------------------------------------------------------------- init
    def reset_runtime_buffers(self) -> None:
        """(Re)create the non-persistent buffers (the MoE runtime knobs and counters) on the parameters' device."""
        device = self.llm.lm_head.weight.device
        for block in self.llm.blocks:
            block.moe.reset_runtime_buffers(device)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, device: str | torch.device | None = None,
                     scheme: str = "default") -> "MolmoE":
        """Random init for training from scratch (materialises meta tensors on `device`, default cpu).

        `scheme="default"`: linear/expert/embedding weights truncated normal std 0.02 (3 std cut, as the MolmoE
        config's init_std / init_cutoff_factor); norms 1, biases 0, pad_embed 0; CLIP-style emb^-0.5 for the
        class/positional embeddings. `scheme="fan_in"`: the same, except the ViT and connector linear weights
        get std 1/sqrt(fan_in), drawn from their own stream (seed + 1) after the default draw, so every other
        tensor matches the default scheme and the demo's documented start is kept bit for bit. 0.02
        is sized for CLIP-L / OLMoE widths; at tiny widths the connector's SwiGLU then starts with outputs ~1e-7
        and the image never reaches the LLM (Molmo itself starts from CLIP)."""
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"init_weights: scheme={scheme!r}, expected one of {INIT_SCHEMES}")
        if device is not None or any(p.is_meta for p in self.parameters()):
            self.to_empty(device=device or "cpu")
        dev = self.llm.lm_head.weight.device
        g = torch.Generator(device=dev).manual_seed(seed)
        g_fan_in = torch.Generator(device=dev).manual_seed(seed + 1)
        for name, p in self.named_parameters():
            owner, leaf = name.rsplit(".", 1)
            module = self.get_submodule(owner)
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias" or leaf == "pad_embed":
                p.zero_()
            elif leaf in ("class_embedding", "positional_embedding"):
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
            else:
                nn.init.trunc_normal_(p, 0.0, 0.02, -0.06, 0.06, generator=g)
                if scheme == "fan_in" and isinstance(module, nn.Linear) and name.startswith(("vit.", "connector.")):
                    p.normal_(0.0, p.shape[1] ** -0.5, generator=g_fan_in)
        self.reset_runtime_buffers()
        return self

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_config_on_meta(cls, config: MolmoEConfig) -> "MolmoE":
        with torch.device("meta"):
            return cls(config)

    def _assign(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True, assign=True)
        self.reset_runtime_buffers()
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> "MolmoE":
        """Load an HF-layout directory (config.json + model.safetensors or sharded + index), tensor by tensor."""
        path = Path(path)
        model = cls.from_config_on_meta(MolmoEConfig.from_hf_json(path / "config.json"))
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        model._assign(load_hf_state_dict(shapes, SafetensorsReader(path), dtype, device))
        gen_path = path / "generation_config.json"
        if gen_path.exists():
            model.generation_config = json.loads(gen_path.read_text())
        return model

    @classmethod
    def from_native(cls, source: str | Path | dict, config: MolmoEConfig, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> "MolmoE":
        """Load the allenai/molmo native (megablocks) layout: a state dict, a `model.pt` or a .safetensors file."""
        from molmo_fast.model.native_checkpoint import load_native_state_dict

        model = cls.from_config_on_meta(config)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        model._assign(load_native_state_dict(shapes, source, dtype, device))
        return model

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write config.json, generation_config.json and the HF key layout (sharded above `max_shard_size`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.to_hf_json(path / "config.json")
        gen = {k: v for k, v in self.generation_config.items() if v is not None}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_hf_safetensors(self.state_dict(), path, max_shard_size)

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those a token can use at the current knobs: the `top_k` experts of each MoE layer
        (an upper bound under top_p / threshold routing), nothing of a skipped block."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for i, block in enumerate(self.llm.blocks):
            moe = block.moe
            if i in self.llm.skip_blocks:
                total -= sum(p.numel() for p in block.parameters())
                continue
            per_expert = (moe.w_gate_up.numel() + moe.w_down.numel()) // moe.num_experts
            total -= per_expert * (moe.num_experts - moe.k)
        return total
