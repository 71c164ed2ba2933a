"""Rank-0 scalar logging to TensorBoard and RUN_DIR/metrics.jsonl, plus throughput / MFU bookkeeping.

Tags are `/`-grouped with units in the name (ECOSYSTEM.md §4.1). The same dict goes to both sinks, one JSON object
per logged step, so a run can be plotted without TensorBoard.
"""

import json
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peak per device (FLOP/s), used for MFU when TrainConfig.peak_flops is not given.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def step_flops(model, sequences: int, seq_len: int, crops: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of `sequences` padded sequences and `crops` real crops.

    Matmuls count 6 per active parameter per token: LLM + connector parameters (experts at top_k/E) per text
    token, ViT parameters per ViT token (patches + CLS of every crop). Attention scores add
    6 * layers * width * length per token in the causal LLM and twice that in the bidirectional ViT.
    """
    cfg, v = model.config, model.config.vision
    n_vit = sum(p.numel() for p in model.vit.parameters())
    n_llm = model.num_parameters(active=True) - n_vit
    text_tokens, vit_len = sequences * seq_len, v.num_patches + 1
    vit_tokens = crops * vit_len
    return (6 * n_llm * text_tokens + 6 * cfg.llm.n_layers * cfg.llm.d_model * seq_len * text_tokens
            + 6 * n_vit * vit_tokens + 12 * v.num_layers * v.emb_dim * vit_len * vit_tokens)


class MetricsLogger:
    """Writes scalars on rank 0; a resumed run reuses the TensorBoard dir and hides events past the resume step."""

    def __init__(self, run_dir: str | Path, enabled: bool, purge_step: int | None = None):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = Path(run_dir)
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step, max_queue=1000)
            path = run_dir / "metrics.jsonl"
            if purge_step is not None and path.exists():
                kept = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] < purge_step]
                path.write_text("".join(l + "\n" for l in kept))
            self.jsonl = path.open("a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


class Throughput:
    """Wall time split into data wait and compute over a logging window."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.tokens = 0
        self.flops = 0.0
        self.steps = 0

    def window(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"elapsed_s": elapsed, "tokens_per_s": self.tokens / elapsed, "flops_per_s": self.flops / elapsed,
                "data_wait_pct": 100.0 * self.data_wait / elapsed, "steps": self.steps}
