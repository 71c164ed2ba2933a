"""Study settings: a grid (`--grid KEY=V1,V2,...`, Cartesian product) or a JSONL file, validated as knob strings.

A setting is a dict {knob: value} over `molmo_fast.knobs.Knobs` fields (top_k, top_k_image, top_k_text,
top_k_generated, routing, skip_blocks, max_crops, max_new_tokens, moe_impl). Values are kept as the user wrote
them (ints where they are ints). List-valued knobs (skip_blocks, per-layer top_k) take commas inside one value,
so their grid values are separated by ';' instead: `skip_blocks=;3;3,7` is none, {3}, {3, 7}.
"""

import hashlib
import itertools
import json
import re
from pathlib import Path

from molmo_fast.knobs import Knobs

Setting = dict[str, int | str]


def _value(text: str) -> int | str:
    text = text.strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def parse_grid(specs: list[str]) -> list[Setting]:
    """["top_k=1,2", "routing=topk,topk_renorm"] -> the 4 settings of the product, first key varying slowest."""
    axes: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key:
            raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,... (or KEY=V1;V2;... for list values)")
        if key in axes:
            raise ValueError(f"--grid {spec!r}: key {key!r} given twice; list all its values in one --grid")
        axes[key] = [_value(v) for v in values.split(";" if ";" in values else ",")]
    settings = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    for s in settings:
        validate(s)
    return settings


def load_settings(path: str | Path) -> list[Setting]:
    """A JSONL file, one setting object per line (blank lines skipped)."""
    settings = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            setting = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(setting, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object of knob values, got {type(setting).__name__}")
        settings.append({k: _value(v) if isinstance(v, str) else v for k, v in setting.items()})
        try:
            validate(settings[-1])
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    return settings


def knob_strings(setting: Setting) -> list[str]:
    """The setting as `molmo_fast.knobs` strings (what eval's --knob takes)."""
    return [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in setting.items()]


def validate(setting: Setting) -> None:
    Knobs.parse(knob_strings(setting))  # raises ValueError naming the bad knob


def label(setting: Setting) -> str:
    """Short human label: "top_k=2 routing=topk_renorm" (an empty skip_blocks shows as '-'; {} as 'default')."""
    return " ".join(f"{k}={v if v != '' else '-'}" for k, v in setting.items()) or "default"


def setting_id(setting: Setting) -> str:
    """A directory name that is stable for the setting: readable prefix + content hash."""
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "-", "__".join(f"{k}={v}" for k, v in setting.items()))[:60] or "default"
    digest = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"
