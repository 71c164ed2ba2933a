"""Training-step cost of MolmoE on one device, per MoE impl side by side: step time, page faults, memory, MFU.

    python bench/train_step.py                          # CUDA: molmoe-1b, seq 2304, loop / grouped_mm / triton x modes
    python bench/train_step.py --device cpu             # CPU: the mid preset, batch 8 x 256, loop / grouped_mm / cpu
    python bench/train_step.py --device cpu --preset tiny --steps 3 --warmup 1        # seconds-long smoke run

One step = forward + backward of one micro-batch through the trainer's own loss (`micro_batch_loss`, LM head on the
loss positions only), then `zero_grad(set_to_none=True)` as the optimizer would; random init, bf16 weights on CUDA,
fp32 on CPU. The optimizer step is left out (a memory-bound elementwise pass; the 7B-parameter model plus AdamW state
does not fit one GPU). Activation checkpointing per block is on by default on CUDA (as in training at scale) and off
on CPU (as in gin/tiny.gin). All impls share one model (same weights; `MoE.impl` is switched between steps) and run
interleaved, one step each per round, so machine load hits them alike. Per row: step time min / median / max, minor
page faults per step (getrusage), peak RSS during its steps (CPU) or peak allocated memory (CUDA), MFU on CUDA.
Presets: the config presets (molmoe-1b, tiny) plus `mid` (tiny's vision tower with d_model 512, 4 layers, 64
experts top-8, expert width 512) and `demo` (gin/demo.gin's model: run it with --seq_len 48 --micro_batch 32
--answer_frac 0.04).
"""

import argparse
import json
import os

import torch

from molmo_fast.config import MolmoEConfig
from molmo_fast.model.moe import MoE
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.train.config import TrainConfig
from molmo_fast.train.metrics import FlopCounter, peak_flops
from molmo_fast.train.trainer import loss_positions, micro_batch_loss

BENCH_PRESETS = {
    "mid": ("tiny", {"d_model": 512, "n_heads": 8, "n_layers": 4, "moe_num_experts": 64, "moe_top_k": 8,
                     "mlp_hidden_size": 1024}),  # SwiGLU input width 1024: expert width 512
    "demo": ("tiny", {"vocab_size": 50280, "embedding_size": 50304, "max_crops": 1}),  # gin/demo.gin's model
}


def model_config(preset: str) -> MolmoEConfig:
    if preset not in BENCH_PRESETS:
        return MolmoEConfig.from_name(preset)
    base, overrides = BENCH_PRESETS[preset]
    d = MolmoEConfig.from_name(base).to_hf_dict()
    d.update(overrides)
    return MolmoEConfig.from_hf_dict(d, source=f"bench preset {preset!r}")


def synthetic_batch(cfg: MolmoEConfig, batch: int, seq_len: int, device: torch.device, seed: int = 0,
                    answer_frac: float = 0.4) -> dict:
    """A Molmo-shaped batch: image tokens first (max_crops + 1 crops), then text with the last `answer_frac` as
    answers (the loss positions)."""
    g = torch.Generator().manual_seed(seed)
    pool = cfg.connector.pool_h * cfg.connector.pool_w
    tokens_per_crop = cfg.vision.num_patches // pool
    crops = max(1, min(cfg.connector.max_crops + 1, (seq_len // 2) // tokens_per_crop))
    n_image = crops * tokens_per_crop
    input_ids = torch.randint(0, cfg.llm.vocab_size, (batch, seq_len), generator=g)
    labels = torch.randint(0, cfg.llm.vocab_size, (batch, seq_len), generator=g)
    loss_masks = torch.zeros(batch, seq_len)
    loss_masks[:, int(seq_len * (1 - answer_frac)):] = 1.0
    image_input_idx = (1 + torch.arange(n_image)).view(1, crops, tokens_per_crop).expand(batch, -1, -1)
    out = {
        "input_ids": input_ids, "labels": labels, "loss_masks": loss_masks,
        "position_ids": torch.arange(seq_len).expand(batch, -1),
        "images": torch.randn(batch, crops, cfg.vision.num_patches, cfg.vision.patch_dim, generator=g),
        "image_masks": torch.ones(batch, crops, cfg.vision.num_patches),
        "image_input_idx": image_input_idx.contiguous(),
    }
    return {k: v.to(device) for k, v in out.items()}


def build(cfg: MolmoEConfig, device: torch.device, dtype: torch.dtype, compiled: bool, checkpointing: bool) -> MolmoE:
    from torch.distributed._composable import checkpoint

    model = MolmoE.from_config_on_meta(cfg).init_weights(seed=0, device=device).to(dtype).train()
    for blocks in (model.vit.blocks, model.llm.blocks):
        for block in blocks:
            if checkpointing:
                checkpoint(block)
            if compiled:
                block.compile()
    return model


def set_impl(model: MolmoE, impl: str) -> None:
    for module in model.modules():
        if isinstance(module, MoE):
            module.impl = impl


def bench_mode(args, cfg: MolmoEConfig, impls: list[str], compiled: bool, device: torch.device) -> list[dict]:
    """Every impl on one model, interleaved step by step."""
    # bench/ is on sys.path when this runs as a script
    from cpu_measure import measure_interleaved

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(cfg, device, dtype, compiled, args.checkpointing)
    batch = synthetic_batch(cfg, args.micro_batch, args.seq_len, device, answer_frac=args.answer_frac)
    batch.update(loss_positions(batch))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step_fn(impl):
        def step():
            set_impl(model, impl)
            loss, _, _ = micro_batch_loss(model, batch, batch["loss_tokens"], TrainConfig.lm_zloss_weight, 1,
                                          want_router=False)
            loss.backward()
            model.zero_grad(set_to_none=True)
            sync()
        return step

    fns = {impl: step_fn(impl) for impl in impls}
    stats = measure_interleaved(fns, args.steps, args.warmup)
    flops = FlopCounter(model)(args.micro_batch, args.seq_len, batch["images"].shape[0] * batch["images"].shape[1],
                               batch["loss_at"].numel())
    peak = peak_flops(device, args.peak_flops)
    rows = []
    for impl, st in stats.items():
        row = {"impl": impl, "mode": "compiled" if compiled else "eager", **st,
               "tokens_per_s": args.micro_batch * args.seq_len / st["median_s"],
               "mfu_pct": 100 * flops / st["median_s"] / peak if peak else None,
               "active_params_m": model.num_parameters(active=True) / 1e6}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fns[impl]()
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
    return rows


def print_table(rows: list[dict], header: str) -> None:
    base = {r["mode"]: r for r in rows if r["impl"] == "loop" and "error" not in r}
    print(f"\n{header}")
    print(f"{'impl':<12}{'mode':<10}{'min s':>8}{'median s':>10}{'max s':>8}{'faults/step':>13}{'peak RSS MiB':>14}"
          f"{'GPU GiB':>9}{'MFU %':>7}{'vs loop':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<12}{r['mode']:<10}  {r['error']}")
            continue
        b = base.get(r["mode"])
        speedup = f"{b['median_s'] / r['median_s']:.2f}x" if b else "-"
        mfu = f"{r['mfu_pct']:.1f}" if r["mfu_pct"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        print(f"{r['impl']:<12}{r['mode']:<10}{r['min_s']:>8.3f}{r['median_s']:>10.3f}{r['max_s']:>8.3f}"
              f"{r['minor_faults']:>13.0f}{r['peak_rss_mib']:>14.0f}{mem:>9}{mfu:>7}{speedup:>9}")


def main(argv: list[str] | None = None) -> list[dict]:
    from cpu_measure import machine_load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--preset",
                   help="model preset: molmoe-1b, tiny, mid or demo (default: molmoe-1b on CUDA, mid on CPU)")
    p.add_argument("--seq_len", type=int, help="tokens per sequence (default: 2304 on CUDA, 256 on CPU)")
    p.add_argument("--micro_batch", type=int, help="sequences per step (default: 4 on CUDA, 8 on CPU)")
    p.add_argument("--impls", help="comma-separated MoE impls (default: loop,grouped_mm,triton on CUDA, "
                   "loop,grouped_mm,cpu on CPU)")
    p.add_argument("--modes", help="comma-separated eager / compiled (default: eager,compiled on CUDA, eager on CPU)")
    p.add_argument("--checkpointing", type=int, choices=[0, 1], help="activation checkpointing per block "
                   "(default: 1 on CUDA, 0 on CPU)")
    p.add_argument("--answer_frac", type=float, default=0.4, help="share of each sequence carrying loss (the LM head "
                   "runs there only); gin/demo.gin's short answers are ~0.04")
    p.add_argument("--steps", type=int, default=5, help="timed steps per impl")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per impl first")
    p.add_argument("--threads", type=int, default=2, help="CPU: torch intra-op threads")
    p.add_argument("--peak_flops", type=float, default=None, help="device peak FLOP/s for MFU (default: lookup)")
    p.add_argument("--out", help="JSON rows to this file (default: runs/bench/train_step_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.preset = args.preset or ("molmoe-1b" if cuda else "mid")
    args.seq_len = args.seq_len or (2304 if cuda else 256)
    args.micro_batch = args.micro_batch or (4 if cuda else 8)
    args.checkpointing = bool(cuda if args.checkpointing is None else args.checkpointing)
    impls = (args.impls or ("loop,grouped_mm,triton" if cuda else "loop,grouped_mm,cpu")).split(",")
    modes = (args.modes or ("eager,compiled" if cuda else "eager")).split(",")
    if set(modes) - {"eager", "compiled"}:
        p.error(f"--modes {args.modes!r}: expected eager and/or compiled")
    if not cuda:
        torch.set_num_threads(args.threads)
    cfg = model_config(args.preset)
    out = args.out or os.path.join("runs", "bench", f"train_step_{device.type}.json")
    load_before = machine_load()
    rows = []
    for mode in modes:
        try:
            rows += bench_mode(args, cfg, impls, mode == "compiled", device)
            if cuda:
                torch.cuda.empty_cache()  # the mode's model is gone
        except Exception as e:  # one failing mode (e.g. OOM) must not hide the others
            rows.append({"impl": ",".join(impls), "mode": mode, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print_table(rows, f"{args.preset}, seq {args.seq_len}, micro-batch {args.micro_batch}, {name}, checkpointing "
                f"{int(args.checkpointing)}; {load_before} before, {machine_load()} after")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "load_before": load_before, "rows": rows}, f, indent=2)
    print(f"# wrote {out}")
    return rows


if __name__ == "__main__":
    main()
