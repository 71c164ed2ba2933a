"""Launch-config choice of the Triton MoE kernels (`kernels/configs.py`): data-free, fitting, tunable opt-in."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Runs outside the interpreter (its candidate space is the GPU one).
RULES = """
import json, sys, torch
from molmo_fast.kernels import configs
from molmo_fast.kernels.triton_moe import block_m_for
chosen = {}
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    elt = torch.empty(0, dtype=dtype).element_size()
    for launch in configs.GEMM_LAUNCHES + configs.WGRAD_LAUNCHES:
        for block_m in ((16, 64, 128) if launch in configs.GEMM_LAUNCHES else (0,)):
            for T in (1, 512, 4096, 32768, 100000):
                cfg = configs.rule(launch, elt, block_m, T)
                assert configs.selectable(launch, cfg, elt, block_m), (launch, dtype, block_m, cfg)
                assert configs.shared_bytes(launch, cfg, elt, block_m) <= configs.SHARED_LIMIT
                chosen[configs.key(launch, dtype, block_m, T)] = cfg
shipped = configs.read(configs.SHIPPED)
bad = {"devices": {"X": {"gate_up/float32/M128/T32768": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8,
                                                           "num_stages": 3}}}}
open(sys.argv[1], "w").write(json.dumps(bad))
try:
    configs.read(sys.argv[1])
    refused = ""
except ValueError as e:
    refused = str(e)
print(json.dumps({"chosen": chosen, "shipped": shipped, "refused": refused,
                  "fp32_gate_up": [c for c in configs.candidates("gate_up")
                                   if configs.selectable("gate_up", c, 4, 128)]}))
"""


def test_rule_picks_fitting_configs_and_the_shipped_table_is_valid(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", RULES, str(tmp_path / "bad.json")], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # The old launch failure: fp32 gate|up at 128-row tiles needs 288 KiB with (128, 64, 8, 3); pruned now.
    assert {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3} not in out["fp32_gate_up"]
    assert out["fp32_gate_up"], "fp32 gate|up must keep a config at 128-row tiles"
    assert "gate_up/float32/M128/T32768" in out["refused"]
    # Token buckets separate T=4096 and T=32768, and small batches get more column blocks.
    assert "down/bfloat16/M128/T4096" in out["chosen"] and "down/bfloat16/M128/T32768" in out["chosen"]
    assert out["chosen"]["down/bfloat16/M128/T512"]["BLOCK_N"] < out["chosen"]["down/bfloat16/M128/T32768"]["BLOCK_N"]
    for device in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        table = out["shipped"][device]
        for key in ("gate_up/bfloat16/M128/T32768", "down_bwd/bfloat16/M128/T4096", "dx/bfloat16/M64/T512",
                    "dw_down/bfloat16/M0/T32768", "gate_up/float32/M128/T32768"):
            assert table[key] == out["chosen"][key], key


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton path on CPU tensors")
def test_tune_writes_a_table_the_kernels_read(tmp_path):
    from molmo_fast.kernels import configs, moe_mlp

    spec = importlib.util.spec_from_file_location("moe_tune", ROOT / "bench" / "moe_tune.py")
    moe_tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(moe_tune)

    def make_routing(T, E, k_max, k, device):
        g = torch.Generator().manual_seed(T)
        weight_TK, idx_TK = torch.randn(T, E, generator=g).softmax(-1).topk(k_max, dim=-1)
        return idx_TK, weight_TK

    calls = []
    table = moe_tune.tune(lambda fn: calls.append(fn()) or 1.0, make_routing, torch.float32, [5, 40], 2,
                          D=32, H=16, E=4, device="cpu", log=lambda line: None)
    launches = configs.GEMM_LAUNCHES + configs.WGRAD_LAUNCHES
    assert len(calls) == 2 * len(launches) and len(table) == 2 * len(launches)
    path = tmp_path / "tuned.json"
    moe_tune.write(str(path), "cpu-test", table)
    moe_tune.write(str(path), "other", {})  # merging keeps the first device
    assert configs.read(path)["cpu-test"] == table
    key = next(iter(table))
    with configs.forced({key: {"BLOCK_N": 999}}):
        launch, _, block_m, T = key.split("/")
        chosen = configs.choose(launch, torch.float32, int(block_m[1:]), int(T[1:]), torch.device("cpu"))
        assert chosen["BLOCK_N"] == 999
    w_gate_up_EHD, w_down_EDH = torch.randn(4, 32, 32), torch.randn(4, 32, 16)
    y = moe_mlp(torch.randn(3, 32), w_gate_up_EHD, w_down_EDH, torch.tensor([[0, 1]] * 3), torch.ones(3, 2),
                impl="triton")
    assert torch.isfinite(y).all()  # the forced config is gone again


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton path on CPU tensors")
def test_wide_column_blocks_match_the_reference():
    """64-wide blocks: several PART_CHUNKs per SwiGLU-bwd half, a ragged last block, more tiles than programs."""
    from molmo_fast.kernels import configs, moe_mlp, moe_mlp_loop
    from molmo_fast.kernels.triton_moe import block_m_for

    T, E, K, D, H = 21, 3, 2, 48, 40
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(T, D, generator=g)
    w_gate_up_EHD = torch.randn(E, 2 * H, D, generator=g) / D**0.5
    w_down_EDH = torch.randn(E, D, H, generator=g) / H**0.5
    idx_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx_TK[::4, 1] = -1
    weight_TK = torch.rand(T, K, generator=g)
    wide = {"BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    block_m = block_m_for(T * K, E)
    inputs = [x_TD, w_gate_up_EHD, w_down_EDH, weight_TK]
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().requires_grad_() for t in inputs]
    with configs.forced({configs.key(n, torch.float32, block_m, T): wide for n in configs.GEMM_LAUNCHES}):
        y_TD = moe_mlp(ours[0], ours[1], ours[2], idx_TK, ours[3], impl="triton")
        dy_TD = torch.randn(T, D, generator=g)
        got = [y_TD, *torch.autograd.grad(y_TD, ours, dy_TD)]
    y_ref = moe_mlp_loop(ref[0], ref[1], ref[2], idx_TK, ref[3])
    want = [y_ref, *torch.autograd.grad(y_ref, ref, dy_TD.double())]
    for name, a, b in zip(["y", "dx", "dw_gate_up", "dw_down", "dweight"], got, want):
        err = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
        assert err < 2e-4, f"{name}: {err:.2e}"
