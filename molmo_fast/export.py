"""Export a training checkpoint to the HF MolmoE layout: `python -m molmo_fast.export RUN_DIR OUT_DIR [--step N]`.

The output directory is loadable by `MolmoE.from_pretrained`, the eval CLI and the HF remote code: config.json,
generation_config.json, safetensors (HF key names) and the run's preprocessing files (tokenizer +
preprocessor_config.json), so a model trained with small crops is evaluated with small crops.
"""

import argparse
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from molmo_fast.train.checkpoint import find_checkpoint, full_model_state_dict


def _finish(model: nn.Module, run_dir: Path, out_dir: Path) -> Path:
    """Writes `model` (unsharded, on CPU) plus the run's preprocessing files to `out_dir`, atomically."""
    from molmo_fast.data.tokenizer import Tokenizer

    preprocessor = run_dir / "preprocessor"
    tokenizer = Tokenizer.from_dir(preprocessor)
    model.generation_config = {**model.generation_config, "eos_token_id": tokenizer.eos_id,
                               "pad_token_id": tokenizer.pad_id}
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in preprocessor.iterdir():
        shutil.copyfile(f, tmp / f.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def export_sharded_model(model: nn.Module, run_dir: str | Path, out_dir: str | Path, is_main: bool) -> None:
    """Collective: gathers a FSDP-sharded training model and writes it on rank 0."""
    from molmo_fast.model.molmoe import MolmoE

    full_sd = full_model_state_dict(model)
    if is_main:
        cpu_model = MolmoE.from_config_on_meta(model.config)
        cpu_model.load_state_dict(full_sd, strict=True, assign=True)
        cpu_model.reset_runtime_buffers()
        _finish(cpu_model, Path(run_dir), Path(out_dir))


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Single process: reads a DCP checkpoint of `run_dir` (latest, or `step`) and writes the HF layout."""
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
    return _finish(model, run_dir, Path(out_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m molmo_fast.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a molmo_fast training run directory")
    parser.add_argument("out_dir", help="where to write the HF-layout model")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    with torch.no_grad():
        out = export_run(args.run_dir, args.out_dir, args.step)
    print(f"exported {out}")


if __name__ == "__main__":
    main()
