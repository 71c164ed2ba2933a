"""Per-stage latency of greedy generation: vision encoder, connector, LLM prefill, decode per token.

One `measure_stages` call runs `model.generate` on a prepared batch `repeats` times after `warmup` untimed runs
and reports the median of each stage. The stages are the modules the forward pass already calls -- `model.vit`,
`model.connector`, `model.llm` (first call = prefill, later calls = decode steps) -- timed by forward hooks, so
the numbers are of the real generate path, not of a re-implementation. On CUDA each boundary is a CUDA event
(one sync at the end of a run); on CPU, where ops run synchronously, the wall clock.
Decoding runs exactly `new_tokens` steps: EOS is disabled while timing, so every setting decodes the same length.
"""

import resource
import statistics
import sys
import time
from contextlib import contextmanager

import torch

STAGES = ("vision", "connector", "prefill", "decode_per_token", "per_example")


class _Clock:
    """Timestamps on `device`: CUDA events, or perf_counter seconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1e3 * (end - start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@contextmanager
def _stage_hooks(model, clock: _Clock, marks: dict[str, list]):
    """Record (start, end) of every call of the vision, connector and LLM modules into `marks`."""
    handles = []
    for stage, module in (("vision", model.vit), ("connector", model.connector), ("llm", model.llm)):
        calls = marks.setdefault(stage, [])
        handles.append(module.register_forward_pre_hook(lambda m, a, calls=calls: calls.append([clock.now()])))
        handles.append(module.register_forward_hook(lambda m, a, o, calls=calls: calls[-1].append(clock.now())))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _no_eos(model):
    saved = model.generation_config.get("eos_token_id")
    model.generation_config["eos_token_id"] = None
    try:
        yield
    finally:
        model.generation_config["eos_token_id"] = saved


@torch.no_grad()
def _one_run(model, batch: dict, new_tokens: int, clock: _Clock) -> dict[str, float]:
    marks: dict[str, list] = {}
    with _stage_hooks(model, clock, marks), _no_eos(model):
        start = clock.now()
        model.generate(batch["input_ids"], batch.get("images"), batch.get("image_masks"),
                       batch.get("image_input_idx"), max_new_tokens=new_tokens, eos_token_id=None)
        end = clock.now()
    clock.sync()
    prefill, *decode = marks["llm"]
    total_ms = clock.ms(start, end)
    return {
        "vision": sum(clock.ms(*c) for c in marks["vision"]),
        "connector": sum(clock.ms(*c) for c in marks["connector"]),
        "prefill": clock.ms(*prefill),
        # a decode step is everything after the prefill's LLM call up to its own LLM call's end (argmax,
        # cache bookkeeping included): the time one more generated token costs
        "decode_per_token": clock.ms(prefill[1], decode[-1][1]) / len(decode) if decode else None,
        "total": total_ms,
        "per_example": total_ms / batch["input_ids"].shape[0],
    }


def measure_stages(model, batch: dict[str, torch.Tensor], new_tokens: int = 16, repeats: int = 3,
                   warmup: int = 1) -> dict:
    """Median milliseconds per stage over `repeats` timed runs of `model.generate(batch, new_tokens)`.

    `batch`: input_ids [B, S] (-1 = padding), optionally images / image_masks / image_input_idx, on the model's
    device. Returns {"vision", "connector", "prefill", "decode_per_token", "per_example", "total"} in ms (vision /
    connector 0 for a text-only batch; decode_per_token None when new_tokens == 1), plus "repeats", "new_tokens",
    "batch_size", "peak_memory_mb" and "peak_memory_kind" ("cuda_allocated", or the process's peak RSS on CPU)."""
    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"measure_stages: new_tokens={new_tokens}, repeats={repeats}, warmup={warmup}; "
                         f"expected new_tokens >= 1, repeats >= 1, warmup >= 0")
    device = batch["input_ids"].device
    clock = _Clock(device)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        _one_run(model, batch, new_tokens, clock)
    runs = [_one_run(model, batch, new_tokens, clock) for _ in range(repeats)]
    result = {key: statistics.median(r[key] for r in runs) if runs[0][key] is not None else None
              for key in (*STAGES, "total")}
    result.update(repeats=repeats, new_tokens=new_tokens, batch_size=batch["input_ids"].shape[0])
    result.update(peak_memory(device))
    return result


def peak_memory(device: torch.device) -> dict:
    """Peak memory in MB: CUDA's allocator peak since the last reset on GPU; on CPU the process's peak RSS
    (ru_maxrss: KiB on Linux, bytes on macOS) -- a process-lifetime high-water mark, not this call's alone."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_mb": rss / (2**20 if sys.platform == "darwin" else 2**10), "peak_memory_kind": "process_rss"}
