"""Generation mode: batched greedy answers, scored per example and appended to `predictions.rank{R}.jsonl` after
every batch (so an interrupted run resumes by skipping the ids already written); rank 0 then merges the rank files
into `predictions.jsonl` and writes the task's `metrics.json`."""

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from molmo_fast.data.preprocessor import Preprocessor
from molmo_fast.eval.config import EvalConfig
from molmo_fast.eval.inputs import model_inputs, task_loader
from molmo_fast.eval.tasks import Task
from molmo_fast.model.molmoe import MolmoE

log = logging.getLogger(__name__)


def read_rows(task_dir: Path) -> dict[str, dict]:
    """The predictions written so far (all rank files), one row per id."""
    rows: dict[str, dict] = {}
    for f in sorted(task_dir.glob("predictions*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            rows.setdefault(row["id"], row)
    return rows


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


@torch.no_grad()
def generate_task(task: Task, model: MolmoE, pre: Preprocessor, cfg: EvalConfig, shard_dir: Path, task_dir: Path,
                  rank: int, world: int, device: torch.device) -> None:
    """This rank's share of the task, appended to predictions.rank{rank}.jsonl (ids already scored are skipped)."""
    done = set(read_rows(task_dir))
    loader = task_loader(task, pre, cfg, shard_dir, rank, world, for_inference=True)
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
            inputs = model_inputs(batch, device, dtype)
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
    rows = sorted(read_rows(task_dir).values(), key=lambda r: r["id"])
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
