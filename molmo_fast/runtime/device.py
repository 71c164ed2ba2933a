"""Process group, this rank's device, dtypes by name and host -> device batch copies: one setup for every entry
point (train, eval, bench), single-process or under torchrun."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Env:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> tuple[int, int]:
    """(world size, local rank) that torchrun gave this process; (1, 0) for a plain launch."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(device: str, world: int, local_rank: int, cuda_available: bool,
                   field: str = "device") -> tuple[torch.device, str]:
    """This rank's device and the process-group backend for it. Under torchrun each rank takes its own GPU,
    cuda:LOCAL_RANK, and CUDA tensors go over nccl (gloo stays for the host-side reductions). Errors name
    `field`, the setting the device string came from."""
    if device.startswith("cuda") and not cuda_available:
        raise ValueError(f"{field} = {device!r}, but CUDA is not available (use 'cpu' or 'auto')")
    if device.startswith("cuda:") and world > 1:
        raise ValueError(f"{field} = {device!r} would put all {world} torchrun ranks on one GPU; "
                         f"use 'cuda' or 'auto', which give each rank cuda:LOCAL_RANK")
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    resolved = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    return resolved, "cpu:gloo,cuda:nccl" if resolved.type == "cuda" else "gloo"


def init_distributed(device: str = "auto", always_group: bool = False, field: str = "device") -> Env:
    """Joins the torchrun group if launched by torchrun. With `always_group`, a plain launch gets a one-process
    group, so code with collectives (FSDP, DCP) takes the same path at any world size."""
    resolved, backend = resolve_device(device, *torchrun_env(), torch.cuda.is_available(), field)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)  # before the process group, so nccl binds each rank to its own GPU
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        elif always_group:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.is_initialized():
        return Env(dist.get_rank(), dist.get_world_size(), resolved)
    return Env(0, 1, resolved)


def barrier(world_size: int) -> None:
    """A barrier that a single-process run (which may have no process group) skips."""
    if world_size > 1:
        dist.barrier()


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
