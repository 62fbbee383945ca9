"""Train a GPT.

    python launch/train.py --config bible-tiny [section.key=value ...]          one process
    python launch/train.py --nproc_per_node=8 --config gpt2-124m-owt            8 processes (DDP, FSDP, DeepSpeed)

`torchrun ... launch/train.py ...` and `deepspeed ... launch/train.py --ds_config ...` start it too; with
--nproc_per_node (and torchrun's other options) it launches the workers itself, through torchrun's machinery,
and a mistake or a Ctrl-C ends with our line rather than the launcher's report (dist_gpt/runtime/launcher.py says why).
"""

import argparse
import sys

from dist_gpt.config import load_config
from dist_gpt.config_render import add_print_config, render_config
from dist_gpt.errors import cli, run_worker_entry_point
from dist_gpt.runtime.launcher import add_launch_arguments, exit_with_launcher, launch, preflight, torchrun_argv, wants_launch


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bible-tiny", help="a preset name (dist_gpt/configs) or a YAML file")
    parser.add_argument("--ds_config", "--deepspeed_config", default="", help="DeepSpeed JSON config (selects the deepspeed strategy)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 model.position=learned")
    add_launch_arguments(parser)
    add_print_config(parser, [
        "python launch/train.py --config bible-tiny train.max_steps=50 train.micro_batch_size=4",
        "python launch/train.py --config bible-seed model.position=learned model.dropout=0.1",
        "python launch/train.py --nproc_per_node=2 --config bible-tiny parallel.strategy=fsdp train.run_name=fsdp",
    ])  # fmt: skip
    args = parser.parse_args()
    overrides = list(args.overrides) + ([f"parallel.ds_config={args.ds_config}"] if args.ds_config else [])
    config = load_config(args.config, overrides)
    if args.print_config:
        print(render_config(config))
        return
    if wants_launch(args):
        preflight(config, args)  # a mistake is said once, before any worker starts
        worker_args = ["--config", args.config, *(["--ds_config", args.ds_config] if args.ds_config else []), *args.overrides]
        sys.exit(launch(torchrun_argv(args, __file__, worker_args), config.run_dir))

    from dist_gpt.train.run import exit_status, run_training  # here: --help, --print-config and the launcher need none of its imports

    sys.exit(exit_status(run_training(config)))


if __name__ == "__main__":
    exit_with_launcher()  # a worker: not one moment longer than its launcher
    run_worker_entry_point(main)
