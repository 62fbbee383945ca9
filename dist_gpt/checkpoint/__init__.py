"""Checkpoints: sharded saves published atomically, resumed exactly, on any world size.

    checkpointer.py  the Checkpointer the loop drives: one agreement per step, save, wait, resume, stop signals
    publish.py       one save: step_N.tmp -> every rank's checksums -> manifest -> rename -> latest (or abandoned)
    resume.py        which checkpoint checkpoint.resume names; loading it into the strategy and the run's parts
    retention.py     keep_last_k, in any store
    storage.py       the Storage interface (read/write a file, list, delete a checkpoint) and LocalStorage
    remote.py        RemoteStorage: the same interface over fsspec (s3://, gs://, az://, file://) — checkpoint.remote
    remote_copy.py   a run's remote copy as the Checkpointer drives it: checked at start, fetched at resume, uploaded
    upload.py        each rank's background upload thread (rank 0: manifest last, then the remote `latest`)
    fetch.py         a remote checkpoint downloaded onto this disk (resume on a fresh machine, export, sample)
    manifest.py      a published checkpoint: names, manifest, verification, the model-shape check
    rng.py           each rank's RNG stream, saved and restored
    consolidate.py   the full weights of any checkpoint in one process (export, sample, eval)

May import: core (config, model, errors), data/ (the data identity a checkpoint records), runtime/, parallel/ (the strategy writes and reads its own shards).
Never: interop/, engine/, train/ and above (they import this).
"""

import warnings

# DCP warns on every single-process save and load (a resume, `sample`, `export`) that it assumes a single process,
# which is what we mean: said once here, for every module of the package.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
