"""`python -m dist_gpt.autotune` (also `python -m dist_gpt.autotune_batch`): tune, print the table."""

from __future__ import annotations

import argparse
from typing import Sequence

from dist_gpt.autotune import __doc__ as package_doc
from dist_gpt.autotune.measure import TRIAL_STEPS
from dist_gpt.autotune.memory import GB
from dist_gpt.autotune.tuner import autotune, say
from dist_gpt.config import CHOICES, load_config
from dist_gpt.config_render import add_print_config, render_config
from dist_gpt.errors import UserError, cli
from dist_gpt.parallel import check_strategy
from dist_gpt.runtime.distributed import destroy_distributed, init_distributed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dist_gpt.autotune_batch", description=package_doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bible-tiny", help="a preset name (dist_gpt/configs) or a YAML file")
    parser.add_argument("--strategy", choices=CHOICES[("parallel", "strategy")], help="parallel.strategy (default: the config's)")
    parser.add_argument("--ds_config", "--deepspeed_config", default="", help="DeepSpeed JSON (with --strategy deepspeed)")
    parser.add_argument("--memory-budget-gb", type=float, default=0.0, help="memory per rank to fill (default: the whole GPU; on CPU the available RAM)")
    parser.add_argument("--headroom", type=float, default=0.08, help="fraction of the budget kept free (default 0.08)")
    parser.add_argument("--objective", choices=("largest", "throughput"), default="largest")
    parser.add_argument("--trial-steps", type=int, default=TRIAL_STEPS, help=f"optimizer steps per trial (default {TRIAL_STEPS}, at least 2)")
    parser.add_argument("--no-cache", action="store_true", help="search even if a cached result exists (and replace it)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.block_size=512 train.global_batch_size=64")
    add_print_config(parser, ["python -m dist_gpt.autotune_batch --config gpt2-124m-owt --memory-budget-gb 24 model.block_size=512"])
    return parser.parse_args(argv)


@cli
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.trial_steps < 2:
        raise UserError(f"--trial-steps={args.trial_steps} must be at least 2: the first step has no optimizer state yet")
    overrides = list(args.overrides)
    if args.strategy:
        overrides.append(f"parallel.strategy={args.strategy}")
    if args.ds_config:
        overrides.append(f"parallel.ds_config={args.ds_config}")
    config = load_config(args.config, overrides)
    if args.print_config:
        print(render_config(config))
        return
    env = init_distributed(config.train.device, config.train.dtype, config.parallel.backend, cpu_tensors=config.parallel.fsdp_cpu_offload)
    try:
        report = autotune(config, env, check_strategy(config, env), budget_bytes=args.memory_budget_gb * GB or None,
                          headroom=args.headroom, objective=args.objective, use_cache=not args.no_cache, steps=args.trial_steps,
                          log=say if env.is_main else None)
        if env.is_main:
            say(report.render())
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
