"""Runtime knobs on a loaded MolmoE: change cost/accuracy trade-offs without rebuilding or recompiling.

* MoE top-k (global, per layer): stored as data (a 0-d tensor per MoE layer), so a compiled model keeps its graph.
  Only raising k above a layer's static slot count K_max grows K_max (a shape change, hence one recompile).
* Routing policy (topk / topk_renorm / top_p / threshold), per layer or global: a mode switch, so a compiled
  model retraces once per new policy.
* Skipped LLM blocks: a Python-level set checked in the block loop (blocks compiled one by one stay compiled).
* Max image crops: a preprocessing setting; recorded on the model and pushed into a `Processor` when given.
* Max new tokens: the default of `model.generate`.

`describe(model)` returns the current settings as a JSON-able dict for eval / bench records.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from molmo_fast import kernels
from molmo_fast.model.moe import RoutingPolicy


@dataclass
class Knobs:
    top_k: int | Sequence[int] | None = None
    routing: str | None = None  # "topk", "topk_renorm", "top_p:0.9", "threshold:0.05"
    skip_blocks: Sequence[int] | None = None
    max_crops: int | None = None
    max_new_tokens: int | None = None
    moe_impl: str | None = None

    @classmethod
    def parse(cls, items: Sequence[str]) -> "Knobs":
        """From CLI strings like ["top_k=4", "top_k=8,8,4,4", "skip_blocks=3,7", "routing=top_p:0.9"]."""
        knobs = cls()
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(f"knob {item!r}: expected key=value with key in {sorted(cls.__dataclass_fields__)}")
            try:
                knobs._set(key, value)
            except ValueError as e:
                raise ValueError(f"knob {item!r}: {e}") from e
        return knobs

    def _set(self, key: str, value: str) -> None:
        if key == "routing":
            parse_policy(value)
            self.routing = value
        elif key == "moe_impl":
            self.moe_impl = value
        elif key == "skip_blocks":
            self.skip_blocks = [int(v) for v in value.split(",") if v]
        elif key == "top_k":
            values = [int(v) for v in value.split(",")]
            self.top_k = values[0] if len(values) == 1 else values
        else:
            setattr(self, key, int(value))

    def apply(self, model, processor=None) -> None:
        if self.top_k is not None:
            set_top_k(model, self.top_k)
        if self.routing is not None:
            set_routing_policy(model, self.routing)
        if self.skip_blocks is not None:
            set_skip_blocks(model, self.skip_blocks)
        if self.max_crops is not None:
            set_max_crops(model, self.max_crops, processor)
        if self.max_new_tokens is not None:
            set_max_new_tokens(model, self.max_new_tokens)
        if self.moe_impl is not None:
            set_moe_impl(model, self.moe_impl)


def _moes(model):
    return [block.moe for block in model.llm.blocks]


def set_top_k(model, k: int | Sequence[int]) -> None:
    """Number of active experts: one int for every layer, or one per layer."""
    moes = _moes(model)
    ks = [k] * len(moes) if isinstance(k, int) else list(k)
    if len(ks) != len(moes):
        raise ValueError(f"top_k: got {len(ks)} values, expected one per LLM layer ({len(moes)})")
    for layer, (moe, k_layer) in enumerate(zip(moes, ks)):
        if not 1 <= k_layer <= moe.num_experts:
            raise ValueError(f"top_k[{layer}] = {k_layer}, expected 1..{moe.num_experts}")
    for moe, k_layer in zip(moes, ks):
        moe.set_top_k(k_layer)


def parse_policy(spec: str | RoutingPolicy) -> RoutingPolicy:
    if isinstance(spec, RoutingPolicy):
        return spec
    kind, _, value = spec.partition(":")
    if kind == "top_p":
        return RoutingPolicy(kind, top_p=float(value or 1.0))
    if kind == "threshold":
        return RoutingPolicy(kind, threshold=float(value or 0.0))
    return RoutingPolicy(kind)


def set_routing_policy(model, policy: str | RoutingPolicy, layers: Sequence[int] | None = None) -> None:
    """Routing policy for the given layers (all by default); `top_k` still caps the experts per token."""
    policy = parse_policy(policy)
    moes = _moes(model)
    for layer in range(len(moes)) if layers is None else layers:
        moes[layer].policy = policy


def set_moe_impl(model, impl: str) -> None:
    """Which `molmo_fast.kernels.moe_mlp` implementation the MoE layers call ("auto", "triton", ...)."""
    if impl not in kernels.IMPLS:
        raise ValueError(f"moe impl = {impl!r}, expected one of {kernels.IMPLS}")
    for moe in _moes(model):
        moe.impl = impl


def set_skip_blocks(model, blocks: Sequence[int]) -> None:
    n = len(model.llm.blocks)
    bad = [b for b in blocks if not 0 <= b < n]
    if bad:
        raise ValueError(f"skip_blocks: {bad} out of range, expected LLM block indices 0..{n - 1}")
    model.llm.skip_blocks = frozenset(blocks)


def set_max_crops(model, max_crops: int, processor=None) -> None:
    if max_crops < 1:
        raise ValueError(f"max_crops = {max_crops}, expected >= 1")
    model.max_crops = max_crops
    if processor is not None:
        processor.max_crops = max_crops


def set_max_new_tokens(model, n: int) -> None:
    if n < 1:
        raise ValueError(f"max_new_tokens = {n}, expected >= 1")
    model.generation_config["max_new_tokens"] = n


def describe(model) -> dict:
    moes = _moes(model)
    policies = [m.policy for m in moes]
    param = next(model.parameters())
    return {
        "moe_top_k": [m.k for m in moes],
        "moe_k_max": [m.k_max for m in moes],
        "moe_num_experts": moes[0].num_experts,
        "moe_routing": [p.kind for p in policies],
        "moe_top_p": [p.top_p for p in policies],
        "moe_threshold": [p.threshold for p in policies],
        "moe_impl": moes[0].impl,
        "skip_blocks": sorted(model.llm.skip_blocks),
        "max_crops": model.max_crops,
        "max_new_tokens": model.generation_config.get("max_new_tokens"),
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
        "params_total": model.num_parameters(),
        "params_active": model.num_parameters(active=True),
    }


__all__ = ["Knobs", "describe", "parse_policy", "set_max_crops", "set_max_new_tokens", "set_moe_impl",
           "set_routing_policy", "set_skip_blocks", "set_top_k"]
