"""End-to-end training runs of the tiny model on CPU (gloo): world-size parity, exact resume after kill -9,
a kill during a checkpoint write, the NaN guard, in-loop validation, and the HF export of a run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Kills this process with SIGKILL at a chosen point of a real CLI run, so the interruption is deterministic.
KILL_AT_STEP = """
import os, signal, sys
from molmo_fast.train import metrics
log = metrics.MetricsLogger.log
def log_then_die(self, step, scalars):
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    log(self, step, scalars)
metrics.MetricsLogger.log = log_then_die
from molmo_fast.train.__main__ import main
main(sys.argv[1:])
"""
KILL_IN_CHECKPOINT_WRITE = """
import os, signal, sys
from molmo_fast.train import checkpoint
save = checkpoint.dcp.save
def save_then_die(state, checkpoint_id):
    save(state, checkpoint_id=checkpoint_id)  # the shards are on disk, the checkpoint is not published yet
    if checkpoint_id.endswith(".tmp_step_{step}"):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.dcp.save = save_then_die
from molmo_fast.train.__main__ import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from molmo_fast.data.sources.synthetic import ensure_synthetic_shards

    out = tmp_path_factory.mktemp("data") / "synthetic_charts"
    ensure_synthetic_shards(out, "synthetic_charts", 64, seed=0, shard_size=16)
    return out


def _args(run_dir: Path, shards: Path, **bindings) -> list[str]:
    params = {
        "TrainConfig.run_dir": repr(str(run_dir)), "DataConfig.shards": repr({"charts": str(shards)}),
        "DataConfig.sequence_length": 64, "DataConfig.num_workers": 0, "DataConfig.shuffle_buffer": 16,
        "DataConfig.world_independent": True, "TrainConfig.max_steps": 6, "TrainConfig.global_batch_size": 4,
        "TrainConfig.micro_batch_size": 2, "TrainConfig.log_every": 1, "TrainConfig.checkpoint_every": 2,
        "TrainConfig.progress_bar": False, "TrainConfig.export_hf_at_end": False,
        "OptimConfig.lr": "{'vit': 1e-3, 'connector': 1e-3, 'llm': 1e-3}",
        "OptimConfig.warmup": "{'vit': 1, 'connector': 1, 'llm': 1}",
    }
    params.update(bindings)
    out = ["--gin_file", "gin/tiny.gin"]
    for key, value in params.items():
        out += ["--gin_param", f"{key} = {value}"]
    return out


def _run(args: list[str], nproc: int = 0, script: str | None = None, check: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "molmo_fast.train", *args]
    elif script:
        cmd = [sys.executable, "-c", script, *args]
    else:
        cmd = [sys.executable, "-m", "molmo_fast.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}  # in-loop eval rows have no train/


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> Path:
    """An uninterrupted single-process run: 6 steps, micro-batch 2 x 2 accumulation, checkpoints every 2."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    _run(_args(run_dir, shards, **{"DataConfig.num_workers": 1, "DataConfig.world_independent": False}))
    return run_dir


@pytest.mark.distributed
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, shards):
    one, two = tmp_path / "one", tmp_path / "two"
    # Dropout masks are drawn per rank, so the curves can only match with dropout off.
    no_dropout = {"TrainConfig.max_steps": 4,
                  "ModelConfig.hf_overrides": "{'vocab_size': 50280, 'embedding_size': 50304, 'residual_dropout': 0.0}"}
    _run(_args(one, shards, **no_dropout))
    _run(_args(two, shards, **no_dropout), nproc=2)  # micro-batch 2 x 2 ranks, no accumulation
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert len(set(a.values())) == 4  # the model is learning, so equal curves are not a coincidence
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)
    # The run dir describes itself, and TensorBoard holds the same curve as metrics.jsonl.
    for name in ("config.gin", "operative_config.gin", "git_revision.txt", "model_config.json",
                 "preprocessor/preprocessor_config.json"):
        assert (two / name).is_file(), name
    assert "TrainConfig.max_steps = 4" in (two / "operative_config.gin").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(two / "tb")).Reload()
    assert {"train/loss", "optim/grad_norm/llm", "optim/lr/connector", "perf/tokens_per_s",
            "moe/expert_load_cv"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([b[s] for s in sorted(b)])
    # Both ranks wrote their shards of the same checkpoint.
    assert sorted(p.name for p in (two / "checkpoints" / "step_4").glob("*.distcp")) == ["__0_0.distcp",
                                                                                        "__1_0.distcp"]


@pytest.mark.distributed
def test_kill_9_then_resume_gives_the_uninterrupted_loss_sequence(tmp_path, shards, reference):
    run_dir = tmp_path / "killed"
    args = _args(run_dir, shards, **{"DataConfig.num_workers": 1, "DataConfig.world_independent": False})
    proc = _run(args, script=KILL_AT_STEP.format(step=5), check=False)
    assert proc.returncode == -signal.SIGKILL
    assert max(_losses(run_dir)) == 4 and (run_dir / "checkpoints" / "step_4").is_dir()
    with pytest.raises(AssertionError, match="already exists"):  # never clobbered without --resume
        _run(args)
    _run(args + ["--resume", "latest"])
    # Bit-identical, dropout included: weights, Adam state, data position and RNG all come back.
    assert _losses(run_dir) == _losses(reference)


@pytest.mark.distributed
def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, shards, reference):
    from molmo_fast.model.molmoe import MolmoE
    from molmo_fast.runtime.checkpoints import find_checkpoint

    run_dir = tmp_path / "killed_in_write"
    args = _args(run_dir, shards, **{"DataConfig.num_workers": 1, "DataConfig.world_independent": False})
    proc = _run(args, script=KILL_IN_CHECKPOINT_WRITE.format(step=4), check=False)
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / ".tmp_step_4").is_dir()
    assert find_checkpoint(run_dir) == run_dir / "checkpoints" / "step_2"
    # The previous checkpoint loads (through the export path) ...
    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "molmo_fast.export", str(run_dir), str(out)], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    model = MolmoE.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (out / "preprocessor_config.json").is_file()
    # ... and resuming from it replays steps 3-6 exactly as the uninterrupted run.
    _run(args + ["--resume", "latest"])
    assert _losses(run_dir) == _losses(reference)
    assert not (run_dir / "checkpoints" / ".tmp_step_4").exists()


@pytest.mark.distributed
def test_nan_guard_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, shards):
    run_dir = tmp_path / "diverged"
    lr = "{'vit': 1e30, 'connector': 1e30, 'llm': 1e30}"
    proc = _run(_args(run_dir, shards, **{"OptimConfig.lr": lr, "OptimConfig.max_grad_norm": 0.0,
                                          "TrainConfig.checkpoint_every": 1}), check=False)
    assert proc.returncode != 0
    assert "non-finite" in proc.stderr and "last good checkpoint" in proc.stderr
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*")]
    assert steps and max(steps) < 6


def test_compiled_blocks_train_exactly_like_eager(tmp_path, shards):
    no_dropout = {"TrainConfig.max_steps": 3, "TrainConfig.activation_checkpointing": True,
                  "ModelConfig.hf_overrides": "{'vocab_size': 50280, 'embedding_size': 50304, 'residual_dropout': 0.0}"}
    _run(_args(tmp_path / "eager", shards, **no_dropout))
    _run(_args(tmp_path / "compiled", shards, **no_dropout, **{"TrainConfig.compile": True}))
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-5)


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_in_loop_validation_logs_eval_scalars_and_leaves_training_unchanged(tmp_path, shards, reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from molmo_fast.eval.config import EvalConfig
    from molmo_fast.eval.runner import run

    run_dir, eval_data = tmp_path / "validated", tmp_path / "eval_data"
    validation = {"TrainConfig.eval_every": 4, "TrainConfig.eval_tasks": "'synthetic_charts'",
                  "TrainConfig.eval_max_examples": 3, "TrainConfig.eval_batch_size": 2,
                  "TrainConfig.eval_loss": True, "TrainConfig.eval_data_dir": repr(str(eval_data))}
    _run(_args(run_dir, shards, **{"DataConfig.num_workers": 1, "DataConfig.world_independent": False},
               **validation))
    # Validation draws nothing from the training RNG and leaves the model in training mode: the same curve.
    assert _losses(run_dir) == _losses(reference)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/synthetic_charts_loss/loss" in r}
    assert sorted(evals) == [4, 6]  # every 4 steps and at the last
    for step in (4, 6):
        metrics = json.loads((run_dir / "eval" / f"step_{step}" / "synthetic_charts_loss" / "metrics.json").read_text())
        assert metrics["n"] == 3 and metrics["settings"]["step"] == step
        assert evals[step]["eval/synthetic_charts_loss/loss"] == pytest.approx(metrics["score"])
    assert evals[4]["eval/synthetic_charts_loss/loss"] != evals[6]["eval/synthetic_charts_loss/loss"]
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    assert [e.step for e in events.Scalars("eval/synthetic_charts_loss/accuracy")] == [4, 6]
    # The standalone eval of the step-6 checkpoint measures the same loss as the sharded training model did.
    standalone = run(EvalConfig(checkpoint=str(run_dir), step=6, tasks="synthetic_charts", loss=True,
                                max_examples=3, batch_size=2, data_dir=str(eval_data), out=str(tmp_path / "out")))
    assert standalone[0]["score"] == pytest.approx(evals[6]["eval/synthetic_charts_loss/loss"], rel=1e-5)
