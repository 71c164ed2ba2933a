"""`python -m molmo_fast.eval --checkpoint PATH --tasks chart_qa,doc_qa [--gin_file F] [--max_examples N] [--out DIR]`

Gin files (e.g. gin/eval/synthetic.gin) bind `EvalConfig.*`; command-line flags win over them.
"""

import argparse
import logging

import gin
import torch

from molmo_fast.eval.config import DEVICE_FIELD, EvalConfig
from molmo_fast.eval.runner import run, summary_table
from molmo_fast.eval.tasks import TASKS
from molmo_fast.runtime.device import DTYPES, resolve_device, torchrun_env
from molmo_fast.runtime.gin_files import parse_gin


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m molmo_fast.eval", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="HF checkpoint dir, or a training run dir (its latest checkpoint)")
    p.add_argument("--tasks", help=f"comma-separated, or the suites 'paper' / 'synthetic'; one of {sorted(TASKS)}")
    p.add_argument("--step", type=int, help="checkpoint step of a run dir (default: latest)")
    p.add_argument("--gin_file", action="append", default=[])
    p.add_argument("--gin_param", action="append", default=[])
    p.add_argument("--max_examples", type=int)
    p.add_argument("--out", help="output dir (default runs/eval)")
    p.add_argument("--data_dir", help="root of the task shard sets (default data)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--num_workers", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--top_k", type=lambda s: [int(k) for k in s.split(",")], help="MoE top-k: K or K0,K1,...")
    p.add_argument("--knob", dest="knobs", action="append", help="runtime knob KEY=VALUE (molmo_fast.knobs), e.g. "
                   "routing=top_p:0.9 or skip_blocks=3,7; repeatable")
    p.add_argument("--max_crops", type=int)
    p.add_argument("--max_new_tokens", type=int)
    p.add_argument("--loss", action="store_true", default=None, help="teacher-forced loss/accuracy instead")
    p.add_argument("--fsdp", action="store_true", default=None, help="shard the model across torchrun ranks")
    p.add_argument("--overwrite", action="store_true", default=None, help="discard earlier results in --out")
    return p


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k not in ("gin_file", "gin_param") and v is not None}
    if isinstance(overrides.get("top_k"), list) and len(overrides["top_k"]) == 1:
        overrides["top_k"] = overrides["top_k"][0]
    parse_gin(args.gin_file, args.gin_param)  # clears gin first: main() may run more than once in a process
    try:
        cfg = EvalConfig(**overrides)
        # A device that cannot work is a usage error, reported before any model loads.
        resolve_device(cfg.device, *torchrun_env(), torch.cuda.is_available(), DEVICE_FIELD)
    except ValueError as e:
        parser.error(str(e))
    finally:
        gin.clear_config()
    results = run(cfg)
    if results:
        print(summary_table(results))
    return results


if __name__ == "__main__":
    main()
