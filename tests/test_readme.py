"""Every command in README.md's bash blocks is accounted for, word for word: run here (shortened with overrides,
in README order, in a scratch directory, through the same entry points: `python -m X` and `python launch/train.py`),
run by a named test, or listed as not runnable on a CPU, with the reason. A README edit that adds, changes or drops a command fails here
until this file says how it is covered. The README's Python example (loading the export in transformers) runs too."""

from __future__ import annotations

import re
import runpy
import shlex
import sys

import pytest
from conftest import REPO, TINY_MODEL

# README command -> the arguments that make it short. They run in README order: each may use what the last made.
SHORT_TRAIN = [*TINY_MODEL, "train.max_steps=2", "train.micro_batch_size=2", "train.eval_batches=1", "checkpoint.every_steps=0"]
RUN_HERE = {
    "python launch/train.py --config bible-tiny": SHORT_TRAIN,
    'python -m dist_gpt.sample --ckpt out/bible-tiny --prompt "En el principio"': ["--max-new-tokens", "4"],
    "python -m dist_gpt.export out/bible-tiny --out bible-tiny.safetensors": [],
    'python -m dist_gpt.sample --ckpt bible-tiny.safetensors --prompt "Y dijo Dios"': ["--max-new-tokens", "4"],
    "python launch/train.py --config bible-tiny model.init_from=bible-tiny.safetensors train.run_name=bible-tiny-more": SHORT_TRAIN,
    "python -m dist_gpt.export out/bible-tiny --hf bible-tiny-hf": [],
}
# README command -> the tests that run it (checked to exist).
RUN_BY = {
    "python -m dist_gpt.prepare --config bible-tiny": ["tests/test_data.py::test_real_spanish_bible_matches_the_facts", "tests/test_data.py::test_prepare_entry_point_reads_config_and_flags"],
    "python launch/train.py --nproc_per_node=2 --config bible-tiny parallel.strategy=fsdp train.run_name=bible-tiny-fsdp": ["tests/test_launch.py::test_ctrl_c_saves_and_the_resume_line_is_the_last"],
    "python -m dist_gpt.plan --config gpt2-124m-owt --gpus 8 --gpu-memory-gb 24": ["tests/test_plan.py::test_gpt2_124m_on_eight_24gb_gpus"],
    "python -m dist_gpt.plan --config gpt2-124m-owt --gpus 1 --gpu-memory-gb 24 model.preset=gpt2-xl": ["tests/test_plan.py::test_gpt2_xl_on_one_24gb_gpu_needs_offload"],
    "python -m dist_gpt.compare out/seed-bible-rope out/seed-bible-learned": ["tests/test_compare.py::test_compare_prints_the_table_and_the_differing_keys"],
    "python -m dist_gpt.plot out/seed-bible-rope out/seed-bible-learned --out rope-vs-learned.png": ["tests/test_compare.py::test_plot_overlays_several_runs"],
    "python -m dist_gpt.evaluate out/bible-tiny --data hellaswag_val.jsonl --limit 1000": ["tests/test_hellaswag.py::test_evaluate_cli_on_an_export"],
    "python launch/train.py --config bible-tiny train.eval_tasks=hellaswag train.eval_task_every=100 train.eval_task_limit=500": ["tests/test_hellaswag.py::test_in_the_loop_2_ranks_score_as_1_rank"],
    "python -m dist_gpt.doctor": ["tests/test_doctor.py::test_doctor_on_cpu_passes_every_check_and_reports_the_numbers"],
    "python -m dist_gpt.export s3://my-bucket/runs/bible-tiny --hf bible-tiny-hf": ["tests/test_remote_checkpoint.py::test_fresh_machine_resumes_from_the_remote_and_the_newer_copy_wins"],
    'python -m dist_gpt.sample --ckpt s3://my-bucket/runs/bible-tiny --prompt "En el principio"': ["tests/test_remote_checkpoint.py::test_fresh_machine_resumes_from_the_remote_and_the_newer_copy_wins"],
}
# README command -> why no test runs it on a CPU.
OWT = "GPT-2 124M on OpenWebText: GPU work, and its data comes from the hub"
SEED_BIBLE = "the seed's 42M model for 75M tokens: GPU work (tests/test_compare.py trains the same untied model, tiny)"
FINEWEB = "GPT-2 124M on FineWeb-Edu: its data comes from the hub (tests/test_data_sources_hub.py: the preset's request, data.max_tokens on local files)"
HELLASWAG_HUB = "downloads HellaSwag (no network here: tests/test_hellaswag.py downloads it from a server on 127.0.0.1 and scores local copies)"
NOT_ON_CPU = {
    "bash launch/quickstart.sh": "installs system packages and a venv: its three dist_gpt commands are the quick start's, run here",
    "bash .ci/run": "CI's own command: it runs this test",
    'pip install -e ".[cloud]"': "installs packages: .ci/run installs the cloud extra for the tests",
    "python launch/train.py --config gpt2-124m-owt checkpoint.remote=s3://my-bucket/runs checkpoint.every_minutes=10 checkpoint.async_save=true": OWT + " (tests/test_remote_checkpoint.py trains a tiny model against a real S3 server on 127.0.0.1)",
    "python launch/train.py --config gpt2-124m-owt checkpoint.remote=gs://my-bucket/runs checkpoint.every_minutes=10 checkpoint.async_save=true": OWT + "; and no GCS server runs here (gcsfs is the same fsspec interface as the tested s3fs)",
    "python launch/train.py --config gpt2-124m-owt checkpoint.remote=file:///mnt/drive/runs": OWT + " (tests/test_remote_checkpoint.py::test_file_url_is_a_remote_too trains against a file:// store)",
    "python launch/train.py --nproc_per_node=8 --max-restarts=3 --config gpt2-124m-owt parallel.strategy=fsdp checkpoint.every_minutes=10": OWT + " (tests/test_remote_checkpoint.py::test_max_restarts_restarts_the_group_after_a_worker_dies restarts 2 CPU workers)",
    "python -m dist_gpt.prepare --config gpt2-124m-owt": OWT,
    "python launch/train.py --config gpt2-124m-owt": OWT,
    "python launch/train.py --nproc_per_node=8 --config gpt2-124m-owt": OWT,
    "python launch/train.py --nproc_per_node=8 --config gpt2-124m-owt parallel.strategy=fsdp": OWT,
    "python launch/train.py --nproc_per_node=8 --config gpt2-124m-owt parallel.strategy=fsdp parallel.fsdp_reshard_after_forward=false": OWT,
    "python launch/train.py --nproc_per_node=8 --ds_config ds_configs/zero2.json --config gpt2-124m-owt": OWT,
    "python launch/train.py --nproc_per_node=8 --ds_config ds_configs/zero3-offload.json --config gpt2-124m-owt model.preset=gpt2-xl": OWT,
    "python launch/train.py --config gpt2-124m-owt train.micro_batch_size=auto": OWT,
    "python launch/train.py --config gpt2-124m-owt train.dtype=fp16 train.compile=false": OWT,
    "bash benchmarks/gpu_check.sh": "the GPU acceptance check (its --cpu-dry-run is the plumbing on CPU: ~4 minutes, not in the suite)",
    "python -m dist_gpt.autotune_batch --config gpt2-124m-owt --memory-budget-gb 24": "fills a 24 GB GPU with GPT-2 124M trials (tests/test_autotune.py tunes a tiny model on CPU)",
    "python launch/train.py --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=node0:29400 --rdzv-id=gpt2run --config gpt2-124m-owt parallel.strategy=fsdp": "two machines",
    "deepspeed --hostfile hostfile --master_addr node0 --master_port 29500 launch/train.py --ds_config ds_configs/zero2.json --config gpt2-124m-owt": "two machines",
    "python -m dist_gpt.prepare --config gpt2-finetune-bible": "fetches OpenAI's GPT-2 from the hub (tests/test_trainer.py fine-tunes a local GPT-2 directory)",
    "python launch/train.py --config gpt2-finetune-bible": "fetches OpenAI's GPT-2 from the hub (tests/test_trainer.py fine-tunes a local GPT-2 directory)",
    "python launch/train.py --config gpt2-finetune-bible model.init_from=/models/gpt2": "GPT-2 124M on the Bible: tests/test_trainer.py fine-tunes a tiny local GPT-2 directory the same way",
    "python -m dist_gpt.prepare --config gpt2-124m-fineweb-edu": FINEWEB,
    "python -m dist_gpt.prepare --config gpt2-124m-fineweb-edu --max-tokens 1000000000": FINEWEB,
    "python launch/train.py --nproc_per_node=8 --config gpt2-124m-fineweb-edu": FINEWEB,
    "python -m dist_gpt.evaluate out/bible-tiny --task hellaswag": HELLASWAG_HUB,
    "python -m dist_gpt.evaluate gpt2 --task hellaswag": HELLASWAG_HUB + ", and OpenAI's GPT-2 from the Hub",
    "lm_eval --model hf --model_args pretrained=bible-tiny-hf,dtype=float32 --tasks hellaswag --device cuda:0 --batch_size 16": "the harness fetches HellaSwag from the Hub (tests/test_lm_eval.py runs its Python API offline on an export, over a local task)",
    "python launch/train.py --config seed-bible-rope": SEED_BIBLE,
    "python launch/train.py --config seed-bible-learned": SEED_BIBLE,
    "python benchmarks/seed_rope_vs_learned.py": "six CPU runs, ~20 minutes: its result is docs/experiments.md (its parts, train/compare/plot, are tested)",
}


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words).replace("'", '"'))
    return commands


def normalised(command: str) -> str:
    return shlex.join(shlex.split(command)).replace("'", '"')


def test_every_readme_command_is_accounted_for():
    commands = readme_commands()
    tables = {name: {normalised(c) for c in table} for name, table in (("RUN_HERE", RUN_HERE), ("RUN_BY", RUN_BY), ("NOT_ON_CPU", NOT_ON_CPU))}
    listed = set().union(*tables.values())
    unaccounted = [c for c in commands if c not in listed]
    assert not unaccounted, f"README commands no test accounts for: {unaccounted}: run them in tests/test_readme.py, name the test that does, or say why no CPU can"
    stale = {name: sorted(table - set(commands)) for name, table in tables.items() if table - set(commands)}
    assert not stale, f"tests/test_readme.py lists commands the README no longer has: {stale}"
    for tests in RUN_BY.values():
        for test in tests:
            path, name = test.split("::")
            assert f"def {name}(" in (REPO / path).read_text(), f"{test} does not exist"


@pytest.mark.filterwarnings("ignore:'dist_gpt.*' found in sys.modules:RuntimeWarning")  # another test imported it first
def test_the_readme_commands_run_as_written(tiny_data, tmp_path, monkeypatch, capsys):
    """The quick start, export, sample, fine-tune-from-export and --hf commands in a fresh directory (the Bible
    replaced by the tiny corpus, the model by a tiny one, 2 steps), then the README's transformers example on
    what they wrote."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shortening = {normalised(c): extra for c, extra in RUN_HERE.items()}
    for command in (c for c in readme_commands() if c in shortening):
        words = shlex.split(command)[1:] + shortening[command]  # without `python`
        try:
            if words[0] == "-m":
                monkeypatch.setattr(sys, "argv", words[1:])
                runpy.run_module(words[1], run_name="__main__", alter_sys=True)
            else:
                monkeypatch.setattr(sys, "argv", [*words, f"data.dir={tiny_data}"])
                runpy.run_path(str(REPO / words[0]), run_name="__main__")
        except SystemExit as e:
            assert not e.code, f"{command!r} exited {e.code}: {capsys.readouterr().err[-2000:]}"
    assert (tmp_path / "out" / "bible-tiny-more" / "checkpoints" / "latest").is_file()
    (example,) = [b for b in readme_blocks("python") if "from_pretrained" in b]
    capsys.readouterr()
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("Y dijo Dios")
