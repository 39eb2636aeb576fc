"""Training checkpoints: everything needed to resume a run exactly, written atomically.

Layout of a run folder::

    <run>/checkpoints/step_00001000/
        policy/              deployable EMA policy (model.safetensors + config.json), load_policy() reads it
        raw.safetensors      the raw (non-EMA) weights being optimised
        train_state.pt       optimiser, scheduler, step, EMA counter, RNG states (tensors and plain data
                             only: read back with torch.load(weights_only=True), never unpickling code)
    <run>/checkpoints/latest.json   {"name": "step_00001000", "step": 1000}
    <run>/best/              copy of the deployable policy with the best rollout success so far
    <run>/best.json          {"step": ..., "success_rate": ...}

Each step folder is written to a temporary name and renamed into place; ``latest.json`` is replaced
atomically after that, so a kill -9 at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scd_policy.io import atomic_directory, atomic_write_text
from scd_policy.policies import Policy

LATEST = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run it should resume."""


@dataclass
class TrainState:
    step: int
    ema_updates: int
    best_success: float | None


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
    """Write ``checkpoints/step_<N>`` atomically, point ``latest.json`` at it, prune old ones."""
    checkpoints = run_dir / "checkpoints"
    name = f"step_{state.step:08d}"
    with atomic_directory(checkpoints / name) as tmp:
        ema_model.save_pretrained(tmp / "policy")
        save_file(_contiguous_state(model), str(tmp / "raw.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": state.step,
                "ema_updates": state.ema_updates,
                "best_success": state.best_success,
                "rng": rng_state(),
            },
            tmp / "train_state.pt",
        )
    atomic_write_text(checkpoints / LATEST, json.dumps({"name": name, "step": state.step}))
    existing = sorted(p for p in checkpoints.glob("step_*") if p.is_dir())
    for stale in existing[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return checkpoints / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    try:
        name = str(json.loads(pointer.read_text())["name"])
    except (json.JSONDecodeError, KeyError) as error:
        raise CheckpointError(f"{pointer} is corrupt ({error}); delete it to resume from scratch") from error
    path = run_dir / "checkpoints" / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points at {path}, which does not exist")
    return path


def load_checkpoint(
    path: Path,
    *,
    model: Policy,
    ema_model: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    """Restore weights, optimiser, scheduler and RNG state in place; returns the step counters."""
    for required in ("policy", "raw.safetensors", "train_state.pt"):
        if not (path / required).exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {required} is missing")
    device = next(model.parameters()).device
    _load_strict(
        model, load_file(str(path / "raw.safetensors"), device=str(device)), path / "raw.safetensors"
    )
    ema_weights = load_file(str(path / "policy" / "model.safetensors"), device=str(device))
    _load_strict(ema_model, ema_weights, path / "policy" / "model.safetensors")
    blob = torch.load(path / "train_state.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return TrainState(step=blob["step"], ema_updates=blob["ema_updates"], best_success=blob["best_success"])


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
