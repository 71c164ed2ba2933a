"""Training checkpoints (molmo_fast/train/checkpoint.py): no code runs from a checkpoint's files, the RNG state
round-trips exactly without pickle, and a full disk is reported as one."""

import contextlib
import errno
import io
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as dcp_fs
from torch import nn

from molmo_fast.train import checkpoint as ckpt


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


class _Plant:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _read_starts(ckpt_dir, name: str) -> list[int]:
    """Where a loader starts reading in file `name`: the offset of every item DCP stored in a shard file (from the
    trusted .metadata), else the start of the file."""
    if not name.endswith(".distcp"):
        return [0]
    with open(ckpt_dir / ".metadata", "rb") as f:
        return sorted(info.offset for info in pickle.load(f).storage_data.values() if info.relative_path == name)


def test_a_crafted_pickle_in_any_checkpoint_file_runs_nothing_on_resume(group, tmp_path):
    model, opt = _model_and_optimizer()
    good = ckpt.save_checkpoint(tmp_path / "run", 1, model, opt, {"tokens_seen": 5}, keep_last=1)
    files = sorted(p.name for p in good.iterdir() if p.name != ".metadata")
    assert {"train_state.json", "rng_rank0.safetensors"} <= set(files) and any(f.endswith(".distcp") for f in files)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Plant(marker))
    pickle.loads(payload)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    # one crafted checkpoint per place a loader reads from, so that no earlier failure hides a later read
    plants = [(name, start) for name in files for start in _read_starts(good, name)]
    assert len(plants) > 10  # model and optimizer tensors, the optimizer's plain-data entries, RNG, train state
    for i, (name, start) in enumerate(plants):
        crafted = tmp_path / f"crafted_{i}"
        shutil.copytree(good, crafted)
        data = bytearray((crafted / name).read_bytes())
        data[start:start + len(payload)] = payload
        (crafted / name).write_bytes(bytes(data))
        fresh, fresh_opt = _model_and_optimizer(seed=1)
        with contextlib.suppress(BaseException):  # refusing is fine; running the payload is not
            ckpt.load_checkpoint(crafted, fresh, fresh_opt)
        assert not marker.exists(), f"loading {name} (payload at byte {start}) ran the planted command"
    # the untouched checkpoint still loads, exactly
    fresh, fresh_opt = _model_and_optimizer(seed=1)
    assert ckpt.load_checkpoint(good, fresh, fresh_opt)["tokens_seen"] == 5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    assert fresh_opt.state_dict()["param_groups"][0]["betas"] == (0.9, 0.95)


def test_rng_state_round_trips_without_pickle(group, tmp_path):
    model, opt = _model_and_optimizer()
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    random.gauss(0, 1)  # a cached Gaussian is part of Python's state
    path = ckpt.save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=1)
    expected = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt.load_checkpoint(path, model, opt)
    again = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_an_older_pickled_rng_file_is_refused_unread(group, tmp_path):
    model, opt = _model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    (path / "rng_rank0.pt").write_bytes(pickle.dumps(_Plant(tmp_path / "pwned")))
    with pytest.raises(ValueError, match="older molmo_fast that pickled the RNG state"):
        ckpt.load_checkpoint(path, model, opt)
    assert not (tmp_path / "pwned").exists()


def test_a_full_disk_during_a_checkpoint_write_says_so(group, tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=2)

    class FullDisk(io.RawIOBase):
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            if self.written + len(b) > 2000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(b)
            return self.f.write(b)

        def tell(self):
            return self.f.tell()

        def seek(self, *args):
            return self.f.seek(*args)

        def writable(self):
            return True

        def seekable(self):
            return True

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with open(path, mode) as f:
            yield FullDisk(f) if "w" in mode else f

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", create_stream)
    with pytest.raises(OSError, match=r"disk full while writing checkpoint step 2 .*step_1 is intact") as info:
        ckpt.save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=2)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]
