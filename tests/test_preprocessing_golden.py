"""Preprocessing vs the reference fixtures: real settings (preprocessing.*) and the tiny model's (cases.*)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from molmo_fast.data.image_preprocessing import ImageConfig, select_tiling
from molmo_fast.data.processor import Processor
from molmo_fast.data.tokenizer import ASSET_DIR

TINY_CASES = ("single_image", "single_image_b", "two_images")


@pytest.fixture(scope="module")
def pp(golden_dir):
    meta = json.loads((golden_dir / "preprocessing.json").read_text())
    return meta, load_file(golden_dir / "preprocessing.safetensors")


@pytest.fixture(scope="module")
def real_outputs(golden_dir, pp):
    """Each real-size image is processed once for the whole module."""
    meta, _ = pp
    processor = Processor.from_pretrained(ASSET_DIR)
    outputs = {}
    for name, case in meta["cases"].items():
        out = processor(meta["prompt"], Image.open(golden_dir / case["image_file"]))
        outputs[name] = {k: v[0].numpy() for k, v in out.items()}
    return outputs


@pytest.fixture(scope="module")
def tiny(golden_dir):
    return json.loads((golden_dir / "cases.json").read_text()), load_file(golden_dir / "cases.safetensors")


def real_case_names():
    golden = Path(__file__).parent / "fixtures" / "golden"
    return list(json.loads((golden / "preprocessing.json").read_text())["cases"])


@pytest.mark.parametrize("name", real_case_names())
def test_tiling(pp, real_outputs, name):
    meta, _ = pp
    case = meta["cases"][name]
    cfg = ImageConfig.from_json(ASSET_DIR)
    h, w = case["height"] - cfg.margin_px, case["width"] - cfg.margin_px
    rows, cols = select_tiling(h, w, cfg.window_px, cfg.max_crops)
    assert [rows, cols] == case["tiling_rows_cols"]
    assert real_outputs[name]["images"].shape[0] == 1 + rows * cols == case["n_crops_incl_global"]


@pytest.mark.parametrize("name", real_case_names())
def test_ids_and_masks_exact(pp, real_outputs, name):
    _, tensors = pp
    out = real_outputs[name]
    np.testing.assert_array_equal(out["input_ids"], tensors[f"{name}.input_ids"])
    assert out["image_input_idx"].dtype == np.int32
    np.testing.assert_array_equal(out["image_input_idx"], tensors[f"{name}.image_input_idx"])
    np.testing.assert_array_equal(out["image_masks"], tensors[f"{name}.image_masks"])


@pytest.mark.parametrize("name", real_case_names())
def test_pixels(pp, real_outputs, name):
    meta, tensors = pp
    images = real_outputs[name]["images"]
    assert images.dtype == np.float32 and list(images.shape) == meta["cases"][name]["images_shape"]
    pos = tensors[f"{name}.sample_positions"]
    samples = images[pos[:, 0], pos[:, 1], pos[:, 2]]
    np.testing.assert_allclose(samples, tensors[f"{name}.sample_values"], rtol=0, atol=1e-6)
    as64 = images.astype(np.float64)
    np.testing.assert_allclose(as64.sum((1, 2)), tensors[f"{name}.crop_sum"], rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose((as64**2).sum((1, 2)), tensors[f"{name}.crop_sumsq"], rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(as64.sum(2), tensors[f"{name}.crop_patch_sum"], rtol=1e-9, atol=1e-6)
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    assert digest == meta["cases"][name]["images_sha256_16_float32_bytes"]
    if f"{name}.images" in tensors:
        np.testing.assert_allclose(images, tensors[f"{name}.images"], rtol=0, atol=1e-6)


def test_text_only_prompts(pp):
    meta, _ = pp
    processor = Processor.from_pretrained(ASSET_DIR)
    assert meta["text_only_prompts"]
    for prompt, expected in meta["text_only_prompts"].items():
        out = processor(prompt)
        assert set(out) == {"input_ids"}
        assert out["input_ids"].tolist() == [expected["input_ids"]]
    assert processor.tokenizer.encode(meta["prompt_formatted"]) == meta["prompt_text_token_ids"]
    ids = processor.tokenizer.image_ids
    names = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
    assert [ids.start, ids.end, ids.patch, ids.col, ids.prompt] == [
        meta["tokenizer"]["special_token_ids"][k] for k in names]
    assert processor.tokenizer.eos_id == processor.tokenizer.bos_id == meta["tokenizer"]["bos_used"]
    assert processor.tokenizer.pad_id == meta["tokenizer"]["pad_token_id"]


@pytest.mark.parametrize("name", TINY_CASES)
def test_tiny_cases(golden_dir, tiny, name):
    meta, tensors = tiny
    case = meta["cases"][name]
    processor = Processor.from_pretrained(golden_dir / meta["model_dir"])
    images = [Image.open(golden_dir / f) for f in case["image_files"]]
    out = {k: v[0].numpy() for k, v in processor("a prompt", images).items()}
    np.testing.assert_array_equal(out["images"], tensors[f"{name}.images"])
    np.testing.assert_array_equal(out["image_masks"], tensors[f"{name}.image_masks"])
    np.testing.assert_array_equal(out["image_input_idx"], tensors[f"{name}.image_input_idx"])
    n_image = len(tensors[f"{name}.input_ids"]) - len(case["text_tokens"])
    np.testing.assert_array_equal(out["input_ids"][:n_image], tensors[f"{name}.input_ids"][:n_image])
    assert out["input_ids"][0] == meta["bos_token_id_used"]


def test_max_crops_knob(golden_dir, tiny):
    meta, tensors = tiny
    processor = Processor.from_pretrained(golden_dir / meta["model_dir"])
    image = Image.open(golden_dir / meta["cases"]["two_images"]["image_files"][1])
    full = processor("q", image)
    processor.max_crops = 1
    small = processor("q", image)
    assert processor.max_crops == 1 and full["images"].shape[1] == 4 and small["images"].shape[1] == 2
    assert small["input_ids"].shape[1] < full["input_ids"].shape[1]
    # Every valid index still lands on an <im_patch> token.
    idx = small["image_input_idx"][0]
    assert (small["input_ids"][0][idx[idx >= 0].long()] == processor.tokenizer.image_ids.patch).all()


def test_image_config_sources_and_validation(golden_dir):
    tiny_dir = golden_dir / "tiny_model"
    cfg = ImageConfig.from_json(tiny_dir)
    assert (cfg.crop_size, cfg.max_crops, cfg.overlap_margins, cfg.tokens_h, cfg.pool) == (84, 4, (2, 2), 3, 2)
    assert ImageConfig.from_model_config(json.loads((tiny_dir / "config.json").read_text())) == cfg
    assert cfg.with_max_crops(9).max_crops == 9
    with pytest.raises(ValueError, match="overlap_margins"):
        ImageConfig(crop_size=84, overlap_margins=(3, 3), tokens_h=3, tokens_w=3)
    with pytest.raises(ValueError, match="max_crops"):
        ImageConfig(max_crops=0)
    with pytest.raises(ValueError, match="crop_mode"):
        ImageConfig.from_dict({"crop_mode": "resize"})
