"""Static sm_90 report of the Triton MoE kernels, on any CPU (no GPU, no timing).

    python bench/kernels_sm90.py [--out bench/kernels_sm90.json] [--T 1 512 4096 32768] [--k 1 8]

Records every kernel launch of a real forward + backward at the MolmoE-1B shape (D=2048, H=1024, E=64) from
`triton_moe` on meta tensors (so signatures, dtypes and constexprs are exactly what a GPU run launches),
then compiles each launch for sm_90 with Triton's bundled ptxas, once per candidate config of `configs.py`,
for bf16, fp16 and fp32. One row per (kernel, launch / epilogue, dtype, BLOCK_M, config): registers and spill bytes
(`ptxas -v`), shared memory, MMA kind (wgmma / mma / none), the main loop's async-copy wait depth and
buffer count (TTGIR), whether the config is selectable for the dtype, and the (T, k) cases that choose it.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from molmo_fast.kernels import configs, triton_kernels, triton_moe

D, H, E = 2048, 1024, 64
SM_COUNT = 132  # H100 SXM and H200: what the persistent grids are sized for
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPILOGUES = {triton_kernels.PLAIN: "plain", triton_kernels.SWIGLU_FWD: "swiglu_fwd",
             triton_kernels.SWIGLU_BWD: "swiglu_bwd"}
_SIG = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


def record(T: int, K: int, dtype: torch.dtype, d=D, h=H, e=E) -> list[dict]:
    """The launches of one forward + backward: {kernel, launch, grid, args, kwargs}, nothing executed."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append({"kernel": self.kernel, "grid": grid, "args": args,
                                                            "kwargs": kwargs})

    tk_view = types.SimpleNamespace(**{  # the launcher's view of the kernels module, launches recorded
        name: Recorder(value) if isinstance(value, triton.runtime.JITFunction) else value
        for name, value in vars(triton_kernels).items()
    })
    saved = triton_moe.tk, configs.sm_count
    triton_moe.tk, configs.sm_count = tk_view, lambda device: SM_COUNT
    try:
        meta = torch.device("meta")
        x_TD = torch.empty(T, d, dtype=dtype, device=meta)
        w_gate_up_EHD = torch.empty(e, 2 * h, d, dtype=dtype, device=meta)
        w_down_EDH = torch.empty(e, d, h, dtype=dtype, device=meta)
        idx_TK = torch.empty(T, K, dtype=torch.int64, device=meta)
        weight_TK = torch.empty(T, K, dtype=dtype, device=meta)
        y_TD, routing, h_P2H = triton_moe.moe_fwd(x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK)
        triton_moe.moe_bwd(y_TD, x_TD, w_gate_up_EHD, w_down_EDH, idx_TK, weight_TK, routing, h_P2H)
    finally:
        triton_moe.tk, configs.sm_count = saved
    gemms = iter(triton_moe.GEMM_LAUNCHES)
    wgrads = iter(configs.WGRAD_LAUNCHES)
    for launch in launches:
        name = launch["kernel"].__name__
        launch["launch"] = next(gemms) if name == "grouped_gemm_kernel" else next(wgrads) if "wgrad" in name else (
            f"{name.removesuffix('_kernel')}{launch['kwargs'].get('SOURCE', '')}")
    return launches


def compile_launch(launch: dict, config: dict | None = None):
    """Compile one recorded launch for sm_90, with `config` (a `configs` candidate) replacing its own.

    Specialises like the JIT does at launch: ints equal to 1 become constants, tensors and multiples of 16
    get the divisibility hint."""
    fn, args = launch["kernel"], launch["args"]
    constexprs = dict(launch["kwargs"])
    constexprs.update(config or {})
    options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages") if k in constexprs}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs.setdefault(name, fn.params[i].default)
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _SIG[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) from `ptxas -v` on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        out = subprocess.run([get_ptxas(90).path, "-v", f"--gpu-name={arch}", path, "-o", path + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


def loop_pipeline(ttgir: str) -> tuple[int, int]:
    """(async-copy wait depth, operand buffers) of the deepest pipelined loop: the largest `num` of an
    async_wait (cp.async groups left in flight while computing) and the leading dim of multi-buffered
    shared allocations; (0, 0) without async copies."""
    waits = [int(n) for n in re.findall(r"ttg\.async_wait .*\{num = (\d+) : i32\}", ttgir)]
    buffers = [int(n) for n in re.findall(r"ttg\.local_alloc[^\n]*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    return max(waits, default=0), max(buffers, default=0)


def mma_kind(ttgir: str) -> str:
    if "warp_group_dot" in ttgir:
        return "wgmma"
    return "mma" if "tt.dot" in ttgir else "none"


def analyse(compiled) -> dict:
    ttgir = compiled.asm["ttgir"]
    registers, spills = ptxas_usage(compiled.asm["ptx"])
    wait, buffers = loop_pipeline(ttgir)
    return {"registers": registers, "spill_bytes": spills, "shared_bytes": compiled.metadata.shared,
            "mma": mma_kind(ttgir), "async_wait": wait, "buffers": buffers, "pipelined": wait >= 1}


def report(Ts, ks, dtypes, which="all", log=print) -> list[dict]:
    """One row per distinct compile of the `which` ("all", "selectable" or "chosen") candidate configs."""
    rows, index = [], {}
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        elt = torch.empty(0, dtype=dtype).element_size()
        for T in Ts:
            for K in ks:
                for launch in record(T, K, dtype):
                    name = launch["launch"]
                    block_m = launch["kwargs"].get("BLOCK_M", 0) if name in triton_moe.GEMM_LAUNCHES else 0
                    tunable = name in configs.GEMM_LAUNCHES + configs.WGRAD_LAUNCHES
                    chosen = {k: launch["kwargs"][k] for k in configs.candidates(name)[0]} if tunable else None
                    options = configs.candidates(name) if tunable and which != "chosen" else [chosen]
                    for config in options:
                        if which == "selectable" and tunable and not configs.selectable(name, config, elt, block_m):
                            continue
                        key = (name, dtype_name, block_m, json.dumps(config, sort_keys=True))
                        if key not in index:
                            start = time.perf_counter()
                            row = {
                                "kernel": launch["kernel"].__name__, "launch": name, "dtype": dtype_name,
                                "epilogue": EPILOGUES.get(launch["kwargs"].get("EPILOGUE")),
                                "block_m": block_m, "config": config, "cases": [],
                                "selectable": True if config is None else configs.selectable(name, config, elt,
                                                                                              block_m),
                                "shared_estimate": None if config is None else configs.shared_bytes(
                                    name, config, elt, block_m),
                                "grid": launch["grid"][0] if config is None or name in configs.WGRAD_LAUNCHES
                                else None,
                                **analyse(compile_launch(launch, config)),
                            }
                            row["compile_s"] = round(time.perf_counter() - start, 2)
                            index[key] = row
                            rows.append(row)
                            log(fmt(row))
                        if config == chosen:
                            index[key]["cases"].append(f"T{T}k{K}")
    return rows


HEADER = ("| launch | dtype | BLOCK_M | config (N,K or N,C,R; warps, stages) | regs | spill B | smem KiB | mma "
          "| async wait | buffers | selectable | chosen for (T, k) |\n|" + "---|" * 12)


def fmt(row: dict) -> str:
    """One markdown table row (the table of bench/RESULTS.md)."""
    config = "-" if row["config"] is None else ",".join(str(v) for v in row["config"].values())
    return (f"| {row['launch']} | {row['dtype']} | {row['block_m'] or '-'} | {config} | {row['registers']} | "
            f"{row['spill_bytes']} | {row['shared_bytes'] / 1024:.1f} | {row['mma']} | {row['async_wait']} | "
            f"{row['buffers']} | {'yes' if row['selectable'] else 'no'} | {' '.join(row['cases'])} |")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[1, 512, 4096, 32768], help="token counts")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 8], help="K (routing slots) values")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="dtypes")
    parser.add_argument("--configs", default="all", choices=["all", "selectable", "chosen"],
                        help="compile every candidate config, the selectable ones, or those the cases choose")
    parser.add_argument("--out", default="bench/kernels_sm90.json", help="JSON path: one object per row")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, sm_90 compiles need Triton's compiler, not its interpreter")
    rows = report(args.T, args.k, args.dtypes, which=args.configs,
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    print(HEADER)
    for row in rows:
        row["cases"] = sorted(set(row["cases"]), key=lambda case: [int(n) for n in case[1:].split("k")])
        print(fmt(row))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"# {len(rows)} compiles; wrote {args.out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
