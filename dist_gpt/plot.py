"""Plot a run's train and val loss against steps and tokens: `python -m dist_gpt.plot out/bible-tiny`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dist_gpt.errors import UserError, cli


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}: give the run directory (train.out_dir/train.run_name)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_per_step(records: list[dict], key: str) -> list[dict]:
    """A resumed run re-logs the steps after its checkpoint: keep the last value of each step."""
    by_step = {r["step"]: r for r in records if key in r}
    return [by_step[s] for s in sorted(by_step)]


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default="", help="PNG path (default RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'dist_gpt[plot]'") from None
    run_dir = Path(args.run_dir)
    records = read_metrics(run_dir)
    train, val = last_per_step(records, "loss"), last_per_step(records, "val_loss")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x_key, label in ((axes[0], "step", "step"), (axes[1], "tokens", "tokens seen")):
        ax.plot([r[x_key] for r in train], [r["loss"] for r in train], label="train")
        ax.plot([r[x_key] for r in val], [r["val_loss"] for r in val], "o-", label="val")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(args.out) if args.out else run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
