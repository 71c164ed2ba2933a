"""Rank-0 scalar logging to TensorBoard and RUN_DIR/metrics.jsonl, plus throughput / MFU bookkeeping.

Tags are `/`-grouped with units in the name. The same dict goes to both sinks, one JSON object
per logged step, so a run can be plotted without TensorBoard.
"""

import contextlib
import json
import resource
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


class FlopCounter:
    """Model FLOPs of a training step (forward + backward = 3x forward), from parameter counts taken once.

    Matmuls count 6 per parameter per token it touches: the LLM blocks' active parameters (experts at top_k/E)
    per text token, the LM head per loss position only (the trainer computes logits there alone), the token
    embedding not at all (a lookup), the ViT blocks that run (up to the deepest one the connector reads) per ViT
    token (patches + CLS of every real crop; padding crops run but do no useful work) and the connector per patch
    of a real crop (an upper bound: its projector runs per pooled token). Attention scores add
    6 * layers * width * length per token in the causal LLM (half of the full square) and twice that in the
    bidirectional ViT.
    """

    def __init__(self, model):
        cfg = model.config
        self.vision, self.llm = cfg.vision, cfg.llm
        numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        # The ViT stops after the deepest block the connector reads.
        self.vit_layers_run = max(model.vit_layer_idx) + 1
        skipped = sum(numel(b) for b in model.vit.blocks[self.vit_layers_run:])
        self.n_vit, self.n_connector = numel(model.vit) - skipped, numel(model.connector)
        self.n_head = model.llm.lm_head.weight.numel()
        self.n_llm = (model.num_parameters(active=True) - numel(model.vit) - self.n_connector - self.n_head
                      - numel(model.llm.wte))

    def __call__(self, sequences: int, seq_len: int, crops: int, logit_positions: int) -> float:
        v = self.vision
        text_tokens, vit_len = sequences * seq_len, v.num_patches + 1
        vit_tokens = crops * vit_len
        return (6 * self.n_llm * text_tokens + 6 * self.llm.n_layers * self.llm.d_model * seq_len * text_tokens
                + 6 * self.n_head * logit_positions + 6 * self.n_connector * crops * v.num_patches
                + 6 * self.n_vit * vit_tokens + 12 * self.vit_layers_run * v.emb_dim * vit_len * vit_tokens)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory since the previous call: CUDA allocator peaks (reset here), or the process's peak RSS on CPU."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        out = {"memory/max_allocated_gib": stats.get("allocated_bytes.all.peak", 0) / 2**30,
               "memory/max_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30,
               "memory/alloc_retries": float(stats.get("num_alloc_retries", 0))}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    return {"memory/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; inf (dropped on resume) for the line a kill -9 may have cut short."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


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
                kept = [line for line in path.read_text().splitlines() if _step_of(line) < purge_step]
                path.write_text("".join(line + "\n" for line in kept))
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


class StepReporter:
    """The trainer's reporting: throughput and MFU windows, the progress bar, and the logged metrics of a step
    (TensorBoard + metrics.jsonl on rank 0, see `MetricsLogger`)."""

    def __init__(self, model, cfg, env, run_dir: Path, start_step: int, resumed: bool):
        self.cfg, self.env = cfg, env
        self.count_flops = FlopCounter(model)
        self.peak = peak_flops(env.device, cfg.train.peak_flops)
        self.meter = Throughput()
        self.logger = MetricsLogger(run_dir, env.is_main, purge_step=start_step + 1 if resumed else None)
        if env.is_main and start_step == 0:
            self.logger.text("config", cfg.gin_config.replace("\n", "  \n"))
        self.progress = None
        if env.is_main and cfg.train.progress_bar:
            from tqdm import tqdm

            self.progress = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    @contextlib.contextmanager
    def waiting_for_data(self):
        t0 = time.perf_counter()
        yield
        self.meter.data_wait += time.perf_counter() - t0

    def step(self, micro_batches: list[dict], out) -> None:
        """Counts a finished step (`out`: the trainer's StepOutput); its micro-batches carry their loss positions."""
        crops = sum(int((b["images"] != -1).any(-1).any(-1).sum()) for b in micro_batches if "images" in b)
        logit_positions = sum(b["loss_at"].numel() for b in micro_batches)
        sequences = self.cfg.train.micro_batch_size * len(micro_batches)
        flops = self.count_flops(sequences, self.cfg.data.sequence_length, crops, logit_positions)
        self.meter.flops += flops * self.env.world_size
        self.meter.tokens += out.tokens
        self.meter.steps += 1
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{out.losses['loss']:.4f}")

    def log(self, step: int, out, tokens_seen: int, extra: dict[str, float]) -> dict[str, float]:
        """Logs the step's metrics and the throughput since the previous log; returns them."""
        window, world = self.meter.window(), self.env.world_size
        metrics = {"train/loss": out.losses["loss"], "train/lm_loss": out.losses["lm_loss"],
                   "train/zloss": out.losses["zloss"], "train/accuracy": out.losses["correct"],
                   "train/moe_aux_loss": out.losses.get("moe_aux_loss", 0.0),
                   "train/loss_tokens": out.loss_tokens, "train/tokens_seen": float(tokens_seen),
                   "perf/tokens_per_s": window["tokens_per_s"],
                   "perf/tokens_per_s_per_device": window["tokens_per_s"] / world,
                   "perf/data_wait_pct": window["data_wait_pct"],
                   "perf/step_time_s": window["elapsed_s"] / max(window["steps"], 1)}
        metrics.update({f"optim/grad_norm/{k}": v for k, v in out.grad_norms.items()})
        metrics.update({f"optim/lr/{k}": v for k, v in out.lrs.items()})
        if self.peak:
            metrics["perf/mfu_pct"] = 100 * window["flops_per_s"] / (self.peak * world)
        metrics.update(memory_stats(self.env.device))
        metrics.update(out.router)
        metrics.update(extra)
        self.logger.log(step, metrics)
        self.meter.reset()
        return metrics

    def log_eval(self, step: int, scalars: dict[str, float]) -> None:
        """In-loop validation scalars (`eval/{task}/{metric}`), logged at the training step they measured; the time
        spent evaluating is left out of the throughput window."""
        self.logger.log(step, scalars)
        self.meter.reset()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.logger.close()
