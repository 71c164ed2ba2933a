"""What one eval run does: `EvalConfig`, bound by gin files (gin/eval/*.gin) and overridden by command-line flags.

Field comments are the CLI's help text (`python -m molmo_fast.eval --help`)."""

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
    tasks: str | list[str] = ""  # "chart_qa,doc_qa", or the suites "paper" / "synthetic"
    out: str = "runs/eval"
    data_dir: str = "data"  # task shards live at {data_dir}/{source}/{split}
    step: int | None = None  # a run directory's checkpoint step; None = latest
    max_examples: int | None = None  # per task, the first N of the shard set
    batch_size: int = 8
    num_workers: int = 0
    device: str = "auto"
    dtype: str = "float32"  # Molmo evaluates in fp32
    top_k: int | list[int] | None = None  # MoE experts per token (knob); None = the checkpoint's
    knobs: list[str] = field(default_factory=list)  # molmo_fast.knobs strings: "routing=top_p:0.9", "skip_blocks=3"
    max_crops: int | None = None  # overrides every task's crop setting (knob)
    max_new_tokens: int | None = None  # overrides every task's generation length
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
