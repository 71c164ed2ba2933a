"""What a resume may change: exactly nothing that defines the data stream, the model or the optimisation, unless
the user names it with `--allow_changed`.

Every checkpoint's train_state.json records the resolved config (`config_record`). On resume, each field outside
`FREE` (cadences, logging, performance switches, paths of inputs used only at the start) must equal the recorded
value; a difference stops the run with one line naming the field, the old and the new value. An allowed
difference is logged, and the run's config files are rewritten after the old ones are kept under
`RUN_DIR/config_history/step_N/`. The data loader then checks its own stream settings (shard files, world size)
against the ones the checkpoint recorded.
"""

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from molmo_fast.runtime.checkpoints import checkpoint_dirs, find_checkpoint
from molmo_fast.train.checkpoint import read_train_state

# Settings that change how a run is executed or reported, not what it computes.
FREE = {
    "ModelConfig": {"init_from", "llm_from", "vit_from", "init_seed", "init_scheme", "moe_impl"},
    "DataConfig": {"synthetic_dir"},
    "TrainConfig": {"run_dir", "micro_batch_size", "activation_checkpointing", "compile", "defer_grad_sync",
                    "log_every", "checkpoint_every", "keep_last", "export_hf_at_end", "progress_bar", "peak_flops",
                    "eval_every", "eval_tasks", "eval_max_examples", "eval_batch_size", "eval_loss",
                    "eval_data_dir"},
}
_SECTIONS = {"model": "ModelConfig", "data": "DataConfig", "optim": "OptimConfig", "train": "TrainConfig"}
# Fields whose change rewrites a file of the run dir: model_config.json, preprocessor/.
MODEL_FIELDS = {"ModelConfig.preset", "ModelConfig.hf_overrides"}
PREPROCESSOR_FIELDS = {"DataConfig.preprocessor", "DataConfig.image_overrides", "DataConfig.max_crops"}


def config_record(cfg) -> dict[str, dict[str, Any]]:
    """The resolved config as JSON values (tuples become lists), keyed by class name."""
    record = {cls: dataclasses.asdict(getattr(cfg, section)) for section, cls in _SECTIONS.items()}
    return json.loads(json.dumps(record))


def find_resume_target(run_dir: Path, resume: str) -> Path:
    """`--resume latest` -> the run's newest complete checkpoint; `--resume DIR` -> DIR, which must be one of
    RUN_DIR/checkpoints/step_N. Errors say what was expected."""
    if resume == "latest":
        if not run_dir.is_dir():
            raise SystemExit(f"molmo_fast.train: --resume latest: the run directory {run_dir} does not exist "
                             f"(TrainConfig.run_dir); start the run without --resume")
        try:
            return find_checkpoint(run_dir)
        except FileNotFoundError as e:
            raise SystemExit(f"molmo_fast.train: --resume latest: {e}; the run stopped before its first "
                             f"checkpoint, so there is nothing to resume: remove {run_dir} or choose another "
                             f"TrainConfig.run_dir") from None
    path = Path(resume)
    ours = [p.resolve() for _, p in checkpoint_dirs(run_dir)]
    if path.resolve() not in ours:
        listed = ", ".join(p.name for p in ours[-3:]) or "none yet"
        raise SystemExit(f"molmo_fast.train: --resume {resume!r}: expected 'latest' or a complete checkpoint "
                         f"directory of TrainConfig.run_dir = {run_dir}, i.e. {run_dir}/checkpoints/step_N with a "
                         f"train_state.json (there: {listed}); to start from another run's weights, export it and "
                         f"set ModelConfig.init_from")
    return path


def check_resume(path: Path, cfg, allow_changed: list[str]) -> tuple[dict, list[tuple[str, Any, Any]]]:
    """The checkpoint's train state and the allowed changes; SystemExit naming every refused change."""
    try:
        state = read_train_state(path)
    except ValueError as e:
        raise SystemExit(f"molmo_fast.train: cannot resume: {e}") from None
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise SystemExit(f"molmo_fast.train: cannot resume from {path}: its train_state.json does not record the "
                         f"config (written by an older molmo_fast), so an unchanged data stream cannot be checked")
    now = config_record(cfg)
    known = {f"{cls}.{name}" for cls, fields in now.items() for name in fields}
    unknown = [name for name in allow_changed if name not in known]
    if unknown:
        raise SystemExit(f"molmo_fast.train: --allow_changed {', '.join(unknown)}: expected Class.field names such "
                         f"as DataConfig.seed")
    changes = [(f"{cls}.{name}", saved.get(cls, {}).get(name, "<not recorded>"), value)
               for cls, fields in now.items() for name, value in fields.items()
               if name not in FREE.get(cls, ()) and saved.get(cls, {}).get(name, "<not recorded>") != value]
    refused = [c for c in changes if c[0] not in allow_changed]
    if refused:
        what = "; ".join(f"{name} was {old!r}, now {new!r}" for name, old, new in refused)
        flags = " ".join(f"--allow_changed {name}" for name, _, _ in refused)
        raise SystemExit(f"molmo_fast.train: cannot resume {path} exactly: {what}; the data stream or the model "
                         f"would differ from the checkpointed run. Restore the setting, or pass {flags}")
    return state, changes


def record_changes(run_dir: Path, step: int, changes: list[tuple[str, Any, Any]], cfg) -> None:
    """Rank 0, after an allowed change: keeps the run's config files as they were under
    config_history/step_N/ and rewrites them for the new settings."""
    from molmo_fast.train.data import write_preprocessor_dir

    keep = run_dir / "config_history" / f"step_{step}"
    keep.mkdir(parents=True, exist_ok=True)
    names = {name for name, _, _ in changes}
    for name in ("config.gin", "operative_config.gin", "model_config.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, keep / name)
    if (run_dir / "preprocessor").is_dir():
        shutil.copytree(run_dir / "preprocessor", keep / "preprocessor", dirs_exist_ok=True)
    (keep / "changes.json").write_text(json.dumps([{"field": n, "old": o, "new": v} for n, o, v in changes],
                                                  indent=1) + "\n")
    (run_dir / "config.gin").write_text(cfg.gin_config)
    (run_dir / "operative_config.gin").unlink(missing_ok=True)  # rewritten after the next step
    if names & MODEL_FIELDS:
        cfg.model.build_config().to_hf_json(run_dir / "model_config.json")
    if names & PREPROCESSOR_FIELDS:
        write_preprocessor_dir(cfg.data, run_dir / "preprocessor")
