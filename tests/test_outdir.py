"""molmo_fast.outdir: what an output directory may replace, and that a replacement is atomic."""

import json
import os

import pytest

from molmo_fast import outdir
from molmo_fast.outdir import (MARKER, OutputDirError, atomic_output_dir, check_output_dir, claim_output_dir,
                               is_own_output, read_marker, remove_own_output)


def _write(tmp_dir, name="model.bin", text="new"):
    (tmp_dir / name).write_text(text)


def test_new_and_empty_dirs_are_written_with_a_marker(tmp_path):
    for out in (tmp_path / "a" / "b", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with atomic_output_dir(out, "export") as tmp:
            assert tmp != out and not (out / "model.bin").exists()
            _write(tmp)
        assert (out / "model.bin").read_text() == "new"
        marker = read_marker(out)
        assert marker["kind"] == "export" and marker["files"] == ["model.bin"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp sibling left


def test_user_directory_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    refused = pytest.raises(OutputDirError, match=r"mine: refusing .* did not write \(it holds 1 entry: notes.txt\)")
    with refused, atomic_output_dir(out, "export", overwrite=True):
        pytest.fail("the body must not run")
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep"


def test_file_and_other_kind_are_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match="not a directory"):
        check_output_dir(tmp_path / "f", "export", overwrite=True)
    claim_output_dir(tmp_path / "run", "train_run")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}")
    with pytest.raises(OutputDirError, match="holds a molmo_fast train_run output, not a export output"):
        check_output_dir(tmp_path / "run", "export", overwrite=True)


def test_own_output_needs_overwrite_and_is_replaced_atomically(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out, "export") as tmp:
        _write(tmp, text="old")
        _write(tmp, "sub.json")
    with pytest.raises(OutputDirError, match="already holds a molmo_fast export output; pass --overwrite"):
        check_output_dir(out, "export")

    with atomic_output_dir(out, "export", overwrite=True) as tmp:
        _write(tmp, text="new")
        # the previous output stays complete and in place until the new one is
        assert (out / "model.bin").read_text() == "old"
    assert (out / "model.bin").read_text() == "new" and not (out / "sub.json").exists()

    with pytest.raises(RuntimeError), atomic_output_dir(out, "export", overwrite=True) as tmp:
        _write(tmp, text="broken")
        raise RuntimeError("build failed")
    assert (out / "model.bin").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_refuses_when_a_user_file_was_added(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out, "data_build") as tmp:
        _write(tmp)
    (out / "my_analysis.ipynb").write_text("keep")
    refused = pytest.raises(OutputDirError, match=r"files molmo_fast did not write \(my_analysis.ipynb\)")
    with refused, atomic_output_dir(out, "data_build", overwrite=True) as tmp:
        _write(tmp, text="new")
    assert (out / "my_analysis.ipynb").read_text() == "keep" and (out / "model.bin").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_protected_paths_into_and_above(tmp_path):
    run = tmp_path / "runs" / "demo"
    claim_output_dir(run, "train_run")
    (run / "metrics.jsonl").write_text("{}")
    for out, where in ((run, "into"), (run.parent, "above"), (tmp_path, "above"), (run / ".." / "demo", "into")):
        with pytest.raises(OutputDirError, match=f"{where} .*demo \\(the run directory\\)"):
            check_output_dir(out, "export", protected={run: "the run directory"}, overwrite=True)
    assert check_output_dir(run / "hf", "export", protected=[run]) == run / "hf"  # inside is fine
    assert (run / "metrics.jsonl").is_file()


def test_keyed_params_and_reuse(tmp_path):
    out = tmp_path / "set"
    params = {"n": 10, "seed": 0}
    with atomic_output_dir(out, "synthetic", params=params) as tmp:
        _write(tmp)
    assert is_own_output(out, "synthetic", params) and not is_own_output(out, "synthetic", {"n": 11, "seed": 0})
    assert check_output_dir(out, "synthetic", params=params, reuse=True) == out
    with pytest.raises(OutputDirError, match=r"with \{'n': 10, 'seed': 0\} \(asked for \{'n': 11, 'seed': 0\}\)"):
        check_output_dir(out, "synthetic", params={"n": 11, "seed": 0}, reuse=True)


def test_claim_grows_in_place_and_remove_only_removes_ours(tmp_path):
    out = claim_output_dir(tmp_path / "eval", "eval")
    (out / "predictions.jsonl").write_text("1\n")
    with pytest.raises(OutputDirError, match="--resume"):
        claim_output_dir(out, "eval", overwrite_hint="pass --resume")
    assert claim_output_dir(out, "eval", reuse=True) == out
    assert (out / "predictions.jsonl").read_text() == "1\n"
    user = tmp_path / "user"
    user.mkdir()
    (user / MARKER).write_text(json.dumps({"kind": "eval"}))  # not a marker we wrote
    assert not remove_own_output(user, "eval") and user.is_dir()
    assert not remove_own_output(out, "train_run") and out.is_dir()
    assert remove_own_output(out, "eval") and not out.exists()


def test_stale_temp_sibling_of_a_dead_process_is_removed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{outdir.socket.gethostname()}-999999999"
    stale.mkdir()
    outdir._write_marker(stale, "export", None, files=None)
    foreign = tmp_path / ".out.tmp-elsewhere-1"
    foreign.mkdir()
    with atomic_output_dir(out, "export") as tmp:
        _write(tmp)
    assert not stale.exists() and foreign.is_dir()
