"""Launch configs of the Triton MoE kernels: the candidate space, which candidates may run, and the choice.

No timing happens at run time. A launch's config comes from `moe_configs.json` (per device name, keyed by
launch, dtype, BLOCK_M and a token-count bucket) or, for a device or key not in it, from a fixed rule. So
every rank picks the same config, nothing syncs the host, and a CUDA-graph capture never tunes. On-line
tuning is opt-in: `python bench/moe_kernels.py --tune --out FILE.json` times the selectable candidates and
writes such a file; `MOLMO_FAST_MOE_CONFIGS=FILE.json` makes the kernels read it instead of the shipped one.

A candidate is selectable for a dtype when its estimated shared memory fits the 227 KiB of an sm_90 CTA and
its fp32 accumulators stay within the epilogue's register budget; `bench/kernels_sm90.py` compiles every
candidate for sm_90 and `tests/test_kernels_sm90.py` checks that the estimate and the budget hold.
"""

import contextlib
import functools
import json
import os
from pathlib import Path

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SHIPPED = Path(__file__).with_name("moe_configs.json")
SHARED_LIMIT = 227 * 1024  # sm_90 opt-in shared memory per CTA
TOKEN_BUCKETS = (16, 512, 4096, 32768)  # a launch's T is keyed by the first bucket >= T (the last above it)

# Grouped-GEMM launches (epilogue, A rows, C rows are fixed per launch) and weight-gradient launches.
GEMM_LAUNCHES = ("gate_up", "down", "down_bwd", "dx")
WGRAD_LAUNCHES = ("dw_down", "dw_gate_up")
ACCUMULATORS = {"gate_up": 2, "down": 1, "down_bwd": 1, "dx": 1}  # gate_up keeps a gate and an up tile
# fp32 accumulator elements per thread an epilogue may hold without spilling (255 registers); the
# SwiGLU epilogues keep gate, up and their sigmoid live beside the accumulator (bench/kernels_sm90.py).
ACC_PER_THREAD = {"gate_up": 64, "down": 128, "down_bwd": 32, "dx": 128}

GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
WGRAD_KEYS = ("BLOCK_N", "BLOCK_C", "BLOCK_R", "num_warps", "num_stages")
if INTERPRET:  # tiny tiles: the interpreter's cost is per element; each half of BLOCK_N is one PART_CHUNK
    GEMM_CANDIDATES = [(32, 16, 4, 1)]
    WGRAD_CANDIDATES = [(16, 16, 16, 4, 1)]
else:
    # (BLOCK_N, BLOCK_K, num_warps, num_stages) in order of preference for large batches; (256, 64) only
    # suits the single-accumulator epilogues; (64, 32) is the fp32 fallback of the gate|up GEMM at
    # 128-row tiles (two accumulators, three operand tiles per stage).
    GEMM_CANDIDATES = [(128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (64, 64, 8, 4), (64, 128, 8, 3),
                       (64, 64, 4, 4), (64, 128, 4, 3), (64, 32, 8, 3)]
    WGRAD_CANDIDATES = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 3)]


def token_bucket(T: int) -> int:
    return next((b for b in TOKEN_BUCKETS if T <= b), TOKEN_BUCKETS[-1])


def candidates(launch: str) -> list[dict]:
    keys, space = (GEMM_KEYS, GEMM_CANDIDATES) if launch in GEMM_LAUNCHES else (WGRAD_KEYS, WGRAD_CANDIDATES)
    if launch not in GEMM_LAUNCHES + WGRAD_LAUNCHES:
        raise ValueError(f"moe configs: unknown launch {launch!r}, expected one of {GEMM_LAUNCHES + WGRAD_LAUNCHES}")
    return [dict(zip(keys, values)) for values in space]


def shared_bytes(launch: str, config: dict, elt: int, block_m: int) -> int:
    """Upper estimate of a config's shared memory: the pipelined operand buffers, or the fp32 epilogue
    layout-conversion scratch when that is larger (they are never live together)."""
    stages = config["num_stages"]
    if launch in GEMM_LAUNCHES:
        bm, bn, bk = block_m, config["BLOCK_N"], config["BLOCK_K"]
        operands = stages * (bm * bk + ACCUMULATORS[launch] * bk * bn) * elt
        return max(operands, bm * bn * 4)
    bn, bc, br = config["BLOCK_N"], config["BLOCK_C"], config["BLOCK_R"]
    return max(stages * (bn + bc) * br * elt, bn * bc * 4)


def selectable(launch: str, config: dict, elt: int, block_m: int = 0) -> bool:
    if INTERPRET:
        return True
    if shared_bytes(launch, config, elt, block_m) > SHARED_LIMIT:
        return False
    if launch in GEMM_LAUNCHES:
        acc = block_m * config["BLOCK_N"] * ACCUMULATORS[launch] // (32 * config["num_warps"])
        return acc <= ACC_PER_THREAD[launch]
    return config["BLOCK_N"] * config["BLOCK_C"] // (32 * config["num_warps"]) <= 64


def rule(launch: str, elt: int, block_m: int, T: int) -> dict:
    """The config chosen without any data: the first selectable candidate, where small batches (few row
    tiles) prefer 64-wide column blocks for more programs, and 16-row decode tiles the deepest K step on
    4 warps (weight-read bound: long loads, few rows to split among warps)."""
    options = [c for c in candidates(launch) if selectable(launch, c, elt, block_m)]
    if launch in GEMM_LAUNCHES and block_m <= 16:
        options.sort(key=lambda c: (-c["BLOCK_K"], c["num_warps"]))
    elif token_bucket(T) <= 512:
        options.sort(key=lambda c: c["BLOCK_N"])
    return options[0]


def key(launch: str, dtype: torch.dtype, block_m: int, T: int) -> str:
    return f"{launch}/{str(dtype).removeprefix('torch.')}/M{block_m}/T{token_bucket(T)}"


_forced: dict[str, dict] = {}


@contextlib.contextmanager
def forced(configs: dict[str, dict]):
    """Run launches whose key is in `configs` with that config (the tuner's way in; nothing else uses it)."""
    _forced.update(configs)
    try:
        yield
    finally:
        for k in configs:
            _forced.pop(k, None)


def read(path: str | Path) -> dict[str, dict[str, dict]]:
    """{device name: {key: config}} from a configs JSON; every config must be a selectable candidate."""
    try:
        devices = json.loads(Path(path).read_text())["devices"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"moe configs: {path} unreadable or without a 'devices' object ({e})") from e
    for device, table in devices.items():
        for k, config in table.items():
            try:
                launch, dtype, block_m, _ = k.split("/")
                elt = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
                ok = config in candidates(launch) and selectable(launch, config, elt, int(block_m[1:]))
            except (ValueError, AttributeError, TypeError, KeyError):
                ok = False
            if not ok:
                raise ValueError(f"moe configs: {path} [{device!r}][{k!r}] = {config}: expected a key "
                                 "'launch/dtype/M<BLOCK_M>/T<bucket>' and a selectable candidate of configs.py")
    return devices


_load = functools.lru_cache(read)  # read once per process: choosing a config never touches the disk again


def choose(launch: str, dtype: torch.dtype, block_m: int, T: int, device: torch.device) -> dict:
    k = key(launch, dtype, block_m, T)
    if k in _forced:
        return _forced[k]
    if device.type == "cuda" and not INTERPRET:
        path = os.environ.get("MOLMO_FAST_MOE_CONFIGS", SHIPPED)
        table = _load(str(path)).get(torch.cuda.get_device_name(device), {})
        if k in table:
            return table[k]
    return rule(launch, torch.empty(0, dtype=dtype).element_size(), block_m, T)


def sm_count(device: torch.device) -> int:
    if device.type != "cuda" or INTERPRET:
        return 1  # the interpreter runs programs one after another: a few of them exercise the persistent loop
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_programs(device: torch.device, shared: int) -> int:
    """Persistent grid size: every SM's share of co-resident CTAs (by shared memory, at most 4); fixed by the
    device and the config, so it never grows with T * K_max (idle programs read the tile count and exit)."""
    return sm_count(device) * max(1, min(4, SHARED_LIMIT // max(shared, 1)))
