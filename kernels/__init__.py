"""Molmo-agnostic MoE kernels, installed as `molmo_fast.kernels` (the bare name `kernels` belongs to PyPI)."""

if __name__ == "molmo_fast.kernels":
    from .op import IMPLS, moe_mlp
    from .reference import moe_mlp_loop

    def moe_mlp_grouped_mm(x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, expert_weight_TK):
        """The torch grouped_mm path with the op's exact signature (differentiable through the custom op)."""
        return moe_mlp(x_TD, w_gate_up_EHD, w_down_EDH, expert_idx_TK, expert_weight_TK, impl="grouped_mm")

    __all__ = ["IMPLS", "moe_mlp", "moe_mlp_grouped_mm", "moe_mlp_loop"]
# Otherwise the repo root is on sys.path (python -m from a checkout) and something imported the top-level name
# `kernels`: transformers probes the PyPI package of that name by importing it. Stay empty, so the custom ops are
# registered once, by molmo_fast.kernels, and no second copy of the modules shadows the first.
