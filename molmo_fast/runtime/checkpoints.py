"""Finding checkpoints: a run directory's complete `checkpoints/step_N`, and the HF-layout directory to load for
"this run dir (at this step)" or "this HF dir". Reads directories only; writing checkpoints is the trainer's."""

import os
import re
from pathlib import Path

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "train_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint of `step`, or the latest one; a clear error when there is none."""
    found = checkpoint_dirs(run_dir)
    if step is not None:
        found = [(s, p) for s, p in found if s == step]
    if not found:
        what = f"step {step}" if step is not None else "any step"
        raise FileNotFoundError(f"no complete checkpoint for {what} under {Path(run_dir) / 'checkpoints'}")
    return found[-1][1]


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> Path:
    """An HF-layout directory to load: `path` itself if it is one; for a training run directory, the export
    `RUN_DIR/hf` (step None) or `RUN_DIR/checkpoints/step_N`, exported once to `step_N/hf`."""
    path = Path(path)
    if is_hf_dir(path):
        if step is not None:
            raise ValueError(f"--step {step} given, but {path} is a single HF checkpoint, not a run directory")
        return path
    if not (path / "checkpoints").is_dir() and not is_hf_dir(path / "hf"):
        raise FileNotFoundError(f"{path}: neither an HF checkpoint (config.json + model.safetensors[.index.json]) "
                                f"nor a run directory with checkpoints/step_N")
    if step is None and is_hf_dir(path / "hf"):
        found = checkpoint_dirs(path)
        # The end-of-run export, unless a resumed run has since saved a newer checkpoint.
        if not found or (found[-1][1] / "train_state.json").stat().st_mtime <= (path / "hf").stat().st_mtime:
            return path / "hf"
    ckpt_dir = find_checkpoint(path, step)
    if not is_hf_dir(ckpt_dir / "hf"):
        # DCP is imported only for a run checkpoint not yet exported, never for a plain HF load.
        from molmo_fast.runtime.export import export_run

        export_run(path, ckpt_dir / "hf", step=int(ckpt_dir.name.removeprefix("step_")))
    return ckpt_dir / "hf"


def checkpoint_step(hf_dir: Path) -> int:
    """The training step an HF dir came from (its step_N parent, or a run's latest checkpoint for RUN_DIR/hf)."""
    parent = hf_dir.parent
    m = _STEP_DIR.match(parent.name)
    if m:
        return int(m.group(1))
    if hf_dir.name == "hf" and (parent / "checkpoints").is_dir():
        steps = checkpoint_dirs(parent)
        return steps[-1][0] if steps else 0
    return 0
