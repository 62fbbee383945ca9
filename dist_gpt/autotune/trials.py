"""Running trials on the real device, agreed by all ranks: in this process (one CUDA device) or in a fresh
subprocess per trial (dist_gpt.autotune.trial_process), watched through a store shared by the ranks."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from dist_gpt.autotune.measure import TRIAL_STEPS, cuda_overhead_bytes, run_steps, trial_config
from dist_gpt.autotune.memory import GB, MB
from dist_gpt.autotune.search import TrialResult
from dist_gpt.config import Config
from dist_gpt.runtime.distributed import DistEnv, all_reduce_max, broadcast_from_main
from dist_gpt.runtime.precision import dtype_name

TRIAL_TIMEOUT_S = 900  # a trial that takes longer is killed (and the tuning stops with the reason)
PEER_FAILURE_GRACE_S = 10  # after a peer's trial failed, how long ours may still finish on its own
# A CPU trial process may not grow its heap past this (RLIMIT_DATA), so a size far past the budget fails
# as out of memory instead of swapping the machine: DIST_GPT_TRIAL_DATA_LIMIT_MB, else this x the budget.
TRIAL_DATA_LIMIT_ENV = "DIST_GPT_TRIAL_DATA_LIMIT_MB"
TRIAL_DATA_LIMIT_X_BUDGET = 2.0


class TrialRunner:
    """trial(micro_batch, checkpointing) -> TrialResult on the real device, agreed by all ranks.

    In this process on a single CUDA device (fast; OOMs are caught and cleaned up), otherwise in a fresh
    subprocess per trial: on CPU because a resident-set peak cannot be reset, with several ranks so that
    a rank running out inside a collective cannot desynchronise the training process group, and for
    DeepSpeed, whose engine keeps process-wide state."""

    def __init__(self, config: Config, env: DistEnv, strategy_name: str, budget_bytes: float, global_batch: int, steps: int = TRIAL_STEPS):
        self.config, self.env, self.budget_bytes, self.global_batch, self.steps = config, env, budget_bytes, global_batch, steps
        self.in_process = env.device.type == "cuda" and env.world_size == 1 and strategy_name != "deepspeed"
        self.overhead_bytes = 0  # measured: CUDA context (+ other processes), or the idle CPU process
        self.count = 0
        self.seconds = 0.0
        self.store = self._trial_store() if not self.in_process and env.world_size > 1 else None
        self.ds_config_file = self._trial_ds_config() if strategy_name == "deepspeed" else None
        self.last_ratio = 1.0  # measured / predicted at the latest trial: guards CPU trials against swapping
        self.predict: Callable[[int, bool], float] | None = None
        self.log: Callable[[str], None] | None = None  # a line per trial as it ends (rank 0 prints them)
        if env.device.type == "cuda":
            self.overhead_bytes = cuda_overhead_bytes(env.device)

    def micro_steps(self, micro_batch: int) -> int:
        """As many micro-steps per optimizer step as training will do, but 2 at most: from the second on,
        the previous micro-batches' gradients are alive during forward, and nothing changes after that."""
        return 2 if self.global_batch > micro_batch * self.env.world_size else 1

    def __call__(self, micro_batch: int, checkpointing: bool = False) -> TrialResult:
        start = time.perf_counter()
        config = trial_config(self.config, checkpointing)
        if self.ds_config_file:
            config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, ds_config=self.ds_config_file))
        skip = self._too_big_for_ram(micro_batch, checkpointing)
        if max_over_ranks([skip is not None], self.env)[0]:  # a trial needs every rank: all skip if one must
            result = skip or TrialResult(micro_batch, oom=True, skipped=True, note="not run: past another rank's RAM")
        elif self.in_process:
            result = self._in_process(config, micro_batch)
        else:
            result = self._in_subprocess(config, micro_batch)
        result = agree_across_ranks(result, self.env)
        if self.predict and result.peak_bytes:
            self.last_ratio = result.peak_bytes / self.predict(micro_batch, checkpointing)
        self.count += 1
        self.seconds += time.perf_counter() - start
        if self.log:
            measured = "out of memory" if result.oom else f"{result.peak_bytes / MB:,.0f} MB, {result.tokens_per_s:,.0f} tokens/s"
            self.log(f"  trial {self.count}: micro-batch {micro_batch}{' (checkpointing)' if checkpointing else ''}: {measured} "
                     f"({time.perf_counter() - start:.1f} s){' [' + result.note + ']' if result.note else ''}")
        return result

    # ---------------------------------------------------------------- CUDA, in this process

    def _in_process(self, config: Config, micro_batch: int) -> TrialResult:
        device = self.env.device
        total = torch.cuda.get_device_properties(device).total_memory
        # Emulate a card of budget_bytes: the allocator may reserve the budget less what it cannot use anyway.
        fraction = min(1.0, max(0.0, self.budget_bytes - self.overhead_bytes) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the strategies' notices, once per trial: noise here
                oom, speed = run_steps(config, self.env, micro_batch, self.micro_steps(micro_batch), self.steps)
            peak = torch.cuda.max_memory_allocated(device)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)  # training itself runs unconstrained
        return TrialResult(micro_batch, 0 if oom else peak + self.overhead_bytes, oom, speed)

    # ---------------------------------------------------------------- a subprocess per trial

    def _too_big_for_ram(self, micro_batch: int, checkpointing: bool) -> TrialResult | None:
        """On CPU, a trial far past the RAM would swap or meet the OOM killer (on a shared machine, maybe
        not ours): skip it when the model, scaled by the last measurement, says it would not fit in RAM."""
        if self.env.device.type != "cpu" or self.predict is None:
            return None
        import psutil

        expected = self.predict(micro_batch, checkpointing) * max(1.0, self.last_ratio)
        room = psutil.virtual_memory().available * 0.9
        if expected <= room:
            return None
        return TrialResult(micro_batch, int(expected), oom=True, skipped=True, note=f"~{expected / GB:.1f} GB predicted, {room / GB:.1f} GB of RAM available")

    def _in_subprocess(self, config: Config, micro_batch: int) -> TrialResult:
        env = self.env
        with tempfile.TemporaryDirectory(prefix="dist_gpt_trial_") as tmp:
            spec = {
                "config": config.to_dict(),
                "micro_batch": micro_batch,
                "micro_steps": self.micro_steps(micro_batch),
                "steps": self.steps,
                "budget_bytes": self.budget_bytes,
                "rank": env.rank,
                "local_rank": env.local_rank,
                "world_size": env.world_size,
                "device": str(env.device),
                "dtype": dtype_name(env.compute_dtype),
                "store": [self.store_host, self.store.port, f"trial{self.count}"] if self.store else None,
                "data_limit_bytes": self._data_limit_bytes(),
                "result": str(Path(tmp) / "result.json"),
            }
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            log_path = Path(tmp) / "log.txt"
            with open(log_path, "w") as log:
                proc = subprocess.Popen([sys.executable, "-m", "dist_gpt.autotune.trial_process", str(spec_path)], stdout=log, stderr=subprocess.STDOUT)
                ending = self._wait(proc, spec["store"][2] if self.store else None)
            result_path = Path(spec["result"])
            if result_path.exists():
                data = json.loads(result_path.read_text())
                if env.device.type == "cpu":
                    self.overhead_bytes = data["overhead_bytes"]
                result = TrialResult(**data["result"])
            elif ending == "timed out":
                result = TrialResult(micro_batch, failed=True, note=f"TimeoutError: the trial took over {TRIAL_TIMEOUT_S} s")
            elif ending == "peer failed":  # told apart below: a peer that ran out, or one that failed
                result = TrialResult(micro_batch, failed=True, note="stopped: another rank's trial failed")
            elif proc.returncode in (-6, -9) and spec["data_limit_bytes"]:  # an allocation past RLIMIT_DATA that aborted
                result = TrialResult(micro_batch, oom=True, note=f"killed by signal {-proc.returncode} at the heap cap")
            elif proc.returncode == -9:  # a SIGKILL that we did not send: the kernel's OOM killer
                result = TrialResult(micro_batch, oom=True, note="killed (the kernel's OOM killer?)")
            else:
                tail = log_path.read_text()[-2000:].strip().splitlines()
                result = TrialResult(micro_batch, failed=True, note=f"trial process exited with {proc.returncode}: {tail[-1] if tail else ''}")
        if result.failed and self._peer_ran_out(spec["store"]):
            # Ours was stuck in (or broken by) a collective with a rank that ran out: it did not fit either.
            return TrialResult(micro_batch, oom=True, note="stopped: another rank ran out of memory")
        return result

    def _data_limit_bytes(self) -> int | None:
        if self.env.device.type != "cpu":
            return None
        if os.environ.get(TRIAL_DATA_LIMIT_ENV):
            return int(float(os.environ[TRIAL_DATA_LIMIT_ENV]) * MB)
        return int(TRIAL_DATA_LIMIT_X_BUDGET * self.budget_bytes) if math.isfinite(self.budget_bytes) else None

    def _peer_ran_out(self, store_spec) -> bool:
        """Whether another rank's trial reported running out (ours failed, so the count is not ours)."""
        return bool(store_spec) and self.store.add(f"{store_spec[2]}/oom", 0) > 0

    def _wait(self, proc: subprocess.Popen, prefix: str | None) -> str:
        """Wait for the trial: 'exited', or 'peer failed' / 'timed out' when we had to kill it (a peer's
        trial failed, so ours would wait in a collective until the group's timeout)."""
        deadline = time.monotonic() + TRIAL_TIMEOUT_S
        peer_failed_at = None
        while True:
            try:
                proc.wait(timeout=0.5)
                return "exited"
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if prefix and peer_failed_at is None and self.store.add(f"{prefix}/oom", 0) + self.store.add(f"{prefix}/failed", 0) > 0:
                peer_failed_at = now
            if now > deadline or (peer_failed_at is not None and now - peer_failed_at > PEER_FAILURE_GRACE_S):
                proc.kill()
                proc.wait()
                return "peer failed" if peer_failed_at is not None else "timed out"

    def _trial_store(self):
        """A TCPStore hosted by rank 0's tuner: the trials' process groups meet there, and a failing trial
        raises a flag in it that every rank's tuner watches."""
        import torch.distributed as dist

        self.store_host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = None
        if self.env.rank == 0:
            store = dist.TCPStore(self.store_host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
            port = store.port
        port = broadcast_from_main(port)
        if self.env.rank != 0:
            store = dist.TCPStore(self.store_host, port, is_master=False, timeout=datetime.timedelta(seconds=60))
        return store

    def _trial_ds_config(self) -> str:
        """The run's DeepSpeed JSON with the batch keys left to each trial ("auto"): a trial's size is its own."""
        from dist_gpt.parallel.deepspeed import load_ds_config

        ds = load_ds_config(self.config.parallel.ds_config)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            ds[key] = "auto"
        handle, path = tempfile.mkstemp(prefix="dist_gpt_trial_ds_", suffix=".json")
        with os.fdopen(handle, "w") as f:
            json.dump(ds, f)
        return path


def max_over_ranks(values: Sequence[float], env: DistEnv) -> list[float]:
    """Element-wise all_reduce(MAX) over the ranks; the values themselves on a world of one."""
    return list(values) if env.world_size == 1 else all_reduce_max(values)


def agree_across_ranks(result: TrialResult, env: DistEnv) -> TrialResult:
    """all_reduce(MAX) of (OOM, peak, -speed, failed, skipped): every rank gets the worst rank's outcome.
    Every rank reaches this call whether its trial ran, ran out or failed, so no rank is left waiting."""
    vector = max_over_ranks(result.as_vector(), env)
    agreed = TrialResult.from_vector(result.micro_batch, vector, result.note)
    if (agreed.oom and not result.oom) or (agreed.failed and not result.failed):
        agreed.note = "on another rank"
    return agreed
