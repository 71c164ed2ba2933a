"""Time the MoE MLP implementations at the MolmoE shape (D=2048, H=1024, E=64), forward and fwd+bwd.

    python bench/moe_kernels.py [--quick] [--out runs/bench/moe_kernels.json]
    python bench/moe_kernels.py --device cpu --tiny      # seconds-long smoke run of the script itself

molmo_fast paths get expert_idx [T, K_max = max k] with the first k slots active (runtime top-k, one
shape for every k; --exact-k gives them [T, k]); transformers' OlmoeExperts gets exactly [T, k].
Columns: median ms, TFLOP/s on the active pairs, % of a dense bf16 GEMM timed in this run, GB/s on the
weight-read floor (experts hit x weight bytes + x and y) and time / floor time at the copy bandwidth
measured in this run, relative error of y (and dx for fwd+bwd) against an fp32 loop reference, and
recompiles after a k change.
"""

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from molmo_fast.kernels import moe_mlp, moe_mlp_loop

FULL_T, FULL_K = [1, 16, 512, 4096, 32768], [1, 2, 4, 8, 16]
QUICK_T, QUICK_K = [16, 512, 32768], [1, 8]
IMPLS = ["molmo_fast", "grouped_mm", "loop", "hf_grouped_mm", "hf_batched_mm"]
BATCHED_MM_MAX_BYTES = 8 << 30  # batched_mm copies one weight set per pair: skip it beyond this


def _timer(device: str, quick: bool):
    if device == "cuda":
        import triton.testing

        warmup, rep = (10, 30) if quick else (25, 100)
        return lambda fn: triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")

    def cpu_median_ms(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_median_ms


def _hf_experts(impl: str, w_gate_up_EHD, w_down_EDH):
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    E, H2, D = w_gate_up_EHD.shape
    config = OlmoeConfig(hidden_size=D, intermediate_size=H2 // 2, num_experts=E)
    config._experts_implementation = impl
    with torch.device("meta"):
        experts = OlmoeExperts(config)
    experts.gate_up_proj, experts.down_proj = w_gate_up_EHD, w_down_EDH  # the same Parameters: shared grads
    return experts


def make_call(impl: str, w_gate_up_EHD, w_down_EDH, device: str):
    """fn(x_TD, idx_TK, weight_TK) -> y_TD for one implementation (see `routing_for` for idx's K)."""
    if impl.startswith("hf_"):
        return _hf_experts(impl[3:], w_gate_up_EHD, w_down_EDH)
    if impl == "molmo_fast":
        impl = "triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "auto"
    return lambda x, idx, w: moe_mlp(x, w_gate_up_EHD, w_down_EDH, idx, w, impl=impl)


def routing_for(impl: str, idx_TK, weight_TK, k: int):
    """HF's shapes carry k, so it gets [T, k] as its router would give; molmo_fast keeps [T, K_max]."""
    return (idx_TK[:, :k], weight_TK[:, :k]) if impl.startswith("hf_") else (idx_TK, weight_TK)


def make_routing(T: int, E: int, k_max: int, k: int, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    probs_TE = torch.randn(T, E, generator=g, device=device).softmax(-1)
    weight_TK, idx_TK = probs_TE.topk(k_max, dim=-1)
    idx_TK = torch.where(torch.arange(k_max, device=device) < k, idx_TK, -1)
    return idx_TK, weight_TK


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def dense_gemm_tflops(timer, device: str, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timer(lambda: a @ b) / 1e9


def copy_bandwidth_gbs(timer, device: str, n_bytes: int) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / timer(lambda: dst.copy_(src)) / 1e6


def recompiles_after_k_change(impl: str, weights, x_TD, k_max: int, ks: list[int], device: str) -> int:
    """Dynamo frames compiled beyond the first (+ new Triton binaries) while k cycles through `ks`."""
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    call = make_call(impl, *weights, device)
    step = torch.compile(call, backend=counter, fullgraph=not impl.startswith("hf_"))
    triton_before = None
    for i, k in enumerate(ks):
        idx_TK, weight_TK = make_routing(x_TD.shape[0], weights[0].shape[0], k_max, k, device, seed=i)
        with torch.no_grad():
            step(x_TD, *routing_for(impl, idx_TK, weight_TK, k))
        if i == 0 and impl == "molmo_fast" and device == "cuda":
            from molmo_fast.kernels.triton_kernels import compiled_variants

            triton_before = compiled_variants()
    extra = counter.frame_count - 1
    if triton_before is not None:
        from molmo_fast.kernels.triton_kernels import compiled_variants

        extra += compiled_variants() - triton_before
    return extra


def _measure(impl, timer, weights, x_TD, dy_TD, idx_TK, weight_TK, k, refs, device) -> list[dict]:
    """Forward (no grad) and forward+backward timings of one implementation on one routing."""
    D, H = weights[1].shape[1:]
    n_pairs = int((idx_TK >= 0).sum())
    call = make_call(impl, *weights, device)
    route_args = routing_for(impl, idx_TK, weight_TK, k)
    with torch.no_grad():
        y = call(x_TD, *route_args)
        fwd_ms = timer(lambda: call(x_TD, *route_args))
    dx = torch.autograd.grad(call(x_TD, *route_args), x_TD, dy_TD)[0]
    inputs = [x_TD, *weights, weight_TK]
    bwd_ms = timer(lambda: torch.autograd.grad(call(x_TD, *route_args), inputs, dy_TD))
    y_ref, dx_ref = refs
    return [
        {"mode": "fwd", "ms": fwd_ms, "flop": 6 * n_pairs * D * H, "rel_err": _rel_err(y, y_ref)},
        {"mode": "fwd+bwd", "ms": bwd_ms, "flop": 18 * n_pairs * D * H, "rel_err": _rel_err(dx, dx_ref)},
    ]


def run(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    timer = _timer(device, args.quick or args.tiny)
    if args.tiny:
        D, H, E, Ts, ks = 64, 32, 8, [1, 13], [1, 2]
    else:
        D, H, E = 2048, 1024, 64
        Ts, ks = (QUICK_T, QUICK_K) if args.quick else (FULL_T, FULL_K)
    Ts = args.T or Ts
    ks = args.k or ks
    k_max = max(ks)
    env_k_max = "k (--exact-k)" if args.exact_k else k_max
    elt = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)
    w_gate_up_EHD = torch.nn.Parameter((torch.randn(E, 2 * H, D, generator=g, device=device) / D**0.5).to(dtype))
    w_down_EDH = torch.nn.Parameter((torch.randn(E, D, H, generator=g, device=device) / H**0.5).to(dtype))
    weights = (w_gate_up_EHD, w_down_EDH)
    w_ref = [w.detach().float() for w in weights]

    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shape": {"D": D, "H": H, "E": E, "K_max": env_k_max},
    }
    try:
        import transformers
        import triton

        env.update(triton=triton.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    env["dense_bf16_tflops"] = dense_gemm_tflops(timer, device, torch.bfloat16, 256 if args.tiny else 8192)
    env["copy_gbs"] = copy_bandwidth_gbs(timer, device, (1 << 20) if args.tiny else (1 << 31))
    print(f"# {env}")

    rows = []
    for T in Ts:
        x_TD = torch.randn(T, D, generator=g, device=device).to(dtype).requires_grad_()
        dy_TD = torch.randn(T, D, generator=g, device=device).to(dtype)
        for k in ks:
            idx_TK, weight_TK = make_routing(T, E, k if args.exact_k else k_max, k, device)
            weight_TK.requires_grad_()
            experts_hit = int(torch.unique(idx_TK[idx_TK >= 0]).numel())
            floor_bytes = experts_hit * 3 * D * H * elt + 2 * T * D * elt
            ref_inputs = [x_TD.detach().float().requires_grad_(), *w_ref]
            y_ref = moe_mlp_loop(ref_inputs[0], *w_ref, idx_TK, weight_TK.detach().float())
            (dx_ref,) = torch.autograd.grad(y_ref, ref_inputs[0], dy_TD.float())
            for impl in args.impls:
                if impl == "hf_batched_mm" and T * k * 3 * D * H * elt > BATCHED_MM_MAX_BYTES:
                    continue
                case = {"impl": impl, "T": T, "k": k}
                try:  # one failing path (OOM, unsupported dtype) must not cost the rest of a GPU run
                    new_rows = _measure(
                        impl, timer, weights, x_TD, dy_TD, idx_TK, weight_TK, k, (y_ref, dx_ref), device
                    )
                except RuntimeError as e:
                    rows.append({**case, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    print(f"# {case} failed: {rows[-1]['error']}", flush=True)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                for r in new_rows:
                    tflops = r["flop"] / r["ms"] / 1e9
                    rows.append({
                        **case, "mode": r["mode"], "ms": r["ms"], "tflops": tflops,
                        "pct_dense": 100 * tflops / env["dense_bf16_tflops"],
                        "floor_gbs": floor_bytes / r["ms"] / 1e6,
                        "x_floor": r["ms"] / (floor_bytes / env["copy_gbs"] / 1e6),
                        "rel_err": r["rel_err"],
                    })
                    print(_fmt(rows[-1]), flush=True)
    recompiles = {}
    if not args.no_recompile_check:
        x_small = torch.randn(16, D, device=device, dtype=dtype)
        for impl in [i for i in args.impls if i != "loop"]:
            recompiles[impl] = recompiles_after_k_change(impl, weights, x_small, k_max, ks, device)
        print(f"# recompiles after k changes {ks}: {recompiles}")
    return {"env": env, "rows": rows, "recompiles": recompiles}


HEADER = (
    f"{'impl':>14} {'T':>6} {'k':>3} {'mode':>8} {'ms':>9} {'TFLOP/s':>8} {'%dense':>7} {'GB/s':>8} "
    f"{'xfloor':>7} {'rel_err':>8}"
)


def _fmt(r: dict) -> str:
    return (
        f"{r['impl']:>14} {r['T']:>6} {r['k']:>3} {r['mode']:>8} {r['ms']:>9.3f} {r['tflops']:>8.1f} "
        f"{r['pct_dense']:>7.1f} {r['floor_gbs']:>8.0f} {r['x_floor']:>7.2f} {r['rel_err']:>8.1e}"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="T in {16, 512, 32768}, k in {1, 8}: < 3 min")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test of this script")
    parser.add_argument("--T", type=int, nargs="+", help="override the token counts")
    parser.add_argument("--k", type=int, nargs="+", help="override the top-k values (K_max = max)")
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--exact-k", action="store_true", help="give molmo_fast paths K = k, not K_max = max(k)")
    parser.add_argument("--no-recompile-check", action="store_true")
    parser.add_argument("--out", default="runs/bench/moe_kernels.json", help="JSON results path")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (use --device cpu --tiny for a smoke run)")
    if args.device == "cpu" and args.dtype == "bfloat16":
        args.dtype = "float32"  # CPU grouped_mm / interpreter kernels are checked in float32
    print(HEADER)
    result = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"# wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
