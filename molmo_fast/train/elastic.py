"""Elastic top-k training: which MoE top-k each optimizer step trains, so one model serves many k at run time.

Modes (`ElasticConfig.mode`):

* `fixed` (default): every step trains one k, `ks[0]`, or the model's own top_k when `ks` is empty (then the
  trainer never touches the model's k: today's numerics exactly).
* `sample`: one k per step for every layer, drawn from `ks` (weights `probs`, uniform when empty).
* `sample_per_layer`: each MoE layer draws its own k from `ks` every step.
* `sandwich`: every step trains max(ks), min(ks) and `n_sampled` draws from `ks`, one forward/backward pass each,
  and averages their losses (the slimmable-network rule: n_sampled + 2 passes per step).

`kind_ks` optionally gives image / text tokens their own budget (a list drawn from per pass, or one value), on top of
the layer's k (the effective k of a token is the smaller one, as `knobs.set_top_k(model, k, kind=...)` defines it);
sandwich passes take the largest / smallest budget with the largest / smallest k. `renorm` trains with the routing
weights renormalised over the active experts (`topk_renorm`); the model config the run writes records it, so the
exported checkpoint loads with the routing it was trained with.

Draws are a pure function of (seed, step): every rank draws the same k with no communication, and a resumed run
draws what the uninterrupted one would. The generator's state (its seed; the step is the counter) is saved as JSON
in the checkpoint's train_state.json and wins over the gin seed on resume.
"""

from dataclasses import asdict, dataclass, field

import gin
import numpy as np

MODES = ("fixed", "sample", "sample_per_layer", "sandwich")
KINDS = ("image", "text")  # the token kinds of a training batch (`generated` exists only when decoding)
CONFIG_KEY = "molmo_fast_elastic_top_k"  # the model config.json field recording how a checkpoint was trained


def _fail(name: str, value, expected: str) -> None:
    raise ValueError(f"ElasticConfig.{name} = {value!r}: expected {expected}")


@gin.configurable
@dataclass
class ElasticConfig:
    """Training-time MoE top-k policy (see the module docstring for the modes)."""

    mode: str = "fixed"
    ks: tuple = ()
    probs: tuple = ()
    n_sampled: int = 1
    kind_ks: dict = field(default_factory=dict)
    renorm: bool = False
    seed: int = 2024

    def __post_init__(self):
        self.ks, self.probs = tuple(self.ks), tuple(self.probs)
        self.kind_ks = {kind: tuple(v) if isinstance(v, (list, tuple)) else (v,) for kind, v in self.kind_ks.items()}
        if self.mode not in MODES:
            _fail("mode", self.mode, f"one of {MODES}")
        for name, values in [("ks", self.ks)] + [(f"kind_ks[{k!r}]", v) for k, v in self.kind_ks.items()]:
            if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in values):
                _fail(name, values, "positive ints")
        need = {"fixed": (0, 1), "sample": (1, None), "sample_per_layer": (1, None), "sandwich": (2, None)}[self.mode]
        if len(self.ks) < need[0] or (need[1] is not None and len(self.ks) > need[1]):
            _fail("ks", self.ks, f"{'at most one k' if self.mode == 'fixed' else f'at least {need[0]} ks'} for "
                                 f"mode {self.mode!r}")
        if self.probs and (len(self.probs) != len(self.ks) or any(p < 0 for p in self.probs) or sum(self.probs) <= 0):
            _fail("probs", self.probs, f"{len(self.ks)} non-negative weights (one per k in {self.ks}), not all 0")
        if not isinstance(self.n_sampled, int) or self.n_sampled < 0:
            _fail("n_sampled", self.n_sampled, "an int >= 0")
        for kind, values in self.kind_ks.items():
            if kind not in KINDS or not values:
                _fail("kind_ks", {kind: values}, f"keys in {KINDS} with at least one k")

    @property
    def is_default(self) -> bool:
        """True when training leaves the model's routing exactly as built (no k set, no renormalisation)."""
        return self.mode == "fixed" and not self.ks and not self.kind_ks and not self.renorm

    def check_model(self, top_k: int) -> None:
        """Every k must fit the model's static slot count K_max (its config top_k): training never grows it."""
        for name, values in [("ks", self.ks)] + [(f"kind_ks[{k!r}]", v) for k, v in self.kind_ks.items()]:
            if any(k > top_k for k in values):
                _fail(name, values, f"ks <= the model's moe_top_k = {top_k}")


@dataclass(frozen=True)
class Pass:
    """The k of one forward/backward pass: one per MoE layer, and each token kind's budget (absent = no budget)."""

    top_k: tuple[int, ...]
    kinds: tuple[tuple[str, int], ...] = ()

    @property
    def k(self) -> float:
        return sum(self.top_k) / len(self.top_k)


class KSampler:
    """The seeded draws of an `ElasticConfig` for a model with `n_layers` MoE layers and default top_k `top_k`."""

    def __init__(self, cfg: ElasticConfig, n_layers: int, top_k: int):
        cfg.check_model(top_k)
        self.cfg, self.n_layers, self.top_k = cfg, n_layers, top_k
        self.seed = cfg.seed
        p = np.asarray(cfg.probs or [1.0] * len(cfg.ks), dtype=np.float64)
        self.p = p / p.sum() if len(p) else p

    def passes(self, step: int) -> list[Pass]:
        """The passes of optimizer step `step` (one, or n_sampled + 2 for sandwich)."""
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, step])
        ks = np.asarray(cfg.ks)
        if cfg.mode == "fixed":
            layer_ks = [[cfg.ks[0] if cfg.ks else self.top_k] * self.n_layers]
        elif cfg.mode == "sample":
            layer_ks = [[int(rng.choice(ks, p=self.p))] * self.n_layers]
        elif cfg.mode == "sample_per_layer":
            layer_ks = [[int(k) for k in rng.choice(ks, size=self.n_layers, p=self.p)]]
        else:
            drawn = [int(k) for k in rng.choice(ks, size=cfg.n_sampled, p=self.p)]
            layer_ks = [[k] * self.n_layers for k in [max(cfg.ks), min(cfg.ks), *drawn]]
        out = []
        for i, top_k in enumerate(layer_ks):
            kinds = []
            for kind, budget in sorted(cfg.kind_ks.items()):
                if cfg.mode == "sandwich" and i < 2:
                    kinds.append((kind, max(budget) if i == 0 else min(budget)))
                else:
                    kinds.append((kind, int(rng.choice(budget))))
            out.append(Pass(tuple(top_k), tuple(kinds)))
        return out

    def state_dict(self) -> dict:
        """JSON-able: the draws of step s depend only on (seed, s), so the seed is the whole generator state."""
        return {"seed": self.seed, "config": asdict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])


def apply(model, p: Pass) -> None:
    """Sets the pass's k on the model as data (buffer fills: no recompile, no shape change)."""
    from molmo_fast import knobs

    knobs.set_top_k(model, list(p.top_k))
    for kind, k in p.kinds:
        knobs.set_top_k(model, k, kind=kind)


def restore(model, cfg: ElasticConfig) -> None:
    """Back to the model's default k and no kind caps (for what runs after training: export, eval)."""
    from molmo_fast import knobs

    knobs.set_top_k(model, model.config.moe.top_k)
    for kind in cfg.kind_ks:
        knobs.set_top_k(model, model.config.moe.num_experts, kind=kind)  # a cap of E = no cap


def step_metrics(cfg: ElasticConfig, passes: list[Pass], pass_losses: list[float]) -> dict[str, float]:
    """`train/top_k` (mean k over the step's passes and layers), per layer when layers draw their own, each kind's
    mean budget, and for sandwich the loss at each trained k (`train/loss_k{k}`, averaged over repeats of a k)."""
    out = {"train/top_k": sum(p.k for p in passes) / len(passes)}
    if cfg.mode == "sample_per_layer":
        for layer in range(len(passes[0].top_k)):
            out[f"train/top_k/layer{layer}"] = sum(p.top_k[layer] for p in passes) / len(passes)
    for kind in cfg.kind_ks:
        out[f"train/top_k_{kind}"] = sum(dict(p.kinds)[kind] for p in passes) / len(passes)
    if cfg.mode == "sandwich":
        by_k: dict[int, list[float]] = {}
        for p, loss in zip(passes, pass_losses, strict=True):
            by_k.setdefault(p.top_k[0], []).append(loss)
        out.update({f"train/loss_k{k}": sum(v) / len(v) for k, v in sorted(by_k.items())})
    return out


def record(model_config, cfg: ElasticConfig) -> None:
    """Writes the training routing into a `MolmoEConfig` (renormalised weights + the policy, as a config.json field)
    before the run's model config is saved; a default policy leaves the config untouched."""
    if cfg.is_default:
        return
    model_config.moe.normalize_weights = cfg.renorm
    model_config.hf_extra[CONFIG_KEY] = asdict(cfg)
