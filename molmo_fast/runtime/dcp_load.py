"""Loading torch.distributed.checkpoint (DCP) directories without running code from their shard files.

DCP's default planner unpickles the non-tensor entries of a state dict (the optimizer's hyper-parameters) with
`torch.load(weights_only=False)`, so a crafted `.distcp` file could run code on resume or export. `dcp_load`
accepts plain data only there. DCP's own `.metadata` is still a pickle: see docs/SECURITY.md.
"""

import io
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        plain = torch.load(value, weights_only=True)
        # hand the parent a stream we wrote ourselves: its full unpickling then only rebuilds plain data
        clean = io.BytesIO()
        torch.save(plain, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def dcp_load(state: dict, path: str | Path, allow_partial_load: bool = False) -> None:
    """`dcp.load(state, path)` in place (collective under a process group), with `SafeLoadPlanner`."""
    dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner(allow_partial_load=allow_partial_load))
