"""molmo_fast: a fast, hackable PyTorch + Triton MolmoE-1B.

The public names resolve lazily so that `import molmo_fast.kernels` stays free of the model and data stacks.
"""

import importlib

_PUBLIC = {
    "MolmoEConfig": "molmo_fast.config",
    "MolmoE": "molmo_fast.model.molmoe",
    "Processor": "molmo_fast.data.processor",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'molmo_fast' has no attribute {name!r}")
