"""The trainer's view of the data: one call per optimizer step returns this rank's micro-batches.

Wraps `molmo_fast.data.loader.TrainLoader` so that one loader batch is one optimizer step of this rank
(micro_batch_size x grad_accum rows, split into micro-batches). The loader's stream is a function of
(seed, rank, step), so the data position of a checkpoint is just the step.
"""

import json
import shutil
from pathlib import Path

from molmo_fast.runtime.export import write_preprocessor_config
from molmo_fast.train.config import DataConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "special_tokens.json")


def write_preprocessor_dir(cfg: DataConfig, out_dir: str | Path) -> Path:
    """Copies the preprocessor release files into `out_dir` with `image_overrides` applied, so the run dir (and
    every export of it) carries the exact preprocessing it was trained with."""
    src, out_dir = Path(cfg.preprocessor), Path(out_dir)
    config_file = src / "preprocessor_config.json"
    if not config_file.is_file():
        raise ValueError(f"DataConfig.preprocessor = {cfg.preprocessor!r}: expected a directory with "
                         f"preprocessor_config.json")
    pp = json.loads(config_file.read_text())
    for key, value in cfg.image_overrides.items():
        if key not in pp:
            raise ValueError(f"DataConfig.image_overrides: {key!r} is not a key of {config_file}")
        pp[key] = list(value) if isinstance(value, tuple) else value
    if cfg.max_crops is not None:
        pp["max_crops"] = cfg.max_crops
    out_dir.mkdir(parents=True, exist_ok=True)
    write_preprocessor_config(pp, out_dir / "preprocessor_config.json")
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)
    return out_dir


def build_mixture(cfg: DataConfig):
    """The `Mixture` of the configured shard sets, generating missing synthetic sets first."""
    from molmo_fast.data.mixture import Mixture

    dirs = {name: str(path) for name, path in cfg.shards.items()}
    for source, n in cfg.synthetic.items():
        from molmo_fast.data.sources.synthetic import ensure_synthetic_shards

        out = Path(cfg.synthetic_dir) / source
        ensure_synthetic_shards(out, source, n, cfg.synthetic_seed)
        dirs[source] = str(out)
    missing = [f"{n}={d}" for n, d in dirs.items() if not Path(d).is_dir()]
    if missing:
        raise ValueError(f"DataConfig.shards: no shard directory at {missing}")
    if cfg.groups:
        groups = {g: (w, {n: dirs[n] for n in members}) for g, (w, members) in cfg.groups.items()}
        return Mixture.root_size(groups, cfg.size_overrides)
    return Mixture(dirs, dict(cfg.rates))


class TrainData:
    """`next_step()` -> list of `grad_accum` micro-batches for this rank; `stats()` -> data counters to log."""

    def __init__(self, cfg: DataConfig, preprocessor_dir: str | Path, rank: int, world_size: int,
                 micro_batch_size: int, grad_accum: int, start_step: int):
        from molmo_fast.data.loader import LoaderConfig, TrainLoader
        from molmo_fast.data.preprocessor import Preprocessor

        self.micro, self.accum = micro_batch_size, grad_accum
        rows = micro_batch_size * grad_accum
        if cfg.world_independent:
            self.offset, rows, rank, world_size = rank * rows, rows * world_size, 0, 1
        else:
            self.offset = 0
        preprocessor = Preprocessor.from_pretrained(preprocessor_dir)
        # Crops are padded to the global view + max_crops tiles, so every batch of the run has one shape.
        loader_cfg = LoaderConfig(batch_size=rows, sequence_length=cfg.sequence_length,
                                  max_crops=preprocessor.max_crops + 1, seed=cfg.seed, num_workers=cfg.num_workers,
                                  shuffle_buffer=cfg.shuffle_buffer)
        self.loader = TrainLoader(build_mixture(cfg), preprocessor, loader_cfg, rank, world_size, start_step)
        self._it = iter(self.loader)

    def next_step(self) -> list[dict]:
        batch = next(self._it)
        micro = []
        for i in range(self.accum):
            lo = self.offset + i * self.micro
            micro.append({k: v[lo:lo + self.micro] for k, v in batch.items()})
        return micro

    def stats(self) -> dict[str, float]:
        s = self.loader.stats
        return {"data/corrupt_total": float(s["corrupt"]), "data/truncated_total": float(s["truncated"])}

    def close(self) -> None:
        del self._it
