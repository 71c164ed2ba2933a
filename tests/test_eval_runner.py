"""The eval runner end to end on CPU: a tiny MolmoE (the golden tiny config with the real tokenizer's vocabulary,
since the golden tiny weights only cover a 1000-token vocab) on synthetic shards."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from molmo_fast.data.formatter import count_to_text, points_to_text
from molmo_fast.data.sources.synthetic import make_example
from molmo_fast.eval import generation, runner
from molmo_fast.eval.__main__ import main
from molmo_fast.eval.tasks import get_task
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.runtime.checkpoints import checkpoint_step, resolve_checkpoint
from molmo_fast.runtime.device import resolve_device

SYNTHETIC = ["synthetic_counting", "synthetic_pointing", "synthetic_clocks", "synthetic_charts"]
N = 6  # with batch 4: one full batch and one padded batch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def _cfg(checkpoint, data_dir, out, **kw) -> runner.EvalConfig:
    kw = {"tasks": "synthetic_charts", "max_examples": N, "batch_size": 4, "max_new_tokens": 4, **kw}
    return runner.EvalConfig(checkpoint=str(checkpoint), data_dir=str(data_dir), out=str(out), **kw)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_end_to_end_writes_every_output(checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    results = main(["--checkpoint", str(checkpoint), "--tasks", "synthetic", "--max_examples", str(N),
                    "--batch_size", "4", "--max_new_tokens", "3", "--top_k", "1", "--knob", "skip_blocks=1",
                    "--knob", "routing=topk_renorm", "--out", str(out),
                    "--data_dir", str(data_dir)])
    table = capsys.readouterr().out
    assert [r["task"] for r in results] == SYNTHETIC
    for r in results:
        task_dir = out / r["task"]
        rows = _rows(task_dir / "predictions.jsonl")
        assert len(rows) == N and len({row["id"] for row in rows}) == N  # padding rows dropped, no repeats
        assert set(rows[0]) == {"id", "prompt", "prediction", "answers", "score"}
        assert "Assistant:" in rows[0]["prompt"]
        metrics = json.loads((task_dir / "metrics.json").read_text())
        assert metrics["n"] == N and 0.0 <= metrics["score"] <= 1.0
        assert metrics["score"] == pytest.approx(sum(row["score"][r["primary"]] for row in rows) / N)
        model = metrics["settings"]["model"]
        assert model["moe_top_k"] == [1, 1] and model["dtype"] == "float32" and model["max_new_tokens"] == 3
        assert model["skip_blocks"] == [1] and model["moe_routing"] == ["topk_renorm"] * 2
        assert metrics["settings"]["max_crops"] == model["max_crops"] == 4  # low-res: the checkpoint's crops
        assert r["task"] in table
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary) == set(SYNTHETIC)
    assert all(entry["settings"]["model"]["moe_top_k"] == [1, 1] for entry in summary.values())
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_golden_tiny_checkpoint_runs_as_shipped(golden_dir, data_dir, tmp_path):
    """The golden fixture itself (1000-token vocab; the model clamps the real tokenizer's larger ids)."""
    result = main(["--checkpoint", str(golden_dir / "tiny_model"), "--tasks", "synthetic_pointing",
                   "--max_examples", "3", "--max_new_tokens", "3", "--out", str(tmp_path), "--data_dir",
                   str(data_dir)])[0]
    assert result["n"] == 3 and 0.0 <= result["score"] <= 1.0
    assert result["settings"]["model"]["moe_top_k"] == [2, 2]  # the golden config's top-k
    assert len(_rows(tmp_path / "synthetic_pointing" / "predictions.jsonl")) == 3


def test_ranks_score_every_example_exactly_once(checkpoint, data_dir, tmp_path):
    cfg = _cfg(checkpoint, data_dir, tmp_path, max_examples=7, batch_size=2)
    model, pre, _ = runner.load_model(cfg, torch.device("cpu"))
    task = get_task("synthetic_charts")
    shard_dir = runner._shard_dir(task, cfg, 0, 1)
    task_dir = tmp_path / task.name
    task_dir.mkdir()
    for rank in range(3):
        generation.generate_task(task, model, pre, cfg, shard_dir, task_dir, rank, 3, torch.device("cpu"))
    per_rank = [len(_rows(f)) for f in sorted(task_dir.glob("predictions.rank*.jsonl"))]
    assert per_rank == [3, 3, 1]
    result = generation.finalize_task(task, task_dir, {}, 0.0)
    ids = [row["id"] for row in _rows(task_dir / "predictions.jsonl")]
    assert result["n"] == 7 and ids == sorted(set(ids)) and len(ids) == 7
    assert not list(task_dir.glob("predictions.rank*.jsonl"))


def test_resume_generates_only_missing_examples(checkpoint, data_dir, tmp_path, monkeypatch):
    cfg = _cfg(checkpoint, data_dir, tmp_path)
    runner.run(cfg)
    pred_file = tmp_path / "synthetic_charts" / "predictions.jsonl"
    full = _rows(pred_file)
    pred_file.unlink()  # a killed run leaves only its rank file, the last line cut short
    rank_file = tmp_path / "synthetic_charts" / "predictions.rank0.jsonl"
    rank_file.write_text("".join(json.dumps(r) + "\n" for r in full[:4]) + '{"id": "cut sh')
    generated = []
    original = MolmoE.generate

    def counting_generate(self, input_ids, *args, **kwargs):
        generated.append(input_ids.shape[0])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(MolmoE, "generate", counting_generate)
    result = runner.run(cfg)[0]
    assert generated == [4]  # the first batch was complete and skipped; the second (2 real + 2 pad) ran
    assert _rows(pred_file) == full
    assert result["n"] == N


def test_changed_settings_are_refused(checkpoint, data_dir, tmp_path):
    runner.run(_cfg(checkpoint, data_dir, tmp_path))
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens was 4, now 3; .*model\.moe_top_k was "
                                         r"\[2, 2\], now \[1, 1\].*\); pass --overwrite"):
        runner.run(_cfg(checkpoint, data_dir, tmp_path, top_k=1, max_new_tokens=3))
    assert runner.run(_cfg(checkpoint, data_dir, tmp_path, top_k=1, overwrite=True))[0]["n"] == N


def test_eval_output_never_goes_into_other_files_or_above_its_inputs(checkpoint, data_dir, tmp_path):
    from molmo_fast.outdir import OutputDirError

    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(OutputDirError, match=r"did not write \(it holds 1 entry: notes.txt\)"):
        runner.run(_cfg(checkpoint, data_dir, tmp_path))
    for out, what in ((checkpoint, "into"), (checkpoint.parent, "above"), (data_dir, "into")):
        with pytest.raises(OutputDirError, match=f"refusing to write an eval output {what}"):
            runner.run(_cfg(checkpoint, data_dir, out))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit, match=r"molmo_fast.eval: .*did not write \(it holds 1 entry: notes.txt\)"):
        main(["--checkpoint", str(checkpoint), "--tasks", "synthetic_charts", "--out", str(tmp_path),
              "--data_dir", str(data_dir)])


def test_eval_config_types_are_checked(checkpoint, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"EvalConfig\.batch_size = '4': expected int, got str"):
        _cfg(checkpoint, data_dir, tmp_path, batch_size="4")


def test_results_of_another_shard_set_are_refused(checkpoint, data_dir, tmp_path):
    runner.run(_cfg(checkpoint, data_dir, tmp_path / "out"))
    other = tmp_path / "other_data" / "synthetic_charts"
    shutil.copytree(data_dir / "synthetic_charts", other)  # e.g. a rebuilt set: its predictions must not mix
    with pytest.raises(ValueError, match="other settings"):
        runner.run(_cfg(checkpoint, other.parent, tmp_path / "out"))


def _gold_text(name: str, index: int) -> str:
    ex = make_example(name, index, 0, "validation").example
    size = [224, 224]
    if name == "synthetic_counting":
        return count_to_text(ex["points"], ex["label"], size, ex["count"])
    if name == "synthetic_pointing":
        return points_to_text(ex["points"], ex["label"], size)
    return ex["answers"][0]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_oracle_outputs_score_one(checkpoint, data_dir, tmp_path, name):
    """A model that answers exactly in Molmo's output format gets full marks: parsing and scoring agree with the
    formatter, and rows are matched with their own examples."""
    cfg = _cfg(checkpoint, data_dir, tmp_path, tasks=name)
    model, pre, _ = runner.load_model(cfg, torch.device("cpu"))
    golds = iter([_gold_text(name, i) for i in range(N)])

    def oracle(input_ids, *args, **kwargs):
        rows = [pre.tokenizer.encode(" " + next(golds, "")) + [pre.tokenizer.eos_id] for _ in range(len(input_ids))]
        width = max(map(len, rows))
        new = torch.tensor([r + [1] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    model.generate = oracle
    task = get_task(name)
    task_dir = tmp_path / name
    task_dir.mkdir()
    generation.generate_task(task, model, pre, cfg, runner._shard_dir(task, cfg, 0, 1), task_dir, 0, 1,
                         torch.device("cpu"))
    result = generation.finalize_task(task, task_dir, {}, 0.0)
    assert result["score"] == 1.0, _rows(task_dir / "predictions.jsonl")


def test_loss_mode_matches_a_direct_forward(checkpoint, data_dir, tmp_path):
    result = runner.run(_cfg(checkpoint, data_dir, tmp_path, max_examples=1, loss=True))[0]
    model, pre, _ = runner.load_model(_cfg(checkpoint, data_dir, tmp_path), torch.device("cpu"))
    record = make_example("synthetic_charts", 0, 0, "validation")
    from molmo_fast.data.shards import decode_sample, encode_record

    arrays = pre(decode_sample(encode_record(record)))
    logits = model(torch.from_numpy(arrays["input_tokens"])[None], torch.from_numpy(arrays["images"])[None],
                   torch.from_numpy(arrays["image_masks"])[None],
                   torch.from_numpy(arrays["image_input_idx"])[None].long()).logits[0]
    mask = torch.from_numpy(arrays["loss_masks"]) > 0
    labels = torch.from_numpy(arrays["target_tokens"])[mask]
    expected = torch.nn.functional.cross_entropy(logits[mask], labels).item()
    assert result["metrics"]["loss"] == pytest.approx(expected, rel=1e-4)
    assert result["metrics"]["tokens"] == mask.sum().item() and 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert json.loads((tmp_path / "synthetic_charts_loss" / "metrics.json").read_text())["score"] == result["score"]


def test_resolve_checkpoint(checkpoint, tmp_path):
    assert resolve_checkpoint(checkpoint) == checkpoint
    with pytest.raises(ValueError, match="--step"):
        resolve_checkpoint(checkpoint, step=3)
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / "hf")
    assert resolve_checkpoint(run_dir) == run_dir / "hf"
    with pytest.raises(FileNotFoundError, match="run directory"):
        resolve_checkpoint(tmp_path / "nothing")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_resolve_checkpoint_exports_a_run_step(checkpoint, tmp_path):
    """A training run dir (DCP checkpoints/step_N + model_config.json + preprocessor/) is exported once per step."""
    import torch.distributed.checkpoint as dcp

    run_dir = tmp_path / "run"
    model = MolmoE.from_pretrained(checkpoint)
    for step, scale in ((5, 1.0), (10, 2.0)):
        step_dir = run_dir / "checkpoints" / f"step_{step}"
        state = {k: v * scale if v.is_floating_point() else v for k, v in model.state_dict().items()}
        dcp.save({"model": state}, checkpoint_id=str(step_dir))
        (step_dir / "train_state.json").write_text(json.dumps({"step": step}))
    shutil.copy(checkpoint / "config.json", run_dir / "model_config.json")
    (run_dir / "preprocessor").mkdir()
    shutil.copy(checkpoint / "preprocessor_config.json", run_dir / "preprocessor")
    latest = resolve_checkpoint(run_dir)
    assert latest == run_dir / "checkpoints" / "step_10" / "hf"
    first = resolve_checkpoint(run_dir, step=5)
    w = "llm.lm_head.weight"
    reference = model.state_dict()[w]
    assert torch.equal(MolmoE.from_pretrained(first).state_dict()[w], reference)
    assert torch.equal(MolmoE.from_pretrained(latest).state_dict()[w], 2 * reference)
    assert checkpoint_step(first) == 5
    shutil.copytree(latest, run_dir / "hf")  # the trainer's end-of-run export
    assert resolve_checkpoint(run_dir) == run_dir / "hf" and checkpoint_step(run_dir / "hf") == 10
    newer = run_dir / "checkpoints" / "step_10" / "train_state.json"  # a resumed run saved step 10 again later
    os.utime(newer, (newer.stat().st_mtime + 60, newer.stat().st_mtime + 60))
    assert resolve_checkpoint(run_dir) == latest
    with pytest.raises(FileNotFoundError, match="step 7"):
        resolve_checkpoint(run_dir, step=7)


def test_gin_suite_with_cli_overrides(checkpoint, data_dir, tmp_path, capsys):
    results = main(["--gin_file", "gin/eval/synthetic.gin", "--gin_param", "EvalConfig.tasks = 'synthetic_clocks'",
                    "--gin_param", "EvalConfig.max_examples = 2", "--checkpoint", str(checkpoint),
                    "--max_new_tokens", "2", "--out", str(tmp_path), "--data_dir", str(data_dir)])
    assert [r["task"] for r in results] == ["synthetic_clocks"] and results[0]["n"] == 2
    assert (tmp_path / "synthetic_clocks" / "metrics.json").is_file()  # --out wins over the gin file's out
    out = capsys.readouterr().out
    assert f"wrote {tmp_path}/" in out and f"tensorboard --logdir {tmp_path / 'tb'}" in out
    assert (tmp_path / "tb").is_dir()
    with pytest.raises(ValueError, match="EvalConfig.tasks is required"):
        runner.EvalConfig(checkpoint="x")  # the gin bindings do not outlive main()
    with pytest.raises(ValueError, match="EvalConfig.tasks = 'chartqa': unknown eval task"):
        runner.EvalConfig(checkpoint="x", tasks="chartqa")


@pytest.mark.gpu
def test_runs_on_cuda_in_bfloat16(checkpoint, data_dir, tmp_path):
    result = runner.run(_cfg(checkpoint, data_dir, tmp_path, device="cuda", dtype="bfloat16"))[0]
    model = result["settings"]["model"]
    assert result["n"] == N and model["dtype"] == "bfloat16" and model["device"].startswith("cuda")


@pytest.mark.parametrize("device, world, local_rank, cuda, expected, backend", [
    ("auto", 4, 2, True, "cuda:2", "cpu:gloo,cuda:nccl"),  # torchrun on GPUs: each rank its own GPU, nccl
    ("cuda", 4, 3, True, "cuda:3", "cpu:gloo,cuda:nccl"),
    ("auto", 4, 2, False, "cpu", "gloo"),
    ("cpu", 4, 1, True, "cpu", "gloo"),
    ("cuda:1", 1, 0, True, "cuda:1", "cpu:gloo,cuda:nccl"),  # a single process may pick any GPU
    ("auto", 1, 0, False, "cpu", "gloo"),
])
def test_each_torchrun_rank_gets_its_own_gpu_and_nccl(device, world, local_rank, cuda, expected, backend):
    assert resolve_device(device, world, local_rank, cuda) == (torch.device(expected), backend)


@pytest.mark.parametrize("device, cuda, message", [("cuda:0", True, "all 2 torchrun ranks on one GPU"),
                                                   ("cuda", False, "CUDA is not available")])
def test_a_device_that_cannot_work_names_the_flag(device, cuda, message):
    with pytest.raises(ValueError, match=rf"--device.*{message}"):
        resolve_device(device, 2, 1, cuda, "EvalConfig.device (--device)")


def test_cli_rejects_a_pinned_gpu_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        main(["--checkpoint", "unused", "--tasks", "synthetic", "--device", "cuda:1"])
    assert "--device) = 'cuda:1' would put all 2 torchrun ranks on one GPU" in capsys.readouterr().err


def test_every_eval_setting_is_a_cli_flag_with_help():
    import dataclasses

    from molmo_fast.eval.__main__ import build_parser
    from molmo_fast.eval.config import FIELD_HELP

    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(runner.EvalConfig)}
    actions = build_parser()._actions
    assert all(a.help for a in actions)
    assert {a.dest for a in actions} >= set(FIELD_HELP)


def test_list_maps_every_task_to_the_source_data_build_writes(capsys):
    from molmo_fast.eval.tasks import TASKS

    assert main(["--list"]) == []
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:3] for line in lines[1:]}
    assert set(rows) == set(TASKS)
    assert rows["vqa2"] == ["vqa_v2", "validation"] and rows["doc_qa"] == ["doc_vqa", "validation"]
    assert rows["countbench_qa"] == ["count_bench_qa", "test"]
