import numpy as np
import pytest
from PIL import Image

from molmo_fast.data.image_preprocessing import ImageConfig, crop_image
from molmo_fast.data.preprocessor import IMAGE_SUBSEGMENT, Preprocessor
from molmo_fast.data.processor import Processor


@pytest.fixture(scope="module")
def pre(golden_dir):
    return Preprocessor.from_pretrained(golden_dir / "tiny_model")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))


def test_text_only_alignment_and_loss_masks(pre):
    ex = {"id": "t", "style": "vqa2", "messages": ["What is it?", "a cat", "Sure?", "yes"], "image": None}
    out = pre(ex)
    tok = pre.tokenizer
    eos = tok.eos_id
    user0, ans0 = tok.encode(" User: vqa2: What is it? Assistant:"), tok.encode(" a cat")
    user1, ans1 = tok.encode(" User: Sure? Assistant:"), tok.encode(" yes")
    tokens = user0 + ans0 + [eos] + user1 + ans1 + [eos]
    mask = [0] * len(user0) + [1] * (len(ans0) + 1) + [0] * len(user1) + [1] * (len(ans1) + 1)
    assert out["input_tokens"].tolist() == [eos] + tokens[:-1]
    assert out["loss_masks"].tolist() == mask
    assert out["target_tokens"].tolist() == [t if m else -1 for t, m in zip(tokens, mask)]
    assert out["position_ids"].tolist() == list(range(len(tokens)))
    assert "subsegment_ids" not in out
    assert out["images"].shape == (0, 36, 588) and out["image_masks"].shape == (0, 36)
    assert out["image_input_idx"].shape == (0, 9) and out["image_input_idx"].dtype == np.int32
    assert {k: v.dtype for k, v in out.items() if k.endswith("tokens") or k.endswith("ids")} == {
        "input_tokens": np.int64, "target_tokens": np.int64, "position_ids": np.int64}
    assert out["loss_masks"].dtype == np.float32


def test_image_example(pre, image):
    ex = {"id": "i", "style": "pointing", "points": [[10, 20]], "label": "dot", "image": image, "image_size": [100, 60]}
    out = pre(ex)
    ids = pre.tokenizer.image_ids
    crops = pre.crop(image)
    n_img = len(crops.tokens)
    assert out["input_tokens"][0] == pre.tokenizer.bos_id
    np.testing.assert_array_equal(out["input_tokens"][1 : 1 + n_img], crops.tokens)
    assert out["loss_masks"][:n_img].sum() == 0 and out["loss_masks"].sum() > 0
    np.testing.assert_array_equal(out["images"], crops.images)
    idx = out["image_input_idx"]
    assert (out["input_tokens"][idx[idx >= 0]] == ids.patch).all()
    assert (idx >= 0).sum() == (out["input_tokens"] == ids.patch).sum()
    answer = pre.tokenizer.decode(out["target_tokens"][out["target_tokens"] >= 0])
    assert answer.strip() == '<point x="10.0" y="33.3" alt="dot">dot</point>'
    assert out["target_tokens"][-1] == pre.tokenizer.eos_id and out["loss_masks"][-1] == 1


def test_message_list_shares_image_and_restarts_positions(pre, image):
    ex = {"id": "m", "style": "vqa2", "image": image, "message_list": [["q one", "a one"], ["q two", "a two two"]]}
    out = pre(ex)
    ids = pre.tokenizer.image_ids
    n_img = len(pre.crop(image).tokens)
    assert (out["input_tokens"] == ids.start).sum() == 2  # one copy: global block + high-res block
    seg = out["subsegment_ids"]
    assert (seg[:n_img] == IMAGE_SUBSEGMENT).all()
    conv0, conv1 = np.flatnonzero(seg == 0), np.flatnonzero(seg == 1)
    assert len(conv0) and len(conv1) and conv0.max() < conv1.min() and conv1.max() == len(seg) - 1
    pos = out["position_ids"]
    assert pos[:n_img].tolist() == list(range(n_img))
    assert pos[conv0].tolist() == list(range(n_img, n_img + len(conv0)))
    assert pos[conv1].tolist() == list(range(n_img, n_img + len(conv1)))
    # Each conversation's answer + EOS is a target; the EOS closing conversation 0 feeds conversation 1.
    assert out["target_tokens"][conv0[-1]] == pre.tokenizer.eos_id == out["input_tokens"][conv1[0]]
    weighted = Preprocessor(pre.tokenizer, pre.image_config, root_subsegment_weighting=True)(ex)
    np.testing.assert_allclose(weighted["loss_masks"], out["loss_masks"] * np.sqrt(0.5), rtol=1e-6)
    rng_out = pre(ex, rng=np.random.default_rng(0))
    assert len(rng_out["input_tokens"]) == len(out["input_tokens"])


def test_inference_matches_processor(pre, image):
    ex = {"id": "q", "style": "demo", "messages": ["Describe it.", "unused answer"], "image": image}
    out = pre(ex, for_inference=True)
    assert (out["target_tokens"] == -1).all() and (out["loss_masks"] == 0).all()
    processed = Processor(pre)("Describe it.", image)
    np.testing.assert_array_equal(out["input_tokens"], processed["input_ids"][0].numpy())
    np.testing.assert_array_equal(out["image_input_idx"], processed["image_input_idx"][0].numpy())


def test_processor_batch_left_pads(pre, image):
    processor = Processor(pre)
    small = Image.fromarray(np.full((30, 30, 3), 200, np.uint8))
    single = [processor("first prompt is longer than the second", image), processor("2nd", small)]
    batch = processor(["first prompt is longer than the second", "2nd"], [image, small])
    S = batch["input_ids"].shape[1]
    for b, one in enumerate(single):
        L, N = one["input_ids"].shape[1], one["images"].shape[1]
        pad = S - L
        assert (batch["input_ids"][b, :pad] == -1).all()
        assert batch["input_ids"][b, pad:].tolist() == one["input_ids"][0].tolist()
        idx = one["image_input_idx"][0]
        assert batch["image_input_idx"][b, :N].tolist() == np.where(idx >= 0, idx + pad, idx).tolist()
        assert (batch["images"][b, N:] == -1).all() and (batch["image_masks"][b, N:] == -1).all()
        assert (batch["image_input_idx"][b, N:] == -1).all()
    text_only = processor(["a", "bbb ccc"])
    assert set(text_only) == {"input_ids"} and (text_only["input_ids"][0, 0] == -1)
    assert processor.decode(processor("hello")["input_ids"][0]) == " User: hello Assistant:"


@pytest.mark.parametrize("crop,margins,tokens,max_crops", [(84, (2, 2), 3, 4), (112, (2, 2), 4, 6), (56, (0, 0), 2, 3)])
@pytest.mark.parametrize("hw", [(20, 30), (90, 150), (200, 41), (64, 64)])
def test_pooled_cells_cover_every_patch_token_once(pre, crop, margins, tokens, max_crops, hw):
    cfg = ImageConfig(crop_size=crop, overlap_margins=margins, tokens_h=tokens, tokens_w=tokens, max_crops=max_crops)
    crops = crop_image(np.zeros((*hw, 3), np.uint8), cfg, pre.tokenizer.image_ids)
    rows, cols = crops.tiling
    assert rows * cols <= max_crops and crops.images.shape == (1 + rows * cols, (crop // 14) ** 2, 588)
    valid = crops.input_idx[crops.input_idx >= 0]
    patch_positions = np.flatnonzero(crops.tokens == pre.tokenizer.image_ids.patch)
    assert sorted(valid.tolist()) == patch_positions.tolist()
    assert (crops.masks[-1] == -1).all() and ((crops.masks[:-1] >= 0) & (crops.masks[:-1] <= 1)).all()
