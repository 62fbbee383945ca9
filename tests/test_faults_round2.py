"""Faults and mistakes, round two (issue 20), each through the real entry point: a read-only checkpoint disk under
2 ranks, a full disk under metrics.jsonl, resume=PATH to an older step, a damaged newest checkpoint under 2
ranks, re-prepared data, config drift, the global batch on another world size and with micro_batch_size=auto,
a killed launcher (--max-restarts: tests/test_remote_checkpoint.py), a second Ctrl-C, Ctrl-C's exit code, mistakes at the door, `| head`, the plot."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    REPO,
    Proc,
    assert_one_line_error,
    ckpt_root,
    latest_name,
    launch_args,
    losses_by_step,
    mount_tmpfs,
    read_jsonl,
    snapshot,
    step_dirs,
    subprocess_env,
    tiny_overrides,
    tmp_dirs,
    train_cli,
)

from dist_gpt.config import load_config
from dist_gpt.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT_S = 180


def launch2(data: Path, out: Path, run: str, *options: str, **extra) -> list[str]:
    """`python launch/train.py --nproc_per_node=2 ...` arguments of a tiny run (for Proc)."""
    return ["launch/train.py", "--nproc_per_node=2", *options, *launch_args(data, out, run, **extra)[1:]]


def screen(args: list[str], **env: str) -> tuple[int, list[str]]:
    """Exit code and the non-empty lines a terminal would show (stdout and stderr interleaved)."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
    return proc.returncode, [line for line in proc.stdout.splitlines() if line.strip()]


def no_traceback(lines: list[str]) -> None:
    assert not any("Traceback" in line or "KeyboardInterrupt" in line or "torch/distributed" in line for line in lines), "\n".join(lines[-30:])


# ---------------------------------------------------------------------------------------------- disks


def test_read_only_checkpoint_disk_under_two_ranks(tiny_data, tmp_path):
    """Item 1: rank 0 cannot make step_N.tmp (a read-only file system): every rank learns it before writing, the
    save is abandoned with one warning, training goes on; the failed final save is one error line, once."""
    run_dir = tmp_path / "run"
    mounted = mount_tmpfs(ckpt_root(run_dir), "ro,size=1m")
    next(mounted)
    try:
        try:
            code, lines = screen(launch2(tiny_data, tmp_path, "run", train__max_steps=4, checkpoint__every_steps=2))
        except subprocess.TimeoutExpired as hung:
            # Seen once in ~25 runs (a full CI suite; 5-8 s otherwise, never reproduced alone or under load): the run
            # trained its first step, then the launch did not end. Left open (closing note of issue 20); its output is
            # kept here and the launch tried once more in a fresh directory, so a second hang still fails.
            output = hung.output or b""
            print((output.decode(errors="replace") if isinstance(output, bytes) else output)[-4000:], file=sys.stderr)
            tmp_path = tmp_path / "again"
            run_dir = tmp_path / "run"
            mounted.close()
            mounted = mount_tmpfs(ckpt_root(run_dir), "ro,size=1m")
            next(mounted)
            code, lines = screen(launch2(tiny_data, tmp_path, "run", train__max_steps=4, checkpoint__every_steps=2))
    finally:
        mounted.close()
    assert code == 2, lines[-20:]
    no_traceback(lines)
    assert sum(line.startswith("warning: the checkpoint of step 2 was not saved") and "Read-only file system" in line for line in lines) == 1, lines
    assert sum(line.startswith("error:") for line in lines) == 1 and lines[-1].startswith("error: the checkpoint of step 4 was not saved"), lines[-5:]
    assert sorted(losses_by_step(run_dir)) == [1, 2, 3, 4]  # it trained on after the failed save


def test_full_disk_under_metrics_jsonl_and_a_half_line(tiny_data, tmp_path):
    """Item 2: the disk fills while the run logs: one warning, training goes on, no half record; records come
    back when space does. A half line left by an earlier crash does not swallow the next run's records."""
    disk = mount_tmpfs(tmp_path / "disk", "size=40m")  # the final checkpoint (~20 MB) fits once the filler goes
    root = next(disk)
    try:
        run_dir = root / "run"
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "tokens": 128}\n{"step": 2, "lo')  # a crash mid-write
        proc = Proc(launch_args(tiny_data, root, "run", train__max_steps=40, logging__log_every=1), tmp_path / "log")
        assert proc.wait_for_line("step      2 |", TIMEOUT_S), proc.text()
        filler = root / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until the disk is full
        assert proc.wait_for_line("warning: cannot write", TIMEOUT_S), proc.text()
        filled_at = max(losses_by_step(run_dir))
        assert proc.wait_for_line(f"step {filled_at + 3:6d} |", TIMEOUT_S), proc.text()
        filler.unlink()
        code = proc.finish(TIMEOUT_S)
        text = proc.text()
        records = read_jsonl(run_dir / "metrics.jsonl")  # every line whole, strict JSON
    finally:
        disk.close()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text and text.count("warning: cannot write") == 1 and "is writable again" in text
    assert records[0] == {"step": 1, "tokens": 128} and "run_start" in records[1]  # the half line was cut, not glued
    steps = [r["step"] for r in records if "loss" in r]
    assert steps[-1] == 40 and len(steps) < 40  # the lost stretch is missing; the run reached its end


# ---------------------------------------------------------------------------------------------- resume


def test_resume_path_is_a_one_time_start_and_never_rewinds(tiny_data, tmp_path, capsys):
    """Item 3: checkpoint.resume=PATH to an older step of the same run is refused (nothing changes); into a new run
    it starts once, and the same command again (a requeued job) goes on from that run's own latest. keep_last_k
    never deletes a checkpoint newer than the one just published."""
    base = dict(train__max_steps=4, checkpoint__every_steps=2, checkpoint__keep_last_k=3)
    args = launch_args(tiny_data, tmp_path, "a", **base)[1:]
    assert train_cli(args, capsys)[0] == 0
    older = ckpt_root(tmp_path / "a") / "step_000002"
    before = snapshot(tmp_path / "a")
    code, out, err = train_cli(args + [f"checkpoint.resume={older}", "train.max_steps=6"], capsys)
    assert_one_line_error(code, err, f"checkpoint.resume={older} would take", "back from its latest checkpoint step_000004", "train.run_name=NEW")
    assert snapshot(tmp_path / "a") == before

    fork = launch_args(tiny_data, tmp_path, "b", **base)[1:] + [f"checkpoint.resume={older}", "train.max_steps=6"]
    code, out, err = train_cli(fork, capsys)
    assert code == 0 and "this run starts from it once" in out and f"resumed from {older} at step 2" in out, out + err
    code, out, err = train_cli(fork[:-1] + ["train.max_steps=8"], capsys)  # the requeued job script
    latest_b = ckpt_root(tmp_path / "b") / "step_000006"
    assert code == 0 and f"this run started from it; resuming the run's own latest, {latest_b}" in out and f"resumed from {latest_b} at step 6" in out, out + err
    assert step_dirs(tmp_path / "b") == ["step_000004", "step_000006", "step_000008"]

    from dist_gpt.checkpoint.retention import prune
    from dist_gpt.checkpoint.storage import LocalStorage

    root = tmp_path / "retention"
    for step in (2, 4, 6):
        (root / f"step_{step:06d}").mkdir(parents=True)
    assert prune(LocalStorage(root), 1, keep="step_000004") == ["step_000002"]  # step_6, newer, is not its to judge
    assert sorted(p.name for p in root.iterdir()) == ["step_000004", "step_000006"]


def test_damaged_newest_checkpoint_under_two_ranks_names_the_intact_one(tiny_data, tmp_path, capsys):
    """Item 4: the newest checkpoint fails its checksum: 2 ranks stop with one line (ours last, no peer's
    traceback) naming the newest intact checkpoint and the setting; that setting then resumes it. Item 6: on 2
    ranks with micro-batch 1 (and then 1 rank with 2), the checkpoint's global batch of 4 is kept by grad-accum 2."""
    assert train_cli(launch_args(tiny_data, tmp_path, "run", train__max_steps=4, checkpoint__every_steps=2)[1:], capsys)[0] == 0
    newest, intact = ckpt_root(tmp_path / "run") / "step_000004", ckpt_root(tmp_path / "run") / "step_000002"
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(b"X" + shard.read_bytes()[1:])
    code, lines = screen(launch2(tiny_data, tmp_path, "run", train__max_steps=6, checkpoint__every_steps=2, train__micro_batch_size=1))
    assert code == 2, lines[-20:]
    no_traceback(lines)
    assert lines[-1] == (f"error: checkpoint {newest}: {shard.name} fails its checksum (corrupt); resume from another step_* directory: "
                         f"the newest intact one is {intact} (kept): checkpoint.resume={intact}"), lines[-5:]
    assert sum(line.startswith("error:") for line in lines) == 1

    assert any(line.startswith("global batch kept at the checkpoint's 4 sequences") for line in lines), lines  # 1 x 2 would halve it

    code, out, err = train_cli(launch_args(tiny_data, tmp_path, "run", checkpoint__resume=intact, train__max_steps=6, checkpoint__every_steps=2,
                                           train__micro_batch_size=2)[1:], capsys)  # the named setting; micro-batch 2 x world 1
    assert code == 0, out + err
    assert "global batch kept at the checkpoint's 4 sequences" in out and "micro-batch 2 x grad-accum 2 x world 1" in out and f"resumed from {intact} at step 2" in out, out
    assert latest_name(tmp_path / "run") == "step_000006" and not tmp_dirs(tmp_path / "run")


def test_other_data_is_refused_and_config_drift_is_said(tiny_data, tmp_path, capsys):
    """Items 5 and 6: re-prepared data (another val_fraction) refuse the resume in one line unless asked;
    a changed config is listed key by key when the run resumes."""
    from dist_gpt.data import prepare_dataset

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    args = launch_args(data, tmp_path, "run", train__max_steps=2)[1:]
    assert train_cli(args, capsys)[0] == 0
    prepare_dataset(str(tiny_data.parent / "corpus.txt"), data, val_fraction=0.3, force=True)
    capsys.readouterr()
    code, out, err = train_cli(args + ["train.max_steps=3"], capsys)
    assert_one_line_error(code, err, f"{data} holds other data than", "val_fraction 0.1 -> 0.3", "checkpoint.allow_other_data=true")
    code, out, err = train_cli(args + ["train.max_steps=3", "checkpoint.allow_other_data=true", "train.lr=0.001"], capsys)
    assert code == 0, out + err
    assert "with a changed config: train.max_steps 2 -> 3, train.lr 0.003 -> 0.001" in out, out


def test_auto_micro_batch_keeps_the_configs_global_batch():
    """Item 7: bible-tiny says micro-batch 16 and global_batch_size 0 (= 16 x world): with micro_batch_size=auto
    the global batch is fixed at 16 x world before the autotuner runs (it then only splits it; the autotuner's
    own run through the trainer is tests/test_autotune.py's). Item 16: its header is printed once, in MB."""
    from dist_gpt.autotune.report import Report
    from dist_gpt.autotune.search import Outcome
    from dist_gpt.runtime.distributed import DistEnv
    from dist_gpt.train.run import keep_global_batch

    config = load_config("bible-tiny", ["train.micro_batch_size=auto", "train.run_name=nothing-to-resume"])
    assert config.train.global_batch_size == 0 and config.micro_batch_before_auto == 16
    assert keep_global_batch(config, DistEnv(world_size=2)).train.global_batch_size == 32
    assert load_config("bible-tiny", ["train.micro_batch_size=auto", "train.global_batch_size=64"]).micro_batch_before_auto is None  # nothing to keep
    outcome = Outcome(micro_batch=8, grad_accum=2, global_batch=16, checkpointing=False, largest=8, tried=[])
    header = "autotune: bible-tiny | single on 1 x cpu | torch.float32 | budget 1,024 MB - 8% headroom = limit 942 MB per rank"
    assert Report(outcome, header, "single", header_shown=True).render().count("autotune:") == 0  # logged before the trials
    assert Report(outcome, header, "single").render().startswith(header)  # from the cache: not shown before


# ---------------------------------------------------------------------------------------------- launchers and signals


def test_a_killed_launcher_takes_its_workers_with_it(tiny_data, tmp_path):
    """Item 9: kill -9 of the launcher while its workers start: they do not live on headless (nor hang)."""
    proc = Proc(launch2(tiny_data, tmp_path, "run", train__max_steps=1000), tmp_path / "log")
    launcher = psutil.Process(proc.popen.pid)
    deadline = time.monotonic() + TIMEOUT_S
    while len(launcher.children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = launcher.children()
    assert len(workers) == 2, proc.text()
    time.sleep(1.0)  # importing torch: the start-up in which an orphan used to hang
    proc.kill()
    gone, alive = psutil.wait_procs(workers, timeout=20)
    for worker in alive:
        worker.kill()
    assert not alive, f"{len(alive)} workers outlived their launcher"


def second_ctrl_c(args: list[str], log: Path, new_session: bool) -> tuple[int, list[str]]:
    proc = Proc(args, log, new_session=new_session)
    assert proc.wait_for_line("step      3 |", TIMEOUT_S), proc.text()
    interrupt = proc.ctrl_c if new_session else lambda: proc.popen.send_signal(signal.SIGINT)
    interrupt()
    time.sleep(1.5)  # later than a launcher's relay: the user insists
    interrupt()
    code = proc.finish(TIMEOUT_S)
    return code, [line for line in proc.text().splitlines() if line.strip()]


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_second_ctrl_c_is_one_line_naming_the_newest_checkpoint(tiny_data, tmp_path, ranks):
    """Item 10: a second Ctrl-C (the first is still finishing a long eval): exit 130, one line, no traceback,
    no step_N.tmp left, and the line names the newest checkpoint (2 ranks: async saves)."""
    extra = dict(train__max_steps=1000, checkpoint__every_steps=1, train__eval_every=3, train__eval_batches=4000)  # a long eval after step 3
    if ranks == 1:
        args = launch_args(tiny_data, tmp_path, "run", **extra)
    else:
        args = launch2(tiny_data, tmp_path, "run", checkpoint__async_save="true", **extra)
    code, lines = second_ctrl_c(args, tmp_path / "log", new_session=ranks == 2)
    assert code == 130, lines[-20:]
    no_traceback(lines)
    newest = ckpt_root(tmp_path / "run") / latest_name(tmp_path / "run")
    assert lines[-1].startswith("interrupted again (a second Ctrl-C): stopped at once, without a last save"), lines[-10:]
    assert lines[-1].endswith(f"the newest checkpoint is {newest}: the same command resumes from it"), lines[-10:]
    assert sum(line.startswith("interrupted again") for line in lines) == 1 and not tmp_dirs(tmp_path / "run")


def test_ctrl_c_exits_130_and_the_done_line_has_the_last_steps_loss(tiny_data, tmp_path, capsys):
    """Items 11 and 16: one process stopped by Ctrl-C between log lines exits 130 (a script stops there); its
    done line shows the loss of the step it stopped at, as an uninterrupted run to that step has it."""
    proc = Proc(launch_args(tiny_data, tmp_path, "run", train__max_steps=1000, train__lr_decay_steps=1000, logging__log_every=4), tmp_path / "log")
    assert proc.wait_for_line("step      4 |", TIMEOUT_S), proc.text()
    proc.popen.send_signal(signal.SIGINT)
    code = proc.finish(TIMEOUT_S)
    text = proc.text()
    assert code == 130, text[-3000:]
    step = int(text.split("stopping on SIGINT after step ")[1].split(":")[0])
    done = next(line for line in text.splitlines() if line.startswith("done:"))
    summary = train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "reference", train__max_steps=step, train__lr_decay_steps=1000)))
    assert f"train loss {summary['train_loss']:.4f}" in done, (done, step)


def test_quickstart_stops_on_an_interrupted_training_and_samples_the_named_run(tmp_path):
    """Item 11: launch/quickstart.sh's steps after the install, with `python` standing in: exit 130 from the
    training stops the script; a train.run_name given to it is the run it samples."""
    script = (REPO / "launch" / "quickstart.sh").read_text()
    steps = script[script.index("python -m dist_gpt.prepare"):]
    stub = 'python() { echo "python $*" >> "$LOG"; case "$*" in *launch/train.py*) return "$TRAIN_EXIT";; esac; }\n'
    for train_exit, expect_sample in ((130, False), (0, True)):
        log = tmp_path / f"log{train_exit}"
        proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + stub + steps, "quickstart", "train.run_name=mine", "train.max_steps=5"],
                              env={**os.environ, "LOG": str(log), "TRAIN_EXIT": str(train_exit)}, capture_output=True, text=True)
        calls = log.read_text().splitlines()
        assert (proc.returncode == 0) == expect_sample and calls[1] == "python launch/train.py --config bible-tiny train.run_name=mine train.max_steps=5"
        assert calls[2:] == (['python -m dist_gpt.sample --ckpt out/mine --prompt En el principio --max-new-tokens 100'] if expect_sample else [])


# ---------------------------------------------------------------------------------------------- mistakes at the door


def test_mistakes_at_the_door_are_one_line(tiny_data, tmp_path, capsys):
    """Items 12 and 16: betas, an empty or broken YAML file, a near-miss key, no prepared data."""
    cases = [
        (["train.beta2=1.5"], "train.beta1=0.9 and train.beta2=1.5 must be in [0, 1)"),
        (["train.max_step=5"], "; did you mean train.max_steps?"),
        ([f"data.dir={tmp_path / 'nothing'}"], f"no prepared data in {tmp_path / 'nothing'}: run python -m dist_gpt.prepare --config bible-tiny --out {tmp_path / 'nothing'}"),
    ]
    for overrides, fragment in cases:
        code, out, err = train_cli(["--config", "bible-tiny", *overrides], capsys)
        assert_one_line_error(code, err, fragment)
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "broken.yaml").write_text("train:\n  lr: 0.1\n   max_steps: 3\n")
    for name, fragment in (("empty.yaml", "empty.yaml is empty: write the sections"), ("broken.yaml", "broken.yaml:3:13: not valid YAML")):
        code, out, err = train_cli(["--config", str(tmp_path / name)], capsys)
        assert_one_line_error(code, err, fragment)


def test_a_mistake_workers_find_is_said_once_and_leaves_no_run_dir(tiny_data, tmp_path):
    """Item 12: a mistake every worker finds after the start (a missing DeepSpeed JSON): one line, not one per rank,
    and no run directory holding only a run.lock."""
    code, lines = screen(launch2(tiny_data, tmp_path, "run", "--ds_config", str(tmp_path / "missing.json")), DS_ACCELERATOR="cpu")
    assert code == 2 and lines[-1] == f"error: DeepSpeed config {tmp_path / 'missing.json'} does not exist: give one of ds_configs/zero{{0,1,2,3}}.json or zero3-offload.json", lines
    assert sum("error" in line.lower() for line in lines) == 1, lines
    assert not (tmp_path / "run").exists()
    code, lines = screen(launch2(tiny_data, tmp_path, "run", train__global_batch_size=6))  # found by the launcher, before any worker
    assert code == 2 and lines == ["error: train.global_batch_size=6 is not divisible by micro_batch_size x world size = 4 x 2 = 8: make it a multiple of 8"], lines


def test_a_closed_pipe_ends_quietly():
    """Item 13: `| head` on --print-config or dist_gpt.plan: the reader goes away, the command ends without a word."""
    for args in (["launch/train.py", "--print-config"], ["-m", "dist_gpt.plan", "--config", "gpt2-124m-owt", "--gpus", "8", "--gpu-memory-gb", "24"]):
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # as `head` does once it has its lines
        err = proc.stderr.read().decode()
        assert proc.wait(TIMEOUT_S) == 141 and err == "", err


def test_the_plot_keeps_a_short_run_beside_a_long_one_and_says_the_cut(tmp_path, capsys):
    """Item 14: the y axis leaves out each run's own first tenth: a 20-step run beside a 300-step one keeps its
    line; the cut is said."""
    from dist_gpt.tools.plot import _top_after_the_start
    from dist_gpt.tools.runs import Point, Run

    def run(name: str, steps: int, floor: float) -> Run:
        return Run(name=name, path=tmp_path / name, train=[Point(s, s * 128, floor + 8.0 / s) for s in range(1, steps + 1)], val=[])

    short, long = run("short", 20, 6.0), run("long", 300, 2.0)
    top = _top_after_the_start([short, long])
    assert top >= max(p.value for p in short.train if p.step > 2)  # the short run's line is inside the axes
    for r in (short, long):
        (tmp_path / r.name).mkdir()
        (tmp_path / r.name / "metrics.jsonl").write_text("".join(json.dumps({"step": p.step, "tokens": p.tokens, "loss": p.value}) + "\n" for p in r.train))
    pytest.importorskip("matplotlib")
    from dist_gpt.tools.plot import main as plot

    plot([str(tmp_path / "short"), str(tmp_path / "long"), "--out", str(tmp_path / "p.png")])
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'p.png'} (loss axis cut at ")


def test_the_first_line_says_what_init_from_loaded(tiny_data, tmp_path, capsys):
    """Item 16: a run started from an export says so in its first line."""
    from dist_gpt.interop.export_file import save_exported
    from dist_gpt.model import GPT

    config = load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path))
    save_exported(GPT(config.model.gpt_config()), tmp_path / "w.safetensors")
    code, out, err = train_cli(launch_args(tiny_data, tmp_path, "run", train__max_steps=1, model__init_from=tmp_path / "w.safetensors")[1:], capsys)
    first = next(line for line in out.splitlines() if line.startswith("run "))
    assert code == 0 and first.endswith(f"| weights from our export {tmp_path / 'w.safetensors'}"), out + err
