"""Train and val loss of one run or several, overlaid, by step and by tokens seen (and a third panel with the
benchmark scores of runs that had train.eval_tasks, e.g. HellaSwag acc_norm by step):
`python -m dist_gpt.plot out/bible-tiny` or `python -m dist_gpt.plot out/rope out/learned --out rope-vs-learned.png`."""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_gpt.errors import UserError, cli
from dist_gpt.tools.runs import Run, read_runs


def plot_runs(runs: list[Run], out: Path, title: str = "") -> float | None:
    """Two panels (x = step, x = tokens); each run one colour: train a thin line, val a thick line with dots.
    Steps where a run logged a non-finite loss are gaps in its line. Returns where the y axis was cut, if it was."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'dist_gpt[plot]'") from None
    tasks = sorted({task for run in runs for task in run.tasks})
    fig, axes = plt.subplots(1, 3 if tasks else 2, figsize=(18 if tasks else 12, 4.5))
    cut = None
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if tasks:
        _plot_tasks(axes[2], runs, tasks, colours)
    for ax, x_key, label in ((axes[0], "step", "step"), (axes[1], "tokens", "tokens seen")):  # the loss panels
        for i, run in enumerate(runs):
            colour = colours[i % len(colours)]
            for points, style in ((run.train, dict(lw=0.8, alpha=0.5)), (run.val, dict(lw=2.0, marker="o", ms=3))):
                xs = [getattr(p, x_key) for p in points]
                ys = [float("nan") if p.value is None else p.value for p in points]  # NaN breaks the line
                ax.plot(xs, ys, color=colour, **style)
            ax.plot([], [], color=colour, lw=2.0, label=run.name)  # one legend entry per run
        ax.plot([], [], color="grey", lw=0.8, alpha=0.5, label="train (thin)")
        ax.plot([], [], color="grey", lw=2.0, marker="o", ms=3, label="val (dots)")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        top = _top_after_the_start(runs)
        highest = max((p.value for run in runs for p in run.train + run.val if p.value is not None), default=None)
        if top is not None and highest is not None and highest > top:
            ax.set_ylim(top=top)
            cut = top
            ax.set_title(f"y cut at {top:.2f}: each run's first tenth of steps reaches {highest:.2f}", fontsize="small")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small", loc="upper right")
    fig.suptitle(title or ", ".join(run.name for run in runs))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return cut


def _plot_tasks(ax, runs: list[Run], tasks: list[str], colours: list[str]) -> None:
    """acc_norm (%) by step: a colour per run as in the loss panels, a line style per task; chance is 25 %."""
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        for j, task in enumerate(tasks):
            points = run.tasks.get(task, [])
            ys = [float("nan") if p.value is None else 100 * p.value for p in points]
            ax.plot([p.step for p in points], ys, color=colours[i % len(colours)], ls=styles[j % len(styles)], marker="o", ms=3, label=f"{run.name} {task}")
    ax.axhline(25.0, color="grey", lw=0.8, ls=":", label="chance (4 endings)")
    ax.set_xlabel("step")
    ax.set_ylabel("acc_norm (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _top_after_the_start(runs: list[Run]) -> float | None:
    """An upper y limit that leaves out each run's first tenth of steps: the initial loss (~11 for a 50k
    vocabulary) would otherwise squeeze the part where runs differ into a sliver. Each run's own tenth: a short
    run beside a long one keeps its line (the longest run's tenth could be all of it)."""
    later = []
    for run in runs:
        points = [p for p in run.train + run.val if p.value is not None]
        last = max((p.step for p in points), default=0)
        later += [p.value for p in points if p.step > last / 10]
    return max(later) * 1.02 if later else None


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN", help="run directories (train.out_dir/train.run_name)")
    parser.add_argument("--out", default="", help="PNG path (default: RUN/loss.png for one run, loss.png here for several)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    runs = read_runs(args.run_dirs)
    for run in runs:
        if not run.train and not run.val:
            raise UserError(f"{run.path}/metrics.jsonl has no losses yet: let the run log a step first")
    out = Path(args.out) if args.out else (runs[0].path / "loss.png" if len(runs) == 1 else Path("loss.png"))
    cut = plot_runs(runs, out, args.title)
    print(f"wrote {out}" + (f" (loss axis cut at {cut:.2f}, leaving out each run's first tenth of steps)" if cut is not None else ""))


if __name__ == "__main__":
    main()
