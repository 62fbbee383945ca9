"""Train a GPT: `torchrun --nproc_per_node=N launch/train.py --config bible-tiny [section.key=value ...]`.

Also `python launch/train.py ...` (one process) and `deepspeed launch/train.py --ds_config ds_configs/zero2.json ...`.
"""

import argparse

from dist_gpt.config import load_config
from dist_gpt.errors import cli
from dist_gpt.run import run_training


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bible-tiny", help="a preset name (dist_gpt/configs) or a YAML file")
    parser.add_argument("--ds_config", "--deepspeed_config", default="", help="DeepSpeed JSON config (selects the deepspeed strategy)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 model.position=learned")
    args = parser.parse_args()
    overrides = list(args.overrides) + ([f"parallel.ds_config={args.ds_config}"] if args.ds_config else [])
    run_training(load_config(args.config, overrides))


if __name__ == "__main__":
    main()
