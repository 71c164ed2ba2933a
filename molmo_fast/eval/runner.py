"""The eval runner: checkpoint -> per-task shard sets -> batched greedy generation -> scores -> files.

Per task, `OUT/{task}/` holds `settings.json` (what produced the numbers), `predictions.jsonl` (id, prompt,
prediction, answers, score) and `metrics.json`; `OUT/metrics.json` collects every task and `OUT/tb/` has the
TensorBoard scalars `eval/{task}/{metric}`. Ranks split each shard set with the data pipeline's `EvalLoader`
(every example exactly once) and append to `predictions.rank{R}.jsonl` after every batch; rank 0 merges them.
An interrupted run resumes by skipping the ids already written, provided the settings are unchanged.
Loss mode (`loss=True`) instead reports teacher-forced loss and token accuracy in `OUT/{task}_loss/`.
Runtime knobs (MoE top-k, routing, skipped blocks, crops, generation length) are applied once and recorded in
every task's settings, so an accuracy-vs-cost sweep is one command per setting.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from molmo_fast import knobs
from molmo_fast.data.loader import EvalLoader, LoaderConfig
from molmo_fast.data.preprocessor import Preprocessor
from molmo_fast.eval.config import DEVICE_FIELD, EvalConfig
from molmo_fast.eval.tasks import Task, parse_tasks
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.runtime.checkpoints import checkpoint_step, resolve_checkpoint
from molmo_fast.runtime.device import DTYPES, Env, barrier, init_distributed, to_device
from molmo_fast.runtime.loss import loss_positions, masked_token_sums

log = logging.getLogger(__name__)


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


@dataclass
class _TaskPreprocess:
    """What the loader's workers call: the task's prompt style, then the checkpoint's preprocessor (picklable)."""

    task: Task
    preprocessor: Preprocessor

    def __call__(self, example: dict, rng=None, for_inference: bool = False) -> dict:
        return self.preprocessor(self.task.prompt_example(example), rng=rng, for_inference=for_inference)


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


def _settings(task: Task, cfg: EvalConfig, model: MolmoE, pre: Preprocessor, hf_dir: Path,
              shard_dir: Path) -> dict[str, Any]:
    """Everything that determines the numbers; a resumed or cached run must match it."""
    return {"task": asdict(task), "checkpoint": str(hf_dir), "step": checkpoint_step(hf_dir),
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


def _read_rows(task_dir: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for f in sorted(task_dir.glob("predictions*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            rows.setdefault(row["id"], row)
    return rows


# ------------------------------------------------------------------------------------------------- generation
def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _gold(task: Task, ex: dict) -> Any:
    if task.metric == "pointing":
        return ex["points"]
    if task.metric == "count" and ex.get("count") is not None:
        return [str(ex["count"])]
    if "answers" in ex:
        return ex["answers"]
    if "options" in ex:
        return [ex["options"][ex["answer_idx"]]]
    return ex.get("metadata", {}).get("answer")


def _decode_new(pre: Preprocessor, tokens: torch.Tensor) -> str:
    ids = tokens.tolist()
    eos = pre.tokenizer.eos_id
    return pre.tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids).strip()


_TEXT_KEYS = ("input_ids", "labels", "loss_masks", "position_ids", "subsegment_ids")


def _model_inputs(batch: dict, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Batch tensors on `device`, with the collator's fixed-length padding trimmed to the longest sequence of the
    batch (sequences are left-aligned, so nothing valid is cut)."""
    length = int((batch["input_ids"] != -1).sum(1).max())
    out = {k: batch[k][:, :length].to(device) for k in _TEXT_KEYS if k in batch}
    out.update(images=batch["images"].to(device, dtype), image_masks=batch["image_masks"].to(device, dtype),
               image_input_idx=batch["image_input_idx"].to(device))
    return out


@torch.no_grad()
def generate_task(task: Task, model: MolmoE, pre: Preprocessor, cfg: EvalConfig, shard_dir: Path, task_dir: Path,
                  rank: int, world: int, device: torch.device) -> None:
    """This rank's share of the task, appended to predictions.rank{rank}.jsonl (ids already scored are skipped)."""
    done = set(_read_rows(task_dir))
    loader = EvalLoader(shard_dir, _TaskPreprocess(task, pre),
                        LoaderConfig(cfg.batch_size, task.sequence_length, num_workers=cfg.num_workers),
                        rank, world, for_inference=True, limit=cfg.max_examples)
    dtype = next(model.parameters()).dtype
    max_new_tokens = cfg.max_new_tokens or task.max_new_tokens
    pred_file = task_dir / f"predictions.rank{rank}.jsonl"
    with open(pred_file, "a") as out:
        if out.tell() and _last_byte(pred_file) != b"\n":
            out.write("\n")  # a killed run may have left half a line; start ours on a fresh one
        for batch in tqdm(loader, desc=task.name, disable=rank != 0, unit="batch"):
            metas = batch["metadata"]
            todo = [i for i, m in enumerate(metas) if not m.get("padding") and m["id"] not in done]
            if not todo and not cfg.fsdp:  # under FSDP every rank takes part in every batch's collectives
                continue
            inputs = _model_inputs(batch, device, dtype)
            ids = model.generate(inputs["input_ids"], inputs["images"], inputs["image_masks"],
                                 inputs["image_input_idx"], max_new_tokens=max_new_tokens,
                                 eos_token_id=pre.tokenizer.eos_id, sync_ranks=cfg.fsdp)
            new_tokens = ids[:, inputs["input_ids"].shape[1]:].cpu()
            for i in todo:
                text = _decode_new(pre, new_tokens[i])
                row = {"id": metas[i]["id"], "prompt": pre.tokenizer.decode(batch["input_ids"][i].tolist()),
                       "prediction": text, "answers": _gold(task, metas[i]), "score": task.score(text, metas[i])}
                out.write(json.dumps(row) + "\n")
            out.flush()
    if loader.stats["corrupt"] or loader.stats["truncated"]:
        log.warning("task %s rank %d: %s", task.name, rank, loader.stats)


def finalize_task(task: Task, task_dir: Path, settings: dict, elapsed_s: float) -> dict[str, Any]:
    """Rank 0: merge the rank files into predictions.jsonl (one row per id) and write metrics.json."""
    rows = sorted(_read_rows(task_dir).values(), key=lambda r: r["id"])
    tmp = task_dir / "predictions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, task_dir / "predictions.jsonl")
    for f in task_dir.glob("predictions.rank*.jsonl"):
        f.unlink()
    values: dict[str, list[float]] = {}
    for row in rows:
        for name, v in row["score"].items():
            if v is not None:
                values.setdefault(name, []).append(float(v))
    metrics = {name: sum(v) / len(v) for name, v in values.items()}
    result = {"task": task.name, "primary": task.primary, "score": metrics.get(task.primary), "metrics": metrics,
              "n": len(rows), "paper_score": task.paper_score, "elapsed_s": round(elapsed_s, 2),
              "settings": settings}
    (task_dir / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# ------------------------------------------------------------------------------------------------- loss mode
@torch.no_grad()
def loss_task(task: Task, model: MolmoE, pre: Preprocessor, cfg: EvalConfig, shard_dir: Path, rank: int, world: int,
              device: torch.device) -> dict[str, float]:
    """Teacher-forced cross-entropy and argmax accuracy over the loss-masked tokens (both weighted by the loss
    mask, as in training), summed over ranks."""
    loader = EvalLoader(shard_dir, _TaskPreprocess(task, pre),
                        LoaderConfig(cfg.batch_size, task.sequence_length, num_workers=cfg.num_workers),
                        rank, world, for_inference=False, limit=cfg.max_examples)
    dtype = next(model.parameters()).dtype
    sums = torch.zeros(5, dtype=torch.float64)  # weighted CE, weight, weighted correct, loss tokens, examples
    for batch in tqdm(loader, desc=f"{task.name} (loss)", disable=rank != 0, unit="batch"):
        inputs = _model_inputs(batch, "cpu", dtype)
        real = torch.tensor([not m.get("padding") for m in batch["metadata"]])
        inputs["loss_masks"] = inputs["loss_masks"] * real[:, None]
        # As in training: the LM head runs at the loss positions only, located on the host copy.
        at = to_device(loss_positions(inputs), device)
        inputs = to_device(inputs, device)
        out = model(inputs["input_ids"], inputs["images"], inputs["image_masks"], inputs["image_input_idx"],
                    position_ids=inputs["position_ids"].clamp_min(0), subsegment_ids=inputs.get("subsegment_ids"),
                    logits_at=at["loss_at"], right_padded=True)
        token = masked_token_sums(out.logits, at["loss_labels"], at["loss_weight"])
        sums += torch.stack([token["ce"], token["weight"], token["correct"], (at["loss_weight"] > 0).sum(),
                             real.sum().to(device)]).double().cpu()
    if world > 1:
        dist.all_reduce(sums)
    ce_sum, weight, correct, tokens, n = sums.tolist()
    return {"loss": ce_sum / max(weight, 1e-9), "accuracy": correct / max(weight, 1e-9), "tokens": tokens, "n": n}


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


def run(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Evaluate every task of `cfg`; returns the per-task results (rank 0; other ranks get [])."""
    env = _distributed(cfg)
    rank, world, device = env.rank, env.world_size, env.device
    model, pre, hf_dir = load_model(cfg, device, rank, world)
    default_crops = pre.max_crops
    out_dir = Path(cfg.out)
    results = []
    for task in parse_tasks(cfg.tasks):
        knobs.set_max_crops(model, cfg.max_crops or task.max_crops or default_crops, pre)
        knobs.set_max_new_tokens(model, cfg.max_new_tokens or task.max_new_tokens)
        shard_dir = _shard_dir(task, cfg, rank, world)
        task_dir = out_dir / (f"{task.name}_loss" if cfg.loss else task.name)
        settings = _settings(task, cfg, model, pre, hf_dir, shard_dir)
        _prepare_task_dir(task_dir, settings, cfg, rank, world)
        start = time.perf_counter()
        if cfg.loss:
            stats = loss_task(task, model, pre, cfg, shard_dir, rank, world, device)
            result = {"task": task.name, "primary": "loss", "score": stats["loss"], "metrics": stats,
                      "n": int(stats["n"]), "paper_score": None, "settings": settings}
            if rank == 0:
                (task_dir / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
        else:
            generate_task(task, model, pre, cfg, shard_dir, task_dir, rank, world, device)
            barrier(world)
            result = finalize_task(task, task_dir, settings, time.perf_counter() - start) if rank == 0 else None
        if rank == 0:
            results.append(result)
        barrier(world)
    if rank == 0:
        _write_outputs(out_dir, results, checkpoint_step(hf_dir))
    return results


def _write_outputs(out_dir: Path, results: list[dict[str, Any]], step: int) -> None:
    summary_file = out_dir / "metrics.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    with SummaryWriter(str(out_dir / "tb")) as writer:
        for r in results:
            name = f"{r['task']}_loss" if r["primary"] == "loss" else r["task"]
            summary[name] = {k: r[k] for k in ("primary", "score", "metrics", "n", "paper_score", "settings")}
            for metric, value in r["metrics"].items():
                writer.add_scalar(f"eval/{name}/{metric}", value, step)
    summary_file.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
