"""Two torchrun ranks (gloo, CPU): data-parallel and FSDP eval score every example exactly once and agree with a
single process."""

import json
import os
import signal
import subprocess
import sys

import pytest

from molmo_fast.eval.__main__ import main
from test_eval_runner import checkpoint, data_dir  # noqa: F401  (module-scoped fixtures)

ARGS = ["--tasks", "synthetic_charts", "--max_examples", "7", "--batch_size", "2", "--max_new_tokens", "4"]


def _predictions(out) -> list[tuple[str, str]]:
    lines = (out / "synthetic_charts" / "predictions.jsonl").read_text().splitlines()
    return [(row["id"], row["prediction"]) for row in map(json.loads, lines)]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["data_parallel", "fsdp"])
def test_two_ranks_match_one_process(checkpoint, data_dir, tmp_path, mode):  # noqa: F811
    common = ["--checkpoint", str(checkpoint), "--data_dir", str(data_dir), *ARGS]
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
