"""Sharded, atomic training checkpoints with torch.distributed.checkpoint (DCP).

Layout of a run directory:

    RUN_DIR/checkpoints/step_N/        complete checkpoints only (a rename publishes them)
        .metadata, __R_0.distcp        DCP: model + optimizer, resharded on load to any world size
        rng_rank{R}.safetensors        each rank's torch / numpy / python RNG states (tensors + JSON metadata)
        train_state.json               step, tokens seen, data position (written last, before the rename)
    RUN_DIR/checkpoints/.tmp_step_N/   a checkpoint being written; never read, removed on the next save

The learning-rate schedule is a pure function of the step, so restoring the step restores it.

Trust model (docs/SECURITY.md): loading runs no code from the checkpoint's files except DCP's own `.metadata`,
which DCP unpickles; training checkpoints are for trusted use, models are shared as the safetensors export.
"""

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from molmo_fast.runtime.checkpoints import checkpoint_dirs
from molmo_fast.runtime.dcp_load import dcp_load


def _save_rng_state(path: Path) -> None:
    """This process's RNG states as tensors plus JSON scalars in a safetensors file: loading runs no code."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
               "python": torch.tensor(words, dtype=torch.int64)}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path), metadata={"numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
                                            "python": json.dumps([version, gauss_next])})


def _load_rng_state(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        kind, pos, has_gauss, cached = json.loads(meta["numpy"])
        version, gauss_next = json.loads(meta["python"])
        states = (t["torch"], (kind, t["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
                  (version, tuple(t["python"].tolist()), gauss_next))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an RNG state file written by molmo_fast.train ({type(e).__name__}: {e})") from e
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])
    if "cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["cuda"])


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
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        _save_rng_state(tmp / f"rng_rank{rank}.safetensors")
    except (Exception, dcp.CheckpointException) as e:  # DCP's own exception is a BaseException
        _raise_if_disk_full(e, tmp, root, step)
        raise
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
    if list(path.glob("rng_rank*.pt")):
        raise ValueError(f"{path}: written by an older molmo_fast that pickled the RNG state; resuming from it "
                         f"would unpickle it, so it is refused (start a new run, or initialise one from its export)")
    dcp_load(model_state, path)
    # Parameters that never received a gradient (e.g. the ViT layer after the last one the connector reads)
    # have no Adam state in the checkpoint; they keep the fresh zero state, which AdamW never touches either.
    dcp_load(optim_state, path, allow_partial_load=True)
    set_state_dict(model, optimizer, model_state_dict=model_state["model"], optim_state_dict=optim_state["optim"])
    rng = path / f"rng_rank{dist.get_rank()}.safetensors"
    if rng.is_file():  # absent when resuming on more ranks than were saved: those ranks keep fresh seeds
        _load_rng_state(rng)
    return read_train_state(path)


def read_train_state(path: str | Path) -> dict:
    """A checkpoint's train_state.json (step, tokens seen, data and config records)."""
    file = Path(path) / "train_state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read the checkpoint's train state ({e})") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{file}: expected a JSON object with an int 'step', got {str(state)[:200]}")
    return state


def load_full_state_dict(model: nn.Module, full_sd: dict[str, torch.Tensor]) -> None:
    """Collective: loads a full (unsharded) state dict held by rank 0 into a sharded model."""
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                  strict=True))


def _raise_if_disk_full(exc: BaseException, tmp: Path, root: Path, step: int) -> None:
    """A failed write on a full disk surfaces from DCP / torch.save as a bare position mismatch; say what it is."""
    chain, todo = [], [exc]
    while todo and len(chain) < 50:
        e = todo.pop()
        chain.append(e)
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        todo += [pair[0] for pair in getattr(e, "failures", {}).values()]  # DCP: rank -> (exception, trace)
    text = " ".join(str(e) for e in chain)
    free = shutil.disk_usage(root).free
    if not (any(getattr(e, "errno", None) == errno.ENOSPC for e in chain) or "No space left" in text
            or free < 64 << 20):
        return
    shutil.rmtree(tmp, ignore_errors=True)
    last = checkpoint_dirs(root.parent)
    keep = f"the last complete checkpoint {last[-1][1]} is intact" if last else "no earlier checkpoint exists"
    raise OSError(errno.ENOSPC, f"disk full while writing checkpoint step {step} under {root} ({free >> 20} MiB "
                                f"free); the partial checkpoint was removed and {keep}. Free space, then resume "
                                f"with --resume latest") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
