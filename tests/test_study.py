"""python -m molmo_fast.study: grid parsing, Pareto marking, and a two-setting study end to end on a tiny model."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from molmo_fast.study import runner as study_runner
from molmo_fast.study.cli import main
from molmo_fast.study.grid import knob_strings, label, parse_grid, setting_id
from molmo_fast.study.pareto import mark


def test_grid_is_the_product_and_list_values_use_semicolons():
    settings = parse_grid(["top_k=1,2", "routing=topk,top_p:0.5", "skip_blocks=;1;0,1"])
    assert len(settings) == 12 and settings[0] == {"top_k": 1, "routing": "topk", "skip_blocks": ""}
    assert [s["skip_blocks"] for s in settings[:3]] == ["", 1, "0,1"]
    assert knob_strings(settings[2]) == ["top_k=1", "routing=topk", "skip_blocks=0,1"]
    assert label(settings[0]) == "top_k=1 routing=topk skip_blocks=-"
    assert len({setting_id(s) for s in settings}) == 12
    with pytest.raises(ValueError, match="top_kk"):
        parse_grid(["top_kk=1"])
    with pytest.raises(ValueError, match="routing"):
        parse_grid(["routing=top_p:7"])
    with pytest.raises(ValueError, match="twice"):
        parse_grid(["top_k=1", "top_k=2"])


def _row(i, score, latency, experts):
    return {"id": f"r{i}", "setting": {"top_k": i}, "score": score, "latency_ms": {"per_example": latency},
            "active_experts_per_token": {"all": experts}}


def test_pareto_marks_rows_nobody_beats_on_both_axes():
    rows = [_row(0, 0.5, 10.0, 1.0), _row(1, 0.7, 20.0, 2.0), _row(2, 0.6, 25.0, 1.5),  # 2: beaten by 1
            _row(3, 0.7, 20.0, 4.0),  # ties with 1 on both axes: neither beats the other
            _row(4, 0.4, 10.0, 0.5),  # same latency as 0, lower score: beaten on latency, front on experts
            _row(5, None, 1.0, 0.1)]  # no score: never on a front
    fronts = mark(rows)
    assert [r["pareto"] for r in rows] == [True, True, False, True, False, False]
    assert [e["id"] for e in fronts["fronts"]["latency"]] == ["r0", "r1", "r3"]
    assert [e["id"] for e in fronts["fronts"]["active_experts"]] == ["r4", "r0", "r2", "r1"]


def _args(checkpoint, out, data_dir, *extra):
    return ["--checkpoint", str(checkpoint), "--tasks", "synthetic_charts", "--max_examples", "2", "--batch_size",
            "2", "--knob", "max_new_tokens=2", "--repeats", "1", "--device", "cpu", "--out", str(out),
            "--data_dir", str(data_dir), *extra]


def test_two_setting_study_end_to_end_and_resume(checkpoint, tmp_path, capsys, monkeypatch):
    out, data = tmp_path / "study", tmp_path / "data"
    rows = main(_args(checkpoint, out, data, "--grid", "top_k=1,2"))
    printed = capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "study.jsonl").read_text().splitlines()]
    assert [r["setting"] for r in lines] == [{"top_k": 1}, {"top_k": 2}] == [r["setting"] for r in rows]
    for r in lines:
        assert {"setting", "knobs", "metrics", "score", "latency_ms", "active_experts_per_token",
                "gflops_per_example", "peak_memory_mb", "pareto"} <= set(r)
        assert set(r["latency_ms"]) == {"vision", "connector", "prefill", "decode_per_token", "per_example"}
        assert all(v > 0 for v in r["latency_ms"].values())
        k = r["setting"]["top_k"]
        assert r["knobs"]["moe_top_k"] == [k, k] and r["knobs"]["max_new_tokens"] == 2
        # topk routing: exactly k experts per token of every kind that ran
        assert r["active_experts_per_token"] == {"image": k, "text": k, "generated": k, "all": k}
        assert "relaxed_correctness" in r["metrics"]["synthetic_charts"] and 0 <= r["score"] <= 1
        assert (out / "settings" / r["id"] / "synthetic_charts" / "predictions.jsonl").is_file()
    assert lines[1]["gflops_per_example"] > lines[0]["gflops_per_example"]
    assert any(r["pareto"] for r in lines) and "*" in printed and str(out / "study.jsonl") in printed
    pareto = json.loads((out / "pareto.json").read_text())
    assert set(pareto["fronts"]) == {"latency", "active_experts"}
    assert (out / "study.png").stat().st_size > 10_000

    # TensorBoard: one hparams session per setting, carrying the knob value
    sessions = sorted(p for p in (out / "tb").iterdir() if p.is_dir())
    assert [p.name for p in sessions] == sorted(r["id"] for r in lines)
    acc = EventAccumulator(str(sessions[0]))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    assert b"top_k" in content["_hparams_/session_start_info"]

    # resume: the two done settings are skipped, only the new one runs
    ran = []
    real = study_runner.run_setting
    monkeypatch.setattr(study_runner, "run_setting", lambda cfg, s, o: ran.append(s) or real(cfg, s, o))
    rows = main(_args(checkpoint, out, data, "--grid", "top_k=1,2,4"))
    assert ran == [{"top_k": 4}] and len(rows) == 3
    assert "2 of 3 settings already" in capsys.readouterr().out

    # another task set: refused before anything runs
    with pytest.raises(SystemExit):
        main(_args(checkpoint, out, data, "--grid", "top_k=1").__add__(["--tasks", "synthetic_clocks"]))
    assert "same checkpoint, tasks" in capsys.readouterr().err
    assert len(ran) == 1

    # oracle k from the saved predictions: answers at the largest k are reproduced by definition
    reports = main(["--oracle", "--out", str(out)])
    (rep,) = reports
    assert rep["top_k"] == [1, 2, 4] and rep["examples"] == 2
    assert sum(rep["oracle_k_distribution"].values()) == 2 and 1 <= rep["mean_oracle_k"] <= 4
    assert rep["oracle_score"] == pytest.approx(rep["fixed_k_score"]["4"])
    assert json.loads((out / "oracle.json").read_text()) == reports


def test_study_never_loads_the_training_stack():
    import subprocess
    import sys

    code = ("import sys, molmo_fast.study.cli\n"
            "print(sorted(m for m in sys.modules if m.startswith('molmo_fast.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
