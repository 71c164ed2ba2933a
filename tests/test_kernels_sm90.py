"""Without a GPU: compile every kernel launch of a real forward + backward for Hopper (sm_90).

The launches are recorded from `triton_moe` (so signatures, dtypes and constexprs are exactly what runs
on a GPU), then compiled ahead of time with Triton's bundled ptxas. Checks that they build, that the
grouped GEMMs use wgmma with a software-pipelined (async copy) main loop, and fit Hopper's shared memory.
Runs in a subprocess: the test session may have Triton in interpreter mode, which is fixed at import.
"""

import json
import os
import subprocess
import sys
import types

import pytest

H100_SHARED_BYTES = 227 * 1024


def _compile_all() -> list[dict]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from molmo_fast.kernels import triton_kernels, triton_moe

    dtypes = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
              torch.int32: "i32", torch.int64: "i64"}
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    kernel_types = (triton.runtime.Autotuner, triton.runtime.JITFunction)
    triton_moe.tk = types.SimpleNamespace(**{  # the launcher's view of the kernels module only
        name: Recorder(value) if isinstance(value, kernel_types) else value
        for name, value in vars(triton_kernels).items()
    })

    # Prefill-like (BLOCK_M = 128, torch.sort routing) in bf16, decode-like (BLOCK_M = 16, counting sort) in fp16.
    for T, D, H, E, K, dtype in [(512, 256, 128, 8, 4, torch.bfloat16), (1, 256, 128, 64, 8, torch.float16)]:
        x_TD = torch.randn(T, D, dtype=dtype)
        w_gate_up_EHD = torch.randn(E, 2 * H, D, dtype=dtype)
        w_down_EDH = torch.randn(E, D, H, dtype=dtype)
        idx_TK = torch.randint(0, E, (T, K))
        weight_TK = torch.rand(T, K)
        y_TD, routing, h_P2H = triton_moe.moe_fwd(x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK)
        triton_moe.moe_bwd(y_TD, x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK, routing, h_P2H)

    results = []
    for kernel, args, kwargs in launches:
        # Specialise like the JIT does at launch: ints equal to 1 become constants, tensors and multiples
        # of 16 get the divisibility hint; autotuned kernels take their first config.
        tuned = isinstance(kernel, triton.runtime.Autotuner)
        fn = kernel.fn if tuned else kernel
        constexprs, options = dict(kwargs), {}
        if tuned:
            config = kernel.configs[0]
            constexprs.update(config.kwargs)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs or fn.params[i].is_constexpr:
                signature[name] = "constexpr"
                constexprs.setdefault(name, fn.params[i].default)
                continue
            value = args[i]
            if isinstance(value, torch.Tensor):
                signature[name] = "*" + dtypes[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif value == 1:
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=options
        )
        ttgir = compiled.asm["ttgir"]
        results.append({
            "kernel": fn.__name__, "tuned": tuned, "shared": compiled.metadata.shared,
            "block_m": constexprs.get("BLOCK_M"), "source": constexprs.get("SOURCE"),
            "wgmma": "warp_group_dot" in ttgir, "pipelined": "async_copy_global_to_local" in ttgir,
        })
    return results


def test_kernels_build_for_hopper():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    names = [r["kernel"] for r in results]
    assert names.count("grouped_gemm_kernel") == 8 and names.count("grouped_wgrad_kernel") == 4, names
    assert {"plan_kernel", "combine_kernel"} <= set(names)
    assert {r["source"] for r in results if r["kernel"] == "plan_kernel"} == {0, 1, 2}
    assert {r["block_m"] for r in results if r["kernel"] == "grouped_gemm_kernel"} == {16, 128}
    for r in results:
        assert r["shared"] <= H100_SHARED_BYTES, r
        if r["tuned"]:
            assert r["pipelined"], r
        if r["tuned"] and (r["block_m"] or 128) >= 64:  # wgmma tiles are 64 rows; 16-row tiles use mma
            assert r["wgmma"], r


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
