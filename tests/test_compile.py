"""Whole-model torch.compile and compiled generation on the golden tiny model.

Graph-break, equality and recompile tests compile with dynamo backends that skip code generation ("aot_eager",
which still functionalises the in-place cache writes, or a counting backend); one test compiles with inductor
(C++ on CPU, about a minute) for the numerics. Recompiles are counted by the backend that is handed every graph.
"""

import json

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from molmo_fast import knobs
from molmo_fast.model.compiled_generate import bucket


def _image_inputs(cases, case):
    return {k: cases[f"{case}.{k}"][None] for k in ("images", "image_masks", "image_input_idx")}


class GraphRecorder(CompileCounter):
    """Counts graphs like CompileCounter and keeps them, to inspect what was captured."""

    def __init__(self):
        super().__init__()
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return super().__call__(gm, example_inputs)


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def model(golden_model):
    """The shared golden model, its knobs restored afterwards."""
    yield golden_model
    knobs.set_top_k(golden_model, golden_model.config.moe.top_k)
    knobs.set_skip_blocks(golden_model, [])
    knobs.set_routing_policy(golden_model, "topk_renorm" if golden_model.config.moe.normalize_weights else "topk")


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 2, 3, 5, 7, 13, 17, 25, 33, 49, 65, 100)] == [1, 2, 3, 6, 8, 16, 24, 32, 48,
                                                                                   64, 96, 128]
    assert bucket(13, cap=13) == 13 and bucket(14, cap=13) == 16 and bucket(5, cap=13) == 6


@torch.no_grad()
@pytest.mark.parametrize("case", ["text_only", "single_image", "two_images"])
def test_forward_fullgraph_matches_golden(model, golden_cases, case):
    rec = GraphRecorder()
    compiled = torch.compile(model, fullgraph=True, backend=rec)
    ids = golden_cases[f"{case}.input_ids"][None]
    kw = _image_inputs(golden_cases, case) if f"{case}.images" in golden_cases else {}
    logits = compiled(ids, **kw).logits
    assert rec.frame_count == 1
    # No data-dependent shapes (the eager image path's nonzero over real crops would be one): a host sync and
    # the end of CUDA graph capture.
    assert not [n for n in rec.graphs[0].graph.nodes if free_unbacked_symbols(n.meta.get("example_value"))]
    assert (logits[0] - golden_cases[f"{case}.logits"]).abs().max() < 1e-4


@torch.no_grad()
def test_inductor_forward_matches_eager(model, golden_cases):
    ids = golden_cases["text_only.input_ids"][None]
    compiled = torch.compile(model, fullgraph=True)
    logits = compiled(ids).logits
    assert (logits[0] - golden_cases["text_only.logits"]).abs().max() < 1e-4
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_compiled_generation_equals_eager_golden(model, golden_cases, golden_dir):
    meta = json.loads((golden_dir / "cases.json").read_text())["generation"]
    prompt = golden_cases["generation.input_ids"][None]
    kw = dict(_image_inputs(golden_cases, meta["prompt_case"]), max_new_tokens=meta["max_new_tokens"],
              eos_token_id=meta["eos_token_id"], output_logits=True)
    ids, step_logits = model.generate(prompt, **kw, compile="aot_eager")
    assert torch.equal(ids[0, prompt.shape[1]:], golden_cases["generation.new_tokens"])
    torch.testing.assert_close(step_logits[0], golden_cases["generation.step_logits"], atol=1e-4, rtol=1e-4)
    eager_ids, eager_logits = model.generate(prompt, **kw)
    assert torch.equal(ids, eager_ids)
    torch.testing.assert_close(step_logits, eager_logits, atol=1e-5, rtol=1e-5)


def test_compiled_generation_batched_and_eos(model, golden_cases):
    prompts = golden_cases["text_batch_leftpad.input_ids"]
    free = model.generate(prompts, max_new_tokens=12)
    assert torch.equal(model.generate(prompts, max_new_tokens=12, compile="aot_eager"), free)
    # An EOS that stops row 0 early (its 2nd token) and row 1 wherever it first appears, if at all: the compiled
    # loop checks only every STOP_CHECK_EVERY steps but must return exactly the eager ids (pads, trimmed length).
    eos = int(free[0, prompts.shape[1] + 1])
    for n in (3, 12, 20):
        eager = model.generate(prompts, max_new_tokens=n, eos_token_id=eos)
        assert torch.equal(model.generate(prompts, max_new_tokens=n, eos_token_id=eos, compile="aot_eager"), eager)
    both = model.generate(prompts[:1], max_new_tokens=20, eos_token_id=eos, compile="aot_eager")
    assert both.shape[1] == prompts.shape[1] + 2


def test_no_recompiles_across_knobs_and_prompts_in_a_bucket(model, golden_cases):
    counter = CompileCounter()
    image_prompt = golden_cases["single_image.input_ids"][None]
    images = _image_inputs(golden_cases, "single_image")

    def run(**kw):
        return model.generate(image_prompt, **images, max_new_tokens=6, compile=counter, **kw)

    knobs.set_skip_blocks(model, [1])
    run()
    knobs.set_skip_blocks(model, [])
    run()  # two skip sets compiled: prefill + decode each
    warm = counter.frame_count
    assert warm == 4
    states = dict(model.decode_states)
    ptrs = [t.data_ptr() for s in states.values() for t in (*s.cache.keys, *s.cache.values, s.tokens_BC)]

    outputs = {}
    for k in (1, 2):
        knobs.set_top_k(model, k)
        outputs[k] = run()
        outputs[k, "call"] = run(top_k=3 - k)
    knobs.set_top_k(model, [1, 2])
    per_layer = run()
    knobs.set_top_k(model, 2)
    knobs.set_skip_blocks(model, [1])
    skipped = run()
    knobs.set_skip_blocks(model, [])
    # A different prompt in the same (batch, length, crops) bucket: shorter, other text tokens, other pixels.
    text = golden_cases["text_only.input_ids"][None]
    other = torch.cat([image_prompt[:, :-4], text[:, 3:5]], dim=1)
    other_images = dict(images, images=images["images"].flip(-1))
    assert bucket(other.shape[1]) == bucket(image_prompt.shape[1]) and images["image_input_idx"].max() < 38
    other_out = model.generate(other, **other_images, max_new_tokens=6, compile=counter)
    assert counter.frame_count == warm, "a knob or prompt change inside a bucket recompiled"
    assert model.decode_states.keys() == states.keys()
    assert ptrs == [t.data_ptr() for s in model.decode_states.values()
                    for t in (*s.cache.keys, *s.cache.values, s.tokens_BC)], "the static cache was reallocated"

    # The runs did use the knobs: each equals the eager path under the same setting.
    knobs.set_top_k(model, 1)
    assert torch.equal(outputs[1], model.generate(image_prompt, **images, max_new_tokens=6))
    assert torch.equal(outputs[1, "call"], model.generate(image_prompt, **images, max_new_tokens=6, top_k=2))
    knobs.set_top_k(model, [1, 2])
    assert torch.equal(per_layer, model.generate(image_prompt, **images, max_new_tokens=6))
    knobs.set_top_k(model, 2)
    knobs.set_skip_blocks(model, [1])
    assert torch.equal(skipped, model.generate(image_prompt, **images, max_new_tokens=6))
    knobs.set_skip_blocks(model, [])
    assert torch.equal(other_out, model.generate(other, **other_images, max_new_tokens=6))
    assert not torch.equal(outputs[1], outputs[2])  # the knob changed the tokens, through the same graph

    # A routing kind is a mode switch: one new graph per compiled function, not more.
    kind = model.llm.blocks[0].moe.policy.kind
    knobs.set_routing_policy(model, "topk" if kind == "topk_renorm" else "topk_renorm")
    run()
    assert counter.frame_count == warm + 2


def test_compiled_generate_cli(golden_dir, capsys):
    from molmo_fast import generate as generate_cli

    argv = ["--checkpoint", str(golden_dir / "tiny_model"), "--image",
            str(golden_dir / "images" / "tiny_single_image_0_60x100.png"), "--prompt", "What is this?",
            "--max_new_tokens", "5"]
    eager = generate_cli.main(argv)
    assert generate_cli.main([*argv, "--compile", "aot_eager"]) == eager
    assert capsys.readouterr().out.split("\n")[:2] == [eager, eager]


def test_decode_states_are_per_bucket(model, golden_cases):
    ids = golden_cases["text_only.input_ids"][None]
    before = len(model.decode_states)
    model.generate(ids, max_new_tokens=2, compile="aot_eager")
    model.generate(ids[:, :5], max_new_tokens=3, compile="aot_eager")  # same (batch, capacity) bucket
    assert len(model.decode_states) == before + 1
    model.generate(torch.cat([ids, ids], dim=1).repeat(1, 2), max_new_tokens=2, compile="aot_eager")
    assert len(model.decode_states) == before + 2
