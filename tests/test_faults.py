"""Faults that must cost a run nothing (issue 10), each through the real entry point: divergence, a second start
on one run directory, kill -9 of the lock's holder, bad data, a full disk mid-save, the end of the time budget;
and strict JSON output. `python launch/train.py` runs in this process (train_cli) where only its exit code and
output matter, in subprocesses where processes must meet (the lock) or a launcher is the point (torchrun)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    REPO,
    Proc,
    assert_consistent,
    assert_one_line_error,
    ckpt_root,
    latest_name,
    launch_args,
    losses_by_step,
    mount_tmpfs,
    step_dirs,
    subprocess_env,
    tiny_overrides,
    tmp_dirs,
    train_cli,
)

from dist_gpt.checkpoint.consolidate import consolidated_state_dict
from dist_gpt.config import load_config
from dist_gpt.errors import UserError
from dist_gpt.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def strict_records(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN / Infinity tokens are an error, as in jq or a browser."""

    def refuse(token):
        raise AssertionError(f"{path} has a non-JSON number {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- divergence


def test_divergence_skips_stops_and_keeps_the_good_checkpoints(tiny_data, tmp_path, capsys):
    """Four good steps, then the run resumed with an absurd learning rate: step 5's update throws the weights
    to ~1e30, steps 6-10 are non-finite and skipped, and the run stops with one message. No checkpoint is
    written amid the skips (those due at steps 6 and 8), so keep_last_k=2 deletes nothing: step_2 and step_4
    stay, and `latest` is step_4's finite weights."""
    common = dict(checkpoint__every_steps=2, checkpoint__keep_last_k=2, train__lr_decay_steps=40)
    assert train_cli(launch_args(tiny_data, tmp_path, "run", train__max_steps=4, **common)[1:], capsys)[0] == 0
    code, out, err = train_cli(launch_args(tiny_data, tmp_path, "run", train__max_steps=40, train__lr=1e30, train__grad_clip=0, **common)[1:], capsys)

    run_dir = tmp_path / "run"
    assert_one_line_error(code, err, "the run diverged: steps 6-10 (5 in a row", str(ckpt_root(run_dir) / "step_000004"), "try a lower train.lr (now 1e+30) or train.grad_clip=1.0 (now off)")
    assert "checkpoint saved" not in out
    assert step_dirs(run_dir) == ["step_000002", "step_000004"] and latest_name(run_dir) == "step_000004"
    assert_consistent(run_dir)
    _, weights = consolidated_state_dict(run_dir)
    assert all(bool(w.isfinite().all()) for w in weights.values())
    records = strict_records(run_dir / "metrics.jsonl")
    skipped = [r for r in records if "skipped" in r]
    assert [r["step"] for r in skipped] == [6, 7, 8, 9, 10] and skipped[-1]["skipped_steps"] == 5
    assert any(r["loss"] is None for r in skipped)  # NaN is written as null
    assert "done: step 10 | train loss nan |" in out and "| 5 skipped steps |" in out  # what happened, on one line


def test_divergence_on_two_fsdp_ranks_stops_every_rank(tiny_data, tmp_path, capsys):
    """The same under torchrun with 2 FSDP ranks (resumed, resharded, from a one-process checkpoint): each rank
    holds half of the gradients, all see the same global norm, so all skip together and all stop; none hangs."""
    common = dict(checkpoint__every_steps=2, train__lr_decay_steps=40)
    assert train_cli(launch_args(tiny_data, tmp_path, "run", train__max_steps=4, **common)[1:], capsys)[0] == 0
    args = launch_args(tiny_data, tmp_path, "run", train__max_steps=40, train__lr=1e30, train__grad_clip=0, parallel__strategy="fsdp", **common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "error: the run diverged: steps 6-10 (5 in a row" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "fsdp on 2 x cpu" in proc.stdout and "checkpoint saved" not in proc.stdout
    assert latest_name(tmp_path / "run") == "step_000004"


# ---------------------------------------------------------------------------------------------- data


def _copy_data(tiny_data: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    return data


def _truncate_train(data: Path) -> list[str]:
    with open(data / "train.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 1)  # an odd byte count: numpy's memmap would raise a ValueError traceback
    return ["train.bin is", "truncated or replaced"]


def _short_val(data: Path) -> list[str]:
    np.memmap(data / "val.bin", dtype=np.uint16, mode="r")[:20].tofile(data / "val.bin.short")
    (data / "val.bin.short").replace(data / "val.bin")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "val_tokens": 20}))
    return ["val.bin holds 20 tokens, less than one window", "lower model.block_size", "--val-fraction"]


def _foreign_vocab(data: Path) -> list[str]:
    """Ids of a larger tokenizer than the model's 50304 (uint16 holds them), recorded as prepare would."""
    tokens = np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")
    tokens[7] = 60000
    tokens.flush()
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "max_token_id": 60000}))
    return ["holds token id 60,000", "model.vocab_size=50304"]


@pytest.mark.parametrize("damage", [_truncate_train, _short_val, _foreign_vocab], ids=["truncated", "short", "foreign-vocab"])
def test_bad_data_is_one_line_before_step_one(tiny_data, tmp_path, capsys, damage):
    data = _copy_data(tiny_data, tmp_path)
    fragments = damage(data)
    code, out, err = train_cli(launch_args(data, tmp_path, "run")[1:], capsys)
    assert_one_line_error(code, err, *fragments, f"re-run python -m dist_gpt.prepare --dataset {json.loads((data / 'meta.json').read_text())['source']} --out {data} --force")
    assert not (tmp_path / "run").exists() and "step" not in out  # before the model, the run directory, step 1


def test_meta_without_max_token_id(tiny_data, tmp_path):
    """A meta.json from before max_token_id: trusted up to its tokenizer's vocabulary, which a model at least
    as wide covers; a narrower model is asked to re-run prepare (which records the id) — no scan of train.bin."""
    from dist_gpt.data.check import check_prepared_data

    data = _copy_data(tiny_data, tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    del meta["max_token_id"]
    (data / "meta.json").write_text(json.dumps(meta))
    assert check_prepared_data(data, 32, 50304)["vocab_size"] == 50257
    with pytest.raises(UserError, match="predates the record of the largest token id: re-run python -m dist_gpt.prepare"):
        check_prepared_data(data, 32, 50000)


# ---------------------------------------------------------------------------------------------- lock, kill -9, time limit


def test_second_start_refused_kill9_frees_the_lock_time_limit_stops_and_resumes_exactly(tiny_data, tmp_path):
    """One holder, several faults in turn (start-ups dominate, so they share it):
    1. the first run holds the lock, a second start (python, then torchrun) is refused with one line;
    2. the first run is not disturbed: it stops on its time limit in time, exit 0, a checkpoint at its step;
    3. a third start resumes and is killed with -9 while holding the lock; a fourth start just works;
    4. the losses of all of it equal one uninterrupted run's, bit for bit."""
    limit_s = 35  # start-up + two refused start-ups on 2 loaded cores, with room to spare
    extra = dict(train__lr_decay_steps=20, checkpoint__keep_last_k=1)
    args = launch_args(tiny_data, tmp_path, "run", train__max_steps=100_000, checkpoint__every_steps=1, **extra)
    run_dir = tmp_path / "run"
    first = Proc(args, tmp_path / "first.log", DIST_GPT_TIME_LIMIT=f"{limit_s}s")
    assert first.wait_for(lambda: f'"pid": {first.popen.pid}' in _read(run_dir / "run.lock")), first.text()

    launchers = {
        "python": [sys.executable, *args],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args],
    }
    second = {name: subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name, cmd in launchers.items()}
    outputs = {name: proc.communicate(timeout=120) for name, proc in second.items()}
    refusal = f"{run_dir} is in use by another run (pid {first.popen.pid} on host "
    out, err = outputs["python"]
    assert_one_line_error(second["python"].returncode, err, refusal, f"kill -TERM {first.popen.pid}", "train.run_name=OTHER_NAME")
    assert len((out + err).strip().splitlines()) <= 5, out + err
    assert second["torchrun"].returncode != 0 and refusal in "".join(outputs["torchrun"])  # torchrun adds its own report

    assert first.finish(120) == 0, first.text()[-3000:]
    lifetime = time.time() - first.started  # >= the process's own life: it started after `started`
    assert lifetime <= limit_s, f"ran {lifetime:.1f} s past a {limit_s} s limit:\n{first.text()[-2000:]}"
    line = next(line for line in first.text().splitlines() if line.startswith("stopping on DIST_GPT_TIME_LIMIT="))
    stopped = int(line.split(" after step ")[1].split(":")[0])
    assert latest_name(run_dir) == f"step_{stopped:06d}" and stopped > 1, first.text()[-2000:]

    holder = Proc(args, tmp_path / "holder.log")
    assert holder.wait_for_line(f"resumed from {ckpt_root(run_dir)}"), holder.text()
    assert holder.wait_for_line(f"step {stopped + 1:6d} |"), holder.text()
    holder.kill()  # SIGKILL: the kernel drops the lock with the process

    total = stopped + 3
    overrides = tiny_overrides(tiny_data, tmp_path, "run", train__max_steps=total, **extra)
    assert train(load_config("bible-tiny", overrides))["step"] == total  # a new start: the lock is free
    train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "reference", train__max_steps=total, **extra)))
    expected = losses_by_step(tmp_path / "reference")
    assert sorted(expected) == list(range(1, total + 1))
    assert losses_by_step(run_dir) == expected  # floats compared with ==: bit-identical


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


# ---------------------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real 30 MB file system (tmpfs): one tiny checkpoint (~20 MB) fits, a second does not."""
    yield from mount_tmpfs(tmp_path / "disk", "size=30m")


def assert_full_disk_kept_step_2(run_dir: Path, output: str) -> None:
    assert "warning: the checkpoint of step 4 was not saved" in output and f"{ckpt_root(run_dir) / 'step_000002'} is still the latest" in output
    assert "error: the checkpoint of step 6 was not saved" in output and "run the same command to resume" in output
    assert step_dirs(run_dir) == ["step_000002"] and latest_name(run_dir) == "step_000002" and not tmp_dirs(run_dir)
    assert_consistent(run_dir)


def test_full_disk_mid_save_keeps_the_previous_checkpoint(tiny_data, tmp_path, small_disk, capsys):
    """ENOSPC while writing step 4's checkpoint: abandoned, step_2 and `latest` intact, training goes on; the
    final save fails too: exit != 0. With space freed the same command resumes from step 2 to the same losses.
    Then a re-run of the finished run: one line, a summary without NaN, nothing added to metrics.jsonl."""
    extra = dict(train__max_steps=6, checkpoint__every_steps=2, checkpoint__keep_last_k=1)
    args = launch_args(tiny_data, small_disk, "run", **extra)[1:]  # without the script: train_cli runs it
    code, out, err = train_cli(args, capsys)
    run_dir = small_disk / "run"
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert_full_disk_kept_step_2(run_dir, out + err)
    assert sorted(losses_by_step(run_dir)) == list(range(1, 7))  # it trained on after the failed save

    subprocess.run(["mount", "-o", "remount,size=100m", str(small_disk)], check=True)
    code, out, err = train_cli(args, capsys)
    assert code == 0 and f"resumed from {ckpt_root(run_dir) / 'step_000002'} at step 2" in out, out + err
    train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "reference", **extra)))
    assert losses_by_step(run_dir) == losses_by_step(tmp_path / "reference")
    capsys.readouterr()

    records = (run_dir / "metrics.jsonl").read_text()
    code, out, err = train_cli(args, capsys)
    assert code == 0 and "this run is already complete at step 6" in out, out + err
    done = [line for line in out.splitlines() if line.startswith("done:")]
    assert done == [f"done: step 6 | single, micro-batch 4 x grad-accum 1 | {run_dir}"]
    assert (run_dir / "metrics.jsonl").read_text() == records
    assert strict_records(run_dir / "metrics.jsonl")[-1]["summary"]["step"] == 6


def test_full_disk_with_async_saves_on_two_ranks(tiny_data, small_disk):
    """The same fault under torchrun with 2 ranks and background (async) writes: every rank agrees the save
    failed (none waits for another), step_2 stays the latest, the failed final save is an exit != 0."""
    args = launch_args(tiny_data, small_disk, "run", train__max_steps=6, checkpoint__every_steps=2, checkpoint__keep_last_k=1, checkpoint__async_save="true")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert_full_disk_kept_step_2(small_disk / "run", proc.stdout + proc.stderr)


# ---------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "value, seconds",
    [("3h30m", 12600), ("90m", 5400), (90, 5400), ("1.5", 90), ("45s", 45), ("1d2h", 93600), ("2:30:00", 9000), ("1-00:00:00", 86400), ("", None), (0, None)],
)
def test_time_limit_parsing(value, seconds):
    from dist_gpt.config import parse_time_limit

    assert parse_time_limit(value) == seconds


def test_time_limit_in_config_and_environment(monkeypatch):
    from dist_gpt.train.time_budget import ENV_VAR, effective_time_limit

    assert load_config("bible-tiny", ["train.time_limit=2:30:00"]).train.time_limit == "2:30:00"  # not YAML's base-60 9000
    with pytest.raises(UserError, match="train.time_limit='3 hours' is not a duration"):
        load_config("bible-tiny", ["train.time_limit=3 hours"])
    monkeypatch.setenv(ENV_VAR, "1h")
    assert effective_time_limit("90m") == (3600, f"{ENV_VAR}=1h")  # the earlier deadline wins
    assert effective_time_limit("") == (3600, f"{ENV_VAR}=1h")
    monkeypatch.setenv(ENV_VAR, "soon")
    with pytest.raises(UserError, match=f"{ENV_VAR}='soon' is not a duration"):
        effective_time_limit("")


def test_time_budget_leaves_room_for_a_step_an_eval_and_a_save():
    from dist_gpt.train.time_budget import EXIT_SECONDS, TimeBudget

    budget = TimeBudget(100.0, "train.time_limit=100s", state_bytes=0, eval_in_steps=2.0)
    budget.started = time.time() - 80  # 20 s left
    budget.record_step(3.0)
    assert budget.stop_reason(eval_due_next=False, measured_save_seconds=20 - 3 - EXIT_SECONDS - 1) is None
    assert budget.stop_reason(eval_due_next=False, measured_save_seconds=20 - 3 - EXIT_SECONDS + 1).startswith("train.time_limit=100s: 20 s left")
    assert budget.stop_reason(eval_due_next=True, measured_save_seconds=1.0) is None  # eval ~ 2 steps = 6 s: 3 + 6 + 1 + 5 <= 20
    budget.record_eval(12.0)
    assert "an eval ~12.0 s" in budget.stop_reason(eval_due_next=True, measured_save_seconds=1.0)


def test_strict_json_and_the_lock_refusal(tmp_path):
    from dist_gpt.runtime.metrics import strict_json
    from dist_gpt.train.run_lock import RunLock

    record = {"loss": math.nan, "grad_norm": math.inf, "summary": {"mfu": -math.inf, "steps": [1.0, math.nan]}, "step": 3}
    assert json.dumps(strict_json(record), allow_nan=False) == '{"loss": null, "grad_norm": null, "summary": {"mfu": null, "steps": [1.0, null]}, "step": 3}'
    holder = RunLock(tmp_path)
    holder.acquire()
    with pytest.raises(UserError, match=r"is in use by another run \(pid \d+ on host .+, started .+\)"):
        RunLock(tmp_path).acquire()  # a second open file description conflicts, even in one process
    holder.release()
    again = RunLock(tmp_path)
    again.acquire()  # released: free for the next run
    again.release()


def test_non_finite_weights_are_never_written(tiny_data, tmp_path, capsys):
    """The publish-time check behind the skip guard: weights that are not finite are not saved, whatever asks."""
    import torch

    from dist_gpt.checkpoint.checkpointer import Checkpointer
    from dist_gpt.engine.build import build
    from dist_gpt.parallel import BatchShape
    from dist_gpt.runtime.distributed import DistEnv

    config = load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "run"))
    env = DistEnv()
    strategy = build(config, env, BatchShape(4, 1)).strategy
    checkpointer = Checkpointer(config, env, strategy, {})
    checkpointer.save(1)
    with torch.no_grad():
        strategy.unwrapped_model.lm_head.weight[3, 5] = math.inf
    checkpointer.save(2)
    assert checkpointer.failure == "the checkpoint of step 2 was not saved: its weights are not finite (the run diverged)"
    assert step_dirs(tmp_path / "run") == ["step_000001"] and latest_name(tmp_path / "run") == "step_000001" and not tmp_dirs(tmp_path / "run")
    assert "warning: the checkpoint of step 2 was not saved" in capsys.readouterr().out
