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
from molmo_fast.model.moe import TOKEN_KINDS


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
    _reset_knobs(golden_model)


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
def test_forward_compile_keeps_its_graph_across_knob_values(model, golden_cases):
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    ids = golden_cases["single_image.input_ids"][None]
    kw = _image_inputs(golden_cases, "single_image")
    knobs.set_routing_policy(model, "top_p:0.9")
    logits = [compiled(ids, **kw).logits]
    for change in (lambda: knobs.set_top_k(model, 1), lambda: knobs.set_top_k(model, 1, kind="image"),
                   lambda: knobs.set_routing_policy(model, "top_p:0.2")):
        change()
        logits.append(compiled(ids, **kw).logits)
        torch.testing.assert_close(logits[-1], model(ids, **kw).logits, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    assert not torch.equal(logits[0], logits[1])


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
    knobs.reset_routing_stats(model)
    ids, step_logits = model.generate(prompt, **kw, compile="aot_eager")
    assert torch.equal(ids[0, prompt.shape[1]:], golden_cases["generation.new_tokens"])
    torch.testing.assert_close(step_logits[0], golden_cases["generation.step_logits"], atol=1e-4, rtol=1e-4)
    compiled_stats = knobs.routing_stats(model)
    knobs.reset_routing_stats(model)
    eager_ids, eager_logits = model.generate(prompt, **kw)
    assert torch.equal(ids, eager_ids)
    torch.testing.assert_close(step_logits, eager_logits, atol=1e-5, rtol=1e-5)
    # Same routed tokens per kind: bucket padding, warm-up and the steps past the last EOS route nothing.
    assert compiled_stats == knobs.routing_stats(model)


def test_compiled_generation_batched_and_eos(model, golden_cases):
    prompts = golden_cases["text_batch_leftpad.input_ids"]
    free = model.generate(prompts, max_new_tokens=12)
    assert torch.equal(model.generate(prompts, max_new_tokens=12, compile="aot_eager"), free)
    # An EOS that stops row 0 early (its 2nd token) and row 1 wherever it first appears, if at all: the compiled
    # loop checks only every STOP_CHECK_EVERY steps but must return exactly the eager ids (pads, trimmed length).
    eos = int(free[0, prompts.shape[1] + 1])
    for n in (9, 12, 16):  # one capacity bucket (32); past the first stop check (8)
        eager = model.generate(prompts, max_new_tokens=n, eos_token_id=eos)
        assert torch.equal(model.generate(prompts, max_new_tokens=n, eos_token_id=eos, compile="aot_eager"), eager)
    both = model.generate(prompts[:1], max_new_tokens=16, eos_token_id=eos, compile="aot_eager")
    assert both.shape[1] == prompts.shape[1] + 2


KNOB_SETTINGS = {  # applied on top of the defaults; none may recompile a warm bucket
    "default": lambda m: None,
    "top_k=1": lambda m: knobs.set_top_k(m, 1),
    "top_k per layer": lambda m: knobs.set_top_k(m, [1, 2]),
    "image tokens k=1": lambda m: knobs.set_top_k(m, 1, kind="image"),
    "generated tokens k=1": lambda m: knobs.set_top_k(m, 1, kind="generated"),
    "text tokens k=1": lambda m: knobs.set_top_k(m, 1, kind="text"),
    "skip block 1": lambda m: knobs.set_skip_blocks(m, [1]),
}


def _reset_knobs(model):
    knobs.set_top_k(model, model.config.moe.top_k)
    for kind in TOKEN_KINDS:
        knobs.set_top_k(model, model.config.moe.num_experts, kind=kind)
    knobs.set_skip_blocks(model, [])
    knobs.set_routing_policy(model, "topk_renorm" if model.config.moe.normalize_weights else "topk")


def test_no_recompiles_across_knobs_and_prompts_in_a_bucket(model, golden_cases):
    counter = CompileCounter()
    prompt = golden_cases["single_image.input_ids"][None]
    images = _image_inputs(golden_cases, "single_image")
    # A different prompt in the same (batch, length, crops) bucket: shorter, other text tokens, other pixels.
    text = golden_cases["text_only.input_ids"][None]
    other = torch.cat([prompt[:, :-4], text[:, 3:5]], dim=1)
    other_images = dict(images, images=images["images"].flip(-1))
    assert bucket(other.shape[1]) == bucket(prompt.shape[1]) and images["image_input_idx"].max() < other.shape[1]

    def run(ids=prompt, imgs=images, compile=counter, **kw):
        return model.generate(ids, **imgs, max_new_tokens=6, compile=compile, **kw)

    knobs.set_skip_blocks(model, [1])
    run()
    knobs.set_skip_blocks(model, [])
    run()  # both skip sets compiled: a prefill and a decode graph each
    warm = counter.frame_count
    assert warm == 4
    ptrs = {key: [t.data_ptr() for t in (*s.cache.keys, *s.cache.values, s.tokens_BC)]
            for key, s in model.decode_states.items()}

    compiled, eager = {}, {}
    for name, apply in KNOB_SETTINGS.items():
        _reset_knobs(model)
        apply(model)
        compiled[name], eager[name] = run(), run(compile=False)
        compiled[name, "other"], eager[name, "other"] = run(other, other_images), run(other, other_images, False)
    _reset_knobs(model)
    compiled["call top_k=1"], eager["call top_k=1"] = run(top_k=1), run(top_k=1, compile=False)
    compiled["call top_k per layer"] = run(top_k=[2, 1])
    eager["call top_k per layer"] = run(top_k=[2, 1], compile=False)
    assert counter.frame_count == warm, "a knob or prompt change inside a bucket recompiled"
    assert {k: [t.data_ptr() for t in (*s.cache.keys, *s.cache.values, s.tokens_BC)]
            for k, s in model.decode_states.items()} == ptrs, "the static cache was reallocated"

    # A routing policy's value is data; its name is a mode switch: one new graph per compiled function.
    for kind, values in (("top_p", (0.9, 0.3)), ("threshold", (0.3, 0.45))):
        before = counter.frame_count
        for value in values:
            knobs.set_routing_policy(model, f"{kind}:{value}")
            compiled[kind, value], eager[kind, value] = run(), run(compile=False)
        assert counter.frame_count == before + 2, kind

    for name in eager:  # the compiled runs did use each setting
        assert torch.equal(compiled[name], eager[name]), name
    assert len({tuple(t.flatten().tolist()) for t in eager.values()}) > 5  # the knobs changed the tokens


def test_compiled_generate_cli(golden_dir, capsys):
    from molmo_fast import generate as generate_cli

    argv = ["--checkpoint", str(golden_dir / "tiny_model"), "--image",
            str(golden_dir / "images" / "tiny_single_image_0_60x100.png"), "--prompt", "What is this?",
            "--max_new_tokens", "5"]
    eager = generate_cli.main(argv)
    assert generate_cli.main([*argv, "--compile", "aot_eager"]) == eager
    assert capsys.readouterr().out.split("\n")[:2] == [eager, eager]


def test_eval_cli_compile_flag(golden_dir, tmp_path, monkeypatch):
    """`python -m molmo_fast.eval --compile` generates through the compiled path (inductor swapped for aot_eager
    here, for time) and scores exactly as eager."""
    from molmo_fast.eval.__main__ import main
    from molmo_fast.eval.config import EvalConfig
    from molmo_fast.model import generate as generate_module

    backends = []
    real = generate_module.generate_compiled

    def aot_eager(*args):
        backends.append(args[-1])
        return real(*args[:-1], "aot_eager")

    monkeypatch.setattr(generate_module, "generate_compiled", aot_eager)
    argv = ["--checkpoint", str(golden_dir / "tiny_model"), "--tasks", "synthetic_pointing", "--max_examples", "3",
            "--max_new_tokens", "4", "--data_dir", str(tmp_path / "data")]
    main([*argv, "--out", str(tmp_path / "eager")])
    assert not backends
    main([*argv, "--out", str(tmp_path / "compiled"), "--compile"])
    assert backends and set(backends) == {"inductor"}
    rows = [(tmp_path / run / "synthetic_pointing" / "predictions.jsonl").read_text() for run in ("eager", "compiled")]
    assert rows[0] == rows[1]
    with pytest.raises(ValueError, match="compile"):
        EvalConfig(checkpoint="x", tasks="synthetic", compile=True, fsdp=True)


def test_decode_states_are_per_bucket(model, golden_cases):
    ids = golden_cases["text_only.input_ids"][None]
    counter = CompileCounter()
    before = len(model.decode_states)
    model.generate(ids, max_new_tokens=2, compile=counter)
    model.generate(ids[:, :5], max_new_tokens=3, compile=counter)  # same (batch, capacity) bucket: 16 + 3 -> 24
    assert len(model.decode_states) == before + 1 and counter.frame_count == 2
    model.generate(torch.cat([ids, ids], dim=1).repeat(1, 2), max_new_tokens=2, compile=counter)  # 60 -> 64 + 2
    assert len(model.decode_states) == before + 2 and counter.frame_count == 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_generation_equals_eager_without_recompiles(golden_dir, golden_cases, dtype):
    """Inductor + CUDA graphs on the decode step: eager's ids for every knob setting, with no new dynamo graph and
    no new Triton binary (inductor's or the MoE op's) once warm."""
    from molmo_fast.kernels.triton_kernels import compiled_variants
    from molmo_fast.model.molmoe import MolmoE

    torch._dynamo.reset()
    model = MolmoE.from_pretrained(golden_dir / "tiny_model", dtype=dtype, device="cuda")
    prompt = golden_cases["single_image.input_ids"][None].cuda()
    images = {k: v.cuda() for k, v in _image_inputs(golden_cases, "single_image").items()}

    def run(**kw):
        return model.generate(prompt, **images, max_new_tokens=12, **kw)

    eager = {}
    for name, apply in KNOB_SETTINGS.items():
        _reset_knobs(model)
        apply(model)
        eager[name] = run()
    _reset_knobs(model)
    assert torch.equal(run(compile=True), eager["default"])
    assert torch.equal(run(compile=True), eager["default"])  # replayed from the captured graph
    graphs, binaries = torch._dynamo.utils.counters["stats"]["unique_graphs"], compiled_variants()
    for name, apply in KNOB_SETTINGS.items():
        _reset_knobs(model)
        apply(model)
        assert torch.equal(run(compile=True), eager[name]), name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert compiled_variants() == binaries
    torch._dynamo.reset()


def test_train_config_takes_one_compile_switch():
    from molmo_fast.train.config import TrainConfig

    base = dict(run_dir="runs/x", max_steps=10, global_batch_size=8)
    assert TrainConfig(**base, compile_model=True, activation_checkpointing=False).compile_model
    with pytest.raises(ValueError, match="compile_model"):
        TrainConfig(**base, compile=True, compile_model=True, activation_checkpointing=False)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        TrainConfig(**base, compile_model=True)


def test_generation_bench_compile_columns(monkeypatch):
    """bench/generation.py --compile reports eager vs compiled prefill / decode and their ratio (inductor swapped
    for aot_eager, for time)."""
    import importlib.util
    from pathlib import Path

    from molmo_fast.model import generate as generate_module

    real = generate_module.generate_compiled
    monkeypatch.setattr(generate_module, "generate_compiled", lambda *args: real(*args[:-1], "aot_eager"))
    spec = importlib.util.spec_from_file_location("generation_bench",
                                                  Path(__file__).resolve().parents[1] / "bench" / "generation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (row,) = bench.main(["--tiny", "--device", "cpu", "--top_k", "2", "--max_crops", "1", "--new_tokens", "3",
                         "--prompt_len", "5", "--compile", "--override", "n_layers=1"])["rows"]
    c = row["compile"]
    assert row["knobs"]["moe_top_k"] == [2]  # the override reached the model
    assert c["eager_prefill_ms"] > 0 and c["compiled_prefill_ms"] > 0
    assert c["prefill_speedup"] == pytest.approx(c["eager_prefill_ms"] / c["compiled_prefill_ms"])
