"""Applies activation checkpointing, torch.compile and FSDP2 to a finished MolmoE, in that order.

Blocks are the elements of the model's block ModuleLists (ViT resblocks and LLM blocks): each is checkpointed,
optionally compiled, and sharded as its own FSDP unit, so at most one block's full parameters live at a time;
the root unit holds the rest (embeddings, connector, LM head). The same code runs with gloo on CPU (tests, demo).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """Every ModuleList of parameterised blocks in the model (ViT blocks, LLM blocks), in forward order."""
    return [m for m in model.modules()
            if isinstance(m, nn.ModuleList) and len(m) and all(any(True for _ in b.parameters()) for b in m)]


def parallelize(model: nn.Module, device: torch.device, *, bf16: bool, activation_checkpointing: bool,
                compile_blocks: bool) -> nn.Module:
    """Shards `model` in place across the default process group and returns it."""
    # Mixed precision only on CUDA: bf16 matmuls on CPU are slow and the CPU path exists for exact tests.
    if device.type == "cuda" and bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    mesh = dist.init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = [block for blocks in block_lists(model) for block in blocks]
    for block in blocks:
        if activation_checkpointing:
            checkpoint(block)
        if compile_blocks:
            # Compile the forward only: the AC and FSDP hooks stay eager and parameter names keep no
            # `_orig_mod` prefix, so checkpoints do not depend on the compile switch.
            block.forward = torch.compile(block.forward)
        # Backward starts with the last block, so resharding its parameters after forward would be waste.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=block is not blocks[-1])
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
