"""The micro-batch autotuner (dist_gpt.autotune) and the memory model it starts from (dist_gpt.autotune.memory).

The search and the choice are pure functions over a trial callable, so most tests drive them with simulated
devices: exact, noisy, flaky, or two ranks that disagree. The rest measure for real on CPU, with shapes small
enough for a few seconds per trial: the model's saved-activation arithmetic byte for byte, its live-tensor
peak against the profiler, its resident-set prediction within 15%, a whole tuning whose pick is checked in
fresh processes, two real ranks of which one runs out, the CLI's error and the trainer's `auto`. The CUDA
tests (kernels' saved bytes, the model against max_memory_allocated, OOM recovery) skip without a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import types

import pytest
import torch
from conftest import REPO, needs_cuda, run_python, tiny_overrides

from dist_gpt.autotune import (
    NO_GLOBAL_BATCH_CAP,
    RunMemoryModel,
    TrialResult,
    agree_across_ranks,
    autotune,
    measure_sizes,
    memory,
    nothing_fits_message,
    search_largest,
    tune,
    worst_of,
)
from dist_gpt.config import from_dict
from dist_gpt.errors import UserError
from dist_gpt.model import GPT, Block, GPTConfig
from dist_gpt.runtime.distributed import DistEnv

MB = memory.MB


# ============================================================================ simulated devices


class SimulatedDevice:
    """peak(b) = base + per_sample x b (a third of it with activation checkpointing), optionally noisy;
    OOM above `capacity`; sizes in `flaky` run out once, then run; speed peaks at `fastest`."""

    def __init__(self, base_mb=1000.0, per_sample_mb=10.0, capacity_mb=None, noise=0.0, flaky=(), fastest=None, seed=0):
        self.base, self.per_sample, self.capacity, self.noise = base_mb * MB, per_sample_mb * MB, capacity_mb and capacity_mb * MB, noise
        self.flaky, self.fastest = set(flaky), fastest
        self.rng = random.Random(seed)
        self.calls: list[int] = []

    def peak(self, b: int, checkpointing: bool = False) -> float:
        return self.base + self.per_sample * b / (3 if checkpointing else 1)

    def __call__(self, b: int, checkpointing: bool = False) -> TrialResult:
        self.calls.append(b)
        if b in self.flaky:
            self.flaky.discard(b)
            return TrialResult(b, oom=True)
        peak = self.peak(b, checkpointing) * (1 + self.rng.uniform(-self.noise, self.noise))
        if self.capacity and peak > self.capacity:
            return TrialResult(b, oom=True)
        speed = 1000.0 * b / (1 + (b / self.fastest) ** 2) if self.fastest else 1000.0 * b
        return TrialResult(b, int(peak), tokens_per_s=speed * (0.8 if checkpointing else 1.0))


LIMIT = 1500 * MB  # with the default device: micro-batch 50 is exactly at the limit


@pytest.mark.parametrize("start", [50, 48, 1, 7, 1000])
@pytest.mark.parametrize("model_error", [None, 0.9, 1.2])
def test_search_finds_the_boundary_from_any_start(start, model_error):
    """With or without a memory model (here 10% under or 20% over the device's slope), near or far starts."""
    device = SimulatedDevice()
    predict = (lambda b: device.base + model_error * device.per_sample * b) if model_error else None
    search = search_largest(device, LIMIT, start, max_micro_batch=NO_GLOBAL_BATCH_CAP, predict_bytes=predict)
    assert search.largest == 50
    fits = {row.micro_batch: row.fits for row in search.tried}
    assert fits[50] and not fits[51]  # the bracket closed on measurements
    near = start in (48, 50)
    assert len(device.calls) <= (4 if near else 8), device.calls


def test_search_respects_the_cap_and_real_ooms():
    device = SimulatedDevice(capacity_mb=1300)  # runs out before reaching the limit
    search = search_largest(device, LIMIT, 40, max_micro_batch=NO_GLOBAL_BATCH_CAP)
    assert search.largest == 30
    oom_rows = [row for row in search.tried if row.result.oom]
    assert oom_rows[0].retried and oom_rows[0].outcome == "OOM (twice)"  # retried once, then confirmed
    assert not any(row.retried for row in oom_rows[1:])  # the card's real limit is known: no more retries
    assert len(device.calls) <= 10, device.calls
    capped = search_largest(SimulatedDevice(), LIMIT, 40, max_micro_batch=32)
    assert capped.largest == 32 and max(row.micro_batch for row in capped.tried) == 32


@pytest.mark.parametrize("seed", range(5))
def test_search_with_noisy_peaks_stays_under_the_limit(seed):
    device = SimulatedDevice(noise=0.03, seed=seed)  # +-3% of ~1500 MB = +-4.5 micro-batches of 10 MB
    search = search_largest(device, LIMIT, 30, max_micro_batch=NO_GLOBAL_BATCH_CAP)
    chosen = next(row for row in search.tried if row.micro_batch == search.largest)
    assert chosen.fits and chosen.result.peak_bytes <= LIMIT
    assert 45 <= search.largest <= 55
    assert any(row.micro_batch == search.largest + 1 and not row.fits for row in search.tried)
    assert len(search.tried) <= 12


def test_flaky_oom_is_retried_once_and_then_counts():
    device = SimulatedDevice(flaky={50})  # the prediction's size runs out once (say, memory not yet returned)
    search = search_largest(device, LIMIT, 50, max_micro_batch=NO_GLOBAL_BATCH_CAP)
    assert search.largest == 50
    row = next(row for row in search.tried if row.micro_batch == 50)
    assert row.retried and row.fits and row.outcome == "fit (OOM once, then ran)"
    assert device.calls.count(50) == 2


def test_ranks_that_disagree_take_the_worst():
    rank0 = SimulatedDevice()
    rank1 = SimulatedDevice(per_sample_mb=12.5, capacity_mb=1400)  # more activations (say, longer documents), a smaller card

    def both(b: int, checkpointing: bool = False) -> TrialResult:
        return worst_of([rank0(b), rank1(b)])

    outcome = tune(both, limit_bytes=LIMIT, start=50)
    alone = [search_largest(device, LIMIT, 50, NO_GLOBAL_BATCH_CAP).largest for device in (SimulatedDevice(), SimulatedDevice(per_sample_mb=12.5, capacity_mb=1400))]
    assert outcome.micro_batch == min(alone) == 32

    ran = [TrialResult(8, 100, tokens_per_s=50.0), TrialResult(8, 300, tokens_per_s=40.0)]
    agreed = worst_of(ran)
    assert not agreed.oom and agreed.peak_bytes == 300 and agreed.tokens_per_s == 40.0  # the slowest rank sets the pace
    agreed = worst_of([*ran, TrialResult(8, oom=True, note="on rank 2")])
    assert agreed.oom and agreed.peak_bytes == 300 and "rank 2" in agreed.note


def _agree_worker(rank: int, store_path: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    env = DistEnv(rank=rank, world_size=2)
    mine = [TrialResult(16, 900 * MB, tokens_per_s=2000.0), TrialResult(16, oom=True, note="CUDA out of memory")][rank]
    agreed = agree_across_ranks(mine, env)
    dist.barrier()
    results[rank] = dataclasses.asdict(agreed)
    dist.destroy_process_group()


def test_all_reduce_agreement_between_two_processes(tmp_path):
    """The real collective: rank 1 ran out, rank 0 did not; both learn it, neither hangs."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_agree_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
        results = dict(results)
    assert results[0]["oom"] and results[1]["oom"]
    assert results[0]["peak_bytes"] == results[1]["peak_bytes"] == 900 * MB
    assert results[0]["note"] == "on another rank" and results[1]["note"] == "CUDA out of memory"


def test_two_ranks_on_cpu_when_one_runs_out(tmp_path):
    """Two DDP ranks launched as torchrun would; rank 1's trial processes have a small heap cap, so from
    some size on only rank 1 runs out. Rank 0's trial is then stuck in (or broken by) DDP's all-reduce with
    a rank that is gone: it is stopped, counted as out of memory too, and both ranks choose the same size
    without hanging."""
    import subprocess
    import sys

    from conftest import free_port, subprocess_env

    port = free_port()
    model = ["model.n_layer=2", "model.n_head=2", "model.n_embd=128", "model.block_size=128", "model.vocab_size=4096", "model.tokenizer_vocab_size=4096"]
    command = [sys.executable, "-m", "dist_gpt.autotune_batch", "--config", "bible-tiny", "--strategy", "ddp", "--memory-budget-gb", "2",
               "--trial-steps", "2", "train.device=cpu", "train.dtype=fp32", "train.global_batch_size=128", *model]
    common = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", DIST_GPT_CACHE=str(tmp_path))
    ranks = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=subprocess_env(**common, RANK=str(r), LOCAL_RANK=str(r), **({"DIST_GPT_TRIAL_DATA_LIMIT_MB": "470"} if r else {})))
             for r in range(2)]
    outputs = [rank.communicate(timeout=600)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert "another rank ran out of memory" in outputs[0]  # rank 0 printed the table: its trials were stopped
    choice = next(line for line in outputs[0].splitlines() if line.startswith("choice:"))
    assert "x world 2 = global batch 128" in choice
    cached = json.loads(next(tmp_path.glob("autotune/*.json")).read_text())["outcome"]
    assert any(row["result"]["oom"] for row in cached["tried"]) and cached["largest"] < 64


# ============================================================================ the choice


def test_choice_keeps_the_global_batch():
    device = SimulatedDevice(per_sample_mb=500 / 37.5)  # largest fitting: 37
    outcome = tune(device, limit_bytes=LIMIT, start=37, global_batch=480, world_size=1)
    assert outcome.largest == 37
    assert (outcome.micro_batch, outcome.grad_accum, outcome.global_batch) == (32, 15, 480)
    assert "37 does not divide" in outcome.notes[0] and "train.global_batch_size=481" in outcome.notes[0]

    on_two = tune(SimulatedDevice(per_sample_mb=500 / 37.5), limit_bytes=LIMIT, start=37, global_batch=480, world_size=2)
    assert (on_two.micro_batch, on_two.grad_accum, on_two.global_batch) == (30, 8, 480)  # 240 per rank

    free = tune(SimulatedDevice(), limit_bytes=LIMIT, start=50, global_batch=0, world_size=4)
    assert (free.micro_batch, free.grad_accum, free.global_batch) == (50, 1, 200)

    with pytest.raises(UserError, match="not divisible by the world size"):
        tune(SimulatedDevice(), limit_bytes=LIMIT, start=50, global_batch=100, world_size=3)


def test_throughput_objective_takes_the_fastest_and_tries_checkpointing():
    device = SimulatedDevice(fastest=20)  # speed peaks at 20 although 50 fits
    outcome = tune(device, limit_bytes=LIMIT, start=50, objective="throughput")
    assert outcome.largest == 50 and 15 <= outcome.micro_batch <= 30
    assert "fastest" in outcome.notes[-1]

    linear = SimulatedDevice()  # faster with every sample; checkpointing fits 3x more at 80% of the speed
    outcome = tune(linear, limit_bytes=LIMIT, start=50, objective="throughput", checkpointing_start=150)
    assert outcome.checkpointing and outcome.micro_batch == 150
    assert any(row.checkpointing for row in outcome.tried) and any(not row.checkpointing for row in outcome.tried)


def test_budget_below_micro_batch_one_says_what_would_fit():
    config = from_dict({"model": {"preset": "gpt2"}, "train": {"device": "cpu"}})
    runner = types.SimpleNamespace(micro_steps=lambda b: 1, overhead_bytes=300 * MB, global_batch=0)
    model = RunMemoryModel(config, DistEnv(), "single", runner)
    budget = model(1, False) * 0.9  # micro-batch 1 needs ~10% more than the budget
    limit = budget * 0.92
    device = SimulatedDevice(base_mb=model(1, False) / MB - 1, per_sample_mb=1)

    with pytest.raises(UserError) as error:
        tune(device, limit_bytes=limit, start=4, nothing_fits=lambda search: nothing_fits_message(search, limit, budget, 0.08, model, config))
    message = str(error.value)
    assert "\n" not in message and "micro-batch 1 needs" in message
    for way_out in ("parallel.activation_checkpointing=true", "model.block_size=512", "zero3-offload"):
        assert way_out in message
    assert "(fits)" in message  # ZeRO-3 offload frees the ~1.5 GB of fp32 states and moments


# ============================================================================ the memory model


@pytest.mark.parametrize("shape", [dict(), dict(position="learned"), dict(bias=False), dict(bias=False, position="learned"), dict(tie_embeddings=False)])
def test_parameter_count_matches_the_model(shape):
    config = GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, vocab_size=512, tokenizer_vocab_size=512, **shape)
    assert memory.param_count(config) == GPT(config).num_params(non_embedding=False)


def saved_tensor_bytes(module: torch.nn.Module, x: torch.Tensor, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves during module(x), parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        module(x)
    return sum(storages.values())


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("attn_backend", ["auto", "math"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_block_activations_byte_for_byte(position, attn_backend, dtype, dropout):
    """The per-block arithmetic of memory.block_activation_bytes against what autograd really saves on CPU."""
    B, T, C, H = 2, 64, 64, 2
    config = GPTConfig(n_layer=1, n_head=H, n_embd=C, block_size=T, vocab_size=512, tokenizer_vocab_size=512,
                       position=position, attn_backend=attn_backend, dropout=dropout)
    autocast = dtype == "bf16"
    block = Block(config).train()
    measured = saved_tensor_bytes(block, torch.randn(B, T, C, requires_grad=True), autocast)
    assert memory.block_activation_bytes(config, B * T, 2 if autocast else 4, 4, "cpu", autocast) == measured


@needs_cuda
@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("attn_backend", ["flash", "efficient", "math"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_block_activations_byte_for_byte_cuda(position, attn_backend, dropout):
    """The same on CUDA under bf16 autocast, for each attention kernel."""
    B, T, C, H = 2, 128, 128, 2
    config = GPTConfig(n_layer=1, n_head=H, n_embd=C, block_size=T, vocab_size=512, tokenizer_vocab_size=512,
                       position=position, attn_backend=attn_backend, dropout=dropout)
    block = Block(config).cuda().train()
    measured = saved_tensor_bytes(block, torch.randn(B, T, C, device="cuda", requires_grad=True), autocast=True)
    # the fused kernels also save their RNG seed and offset (and the like): a few scalars, not modelled
    assert memory.block_activation_bytes(config, B * T, 2, 4, "cuda", True) == pytest.approx(measured, abs=64)


def test_strategies_divide_what_they_shard():
    config = GPTConfig()  # GPT-2 124M
    P = memory.param_count(config)

    def states(strategy, world=8, offload=False, dtype="bf16"):
        b = memory.predict(config, 4, strategy, world, dtype, offload=offload, overhead_bytes=0)
        return b.params, b.optimizer_states

    assert states("ddp") == states("single") == (4 * P, 8 * P)  # replicated, fp32 under autocast
    assert states("zero1") == (2 * P, 16 * P // 8)  # bf16 params; fp32 master + grads + moments sharded
    assert states("zero3")[0] == 2 * P // 8
    assert states("zero2", offload=True)[1] == 0 and states("zero3", offload=True) == (0, 0)
    assert states("fsdp") == (4 * P // 8, 8 * P // 8)
    assert states("fsdp", offload=True) == (0, 0)
    gathered = memory.predict(config, 4, "fsdp-no-reshard", 8, "bf16", overhead_bytes=0).output_layer
    resharded = memory.predict(config, 4, "fsdp", 8, "bf16", overhead_bytes=0).output_layer
    assert gathered - resharded == pytest.approx(2 * (P - memory.root_params(config) - 2 * memory.block_params(config)), rel=0.01)
    # checkpointing and bf16 shrink activations; the math kernel's T x T scores grow them
    acts = {k: memory.predict(config, 8, "single", 1, **kw, overhead_bytes=0).activations for k, kw in {
        "fp32": dict(dtype="fp32"), "bf16": dict(dtype="bf16"), "ckpt": dict(dtype="bf16", activation_checkpointing=True)}.items()}
    assert acts["ckpt"] < acts["bf16"] < acts["fp32"]
    math = memory.predict(dataclasses.replace(config, attn_backend="math"), 8, "single", 1, "bf16", overhead_bytes=0).activations
    L, B, H, T, C = 12, 8, 12, 1024, 768
    scores = L * B * H * T * T * 2  # bf16 probabilities, T x T per head
    flash_only = L * (B * T) * (3 * C * 2 + 4 * H)  # RoPE's rotated q, k and the separate output copy; the log-sum-exp
    assert math - acts["bf16"] == scores - flash_only


def test_largest_fitting_and_table():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=128, vocab_size=4096, tokenizer_vocab_size=4096)
    budget = memory.predict(config, 37, overhead_bytes=500 * MB).total + 1
    assert memory.largest_fitting(budget, config, overhead_bytes=500 * MB) == 37
    assert memory.largest_fitting(100 * MB, config, overhead_bytes=500 * MB) == 0
    text = memory.predict(config, 37, overhead_bytes=500 * MB).table()
    assert "activations" in text and "total" in text and "micro-batch 37" in text
    assert "total" in memory.table([memory.predict(config, b, overhead_bytes=0) for b in (1, 2)])


# ============================================================================ measured on CPU

def _load_benchmark():
    """benchmarks/memory_model.py: its calibration shapes and live-tensor measurement are the ones tested here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_model_benchmark", REPO / "benchmarks" / "memory_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load_benchmark()
SHAPES = benchmark.CALIBRATION  # RoPE + chunked loss, learned positions + plain loss; 3 sizes each
# For the whole tuning: activations dominate (~27 MB per sequence), the loss's buffers are small, so the
# boundary between two sizes is well clear of the resident peak's run-to-run noise (~1%).
TUNED_SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=4096, tokenizer_vocab_size=4096)


def cpu_config(name: str):
    return benchmark.calibration_config(name) if name in SHAPES else from_dict({"name": name, "model": TUNED_SHAPE, "train": {"device": "cpu"}})


@pytest.mark.parametrize("name", SHAPES)
def test_live_tensor_peak_matches_the_profiler(name):
    """The tensor terms alone (no overhead, no heap slack) against the profiler's allocation events."""
    config = cpu_config(name)
    for size in SHAPES[name][1][:2]:
        predicted = memory.predict(config.model.gpt_config(), size, device="cpu", overhead_bytes=0).tensors
        assert predicted == pytest.approx(benchmark.live_tensor_peak(config, size), rel=0.03), f"{name} micro-batch {size}"


@pytest.mark.parametrize("name", SHAPES)
def test_memory_model_within_15_percent_of_measured_cpu_peak(name):
    """Predicted vs measured peak resident set (fresh process per size, real training steps)."""
    config = cpu_config(name)
    for breakdown, result in measure_sizes(config, DistEnv(), "single", SHAPES[name][1], steps=2):
        measured = result.peak_bytes
        if abs(breakdown.total / measured - 1) > 0.15:
            # The heap's layout varies from run to run (a large buffer placed above another instead of in its
            # hole: seen up to +17% with the plain loss's N x V buffers): an outlier is judged by the median of 3.
            again = measure_sizes(config, DistEnv(), "single", [breakdown.micro_batch] * 2, steps=2)
            measured = statistics.median([measured, *(r.peak_bytes for _, r in again)])
        assert breakdown.total == pytest.approx(measured, rel=0.15), f"{name} micro-batch {breakdown.micro_batch}: {breakdown.table()}"


def test_tuning_on_cpu_picks_the_largest_that_fits_and_caches(tmp_path, monkeypatch):
    """A whole tuning against a RAM budget. The pick, re-measured in a fresh process, stays under the budget;
    the next size up was measured over the limit by the search, and re-measured it is over it too, up to
    the resident peak's run-to-run noise (a 2-3% spread on this shape, with rarer outliers to +5%: the
    headroom is there for it). A second tuning reads the cache."""
    monkeypatch.setenv("DIST_GPT_CACHE", str(tmp_path))
    config = cpu_config("tuned")
    env = DistEnv()
    # A budget the model puts at micro-batch ~12: the search must find the real boundary around it.
    runner = types.SimpleNamespace(micro_steps=lambda b: 1, overhead_bytes=memory.idle_process_bytes(), global_batch=0)
    budget = RunMemoryModel(config, env, "single", runner)(12, False) / 0.92
    report = autotune(config, env, "single", budget_bytes=budget, steps=2)
    limit = budget * 0.92
    pick = report.outcome.micro_batch
    assert report.from_cache is None and 2 <= report.trials <= 8
    searched = {row.micro_batch: row for row in report.outcome.tried}
    assert searched[pick].fits and not searched[pick + 1].fits
    (_, at_pick), (_, next_up) = measure_sizes(config, env, "single", [pick, pick + 1], steps=2)
    assert at_pick.peak_bytes <= budget
    assert next_up.peak_bytes > limit * 0.95
    text = report.render()
    assert f"train.micro_batch_size={pick}" in text and "over limit" in text

    again = autotune(config, env, "single", budget_bytes=budget, steps=2)
    assert again.from_cache is not None and again.outcome.micro_batch == pick and "used the cached result" in again.render()
    assert json.loads(again.from_cache.read_text())["key"]["world_size"] == 1


def test_cli_budget_too_small_is_one_line(tmp_path):
    proc = run_python(["-m", "dist_gpt.autotune_batch", "--config", "bible-tiny", "--memory-budget-gb", "0.05", "train.device=cpu"],
                      check=False, DIST_GPT_CACHE=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: micro-batch 1") and len(proc.stderr.strip().splitlines()) == 1


def test_trainer_with_auto_micro_batch(tiny_data, tmp_path):
    """train.micro_batch_size=auto through the trainer: tuned, recorded in the run directory, trained."""
    overrides = tiny_overrides(tiny_data, tmp_path / "out", train__micro_batch_size="auto", train__memory_budget_gb=1.0,
                               train__global_batch_size=8, train__max_steps=2, train__device="cpu")
    proc = run_python(["launch/train.py", "--config", "bible-tiny", *overrides], DIST_GPT_CACHE=str(tmp_path / "cache"))
    assert "choice: micro-batch" in proc.stdout
    chosen = json.loads((tmp_path / "out" / "run" / "autotune.json").read_text())
    assert 8 % chosen["micro_batch"] == 0 and chosen["global_batch"] == 8


# ============================================================================ measured on CUDA (skipped without a GPU)


@needs_cuda
@pytest.mark.parametrize("strategy", ["single", "fsdp"])
def test_memory_model_within_15_percent_on_cuda(strategy):
    """GPT-2 124M in bf16: predicted vs torch.cuda.max_memory_allocated (+ the measured context)."""
    config = from_dict({"model": {"preset": "gpt2"}, "train": {"device": "cuda", "dtype": "bf16"}, "parallel": {"strategy": strategy}})
    env = DistEnv(device=torch.device("cuda", 0), compute_dtype=torch.bfloat16)
    for breakdown, result in measure_sizes(config, env, strategy, [1, 8, 32], steps=2):
        assert breakdown.total == pytest.approx(result.peak_bytes, rel=0.15), breakdown.table()


@needs_cuda
def test_cuda_out_of_memory_is_caught_and_cleaned_up():
    """A budget emulated with set_per_process_memory_fraction: a size past it runs out, is retried once, and
    leaves nothing allocated; the next trial runs normally."""
    from dist_gpt.autotune import TrialRunner

    config = from_dict({"model": {"preset": "gpt2"}, "train": {"device": "cuda", "dtype": "bf16"}})
    env = DistEnv(device=torch.device("cuda", 0), compute_dtype=torch.bfloat16)
    runner = TrialRunner(config, env, "single", budget_bytes=8 * memory.GB, global_batch=0, steps=2)
    assert runner.in_process
    too_big = runner(64)
    assert too_big.oom and torch.cuda.memory_allocated() == 0
    fits = runner(1)
    assert not fits.oom and 0 < fits.peak_bytes < 8 * memory.GB
    search = search_largest(runner, 8 * memory.GB * 0.92, 64, 256)
    assert 1 <= search.largest < 64 and torch.cuda.memory_allocated() == 0


def test_the_logged_peak_is_trainings_not_the_autotuners(monkeypatch):
    """On CUDA the trials run in this process (OOM attempts too): their peak must not become every log line's.
    Here a stand-in tuner touches 400 MB and frees it, as an in-process trial does; after the micro-batch is
    resolved the process's peak (the resident high-water mark on CPU) is back near what it holds now."""
    from dist_gpt import autotune
    from dist_gpt.runtime.metrics import memory_stats
    from dist_gpt.train.run import resolve_micro_batch_size

    def trials(config, env, strategy_name):
        torch.ones(100 * 2**20).sum()  # 400 MB, freed on return
        return 4

    monkeypatch.setattr(autotune, "autotune_for_training", trials)
    config = from_dict({"train": {"micro_batch_size": "auto", "device": "cpu"}})
    before = memory_stats(torch.device("cpu"))["mem_rss_mb"]
    assert resolve_micro_batch_size(config, DistEnv()) == 4
    assert memory_stats(torch.device("cpu"))["mem_peak_rss_mb"] < before + 200


@pytest.mark.parametrize("setting", [True, "auto"])
def test_a_trial_builds_what_training_builds(monkeypatch, setting):
    """The trials size training: they keep train.compile (auto decides the same way for both) and, on CUDA, run
    fp32 matmuls in TF32 as training does (a subprocess trial never passes through init_distributed)."""
    from dist_gpt.autotune import measure

    class Built(Exception):
        pass

    def build(config, env, batch):
        raise Built(config.train.compile, torch.get_float32_matmul_precision())

    monkeypatch.setattr(measure, "build", build)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        config = from_dict({"train": {"compile": setting}})
        with pytest.raises(Built) as built:
            measure._timed_steps(config, DistEnv(device=torch.device("cuda")), 2, 1, 1)  # a CUDA run's trial, built no further
        assert built.value.args == (setting, "high")
    finally:
        torch.set_float32_matmul_precision(before)
