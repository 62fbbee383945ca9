"""A run directory read back: what `plot` and `compare` show.

A run lives in out_dir/run_name. Its metrics.jsonl holds, one JSON object a line: a `run_start` record from
each process that trained it (parameters, world size, the full config), the step records (`loss`, `tokens`,
...), the eval records (`val_loss`) and a `summary` from each process that finished (throughput, wall time).
A resumed run appends, so a step re-run after a resume appears twice: the last one counts. Losses may be
null (a non-finite value written as strict JSON) or NaN (older files): both read as "no value". Runs from
before `run_start` existed still have their config in the latest checkpoint's manifest.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dist_gpt.errors import UserError

TASK_SCORE_SUFFIX = "_acc_norm"  # a benchmark's headline number in metrics.jsonl (hellaswag_acc_norm)


@dataclass(frozen=True)
class Point:
    step: int
    tokens: int
    value: float | None  # None: the run logged a non-finite value here


@dataclass
class Run:
    name: str
    path: Path
    train: list[Point] = field(default_factory=list)
    val: list[Point] = field(default_factory=list)
    tasks: dict[str, list[Point]] = field(default_factory=dict)  # "hellaswag" -> its acc_norm by step (train.eval_tasks)
    config: dict | None = None  # Config.to_dict() of the last process that trained it
    params: int | None = None
    wall_s: float | None = None  # summed over the processes that finished
    tokens_per_s: float | None = None  # the last finished process's steady-state throughput

    @property
    def steps(self) -> int:
        return max((p.step for p in self.train + self.val), default=0)

    @property
    def tokens(self) -> int:
        return max((p.tokens for p in self.train + self.val), default=0)

    @property
    def final_val(self) -> float | None:
        return self.val[-1].value if self.val else None

    @property
    def best_val(self) -> Point | None:
        scored = [p for p in self.val if p.value is not None]
        return min(scored, key=lambda p: p.value) if scored else None


def read_records(run_dir: Path) -> list[dict]:
    """The JSON objects of RUN_DIR/metrics.jsonl. A line that does not parse (a process killed mid-write)
    is skipped with a note on stderr."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}: give a run directory (train.out_dir/train.run_name)")
    records, broken = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)  # also reads NaN / Infinity, which older files hold
        except ValueError:
            broken += 1
            continue
        if isinstance(record, dict):
            records.append(record)
    if broken:
        print(f"note: {path}: skipped {broken} unreadable line(s)", file=sys.stderr)
    return records


def last_per_step(records: list[dict], key: str) -> list[Point]:
    """The run's values of `key` by step, the last one logged for each step (a resume re-logs steps)."""
    by_step = {r["step"]: r for r in records if key in r and isinstance(r.get("step"), int)}
    return [Point(s, int(by_step[s].get("tokens") or 0), _finite(by_step[s][key])) for s in sorted(by_step)]


def read_run(run_dir: str | Path, name: str | None = None) -> Run:
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    run = Run(name or run_dir.name, run_dir, last_per_step(records, "loss"), last_per_step(records, "val_loss"))
    task_keys = sorted({key for r in records for key in r if key.endswith(TASK_SCORE_SUFFIX)})
    run.tasks = {key.removesuffix(TASK_SCORE_SUFFIX): last_per_step(records, key) for key in task_keys}
    starts = [r["run_start"] for r in records if isinstance(r.get("run_start"), dict)]
    summaries = [r["summary"] for r in records if isinstance(r.get("summary"), dict)]
    if starts:
        run.config, run.params = starts[-1].get("config"), starts[-1].get("params")
    else:
        run.config = _config_from_checkpoint(run_dir)
    if run.params is None and run.config is not None:
        run.params = _count_params(run.config)
    walls = [w for w in (_finite(s.get("wall_s")) for s in summaries) if w is not None]
    run.wall_s = sum(walls) if walls else None
    run.tokens_per_s = _finite(summaries[-1].get("tokens_per_s")) if summaries else None
    return run


def read_runs(run_dirs: list[str]) -> list[Run]:
    """Runs named by their directory's name; where two share a name, by the path as given."""
    names = [Path(d).name for d in run_dirs]
    return [read_run(d, name if names.count(name) == 1 else str(d)) for d, name in zip(run_dirs, names)]


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _config_from_checkpoint(run_dir: Path) -> dict | None:
    from dist_gpt.checkpoint.manifest import read_manifest, resolve_checkpoint_dir

    try:
        return read_manifest(resolve_checkpoint_dir(run_dir))["config"]
    except (UserError, KeyError):
        return None


def _count_params(config: dict) -> int | None:
    import torch

    from dist_gpt.config import from_dict
    from dist_gpt.model import GPT

    try:
        gpt_config = from_dict(config).model.gpt_config()
    except UserError:
        return None  # a config this version no longer reads: the count stays unknown
    with torch.device("meta"):  # shapes only: no memory, no init
        return GPT(gpt_config).num_params(non_embedding=False)
