"""The import layering: runtime sits below eval and train, eval never loads the training stack, and train may run
eval. Each check imports in a fresh interpreter, so modules other tests loaded cannot hide a violation."""

import json
import subprocess
import sys

import pytest


def _loaded_after(imports: list[str]) -> list[str]:
    code = (f"import sys\nfor name in {imports!r}:\n    __import__(name)\n"
            "import json\nprint(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _under(modules: list[str], *packages: str) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)]


@pytest.mark.parametrize("entry", [["molmo_fast.eval"], ["molmo_fast.eval.runner", "molmo_fast.eval.__main__"],
                                   ["molmo_fast.export", "molmo_fast.generate"]])
def test_eval_export_and_generate_load_no_training_module(entry):
    loaded = _loaded_after(entry)
    assert set(entry) <= set(loaded)
    assert _under(loaded, "molmo_fast.train") == []


def test_a_plain_eval_or_generate_loads_neither_dcp_nor_fsdp():
    """Those come in only for a run checkpoint that still needs exporting, or for --fsdp."""
    loaded = _loaded_after(["molmo_fast.eval.runner", "molmo_fast.eval.__main__", "molmo_fast.generate"])
    assert _under(loaded, "torch.distributed.checkpoint", "torch.distributed.fsdp") == []


def test_the_runtime_layer_loads_neither_eval_nor_train():
    from pathlib import Path

    import molmo_fast.runtime

    names = sorted(f"molmo_fast.runtime.{p.stem}" for p in Path(molmo_fast.runtime.__file__).parent.glob("*.py")
                   if p.stem != "__init__")
    loaded = _loaded_after(names)
    assert "molmo_fast.runtime.export" in loaded
    assert _under(loaded, "molmo_fast.train", "molmo_fast.eval") == []


def test_eval_config_is_importable_where_users_find_it():
    from molmo_fast.eval import EvalConfig
    from molmo_fast.eval.config import EvalConfig as in_config
    from molmo_fast.eval.runner import EvalConfig as in_runner

    assert EvalConfig is in_config is in_runner
