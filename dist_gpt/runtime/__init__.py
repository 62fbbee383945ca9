"""What a training process stands on: joining the process group, launching workers, numerics, logging.

    distributed.py   DistEnv, init/destroy the process group, the few collectives ranks agree with
    launcher.py      `launch/train.py --nproc_per_node=N`: torchrun's machinery in-process, our endings
    precision.py     the compute dtype per device, fp16's loss scaler, TF32
    metrics.py       console + metrics.jsonl + wandb; MFU's peak; memory stats
    safe_write.py    writes that can fail half-way (a full disk): atomic replace, one-line reasons
    stop_signals.py  SIGTERM / SIGUSR1 / Ctrl-C as a request to save and stop
    malloc.py        glibc malloc tuning for CPU training

May import: core (config, model, errors, tokenizer) and data/. Never: parallel/ and above.
"""
