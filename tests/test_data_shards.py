"""Shard format, synthetic generators and collate (CPU, seconds)."""

import io
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from molmo_fast.data.collate import Collator
from molmo_fast.data.shards import (
    Record,
    ShardFormatError,
    ShardSetWriter,
    decode_sample,
    encode_record,
    read_info,
    read_sizes,
)
from molmo_fast.data.sources.synthetic import (
    COLORS,
    GENERATORS,
    ensure_synthetic_shards,
    make_example,
    shared_synthetic_set,
)
from molmo_fast.outdir import OutputDirError


def _jpeg(w=40, h=30, color=(10, 200, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), color).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _example(i, **content):
    return {"id": f"ex{i}", "schema_version": 1, "style": "vqa2", **(content or {"question": "q?", "answers": ["a"]})}


def test_round_trip_keeps_fields_and_original_bytes(tmp_path):
    jpeg, gif = _jpeg(), io.BytesIO()
    Image.new("P", (8, 6)).save(gif, format="GIF")
    records = [
        Record(_example(0), jpeg),
        Record(_example(1, messages=["hi", "there"], metadata={"k": [1, 2]}), None),
        Record(_example(2, points=[[1.5, 2.0]], label="dog", count=1), gif.getvalue()),
    ]
    with ShardSetWriter(tmp_path, shard_size=2, info={"source": "t"}) as writer:
        writer.write_all(records)
    sizes = read_sizes(tmp_path)
    assert list(sizes.values()) == [2, 1]
    assert read_info(tmp_path)["num_samples"] == 3 and read_info(tmp_path)["source"] == "t"

    raws = list(wds.tarfile_samples([{"url": u} for u in sizes]))
    assert [r["__key__"] for r in raws] == ["ex0", "ex1", "ex2"]
    assert raws[0]["jpg"] == jpeg  # not re-encoded
    assert "png" in raws[2] and "gif" not in raws[2]  # other formats become lossless PNG
    decoded = [decode_sample(r) for r in raws]
    assert decoded[0]["image"].size == (40, 30) and decoded[0]["image_size"] == [40, 30]
    assert decoded[1]["image"] is None and decoded[1]["messages"] == ["hi", "there"]
    assert decoded[1]["metadata"] == {"k": [1, 2]}
    assert decoded[2]["points"] == [[1.5, 2.0]] and decoded[2]["image_size"] == [8, 6]


@pytest.mark.parametrize("bad, match", [
    ({"id": "a.b"}, "'id'"),
    ({"schema_version": 2}, "schema_version"),
    ({"style": ""}, "style"),
    ({"question": None, "answers": None}, "no content"),
    ({"options": ["x"], "answer_idx": 3}, "answer_idx"),
])
def test_validation_names_the_field(bad, match):
    example = {**_example(0), **bad}
    example = {k: v for k, v in example.items() if v is not None}
    with pytest.raises(ShardFormatError, match=match):
        encode_record(Record(example))


def test_duplicate_keys_rejected(tmp_path):
    with pytest.raises(ShardFormatError, match="duplicate"):
        with ShardSetWriter(tmp_path) as writer:
            writer.write_all([Record(_example(0)), Record(_example(0))])


def test_decode_rejects_corruption():
    sample = encode_record(Record(_example(0), _jpeg()))
    with pytest.raises(OSError):  # PIL: truncated image data
        decode_sample({**sample, "jpg": sample["jpg"][: len(sample["jpg"]) // 3]})
    with pytest.raises(json.JSONDecodeError):
        decode_sample({**sample, "json": b"{not json"})
    with pytest.raises(ShardFormatError, match="disagree"):
        decode_sample({"__key__": "ex0", "json": sample["json"]})


@pytest.mark.parametrize("name", list(GENERATORS))
def test_synthetic_is_deterministic_and_valid(name):
    a, b = make_example(name, 7, seed=3), make_example(name, 7, seed=3)
    assert a.example == b.example and a.image_bytes == b.image_bytes
    others = {json.dumps(make_example(name, i, seed=3).example, sort_keys=True) for i in range(8)}
    assert len(others) > 1
    assert make_example(name, 7, seed=4).image_bytes != a.image_bytes
    assert decode_sample(encode_record(a))["image"].size == (224, 224)


@pytest.mark.parametrize("name", ["synthetic_counting", "synthetic_pointing"])
def test_synthetic_points_hit_the_labelled_shapes(name):
    for i in range(20):
        record = make_example(name, i, image_size=160)
        ex = record.example
        img = np.asarray(Image.open(io.BytesIO(record.image_bytes)).convert("RGB"))
        color = np.array(COLORS[ex["label"].split()[0]])
        assert ex["count"] == len(ex["points"])
        for x, y in ex["points"]:
            assert np.abs(img[int(round(y)), int(round(x))].astype(int) - color).max() < 5
        # nothing else in the image has the target color where no point is
        mask = np.abs(img.astype(int) - color).max(-1) < 5
        assert (mask.sum() > 0) == (ex["count"] > 0)


def test_synthetic_clock_and_chart_answers_match_metadata():
    for i in range(10):
        clock = make_example("synthetic_clocks", i).example
        m = clock["metadata"]
        assert clock["answers"] == [f"{m['hour']}:{m['minute']:02d}"]
        chart = make_example("synthetic_charts", i).example
        values = dict(zip(chart["metadata"]["names"], chart["metadata"]["values"]))
        answer = chart["answers"][0]
        if "tallest" in chart["question"]:
            assert values[answer] == max(values.values())
        else:
            assert str(values[chart["question"].split()[-1].rstrip("?")]) == answer


def test_ensure_synthetic_shards_builds_once(tmp_path):
    out = ensure_synthetic_shards(tmp_path / "c", "synthetic_counting", n=12, seed=1, image_size=64, shard_size=5)
    assert sum(read_sizes(out).values()) == 12 and len(read_sizes(out)) == 3
    mtime = (out / "sizes.json").stat().st_mtime_ns
    ensure_synthetic_shards(out, "synthetic_counting", n=12, seed=1, image_size=64, shard_size=5)
    assert (out / "sizes.json").stat().st_mtime_ns == mtime
    # another size in the same directory could be another run's data: refused unless asked for, never in place
    with pytest.raises(OutputDirError, match=r"'n': 12.*asked for .*'n': 10.*--overwrite"):
        ensure_synthetic_shards(out, "synthetic_counting", n=10, seed=1, image_size=64, shard_size=5)
    assert sum(read_sizes(out).values()) == 12 and (out / "sizes.json").stat().st_mtime_ns == mtime
    ensure_synthetic_shards(out, "synthetic_counting", n=10, seed=1, image_size=64, shard_size=5, overwrite=True)
    assert sum(read_sizes(out).values()) == 10 and sorted(os.listdir(tmp_path)) == ["c"]


def test_shared_synthetic_sets_are_keyed_by_their_parameters(tmp_path):
    """A changed size or seed builds a new set next to the old one, which every run using it still reads."""
    a = shared_synthetic_set(tmp_path, "synthetic_counting", 6, seed=0, image_size=32)
    first = {p.name: p.read_bytes() for p in a.iterdir()}
    b = shared_synthetic_set(tmp_path, "synthetic_counting", 8, seed=0, image_size=32)
    c = shared_synthetic_set(tmp_path, "synthetic_counting", 6, seed=1, image_size=32)
    assert len({a, b, c}) == 3 and all(p.parent == tmp_path / "synthetic_counting" for p in (a, b, c))
    assert {p.name: p.read_bytes() for p in a.iterdir()} == first
    assert [sum(read_sizes(p).values()) for p in (a, b, c)] == [6, 8, 6]
    assert shared_synthetic_set(tmp_path, "synthetic_counting", 6, seed=0, image_size=32) == a


def test_synthetic_build_refuses_a_user_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match="did not write .*notes.txt"):
            ensure_synthetic_shards(tmp_path, "synthetic_counting", n=2, image_size=32, overwrite=overwrite)
    assert os.listdir(tmp_path) == ["notes.txt"]


def _build_when_released(barrier, out):
    barrier.wait()
    ensure_synthetic_shards(out, "synthetic_counting", n=4, seed=2, image_size=32, shard_size=2)


def test_ensure_synthetic_shards_concurrent_ranks(tmp_path, monkeypatch):
    """Ranks that build the same missing set at once: none fails, and the set ends up complete."""
    slow_rename = os.rename

    def rename(src, dst):  # widen the window between "not built yet" and publishing the built set
        if Path(src).is_dir():
            time.sleep(0.3)
        slow_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    ctx = multiprocessing.get_context("fork")  # the children inherit the patch
    barrier = ctx.Barrier(3)
    out = tmp_path / "c"
    ranks = [ctx.Process(target=_build_when_released, args=(barrier, out)) for _ in range(3)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(60)
    assert [rank.exitcode for rank in ranks] == [0, 0, 0]
    assert sum(read_sizes(out).values()) == 4 and os.listdir(tmp_path) == ["c"]


def _pre(n_tokens, n_crops, subsegments=False, P=4, T=2):
    out = {
        "input_tokens": np.arange(n_tokens, dtype=np.int64) + 10,
        "target_tokens": np.arange(n_tokens, dtype=np.int64) + 11,
        "loss_masks": np.ones(n_tokens, np.float32),
        "position_ids": np.arange(n_tokens, dtype=np.int64),
        "images": np.full((n_crops, P, 588), 0.5, np.float32),
        "image_masks": np.ones((n_crops, P), np.float32),
        "image_input_idx": np.tile(np.arange(T, dtype=np.int32), (n_crops, 1)) + 5,
        "metadata": {"id": f"x{n_tokens}"},
    }
    if subsegments:
        out["subsegment_ids"] = np.zeros(n_tokens, np.int64)
    return out


def test_collate_pads_to_fixed_shapes_with_minus_one():
    collate = Collator(sequence_length=12, max_crops=3)
    batch = collate([_pre(5, 2), _pre(8, 0)])
    assert batch["input_ids"].shape == (2, 12) and batch["input_ids"].dtype == torch.int64
    assert (batch["input_ids"][0, 5:] == -1).all() and batch["input_ids"][0, 0] == 10
    assert (batch["labels"][1, 8:] == -1).all()
    assert batch["loss_masks"].dtype == torch.float32 and (batch["loss_masks"][0, 5:] == 0).all()
    assert batch["images"].shape == (2, 3, 4, 588)
    assert (batch["images"][0, 2:] == -1).all() and (batch["images"][1] == -1).all()
    assert (batch["image_masks"][1] == -1).all() and (batch["image_input_idx"][0, :2] == torch.tensor([5, 6])).all()
    assert "subsegment_ids" not in batch
    assert collate.num_truncated == 0 and [m["id"] for m in batch["metadata"]] == ["x5", "x8"]


def test_collate_counts_truncation_and_drops_cut_image_tokens():
    collate = Collator(sequence_length=6, max_crops=1)
    ex = _pre(9, 2)
    ex["image_input_idx"][0] = [2, 7]
    batch = collate([ex, _pre(4, 1, subsegments=True)])
    assert collate.num_truncated == 1
    assert batch["metadata"][0]["truncated"] and "truncated" not in batch["metadata"][1]
    assert batch["image_input_idx"][0, 0].tolist() == [2, -1]  # index 7 >= 6 was cut with the text
    # one example has subsegments: the other gets all-ones (a single conversation)
    assert batch["subsegment_ids"][0].tolist() == [1] * 6 and batch["subsegment_ids"][1, :4].tolist() == [0] * 4


def test_failed_build_leaves_no_shard_set(tmp_path):
    def records():
        yield Record(_example(0))
        raise RuntimeError("network down")

    with pytest.raises(RuntimeError):
        with ShardSetWriter(tmp_path) as writer:
            writer.write_all(records())
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        read_sizes(tmp_path)


def test_synthetic_counting_answer_is_molmo_point_count_with_the_points():
    from molmo_fast.data.formatter import format_example, parse_points

    for i in range(6):
        ex = decode_sample(encode_record(make_example("synthetic_counting", i, image_size=200)))
        answer = format_example(ex, rng=None)[0][1]
        if ex["count"] == 0:
            assert answer.strip() == "There are none."
            continue
        assert answer.strip().startswith("Counting the <point") and answer.strip().endswith(f"total of {ex['count']}.")
        parsed = sorted(parse_points(answer, ex["image_size"]))
        assert np.allclose(parsed, sorted(map(tuple, ex["points"])), atol=0.2)  # 1-decimal percent rounding
