"""The study loop: for every setting, the eval runner (accuracy + the MoE compute it spent) and the latency probe;
one row per setting in DIR/study.jsonl, rewritten atomically after each setting with the Pareto marks.

Resuming: DIR is claimed as a molmo_fast "study" output keyed by the checkpoint (its resolved HF directory and a
fingerprint of its weight files), the task list and max_examples; a rerun with the same keys skips the settings
whose rows exist, a rerun with other keys is refused before anything runs.
"""

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from molmo_fast import knobs
from molmo_fast.eval.config import EvalConfig
from molmo_fast.eval.runner import first_batch, load_model
from molmo_fast.eval.runner import run as run_eval
from molmo_fast.eval.tasks import parse_tasks
from molmo_fast.latency import STAGES, measure_stages
from molmo_fast.model.moe import TOKEN_KINDS
from molmo_fast.outdir import claim_output_dir
from molmo_fast.runtime.checkpoints import resolve_checkpoint
from molmo_fast.runtime.device import init_distributed
from molmo_fast.study import pareto
from molmo_fast.study.grid import Setting, knob_strings, label, setting_id


@dataclass
class StudyConfig:
    checkpoint: str
    tasks: str
    settings: list[Setting]
    out: str = "runs/study"
    knobs: list[str] = field(default_factory=list)  # knob strings applied under every setting
    max_examples: int | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"
    repeats: int = 3
    data_dir: str = "data"

    def eval_config(self, setting: Setting, out: Path) -> EvalConfig:
        return EvalConfig(checkpoint=self.checkpoint, tasks=self.tasks, out=str(out), data_dir=self.data_dir,
                          max_examples=self.max_examples, batch_size=self.batch_size, device=self.device,
                          dtype=self.dtype, knobs=[*self.knobs, *knob_strings(setting)])


def study_params(cfg: StudyConfig) -> dict:
    """What a resumed study must share with the rows already written."""
    hf_dir = resolve_checkpoint(cfg.checkpoint).resolve()
    weights = sorted(p for p in hf_dir.iterdir() if p.name.startswith("model") and p.is_file())
    return {"checkpoint": str(hf_dir),
            "weights": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in weights},
            "tasks": [t.name for t in parse_tasks(cfg.tasks)], "max_examples": cfg.max_examples}


def read_rows(out: Path) -> list[dict]:
    path = out / "study.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_rows(out: Path, rows: list[dict]) -> dict:
    """Mark the Pareto rows, then replace study.jsonl and pareto.json atomically; returns pareto.json's content."""
    fronts = pareto.mark(rows)
    for name, text in (("study.jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
                       ("pareto.json", json.dumps(fronts, indent=1) + "\n")):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return fronts


def run_study(cfg: StudyConfig) -> list[dict]:
    params = study_params(cfg)
    out = claim_output_dir(cfg.out, "study", params=params, protected={cfg.checkpoint: "the checkpoint"}, reuse=True,
                           overwrite_hint="a study resumes only with the same checkpoint, tasks and max_examples; "
                                          "choose another --out")
    rows = read_rows(out)
    done = {r["id"] for r in rows}
    todo = [s for s in cfg.settings if setting_id(s) not in done]
    if len(todo) < len(cfg.settings):
        skipped = len(cfg.settings) - len(todo)
        print(f"study: {skipped} of {len(cfg.settings)} settings already in {out / 'study.jsonl'}, skipped")
    for setting in tqdm(todo, desc="study", unit="setting"):
        rows.append(run_setting(cfg, setting, out))
        write_rows(out, rows)
    write_rows(out, rows)
    return rows


def run_setting(cfg: StudyConfig, setting: Setting, out: Path) -> dict:
    sid = setting_id(setting)
    setting_dir = out / "settings" / sid
    eval_cfg = cfg.eval_config(setting, setting_dir)
    results = run_eval(eval_cfg)
    device = init_distributed(cfg.device).device
    model, pre, _ = load_model(eval_cfg, device)
    batch = first_batch(eval_cfg, parse_tasks(cfg.tasks)[0], model, pre)
    latency = measure_stages(model, batch, new_tokens=model.generation_config["max_new_tokens"],
                             repeats=cfg.repeats)
    routing = _total_routing(results)
    # rows generated per task: the last batch is filled up with copies of a real example, which run (and count)
    rows_run = [math.ceil(r["n"] / cfg.batch_size) * cfg.batch_size for r in results]
    scores = [r["score"] for r in results if r["score"] is not None]
    row = {
        "id": sid, "setting": setting, "label": label(setting), "knobs": knobs.describe(model),
        "metrics": {r["task"]: r["metrics"] for r in results},
        "primary": {r["task"]: r["primary"] for r in results},
        "score": statistics.mean(scores) if scores else None,
        "n_examples": sum(r["n"] for r in results),
        "latency_ms": {stage: latency[stage] for stage in STAGES},
        "latency_probe": {k: latency[k] for k in ("repeats", "new_tokens", "batch_size", "total")},
        "active_experts_per_token": {kind: routing[kind]["mean_k"] for kind in (*TOKEN_KINDS, "all")},
        "routed_tokens": {kind: routing[kind]["tokens"] for kind in (*TOKEN_KINDS, "all")},
        "gflops_per_example": llm_gflops(model, [(r["routing"], n) for r, n in zip(results, rows_run, strict=True)])
        / max(sum(rows_run), 1),
        "peak_memory_mb": latency["peak_memory_mb"], "peak_memory_kind": latency["peak_memory_kind"],
        "pareto": False,
    }
    (setting_dir / "setting.json").write_text(json.dumps({"setting": setting, "knobs": eval_cfg.knobs}) + "\n")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _total_routing(results: list[dict]) -> dict:
    total = {kind: {"tokens": 0, "pairs": 0} for kind in (*TOKEN_KINDS, "all")}
    for r in results:
        for kind, entry in r["routing"]["total"].items():
            total[kind]["tokens"] += entry["tokens"]
            total[kind]["pairs"] += entry["pairs"]
    for entry in total.values():
        entry["mean_k"] = entry["pairs"] / entry["tokens"] if entry["tokens"] else 0
    return total


def llm_gflops(model, routings: list[tuple[dict, int]]) -> float:
    """LLM matmul GFLOPs that (routing stats, generated rows) pairs cost, 2 per multiply-add: per layer, attention
    projections and router per routed token plus one expert MLP per active (token, expert) pair; the LM head once
    per row's prompt and per generated token. Attention scores and the vision tower are not included."""
    blocks = model.llm.blocks
    flops = 0.0
    for routing, prompts in routings:
        for block, layer in zip(blocks, routing["layers"], strict=True):
            moe = block.moe
            dense = sum(p.numel() for p in block.attn.parameters() if p.dim() > 1) + moe.router.weight.numel()
            per_pair = (moe.w_gate_up.numel() + moe.w_down.numel()) // moe.num_experts
            flops += 2 * sum(dense * e["tokens"] + per_pair * e["pairs"] for e in layer.values())
        generated = max(layer["generated"]["tokens"] for layer in routing["layers"])
        flops += 2 * model.llm.lm_head.weight.numel() * (generated + prompts)
    return flops / 1e9
