"""The shard format: WebDataset tars of `{key}.json` + `{key}.jpg|png`, plus `sizes.json` and `info.json`.

One sample is an *Example* (see docs/DATA_FORMAT.md): the JSON holds everything but the image; the image is stored
as its original encoded bytes. This module validates examples, writes shard sets and decodes raw tar samples back
into examples. Reading the tars themselves (order, splitting, resampling) is the loader's job.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import webdataset as wds
from PIL import Image

SCHEMA_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
SIZES_FILE = "sizes.json"
INFO_FILE = "info.json"
IMAGE_EXTS = ("jpg", "png")

# Exactly one content group must be present; each tuple lists the fields that group requires.
_CONTENT_FIELDS = {
    "messages": ("messages",),
    "message_list": ("message_list",),
    "qa": ("question", "answers"),
    "multiple_choice": ("question", "options", "answer_idx"),
    "points": ("points", "label"),
    "caption": ("caption",),
}


class ShardFormatError(ValueError):
    """A record or sample that does not follow the shard schema."""


@dataclass
class Record:
    """What a source produces: the example's JSON fields plus the image's original encoded bytes."""

    example: dict[str, Any]
    image_bytes: bytes | None = None


def image_format(data: bytes) -> str:
    """Shard extension for encoded image bytes, from the magic number ('jpg' or 'png'), else ''."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return ""


def normalize_image_bytes(data: bytes) -> tuple[bytes, tuple[int, int]]:
    """Keep JPEG/PNG bytes untouched; re-encode anything else (GIF, WebP, TIFF, ...) losslessly as PNG.

    Returns the bytes to store and the image's (width, height). Raises if the bytes are not a readable image.
    """
    with Image.open(io.BytesIO(data)) as img:
        size = img.size
        if image_format(data):
            img.verify()
            return data, size
        img.seek(0)
        out = io.BytesIO()
        img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB").save(out, format="PNG")
        return out.getvalue(), size


def validate_example(example: dict[str, Any], where: str = "example") -> None:
    """Check the JSON part of an example against the schema; errors name the field and what was expected."""
    key = example.get("id")
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ShardFormatError(f"{where}: 'id' must be a non-empty str without '.' or '/', got {key!r}")
    if example.get("schema_version") != SCHEMA_VERSION:
        raise ShardFormatError(
            f"{where} ({key}): 'schema_version' must be {SCHEMA_VERSION}, got {example.get('schema_version')!r}"
        )
    if not isinstance(example.get("style"), str) or not example["style"]:
        raise ShardFormatError(f"{where} ({key}): 'style' must be a non-empty str, got {example.get('style')!r}")
    size = example.get("image_size")
    if size is not None and not (
        isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise ShardFormatError(f"{where} ({key}): 'image_size' must be [width, height] of positive ints or null")
    groups = [name for name, fields in _CONTENT_FIELDS.items() if all(f in example for f in fields)]
    if not groups:
        raise ShardFormatError(
            f"{where} ({key}): no content; expected one of messages, message_list, question+answers, "
            f"question+options+answer_idx, points+label, caption"
        )
    if "messages" in example and not (isinstance(example["messages"], list) and len(example["messages"]) >= 1):
        raise ShardFormatError(f"{where} ({key}): 'messages' must be a non-empty list of str")
    if "options" in example and not (0 <= example.get("answer_idx", -1) < len(example["options"])):
        raise ShardFormatError(f"{where} ({key}): 'answer_idx' must index 'options', got {example.get('answer_idx')!r}")
    if "points" in example:
        points = example["points"]
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in points):
            raise ShardFormatError(f"{where} ({key}): 'points' must be a list of [x, y] pixel pairs")
    if not isinstance(example.get("metadata", {}), dict):
        raise ShardFormatError(f"{where} ({key}): 'metadata' must be a dict")
    if "image" in example:
        raise ShardFormatError(f"{where} ({key}): the decoded 'image' does not belong in the JSON part")


def encode_record(record: Record) -> dict[str, Any]:
    """Record -> WebDataset sample dict (`__key__`, `json`, and `jpg`/`png` with the untouched bytes)."""
    example = dict(record.example)
    example.setdefault("metadata", {})
    sample: dict[str, Any] = {"__key__": example["id"]}
    if record.image_bytes is not None:
        data, size = normalize_image_bytes(record.image_bytes)
        example["image_size"] = [int(size[0]), int(size[1])]
        sample[image_format(data)] = data
    else:
        example["image_size"] = None
    validate_example(example, where=f"record {example.get('id')!r}")
    sample["json"] = json.dumps(example, ensure_ascii=False).encode("utf-8")
    return sample


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw tar sample (`__key__` + member bytes) -> Example with a decoded PIL image. Raises on any corruption."""
    if "json" not in sample:
        raise ShardFormatError(f"sample {sample.get('__key__')!r}: no .json member")
    example = json.loads(sample["json"])
    if not isinstance(example, dict):
        raise ShardFormatError(f"sample {sample.get('__key__')!r}: .json is not an object")
    validate_example(example, where=f"sample {sample.get('__key__')!r}")
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if (data is None) != (example.get("image_size") is None):
        raise ShardFormatError(f"sample {example['id']!r}: image member and 'image_size' disagree")
    image = None
    if data is not None:
        image = Image.open(io.BytesIO(data))
        image.load()  # force a full decode here, so truncated bytes fail in the loader, not in preprocessing
        if list(image.size) != list(example["image_size"]):
            raise ShardFormatError(
                f"sample {example['id']!r}: image is {list(image.size)}, JSON says {example['image_size']}")
    example["image"] = image
    return example


class ShardSetWriter:
    """Writes records into `out_dir/shard-%06d.tar` and, on close, `sizes.json` and `info.json`.

    Shards roll over at `shard_size` samples; keys must be unique within the set.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 1000, info: dict[str, Any] | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # a set is complete only once sizes.json exists again: an interrupted rebuild is never mistaken for one
        for stale in [*self.out_dir.glob("shard-*.tar"), self.out_dir / SIZES_FILE, self.out_dir / INFO_FILE]:
            stale.unlink(missing_ok=True)
        self.info = dict(info or {})
        self.sizes: dict[str, int] = {}
        self._keys: set[str] = set()
        # mtime fixed so that the same records give byte-identical shards
        self._writer = wds.ShardWriter(
            str(self.out_dir / SHARD_PATTERN), maxcount=shard_size, verbose=0, post=self._finished, mtime=0.0
        )

    def _finished(self, fname: str) -> None:
        self.sizes[Path(fname).name] = self._writer.count

    def write(self, record: Record) -> None:
        sample = encode_record(record)
        if sample["__key__"] in self._keys:
            raise ShardFormatError(f"duplicate key {sample['__key__']!r} in {self.out_dir}")
        self._keys.add(sample["__key__"])
        self._writer.write(sample)

    def write_all(self, records: Iterable[Record]) -> int:
        n = 0
        for record in records:
            self.write(record)
            n += 1
        return n

    def close(self) -> dict[str, int]:
        self._writer.close()
        sizes = {name: n for name, n in sorted(self.sizes.items()) if n > 0}
        for name, n in self.sizes.items():
            if n == 0:
                (self.out_dir / name).unlink()
        write_json(self.out_dir / SIZES_FILE, sizes)
        info = {"schema_version": SCHEMA_VERSION, "num_samples": sum(sizes.values()), **self.info}
        write_json(self.out_dir / INFO_FILE, info)
        return sizes

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # no sizes.json: a failed build must not look like a shard set
            self._writer.close()


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: a reader never sees a half-written sizes/info file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_sizes(shard_dir: str | os.PathLike) -> dict[str, int]:
    """`{shard_path: num_samples}` of a shard set, in shard order; error if sizes.json is missing or stale."""
    shard_dir = Path(shard_dir)
    path = shard_dir / SIZES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a shard set (build one with python -m molmo_fast.data.build)")
    sizes = json.loads(path.read_text())
    missing = [name for name in sizes if not (shard_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lists shards that do not exist: {missing[:3]}")
    return {str(shard_dir / name): int(n) for name, n in sorted(sizes.items())}


def read_info(shard_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(shard_dir) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
