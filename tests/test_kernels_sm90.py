"""Without a GPU: compile every kernel launch of a real forward + backward for Hopper (sm_90).

The launches are recorded from `triton_moe` (so signatures, dtypes and constexprs are exactly what runs
on a GPU), then compiled ahead of time with Triton's bundled ptxas. Checks that they build, that the
grouped GEMMs use wgmma and a software-pipelined (async copy) main loop, and fit Hopper's shared memory.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from molmo_fast.kernels import triton_moe  # noqa: E402

KERNELS = Path(triton_moe.__file__).with_name("triton_kernels.py")
H100_SHARED_BYTES = 227 * 1024
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _compile(kernel, args, kwargs):
    """Specialise like Triton's JIT does at launch (ints equal to 1 become constants, multiples of 16 and
    tensors get the divisibility hint), taking the first autotune config."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    constexprs, options = dict(kwargs), {}
    if fn is not kernel:
        config = kernel.configs[0]
        constexprs.update(config.kwargs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or i >= len(args) and fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs.setdefault(name, fn.params[i].default)
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.fixture
def sm90_kernels(monkeypatch):
    """A copy of triton_kernels built as real JIT kernels (not the interpreter), with the GPU configs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    spec = importlib.util.spec_from_file_location("triton_kernels_sm90", KERNELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_build_for_hopper(sm90_kernels, monkeypatch):
    launches = []
    fake = type("FakeKernels", (), {})()
    for name in dir(sm90_kernels):
        value = getattr(sm90_kernels, name)
        is_kernel = isinstance(value, (triton.runtime.Autotuner, triton.runtime.JITFunction))
        setattr(fake, name, _Recorder(value, launches) if is_kernel else value)
    monkeypatch.setattr(triton_moe, "tk", fake)

    T, D, H, E, K = 256, 256, 128, 8, 4
    x_TD = torch.randn(T, D, dtype=torch.bfloat16)
    w_gate_up_EHD = torch.randn(E, 2 * H, D, dtype=torch.bfloat16)
    w_down_EDH = torch.randn(E, D, H, dtype=torch.bfloat16)
    idx_TK = torch.randint(0, E, (T, K))
    weight_TK = torch.rand(T, K)
    y_TD, routing, h_P2H, o_PD = triton_moe.moe_fwd(x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK)
    triton_moe.moe_bwd(y_TD, x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK, routing, h_P2H, o_PD)
    names = [getattr(k, "fn", k).__name__ for k, _, _ in launches]
    assert names.count("grouped_gemm_kernel") == 4 and names.count("grouped_wgrad_kernel") == 2

    for kernel, args, kwargs in launches:
        compiled = _compile(kernel, args, kwargs)
        assert compiled.metadata.shared <= H100_SHARED_BYTES
        if isinstance(kernel, triton.runtime.Autotuner):
            ttgir = compiled.asm["ttgir"]
            assert "warp_group_dot" in ttgir, f"{kernel.fn.__name__} {kwargs}: no wgmma"
            assert "async_copy_global_to_local" in ttgir, f"{kernel.fn.__name__} {kwargs}: main loop not pipelined"
