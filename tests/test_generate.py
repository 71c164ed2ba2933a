import json
import re

import pytest
import torch

from molmo_fast import generate as generate_cli
from molmo_fast.model.molmoe import MolmoE


def image_inputs(cases, case):
    return [cases[f"{case}.{k}"][None] for k in ("images", "image_masks", "image_input_idx")]


def test_golden_generation(golden_model, golden_cases, golden_dir):
    meta = json.loads((golden_dir / "cases.json").read_text())["generation"]
    prompt = golden_cases["generation.input_ids"][None]
    ids, step_logits = golden_model.generate(prompt, *image_inputs(golden_cases, meta["prompt_case"]),
                                      max_new_tokens=meta["max_new_tokens"], eos_token_id=meta["eos_token_id"],
                                      output_logits=True)
    assert ids.shape == (1, prompt.shape[1] + meta["max_new_tokens"])
    assert torch.equal(ids[0, : prompt.shape[1]], prompt[0])
    assert torch.equal(ids[0, prompt.shape[1]:], golden_cases["generation.new_tokens"])
    torch.testing.assert_close(step_logits[0], golden_cases["generation.step_logits"], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def full_recompute_greedy(model, ids, images, masks, idx, n):
    for _ in range(n):
        logits = model(ids, images, masks, idx).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_kv_cache_equals_full_recompute(golden_model, golden_cases):
    prompt = golden_cases["two_images.input_ids"][None]
    images = image_inputs(golden_cases, "two_images")
    cached = golden_model.generate(prompt, *images, max_new_tokens=10)
    assert torch.equal(cached, full_recompute_greedy(golden_model, prompt, *images, 10))


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_of_different_lengths_equals_single(golden_model, golden_cases, side):
    rows = [("single_image", golden_cases["single_image.input_ids"]),
            ("single_image_b", golden_cases["single_image_b.input_ids"])]
    S = max(len(r) for _, r in rows)
    ids = torch.full((2, S), -1, dtype=torch.int64)
    N = max(golden_cases[f"{c}.images"].shape[0] for c, _ in rows)
    images = torch.full((2, N, *golden_cases["single_image.images"].shape[1:]), -1.0)
    masks = torch.full((2, N, golden_cases["single_image.image_masks"].shape[1]), -1.0)
    idx = torch.full((2, N, golden_cases["single_image.image_input_idx"].shape[1]), -1, dtype=torch.int32)
    for b, (case, row) in enumerate(rows):
        pad = S - len(row) if side == "left" else 0
        ids[b, pad: pad + len(row)] = row
        n = golden_cases[f"{case}.images"].shape[0]
        images[b, :n], masks[b, :n] = golden_cases[f"{case}.images"], golden_cases[f"{case}.image_masks"]
        row_idx = golden_cases[f"{case}.image_input_idx"]
        idx[b, :n] = torch.where(row_idx >= 0, row_idx + pad, row_idx)
    batched = golden_model.generate(ids, images, masks, idx, max_new_tokens=6)
    for b, (case, row) in enumerate(rows):
        alone = golden_model.generate(row[None], *image_inputs(golden_cases, case), max_new_tokens=6)
        assert torch.equal(batched[b, S:], alone[0, len(row):])


def test_eos_stops_rows_and_pads(golden_model, golden_cases):
    prompts = torch.stack([golden_cases["text_only.input_ids"], golden_cases["text_only.input_ids"].flip(0)])
    free = golden_model.generate(prompts, max_new_tokens=8)
    eos = int(free[0, prompts.shape[1] + 1])  # row 0 emits this as its 2nd new token
    pad = golden_model.generation_config["pad_token_id"]
    out = golden_model.generate(prompts, max_new_tokens=8, eos_token_id=eos)
    new0 = out[0, prompts.shape[1]:]
    assert new0[1] == eos and (new0[2:] == pad).all()
    row1 = free[1, prompts.shape[1]:]
    hits = (row1 == eos).nonzero()
    stop = int(hits[0]) + 1 if len(hits) else len(row1)
    assert torch.equal(out[1, prompts.shape[1]: prompts.shape[1] + stop], row1[:stop])
    # Both rows finished -> generation stops early, like HF generate.
    both = golden_model.generate(prompts[:1], max_new_tokens=8, eos_token_id=eos)
    assert both.shape[1] == prompts.shape[1] + 2


def test_bad_lengths_are_refused_before_running(golden_model, golden_cases, monkeypatch):
    prompt = golden_cases["text_only.input_ids"][None]
    monkeypatch.setattr(golden_model.config.llm, "max_sequence_length", prompt.shape[1] + 4)  # a small context
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=re.escape(f"max_new_tokens = {bad!r}, expected an int >= 0")):
            golden_model.generate(prompt, max_new_tokens=bad)
    limit = golden_model.config.llm.max_sequence_length
    long = torch.full((1, limit), 5)
    with pytest.raises(ValueError, match=f"a prompt of {limit} tokens \\+ max_new_tokens 1 = {limit + 1} tokens "
                                         f"exceeds the model's max_sequence_length {limit}"):
        golden_model.generate(long, max_new_tokens=1)
    # left padding does not count: a short prompt padded past the limit still runs
    padded = torch.cat([torch.full((1, limit), -1), prompt], dim=1)
    assert golden_model.generate(padded, max_new_tokens=1).shape == (1, limit + prompt.shape[1] + 1)


def test_cli_answers(golden_dir, capsys):
    answer = generate_cli.main(["--checkpoint", str(golden_dir / "tiny_model"), "--image",
                                str(golden_dir / "images" / "tiny_single_image_0_60x100.png"),
                                "--prompt", "What is this?", "--max_new_tokens", "5", "--top_k", "1"])
    assert isinstance(answer, str) and answer
    assert capsys.readouterr().out.strip() == answer


def test_gqa_model_kv_cache(tmp_path):
    from molmo_fast.config import MolmoEConfig

    d = MolmoEConfig.from_name("tiny").to_hf_dict()
    d["n_kv_heads"] = 2
    cfg = MolmoEConfig.from_hf_dict(d)
    model = MolmoE.from_config_on_meta(cfg).init_weights(seed=5).eval()
    kv_dim = 2 * cfg.llm.head_dim
    assert model.llm.blocks[0].attn.qkv.weight.shape == (cfg.llm.d_model + 2 * kv_dim, cfg.llm.d_model)
    prompt = torch.tensor([[999, 17, 400, 23, 1003, 1100, 8]])
    out = model.generate(prompt, max_new_tokens=6)
    assert torch.equal(out, full_recompute_greedy(model, prompt, None, None, None, 6))
    model.save_pretrained(tmp_path)
    again = MolmoE.from_pretrained(tmp_path)
    assert again.config.llm.n_kv_heads == 2 and torch.equal(again.generate(prompt, max_new_tokens=6), out)


@torch.no_grad()
def test_incremental_forward_with_growing_cache(golden_model, golden_cases):
    ids = golden_cases["single_image.input_ids"][None]
    images = image_inputs(golden_cases, "single_image")
    full = golden_model(ids, *images).logits
    split = int(images[2].max()) + 1  # prefill covers every image token, then decode the text one by one
    assert split < ids.shape[1] - 3
    out = golden_model(ids[:, :split], *images, use_cache=True)
    cache = out.past_key_values
    assert cache.length == split
    steps = [out.logits]
    for t in range(split, ids.shape[1]):  # the cache grows past its initial capacity here
        steps.append(golden_model(ids[:, t: t + 1], position_ids=torch.tensor([[t]]), past_key_values=cache,
                           use_cache=True).logits)
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_prefill_takes_the_causal_fast_path_unless_left_padded(golden_model, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append(is_causal and attn_mask is None)
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    prompt = torch.tensor([[999, 17, 400, 23, 8], [999, 5, 6, -1, -1]])
    right = golden_model.generate(prompt, max_new_tokens=2)
    assert sum(calls) == golden_model.config.llm.n_layers  # prefill only; decode steps need the padding mask
    calls.clear()
    left = golden_model.generate(torch.tensor([[999, 17, 400, 23, 8], [-1, -1, 999, 5, 6]]), max_new_tokens=2)
    assert sum(calls) == 0
    assert torch.equal(left[:, -2:], right[:, -2:])


def _synced_rank(rank, init_file, checkpoint, prompts, eos, steps, results):
    """One gloo rank: generate its own prompt with sync_ranks and report its output (spawned by the test below)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = MolmoE.from_pretrained(checkpoint).generate(prompts[rank:rank + 1], max_new_tokens=steps,
                                                          eos_token_id=eos, sync_ranks=True)
        results[rank] = out[0].tolist()
    finally:
        dist.destroy_process_group()


def test_sync_ranks_stops_all_ranks_on_the_same_step(golden_model, golden_cases, golden_dir, tmp_path):
    prompts = torch.stack([golden_cases["text_only.input_ids"], golden_cases["text_only.input_ids"].flip(0)])
    steps, S = 6, prompts.shape[1]
    free = golden_model.generate(prompts, max_new_tokens=steps)
    eos = next(t for t in free[0, S:].tolist() if t not in free[1, S:].tolist())  # row 0 finishes, row 1 never
    pad = golden_model.generation_config["pad_token_id"]
    alone = golden_model.generate(prompts[:1], max_new_tokens=steps, eos_token_id=eos)
    assert alone.shape[1] < S + steps  # unsynced, rank 0 alone would stop early
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_synced_rank, args=(str(tmp_path / "init"), str(golden_dir / "tiny_model"),
                                                    prompts, eos, steps, results), nprocs=2)
    rank0, rank1 = (torch.tensor(results[r]) for r in range(2))
    assert len(rank0) == len(rank1) == S + steps  # rank 0 kept stepping (emitting pad) until rank 1 was done
    n0 = alone.shape[1]
    assert torch.equal(rank0[:n0], alone[0]) and (rank0[n0:] == pad).all()
    assert torch.equal(rank1, free[1])
    with pytest.raises(ValueError, match="process group"):
        golden_model.generate(prompts, max_new_tokens=2, sync_ranks=True)
