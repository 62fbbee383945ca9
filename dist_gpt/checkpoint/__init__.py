"""Checkpoints: sharded saves published atomically (step_N.tmp -> checksums -> manifest -> rename -> latest),
resumed exactly, on any world size.

    manifest.py      a published checkpoint: names, manifest, verification, the model-shape check
    checkpointer.py  the Checkpointer the training loop drives: save / poll / resume / stop signals
    consolidate.py   the full weights of any checkpoint in one process (export, sample, eval)

May import: config, model, errors, runtime/, parallel/ (the strategy writes and reads its own shards).
Never: engine/, train/, interop/ (they import this).
"""
