"""MFU's yardstick: on CPU the nominal cores x clock x FLOPs/cycle (issue 20: no load changes it), or the matmul
rate measured once per machine and cached where that is higher; re-measured on request, given by
train.peak_tflops, and never below what a run achieves, so MFU never reads above 100 %."""

import pytest
import torch

from dist_gpt.runtime import metrics


@pytest.fixture
def matmuls(monkeypatch, tmp_path):
    """A private cache, and a fake matmul measurement that counts its calls (1 GFLOP/s)."""
    monkeypatch.setenv("DIST_GPT_CACHE", str(tmp_path))
    monkeypatch.delenv(metrics.REMEASURE_ENV, raising=False)
    calls = []

    def measure(device, dtype, **kwargs):
        calls.append(dtype)
        return 1e9

    monkeypatch.setattr(metrics, "measure_matmul_flops", measure)
    return calls


def test_the_cpu_peak_is_measured_once_per_machine(matmuls, monkeypatch):
    cpu = torch.device("cpu")
    first = metrics.measured_cpu_peak(cpu, torch.float32)  # issue 20: the measured rate, beside the nominal peak
    assert first.flops == 1e9 and "measured now" in first.source and len(matmuls) == 1
    again = metrics.measured_cpu_peak(cpu, torch.float32)
    assert again.flops == 1e9 and "measured once" in again.source and len(matmuls) == 1  # from the cache
    monkeypatch.setenv(metrics.REMEASURE_ENV, "1")
    metrics.measured_cpu_peak(cpu, torch.float32)
    assert len(matmuls) == 2


def test_mfu_never_exceeds_100_percent_the_peak_rises_to_what_a_run_achieves(matmuls):
    peak = metrics.measured_cpu_peak(torch.device("cpu"), torch.float32)
    assert peak.mfu(0.5e9) == 0.5
    assert peak.mfu(2e9) == 1.0 and peak.flops == 2e9 and "observed" in peak.source
    assert peak.mfu(0.5e9) == 0.25
    assert metrics.measured_cpu_peak(torch.device("cpu"), torch.float32).flops == 2e9  # remembered for the next run
    assert len(matmuls) == 1


def test_a_configured_peak_is_used_as_given(matmuls):
    peak = metrics.device_peak(torch.device("cpu"), torch.float32, configured_tflops=0.25)
    assert (peak.flops, peak.source, matmuls) == (0.25e12, "train.peak_tflops", [])


def test_the_cpu_yardstick_is_nominal_whatever_the_load_when_measured(matmuls, monkeypatch):
    """Issue 20: a peak measured on a busy machine (1 GFLOP/s here) no longer sets MFU's yardstick: cores x clock x
    FLOPs per cycle of the instructions in use does, with the measurement beside it; a measurement above the
    nominal figure (a VM reporting its base clock) is the yardstick then, and says so."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(metrics, "_cpuinfo", lambda: {"vendor_id": "AuthenticAMD", "flags": "fma avx2"})
    monkeypatch.setattr(metrics, "_cpu_max_ghz", lambda info: 3.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(metrics.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert metrics.cpu_nominal_peak(torch.float32) == (2 * 3.0e9 * 32, "2 cores x 3.00 GHz x 32 FLOP/cycle (AVX2 fp32)")
    peak = metrics.device_peak(torch.device("cpu"), torch.float32)
    assert peak.flops == 192e9 and peak.source == "cpu nominal: 2 cores x 3.00 GHz x 32 FLOP/cycle (AVX2 fp32); measured matmul 0.001"
    assert peak.mfu(96e9) == 0.5
    monkeypatch.setattr(metrics, "_cpu_max_ghz", lambda info: 0.001)  # a reported clock far below the real one
    peak = metrics.device_peak(torch.device("cpu"), torch.float32)
    assert peak.flops == 1e9 and peak.source.startswith("cpu matmul measured on this machine, above the nominal 2 cores x 0.00 GHz")
