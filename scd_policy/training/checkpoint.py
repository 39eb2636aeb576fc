"""Training checkpoints and the run folder they live in: everything needed to resume a run exactly,
written atomically and verified before it is trusted.

Layout of a run folder (this module is its one owner)::

    <run>/config.yaml              the resolved experiment config of the run
    <run>/checkpoints/step_00001000/
        policy/              deployable EMA policy (model.safetensors + config.json with its sha256)
        raw.safetensors      the raw (non-EMA) weights being optimised
        train_state.pt       optimiser, scheduler, step, EMA counter, RNG states (tensors and plain data
                             only: read back with torch.load(weights_only=True), never unpickling code)
        manifest.json        sha256 of raw.safetensors and train_state.pt
    <run>/checkpoints/latest.json   {"name": "step_00001000", "step": 1000}
    <run>/best/              copy of the deployable policy with the best rollout success so far
    <run>/best.json          {"step": ..., "success_rate": ...}

Each step folder (and ``best/``) is written to a temporary name and renamed into place; ``latest.json``
is replaced atomically after that, so a kill -9 at any moment leaves the previous checkpoint intact and
at most the steps since it are lost. On resume the checkpoint ``latest.json`` names is verified
(files present, checksums); a damaged one is renamed ``step_<N>.corrupt`` (kept, never deleted) and the
newest intact one is used instead, with a warning.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from scd_policy.io import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temporaries,
    sha256_file,
)
from scd_policy.policies import CheckpointError, Policy
from scd_policy.policies.base import CONFIG_FILE, WEIGHTS_FILE, read_policy_record

__all__ = [
    "BEST",
    "BEST_JSON",
    "CHECKPOINTS",
    "LATEST",
    "CheckpointError",
    "TrainState",
    "best_success",
    "checkpoint_name",
    "ensure_new_run_folder",
    "freeze_parameters",
    "init_weights",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "policy_folder",
    "prepare_run_folder",
    "resolve_policy_dir",
    "resumable_checkpoint",
    "save_best",
    "save_checkpoint",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
BEST = "best"
BEST_JSON = "best.json"
MANIFEST = "manifest.json"
RAW_WEIGHTS = "raw.safetensors"
TRAIN_STATE = "train_state.pt"
POLICY = "policy"
_STEP_NAME = re.compile(r"step_(\d{8,})")


@dataclass
class TrainState:
    step: int
    ema_updates: int
    best_success: float | None


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's step folders as (step, path), oldest first — ordered by step number, not by name."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if _STEP_NAME.fullmatch(path.name) and path.is_dir():
            found.append((checkpoint_step(path), path))
    return sorted(found)


def checkpoint_step(path: Path) -> int:
    """The step of a step folder (``step_00001000`` -> 1000)."""
    match = _STEP_NAME.fullmatch(path.name)
    if match is None:
        raise CheckpointError(f"{path} is not a step folder (expected step_<8 digits>)")
    return int(match.group(1))


def _point_latest(run_dir: Path, step: int) -> None:
    atomic_write_text(
        run_dir / CHECKPOINTS / LATEST, json.dumps({"name": checkpoint_name(step), "step": step})
    )


def rng_state() -> dict[str, Any]:
    # Only torch's generators draw randomness in training (noise, timesteps, dropout); the data
    # order comes from ResumableShardedSampler, a pure function of (seed, epoch, rank).
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---- the run folder ---------------------------------------------------------------------------
def ensure_new_run_folder(run_dir: Path) -> None:
    """Refuse a run folder that already holds another run: two runs must never mix in one folder.

    Also refuses an ``out`` that is a file. A folder without weights in it (empty, or left by a run
    stopped before its first checkpoint: only config.yaml and logs) is fine.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"out={run_dir} is a file, not a folder; choose a folder for the run")
    used = [
        name
        for name in (CHECKPOINTS, BEST, BEST_JSON)
        if (run_dir / name).exists() and not (name == CHECKPOINTS and not any((run_dir / name).iterdir()))
    ]
    if used:
        steps = [step for step, _ in list_checkpoints(run_dir)]
        held = f"checkpoints up to step {max(steps)}" if steps else ", ".join(used)
        raise CheckpointError(
            f"out={run_dir} already holds a training run ({held}); pass train.resume=true to continue "
            "that run, or choose a fresh out=<folder> for a new one"
        )


def prepare_run_folder(run_dir: Path) -> None:
    """Create the run folder and clear temporaries a killed writer left (only this run writes here)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"out={run_dir} is a file, not a folder; choose a folder for the run")
    run_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(run_dir) + remove_stale_temporaries(run_dir / CHECKPOINTS)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run: %s", len(removed), removed[:3])


# ---- writing ----------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: Path,
    *,
    model: Policy,
    ema_model: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    keep_last: int = 2,
) -> Path:
    """Write ``checkpoints/step_<N>`` atomically, point ``latest.json`` at it, prune older ones."""
    checkpoints = run_dir / CHECKPOINTS
    name = checkpoint_name(state.step)
    with atomic_directory(checkpoints / name) as tmp:
        ema_model.save_pretrained(tmp / POLICY)
        raw = save(_contiguous_state(model))
        blob = io.BytesIO()
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": state.step,
                "ema_updates": state.ema_updates,
                "best_success": state.best_success,
                "rng": rng_state(),
            },
            blob,
        )
        atomic_write_bytes(tmp / RAW_WEIGHTS, raw)
        atomic_write_bytes(tmp / TRAIN_STATE, blob.getvalue())
        manifest = {RAW_WEIGHTS: sha256_file(tmp / RAW_WEIGHTS), TRAIN_STATE: sha256_file(tmp / TRAIN_STATE)}
        atomic_write_text(tmp / MANIFEST, json.dumps({"step": state.step, "sha256": manifest}, indent=2))
    _point_latest(run_dir, state.step)
    # Keep the newest ``keep_last`` by step number, counting the one just written; never delete it
    # or anything newer (a run folder holds one run, so nothing newer should exist).
    older = [path for step, path in list_checkpoints(run_dir) if step < state.step]
    for stale in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return checkpoints / name


def policy_folder(run_dir: Path, step: int) -> Path:
    """The deployable (EMA) policy folder of the checkpoint at ``step``."""
    return run_dir / CHECKPOINTS / checkpoint_name(step) / POLICY


def best_success(run_dir: Path) -> float | None:
    """The best rollout success recorded in ``best.json`` (None when there is none, or it is unreadable:
    then the next rollout sets it again)."""
    path = run_dir / BEST_JSON
    if not path.exists():
        return None
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["success_rate"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        log.warning("%s is unreadable (%s); the best-so-far success starts afresh", path, error)
        return None


def save_best(run_dir: Path, policy: Policy, step: int, success: float) -> None:
    """Replace ``best/`` (in one rename, so it is never half old, half new) and ``best.json``."""
    with atomic_directory(run_dir / BEST) as tmp:
        policy.save_pretrained(tmp)
    atomic_write_text(run_dir / BEST_JSON, json.dumps({"step": step, "success_rate": success}))


# ---- reading and verifying --------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    """The step folder ``latest.json`` names (checked to be a step folder of this run), else None."""
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    try:
        record = json.loads(pointer.read_text(encoding="utf-8"))
        name = str(record["name"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{pointer} is corrupt ({error}); delete it to resume from the newest intact step folder"
        ) from None
    if not _STEP_NAME.fullmatch(name):
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a step folder of this run (expected step_<8 digits>); "
            "delete it to resume from the newest intact step folder"
        )
    path = run_dir / CHECKPOINTS / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points at {path}, which does not exist")
    return path


def verify_checkpoint(path: Path) -> None:
    """Check a step folder is complete and its files match their checksums; raise CheckpointError."""
    for required in (POLICY, RAW_WEIGHTS, TRAIN_STATE):
        if not (path / required).exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {required} is missing")
    manifest_path = path / MANIFEST
    if manifest_path.exists():  # checkpoints written before checksums were kept have none
        try:
            sums = json.loads(manifest_path.read_text(encoding="utf-8"))["sha256"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{manifest_path} is corrupt ({error})") from None
        for name, expected in sums.items():
            if sha256_file(path / name) != expected:
                raise CheckpointError(
                    f"{path / name} does not match its checksum in {manifest_path}: the file is damaged "
                    "(truncated or changed)"
                )
    record = read_policy_record(path / POLICY)
    expected_weights = record.get("weights_sha256")
    weights = path / POLICY / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {POLICY}/{WEIGHTS_FILE} is missing")
    if expected_weights is not None and sha256_file(weights) != expected_weights:
        raise CheckpointError(
            f"{weights} does not match its checksum in {path / POLICY / CONFIG_FILE}: the file is damaged"
        )


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the latest if intact, else the newest intact one (warning).

    Damaged step folders are renamed ``step_<N>.corrupt`` so they are neither trusted nor pruned.
    """
    candidates = [path for _, path in reversed(list_checkpoints(run_dir))]
    try:
        latest = latest_checkpoint(run_dir)
    except CheckpointError as error:
        log.warning("%s", error)
        latest = None
    if latest is not None:
        candidates = [latest, *(c for c in candidates if c != latest)]
    if not candidates:
        return None
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            quarantine = path.with_name(path.name + ".corrupt")
            path.rename(quarantine)
            log.warning("%s — kept as %s; trying an older checkpoint", error, quarantine)
            continue
        if path != latest:
            log.warning("resuming from %s, the newest intact checkpoint", path)
            _point_latest(run_dir, checkpoint_step(path))
        return path
    raise CheckpointError(
        f"no intact checkpoint in {run_dir / CHECKPOINTS} (each damaged one is kept as step_*.corrupt); "
        "start a new run with a fresh out=<folder>"
    )


def load_checkpoint(
    path: Path,
    *,
    model: Policy,
    ema_model: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    """Restore weights, optimiser, scheduler and RNG state in place; returns the step counters."""
    verify_checkpoint(path)
    stored_type = read_policy_record(path / POLICY)["policy_type"]
    if stored_type != model.policy_type:
        raise CheckpointError(
            f"{path} holds a {stored_type!r} policy but this run is configured with "
            f"policy={model.policy_type}; resume with policy={stored_type}, or choose a fresh out=<folder>"
        )
    device = next(model.parameters()).device
    _load_strict(model, _read_weights(path / RAW_WEIGHTS, device), path / RAW_WEIGHTS)
    weights = path / POLICY / WEIGHTS_FILE
    _load_strict(ema_model, _read_weights(weights, device), weights)
    try:
        blob = torch.load(path / TRAIN_STATE, map_location=device, weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        return TrainState(
            step=blob["step"], ema_updates=blob["ema_updates"], best_success=blob["best_success"]
        )
    except (RuntimeError, KeyError, ValueError, TypeError, EOFError) as error:
        raise CheckpointError(
            f"{path / TRAIN_STATE} is damaged or does not match this run ({error}); delete {path} to resume "
            "from an older checkpoint, or choose a fresh out=<folder>"
        ) from None


def resolve_policy_dir(path: Path) -> Path:
    """The deployable policy folder inside what a user pointed at: a policy folder, a step folder, or a
    run folder (its ``best/`` if rollouts ran, else its latest checkpoint's policy)."""
    if (path / CONFIG_FILE).exists() and (path / WEIGHTS_FILE).exists():
        return path
    if (path / POLICY / CONFIG_FILE).exists():
        return path / POLICY
    if (path / BEST / CONFIG_FILE).exists():
        return path / BEST
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest / POLICY
    raise CheckpointError(
        f"no policy found at {path}: expected a policy folder (config.json + model.safetensors), a "
        "checkpoints/step_* folder, or a run folder made by scd-train"
    )


def init_weights(policy: Policy, source: Path) -> list[str]:
    """Load the weights of ``source`` (a run, step or policy folder: ``resolve_policy_dir``) into a new
    run's ``policy`` (``train.init_from``); returns the names of the tensors ``source`` lacks, which
    keep their initial values (what a config adds on top, e.g. a shortcut decoder's step embedding).
    Another policy type, a tensor ``source`` has that ``policy`` lacks, or a shape that differs is a
    ``CheckpointError`` naming it."""
    folder = resolve_policy_dir(source)
    stored_type = read_policy_record(folder)["policy_type"]
    if stored_type != policy.policy_type:
        raise CheckpointError(
            f"train.init_from={source}: {folder} holds a {stored_type!r} policy, this run trains "
            f"{policy.policy_type!r}; set policy={stored_type} or start from another run"
        )
    weights = _read_weights(folder / WEIGHTS_FILE, next(policy.parameters()).device)
    own = policy.state_dict()
    unexpected = sorted(set(weights) - set(own))
    mismatched = [
        f"{key}: {list(weights[key].shape)} there, {list(own[key].shape)} here"
        for key in sorted(set(weights) & set(own))
        if weights[key].shape != own[key].shape
    ]
    if unexpected or mismatched:
        problems = [f"not in this policy: {key}" for key in unexpected[:3]] + mismatched[:3]
        raise CheckpointError(
            f"train.init_from={source}: {folder / WEIGHTS_FILE} does not fit this run's policy "
            f"({'; '.join(problems)}); use the same size and policy settings as that run (only options "
            "that add tensors, like policy.diffusion.shortcut, may differ)"
        )
    missing = sorted(set(own) - set(weights))
    policy.load_state_dict(weights, strict=False)
    log.info("initialised from %s (%d tensors; %d new: %s)", folder, len(weights), len(missing), missing[:4])
    return missing


def freeze_parameters(policy: Policy, prefixes: list[str]) -> int:
    """Stop training the parameters whose names start with any of ``prefixes`` (``train.freeze``);
    returns how many parameters that froze. A prefix that names no parameter is a ``ValueError``
    listing the top-level modules."""
    named = dict(policy.named_parameters())
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in named):
            tops = sorted({name.split(".")[0] + "." for name in named})
            raise ValueError(
                f"train.freeze: {prefix!r} names no parameter of this policy; its modules: {tops}"
            )
    frozen = 0
    for name, param in named.items():
        if name.startswith(tuple(prefixes)):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def _read_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {error}") from None


def _contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().contiguous() for key, value in model.state_dict().items()}


def _load_strict(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    fix = "resume with the same policy config, or start a new run folder (out=...)"
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"{source} does not match this run's policy ({error}); {fix}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match this run's policy (missing keys: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}); {fix}"
        )
