"""`python -m molmo_fast.eval --checkpoint PATH --tasks chart_qa,doc_qa [--gin_file F] [--max_examples N] [--out DIR]`

Gin files (e.g. gin/eval/synthetic.gin) bind `EvalConfig.*`; command-line flags win over them. `--list` prints the
tasks with the shard set each reads (task names and `python -m molmo_fast.data.build` source names differ for some).
"""

import argparse
import logging
from pathlib import Path

import gin
import torch

from molmo_fast.eval.config import DEVICE_FIELD, FIELD_HELP, EvalConfig
from molmo_fast.eval.runner import run, summary_table
from molmo_fast.eval.tasks import TASKS
from molmo_fast.runtime.device import DTYPES, resolve_device, torchrun_env
from molmo_fast.runtime.gin_files import parse_gin


def _top_k(text: str) -> int | list[int]:
    ks = [int(k) for k in text.split(",")]
    return ks[0] if len(ks) == 1 else ks


_TYPES = {"step": int, "max_examples": int, "batch_size": int, "num_workers": int, "max_crops": int,
          "max_new_tokens": int, "synthetic_seed": int, "top_k": _top_k}
_SWITCHES = ("loss", "fsdp", "overwrite")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m molmo_fast.eval",
                                description="Evaluate an HF checkpoint or a training run on eval tasks.",
                                epilog="Flags left out keep the gin files' values, then EvalConfig's defaults.")
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin file binding EvalConfig.* (e.g. gin/eval/synthetic.gin); repeatable, later ones win")
    p.add_argument("--gin_param", action="append", default=[],
                   help="gin binding, e.g. \"EvalConfig.batch_size = 4\"; repeatable, applied after the files")
    p.add_argument("--list", action="store_true", help="list every task with its shard source and split, and exit")
    for name, help_text in FIELD_HELP.items():
        flag = "--knob" if name == "knobs" else f"--{name}"
        if name in _SWITCHES:
            p.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
        elif name == "knobs":
            p.add_argument(flag, dest=name, action="append", help=help_text)
        elif name == "dtype":
            p.add_argument(flag, choices=sorted(DTYPES), help=help_text)
        else:
            p.add_argument(flag, type=_TYPES.get(name, str), help=help_text)
    return p


def task_table() -> str:
    """Every task and the shard set it reads: `python -m molmo_fast.data.build --source SOURCE --split SPLIT`."""
    lines = [f"{'task':<20}{'source (data.build --source)':<33}{'split':<12}{'metric':<22}paper"]
    for t in TASKS.values():
        paper = "" if t.paper_score is None else f"{t.paper_score:.1f}"
        source = t.source + (" (generated)" if t.synthetic_size else "")
        lines.append(f"{t.name:<20}{source:<33}{t.split:<12}{t.primary:<22}{paper}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        print(task_table())
        return []
    overrides = {k: v for k, v in vars(args).items() if k in FIELD_HELP and v is not None}
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
        print(f"molmo_fast.eval: wrote {cfg.out}/ (per task: settings.json, predictions.jsonl, metrics.json; "
              f"all tasks: metrics.json; TensorBoard: tensorboard --logdir {Path(cfg.out) / 'tb'})")
    return results


if __name__ == "__main__":
    main()
