"""Weighted mixtures of shard sets: explicit rates, or Molmo's root-size rule.

Root-size rule (Molmo's `root_size_mixture`): the mixture is split into groups with fixed weights (e.g. demo 0.15,
aux 0.50, pointing 0.35); inside a group, a dataset's share is proportional to sqrt(size), where size is the number
of samples in its shard set or an explicit override (e.g. PixMo-Cap capped at 50k).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from molmo_fast.data.shards import read_sizes


def shard_set_size(shard_dir: str | os.PathLike) -> int:
    return sum(read_sizes(shard_dir).values())


def normalize_rates(weights: dict[str, float]) -> dict[str, float]:
    if not weights:
        raise ValueError("a mixture needs at least one dataset")
    bad = {k: w for k, w in weights.items() if not (w >= 0 and math.isfinite(w))}
    if bad:
        raise ValueError(f"mixture weights must be finite and >= 0, got {bad}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mixture weights sum to {total}; at least one must be > 0")
    return {k: w / total for k, w in weights.items()}


def root_size_rates(groups: dict[str, tuple[float, dict[str, int]]]) -> dict[str, float]:
    """`{group: (group_weight, {dataset: size})}` -> `{dataset: rate}`; rates sum to 1."""
    group_weights = normalize_rates({g: w for g, (w, _) in groups.items()})
    rates: dict[str, float] = {}
    for group, (_, sizes) in groups.items():
        if any(s <= 0 for s in sizes.values()):
            raise ValueError(f"mixture group {group!r}: dataset sizes must be > 0, got {sizes}")
        within = normalize_rates({name: math.sqrt(size) for name, size in sizes.items()})
        for name, r in within.items():
            if name in rates:
                raise ValueError(f"dataset {name!r} appears in more than one mixture group")
            rates[name] = group_weights[group] * r
    return rates


@dataclass
class Mixture:
    """Named shard sets and the probability of drawing each sample from each of them."""

    shard_dirs: dict[str, str]
    rates: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shard_dirs:
            raise ValueError("Mixture.shard_dirs is empty")
        self.rates = normalize_rates(self.rates or {name: 1.0 for name in self.shard_dirs})
        if set(self.rates) != set(self.shard_dirs):
            raise ValueError(
                f"Mixture.rates names {sorted(self.rates)} differ from "
                f"Mixture.shard_dirs names {sorted(self.shard_dirs)}"
            )

    @property
    def names(self) -> list[str]:
        return sorted(self.shard_dirs)

    @classmethod
    def single(cls, shard_dir: str | os.PathLike, name: str = "data") -> "Mixture":
        return cls({name: str(shard_dir)})

    @classmethod
    def root_size(
        cls, groups: dict[str, tuple[float, dict[str, str]]], size_overrides: dict[str, int] | None = None
    ) -> "Mixture":
        """`{group: (weight, {name: shard_dir})}`; sizes come from each set's sizes.json unless overridden."""
        overrides = size_overrides or {}
        dirs = {n: str(d) for _, (_, group_dirs) in groups.items() for n, d in group_dirs.items()}
        unknown = sorted(set(overrides) - set(dirs))
        if unknown:  # a misspelt name would otherwise leave that dataset at its full size, silently
            raise ValueError(f"size_overrides names {unknown} are not datasets of the mixture {sorted(dirs)}")
        sized = {g: (w, {n: overrides[n] if n in overrides else shard_set_size(d) for n, d in group_dirs.items()})
                 for g, (w, group_dirs) in groups.items()}
        return cls(dirs, root_size_rates(sized))

    def sampler(self, rng: np.random.Generator) -> "MixtureSampler":
        return MixtureSampler(self.names, np.array([self.rates[n] for n in self.names]), rng)


@dataclass
class MixtureSampler:
    """Draws the dataset of each next sample; draws happen in blocks to keep numpy call overhead out of the loop."""

    names: list[str]
    probs: np.ndarray
    rng: np.random.Generator
    block: int = 1024
    _buffer: list[int] = field(default_factory=list)

    def __next__(self) -> str:
        if not self._buffer:
            self._buffer = self.rng.choice(len(self.names), size=self.block, p=self.probs).tolist()[::-1]
        return self.names[self._buffer.pop()]

    def __iter__(self) -> "MixtureSampler":
        return self
