"""Static KV cache for compiled generation: fixed-shape buffers written in place, the write position as data.

Slots 0..S-1 hold the (bucket-padded) prompt, written by the prefill; decode step i writes slot S + i, an index held
in a tensor (`slot`), so every decode step has the same shapes and one compiled graph (one CUDA graph) serves all of
them. A decode query attends over every slot: slots after it (not written yet in this call, or left over from an
earlier one) are masked by causality, prompt padding by `key_valid_BC`. The same interface as `KVCache`
(`has_past`, `prepare`, `update`, `commit`) lets `LLM.forward` run either.
"""

import torch

from molmo_fast.model.attention import self_attention_mask


class StaticKVCache:
    """Per layer keys/values [B, n_kv_heads, capacity, head_dim], allocated once and marked as static addresses
    (CUDA graphs may then write them in place). `reset()` starts a new sequence without touching memory."""

    def __init__(self, num_layers: int, batch: int, capacity: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_valid_BC = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the slot the next decode step writes
        self.decoding = False  # Python-level: prefill and decode are different graphs anyway
        self._prefill_len = 0
        for t in (*self.keys, *self.values, self.key_valid_BC, self.slot):
            torch._dynamo.mark_static_address(t)

    @property
    def capacity(self) -> int:
        return self.key_valid_BC.shape[1]

    @property
    def has_past(self) -> bool:
        return self.decoding

    def reset(self) -> None:
        self.decoding = False

    def prepare(self, valid_BS: torch.Tensor, subsegment_ids_BS: torch.Tensor | None = None,
                right_padded: bool = False) -> torch.Tensor | None:
        """Record the validity of the slots this forward writes; return its attention mask."""
        S = valid_BS.shape[1]
        if not self.decoding:
            if S > self.capacity:
                raise ValueError(f"StaticKVCache: prompt of {S} tokens exceeds the capacity {self.capacity}")
            self.key_valid_BC[:, :S].copy_(valid_BS)
            self._prefill_len = S
            return self_attention_mask(valid_BS, subsegment_ids_BS, right_padded)
        if S != 1 or subsegment_ids_BS is not None:
            raise ValueError(f"StaticKVCache: decode steps take one token per row without subsegments, got {S}")
        self.key_valid_BC.index_copy_(1, self.slot, valid_BS)
        slot_C = torch.arange(self.capacity, device=self.slot.device)
        return ((slot_C <= self.slot) & self.key_valid_BC)[:, None, None, :]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's k/v [B, H, S, d]; return the keys/values its queries attend to."""
        if not self.decoding:
            S = k.shape[2]
            self.keys[layer][:, :, :S].copy_(k)
            self.values[layer][:, :, :S].copy_(v)
            return k, v
        self.keys[layer].index_copy_(2, self.slot, k)
        self.values[layer].index_copy_(2, self.slot, v)
        return self.keys[layer], self.values[layer]

    def commit(self) -> None:
        if self.decoding:
            self.slot.add_(1)
        else:
            self.slot.fill_(self._prefill_len)
            self.decoding = True
