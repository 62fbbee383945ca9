"""Every strategy trains the same model: for one seed, data set and global batch, single / DDP / FSDP /
DeepSpeed ZeRO 1-3 (and ZeRO-3 with CPU offload) log the same loss and gradient norm at each of 10 steps.

The runs go through the real launchers (torchrun, deepspeed) on CPU with gloo, 2 processes, and are compared
through what a user sees: RUN_DIR/metrics.jsonl. The single-process reference runs micro-batch 2 x grad-accum 4;
the 2-rank runs micro-batch 2 x grad-accum 2 x 2 ranks: the same 8 sequences per step (the loader deals one
global window stream out to the ranks), so the same losses up to float rounding.

Each launch runs once per session (cached) and each has a timeout: a sharded run that deadlocks fails, it
does not hang CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL, assert_transformers_computes, free_port, read_jsonl, subprocess_env

from dist_gpt.config import load_config
from dist_gpt.errors import UserError
from dist_gpt.model import GPT, GPTConfig
from dist_gpt.parallel import build_strategy, resolve_strategy_name
from dist_gpt.parallel.base import apply_activation_checkpointing
from dist_gpt.parallel.deepspeed import SKIP_SHM_BUILD_ENV, load_ds_config, resolve_ds_config
from dist_gpt.runtime.distributed import DistEnv, pick_backend

TIMEOUT_S = 300  # per launch; a healthy one takes 10-40 s on 2 busy cores
STEPS = 10
LOSS_REL_TOL = 1e-4
# The gradient norm is looser: sharded runs sum squares in another order (1e-6 apart at step 1), and AdamW
# turns rounding-level differences in near-zero gradient entries into lr-sized updates of those entries, which
# the norm sees and the loss hardly does. Seen: up to 3e-4 apart by step 10 (FSDP, ZeRO) with losses 2e-7 apart.
GRAD_NORM_REL_TOL = 1e-3

TRAIN_OVERRIDES = TINY_MODEL + [
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    f"train.max_steps={STEPS}",
    "train.warmup_steps=3",
    "train.lr=3e-3",
    "train.grad_clip=1.0",  # clipping is active at these norms (~1-2): the strategies must clip alike
    "train.eval_every=0",
    "train.eval_batches=3",  # 6 windows: 3 per rank on 2 ranks, in batches of 2 and 1
    "train.device=cpu",
    "train.dtype=fp32",
    "logging.log_every=1",
    "checkpoint.resume=never",
]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # = `torchrun`


def deepspeed_launcher() -> list[str]:
    exe = Path(sys.executable).with_name("deepspeed")
    return [str(exe) if exe.exists() else "deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]


# name -> (launcher, ds_config, overrides). Variants ride on runs that exist anyway, to keep the launches few:
# the 1-process FSDP run also checks reshard_after_forward=False, activation checkpointing and CPU offload; ZeRO-3 runs
# with activation checkpointing (the recompute in backward must find the parameters gathered again).
RUNS = {
    "single": (lambda: [sys.executable], None, []),
    "ddp": (lambda: TORCHRUN, None, ["parallel.strategy=ddp"]),
    "fsdp": (lambda: TORCHRUN, None, ["parallel.strategy=fsdp"]),
    "fsdp-1proc": (lambda: [sys.executable], None, ["parallel.strategy=fsdp", "parallel.fsdp_reshard_after_forward=false", "parallel.activation_checkpointing=true", "parallel.fsdp_cpu_offload=true"]),
    "zero1": (deepspeed_launcher, "zero1", []),
    "zero2": (deepspeed_launcher, "zero2", []),
    "zero3+ac": (deepspeed_launcher, "zero3", ["parallel.activation_checkpointing=true"]),
    "zero3-offload": (deepspeed_launcher, "zero3-offload", []),
}



@dataclass
class Run:
    name: str
    returncode: int
    output: str
    records: list[dict]

    def steps(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    def check_ok(self) -> None:
        assert self.returncode == 0, f"{self.name} exited with {self.returncode}:\n{self.output[-4000:]}"
        assert [r["step"] for r in self.steps()] == list(range(1, STEPS + 1)), f"{self.name} logged steps {[r['step'] for r in self.steps()]}"


class Launcher:
    """Runs each configuration once per session, on demand."""

    def __init__(self, data_dir: Path, out_dir: Path):
        self.data_dir, self.out_dir = data_dir, out_dir
        self.done: dict[str, Run] = {}

    def __call__(self, name: str) -> Run:
        if name not in self.done:
            launcher, ds_config, overrides = RUNS[name]
            flags = ["--config", "bible-tiny"] + (["--ds_config", f"ds_configs/{ds_config}.json"] if ds_config else [])
            run_overrides = [f"data.dir={self.data_dir}", f"train.out_dir={self.out_dir}", f"train.run_name={name}"]
            cmd = [*launcher(), "launch/train.py", *flags, *TRAIN_OVERRIDES, *overrides, *run_overrides]
            # OMP_NUM_THREADS=1 (in subprocess_env): 2 ranks on 2 cores, and the deepspeed launcher does not set it.
            # DS_ACCELERATOR=cpu: the deepspeed launcher sets CUDA_VISIBLE_DEVICES for its workers, so on a GPU
            # machine DeepSpeed would pick CUDA; these runs are CPU/gloo everywhere.
            env = subprocess_env(**{SKIP_SHM_BUILD_ENV: "1", "DS_ACCELERATOR": "cpu"})
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
                returncode, output = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as e:
                out = (e.stdout or b"") + (e.stderr or b"")
                returncode, output = -1, f"TIMEOUT after {TIMEOUT_S} s: {' '.join(cmd)}\n" + (out.decode(errors="replace") if isinstance(out, bytes) else out)
            metrics = self.out_dir / name / "metrics.jsonl"
            records = read_jsonl(metrics) if metrics.is_file() else []
            self.done[name] = Run(name, returncode, output, records)
        return self.done[name]


@pytest.fixture(scope="session")
def launch(tiny_data, tmp_path_factory) -> Launcher:
    """tiny_data (conftest): a small corpus prepared by the real pipeline, shared with the other test files."""
    return Launcher(tiny_data, tmp_path_factory.mktemp("parallel_runs"))


# ------------------------------------------------------------------------------ same losses everywhere


@pytest.mark.parametrize("name", [n for n in RUNS if n != "single"])
def test_strategy_matches_single(launch, name):
    reference, run = launch("single"), launch(name)
    reference.check_ok()
    run.check_ok()
    for ref, got in zip(reference.steps(), run.steps()):
        for key, rel in (("loss", LOSS_REL_TOL), ("grad_norm", GRAD_NORM_REL_TOL)):
            assert got[key] == pytest.approx(ref[key], rel=rel), f"{name} step {got['step']}: {key} {got[key]} vs single {ref[key]}"
    losses = [r["loss"] for r in run.steps()]
    assert losses[-1] < losses[0] - 0.1, f"{name} did not train: {losses}"
    # The final eval covers the same windows on any world size, dealt out to the ranks.
    (ref_val,), (got_val,) = ([r["val_loss"] for r in x.records if "val_loss" in r] for x in (reference, run))
    assert got_val == pytest.approx(ref_val, rel=LOSS_REL_TOL), f"{name}: val loss {got_val} vs single {ref_val}"


@pytest.mark.parametrize("name", ["single", "ddp", "fsdp", "zero2"])
def test_checkpoint_exports_to_transformers(launch, name, tmp_path):
    """Each strategy's checkpoint, consolidated, as a transformers directory that computes the same logits
    (the export's details: test_hf_export.py; ZeRO-3 and the command line: test_deepspeed_checkpoint.py)."""
    pytest.importorskip("transformers")
    from dist_gpt.interop import load_model
    from dist_gpt.interop.hf_dir import export_hf

    launch(name).check_ok()
    model = load_model(launch.out_dir / name)
    assert_transformers_computes(model, export_hf(model, tmp_path / "hf"))


def test_fsdp_on_one_process_says_unsharded(launch):
    run = launch("fsdp-1proc")
    run.check_ok()
    assert "not sharded" in run.output
    assert "fsdp on 1 x cpu" in run.output


def test_deepspeed_run_names_its_strategy(launch):
    run = launch("zero2")
    run.check_ok()
    assert "deepspeed on 2 x cpu" in run.output
    assert "micro-batch 2 x grad-accum 2 x world 2" in run.output


# ------------------------------------------------------------------------------ choosing a strategy


def config(*overrides: str):
    return load_config("bible-tiny", list(overrides))


@pytest.mark.parametrize(
    "overrides, world, expected",
    [
        ([], 1, "single"),
        ([], 2, "ddp"),
        (["parallel.ds_config=ds_configs/zero2.json"], 1, "deepspeed"),
        (["parallel.ds_config=ds_configs/zero2.json"], 4, "deepspeed"),
        (["parallel.strategy=fsdp"], 2, "fsdp"),
    ],
)
def test_auto_strategy(overrides, world, expected):
    assert resolve_strategy_name(config(*overrides), DistEnv(world_size=world)) == expected


def test_deepspeed_without_ds_config_is_a_user_error():
    with pytest.raises(UserError, match="needs a DeepSpeed config"):
        config("parallel.strategy=deepspeed")


def test_deepspeed_without_ds_config_from_the_command_line():
    proc = subprocess.run([sys.executable, "launch/train.py", "parallel.strategy=deepspeed"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs a DeepSpeed config" in proc.stderr and "Traceback" not in proc.stderr


def test_single_on_many_processes_is_a_user_error():
    with pytest.raises(UserError, match="strategy=single on a world of 2"):
        build_strategy(config("parallel.strategy=single"), DistEnv(world_size=2))


def test_ds_config_with_another_strategy_is_a_user_error():
    with pytest.raises(UserError, match="parallel.strategy=fsdp"):
        build_strategy(config("parallel.strategy=fsdp", "parallel.ds_config=ds_configs/zero2.json"), DistEnv(world_size=2))


def test_fsdp_needs_a_vocabulary_divisible_by_the_world():
    strategy = build_strategy(config("parallel.strategy=fsdp"), DistEnv(world_size=2))
    with pytest.raises(UserError, match="vocab_size=50257 is not divisible by the world size 2.*50304"):
        strategy.parallelize(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=50257)))


@pytest.mark.parametrize(
    "requested, device, offload, want",
    [
        ("auto", "cuda", True, "cpu:gloo,cuda:nccl"),  # offloaded gradient shards are CPU tensors: gloo for those
        ("nccl", "cuda", True, "cpu:gloo,cuda:nccl"),
        ("auto", "cuda", False, "nccl"),
        ("gloo", "cuda", True, "gloo"),  # what the user asked for
        ("auto", "cpu", True, "gloo"),
    ],
)
def test_fsdp_cpu_offload_on_cuda_gets_a_group_with_a_cpu_backend(requested, device, offload, want):
    """clip_grad_norm all-reduces the norm of CPU-offloaded gradient shards: a NCCL-only group crashes at step 1
    ("No backend type associated with device type cpu"), also on one GPU."""
    assert pick_backend(requested, torch.device(device), cpu_tensors=offload) == want


def test_fsdp_asks_for_cpu_collectives_when_it_offloads(monkeypatch):
    """The flag travels from parallel.fsdp_cpu_offload to the group FSDP makes (a world of one still makes one)."""
    from dist_gpt.parallel import fsdp

    class Seen(Exception):
        pass

    def record(env, backend, cpu_tensors=False):
        raise Seen(cpu_tensors)

    monkeypatch.setattr(fsdp, "ensure_process_group", record)
    for offload in (True, False):
        strategy = build_strategy(config("parallel.strategy=fsdp", f"parallel.fsdp_cpu_offload={str(offload).lower()}"), DistEnv(world_size=1))
        with pytest.raises(Seen) as seen:
            strategy.parallelize(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, tokenizer_vocab_size=64)))
        assert seen.value.args == (offload,)


# ------------------------------------------------------------------------------ the ds_config


def resolve(ds: dict, *overrides: str, world: int = 2, micro: int = 4, accum: int = 2, dtype=torch.float32) -> dict:
    return resolve_ds_config(ds, config(*overrides), DistEnv(world_size=world, compute_dtype=dtype), micro, accum, source="ds.json")


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero3-offload"])
def test_shipped_ds_configs_fill_every_auto(name):
    ds = resolve(load_ds_config(str(REPO / "ds_configs" / f"{name}.json")), "train.grad_clip=0.5")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False  # fp32 here; true when the run's dtype resolves to bf16
    assert "auto" not in json.dumps(ds)
    if "offload" in name:
        assert ds["zero_force_ds_cpu_optimizer"] is False  # else DeepSpeed refuses our torch AdamW


def test_bf16_auto_follows_the_run_dtype():
    assert resolve({"bf16": {"enabled": "auto"}}, dtype=torch.bfloat16)["bf16"]["enabled"] is True
    assert resolve({}, dtype=torch.bfloat16)["bf16"]["enabled"] is True  # absent = auto: never silently fp32


@pytest.mark.parametrize("name, accum", [("zero0", "bf16"), ("zero1", "fp32"), ("zero2", "fp32"), ("zero3", "fp32"), ("zero3-offload", "fp32")])
def test_deepspeed_sums_bf16_micro_batch_gradients_in_fp32_where_it_can(name, accum):
    """DDP and FSDP accumulate in fp32; DeepSpeed without data_types.grad_accum_dtype uses the model's bf16.
    ZeRO-1/2/3 take fp32; stage 0 refuses the mix (it keeps bf16, as documented)."""
    ds = resolve(load_ds_config(str(REPO / "ds_configs" / f"{name}.json")), dtype=torch.bfloat16)
    assert ds["data_types"]["grad_accum_dtype"] == accum
    assert resolve({"zero_optimization": {"stage": 2}}, dtype=torch.bfloat16)["data_types"]["grad_accum_dtype"] == "fp32"  # absent = auto


def test_ds_micro_batch_contradicting_the_config_names_both_values():
    with pytest.raises(UserError) as e:
        resolve({"train_micro_batch_size_per_gpu": 4}, micro=8)
    assert "train_micro_batch_size_per_gpu=4" in str(e.value) and "train.micro_batch_size=8" in str(e.value)


def test_ds_train_batch_size_contradicting_the_config_names_both_values():
    with pytest.raises(UserError) as e:
        resolve({"train_batch_size": 64}, micro=4, accum=2, world=2)
    assert "train_batch_size=64" in str(e.value) and "train.global_batch_size=16" in str(e.value)


def test_ds_gradient_clipping_contradicting_the_config_names_both_values():
    with pytest.raises(UserError, match=r"gradient_clipping=0\.3.*train\.grad_clip=1\.0"):
        resolve({"gradient_clipping": 0.3}, "train.grad_clip=1.0")


def test_ds_values_that_agree_are_accepted():
    ds = resolve({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 16, "gradient_clipping": 1.0})
    assert ds["train_batch_size"] == 16


@pytest.mark.parametrize(
    "ds, message",
    [
        ({"fp16": {"enabled": True}}, "fp16"),
        ({"bf16": {"enabled": True}}, r"bf16\.enabled=true.*train\.dtype"),
        ({"optimizer": {"type": "AdamW"}}, '"optimizer" section'),
        ({"scheduler": {"type": "WarmupLR"}}, '"scheduler" section'),
        ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}, "allgather_bucket_size"),
    ],
)
def test_ds_config_mistakes_are_user_errors(ds, message):
    with pytest.raises(UserError, match=message):
        resolve(ds)


def test_missing_ds_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_ds_config(str(tmp_path / "nope.json"))


# ------------------------------------------------------------------------------ activation checkpointing


def test_activation_checkpointing_changes_neither_gradients_nor_state_dict_keys():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=128, tokenizer_vocab_size=128)
    torch.manual_seed(0)
    plain = GPT(cfg)
    checkpointed = GPT(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed)
    apply_activation_checkpointing(checkpointed)  # idempotent
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    x, y = torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8))
    for model in (plain, checkpointed):
        model(x, y).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
