"""Training-mode forward: the right-padded causal fast path and Molmo's dropouts."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from molmo_fast.config import DropoutConfig
from molmo_fast.model.molmoe import MolmoE


@pytest.fixture(scope="module")
def golden(golden_dir):
    return MolmoE.from_pretrained(golden_dir / "tiny_model")


@pytest.fixture(scope="module")
def batch(golden_dir):
    """Two image prompts of different lengths, right-padded with -1 (as the collator pads)."""
    cases = load_file(golden_dir / "cases.safetensors")
    names = ("single_image", "single_image_b")
    S = max(len(cases[f"{c}.input_ids"]) for c in names)
    N = max(cases[f"{c}.images"].shape[0] for c in names)
    ids = torch.full((2, S), -1, dtype=torch.int64)
    images = torch.full((2, N, *cases["single_image.images"].shape[1:]), -1.0)
    masks = torch.full((2, N, cases["single_image.image_masks"].shape[1]), -1.0)
    idx = torch.full((2, N, cases["single_image.image_input_idx"].shape[1]), -1, dtype=torch.int64)
    for b, c in enumerate(names):
        n, L = cases[f"{c}.images"].shape[0], len(cases[f"{c}.input_ids"])
        ids[b, :L] = cases[f"{c}.input_ids"]
        images[b, :n], masks[b, :n], idx[b, :n] = (cases[f"{c}.images"], cases[f"{c}.image_masks"],
                                                   cases[f"{c}.image_input_idx"])
    return dict(input_ids=ids, images=images, image_masks=masks, image_input_idx=idx)


def with_dropout(model: MolmoE, **rates) -> MolmoE:
    copy = MolmoE(dataclasses.replace(model.config, dropout=DropoutConfig(**rates)))
    copy.load_state_dict(model.state_dict())
    return copy


@torch.no_grad()
def test_right_padded_fast_path_is_causal_sdpa_and_exact(golden, batch, monkeypatch):
    masked = golden(**batch, output_router_logits=True)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    fast = golden(**batch, right_padded=True, output_router_logits=True)
    n_layers = golden.config.llm.n_layers
    assert calls.count((True, True)) == n_layers  # the LLM layers ran mask-free causal attention
    valid = batch["input_ids"] != -1
    torch.testing.assert_close(fast.logits[valid], masked.logits[valid], atol=1e-5, rtol=1e-5)
    for ours, ref in zip(fast.router_logits, masked.router_logits):
        torch.testing.assert_close(ours[valid.flatten()], ref[valid.flatten()], atol=1e-5, rtol=1e-5)

    calls.clear()  # subsegments (packed conversations) still need the mask
    golden(batch["input_ids"], subsegment_ids=torch.zeros_like(batch["input_ids"]), right_padded=True)
    assert (True, True) not in calls


@torch.no_grad()
def test_right_padded_prefill_then_decode_matches(golden, batch):
    ids = batch["input_ids"][:1, : int((batch["input_ids"][0] != -1).sum())]
    kw = {k: v[:1] for k, v in batch.items() if k != "input_ids"}
    ref = golden.generate(ids, **kw, max_new_tokens=4)
    cache_out = golden(ids, **kw, use_cache=True, right_padded=True)
    full = golden(ids, **kw)
    torch.testing.assert_close(cache_out.logits, full.logits, atol=1e-5, rtol=1e-5)
    token = cache_out.logits[:, -1].argmax(-1, keepdim=True)
    step = golden(token, position_ids=torch.tensor([[ids.shape[1]]]), past_key_values=cache_out.past_key_values,
                  use_cache=True, right_padded=True)  # ignored with a filled cache
    assert torch.equal(torch.cat([token, step.logits[:, -1].argmax(-1, keepdim=True)], 1), ref[:, -4:-2])


def test_dropout_train_stochastic_eval_deterministic(golden, batch):
    model = with_dropout(golden, residual=0.1)
    assert model.config.dropout.residual == golden.config.dropout.residual == 0.1  # the release's rate
    with torch.no_grad():
        ref = golden(**batch).logits
        model.eval()
        torch.testing.assert_close(model(**batch).logits, ref, atol=0, rtol=0)
        model.train()
        a, b = model(**batch).logits, model(**batch).logits
        torch.manual_seed(3)
        c = model(**batch).logits
        torch.manual_seed(3)
        d = model(**batch).logits
    valid = batch["input_ids"] != -1
    assert (a - b)[valid].abs().max() > 1e-3 and (a - ref)[valid].abs().max() > 1e-3
    assert torch.equal(c, d)


@pytest.mark.parametrize("site", ["attention", "embedding", "image_feature"])
@torch.no_grad()
def test_each_dropout_site_is_wired(golden, batch, site):
    off = with_dropout(golden).train()(**batch).logits  # train mode, all rates 0: same as eval
    torch.testing.assert_close(off, golden(**batch).logits, atol=1e-5, rtol=1e-5)
    on = with_dropout(golden, **{site: 0.5}).train()(**batch).logits
    valid = batch["input_ids"] != -1
    assert (on - off)[valid].abs().max() > 1e-3


@torch.no_grad()
def test_response_residual_dropout_only_at_response_tokens(golden, batch):
    ids = batch["input_ids"][:1]
    first_response = 20
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, first_response:] = True
    model = with_dropout(golden, response_residual=0.5).train()
    ref = with_dropout(golden).train()(ids).logits
    out = model(ids, response_mask=response).logits
    # Causal: positions before the first response token never see a dropped activation.
    torch.testing.assert_close(out[:, :first_response], ref[:, :first_response], atol=1e-5, rtol=1e-5)
    assert (out[:, first_response:] - ref[:, first_response:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="response_mask"):
        model(ids)


def test_residual_dropout_rates_per_region():
    from molmo_fast.model.dropout import ResidualDropout

    drop = ResidualDropout(0.1, response_p=0.5).train()
    x = torch.ones(4, 1000, 32, dtype=torch.bfloat16)
    response = torch.zeros(4, 1000, dtype=torch.bool)
    response[:, 500:] = True
    torch.manual_seed(0)
    y = drop(x, response).float()
    assert abs((y[:, :500] == 0).float().mean().item() - 0.1) < 0.01
    assert abs((y[:, 500:] == 0).float().mean().item() - 0.5) < 0.01
    assert abs(y.mean().item() - 1.0) < 0.02  # inverted dropout keeps the expectation
    assert torch.equal(drop.eval()(x, response), x)
    assert torch.equal(ResidualDropout(0.0).train()(x), x)


@pytest.mark.gpu
@torch.no_grad()
def test_right_padded_runs_on_the_flash_kernel(golden_dir, batch):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = MolmoE.from_pretrained(golden_dir / "tiny_model", dtype=torch.bfloat16, device="cuda")
    cuda = {k: v.cuda() for k, v in batch.items()}
    masked = model(**cuda).logits.float()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # a masked call has no kernel here and would raise
        fast = model(**cuda, right_padded=True).logits.float()
    valid = cuda["input_ids"] != -1
    err = (fast - masked)[valid].abs().mean()
    assert err < 0.05 * masked[valid].abs().mean(), err
