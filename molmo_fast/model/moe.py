"""Dropless MoE block: router -> routing policy -> `molmo_fast.kernels.moe_mlp`.

Legend: T tokens, D model width, E experts, H expert hidden width, K routing slots (K_max, static).
Routing returns `(expert_idx_TK, expert_weight_TK)` with a static K_max; a slot is inactive when its index is
-1 (weight 0). The number of active experts is data (`top_k` buffer, or a per-call/per-token tensor), so changing
it never changes a shape and a compiled model does not recompile.
"""

from dataclasses import dataclass

import torch
from torch import nn

from molmo_fast import kernels
from molmo_fast.config import LLMConfig, MoEConfig

POLICIES = ("topk", "topk_renorm", "top_p", "threshold")


@dataclass(frozen=True)
class RoutingPolicy:
    """topk: the k most probable experts, raw softmax weights (MolmoE parity). topk_renorm: same, weights sum to 1.
    top_p: smallest prefix of the sorted experts whose mass reaches `top_p` (capped at k). threshold: experts with
    probability >= `threshold` (capped at k; the top-1 expert is always kept)."""

    kind: str = "topk"
    top_p: float = 1.0
    threshold: float = 0.0

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"RoutingPolicy.kind = {self.kind!r}, expected one of {POLICIES}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"RoutingPolicy.top_p = {self.top_p!r}, expected 0 < top_p <= 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"RoutingPolicy.threshold = {self.threshold!r}, expected 0 <= threshold <= 1")


def route(router_logits_TE: torch.Tensor, k_max: int, k: int | torch.Tensor,
          policy: RoutingPolicy = RoutingPolicy()) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in float32, then the policy. `k` is an int, a 0-d tensor or a per-token [T] tensor
    (<= k_max). Returns expert_idx_TK (int64, -1 = inactive) and expert_weight_TK (float32, 0 = inactive)."""
    probs_TE = router_logits_TE.float().softmax(dim=-1)
    weight_TK, idx_TK = probs_TE.topk(k_max, dim=-1)  # sorted, descending
    slot_K = torch.arange(k_max, device=idx_TK.device)
    k_T1 = torch.as_tensor(k, device=idx_TK.device).reshape(-1, 1) if not isinstance(k, int) else k
    active_TK = slot_K < k_T1
    if policy.kind == "top_p":
        mass_before_TK = weight_TK.cumsum(dim=-1) - weight_TK
        active_TK = active_TK & (mass_before_TK < policy.top_p)
    elif policy.kind == "threshold":
        active_TK = active_TK & ((weight_TK >= policy.threshold) | (slot_K == 0))
    weight_TK = weight_TK * active_TK
    if policy.kind == "topk_renorm":
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return idx_TK.masked_fill(~active_TK, -1), weight_TK


def expert_load(expert_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of active (token, slot) pairs routed to each expert, [E] int64."""
    shifted = (expert_idx_TK + 1).flatten()  # inactive -1 -> bucket 0, dropped below
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=shifted.device)
    return counts.scatter_add_(0, shifted, torch.ones_like(shifted))[1:]


def load_balancing_loss(router_logits_TE: torch.Tensor, expert_idx_TK: torch.Tensor,
                        valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/OLMoE auxiliary loss E * sum_e f_e * P_e (f: fraction of routed pairs, P: mean router probability)
    over the tokens where `valid_T` is true. Equals 1 for perfectly uniform routing."""
    E = router_logits_TE.shape[-1]
    w_T1 = _token_weights(router_logits_TE, valid_T)
    probs_TE = router_logits_TE.float().softmax(dim=-1)
    if valid_T is not None:
        expert_idx_TK = expert_idx_TK.masked_fill(~valid_T.unsqueeze(-1), -1)
    load_E = expert_load(expert_idx_TK, E).float()
    frac_E = load_E / load_E.sum().clamp_min(1.0)
    return E * (frac_E * (probs_TE * w_T1).sum(dim=0)).sum()


def router_z_loss(router_logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition of the router logits over the tokens where `valid_T` is true."""
    z_T = torch.logsumexp(router_logits_TE.float(), dim=-1).pow(2)
    return (z_T * _token_weights(router_logits_TE, valid_T).squeeze(-1)).sum()


def _token_weights(router_logits_TE: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """[T, 1] float weights averaging over valid tokens (no boolean indexing: no host sync)."""
    if valid_T is None:
        valid_T = torch.ones(router_logits_TE.shape[0], dtype=torch.bool, device=router_logits_TE.device)
    w_T = valid_T.float()
    return (w_T / w_T.sum().clamp_min(1.0)).unsqueeze(-1)


class MoE(nn.Module):
    def __init__(self, llm: LLMConfig, cfg: MoEConfig):
        super().__init__()
        E, H, D = cfg.num_experts, cfg.hidden_size, llm.d_model
        if cfg.impl not in kernels.IMPLS:
            raise ValueError(f"MoEConfig.impl = {cfg.impl!r}, expected one of {kernels.IMPLS}")
        self.num_experts, self.impl = E, cfg.impl  # which molmo_fast.kernels.moe_mlp implementation runs
        self.k_max = cfg.top_k
        self.policy = RoutingPolicy("topk_renorm" if cfg.normalize_weights else "topk")
        self.router = nn.Linear(D, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * H, D))  # gate rows, then up rows
        self.w_down = nn.Parameter(torch.empty(E, D, H))
        # Active experts per token as data (see module docstring); set through molmo_fast.knobs.set_top_k, which
        # keeps `k` (a plain int) in step so the buffer can be refilled after `to_empty` / meta materialisation.
        self.k = cfg.top_k
        self.register_buffer("top_k", torch.tensor(cfg.top_k), persistent=False)

    def set_top_k(self, k: int) -> None:
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"top_k = {k}, expected 1..{self.num_experts}")
        self.k_max = max(self.k_max, k)
        self.k = k
        self.top_k.fill_(k)

    def _apply(self, fn, recurse=True):
        # `to_empty` (FSDP / meta init) leaves the non-persistent top_k buffer uninitialised: refill it.
        super()._apply(fn, recurse)
        if not self.top_k.is_meta:
            self.top_k.fill_(self.k)
        return self

    def forward(self, x_BSD: torch.Tensor, top_k: int | torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (y [B, S, D], router_logits [T, E], expert_idx [T, K])."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        router_logits_TE = self.router(x_TD)
        k = self.top_k if top_k is None else top_k
        if isinstance(k, torch.Tensor) and k.dim() > 1:
            k = k.reshape(-1)
        expert_idx_TK, expert_weight_TK = route(router_logits_TE, self.k_max, k, self.policy)
        y_TD = kernels.moe_mlp(x_TD, self.w_gate_up, self.w_down, expert_idx_TK, expert_weight_TK.to(x_TD.dtype),
                               impl=self.impl)
        return y_TD.view(B, S, D), router_logits_TE, expert_idx_TK
