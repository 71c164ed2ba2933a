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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gin
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from molmo_fast import knobs
from molmo_fast.data.loader import EvalLoader, LoaderConfig
from molmo_fast.data.preprocessor import Preprocessor
from molmo_fast.eval.tasks import Task, parse_tasks
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.train.data import to_device
from molmo_fast.train.trainer import loss_positions

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@gin.configurable
@dataclass
class EvalConfig:
    """One eval invocation; gin files bind it, command-line flags override (see `python -m molmo_fast.eval`)."""

    checkpoint: str = ""
    tasks: str | list[str] = ""  # "chart_qa,doc_qa", or the suites "paper" / "synthetic"
    out: str = "runs/eval"
    data_dir: str = "data"  # task shards live at {data_dir}/{source}/{split}
    step: int | None = None  # a run directory's checkpoint step; None = latest
    max_examples: int | None = None  # per task, the first N of the shard set
    batch_size: int = 8
    num_workers: int = 0
    device: str = "auto"
    dtype: str = "float32"  # Molmo evaluates in fp32
    top_k: int | list[int] | None = None  # MoE experts per token (knob); None = the checkpoint's
    knobs: list[str] = field(default_factory=list)  # molmo_fast.knobs strings: "routing=top_p:0.9", "skip_blocks=3"
    max_crops: int | None = None  # overrides every task's crop setting (knob)
    max_new_tokens: int | None = None  # overrides every task's generation length
    loss: bool = False
    fsdp: bool = False
    overwrite: bool = False
    synthetic_seed: int = 0  # held out from training by the split name ("validation"), not the seed

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError("EvalConfig.checkpoint is required (an HF checkpoint dir or a training run dir)")
        if not self.tasks:
            raise ValueError("EvalConfig.tasks is required, e.g. 'chart_qa,doc_qa' or 'synthetic'")
        try:
            parse_tasks(self.tasks)
        except KeyError as e:
            raise ValueError(f"EvalConfig.tasks = {self.tasks!r}: {e.args[0]}") from None
        if self.dtype not in DTYPES:
            raise ValueError(f"EvalConfig.dtype = {self.dtype!r}, expected one of {sorted(DTYPES)}")
        parsed = knobs.Knobs.parse(self.knobs)
        for name in ("top_k", "max_crops", "max_new_tokens"):  # a knob string fills an unset explicit field
            if getattr(self, name) is None:
                setattr(self, name, getattr(parsed, name))
        for name in ("batch_size", "max_examples", "max_crops", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"EvalConfig.{name} = {value}, expected >= 1")


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> Path:
    """An HF-layout directory to load: `path` itself if it is one; for a training run directory, the export
    `RUN_DIR/hf` (step None) or `RUN_DIR/checkpoints/step_N`, exported once to `step_N/hf`."""
    path = Path(path)
    if _is_hf_dir(path):
        if step is not None:
            raise ValueError(f"--step {step} given, but {path} is a single HF checkpoint, not a run directory")
        return path
    if not (path / "checkpoints").is_dir() and not _is_hf_dir(path / "hf"):
        raise FileNotFoundError(f"{path}: neither an HF checkpoint (config.json + model.safetensors[.index.json]) "
                                f"nor a run directory with checkpoints/step_N")
    # The training stack (DCP, FSDP) is imported only for run directories and FSDP, never for a plain HF eval.
    from molmo_fast.train.checkpoint import checkpoint_dirs, find_checkpoint

    if step is None and _is_hf_dir(path / "hf"):
        found = checkpoint_dirs(path)
        # The end-of-run export, unless a resumed run has since saved a newer checkpoint.
        if not found or (found[-1][1] / "train_state.json").stat().st_mtime <= (path / "hf").stat().st_mtime:
            return path / "hf"
    ckpt_dir = find_checkpoint(path, step)
    if not _is_hf_dir(ckpt_dir / "hf"):
        from molmo_fast.export import export_run

        export_run(path, ckpt_dir / "hf", step=int(ckpt_dir.name.removeprefix("step_")))
    return ckpt_dir / "hf"


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def _checkpoint_step(hf_dir: Path) -> int:
    """The training step an HF dir came from (its step_N parent, or a run's latest checkpoint for RUN_DIR/hf)."""
    parent = hf_dir.parent
    if parent.name.startswith("step_") and parent.name[5:].isdigit():
        return int(parent.name[5:])
    if hf_dir.name == "hf" and (parent / "checkpoints").is_dir():
        from molmo_fast.train.checkpoint import checkpoint_dirs

        steps = checkpoint_dirs(parent)
        return steps[-1][0] if steps else 0
    return 0


# ------------------------------------------------------------------------------------------------- setup
def torchrun_env() -> tuple[int, int]:
    """(world size, local rank) that torchrun gave this process; (1, 0) for a plain launch."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(device: str, world: int, local_rank: int, cuda_available: bool) -> tuple[torch.device, str]:
    """This rank's device and the process-group backend for it. Under torchrun each rank takes its own GPU,
    cuda:LOCAL_RANK, and CUDA tensors go over nccl (gloo stays for the host-side reductions)."""
    if device.startswith("cuda") and not cuda_available:
        raise ValueError(f"EvalConfig.device (--device) = {device!r}, but CUDA is not available (use 'cpu' or 'auto')")
    if device.startswith("cuda:") and world > 1:
        raise ValueError(f"EvalConfig.device (--device) = {device!r} would put all {world} torchrun ranks on one GPU; "
                         f"use 'cuda' or 'auto', which give each rank cuda:LOCAL_RANK")
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    resolved = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    return resolved, "cpu:gloo,cuda:nccl" if resolved.type == "cuda" else "gloo"


def _distributed(cfg: EvalConfig) -> tuple[int, int, torch.device]:
    device, backend = resolve_device(cfg.device, *torchrun_env(), torch.cuda.is_available())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group, so nccl binds each rank to its own GPU
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend)
    if cfg.fsdp and not dist.is_initialized():
        raise ValueError("EvalConfig.fsdp needs a process group: launch with torchrun --nproc_per_node=N")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return rank, world, device


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def load_model(cfg: EvalConfig, device: torch.device, rank: int = 0, world: int = 1,
               ) -> tuple[MolmoE, Preprocessor, Path]:
    # Rank 0 resolves first: turning a run's checkpoint into an HF export writes files the others then reuse.
    hf_dir = resolve_checkpoint(cfg.checkpoint, cfg.step) if rank == 0 else None
    _barrier(world)
    hf_dir = hf_dir or resolve_checkpoint(cfg.checkpoint, cfg.step)
    dtype = DTYPES[cfg.dtype]
    if cfg.fsdp:
        from molmo_fast.train.parallelize import parallelize

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
        from molmo_fast.data.sources.synthetic import shared_synthetic_set

        if rank == 0:
            shared_synthetic_set(cfg.data_dir, task.source, task.synthetic_size, cfg.synthetic_seed, task.split)
        _barrier(world)
        shard_dir = shared_synthetic_set(  # rank 0 built it: this only finds itcfg.data_dir, task.source, task.synthetic_size, cfg.synthetic_seed,
                                         task.split)
    if not (shard_dir / "sizes.json").is_file():
        raise FileNotFoundError(f"task {task.name!r}: no shard set at {shard_dir}; build it with "
                                f"python -m molmo_fast.data.build --source {task.source} --split {task.split} "
                                f"--out {shard_dir}")
    return shard_dir


def _settings(task: Task, cfg: EvalConfig, model: MolmoE, pre: Preprocessor, hf_dir: Path,
              shard_dir: Path) -> dict[str, Any]:
    """Everything that determines the numbers; a resumed or cached run must match it."""
    return {"task": asdict(task), "checkpoint": str(hf_dir), "step": _checkpoint_step(hf_dir),
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
    _barrier(world)


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
    """Teacher-forced cross-entropy and argmax accuracy over the loss-masked tokens, summed over ranks."""
    loader = EvalLoader(shard_dir, _TaskPreprocess(task, pre),
                        LoaderConfig(cfg.batch_size, task.sequence_length, num_workers=cfg.num_workers),
                        rank, world, for_inference=False, limit=cfg.max_examples)
    dtype = next(model.parameters()).dtype
    sums = torch.zeros(5, dtype=torch.float64)  # weighted CE, mask weight, correct tokens, loss tokens, examples
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
        logits = out.logits.float()
        labels, weight = at["loss_labels"], at["loss_weight"]
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        counted = weight > 0
        hit = (logits.argmax(-1) == labels) & counted
        sums += torch.stack([(ce * weight).sum(), weight.sum(), hit.sum(), counted.sum(),
                             real.sum().to(device)]).double().cpu()
    if world > 1:
        dist.all_reduce(sums)
    ce_sum, weight, correct, tokens, n = sums.tolist()
    return {"loss": ce_sum / max(weight, 1e-9), "accuracy": correct / max(tokens, 1.0), "tokens": tokens, "n": n}


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
    rank, world, device = _distributed(cfg)
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
            _barrier(world)
            result = finalize_task(task, task_dir, settings, time.perf_counter() - start) if rank == 0 else None
        if rank == 0:
            results.append(result)
        _barrier(world)
    if rank == 0:
        _write_outputs(out_dir, results, _checkpoint_step(hf_dir))
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
