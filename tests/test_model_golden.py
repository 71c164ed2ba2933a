"""Reproduce the reference MolmoE numbers on the golden tiny model through the public API."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from molmo_fast.config import DropoutConfig
from molmo_fast.model.moe import route
from molmo_fast.model.molmoe import MolmoE

ATOL = 1e-4


def pytest_generate_tests(metafunc):
    from conftest import GOLDEN

    names = json.loads((GOLDEN / "cases.json").read_text())["cases"]
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", names)
    if "image_case" in metafunc.fixturenames:
        with safe_open(GOLDEN / "cases.safetensors", framework="pt") as f:
            keys = set(f.keys())
        metafunc.parametrize("image_case", [c for c in names if f"{c}.images" in keys])


def inputs(cases, case, idx_dtype=torch.int64):
    ids = cases[f"{case}.input_ids"]
    batched = ids.dim() == 2
    kw = {}
    if f"{case}.images" in cases:
        kw = dict(images=cases[f"{case}.images"], image_masks=cases[f"{case}.image_masks"],
                  image_input_idx=cases[f"{case}.image_input_idx"].to(idx_dtype))
    if not batched:
        ids = ids[None]
        kw = {k: v[None] for k, v in kw.items()}
    return ids, kw


@torch.no_grad()
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_logits_and_router(golden_model, golden_cases, case, idx_dtype):
    ids, kw = inputs(golden_cases, case, idx_dtype)
    out = golden_model(input_ids=ids, output_router_logits=True, **kw)
    ref = golden_cases[f"{case}.logits"].reshape(out.logits.shape)
    valid = ids != -1
    assert out.logits.shape[-1] == golden_model.config.llm.embedding_size
    assert (out.logits - ref)[valid].abs().max() < ATOL
    valid_T = valid.reshape(-1)
    k = golden_model.config.moe.top_k
    for layer, logits_TE in enumerate(out.router_logits):
        torch.testing.assert_close(logits_TE[valid_T], golden_cases[f"{case}.router_logits"][layer][valid_T],
                                   atol=ATOL, rtol=ATOL)
        idx, weight = route(logits_TE, k, k)
        ref_idx = golden_cases[f"{case}.router_topk_idx"][layer][valid_T]
        ref_w = golden_cases[f"{case}.router_topk_weight"][layer][valid_T]
        assert torch.equal(idx[valid_T].sort(-1).values, ref_idx.sort(-1).values)
        torch.testing.assert_close(weight[valid_T], ref_w, atol=ATOL, rtol=ATOL)


@torch.no_grad()
def test_vision_features(golden_model, golden_cases, image_case):
    case = image_case
    _, kw = inputs(golden_cases, case)
    vit_features, image_features = golden_model.encode_images(kw["images"], kw["image_masks"])
    torch.testing.assert_close(vit_features[0], golden_cases[f"{case}.vit_features"], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(image_features[0], golden_cases[f"{case}.image_features"], atol=ATOL, rtol=ATOL)
    out = golden_model(input_ids=inputs(golden_cases, case)[0], **kw)
    torch.testing.assert_close(out.image_features, image_features)


@torch.no_grad()
def test_images_matter(golden_model, golden_cases):
    ids, kw = inputs(golden_cases, "single_image")
    base = golden_model(ids, **kw).logits
    constant_images = kw["images"] * 0 + 0.5
    constant_logits = golden_model(ids, constant_images, kw["image_masks"], kw["image_input_idx"]).logits
    assert (constant_logits - base).abs().max() > 0.1
    assert (golden_model(ids, kw["images"], torch.ones_like(kw["image_masks"]), kw["image_input_idx"]).logits
            - base).abs().max() > 0.1


@torch.no_grad()
def test_batch_with_padded_crops(golden_model, golden_cases):
    """Two image prompts in one batch: right-padded ids (-1) and crops padded with -1 (zeroed after the ViT)."""
    rows = [inputs(golden_cases, c) for c in ("single_image", "single_image_b")]
    S = max(r[0].shape[1] for r in rows)
    N = max(r[1]["images"].shape[1] for r in rows)
    ids = torch.full((2, S), -1, dtype=torch.int64)
    images = torch.full((2, N, *rows[0][1]["images"].shape[2:]), -1.0)
    masks = torch.full((2, N, rows[0][1]["image_masks"].shape[2]), -1.0)
    idx = torch.full((2, N, rows[0][1]["image_input_idx"].shape[2]), -1, dtype=torch.int64)
    for b, (row_ids, kw) in enumerate(rows):
        ids[b, : row_ids.shape[1]] = row_ids[0]
        n = kw["images"].shape[1]
        images[b, :n], masks[b, :n], idx[b, :n] = kw["images"][0], kw["image_masks"][0], kw["image_input_idx"][0]
    out = golden_model(ids, images, masks, idx)  # eval: the ViT skips the padding crop
    for b, case in enumerate(("single_image", "single_image_b")):
        L = rows[b][0].shape[1]
        assert (out.logits[b, :L] - golden_cases[f"{case}.logits"]).abs().max() < ATOL
    # Training mode (dropout off to compare): static shapes, every crop through the ViT, padding zeroed afterwards.
    no_dropout = MolmoE(dataclasses.replace(golden_model.config, dropout=DropoutConfig()))
    no_dropout.load_state_dict(golden_model.state_dict())
    trained = no_dropout.train()(ids, images, masks, idx)
    torch.testing.assert_close(trained.image_features, out.image_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trained.logits, out.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@torch.no_grad()
def test_golden_on_cuda(golden_dir, golden_cases):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = MolmoE.from_pretrained(golden_dir / "tiny_model", device="cuda")
    for case in ("single_image", "two_images"):
        ids, kw = inputs(golden_cases, case)
        out = model(ids.cuda(), **{k: v.cuda() for k, v in kw.items()})
        assert (out.logits.cpu() - golden_cases[f"{case}.logits"]).abs().max() < 1e-3
    ids, kw = inputs(golden_cases, "single_image")
    new = golden_cases["generation.new_tokens"]
    gen = model.generate(ids.cuda(), **{k: v.cuda() for k, v in kw.items()}, max_new_tokens=len(new))
    assert torch.equal(gen[0, ids.shape[1]:].cpu(), new)
    bf16 = MolmoE.from_pretrained(golden_dir / "tiny_model", dtype=torch.bfloat16, device="cuda")
    logits = bf16(ids.cuda(), **{k: v.cuda() for k, v in kw.items()}).logits.float().cpu()
    ref = golden_cases["single_image.logits"]
    assert torch.isfinite(logits).all() and (logits[0] - ref).abs().mean() < 0.1 * ref.abs().mean()


@torch.no_grad()
def test_subsegments_isolate_packed_conversations(golden_model):
    """A shared prefix (highest subsegment id) followed by two conversations: each conversation sees the prefix
    and itself only, exactly as if run alone after the prefix."""
    prefix, conv_a, conv_b = torch.tensor([999, 1000, 1002, 1001]), torch.tensor([5, 6, 7]), torch.tensor([8, 9])
    packed = torch.cat([prefix, conv_a, conv_b])[None]
    subseg = torch.tensor([10000] * 4 + [0] * 3 + [1] * 2)[None]
    n = len(prefix)
    positions = torch.cat([torch.arange(n + 3), torch.arange(n, n + 2)])[None]
    out = golden_model(packed, position_ids=positions, subsegment_ids=subseg).logits
    alone_a = golden_model(torch.cat([prefix, conv_a])[None]).logits
    alone_b = golden_model(torch.cat([prefix, conv_b])[None]).logits
    torch.testing.assert_close(out[:, : n + 3], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, n + 3:], alone_b[:, n:], atol=1e-5, rtol=1e-5)
    assert (golden_model(packed, position_ids=positions).logits[:, n + 3:] - alone_b[:, n:]).abs().max() > 1e-3
