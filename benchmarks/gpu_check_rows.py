"""One row of benchmarks/gpu_check.sh's table from a section's outputs: prints `status|result`.

    python benchmarks/gpu_check_rows.py doctor DOCTOR.json
    python benchmarks/gpu_check_rows.py pytest PYTEST.log
    python benchmarks/gpu_check_rows.py trainer RUN_DIR
    python benchmarks/gpu_check_rows.py dtypes FP16_RUN_DIR OTHER_RUN_DIR
    python benchmarks/gpu_check_rows.py autotune RUN_DIR BUDGET_GB
    python benchmarks/gpu_check_rows.py bench BENCH.json
    python benchmarks/gpu_check_rows.py ran RUN_DIR
    python benchmarks/gpu_check_rows.py loss_share LOSS_SHARE.json
    python benchmarks/gpu_check_rows.py device
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

MFU_TARGET = 0.45  # one H100/H200, gpt2-124m, bf16, the trainer's own log line (issue 11)
DTYPE_REL_TOL = 0.01  # fp16 against bf16 after the same steps
BUDGET_BAND = (0.90, 1.00)  # the autotuner's chosen size: its peak in [90 %, 100 %) of the budget
GIB = 2**30  # the autotuner's "GB" (train.memory_budget_gb) are GiB


def num(value, spec: str = ",.0f", scale: float = 1.0) -> str:
    """A summary number, or n/a where the run had none to give (JSON null: e.g. no steps after the warm-up)."""
    return "n/a" if value is None else format(value * scale, spec)


def records(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def steps(run_dir: str) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def summary(run_dir: str) -> dict:
    return next(r["summary"] for r in reversed(records(run_dir)) if "summary" in r)


def doctor(path: str) -> tuple[str, str]:
    checks = json.loads(Path(path).read_text())["checks"]
    failed = [c["name"] for c in checks if c["status"] == "FAIL"]
    training = next((c for c in checks if c["name"].startswith("training")), {"result": "?"})
    return ("FAIL", f"failed: {', '.join(failed)}") if failed else ("ok", f"all checks passed; training: {training['result']}")


def pytest(path: str) -> tuple[str, str]:
    text = Path(path).read_text()
    last = [line for line in text.splitlines() if re.search(r"\b(passed|failed|skipped|deselected|error)", line)]
    outcome = last[-1].strip("= ") if last else "no summary line"
    return ("FAIL" if re.search(r"\b(failed|error)", outcome) else "ok"), outcome


def trainer(run_dir: str) -> tuple[str, str]:
    last = steps(run_dir)[-1]
    s = summary(run_dir)
    result = (
        f"step {last['step']} log line: {last['tokens_per_s']:,.0f} tok/s, MFU {100 * last['mfu']:.1f} % "
        f"({s['dtype']}, compile {'on' if s['compile'] else 'off'}, micro-batch {s['micro_batch_size']} x grad-accum {s['grad_accum_steps']}); "
        f"run mean {num(s['tokens_per_s'])} tok/s, MFU {num(s['mfu'], '.1f', 100)} %; loss {last['loss']:.3f}"
    )
    if last["loss"] is None or not math.isfinite(last["loss"]):
        return "FAIL", result + ": non-finite loss"
    return ("ok" if last["mfu"] >= MFU_TARGET else "below"), result + f" (target MFU >= {100 * MFU_TARGET:.0f} %)"


def dtypes(fp16_dir: str, other_dir: str) -> tuple[str, str]:
    a, b = summary(fp16_dir), summary(other_dir)
    names = (a["dtype"], b["dtype"])
    finite = all(s[k] is not None and math.isfinite(s[k]) for s in (a, b) for k in ("train_loss", "val_loss"))
    if not finite:
        return "FAIL", f"a loss is not finite: {names[0]} {a['train_loss']} / {a['val_loss']}, {names[1]} {b['train_loss']} / {b['val_loss']}"
    train_delta = abs(a["train_loss"] - b["train_loss"]) / b["train_loss"]
    val_delta = abs(a["val_loss"] - b["val_loss"]) / b["val_loss"]
    result = (
        f"after step {a['step']}: train loss {a['train_loss']:.5f} ({names[0]}) vs {b['train_loss']:.5f} ({names[1]}), {100 * train_delta:.2f} % apart; "
        f"val {a['val_loss']:.5f} vs {b['val_loss']:.5f}, {100 * val_delta:.2f} %; "
        f"fp16 loss scale {a.get('loss_scale', float('nan')):g}, {a.get('overflow_skips', '?')} overflow skips; "
        f"{num(a['tokens_per_s'])} vs {num(b['tokens_per_s'])} tok/s"
    )
    ok = finite and names[0] == "fp16" and max(train_delta, val_delta) < DTYPE_REL_TOL
    return ("ok" if ok else "FAIL"), result


def autotune(run_dir: str, budget_gb: str) -> tuple[str, str]:
    budget = float(budget_gb) * GIB
    s = summary(run_dir)
    chosen = s["micro_batch_size"]
    outcome = json.loads((Path(run_dir) / "autotune.json").read_text())
    trial = next((t["result"] for t in outcome.get("tried", []) if t["result"]["micro_batch"] == chosen), None)
    peaks = [(k, max(r.get(k, 0.0) for r in steps(run_dir)) * 2**20) for k in ("mem_peak_reserved_mb", "mem_peak_alloc_mb", "mem_peak_rss_mb")]
    measured = [(k.removeprefix("mem_").removesuffix("_mb"), v) for k, v in peaks if v]
    parts = [f"{name} {v / GIB:.2f} GiB = {100 * v / budget:.1f} %" for name, v in measured]
    trial_share = trial["peak_bytes"] / budget if trial else math.nan
    result = f"micro-batch {chosen}: in training {', '.join(parts)} of {budget_gb} GiB; its trial (overhead included) {100 * trial_share:.1f} %"
    lo, hi = BUDGET_BAND
    return ("ok" if lo <= trial_share < hi else "below" if trial_share < lo else "FAIL"), result


def bench(path: str) -> tuple[str, str]:
    results = json.loads(Path(path).read_text())["results"]
    off, on = results
    return "info", f"off {off['tokens_per_s']:,.0f} tok/s (MFU {100 * off['mfu']:.1f} %), on {on['tokens_per_s']:,.0f} tok/s (MFU {100 * on['mfu']:.1f} %): x{on['ratio_to_first']:.2f}"


def ran(run_dir: str) -> tuple[str, str]:
    """A run that must simply work (FSDP with CPU offload, DeepSpeed ZeRO-2): every step's loss finite."""
    logged = steps(run_dir)
    s = summary(run_dir)
    finite = bool(logged) and all(r["loss"] is not None and math.isfinite(r["loss"]) for r in logged)
    result = f"{len(logged)} steps, last loss {logged[-1]['loss']:.3f}, {num(s['tokens_per_s'])} tok/s ({s['dtype']})" if logged else "no step logged"
    return ("ok" if finite else "FAIL"), result


def loss_share(path: str) -> tuple[str, str]:
    r = json.loads(Path(path).read_text())
    e, c = r["eager"], r["compiled"]
    return "info", (
        f"{e['dtype']}: eager {e['step_ms']:.1f} ms/step, loss {100 * e['loss_share']:.1f} % of it; "
        f"compiled {c['step_ms']:.1f} ms/step (x{e['step_ms'] / c['step_ms']:.2f}), loss {100 * c['loss_share']:.1f} %"
    )


def device() -> tuple[str, str]:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return "", f"{name}, torch {torch.__version__}"


if __name__ == "__main__":
    status, result = globals()[sys.argv[1]](*sys.argv[2:])
    print(result if sys.argv[1] == "device" else f"{status}|{result}")
