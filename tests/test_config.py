"""Configuration: presets load, overrides apply, and every user mistake is one clear line."""

from __future__ import annotations

import pytest
from conftest import run_python

from dist_gpt.config import check_runtime, load_config, preset_names
from dist_gpt.errors import UserError


def test_every_preset_loads():
    assert {"bible-tiny", "bible-seed", "gpt2-124m-owt", "gpt2-finetune-bible"} <= set(preset_names())
    for name in preset_names():
        assert load_config(name).name == name


def test_preset_shapes_are_the_seeds():
    seed = load_config("bible-seed").model
    assert (seed.n_layer, seed.n_head, seed.n_embd, seed.block_size) == (2, 2, 384, 256)
    owt = load_config("gpt2-124m-owt")
    assert (owt.model.n_layer, owt.model.n_embd, owt.train.micro_batch_size, owt.train.global_batch_size) == (12, 768, 12, 480)
    assert check_runtime(owt, world_size=1, device_type="cuda", micro_batch_size=12) == 40  # the seed's grad-accum 40
    assert (owt.train.lr, owt.train.min_lr) == (6e-4, 6e-5)
    finetune = load_config("gpt2-finetune-bible").model
    assert (finetune.init_from, finetune.position) == ("gpt2", "rope")


def test_dotted_overrides_are_typed():
    c = load_config("bible-tiny", ["train.max_steps=200", "model.position=learned", "train.lr=1e-3", "train.compile=true"])
    assert (c.train.max_steps, c.model.position, c.train.lr, c.train.compile) == (200, "learned", 1e-3, True)
    assert load_config("bible-tiny", ["train.micro_batch_size=auto"]).train.micro_batch_size == "auto"


def test_a_yaml_path_loads(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  preset: seed\ntrain:\n  max_steps: 7\n")
    c = load_config(str(path))
    assert (c.name, c.model.n_embd, c.train.max_steps) == ("mine", 384, 7)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_stepz=3"], "unknown key train.max_stepz"),
        (["trian.max_steps=3"], "unknown config section 'trian'"),
        (["train.max_steps=many"], "train.max_steps must be an integer"),
        (["train.lr=true"], "train.lr must be a number"),
        (["model.n_embd=100", "model.n_head=3"], "not divisible by n_head=3"),
        (["model.position=absolute"], "model.position='absolute' is not one of rope, learned"),
        (["train.max_steps=0"], "train.max_steps=0 must be at least 1"),
        (["train.micro_batch_size=big"], "must be a positive integer or 'auto'"),
        (["train.min_lr=1", "train.lr=0.1"], "min_lr <= train.lr"),
        (["parallel.strategy=deepspeed"], "needs a DeepSpeed config"),
        (["maxsteps"], "not of the form section.key=value"),
        (["model.preset=gpt5"], "model.preset='gpt5' is unknown"),
        (["train.warmup_steps=100", "train.lr_decay_steps=50"], "train.lr_decay_steps=50 ends the decay before train.warmup_steps=100"),
    ],
)
def test_config_errors_are_one_clear_line(overrides, message):
    with pytest.raises(UserError) as excinfo:
        load_config("bible-tiny", overrides)
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_unknown_preset_names_the_choices():
    with pytest.raises(UserError, match="bible-tiny"):
        load_config("bible-huge")


def test_global_batch_must_divide():
    config = load_config("bible-tiny", ["train.global_batch_size=10"])
    with pytest.raises(UserError, match=r"not divisible by micro_batch_size x world size = 4 x 2 = 8"):
        check_runtime(config, world_size=2, device_type="cpu", micro_batch_size=4)
    assert check_runtime(load_config("bible-tiny", ["train.global_batch_size=32"]), 2, "cpu", 4) == 4


def test_cuda_only_attention_on_cpu_is_refused():
    config = load_config("bible-tiny", ["model.attn_backend=efficient"])
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        check_runtime(config, 1, "cpu", 4)


def test_launcher_reports_config_errors_without_traceback():
    proc = run_python(["launch/train.py", "--config", "bible-tiny", "train.max_steps=-1"], check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: train.max_steps=-1 must be at least 1"


# ------------------------------------------------------------------------------------------ --print-config


def test_every_key_has_its_comment():
    """--print-config shows each key's comment from the schema: a key added without one fails here."""
    import dataclasses

    from dist_gpt.config import SECTIONS, Config
    from dist_gpt.config_render import key_comments

    missing = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.name not in key_comments(cls)]
    assert not missing and "name" in key_comments(Config), f"keys without a comment in config.py / model.py: {missing}"


def test_printed_config_loads_back_to_the_same_config(tmp_path):
    from dist_gpt.config_render import render_config

    config = load_config("bible-seed", ["train.max_steps=7", "model.position=learned", "data.dir=my data/x", "train.lr=1e-3"])
    path = tmp_path / "printed.yaml"
    path.write_text(render_config(config))
    assert load_config(str(path)) == config
    assert "  max_steps: 7  # optimizer steps of the whole run" in path.read_text()


@pytest.mark.parametrize("command", ["train", "prepare", "autotune"])
def test_each_entry_point_prints_its_config_and_says_how(command, capsys, monkeypatch):
    import runpy
    import sys

    from conftest import REPO

    from dist_gpt import autotune_batch
    from dist_gpt.tools import prepare

    argv = ["--config", "bible-tiny", "train.max_steps=7"] if command != "prepare" else ["--config", "bible-tiny", "--dataset", "books/*.txt"]
    run = {
        "train": lambda args: (monkeypatch.setattr(sys, "argv", ["launch/train.py", *args]), runpy.run_path(str(REPO / "launch" / "train.py"), run_name="__main__")),
        "prepare": prepare.main,
        "autotune": autotune_batch.main,
    }[command]
    run([*argv, "--print-config"])
    printed = capsys.readouterr().out
    assert printed.startswith("name: bible-tiny  # ")
    assert ("  dataset: books/*.txt  # " if command == "prepare" else "  max_steps: 7  # ") in printed
    with pytest.raises(SystemExit):
        run(["--help"])
    help_text = capsys.readouterr().out
    assert "--print-config" in help_text and "e.g.\n  python " in help_text


def test_a_run_shorter_than_its_warmup_is_said_not_silent():
    """max_steps < warmup_steps never reaches the peak lr: said in one line at the start (a preset's smoke test
    with train.max_steps=2 stays allowed); lr_decay_steps < warmup_steps is refused (above)."""
    from dist_gpt.engine.schedule import schedule_notice

    assert "ends during the warmup, at 10% of the peak lr" in schedule_notice(warmup_steps=20, max_steps=2)
    assert schedule_notice(warmup_steps=20, max_steps=20) is None
