"""HF interop of what we write: run dirs' preprocessing files and exports carry the released model's auto_map
(so HF's AutoProcessor finds the remote-code classes) and a generation_config.json with the release's keys."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from molmo_fast.config import ASSETS, MolmoEConfig
from molmo_fast.data.tokenizer import Tokenizer
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.runtime.export import HF_AUTO_MAP
from molmo_fast.train.config import DataConfig
from molmo_fast.train.data import write_preprocessor_dir

RELEASE = ASSETS / "molmoe-1b"
REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_release_files_name_the_remote_code_processor_modules():
    assert json.loads((RELEASE / "preprocessor_config.json").read_text())["auto_map"] == HF_AUTO_MAP
    assert HF_AUTO_MAP["AutoImageProcessor"] == "image_preprocessing_molmo.MolmoImageProcessor"


def _run_dir(tmp_path: Path) -> Path:
    """A run dir as the trainer leaves it (DCP checkpoint + model_config.json + preprocessor/), made from a
    preprocessor dir that still carries a stale auto_map."""
    old = tmp_path / "old_release"
    shutil.copytree(RELEASE, old)
    pp = json.loads((old / "preprocessor_config.json").read_text())
    pp["auto_map"]["AutoImageProcessor"] = "multimodal_preprocessor.MolmoImageProcessor"
    (old / "preprocessor_config.json").write_text(json.dumps(pp))
    run_dir = tmp_path / "run"
    data = DataConfig(synthetic={"synthetic_charts": 8}, preprocessor=str(old), image_overrides={"max_crops": 3})
    write_preprocessor_dir(data, run_dir / "preprocessor")
    cfg = MolmoEConfig.from_name("tiny")
    cfg.llm.vocab_size, cfg.llm.embedding_size = 50280, 50304
    cfg.to_hf_json(run_dir / "model_config.json")
    import torch.distributed.checkpoint as dcp

    step_dir = run_dir / "checkpoints" / "step_3"
    dcp.save({"model": MolmoE(cfg).init_weights(0).state_dict()}, checkpoint_id=str(step_dir))
    (step_dir / "train_state.json").write_text(json.dumps({"step": 3}))
    return run_dir


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_run_dirs_and_exports_carry_the_release_auto_map_and_generation_config(tmp_path):
    run_dir = _run_dir(tmp_path)
    written = json.loads((run_dir / "preprocessor" / "preprocessor_config.json").read_text())
    assert written["auto_map"] == HF_AUTO_MAP and written["max_crops"] == 3  # overrides applied, auto_map fixed
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "molmo_fast.export", str(run_dir), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    exported = json.loads((out / "preprocessor_config.json").read_text())
    assert exported == written
    gen = json.loads((out / "generation_config.json").read_text())
    release_gen = json.loads((RELEASE / "generation_config.json").read_text())
    assert set(release_gen) <= set(gen) and gen["_from_model_config"] is True
    tokenizer = Tokenizer.from_dir(out)
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (tokenizer.eos_id, tokenizer.pad_id)
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (release_gen["eos_token_id"], release_gen["pad_token_id"])
    model = MolmoE.from_pretrained(out)
    assert model.generation_config == gen and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_generate_accepts_a_run_dir_like_eval(tmp_path, capsys):
    from molmo_fast import generate

    run_dir = _run_dir(tmp_path)
    args = ["--prompt", "What is this?", "--max_new_tokens", "3", "--device", "cpu"]
    from_run = generate.main(["--checkpoint", str(run_dir), *args])
    exported = run_dir / "checkpoints" / "step_3" / "hf"  # exported once, where eval puts it
    assert (exported / "config.json").is_file()
    assert generate.main(["--checkpoint", str(exported), *args]) == from_run
    with pytest.raises(FileNotFoundError, match="step 7"):
        generate.main(["--checkpoint", str(run_dir), "--step", "7", *args])
