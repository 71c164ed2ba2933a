import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "fixtures" / "golden"

# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads this once, when it is first
# imported (torch._dynamo imports it), so it must be set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    """The golden tiny checkpoint through the public loader (module-scoped: tests may turn its knobs)."""
    from molmo_fast.model.molmoe import MolmoE

    return MolmoE.from_pretrained(golden_dir / "tiny_model")


@pytest.fixture(scope="session")
def golden_cases(golden_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(golden_dir / "cases.safetensors")
