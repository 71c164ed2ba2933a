"""bench/moe_kernels.py runs end to end (--device cpu --tiny) and reports what the GPU run will report."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "moe_kernels.py"


def test_bench_tiny_cpu_smoke(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # molmo_fast takes its CPU path: seconds, not minutes
    spec = importlib.util.spec_from_file_location("moe_kernels_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "moe.json"
    result = bench.main(["--device", "cpu", "--tiny", "--out", str(out)])

    assert json.loads(out.read_text())["rows"] == result["rows"]
    seen = {(r["impl"], r["T"], r["k"], r["mode"]) for r in result["rows"]}
    for impl in bench.IMPLS:
        for T in (1, 13):
            for k in (1, 2):
                for mode in ("fwd", "fwd+bwd"):
                    assert (impl, T, k, mode) in seen
    for r in result["rows"]:
        assert r["ms"] > 0 and r["rel_err"] < 1e-5, r
    assert result["recompiles"]["molmo_fast"] == 0
    assert result["recompiles"]["grouped_mm"] == 0
    assert result["env"]["dense_bf16_tflops"] > 0 and result["env"]["copy_gbs"] > 0
