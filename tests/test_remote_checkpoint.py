"""checkpoint.remote: every checkpoint also in object storage, and a run resumed from there on a "fresh machine"
(its local run directory deleted), against a real S3 server on 127.0.0.1 (moto's, tests/s3_server.py).

Runs that must be killed or signalled are subprocesses; the rest run in-process (one thread), with the AWS_*
variables of the server in the environment, as a user's shell would have them.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import (
    Proc,
    assert_one_line_error,
    ckpt_root,
    launch_args,
    losses_by_step,
    run_python,
    tiny_overrides,
    train_cli,
)
from s3_server import BUCKET, S3Server

from dist_gpt.checkpoint.fetch import download
from dist_gpt.checkpoint.remote import RemoteStorage
from dist_gpt.config import load_config
from dist_gpt.interop import load_model
from dist_gpt.tools.export import main as export_main
from dist_gpt.tools.sample import main as sample_main
from dist_gpt.train.loop import train

pytest.importorskip("s3fs", reason="checkpoint.remote needs the cloud extra: pip install -e '.[cloud]'")
pytest.importorskip("moto", reason="the S3 server of these tests: pip install 'moto[server]'")
pytestmark = pytest.mark.usefixtures("one_thread")

MAX_STEPS = 8
# The same global batch (8 sequences) in 1 process or 2 FSDP ranks reads the same data stream: one reference.
SINGLE = ["parallel.strategy=single", "train.micro_batch_size=8"]
FSDP2 = ["parallel.strategy=fsdp", "train.micro_batch_size=4"]


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    server.create_bucket()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> dict[int, float]:
    """The losses of an uninterrupted, local-only run of MAX_STEPS."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(load_config("bible-tiny", overrides(tiny_data, out, "", "reference", MAX_STEPS)))
    torch.set_num_threads(threads)
    return losses_by_step(out / "reference")


def overrides(data: Path, out: Path, remote: str, run: str, max_steps: int, *extra: str) -> list[str]:
    common = tiny_overrides(data, out, run, train__max_steps=max_steps, train__lr_decay_steps=MAX_STEPS, checkpoint__every_steps=2, checkpoint__keep_last_k=2)
    return common + SINGLE + [f"checkpoint.remote={remote}", *extra]


def remote_of(prefix: str, run: str = "run") -> RemoteStorage:
    return RemoteStorage(f"{prefix}/{run}/checkpoints")


def assert_remote_latest_complete(store: RemoteStorage, tmp_path: Path) -> str:
    """The remote `latest` names a checkpoint whose every file is there, intact (downloaded and CRC-checked)."""
    name = store.latest()
    assert name and store.is_complete(name), f"remote latest {name!r} is not complete: {store.list_names()} {store.sizes(name)} {store.read_text(name + '/manifest.json')}"
    download(store, name, tmp_path / "verify")  # raises unless every file matches the manifest's size and CRC32
    return name


# ---------------------------------------------------------------------------------------------- (a) a fresh machine


def test_fresh_machine_resumes_from_the_remote_and_the_newer_copy_wins(s3_env, tiny_data, tmp_path, reference, capsys):
    prefix = f"s3://{BUCKET}/a"
    run_dir, losses = tmp_path / "run", {}
    train(load_config("bible-tiny", overrides(tiny_data, tmp_path, prefix, "run", 4)))
    out = capsys.readouterr().out
    assert f"remote {prefix}/run/checkpoints (no checkpoint there yet)" in out  # the start line says where
    assert f"checkpoint uploaded to {prefix}/run/checkpoints/step_000004" in out  # the end waited for the upload
    losses.update(losses_by_step(run_dir))
    older = tmp_path / "older"
    shutil.copytree(run_dir, older)  # this disk's copy at step 4, for later

    shutil.rmtree(run_dir)  # the machine is gone: the same command on a fresh one
    train(load_config("bible-tiny", overrides(tiny_data, tmp_path, prefix, "run", 6)))
    out = capsys.readouterr().out
    assert f"downloading {prefix}/run/checkpoints/step_000004" in out
    assert f"resumed from {ckpt_root(run_dir) / 'step_000004'} at step 4 | remote {prefix}/run/checkpoints/step_000004" in out
    losses.update(losses_by_step(run_dir))

    shutil.rmtree(run_dir)
    shutil.copytree(older, run_dir)  # a machine whose disk is behind (step 4): the remote step 6 is newer and wins
    train(load_config("bible-tiny", overrides(tiny_data, tmp_path, prefix, "run", MAX_STEPS)))
    assert "at step 6 |" in capsys.readouterr().out
    losses.update(losses_by_step(run_dir))
    assert losses == pytest.approx(reference, rel=1e-6, abs=1e-6) and sorted(losses) == list(range(1, MAX_STEPS + 1))

    store = remote_of(prefix)
    assert assert_remote_latest_complete(store, tmp_path) == "step_000008"
    assert [c for c in store.checkpoints() if store.is_complete(c)] == ["step_000006", "step_000008"]  # keep_last_k=2 there too
    # export and sample read the remote run (downloaded, then consolidated): the local checkpoint's weights
    export_main([f"{prefix}/run", "--out", str(tmp_path / "remote.safetensors")])
    exported, local = load_model(tmp_path / "remote.safetensors").state_dict(), load_model(run_dir).state_dict()
    assert all(torch.equal(exported[k], local[k]) for k in local)
    export_main([f"{prefix}/run", "--hf", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    capsys.readouterr()
    sample_main(["--ckpt", f"{prefix}/run", "--prompt", "Y dijo", "--max-new-tokens", "3", "--device", "cpu"])
    assert "Y dijo" in capsys.readouterr().out
    # a new local start of the same run name must not overwrite the remote's checkpoints either
    never = overrides(tiny_data, tmp_path / "elsewhere", prefix, "run", MAX_STEPS, "checkpoint.resume=never")
    code, _, err = train_cli(["--config", "bible-tiny", *never], capsys)
    assert_one_line_error(code, err, f"{prefix}/run/checkpoints already has checkpoints", "checkpoint.resume=never")


def test_file_url_is_a_remote_too(tiny_data, tmp_path, capsys):
    """file:// (a mounted network drive): the same store, through fsspec's local file system."""
    drive = tmp_path / "drive"
    args = tiny_overrides(tiny_data, tmp_path, "run", train__max_steps=2, checkpoint__remote=f"file://{drive}")
    train(load_config("bible-tiny", args))
    assert (drive / "run" / "checkpoints" / "latest").read_text() == "step_000002"
    assert not list(drive.rglob("*.tmp"))  # `latest` was written aside and renamed
    shutil.rmtree(tmp_path / "run")
    train(load_config("bible-tiny", [*args, "train.max_steps=3"]))
    assert "at step 2 |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- (b) 2 ranks -> 1


def test_fsdp_ranks_upload_their_own_files_and_one_process_resumes(s3_env, tiny_data, tmp_path, reference, capsys):
    """2 FSDP ranks save (each uploads its own files), 1 process resumes from the remote on a fresh machine, then
    2 ranks again on another fresh machine (the node's ranks share the download): the reference's losses."""
    prefix = f"s3://{BUCKET}/b"

    def two_ranks(max_steps: int) -> str:
        fsdp = [o for o in overrides(tiny_data, tmp_path, prefix, "run", max_steps) if o not in SINGLE] + FSDP2
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py", "--config", "bible-tiny", *fsdp]
        return run_python(args, timeout=300, **s3_env.env()).stdout

    two_ranks(4)
    losses = losses_by_step(tmp_path / "run")
    store = remote_of(prefix)
    assert sorted(n for n in store.sizes("step_000004") if n.startswith("upload_rank")) == ["upload_rank0.json", "upload_rank1.json"]
    assert json.loads(store.read_text("step_000004/manifest.json"))["world_size"] == 2
    shutil.rmtree(tmp_path / "run")
    train(load_config("bible-tiny", overrides(tiny_data, tmp_path, prefix, "run", 6)))
    assert "at step 4 |" in capsys.readouterr().out
    losses.update(losses_by_step(tmp_path / "run"))
    shutil.rmtree(tmp_path / "run")
    assert "at step 6 |" in two_ranks(MAX_STEPS)
    losses.update(losses_by_step(tmp_path / "run"))
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-5)  # 2 ranks reduce in another order: float rounding


# ---------------------------------------------------------------------------------------------- (c) kill -9 mid-upload


def test_kill9_during_an_upload_leaves_the_remote_latest_complete(s3_env, tiny_data, tmp_path, capsys):
    prefix = f"s3://{BUCKET}/c"
    store = remote_of(prefix)
    args = launch_args(tiny_data, tmp_path, "run", train__max_steps=400, checkpoint__every_steps=1, checkpoint__keep_last_k=2, checkpoint__remote=prefix)
    proc = Proc(args, tmp_path / "log", **s3_env.env())

    def uploading() -> bool:  # `latest` is there, and a newer checkpoint is partly uploaded (no manifest yet)
        latest = store.latest()
        return bool(latest) and any(c > latest and not store.is_complete(c) and store.sizes(c) for c in store.checkpoints())

    assert proc.wait_for(uploading, timeout=120, poll=0.05), proc.text()[-2000:]
    proc.kill()
    remote_latest = assert_remote_latest_complete(store, tmp_path)
    local_latest = (ckpt_root(tmp_path / "run") / "latest").read_text()
    assert local_latest > remote_latest  # the one whose upload was cut short

    # the same command, with nothing left to train: the newer local checkpoint is uploaded at the start
    step = int(local_latest[5:])
    args = tiny_overrides(tiny_data, tmp_path, "run", train__max_steps=step, checkpoint__remote=prefix)
    train(load_config("bible-tiny", args))
    assert f"the newest checkpoint is only on this machine: uploading {local_latest}" in capsys.readouterr().out
    assert assert_remote_latest_complete(store, tmp_path / "again") == local_latest
    shutil.rmtree(tmp_path / "run")  # and a fresh machine resumes from it
    train(load_config("bible-tiny", [*args, f"train.max_steps={step + 1}"]))
    assert f"at step {step} |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- (d) an outage


def test_storage_outage_mid_run_costs_nothing_and_a_failed_final_upload_is_said(tiny_data, tmp_path, monkeypatch):
    """The server stops mid-run and comes back: training went on, later checkpoints reach it. Then it stops for
    good and the run is asked to stop (SIGTERM): the stop waits remote_wait_minutes, then names the local copy."""
    server = S3Server().start()  # its own server: this test stops it
    server.create_bucket()
    env = {**server.env(), "AWS_MAX_ATTEMPTS": "1"}  # botocore's own retries (~7 s a call) would only slow the test
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    prefix = f"s3://{BUCKET}/d"
    args = launch_args(tiny_data, tmp_path, "run", train__max_steps=5000, checkpoint__every_steps=3, checkpoint__remote=prefix, checkpoint__remote_wait_minutes=0.05)
    proc = Proc(args, tmp_path / "log", **env)
    try:
        assert proc.wait_for_line("checkpoint uploaded: ", timeout=120)
        server.stop()
        assert proc.wait_for_line("warning: uploading", timeout=60)
        steps_in_outage = proc.text().count("step ")
        server.start()  # moto keeps nothing across a restart: the bucket is made again, empty
        server.create_bucket()
        assert proc.wait_for_line("is reachable again", timeout=60)
        assert proc.text().count("step ") > steps_in_outage  # it trained through the outage
        after = len(proc.text())
        assert proc.wait_for(lambda: "checkpoint uploaded: " in proc.text()[after:], timeout=60)
        uploaded = proc.text()[after:].split("checkpoint uploaded: ")[1].split()[0]
        assert assert_remote_latest_complete(remote_of(prefix), tmp_path) >= uploaded.rsplit("/", 1)[1]  # after the outage

        server.stop()  # now for good
        proc.popen.send_signal(signal.SIGTERM)
        code = proc.finish(60)
    finally:
        server.stop()
    last = proc.text().strip().splitlines()[-1]
    assert code != 0 and last.startswith("error: the last checkpoint did not reach") and str(ckpt_root(tmp_path / "run")) in last, proc.text()[-2000:]
    assert "Traceback" not in proc.text()


# ---------------------------------------------------------------------------------------------- (e) a wrong bucket or key


def test_wrong_bucket_or_key_is_one_line_before_step_1(s3_env, tiny_data, tmp_path, capsys, monkeypatch):
    base = tiny_overrides(tiny_data, tmp_path, "run")
    code, out, err = train_cli(["--config", "bible-tiny", *base, "checkpoint.remote=s3://no-such-bucket/x"], capsys)
    assert_one_line_error(code, err, "no-such-bucket", "does not exist")
    assert "step " not in out and not (tmp_path / "run" / "checkpoints").exists()

    locked = S3Server(enforce_auth=True).start()  # checks keys: ours is unknown to it
    try:
        for key, value in locked.env().items():
            monkeypatch.setenv(key, value)
        code, out, err = train_cli(["--config", "bible-tiny", *base, f"checkpoint.remote=s3://{BUCKET}/x"], capsys)
    finally:
        locked.stop()
    assert_one_line_error(code, err, "is not usable", "credentials")
    assert locked.env()["AWS_SECRET_ACCESS_KEY"] not in out + err and "step " not in out

    code, _, err = train_cli(["--config", "bible-tiny", *base, "checkpoint.remote=my-bucket/x"], capsys)
    assert_one_line_error(code, err, "is not a URL")


# ---------------------------------------------------------------------------------------------- (f) elastic restart


def test_max_restarts_restarts_the_group_after_a_worker_dies(tiny_data, tmp_path, reference):
    """launch/train.py --max-restarts=1: one of two workers is killed (-9); torchrun restarts both, they resume
    from the newest checkpoint and the run ends with the losses of an uninterrupted one."""
    import psutil

    fsdp = [o for o in overrides(tiny_data, tmp_path, "", "run", MAX_STEPS) if o not in SINGLE] + FSDP2
    proc = Proc(["launch/train.py", "--nproc_per_node=2", "--max-restarts=1", "--config", "bible-tiny", *fsdp], tmp_path / "log")
    assert proc.wait_for_line("checkpoint saved: ", timeout=120)
    workers = [p for p in psutil.Process(proc.popen.pid).children(recursive=True) if "launch/train.py" in " ".join(p.cmdline())]
    assert len(workers) == 2, workers
    workers[1].kill()
    assert proc.finish(180) == 0, proc.text()[-3000:]
    assert "resumed from" in proc.text() and f"done: step {MAX_STEPS}" in proc.text()
    assert proc.text().count("restarting the workers after a failure (restart 1 of --max-restarts=1") == 1  # issue 20: said
    assert losses_by_step(tmp_path / "run") == pytest.approx(reference, rel=1e-5, abs=1e-5)
