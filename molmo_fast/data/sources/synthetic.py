"""Synthetic sources drawn with PIL: counting, pointing, analog clocks and bar-chart QA.

No network, and example i of a split depends only on (seed, split, i), so any size can be built, in any order, in
parallel, and the same seed always gives the same shards. The images are small and clean on purpose: these sets are
the default data of the training demo and of the eval tests, and a tiny model has to be able to learn them.
"""

from __future__ import annotations

import fcntl
import io
import math
import os
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from molmo_fast.data.shards import SCHEMA_VERSION, SIZES_FILE, Record, ShardSetWriter
from molmo_fast.outdir import atomic_output_dir, is_own_output

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "orange": (240, 140, 20),
          "purple": (140, 60, 190)}
SHAPES = ("circle", "square", "triangle")
GRID = 4  # shapes sit in distinct cells of a GRID x GRID layout, so they never overlap
BACKGROUND = (250, 250, 245)


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=color)


def _scene(rng: np.random.Generator, size: int, n_target: int, n_distractor: int):
    """Place n_target shapes of one (color, shape) and distractors that differ in both color and shape."""
    t_color, d_color = rng.choice(list(COLORS), size=2, replace=False)
    t_shape, d_shape = rng.choice(SHAPES, size=2, replace=False)
    cells = rng.permutation(GRID * GRID)[: n_target + n_distractor]
    cell = size / GRID
    radius = cell * 0.3
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    points = []
    for k, c in enumerate(cells):
        jitter = rng.uniform(-0.1, 0.1, size=2) * cell
        cx = (c % GRID + 0.5) * cell + jitter[0]
        cy = (c // GRID + 0.5) * cell + jitter[1]
        is_target = k < n_target
        _draw_shape(draw, t_shape if is_target else d_shape, cx, cy, radius, COLORS[t_color if is_target else d_color])
        if is_target:
            points.append([round(float(cx), 1), round(float(cy), 1)])
    points.sort(key=lambda p: (p[0], p[1]))
    return img, f"{t_color} {t_shape}s", points


def counting(rng: np.random.Generator, size: int) -> tuple[dict, Image.Image]:
    n = int(rng.integers(0, 10))
    img, label, points = _scene(rng, size, n, int(rng.integers(0, 4)))
    return {"style": "point_count", "points": points, "label": label, "count": n}, img


def pointing(rng: np.random.Generator, size: int) -> tuple[dict, Image.Image]:
    n = int(rng.integers(1, 4))
    img, label, points = _scene(rng, size, n, int(rng.integers(1, 5)))
    return {"style": "pointing", "points": points, "label": label, "count": n}, img


def clocks(rng: np.random.Generator, size: int) -> tuple[dict, Image.Image]:
    """An analog clock; minutes are multiples of 5 so that the hands always point at a tick."""
    hour, minute = int(rng.integers(1, 13)), int(rng.integers(0, 12)) * 5
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    c, r = size / 2, size * 0.45
    draw.ellipse([c - r, c - r, c + r, c + r], fill=(255, 255, 255), outline=(30, 30, 30), width=max(2, size // 60))
    for tick in range(12):
        a = 2 * math.pi * tick / 12
        inner = r * (0.8 if tick % 3 == 0 else 0.88)
        draw.line([c + inner * math.sin(a), c - inner * math.cos(a), c + r * 0.95 * math.sin(a),
                   c - r * 0.95 * math.cos(a)], fill=(30, 30, 30), width=max(1, size // 80))
    hour_angle = 2 * math.pi * ((hour % 12) + minute / 60) / 12
    minute_angle = 2 * math.pi * minute / 60
    for angle, length, width, color in ((hour_angle, 0.5, size // 25, (20, 20, 20)),
                                        (minute_angle, 0.8, size // 50, (200, 30, 30))):
        draw.line([c, c, c + r * length * math.sin(angle), c - r * length * math.cos(angle)],
                  fill=color, width=max(2, width))
    answer = f"{hour}:{minute:02d}"
    example = {"style": "clocks", "question": "What time is shown on the clock?", "answers": [answer],
               "metadata": {"hour": hour, "minute": minute}}
    return example, img


def charts(rng: np.random.Generator, size: int) -> tuple[dict, Image.Image]:
    """A bar chart of 3-5 lettered bars with gridlines; ask for one bar's value or for the tallest bar."""
    n = int(rng.integers(3, 6))
    names = [chr(ord("A") + i) for i in range(n)]
    values = rng.choice(np.arange(1, 10), size=n, replace=False).tolist()
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    left, bottom, top = size * 0.15, size * 0.85, size * 0.08
    unit = (bottom - top) / 9
    for v in range(0, 10, 3):
        y = bottom - v * unit
        draw.line([left, y, size * 0.97, y], fill=(200, 200, 200), width=1)
        draw.text((size * 0.03, y - 5), str(v), fill=(0, 0, 0))
    slot = (size * 0.97 - left) / n
    for i, (name, v) in enumerate(zip(names, values)):
        x0 = left + slot * (i + 0.2)
        draw.rectangle([x0, bottom - v * unit, x0 + slot * 0.6, bottom], fill=COLORS["blue"])
        draw.text((x0 + slot * 0.22, bottom + 4), name, fill=(0, 0, 0))
    draw.line([left, top, left, bottom, size * 0.97, bottom], fill=(0, 0, 0), width=2)
    if rng.random() < 0.5:
        i = int(rng.integers(n))
        question, answer = f"What is the value of bar {names[i]}?", str(values[i])
    else:
        question, answer = "Which bar is the tallest?", names[int(np.argmax(values))]
    example = {"style": "chart_qa", "question": question, "answers": [answer],
               "metadata": {"names": names, "values": values}}
    return example, img


GENERATORS: dict[str, Callable[[np.random.Generator, int], tuple[dict, Image.Image]]] = {
    "synthetic_counting": counting,
    "synthetic_pointing": pointing,
    "synthetic_clocks": clocks,
    "synthetic_charts": charts,
}


def make_example(name: str, index: int, seed: int = 0, split: str = "train", image_size: int = 224) -> Record:
    """Example `index` of synthetic source `name`; a pure function of its arguments."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    example, img = GENERATORS[name](rng, image_size)
    metadata = {"dataset": name, "split": split, "index": index, **example.pop("metadata", {})}
    example = {"id": f"{name}_{split}_{index:09d}", "schema_version": SCHEMA_VERSION, **example, "metadata": metadata}
    return Record(example, _png(img))


def generate(name: str, n: int, seed: int = 0, split: str = "train", image_size: int = 224, start: int = 0):
    """Yield examples start..start+n-1 of a synthetic source."""
    if name not in GENERATORS:
        raise KeyError(f"unknown synthetic source {name!r}; expected one of {sorted(GENERATORS)}")
    for i in range(start, start + n):
        yield make_example(name, i, seed, split, image_size)


def ensure_synthetic_shards(out_dir: str | os.PathLike, source: str, n: int, seed: int = 0, split: str = "train",
                            image_size: int = 224, shard_size: int = 256, overwrite: bool = False) -> Path:
    """Build `n` examples of a synthetic source into `out_dir` unless an identical build is already there.

    A set with other parameters in `out_dir` is refused unless `overwrite` (it may be another run's data); a
    directory molmo_fast did not write is always refused. Builds into a temporary sibling and renames it, so
    concurrent callers (pytest workers, FSDP ranks) never see a half-written set.
    """
    out_dir = Path(out_dir)
    params = {"source": source, "split": split, "n": n, "seed": seed, "image_size": image_size,
              "shard_size": shard_size}
    if is_own_output(out_dir, "synthetic", params) and (out_dir / SIZES_FILE).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # check-then-publish is not atomic: without the lock, two ranks would both build the missing set and the
    # second would find the first one's in place
    lock = os.open(out_dir.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_own_output(out_dir, "synthetic", params) and (out_dir / SIZES_FILE).is_file():
            return out_dir
        with atomic_output_dir(out_dir, "synthetic", params=params, overwrite=overwrite) as tmp, \
                ShardSetWriter(tmp, shard_size=shard_size, info={"build": params}) as writer:
            writer.write_all(generate(source, n, seed, split, image_size))
        return out_dir
    finally:
        os.close(lock)


def shared_synthetic_set(root: str | os.PathLike, source: str, n: int, seed: int = 0, split: str = "train",
                         image_size: int = 224) -> Path:
    """The shared set of these parameters under `root`, built on first use. Each parameter set has its own
    directory, so changing a size or seed builds a new set instead of changing the data of every run using the old
    one."""
    out_dir = Path(root) / source / f"{split}-n{n}-seed{seed}-{image_size}px"
    return ensure_synthetic_shards(out_dir, source, n, seed, split, image_size)
