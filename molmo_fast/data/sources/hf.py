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
    default_split: str = "train"
    configs: tuple[str | None, ...] = (None,)  # several = concatenated (MMMU subjects, PixMo-Docs is one each)
    image_column: str | None = "image"  # a datasets Image column (or a list of them: the first is used)
    url_column: str | None = None  # ... or images downloaded from this column
    sha_column: str | None = None
    verify_ssl: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if (self.image_column is None) == (self.url_column is None):
            raise ValueError(f"HFSource {self.name!r}: set exactly one of image_column and url_column")


def load_rows(source: HFSource, split: str, input_path: str | None = None) -> datasets.Dataset:
    """The source's rows, from the hub or (offline) a `save_to_disk` directory, a parquet file or a parquet folder."""
    import datasets

    if input_path is None:
        parts = [datasets.load_dataset(source.hub_id, config, split=split) for config in source.configs]
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    else:
        path = Path(input_path)
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
        elif (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(path))[split]
        elif path.is_dir():
            # the split as a whole word of the file's path: "test" must not also take "testmini-*.parquet"
            in_split = re.compile(rf"(^|[^a-zA-Z0-9]){re.escape(split)}([^a-zA-Z0-9]|$)")
            files = sorted(str(p) for p in path.rglob("*.parquet") if in_split.search(p.relative_to(path).as_posix())) \
                or sorted(str(p) for p in path.rglob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"{path}: no saved dataset and no .parquet files")
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        elif path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=[str(path)], split="train")
        else:
            raise FileNotFoundError(f"--input {path}: expected a save_to_disk directory, a .parquet file or a folder")
    return with_raw_images(ds)


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
            example = {"id": key, "schema_version": SCHEMA_VERSION, **fields, "metadata": metadata}
            yield Record(example, data)
