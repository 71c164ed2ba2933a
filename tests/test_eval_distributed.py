"""Two torchrun ranks (gloo, CPU): data-parallel and FSDP eval score every example exactly once and agree with a
single process, also when the ranks' rows reach EOS on different decode steps."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter

import pytest
from safetensors.torch import load_file, save_file
from test_eval_runner import data_dir  # noqa: F401  (module-scoped fixture; checkpoint comes from conftest)

from molmo_fast.data.preprocessor import Preprocessor
from molmo_fast.eval.__main__ import main
from molmo_fast.model.molmoe import MolmoE

# Batch 1: each rank decodes one row at a time, so a row that ends early meets a longer one on the other rank.
ARGS = ["--tasks", "synthetic_charts", "--max_examples", "7", "--batch_size", "1", "--max_new_tokens", "4"]


def _predictions(out) -> list[tuple[str, str]]:
    lines = (out / "synthetic_charts" / "predictions.jsonl").read_text().splitlines()
    return [(row["id"], row["prediction"]) for row in map(json.loads, lines)]


def _new_tokens(ckpt, data, out) -> list[list[int]]:
    """Every row's generated ids in a single-process eval of `ckpt` (padding rows included)."""
    rows, generate = [], MolmoE.generate

    def spy(model, input_ids, *args, **kwargs):
        ids = generate(model, input_ids, *args, **kwargs)
        rows.extend(ids[:, input_ids.shape[1]:].tolist())
        return ids

    MolmoE.generate = spy
    try:
        main(["--checkpoint", str(ckpt), "--data_dir", str(data), *ARGS, "--out", str(out)])
    finally:
        MolmoE.generate = generate
    return rows


@pytest.fixture(scope="module")
def early_eos_checkpoint(checkpoint, data_dir, tmp_path_factory):  # noqa: F811
    """The tiny checkpoint with EOS's output row set just above a token that some answers contain and others don't:
    those answers now end there, the others run to max_new_tokens."""
    tmp = tmp_path_factory.mktemp("early_eos")
    rows = _new_tokens(checkpoint, data_dir, tmp / "probe")
    counts = Counter(t for row in rows for t in set(row[:-1]))
    token = next(t for t, n in counts.most_common() if n < len(rows))
    out = tmp / "ckpt"
    shutil.copytree(checkpoint, out)
    eos = Preprocessor.from_pretrained(out).tokenizer.eos_id
    weights = load_file(out / "model.safetensors")
    weights["lm_head.weight"][eos] = 1.01 * weights["lm_head.weight"][token]
    save_file(weights, out / "model.safetensors")
    rows = _new_tokens(out, data_dir, tmp / "check")
    ended = [eos in row for row in rows]
    assert any(ended) and not all(ended), (token, rows)  # the ranks' rows must end on different steps
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["data_parallel", "fsdp"])
def test_two_ranks_match_one_process(early_eos_checkpoint, data_dir, tmp_path, mode):  # noqa: F811
    common = ["--checkpoint", str(early_eos_checkpoint), "--data_dir", str(data_dir), *ARGS]
    main(common + ["--out", str(tmp_path / "single")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "molmo_fast.eval", *common, "--out", str(tmp_path / "multi")] + (["--fsdp"] if mode == "fsdp" else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own, so a timeout kills the rank processes too, not only the launcher.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    single, multi = _predictions(tmp_path / "single"), _predictions(tmp_path / "multi")
    assert len(multi) == 7 and len({i for i, _ in multi}) == 7
    assert multi == single
