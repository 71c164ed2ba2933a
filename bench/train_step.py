"""Training-step throughput of MolmoE on one device: tokens/s, MFU (active parameters) and peak memory.

    python bench/train_step.py                                  # molmoe-1b, seq 2304, every MoE impl, eager + compiled
    python bench/train_step.py --impls loop,triton --modes eager --micro_batch 2
    python bench/train_step.py --preset tiny --device cpu --seq_len 128 --impls loop,grouped_mm --steps 2   # smoke

One step = forward + backward of one micro-batch through the trainer's own loss (`micro_batch_loss`, LM head on the
loss positions only) with activation checkpointing per block, as in training; random init, bf16 weights on CUDA
(the 7B-parameter model plus AdamW state does not fit one GPU, so the optimizer step is left out: it is a
memory-bound elementwise pass over the sharded parameters in a real run). Each row: MoE impl x eager/compiled.
"""

import argparse
import json
import time

import torch

from molmo_fast.config import MolmoEConfig
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.train.config import TrainConfig
from molmo_fast.train.metrics import FlopCounter, peak_flops
from molmo_fast.train.trainer import loss_positions, micro_batch_loss


def synthetic_batch(cfg: MolmoEConfig, batch: int, seq_len: int, device: torch.device, seed: int = 0) -> dict:
    """A Molmo-shaped batch: image tokens first (max_crops + 1 crops), then text with the last 40% as answers."""
    g = torch.Generator().manual_seed(seed)
    pool = cfg.connector.pool_h * cfg.connector.pool_w
    tokens_per_crop = cfg.vision.num_patches // pool
    crops = max(1, min(cfg.connector.max_crops + 1, (seq_len // 2) // tokens_per_crop))
    n_image = crops * tokens_per_crop
    input_ids = torch.randint(0, cfg.llm.vocab_size, (batch, seq_len), generator=g)
    labels = torch.randint(0, cfg.llm.vocab_size, (batch, seq_len), generator=g)
    loss_masks = torch.zeros(batch, seq_len)
    loss_masks[:, int(seq_len * 0.6):] = 1.0
    image_input_idx = (1 + torch.arange(n_image)).view(1, crops, tokens_per_crop).expand(batch, -1, -1)
    out = {
        "input_ids": input_ids, "labels": labels, "loss_masks": loss_masks,
        "position_ids": torch.arange(seq_len).expand(batch, -1),
        "images": torch.randn(batch, crops, cfg.vision.num_patches, cfg.vision.patch_dim, generator=g),
        "image_masks": torch.ones(batch, crops, cfg.vision.num_patches),
        "image_input_idx": image_input_idx.contiguous(),
    }
    return {k: v.to(device) for k, v in out.items()}


def build(preset: str, impl: str, device: torch.device, dtype: torch.dtype, compiled: bool) -> MolmoE:
    from torch.distributed._composable import checkpoint

    cfg = MolmoEConfig.from_name(preset)
    cfg.moe.impl = impl
    model = MolmoE.from_config_on_meta(cfg).init_weights(seed=0, device=device).to(dtype).train()
    for blocks in (model.vit.blocks, model.llm.blocks):
        for block in blocks:
            checkpoint(block)
            if compiled:
                block.compile()
    return model


def bench_one(args, impl: str, compiled: bool, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.preset, impl, device, dtype, compiled)
    batch = synthetic_batch(model.config, args.micro_batch, args.seq_len, device)
    batch.update(loss_positions(batch))
    divisor = batch["loss_tokens"]

    def step():
        loss, _, _ = micro_batch_loss(model, batch, divisor, TrainConfig.lm_zloss_weight, 1, want_router=False)
        loss.backward()
        model.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = (time.perf_counter() - start) / args.steps
    tokens = args.micro_batch * args.seq_len
    n_active = model.num_parameters(active=True)
    flops = FlopCounter(model)(args.micro_batch, args.seq_len, batch["images"].shape[0] * batch["images"].shape[1],
                               batch["loss_at"].numel())
    peak = peak_flops(device, args.peak_flops)
    row = {"impl": impl, "mode": "compiled" if compiled else "eager", "step_s": elapsed,
           "tokens_per_s": tokens / elapsed, "mfu_pct": 100 * flops / elapsed / peak if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
           "active_params_m": n_active / 1e6}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="molmoe-1b")
    p.add_argument("--seq_len", type=int, default=2304)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--impls", default="loop,grouped_mm,triton")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak_flops", type=float, default=None, help="device peak FLOP/s for MFU (default: lookup)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for impl in args.impls.split(","):
        for mode in args.modes.split(","):
            try:
                row = bench_one(args, impl, mode == "compiled", device)
            except Exception as e:  # one failing variant (e.g. OOM of the eager loop) must not hide the others
                row = {"impl": impl, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r for r in rows if r.get("impl") == "loop" and r.get("mode") == "eager" and "error" not in r), None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{args.preset}, seq {args.seq_len}, micro-batch {args.micro_batch}, {name}")
    print(f"{'impl':<12}{'mode':<10}{'step s':>9}{'tokens/s':>11}{'MFU %':>8}{'peak GiB':>10}{'vs loop':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<12}{r['mode']:<10}  {r['error']}")
            continue
        speedup = f"{base['step_s'] / r['step_s']:.2f}x" if base else "-"
        mfu = f"{r['mfu_pct']:.1f}" if r["mfu_pct"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['impl']:<12}{r['mode']:<10}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}{mfu:>8}{mem:>10}"
              f"{speedup:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
