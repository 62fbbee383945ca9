"""Sharded, resumable checkpoints (single process): a run killed at any moment resumes to the same losses,
bit for bit; signals save and exit; broken or foreign checkpoints are refused with one line; export/sample.

Training runs that must be killed or signalled are subprocesses (`python launch/train.py`, one thread); the
rest run in-process (one thread too), which saves the ~3-5 s of start-up per run. Dropout is on (0.1) in the
equality tests, so the restored RNG state is exercised as well as the weights, the optimizer and the loader.
"""

from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    Proc,
    assert_consistent,
    assert_one_line_error,
    ckpt_root,
    latest_name,
    launch_args,
    losses_by_step,
    read_jsonl,
    run_python,
    snapshot,
    step_dirs,
    tiny_overrides,
    tmp_dirs,
    train_cli,
)

from dist_gpt.checkpoint.consolidate import consolidated_state_dict
from dist_gpt.checkpoint.manifest import LATEST, MANIFEST, check_model_shape, read_manifest
from dist_gpt.config import load_config
from dist_gpt.errors import UserError
from dist_gpt.train.loop import train

KILL_MAX_STEPS = 16
KILL_EVERY = 2


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- helpers


# ---------------------------------------------------------------------------------------------- kill -9


def test_kill9_repeatedly_resumes_to_identical_losses(tiny_data, tmp_path):
    """SIGKILL the same command again and again (while a checkpoint is being written, at random moments of
    training); every restart resumes from `latest`, `latest` always names a complete checkpoint, and the
    final per-step losses equal an uninterrupted run's exactly. Start-up (~3-5 s of imports, more on a loaded
    machine) dominates, hence five kills and a time budget."""
    extra = dict(train__max_steps=KILL_MAX_STEPS, checkpoint__every_steps=KILL_EVERY, model__dropout=0.1)
    args = launch_args(tiny_data, tmp_path, "killed", **extra)
    run_dir = tmp_path / "killed"
    rng = random.Random(1234)
    modes = ["save", "step", "save", "step", "save"]  # "save": during a checkpoint's write; "step": at random
    kills, killed_mid_save, budget_end = [], 0, time.monotonic() + 60

    for attempt, mode in enumerate(modes):
        if time.monotonic() > budget_end:
            break
        before = latest_name(run_dir)
        proc = Proc(args, tmp_path / f"attempt{attempt}.log")
        resumed_step = int(before.removeprefix("step_")) if before else 0
        if mode == "save":
            # kill while the target checkpoint is being written: its RNG file (the first file) is there, fresh
            target = min(resumed_step + KILL_EVERY * rng.randint(1, 3), KILL_MAX_STEPS)
            rng_file = ckpt_root(run_dir) / f"step_{target:06d}.tmp" / "rng_rank0.pt"

            def writing(rng_file=rng_file, started=proc.started):
                try:
                    return rng_file.stat().st_mtime > started  # not a stale one of an earlier kill
                except FileNotFoundError:
                    return False

            event = proc.wait_for(writing, poll=0.002)
        else:  # a random moment of training: in a step, a save, an eval, a log line
            event = proc.wait_for_line("\nstep ")
            time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        if not event or proc.popen.returncode == 0:  # the run had finished before the moment came
            assert proc.popen.returncode == 0, proc.text()[-3000:]
            break
        kills.append((mode, before, latest_name(run_dir), round(time.time() - proc.started, 1)))
        killed_mid_save += any(p.stat().st_mtime > proc.started for p in ckpt_root(run_dir).glob("step_*.tmp/rng_rank0.pt"))
        assert_consistent(run_dir)
        if before and "| resumed from" in proc.text():
            assert f"resumed from {ckpt_root(run_dir) / before} at step {resumed_step}" in proc.text()

    before = latest_name(run_dir)
    final = Proc(args, tmp_path / "final.log")
    assert final.finish(120) == 0, final.text()[-3000:]
    if before:
        assert f"resumed from {ckpt_root(run_dir) / before} at step {int(before.removeprefix('step_'))}" in final.text()
    # The uninterrupted reference, in this process (one thread, as the subprocesses: the same kernels and
    # the same bits; a start-up saved on a machine where start-ups dominate).
    train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "reference", **extra)))

    print(f"kills (mode, latest before, latest after, seconds after launch): {kills}")
    assert len(kills) >= 3, f"only {len(kills)} kills landed: {kills}"
    assert killed_mid_save >= 1, f"no kill landed during a save: {kills}"
    assert_consistent(run_dir)
    assert latest_name(run_dir) == f"step_{KILL_MAX_STEPS:06d}" and not tmp_dirs(run_dir)
    expected = losses_by_step(tmp_path / "reference")
    assert sorted(expected) == list(range(1, KILL_MAX_STEPS + 1))
    assert losses_by_step(run_dir) == expected  # floats compared with ==: bit-identical
    val = [r["val_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r]
    ref_val = [r["val_loss"] for r in read_jsonl(tmp_path / "reference" / "metrics.jsonl") if "val_loss" in r]
    assert val[-1] == ref_val[-1]


# ---------------------------------------------------------------------------------------------- signals


def test_sigterm_and_ctrl_c_save_exit_and_resume(tiny_data, tmp_path):
    """Each signal: the step finishes, a checkpoint at that step is saved, exit code 0 (Ctrl-C: 130) with a
    message; the same command then resumes from exactly there."""
    overrides = tiny_overrides(tiny_data, tmp_path, "run", train__max_steps=5000)  # far more than we let it run
    run_dir = tmp_path / "run"
    stopped_at = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = Proc(["launch/train.py", "--config", "bible-tiny", *overrides], tmp_path / f"{sig.name}.log")
        if stopped_at:
            assert proc.wait_for_line(f"resumed from {ckpt_root(run_dir) / f'step_{stopped_at:06d}'} at step {stopped_at}"), proc.text()
        assert proc.wait_for_line(f"step {stopped_at + 2:6d} |"), proc.text()  # inside the loop, handlers installed
        proc.popen.send_signal(sig)
        code = proc.finish(60)
        text = proc.text()
        assert code == (130 if sig == signal.SIGINT else 0), text[-3000:]  # issue 20: a Ctrl-C'd command says so (a script stops)
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
        line = next((l for l in text.splitlines() if l.startswith(f"stopping on {sig.name} after step ")), None)
        assert line, text[-3000:]
        step = int(line.split("after step ")[1].split(":")[0])
        assert step > stopped_at
        assert latest_name(run_dir) == f"step_{step:06d}"
        assert read_manifest(ckpt_root(run_dir) / f"step_{step:06d}")["parts"]["train_state"]["step"] == step
        assert max(losses_by_step(run_dir)) == step
        assert_consistent(run_dir)
        stopped_at = step
    # the next run resumes from the Ctrl-C checkpoint (in-process: the same, without another start-up)
    summary = train(load_config("bible-tiny", [o for o in overrides if not o.startswith("train.max_steps=")] + [f"train.max_steps={stopped_at + 1}"]))
    assert summary["step"] == stopped_at + 1
    assert latest_name(run_dir) == f"step_{stopped_at + 1:06d}"


def test_stop_signal_handler():
    """SIGTERM, SIGUSR1 and a first Ctrl-C only ask to stop, and the first signal names the stop; a second
    signal at once is a launcher relaying the first (torchrun: SIGINT again, DeepSpeed: SIGTERM); a second
    Ctrl-C after that interrupts at once; the previous handlers come back afterwards."""
    from dist_gpt.runtime.stop_signals import RELAYED_SIGNAL_WINDOW_S, StopRequest, catch_stop_signals

    previous = signal.getsignal(signal.SIGUSR1)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        stop = StopRequest()
        with catch_stop_signals(stop):
            signal.raise_signal(sig)
            signal.raise_signal(signal.SIGINT)  # the relay
            signal.raise_signal(signal.SIGTERM)
            assert stop.requested == sig.name
            stop.first_at -= RELAYED_SIGNAL_WINDOW_S + 0.1  # later: the user insists
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGUSR1) is previous


# ---------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> tuple[Path, list[str]]:
    """A run with checkpoints at steps 2, 4, 6 (in-process), and the overrides that made it."""
    out = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests comparing with it (a module fixture runs before one_thread)
    overrides = tiny_overrides(tiny_data, out, "run", train__max_steps=6, checkpoint__every_steps=2, model__dropout=0.1)
    train(load_config("bible-tiny", overrides))
    torch.set_num_threads(threads)
    run_dir = out / "run"
    assert step_dirs(run_dir) == ["step_000002", "step_000004", "step_000006"] and latest_name(run_dir) == "step_000006"
    return run_dir, overrides


@pytest.fixture
def copied(trained, tmp_path) -> tuple[Path, list[str]]:
    """A private copy of the trained run (to break), and overrides pointing at it."""
    run_dir, overrides = trained
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run", [o if not o.startswith("train.out_dir=") else f"train.out_dir={tmp_path}" for o in overrides]


def test_resume_never_refuses_existing_checkpoints(copied, capsys):
    run_dir, overrides = copied
    before = snapshot(run_dir)
    code, _, err = train_cli(["--config", "bible-tiny", *overrides, "checkpoint.resume=never"], capsys)
    assert_one_line_error(code, err, "already has checkpoints", "checkpoint.resume=never")
    assert snapshot(run_dir) == before  # nothing deleted, nothing written (not even metrics)


def test_resume_path_loads_that_checkpoint(trained, tiny_data, tmp_path):
    """resume=PATH (a step_N directory of another run) continues from it: steps 5-6 equal the original's."""
    run_dir, _ = trained
    step4 = ckpt_root(run_dir) / "step_000004"
    summary = train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "b", train__max_steps=6, model__dropout=0.1) + [f"checkpoint.resume={step4}"]))
    assert summary["step"] == 6
    original, resumed = losses_by_step(run_dir), losses_by_step(tmp_path / "b")
    assert sorted(resumed) == [5, 6]
    assert resumed == {s: original[s] for s in (5, 6)}
    assert latest_name(tmp_path / "b") == "step_000006"


def test_checkpoint_of_another_model_is_refused(copied, capsys):
    run_dir, overrides = copied
    before = snapshot(run_dir)
    code, _, err = train_cli(["--config", "bible-tiny", *overrides, "model.n_embd=64"], capsys)
    assert_one_line_error(code, err, "another model", "n_embd=32 (this run: 64)")
    assert snapshot(run_dir) == before


def test_learned_positions_block_size_is_part_of_the_shape(trained):
    """With learned positions the wpe table has block_size rows: a different block_size is another model."""
    run_dir, overrides = trained
    ckpt = ckpt_root(run_dir) / "step_000006"
    manifest = read_manifest(ckpt)
    manifest["config"]["model"] = {**manifest["config"]["model"], "position": "learned"}
    check_model_shape(ckpt, manifest, load_config("bible-tiny", overrides + ["model.position=learned"]))  # same: fine
    check_model_shape(ckpt, manifest | {"config": {"model": {**manifest["config"]["model"], "position": "rope"}}}, load_config("bible-tiny", overrides + ["model.block_size=16"]))
    with pytest.raises(UserError, match="block_size=32 .this run: 16."):
        check_model_shape(ckpt, manifest, load_config("bible-tiny", overrides + ["model.position=learned", "model.block_size=16"]))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (lambda d: _truncate(d / "__0_0.distcp"), ("__0_0.distcp", "truncated", "another step_*")),
        (lambda d: (d / MANIFEST).unlink(), (f"no {MANIFEST}", "another step_*")),
        (lambda d: d.rename(d.with_name("renamed")), ("does not exist", "another step_*")),
        (lambda d: (d / ".metadata").write_text("{}"), (".metadata", "another step_*")),
    ],
    ids=["truncated-shard", "missing-manifest", "renamed-dir", "altered-metadata"],
)
def test_damaged_latest_is_refused(copied, capsys, damage, fragments):
    run_dir, overrides = copied
    damage(ckpt_root(run_dir) / "step_000006")
    before = snapshot(run_dir)
    code, _, err = train_cli(["--config", "bible-tiny", *overrides], capsys)
    assert_one_line_error(code, err, *fragments)
    assert snapshot(run_dir) == before  # the other checkpoints (and the damaged one) untouched


def test_corrupt_byte_in_shard_is_refused_by_the_cli(copied):
    """The real process: exit code 2, one line on stderr, no traceback."""
    run_dir, overrides = copied
    _flip_byte(ckpt_root(run_dir) / "step_000006" / "__0_0.distcp")
    before = snapshot(run_dir)
    proc = run_python(["launch/train.py", "--config", "bible-tiny", *overrides], check=False, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "__0_0.distcp fails its checksum", "another step_*")
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------------- housekeeping


def test_keep_last_k_stale_tmp_and_latest(tiny_data, tmp_path):
    def run(max_steps):
        overrides = tiny_overrides(tiny_data, tmp_path, "run", train__max_steps=max_steps, checkpoint__every_steps=1, checkpoint__keep_last_k=2)
        return train(load_config("bible-tiny", overrides))

    run_dir = tmp_path / "run"
    run(5)
    assert step_dirs(run_dir) == ["step_000004", "step_000005"] and latest_name(run_dir) == "step_000005"
    assert_consistent(run_dir)

    # A crash between a checkpoint's rename and `latest` (step_5 complete, `latest` still on step_4), and
    # stale .tmp directories of crashed saves, of this step and of others.
    (ckpt_root(run_dir) / LATEST).write_text("step_000004")
    for stale in ("step_000005.tmp", "step_000003.tmp", "step_000999.tmp"):
        (ckpt_root(run_dir) / stale).mkdir()
        (ckpt_root(run_dir) / stale / "__0_0.distcp").write_bytes(b"partial")
    assert run(5)["step"] == 5  # resumes at 4, redoes step 5
    assert tmp_dirs(run_dir) == []
    assert latest_name(run_dir) == "step_000005"  # the redone step is published, not skipped
    assert_consistent(run_dir)

    run(8)
    assert step_dirs(run_dir) == ["step_000007", "step_000008"] and latest_name(run_dir) == "step_000008"
    assert tmp_dirs(run_dir) == [] and not list(ckpt_root(run_dir).glob("*.partial"))
    assert_consistent(run_dir)


def test_async_save_resumes_to_the_same_losses(tiny_data, tmp_path):
    common = dict(checkpoint__every_steps=2, train__lr_decay_steps=8, model__dropout=0.1)
    train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "sync", train__max_steps=8, **common)))
    train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "async", train__max_steps=5, checkpoint__async_save=True, **common)))
    run_dir = tmp_path / "async"
    assert step_dirs(run_dir) == ["step_000002", "step_000004", "step_000005"] and latest_name(run_dir) == "step_000005"
    assert_consistent(run_dir)
    # from the periodic async checkpoint at step 4 (written in the background while step 5 ran)
    step4 = ckpt_root(run_dir) / "step_000004"
    overrides = tiny_overrides(tiny_data, tmp_path, "resumed", train__max_steps=8, checkpoint__async_save=True, **common)
    train(load_config("bible-tiny", overrides + [f"checkpoint.resume={step4}"]))
    sync = losses_by_step(tmp_path / "sync")
    assert losses_by_step(run_dir) == {s: sync[s] for s in range(1, 6)}
    assert losses_by_step(tmp_path / "resumed") == {s: sync[s] for s in range(5, 9)}
    assert_consistent(tmp_path / "resumed")


# ---------------------------------------------------------------------------------------------- export / sample


def test_export_sample_and_finetune(trained, tiny_data, tmp_path, capsys):
    from dist_gpt.interop.export_file import load_exported
    from dist_gpt.tools import export, sample

    run_dir, _ = trained
    out = tmp_path / "tiny.safetensors"
    proc = run_python(["-m", "dist_gpt.export", str(run_dir), "--out", str(out)], timeout=120)
    assert "exported" in proc.stdout and out.is_file()
    _, state = consolidated_state_dict(run_dir)
    exported = load_exported(out).state_dict()
    assert all(torch.equal(exported[k], v) for k, v in state.items())  # the latest checkpoint's weights, exactly

    with pytest.raises(SystemExit) as e:  # an existing file is not overwritten without --force
        export.main([str(run_dir), "--out", str(out)])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "exists", "--force")
    export.main([str(ckpt_root(run_dir) / "step_000002"), "--out", str(out), "--force"])
    assert not torch.equal(load_exported(out).state_dict()["wte.weight"], state["wte.weight"])  # now step 2's
    export.main([str(run_dir), "--out", str(out), "--force"])
    capsys.readouterr()

    prompt = "En el principio"
    proc = run_python(["-m", "dist_gpt.sample", "--ckpt", str(out), "--prompt", prompt, "--max-new-tokens", "5"], timeout=120)
    assert proc.stdout.startswith(prompt) and len(proc.stdout.strip()) > len(prompt), proc.stdout
    sample.main(["--ckpt", str(run_dir), "--prompt", prompt, "--max-new-tokens", "5", "--device", "cpu"])  # a run dir too
    assert capsys.readouterr().out.strip() == proc.stdout.strip()  # same weights, same seed: the same text

    summary = train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "finetune", train__max_steps=2) + [f"model.init_from={out}"]))
    assert summary["step"] == 2
    first = losses_by_step(tmp_path / "finetune")[1]
    assert first < losses_by_step(run_dir)[1] - 0.2  # starts from the trained weights, not from scratch


# ---------------------------------------------------------------------------------------------- resharding (FSDP)


def _fsdp_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _fsdp_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)], ids=["fsdp2-to-single", "single-to-fsdp2"])
def test_resharding_resume_continues_the_same_run(tiny_data, tmp_path, first, then):
    """A checkpoint of 2 FSDP ranks resumes in 1 process (strategy single) and the other way round: the same
    global batch (2 x 4 = 1 x 8 sequences) reads the same data stream, so the losses continue those of an
    uninterrupted single-process run (to float rounding: reductions over 2 ranks add in another order)."""
    common = tiny_overrides(tiny_data, tmp_path, "run", train__lr_decay_steps=8, checkpoint__every_steps=4)
    per_world = {1: ["train.micro_batch_size=8", "parallel.strategy=single"], 2: ["train.micro_batch_size=4", "parallel.strategy=fsdp"]}
    reference = common + per_world[1] + ["train.max_steps=8", "train.run_name=reference"]
    train(load_config("bible-tiny", reference))
    for world, max_steps in ((first, 4), (then, 8)):
        overrides = common + per_world[world] + [f"train.max_steps={max_steps}"]
        if world == 1:
            train(load_config("bible-tiny", overrides))
        else:
            args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py", "--config", "bible-tiny", *overrides]
            proc = run_python(args, timeout=300)
            if max_steps == 8:
                assert f"resumed from {ckpt_root(tmp_path / 'run') / 'step_000004'} at step 4" in proc.stdout
    manifests = [read_manifest(ckpt_root(tmp_path / "run") / f"step_{s:06d}") for s in (4, 8)]
    assert [(m["strategy"], m["world_size"]) for m in manifests] == [("fsdp" if w == 2 else "single", w) for w in (first, then)]
    expected, got = losses_by_step(tmp_path / "reference"), losses_by_step(tmp_path / "run")
    assert sorted(got) == list(range(1, 9))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # and either checkpoint, sharded or not, consolidates (export/sample's path) to the reference's weights
    for step in (4, 8):
        _, ours = consolidated_state_dict(ckpt_root(tmp_path / "run") / f"step_{step:06d}")
        _, theirs = consolidated_state_dict(ckpt_root(tmp_path / "reference") / f"step_{step:06d}")
        worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
        print(f"step {step}: largest weight difference {worst:.2e}")
        assert worst < 1e-4


def test_a_checkpoint_holds_the_tied_embedding_once(tmp_path):
    """fp32 weights + AdamW's two moments are 12 bytes a parameter; the tied wte/lm_head matrix is one parameter
    and must be written once (a state dict names it twice). A vocabulary-heavy model makes a second copy show:
    +33 % here. Loaded back, lm_head is wte again (tied), and the weights are the saved ones."""
    from dist_gpt.engine.build import build
    from dist_gpt.parallel.base import BatchShape
    from dist_gpt.runtime.distributed import DistEnv

    config = load_config("bible-tiny", ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16", "model.vocab_size=4096",
                                        "model.tokenizer_vocab_size=4096", "train.device=cpu", "train.compile=false", "train.dtype=fp32"])
    saved = build(config, DistEnv(), BatchShape(2, 1))
    saved.strategy.save_checkpoint(tmp_path / "ckpt")
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt").iterdir())
    # DCP adds ~1.5 kB per tensor (45 here) and its metadata: under 10 % at this size, negligible at GPT-2's.
    assert 12 * saved.params < size < 1.1 * 12 * saved.params, (size, saved.params)

    loaded = build(config, DistEnv(), BatchShape(2, 1))
    with torch.no_grad():
        loaded.model.wte.weight.zero_()
    loaded.strategy.load_checkpoint(tmp_path / "ckpt", {})
    assert loaded.model.lm_head.weight is loaded.model.wte.weight
    assert torch.equal(loaded.model.wte.weight, saved.model.wte.weight)
    assert torch.equal(consolidated_model(saved, tmp_path / "ckpt")["lm_head.weight"], saved.model.wte.weight)


def consolidated_model(built, ckpt_dir):
    return type(built.strategy).consolidated_model_state(ckpt_dir, built.strategy.config)
