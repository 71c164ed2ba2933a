"""bench/generation.py runs end to end (--tiny --device cpu) and records what the GPU run will record."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "generation.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("generation_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_generation_bench_tiny_cpu_smoke(tmp_path):
    bench = _load_bench()
    out = tmp_path / "gen.json"
    result = bench.main(["--tiny", "--device", "cpu", "--top_k", "1,2", "--max_crops", "1,2", "--new_tokens", "3",
                         "--prompt_len", "5", "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["top_k"], r["max_crops"]) for r in result["rows"]] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    by_setting = {(r["top_k"], r["max_crops"]): r for r in result["rows"]}
    for (k, crops), r in by_setting.items():
        assert r["knobs"]["moe_top_k"] == [k] * len(r["knobs"]["moe_top_k"]) and r["knobs"]["max_crops"] == crops
        assert r["crops"] == crops + 1 and r["new_tokens"] == 3
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] >= 0 and r["prefill_tok_s"] > 0
        assert r["params_active"] == r["knobs"]["params_active"] < r["knobs"]["params_total"]
    # More crops: a longer prompt; more experts: more active parameters.
    assert by_setting[(1, 2)]["prompt_tokens"] > by_setting[(1, 1)]["prompt_tokens"]
    assert by_setting[(2, 1)]["params_active"] > by_setting[(1, 1)]["params_active"]
    assert result["env"]["config"] == "tiny" and result["env"]["dtype"] == "float32"


@pytest.mark.gpu
def test_generation_bench_tiny_cuda_bf16():
    result = _load_bench().main(["--tiny", "--device", "cuda", "--top_k", "2", "--max_crops", "2", "--repeats", "2"])
    (row,) = result["rows"]
    assert row["knobs"]["dtype"] == "bfloat16" and row["knobs"]["device"].startswith("cuda")
    assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0
