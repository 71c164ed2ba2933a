"""The public MoE MLP op: torch.library registration, autograd, and dispatch between implementations.

`moe_mlp` is two custom ops (forward, backward) so torch.compile(fullgraph=True) sees one opaque node
per direction with static-shape fake outputs: top-k and the active mask are data, never a guard.
"""

import importlib.util
import os

import torch

from . import cpu_moe, grouped_mm
from .reference import moe_mlp_loop
from .routing import Routing

IMPLS = ("auto", "triton", "grouped_mm", "loop", "cpu")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _backend(impl: str):
    if impl == "grouped_mm":
        return grouped_mm
    if impl == "cpu":
        return cpu_moe
    from . import triton_moe  # lazy: triton may be absent, and TRITON_INTERPRET is read at import

    return triton_moe


def _resolve(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl not in IMPLS:
        raise ValueError(f"moe_mlp: impl={impl!r}, expected one of {IMPLS}")
    if impl == "auto" and device.type == "cpu":  # the cpu path is float32 only (CPU training is fp32)
        return "cpu" if dtype == torch.float32 else "grouped_mm"
    if impl == "auto":
        return "triton" if device.type == "cuda" and _HAS_TRITON else "grouped_mm"
    if impl == "cpu" and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"moe_mlp: impl='cpu' needs float32 CPU tensors, got {dtype} on {device.type}")
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("moe_mlp: impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 (the interpreter)")
    return impl


@torch.library.custom_op("molmo_fast::moe_mlp_fwd", mutates_args=())
def _moe_fwd(
    x_TD: torch.Tensor,
    w_gate_up_EHD: torch.Tensor,
    w_down_EDH: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    impl: str,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y_TD, routing, h_P2H = _backend(impl).moe_fwd(x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, save=save)
    if not save:
        return y_TD, *_empty_saved(x_TD, expert_idx_TK, w_gate_up_EHD, save=False)
    return y_TD, routing.sorted_pair_P, routing.offs_E, h_P2H


def _empty_saved(x_TD, expert_idx_TK, w_gate_up_EHD, save: bool):
    """The saved-state outputs' shapes: fixed by (T, K, E, H), empty when nothing is saved."""
    E, H2, _ = w_gate_up_EHD.shape
    P, n_e = (expert_idx_TK.numel(), E) if save else (0, 0)
    return (
        expert_idx_TK.new_empty(P, dtype=torch.int32),
        expert_idx_TK.new_empty(n_e, dtype=torch.int32),
        x_TD.new_empty(P, H2),
    )


@_moe_fwd.register_fake
def _(x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, impl, save):
    return x_TD.new_empty(x_TD.shape), *_empty_saved(x_TD, expert_idx_TK, w_gate_up_EHD, save)


@torch.library.custom_op("molmo_fast::moe_mlp_bwd", mutates_args=())
def _moe_bwd(
    dy_TD: torch.Tensor,
    x_TD: torch.Tensor,
    w_gate_up_EHD: torch.Tensor,
    w_down_EDH: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    sorted_pair_P: torch.Tensor,
    offs_E: torch.Tensor,
    h_P2H: torch.Tensor,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    routing = Routing(sorted_pair_P, offs_E)
    return _backend(impl).moe_bwd(dy_TD, x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, routing, h_P2H)


@_moe_bwd.register_fake
def _(dy_TD, x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, sorted_pair_P, offs_E, h_P2H, impl):
    return (
        x_TD.new_empty(x_TD.shape),
        w_gate_up_EHD.new_empty(w_gate_up_EHD.shape),
        w_down_EDH.new_empty(w_down_EDH.shape),
        weight_TK.new_empty(weight_TK.shape),
    )


def _setup_context(ctx, inputs, output):
    x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, impl, _ = inputs
    _, sorted_pair_P, offs_E, h_P2H = output
    ctx.impl = impl
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, sorted_pair_P, offs_E, h_P2H)


def _backward(ctx, dy_TD, *_):
    x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK, sorted_pair_P, offs_E, h_P2H = ctx.saved_tensors
    if sorted_pair_P.numel() != expert_idx_TK.numel():
        raise RuntimeError("moe_mlp: backward through a forward run without grad enabled")
    dx, dw_gate_up, dw_down, dweight = _moe_bwd(
        dy_TD.contiguous(), x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, weight_TK,
        sorted_pair_P, offs_E, h_P2H, ctx.impl,
    )
    return dx, dw_gate_up, dw_down, None, dweight, None, None


_moe_fwd.register_autograd(_backward, setup_context=_setup_context)


def moe_mlp(
    x_TD: torch.Tensor,
    w_gate_up_EHD: torch.Tensor,
    w_down_EDH: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    expert_weight_TK: torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """y[t] = sum over active slots k of expert_weight[t,k] * down_e(silu(gate_e x_t) * up_e x_t).

    x_TD [T, D]; w_gate_up_EHD [E, 2H, D] (gate rows first, then up); w_down_EDH [E, D, H];
    expert_idx_TK [T, K] int, a slot is inactive where the index is -1; expert_weight_TK [T, K].
    K only bounds top-k: any active mask runs on the same compiled graph and kernels.
    impl: "auto" (Triton on CUDA, "cpu" for float32 CPU tensors, grouped_mm elsewhere), "triton", "grouped_mm",
    "loop" or "cpu" (per-expert matmuls into reused memory, kernels/cpu_moe.py).
    x and both weights share one dtype (float32, bfloat16, float16; under autocast they are cast to the
    autocast dtype); expert_weight may be any float dtype. Accumulation is fp32; y has x's dtype.
    """
    T, D = x_TD.shape
    E, H2, D_w = w_gate_up_EHD.shape
    if D_w != D or tuple(w_down_EDH.shape) != (E, D, H2 // 2) or H2 % 2:
        raise ValueError(
            f"moe_mlp: x {tuple(x_TD.shape)}, w_gate_up {tuple(w_gate_up_EHD.shape)}, w_down "
            f"{tuple(w_down_EDH.shape)}; expected [T, D], [E, 2H, D], [E, D, H]"
        )
    if expert_idx_TK.shape != expert_weight_TK.shape or expert_idx_TK.shape[0] != T:
        raise ValueError(
            f"moe_mlp: expert_idx {tuple(expert_idx_TK.shape)} and expert_weight "
            f"{tuple(expert_weight_TK.shape)} must both be [T={T}, K]"
        )
    if torch.is_autocast_enabled(x_TD.device.type):  # custom ops are opaque to autocast: cast like a matmul
        dtype = torch.get_autocast_dtype(x_TD.device.type)
        x_TD, w_gate_up_EHD, w_down_EDH = (t.to(dtype) for t in (x_TD, w_gate_up_EHD, w_down_EDH))
    if w_gate_up_EHD.dtype != x_TD.dtype or w_down_EDH.dtype != x_TD.dtype:
        raise ValueError(
            f"moe_mlp: x dtype {x_TD.dtype}, w_gate_up {w_gate_up_EHD.dtype}, w_down {w_down_EDH.dtype}; "
            "expected one dtype (float32, bfloat16 or float16)"
        )
    if expert_idx_TK.dtype.is_floating_point:
        raise ValueError(f"moe_mlp: expert_idx must be an integer tensor, got {expert_idx_TK.dtype}")
    impl = _resolve(impl, x_TD.device, x_TD.dtype)
    if impl == "loop":
        return moe_mlp_loop(x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, expert_weight_TK)
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, w_gate_up_EHD, w_down_EDH, expert_weight_TK)
    )
    return _moe_fwd(x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, expert_weight_TK, impl, save)[0]
