"""Tokenize a dataset into train.bin / val.bin / meta.json: `python -m dist_gpt.prepare [--config PRESET] [--dataset SPEC] ...`

Datasets: bible-es (apt-get install sword-text-sparv) | a .txt/.jsonl/.parquet path, folder or glob | hf:NAME[:CONFIG]
(CONFIG: the dataset's config name, e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT).
With --config the data section of that preset or YAML is the default; flags override it. The output folder
defaults to the config's data.dir, else data/<dataset name> (where training looks for it).
"""

import argparse
import dataclasses

from dist_gpt.config import Config, load_config
from dist_gpt.config_render import add_print_config, render_config
from dist_gpt.data import prepare_dataset
from dist_gpt.errors import cli


@cli
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a preset name (dist_gpt/configs) or a YAML file; its data section gives the defaults")
    parser.add_argument("--dataset", help="bible-es | PATH/GLOB of .txt/.jsonl/.parquet | hf:NAME[:CONFIG]")
    parser.add_argument("--out", help="output folder (default: data.dir, else data/<dataset name>)")
    parser.add_argument("--val-fraction", type=float, help="fraction of documents held out for validation")
    parser.add_argument("--text-field", help="the text column of .jsonl/.parquet/hf data")
    parser.add_argument("--hf-split", help="the split of a hf: dataset to read")
    parser.add_argument("--num-proc", type=int, help="tokenizer processes (0 = one per core)")
    parser.add_argument("--max-tokens", type=int, help="stop after this many tokens (whole documents; 0 = all), e.g. 1000000000 for a 1B-token sample")
    parser.add_argument("--force", action="store_true", help="redo it even if the output is up to date")
    add_print_config(parser, ["python -m dist_gpt.prepare --dataset 'books/*.txt' --val-fraction 0.02", "python -m dist_gpt.prepare --config bible-tiny --print-config"],
                     overriding="The flags above set the config's data section (launch/train.py takes data.KEY=value)")  # fmt: skip
    args = parser.parse_args(argv)

    config = load_config(args.config) if args.config else Config()
    data = config.data
    flags = {
        "dataset": args.dataset,
        "dir": args.out,
        "val_fraction": args.val_fraction,
        "text_field": args.text_field,
        "hf_split": args.hf_split,
        "num_proc": args.num_proc,
        "max_tokens": args.max_tokens,
    }
    config.data = data = dataclasses.replace(data, **{key: value for key, value in flags.items() if value is not None})
    if args.print_config:
        print(render_config(config))
        return {}
    out_dir = config.data_dir  # the same default folder the trainer reads
    return prepare_dataset(data.dataset, out_dir, data.val_fraction, data.text_field, data.hf_split, data.num_proc, args.force, data.max_tokens)


if __name__ == "__main__":
    main()
