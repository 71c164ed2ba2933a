"""Shared machinery of the Hugging Face converters: source spec, offline loading, rows -> shard records.

A converter is a plain function `convert(row, image_size) -> list[example fields]` over one row of the public
dataset, with its real column names. The machinery around it fetches the image (a datasets `Image` column, kept as
its original bytes, or a URL with the download cache), fills in ids and writes nothing itself.
"""

from __future__ import annotations

import ast
import itertools
import os
import re
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from molmo_fast.data.shards import SCHEMA_VERSION, Record, normalize_image_bytes
from molmo_fast.data.sources.download import ImageFetcher

if TYPE_CHECKING:  # `datasets` takes seconds to import; only building shards needs it
    import datasets

Convert = Callable[[dict[str, Any], "tuple[int, int] | None"], list[dict[str, Any]]]


@dataclass(frozen=True)
class HFSource:
    name: str
    hub_id: str
    convert: Convert
    splits: tuple[str, ...] = ("train",)  # the hub's split names, as its dataset card lists them
    default_split: str = "train"
    configs: tuple[str | None, ...] = (None,)  # several = concatenated (MMMU subjects, PixMo-Docs is one each)
    image_column: str | None = "image"  # a datasets Image column (or a list of them: the first is used)
    url_column: str | None = None  # ... or images downloaded from this column
    sha_column: str | None = None
    verify_ssl: bool = True
    description: str = ""
    needs_input: str = ""  # why the hub copy cannot be read as it is (then --input is required)
    refused: tuple[tuple[str, str], ...] = ()  # (split, why): splits whose rows this converter would mislabel
    holdout: tuple[str, str] | None = None  # (hub id, split) whose image URLs are dropped from every split

    def __post_init__(self) -> None:
        if (self.image_column is None) == (self.url_column is None):
            raise ValueError(f"HFSource {self.name!r}: set exactly one of image_column and url_column")
        if self.default_split not in self.splits:
            raise ValueError(f"HFSource {self.name!r}: default split {self.default_split!r} not in {self.splits}")

    def check_split(self, split: str, from_hub: bool) -> None:
        """Refuse a split this converter would mislabel, and (on the hub) one the dataset does not have."""
        why = dict(self.refused).get(split)
        if why:
            raise ValueError(f"source {self.name!r} refuses split {split!r}: {why}")
        if from_hub and split not in self.splits:
            raise ValueError(f"source {self.name!r}: {self.hub_id} has no split {split!r}; its splits are "
                             f"{', '.join(self.splits)}")


def load_rows(source: HFSource, split: str, input_path: str | None = None) -> datasets.Dataset:
    """The source's rows, from the hub or (offline) a `save_to_disk` directory, a parquet file or a parquet folder.

    A source with a `holdout` drops the rows whose image is in that set: read from a folder named after its repo
    inside the --input folder (e.g. `pixmo-points-eval/`) when there is one, else from the hub.
    """
    import datasets

    source.check_split(split, from_hub=input_path is None)
    if input_path is None:
        if source.needs_input:
            raise ValueError(f"source {source.name!r} needs --input: {source.needs_input}")
        parts = [datasets.load_dataset(source.hub_id, config, split=split) for config in source.configs]
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    else:
        skip = _holdout_dir(source, input_path)
        ds = _load_local(Path(input_path), split, exclude=skip)
    if source.holdout is not None:
        n = len(ds)
        ds = drop_held_out(source, ds, _holdout_urls(source, input_path))
        print(f"{source.name}: held out {n - len(ds)} of {n} rows (images of {source.holdout[0]})", file=sys.stderr)
    return with_raw_images(ds)


def _load_local(path: Path, split: str, exclude: Path | None = None) -> datasets.Dataset:
    import datasets

    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    if (path / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(path))
        if split not in saved:
            raise ValueError(f"--input {path} has no split {split!r}; its splits are {', '.join(saved)}")
        return saved[split]
    if path.is_dir():
        found = [p for p in path.rglob("*.parquet") if exclude is None or exclude not in p.parents]
        # the split as a whole word of the file's path: "test" must not also take "testmini-*.parquet"
        in_split = re.compile(rf"(^|[^a-zA-Z0-9]){re.escape(split)}([^a-zA-Z0-9]|$)")
        files = sorted(str(p) for p in found if in_split.search(p.relative_to(path).as_posix())) \
            or sorted(str(p) for p in found)
        if not files:
            raise FileNotFoundError(f"{path}: no saved dataset and no .parquet files")
        return datasets.load_dataset("parquet", data_files=files, split="train")
    if path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=[str(path)], split="train")
    raise FileNotFoundError(f"--input {path}: expected a save_to_disk directory, a .parquet file or a folder")


def _holdout_dir(source: HFSource, input_path: str | None) -> Path | None:
    if source.holdout is None or input_path is None:
        return None
    local = Path(input_path) / source.holdout[0].rsplit("/", 1)[-1]
    return local if local.is_dir() else None


def _holdout_urls(source: HFSource, input_path: str | None) -> set[str]:
    import datasets

    hub_id, split = source.holdout
    local = _holdout_dir(source, input_path)
    try:
        held = _load_local(local, split) if local else datasets.load_dataset(hub_id, split=split)
    except Exception as exn:
        raise RuntimeError(f"source {source.name!r} holds out the images of {hub_id} ({split}), as Molmo does, and "
                           f"could not read them ({type(exn).__name__}: {exn}); offline, put that dataset's parquet "
                           f"files in a {hub_id.rsplit('/', 1)[-1]}/ folder inside --input") from exn
    return set(held[source.url_column])


def drop_held_out(source: HFSource, rows: datasets.Dataset, urls: set[str]) -> datasets.Dataset:
    """Rows whose image URL is not in `urls` (Molmo keeps the pixmo-points-eval images out of pixmo-points)."""
    return rows.filter(lambda batch: [u not in urls for u in batch], batched=True, input_columns=[source.url_column])


def with_raw_images(ds: datasets.Dataset) -> datasets.Dataset:
    """Image columns yield {'bytes', 'path'} instead of decoded PIL images: shards keep the original bytes."""
    import datasets

    def no_decode(feature):
        if isinstance(feature, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(feature, datasets.List):
            return datasets.List(no_decode(feature.feature))
        if isinstance(feature, dict):
            return {k: no_decode(v) for k, v in feature.items()}
        return feature

    features = datasets.Features({k: no_decode(v) for k, v in ds.features.items()})
    return ds if features == ds.features else ds.cast(features)


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and os.path.isfile(value["path"]):
            return Path(value["path"]).read_bytes()
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def as_list(value: Any) -> list:
    """Columns stored as a Python-literal string (e.g. "['a', 'b']") or as a real list -> list."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        return list(parsed) if isinstance(parsed, (list, tuple)) else [parsed]
    return list(value)


def xy_points(points: Any) -> list[list[float]]:
    """`[{x, y}, ...]` or `{x: [...], y: [...]}` (both occur, depending on the datasets feature type) -> [[x, y]]."""
    if not points:
        return []
    if isinstance(points, dict):
        return [[float(x), float(y)] for x, y in zip(points["x"], points["y"])]
    return [[float(p["x"]), float(p["y"])] for p in points]


def _prefetch(load: Callable[[int], Any], n: int, workers: int) -> Iterator[Any]:
    """load(0..n-1) on a thread pool, yielded in order, with a bounded look-ahead: downloads overlap, one slow URL
    does not stall the others, and memory stays flat on million-row sets."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        upcoming = iter(range(n))
        for i in itertools.islice(upcoming, workers * 8):
            pending.append(pool.submit(load, i))
        while pending:
            result = pending.popleft().result()
            i = next(upcoming, None)
            if i is not None:
                pending.append(pool.submit(load, i))
            yield result


def iter_records(
    source: HFSource,
    rows: datasets.Dataset,
    split: str,
    fetcher: ImageFetcher | None = None,
    limit: int | None = None,
    workers: int = 8,
    on_row: Callable[[], None] | None = None,
    lost: dict[str, int] | None = None,
) -> Iterator[Record]:
    """Rows -> records, in row order; rows whose image is lost or unreadable are dropped and counted in `lost`."""
    lost = {} if lost is None else lost
    source.check_split(split, from_hub=False)
    if source.url_column is not None and fetcher is None:
        raise ValueError(f"source {source.name!r} downloads images from URLs and needs an ImageFetcher")

    def load(i: int) -> tuple[int, dict[str, Any], bytes | None, str]:
        row = rows[i]
        if source.url_column is not None:
            sha = row.get(source.sha_column) if source.sha_column else None
            data = fetcher.get(row[source.url_column], sha)
            return i, row, data, "download failed"
        return i, row, _image_bytes(row.get(source.image_column)), "no image"

    n = len(rows) if limit is None else min(limit, len(rows))
    for i, row, data, problem in _prefetch(load, n, max(workers, 1)):
        if on_row is not None:
            on_row()
        if data is not None:
            try:
                data, size = normalize_image_bytes(data)
            except Exception:
                data, problem = None, "unreadable image"
        if data is None:
            lost[problem] = lost.get(problem, 0) + 1
            continue
        try:
            converted = source.convert(row, size)
        except Exception as exn:
            raise ValueError(f"source {source.name!r}, split {split!r}, row {i}: the converter failed on this row "
                             f"({type(exn).__name__}: {exn}); columns: {sorted(row)}") from exn
        if not converted:
            lost["skipped by the converter"] = lost.get("skipped by the converter", 0) + 1
        for k, fields in enumerate(converted):
            key = f"{source.name}_{split}_{i:09d}" + (f"_{k}" if k else "")
            metadata = {"dataset": source.name, "split": split, "row": i, **fields.pop("metadata", {})}
            text_only = fields.pop("text_only", False)  # the row's image is not part of the question (MMMU)
            example = {"id": key, "schema_version": SCHEMA_VERSION, **fields, "metadata": metadata}
            yield Record(example, None if text_only else data)
