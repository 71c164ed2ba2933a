"""Runtime knobs on a loaded MolmoE: change cost/accuracy trade-offs without rebuilding or recompiling.

* MoE top-k (global, per layer, and per token kind -- image / text / generated): data (buffers in every MoE
  layer; a token's k is min(layer k, its kind's cap)), so a compiled model keeps its graph. Only raising a layer's
  k above its static slot count K_max grows K_max (a shape change, hence one recompile).
* Routing policy (a name registered in `molmo_fast.model.moe.POLICIES`, optionally with its parameter, e.g.
  "top_p:0.9"), per layer or global: the parameter value is data; a new policy name retraces once.
* Skipped LLM blocks: a Python-level set checked in the block loop (blocks compiled one by one stay compiled).
* Max image crops: a preprocessing setting; recorded on the model and pushed into a `Processor` when given.
* Max new tokens: the default of `model.generate`.

`describe(model)` returns the current settings as a JSON-able dict for eval / bench / study records;
`reset_routing_stats` / `routing_stats` read the MoE layers' on-device counts of routed tokens and active
(token, expert) pairs per kind.
"""

from collections.abc import Sequence
from dataclasses import dataclass, fields

from molmo_fast import kernels
from molmo_fast.model.moe import POLICIES, TOKEN_KINDS, RoutingPolicy, check_top_k

TopK = int | Sequence[int]


@dataclass
class Knobs:
    top_k: TopK | None = None
    top_k_image: TopK | None = None  # caps on the k of image / text / generated tokens
    top_k_text: TopK | None = None
    top_k_generated: TopK | None = None
    routing: str | None = None  # a policy name, or "name:value": "topk", "topk_renorm", "top_p:0.9", ...
    skip_blocks: Sequence[int] | None = None
    max_crops: int | None = None
    max_new_tokens: int | None = None
    moe_impl: str | None = None

    @classmethod
    def parse(cls, items: Sequence[str]) -> "Knobs":
        """From CLI strings like ["top_k=4", "top_k=8,8,4,4", "top_k_image=2", "skip_blocks=3,7",
        "routing=top_p:0.9"]."""
        knobs = cls()
        names = [f.name for f in fields(cls)]
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in names:
                raise ValueError(f"knob {item!r}: expected key=value with key in {names}")
            try:
                knobs._set(key, value)
            except ValueError as e:
                raise ValueError(f"knob {item!r}: {e}") from e
        return knobs

    def _set(self, key: str, value: str) -> None:
        if key == "routing":
            self.routing = str(RoutingPolicy.parse(value))
        elif key == "moe_impl":
            self.moe_impl = value
        elif key == "skip_blocks":
            self.skip_blocks = [int(v) for v in value.split(",") if v]
        elif key.startswith("top_k"):
            values = [int(v) for v in value.split(",")]
            setattr(self, key, values[0] if len(values) == 1 else values)
        else:
            setattr(self, key, int(value))

    def apply(self, model, processor=None) -> None:
        if self.top_k is not None:
            set_top_k(model, self.top_k)
        for kind in TOKEN_KINDS:
            if getattr(self, f"top_k_{kind}") is not None:
                set_top_k(model, getattr(self, f"top_k_{kind}"), kind)
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


def set_top_k(model, k: TopK, kind: str | None = None) -> None:
    """Active experts per token: one int for every layer, or one per layer. `kind` None sets the layers' k (all
    token kinds); "image" / "text" / "generated" caps only that kind's k (effective k = min(layer k, kind cap))."""
    if kind is not None and kind not in TOKEN_KINDS:
        raise ValueError(f"top_k kind = {kind!r}, expected None or one of {TOKEN_KINDS}")
    moes = _moes(model)
    name = "top_k" if kind is None else f"top_k_{kind}"
    ks = [k] * len(moes) if isinstance(k, int) else list(k)
    if len(ks) != len(moes):
        raise ValueError(f"{name}: got {len(ks)} values, expected one per LLM layer ({len(moes)})")
    for layer, (moe, k_layer) in enumerate(zip(moes, ks)):
        check_top_k(k_layer, moe.num_experts, f"{name}[{layer}]")
    for moe, k_layer in zip(moes, ks):
        moe.set_top_k(k_layer, kind)


def set_routing_policy(model, policy: str | RoutingPolicy, layers: Sequence[int] | None = None) -> None:
    """Routing policy for the given layers (all by default); `top_k` still caps the experts per token."""
    policy = RoutingPolicy.parse(policy)
    moes = _moes(model)
    for layer in range(len(moes)) if layers is None else layers:
        moes[layer].set_policy(policy)


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


# ------------------------------------------------------------------------------------------------ compute
def reset_routing_stats(model) -> None:
    """Zero every MoE layer's counts (on device, no sync)."""
    for moe in _moes(model):
        moe.routing_counts.zero_()


def _entry(tokens: int, pairs: int) -> dict:
    return {"tokens": tokens, "pairs": pairs, "mean_k": pairs / tokens if tokens else 0}


def routing_stats(model) -> dict:
    """What the MoE layers ran since the last reset (eval mode only; padding never counts): per layer and in
    total, per token kind, routed tokens, active (token, expert) pairs and their ratio mean_k. One host sync."""
    counts = [moe.routing_counts.tolist() for moe in _moes(model)]  # [layer][kind] = [tokens, pairs]
    layers = [{kind: _entry(*c[i]) for i, kind in enumerate(TOKEN_KINDS)} for c in counts]
    total = {kind: _entry(sum(c[i][0] for c in counts), sum(c[i][1] for c in counts))
             for i, kind in enumerate(TOKEN_KINDS)}
    total["all"] = _entry(sum(t["tokens"] for t in total.values()), sum(t["pairs"] for t in total.values()))
    return {"layers": layers, "total": total}


def describe(model) -> dict:
    moes = _moes(model)
    policies = [m.policy for m in moes]
    param = next(model.parameters())
    return {
        "moe_top_k": [m.k for m in moes],
        # per-kind caps; None where a kind is uncapped (its k is the layer's)
        **{f"moe_top_k_{kind}": [None if m.kind_k[i] >= m.num_experts else m.kind_k[i] for m in moes]
           for i, kind in enumerate(TOKEN_KINDS)},
        "moe_k_max": [m.k_max for m in moes],
        "moe_num_experts": moes[0].num_experts,
        "moe_routing": [p.kind for p in policies],
        # one list per registered policy parameter: the layer's value where it runs that policy, else None
        **{f"moe_{spec.param}": [p.value if p.kind == name else None for p in policies]
           for name, spec in POLICIES.items() if spec.param},
        "moe_impl": moes[0].impl,
        "skip_blocks": sorted(model.llm.skip_blocks),
        "max_crops": model.max_crops,
        "max_new_tokens": model.generation_config.get("max_new_tokens"),
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
        "params_total": model.num_parameters(),
        "params_active": model.num_parameters(active=True),
    }


__all__ = ["Knobs", "describe", "reset_routing_stats", "routing_stats", "set_max_crops", "set_max_new_tokens",
           "set_moe_impl", "set_routing_policy", "set_skip_blocks", "set_top_k"]
