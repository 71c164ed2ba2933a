"""Compiled greedy generation (`model.generate(..., compile=True)`): static shapes, a static KV cache, and a decode
step that runs as one graph (a CUDA graph on GPU) with the argmax and the EOS bookkeeping inside it.

Shapes are bucketed so a stream of prompts reuses a few graphs (`bucket`: 16, 24, 32, 48, 64, 96, ... -- powers of
two and 1.5x powers of two, so at most a third of a bucket is padding):
* the prompt length S -> S_b, the prompt right-padded with -1 (masked: it changes nothing but the cost);
* the image crops N -> N_b (capped at the model's crop budget + 1), padded with all -1 crops, whose features are
  zeroed and whose token indices are -1 (dropped);
* the cache capacity C = bucket(S_b + max_new_tokens).
One `DecodeState` (static KV cache + decode tensors) is allocated per (batch, capacity) bucket, on first use, and
reused by every later call in that bucket. Prefill compiles per (batch, S_b, N_b); the decode step per (batch, C).

Every step writes its token into `tokens_BC` on the device; the host reads "every row finished" only every
`STOP_CHECK_EVERY` steps (and once at the end to trim), so at most STOP_CHECK_EVERY - 1 steps past the last EOS are
computed (all pad tokens) and cut off: the returned ids equal the eager loop's.

Runtime knobs stay data: per-layer top-k are buffers, a per-call `top_k` is passed as tensors, EOS / pad ids are
tensors; see the recompile table in `molmo_fast/knobs.py`.

On CUDA with the inductor backend the decode step compiles with `mode="reduce-overhead"` (inductor's CUDA graph
trees). Before a bucket's first compiled step, one eager decode step runs on it, so the MoE kernels' Triton
autotuning happens outside any graph capture.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from molmo_fast.model.moe import GENERATED, PAD
from molmo_fast.model.static_cache import StaticKVCache

STOP_CHECK_EVERY = 8
RECOMPILE_LIMIT = 64  # graphs per compiled function: buckets x routing kinds x skip sets (dynamo's default is 8)


def bucket(n: int, cap: int | None = None) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... that is >= n; `cap` instead when n <= cap < that."""
    b = 1
    while b < n and b * 3 // 2 < n:
        b *= 2
    b = b if b >= n else b * 3 // 2
    return min(b, cap) if cap is not None and n <= cap else b


class DecodeState:
    """Everything one (batch, capacity) bucket's graphs read and write, allocated once, static addresses."""

    def __init__(self, model, batch: int, capacity: int, device: torch.device):
        llm = model.config.llm
        dtype = model.llm.lm_head.weight.dtype
        self.cache = StaticKVCache(llm.n_layers, batch, capacity, llm.n_kv_heads, llm.head_dim, dtype, device)
        long = {"dtype": torch.long, "device": device}
        self.token_B1 = torch.zeros(batch, 1, **long)
        self.pos_B1 = torch.zeros(batch, 1, **long)
        self.finished_B = torch.zeros(batch, dtype=torch.bool, device=device)
        self.tokens_BC = torch.zeros(batch, capacity, **long)  # generated tokens, step i in column i
        self.step = torch.zeros(1, **long)
        self.eos = torch.full((), -1, **long)  # -1: no EOS (argmax never returns it)
        self.pad = torch.zeros((), **long)
        for t in (self.token_B1, self.pos_B1, self.finished_B, self.tokens_BC, self.step, self.eos, self.pad):
            torch._dynamo.mark_static_address(t)


def _emit(state: DecodeState, logits_BV: torch.Tensor) -> None:
    """Greedy token + EOS bookkeeping, as the eager loop: finished rows emit pad."""
    token_B = logits_BV.argmax(-1).masked_fill(state.finished_B, state.pad)
    state.finished_B.logical_or_(token_B == state.eos)
    state.token_B1.copy_(token_B.unsqueeze(1))
    state.tokens_BC.index_copy_(1, state.step, token_B.unsqueeze(1))
    state.step.add_(1)


def prefill(model, state: DecodeState, input_ids: torch.Tensor, images, image_masks, image_input_idx,
            top_k) -> torch.Tensor:
    valid = input_ids != -1
    S = input_ids.shape[1]
    last = (valid * torch.arange(1, S + 1, device=valid.device)).argmax(-1, keepdim=True)
    out = model(input_ids, images, image_masks, image_input_idx, position_ids=(valid.cumsum(-1) - 1).clamp_min(0),
                past_key_values=state.cache, use_cache=True, top_k=top_k, logits_at=last)
    state.pos_B1.copy_(valid.sum(-1, keepdim=True))
    state.finished_B.zero_()
    state.step.zero_()
    logits = out.logits[:, -1]
    _emit(state, logits)
    return logits


def decode_step(model, state: DecodeState, top_k) -> torch.Tensor:
    kind_B1 = torch.where(state.finished_B, PAD, GENERATED).to(torch.int8).unsqueeze(1)  # as the eager loop
    out = model(state.token_B1, position_ids=state.pos_B1, past_key_values=state.cache, use_cache=True, top_k=top_k,
                token_kind=kind_B1)
    state.pos_B1.add_(1)
    logits = out.logits[:, -1]
    _emit(state, logits)
    return logits


_COMPILED: dict = {}


def _compiled(fn, backend, mode: str | None):
    key = (fn, backend, mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=backend, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED[key]


def _k_as_data(model, top_k, device) -> list[torch.Tensor]:
    """The top-k of every layer as 0-d tensors (the layer's buffer where not overridden): one graph input structure
    for every per-call override, whose values are graph data, not constants that key a recompile."""
    buffers = [block.moe.top_k for block in model.llm.blocks]
    if top_k is None:
        return buffers
    if isinstance(top_k, int) or (isinstance(top_k, torch.Tensor) and top_k.dim() == 0):
        top_k = [top_k] * len(buffers)
    if not isinstance(top_k, (list, tuple)) or len(top_k) != len(buffers):
        raise ValueError(f"generate(compile=True): top_k must be an int, a 0-d tensor or one value per layer "
                         f"({len(buffers)}), got {top_k!r}")
    return [b if k is None else torch.as_tensor(k, device=device) for b, k in zip(buffers, top_k, strict=True)]


def _pad_images(images, image_masks, image_input_idx, max_crops: int):
    N = images.shape[1]
    pad = bucket(N, cap=max_crops + 1) - N
    if not pad:
        return images, image_masks, image_input_idx
    images = F.pad(images, (0, 0, 0, 0, 0, pad), value=-1)
    image_masks = None if image_masks is None else F.pad(image_masks, (0, 0, 0, pad), value=-1)
    return images, image_masks, F.pad(image_input_idx, (0, 0, 0, pad), value=-1)


def decode_state(model, batch: int, capacity: int, device: torch.device) -> DecodeState:
    """The bucket's state, allocated on first use (then one eager decode step: Triton autotuning outside capture)."""
    key = (batch, capacity, model.llm.lm_head.weight.dtype, device)
    if key not in model.decode_states:
        state = model.decode_states[key] = DecodeState(model, batch, capacity, device)
        counts = [block.moe.routing_counts.clone() for block in model.llm.blocks]
        state.cache.decoding = True
        decode_step(model, state, _k_as_data(model, None, device))
        for block, c in zip(model.llm.blocks, counts, strict=True):  # the warm-up routed no real token
            block.moe.routing_counts.copy_(c)
    return model.decode_states[key]


def all_finished(finished_B: torch.Tensor, sync_ranks: bool, group: dist.ProcessGroup | None) -> bool:
    """Whether every row -- of every rank in `group`, with sync_ranks -- has finished (one host sync)."""
    if not sync_ranks:
        return bool(finished_B.all())
    pending = (~finished_B).any().to(torch.int32)  # 0-dim, on the rows' device (gloo for CPU, NCCL for CUDA)
    dist.all_reduce(pending, op=dist.ReduceOp.MAX, group=group)
    return not bool(pending)


@torch.no_grad()
def generate_compiled(model, input_ids, images, image_masks, image_input_idx, max_new_tokens: int, eos: int | None,
                      pad: int, top_k, output_logits: bool, sync_ranks: bool, group, backend):
    """The compiled path of `molmo_fast.model.generate.generate`: same arguments and results; `backend` is
    torch.compile's ("inductor", "aot_eager", "eager" or a callable)."""
    B, S = input_ids.shape
    device = input_ids.device
    if images is not None and images.shape[1] == 0:
        images = image_masks = image_input_idx = None
    if images is not None:
        images, image_masks, image_input_idx = _pad_images(images, image_masks, image_input_idx, model.max_crops)
    S_b = max(bucket(S), 16)
    state = decode_state(model, B, bucket(S_b + max_new_tokens), device)
    state.cache.reset()
    state.eos.fill_(-1 if eos is None else eos)
    state.pad.fill_(pad)
    graphs = backend == "inductor" and device.type == "cuda"
    run_prefill = _compiled(prefill, backend, None)
    run_decode = _compiled(decode_step, backend, "reduce-overhead" if graphs else None)
    top_k = _k_as_data(model, top_k, device)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        logits = run_prefill(model, state, F.pad(input_ids.long(), (0, S_b - S), value=-1), images, image_masks,
                             image_input_idx, top_k)
        step_logits = [logits.float().clone()] if output_logits else []
        steps = 1
        while steps < max_new_tokens:
            if eos is not None and steps % STOP_CHECK_EVERY == 0 and all_finished(state.finished_B, sync_ranks, group):
                break
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten
            logits = run_decode(model, state, top_k)
            if output_logits:
                step_logits.append(logits.float().clone())
            steps += 1
    n = _num_tokens(state.tokens_BC[:, :steps], state.finished_B, eos, sync_ranks, group)
    ids = torch.cat([input_ids.long(), state.tokens_BC[:, :n]], dim=1)
    if output_logits:
        return ids, torch.stack(step_logits[:n], dim=1)
    return ids


def _num_tokens(tokens_Bn: torch.Tensor, finished_B: torch.Tensor, eos: int | None, sync_ranks: bool, group) -> int:
    """Where the eager loop would have stopped: one past the step at which the last row (of any rank) finished."""
    n = tokens_Bn.shape[1]
    if eos is not None and bool(finished_B.all()):
        n = int((tokens_Bn == eos).int().argmax(1).max()) + 1  # a row's first EOS is where it finished
    if sync_ranks:
        n_t = torch.tensor(n, device=tokens_Bn.device)
        dist.all_reduce(n_t, op=dist.ReduceOp.MAX, group=group)
        n = int(n_t)
    return n
