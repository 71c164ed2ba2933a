"""Export a training checkpoint to the HF MolmoE layout: `python -m molmo_fast.export RUN_DIR OUT_DIR [--step N]`.

What the output holds: see molmo_fast/runtime/export.py.
"""

import argparse

from molmo_fast.runtime.export import export_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m molmo_fast.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a molmo_fast training run directory (holds checkpoints/step_N)")
    parser.add_argument("out_dir", help="where to write the HF-layout model")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    out = export_run(args.run_dir, args.out_dir, args.step)
    print(f"molmo_fast.export: wrote {out}")


if __name__ == "__main__":
    main()

