"""Resuming: which checkpoint `checkpoint.resume` names, the checks before anything is loaded (intact, of this
model, trained on these data), and loading it into the strategy and the run's parts.

Every check that one rank makes for all (rank 0 reads the files back) is shared before any rank acts on it: all
ranks stop together with the same line (no peer's traceback after it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dist_gpt.checkpoint.manifest import check_model_shape, read_manifest, resolve_checkpoint_dir, verify_files
from dist_gpt.checkpoint.rng import restore_rng_state
from dist_gpt.checkpoint.storage import Storage
from dist_gpt.config import Config
from dist_gpt.data.prepare import data_identity, read_meta
from dist_gpt.errors import UserError
from dist_gpt.runtime.distributed import DistEnv, barrier, broadcast_from_main

# Config keys whose change on resume is no drift worth a word: how the run is stored, resumed and reported.
NOT_DRIFT = {"checkpoint.resume", "checkpoint.allow_other_data", "train.out_dir", "train.run_name", "logging.wandb", "logging.wandb_project"}


@dataclass
class Lineage:
    """A part of every checkpoint: the checkpoint.resume=PATH this run started from. A job script that keeps
    the setting and is requeued then goes on from the run's own latest instead of starting over from PATH."""

    started_from: str | None = None

    def state_dict(self) -> dict:
        return {"started_from": self.started_from}

    def load_state_dict(self, state: dict) -> None:
        self.started_from = state.get("started_from")


@dataclass
class DataRecord:
    """A part of the trainer's checkpoints: the prepared data's identity (meta.json's inputs, settings, sizes;
    dist_gpt.data.prepare.data_identity). check_same_data compares it before anything is loaded, so loading it
    back has nothing to do."""

    identity: dict

    def state_dict(self) -> dict:
        return self.identity

    def load_state_dict(self, state: dict) -> None:
        pass


def checkpoint_to_resume(config: Config, storage: Storage) -> tuple[Path | None, str]:
    """(the checkpoint directory to resume from or None for a fresh start, why: "latest" | "path" | "applied").

    checkpoint.resume: auto = this run's latest, if any; never (refused when it would overwrite checkpoints);
    PATH = a one-time start from PATH: into a run without checkpoints, or when the run's latest is damaged. A run
    that started from PATH goes on from its own latest ("applied"); going back over a run's intact newer
    checkpoints is refused: its later saves would replace them, and the run would rewind on every restart."""
    mode = config.checkpoint.resume
    latest = resolve_checkpoint_dir(storage.location()) if storage.latest() is not None else None
    if mode == "never":
        if latest:
            raise UserError(
                f"{config.run_dir} already has checkpoints and checkpoint.resume=never would overwrite them: "
                f"choose a new train.run_name, or resume with checkpoint.resume=auto"
            )
        return None, "fresh"
    if mode == "auto":
        return latest, "latest"
    if latest is not None and started_from(latest) == str(Path(mode).resolve()):
        return latest, "applied"  # whatever became of PATH since (keep_last_k may have deleted it)
    target = resolve_checkpoint_dir(mode)
    if latest is None or latest.resolve() == target.resolve():
        return target, "path"
    if damage(latest) is not None:
        return target, "path"  # the latest cannot be resumed: going back to PATH is what its error suggested
    raise UserError(
        f"checkpoint.resume={mode} would take {config.run_dir} back from its latest checkpoint {latest.name} to "
        f"{target.name}, and the run's later saves would replace the newer ones: to go on from the latest, drop "
        f"checkpoint.resume (auto); to train again from {target}, start a new run from it with train.run_name=NEW"
    )


def started_from(ckpt_dir: Path) -> str | None:
    try:
        return read_manifest(ckpt_dir)["parts"].get("lineage", {}).get("started_from")
    except UserError:
        return None


def damage(ckpt_dir: Path) -> str | None:
    """Why ckpt_dir cannot be resumed (missing, incomplete, a file truncated or corrupt), or None if it is intact."""
    try:
        verify_files(ckpt_dir, read_manifest(ckpt_dir))
        return None
    except UserError as e:
        return str(e)


def newest_intact_before(ckpt_dir: Path) -> Path | None:
    """The newest intact checkpoint of the same run older than ckpt_dir (each one read back: CRC32 of its files)."""
    older = sorted((p for p in ckpt_dir.parent.glob("step_*") if p.name[5:].isdigit() and p.name < ckpt_dir.name), reverse=True)
    return next((p for p in older if damage(p) is None), None)


def check_before_loading(ckpt_dir: Path, config: Config, env: DistEnv) -> dict:
    """The checkpoint's manifest, once rank 0 has found it intact and every rank has found it of this model and
    these data; else every rank stops with the same line (naming an intact older checkpoint, if the run has one)."""
    problem = None
    if env.is_main:
        problem = damage(ckpt_dir)
        if problem is not None:
            older = newest_intact_before(ckpt_dir)
            problem += (f": the newest intact one is {older} (kept): checkpoint.resume={older}" if older
                        else " (this run has no intact older one: start over with train.run_name=NEW)")
    problem = broadcast_from_main(problem)
    if problem is None:
        manifest = read_manifest(ckpt_dir)
        try:
            check_model_shape(ckpt_dir, manifest, config)
            check_same_data(ckpt_dir, manifest, config)
            return manifest
        except UserError as e:
            problem = str(e)  # every rank reads the same manifest and meta.json: every rank is here
    raise UserError(problem)  # on every rank: whichever a launcher sees end first carries the line (ours prints it once)


def check_same_data(ckpt_dir: Path, manifest: dict, config: Config) -> None:
    """The prepared data must be the ones the checkpoint was trained on (meta.json's inputs, settings and sizes):
    re-prepared data (another val_fraction moves documents between train and val) would train on silently and
    put trained-on text into the val loss."""
    saved = manifest["parts"].get("data")
    if not saved or config.checkpoint.allow_other_data:
        return  # a checkpoint from before the record, or asked for
    now = data_identity(read_meta(config.data_dir))
    changed = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        raise UserError(
            f"{config.data_dir} holds other data than {ckpt_dir} was trained on ({', '.join(changed)}): prepare the same "
            f"data again, start a new run (train.run_name=NEW), or resume on these with checkpoint.allow_other_data=true"
        )


def config_drift(manifest: dict, config: Config) -> list[str]:
    """`key old -> new` for each config key this run sets otherwise than the checkpoint's run did."""
    def flat(d: dict, prefix: str = "") -> dict:
        return {k: v for key, value in d.items() for k, v in (flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}).items()}

    saved, now = flat(manifest.get("config", {})), flat(config.to_dict())
    if not saved.get("train.global_batch_size") and now["train.global_batch_size"] == manifest["parts"].get("train_state", {}).get("global_batch"):
        saved["train.global_batch_size"] = now["train.global_batch_size"]  # 0 resolved to the checkpoint's own: kept, not changed
    return [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k] and k not in NOT_DRIFT]


def load_checkpoint(ckpt_dir: Path, config: Config, env: DistEnv, strategy, parts: dict) -> bool:
    """Load ckpt_dir into the strategy (model + optimizer, resharded to this world) and `parts` (objects with
    load_state_dict: the data loader, the loop's state...). Returns whether this rank's RNG stream was restored."""
    manifest = check_before_loading(ckpt_dir, config, env)
    drift = config_drift(manifest, config)
    if drift and env.is_main:
        print(f"resuming {ckpt_dir} with a changed config: {', '.join(drift)}", flush=True)
    barrier()
    strategy.load_checkpoint(ckpt_dir, manifest)
    for name, part in parts.items():
        if name in manifest["parts"]:  # a part newer than the checkpoint (the fp16 loss scaler) starts fresh
            part.load_state_dict(manifest["parts"][name])
    return restore_rng_state(ckpt_dir, env.rank, env.device)
