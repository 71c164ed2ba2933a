"""Sharded, atomic training checkpoints with torch.distributed.checkpoint (DCP).

Layout of a run directory:

    RUN_DIR/checkpoints/step_N/        complete checkpoints only (a rename publishes them)
        .metadata, __R_0.distcp        DCP: model + optimizer, resharded on load to any world size
        rng_rank{R}.pt                 each rank's torch / numpy / python RNG states
        train_state.json               step, tokens seen, data position (written last, before the rename)
    RUN_DIR/checkpoints/.tmp_step_N/   a checkpoint being written; never read, removed on the next save

The learning-rate schedule is a pure function of the step, so restoring the step restores it.
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from molmo_fast.runtime.checkpoints import checkpoint_dirs


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, keep_last: int) -> Path:
    """Collective: every rank writes its shards into a temp dir that rank 0 renames once all are done."""
    rank = dist.get_rank()
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp_step_{step}", root / f"step_{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        state_path = tmp / "train_state.json"
        state_path.write_text(json.dumps({**train_state, "step": step, "world_size": dist.get_world_size()}))
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resuming from it) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        # Checkpoints past this step belong to the branch a resume from an earlier checkpoint abandoned: left in
        # place, `--resume latest` would go back to them after the next interruption.
        done = checkpoint_dirs(run_dir)
        abandoned = [path for s, path in done if s > step]
        for old in abandoned + [path for s, path in done if s <= step][:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: restores model, optimizer and this rank's RNG from a checkpoint dir; returns train_state."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    model_state, optim_state = {"model": model_sd}, {"optim": optim_sd}
    dcp.load(model_state, checkpoint_id=str(path))
    # Parameters that never received a gradient (e.g. the ViT layer after the last one the connector reads)
    # have no Adam state in the checkpoint; they keep the fresh zero state, which AdamW never touches either.
    dcp.load(optim_state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=model_state["model"], optim_state_dict=optim_state["optim"])
    rng = path / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():  # absent when resuming on more ranks than were saved: those ranks keep fresh seeds
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "train_state.json").read_text())


def load_full_state_dict(model: nn.Module, full_sd: dict[str, torch.Tensor]) -> None:
    """Collective: loads a full (unsharded) state dict held by rank 0 into a sharded model."""
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                  strict=True))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
