"""dist_gpt: train GPT-2-style models on one device or many (DDP, FSDP2, DeepSpeed ZeRO).

The package by role, lowest layer first (an import only ever points to its own layer or a lower one;
tests/test_layout.py holds this order):

    errors.py                     UserError: one line with the fix, a non-zero exit
    config.py  model.py           the core: the config schema (YAML + dataclasses), the GPT (no parallelism),
    fused_loss.py  tokenizer.py   the chunked linear + cross-entropy, GPT-2's BPE (offline),
    config_render.py              a config as commented YAML (--print-config)
    data/          text -> tokens on disk -> training windows
    runtime/       process group, launcher, precision, metrics, safe writes, stop signals
    parallel/      one Strategy interface: single | ddp | fsdp | deepspeed
    checkpoint/    sharded saves, published atomically, resumed on any world size
    interop/       load_model: one reader a format (OpenAI's GPT-2, our two exports, our checkpoints); the writers
    engine/        the one build path and the one training step
    autotune/      the micro-batch autotuner, the memory model, the planner
    eval/          judging a model (validation loss)
    train/         a training run: the loop, its run lock and time budget
    tools/         the command-line tools

The top-level prepare, sample, export, plot, compare, bench, plan, doctor and autotune_batch modules are the
`python -m dist_gpt.X` entry points: two-line shims into tools/ and autotune/.
"""

__version__ = "0.1.0"
