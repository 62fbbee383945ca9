"""`python -m dist_gpt.bench` runs in a quick mode and reports every number (not how fast: that is the bench's job)."""

from __future__ import annotations

import json

from conftest import TINY_MODEL, run_python

from dist_gpt.runtime.malloc import restore_default_malloc


def test_bench_quick_compare_reports_every_field():
    proc = run_python(
        ["-m", "dist_gpt.bench", "--config", "bible-tiny", "--steps", "2", "--warmup", "1", "--json", *TINY_MODEL, "train.micro_batch_size=2",
         "--compare", "model.loss=plain malloc=default", "model.loss=chunked"],
        timeout=300,
    )
    report = json.loads(proc.stdout)
    assert report["context"]["strategy"] == "single" and report["context"]["peak_tflops"] > 0
    assert "cpu" in report["context"]["attention"]
    variants = report["results"]
    assert [v["variant"] for v in variants] == ["model.loss=plain malloc=default", "model.loss=chunked"]
    for v in variants:
        assert v["tokens_per_s"] > 0 and 0 < v["mfu"] < 2 and v["steps_timed"] == 2
        assert v["ms_forward"] > 0 and v["ms_backward"] > 0 and v["ms_optimizer"] > 0 and v["ms_data"] >= 0
        assert abs(sum(v[f"ms_{p}"] for p in ("data", "forward", "backward", "optimizer")) - v["ms_per_step"]) < 0.5 * v["ms_per_step"]
        assert v["page_faults_per_step"] >= 0 and v["peak_memory_mb"] > 0
    assert variants[0]["ratio_to_first"] == 1.0


def test_bench_table_and_bad_variant():
    proc = run_python(["-m", "dist_gpt.bench", "--config", "bible-tiny", "--steps", "1", "--warmup", "0", *TINY_MODEL, "train.micro_batch_size=2"], timeout=300)
    assert "tok/s" in proc.stdout and "MFU" in proc.stdout
    bad = run_python(["-m", "dist_gpt.bench", "--config", "bible-tiny", "--compare", "malloc=huge"], check=False, timeout=300)
    assert bad.returncode == 2 and "malloc must be 'kept' or 'default'" in bad.stderr


def test_restore_default_malloc_is_callable():
    assert restore_default_malloc() in (True, False)


def test_bench_runs_each_variant_in_its_train_dtype_against_that_dtypes_peak(tmp_path):
    """train.dtype=bf16 was ignored (the header said float32) and --compare could not compare dtypes; each
    dtype's MFU is against its own peak, cached under its own key (a bf16 run never raises the fp32 yardstick)."""
    proc = run_python(
        ["-m", "dist_gpt.bench", "--config", "bible-tiny", "--steps", "1", "--warmup", "0", "--json", *TINY_MODEL, "train.micro_batch_size=2",
         "--compare", "train.dtype=fp32", "train.dtype=bf16"],
        timeout=300, DIST_GPT_CACHE=str(tmp_path),
    )
    report = json.loads(proc.stdout)
    assert [v["dtype"] for v in report["results"]] == ["fp32", "bf16"]
    assert report["context"]["dtype"] == "fp32 / bf16"
    cached = json.loads((tmp_path / "cpu_peak_flops.json").read_text())
    by_dtype = {key.split(" | ")[2]: flops for key, flops in cached.items()}
    assert set(by_dtype) == {"float32", "bfloat16"}
    for v, name in zip(report["results"], ("float32", "bfloat16")):
        # the yardstick of that dtype: its own matmul measurement, or the CPU's nominal peak where that is higher
        peak = v["peak_tflops"] * 1e12
        assert peak >= by_dtype[name] * (1 - 1e-6), (name, v["peak_source"])
        assert abs(peak - by_dtype[name]) <= 1e-6 * by_dtype[name] or v["peak_source"].startswith("cpu nominal"), (name, v["peak_source"])
    assert report["results"][0]["peak_tflops"] != report["results"][1]["peak_tflops"]
    single = run_python(["-m", "dist_gpt.bench", "--config", "bible-tiny", "--steps", "1", "--warmup", "0", *TINY_MODEL, "train.micro_batch_size=2", "train.dtype=bf16"],
                        timeout=300, DIST_GPT_CACHE=str(tmp_path))
    assert "| bf16 |" in single.stdout.splitlines()[0]
