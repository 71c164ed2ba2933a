"""Starting and resuming a run (in-process CLI, tiny model, CPU): a bad start writes nothing, a wrong resume
target says what was expected, and a resume is exact or refused naming the changed setting."""

import json
from pathlib import Path

import pytest

from molmo_fast.outdir import read_marker
from molmo_fast.train import trainer
from molmo_fast.train.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from molmo_fast.data.sources.synthetic import ensure_synthetic_shards

    return ensure_synthetic_shards(tmp_path_factory.mktemp("data") / "charts", "synthetic_charts", 32, shard_size=8,
                                   image_size=64)


def _argv(run_dir: Path, shards: Path, *extra: str, **bindings) -> list[str]:
    params = {"TrainConfig.run_dir": repr(str(run_dir)), "DataConfig.shards": repr({"charts": str(shards)}),
              "DataConfig.sequence_length": 48, "DataConfig.num_workers": 0, "DataConfig.shuffle_buffer": 8,
              "TrainConfig.max_steps": 4, "TrainConfig.global_batch_size": 2, "TrainConfig.micro_batch_size": 2,
              "TrainConfig.log_every": 1, "TrainConfig.checkpoint_every": 2, "TrainConfig.progress_bar": False,
              "TrainConfig.export_hf_at_end": False, "OptimConfig.lr": "{'vit': 1e-3, 'connector': 1e-3, 'llm': 1e-3}",
              "OptimConfig.warmup": "{'vit': 1, 'connector': 1, 'llm': 1}", **bindings}
    argv = ["--gin_file", str(REPO / "gin" / "tiny.gin")]
    for key, value in params.items():
        argv += ["--gin_param", f"{key} = {value}"]
    return argv + list(extra)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows}


@pytest.mark.parametrize("binding, named", [
    ({"DataConfig.sequence_length": 100000}, "DataConfig.sequence_length = 100000: expected at most the model's"),
    ({"TrainConfig.global_batch_size": 3}, "TrainConfig.global_batch_size = 3: expected a multiple of"),
    ({"DataConfig.image_overrides": "{'base_image_input_size': [84, 84], 'image_patch_size': 13}"},
     "crop_size=84 must be a positive multiple of patch_size=13"),
    ({"DataConfig.sequence_length": "'48'"}, "DataConfig.sequence_length = '48': expected int"),
])
def test_a_bad_config_fails_before_the_run_dir_exists(tmp_path, shards, binding, named):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit, match=named):
        main(_argv(run_dir, shards, **binding))
    assert not run_dir.exists()


def test_a_failed_start_removes_its_run_dir_and_the_retry_works(tmp_path, shards, monkeypatch):
    run_dir = tmp_path / "run"
    real = trainer.build_model

    def broken(cfg, env):
        raise RuntimeError("out of memory while building the model")

    monkeypatch.setattr(trainer, "build_model", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(_argv(run_dir, shards))
    assert not run_dir.exists()
    monkeypatch.setattr(trainer, "build_model", real)
    main(_argv(run_dir, shards, **{"TrainConfig.max_steps": 2}))
    assert sorted(_losses(run_dir)) == [1, 2] and read_marker(run_dir)["kind"] == "train_run"


def test_wrong_resume_targets_say_what_was_expected(tmp_path, shards):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--resume latest: the run directory .* does not exist"):
        main(_argv(run_dir, shards, "--resume", "latest"))
    with pytest.raises(SystemExit, match=r"--resume 'last': expected 'latest' or a complete checkpoint directory"):
        main(_argv(run_dir, shards, "--resume", "last"))
    assert not run_dir.exists()


def test_a_new_run_never_reuses_a_run_dir_or_a_directory_of_other_files(tmp_path, shards):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match=r"mine: refusing .* did not write \(it holds 1 entry: notes.txt\)"):
        main(_argv(mine, shards))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_resume_is_exact_or_refused_naming_the_changed_setting(tmp_path, shards):
    run_dir = tmp_path / "run"
    main(_argv(run_dir, shards))
    full = _losses(run_dir)
    with pytest.raises(SystemExit, match="already holds a molmo_fast train_run output; pass --resume latest"):
        main(_argv(run_dir, shards))
    step_2 = str(run_dir / "checkpoints" / "step_2")
    with pytest.raises(SystemExit, match=r"cannot resume .*step_2 exactly: DataConfig\.seed was 95818, now 1; .*"
                                         r"pass --allow_changed DataConfig\.seed$"):
        main(_argv(run_dir, shards, "--resume", step_2, **{"DataConfig.seed": 1}))
    with pytest.raises(SystemExit, match=r"DataConfig\.shuffle_buffer was 8, now 4; OptimConfig\.final_lr_ratio "
                                         r"was 0\.1, now 0\.5"):
        main(_argv(run_dir, shards, "--resume", step_2,
                   **{"DataConfig.shuffle_buffer": 4, "OptimConfig.final_lr_ratio": 0.5}))
    assert _losses(run_dir) == full  # refused before anything was written

    # unchanged: the resumed steps repeat the uninterrupted run
    main(_argv(run_dir, shards, "--resume", step_2, **{"TrainConfig.keep_last": 5}))  # a free setting
    assert _losses(run_dir) == pytest.approx(full, rel=1e-6)

    # an allowed change is taken, and the run's config files follow it with the old ones kept
    main(_argv(run_dir, shards, "--resume", step_2, "--allow_changed", "DataConfig.seed", **{"DataConfig.seed": 1}))
    changed = _losses(run_dir)
    assert changed[1] == full[1] and changed[2] == full[2] and changed[3] != full[3]
    assert "DataConfig.seed = 1" in (run_dir / "config.gin").read_text()
    kept = run_dir / "config_history" / "step_2"
    assert "DataConfig.seed = 1" not in (kept / "config.gin").read_text()
    assert json.loads((kept / "changes.json").read_text()) == [{"field": "DataConfig.seed", "old": 95818, "new": 1}]
    state = json.loads((run_dir / "checkpoints" / "step_4" / "train_state.json").read_text())
    assert state["config"]["DataConfig"]["seed"] == 1 and state["data"]["seed"] == 1


def test_the_loader_checks_its_stream_on_resume(tmp_path, shards):
    """What the config record cannot see: the shard files themselves changed under the same path."""
    import shutil

    from molmo_fast.data.sources.synthetic import ensure_synthetic_shards

    data = tmp_path / "charts"
    shutil.copytree(shards, data)
    run_dir = tmp_path / "run"
    main(_argv(run_dir, data, **{"TrainConfig.max_steps": 2}))
    ensure_synthetic_shards(data, "synthetic_charts", 32, shard_size=4, image_size=64, overwrite=True)
    with pytest.raises(SystemExit, match=r"cannot resume .* exactly: the data stream would differ .*shard_sets was"):
        main(_argv(run_dir, data, "--resume", "latest", "--allow_changed", "TrainConfig.max_steps",
                   **{"TrainConfig.max_steps": 3}))
