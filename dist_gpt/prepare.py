"""Tokenize a dataset into train.bin / val.bin / meta.json: `python -m dist_gpt.prepare [--config PRESET] [--dataset SPEC] ...`

Datasets: bible-es (apt-get install sword-text-sparv) | a .txt/.jsonl/.parquet path, folder or glob | hf:NAME[:CONFIG].
With --config the data section of that preset or YAML is the default; flags override it. The output folder
defaults to the config's data.dir, else data/<dataset name> (where training looks for it).
"""

import argparse
import dataclasses

from dist_gpt.config import Config, DataSection, load_config
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
    parser.add_argument("--num-proc", type=int, help="tokenizer threads (0 = one per core)")
    parser.add_argument("--force", action="store_true", help="redo it even if the output is up to date")
    args = parser.parse_args(argv)

    data = load_config(args.config).data if args.config else DataSection()
    flags = {
        "dataset": args.dataset,
        "dir": args.out,
        "val_fraction": args.val_fraction,
        "text_field": args.text_field,
        "hf_split": args.hf_split,
        "num_proc": args.num_proc,
    }
    data = dataclasses.replace(data, **{key: value for key, value in flags.items() if value is not None})
    out_dir = Config(data=data).data_dir  # the same default folder the trainer reads
    return prepare_dataset(data.dataset, out_dir, data.val_fraction, data.text_field, data.hf_split, data.num_proc, args.force)


if __name__ == "__main__":
    main()
