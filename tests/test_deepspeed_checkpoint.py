"""DeepSpeed (ZeRO) checkpoints: resume continues the same losses, across world sizes (DeepSpeed's universal
checkpoint), export + sample work from a ZeRO-3 checkpoint, and each rank checksums the files it wrote.

The runs go through the real `deepspeed` launcher on CPU with gloo, 2 processes. Each reference run saves at
step 3 and runs on to step 6; the resumed run starts from that step-3 checkpoint (same schedule: max_steps=6)
and must log the reference's losses for steps 4-6.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL, assert_transformers_computes, free_port, losses_by_step, subprocess_env

from dist_gpt.checkpoint.consolidate import consolidated_state_dict
from dist_gpt.parallel.deepspeed import SKIP_SHM_BUILD_ENV

TIMEOUT_S = 240
LOSS_REL_TOL = 1e-5
STEPS, SAVE_AT = 6, 3

OVERRIDES = TINY_MODEL + [
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    f"train.max_steps={STEPS}",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.device=cpu",
    "train.dtype=fp32",
    "logging.log_every=1",
    "checkpoint.keep_last_k=3",
]



def train(out_dir: Path, data_dir: Path, run_name: str, stage: str, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    if nproc == 1:
        launcher = [sys.executable]
    else:
        exe = Path(sys.executable).with_name("deepspeed")
        launcher = [str(exe) if exe.exists() else "deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port())]
    cmd = [*launcher, "launch/train.py", "--config", "bible-tiny", "--ds_config", f"ds_configs/{stage}.json", *OVERRIDES,
           f"data.dir={data_dir}", f"train.out_dir={out_dir}", f"train.run_name={run_name}", *extra]  # fmt: skip
    env = subprocess_env(**{SKIP_SHM_BUILD_ENV: "1", "DS_ACCELERATOR": "cpu"})
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """name -> run dir; each reference run (2 ranks, saving every SAVE_AT steps) is made once, on demand."""
    out = tmp_path_factory.mktemp("ds_ckpt")
    made: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in made:
            ok(train(out, tiny_data, stage, stage, 2, f"checkpoint.every_steps={SAVE_AT}"))
            made[stage] = out / stage
        return made[stage]

    get.out, get.data = out, tiny_data
    return get


def assert_same_losses(reference: Path, resumed: Path) -> None:
    ref, got = losses_by_step(reference), losses_by_step(resumed)
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1)), f"resumed run logged steps {sorted(got)}"
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=LOSS_REL_TOL), f"step {step}: resumed {loss} vs uninterrupted {ref[step]}"


def test_zero3_resume_same_world_continues_the_losses(runs):
    reference = runs("zero3")
    ckpt = reference / "checkpoints" / f"step_{SAVE_AT:06d}"
    ok(train(runs.out, runs.data, "zero3-resumed", "zero3", 2, f"checkpoint.resume={ckpt}"))
    assert_same_losses(reference, runs.out / "zero3-resumed")


def test_zero2_resume_on_one_process_goes_through_universal_checkpoint(runs):
    reference = runs("zero2")
    ckpt = reference / "checkpoints" / f"step_{SAVE_AT:06d}"
    proc = ok(train(runs.out, runs.data, "zero2-on-1", "zero2", 1, f"checkpoint.resume={ckpt}"))
    assert "universal checkpoint" in proc.stdout + proc.stderr
    assert_same_losses(reference, runs.out / "zero2-on-1")
    leftovers = [p.name for p in (runs.out / "zero2-on-1" / "checkpoints").iterdir() if "universal" in p.name]
    assert not leftovers, f"the conversion was not cleaned up: {leftovers}"


def test_zero3_export_equals_consolidated_weights_and_samples(runs, tmp_path):
    from safetensors.torch import load_file

    run_dir = runs("zero3")
    out = tmp_path / "x.safetensors"
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "dist_gpt.export", str(run_dir), "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    ok(proc)
    _, state = consolidated_state_dict(run_dir)
    exported = load_file(str(out))
    for key, tensor in exported.items():
        assert torch.equal(tensor, state[key].to(tensor.dtype)), key
    assert {k for k in state if k != "lm_head.weight"} <= set(exported)
    proc = subprocess.run([sys.executable, "-m", "dist_gpt.sample", "--ckpt", str(out), "--max-new-tokens", "5", "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    ok(proc)
    assert proc.stdout.strip(), "sample printed nothing"


def test_zero3_exports_to_transformers_from_the_command_line(runs, tmp_path):
    pytest.importorskip("transformers")
    from dist_gpt.interop import load_model

    ok(subprocess.run([sys.executable, "-m", "dist_gpt.export", str(runs("zero3")), "--hf", str(tmp_path / "hf")],
                      cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120))  # fmt: skip
    assert_transformers_computes(load_model(runs("zero3")), tmp_path / "hf")


def test_consolidated_weights_load_into_gpt(runs):
    from dist_gpt.interop import load_model

    model = load_model(runs("zero3"))
    assert model.lm_head.weight is model.wte.weight  # the tie survives consolidation


def test_stage0_across_world_sizes_is_one_user_error_that_says_how(tmp_path):
    from types import SimpleNamespace

    from dist_gpt.config import Config
    from dist_gpt.errors import UserError
    from dist_gpt.parallel.deepspeed import DeepSpeedStrategy
    from dist_gpt.runtime.distributed import DistEnv

    strategy = DeepSpeedStrategy(Config(), DistEnv(world_size=1))
    strategy.engine = SimpleNamespace(zero_optimization_stage=lambda: 0)
    with pytest.raises(UserError) as e:
        strategy.load_checkpoint(tmp_path / "step_000003", {"strategy": "deepspeed", "world_size": 2})
    message = str(e.value)
    assert "\n" not in message
    assert "resume with 2 processes" in message and "python -m dist_gpt.export" in message and "model.init_from=" in message


@pytest.mark.parametrize(
    "name, owner",
    [
        ("rng_rank1.pt", 1),
        ("__1_0.distcp", 1),
        ("__0_0.distcp", 0),
        (".metadata", 0),
        ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 1),
        ("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 1),
        ("zero_pp_rank_1_mp_rank_00_model_states.pt", 1),
        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", 0),
        ("mp_rank_00_model_states.pt", 0),
    ],
)
def test_each_rank_checksums_the_files_it_wrote(name, owner):
    from dist_gpt.checkpoint.publish import written_by

    assert written_by(name) == owner, name
