"""Any valid image works: extreme aspect ratios, 1x1 and every PIL mode go through preprocessing, training, eval and
generation; an image that cannot be decoded is skipped, counted and named by shard and key."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from molmo_fast.data.image_preprocessing import ImageConfig, crop_image
from molmo_fast.data.preprocessor import to_rgb_array
from molmo_fast.data.shards import SIZES_FILE, Record, ShardSetWriter, encode_record
from molmo_fast.data.tokenizer import ASSET_DIR, ImageTokenIds

REPO = Path(__file__).resolve().parents[1]
EXTREME = [(10000, 50), (50, 10000), (1, 1), (1000, 1), (1, 1000)]  # PIL (width, height)
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa", "La",
         "I;16", "I;16B", "I;16L"]
IDS = ImageTokenIds(start=1, end=2, patch=3, col=4, prompt=5)


def _gradient(size, mode="RGB") -> Image.Image:
    w, h = size
    rgb = np.stack(np.broadcast_arrays(*np.ogrid[:h, :w], 7), -1) * 37 % 256
    image = Image.fromarray(rgb.astype(np.uint8))
    return image if mode == "RGB" else image.convert(mode)


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_becomes_rgb(mode):
    image = Image.new(mode, (5, 3))
    rgb = to_rgb_array(image)
    assert rgb.shape == (3, 5, 3) and rgb.dtype == np.uint8


def test_sixteen_bit_images_keep_their_range_instead_of_clipping_to_white():
    values = np.array([[0, 20000, 65535]], dtype=np.uint16)
    rgb = to_rgb_array(Image.fromarray(values))
    assert rgb[0, :, 0].tolist() == [0, 20000 >> 8, 255]


@pytest.mark.parametrize("size", EXTREME)
@pytest.mark.parametrize("settings", ["release", "tiny"])
def test_extreme_aspect_ratios_give_image_content_in_every_view(size, settings):
    cfg = ImageConfig.from_json(ASSET_DIR) if settings == "release" else ImageConfig(
        crop_size=84, max_crops=4, overlap_margins=(2, 2), tokens_h=3, tokens_w=3)
    crops = crop_image(to_rgb_array(_gradient(size)), cfg, IDS)
    n = crops.images.shape[0]
    assert n == 1 + crops.tiling[0] * crops.tiling[1] and np.isfinite(crops.images).all()
    # masks row r is crop r+1's valid-pixel fraction (the release's off-by-one): the image reaches every crop
    assert (crops.masks[: n - 1] > 0).any(axis=1).all()
    assert (crops.input_idx >= 0).sum() == (crops.tokens == IDS.patch).sum()


# ------------------------------------------------------------------------------------------ train, eval, generate
def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _jpeg_cmyk(size) -> bytes:
    out = io.BytesIO()
    _gradient(size, "CMYK").save(out, format="JPEG")
    return out.getvalue()


IMAGES = {
    "wide": lambda: _png(_gradient((10000, 50))),
    "tall": lambda: _png(_gradient((50, 10000))),
    "dot": lambda: _png(_gradient((1, 1), "L")),
    "strip": lambda: _png(_gradient((1000, 1), "P")),
    "deep": lambda: _png(Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)),
    "cmyk": lambda: _jpeg_cmyk((30, 20)),
}


@pytest.fixture(scope="module")
def extreme_set(tmp_path_factory) -> Path:
    """chart_qa-shaped shards of unusual but valid images, plus one shard holding an undecodable image."""
    out = tmp_path_factory.mktemp("data") / "chart_qa" / "test"
    records = [Record({"id": name, "schema_version": 1, "style": "chart_qa", "question": f"What is {name}?",
                       "answers": ["7"]}, make()) for name, make in IMAGES.items()]
    with ShardSetWriter(out, shard_size=3) as writer:
        writer.write_all(records)
    good = encode_record(records[0])
    with wds.TarWriter(str(out / "shard-000002.tar")) as tar:
        tar.write({**good, "__key__": "broken", "json": good["json"].replace(b'"wide"', b'"broken"'),
                   "png": good["png"][:200]})  # a truncated PNG: it opens but cannot decode
    sizes = json.loads((out / SIZES_FILE).read_text())
    (out / SIZES_FILE).write_text(json.dumps({**sizes, "shard-000002.tar": 1}))
    return out


def _train(run_dir: Path, shards: Path) -> subprocess.CompletedProcess:
    params = {"TrainConfig.run_dir": repr(str(run_dir)), "DataConfig.shards": repr({"charts": str(shards)}),
              "DataConfig.sequence_length": 96, "DataConfig.num_workers": 0, "DataConfig.shuffle_buffer": 4,
              "TrainConfig.max_steps": 3, "TrainConfig.global_batch_size": 4, "TrainConfig.micro_batch_size": 4,
              "TrainConfig.log_every": 1, "TrainConfig.checkpoint_every": 3, "TrainConfig.progress_bar": False}
    args = ["--gin_file", "gin/tiny.gin"] + [a for k, v in params.items() for a in ("--gin_param", f"{k} = {v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "molmo_fast.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_extreme_images_train_evaluate_and_generate(extreme_set, tmp_path, capsys):
    from molmo_fast.eval.runner import EvalConfig, run
    from molmo_fast.generate import main as generate

    run_dir = tmp_path / "run"
    proc = _train(run_dir, extreme_set)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["train/loss"]) for r in rows)
    assert rows[-1]["data/corrupt_total"] >= 1  # the broken image was drawn, skipped and counted
    assert "shard-000002.tar, key 'broken'" in proc.stderr

    (result,) = run(EvalConfig(checkpoint=str(run_dir), tasks="chart_qa", data_dir=str(extreme_set.parents[1]),
                               out=str(tmp_path / "eval"), batch_size=2, max_new_tokens=2))
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "chart_qa" / "predictions.jsonl").open()]
    assert result["n"] == len(IMAGES) and sorted(p["id"] for p in predictions) == sorted(IMAGES)

    for name in ("wide", "tall"):
        image = tmp_path / f"{name}.png"
        image.write_bytes(IMAGES[name]())
        answer = generate(["--checkpoint", str(run_dir / "hf"), "--image", str(image), "--prompt", "What is it?",
                           "--max_new_tokens", "3"])
        assert isinstance(answer, str) and capsys.readouterr().out.strip() == answer.strip()
