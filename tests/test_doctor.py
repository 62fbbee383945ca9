"""`python -m dist_gpt.doctor` on CPU, as a user runs it: a real subprocess, the real trainer inside."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import run_python

from dist_gpt.runtime.precision import cpu_has_native_bf16

CHECKS = ["python", "torch", "cpu", "cpu attention kernels", "cpu matmul", "training (defaults)", "checkpoint save + resume", "all-reduce"]


def test_doctor_on_cpu_passes_every_check_and_reports_the_numbers(tmp_path):
    proc = run_python(["-m", "dist_gpt.doctor", "--dir", str(tmp_path), "--json", str(tmp_path / "doctor.json")], timeout=300, OMP_NUM_THREADS="2")
    table = proc.stdout
    assert "doctor: all checks passed" in table
    for name in CHECKS:
        assert any(line.startswith(name + " ") and " ok " in line for line in table.splitlines()), (name, table)
    checks = {c["name"]: c for c in json.loads((tmp_path / "doctor.json").read_text())["checks"]}
    training = checks["training (defaults)"]["numbers"]
    default_dtype = "bf16" if cpu_has_native_bf16() else "fp32"  # train.dtype auto on a CPU: bf16 where it is native
    assert training["dtype"] == default_dtype and training["compile"] is False  # the defaults on CPU
    assert training["tokens_per_s"] > 0 and 0 < training["mfu"] < 1.5 and training["peak_memory_mb"] > 100
    assert training["train_loss"] < training["first_loss"]
    assert checks["checkpoint save + resume"]["numbers"]["resume_rel_delta"] == 0.0  # bit-exact on CPU
    assert checks["all-reduce"]["numbers"]["allreduce_busbw_gbs"] > 0
    assert list(tmp_path.iterdir()) == [tmp_path / "doctor.json"]  # its working folder is gone


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MB tmpfs: the synthetic data fits, the first checkpoint does not. Needs root (CI runs as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_doctor_names_what_failed_and_exits_nonzero(full_disk):
    proc = run_python(["-m", "dist_gpt.doctor", "--dir", str(full_disk)], timeout=300, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("doctor: FAILED: training (defaults), checkpoint save + resume"), last
    assert "MB free in " + str(full_disk) in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert os.listdir(full_disk) == []  # nothing left behind on the user's disk
