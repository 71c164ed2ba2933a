"""The runtime layer shared by eval and train: what running a model needs, but not training it.

`device` (process group, per-rank device, dtypes, host -> device copies), `parallelize` (FSDP2 + activation
checkpointing + compile), `loss` (loss positions, masked cross-entropy, token accuracy), `checkpoints` (finding a
run's checkpoints, resolving a run dir / HF dir / step to a loadable HF dir), `export` (HF layout out of a run)
and `gin_files` (gin search paths). It sits on model and data and imports neither eval nor train, so eval can
stay free of the training stack and the trainer can run eval.
"""
