"""Train a GPT: `torchrun --nproc_per_node=N launch/train.py --config bible-tiny [section.key=value ...]`.

Also `python launch/train.py ...` (one process) and `deepspeed launch/train.py --ds_config ds_configs/zero2.json ...`.
"""

import argparse

from dist_gpt.config import add_print_config, load_config, render_config
from dist_gpt.errors import cli
from dist_gpt.run import run_training


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bible-tiny", help="a preset name (dist_gpt/configs) or a YAML file")
    parser.add_argument("--ds_config", "--deepspeed_config", default="", help="DeepSpeed JSON config (selects the deepspeed strategy)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 model.position=learned")
    add_print_config(parser, [
        "python launch/train.py --config bible-tiny train.max_steps=50 train.micro_batch_size=4",
        "python launch/train.py --config bible-seed model.position=learned model.dropout=0.1",
        "python launch/train.py --config bible-tiny train.run_name=try2 checkpoint.every_minutes=10 logging.wandb=offline",
    ])  # fmt: skip
    args = parser.parse_args()
    overrides = list(args.overrides) + ([f"parallel.ds_config={args.ds_config}"] if args.ds_config else [])
    config = load_config(args.config, overrides)
    if args.print_config:
        print(render_config(config))
        return
    run_training(config)


if __name__ == "__main__":
    main()
