"""The eval runner: checkpoint -> per-task shard sets -> generation (molmo_fast/eval/generation.py) or loss mode
(molmo_fast/eval/loss_mode.py) -> scores -> files.

Per task, `OUT/{task}/` holds `settings.json` (what produced the numbers), `predictions.jsonl` (id, prompt,
prediction, answers, score) and `metrics.json`; `OUT/metrics.json` collects every task and `OUT/tb/` has the
TensorBoard scalars `eval/{task}/{metric}` (view with `tensorboard --logdir OUT`). Ranks split each shard set with
the data pipeline's `EvalLoader` (every example exactly once). An interrupted run resumes by skipping the ids
already written, provided the settings are unchanged. Loss mode (`loss=True`) instead reports teacher-forced loss
and token accuracy in `OUT/{task}_loss/`. Runtime knobs (MoE top-k, routing, skipped blocks, crops, generation
length) are applied once and recorded in every task's settings, so an accuracy-vs-cost sweep is one command per
setting. `evaluate` runs the tasks on a model already in memory: the trainer's in-loop validation calls it.
"""

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from molmo_fast import knobs
from molmo_fast.data.preprocessor import Preprocessor
from molmo_fast.eval.config import DEVICE_FIELD, EvalConfig
from molmo_fast.eval.generation import finalize_task, generate_task
from molmo_fast.eval.loss_mode import loss_task
from molmo_fast.eval.tasks import Task, parse_tasks
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.runtime.checkpoints import checkpoint_step, resolve_checkpoint
from molmo_fast.runtime.device import DTYPES, Env, barrier, init_distributed


# ------------------------------------------------------------------------------------------------- setup
def _distributed(cfg: EvalConfig) -> Env:
    env = init_distributed(cfg.device, field=DEVICE_FIELD)
    if cfg.fsdp and not dist.is_initialized():
        raise ValueError("EvalConfig.fsdp needs a process group: launch with torchrun --nproc_per_node=N")
    return env


def load_model(cfg: EvalConfig, device: torch.device, rank: int = 0, world: int = 1,
               ) -> tuple[MolmoE, Preprocessor, Path]:
    # Rank 0 resolves first: turning a run's checkpoint into an HF export writes files the others then reuse.
    hf_dir = resolve_checkpoint(cfg.checkpoint, cfg.step) if rank == 0 else None
    barrier(world)
    hf_dir = hf_dir or resolve_checkpoint(cfg.checkpoint, cfg.step)
    dtype = DTYPES[cfg.dtype]
    if cfg.fsdp:
        from molmo_fast.runtime.parallelize import parallelize

        model = MolmoE.from_pretrained(hf_dir, dtype=dtype, device="cpu")
        parallelize(model, device, bf16=False, activation_checkpointing=False, compile_blocks=False)
        model.to(device)
    else:
        model = MolmoE.from_pretrained(hf_dir, dtype=dtype, device=device)
    model.eval()
    parsed = knobs.Knobs.parse(cfg.knobs)
    knobs.Knobs(top_k=cfg.top_k, routing=parsed.routing, skip_blocks=parsed.skip_blocks).apply(model)
    return model, Preprocessor.from_pretrained(hf_dir), hf_dir


def _shard_dir(task: Task, cfg: EvalConfig, rank: int, world: int) -> Path:
    shard_dir = Path(cfg.data_dir) / task.source / task.split
    if task.synthetic_size:
        if rank == 0:
            from molmo_fast.data.sources.synthetic import ensure_synthetic_shards

            ensure_synthetic_shards(shard_dir, task.source, task.synthetic_size, cfg.synthetic_seed, split=task.split)
        barrier(world)
    if not (shard_dir / "sizes.json").is_file():
        raise FileNotFoundError(f"task {task.name!r}: no shard set at {shard_dir}; build it with "
                                f"python -m molmo_fast.data.build --source {task.source} --split {task.split} "
                                f"--out {shard_dir}")
    return shard_dir


def _settings(task: Task, cfg: EvalConfig, model: MolmoE, pre: Preprocessor, source: str, step: int,
              shard_dir: Path) -> dict[str, Any]:
    """Everything that determines the numbers; a resumed or cached run must match it."""
    return {"task": asdict(task), "checkpoint": source, "step": step,
            "shards": str(shard_dir.resolve()),
            "max_crops": pre.max_crops, "max_new_tokens": cfg.max_new_tokens or task.max_new_tokens,
            "sequence_length": task.sequence_length, "max_examples": cfg.max_examples, "loss": cfg.loss,
            "synthetic_seed": cfg.synthetic_seed if task.synthetic_size else None, "model": knobs.describe(model)}


def _prepare_task_dir(task_dir: Path, settings: dict, cfg: EvalConfig, rank: int, world: int) -> None:
    settings_file = task_dir / "settings.json"
    if rank == 0:
        if cfg.overwrite and task_dir.exists():
            for f in task_dir.iterdir():
                f.unlink()
        task_dir.mkdir(parents=True, exist_ok=True)
        if settings_file.is_file():
            old = json.loads(settings_file.read_text())
            if old != json.loads(json.dumps(settings)):
                raise ValueError(f"{task_dir} holds results made with other settings; pass --overwrite or "
                                 f"another --out (old {settings_file}: {old}, new: {settings})")
        settings_file.write_text(json.dumps(settings, indent=1) + "\n")
    barrier(world)


# ------------------------------------------------------------------------------------------------- driver
def summary_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'task':<22}{'metric':<24}{'score':>8}{'n':>8}{'paper':>8}"]
    for r in results:
        score = "-" if r["score"] is None else f"{100 * r['score']:.1f}"
        if r["primary"] == "loss":
            score = f"{r['score']:.4f}"
        paper = "" if r.get("paper_score") is None else f"{r['paper_score']:.1f}"
        lines.append(f"{r['task']:<22}{r['primary']:<24}{score:>8}{r['n']:>8}{paper:>8}")
    return "\n".join(lines)


def evaluate(model: MolmoE, pre: Preprocessor, cfg: EvalConfig, env: Env, source: str,
             step: int) -> list[dict[str, Any]]:
    """Every task of `cfg` on `model` (sharded with FSDP when `cfg.fsdp`: then every rank takes part in every
    batch), files under `cfg.out`; `source` and `step` name the weights in the settings. Returns the per-task
    results on rank 0, [] on the others."""
    default_crops = pre.max_crops
    out_dir = Path(cfg.out)
    results = []
    for task in parse_tasks(cfg.tasks):
        knobs.set_max_crops(model, cfg.max_crops or task.max_crops or default_crops, pre)
        knobs.set_max_new_tokens(model, cfg.max_new_tokens or task.max_new_tokens)
        shard_dir = _shard_dir(task, cfg, env.rank, env.world_size)
        task_dir = out_dir / _result_name(task.name, cfg.loss)
        settings = _settings(task, cfg, model, pre, source, step, shard_dir)
        _prepare_task_dir(task_dir, settings, cfg, env.rank, env.world_size)
        start = time.perf_counter()
        if cfg.loss:
            stats = loss_task(task, model, pre, cfg, shard_dir, env.rank, env.world_size, env.device)
            result = {"task": task.name, "primary": "loss", "score": stats["loss"], "metrics": stats,
                      "n": int(stats["n"]), "paper_score": None, "settings": settings}
            if env.is_main:
                (task_dir / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
        else:
            generate_task(task, model, pre, cfg, shard_dir, task_dir, env.rank, env.world_size, env.device)
            barrier(env.world_size)
            elapsed = time.perf_counter() - start
            result = finalize_task(task, task_dir, settings, elapsed) if env.is_main else None
        if env.is_main:
            results.append(result)
        barrier(env.world_size)
    if env.is_main:
        _write_summary(out_dir, results)
    return results


def run(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Loads `cfg.checkpoint` and evaluates every task; files under `cfg.out`, TensorBoard under `cfg.out`/tb.
    Returns the per-task results (rank 0; other ranks get [])."""
    env = _distributed(cfg)
    model, pre, hf_dir = load_model(cfg, env.device, env.rank, env.world_size)
    step = checkpoint_step(hf_dir)
    results = evaluate(model, pre, cfg, env, str(hf_dir), step)
    if env.is_main:
        with SummaryWriter(str(Path(cfg.out) / "tb")) as writer:
            for name, value in scalars(results).items():
                writer.add_scalar(name, value, step)
    return results


def _result_name(task: str, loss: bool) -> str:
    return f"{task}_loss" if loss else task


def scalars(results: list[dict[str, Any]]) -> dict[str, float]:
    """The TensorBoard scalars of a set of results: `eval/{task}/{metric}` (`{task}_loss` in loss mode)."""
    return {f"eval/{_result_name(r['task'], r['primary'] == 'loss')}/{metric}": value
            for r in results for metric, value in r["metrics"].items()}


def _write_summary(out_dir: Path, results: list[dict[str, Any]]) -> None:
    summary_file = out_dir / "metrics.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    for r in results:
        summary[_result_name(r["task"], r["primary"] == "loss")] = {
            k: r[k] for k in ("primary", "score", "metrics", "n", "paper_score", "settings")}
    summary_file.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
