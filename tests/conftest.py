import json
import os
import shutil
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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, golden_dir) -> Path:
    """An HF checkpoint dir of the golden tiny model with room for the shipped tokenizer's ids, random weights."""
    from molmo_fast.config import MolmoEConfig
    from molmo_fast.model.molmoe import MolmoE

    out = tmp_path_factory.mktemp("ckpt")
    config = json.loads((golden_dir / "tiny_model" / "config.json").read_text())
    config.update(vocab_size=50280, embedding_size=50304)
    (out / "config.json").write_text(json.dumps(config))
    MolmoE(MolmoEConfig.from_hf_json(out / "config.json")).init_weights(0).save_pretrained(out)
    shutil.copy(golden_dir / "tiny_model" / "preprocessor_config.json", out)
    return out


@pytest.fixture(scope="session")
def golden_cases(golden_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(golden_dir / "cases.safetensors")
