"""Checkpoints: sharded saves published atomically, resumed exactly, on any world size.

    checkpointer.py  the Checkpointer the loop drives: one agreement per step, save, wait, resume, stop signals
    publish.py       one save: step_N.tmp -> every rank's checksums -> manifest -> rename -> latest (or abandoned)
    resume.py        which checkpoint checkpoint.resume names; loading it into the strategy and the run's parts
    retention.py     keep_last_k, in any store
    storage.py       the Storage interface (read/write a file, list, delete a checkpoint) and LocalStorage
    manifest.py      a published checkpoint: names, manifest, verification, the model-shape check
    rng.py           each rank's RNG stream, saved and restored
    consolidate.py   the full weights of any checkpoint in one process (export, sample, eval)

May import: core (config, model, errors), runtime/, parallel/ (the strategy writes and reads its own shards).
Never: interop/, engine/, train/ and above (they import this).
"""
