"""MFU's yardstick: on CPU a peak measured once per machine and cached, re-measured on request, given by
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
    first = metrics.device_peak(cpu, torch.float32)
    assert first.flops == 1e9 and "measured now" in first.source and len(matmuls) == 1
    again = metrics.device_peak(cpu, torch.float32)
    assert again.flops == 1e9 and "measured once" in again.source and len(matmuls) == 1  # from the cache
    monkeypatch.setenv(metrics.REMEASURE_ENV, "1")
    metrics.device_peak(cpu, torch.float32)
    assert len(matmuls) == 2


def test_mfu_never_exceeds_100_percent_the_peak_rises_to_what_a_run_achieves(matmuls):
    peak = metrics.device_peak(torch.device("cpu"), torch.float32)
    assert peak.mfu(0.5e9) == 0.5
    assert peak.mfu(2e9) == 1.0 and peak.flops == 2e9 and "observed" in peak.source
    assert peak.mfu(0.5e9) == 0.25
    assert metrics.device_peak(torch.device("cpu"), torch.float32).flops == 2e9  # remembered for the next run
    assert len(matmuls) == 1


def test_a_configured_peak_is_used_as_given(matmuls):
    peak = metrics.device_peak(torch.device("cpu"), torch.float32, configured_tflops=0.25)
    assert (peak.flops, peak.source, matmuls) == (0.25e12, "train.peak_tflops", [])
