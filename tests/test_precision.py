"""Numerics: the dtype decision per GPU generation, fp16 with dynamic loss scaling (overflow skips, tracking fp32,
the scaler in checkpoints, agreed over FSDP ranks), DeepSpeed's fp16 section, and compile == eager.

fp16 runs on CPU (autocast and GradScaler("cpu") exist there), slowly: the models here have a 256-token vocabulary
so that the fp16 output layer stays cheap."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO, needs_cuda, read_jsonl, subprocess_env

from dist_gpt.checkpoint.checkpointer import Checkpointer
from dist_gpt.config import from_dict, load_config
from dist_gpt.data.synthetic import synthetic_tokens, write_synthetic_dataset
from dist_gpt.engine.build import compile_blocks, make_optimizer_factory, wants_compile
from dist_gpt.engine.step import FP16_OVERFLOW, NON_FINITE, accumulate_gradients, apply_update, train_step
from dist_gpt.engine.step_guard import DivergenceGuard
from dist_gpt.errors import UserError
from dist_gpt.model import GPT
from dist_gpt.parallel import BatchShape, build_strategy
from dist_gpt.parallel.deepspeed import DeepSpeedStrategy, load_ds_config, resolve_ds_config
from dist_gpt.runtime.distributed import DistEnv, init_distributed
from dist_gpt.runtime.precision import MIN_LOSS_SCALE, DeviceFacts, LossScaler, choose_dtype, dtype_notice

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256, tokenizer_vocab_size=256)
FP16_LOSS_REL_TOL = 5e-4  # fp16 vs fp32 over 8 steps of this model: measured 3e-5 (bf16: 1e-4)


# ------------------------------------------------------------------------------------------ the dtype decision


@pytest.mark.parametrize(
    "capability, gpu, want",
    [
        ((6, 0), "Tesla P100", torch.float16),
        ((7, 0), "Tesla V100", torch.float16),
        ((7, 5), "Tesla T4", torch.float16),
        ((8, 0), "A100", torch.bfloat16),
        ((8, 6), "RTX 3090", torch.bfloat16),
        ((8, 9), "L4", torch.bfloat16),
        ((9, 0), "H100", torch.bfloat16),
        ((10, 0), "B200", torch.bfloat16),
        ((12, 0), "RTX 5090", torch.bfloat16),
    ],
)
def test_auto_dtype_per_compute_capability(capability, gpu, want):
    # is_bf16_supported() says True on a T4 too (emulated): only compute capability >= 8.0 counts as native.
    assert choose_dtype("auto", DeviceFacts("cuda", gpu, capability, bf16_reported=True)) == want


def test_auto_dtype_off_cuda_and_when_torch_reports_no_native_bf16():
    assert choose_dtype("auto", DeviceFacts("cpu")) == torch.float32
    assert choose_dtype("auto", DeviceFacts("mps")) == torch.float32
    assert choose_dtype("auto", DeviceFacts("cuda", "A100", (8, 0), bf16_reported=False)) == torch.float16
    assert choose_dtype("fp16", DeviceFacts("cuda", "H100", (9, 0), True)) == torch.float16
    assert choose_dtype("fp32", DeviceFacts("cuda", "T4", (7, 5), True)) == torch.float32


ZEN4_FLAGS = "flags\t\t: fpu vme sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
SKYLAKE_FLAGS = "flags\t\t: fpu vme sse2 avx2 avx512f avx512bw avx512_vnni"
SAPPHIRE_RAPIDS_FLAGS = "flags\t\t: fpu avx512f avx512_fp16 amx_bf16 amx_tile amx_int8"


def test_auto_is_bf16_autocast_on_cpus_with_bf16_matmul_instructions():
    """AVX512-BF16 or AMX: bf16 matmuls at ~2x fp32 (bible-seed trains 1.65x faster here); without, fp32."""
    from dist_gpt.runtime.precision import cpu_has_native_bf16, dtype_description

    assert cpu_has_native_bf16(ZEN4_FLAGS) and cpu_has_native_bf16(SAPPHIRE_RAPIDS_FLAGS) and not cpu_has_native_bf16(SKYLAKE_FLAGS)
    assert choose_dtype("auto", DeviceFacts("cpu", bf16_reported=True)) == torch.bfloat16
    assert choose_dtype("auto", DeviceFacts("cpu", bf16_reported=False)) == torch.float32
    assert choose_dtype("fp32", DeviceFacts("cpu", bf16_reported=True)) == torch.float32
    assert DeviceFacts.of(torch.device("cpu")).native_bf16 == cpu_has_native_bf16()  # this machine, as detected
    assert dtype_description("auto", torch.bfloat16, "cpu") == "bf16 autocast (auto: this CPU has native bf16)"
    assert dtype_description("auto", torch.float32, "cpu") == "fp32 (auto: this CPU has no native bf16)"
    assert dtype_description("fp16", torch.float16, "cuda") == "fp16 + loss scaling"


def test_bf16_on_a_gpu_without_native_bf16_is_one_clear_error():
    with pytest.raises(UserError) as e:
        choose_dtype("bf16", DeviceFacts("cuda", "Tesla T4", (7, 5), bf16_reported=False))
    message = str(e.value)
    assert "\n" not in message and "Tesla T4" in message and "7.5" in message and "train.dtype=fp16" in message


def test_fp16_on_cpu_is_allowed_with_a_note_and_compile_auto_follows_the_device():
    assert choose_dtype("fp16", DeviceFacts("cpu")) == torch.float16
    assert "slowly" in dtype_notice(torch.float16, "cpu") and dtype_notice(torch.bfloat16, "cuda") is None
    assert wants_compile("auto", torch.device("cuda", 0)) and not wants_compile("auto", torch.device("cpu"))
    assert wants_compile(True, torch.device("cpu")) and not wants_compile(False, torch.device("cuda", 0))
    assert load_config("bible-tiny", ["train.compile=false"]).train.compile is False
    cuda = torch.device("cuda", 0)
    for ds, compiles in (("zero2", True), ("zero3", False), ("zero3-offload", False)):  # ZeRO-3's hooks break the graphs
        config = load_config("bible-tiny", [f"parallel.ds_config={REPO / 'ds_configs' / ds}.json"])
        assert wants_compile("auto", cuda, DeepSpeedStrategy(config, DistEnv())) is compiles
        assert wants_compile(True, cuda, DeepSpeedStrategy(config, DistEnv()))
    with pytest.raises(UserError, match="train.compile='sometimes' must be auto, true or false"):
        load_config("bible-tiny", ["train.compile=sometimes"])


# ------------------------------------------------------------------------------------------ fp16 loss scaling


def tiny_strategy(dtype: torch.dtype, *overrides: str, env: DistEnv | None = None, tmp_path=None, make_optimizer=None):
    model = [f"model.{k}={v}" for k, v in SHAPE.items()]
    config = load_config("bible-tiny", [*model, "train.lr=3e-3", "train.device=cpu", f"train.out_dir={tmp_path or 'out'}", *overrides])
    env = env or DistEnv(compute_dtype=dtype)
    strategy = build_strategy(config, env)
    torch.manual_seed(0)
    strategy.wrap(GPT(config.model.gpt_config()), make_optimizer or make_optimizer_factory(config, env.device), BatchShape(8, 1))
    return strategy


def batches(n: int, micro: int = 8, seed: int = 0):
    tokens = torch.from_numpy(synthetic_tokens(20_000, 256).astype("int64"))
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        rows = torch.stack([tokens[s : s + 33] for s in torch.randint(0, len(tokens) - 33, (micro,), generator=g)])
        yield rows[:, :-1], rows[:, 1:]


def train_steps(strategy, steps: int, seed: int = 0, overflow_at: int | None = None) -> list[float]:
    losses = []
    for step, (x, y) in enumerate(batches(steps, seed=seed)):
        losses.append(strategy.forward_backward(x, y, 1.0, sync_grads=True).item())
        if step == overflow_at:
            with torch.no_grad():
                next(strategy.model.parameters()).grad.view(-1)[0] = math.inf  # as an fp16 overflow leaves it
        strategy.clip_and_step(1.0)
    return losses


def parameters(strategy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in strategy.model.parameters()]


def test_fp16_losses_track_fp32(one_thread):
    fp32 = train_steps(tiny_strategy(torch.float32), 8)
    fp16 = tiny_strategy(torch.float16)
    losses = train_steps(fp16, 8)
    assert fp16.loss_scale_stats() == {"loss_scale": 65536.0, "overflow_skips": 0}
    assert fp32[-1] < fp32[0] - 0.3  # it learns, so "tracking" compares a moving loss
    for a, b in zip(fp32, losses):
        assert abs(a - b) / a < FP16_LOSS_REL_TOL


def test_forced_overflow_skips_exactly_that_step_and_lowers_the_scale(one_thread):
    strategy = tiny_strategy(torch.float16)
    optimizer_state = lambda: next(iter(strategy.optimizer.state.values()))["step"].item()  # noqa: E731
    train_steps(strategy, 2)
    before = parameters(strategy)
    train_steps(strategy, 1, seed=1, overflow_at=0)  # this step's gradients overflow
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(strategy)))  # no update at all
    assert optimizer_state() == 2  # AdamW did not count the skipped step
    assert strategy.loss_scale_stats() == {"loss_scale": 32768.0, "overflow_skips": 1}
    train_steps(strategy, 1, seed=2)  # the next one steps again, at the lowered scale
    assert not all(torch.equal(a, b) for a, b in zip(before, parameters(strategy)))
    assert optimizer_state() == 3 and strategy.loss_scale_stats() == {"loss_scale": 32768.0, "overflow_skips": 1}


def test_fp16_overflow_is_not_divergence_until_the_scale_reaches_one(one_thread):
    """issue 10's guard counts non-finite steps; an fp16 overflow is the scaler's business, unless even a loss
    scale of 1 (MIN_LOSS_SCALE) overflows: then nothing scaling can do helps, and it is divergence."""
    strategy = tiny_strategy(torch.float16)
    data = batches(4)
    guard = DivergenceGuard(max_consecutive=2)

    def overflowing_step():
        loss = accumulate_gradients(strategy, lambda: next(data), 1)
        with torch.no_grad():
            next(strategy.model.parameters()).grad.view(-1)[0] = math.inf
        result = apply_update(strategy, loss, 1.0)
        guard.record(result)
        return result

    assert overflowing_step().skip_reason == FP16_OVERFLOW and guard.consecutive == 0 and guard.total == 0
    strategy.scaler.grad_scaler.update(new_scale=MIN_LOSS_SCALE)
    assert overflowing_step().skip_reason == NON_FINITE and guard.consecutive == 1
    assert overflowing_step().skip_reason == NON_FINITE and guard.diverged
    assert strategy.loss_scale_stats()["overflow_skips"] == 3


def test_disabled_scaler_is_a_pass_through_with_empty_state():
    scaler = LossScaler(False, torch.device("cpu"))
    loss = torch.tensor(2.0)
    assert scaler.scale(loss) is loss and scaler.state_dict() == {} and scaler.stats() == {}
    scaler.load_state_dict({"scale": 8.0, "growth_tracker": 1, "overflow_skips": 3})  # an fp16 run's, resumed in bf16
    assert scaler.state_dict() == {}


def test_scaler_state_survives_a_checkpoint_round_trip_bit_exactly(tmp_path, one_thread):
    """Through the real Checkpointer (the scaler is a part like the loader: JSON in the manifest), then the
    resumed run continues exactly as the uninterrupted one."""
    straight = tiny_strategy(torch.float16, tmp_path=tmp_path)
    train_steps(straight, 3, overflow_at=1)  # a scale and growth tracker that are not the initial ones
    saver = Checkpointer(straight.config, straight.env, straight, {"loss_scaler": straight.scaler})
    saver.save(3)
    manifest = json.loads((tmp_path / "bible-tiny" / "checkpoints" / "step_000003" / "manifest.json").read_text())
    assert manifest["parts"]["loss_scaler"] == {"scale": 32768.0, "growth_tracker": 1, "overflow_skips": 1}

    resumed = tiny_strategy(torch.float16, tmp_path=tmp_path)
    Checkpointer(resumed.config, resumed.env, resumed, {"loss_scaler": resumed.scaler}).load(tmp_path / "bible-tiny" / "checkpoints" / "step_000003")
    train_steps(resumed, 1, seed=5)  # the lazily made scale tensor comes from the loaded state
    train_steps(straight, 1, seed=5)
    a, b = straight.scaler.grad_scaler, resumed.scaler.grad_scaler
    assert torch.equal(a._scale, b._scale) and torch.equal(a._growth_tracker, b._growth_tracker)
    assert a._scale.item() == 32768.0 and a._growth_tracker.item() == 2
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    assert all(torch.equal(p, q) for p, q in zip(parameters(straight), parameters(resumed)))


# ------------------------------------------------------------------------------------------ FSDP: 2 ranks agree


def _fsdp_overflow_on_one_rank(rank: int, world: int, store_path: str, results) -> None:
    """Rank 0 alone finds an inf in its gradient shard; both ranks must skip the step and halve the scale."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    env = DistEnv(rank=rank, world_size=world, compute_dtype=torch.float16)
    outcome = {}
    try:
        for fused in (False, True):  # foreach AdamW (what CPU runs) and fused AdamW (what CUDA runs: no host sync)
            factory = lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused or None)  # noqa: E731
            strategy = tiny_strategy(torch.float16, "parallel.strategy=fsdp", env=env, make_optimizer=factory)
            x, y = next(batches(1, micro=2, seed=rank))
            strategy.forward_backward(x, y, 1.0, sync_grads=True)
            before = [p.to_local().clone() for p in strategy.model.parameters()]
            if rank == 0:
                with torch.no_grad():
                    next(strategy.model.parameters()).grad.to_local().view(-1)[0] = math.inf
            strategy.clip_and_step(1.0)
            unchanged = all(torch.equal(a, p.to_local()) for a, p in zip(before, strategy.model.parameters()))
            outcome[f"fused={fused}"] = (unchanged, strategy.loss_scale_stats())
    finally:
        dist.destroy_process_group()
    results.put((rank, outcome))


def test_fsdp_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    procs = [context.Process(target=_fsdp_overflow_on_one_rank, args=(r, 2, str(tmp_path / "store"), results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    outcomes = dict(results.get() for _ in procs)
    want = (True, {"loss_scale": 32768.0, "overflow_skips": 1})
    assert outcomes[0] == outcomes[1] == {"fused=False": want, "fused=True": want}


# ------------------------------------------------------------------------------------------ through torchrun


@pytest.fixture(scope="module")
def small_vocab_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("synthetic256")
    write_synthetic_dataset(data, 40_000, vocab_size=256)
    return data


def launch(launcher: list[str], data, out, run_name: str, *overrides: str) -> list[dict]:
    model = [f"model.{k}={v}" for k, v in SHAPE.items()]
    args = [*launcher, str(REPO / "launch" / "train.py"), "--config", "bible-tiny", *model, f"data.dir={data}", f"train.out_dir={out}",
            f"train.run_name={run_name}", "train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=4", "train.warmup_steps=2",
            "train.lr=3e-3", "train.eval_every=0", "train.eval_batches=2", "train.device=cpu", "logging.log_every=1", *overrides]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [r for r in read_jsonl(out / run_name / "metrics.jsonl") if "loss" in r]


def test_fp16_under_fsdp_through_torchrun_tracks_fp32(small_vocab_data, tmp_path):
    """2 ranks, FSDP2 with an fp16 MixedPrecisionPolicy and the GradScaler, against one fp32 process with the
    same global batch. (DDP's fp16 is the single-device path plus DDP's all-reduce; FSDP is the one whose
    gradients are DTensor shards.)"""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    reference = launch([sys.executable], small_vocab_data, tmp_path, "fp32", "train.dtype=fp32")
    records = launch(torchrun, small_vocab_data, tmp_path, "fsdp", "train.dtype=fp16", "parallel.strategy=fsdp")
    assert [r["step"] for r in records] == list(range(1, 5))
    for want, got in zip(reference, records):
        assert abs(got["loss"] - want["loss"]) / want["loss"] < FP16_LOSS_REL_TOL, (want, got)
        assert got["loss_scale"] == 65536.0 and got["overflow_skips"] == 0  # in the log line and the JSONL


# ------------------------------------------------------------------------------------------ DeepSpeed's fp16 section


def resolve(ds: dict, dtype: torch.dtype, device: str = "cuda") -> dict:
    env = DistEnv(world_size=2, device=torch.device(device), compute_dtype=dtype)
    return resolve_ds_config(ds, from_dict({}), env, 4, 2, source="ds.json")


@pytest.mark.parametrize("name", ["zero0", "zero2", "zero3-offload"])
def test_deepspeed_fp16_auto_is_filled_from_the_run_dtype(name):
    ds = resolve(load_ds_config(str(REPO / "ds_configs" / f"{name}.json")), torch.float16)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000, "hysteresis": 1, "min_loss_scale": 1}
    assert ds["bf16"]["enabled"] is False and "auto" not in json.dumps(ds)
    assert resolve(load_ds_config(str(REPO / "ds_configs" / f"{name}.json")), torch.bfloat16)["fp16"]["enabled"] is False


def test_deepspeed_fp16_contradictions_and_cpu_are_one_line_errors():
    with pytest.raises(UserError, match=r"sets fp16.enabled=true but .* gives fp16 \(train.dtype=auto on cuda\)=false"):
        resolve({"fp16": {"enabled": True}}, torch.float32)
    with pytest.raises(UserError, match=r"sets bf16.enabled=true but .* gives bf16 \(train.dtype=auto on cuda\)=false"):
        resolve({"bf16": {"enabled": True}}, torch.float16)
    assert resolve({"fp16": {"enabled": "auto", "initial_scale_power": 12}}, torch.float16)["fp16"]["initial_scale_power"] == 12
    with pytest.raises(UserError, match="DeepSpeed refuses fp16 on CPU"):
        resolve({}, torch.float16, device="cpu")


# ------------------------------------------------------------------------------------------ compile


@pytest.mark.slow
def test_compiled_blocks_give_the_losses_of_eager(one_thread):
    """Per-block torch.compile with the chunked loss (eager, a custom autograd function) after it. One block
    and fp32: the cheapest graph that exercises it (a cold compile is ~20-30 s on CPU)."""
    eager = tiny_strategy(torch.float32, "model.n_layer=1")
    compiled = tiny_strategy(torch.float32, "model.n_layer=1")
    compile_blocks(compiled.unwrapped_model)
    a, b = train_steps(eager, 3), train_steps(compiled, 3)
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)


# ------------------------------------------------------------------------------------------ on a GPU


@needs_cuda
def test_cuda_dtype_auto_and_tf32():
    env = init_distributed("cuda", "auto")
    major, _ = torch.cuda.get_device_capability()
    assert env.compute_dtype == (torch.bfloat16 if major >= 8 else torch.float16)
    assert torch.get_float32_matmul_precision() == "high"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9 reads the same through its new API
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_a_step_waits_for_the_gpu_once(dtype):
    """No host synchronisation per micro-batch (forward, backward, the loss summed on the device), one per step:
    the gradient norm read to skip a non-finite step (with fp16, fused AdamW's overflow check stays on the device).
    torch's sync debug mode warns at every synchronising call."""
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no native bf16")
    env = DistEnv(device=torch.device("cuda", 0), compute_dtype=dtype)
    strategy = tiny_strategy(dtype, "train.device=cuda", env=env)
    data = iter([(x.cuda(), y.cuda()) for x, y in batches(12)])
    for _ in range(2):  # the first steps create the optimizer state and the scaler's tensors
        train_step(strategy, lambda: next(data), 3, 1.0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            results = [train_step(strategy, lambda: next(data), 3, 1.0) for _ in range(2)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 2, syncs
    assert all(math.isfinite(r.grad_norm) and not r.skipped for r in results)


@needs_cuda
def test_cuda_fp16_overflow_skips_with_fused_adamw():
    """On CUDA the fused AdamW reads the overflow flag itself (no host decision): the step is still skipped."""
    env = DistEnv(device=torch.device("cuda", 0), compute_dtype=torch.float16)
    strategy = tiny_strategy(torch.float16, "train.device=cuda", env=env)
    assert strategy.optimizer.defaults["fused"]
    data = [(x.cuda(), y.cuda()) for x, y in batches(3)]
    strategy.forward_backward(*data[0], 1.0, sync_grads=True)
    strategy.clip_and_step(1.0)
    before = parameters(strategy)
    strategy.forward_backward(*data[1], 1.0, sync_grads=True)
    with torch.no_grad():
        next(strategy.model.parameters()).grad.view(-1)[0] = math.inf
    strategy.clip_and_step(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(strategy)))
    assert strategy.loss_scale_stats() == {"loss_scale": 32768.0, "overflow_skips": 1}
    strategy.forward_backward(*data[2], 1.0, sync_grads=True)
    strategy.clip_and_step(1.0)
    assert not all(torch.equal(a, b) for a, b in zip(before, parameters(strategy)))
