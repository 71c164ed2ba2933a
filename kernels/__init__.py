"""Molmo-agnostic MoE kernels, installed as `molmo_fast.kernels` (the bare name `kernels` belongs to PyPI)."""

from .reference import moe_mlp_loop

# Placeholder until the dispatching op lands: the eager loop has the op's exact signature.
moe_mlp = moe_mlp_loop

__all__ = ["moe_mlp", "moe_mlp_loop"]
