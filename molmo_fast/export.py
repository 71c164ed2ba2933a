"""Export a training checkpoint to the HF MolmoE layout: `python -m molmo_fast.export RUN_DIR OUT_DIR [--step N]`.

What the output holds: see molmo_fast/runtime/export.py.
"""

import argparse

from molmo_fast.outdir import OutputDirError
from molmo_fast.runtime.export import export_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m molmo_fast.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a molmo_fast training run directory (holds checkpoints/step_N)")
    parser.add_argument("out_dir", help="where to write the HF-layout model")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in OUT_DIR (never other files, never the run directory)")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out_dir, args.step, overwrite=args.overwrite)
    except (OutputDirError, FileNotFoundError) as e:
        raise SystemExit(f"molmo_fast.export: {e}") from None
    print(f"molmo_fast.export: wrote {out}")


if __name__ == "__main__":
    main()

