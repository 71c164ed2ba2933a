"""Bucket the active (token, slot) pairs by expert, with static shapes and no host sync: the torch reference
of the Triton routing (histogram -> scan -> stable scatter in `triton_kernels.py`) and the grouped_mm path's.

Pairs are flattened as p = t * K + k. Every tensor here has a size fixed by (T, K, E, block_m), never
by the number of active pairs, so changing top-k (or the active mask) changes data, not shapes: neither
Triton nor torch.compile recompiles.
"""

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    sorted_pair_P: torch.Tensor  # int32 [P]: pair ids grouped by expert (stable), inactive pairs last
    offs_E: torch.Tensor  # int32 [E]: cumulative end row of each expert's group (grouped_mm `offs`)


@dataclass
class Tiles:
    """Row tiles of `block_m` sorted rows, each inside one expert's group (the grouped GEMM's M grid)."""

    expert: torch.Tensor  # int32 [max_tiles]
    row_start: torch.Tensor  # int32 [max_tiles]; row_start == row_end marks an unused tile
    row_end: torch.Tensor  # int32 [max_tiles]: end of the tile's expert group (rows beyond are masked)
    count: torch.Tensor  # int32 [1]: used tiles (the first ones); persistent kernels read it on the device


def active_mask(expert_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Active slots: an expert index in [0, E) (-1 marks an inactive slot)."""
    return (expert_idx_TK >= 0) & (expert_idx_TK < num_experts)


def sort_pairs(expert_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of pairs by expert: (sorted keys, int32 pair ids); inactive slots get key E (last)."""
    E = num_experts
    idx_P = expert_idx_TK.reshape(-1)
    key_P = torch.where(active_mask(idx_P, E), idx_P, E)
    key_sorted_P, sorted_pair_P = torch.sort(key_P, stable=True)
    return key_sorted_P, sorted_pair_P.to(torch.int32)


def route(expert_idx_TK: torch.Tensor, num_experts: int) -> Routing:
    """Bucket pairs by expert; slots with an index outside [0, E) are inactive."""
    E = num_experts
    key_sorted_P, sorted_pair_P = sort_pairs(expert_idx_TK, E)
    expert_ids_E = torch.arange(E, device=key_sorted_P.device, dtype=key_sorted_P.dtype)
    offs_E = torch.searchsorted(key_sorted_P, expert_ids_E, right=True)
    return Routing(sorted_pair_P, offs_E.to(torch.int32))


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on non-empty tiles: each expert adds at most one partial tile, each tile holds a pair."""
    return max(1, min(num_pairs, num_pairs // block_m + num_experts))


def make_tiles(routing: Routing, block_m: int) -> Tiles:
    """Torch reference of the tile plan (the Triton path builds it on the device: `plan_kernel`)."""
    offs_E = routing.offs_E.to(torch.int64)
    E, P = offs_E.numel(), routing.sorted_pair_P.numel()
    starts_E = torch.cat([offs_E.new_zeros(1), offs_E[:-1]])
    tiles_E = (offs_E - starts_E + block_m - 1) // block_m
    tile_end_E = torch.cumsum(tiles_E, 0)
    tile_ids = torch.arange(max_tiles(P, E, block_m), device=offs_E.device)
    expert = torch.searchsorted(tile_end_E, tile_ids, right=True)
    used = expert < E
    e = expert.clamp(max=E - 1)
    row_start = starts_E[e] + (tile_ids - (tile_end_E[e] - tiles_E[e])) * block_m
    row_end = offs_E[e]
    return Tiles(
        torch.where(used, e, 0).to(torch.int32),
        torch.where(used, row_start, 0).to(torch.int32),
        torch.where(used, row_end, 0).to(torch.int32),
        tile_end_E[-1:].to(torch.int32),
    )
