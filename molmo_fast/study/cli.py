"""`python -m molmo_fast.study --checkpoint PATH --tasks T[,T] --grid top_k=1,2,4,8 [--grid routing=topk,topk_renorm]`

For every setting of the grid (Cartesian product of the --grid axes) or of --settings FILE: the eval runner
(predictions and metrics under DIR/settings/<id>/) and the per-stage latency probe, then one row in
DIR/study.jsonl; DIR/pareto.json holds the fronts, DIR/study.png the pictures, DIR/tb the TensorBoard HParams
(`tensorboard --logdir DIR/tb`). Rerunning with the same --out skips the settings already done.
"""

import argparse
import json
from pathlib import Path

from molmo_fast.eval.tasks import TASKS
from molmo_fast.knobs import Knobs
from molmo_fast.outdir import OutputDirError
from molmo_fast.runtime.device import DTYPES
from molmo_fast.study import report
from molmo_fast.study.grid import load_settings, parse_grid
from molmo_fast.study.oracle import format_report, oracle_k
from molmo_fast.study.runner import StudyConfig, read_rows, run_study

GRID_HELP = ("KEY=V1,V2,... -- one axis of the grid (repeatable; the settings are the Cartesian product). KEY is a "
             "knob of molmo_fast.knobs: top_k, top_k_image, top_k_text, top_k_generated, routing (topk, "
             "topk_renorm, top_p:P, threshold:T), skip_blocks, max_crops, max_new_tokens, moe_impl. Values that are "
             "lists themselves (skip_blocks, per-layer top_k) are separated by ';' instead: skip_blocks=;3;3,7 is "
             "none, {3}, {3,7}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m molmo_fast.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="HF checkpoint dir, or a training run dir (its latest checkpoint), as eval")
    p.add_argument("--tasks", help=f"comma-separated eval tasks or the suites 'paper' / 'synthetic', as eval; "
                   f"one of {sorted(TASKS)}")
    p.add_argument("--grid", action="append", default=[], help=GRID_HELP)
    p.add_argument("--settings", help="JSONL file of explicit settings, one {knob: value} object per line "
                   "(instead of --grid)")
    p.add_argument("--knob", action="append", default=[], help="KEY=VALUE knob applied under every setting "
                   "(repeatable), e.g. max_new_tokens=8")
    p.add_argument("--max_examples", type=int, help="per task, the first N examples (default: all)")
    p.add_argument("--batch_size", type=int, default=8, help="eval and latency-probe batch size (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
    p.add_argument("--repeats", type=int, default=3, help="timed latency-probe runs per setting; the median is "
                   "reported (default 3, after one warm-up run)")
    p.add_argument("--data_dir", default="data", help="root of the eval task shard sets, as eval (default data)")
    p.add_argument("--out", default="runs/study", help="study directory DIR (default runs/study)")
    p.add_argument("--oracle", action="store_true", help="post hoc, from DIR's saved predictions of a top_k grid: "
                   "the oracle per-example k (no new runs; writes DIR/oracle.json)")
    return p


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.oracle:
        return _oracle(parser, out)
    if not args.checkpoint or not args.tasks:
        parser.error("--checkpoint and --tasks are required (unless --oracle)")
    if bool(args.grid) == bool(args.settings):
        parser.error("give the settings either as --grid KEY=V1,V2 (repeatable) or as --settings FILE")
    for name in ("max_examples", "batch_size", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} = {value}, expected >= 1")
    try:
        settings = parse_grid(args.grid) if args.grid else load_settings(args.settings)
        Knobs.parse(args.knob)
        cfg = StudyConfig(args.checkpoint, args.tasks, settings, out=args.out, knobs=args.knob,
                          max_examples=args.max_examples, batch_size=args.batch_size, device=args.device,
                          dtype=args.dtype, repeats=args.repeats, data_dir=args.data_dir)
        cfg.eval_config({}, out)  # validates the eval side (tasks, dtype, ...) before anything runs
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        rows = run_study(cfg)
    except OutputDirError as e:  # raised before any setting runs
        parser.error(str(e))
    report.plot(rows, out / "study.png")
    report.tensorboard(rows, out / "tb")
    print(report.table(rows))
    print(f"study: {len(rows)} settings -> {out / 'study.jsonl'}, {out / 'pareto.json'}, {out / 'study.png'}, "
          f"TensorBoard HParams in {out / 'tb'} ('*' = on the score-vs-latency front)")
    return rows


def _oracle(parser: argparse.ArgumentParser, out: Path) -> list[dict]:
    rows = read_rows(out)
    if not rows:
        parser.error(f"--oracle: no study rows in {out / 'study.jsonl'}; run a --grid top_k=... study there first")
    reports = oracle_k(out, rows)
    if not reports:
        parser.error(f"--oracle: {out / 'study.jsonl'} has no group of settings that differ only in a scalar top_k")
    (out / "oracle.json").write_text(json.dumps(reports, indent=1) + "\n")
    for r in reports:
        print(format_report(r))
    print(f"oracle: {len(reports)} group(s) -> {out / 'oracle.json'}")
    return reports


if __name__ == "__main__":
    main()
