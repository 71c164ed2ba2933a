"""Without a GPU: the Triton MoE kernels compiled for Hopper (sm_90), on top of `bench/kernels_sm90.py`.

A representative subset of its matrix (the bench script compiles all of it): every selectable config of
every launch at 128-row tiles (T=32768, k=8) in bf16 and fp32, and the configs chosen at 16- and 64-row
tiles in fp16. Checked: each selectable config fits an sm_90 CTA's shared memory and the runtime's
estimate bounds it (so pruning never lets an oversized config launch), no bf16/fp16 config spills, the
grouped GEMM and weight-gradient main loops are software-pipelined (async-copy waits that leave copies
in flight) on wgmma at >= 64-row tiles, and the persistent grid does not grow with T * K_max.
Subprocesses: the test session may run Triton in interpreter mode, which is fixed at import.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "kernels_sm90.py"
SHARED_LIMIT = 227 * 1024
MAIN_LOOPS = {"gate_up", "down", "down_bwd", "dx", "dw_down", "dw_gate_up"}


def _run(args: list[str], tmp_path) -> list[dict]:
    pytest.importorskip("triton")
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH), *args, "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> list[dict]:
    tmp_path = tmp_path_factory.mktemp("sm90")
    large = _run(["--T", "32768", "--k", "8", "--dtypes", "bf16", "fp32", "--configs", "selectable"], tmp_path)
    small = _run(["--T", "1", "512", "--k", "8", "--dtypes", "fp16", "--configs", "chosen"], tmp_path)
    return large + small


def test_every_launch_is_compiled(report):
    seen = {(r["launch"], r["dtype"], r["block_m"]) for r in report}
    for launch in ("gate_up", "down", "down_bwd", "dx"):
        for dtype in ("bf16", "fp32"):
            assert (launch, dtype, 128) in seen
        assert {(launch, "fp16", 16), (launch, "fp16", 64)} <= seen
    launches = {r["launch"] for r in report}
    assert {"dw_down", "dw_gate_up", "combine", "plan0", "plan1", "plan2", "route_count", "route_scatter"} <= launches
    chosen = [r for r in report if r["cases"]]
    assert {(r["launch"], r["dtype"]) for r in chosen} >= {(n, d) for n in MAIN_LOOPS for d in ("bf16", "fp32")}


def test_selectable_configs_fit_shared_memory_under_the_estimate(report):
    for r in report:
        assert r["selectable"], r  # only selectable configs were compiled, and the chosen ones must be
        assert r["shared_bytes"] <= SHARED_LIMIT, r
        if r["shared_estimate"] is not None:
            assert r["shared_bytes"] <= r["shared_estimate"], r


def test_no_low_precision_config_spills(report):
    spilling = [(r["launch"], r["dtype"], r["block_m"], r["config"], r["spill_bytes"])
                for r in report if r["dtype"] != "fp32" and r["spill_bytes"]]
    assert not spilling, spilling


def test_main_loops_are_pipelined_on_wgmma(report):
    for r in report:
        if r["launch"] not in MAIN_LOOPS:
            continue
        assert r["pipelined"] and r["async_wait"] >= 1 and r["buffers"] >= 2, r
        if r["block_m"] >= 64 or r["launch"].startswith("dw_"):  # wgmma tiles are 64 rows; 16-row tiles use mma
            assert r["mma"] == "wgmma", r


GRIDS = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("kernels_sm90", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
grids = {}
for T, K in [(4096, 8), (32768, 1), (32768, 8), (32768, 16)]:
    launches = bench.record(T, K, torch.bfloat16)
    grids[f"{T}x{K}"] = {l["launch"]: l["grid"][0] for l in launches if l["launch"] in bench.triton_moe.GEMM_LAUNCHES}
print(json.dumps(grids))
"""


def test_persistent_grid_does_not_grow_with_pairs():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", GRIDS, str(BENCH)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    grids = json.loads(proc.stdout.strip().splitlines()[-1])
    for launch in ("gate_up", "down", "down_bwd", "dx"):
        sizes = {case: g[launch] for case, g in grids.items()}
        # T*K_max from 32k to 512k pairs: the same ~#SMs programs (132 SMs, at most 4 CTAs each).
        assert len(set(sizes.values())) == 1 and sizes["32768x16"] <= 4 * 132, (launch, sizes)
