"""Training/eval loaders, mixtures and corrupt-sample handling (CPU, small shards, 2 DataLoader workers)."""

import io
import json
import logging
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from molmo_fast.data.loader import EvalLoader, LoaderConfig, TrainLoader
from molmo_fast.data.mixture import Mixture, MixtureSampler, root_size_rates
from molmo_fast.data.shards import SIZES_FILE, Record, ShardSetWriter, encode_record
from molmo_fast.data.sources.synthetic import ensure_synthetic_shards

ASSETS = Path(__file__).parents[1] / "molmo_fast" / "assets" / "molmoe-1b"


def fake_preprocess(example, rng=None, for_inference=False):
    """Cheap stand-in with the Preprocessor's output contract; token 1 records the per-example rng draw."""
    h = zlib.crc32(example["id"].encode())
    n = 4 + h % 5
    tokens = np.full(n, h % 50000, np.int64)
    tokens[1] = -7 if rng is None else int(rng.integers(1 << 30))
    return {"input_tokens": tokens, "target_tokens": tokens.copy(), "loss_masks": np.ones(n, np.float32),
            "position_ids": np.arange(n), "images": np.zeros((1, 2, 588), np.float32),
            "image_masks": np.ones((1, 2), np.float32), "image_input_idx": np.zeros((1, 2), np.int32)}


def _records(prefix, n):
    for i in range(n):
        png = io.BytesIO()
        Image.new("RGB", (8 + i % 3, 8), (i % 255, 0, 0)).save(png, format="PNG")
        yield Record({"id": f"{prefix}{i:04d}", "schema_version": 1, "style": "vqa2", "question": "q",
                      "answers": [str(i)]}, png.getvalue())


def _shard_set(path, prefix, n, shard_size):
    with ShardSetWriter(path, shard_size=shard_size) as writer:
        writer.write_all(_records(prefix, n))
    return str(path)


def _cfg(**kw):
    base = dict(batch_size=3, sequence_length=16, max_crops=2, num_workers=2, shuffle_buffer=6, epoch_batches=3)
    return LoaderConfig(**{**base, **kw})


def _ids(batch):
    return [m["id"] for m in batch["metadata"]]


def _take(loader, n):
    return [b for _, b in zip(range(n), loader)]


def test_two_ranks_two_workers_disjoint_equal_streams(tmp_path):
    data = _shard_set(tmp_path / "d", "s", 40, shard_size=5)  # 8 shards >= 2 ranks x 2 workers
    streams = {}
    for rank in range(2):
        batches = _take(TrainLoader(Mixture.single(data), fake_preprocess, _cfg(), rank=rank, world_size=2), 8)
        assert len(batches) == 8 and all(len(_ids(b)) == 3 for b in batches)
        for step, batch in enumerate(batches):
            streams.setdefault((rank, step % 2), set()).update(_ids(batch))
    assert len(streams) == 4 and all(streams.values())
    keys = list(streams)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not streams[a] & streams[b], f"streams {a} and {b} share samples"


def test_resume_gives_identical_batches(tmp_path):
    data = _shard_set(tmp_path / "d", "s", 30, shard_size=5)
    mix = Mixture.single(data)
    full = _take(TrainLoader(mix, fake_preprocess, _cfg(), rank=1, world_size=2), 13)
    first = TrainLoader(mix, fake_preprocess, _cfg(), rank=1, world_size=2)
    _take(first, 7)
    state = first.state_dict()
    assert state["step"] == 7
    resumed = TrainLoader(mix, fake_preprocess, _cfg(), rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON checkpoint
    tail = _take(resumed, 6)
    for a, b in zip(full[7:], tail):
        assert _ids(a) == _ids(b)
        for key in ("input_ids", "labels", "loss_masks", "images"):
            assert torch.equal(a[key], b[key])
    assert _ids(full[0]) != _ids(full[3])  # a different epoch really reshuffles
    with pytest.raises(ValueError, match="seed"):
        TrainLoader(mix, fake_preprocess, _cfg(seed=5)).load_state_dict(state)


def test_resume_rejects_changed_stream_settings(tmp_path):
    a = _shard_set(tmp_path / "a", "a", 10, shard_size=5)
    b = _shard_set(tmp_path / "b", "b", 10, shard_size=5)
    mix = Mixture({"a": a, "b": b}, {"a": 0.5, "b": 0.5})
    state = json.loads(json.dumps(TrainLoader(mix, fake_preprocess, _cfg(), rank=0, world_size=2).state_dict()))
    TrainLoader(mix, fake_preprocess, _cfg(), rank=1, world_size=2).load_state_dict(state)  # rank may differ
    changed = {"batch_size": _cfg(batch_size=4), "epoch_batches": _cfg(epoch_batches=4),
               "shuffle_buffer": _cfg(shuffle_buffer=7), "num_workers": _cfg(num_workers=1)}
    for field, cfg in changed.items():
        with pytest.raises(ValueError, match=rf"{field}: saved \d+, now \d+"):
            TrainLoader(mix, fake_preprocess, cfg, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"world_size: saved 2, now 1"):
        TrainLoader(mix, fake_preprocess, _cfg()).load_state_dict(state)
    with pytest.raises(ValueError, match=r"rates: saved .*, now .*0\.75"):
        TrainLoader(Mixture({"a": a, "b": b}, {"a": 0.75, "b": 0.25}), fake_preprocess, _cfg(),
                    rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"shard_sets: saved") as err:
        TrainLoader(Mixture({"a": a}), fake_preprocess, _cfg(), rank=0, world_size=2).load_state_dict(state)
    assert "rates: saved" in str(err.value)  # every mismatching field is named, not just the first
    old = {k: state[k] for k in ("step", "seed", "num_workers", "stats")}  # a state saved before these checks
    with pytest.raises(ValueError, match="lacks the stream settings"):
        TrainLoader(mix, fake_preprocess, _cfg(), rank=0, world_size=2).load_state_dict(old)


def test_mixture_rates_within_tolerance():
    rates = {"a": 0.6, "b": 0.3, "c": 0.1}
    sampler = Mixture({k: f"/{k}" for k in rates}, rates).sampler(np.random.default_rng(0))
    draws = [next(sampler) for _ in range(2000)]
    for name, rate in rates.items():
        assert abs(draws.count(name) / 2000 - rate) < 0.035
    assert isinstance(sampler, MixtureSampler)


def test_root_size_rule():
    rates = root_size_rates({"demo": (0.25, {"x": 100, "y": 400}), "aux": (0.75, {"z": 9})})
    assert rates["x"] == pytest.approx(0.25 * 10 / 30) and rates["y"] == pytest.approx(0.25 * 20 / 30)
    assert rates["z"] == pytest.approx(0.75) and sum(rates.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="more than one"):
        root_size_rates({"g1": (1, {"x": 1}), "g2": (1, {"x": 2})})


def test_loader_follows_mixture_rates(tmp_path):
    big = _shard_set(tmp_path / "big", "b", 40, shard_size=10)
    small = _shard_set(tmp_path / "small", "m", 10, shard_size=10)
    mix = Mixture.root_size({"all": (1.0, {"big": big, "small": small})}, size_overrides={"small": 160})
    assert mix.rates["big"] == pytest.approx(1 / 3)  # sqrt(40) : sqrt(160) = 1 : 2
    batches = _take(TrainLoader(mix, fake_preprocess, _cfg(batch_size=10, shuffle_buffer=1)), 60)
    ids = [i for b in batches for i in _ids(b)]
    assert abs(sum(i.startswith("b") for i in ids) / len(ids) - 1 / 3) < 0.06
    with pytest.raises(ValueError, match="'smal'"):
        Mixture.root_size({"all": (1.0, {"big": big, "small": small})}, size_overrides={"smal": 160})
    with pytest.raises(ValueError, match="sizes must be > 0"):
        Mixture.root_size({"all": (1.0, {"big": big, "small": small})}, size_overrides={"small": 0})


def _write_corrupt_shard(path: Path):
    good = [encode_record(r) for r in _records("c", 4)]
    with wds.TarWriter(str(path)) as tar:
        tar.write(good[0])
        tar.write({**good[1], "png": b"\x89PNG\r\n\x1a\nnot really a png"})  # bad image bytes
        tar.write({**good[2], "json": b"{bad json"})  # bad JSON
        tar.write(good[3])
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    data = path.read_bytes()
    path.write_bytes(data[: last.offset_data + last.size // 2])  # truncate inside the last member


@pytest.fixture
def corrupt_set(tmp_path):
    d = tmp_path / "corrupt"
    _shard_set(d, "g", 12, shard_size=6)
    _write_corrupt_shard(d / "shard-000002.tar")
    sizes = json.loads((d / SIZES_FILE).read_text())
    sizes["shard-000002.tar"] = 4
    (d / SIZES_FILE).write_text(json.dumps(sizes))
    return str(d)


def test_train_loader_skips_and_counts_corrupt_samples(corrupt_set, caplog):
    loader = TrainLoader(Mixture.single(corrupt_set), fake_preprocess, _cfg(num_workers=1, shuffle_buffer=2))
    with caplog.at_level(logging.WARNING, logger="molmo_fast.data.loader"):
        batches = _take(loader, 25)
    ids = {i for b in batches for i in _ids(b)}
    assert {"c0001", "c0002", "c0003"}.isdisjoint(ids)
    assert "c0000" in ids
    assert loader.stats["corrupt"] >= 3 and loader.stats["examples"] == 75
    logged = caplog.text
    assert "corrupt" in logged and "JSONDecodeError" in logged and "Truncated" in logged  # never silent
    # each lost sample is named by its shard and key, so it can be found and fixed
    assert "shard-000002.tar, key 'c0001'" in logged and "shard-000002.tar, key 'c0002'" in logged


def test_eval_loader_exactly_once_equal_length(corrupt_set, tmp_path, caplog):
    data = _shard_set(tmp_path / "e", "e", 23, shard_size=4)
    per_rank, seen = [], []
    for rank in range(2):
        loader = EvalLoader(data, fake_preprocess, _cfg(batch_size=4), rank=rank, world_size=2)
        batches = list(loader)
        per_rank.append(len(batches))
        assert len(batches) == len(loader) and all(b["input_ids"].shape[0] == 4 for b in batches)
        seen += [m["id"] for b in batches for m in b["metadata"] if not m["padding"]]
        assert all(b["input_ids"][0, 1] == -7 for b in batches)  # eval preprocessing gets no rng
    assert per_rank[0] == per_rank[1] == 3
    assert sorted(seen) == [f"e{i:04d}" for i in range(23)]

    loader = EvalLoader(corrupt_set, fake_preprocess, _cfg(batch_size=4), rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="molmo_fast.data.loader"):
        metas = [m for b in loader for m in b["metadata"]]
    for lost in ("key 'c0001'", "key 'c0002'", "key 'c0003'"):
        assert f"shard-000002.tar, {lost}" in caplog.text
    assert len(metas) == 16 and loader.num_samples == 16
    real = [m["id"] for m in metas if not m["padding"]]
    assert sorted(real) == sorted([f"g{i:04d}" for i in range(12)] + ["c0000"])
    assert sum(m.get("corrupt", False) for m in metas) == 3 and loader.stats["corrupt"] >= 3


def test_train_loader_rejects_an_empty_shard_set(tmp_path):
    empty = _shard_set(tmp_path / "empty", "x", 0, shard_size=4)
    with pytest.raises(ValueError, match="no samples"):
        TrainLoader(Mixture.single(empty), fake_preprocess, _cfg(num_workers=0))


def test_real_preprocessor_in_workers(tmp_path):
    from molmo_fast.data.preprocessor import Preprocessor

    data = ensure_synthetic_shards(tmp_path / "clocks", "synthetic_clocks", n=8, image_size=64, shard_size=2)
    cfg = LoaderConfig(batch_size=2, sequence_length=400, max_crops=3, num_workers=2, shuffle_buffer=2)
    batch = next(iter(TrainLoader(Mixture.single(data), Preprocessor.from_pretrained(ASSETS), cfg)))
    assert batch["input_ids"].shape == (2, 400) and batch["images"].shape[:2] == (2, 3)
    assert batch["images"].shape[2:] == (576, 588)
    n_loss = batch["loss_masks"].sum(1)
    assert (n_loss > 1).all()  # the answer "h:mm" plus EOS is trained
    assert (batch["labels"][batch["loss_masks"] > 0] >= 0).all()


@pytest.mark.parametrize("n, world, batch", [(1, 3, 2), (7, 2, 4), (10, 4, 1), (12, 3, 4)])
def test_eval_split_edge_cases(tmp_path, n, world, batch):
    data = _shard_set(tmp_path / "e", "e", n, shard_size=3)
    seen, lengths = [], set()
    for rank in range(world):
        loader = EvalLoader(data, fake_preprocess, _cfg(batch_size=batch, num_workers=0), rank=rank, world_size=world)
        batches = list(loader)
        lengths.add(len(batches))
        assert all(len(b["metadata"]) == batch for b in batches)
        seen += [m["id"] for b in batches for m in b["metadata"] if not m["padding"]]
    assert len(lengths) == 1 and lengths.pop() >= 1
    assert sorted(seen) == [f"e{i:04d}" for i in range(n)]
