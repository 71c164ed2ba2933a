"""Dropless MoE block: router -> routing policy -> `molmo_fast.kernels.moe_mlp`.

Legend: T tokens, D model width, E experts, H expert hidden width, K routing slots (K_max, static), C token kinds.
Routing returns `(expert_idx_TK, expert_weight_TK)` with a static K_max; a slot is inactive when its index is
-1 (weight 0). Everything a researcher turns at run time is data, so a compiled model keeps its graph: the layer's
top-k (0-d buffer), a top-k cap per token kind (`kind_top_k`, [3]: a token's k is min(layer k, its kind's cap)) and
the routing policy's parameter (0-d buffer). Only the policy's name is Python state (a new one retraces once).

Token kinds ([B, S] int8, see `token_kinds`): text, image (positions that receive image features), generated
(tokens fed back while decoding); -1 marks padding. In eval mode each layer counts, per kind, the tokens it routed
and the active (token, expert) pairs it ran, on the device (`routing_counts`, read by `molmo_fast.knobs`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from molmo_fast import kernels
from molmo_fast.config import LLMConfig, MoEConfig

TOKEN_KINDS = ("text", "image", "generated")  # kind id = index; -1 = padding
TEXT, IMAGE, GENERATED, PAD = 0, 1, 2, -1


def token_kinds(input_ids_BS: torch.Tensor, image_input_idx_BM: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] int8 kind per position: IMAGE where `image_input_idx` (>= 0) points, PAD at -1 ids, else TEXT.
    Shape-static (a scatter, no boolean indexing), so it compiles without graph breaks or host syncs."""
    kind_BS = torch.zeros(input_ids_BS.shape, dtype=torch.int8, device=input_ids_BS.device)
    if image_input_idx_BM is not None:
        keep_BM = (image_input_idx_BM >= 0).to(torch.int32)
        hits_BS = torch.zeros(input_ids_BS.shape, dtype=torch.int32, device=input_ids_BS.device)
        hits_BS = hits_BS.scatter_add(1, image_input_idx_BM.clamp_min(0).long(), keep_BM)
        kind_BS = torch.where(hits_BS > 0, IMAGE, kind_BS).to(torch.int8)
    return kind_BS.masked_fill(input_ids_BS == -1, PAD)


# ------------------------------------------------------------------------------------------------ policies
@dataclass(frozen=True)
class Policy:
    """A registered routing policy. `fn(weight_TK, active_TK, value) -> (active_TK, weight_TK)` gets the top-K_max
    softmax probabilities sorted descending, the slots the top-k budget allows, and the policy's parameter as a
    0-d float32 tensor; route() zeroes the weights of the inactive slots it returns."""

    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    doc: str
    param: str | None = None  # the parameter's name, e.g. "top_p"; None = no parameter
    default: float = 0.0
    low: float = 0.0  # valid values: low < v <= high if low_open else low <= v <= high
    high: float = 1.0
    low_open: bool = False

    def check(self, value: float) -> None:
        lo_ok = value > self.low if self.low_open else value >= self.low
        if not (lo_ok and value <= self.high):
            lo = f"{self.low} <" if self.low_open else f"{self.low} <="
            raise ValueError(f"{self.param} = {value!r}, expected {lo} {self.param} <= {self.high}")


POLICIES: dict[str, Policy] = {}


def policy(name: str, doc: str, **param) -> Callable:
    """Register a routing policy under `name` (adding one is one decorated function here)."""
    def register(fn):
        POLICIES[name] = Policy(fn, doc, **param)
        return fn
    return register


@policy("topk", "the k most probable experts, raw softmax weights (MolmoE parity)")
def _topk(weight_TK, active_TK, value):
    return active_TK, weight_TK


@policy("topk_renorm", "the k most probable experts, weights renormalised to sum to 1")
def _topk_renorm(weight_TK, active_TK, value):
    weight_TK = weight_TK * active_TK
    return active_TK, weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@policy("top_p", "smallest prefix of the sorted experts whose mass reaches top_p (capped at k)",
        param="top_p", default=1.0, low_open=True)
def _top_p(weight_TK, active_TK, top_p):
    mass_before_TK = weight_TK.cumsum(dim=-1) - weight_TK
    return active_TK & (mass_before_TK < top_p), weight_TK


@policy("threshold", "experts with probability >= threshold (capped at k; the top-1 expert is always kept)",
        param="threshold", default=0.0)
def _threshold(weight_TK, active_TK, threshold):
    first_K = torch.arange(weight_TK.shape[-1], device=weight_TK.device) == 0
    return active_TK & ((weight_TK >= threshold) | first_K), weight_TK


@dataclass(frozen=True)
class RoutingPolicy:
    """A policy choice: a registered name and its parameter value (None = the policy's default; always None for a
    policy without a parameter). String form "name" or "name:value", e.g. "top_p:0.9"."""

    kind: str = "topk"
    value: float | None = None

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"routing policy {self.kind!r}: expected one of {sorted(POLICIES)}")
        spec = POLICIES[self.kind]
        if spec.param is None:
            if self.value is not None:
                raise ValueError(f"routing policy {self.kind!r} takes no parameter, got {self.value!r}")
            return
        object.__setattr__(self, "value", float(spec.default if self.value is None else self.value))
        spec.check(self.value)

    @classmethod
    def parse(cls, spec: "str | RoutingPolicy") -> "RoutingPolicy":
        if isinstance(spec, RoutingPolicy):
            return spec
        kind, sep, value = spec.partition(":")
        try:
            return cls(kind, float(value) if sep else None)
        except ValueError as e:
            raise ValueError(f"routing {spec!r}: {e}") from None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def route(router_logits_TE: torch.Tensor, k_max: int, k: int | torch.Tensor,
          policy: RoutingPolicy | str = RoutingPolicy(), value: torch.Tensor | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in float32, then the policy. `k` is an int, a 0-d tensor or a per-token [T] tensor
    (<= k_max); `value` (0-d tensor) overrides the policy's parameter value, so a compiled caller keeps it as data.
    Returns expert_idx_TK (int64, -1 = inactive) and expert_weight_TK (float32, 0 = inactive)."""
    policy = RoutingPolicy.parse(policy)
    probs_TE = router_logits_TE.float().softmax(dim=-1)
    weight_TK, idx_TK = probs_TE.topk(k_max, dim=-1)  # sorted, descending
    slot_K = torch.arange(k_max, device=idx_TK.device)
    k_T1 = torch.as_tensor(k, device=idx_TK.device).reshape(-1, 1) if not isinstance(k, int) else k
    if value is None:
        value = torch.tensor(policy.value or 0.0, device=weight_TK.device)
    active_TK, weight_TK = POLICIES[policy.kind].fn(weight_TK, slot_K < k_T1, value)
    return idx_TK.masked_fill(~active_TK, -1), weight_TK * active_TK


def check_top_k(k: int, num_experts: int, name: str = "top_k") -> None:
    """The one validation of a top-k value (layer or kind cap)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"{name} = {k!r}, expected an int in 1..{num_experts}")


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
        self.router = nn.Linear(D, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * H, D))  # gate rows, then up rows
        self.w_down = nn.Parameter(torch.empty(E, D, H))
        # The runtime knobs as data (see module docstring), set through molmo_fast.knobs. Their plain-Python mirrors
        # (`k`, `kind_k`, `policy`) let reset_runtime_buffers refill the buffers after `to_empty` / meta loading.
        self.k = cfg.top_k
        self.kind_k = [E] * len(TOKEN_KINDS)  # E = no cap
        self.policy = RoutingPolicy("topk_renorm" if cfg.normalize_weights else "topk")
        self.reset_runtime_buffers()

    def reset_runtime_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the non-persistent buffers from their mirrors; routing counters start at zero."""
        device = device or self.router.weight.device
        self.register_buffer("top_k", torch.tensor(self.k, device=device), persistent=False)
        self.register_buffer("kind_top_k", torch.tensor(self.kind_k, device=device), persistent=False)
        self.register_buffer("policy_value", torch.tensor(self.policy.value or 0.0, device=device), persistent=False)
        # [kind, (tokens, active pairs)], int64 so long evals cannot overflow
        self.register_buffer("routing_counts", torch.zeros(len(TOKEN_KINDS), 2, dtype=torch.int64, device=device),
                             persistent=False)

    def set_top_k(self, k: int, kind: str | None = None) -> None:
        """The layer's k (kind None; above K_max it grows the static slot count: one recompile) or a kind's cap."""
        check_top_k(k, self.num_experts, "top_k" if kind is None else f"top_k_{kind}")
        if kind is None:
            self.k_max = max(self.k_max, k)
            self.k = k
            self.top_k.fill_(k)
        else:
            i = TOKEN_KINDS.index(kind)
            self.kind_k[i] = k
            self.kind_top_k[i] = k

    def set_policy(self, policy: RoutingPolicy | str) -> None:
        self.policy = RoutingPolicy.parse(policy)
        self.policy_value.fill_(self.policy.value or 0.0)

    def _apply(self, fn, recurse=True):
        # `to_empty` (FSDP / meta init) leaves the non-persistent buffers uninitialised: refill them.
        super()._apply(fn, recurse)
        if not self.top_k.is_meta:
            self.top_k.fill_(self.k)
            self.kind_top_k.copy_(torch.tensor(self.kind_k))
            # a model-wide .to(bfloat16) must not round the policy's parameter (route compares in float32)
            self.policy_value = torch.tensor(self.policy.value or 0.0, device=self.top_k.device)
        return self

    def forward(self, x_BSD: torch.Tensor, top_k: int | torch.Tensor | None = None,
                token_kind_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (y [B, S, D], router_logits [T, E], expert_idx [T, K]). `top_k` overrides the layer's k (int,
        0-d or per-token tensor); `token_kind_BS` (default: all text) selects each token's kind cap."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        router_logits_TE = self.router(x_TD)
        k = self.top_k if top_k is None else top_k
        if isinstance(k, torch.Tensor) and k.dim() > 1:
            k = k.reshape(-1)
        kind_T = (torch.zeros(B * S, dtype=torch.long, device=x_TD.device) if token_kind_BS is None
                  else token_kind_BS.reshape(-1).long())
        k_T = torch.minimum(torch.as_tensor(k, device=x_TD.device), self.kind_top_k[kind_T.clamp_min(0)])
        expert_idx_TK, expert_weight_TK = route(router_logits_TE, self.k_max, k_T, self.policy, self.policy_value)
        if not self.training:
            self._count(kind_T, expert_idx_TK)
        y_TD = kernels.moe_mlp(x_TD, self.w_gate_up, self.w_down, expert_idx_TK, expert_weight_TK.to(x_TD.dtype),
                               impl=self.impl)
        return y_TD.view(B, S, D), router_logits_TE, expert_idx_TK

    def _count(self, kind_T: torch.Tensor, expert_idx_TK: torch.Tensor) -> None:
        """Add this call's tokens and active pairs per kind to `routing_counts` (on device; padding, -1, is
        nobody's kind)."""
        onehot_TC = (kind_T.unsqueeze(-1) == torch.arange(len(TOKEN_KINDS), device=kind_T.device)).long()
        pairs_T = (expert_idx_TK >= 0).sum(-1)
        self.routing_counts.add_(torch.stack([onehot_TC.sum(0), (onehot_TC * pairs_T.unsqueeze(-1)).sum(0)], -1))
