"""Answer one prompt about one image: `python -m molmo_fast.generate --checkpoint DIR --image PATH --prompt ...`."""

import argparse

import torch
from PIL import Image

from molmo_fast import knobs
from molmo_fast.config import ASSETS
from molmo_fast.data.processor import Processor
from molmo_fast.model.molmoe import MolmoE
from molmo_fast.runtime.checkpoints import resolve_checkpoint
from molmo_fast.runtime.device import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m molmo_fast.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="HF-layout MolmoE directory (config.json + safetensors), or a training run dir (its "
                        "end-of-run export or latest checkpoint, as for eval)")
    p.add_argument("--step", type=int, help="checkpoint step of a run dir (default: the latest)")
    p.add_argument("--image", help="image file; omit for a text-only prompt")
    p.add_argument("--prompt", required=True, help="the question or instruction, as a user would type it")
    p.add_argument("--max_new_tokens", type=int, default=200, help="generation length limit (default 200)")
    p.add_argument("--top_k", type=int, help="MoE experts per token (default: the checkpoint's)")
    p.add_argument("--max_crops", type=int, help="image crop budget (default: the checkpoint's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and compute dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    checkpoint = resolve_checkpoint(args.checkpoint, args.step)
    model = MolmoE.from_pretrained(checkpoint, dtype=DTYPES[args.dtype], device=args.device)
    # Crop settings live in preprocessor_config.json; a bare weights export falls back to the release's.
    proc_dir = checkpoint if (checkpoint / "preprocessor_config.json").is_file() else ASSETS / "molmoe-1b"
    processor = Processor.from_pretrained(proc_dir)
    knobs.Knobs(top_k=args.top_k, max_crops=args.max_crops).apply(model, processor)
    images = [Image.open(args.image)] if args.image else None
    batch = {k: v.to(args.device) for k, v in processor(text=args.prompt, images=images).items()}
    eos = model.generation_config.get("eos_token_id")
    out = model.generate(batch["input_ids"], batch.get("images"), batch.get("image_masks"),
                         batch.get("image_input_idx"), max_new_tokens=args.max_new_tokens,
                         eos_token_id=processor.tokenizer.eos_id if eos is None else eos)
    answer = processor.decode(out[0, batch["input_ids"].shape[1]:]).strip()
    print(answer)
    return answer


if __name__ == "__main__":
    main()
