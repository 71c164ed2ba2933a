"""What one eval run does: `EvalConfig`, bound by gin files (gin/eval/*.gin) and overridden by command-line flags;
`FIELD_HELP` documents each field and is the CLI's help text (`python -m molmo_fast.eval --help`)."""

from dataclasses import dataclass, field

import gin

from molmo_fast import knobs
from molmo_fast.eval.tasks import parse_tasks
from molmo_fast.runtime.device import DTYPES

DEVICE_FIELD = "EvalConfig.device (--device)"  # how device errors name the setting


@gin.configurable
@dataclass
class EvalConfig:
    """One eval invocation; gin files bind it, command-line flags override (see `python -m molmo_fast.eval`)."""

    checkpoint: str = ""
    tasks: str | list[str] = ""
    out: str = "runs/eval"
    data_dir: str = "data"
    step: int | None = None
    max_examples: int | None = None
    batch_size: int = 8
    num_workers: int = 0
    device: str = "auto"
    dtype: str = "float32"  # Molmo evaluates in fp32
    top_k: int | list[int] | None = None
    knobs: list[str] = field(default_factory=list)
    max_crops: int | None = None
    max_new_tokens: int | None = None
    loss: bool = False
    fsdp: bool = False
    overwrite: bool = False
    synthetic_seed: int = 0  # held out from training by the split name ("validation"), not the seed

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError("EvalConfig.checkpoint is required (an HF checkpoint dir or a training run dir)")
        if not self.tasks:
            raise ValueError("EvalConfig.tasks is required, e.g. 'chart_qa,doc_qa' or 'synthetic'")
        try:
            parse_tasks(self.tasks)
        except KeyError as e:
            raise ValueError(f"EvalConfig.tasks = {self.tasks!r}: {e.args[0]}") from None
        if self.dtype not in DTYPES:
            raise ValueError(f"EvalConfig.dtype = {self.dtype!r}, expected one of {sorted(DTYPES)}")
        parsed = knobs.Knobs.parse(self.knobs)
        for name in ("top_k", "max_crops", "max_new_tokens"):  # a knob string fills an unset explicit field
            if getattr(self, name) is None:
                setattr(self, name, getattr(parsed, name))
        for name in ("batch_size", "max_examples", "max_crops", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"EvalConfig.{name} = {value}, expected >= 1")


FIELD_HELP = {
    "checkpoint": "HF checkpoint dir, or a training run dir (its end-of-run export or latest checkpoint; see --step)",
    "tasks": "comma-separated task names, or the suites 'paper' / 'synthetic' (--list shows every task)",
    "out": "output dir: OUT/{task}/ (settings, predictions, metrics), OUT/metrics.json, TensorBoard OUT/tb/",
    "data_dir": "root of the task shard sets, read at DATA_DIR/{source}/{split} (--list shows each task's source)",
    "step": "checkpoint step of a run dir (default: the latest)",
    "max_examples": "evaluate the first N examples of each task's shard set (default: all)",
    "batch_size": "examples per batch and rank",
    "num_workers": "data loader worker processes per rank",
    "device": "auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK), or cuda:N for a single process",
    "dtype": "weights and compute dtype (Molmo evaluates in float32)",
    "top_k": "MoE experts per token, K for every layer or K0,K1,... per layer (default: the checkpoint's)",
    "knobs": "runtime knob KEY=VALUE of molmo_fast/knobs.py, e.g. routing=top_p:0.9 or skip_blocks=3,7; repeatable",
    "max_crops": "image crops for every task, overriding each task's resolution setting",
    "max_new_tokens": "generation length for every task, overriding each task's",
    "loss": "report teacher-forced loss and token accuracy (OUT/{task}_loss/) instead of generating",
    "fsdp": "shard the model across the torchrun ranks (FSDP2) instead of a full copy per rank",
    "overwrite": "discard this run's earlier results in OUT instead of resuming them",
    "synthetic_seed": "seed of generated synthetic task shards",
}
