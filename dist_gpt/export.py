"""Consolidate any checkpoint (DCP shards or ZeRO) into one safetensors file with its model config:
`python -m dist_gpt.export out/bible-tiny --out bible-tiny.safetensors`. Sampling and fine-tuning
(`model.init_from=bible-tiny.safetensors`) load it."""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_gpt.checkpoint import load_model
from dist_gpt.errors import UserError, cli


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ckpt", help="run dir, checkpoints dir or step_* dir")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors")
    if out.exists() and not args.force:
        raise UserError(f"{out} exists: pass --force to overwrite it, or choose another --out")
    from dist_gpt.pretrained import save_exported

    model = load_model(args.ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_exported(model, out)
    print(f"exported {model.num_params(non_embedding=False):,} parameters to {out}")


if __name__ == "__main__":
    main()
