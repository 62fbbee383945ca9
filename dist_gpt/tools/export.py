"""Consolidate any checkpoint (DCP shards or ZeRO) into a model you can take anywhere.

    python -m dist_gpt.export out/bible-tiny --out bible-tiny.safetensors   # ours: one file with its config
    python -m dist_gpt.export out/bible-tiny --hf bible-tiny-hf             # a Hugging Face transformers directory

Sampling and fine-tuning (`model.init_from=bible-tiny.safetensors` or `model.init_from=bible-tiny-hf`) load
either; `transformers.AutoModelForCausalLM.from_pretrained("bible-tiny-hf")` loads the second (no custom code).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_gpt.errors import UserError, cli
from dist_gpt.interop import load_model
from dist_gpt.interop.export_file import save_exported
from dist_gpt.interop.hf_dir import export_hf


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="run dir (also in object storage: s3://bucket/prefix/RUN), checkpoints dir, step_* dir, an exported .safetensors or `export --hf` dir, or a GPT-2 (name or HF dir)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="the .safetensors file to write (our format)")
    target.add_argument("--hf", help="the directory to write for Hugging Face transformers")
    parser.add_argument("--force", action="store_true", help="overwrite the target if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out or args.hf)
    if args.out and out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors")
    if out.exists() and not args.force:
        raise UserError(f"{out} exists: pass --force to overwrite it, or choose another {'--out' if args.out else '--hf'}")
    if args.hf and out.exists() and not out.is_dir():
        raise UserError(f"--hf {out} is a file: give a directory")

    model = load_model(args.ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.out:
        save_exported(model, out)
        written = out
    else:
        written = export_hf(model, out)
        kind = "GPTNeoXForCausalLM" if model.config.position == "rope" else "GPT2LMHeadModel"
        print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(written)!r}) ({kind})")
    print(f"exported {model.num_params(non_embedding=False):,} parameters to {written}")


if __name__ == "__main__":
    main()
