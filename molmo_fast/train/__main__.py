"""`python -m molmo_fast.train --gin_file A.gin [--gin_param 'X.y = 1' ...] [--resume latest [--allow_changed C.f]]`

Run under `torchrun --nproc_per_node N` for several ranks. Configurables live in molmo_fast.train.config, never
here: this module runs as `__main__`, and gin would register anything defined in it under a second name.
"""

import argparse
import errno


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m molmo_fast.train", description="Train MolmoE with FSDP2.")
    parser.add_argument("--gin_file", action="append", default=[], required=True,
                        help="gin config file (repeatable; later files override earlier ones)")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="extra gin binding, e.g. 'TrainConfig.max_steps = 10' (repeatable)")
    parser.add_argument("--resume", default=None,
                        help="'latest' to continue the run dir's newest checkpoint, or a checkpoint directory")
    parser.add_argument("--allow_changed", action="append", default=[], metavar="CLASS.FIELD",
                        help="on --resume, accept this setting's change since the checkpoint, e.g. DataConfig.seed "
                             "(repeatable; every other change of the data stream or model is refused)")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from molmo_fast.train.config import load_config
    from molmo_fast.train.trainer import TrainingDiverged, train

    cfg = load_config(args.gin_file, args.gin_param)
    try:
        return train(cfg, resume=args.resume, allow_changed=tuple(args.allow_changed))
    except TrainingDiverged as e:
        raise SystemExit(f"molmo_fast.train: {e}") from e
    except OSError as e:
        if e.errno == errno.ENOSPC:  # the checkpoint writer's message says which step, where and what is intact
            raise SystemExit(f"molmo_fast.train: {e.strerror}") from e
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
