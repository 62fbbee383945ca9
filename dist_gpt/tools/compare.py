"""Runs side by side: `python -m dist_gpt.compare out/rope out/learned [RUN ...]`.

Prints a Markdown table (paste it into a doc as it is): final and best val loss, steps, tokens, wall time,
training throughput and parameters of each run (and the last benchmark score, e.g. HellaSwag acc_norm, of runs
that had train.eval_tasks), then the config keys whose values differ between the runs."""

from __future__ import annotations

import argparse

from dist_gpt.errors import UserError, cli
from dist_gpt.tools.runs import Run, read_runs

ALWAYS_DIFFERENT = {"train.run_name"}  # each run's own name: in the first column already
MISSING = "—"


def markdown_table(runs: list[Run]) -> str:
    header = ["run", "final val", "best val (step)", "steps", "tokens", "wall time", "train tok/s", "params"]
    rows = [
        [
            run.name,
            _loss(run.final_val),
            f"{run.best_val.value:.4f} ({run.best_val.step})" if run.best_val else MISSING,
            str(run.steps),
            _si(run.tokens),
            _duration(run.wall_s),
            f"{run.tokens_per_s:,.0f}" if run.tokens_per_s is not None else MISSING,
            _si(run.params, digits=2) if run.params is not None else MISSING,
        ]
        for run in runs
    ]
    for task in sorted({task for run in runs for task in run.tasks}):  # train.eval_tasks: the last score of each
        header.append(f"{task} acc_norm")
        for row, run in zip(rows, runs):
            last = run.tasks.get(task, [])[-1:]
            row.append(f"{100 * last[0].value:.2f}% ({last[0].step})" if last and last[0].value is not None else MISSING)
    text = _table(header, rows)
    differing = differing_keys(runs)
    if len(runs) > 1:
        if differing:
            text += "\n\nconfig keys that differ:\n\n" + _table(["key", *(run.name for run in runs)], [[k, *map(_value, v)] for k, v in differing.items()])
        else:
            text += "\n\nno config key differs (besides train.run_name)"
    unknown = [run.name for run in runs if run.config is None]
    if unknown:
        text += f"\n\nno config recorded for {', '.join(unknown)} (no run_start record and no checkpoint)"
    return text


def differing_keys(runs: list[Run]) -> dict[str, list]:
    """dotted key -> each run's value, for the keys that are not the same in every run that has a config."""
    flat = [_flatten(run.config) if run.config is not None else None for run in runs]
    known = [f for f in flat if f is not None]
    keys = sorted({k for f in known for k in f} - ALWAYS_DIFFERENT)
    return {k: [f.get(k, MISSING) if f is not None else "?" for f in flat] for k in keys if len({repr(f.get(k, MISSING)) for f in known}) > 1}


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else MISSING


def _si(n: int, digits: int = 1) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.{digits}f}{suffix}"
    return str(n)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m" if hours else f"{m}m {s:02d}s" if m else f"{s}s"


def _value(v) -> str:
    return str(v) if not isinstance(v, float) else f"{v:g}"


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN", help="run directories (train.out_dir/train.run_name)")
    args = parser.parse_args(argv)
    runs = read_runs(args.run_dirs)
    if not any(run.train or run.val for run in runs):
        raise UserError("none of these runs has logged a step yet: compare them once they have")
    print(markdown_table(runs))


if __name__ == "__main__":
    main()
