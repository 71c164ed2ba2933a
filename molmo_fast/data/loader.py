"""Loaders that turn shard sets into batches for FSDP training and for evaluation.

Training (`TrainLoader`): an infinite stream per rank, so every rank yields a batch at every step (no FSDP hang).
Global step s of rank r is produced by *virtual stream* v = s % V (V = max(num_workers, 1)); stream (r, v) reads
resampled shards from its own slice of every shard set (disjoint when a set has >= world*V shards) through a
shuffle buffer, with every random choice seeded by (seed, rank, v, epoch), where an epoch is `epoch_batches`
batches of that stream. Hence the batch of a step is a function of (seed, rank, step): resuming at step s only
replays part of one epoch (decode, no preprocessing) and yields exactly the batches an uninterrupted run would.

Evaluation (`EvalLoader`): every sample exactly once across ranks. Rank r owns a contiguous range of ceil(N/world)
global indices and the batches are padded (with copies of a valid sample marked `metadata["padding"]`) so that all
ranks run the same number of equal-size batches.

Corrupt samples (unreadable tar member, bad JSON, bad image bytes) are skipped, counted and logged, never fatal; a
shard set in which nothing decodes is an error. Decoding, preprocessing and collation run in DataLoader workers.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from molmo_fast.data.collate import Collator
from molmo_fast.data.mixture import Mixture
from molmo_fast.data.shards import decode_sample, read_sizes

log = logging.getLogger(__name__)

Preprocess = Callable[..., dict[str, Any]]
STATS_KEY = "data_stats"  # worker -> main process side channel inside each batch; removed before the caller sees it


@dataclass
class LoaderConfig:
    """Batch shape and stream settings shared by the training and the eval loader (eval ignores the stream ones)."""

    batch_size: int  # per rank
    sequence_length: int
    max_crops: int | None = None
    seed: int = 0
    num_workers: int = 2
    shuffle_buffer: int = 500  # raw samples
    epoch_batches: int = 200  # batches of one stream between reseeds; bounds the replay cost of a resume
    max_consecutive_errors: int = 200
    pin_memory: bool = False  # page-locked batches (a copy in a main-process thread) for async host-to-GPU copies

    def __post_init__(self) -> None:
        for name in ("batch_size", "sequence_length", "shuffle_buffer", "epoch_batches", "max_consecutive_errors"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoaderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"LoaderConfig.num_workers must be >= 0, got {self.num_workers}")


def default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class DataStats:
    """Counters a worker sends along with each batch; the main process sums them."""

    corrupt: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        """One lost sample; `where` names the shard (and the key, when known), kept in the first few messages."""
        self.corrupt += 1
        if len(self.errors) < 5:
            self.errors.append(f"{where}: {why}"[:500])

    def add_error(self, exn: BaseException, where: str) -> bool:
        self.add(where, f"{type(exn).__name__}: {exn}")
        return True  # webdataset handler protocol: True = skip and continue

    def take(self) -> dict[str, Any]:
        out = {"corrupt": self.corrupt, "errors": self.errors}
        self.corrupt, self.errors = 0, []
        return out


def _read_tar(url: str, stats: DataStats) -> Iterator[dict[str, Any]]:
    yield from wds.tarfile_samples([{"url": url}], handler=lambda exn: stats.add_error(exn, f"shard {url}"))


def _where(raw: dict[str, Any]) -> str:
    return f"shard {raw.get('__url__')}, key {raw.get('__key__')!r}"


def _decode(raw: dict[str, Any], stats: DataStats) -> dict[str, Any] | None:
    try:
        return decode_sample(raw)
    except Exception as exn:  # any corruption of one sample must cost that sample only
        stats.add_error(exn, _where(raw))
        return None


def _with_metadata(arrays: dict[str, Any], example: dict[str, Any], **flags: Any) -> dict[str, Any]:
    arrays = dict(arrays)
    arrays["metadata"] = {**{k: v for k, v in example.items() if k != "image"}, **flags}
    return arrays


class _TrainStream(IterableDataset):
    def __init__(self, mixture: Mixture, preprocess: Preprocess, cfg: LoaderConfig, rank: int, world: int, start: int):
        self.mixture, self.preprocess, self.cfg = mixture, preprocess, cfg
        self.rank, self.world, self.start = rank, world, start
        self.shards = {name: list(read_sizes(d)) for name, d in mixture.shard_dirs.items()}
        self.num_streams = max(cfg.num_workers, 1)

    def _stream_shards(self, v: int) -> dict[str, list[str]]:
        total, index = self.world * self.num_streams, self.rank * self.num_streams + v
        return {name: shards[index::total] if len(shards) >= total else shards for name, shards in self.shards.items()}

    def _raw_samples(self, shards: list[str], rng: np.random.Generator, stats: DataStats, name: str):
        empty_in_a_row = 0
        while True:
            got = False
            for raw in _read_tar(shards[int(rng.integers(len(shards)))], stats):
                got = True
                yield raw
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if empty_in_a_row >= self.cfg.max_consecutive_errors:
                raise RuntimeError(f"shard set {name!r}: {empty_in_a_row} shards in a row gave no samples")

    def _shuffled(self, v: int, key: list[int], stats: DataStats) -> Iterator[dict[str, Any]]:
        """Raw samples of stream v: the mixture picks the set, shards are resampled, a buffer shuffles."""
        rng = np.random.default_rng(key)
        sampler = self.mixture.sampler(np.random.default_rng(key + [1]))
        sources = {
            name: self._raw_samples(shards, np.random.default_rng(key + [2, i]), stats, name)
            for i, (name, shards) in enumerate(sorted(self._stream_shards(v).items()))
        }
        buffer: list[dict[str, Any]] = []
        while True:
            while len(buffer) < self.cfg.shuffle_buffer:
                buffer.append(next(sources[next(sampler)]))
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()

    def _epoch(self, v: int, epoch: int, replay: int, stats: DataStats) -> Iterator[dict[str, Any]]:
        """The `epoch_batches` batches of stream v in this epoch; the first `replay` are decoded (corruption decides
        which samples make a batch) but neither preprocessed nor yielded."""
        cfg = self.cfg
        key = [cfg.seed, self.rank, v, epoch]
        raw_samples = self._shuffled(v, key, stats)
        collate = Collator(cfg.sequence_length, cfg.max_crops)
        accepted, failures, examples, batches = 0, 0, [], 0
        while batches < cfg.epoch_batches:
            raw = next(raw_samples)
            example = _decode(raw, stats)
            if example is None:
                failures += 1
                if failures >= cfg.max_consecutive_errors:
                    raise RuntimeError(f"{failures} corrupt samples in a row; last errors: {stats.errors}")
                continue
            failures = 0
            sample_rng = np.random.default_rng(key + [3, accepted])
            accepted += 1
            if batches < replay:
                examples.append(None)
            else:
                try:
                    arrays = self.preprocess(example, rng=sample_rng)
                except Exception as exn:
                    raise RuntimeError(f"preprocessing failed on sample {example.get('id')!r} ({_where(raw)})"
                                       ) from exn
                examples.append(_with_metadata(arrays, example))
            if len(examples) < cfg.batch_size:
                continue
            if batches >= replay:
                batch = collate(examples)
                batch[STATS_KEY] = stats.take()
                yield batch
            else:
                stats.take()  # the checkpointed run already reported these
            batches += 1
            examples = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_streams:
            raise RuntimeError(f"TrainLoader built for {self.num_streams} workers runs with {info.num_workers}")
        first = self.start + worker  # this worker serves steps first, first + V, first + 2V, ...
        v, local = first % self.num_streams, first // self.num_streams
        epoch, replay = divmod(local, self.cfg.epoch_batches)
        stats = DataStats()
        while True:
            yield from self._epoch(v, epoch, replay, stats)
            epoch, replay = epoch + 1, 0


class TrainLoader:
    """Infinite per-rank batch iterator; `state_dict()` / `load_state_dict()` carry the data position."""

    def __init__(
        self,
        mixture: Mixture,
        preprocess: Preprocess,
        cfg: LoaderConfig,
        rank: int | None = None,
        world_size: int | None = None,
        start_step: int = 0,
    ):
        default_rank, default_world = default_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.mixture, self.preprocess, self.cfg = mixture, preprocess, cfg
        self.step = start_step
        self.stats = {"corrupt": 0, "truncated": 0, "examples": 0}
        for name, d in mixture.shard_dirs.items():
            n = len(read_sizes(d))
            if n == 0:
                raise ValueError(f"shard set {name!r} at {d} has no samples (empty sizes.json): nothing to train on")
            if n < self.world_size * max(cfg.num_workers, 1):
                log.warning("shard set %r has %d shards < %d streams: streams share shards (not disjoint)",
                            name, n, self.world_size * max(cfg.num_workers, 1))

    def _stream_settings(self) -> dict[str, Any]:
        """Everything that, with the step, defines the batch stream; JSON-shaped so a saved copy compares equal."""
        cfg = self.cfg
        return {"seed": cfg.seed, "batch_size": cfg.batch_size, "epoch_batches": cfg.epoch_batches,
                "shuffle_buffer": cfg.shuffle_buffer, "world_size": self.world_size, "num_workers": cfg.num_workers,
                # Shard file names, not directories: moving the data between runs leaves the stream unchanged.
                "shard_sets": {name: [os.path.basename(p) for p in read_sizes(d)]
                               for name, d in sorted(self.mixture.shard_dirs.items())},
                "rates": {name: float(r) for name, r in sorted(self.mixture.rates.items())}}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, **self._stream_settings(), "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = self._stream_settings()
        missing = [name for name in now if name not in state]
        if missing:
            raise ValueError(f"loader state lacks the stream settings {missing} (saved by an older version?): "
                             f"cannot check that resuming reproduces the checkpointed data stream")
        mismatched = [f"{name}: saved {state[name]!r}, now {now[name]!r}" for name in now if state[name] != now[name]]
        if mismatched:
            raise ValueError("loader state does not match the current data settings, so the data stream would "
                             "differ from the checkpointed run:\n  " + "\n  ".join(mismatched))
        self.step = int(state["step"])
        self.stats = dict(state["stats"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = _TrainStream(self.mixture, self.preprocess, self.cfg, self.rank, self.world_size, self.step)
        loader = DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                            prefetch_factor=2 if self.cfg.num_workers else None,
                            pin_memory=self.cfg.pin_memory and torch.cuda.is_available())
        for batch in loader:
            self.step += 1
            yield _account(batch, self.stats, self.step)


def _account(batch: dict[str, Any], stats: dict[str, int], where: Any) -> dict[str, Any]:
    worker_stats = batch.pop(STATS_KEY)
    truncated = sum(1 for m in batch["metadata"] if m.get("truncated"))
    stats["corrupt"] += worker_stats["corrupt"]
    stats["truncated"] += truncated
    stats["examples"] += len(batch["metadata"])
    if worker_stats["corrupt"]:
        log.warning("skipped %d corrupt samples before batch %s (total %d): %s",
                    worker_stats["corrupt"], where, stats["corrupt"], "; ".join(worker_stats["errors"]))
    return batch


class _EvalStream(IterableDataset):
    def __init__(self, shard_dir: str, preprocess: Preprocess, cfg: LoaderConfig, rank: int, world: int,
                 for_inference: bool, limit: int | None):
        self.preprocess, self.cfg, self.for_inference = preprocess, cfg, for_inference
        sizes = read_sizes(shard_dir)
        self.shards = list(sizes)
        self.offsets = np.cumsum([0] + list(sizes.values())).tolist()
        self.total = self.offsets[-1] if limit is None else min(limit, self.offsets[-1])
        self.per_rank = math.ceil(self.total / world)
        self.num_batches = math.ceil(self.per_rank / cfg.batch_size)
        self.rank_start = rank * self.per_rank
        self.rank_end = min(self.rank_start + self.per_rank, self.total)

    def _slots(self, b: int) -> list[int | None]:
        """Global index of each slot of batch b of this rank; None = padding."""
        first = self.rank_start + b * self.cfg.batch_size
        return [g if g < self.rank_end else None for g in range(first, first + self.cfg.batch_size)]

    def _samples(self, wanted: list[int], stats: DataStats) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """Yield (index, decoded example or None if corrupt) for sorted global indices, reading each shard once."""
        pos = 0
        while pos < len(wanted):
            s = bisect.bisect_right(self.offsets, wanted[pos]) - 1
            end = self.offsets[s + 1]
            in_shard = [g for g in wanted[pos:] if g < end]
            needed = set(in_shard)
            found: dict[int, dict[str, Any] | None] = {}
            for local, raw in enumerate(_read_tar(self.shards[s], stats)):
                g = self.offsets[s] + local
                if g > in_shard[-1]:
                    break
                if g in needed:
                    found[g] = _decode(raw, stats)
            for g in in_shard:
                if g not in found:
                    stats.add(f"shard {self.shards[s]}, sample {g - self.offsets[s]}", "missing (truncated or "
                              "unreadable tar)")
                yield g, found.get(g)
            pos += len(in_shard)

    def _filler(self) -> dict[str, Any]:
        """The first decodable sample of the set: the content of padding rows."""
        scan = DataStats()
        for _, example in self._samples(list(range(self.total)), scan):
            if example is not None:
                return example
        raise RuntimeError(f"no sample of the shard set of {self.shards[0]} decodes; first errors: {scan.errors}")

    def _process(self, example: dict[str, Any], **flags: Any) -> dict[str, Any]:
        return _with_metadata(self.preprocess(example, rng=None, for_inference=self.for_inference), example, **flags)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = list(range(worker, self.num_batches, workers))
        slots = {b: self._slots(b) for b in batches}
        wanted = sorted(g for b in batches for g in slots[b] if g is not None)
        stats = DataStats()
        samples = self._samples(wanted, stats)
        collate = Collator(self.cfg.sequence_length, self.cfg.max_crops)
        filler = None
        for b in batches:
            examples = []
            for g in slots[b]:
                example = next(samples)[1] if g is not None else None
                if example is not None:
                    examples.append(self._process(example, padding=False))
                    continue
                if filler is None:
                    filler = self._process(self._filler(), padding=True)
                examples.append({**filler, "metadata": {**filler["metadata"], "corrupt": g is not None, "index": g}})
            batch = collate(examples)
            batch[STATS_KEY] = stats.take()
            yield batch


class EvalLoader:
    """Every sample of a shard set exactly once across ranks, in `len(self)` equal-size batches on every rank.

    Padding rows carry `metadata["padding"] = True` (and `corrupt = True` where a sample could not be read); the
    eval runner drops them.
    """

    def __init__(self, shard_dir: str | os.PathLike, preprocess: Preprocess, cfg: LoaderConfig,
                 rank: int | None = None, world_size: int | None = None, for_inference: bool = True,
                 limit: int | None = None):
        default_rank, default_world = default_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.cfg = cfg
        self.stream = _EvalStream(str(shard_dir), preprocess, cfg, self.rank, self.world_size, for_inference, limit)
        self.stats = {"corrupt": 0, "truncated": 0, "examples": 0}

    def __len__(self) -> int:
        return self.stream.num_batches

    @property
    def num_samples(self) -> int:
        return self.stream.total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = min(self.cfg.num_workers, len(self))
        loader = DataLoader(self.stream, batch_size=None, num_workers=workers,
                            pin_memory=self.cfg.pin_memory and torch.cuda.is_available())
        for b, batch in enumerate(loader):
            yield _account(batch, self.stats, b)
