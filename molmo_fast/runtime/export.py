"""A run's weights in the HF MolmoE layout: config.json, generation_config.json, safetensors (HF key names) and
the run's preprocessing files (tokenizer + preprocessor_config.json), so a model trained with small crops is
evaluated with small crops. Loadable by `MolmoE.from_pretrained`, the eval and generate CLIs and the HF remote code.
"""

import importlib.metadata
import json
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from molmo_fast.runtime.checkpoints import find_checkpoint

# The processor classes of the released molmoe-1b's remote code, under the module names it ships them in: HF's
# AutoProcessor / AutoImageProcessor resolve preprocessor_config.json's auto_map against those files.
HF_AUTO_MAP = {"AutoImageProcessor": "image_preprocessing_molmo.MolmoImageProcessor",
               "AutoProcessor": "preprocessing_molmo.MolmoProcessor"}
# The released molmoe-1b's generation_config.json names the transformers version that wrote it; ours does too
# when transformers is installed, and otherwise repeats the release's.
_RELEASE_TRANSFORMERS = "4.43.0.dev0"


def generation_config(eos_id: int, pad_id: int) -> dict:
    """The generation_config.json of an export: the released model's keys with the run's tokenizer ids."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = _RELEASE_TRANSFORMERS
    return {"_from_model_config": True, "eos_token_id": eos_id, "pad_token_id": pad_id,
            "transformers_version": version}


def write_preprocessor_config(pp: dict, path: Path) -> None:
    """Writes a preprocessor_config.json that HF's AutoProcessor resolves (the release's auto_map)."""
    path.write_text(json.dumps({**pp, "auto_map": HF_AUTO_MAP}, indent=2, sort_keys=True) + "\n")


def write_hf_dir(model: nn.Module, preprocessor_dir: Path, out_dir: Path) -> Path:
    """Writes `model` (unsharded, on CPU) plus the preprocessing files of `preprocessor_dir` to `out_dir`,
    atomically (a temp sibling renamed into place)."""
    from molmo_fast.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(preprocessor_dir)
    model.generation_config = generation_config(tokenizer.eos_id, tokenizer.pad_id)
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in preprocessor_dir.iterdir():
        if f.name == "preprocessor_config.json":  # run dirs written before the auto_map fix get it here
            write_preprocessor_config(json.loads(f.read_text()), tmp / f.name)
        else:
            shutil.copyfile(f, tmp / f.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def export_sharded_model(model: nn.Module, run_dir: str | Path, out_dir: str | Path, is_main: bool) -> None:
    """Collective: gathers a FSDP-sharded model on rank 0's CPU and writes it there."""
    from molmo_fast.model.molmoe import MolmoE

    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        cpu_model = MolmoE.from_config_on_meta(model.config)
        cpu_model.load_state_dict(full_sd, strict=True, assign=True)
        cpu_model.reset_runtime_buffers()
        write_hf_dir(cpu_model, Path(run_dir) / "preprocessor", Path(out_dir))


@torch.no_grad()
def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Single process: reads a DCP checkpoint of `run_dir` (latest, or `step`) and writes the HF layout."""
    import torch.distributed.checkpoint as dcp

    from molmo_fast.config import MolmoEConfig
    from molmo_fast.model.molmoe import MolmoE

    run_dir = Path(run_dir)
    ckpt_dir = find_checkpoint(run_dir, step)
    model = MolmoE(MolmoEConfig.from_hf_json(run_dir / "model_config.json"))
    state = {"model": model.state_dict()}
    # Without a process group DCP loads in place, resharding whatever world size wrote the checkpoint.
    dcp.load(state, checkpoint_id=str(ckpt_dir))
    model.load_state_dict(state["model"], strict=True)
    model.reset_runtime_buffers()
    return write_hf_dir(model, run_dir / "preprocessor", Path(out_dir))
