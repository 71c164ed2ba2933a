"""Prefill and decode cost of `MolmoE.generate` across runtime knobs (MoE top-k x max crops), accuracy-free.

    python bench/generation.py [--top_k 1,2,4,8] [--max_crops 1,4,12] [--out bench/generation.json]
    python bench/generation.py --tiny --device cpu      # seconds-long smoke run of the script itself
    python bench/generation.py --compile ...            # + eager vs generate(compile=True) columns

The model is the molmoe-1b config with random weights (bf16 on GPU): routing on random weights is not the
trained model's, but every knob's cost (tokens routed per expert aside) is the same. Prompts are synthetic and
laid out as the preprocessor lays them out: `max_crops` high-res crops plus the global crop, each contributing its
pooled tokens (+ a column token per row and start/end tokens), then `--prompt_len` text tokens. Greedy decoding
runs exactly `--new_tokens` steps (no EOS, so no early stop).

Per setting, `molmo_fast.latency.measure_stages` times `generate(max_new_tokens=n)` stage by stage (median of
--repeats after one warm-up; CUDA events on GPU): vision (ViT), connector, LLM prefill -- together the prefill --
and decode ms/token; throughput in tokens/s over the batch. Each row records `knobs.describe(model)` (settings,
dtype, device, total / active parameters).
"""

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from molmo_fast import knobs
from molmo_fast.config import MolmoEConfig
from molmo_fast.latency import measure_stages
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.runtime.device import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/generation.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny preset and small defaults (CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--top_k", help="comma-separated MoE top-k values (default 1,2,4,8; tiny 1,2)")
    p.add_argument("--max_crops", help="comma-separated crop budgets (default 1,4,12; tiny 1,2)")
    p.add_argument("--batch_size", type=int, default=1, help="prompts per generate call (default 1)")
    p.add_argument("--prompt_len", type=int, help="text tokens after the image (default 32; tiny 8)")
    p.add_argument("--new_tokens", type=int, help="decode steps, >= 2 (default 64; tiny 4)")
    p.add_argument("--repeats", type=int, help="timed runs per setting, median reported (default 5; tiny 1)")
    p.add_argument("--moe_impl", help="molmo_fast.kernels.moe_mlp implementation (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and synthetic prompts")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="HF config.json field over the preset (JSON value), repeatable, e.g. --override n_layers=8")
    p.add_argument("--compile", action="store_true",
                   help="also time generate(compile=True) (static cache, compiled decode, CUDA graphs on GPU) and "
                        "eager with the same wall-clock method: eager vs compiled prefill ms, decode ms/token, ratio")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.top_k = _ints(args.top_k or ("1,2" if tiny else "1,2,4,8"), "--top_k")
    args.max_crops = _ints(args.max_crops or ("1,2" if tiny else "1,4,12"), "--max_crops")
    args.prompt_len = args.prompt_len if args.prompt_len is not None else 8 if tiny else 32
    args.new_tokens = args.new_tokens if args.new_tokens is not None else 4 if tiny else 64
    args.repeats = args.repeats if args.repeats is not None else 1 if tiny else 5
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    if args.new_tokens < 2:
        p.error(f"--new_tokens = {args.new_tokens}, expected >= 2 (at least one decode step)")
    if args.batch_size < 1 or args.prompt_len < 1 or args.repeats < 1:
        p.error("--batch_size, --prompt_len and --repeats must be >= 1")
    return args


def _ints(spec: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in spec.split(",") if v]
    except ValueError:
        raise SystemExit(f"{flag} = {spec!r}: expected comma-separated ints") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{flag} = {spec!r}: expected positive ints")
    return values


def build_model(args) -> MolmoE:
    cfg = MolmoEConfig.from_name("tiny" if args.tiny else "molmoe-1b").with_overrides(args.override or [])
    # Cast on the meta device, then materialise: the weights are drawn directly in the bench dtype (half the peak
    # memory of an fp32 init for bf16).
    model = MolmoE.from_config_on_meta(cfg).to(args.dtype).init_weights(args.seed, device=args.device).eval()
    if args.moe_impl:
        knobs.set_moe_impl(model, args.moe_impl)
    return model


def synthetic_prompt(model: MolmoE, batch_size: int, max_crops: int, prompt_len: int, device: str,
                     seed: int) -> dict[str, torch.Tensor]:
    """ids [B, S], images [B, N, P, patch_dim], image_masks [B, N, P], image_input_idx [B, N, T] with
    N = max_crops + 1 (the global crop) and Molmo's per-crop token layout."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    (h, w), (ph, pw) = cfg.vision.patch_grid, (cfg.connector.pool_h, cfg.connector.pool_w)
    rows, cols = -(-h // ph), -(-w // pw)
    per_crop = rows * (cols + int(cfg.connector.use_col_tokens)) + 2  # + start / end tokens
    N, T = max_crops + 1, rows * cols
    S = 1 + N * per_crop + prompt_len  # BOS, image blocks, text
    ids = torch.randint(2, cfg.llm.vocab_size, (batch_size, S), generator=g)
    # Image-patch positions: inside each crop's block, skipping its start token and each row's column token.
    row_stride = cols + int(cfg.connector.use_col_tokens)
    in_block = (torch.arange(rows).unsqueeze(1) * row_stride + torch.arange(cols)).flatten() + 1
    idx = (1 + torch.arange(N).unsqueeze(1) * per_crop + in_block).expand(batch_size, N, T)
    images = torch.rand(batch_size, N, cfg.vision.num_patches, cfg.vision.patch_dim, generator=g) * 2 - 1
    masks = torch.ones(batch_size, N, cfg.vision.num_patches)
    return {"input_ids": ids.to(device), "images": images.to(device), "image_masks": masks.to(device),
            "image_input_idx": idx.contiguous().to(device)}


def measure(model: MolmoE, prompt: dict[str, torch.Tensor], new_tokens: int, repeats: int) -> dict:
    stages = measure_stages(model, prompt, new_tokens, repeats)
    B, S = prompt["input_ids"].shape
    prefill_ms = stages["vision"] + stages["connector"] + stages["prefill"]
    decode_ms = stages["decode_per_token"]
    return {
        "batch_size": B, "prompt_tokens": S, "crops": prompt["images"].shape[1],
        "image_tokens": prompt["image_input_idx"].shape[1] * prompt["image_input_idx"].shape[2],
        "new_tokens": new_tokens,
        "vision_ms": stages["vision"], "connector_ms": stages["connector"], "llm_prefill_ms": stages["prefill"],
        "prefill_ms": prefill_ms, "prefill_tok_s": 1e3 * B * S / prefill_ms,
        "decode_ms_per_token": decode_ms, "decode_tok_s": 1e3 * B / decode_ms if decode_ms else None,
        "total_ms": stages["total"], "peak_memory_mb": stages["peak_memory_mb"],
    }


def measure_compiled(model: MolmoE, prompt: dict[str, torch.Tensor], new_tokens: int, repeats: int) -> dict:
    """Eager vs `generate(compile=True)`, both by wall clock: prefill = generate(max_new_tokens=1), decode ms/token =
    (generate(new_tokens) - prefill) / (new_tokens - 1); medians of `repeats` after a warm-up run (which compiles)."""
    sync = torch.cuda.synchronize if prompt["input_ids"].is_cuda else (lambda: None)

    def wall_ms(n: int, compile: bool) -> float:
        def run():
            model.generate(prompt["input_ids"], prompt["images"], prompt["image_masks"], prompt["image_input_idx"],
                           max_new_tokens=n, compile=compile)
            sync()
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)

    row = {}
    for name, compile in (("eager", False), ("compiled", True)):
        prefill = wall_ms(1, compile)
        row[f"{name}_prefill_ms"] = prefill
        row[f"{name}_decode_ms_per_token"] = max(wall_ms(new_tokens, compile) - prefill, 0.0) / (new_tokens - 1)
    row["prefill_speedup"] = row["eager_prefill_ms"] / row["compiled_prefill_ms"]
    row["decode_speedup"] = (row["eager_decode_ms_per_token"] / row["compiled_decode_ms_per_token"]
                             if row["compiled_decode_ms_per_token"] else None)
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_model(args)
    rows = []
    print(f"{'top_k':>5} {'crops':>5} {'prompt':>6} {'prefill ms':>10} {'prefill tok/s':>13} "
          f"{'ms/token':>9} {'decode tok/s':>12} {'active params':>14}")
    for max_crops in args.max_crops:
        prompt = synthetic_prompt(model, args.batch_size, max_crops, args.prompt_len, args.device, args.seed)
        knobs.set_max_crops(model, max_crops)
        for k in args.top_k:
            knobs.set_top_k(model, k)
            row = {"top_k": k, "max_crops": max_crops,
                   **measure(model, prompt, args.new_tokens, args.repeats),
                   "knobs": knobs.describe(model)}
            row["params_active"] = row["knobs"]["params_active"]
            rows.append(row)
            decode_rate = "n/a" if row["decode_tok_s"] is None else f"{row['decode_tok_s']:.1f}"
            print(f"{k:>5} {max_crops:>5} {row['prompt_tokens']:>6} {row['prefill_ms']:>10.2f} "
                  f"{row['prefill_tok_s']:>13.1f} {row['decode_ms_per_token']:>9.2f} {decode_rate:>12} "
                  f"{row['params_active'] / 1e6:>13.1f}M")
            if args.compile:
                row["compile"] = c = measure_compiled(model, prompt, args.new_tokens, args.repeats)
                print(f"{'':>11} prefill ms eager {c['eager_prefill_ms']:.2f} compiled {c['compiled_prefill_ms']:.2f}"
                      f" ({c['prefill_speedup']:.2f}x); decode ms/token eager {c['eager_decode_ms_per_token']:.2f}"
                      f" compiled {c['compiled_decode_ms_per_token']:.2f} ({c['decode_speedup'] or 0:.2f}x)")
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "python": platform.python_version(), "device": args.device,
           "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
           "config": "tiny" if args.tiny else "molmoe-1b", "dtype": str(args.dtype).removeprefix("torch."),
           "repeats": args.repeats, "overrides": args.override}
    print("# " + json.dumps(env))
    result = {"env": env, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
