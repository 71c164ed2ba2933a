"""Registry of the shard sources: PixMo and academic converters (Hugging Face datasets) and synthetic generators."""

from __future__ import annotations

from molmo_fast.data.sources.academic import SOURCES as _ACADEMIC
from molmo_fast.data.sources.hf import HFSource
from molmo_fast.data.sources.pixmo import SOURCES as _PIXMO
from molmo_fast.data.sources.synthetic import GENERATORS

HF_SOURCES: dict[str, HFSource] = {s.name: s for s in _PIXMO + _ACADEMIC}
SYNTHETIC_SOURCES: tuple[str, ...] = tuple(GENERATORS)


def list_sources() -> list[str]:
    return sorted(HF_SOURCES) + list(SYNTHETIC_SOURCES)


def get_source(name: str) -> HFSource | str:
    """The HFSource of a converter, or the name itself for a synthetic source."""
    if name in HF_SOURCES:
        return HF_SOURCES[name]
    if name in SYNTHETIC_SOURCES:
        return name
    raise KeyError(f"unknown source {name!r}; known: {', '.join(list_sources())}")

