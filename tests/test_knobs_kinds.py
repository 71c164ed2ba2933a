"""Per-kind top-k (image / text / generated), data-only knobs under torch.compile, and the routing counters."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from molmo_fast import knobs
from molmo_fast.model.molmoe import MolmoE

LAYER_K = [4, 3]  # above the golden K_max of 2: grows the slot count once
CAPS = {"image": [2, 1], "text": 3, "generated": [4, 1]}
EXPECTED = {"image": [2, 1], "text": [3, 3], "generated": [4, 1]}  # min(layer k, kind cap)


@pytest.fixture
def model(golden_dir):
    return MolmoE.from_pretrained(golden_dir / "tiny_model")


@pytest.fixture
def batch(golden_cases):
    """single_image and single_image_b as one right-padded batch: padded ids, a padding crop, -1 indices."""
    cases = ["single_image", "single_image_b"]
    S = max(golden_cases[f"{c}.input_ids"].shape[0] for c in cases)
    N = max(golden_cases[f"{c}.images"].shape[0] for c in cases)
    ids = torch.full((2, S), -1, dtype=torch.long)
    images = torch.full((2, N, 36, 588), -1.0)
    masks = torch.full((2, N, 36), -1.0)
    idx = torch.full((2, N, 9), -1, dtype=torch.long)
    for b, c in enumerate(cases):
        n, s = golden_cases[f"{c}.images"].shape[0], golden_cases[f"{c}.input_ids"].shape[0]
        ids[b, :s] = golden_cases[f"{c}.input_ids"]
        images[b, :n], masks[b, :n] = golden_cases[f"{c}.images"], golden_cases[f"{c}.image_masks"]
        idx[b, :n] = golden_cases[f"{c}.image_input_idx"]
    return ids, images, masks, idx


def expected_kinds(ids, idx) -> list[list[str | None]]:
    """Brute force, position by position: None for padding."""
    kinds = []
    for b in range(ids.shape[0]):
        image_pos = {int(i) for i in idx[b].flatten() if i >= 0}
        kinds.append([None if ids[b, s] == -1 else "image" if s in image_pos else "text" for s in range(ids.shape[1])])
    return kinds


def record_routing(model):
    """Forward hooks keeping each MoE call's expert_idx_TK, per layer."""
    calls = [[] for _ in model.llm.blocks]
    hooks = [block.moe.register_forward_hook(lambda m, a, out, i=i: calls[i].append(out[2]))
             for i, block in enumerate(model.llm.blocks)]
    return calls, hooks


def set_caps(model):
    knobs.set_top_k(model, LAYER_K)
    for kind, k in CAPS.items():
        knobs.set_top_k(model, k, kind)


@torch.no_grad()
def test_per_kind_k_is_exact_on_prompts_and_generated_tokens(model, batch):
    ids, images, masks, idx = batch
    set_caps(model)
    calls, hooks = record_routing(model)
    new = 3
    model.generate(ids, images, masks, idx, max_new_tokens=new, eos_token_id=None)
    for h in hooks:
        h.remove()
    kinds = expected_kinds(ids, idx)
    flat = [k for row in kinds for k in row]
    assert flat.count("image") > 0 and flat.count("text") > 0 and flat.count(None) > 0  # every case is exercised
    for layer, layer_calls in enumerate(calls):
        prefill, *decode = layer_calls
        active = (prefill >= 0).sum(-1).view(ids.shape)
        for b, row in enumerate(kinds):
            for s, kind in enumerate(row):
                if kind is not None:
                    assert active[b, s] == EXPECTED[kind][layer], (layer, b, s, kind)
        assert len(decode) == new - 1
        for step in decode:
            assert ((step >= 0).sum(-1) == EXPECTED["generated"][layer]).all()


@torch.no_grad()
def test_routing_stats_equal_brute_force_count(model, batch):
    ids, images, masks, idx = batch
    set_caps(model)
    knobs.set_routing_policy(model, "top_p:0.6")  # a measured, not a fixed, number of experts per token
    eos = int(model.generate(ids, images, masks, idx, max_new_tokens=2, eos_token_id=None)[0, -1])
    knobs.reset_routing_stats(model)
    calls, hooks = record_routing(model)
    out = model.generate(ids, images, masks, idx, max_new_tokens=4, eos_token_id=eos)  # row 0 stops after 2
    for h in hooks:
        h.remove()
    stats = knobs.routing_stats(model)
    kinds = expected_kinds(ids, idx)
    total = {k: [0, 0] for k in ("image", "text", "generated", "all")}
    for layer, (prefill, *decode) in enumerate(calls):
        count = {k: [0, 0] for k in ("image", "text", "generated")}
        active = (prefill >= 0).sum(-1).view(ids.shape)
        for b, row in enumerate(kinds):
            for s, kind in enumerate(row):
                if kind is not None:
                    count[kind][0] += 1
                    count[kind][1] += int(active[b, s])
        for step, step_idx in enumerate(decode):  # the token fed at step i is new token i; rows past EOS: padding
            for b in range(ids.shape[0]):
                if eos not in out[b, ids.shape[1]:ids.shape[1] + step + 1].tolist():
                    count["generated"][0] += 1
                    count["generated"][1] += int((step_idx[b] >= 0).sum())
        for kind, (tokens, pairs) in count.items():
            got = stats["layers"][layer][kind]
            assert (got["tokens"], got["pairs"]) == (tokens, pairs), (layer, kind)
            assert got["mean_k"] == (pairs / tokens if tokens else 0)
            total[kind][0] += tokens
            total[kind][1] += pairs
            total["all"][0] += tokens
            total["all"][1] += pairs
    assert {k: [v["tokens"], v["pairs"]] for k, v in stats["total"].items()} == total
    assert 0 < stats["total"]["text"]["mean_k"] < 3  # top_p really dropped experts below the cap
    # 3 decode steps x 2 rows x 2 layers, less row 0's after its EOS (its 2nd new token)
    assert stats["total"]["generated"]["tokens"] == 2 * (2 + 1 + 1)


def test_mean_k_is_k_under_topk_and_kinds_without_tokens(model):
    knobs.set_top_k(model, 1, "text")
    knobs.reset_routing_stats(model)
    with torch.no_grad():
        model(torch.tensor([[999, 5, 17, 300, -1]]))
    stats = knobs.routing_stats(model)
    assert stats["total"]["text"] == {"tokens": 8, "pairs": 8, "mean_k": 1.0}
    assert stats["total"]["image"] == {"tokens": 0, "pairs": 0, "mean_k": 0}
    assert stats["layers"][1]["generated"]["mean_k"] == 0
    knobs.reset_routing_stats(model)
    assert knobs.routing_stats(model)["total"]["all"]["tokens"] == 0


def test_knob_values_never_recompile(model, batch):
    """Layer k, per-layer k, per-kind caps and the top_p value are data: one compile; only a new policy name
    (topk -> top_p) retraces."""
    ids, images, masks, idx = batch
    torch._dynamo.reset()
    counter = CompileCounter()
    llm = torch.compile(model.llm, backend=counter, fullgraph=True)
    with torch.no_grad():
        feats = model.encode_images(images, masks)[1].flatten(1, 2)
        flat_idx = idx.flatten(1)
        knobs.set_top_k(model, 4)  # the one shape change (K_max 2 -> 4), before compiling

        def check():
            torch.testing.assert_close(llm(ids, feats, flat_idx).logits, model.llm(ids, feats, flat_idx).logits)

        check()
        for change in (lambda: knobs.set_top_k(model, 2), lambda: knobs.set_top_k(model, [3, 1]),
                       lambda: knobs.set_top_k(model, 1, "image"), lambda: knobs.set_top_k(model, [2, 1], "text"),
                       lambda: knobs.set_top_k(model, 1, "generated")):
            change()
            check()
        assert counter.frame_count == 1
        knobs.set_routing_policy(model, "top_p:0.5")
        check()
        assert counter.frame_count == 2
        for p in (0.7, 0.9, 0.3):
            knobs.set_routing_policy(model, f"top_p:{p}")
            check()
        assert counter.frame_count == 2
    torch._dynamo.reset()


def test_kind_knob_strings_and_describe(model):
    parsed = knobs.Knobs.parse(["top_k_image=1", "top_k_generated=2,1", "routing=threshold:0.1"])
    assert parsed == knobs.Knobs(top_k_image=1, top_k_generated=[2, 1], routing="threshold:0.1")
    parsed.apply(model)
    info = knobs.describe(model)
    assert info["moe_top_k_image"] == [1, 1] and info["moe_top_k_generated"] == [2, 1]
    assert info["moe_top_k_text"] == [None, None]
    assert info["moe_routing"] == ["threshold"] * 2 and info["moe_threshold"] == [0.1, 0.1]
    assert info["moe_top_p"] == [None, None]
    with pytest.raises(ValueError, match="top_k_image"):
        knobs.Knobs.parse(["top_k_image=0"]).apply(model)
    with pytest.raises(ValueError, match="kind"):
        knobs.set_top_k(model, 1, "audio")
    with pytest.raises(ValueError, match="routing"):
        knobs.Knobs.parse(["routing=top_p:2"])
