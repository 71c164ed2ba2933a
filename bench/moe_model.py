"""Performance model of the Triton MoE kernels at the target cases: an ESTIMATE until a GPU run replaces it.

    python bench/moe_model.py [--peak-tflops 989] [--hbm-tbs 4.8] [--k-max 8]

Per kernel launch of one bf16 forward (+ backward) at the MolmoE-1B shape: FLOPs, the fewest HBM bytes
(each operand read once, each output written once; gathered rows counted once per pair), the floor
max(FLOPs / peak, bytes / bandwidth), and an expected range: 55-75% of the tensor-core peak for GEMMs,
60-85% of the bandwidth, plus ~4 us per launch. H200 datasheet defaults (dense bf16, HBM3e).
"""

import argparse

D, H, E = 2048, 1024, 64
CASES = [(32768, 8), (4096, 8), (512, 8), (32768, 1)]  # (T, k), K_max fixed: runtime top-k
TARGETS_MS = {(32768, 8): (6.0, 20.0), (4096, 8): (1.1, None), (512, 8): (0.30, None), (32768, 1): (0.9, None)}
LAUNCH_US = 4.0


def launches(T: int, k: int, k_max: int, elt: int = 2) -> list[tuple[str, str, float, float]]:
    """(direction, kernel, FLOPs, HBM bytes) of every launch of a forward and a backward."""
    P, P_all = T * k, T * k_max
    hit = E * (1 - (1 - 1 / E) ** P)  # experts hit by uniform routing: each reads its weights once
    w_gu, w_down = hit * 2 * H * D * elt, hit * D * H * elt
    route = P_all * (8 + 4 + 4) if P_all > 1024 else P_all * 12  # int64 indices in; pair ids, counts out
    return [
        ("fwd", "route", 0, route),
        ("fwd", "gate_up", 4 * P * D * H, w_gu + P * D * elt + 3 * P * H * elt),  # x rows in; a, g|u out
        ("fwd", "down", 2 * P * D * H, w_down + P * H * elt + P * D * elt),
        ("fwd", "combine", 0, P * D * elt + T * D * elt + P_all * 12),
        ("bwd", "plan", 0, E * 4 * 4),
        ("bwd", "down_bwd", 2 * P * D * H, w_down + P * D * elt + 2 * P * H * elt + 3 * P * H * elt + P * H // 8),
        ("bwd", "dx", 4 * P * D * H, w_gu + 2 * P * H * elt + P * D * elt),
        ("bwd", "combine_dx", 0, P * D * elt + T * D * elt + P_all * 8),
        ("bwd", "dw_down", 2 * P * D * H, P * D * elt + P * H * elt + E * D * H * elt),
        ("bwd", "dw_gate_up", 4 * P * D * H, 2 * P * H * elt + P * D * elt + E * 2 * H * D * elt),
        ("bwd", "dweight", 0, P * (H // 32) * 4 + P_all * 8),
    ]


def model(T: int, k: int, k_max: int, peak_tflops: float, hbm_tbs: float) -> list[dict]:
    rows = []
    for direction, kernel, flop, nbytes in launches(T, k, k_max):
        compute_ms, memory_ms = flop / peak_tflops / 1e9, nbytes / hbm_tbs / 1e9
        lo = max(compute_ms / 0.75, memory_ms / 0.85) + LAUNCH_US / 1e3
        hi = max(compute_ms / 0.55, memory_ms / 0.60) + LAUNCH_US / 1e3
        rows.append({"T": T, "k": k, "dir": direction, "kernel": kernel, "gflop": flop / 1e9, "mb": nbytes / 1e6,
                     "floor_ms": max(compute_ms, memory_ms), "bound": "compute" if compute_ms > memory_ms else "memory",
                     "est_lo_ms": lo, "est_hi_ms": hi})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 tensor-core peak (H200: 989)")
    parser.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM bandwidth in TB/s (H200: 4.8)")
    parser.add_argument("--k-max", type=int, default=8, help="routing slots K_max (k <= K_max are active)")
    args = parser.parse_args(argv)
    print("ESTIMATE (no GPU run): | T | k | dir | kernel | GFLOP | HBM MB | floor ms | bound | expected ms |")
    out = []
    for T, k in CASES:
        rows = model(T, k, args.k_max, args.peak_tflops, args.hbm_tbs)
        out += rows
        for r in rows:
            print(f"| {T} | {k} | {r['dir']} | {r['kernel']} | {r['gflop']:.1f} | {r['mb']:.1f} | {r['floor_ms']:.3f} "
                  f"| {r['bound']} | {r['est_lo_ms']:.3f}-{r['est_hi_ms']:.3f} |")
        fwd = [r for r in rows if r["dir"] == "fwd"]
        for name, part in (("fwd", fwd), ("fwd+bwd", rows)):
            target = TARGETS_MS[(T, k)][0 if name == "fwd" else 1]
            print(f"| {T} | {k} | {name} | **total** | {sum(r['gflop'] for r in part):.1f} | "
                  f"{sum(r['mb'] for r in part):.1f} | {sum(r['floor_ms'] for r in part):.3f} | | "
                  f"{sum(r['est_lo_ms'] for r in part):.3f}-{sum(r['est_hi_ms'] for r in part):.3f} "
                  f"(target {target if target else '-'}) |")
    return out


if __name__ == "__main__":
    main()
