"""Training configuration: gin binds these dataclasses, `load_config` resolves them into plain values.

Nothing gin-shaped leaves this module: `load_config` parses the gin files, builds each dataclass once (so a bad
binding or value fails here, at start, naming it) and returns a `Config` of plain dataclasses that pickle into
DataLoader workers under any start method.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gin

from molmo_fast import kernels
from molmo_fast.eval.config import EvalConfig
from molmo_fast.eval.tasks import parse_tasks
from molmo_fast.runtime.gin_files import parse_gin
from molmo_fast.train.elastic import ElasticConfig
from molmo_fast.typecheck import check_fields

# The optimizer's parameter groups (molmo_fast/train/optim.py), keys of OptimConfig.lr / warmup.
GROUPS = ("vit", "connector", "llm")


def _require(cond: bool, cls: str, name: str, value: Any, expected: str) -> None:
    if not cond:
        raise ValueError(f"{cls}.{name} = {value!r}: expected {expected}")


@gin.configurable
@dataclass
class ModelConfig:
    """Which MolmoE to train and where its initial weights come from.

    `preset` names a `MolmoEConfig` preset; `hf_overrides` are HF config.json keys applied on top (use
    `vision_backbone.KEY` for the vision tower). `init_from` is an HF MolmoE checkpoint directory; `llm_from` /
    `vit_from` initialise the LLM from an HF OLMoE directory and the ViT from an HF CLIP directory instead.
    `init_scheme` selects `MolmoE.init_weights`'s scheme for a fresh model: "fan_in" gives the ViT + connector
    linears std 1/sqrt(fan_in) instead of 0.02, which tiny from-scratch models need (see `init_weights`).
    """

    preset: str = "tiny"
    hf_overrides: dict = field(default_factory=dict)
    init_from: str | None = None
    llm_from: str | None = None
    vit_from: str | None = None
    init_seed: int = 6198
    init_scheme: str = "default"
    moe_impl: str = "auto"

    def __post_init__(self):
        check_fields(self)
        from molmo_fast.model.molmoe import INIT_SCHEMES

        _require(self.init_scheme in INIT_SCHEMES, "ModelConfig", "init_scheme", self.init_scheme,
                 f"one of {INIT_SCHEMES}")
        _require(not (self.init_from and (self.llm_from or self.vit_from)), "ModelConfig", "init_from",
                 self.init_from, "either init_from or llm_from/vit_from, not both")
        _require(self.moe_impl in kernels.IMPLS, "ModelConfig", "moe_impl", self.moe_impl,
                 f"one of {kernels.IMPLS}")
        for name in ("init_from", "llm_from", "vit_from"):
            path = getattr(self, name)
            _require(path is None or (Path(path) / "config.json").is_file(), "ModelConfig", name, path,
                     "an HF checkpoint directory with config.json")

    def build_config(self):
        """The `MolmoEConfig`: the HF checkpoint's own config when initialising from one, else preset + overrides."""
        from molmo_fast.config import MolmoEConfig

        if self.init_from:
            base = MolmoEConfig.from_hf_json(self.init_from).to_hf_dict()
            source = self.init_from
        else:
            base = MolmoEConfig.from_name(self.preset).to_hf_dict()
            source = f"preset {self.preset!r}"
        for key, value in self.hf_overrides.items():
            container, leaf = base, key
            if key.startswith("vision_backbone."):
                container, leaf = base["vision_backbone"], key.split(".", 1)[1]
            _require(leaf in container, "ModelConfig", "hf_overrides", key,
                     f"a key of the HF config.json of {source}")
            container[leaf] = list(value) if isinstance(value, tuple) else value
        cfg = MolmoEConfig.from_hf_dict(base, source=f"{source} + ModelConfig.hf_overrides")
        cfg.moe.impl = self.moe_impl
        return cfg


@gin.configurable
@dataclass
class DataConfig:
    """Training data: named shard sets mixed by explicit rates or Molmo's root-size rule, then preprocessed.

    `shards` maps a name to a shard directory. `synthetic` maps synthetic source names to example counts; those
    sets are generated under `synthetic_dir` on first use and join `shards` under their own names. Mixing: `groups`
    (`{group: (weight, [names])}`, sqrt-size within a group, `size_overrides` capping sizes) if given, else `rates`
    (`{name: rate}`), else uniform. `preprocessor` is a directory of release files; `image_overrides` are
    preprocessor_config.json keys applied on top (e.g. a small crop size for CPU runs) and `max_crops`, when set,
    overrides its tile count (batches hold the global view + max_crops tiles). With
    `world_independent`, every rank reads the one global stream and keeps its slice, so the batches of a step do
    not depend on the world size (at the cost of redundant preprocessing; meant for tests and reproductions).
    """

    shards: dict = field(default_factory=dict)
    synthetic: dict = field(default_factory=dict)
    synthetic_dir: str = "data/synthetic"
    synthetic_seed: int = 0
    rates: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    size_overrides: dict = field(default_factory=dict)
    preprocessor: str = "molmo_fast/assets/molmoe-1b"
    image_overrides: dict = field(default_factory=dict)
    sequence_length: int = 2304
    max_crops: int | None = None
    num_workers: int = 2
    seed: int = 95818
    shuffle_buffer: int = 500
    world_independent: bool = False

    def __post_init__(self):
        check_fields(self)
        names = set(self.shards) | set(self.synthetic)
        _require(bool(names), "DataConfig", "shards", self.shards,
                 "at least one shard directory (or DataConfig.synthetic)")
        for name, n in self.synthetic.items():
            _require(isinstance(n, int) and n > 0, "DataConfig", "synthetic", {name: n}, "positive example counts")
        for name, rate in self.rates.items():
            _require(name in names, "DataConfig", "rates", name, f"one of the shard set names {sorted(names)}")
            _require(isinstance(rate, (int, float)) and rate >= 0, "DataConfig", "rates", {name: rate},
                     "non-negative rates")
        # The Mixture needs a rate for every set; failing there would leave a half-made run directory behind.
        _require(not self.rates or (set(self.rates) == names and sum(self.rates.values()) > 0), "DataConfig",
                 "rates", self.rates, f"a rate for every shard set {sorted(names)}, not all 0")
        grouped = [n for _, members in self.groups.values() for n in members]
        for name in grouped:
            _require(name in names, "DataConfig", "groups", name, f"one of the shard set names {sorted(names)}")
        _require(not self.groups or sorted(grouped) == sorted(names), "DataConfig", "groups", sorted(grouped),
                 f"every shard set in exactly one group: {sorted(names)}")
        for name in self.size_overrides:
            _require(name in names, "DataConfig", "size_overrides", name, f"one of the shard set names {sorted(names)}")
        _require(self.sequence_length > 0, "DataConfig", "sequence_length", self.sequence_length, "> 0")
        _require(self.num_workers >= 0, "DataConfig", "num_workers", self.num_workers, ">= 0")
        check_shard_sets(self.shards)


def check_shard_sets(shards: dict) -> None:
    """Every configured shard set must be built (shards + sizes.json): checked when the config resolves, so a
    missing set fails in seconds, before a run directory exists or a model is built, with the command to build it.
    Set names are `python -m molmo_fast.data.build` source names in the recipes."""
    from molmo_fast.data.shards import read_sizes

    problems = []
    for name, path in shards.items():
        try:
            why = "" if read_sizes(path) else "its sizes.json lists no shards"
        except (FileNotFoundError, ValueError) as e:
            why = "no such directory" if not Path(path).is_dir() else str(e)
        if why:
            problems.append(f"DataConfig.shards[{name!r}] = {str(path)!r}: {why}; build it with "
                            f"`python -m molmo_fast.data.build --source {name} --out {path}`")
    if problems:
        raise ValueError("shard set(s) not built:\n  " + "\n  ".join(problems))


@gin.register
def shard_dirs(root: str, names: list) -> dict:
    """`{name: root/name}` for the shard sets listed in `names` (a list, or a list of lists, of names)."""
    flat = [n for item in names for n in (item if isinstance(item, (list, tuple)) else [item])]
    return {name: str(Path(root) / name) for name in flat}


@gin.configurable
@dataclass
class OptimConfig:
    """AdamW over vit / connector / llm groups. `lr` (peak) and `warmup` (steps) per group are the recipe's: every
    gin recipe states them (gin/pixmo.gin has Molmo's pre-training values)."""

    lr: dict = gin.REQUIRED
    warmup: dict = gin.REQUIRED
    final_lr_ratio: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Molmo's ft_embedding="lm_head": the base token table stays frozen, the new (additional) rows train.
    freeze: tuple = ("llm.wte.embedding",)
    connector_params: tuple = ("connector.*", "llm.wte.new_embedding")
    vit_params: tuple = ("vit.*",)

    def __post_init__(self):
        check_fields(self)
        for name in ("lr", "warmup"):
            value = getattr(self, name)
            _require(set(value) == set(GROUPS), "OptimConfig", name, value,
                     f"a dict with exactly the keys {list(GROUPS)}")
            _require(all(v >= 0 for v in value.values()), "OptimConfig", name, value, "non-negative values")
        _require(0 <= self.final_lr_ratio <= 1, "OptimConfig", "final_lr_ratio", self.final_lr_ratio, "in [0, 1]")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "OptimConfig", "betas", self.betas,
                 "two values in [0, 1)")
        self.betas, self.freeze = tuple(self.betas), tuple(self.freeze)
        self.connector_params, self.vit_params = tuple(self.connector_params), tuple(self.vit_params)


@gin.configurable
@dataclass
class TrainConfig:
    """The loop: batch geometry, losses, precision/parallelism switches, cadences and the run directory.
    `run_dir`, `max_steps` and `global_batch_size` are the recipe's (required)."""

    run_dir: str = gin.REQUIRED
    max_steps: int = gin.REQUIRED
    global_batch_size: int = gin.REQUIRED
    micro_batch_size: int = 4
    seed: int = 6198
    lm_zloss_weight: float = 1e-4
    moe_lb_weight: float = 0.0
    moe_zloss_weight: float = 0.0
    activation_checkpointing: bool = True
    compile: bool = False  # torch.compile each ViT / LLM block
    compile_model: bool = False  # torch.compile the whole model's forward instead (see runtime/parallelize.py)
    # Reduce-scatter once per step instead of per micro-batch: less traffic, but unsharded gradients of the whole
    # model are held on every rank during accumulation (tens of GB for molmoe-1b).
    defer_grad_sync: bool = False
    bf16: bool = True  # bf16 compute with fp32 master weights and reductions; ignored on CPU
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_last: int = 3
    export_hf_at_end: bool = True
    progress_bar: bool = True
    peak_flops: float | None = None  # per device; None = looked up from the device name
    # In-loop validation (molmo_fast/train/validation.py): every `eval_every` steps (0 = never) and at the last
    # step, the eval tasks `eval_tasks` (names as for `python -m molmo_fast.eval --tasks`) on the first
    # `eval_max_examples` examples each (None = all), shard sets under `eval_data_dir`; `eval_loss` reports
    # teacher-forced loss and token accuracy instead of generating.
    eval_every: int = 0
    eval_tasks: str = ""
    eval_max_examples: int | None = 64
    eval_batch_size: int = 8
    eval_loss: bool = False
    eval_data_dir: str = "data"

    def __post_init__(self):
        check_fields(self)
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "log_every", "checkpoint_every",
                     "keep_last"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, "TrainConfig", name, value, "a positive int")
        for name in ("lm_zloss_weight", "moe_lb_weight", "moe_zloss_weight"):
            _require(getattr(self, name) >= 0, "TrainConfig", name, getattr(self, name), ">= 0")
        _require(isinstance(self.eval_every, int) and self.eval_every >= 0, "TrainConfig", "eval_every",
                 self.eval_every, "an int >= 0 (0 = no in-loop validation)")
        if self.eval_every:
            try:  # the validation's settings, checked now rather than at its first step
                EvalConfig(checkpoint=self.run_dir, tasks=self.eval_tasks, data_dir=self.eval_data_dir,
                           max_examples=self.eval_max_examples, batch_size=self.eval_batch_size, loss=self.eval_loss)
            except ValueError as e:
                raise ValueError(f"TrainConfig.eval_* (in-loop validation): {e}") from None
            for task in parse_tasks(self.eval_tasks):
                shards = Path(self.eval_data_dir) / task.source / task.split
                _require(task.synthetic_size > 0 or (shards / "sizes.json").is_file(), "TrainConfig", "eval_tasks",
                         task.name, f"a built shard set at {shards} (python -m molmo_fast.data.build --source "
                         f"{task.source} --split {task.split} --out {shards}), or TrainConfig.eval_data_dir")
        _require(not (self.compile and self.compile_model), "TrainConfig", "compile_model", self.compile_model,
                 "False when TrainConfig.compile (per block) is set: one compile switch at a time")
        # The per-block checkpoint recomputes the block eagerly; its saved tensors differ from the compiled graph's.
        _require(not (self.compile_model and self.activation_checkpointing), "TrainConfig", "compile_model",
                 self.compile_model, "False with activation_checkpointing = True (set that False to compile the model)")

    def grad_accum_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        _require(self.global_batch_size % per_step == 0, "TrainConfig", "global_batch_size",
                 self.global_batch_size, f"a multiple of micro_batch_size x world size = {per_step}")
        return self.global_batch_size // per_step


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    gin_config: str = ""  # every binding parsed (written to RUN_DIR/config.gin)

    def to_dict(self) -> dict:
        return {k: dataclasses.asdict(getattr(self, k)) for k in ("model", "data", "optim", "train", "elastic")}


def load_config(gin_files: list[str], gin_params: list[str] | None = None) -> Config:
    """Parses gin files + bindings (see `parse_gin`) and builds every config object now, so a bad binding fails
    at start."""
    try:
        parse_gin(gin_files, gin_params)
        cfg = Config(model=ModelConfig(), data=DataConfig(), optim=OptimConfig(), train=TrainConfig(),
                     elastic=ElasticConfig())
    except (ValueError, KeyError, TypeError, OSError, SyntaxError, RuntimeError) as e:
        raise SystemExit(f"molmo_fast.train: bad configuration: {e}") from e
    cfg.gin_config = gin.config_str()
    return cfg
