"""molmo_fast.latency: every stage timed on the real generate path, hooks and EOS restored afterwards."""

import pytest
import torch

from molmo_fast.latency import measure_stages


def test_stages_of_an_image_batch(golden_model, golden_cases):
    c = golden_cases
    batch = {"input_ids": c["single_image.input_ids"][None], "images": c["single_image.images"][None],
             "image_masks": c["single_image.image_masks"][None],
             "image_input_idx": c["single_image.image_input_idx"][None]}
    eos = golden_model.generation_config["eos_token_id"]
    r = measure_stages(golden_model, batch, new_tokens=3, repeats=2)
    assert r["vision"] > 0 and r["connector"] > 0 and r["prefill"] > 0 and r["decode_per_token"] > 0
    # the stages are disjoint parts of one generate call (decode steps after the prefill's LLM call)
    assert r["vision"] + r["connector"] + r["prefill"] + 2 * r["decode_per_token"] <= r["total"] * 1.0001
    assert r["per_example"] == r["total"] and r["repeats"] == 2 and r["new_tokens"] == 3
    assert r["peak_memory_mb"] > 0 and r["peak_memory_kind"] == "process_rss"
    assert golden_model.generation_config["eos_token_id"] == eos
    for module in (golden_model.vit, golden_model.connector, golden_model.llm):
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_text_batch_has_no_vision_and_single_token_no_decode(golden_model, golden_cases):
    ids = golden_cases["text_batch_leftpad.input_ids"]
    r = measure_stages(golden_model, {"input_ids": ids}, new_tokens=1, repeats=1, warmup=0)
    assert r["vision"] == 0 and r["connector"] == 0 and r["decode_per_token"] is None
    assert r["per_example"] == pytest.approx(r["total"] / 2)
    with pytest.raises(ValueError, match="repeats"):
        measure_stages(golden_model, {"input_ids": torch.tensor([[5]])}, repeats=0)
