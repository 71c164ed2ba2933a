"""Training step with per-block vs whole-model torch.compile (TrainConfig.compile / TrainConfig.compile_model).

    python bench/train_compile.py --device cpu --override n_layers=8 --override d_model=512 ...
    python bench/train_compile.py                     # CUDA: molmoe-1b, seq 2304, bf16

The model goes through the trainer's own `runtime.parallelize` (one-rank FSDP2, activation checkpointing per block
as `--activation_checkpointing` says -- never with whole-model compile, which TrainConfig refuses -- then the compile
switch) and the trainer's loss (`micro_batch_loss`), so each mode is what training runs. Dropout is on (train mode),
and inductor draws its own random numbers, so losses are not comparable across modes.
One step = forward + backward of one synthetic micro-batch (bench/train_step.py's Molmo-shaped batch); the first
`--warmup` steps (which compile) are timed separately; then the median of `--steps` steps.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import synthetic_batch  # noqa: E402

from molmo_fast.config import MolmoEConfig  # noqa: E402
from molmo_fast.model.molmoe import MolmoE  # noqa: E402
from molmo_fast.runtime.loss import loss_positions  # noqa: E402
from molmo_fast.runtime.parallelize import parallelize  # noqa: E402
from molmo_fast.train import checkpoint as ckpt  # noqa: E402
from molmo_fast.train.trainer import micro_batch_loss  # noqa: E402

# Whole-model compile runs without activation checkpointing, as TrainConfig requires for it.
MODES = {"eager": {}, "blocks": {"compile_blocks": True},
         "model": {"compile_model": True, "activation_checkpointing": False}}


def build(cfg: MolmoEConfig, device: torch.device, mode: str, bf16: bool, checkpointing: bool) -> MolmoE:
    state = MolmoE.from_config_on_meta(cfg).init_weights(seed=0).state_dict()
    model = MolmoE.from_config_on_meta(cfg)
    switches = {"activation_checkpointing": checkpointing, "compile_blocks": False, "compile_model": False}
    parallelize(model, device, bf16=bf16, **{**switches, **MODES[mode]})
    model.to_empty(device=device)
    ckpt.load_full_state_dict(model, state)
    model.reset_runtime_buffers()
    return model.train()


def bench_mode(args, cfg: MolmoEConfig, mode: str, device: torch.device) -> dict:
    torch._dynamo.reset()
    model = build(cfg, device, mode, device.type == "cuda", args.activation_checkpointing)
    batch = synthetic_batch(cfg, args.micro_batch, args.seq_len, device)
    batch.update(loss_positions(batch))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> float:
        start = time.perf_counter()
        loss, _, _ = micro_batch_loss(model, batch, batch["loss_tokens"], 1e-4, 1, want_router=False)
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    warmup_s = sum(step() for _ in range(args.warmup))
    times = [step() for _ in range(args.steps)]
    return {"mode": mode, "warmup_s": warmup_s, "median_step_s": statistics.median(times), "min_step_s": min(times)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/train_compile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="molmoe-1b", help="config preset (molmoe-1b, tiny)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="HF config.json field over the preset (JSON value), repeatable")
    p.add_argument("--modes", default="eager,blocks,model", help=f"comma-separated, of {sorted(MODES)}")
    p.add_argument("--seq_len", type=int, default=2304, help="tokens per row")
    p.add_argument("--micro_batch", type=int, default=1, help="rows per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (they compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--activation_checkpointing", type=int, choices=(0, 1), default=1,
                   help="per-block activation checkpointing in the eager / blocks modes (default 1)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    cfg = MolmoEConfig.from_name(args.preset).with_overrides(args.override)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=0, world_size=1,
                                init_method=f"file://{os.path.join(tmp, 'pg')}")
        try:
            rows = []
            for mode in args.modes.split(","):
                try:
                    rows.append(bench_mode(args, cfg, mode, device))
                except Exception as e:  # one failing mode must not hide the others
                    rows.append({"mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            dist.destroy_process_group()
    env = {"device": args.device, "preset": args.preset, "overrides": args.override, "seq_len": args.seq_len,
           "activation_checkpointing": args.activation_checkpointing,
           "micro_batch": args.micro_batch, "torch": torch.__version__}
    print("# " + json.dumps(env))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
