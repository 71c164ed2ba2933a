"""Build a WebDataset shard set from a source.

    python -m molmo_fast.data.build --list
    python -m molmo_fast.data.build --source synthetic_counting --out data/counting --limit 2000
    python -m molmo_fast.data.build --source chart_qa --split test --out data/chart_qa_test
    python -m molmo_fast.data.build --source pixmo_count --split test --input ~/hf/pixmo-count --out data/pixmo_count

Hugging Face sources read the hub id by default, or `--input` (a `save_to_disk` directory, a parquet file or a
folder of parquet files) to work offline. URL datasets download through a resumable cache (`--cache`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from molmo_fast.data.shards import ShardSetWriter
from molmo_fast.data.sources.download import Fetch, ImageFetcher, url_fetch
from molmo_fast.data.sources.hf import HFSource, iter_records, load_rows, with_raw_images
from molmo_fast.data.sources.registry import HF_SOURCES, get_source, list_sources
from molmo_fast.data.sources.synthetic import ensure_synthetic_shards
from molmo_fast.outdir import OutputDirError, atomic_output_dir, check_output_dir

if TYPE_CHECKING:
    import datasets


def build_hf(
    source: HFSource,
    out_dir: str | Path,
    split: str | None = None,
    input_path: str | None = None,
    limit: int | None = None,
    workers: int = 8,
    dataset: datasets.Dataset | None = None,
    fetch: Fetch | None = None,
    cache_dir: str | Path | None = None,
    shard_size: int = 1000,
    progress: bool = True,
    retry_failed: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert one split of a HF source into shards; returns the build summary (also saved in info.json).

    The set is written into a temporary sibling of `out_dir` and renamed into place (see molmo_fast.outdir): a
    directory molmo_fast did not write is refused, and an earlier build is replaced only with `overwrite`."""
    split = split or source.default_split
    cache = Path(cache_dir) if cache_dir is not None else Path(out_dir).parent / "image_cache"
    protected = {p: what for p, what in ((input_path, "the --input data"), (cache, "the image cache")) if p}
    check_output_dir(out_dir, "data_build", protected=protected, overwrite=overwrite)  # before any download
    rows = with_raw_images(dataset) if dataset is not None else load_rows(source, split, input_path)
    fetcher = None
    if source.url_column is not None:
        fetcher = ImageFetcher(cache, fetch=fetch or url_fetch(source.verify_ssl), retry_failed=retry_failed)
    total = len(rows) if limit is None else min(limit, len(rows))
    lost: dict[str, int] = {}
    bar = tqdm(total=total, desc=f"{source.name}/{split}", unit="row", disable=not progress)
    info = {"source": source.name, "hub_id": source.hub_id, "split": split, "input": input_path, "rows": total}
    with atomic_output_dir(out_dir, "data_build", protected=protected, overwrite=overwrite) as tmp, \
            ShardSetWriter(tmp, shard_size=shard_size, info=info) as writer:
        written = writer.write_all(iter_records(source, rows, split, fetcher, limit, workers, bar.update, lost))
        summary = {"rows": total, "examples": written, "rows_lost": lost}
        if fetcher is not None:
            summary["downloads"] = fetcher.stats.summary()
        writer.info["summary"] = summary
    bar.close()
    return summary


def build(name: str, out_dir: str | Path, split: str | None = None, input_path: str | None = None,
          limit: int | None = None, workers: int = 8, seed: int = 0, image_size: int = 224,
          cache_dir: str | None = None, shard_size: int = 1000, progress: bool = True,
          retry_failed: bool = False, overwrite: bool = False) -> dict[str, Any]:
    source = get_source(name)
    if isinstance(source, str):
        n = 1000 if limit is None else limit
        ensure_synthetic_shards(out_dir, source, n, seed=seed, split=split or "train", image_size=image_size,
                                shard_size=shard_size, overwrite=overwrite)
        return {"rows": n, "examples": n, "rows_lost": {}}
    return build_hf(source, out_dir, split, input_path, limit, workers, cache_dir=cache_dir, shard_size=shard_size,
                    progress=progress, retry_failed=retry_failed, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m molmo_fast.data.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the available sources and exit")
    parser.add_argument("--source", help="source name (see --list)")
    parser.add_argument("--out", help="output directory for shard-*.tar, sizes.json, info.json")
    parser.add_argument("--split", help="dataset split (default: the source's usual one)")
    parser.add_argument("--input", help="local save_to_disk dir / parquet file or folder instead of the hub")
    parser.add_argument("--limit", type=int, help="convert at most N rows (synthetic: build N examples)")
    parser.add_argument("--workers", type=int, default=8, help="parallel image loads/downloads")
    parser.add_argument("--seed", type=int, default=0, help="synthetic sources: generator seed")
    parser.add_argument("--image-size", type=int, default=224, help="synthetic sources: image side in pixels")
    parser.add_argument("--cache", help="image download cache (default: OUT/../image_cache)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--retry-failed", action="store_true", help="retry URLs recorded as failed by earlier runs")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier build in --out (never a directory molmo_fast did not write)")
    args = parser.parse_args(argv)

    if args.list:
        for name in list_sources():
            src = HF_SOURCES.get(name)
            where = f"{src.hub_id}{'' if src.configs == (None,) else ' ' + ','.join(src.configs[:2])}" if src \
                else "synthetic (no network)"
            print(f"{name:28s} {where}")
        return 0
    if not args.source or not args.out:
        parser.error("--source and --out are required (or --list)")
    try:
        summary = build(args.source, args.out, args.split, args.input, args.limit, args.workers, args.seed,
                        args.image_size, args.cache, args.shard_size, retry_failed=args.retry_failed,
                        overwrite=args.overwrite)
    except OutputDirError as e:
        raise SystemExit(f"molmo_fast.data.build: {e}") from None
    print(json.dumps(summary, indent=1), file=sys.stderr)
    lost = sum(summary["rows_lost"].values())
    if lost:
        print(f"warning: {lost} of {summary['rows']} rows lost ({summary['rows_lost']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
