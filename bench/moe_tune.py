"""On-line tuning of the Triton MoE launch configs (opt-in): `python bench/moe_kernels.py --tune --out FILE.json`.

For each token bucket of `configs.TOKEN_BUCKETS` (T = the bucket, k = K_max, MolmoE shape), every launch of
forward + backward is timed with each of its selectable candidate configs (the other launches at their
default) and the fastest is kept. The result is merged into FILE.json under this device's name, in the
format of the shipped `kernels/moe_configs.json`; point `MOLMO_FAST_MOE_CONFIGS` at it to use it.
"""

import functools
import json
import os

import torch

from molmo_fast.kernels import configs, moe_mlp
from molmo_fast.kernels.triton_moe import block_m_for


def _step(x_TD, weights, idx_TK, weight_TK, dy_TD):
    inputs = [x_TD, *weights, weight_TK]
    y_TD = moe_mlp(x_TD, *weights, idx_TK, weight_TK, impl="triton")
    torch.autograd.grad(y_TD, inputs, dy_TD)


def tune(timer, make_routing, dtype: torch.dtype, Ts: list[int], k_max: int, D=2048, H=1024, E=64, device="cuda",
         log=print):
    """{key: fastest config} for the launches of one fwd+bwd at each T (configs.key names the launch)."""
    g = torch.Generator(device=device).manual_seed(0)
    weights = [torch.nn.Parameter((torch.randn(*shape, generator=g, device=device) / shape[-1] ** 0.5).to(dtype))
               for shape in [(E, 2 * H, D), (E, D, H)]]
    elt = torch.empty(0, dtype=dtype).element_size()
    table = {}
    for T in Ts:
        x_TD = torch.randn(T, D, generator=g, device=device).to(dtype).requires_grad_()
        dy_TD = torch.randn(T, D, generator=g, device=device).to(dtype)
        idx_TK, weight_TK = make_routing(T, E, k_max, k_max, device)
        weight_TK = weight_TK.to(dtype).requires_grad_()
        step = functools.partial(_step, x_TD, weights, idx_TK, weight_TK, dy_TD)
        for launch in configs.GEMM_LAUNCHES + configs.WGRAD_LAUNCHES:
            block_m = block_m_for(T * k_max, E) if launch in configs.GEMM_LAUNCHES else 0
            key = configs.key(launch, dtype, block_m, T)
            times = {}
            for config in configs.candidates(launch):
                if not configs.selectable(launch, config, elt, block_m):
                    continue
                with configs.forced({key: config}):
                    times[json.dumps(config)] = timer(step)
            best = min(times, key=times.get)
            table[key] = json.loads(best)
            log(f"# tune {key}: {best} {times[best]:.3f} ms (of {len(times)}: "
                f"{' '.join(f'{t:.3f}' for t in times.values())})")
    return table


def write(path: str, device_name: str, table: dict) -> None:
    """Merge `table` into the configs JSON at `path` under `device_name` (other devices are kept)."""
    doc = {"devices": {}}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    doc["devices"].setdefault(device_name, {}).update(table)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    configs.read(path)  # refuses anything that is not a selectable candidate
