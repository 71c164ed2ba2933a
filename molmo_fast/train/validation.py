"""In-loop validation: every `TrainConfig.eval_every` steps the training model (sharded as it trains) runs eval
tasks through the eval package; files go to RUN_DIR/eval/step_N/ (as `python -m molmo_fast.eval` writes them) and
the scalars `eval/{task}/{metric}` to the run's TensorBoard and metrics.jsonl at step N."""

from pathlib import Path

import torch
from torch import nn

from molmo_fast.data.preprocessor import Preprocessor
from molmo_fast.eval.config import EvalConfig
from molmo_fast.eval.runner import evaluate, scalars
from molmo_fast.runtime.device import Env
from molmo_fast.train.config import Config


def validation_config(cfg: Config, run_dir: Path, step: int) -> EvalConfig:
    """The eval settings of the validation at `step`. `fsdp`: every rank takes part in every batch, as the sharded
    training model needs; `overwrite`: a resumed run re-evaluates a step rather than reusing a previous attempt's
    predictions, which came from other weights."""
    t = cfg.train
    return EvalConfig(checkpoint=str(run_dir), tasks=t.eval_tasks, out=str(run_dir / "eval" / f"step_{step}"),
                      data_dir=t.eval_data_dir, max_examples=t.eval_max_examples, batch_size=t.eval_batch_size,
                      loss=t.eval_loss, fsdp=True, overwrite=True)


def validate(model: nn.Module, cfg: Config, env: Env, run_dir: Path, step: int) -> dict[str, float]:
    """Collective: evaluates `model` on `TrainConfig.eval_tasks`; returns the scalars on rank 0 ({} elsewhere).
    The training RNG stream is untouched, so a run's losses do not depend on whether it validates."""
    eval_cfg = validation_config(cfg, run_dir, step)
    pre = Preprocessor.from_pretrained(run_dir / "preprocessor")
    devices = [env.device] if env.device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            results = evaluate(model, pre, eval_cfg, env, str(run_dir), step)
    finally:
        model.train()
    return scalars(results)
